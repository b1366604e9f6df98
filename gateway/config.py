"""The ini file: a declarative schema, a validating loader, and typed, immutable settings.

Every option is a field of a frozen dataclass (one per ini section) whose metadata says
what it is for, its bounds and whether it is a secret.  :func:`load_settings` reads an
ini file, checks every section and key against the schema *before any port is bound*
and returns a :class:`Settings`, or raises :class:`ConfigError` with one line per
problem in the form ``FILE: [section] key: what was wrong; allowed: what is allowed``.

Secrets never need to sit in the file: a secret option's value may be
``env:NAME`` (an environment variable), ``file:/path`` (the file's content, trailing
newline stripped) or ``cred:NAME`` (``$CREDENTIALS_DIRECTORY/NAME``, systemd's
``LoadCredential=``).  Secret values are :class:`Secret` instances whose ``repr`` and
``str`` never show the value.
"""

from __future__ import annotations

import configparser
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class Secret:
    """A secret string: ``reveal()`` gives the value; printing it never does."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "inline") -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"Secret(<{self.source}>)"

    __str__ = __repr__


class ConfigError(Exception):
    """The ini file is not valid; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Option:
    """What the schema knows about one ini key beyond its Python type."""

    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    secret: bool = False
    required: bool = False
    check: Callable[[Any], str | None] | None = None


