"""The Twilio webhooks: the voice webhook, call status and stream status callbacks.

:class:`TwilioRoutes` registers three ``POST`` routes on the gateway's Klein app, at
the paths of ``[twilio]`` (``voice_path``, ``status_path``, ``stream_status_path``).
Each one is a thin shell around the sans-io cores:

1. the body is bounded (``max_body_size``: the ``Content-Length`` and the bytes
   actually received; 413 beyond);
2. ``X-Twilio-Signature`` is checked over the **public** URL (``public_url`` of
   ``[gateway]`` plus the raw request target) and the raw body, never over
   ``request.args`` (see :mod:`gateway.twilio.signature`); 403 ``forbidden`` when it
   is missing or wrong.  With ``validate_signatures = false`` the check is skipped
   and every request logs a warning;
3. if ``account_sid`` is configured, the webhook's ``AccountSid`` must match (403);
4. a ``CallSid`` is required (400).

Then:

- **voice**: admission decides (:meth:`gateway.admission.Admission.admit`).  A
  refused call is answered with the busy TwiML; an admitted one is handed to
  :meth:`CallControl.open_call` (which returns at once: the Vapi call is created
  concurrently, never waited for here) and answered with ``<Connect><Stream>``
  carrying a fresh stream token (:mod:`gateway.twilio.token`).
- **status**: :meth:`CallControl.call_status` (a terminal status ends the call;
  duplicates and out-of-order ``SequenceNumber`` are harmless); 204 at once.
- **stream status**: logged against the call; ``stream-error`` ends the call with
  cause ``twilio-stream-error``; 204.

Log lines carry the route, the reason of a refusal and, once the signature is
known good, the CallSid; never the signature, the Auth Token or a stream token.

:class:`CallControl` is what both Twilio shells (these routes and the media socket
of :mod:`gateway.twilio.media`) call on the switchboard
(:class:`gateway.bridge.switchboard.Switchboard` satisfies it structurally);
:class:`StreamSession` is what the media socket drives once its stream is attached.

A note on body size: twisted.web reads the whole body before a route runs, so the
daemon's listener refuses a larger body before reading it (:mod:`gateway.http_limits`,
per path); the 413 here is the second line, for this app served on any other Site.
"""

from __future__ import annotations

import re
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from gateway.admission import Admission, Refusal
from gateway.bridge.session import CallInfo, MediaSocket
from gateway.config import Settings
from gateway.logs import get_logger
from gateway.twilio.signature import (
    SignatureCheck,
    TwilioSignatureValidator,
    parse_form_body,
    public_url,
)
from gateway.twilio.stream import Audio, Started
from gateway.twilio.token import StreamTokens
from gateway.twilio.twiml import TwimlAnswers

__all__ = [
    "STREAM_ERROR_CAUSE",
    "CallControl",
    "StreamSession",
    "TwilioRoutes",
    "signature_validator_from",
    "status_callback_url",
    "stream_tokens_from",
    "stream_url",
    "twiml_answers_from",
]

log = get_logger("gateway.twilio")

STREAM_ERROR_CAUSE: Final = "twilio-stream-error"
"""The end cause given to :meth:`CallControl.end_call` on a ``stream-error`` event."""

_CALL_SID: Final = re.compile(r"[A-Za-z]{2}[A-Za-z0-9]{1,62}")
_MAX_LOGGED_CHARS: Final = 200
_TWIML_CONTENT_TYPE: Final = b"text/xml; charset=utf-8"


# -- what the Twilio leg needs of the bridge -----------------------------------------


class StreamSession(Protocol):
    """What the media socket drives once its stream is attached to a call
    (:class:`gateway.bridge.session.CallSession`)."""

    def on_stream_audio(self, audio: Audio) -> None: ...

    def on_stream_dtmf(self, digit: str) -> None: ...

    def on_stream_mark(self, name: str) -> None: ...

    def on_stream_stopped(self) -> None: ...

    def on_stream_closed(self, stream: MediaSocket) -> None: ...


