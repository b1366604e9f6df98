"""Logging: one structlog pipeline and one Twisted observer for everything the daemon says.

Application code logs with structlog (``get_logger(__name__).bind(call_sid=...)``); the
last step of the structlog pipeline emits into :mod:`twisted.logger`, so the gateway's
events and Twisted's own share one stream.  :class:`LineObserver` writes that stream as
one JSON object per line (journald-friendly, with ``level``) or as readable console
lines, to the real stdout (twistd redirects ``sys.stdout``).

Secrets never reach the output: the :class:`Redactor` knows every configured secret and
every runtime capability (such as a Vapi call-socket URL) and blanks them in each
rendered line, whichever code path logged them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterable, MutableMapping
from typing import IO, Any

import structlog
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from twisted.logger import Logger as TwistedLogger
from twisted.python.failure import Failure
from zope.interface import implementer

REDACTED = "[REDACTED]"
_MIN_SECRET_LENGTH = 6

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warning": LogLevel.warn,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
_LEVEL_NAMES = {LogLevel.debug: "debug", LogLevel.info: "info", LogLevel.warn: "warning",
                LogLevel.error: "error", LogLevel.critical: "critical"}
# syslog priorities for journald's "<N>" line prefix
_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}


class Redactor:
    """The set of strings that must never be written; thread-safe, cheap to apply."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        with self._lock:
            new = set(self._secrets)
            new.update(s for s in secrets if len(s) >= _MIN_SECRET_LENGTH)
            # longest first, so a secret containing another is blanked whole
            self._secrets = tuple(sorted(new, key=len, reverse=True))

    def discard(self, *secrets: str) -> None:
        with self._lock:
            self._secrets = tuple(s for s in self._secrets if s not in secrets)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


#: The process-wide redactor; configured secrets are added at start-up.
redactor = Redactor()

_STRUCTLOG_MARK = "gateway_event"
_TWISTED_KEYS = frozenset(
    {"log_logger", "log_level", "log_namespace", "log_source", "log_format", "log_time",
     "log_failure", "log_text", "log_io", "log_system", "log_trace", "log_flattened",
     "log_legacy", "message", "isError", "format", "system", "time", "why", "failure",
     "log_stack", _STRUCTLOG_MARK}
)


def _json_default(value: object) -> str:
    return repr(value)


def _failure_text(failure: Failure) -> str:
    try:
        return failure.getTraceback()
    except Exception:  # pragma: no cover - a broken failure must not break logging
        return repr(failure)


