"""The real ``twistd -n vapi-gateway`` on loopback: start, probe, drain, refuse to start."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ini import minimal_ini

from gateway.tools.daemon_process import (
    DaemonProcess,
    free_port,
    listening_socket,
    twistd_path,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def base_config(port: int, **sections: dict[str, str]) -> str:
    overrides = {"gateway": {"listen": f"tcp:{port}:interface=127.0.0.1",
                             "public_url": f"http://127.0.0.1:{port}", "drain_timeout": "5"},
                 "log": {"format": "json", "level": "debug"},
                 "admin": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"}}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return minimal_ini(**overrides)


@pytest.fixture
def daemons(log_capture_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    with log_capture_path.open("a", encoding="utf-8") as capture:
        for daemon in started:
            daemon.kill()
            capture.write("\n".join(daemon.lines) + "\n")


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serves_health_and_exits_zero_on_sigterm(daemons: list[DaemonProcess]) -> None:
    port = free_port()
    daemon = DaemonProcess(base_config(port))
    daemons.append(daemon)
    daemon.start()
    daemon.wait_ready()
    code, body = get(f"http://127.0.0.1:{port}/health")
    assert code == 200 and body["status"] == "ok" and body["active_calls"] == 0
    assert get(f"http://127.0.0.1:{port}/ready") == (200, {"ready": True})
    assert daemon.terminate(timeout=10) == 0
    events = [e["event"] for e in daemon.events()]
    assert events.index("draining") < events.index("stopped")
    assert not any("Traceback" in line for line in daemon.lines)
    assert all(line.startswith("{") for line in daemon.lines if line), daemon.lines


def test_bad_config_exits_non_zero_with_clear_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text(minimal_ini(gateway={"max_concurrent_calls": "many"}, log={"format": "xml"}))
    out = subprocess.run([twistd_path(), "-n", "--pidfile=", "vapi-gateway", "--config",
                          str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"vapi-gateway: {bad}: [gateway] max_concurrent_calls: 'many' is not a whole number; "
        "allowed: a whole number from 1 to 100000",
        f"vapi-gateway: {bad}: [log] format: 'xml' is not allowed; allowed: one of json, console",
        "vapi-gateway: 2 problem(s) in the config; not starting",
    ]
    assert "Traceback" not in out.stdout + out.stderr


def test_check_flag_validates_and_exits(tmp_path: Path) -> None:
    good = tmp_path / "good.ini"
    good.write_text(base_config(free_port()))
    out = subprocess.run([twistd_path(), "vapi-gateway", "--config", str(good), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, f"vapi-gateway: {good}: OK")


def test_port_in_use_exits_non_zero(daemons: list[DaemonProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = DaemonProcess(base_config(port))
        daemons.append(daemon)
        daemon.start()
        code = daemon.wait(timeout=30)
    assert code != 0
    (critical,) = [e for e in daemon.events() if e["level"] == "critical"]
    assert critical["reason"] == (
        f"cannot listen on 'tcp:{port}:interface=127.0.0.1': Address already in use")
    assert not any("Traceback" in line for line in daemon.lines)


def test_systemd_socket_activation(daemons: list[DaemonProcess]) -> None:
    with listening_socket() as listening:
        port = listening.getsockname()[1]
        text = base_config(port, gateway={"listen": "systemd:domain=INET:index=0"})
        daemon = DaemonProcess(text, listen_socket=listening)
        daemons.append(daemon)
        daemon.start()
        daemon.wait_ready()
    # our copy is closed: the daemon serves on the inherited socket alone
    assert get(f"http://127.0.0.1:{port}/health")[0] == 200
    assert daemon.terminate(timeout=10) == 0


def test_systemd_listen_without_an_inherited_socket_is_one_clear_line(
        daemons: list[DaemonProcess]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    daemon = DaemonProcess(base_config(free_port(),
                                       gateway={"listen": "systemd:domain=INET:index=0"}),
                           env=env)
    daemons.append(daemon)
    daemon.start()
    assert daemon.wait(timeout=30) != 0
    (critical,) = [e for e in daemon.events() if e["level"] == "critical"]
    assert "no such socket inherited from systemd" in critical["reason"]
    assert not any("Traceback" in line for line in daemon.lines)


def test_notify_socket_ready_and_stopping(tmp_path: Path,
                                          daemons: list[DaemonProcess]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
        daemon = DaemonProcess(base_config(free_port()), env=env)
        daemons.append(daemon)
        daemon.start()
        assert notify.recv(4096).decode() == "READY=1\nSTATUS=serving; 0 active calls"
        daemon.process.terminate()  # type: ignore[union-attr]
        assert notify.recv(4096).decode() == "STOPPING=1\nSTATUS=draining; 0 active calls"
        assert daemon.wait(10) == 0


def systemd_analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing in CI (.ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")
    return analyze


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    unit = (ROOT / "etc" / "systemd" / "vapi-gateway.service").read_text()
    assert "/opt/vapi-gateway/.venv/bin/twistd -n --pidfile= vapi-gateway --config" in unit
    # point ExecStart at this checkout's twistd so verify can check the executable
    local = unit.replace("/opt/vapi-gateway/.venv/bin/twistd", twistd_path())
    (tmp_path / "vapi-gateway.service").write_text(local)
    out = subprocess.run([analyze, "verify", str(tmp_path / "vapi-gateway.service")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "vapi-gateway.service" not in out.stderr, out.stderr
    for needed in ("Type=notify", "Restart=on-failure", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "PrivateTmp=yes", "WatchdogSec=", "LoadCredential="):
        assert needed in unit
    stop = int(unit.split("TimeoutStopSec=")[1].split()[0])
    assert stop > 30  # the default drain_timeout


def service_lines(unit: str) -> list[str]:
    """The [Service] section's settings, comments and blank lines dropped."""
    section = unit.split("[Service]\n", 1)[1].split("\n[Install]", 1)[0]
    return [line for line in section.splitlines() if line and not line.startswith("#")]


