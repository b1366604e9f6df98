"""Creating a Vapi call on the websocket transport (``POST {api_url}/call``).

:class:`CallCreator` posts the request with an injected treq-like HTTP client
and an injected clock (timeouts and retry backoff run on that clock, never on
the global reactor). It retries, with backoff, on 5xx answers, connection
errors and timeouts only; a 4xx is final and becomes :class:`CallRejectedError`
(Vapi's ``message`` and ``subscriptionLimits`` parsed for the log).

The answer is a :class:`CreatedCall`: the call id and the socket URL wrapped in
:class:`SocketUrl`, whose ``repr``/``str`` redact it. The URL is a bearer
capability: call :meth:`SocketUrl.reveal` only where it goes onto the wire.

:func:`call_request_body` builds the JSON body without I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlsplit

import msgspec
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import ResponseFailed

import gateway
from gateway.config import is_loopback_host
from gateway.logs import get_logger
from gateway.vapi.assistants import AssistantById, AssistantChoice, JsonObject, merge_overrides
from gateway.vapi.reactor_time import NS_PER_SECOND, reactor_time

__all__ = [
    "AudioFormat",
    "BadCallAnswerError",
    "CallCreationError",
    "CallCreator",
    "CallRejectedError",
    "CreatedCall",
    "HttpClient",
    "HttpResponse",
    "SocketUrl",
    "VapiApiSettings",
    "VapiUnavailableError",
    "call_request_body",
    "is_loopback_host",
]

USER_AGENT: Final = f"vapi-gateway/{gateway.__version__}"

log = get_logger(__name__)


class SocketUrl:
    """The call socket's URL: a bearer capability that must never be logged.

    ``str()`` and ``repr()`` show only the scheme and host; :meth:`reveal` gives
    the URL for the wire. Only ``wss://`` is accepted, or ``ws://`` to a
    loopback host (tests and local fakes). Parsing errors never quote the URL.
    """

    __slots__ = ("_url", "host", "port", "secure")

    host: str
    port: int
    secure: bool

    def __init__(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            port = parts.port
        except ValueError:
            raise ValueError("the socket URL is not a URL") from None
        if parts.scheme not in ("wss", "ws"):
            raise ValueError("the socket URL's scheme is not wss")
        if not host:
            raise ValueError("the socket URL has no host")
        if parts.scheme == "ws" and not is_loopback_host(host):
            raise ValueError("plain ws:// is refused for a host that is not loopback")
        if parts.fragment:
            raise ValueError("the socket URL has a fragment")
        self._url = url
        self.host = host
        self.secure = parts.scheme == "wss"
        self.port = port if port is not None else (443 if self.secure else 80)

    def reveal(self) -> str:
        """The full URL, for the websocket handshake only."""
        return self._url

    def __repr__(self) -> str:
        return f"SocketUrl({self})"

    def __str__(self) -> str:
        scheme = "wss" if self.secure else "ws"
        return f"{scheme}://{self.host}/<redacted>"

    def __reduce__(self) -> Any:
        raise TypeError("a SocketUrl is not pickled")


@dataclass(frozen=True)
class AudioFormat:
    """The audio format on the call socket (both ways, raw, no header)."""

    encoding: Literal["mulaw", "pcm_s16le"] = "mulaw"
    sample_rate: int = 8000

    def __post_init__(self) -> None:
        if self.encoding not in ("mulaw", "pcm_s16le"):
            raise ValueError("audio encoding must be 'mulaw' or 'pcm_s16le'")
        if not 8000 <= self.sample_rate <= 48000:
            raise ValueError("audio sample rate must be between 8000 and 48000 Hz")


@dataclass(frozen=True)
class CreatedCall:
    """A Vapi call that exists: its id (safe to log) and its socket URL (redacted)."""

    call_id: str
    socket_url: SocketUrl


class CallCreationError(Exception):
    """Creating the Vapi call failed; the message is safe to log."""


class CallRejectedError(CallCreationError):
    """Vapi answered 4xx (validation, policy, concurrency limit, bad key): not retried."""

    def __init__(
        self,
        status: int,
        messages: tuple[str, ...],
        error: str | None,
        subscription_limits: Mapping[str, object] | None,
    ) -> None:
        self.status = status
        self.messages = messages
        self.error = error
        self.subscription_limits = subscription_limits
        text = "; ".join(messages) or error or "no message"
        limits = f" subscriptionLimits={dict(subscription_limits)}" if subscription_limits else ""
        super().__init__(f"Vapi refused the call (HTTP {status}): {text}{limits}")


class VapiUnavailableError(CallCreationError):
    """Every attempt failed with a 5xx, a connection error or a timeout."""

    def __init__(self, attempts: int, last_problem: str) -> None:
        self.attempts = attempts
        self.last_problem = last_problem
        super().__init__(f"Vapi unavailable after {attempts} attempt(s): {last_problem}")


class BadCallAnswerError(CallCreationError):
    """Vapi answered with something unusable (e.g. a 201 without a socket URL)."""

    def __init__(self, reason: str, call_id: str | None = None) -> None:
        self.reason = reason
        self.call_id = call_id
        about = f" (call {call_id})" if call_id else ""
        super().__init__(f"unusable answer from Vapi{about}: {reason}")


class HttpResponse(Protocol):
    """The part of a treq response this module reads."""

    @property
    def code(self) -> int: ...

    def content(self) -> Deferred[bytes]: ...


class HttpClient(Protocol):
    """The part of ``treq.client.HTTPClient`` (or ``treq.testing.StubTreq``) used here."""

    def post(self, url: str, data: bytes | None = None, **kwargs: Any) -> Deferred[Any]: ...


@dataclass(frozen=True)
class VapiApiSettings:
    """How to reach Vapi's REST API."""

    api_key: str = field(repr=False)
    api_url: str = "https://api.vapi.ai"
    request_timeout_ns: int = 5 * NS_PER_SECOND
    retries: int = 2
    retry_backoff_ns: int = NS_PER_SECOND // 2

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key must not be empty")
        parts = urlsplit(self.api_url)
        if parts.scheme != "https" and not (
            parts.scheme == "http" and is_loopback_host(parts.hostname or "")
        ):
            raise ValueError("api_url must be https:// (http:// only to a loopback host)")
        if self.request_timeout_ns <= 0:
            raise ValueError("request_timeout_ns must be positive")
        if not 0 <= self.retries <= 10:
            raise ValueError("retries must be between 0 and 10")
        if self.retry_backoff_ns < 0:
            raise ValueError("retry_backoff_ns must not be negative")


