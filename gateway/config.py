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
import ipaddress
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.tools.local_assistant.settings import LocalAssistantSettings, settings_from_strings
from gateway.vapi.assistants import (
    AssistantById,
    AssistantChoice,
    InlineAssistant,
    RoutingTable,
    normalize_number,
)


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
        # ASCII digits only: "²".isdigit() is true, and int() refuses it
        if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            return f"bad port {port!r}"
    if kind == "systemd" and "domain=" not in value:
        return "a systemd endpoint needs domain= (e.g. systemd:domain=INET:index=0)"
    return None


def check_http_base_url(value: str) -> str | None:
    """An absolute http(s) URL with a host and no query or fragment."""
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed IPv6 literal: "https://[::1"
        return "not an absolute http:// or https:// URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an absolute http:// or https:// URL"
    if parts.query or parts.fragment:
        return "must not carry a query string or fragment"
    return None


def check_loopback_if_plain(value: str) -> str | None:
    """http:// (and so ws://) only for loopback hosts; anything public needs TLS."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return "not a URL"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        return "http:// is only allowed for loopback hosts; use https://"
    return None


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1: the only hosts plain ws:// or http:// may reach."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        "base URL at which Twilio reaches this gateway (signatures are checked against it); "
        "https:// in production, http:// only for loopback hosts (local tests)",
        check=lambda v: check_http_base_url(v) or check_loopback_if_plain(v),
    )
    max_concurrent_calls: int = option(
        100, "calls admitted at once; more get the busy message", minimum=1, maximum=100000
    )
    drain_timeout: float = option(
        30.0, "seconds active calls may run on after SIGTERM", minimum=0, maximum=86400
    )
    drain_grace: float = option(
        2.0, "after the drain's last call ended, seconds the port stays open for Twilio's "
        "status callbacks of those calls", minimum=0, maximum=60)
    request_read_timeout: float = option(
        10.0, "seconds an HTTP client has to send one whole request (request line, headers "
        "and body) on the public and admin listeners, from the connection opening or the "
        "previous answer; then 408 and the connection is closed", minimum=1, maximum=300)
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
class TwilioSettings:
    """[twilio]: the Twilio leg — signatures, routes, TwiML, Media Streams and REST."""

    auth_token: Secret | None = option(
        None, "the account's primary Auth Token: checks X-Twilio-Signature and signs REST",
        secret=True, required=True)
    previous_auth_token: Secret | None = option(
        None, "the Auth Token being rotated out: signatures made with it are still accepted",
        secret=True)
    account_sid: str = option(
        "", "the account SID (AC…), needed for REST hang-up and outbound calls",
        check=lambda v: None if v == "" or (v.startswith("AC") and len(v) == 34)
        else "not an account SID (AC followed by 32 characters)")
    api_key_sid: str = option(
        "", "optional API key SID (SK…) used for REST instead of the Auth Token")
    api_key_secret: Secret | None = option(
        None, "the API key's secret (with api_key_sid)", secret=True)
    validate_signatures: bool = option(
        True, "check X-Twilio-Signature on every route and on the WebSocket upgrade; "
        "turning it off is logged loudly and is for local experiments only")
    voice_path: str = option("/twilio/voice", "the number's \"A call comes in\" webhook",
                             check=check_path)
    media_path: str = option("/twilio/media", "the Media Streams WebSocket", check=check_path)
    status_path: str = option("/twilio/status", "call status callbacks", check=check_path)
    stream_status_path: str = option(
        "/twilio/stream-status", "<Stream statusCallback> events", check=check_path)
    stream_token_secret: Secret | None = option(
        None, "HMAC key of the stream token binding the media socket to the signed call "
        "(at least 32 characters)", secret=True, required=True,
        check=lambda v: None if v is None or len(v.reveal()) >= 32
        else "too short: use at least 32 random characters")
    stream_token_ttl: int = option(
        120, "seconds a stream token stays valid after the voice webhook", minimum=5,
        maximum=3600)
    greeting: str = option("", "optional <Say> before the stream connects (empty: none)")
    fallback_message: str = option(
        "Sorry, we could not continue this call. Goodbye.",
        "spoken if the stream ends abnormally, before <Hangup/> (empty: hang up silently)")
    busy_message: str = option(
        "Sorry, all of our lines are busy. Please call again later.",
        "spoken to callers refused at capacity or while draining, before <Hangup/>")
    say_voice: str = option("", "voice for <Say> (empty: Twilio's default), e.g. Polly.Joanna")
    say_language: str = option("en-US", "language for <Say>")
    max_message_size: int = option(
        65536, "largest Media Streams message accepted, in bytes", minimum=1024,
        maximum=16 * 1024 * 1024)
    max_body_size: int = option(
        65536, "largest webhook body accepted, in bytes (413 beyond)", minimum=1024,
        maximum=16 * 1024 * 1024)
    max_pending_streams: int = option(
        100, "media sockets that may be open at once without a valid start message yet "
        "(each has 5 s to send one); further upgrades are refused with 503",
        minimum=1, maximum=100000)
    max_violations: int = option(
        10, "protocol violations tolerated on one media socket before it is closed",
        minimum=1, maximum=100000)
    idle_timeout: float = option(
        10.0, "seconds without media from Twilio before the stream counts as ended",
        minimum=1, maximum=3600)
    hangup_via: str = option(
        "close", "how the gateway ends the Twilio side: close (close the media socket: "
        "the TwiML fallback and <Hangup/> run) or rest (REST hang-up; needs account_sid)",
        choices=("close", "rest"))
    rest_api_url: str = option("https://api.twilio.com", "Twilio's REST base URL",
                               check=check_http_base_url)
    rest_timeout: float = option(5.0, "seconds per REST request", minimum=0.1, maximum=120)
    rest_retries: int = option(2, "retries on 5xx and network errors", minimum=0, maximum=10)

    def __post_init__(self) -> None:
        if self.hangup_via == "rest" and not self.account_sid:
            raise ValueError("hangup_via = rest needs account_sid")
        if bool(self.api_key_sid) != bool(self.api_key_secret):
            raise ValueError("api_key_sid and api_key_secret go together")


def check_api_url(value: str) -> str | None:
    """Vapi's API base URL: https (or http on loopback), or ``local`` (the local assistant)."""
    if value == "local":
        return None
    return check_http_base_url(value) or check_loopback_if_plain(value)