class CallControl(Protocol):
    """What the Twilio routes and the media socket call on the switchboard."""

    def open_call(self, info: CallInfo) -> object:
        """An admitted call: register it and start creating its Vapi call; returns at once."""
        ...

    def holds(self, call_sid: str) -> bool:
        """Whether a live call with this CallSid is held here."""
        ...

    def call_status(self, call_sid: str, status: str) -> bool:
        """A call status callback; True if a terminal status ended a call. Idempotent."""
        ...

    def end_call(self, call_sid: str, cause: str) -> object:
        """End a call by CallSid (nothing if no such call)."""
        ...

    def attach_stream(self, stream: MediaSocket, started: Started) -> StreamSession | None:
        """Join a started, token-verified stream to its call; None refuses it."""
        ...


# -- URLs and the cores, from the settings -------------------------------------------


def stream_url(settings: Settings) -> str:
    """The public URL of the Media Streams socket: ``public_url`` + ``media_path`` with
    ``https`` turned into ``wss`` (``http`` into ``ws``, which ``public_url`` allows only
    for loopback hosts).  It is both the ``<Stream url>`` and the URL the upgrade's
    signature is checked against."""
    parts = urlsplit(settings.gateway.public_url)
    scheme = {"https": "wss", "http": "ws"}[parts.scheme]
    base = urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return base + settings.twilio.media_path


def status_callback_url(settings: Settings) -> str:
    """The ``<Stream statusCallback>`` URL: ``public_url`` + ``stream_status_path``."""
    return settings.gateway.public_url.rstrip("/") + settings.twilio.stream_status_path


def signature_validator_from(settings: Settings) -> TwilioSignatureValidator:
    """The signature validator for ``[twilio] auth_token`` (and ``previous_auth_token``)."""
    twilio = settings.twilio
    if twilio.auth_token is None:
        raise ValueError("[twilio] auth_token is required")
    previous = twilio.previous_auth_token.reveal() if twilio.previous_auth_token else None
    return TwilioSignatureValidator(twilio.auth_token.reveal(), previous_auth_token=previous)


def stream_tokens_from(settings: Settings) -> StreamTokens:
    """Stream tokens keyed by ``[twilio] stream_token_secret``, ``stream_token_ttl`` long."""
    twilio = settings.twilio
    if twilio.stream_token_secret is None:
        raise ValueError("[twilio] stream_token_secret is required")
    return StreamTokens(twilio.stream_token_secret.reveal(), ttl_seconds=twilio.stream_token_ttl)


def twiml_answers_from(settings: Settings) -> TwimlAnswers:
    """The TwiML answers from ``[twilio]`` (raises ValueError on a bad static value)."""
    twilio = settings.twilio
    return TwimlAnswers(
        stream_url=stream_url(settings),
        stream_status_callback_url=status_callback_url(settings),
        fallback_message=twilio.fallback_message,
        busy_message=twilio.busy_message,
        greeting=twilio.greeting,
        voice=twilio.say_voice,
        language=twilio.say_language,
    )


# -- the routes ----------------------------------------------------------------------