def render_event(event: MutableMapping[str, Any], fmt: str) -> str:
    """Render one Twisted log event as a JSON or console line (not yet redacted)."""
    level = event.get("log_level", LogLevel.info)
    level_name = _LEVEL_NAMES.get(level, "info")
    when = event.get("log_time") or time.time()
    if event.get(_STRUCTLOG_MARK):
        message = str(event.get("event", ""))
        fields = {k: v for k, v in event.items() if k not in _TWISTED_KEYS and k != "event"}
    else:
        has_text = "log_format" in event or "message" in event
        message = formatEvent(event) if has_text else ""  # type: ignore[arg-type]
        if not message and "log_failure" not in event:
            message = str(event.get("log_text", ""))
        fields = {}
    logger_name = event.get("logger") or event.get("log_namespace", "")
    if logger_name == "log_legacy":
        logger_name = str(event.get("log_system", "twisted"))
    fields.pop("logger", None)
    failure = event.get("log_failure")
    if fmt == "json":
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
            + f".{int((when % 1) * 1000):03d}Z",
            "level": level_name,
            "logger": logger_name,
            "event": message,
        }
        record.update(fields)
        if isinstance(failure, Failure):
            record["exception"] = _failure_text(failure)
        return json.dumps(record, default=_json_default, separators=(",", ":"))
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int((when % 1) * 1000):03d}"
    extra = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
    line = f"{stamp} {level_name:<8} {logger_name}: {message}" + (f" {extra}" if extra else "")
    if isinstance(failure, Failure):
        line += "\n" + _failure_text(failure)
    return line


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line to ``out``; redacts; journald priority prefix."""

    def __init__(self, out: IO[str], fmt: str, redact: Redactor | None = None,
                 journald: bool | None = None) -> None:
        self._out = out
        self._fmt = fmt
        self._redact = redact or redactor
        self._journald = bool(os.environ.get("JOURNAL_STREAM")) if journald is None else journald

    def __call__(self, event: MutableMapping[str, Any]) -> None:
        try:
            line = self._redact(render_event(event, self._fmt))
        except Exception as exc:  # never let a bad event break logging
            line = self._redact(json.dumps({"level": "error", "event": "unrenderable log event",
                                            "error": repr(exc)}))
        if self._fmt == "json":
            line = line.replace("\n", "\\n")
        if self._journald:
            line = f"<{_PRIORITY.get(event.get('log_level', LogLevel.info), 6)}>{line}"
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): nothing sensible left to do


# -- structlog → twisted.logger -------------------------------------------------------

_twisted_log = TwistedLogger(namespace="gateway")


class _TwistedEmitter:
    """structlog's final "logger": emits the event dict into twisted.logger."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _emit(self, level: LogLevel, event: dict[str, Any]) -> None:
        event.pop("level", None)  # collides with Logger.emit's parameter
        event.setdefault("logger", self._name)
        failure = event.pop("exc_info", None)
        if failure is True:
            event["log_failure"] = Failure()
        elif isinstance(failure, Failure):
            event["log_failure"] = failure
        # the format is literal: the message is never parsed for {fields}
        _twisted_log.emit(level, None, **{_STRUCTLOG_MARK: True}, **event)

    def debug(self, **event: Any) -> None:
        self._emit(LogLevel.debug, event)

    def info(self, **event: Any) -> None:
        self._emit(LogLevel.info, event)

    def warning(self, **event: Any) -> None:
        self._emit(LogLevel.warn, event)

    def error(self, **event: Any) -> None:
        self._emit(LogLevel.error, event)

    def critical(self, **event: Any) -> None:
        self._emit(LogLevel.critical, event)

    msg = info
    warn = warning
    exception = error
    failure = error


def _logger_factory(*args: Any) -> _TwistedEmitter:
    return _TwistedEmitter(str(args[0]) if args else "gateway")


def _to_kwargs(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    return dict(event_dict)


def configure_structlog(level: str = "debug") -> None:
    """Send structlog events into twisted.logger, dropping those below ``level``."""
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _to_kwargs],
        wrapper_class=structlog.make_filtering_bound_logger(_std_level(level)),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=False,
    )


def _std_level(level: str) -> int:
    return {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}[level]


def get_logger(name: str, **bound: Any) -> Any:
    """A structlog logger named ``name`` with ``bound`` context on every line."""
    return structlog.get_logger(name, **bound)


# -- twistd's --logger hook -------------------------------------------------------------

_observer_config: dict[str, str] = {"format": "json", "level": "info"}


def set_observer_config(fmt: str, level: str) -> None:
    """Remember the ini's log format and level for :func:`observer` (called at parse time)."""
    _observer_config["format"] = fmt
    _observer_config["level"] = level
    configure_structlog(level)


def observer() -> ILogObserver:
    """twistd ``--logger`` factory: the configured line observer, filtered by level."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[_observer_config["level"]])
    line = LineObserver(sys.__stdout__ or sys.stdout, _observer_config["format"])
    return FilteringLogObserver(line, [predicate])


def start_logging_to(out: IO[str], fmt: str = "json", level: str = "debug") -> ILogObserver:
    """Add a line observer to the global publisher (tests and the standalone tools)."""
    configure_structlog(level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    obs = FilteringLogObserver(LineObserver(out, fmt), [predicate])
    globalLogPublisher.addObserver(obs)
    return obs
