"""The log pipeline: JSON lines, levels, Twisted's own events, bound call ids, redaction."""

from __future__ import annotations

import io
import json
from typing import cast

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, globalLogPublisher

from gateway.logs import LineObserver, Redactor, get_logger, render_event


def _publisher(fmt: str = "json", redact: Redactor | None = None,
               journald: bool = False) -> tuple[io.StringIO, LogPublisher]:
    out = io.StringIO()
    publisher = LogPublisher(LineObserver(out, fmt, redact or Redactor(), journald=journald))
    return out, publisher


def test_twisted_event_becomes_one_json_line() -> None:
    out, publisher = _publisher()
    Logger(namespace="twisted.web", observer=publisher).warn("port {port} busy", port=8080)
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "warning"
    assert record["logger"] == "twisted.web"
    assert record["event"] == "port 8080 busy"
    assert record["time"].endswith("Z")


def test_failure_is_one_line_with_exception_field() -> None:
    out, publisher = _publisher()
    try:
        raise ZeroDivisionError("x")
    except ZeroDivisionError:
        Logger(namespace="x", observer=publisher).failure("boom")
    (line,) = out.getvalue().splitlines()
    assert "ZeroDivisionError" in json.loads(line)["exception"]


def test_structlog_events_reach_twisted_with_bound_fields() -> None:
    captured: list[dict[str, object]] = []
    observer = cast(ILogObserver, captured.append)
    globalLogPublisher.addObserver(observer)
    try:
        log = get_logger("gateway.test", call_sid="CA123").bind(stream_sid="MZ9")
        log.info("media started", frames=3)
        log.debug("detail")
    finally:
        globalLogPublisher.removeObserver(observer)
    mine = [e for e in captured if e.get("logger") == "gateway.test"]
    assert [e["event"] for e in mine] == ["media started", "detail"]
    first = json.loads(render_event(dict(mine[0]), "json"))
    assert first["call_sid"] == "CA123" and first["stream_sid"] == "MZ9"
    assert first["frames"] == 3 and first["level"] == "info"
    assert mine[0]["log_level"] is LogLevel.info


def test_braces_in_messages_are_not_format_fields() -> None:
    event = {"gateway_event": True, "event": "got {weird}", "log_level": LogLevel.info,
             "logger": "x"}
    assert json.loads(render_event(event, "json"))["event"] == "got {weird}"


def test_console_format_is_readable() -> None:
    event = {"gateway_event": True, "event": "call ended", "log_level": LogLevel.info,
             "logger": "gateway.bridge", "cause": "stop", "frames": 10}
    line = render_event(event, "console")
    assert "info" in line and "gateway.bridge: call ended" in line
    assert "cause='stop'" in line and "frames=10" in line


def test_redactor_blanks_every_secret_whatever_path_logged_it() -> None:
    redact = Redactor(["s3cret-token-value"])
    out, publisher = _publisher(redact=redact)
    Logger(namespace="x", observer=publisher).info("url wss://h/s3cret-token-value/t")
    Logger(namespace="x", observer=publisher).info("x", gateway_event=True,
                                                   extra="s3cret-token-value")
    redact.add("wss://api.example/call-123/transport")
    Logger(namespace="x", observer=publisher).info("wss://api.example/call-123/transport")
    text = out.getvalue()
    assert "s3cret" not in text and "call-123" not in text
    assert text.count("[REDACTED]") == 3
    redact.discard("wss://api.example/call-123/transport")
    assert redact("wss://api.example/call-123/transport") == "wss://api.example/call-123/transport"


def test_short_values_are_not_treated_as_secrets() -> None:
    assert Redactor(["abc"])("abc def") == "abc def"


def test_journald_priority_prefix() -> None:
    out, publisher = _publisher(journald=True)
    Logger(namespace="x", observer=publisher).error("bad")
    assert out.getvalue().startswith("<3>{")


def test_unrenderable_event_does_not_break_logging() -> None:
    out = io.StringIO()
    observer = LineObserver(out, "json", Redactor(), journald=False)

    class Evil:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    observer({"gateway_event": True, "event": "x", "thing": Evil(), "log_level": LogLevel.info})
    assert json.loads(out.getvalue())["event"] == "unrenderable log event"