class _WebhookRefusedError(Exception):
    """A webhook answered with an error status (already logged)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body

    def answer(self, request: IRequest) -> bytes:
        return _plain(request, self.status, self.body)


class TwilioRoutes:
    """The voice webhook and the two status callbacks (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        validator: TwilioSignatureValidator,
        tokens: StreamTokens,
        twiml: TwimlAnswers,
        admission: Admission,
        calls: CallControl,
        clock: IReactorTime,
    ) -> None:
        self._settings = settings
        self._public_url = settings.gateway.public_url
        self._validate = settings.twilio.validate_signatures
        self._account_sid = settings.twilio.account_sid
        self._max_body = settings.twilio.max_body_size
        self._validator = validator
        self._tokens = tokens
        self._twiml = twiml
        self._admission = admission
        self._calls = calls
        self._clock = clock

    def register(self, app: Klein) -> None:
        """Add the three ``POST`` routes at the configured paths."""
        twilio = self._settings.twilio
        app.route(twilio.voice_path, methods=["POST"])(self.voice)
        app.route(twilio.status_path, methods=["POST"])(self.call_status)
        app.route(twilio.stream_status_path, methods=["POST"])(self.stream_status)

    # -- voice -----------------------------------------------------------------------

    def voice(self, request: IRequest) -> bytes | Deferred[bytes]:
        """The voice webhook ("a call comes in"): busy TwiML, or ``<Connect><Stream>``."""
        try:
            form = self._authenticated_form(request, "voice")
            call_sid = _call_sid(form, "voice")
        except _WebhookRefusedError as refused:
            return refused.answer(request)
        # a retried webhook for a call we already hold is not a new admission
        if self._calls.holds(call_sid):
            return self._answer_call(request, form, call_sid, None)
        deciding = self._admission.admit_call(call_sid)
        decided: list[Refusal | None] = []
        deciding.addCallback(decided.append)
        if decided:  # decided at once (no cluster-wide limit): answer in this turn
            return self._answer_call(request, form, call_sid, decided[0])
        return deciding.addCallback(
            lambda _: self._answer_call(request, form, call_sid, decided[0]))

    def _answer_call(self, request: IRequest, form: dict[str, str], call_sid: str,
                     refusal: Refusal | None) -> bytes:
        caller = form.get("From", "")
        called = form.get("To", "")
        call_log = log.bind(call_sid=call_sid)
        if refusal is not None:
            call_log.info("call refused", reason=refusal.value, caller=caller, called=called)
            return _twiml(request, self._twiml.busy())
        try:
            token = self._tokens.issue(call_sid, self._clock.seconds())
            answer = self._twiml.connect(
                call_sid=call_sid, caller=caller, called=called, stream_token=token
            )
        except ValueError as error:
            call_log.warning("voice webhook refused", route="voice", reason=str(error))
            return _plain(request, 400, "bad request")
        info = CallInfo(
            call_sid, caller=caller, called=called, account_sid=form.get("AccountSid", "")
        )
        try:
            self._calls.open_call(info)
        except Exception:
            call_log.error("opening the call failed; answering busy", exc_info=True)
            return _twiml(request, self._twiml.busy())
        return _twiml(request, answer)

    # -- status callbacks --------------------------------------------------------------

    def call_status(self, request: IRequest) -> bytes:
        """A call status callback: a terminal ``CallStatus`` ends the call; 204."""
        try:
            form = self._authenticated_form(request, "status")
            call_sid = _call_sid(form, "status")
            status = _required(form, "CallStatus", "status")
        except _WebhookRefusedError as refused:
            return refused.answer(request)
        call_log = log.bind(call_sid=call_sid)
        try:
            ended = self._calls.call_status(call_sid, status)
        except Exception:
            call_log.error("call status callback failed", exc_info=True)
            return _plain(request, 500, "internal error")
        call_log.info(
            "call status",
            status=_bounded(status),
            sequence_number=_bounded(form.get("SequenceNumber", "")),
            ended_call=ended,
        )
        return _no_content(request)

    def stream_status(self, request: IRequest) -> bytes:
        """A ``<Stream statusCallback>`` event: logged; ``stream-error`` ends the call; 204."""
        try:
            form = self._authenticated_form(request, "stream-status")
            call_sid = _call_sid(form, "stream-status")
            event = _required(form, "StreamEvent", "stream-status")
        except _WebhookRefusedError as refused:
            return refused.answer(request)
        call_log = log.bind(call_sid=call_sid, stream_sid=_bounded(form.get("StreamSid", "")))
        if event != "stream-error":
            call_log.info("stream status", stream_event=_bounded(event))
            return _no_content(request)
        call_log.warning(
            "stream error reported by twilio; ending the call",
            stream_error=_bounded(form.get("StreamError", "")),
        )
        try:
            self._calls.end_call(call_sid, STREAM_ERROR_CAUSE)
        except Exception:
            call_log.error("ending the call after a stream error failed", exc_info=True)
            return _plain(request, 500, "internal error")
        return _no_content(request)

    # -- the shared checks -----------------------------------------------------------

    def _authenticated_form(self, request: IRequest, route: str) -> dict[str, str]:
        """Size, signature and account checks; the form's first value of each name."""
        body = self._bounded_body(request, route)
        if self._validate:
            check = self._check_signature(request, body)
            if not check.ok:
                log.warning(
                    "twilio webhook refused: bad signature",
                    route=route,
                    reason=check.reason,
                    peer=_peer(request),
                )
                raise _WebhookRefusedError(403, "forbidden")
        else:
            log.warning(
                "twilio signature validation is disabled: webhook accepted unchecked",
                route=route,
                peer=_peer(request),
            )
        form = _first_values(body, request, route)
        if self._account_sid and form.get("AccountSid") != self._account_sid:
            log.warning(
                "twilio webhook refused: wrong account",
                route=route,
                account_sid=_bounded(form.get("AccountSid", "")),
            )
            raise _WebhookRefusedError(403, "forbidden")
        return form

    def _bounded_body(self, request: IRequest, route: str) -> bytes:
        declared = request.getHeader(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                log.warning("twilio webhook refused: bad Content-Length", route=route)
                raise _WebhookRefusedError(400, "bad request") from None
            if length > self._max_body:
                self._log_too_large(route, length)
                raise _WebhookRefusedError(413, "request body too large")
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        body: bytes = content.read(self._max_body + 1)
        if len(body) > self._max_body:
            self._log_too_large(route, None)
            raise _WebhookRefusedError(413, "request body too large")
        return body

    def _log_too_large(self, route: str, length: int | None) -> None:
        log.warning(
            "twilio webhook refused: body too large",
            route=route,
            content_length=length,
            max_body_size=self._max_body,
        )

    def _check_signature(self, request: IRequest, body: bytes) -> SignatureCheck:
        url = public_url(self._public_url, request.uri)
        return self._validator.check_request(
            url,
            request.getHeader(b"content-type"),
            body,
            request.getHeader(b"x-twilio-signature"),
        )


# -- helpers -------------------------------------------------------------------------


def _first_values(body: bytes, request: IRequest, route: str) -> dict[str, str]:
    """The form's first value of each name (a JSON or empty body gives ``{}``)."""
    content_type = request.getHeader(b"content-type") or b""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type != b"application/x-www-form-urlencoded":
        return {}
    try:
        return {
            name.decode("utf-8"): values[0].decode("utf-8")
            for name, values in parse_form_body(body).items()
        }
    except UnicodeDecodeError:
        log.warning("twilio webhook refused: parameters are not UTF-8", route=route)
        raise _WebhookRefusedError(400, "bad request") from None


def _call_sid(form: dict[str, str], route: str) -> str:
    call_sid = _required(form, "CallSid", route)
    if _CALL_SID.fullmatch(call_sid) is None:
        log.warning("twilio webhook refused: malformed CallSid", route=route)
        raise _WebhookRefusedError(400, "malformed CallSid")
    return call_sid


def _required(form: dict[str, str], name: str, route: str) -> str:
    value = form.get(name, "")
    if not value:
        log.warning("twilio webhook refused: missing parameter", route=route, parameter=name)
        raise _WebhookRefusedError(400, f"missing {name}")
    return value


def _bounded(text: str) -> str:
    return text[:_MAX_LOGGED_CHARS]


def _peer(request: IRequest) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", address))


def _plain(request: IRequest, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return text.encode("utf-8")


def _twiml(request: IRequest, document: str) -> bytes:
    request.setResponseCode(200)
    request.setHeader(b"content-type", _TWIML_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return document.encode("utf-8")


def _no_content(request: IRequest) -> bytes:
    request.setResponseCode(204)
    return b""
