"""Creating a Vapi call on the websocket transport (``POST {api_url}/call``).

:class:`CallCreator` posts the request with an injected treq-like HTTP client
and an injected clock (timeouts and retry backoff run on that clock, never on
the global reactor). It retries, with backoff, on 5xx answers, connection
errors and timeouts only; a 4xx is final and becomes :class:`CallRejectedError`
(Vapi's ``message`` and ``subscriptionLimits`` parsed for the log).

The answer is a :class:`CreatedCall`: the call id and the socket URL wrapped in
:class:`SocketUrl`, whose ``repr``/``str`` redact it. The URL is a bearer
capability: call :meth:`SocketUrl.reveal` only where it goes onto the wire.

A request that outlives ``request_timeout`` is not cancelled: Vapi creates the call
whether or not the client waits for the answer. The creator stops *waiting* for it
(and retries as before) but lets it finish in the background, until
``late_answer_limit`` after it was sent (by default max(30 s, 4 * request_timeout)).
A call such a request answers with is a *late call*: nobody uses it, and it is handed
to ``on_late_call`` so that the gateway ends it. Only a request still unanswered at
that limit is cancelled; a call it may have created is then never known, and never
ended by the gateway (counted: ``on_late_request_abandoned``).

:func:`call_request_body` builds the JSON body without I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlsplit

import msgspec
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import ResponseFailed

import gateway
from gateway.config import is_loopback_host
from gateway.logs import get_logger
from gateway.vapi.assistants import AssistantById, AssistantChoice, JsonObject, merge_overrides
from gateway.vapi.reactor_time import NS_PER_SECOND, DelayedCall, reactor_time

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

#: The default hard limit on a timed-out request: at least this long after it was sent...
LATE_ANSWER_MIN_LIMIT_NS: Final = 30 * NS_PER_SECOND
#: ... and at least this many request timeouts.
LATE_ANSWER_TIMEOUTS: Final = 4

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
    #: How long after it was sent a request that timed out may still answer (it runs on
    #: in the background; see the module docstring); then it is cancelled.  ``None``:
    #: max(30 s, 4 * ``request_timeout_ns``).
    late_answer_limit_ns: int | None = None

    @property
    def effective_late_answer_limit_ns(self) -> int:
        """``late_answer_limit_ns``, or its default."""
        if self.late_answer_limit_ns is not None:
            return self.late_answer_limit_ns
        return max(LATE_ANSWER_MIN_LIMIT_NS, LATE_ANSWER_TIMEOUTS * self.request_timeout_ns)

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
        if (self.late_answer_limit_ns is not None
                and self.late_answer_limit_ns < self.request_timeout_ns):
            raise ValueError("late_answer_limit_ns must not be shorter than request_timeout_ns")


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
    """Creates Vapi calls over HTTP; one instance serves every call.

    ``on_late_call`` receives each call created by a request the creator had stopped
    waiting for (once per call; it should end it); ``on_late_request_abandoned`` is
    told of each timed-out request cancelled at the late-answer limit (a call it
    created, if any, is lost).  Both may be set after construction.
    """

    def __init__(self, settings: VapiApiSettings, http: HttpClient, clock: IReactorTime,
                 on_late_call: Callable[[CreatedCall], None] | None = None,
                 on_late_request_abandoned: Callable[[], None] | None = None) -> None:
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
        self.on_late_call = on_late_call
        self.on_late_request_abandoned = on_late_request_abandoned
        self._running_late: set[_Attempt] = set()
        self._settled_waiters: list[Deferred[None]] = []
        self.late_calls = 0
        self.late_requests_abandoned = 0

    @property
    def late_requests(self) -> int:
        """Timed-out requests still running in the background."""
        return len(self._running_late)

    def when_settled(self) -> Deferred[None]:
        """Fires once no timed-out request is still running (the drain waits for it, so
        a call such a request creates is ended before the daemon exits)."""
        waiter: Deferred[None] = Deferred(
            lambda d: self._settled_waiters.remove(d) if d in self._settled_waiters else None)
        if not self._running_late:
            waiter.callback(None)
        else:
            self._settled_waiters.append(waiter)
        return waiter

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
        """One request, awaited for ``request_timeout`` at most; one that takes longer is
        left running (see :class:`_Attempt`), never cancelled here."""
        attempt = _Attempt(self, Deferred.fromCoroutine(self._attempt(body)))
        try:
            return await attempt.awaited
        except _CONNECTION_ERRORS as error:
            raise _RetryableError(f"connection failed: {type(error).__name__}") from None

    # -- requests that answer after the creator stopped waiting ------------------------

    def _running_on(self, attempt: _Attempt) -> DelayedCall:
        """``attempt`` is no longer awaited: it may run until the late-answer limit."""
        self._running_late.add(attempt)
        limit_s = self._settings.effective_late_answer_limit_ns / NS_PER_SECOND
        remaining_s = max(0.0, attempt.sent_s + limit_s - self._timers.seconds())
        return self._timers.callLater(remaining_s, attempt.abandon)

    def _answered_late(self, attempt: _Attempt, outcome: CreatedCall | Failure) -> None:
        self._running_late.discard(attempt)
        try:
            self._handle_late_answer(attempt, outcome)
        finally:
            if not self._running_late:
                waiters, self._settled_waiters = self._settled_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

    def _handle_late_answer(self, attempt: _Attempt, outcome: CreatedCall | Failure) -> None:
        after_s = round(self._timers.seconds() - attempt.sent_s, 3)
        if isinstance(outcome, CreatedCall):
            self._late_call(outcome, after_s)
        elif attempt.abandoned:
            self.late_requests_abandoned += 1
            log.warning("gave up on a timed-out POST /call at the late-answer limit; a vapi "
                        "call it may have created will not be ended by the gateway",
                        after_s=after_s)
            self._notify(self.on_late_request_abandoned)
        else:
            error = outcome.value
            problem = (str(error) if isinstance(error, _RetryableError | CallCreationError)
                       else type(error).__name__)
            log.info("a timed-out POST /call answered late without a call", after_s=after_s,
                     problem=problem,
                     vapi_call_id=getattr(error, "call_id", None))

    def _late_call(self, created: CreatedCall, after_s: float) -> None:
        self.late_calls += 1
        if self.on_late_call is None:
            log.error("vapi call created by a timed-out POST /call, and nothing to end it",
                      vapi_call_id=created.call_id, after_s=after_s)
            return
        log.warning("vapi call created by a timed-out POST /call; ending it",
                    vapi_call_id=created.call_id, after_s=after_s)
        self._notify(self.on_late_call, created)

    @staticmethod
    def _notify(callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.error("a late POST /call callback failed", exc_info=True)

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


class _Attempt:
    """One ``POST /call`` in flight.

    :attr:`awaited` fires with its answer if that comes within ``request_timeout``;
    otherwise it fails with :class:`_RetryableError` (or is cancelled by whoever awaits
    it) and the request runs on, unawaited: its answer goes to
    :meth:`CallCreator._answered_late`, and it is cancelled (:meth:`abandon`) if it
    has not answered by the late-answer limit.
    """

    def __init__(self, creator: CallCreator, request: Deferred[CreatedCall]) -> None:
        self._creator = creator
        self._request = request
        self.sent_s = creator._timers.seconds()
        self.awaited: Deferred[CreatedCall] = Deferred(lambda _: self._stop_waiting())
        self.abandoned = False
        self._late = False
        self._limit: DelayedCall | None = None
        self._timeout: DelayedCall | None = None
        request.addBoth(self._answered)
        if not request.called:
            timeout_s = creator._settings.request_timeout_ns / NS_PER_SECOND
            self._timeout = creator._timers.callLater(timeout_s, self._timed_out, timeout_s)

    def _answered(self, outcome: CreatedCall | Failure) -> None:
        if self._late:
            if self._limit is not None and self._limit.active():
                self._limit.cancel()
            self._creator._answered_late(self, outcome)
            return
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        if isinstance(outcome, Failure):
            self.awaited.errback(outcome)
        else:
            self.awaited.callback(outcome)

    def _timed_out(self, timeout_s: float) -> None:
        self._stop_waiting()
        self.awaited.errback(_RetryableError(f"no answer within {timeout_s:g} s"))

    def _stop_waiting(self) -> None:
        if self._late or self._request.called:
            return
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._late = True
        self._limit = self._creator._running_on(self)

    def abandon(self) -> None:
        """The late-answer limit: cancel the request (it then answers with a failure)."""
        self.abandoned = True
        self._request.cancel()


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