def call_request_body(
    choice: AssistantChoice, audio: AudioFormat, overrides: JsonObject | None = None
) -> dict[str, Any]:
    """The JSON body of ``POST /call`` for a websocket-transport call."""
    body: dict[str, Any] = {}
    if isinstance(choice, AssistantById):
        body["assistantId"] = choice.assistant_id
        merged = merge_overrides(choice.overrides, overrides)
    else:
        body["assistant"] = dict(choice.assistant)
        merged = merge_overrides(None, overrides)
    if merged:
        body["assistantOverrides"] = merged
    body["transport"] = {
        "provider": "vapi.websocket",
        "audioFormat": {
            "format": audio.encoding,
            "container": "raw",
            "sampleRate": audio.sample_rate,
        },
    }
    return body


class _RetryableError(Exception):
    """An attempt failed in a way worth retrying; the text is safe to log."""


_CONNECTION_ERRORS: Final = (
    ConnectError,
    ConnectionClosed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    ResponseFailed,
)

_MAX_LOGGED_TEXT: Final = 300


class CallCreator:
    """Creates Vapi calls over HTTP; one instance serves every call."""

    def __init__(self, settings: VapiApiSettings, http: HttpClient, clock: IReactorTime) -> None:
        self._settings = settings
        self._http = http
        self._clock = clock
        self._timers = reactor_time(clock)
        self._url = settings.api_url.rstrip("/") + "/call"
        self._headers = {
            "Authorization": [f"Bearer {settings.api_key}"],
            "User-Agent": [USER_AGENT],
            "Content-Type": ["application/json"],
            "Accept": ["application/json"],
        }

    def create_call(
        self, choice: AssistantChoice, audio: AudioFormat, overrides: JsonObject | None = None
    ) -> Deferred[CreatedCall]:
        """Create one call; fails with a :class:`CallCreationError` subclass."""
        body = msgspec.json.encode(call_request_body(choice, audio, overrides))
        return Deferred.fromCoroutine(self._create(body))

    async def _create(self, body: bytes) -> CreatedCall:
        attempts = self._settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                created = await self._attempt_with_timeout(body)
            except _RetryableError as problem:
                if attempt == attempts:
                    raise VapiUnavailableError(attempts, str(problem)) from None
                delay_ns = self._settings.retry_backoff_ns * 2 ** (attempt - 1)
                log.warning(
                    "vapi call creation failed, retrying",
                    attempt=attempt,
                    attempts=attempts,
                    problem=str(problem),
                    retry_in_s=delay_ns / NS_PER_SECOND,
                )
                await deferLater(self._clock, delay_ns / NS_PER_SECOND)
            else:
                log.debug("vapi call created", vapi_call_id=created.call_id, attempts=attempt)
                return created
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt_with_timeout(self, body: bytes) -> CreatedCall:
        attempt = Deferred.fromCoroutine(self._attempt(body))
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            attempt.cancel()

        timeout_s = self._settings.request_timeout_ns / NS_PER_SECOND
        timer = self._timers.callLater(timeout_s, give_up)
        try:
            return await attempt
        except Exception as error:
            # A cancelled treq request fails with ResponseNeverReceived (not
            # CancelledError), so the timer records that it fired.
            if timed_out:
                raise _RetryableError(f"no answer within {timeout_s:g} s") from None
            if isinstance(error, _CONNECTION_ERRORS):
                raise _RetryableError(f"connection failed: {type(error).__name__}") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _attempt(self, body: bytes) -> CreatedCall:
        response: HttpResponse = await self._http.post(
            self._url, data=body, headers=self._headers, allow_redirects=False
        )
        content = await response.content()
        status = response.code
        if 500 <= status <= 599:
            raise _RetryableError(f"HTTP {status}")
        if 400 <= status <= 499:
            raise _rejection(status, content)
        if not 200 <= status <= 299:
            raise BadCallAnswerError(f"unexpected HTTP {status}")
        return _created_call(content)


