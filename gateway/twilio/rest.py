"""A small Twilio REST client on treq: hang up, redirect and create calls.

The HTTP client and the clock are injected: production passes a
``treq.client.HTTPClient`` (or the ``treq`` module) and the reactor; tests pass
``treq.testing.StubTreq`` over a fake Twilio resource and a
``twisted.internet.task.Clock``.

Every attempt has a timeout on the injected clock (request and body read
together; ``Deferred.addTimeout`` cancels the request). Failed attempts are
retried with exponential backoff (``backoff_initial * backoff_factor**n``, capped
at ``backoff_max``) up to ``max_attempts`` in all, on 5xx answers and network
errors only, never on 4xx. A POST that creates a call is not idempotent: by
default :meth:`TwilioRestClient.create_call` retries only failures that prove the
request never reached Twilio (connection refused, DNS), because a timeout or a
5xx may still have placed the call.

Failures reach the caller as :class:`TwilioApiError` (Twilio's error JSON
``{code, message, more_info, status}``, or the HTTP status when the body is not
that) or :class:`TwilioTransportError` (timeout or network, after the retries).
Neither carries credentials; the client itself logs nothing.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlencode

import msgspec
import treq
from twisted.internet import error as internet_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

import gateway

__all__ = [
    "DEFAULT_API_BASE_URL",
    "DEFAULT_USER_AGENT",
    "MAX_TWIML_CHARS",
    "HTTPClient",
    "HangupOutcome",
    "TwilioApiError",
    "TwilioCredentials",
    "TwilioRestClient",
    "TwilioRestError",
    "TwilioTransportError",
]

DEFAULT_API_BASE_URL: Final = "https://api.twilio.com"
DEFAULT_USER_AGENT: Final = f"vapi-gateway/{gateway.__version__}"
MAX_TWIML_CHARS: Final = 4000
"""Twilio's limit on an inline ``Twiml`` parameter."""

CALL_ALREADY_ENDED_CODES: Final = frozenset({20404, 21220})
"""Error codes that, on a hang-up, mean the call is already over."""

STATUS_CALLBACK_EVENTS: Final = frozenset({"initiated", "ringing", "answered", "completed"})

HangupOutcome = Literal["hung-up", "already-ended"]

_SID: Final = re.compile(r"[A-Za-z]{2}[A-Za-z0-9]{1,62}")
_ERROR_MESSAGE_CHARS: Final = 300


class TwilioCredentials:
    """HTTP Basic credentials for the REST API; ``repr`` never shows the secret."""

    __slots__ = ("_authorization", "account_sid", "username")

    def __init__(self, account_sid: str, username: str, password: str) -> None:
        _check_sid("account SID", account_sid)
        if not username or not password:
            raise ValueError("Twilio credentials are incomplete")
        self.account_sid: Final = account_sid
        self.username: Final = username
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._authorization: Final = f"Basic {token}".encode("ascii")

    @classmethod
    def from_auth_token(cls, account_sid: str, auth_token: str) -> TwilioCredentials:
        """Account SID and its Auth Token."""
        return cls(account_sid, account_sid, auth_token)

    @classmethod
    def from_api_key(
        cls, account_sid: str, api_key_sid: str, api_key_secret: str
    ) -> TwilioCredentials:
        """An API key (``SK…`` and its secret) acting on ``account_sid``."""
        _check_sid("API key SID", api_key_sid)
        return cls(account_sid, api_key_sid, api_key_secret)

    def authorization_header(self) -> bytes:
        """The ``Authorization`` header value."""
        return self._authorization

    def __repr__(self) -> str:
        return f"TwilioCredentials(account_sid={self.account_sid!r}, username={self.username!r})"


class TwilioRestError(Exception):
    """Base of the client's errors."""


class TwilioApiError(TwilioRestError):
    """Twilio answered with an error (or an answer the client cannot use)."""

    def __init__(
        self,
        status: int,
        code: int | None,
        message: str,
        more_info: str | None = None,
    ) -> None:
        self.status: Final = status
        self.code: Final = code
        self.message: Final = message
        self.more_info: Final = more_info
        code_text = f" code {code}" if code is not None else ""
        super().__init__(f"Twilio API error: HTTP {status}{code_text}: {message}")


class TwilioTransportError(TwilioRestError):
    """No usable answer: every attempt timed out or failed on the network."""

    def __init__(self, message: str, attempts: int, timed_out: bool) -> None:
        self.attempts: Final = attempts
        self.timed_out: Final = timed_out
        super().__init__(f"{message} (after {attempts} attempt(s))")


class HTTPClient(Protocol):
    """The part of treq the client uses: ``treq.client.HTTPClient``, the ``treq``
    module, or ``treq.testing.StubTreq`` (whose methods are set dynamically, so
    tests ``cast`` it)."""

    def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes,
        headers: Headers,
        allow_redirects: bool,
    ) -> Deferred[Any]: ...