def option(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    secret: bool = False,
    required: bool = False,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """Declare an ini option as a dataclass field with its default and documentation."""
    meta = Option(doc, minimum, maximum, choices, secret, required, check)
    return field(default=default, metadata={"option": meta})


# -- value checks -------------------------------------------------------------------

_SERVER_ENDPOINT_KINDS = ("tcp", "tcp6", "unix", "systemd", "ssl")


def check_server_endpoint(value: str) -> str | None:
    """A twistd server endpoint string; only its kind and shape are checked here."""
    kind = value.split(":", 1)[0]
    if kind not in _SERVER_ENDPOINT_KINDS:
        return f"unknown endpoint kind {kind!r}"
    if kind in ("tcp", "tcp6", "ssl"):
        port = value.split(":")[1] if ":" in value else ""
        port = port.split("=", 1)[1] if port.startswith("port=") else port
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            return f"bad port {port!r}"
    if kind == "systemd" and "domain=" not in value:
        return "a systemd endpoint needs domain= (e.g. systemd:domain=INET:index=0)"
    return None


def check_http_base_url(value: str) -> str | None:
    """An absolute http(s) URL with a host and no query or fragment."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an absolute http:// or https:// URL"
    if parts.query or parts.fragment:
        return "must not carry a query string or fragment"
    return None


def check_path(value: str) -> str | None:
    """A URL path of the public listener."""
    if not value.startswith("/") or "?" in value or "#" in value or " " in value:
        return "not a URL path starting with /"
    return None


# -- the schema ---------------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySettings:
    """[gateway]: the public listener, capacity and shutdown."""

    listen: str = option(
        "tcp:8080:interface=127.0.0.1",
        "twistd endpoint of the one public port (webhooks and WebSockets)",
        check=check_server_endpoint,
    )
    public_url: str = option(
        "http://127.0.0.1:8080",
        "base URL at which Twilio reaches this gateway (signatures are checked against it)",
        check=check_http_base_url,
    )
    max_concurrent_calls: int = option(
        100, "calls admitted at once; more get the busy message", minimum=1, maximum=100000
    )
    drain_timeout: float = option(
        30.0, "seconds active calls may run on after SIGTERM", minimum=0, maximum=86400
    )
    health_path: str = option("/health", "liveness route", check=check_path)
    ready_path: str = option("/ready", "readiness route", check=check_path)


@dataclass(frozen=True)
class LogSettings:
    """[log]: the log format and level."""

    format: str = option(
        "json", "json: one JSON object per line; console: readable", choices=("json", "console")
    )
    level: str = option(
        "info", "lowest level written", choices=("debug", "info", "warning", "error", "critical")
    )


@dataclass(frozen=True)
class Settings:
    """Everything the ini file configures; each attribute is one section."""

    gateway: GatewaySettings = GatewaySettings()
    log: LogSettings = LogSettings()
    source: str = "<defaults>"

    def secrets(self) -> list[str]:
        """Every configured secret value, for the log redactor."""
        found: list[str] = []
        for section in _sections(type(self)).values():
            values = getattr(self, section.attr)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                if isinstance(value, Secret) and value.reveal():
                    found.append(value.reveal())
        return found


# -- loading ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Section:
    attr: str
    cls: type[Any]


def _sections(cls: type[Settings]) -> dict[str, _Section]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: _Section(f.name, hints[f.name])
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    }


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "a whole number"
    if tp is float:
        return "a number"
    if _is_str_tuple(tp):
        return "a comma-separated list"
    return "text"


def _is_str_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _optional_inner(tp: Any) -> Any | None:
    """``X | None`` → X; anything else → None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def resolve_secret(raw: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """Resolve ``env:``, ``file:`` and ``cred:`` references; return (value, source)."""
    if raw.startswith("env:"):
        name = raw[4:]
        if name not in environ:
            raise ValueError(f"environment variable {name} is not set")
        return environ[name], f"env:{name}"
    if raw.startswith("cred:"):
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError("cred: needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
        raw = "file:" + os.path.join(directory, raw[5:])
    if raw.startswith("file:"):
        path = raw[5:]
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n"), f"file:{path}"
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return raw, "inline"


def _convert(tp: Any, meta: Option, raw: str, environ: Mapping[str, str]) -> Any:
    """Convert one raw ini string to the option's type, or raise ValueError(reason)."""
    inner = _optional_inner(tp)
    if inner is not None:
        if raw.strip() == "":
            return None
        tp = inner
    if tp is Secret:
        value, source = resolve_secret(raw.strip(), environ)
        return Secret(value, source)
    raw = raw.strip()
    if tp is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{raw!r} is not true or false")
    if tp is int:
        try:
            value_i = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
        return value_i
    if tp is float:
        try:
            value_f = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not math.isfinite(value_f):
            raise ValueError(f"{raw!r} is not a finite number")
        return value_f
    if _is_str_tuple(tp):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def _allowed(tp: Any, meta: Option) -> str:
    if meta.choices:
        return "one of " + ", ".join(meta.choices)
    text = _type_name(_optional_inner(tp) or tp)
    if meta.minimum is not None and meta.maximum is not None:
        text += f" from {meta.minimum:g} to {meta.maximum:g}"
    elif meta.minimum is not None:
        text += f" of at least {meta.minimum:g}"
    elif meta.maximum is not None:
        text += f" of at most {meta.maximum:g}"
    return text


def _check_value(tp: Any, meta: Option, value: Any) -> str | None:
    if value is None:
        return None
    if meta.choices and value not in meta.choices:
        return f"{value!r} is not allowed"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.minimum is not None and value < meta.minimum:
            return f"{value:g} is too small"
        if meta.maximum is not None and value > meta.maximum:
            return f"{value:g} is too large"
    if meta.check is not None:
        return meta.check(value)
    return None


def _build_section(
    filename: str,
    name: str,
    cls: type[Any],
    raw: Mapping[str, str],
    environ: Mapping[str, str],
    problems: list[str],
) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key in raw:
        if key not in known:
            close = [k for k in known if k.startswith(key[:3])]
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(
                f"{filename}: [{name}] {key}: unknown key{hint} "
                f"(allowed: {', '.join(sorted(known))})"
            )
    for key, f in known.items():
        meta: Option = f.metadata["option"]
        tp = hints[key]
        where = f"{filename}: [{name}] {key}"
        if key in raw:
            try:
                value = _convert(tp, meta, raw[key], environ)
            except ValueError as exc:
                problems.append(f"{where}: {exc}; allowed: {_allowed(tp, meta)}")
                continue
            reason = _check_value(tp, meta, value)
            if reason is not None:
                problems.append(f"{where}: {reason}; allowed: {_allowed(tp, meta)}")
                continue
            values[key] = value
        elif meta.required:
            kind = "secret" if meta.secret else "value"
            problems.append(
                f"{where}: missing required {kind} ({meta.doc}); "
                "give it inline or as env:NAME, file:/path or cred:NAME"
            )
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # a cross-field check in __post_init__
        problems.append(f"{filename}: [{name}] {exc}")
        return None


def parse_settings(
    text: str, filename: str = "<string>", environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate ini ``text`` against the schema; raise ConfigError listing every problem."""
    env = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=filename)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError([f"{filename}: not a valid ini file: {first}"]) from None
    sections = _sections(Settings)
    problems: list[str] = []
    for name in parser.sections():
        if name not in sections:
            problems.append(
                f"{filename}: [{name}]: unknown section (allowed: {', '.join(sorted(sections))})"
            )
    built: dict[str, Any] = {}
    for name, section in sections.items():
        raw = dict(parser.items(name)) if parser.has_section(name) else {}
        built[section.attr] = _build_section(filename, name, section.cls, raw, env, problems)
    if problems:
        raise ConfigError(problems)
    return Settings(**built, source=filename)


def load_settings(path: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the ini file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the config file is not UTF-8 text"]) from None
    return parse_settings(text, path, environ)


def documented_options() -> dict[str, dict[str, Option]]:
    """Every section and key of the schema with its Option metadata (for docs and tests)."""
    out: dict[str, dict[str, Option]] = {}
    for name, section in _sections(Settings).items():
        out[name] = {f.name: f.metadata["option"] for f in dataclasses.fields(section.cls)}
    return out


def option_default(section: str, key: str) -> Any:
    """The schema default of ``[section] key``."""
    cls = _sections(Settings)[section].cls
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)
