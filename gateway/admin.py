"""The admin API (on the admin listener): list calls, end a call, place an outbound call.

Every route needs ``Authorization: Bearer <[admin] token>`` (compared in constant
time); a missing or wrong token, or no token configured, is answered 401.  Answers are
JSON, errors included (``{"error": …, "reason"?: …}``); unknown paths are 404 and
other methods 405 (with ``Allow``).  The token is never logged.

``GET /calls``
    200: ``calls`` (each :meth:`~gateway.bridge.session.CallSession.snapshot`: CallSid,
    from/to, started, state, current playout lead and counters), ``active_calls`` and
    ``pending_outbound`` (outbound calls placed but not yet streaming).
``GET /calls/{CallSid}``
    200 with that call's snapshot; 404 if this process holds no such call.
``DELETE /calls/{CallSid}``
    Ends the call with cause ``admin-hangup``: Vapi gets ``end-call`` and Twilio a REST
    hang-up when REST credentials are configured (else the media socket is closed and
    the TwiML fallback runs).  200 when both legs are already done, 202 while the
    teardown is still under way; 404 if there is no such call.
``POST /calls``
    Places an outbound call.  Body: ``{"to": E.164, "from": E.164, "assistantId"?:
    str, "variables"?: {str: str}}`` (anything else is 400 with a reason).  The
    assistant is ``assistantId``, or else the one ``[routing]`` gives the ``from``
    number (the gateway's own number).  The call is created over Twilio's REST API with
    inline TwiML (:meth:`~gateway.twilio.twiml.TwimlAnswers.connect_outbound`: the same
    stream URL and stream status callback as inbound calls), the call status callback
    at ``[twilio] status_path`` (event ``completed``) and a ring timeout inside the
    stream token's TTL.  The stream token is bound to a random reference recorded in
    the pending outbound calls (:mod:`gateway.bridge.outbound`), since the CallSid is
    unknown until Twilio answers.  201 with the CallSid; Twilio's refusals come back
    with Twilio's ``code`` and ``message`` (400, or 409 for Twilio's 409; 502 when
    Twilio fails, cannot be reached, or refuses the gateway's own credentials; 503 for
    Twilio's 429); 503 without ``[twilio] account_sid``, while draining, at capacity
    (active plus pending outbound calls) or with too many calls pending.

A client that disconnects while Twilio is creating its call does not cancel the
creation: the call is placed and recorded all the same (it shows in ``GET /calls``).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from klein import Klein
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from gateway.bridge.outbound import OutboundCall, OutboundCalls, PendingTableFullError
from gateway.bridge.switchboard import Switchboard
from gateway.config import Settings
from gateway.health import json_body
from gateway.logs import get_logger
from gateway.twilio.rest import TwilioApiError, TwilioRestClient, TwilioTransportError
from gateway.twilio.token import StreamTokens
from gateway.twilio.twiml import TwimlAnswers, validate_callback_url
from gateway.vapi.assistants import AssistantById, AssistantChoice, choose_assistant

__all__ = [
    "ADMIN_HANGUP_CAUSE",
    "MAX_BODY_BYTES",
    "AdminApi",
    "BadRequestError",
    "PlaceCallRequest",
    "call_status_url",
    "parse_place_call",
    "ring_timeout",
    "twilio_error_status",
]

log = get_logger("gateway.admin")

ADMIN_HANGUP_CAUSE: Final = "admin-hangup"
MAX_BODY_BYTES: Final = 16 * 1024
"""The largest ``POST /calls`` body accepted (413 beyond)."""
MAX_ASSISTANT_ID_CHARS: Final = 100
MAX_VARIABLES: Final = 64
MAX_VARIABLE_NAME_CHARS: Final = 64
MAX_VARIABLE_VALUE_CHARS: Final = 1000
STATUS_CALLBACK_EVENTS: Final = ("completed",)
"""Call status events asked for outbound calls (the terminal one ends a live call)."""
STREAM_START_MARGIN_SECONDS: Final = 15
"""Of the stream token's TTL, what is kept for answering and connecting after ringing."""
MIN_RING_SECONDS: Final = 5
MAX_RING_SECONDS: Final = 60

_E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
_VARIABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_INVALID_TEXT: Final = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")  # controls, lone surrogates
_SURROGATE: Final = re.compile("[\ud800-\udfff]")  # JSON can escape them; no encoder can send them
_FIELDS: Final = frozenset({"to", "from", "assistantId", "variables"})
_MAX_ECHOED_CHARS: Final = 64