class _ErrorBody(msgspec.Struct):
    code: int | None = None
    message: str | None = None
    more_info: str | None = None
    status: int | None = None


class _CallResource(msgspec.Struct):
    sid: str


_decode_error_body: Final = msgspec.json.Decoder(_ErrorBody, strict=False)
_decode_call: Final = msgspec.json.Decoder(_CallResource)

# Failures after which the request certainly did not reach Twilio.
_NOT_SENT: Final = (internet_error.ConnectError, internet_error.DNSLookupError)
# Failures worth another attempt for an idempotent request.
_NETWORK: Final = (
    *_NOT_SENT,
    ResponseFailed,  # includes ResponseNeverReceived
    internet_error.ConnectionClosed,
    TimeoutError,
)


class _Answer(msgspec.Struct, frozen=True):
    status: int
    body: bytes


class TwilioRestClient:
    """Calls the Twilio REST API (2010-04-01) for one account."""

    def __init__(
        self,
        http: HTTPClient,
        clock: IReactorTime,
        credentials: TwilioCredentials,
        *,
        api_base_url: str = DEFAULT_API_BASE_URL,
        timeout: float = 5.0,
        max_attempts: int = 3,
        backoff_initial: float = 0.5,
        backoff_factor: float = 2.0,
        backoff_max: float = 4.0,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if backoff_initial < 0 or backoff_factor < 1 or backoff_max < 0:
            raise ValueError("bad backoff settings")
        self._http = http
        self._clock = clock
        self._credentials = credentials
        self._base = f"{api_base_url.rstrip('/')}/2010-04-01/Accounts/{credentials.account_sid}"
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._backoff_initial = backoff_initial
        self._backoff_factor = backoff_factor
        self._backoff_max = backoff_max
        self._headers: Final = {
            b"Authorization": [credentials.authorization_header()],
            b"User-Agent": [user_agent.encode("utf-8")],
            b"Accept": [b"application/json"],
            b"Content-Type": [b"application/x-www-form-urlencoded"],
        }

    def __repr__(self) -> str:
        return f"<TwilioRestClient account={self._credentials.account_sid}>"

    # -- operations -----------------------------------------------------------

    def hang_up(
        self, call_sid: str, *, status: Literal["completed", "canceled"] = "completed"
    ) -> Deferred[HangupOutcome]:
        """End a call (``canceled`` for one still queued or ringing).

        Fires ``"already-ended"`` on a 404 or codes 20404 / 21220.
        """
        _check_sid("call SID", call_sid)
        return Deferred.fromCoroutine(self._hang_up(call_sid, status))

    def redirect(
        self,
        call_sid: str,
        *,
        url: str | None = None,
        twiml: str | None = None,
        method: Literal["POST", "GET"] = "POST",
    ) -> Deferred[None]:
        """Replace the call's running TwiML with ``twiml`` or the TwiML at ``url``.

        This ends an active ``<Connect><Stream>``.
        """
        _check_sid("call SID", call_sid)
        fields = [*_twiml_or_url(twiml, url)]
        if url is not None:
            fields.append(("Method", method))
        return Deferred.fromCoroutine(self._redirect(call_sid, fields))

    def create_call(
        self,
        *,
        to: str,
        from_: str,
        twiml: str | None = None,
        url: str | None = None,
        status_callback: str | None = None,
        status_callback_events: Sequence[str] = (),
        status_callback_method: Literal["POST", "GET"] = "POST",
        extra_parameters: Iterable[tuple[str, str]] = (),
        retry_ambiguous_failures: bool = False,
    ) -> Deferred[str]:
        """Place an outbound call; fires with its CallSid.

        :param status_callback_events: any of initiated, ringing, answered,
            completed (each sent as its own ``StatusCallbackEvent`` field).
        :param extra_parameters: further form fields (e.g. ``("Timeout", "20")``).
        :param retry_ambiguous_failures: also retry timeouts and 5xx, at the risk
            of placing the call twice.
        """
        if not to or not from_:
            raise ValueError("to and from_ are required")
        fields: list[tuple[str, str]] = [("To", to), ("From", from_)]
        fields.extend(_twiml_or_url(twiml, url))
        unknown = set(status_callback_events) - STATUS_CALLBACK_EVENTS
        if unknown:
            raise ValueError(f"unknown status callback events: {sorted(unknown)}")
        if status_callback_events and status_callback is None:
            raise ValueError("status_callback_events need a status_callback URL")
        if status_callback is not None:
            fields.append(("StatusCallback", status_callback))
            fields.extend(("StatusCallbackEvent", event) for event in status_callback_events)
            fields.append(("StatusCallbackMethod", status_callback_method))
        fields.extend(extra_parameters)
        return Deferred.fromCoroutine(self._create_call(fields, retry_ambiguous_failures))

    # -- implementation -------------------------------------------------------

    async def _hang_up(self, call_sid: str, status: str) -> HangupOutcome:
        answer = await self._post(f"/Calls/{call_sid}.json", [("Status", status)], idempotent=True)
        if 200 <= answer.status < 300:
            return "hung-up"
        api_error = _api_error(answer)
        if answer.status == 404 or api_error.code in CALL_ALREADY_ENDED_CODES:
            return "already-ended"
        raise api_error

    async def _redirect(self, call_sid: str, fields: list[tuple[str, str]]) -> None:
        answer = await self._post(f"/Calls/{call_sid}.json", fields, idempotent=True)
        if not 200 <= answer.status < 300:
            raise _api_error(answer)

    async def _create_call(self, fields: list[tuple[str, str]], retry_ambiguous: bool) -> str:
        answer = await self._post("/Calls.json", fields, idempotent=retry_ambiguous)
        if not 200 <= answer.status < 300:
            raise _api_error(answer)
        try:
            return _decode_call.decode(answer.body).sid
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise TwilioApiError(
                answer.status, None, "call created but the answer has no call SID"
            ) from None

    async def _post(self, path: str, fields: list[tuple[str, str]], *, idempotent: bool) -> _Answer:
        """POST with timeout and retries; returns the last answer (2xx, 4xx or final 5xx)."""
        url = self._base + path
        body = urlencode(fields).encode("ascii")
        attempt = 0
        while True:
            attempt += 1
            last_attempt = attempt >= self._max_attempts
            try:
                answer = await self._attempt(url, body)
            except _NETWORK as failure:
                if _cancelled_by_caller(failure):
                    raise CancelledError() from None
                retryable = idempotent or isinstance(failure, _NOT_SENT)
                if last_attempt or not retryable:
                    raise _transport_error(failure, attempt, self._timeout) from None
            else:
                if answer.status < 500 or last_attempt or not idempotent:
                    return answer
            await deferLater(self._clock, self._backoff_delay(attempt))

    def _attempt(self, url: str, body: bytes) -> Deferred[_Answer]:
        attempt = Deferred.fromCoroutine(self._exchange(url, body))
        attempt.addTimeout(self._timeout, self._clock, onTimeoutCancel=_timed_out)
        return attempt

    async def _exchange(self, url: str, body: bytes) -> _Answer:
        response = await self._http.request(
            "POST", url, data=body, headers=Headers(self._headers), allow_redirects=False
        )
        content: bytes = await treq.content(response)
        return _Answer(status=int(response.code), body=content)

    def _backoff_delay(self, attempt: int) -> float:
        delay = self._backoff_initial * self._backoff_factor ** (attempt - 1)
        return float(min(delay, self._backoff_max))


def _cancelled_by_caller(failure: Exception) -> bool:
    """treq reports a cancelled request as ResponseFailed wrapping CancelledError.

    Our own timeout has already turned that into TimeoutError, so what is left is
    the caller cancelling the operation: it must end it, not be retried.
    """
    return isinstance(failure, ResponseFailed) and any(
        reason.check(CancelledError) for reason in failure.reasons
    )


def _timed_out(result: _Answer | Failure, timeout: float | None) -> _Answer:
    """After a timeout cancelled the attempt: whatever the cancellation produced
    (CancelledError, or treq's ResponseNeverReceived wrapping it) is a timeout."""
    if isinstance(result, Failure):
        raise TimeoutError(f"no answer within {timeout} s")
    return result


def _check_sid(what: str, sid: str) -> None:
    if not _SID.fullmatch(sid):
        raise ValueError(f"not a Twilio {what}: {sid[:40]!r}")


def _twiml_or_url(twiml: str | None, url: str | None) -> list[tuple[str, str]]:
    if twiml is not None and url is None:
        if len(twiml) > MAX_TWIML_CHARS:
            raise ValueError(f"inline TwiML is {len(twiml)} characters (limit {MAX_TWIML_CHARS})")
        return [("Twiml", twiml)]
    if url is not None and twiml is None:
        return [("Url", url)]
    raise ValueError("give exactly one of twiml and url")


def _api_error(answer: _Answer) -> TwilioApiError:
    try:
        parsed = _decode_error_body.decode(answer.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        snippet = answer.body[:_ERROR_MESSAGE_CHARS].decode("utf-8", "replace")
        return TwilioApiError(answer.status, None, snippet or "(empty body)")
    message = (parsed.message or "(no message)")[:_ERROR_MESSAGE_CHARS]
    return TwilioApiError(answer.status, parsed.code, message, parsed.more_info)


def _transport_error(failure: Exception, attempts: int, timeout: float) -> TwilioTransportError:
    if isinstance(failure, TimeoutError):
        return TwilioTransportError(f"no answer within {timeout:g} s", attempts, timed_out=True)
    return TwilioTransportError(
        f"network failure: {type(failure).__name__}", attempts, timed_out=False
    )
