"""The ``vapi-gateway`` subcommand's options: ``--worker N`` parsed, checked and passed on."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from ini import minimal_ini

import gateway.daemon
import gateway.logs
from gateway.tap import Options, makeService, worker_number
from gateway.tools.daemon_process import twistd_path


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A valid ini; parsing it must not change the session's logging (debug, json)."""
    for key, value in gateway.logs._observer_config.items():
        monkeypatch.setitem(gateway.logs._observer_config, key, value)
    path = tmp_path / "gw.ini"
    path.write_text(minimal_ini(log={"format": "json", "level": "debug"}))
    return str(path)


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_worker_defaults_to_none(config: str) -> None:
    assert parse("--config", config)["worker"] is None


@pytest.mark.parametrize(("given", "expected"), [("0", 0), ("3", 3), ("12", 12), ("007", 7)])
def test_worker_is_stored_as_a_number(config: str, given: str, expected: int) -> None:
    assert parse("--config", config, "--worker", given)["worker"] == expected
    assert parse("--config", config, f"--worker={given}")["worker"] == expected


@pytest.mark.parametrize("bad", ["-1", "x", "1.5", "", "²", "0x1", "+1"])
def test_bad_worker_is_one_line_and_exit_2(config: str, bad: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--config", config, "--worker", bad)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"vapi-gateway: --worker: {bad!r} is not a whole number; allowed: a whole number "
        "from 0 up (the vapi-gateway@N instance)"]


def test_worker_number() -> None:
    assert [worker_number(v) for v in ("0", " 4 ", "10")] == [0, 4, 10]
    assert [worker_number(v) for v in ("-0", "a", "\u0661", "4e2")] == [None] * 4


def test_make_service_passes_the_worker_to_build_gateway(
        config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Built:
        service = object()

    def fake_build_gateway(settings: Any, reactor: Any, **kwargs: Any) -> Built:
        seen.update(kwargs, settings=settings)
        return Built()

    monkeypatch.setattr(gateway.daemon, "build_gateway", fake_build_gateway)
    options = parse("--config", config, "--worker", "2")
    assert makeService(options) is Built.service
    assert seen["worker"] == 2 and seen["handle_sigterm"] is True
    assert seen["settings"] is options.settings
    makeService(parse("--config", config))
    assert seen["worker"] is None


def test_twistd_rejects_a_bad_worker_before_reading_the_config(tmp_path: Path) -> None:
    out = subprocess.run([twistd_path(), "-n", "--pidfile=", "vapi-gateway", "--config",
                          str(tmp_path / "missing.ini"), "--worker", "two"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "vapi-gateway: --worker: 'two' is not a whole number; allowed: a whole number "
        "from 0 up (the vapi-gateway@N instance)"]
    assert "Traceback" not in out.stdout + out.stderr


def test_twistd_check_accepts_a_worker(config: str) -> None:
    out = subprocess.run([twistd_path(), "vapi-gateway", "--config", config, "--worker", "1",
                          "--check"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, f"vapi-gateway: {config}: OK")


def test_help_lists_the_worker_option() -> None:
    text = str(Options())
    assert "--worker=" in text and "vapi-gateway@N" in text