class BadRequestError(ValueError):
    """A ``POST /calls`` body that cannot be used; the message is the reason (400)."""


@dataclass(frozen=True)
class PlaceCallRequest:
    """A validated ``POST /calls`` body."""

    to: str
    caller: str
    """``from``: the number the call is placed from."""
    assistant_id: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)


def parse_place_call(body: bytes) -> PlaceCallRequest:
    """Validate a ``POST /calls`` body; raise :class:`BadRequestError` with the reason."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequestError("the body is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise BadRequestError(f"the body is not JSON: {error.msg} at {error.pos}") from None
    except RecursionError:
        raise BadRequestError("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequestError("the body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        names = ", ".join(repr(name[:_MAX_ECHOED_CHARS]) for name in unknown[:5])
        raise BadRequestError(f"unknown field(s): {names}; allowed: to, from, assistantId, "
                              "variables")
    to = _phone_number(data, "to")
    caller = _phone_number(data, "from")
    assistant_id = data.get("assistantId")
    if assistant_id is not None and (
        not isinstance(assistant_id, str) or not assistant_id.strip()
        or len(assistant_id) > MAX_ASSISTANT_ID_CHARS or _INVALID_TEXT.search(assistant_id)
    ):
        raise BadRequestError(f"'assistantId' must be a non-empty string of at most "
                              f"{MAX_ASSISTANT_ID_CHARS} printable characters")
    return PlaceCallRequest(to, caller, assistant_id, _variables(data.get("variables")))


def _phone_number(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise BadRequestError(f"'{name}' is required")
    if not isinstance(value, str) or _E164.fullmatch(value) is None:
        raise BadRequestError(f"'{name}' must be an E.164 number: + then up to 15 digits")
    return value


def _variables(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequestError("'variables' must be an object of strings")
    if len(value) > MAX_VARIABLES:
        raise BadRequestError(f"'variables' has more than {MAX_VARIABLES} entries")
    for name, text in value.items():
        if len(name) > MAX_VARIABLE_NAME_CHARS or _VARIABLE_NAME.fullmatch(name) is None:
            raise BadRequestError(
                f"variable name {name[:_MAX_ECHOED_CHARS]!r} must be a letter or _ then "
                f"letters, digits, _ . - (at most {MAX_VARIABLE_NAME_CHARS})")
        if not isinstance(text, str):
            raise BadRequestError(f"'variables.{name}' must be a string")
        if len(text) > MAX_VARIABLE_VALUE_CHARS:
            raise BadRequestError(
                f"'variables.{name}' is longer than {MAX_VARIABLE_VALUE_CHARS} characters")
        if _SURROGATE.search(text):
            raise BadRequestError(f"'variables.{name}' holds a lone surrogate (not text)")
    return dict(value)


def twilio_error_status(twilio_status: int) -> int:
    """The admin API's HTTP status for a Twilio error answer of ``twilio_status``."""
    if twilio_status == 409:
        return 409
    if twilio_status == 429:
        return 503
    if twilio_status in (401, 403) or not 400 <= twilio_status < 500:
        return 502  # the gateway's own credentials, Twilio failing, or an unusable answer
    return 400


def call_status_url(settings: Settings) -> str:
    """Where Twilio posts an outbound call's status: ``public_url`` + ``status_path``."""
    return settings.gateway.public_url.rstrip("/") + settings.twilio.status_path


def ring_timeout(ttl_seconds: float) -> int:
    """Twilio's ``Timeout`` (seconds of ringing) for a stream token valid ``ttl_seconds``:
    the answered call must still start its stream before the token expires."""
    ring = int(ttl_seconds - STREAM_START_MARGIN_SECONDS)
    return max(MIN_RING_SECONDS, min(MAX_RING_SECONDS, ring))