@dataclass(frozen=True)
class VapiSettings:
    """[vapi]: the Vapi leg — call creation, the call socket, reconnects, webhooks."""

    api_url: str = option(
        "https://api.vapi.ai", "Vapi's API base URL, or local: the local assistant runs "
        "inside the daemon on loopback ([local_assistant]), no credentials needed",
        check=check_api_url)
    api_key: Secret | None = option(
        None, "Vapi private API key (Bearer) for creating calls and opening call sockets "
        "(required unless api_url = local)", secret=True)
    audio_format: str = option(
        "mulaw", "audio on the call socket: mulaw (8000 Hz, exactly Twilio's: passes "
        "through untouched) or pcm_s16le (transcoded by the gateway)",
        choices=("mulaw", "pcm_s16le"))
    sample_rate: int = option(
        8000, "sample rate of the call-socket audio (mulaw: 8000; pcm_s16le: e.g. 16000)",
        minimum=8000, maximum=48000)
    request_timeout: float = option(
        4.0, "seconds per call-creation request (a caller is waiting)", minimum=0.5,
        maximum=60)
    request_retries: int = option(
        2, "retries of call creation on 5xx and connection errors (never on 4xx)",
        minimum=0, maximum=10)
    heartbeat_interval: float = option(
        10.0, "seconds between WebSocket pings on the call socket", minimum=1, maximum=300)
    pong_timeout: float = option(
        5.0, "seconds to wait for a pong before the link counts as dead", minimum=1,
        maximum=300)
    reconnect_attempts: int = option(
        3, "attempts to rejoin a dropped call socket before on_vapi_loss applies",
        minimum=0, maximum=20)
    reconnect_delay: float = option(
        1.0, "first reconnect delay in seconds; doubles each attempt (1, 2, 4 s)",
        minimum=0.1, maximum=60)
    on_vapi_loss: str = option(
        "recreate", "when the call socket cannot be rejoined: recreate (a new Vapi call "
        "for the same phone call) or hangup", choices=("recreate", "hangup"))
    recreate_first_message: str = option(
        "Sorry, I lost you for a moment. Could you say that again?",
        "the recreated assistant's first message")
    max_message_size: int = option(
        1048576, "largest call-socket message accepted, in bytes", minimum=4096,
        maximum=64 * 1024 * 1024)
    events_path: str = option("/vapi/events", "server-URL webhook route", check=check_path)
    webhook_auth: str = option(
        "secret", "how /vapi/events authenticates Vapi: secret (X-Vapi-Secret), bearer "
        "(a token in webhook_header), hmac (x-signature over timestamp.body) or none",
        choices=("secret", "bearer", "hmac", "none"))
    webhook_secret: Secret | None = option(
        None, "the shared secret, bearer token or HMAC key of the webhook", secret=True)
    webhook_header: str = option("Authorization", "header carrying the bearer token")
    webhook_hmac_algorithm: str = option(
        "sha256", "HMAC digest for webhook_auth = hmac", choices=("sha256", "sha1", "sha512"))
    webhook_max_skew: float = option(
        300.0, "seconds x-timestamp may differ from our clock (hmac)", minimum=1,
        maximum=3600)

    def __post_init__(self) -> None:
        if self.api_url != "local" and not self.api_key:
            raise ValueError("api_key: missing required secret (Vapi private API key); "
                             "give it inline or as env:NAME, file:/path or cred:NAME")
        if self.audio_format == "mulaw" and self.sample_rate != 8000:
            raise ValueError("audio_format = mulaw needs sample_rate = 8000")
        if self.webhook_auth != "none" and not self.webhook_secret:
            raise ValueError(f"webhook_auth = {self.webhook_auth} needs webhook_secret")


