"""The ini loader: defaults, secrets, and a table of bad inputs with their messages."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
from ini import minimal_ini

from gateway.config import (
    ConfigError,
    Secret,
    Settings,
    documented_options,
    load_settings,
    option_default,
    parse_settings,
    resolve_secret,
)
from gateway.vapi.assistants import AssistantById, InlineAssistant

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "vapi-gateway.ini"


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(minimal_ini() + text, "gw.ini", environ or {})
    return info.value.problems


def parse(text: str = "", environ: dict[str, str] | None = None) -> Settings:
    return parse_settings(minimal_ini() + text, "gw.ini", environ or {})


def test_defaults_when_empty() -> None:
    settings = parse()
    assert settings.gateway.listen == "tcp:8080:interface=127.0.0.1"
    assert settings.gateway.max_concurrent_calls == 100
    assert settings.log.format == "json"
    assert settings.source == "gw.ini"


def test_settings_are_immutable() -> None:
    settings = parse()
    with pytest.raises(AttributeError):
        settings.gateway.max_concurrent_calls = 5  # type: ignore[misc]


def test_values_are_typed() -> None:
    settings = parse(
        "[gateway]\nmax_concurrent_calls = 7\ndrain_timeout = 2.5\n"
        "listen = systemd:domain=INET:index=0\npublic_url = https://gw.example.com/base\n",
    )
    assert settings.gateway.max_concurrent_calls == 7
    assert settings.gateway.drain_timeout == 2.5
    assert settings.gateway.listen == "systemd:domain=INET:index=0"


BAD_INPUTS = [
    ("[gatway]\n", r"^gw\.ini: \[gatway\]: unknown section \(allowed: .*gateway.*\)$"),
    ("[gateway]\nmax_calls = 3\n",
     r"^gw\.ini: \[gateway\] max_calls: unknown key; did you mean max_concurrent_calls\?"),
    ("[gateway]\nmax_concurrent_calls = lots\n",
     r"^gw\.ini: \[gateway\] max_concurrent_calls: 'lots' is not a whole number; "
     r"allowed: a whole number from 1 to 100000$"),
    ("[gateway]\nmax_concurrent_calls = 0\n",
     r"^gw\.ini: \[gateway\] max_concurrent_calls: 0 is too small; allowed: a whole number"),
    ("[gateway]\nmax_concurrent_calls = 2.5\n", r"'2\.5' is not a whole number"),
    ("[gateway]\ndrain_timeout = -1\n", r"drain_timeout: -1 is too small; allowed: a number"),
    ("[gateway]\ndrain_timeout = nan\n", r"drain_timeout: 'nan' is not a finite number"),
    ("[gateway]\ndrain_timeout = 1e9\n", r"drain_timeout: 1e\+09 is too large"),
    ("[gateway]\nlisten = http:8080\n", r"listen: unknown endpoint kind 'http'"),
    ("[gateway]\nlisten = tcp:eighty\n", r"listen: bad port 'eighty'"),
    ("[gateway]\nlisten = systemd:index=0\n", r"listen: a systemd endpoint needs domain="),
    ("[gateway]\npublic_url = gw.example.com\n",
     r"public_url: not an absolute http:// or https:// URL"),
    ("[gateway]\npublic_url = https://gw.example.com/?x=1\n",
     r"public_url: must not carry a query string"),
    ("[gateway]\nhealth_path = health\n", r"health_path: not a URL path starting with /"),
    ("[log]\nformat = xml\n",
     r"^gw\.ini: \[log\] format: 'xml' is not allowed; allowed: one of json, console$"),
    ("[log]\nlevel = loud\n", r"level: 'loud' is not allowed; allowed: one of debug"),
    ("not an ini file\n", r"^gw\.ini: not a valid ini file: "),
    ("[gateway]\nlisten = a\nlisten = b\n", r"^gw\.ini: not a valid ini file: "),
]


@pytest.mark.parametrize(("text", "pattern"), BAD_INPUTS)
def test_bad_input_gives_one_clear_line(text: str, pattern: str) -> None:
    found = problems(text)
    assert len(found) == 1, found
    assert re.search(pattern, found[0]), found[0]


SECTION_PROBLEMS = [
    ({"twilio": {"auth_token": ""}}, r"\[twilio\] auth_token: missing required secret"),
    ({"twilio": {"auth_token": "env:NO_SUCH_VAR"}},
     r"^gw\.ini: \[twilio\] auth_token: environment variable NO_SUCH_VAR is not set"),
    ({"twilio": {"stream_token_secret": "x" * 31}}, r"stream_token_secret: too short"),
    ({"gateway": {"public_url": "http://gw.example.com"}},
     r"public_url: http:// is only allowed for loopback hosts"),
    ({"twilio": {"account_sid": "XX123"}}, r"account_sid: not an account SID"),
    ({"twilio": {"hangup_via": "rest"}}, r"\[twilio\] hangup_via = rest needs account_sid"),
    ({"twilio": {"validate_signatures": "maybe"}},
     r"validate_signatures: 'maybe' is not true or false; allowed: true or false"),
    ({"vapi": {"api_url": "http://vapi.example.com"}},
     r"api_url: http:// is only allowed for loopback hosts"),
    ({"vapi": {"sample_rate": "16000"}}, r"audio_format = mulaw needs sample_rate = 8000"),
    ({"vapi": {"webhook_secret": ""}}, r"webhook_auth = secret needs webhook_secret"),
    ({"vapi": {"on_vapi_loss": "retry"}}, r"on_vapi_loss: 'retry' is not allowed"),
    ({"assistant": {"id": "", "file": ""}}, r"give exactly one of id .* or file"),
    ({"assistant": {"id": "", "file": "missing.json"}},
     r"\[assistant\] file: cannot read .*missing\.json"),
    ({"routing": {"sales": "asst-1"}}, r"\[routing\] sales: not a phone number"),
    ({"routing": {"+15551230001": "two words"}},
     r"\[routing\] \+15551230001: 'two words' is not an assistantId or file:PATH"),
    ({"bridge": {"playout_lead_ms": "500", "playout_lead_max_ms": "300"}},
     r"need playout_lead_min_ms <= playout_lead_ms <= playout_lead_max_ms"),
    ({"bridge": {"barge_in_signals": "user-interrupted,shout"}},
     r"barge_in_signals: allowed items"),
    ({"bridge": {"max_unconfirmed_ms": "300"}},
     r"need max_unconfirmed_ms = 0 or at least playout_lead_max_ms \+ 20 ms x mark_every_frames"),
    ({"bridge": {"mark_every_frames": "50"}}, r"need max_unconfirmed_ms = 0 or at least"),
]


@pytest.mark.parametrize(("sections", "pattern"), SECTION_PROBLEMS)
def test_section_problems(sections: dict[str, dict[str, str]], pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(minimal_ini(**sections), "gw.ini", {})
    assert len(info.value.problems) == 1, info.value.problems
    assert re.search(pattern, info.value.problems[0]), info.value.problems[0]


def test_routing_and_inline_assistant_files(tmp_path: Path) -> None:
    (tmp_path / "front.json").write_text('{"firstMessage": "Hi"}')
    (tmp_path / "sales.json").write_text('{"firstMessage": "Sales"}')
    ini = tmp_path / "gw.ini"
    ini.write_text(minimal_ini(assistant={"id": "", "file": "front.json"},
                               routing={"+1 555 123 0001": "asst-sales",
                                        "+15551230002": "file:sales.json"}))
    settings = load_settings(str(ini), {})
    table = settings.routing
    assert table.default == InlineAssistant({"firstMessage": "Hi"})
    assert table.routes["+15551230001"] == AssistantById("asst-sales")
    assert table.routes["+15551230002"] == InlineAssistant({"firstMessage": "Sales"})


def test_every_problem_is_reported_at_once() -> None:
    found = problems("[gateway]\nmax_concurrent_calls = x\ndrain_timeout = y\n[nope]\n")
    assert len(found) == 3


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings("/nonexistent/gw.ini")
    assert info.value.problems == [
        "/nonexistent/gw.ini: cannot read the config file: No such file or directory"]


def test_secret_sources(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    (tmp_path / "cred").write_text("from-cred")
    env = {"TOKEN": "from-env", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert resolve_secret("env:TOKEN", env) == ("from-env", "env:TOKEN")
    assert resolve_secret(f"file:{tmp_path}/tok", env)[0] == "from-file"
    assert resolve_secret("cred:cred", env)[0] == "from-cred"
    assert resolve_secret("inline-value", env) == ("inline-value", "inline")
    with pytest.raises(ValueError, match="environment variable NOPE is not set"):
        resolve_secret("env:NOPE", env)
    with pytest.raises(ValueError, match="cannot read"):
        resolve_secret(f"file:{tmp_path}/missing", env)
    with pytest.raises(ValueError, match="CREDENTIALS_DIRECTORY"):
        resolve_secret("cred:x", {})


def test_secret_never_prints_its_value() -> None:
    secret = Secret("hunter2-hunter2", "env:X")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}"
    assert secret.reveal() == "hunter2-hunter2"


def _shipped_sections() -> dict[str, str]:
    """Each section of the shipped ini as its raw text (comments included)."""
    text = SHIPPED.read_text()
    parts = re.split(r"^\[([^\]]+)\]\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_shipped_config_documents_every_option_with_its_default() -> None:
    sections = _shipped_sections()
    for section, options in documented_options().items():
        assert section in sections, f"[{section}] missing from {SHIPPED.name}"
        body = sections[section]
        for key, meta in options.items():
            match = re.search(rf"^;?{key} = ?(.*)$", body, flags=re.M)
            assert match, f"[{section}] {key} is not documented in {SHIPPED.name}"
            block = body[: match.start()].rstrip().split("\n\n")[-1].splitlines()
            assert any(line.startswith("; ") for line in block), f"[{section}] {key}: no comment"
            default = option_default(section, key)
            if meta.secret or meta.required:
                continue
            if match.group(0).startswith(";"):  # a commented line shows the default
                shown = match.group(1).strip()
                expected = (",".join(default) if isinstance(default, tuple) else
                            str(default).lower() if isinstance(default, bool) else
                            "" if default is None else f"{default:g}"
                            if isinstance(default, float) else str(default))
                assert shown == expected, f"[{section}] {key}: {shown!r} is not {expected!r}"


def test_shipped_config_is_valid() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SHIPPED)
    settings = load_settings(str(SHIPPED), environ={"PATH": "/bin"} | _dev_env())
    assert isinstance(settings, Settings)


def _dev_env() -> dict[str, str]:
    """What `make run` exports for the shipped config's env: secrets."""
    text = SHIPPED.read_text()
    return {name: f"dev-value-for-{name}" for name in re.findall(r"env:([A-Z_]+)", text)}