class AdminApi:
    """The admin routes (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        token: str | None,
        switchboard: Switchboard,
        twilio_rest: TwilioRestClient | None,
        tokens: StreamTokens,
        twiml: TwimlAnswers,
        clock: IReactorTime,
        outbound: OutboundCalls,
    ) -> None:
        """
        :param token: the Bearer token (``[admin] token``); None or empty refuses all.
        :param twilio_rest: None without ``[twilio] account_sid`` (``POST /calls`` 503).
        :param outbound: the pending outbound calls, shared with the media socket.
        """
        self._settings = settings
        self._token: Final = token.encode("utf-8") if token else None
        self._switchboard = switchboard
        self._twilio_rest = twilio_rest
        self._tokens = tokens
        self._twiml = twiml
        self._clock = clock
        self._outbound = outbound
        self._status_url: Final = validate_callback_url(call_status_url(settings))
        self._ring_timeout: Final = ring_timeout(outbound.ttl_seconds)
        if self._token is None:
            log.warning("[admin] token is not set: every admin API request is refused (401)")

    def __repr__(self) -> str:
        return f"<AdminApi token={'set' if self._token else 'unset'}>"

    def register(self, app: Klein) -> None:
        """Add the routes, and JSON 404 / 405 answers, to ``app`` (the admin listener's)."""
        app.route("/calls", methods=["GET"], endpoint="admin_list_calls")(self.list_calls)
        app.route("/calls", methods=["POST"], endpoint="admin_place_call")(self.place_call)
        app.route("/calls/<call_sid>", methods=["GET"], endpoint="admin_show_call")(
            self.show_call)
        app.route("/calls/<call_sid>", methods=["DELETE"], endpoint="admin_hang_up")(
            self.hang_up)
        app.handle_errors(NotFound)(_not_found)
        app.handle_errors(MethodNotAllowed)(_method_not_allowed)

    def resource(self) -> IResource:
        """A resource serving only these routes (for tests or a listener of its own)."""
        app = Klein()
        self.register(app)
        resource: IResource = app.resource()
        return resource

    # -- the routes -------------------------------------------------------------------

    def list_calls(self, request: IRequest) -> bytes | Deferred[bytes]:
        """``GET /calls``: the active calls and the outbound calls still ringing.

        In a cluster, ``cluster_calls`` lists every instance's calls from the registry
        (``"cluster": "unavailable"`` if Redis cannot answer: the local list stands).
        """
        if not self._authorized(request, "list-calls"):
            return _unauthorized(request)
        now = self._clock.seconds()
        calls = [session.snapshot() for session in self._switchboard.sessions()
                 if not session.ended]
        pending = [_pending_view(call, now) for call in self._outbound.pending(now)]
        body: dict[str, Any] = {
            "calls": calls, "active_calls": len(calls), "pending_outbound": pending}
        cluster = self._switchboard.cluster
        if cluster is None:
            return json_body(request, 200, body)
        body["instance"] = cluster.instance_id

        def with_cluster(found: list[Any]) -> bytes:
            call_records, instances = found
            body["cluster"] = "available"
            body["cluster_calls"] = [msgspec.to_builtins(r) for r in call_records]
            body["cluster_active_calls"] = len(call_records)
            body["instances"] = [msgspec.to_builtins(i) for i in instances]
            return json_body(request, 200, body)

        def without_cluster(failure: Failure) -> bytes:
            error = failure.value
            inner = error.subFailure if isinstance(error, FirstError) else failure
            log.warning("admin list: the cluster registry is unavailable",
                        error=inner.getErrorMessage())
            body["cluster"] = "unavailable"
            return json_body(request, 200, body)

        asks: list[Deferred[Any]] = [cluster.list_calls(), cluster.list_instances()]
        listing: Deferred[list[Any]] = gatherResults(asks, consumeErrors=True)
        return listing.addCallbacks(with_cluster, without_cluster)

    def show_call(self, request: IRequest, call_sid: str) -> bytes:
        """``GET /calls/{CallSid}``: one call's snapshot."""
        if not self._authorized(request, "show-call"):
            return _unauthorized(request)
        session = self._switchboard.get(call_sid)
        if session is None or session.ended:
            return _no_such_call(request, call_sid)
        return json_body(request, 200, session.snapshot())

    def hang_up(self, request: IRequest, call_sid: str) -> bytes | Deferred[bytes]:
        """``DELETE /calls/{CallSid}``: end the call (Vapi end-call, Twilio hang-up)."""
        if not self._authorized(request, "hang-up"):
            return _unauthorized(request)
        session = self._switchboard.get(call_sid)
        if session is None or session.ended:
            return self._hang_up_elsewhere(request, call_sid)
        state = session.state
        streaming = session.stream is not None
        ending = self._switchboard.end_call(call_sid, ADMIN_HANGUP_CAUSE)
        if ending is None:
            return _no_such_call(request, call_sid)
        done = ending.called
        if self._switchboard.policy.rest_available:
            twilio = "rest-hangup"
        else:
            twilio = "stream-closed" if streaming else "none"
        log.info("admin hang-up", call_sid=call_sid, state_before=state, twilio=twilio,
                 done=done)
        return json_body(request, 200 if done else 202, {
            "call_sid": call_sid, "cause": ADMIN_HANGUP_CAUSE, "state_before": state,
            "twilio": twilio, "ended": done})

    def _hang_up_elsewhere(self, request: IRequest, call_sid: str
                           ) -> bytes | Deferred[bytes]:
        """A call this instance does not hold: ask the cluster's owner to end it (202)."""
        cluster = self._switchboard.cluster
        if cluster is None:
            return _no_such_call(request, call_sid)
        if not cluster.available:
            return _error(request, 503, "cluster unavailable",
                          "not held here, and Redis cannot say which instance holds it")

        def sent(owner: str | None) -> bytes:
            if owner is None:
                return _no_such_call(request, call_sid)
            log.info("admin hang-up sent to the call's instance", call_sid=call_sid,
                     owner=owner)
            return json_body(request, 202, {"call_sid": call_sid, "cause": ADMIN_HANGUP_CAUSE,
                                            "owner": owner, "ended": False})

        return cluster.end_elsewhere(call_sid, ADMIN_HANGUP_CAUSE).addCallback(sent)

    def place_call(self, request: IRequest) -> bytes | Deferred[bytes]:
        """``POST /calls``: place an outbound call through Twilio; 201 with its CallSid."""
        if not self._authorized(request, "place-call"):
            return _unauthorized(request)
        rest = self._twilio_rest
        if rest is None:
            return _error(request, 503, "outbound calls need [twilio] account_sid")
        try:
            wanted = parse_place_call(_bounded_body(request))
        except _BodyTooLargeError:
            return _error(request, 413, "request body too large",
                          f"at most {MAX_BODY_BYTES} bytes")
        except BadRequestError as error:
            log.info("admin request refused: bad body", route="place-call", reason=str(error))
            return _error(request, 400, "bad request", str(error))
        choice = self._assistant_for(wanted)
        if choice is None:
            return _error(request, 503, "no assistant configured for this number")
        now = self._clock.seconds()
        refusal = self._refusal(now)
        if refusal is not None:
            return _error(request, 503, "not admitting calls", refusal)
        try:
            call = self._outbound.reserve(caller=wanted.caller, called=wanted.to,
                                          choice=choice, variables=wanted.variables, now=now)
        except PendingTableFullError:
            return _error(request, 503, "not admitting calls", "too many pending outbound calls")
        try:
            token = self._tokens.issue(call.reference, now)
            twiml = self._twiml.connect_outbound(reference=call.reference, caller=call.caller,
                                                 called=call.called, stream_token=token)
            placing = rest.create_call(
                to=call.called, from_=call.caller, twiml=twiml, status_callback=self._status_url,
                status_callback_events=STATUS_CALLBACK_EVENTS,
                extra_parameters=[("Timeout", str(self._ring_timeout))])
        except ValueError as error:  # the configured TwiML parts are too long for Twilio
            self._outbound.cancel(call.reference)
            log.error("outbound call not placed: bad TwiML", reason=str(error))
            return _error(request, 500, "cannot build the outbound call", str(error))
        answered = placing.addCallbacks(
            self._placed, self._not_placed,
            callbackArgs=(request, call, wanted.assistant_id is None), errbackArgs=(request, call))
        return _not_cancelled_by_client(answered)

    # -- placing ------------------------------------------------------------------------

    def _assistant_for(self, wanted: PlaceCallRequest) -> AssistantChoice | None:
        if wanted.assistant_id is not None:
            return AssistantById(wanted.assistant_id)
        return choose_assistant(self._settings.routing, wanted.caller)

    def _refusal(self, now: float) -> str | None:
        admission = self._switchboard.admission
        refusal = admission.refusal()
        if refusal is not None:
            return refusal.value
        busy = len(admission.registry) + len(self._outbound.pending(now))
        if busy >= admission.max_concurrent_calls:
            return "capacity"
        return None

    def _placed(self, call_sid: str, request: IRequest, call: OutboundCall, routed: bool
                ) -> bytes:
        now = self._clock.seconds()
        recorded = self._outbound.placed(call.reference, call_sid, now)
        log.info("outbound call placed", call_sid=call_sid, caller=call.caller,
                 called=call.called, outbound_ref=call.reference,
                 assistant_id=_assistant_id(call.choice), routed=routed,
                 variables=len(call.variables),
                 recorded=recorded is not None)
        request.setHeader(b"location", f"/calls/{call_sid}".encode())
        return json_body(request, 201, {
            "call_sid": call_sid, "status": "queued", "from": call.caller, "to": call.called,
            "assistant_id": _assistant_id(call.choice), "routed": routed,
            "stream_deadline_s": round(call.expires_at - now, 3)})

    def _not_placed(self, failure: Failure, request: IRequest, call: OutboundCall) -> bytes:
        self._outbound.cancel(call.reference)
        error = failure.value
        if isinstance(error, TwilioApiError):
            status = twilio_error_status(error.status)
            log.warning("outbound call refused by twilio", caller=call.caller,
                        called=call.called, twilio_status=error.status, code=error.code,
                        message=error.message, answered=status)
            return json_body(request, status, {
                "error": "twilio refused the call", "twilio_status": error.status,
                "code": error.code, "message": error.message, "more_info": error.more_info})
        if isinstance(error, TwilioTransportError):
            log.warning("outbound call failed: twilio unreachable", caller=call.caller,
                        called=call.called, reason=str(error), timed_out=error.timed_out)
            return json_body(request, 502, {
                "error": "twilio unreachable", "message": str(error),
                "timed_out": error.timed_out})
        log.error("outbound call failed", caller=call.caller, called=call.called,
                  exc_info=failure)
        return json_body(request, 500, {"error": "internal error"})

    # -- authentication ------------------------------------------------------------------

    def _authorized(self, request: IRequest, route: str) -> bool:
        expected = self._token
        presented = _bearer_token(request.getHeader(b"authorization"))
        # compare even when one side is missing, so timing says nothing about the token
        matches = hmac.compare_digest(presented or b"", expected or b"\x00")
        if expected is not None and presented is not None and matches:
            return True
        log.warning("admin request refused: bad or missing token", route=route,
                    method=request.method.decode("ascii", "replace"),
                    presented=presented is not None, peer=_peer(request))
        return False


# -- helpers ----------------------------------------------------------------------------


class _BodyTooLargeError(Exception):
    pass


def _bounded_body(request: IRequest) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise _BodyTooLargeError()
    return body


def _bearer_token(header: bytes | None) -> bytes | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _not_cancelled_by_client(placing: Deferred[bytes]) -> Deferred[bytes]:
    """The answer to the request: Klein cancels it when the client goes away, but that
    must not cancel placing the call (Twilio may already be dialling)."""
    answer: Deferred[bytes] = Deferred()

    def forward(result: bytes | Failure) -> None:
        if not answer.called:
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

    placing.addBoth(forward)
    return answer


def _assistant_id(choice: AssistantChoice) -> str | None:
    return choice.assistant_id if isinstance(choice, AssistantById) else None


def _pending_view(call: OutboundCall, now: float) -> dict[str, Any]:
    return {"call_sid": call.call_sid, "from": call.caller, "to": call.called,
            "assistant_id": _assistant_id(call.choice),
            "stream_deadline_s": round(call.expires_at - now, 3)}


def _peer(request: IRequest) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", address))


def _error(request: IRequest, status: int, error: str, reason: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": error}
    if reason is not None:
        body["reason"] = reason
    return json_body(request, status, body)


def _unauthorized(request: IRequest) -> bytes:
    request.setHeader(b"www-authenticate", b'Bearer realm="vapi-gateway admin"')
    return _error(request, 401, "unauthorized")


def _no_such_call(request: IRequest, call_sid: str) -> bytes:
    return json_body(request, 404, {"error": "no such call",
                                    "call_sid": call_sid[:_MAX_ECHOED_CHARS]})


def _not_found(request: IRequest, failure: Failure) -> bytes:
    return _error(request, 404, "not found")


def _method_not_allowed(request: IRequest, failure: Failure) -> bytes:
    error = failure.value
    allowed = sorted(getattr(error, "valid_methods", None) or [])
    if allowed:
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
    return _error(request, 405, "method not allowed")