@dataclass(frozen=True)
class AssistantSettings:
    """[assistant]: the default assistant (routing can choose another per number)."""

    id: str = option("", "a Vapi assistantId (or give file)")
    file: str = option(
        "", "a JSON file holding an inline assistant (relative to the ini file's folder)")
    variable_values: bool = option(
        True, "pass the caller's number, the dialled number and the CallSid as "
        "assistantOverrides.variableValues (callerNumber, dialledNumber, twilioCallSid)")

    def __post_init__(self) -> None:
        if bool(self.id) == bool(self.file):
            raise ValueError("give exactly one of id (an assistantId) or file (inline JSON)")


@dataclass(frozen=True)
class BridgeSettings:
    """[bridge]: the media path between the legs — playout, barge-in, limits."""

    playout_lead_ms: int = option(
        80, "audio the gateway keeps queued at Twilio at the start (ms): covers Vapi "
        "stalls; barge-in cuts off at most this much", minimum=20, maximum=1000)
    playout_lead_min_ms: int = option(
        40, "the adaptive lead never shrinks below this (ms)", minimum=20, maximum=1000)
    playout_lead_max_ms: int = option(
        300, "the adaptive lead never grows beyond this (ms)", minimum=20, maximum=2000)
    buffer_seconds: float = option(
        20.0, "assistant audio held locally at most; overflow drops the oldest",
        minimum=1, maximum=300)
    mark_every_frames: int = option(
        5, "send a Twilio mark every N frames (20 ms each) to learn what was played",
        minimum=1, maximum=500)
    max_unconfirmed_ms: int = option(
        1000, "audio sent to Twilio but not yet confirmed played by a mark echo, at most "
        "(ms); past it sending waits and the audio stays in the local buffer, so a Twilio "
        "side that stops reading is not fed (0: no limit; else at least "
        "playout_lead_max_ms + 20 ms x mark_every_frames)", minimum=0, maximum=60000)
    barge_in_signals: tuple[str, ...] = option(
        ("user-interrupted", "speech-update"), "Vapi events that cut the assistant off: "
        "user-interrupted and/or speech-update (role user, status started)",
        check=lambda v: None if v and set(v) <= {"user-interrupted", "speech-update"}
        else "allowed items: user-interrupted, speech-update")
    barge_in_window_ms: int = option(
        300, "barge-in signals within this window count as one", minimum=0, maximum=10000)
    dtmf: str = option(
        "add-message", "keypresses: add-message (tell the assistant which key) or ignore "
        "(always logged and counted)", choices=("add-message", "ignore"))
    stream_wait_timeout: float = option(
        15.0, "seconds after the voice webhook for the media stream to start; the Vapi "
        "call is ended otherwise", minimum=1, maximum=600)
    max_call_duration: float = option(
        3600.0, "seconds a call may last before it is ended", minimum=10, maximum=86400)
    uplink_keepalive_ms: int = option(
        60, "when Twilio's media stalls this long, send silence frames to Vapi so it "
        "does not end the call", minimum=20, maximum=10000)
    reconnect_audio_ms: int = option(
        0, "caller audio kept while the Vapi link reconnects (ms); older audio is dropped",
        minimum=0, maximum=1000)

    def __post_init__(self) -> None:
        if not self.playout_lead_min_ms <= self.playout_lead_ms <= self.playout_lead_max_ms:
            raise ValueError("need playout_lead_min_ms <= playout_lead_ms <= playout_lead_max_ms")
        if self.max_unconfirmed_ms and self.max_unconfirmed_ms // 20 < (
                -(-self.playout_lead_max_ms // 20) + self.mark_every_frames):
            raise ValueError("need max_unconfirmed_ms = 0 or at least playout_lead_max_ms "
                             "+ 20 ms x mark_every_frames")


@dataclass(frozen=True)
class AdminSettings:
    """[admin]: the admin listener — Prometheus metrics and the admin API."""

    listen: str = option(
        "tcp:9464:interface=127.0.0.1", "twistd endpoint of the admin listener (keep it on "
        "loopback or a private network); empty: no admin listener",
        check=lambda v: None if v == "" else check_server_endpoint(v))
    token: Secret | None = option(
        None, "Bearer token of the admin API (/calls); without it every admin request is "
        "refused (401); /metrics needs no token", secret=True)
    metrics_path: str = option("/metrics", "Prometheus text format", check=check_path)
    reactor_lag_interval: float = option(
        0.1, "seconds between reactor-lag probes (a LoopingCall measuring how late it fires)",
        minimum=0.01, maximum=10)


@dataclass(frozen=True)
class RecordingSettings:
    """[recording]: optional stereo WAV recordings of calls."""

    enabled: bool = option(False, "record each call (caller left, assistant right)")
    directory: str = option("/var/lib/vapi-gateway/recordings",
                            "where recordings go, one {CallSid}.wav per call")
    flush_interval: float = option(
        0.8, "seconds between disk writes; a crash loses at most this plus caller_late_ms",
        minimum=0.1, maximum=60)
    caller_late_ms: int = option(
        200, "caller audio may arrive this late and still be placed where it was spoken",
        minimum=0, maximum=2000)
    writer_threads: int = option(2, "threads doing the recordings' disk I/O", minimum=1,
                                 maximum=16)
    max_backlog_seconds: float = option(
        30.0, "if the disk falls this far behind, recording stops for that call",
        minimum=1, maximum=600)
    fsync_on_close: bool = option(True, "fsync each recording when its call ends")


def check_cluster_backend(value: str) -> str | None:
    """``memory``, or ``redis://host[:port][/db]`` / ``rediss://…`` (TLS) with no password
    in the URL (the password is its own secret key)."""
    if value == "memory":
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "not memory or a redis:// URL"
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return "not memory or a redis://host:port/db URL"
    if parts.password is not None or parts.username is not None:
        return "put the password in [cluster] password (a secret), not in the URL"
    if port is not None and not 0 < port <= 65535:
        return f"bad port {port}"
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        return f"bad database number {db!r}"
    if parts.query or parts.fragment:
        return "must not carry a query string or fragment"
    return None


@dataclass(frozen=True)
class ClusterSettings:
    """[cluster]: one process alone (memory) or several sharing a Redis registry and bus."""

    backend: str = option(
        "memory", "memory: this process only; redis://host:port/db (rediss:// for TLS): "
        "a registry and control bus shared by every instance", check=check_cluster_backend)
    username: str = option("", "Redis ACL user name (empty: the default user)")
    password: Secret | None = option(None, "Redis password (AUTH)", secret=True)
    tls_ca_file: str = option(
        "", "rediss://: PEM file of the CA that signed the server's certificate (empty: "
        "the system's trust roots); the certificate and host name are always verified")
    instance_id: str = option(
        "", "this instance's name in the cluster, unique per process (empty: "
        "<hostname>-w<worker> with --worker, else <hostname>-<pid>)")
    key_prefix: str = option("vgw:", "prefix of every Redis key and channel (several "
                             "deployments can share one Redis)")
    command_timeout: float = option(
        0.25, "seconds a Redis command may take before Redis counts as down (nothing on "
        "the media path ever waits for Redis)", minimum=0.01, maximum=10)
    connect_timeout: float = option(2.0, "seconds to connect to Redis", minimum=0.1,
                                    maximum=60)
    refresh_interval: float = option(
        2.0, "seconds between refreshes of this instance's liveness key and its calls' "
        "TTLs", minimum=0.1, maximum=60)
    call_ttl: float = option(
        10.0, "seconds a call record outlives its owner's last refresh (a dead instance's "
        "calls expire after this)", minimum=0.5, maximum=600)
    max_cluster_calls: int = option(
        0, "calls admitted across all instances (e.g. the Vapi account's concurrency "
        "limit); 0: no cluster-wide limit ([gateway] max_concurrent_calls still applies to "
        "each instance)", minimum=0, maximum=1_000_000)
    takeover_timeout: float = option(
        1.0, "seconds a stream's worker waits for the worker that answered the call's "
        "webhook to hand its Vapi call over", minimum=0.05, maximum=10)

    def __post_init__(self) -> None:
        if self.call_ttl <= self.refresh_interval * 2:
            raise ValueError("call_ttl must be more than twice refresh_interval (a record "
                             "must survive one missed refresh)")

    @property
    def enabled(self) -> bool:
        return self.backend != "memory"


@dataclass(frozen=True)
class Settings:
    """Everything the ini file configures; each attribute is one section."""

    gateway: GatewaySettings = GatewaySettings()
    log: LogSettings = LogSettings()
    twilio: TwilioSettings = TwilioSettings()
    vapi: VapiSettings = VapiSettings(api_url="local", webhook_auth="none")
    assistant: AssistantSettings = AssistantSettings(id="default")
    bridge: BridgeSettings = BridgeSettings()
    admin: AdminSettings = AdminSettings()
    recording: RecordingSettings = RecordingSettings()
    cluster: ClusterSettings = ClusterSettings()
    routing: RoutingTable = RoutingTable()
    local_assistant: LocalAssistantSettings = LocalAssistantSettings()
    local_assistant_listen: str = "tcp:0:interface=127.0.0.1"
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
        and all("option" in g.metadata for g in dataclasses.fields(hints[f.name]))
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
        value = None
        if key in raw:
            try:
                value = _convert(tp, meta, raw[key], environ)
            except ValueError as exc:
                problems.append(f"{where}: {exc}; allowed: {_allowed(tp, meta)}")
                continue
            try:
                reason = _check_value(tp, meta, value)
            except (ValueError, TypeError) as exc:  # a check that failed on odd input
                reason = f"{raw[key].strip()[:80]!r} cannot be used ({exc})"
            if reason is not None:
                problems.append(f"{where}: {reason}; allowed: {_allowed(tp, meta)}")
                continue
            values[key] = value
        if meta.required and not value:
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
        if name not in sections and name not in ("routing", "local_assistant"):
            problems.append(
                f"{filename}: [{name}]: unknown section (allowed: {', '.join(sorted(sections))})"
            )
    built: dict[str, Any] = {}
    for name, section in sections.items():
        raw = dict(parser.items(name)) if parser.has_section(name) else {}
        built[section.attr] = _build_section(filename, name, section.cls, raw, env, problems)
    base_dir = Path(filename).resolve().parent if filename != "<string>" else Path.cwd()
    routing = _build_routing(filename, parser, built.get("assistant"), base_dir, problems)
    local, local_listen = _build_local_assistant(filename, parser, problems)
    if problems:
        raise ConfigError(problems)
    return Settings(**built, routing=routing, local_assistant=local,
                    local_assistant_listen=local_listen, source=filename)


def _build_local_assistant(filename: str, parser: configparser.ConfigParser,
                           problems: list[str]) -> tuple[LocalAssistantSettings, str]:
    """[local_assistant]: the embedded Vapi stand-in's settings (used with api_url = local)."""
    values = dict(parser.items("local_assistant")) if parser.has_section("local_assistant") \
        else {}
    listen = values.pop("listen", "tcp:0:interface=127.0.0.1")
    problem = check_server_endpoint(listen)
    if problem is not None:
        problems.append(f"{filename}: [local_assistant] listen: {problem}")
    try:
        return settings_from_strings(values), listen
    except ValueError as exc:
        problems.append(f"{filename}: [local_assistant] {exc}")
        return LocalAssistantSettings(), listen


def load_assistant_file(path: Path) -> dict[str, Any]:
    """An inline assistant from a JSON file; ValueError with a reason otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{path} must hold a JSON object (an inline assistant)")
    return value


def _assistant_choice(value: str, base_dir: Path) -> AssistantChoice:
    if value.startswith("file:"):
        return InlineAssistant(load_assistant_file(base_dir / value[5:].strip()))
    if not value.strip() or any(c.isspace() for c in value.strip()):
        raise ValueError(f"{value!r} is not an assistantId or file:PATH")
    return AssistantById(value.strip())


def _build_routing(filename: str, parser: configparser.ConfigParser,
                   assistant: AssistantSettings | None, base_dir: Path,
                   problems: list[str]) -> RoutingTable:
    """[assistant] (the default) and [routing] (dialled number → assistant)."""
    default: AssistantChoice | None = None
    if assistant is not None:
        ref = assistant.id if assistant.id else f"file:{assistant.file}"
        try:
            default = _assistant_choice(ref, base_dir)
        except ValueError as exc:
            key = "id" if assistant.id else "file"
            problems.append(f"{filename}: [assistant] {key}: {exc}")
    routes: dict[str, AssistantChoice] = {}
    if parser.has_section("routing"):
        for number, value in parser.items("routing"):
            where = f"{filename}: [routing] {number}"
            if normalize_number(number) is None:
                problems.append(f"{where}: not a phone number; allowed: an E.164 number "
                                "such as +15551230001")
                continue
            try:
                routes[number] = _assistant_choice(value, base_dir)
            except ValueError as exc:
                problems.append(f"{where}: {exc}; allowed: an assistantId or file:PATH")
    try:
        return RoutingTable(routes, default)
    except ValueError as exc:
        problems.append(f"{filename}: [routing]: {exc}")
        return RoutingTable({}, default)


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