def _created_call(content: bytes) -> CreatedCall:
    try:
        answer: object = msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise BadCallAnswerError("the call is not JSON") from None
    if not isinstance(answer, dict):
        raise BadCallAnswerError("the call is not a JSON object")
    call_id = answer.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise BadCallAnswerError("the call has no id")
    transport = answer.get("transport")
    url = transport.get("websocketCallUrl") if isinstance(transport, dict) else None
    if not isinstance(url, str):
        raise BadCallAnswerError("the call has no transport.websocketCallUrl", call_id)
    try:
        socket_url = SocketUrl(url)
    except ValueError as error:
        raise BadCallAnswerError(f"transport.websocketCallUrl: {error}", call_id) from None
    return CreatedCall(call_id=call_id, socket_url=socket_url)


def _rejection(status: int, content: bytes) -> CallRejectedError:
    """Vapi's error body: ``message`` (a string or a list), ``error``, ``subscriptionLimits``."""
    try:
        answer: object = msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        return CallRejectedError(status, (), None, None)
    raw_messages = answer.get("message")
    if isinstance(raw_messages, str):
        raw_messages = [raw_messages]
    messages = tuple(
        _clip(text) for text in (raw_messages if isinstance(raw_messages, list) else ())
        if isinstance(text, str)
    )
    error = answer.get("error")
    limits = answer.get("subscriptionLimits")
    return CallRejectedError(
        status,
        messages,
        _clip(error) if isinstance(error, str) else None,
        limits if isinstance(limits, dict) else None,
    )


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_LOGGED_TEXT else text[:_MAX_LOGGED_TEXT] + "…"