def test_systemd_analyze_accepts_the_worker_units(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    folder = ROOT / "etc" / "systemd"
    template = (folder / "vapi-gateway@.service").read_text()
    socket_unit = (folder / "vapi-gateway.socket").read_text()
    target = (folder / "vapi-gateway-workers.target").read_text()
    # verify needs an instance of the template; the socket's Service= names worker 0
    local = template.replace("/opt/vapi-gateway/.venv/bin/twistd", twistd_path())
    for name, text in {"vapi-gateway@.service": local, "vapi-gateway@0.service": local,
                       "vapi-gateway.socket": socket_unit,
                       "vapi-gateway-workers.target": target}.items():
        (tmp_path / name).write_text(text)
    names = ["vapi-gateway@0.service", "vapi-gateway.socket", "vapi-gateway-workers.target"]
    out = subprocess.run([analyze, "verify", *(str(tmp_path / name) for name in names)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "vapi-gateway" not in out.stderr, out.stderr

    # the worker: notify, one shared socket, its instance number on the command line
    lines = service_lines(template)
    assert "Type=notify" in lines and "Sockets=vapi-gateway.socket" in lines
    assert "Requires=vapi-gateway.socket" in template.splitlines()
    assert any(line.startswith("After=") and "vapi-gateway.socket" in line
               for line in template.splitlines())
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.endswith(" --config /etc/vapi-gateway/vapi-gateway.ini --worker %i")
    # the same hardening, secrets and timeouts as the single-process unit
    single = service_lines((folder / "vapi-gateway.service").read_text())
    expected = [line if not line.startswith(("ExecStart=", "ExecReload=")) else
                line + " --worker %i" for line in single]
    assert [line for line in lines if line != "Sockets=vapi-gateway.socket"] == expected

    # the socket: one listening socket for all (no per-worker queues), Nagle off
    settings = dict(line.split("=", 1) for line in socket_unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["ListenStream"] == "0.0.0.0:8080"  # matches domain=INET
    assert settings["Accept"] == "no" and settings["ReusePort"] == "no"
    assert settings["NoDelay"] == "true" and int(settings["Backlog"]) >= 128
    assert settings["Service"] == "vapi-gateway@0.service"
    assert "WantedBy=vapi-gateway-workers.target" in template
    assert "PartOf=vapi-gateway-workers.target" in template
