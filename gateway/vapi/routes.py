"""``POST /vapi/events``: Vapi's server-URL webhooks (a thin Klein shell).

Authentication as configured (``X-Vapi-Secret``, a Bearer token, or an HMAC over
``{timestamp}.{body}``) is checked in constant time by
:mod:`gateway.vapi.webhook_auth`; failures answer 401.  Bodies are parsed by
:mod:`gateway.vapi.webhook_messages`; malformed ones answer 400 with the reason.

- ``assistant-request`` is answered from the config (routing by the dialled number)
  with no I/O at all.
- ``status-update`` (ended) and ``end-of-call-report`` are logged with their reason
  and end the local call that holds that Vapi call, if any.
- ``tool-calls``: the gateway runs no tools; each call is answered with a result
  saying so, so the assistant does not wait.
- Anything else: 200 ``{}``, logged at debug.
"""

from __future__ import annotations

from typing import Any, Protocol

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from gateway.config import Settings
from gateway.health import json_body
from gateway.logs import get_logger
from gateway.vapi.assistants import assistant_request_answer, choose_assistant
from gateway.vapi.codec import EndOfCallReport, StatusUpdate, ToolCalls
from gateway.vapi.reactor_time import now_ns, reactor_time
from gateway.vapi.webhook_auth import (
    BearerAuth,
    HmacAuth,
    SharedSecretAuth,
    WebhookAuth,
    authenticate,
    headers_from_raw,
)
from gateway.vapi.webhook_messages import (
    AssistantRequest,
    ServerEvent,
    WebhookBodyError,
    parse_server_message,
)

log = get_logger("gateway.vapi.webhook")

NS_PER_SECOND = 1_000_000_000
UNROUTED_MESSAGE = "Sorry, this number is not set up yet. Goodbye."
NO_TOOLS_RESULT = "This gateway runs no tools; the tool is not available."


class VapiCallEnds(Protocol):
    """What the webhook asks of the switchboard."""

    def vapi_call_ended(self, vapi_call_id: str) -> bool: ...


def webhook_auth(settings: Settings) -> WebhookAuth | None:
    """The configured webhook credential (None when ``webhook_auth = none``)."""
    vapi = settings.vapi
    if vapi.webhook_auth == "none" or vapi.webhook_secret is None:
        return None
    secret = vapi.webhook_secret.reveal().encode("utf-8")
    if vapi.webhook_auth == "secret":
        return SharedSecretAuth(secret)
    if vapi.webhook_auth == "bearer":
        return BearerAuth(secret, header=vapi.webhook_header)
    return HmacAuth(secret, algorithm=vapi.webhook_hmac_algorithm,
                    max_skew_ns=int(vapi.webhook_max_skew * NS_PER_SECOND))


class VapiRoutes:
    """The server-URL webhook route of the public listener."""

    def __init__(self, settings: Settings, *, calls: VapiCallEnds,
                 clock: IReactorTime) -> None:
        self._settings = settings
        self._auth = webhook_auth(settings)
        self._calls = calls
        self._clock = clock
        self._max_body = settings.vapi.max_message_size
        self.counters: dict[str, int] = {"auth_failures": 0, "bad_bodies": 0}

    def register(self, app: Klein) -> None:
        app.route(self._settings.vapi.events_path, methods=["POST"])(self.events)
        if self._auth is None:
            log.warning("vapi webhooks are NOT authenticated (webhook_auth = none)")

    def events(self, request: IRequest) -> bytes:
        body = _read_body(request, self._max_body)
        if body is None:
            return json_body(request, 413, {"error": "body too large"})
        if self._auth is not None:
            headers = headers_from_raw(request.requestHeaders.getAllRawHeaders())
            result = authenticate(self._auth, headers, body, now_ns(reactor_time(self._clock)))
            if not result.ok:
                self.counters["auth_failures"] += 1
                log.warning("vapi webhook refused", reason=result.reason)
                return json_body(request, 401, {"error": "unauthorized"})
        try:
            message = parse_server_message(body)
        except WebhookBodyError as exc:
            self.counters["bad_bodies"] += 1
            log.warning("vapi webhook body refused", reason=exc.reason)
            return json_body(request, 400, {"error": exc.reason})
        if isinstance(message, AssistantRequest):
            return json_body(request, 200, self._assistant_request(message))
        return json_body(request, 200, self._server_event(message))

    def _assistant_request(self, message: AssistantRequest) -> dict[str, Any]:
        choice = choose_assistant(self._settings.routing, message.dialled_number)
        log.info("vapi assistant-request", vapi_call_id=message.call_id,
                 dialled=message.dialled_number, routed=choice is not None)
        return assistant_request_answer(choice, UNROUTED_MESSAGE)

    def _server_event(self, message: ServerEvent) -> dict[str, Any]:
        event = message.event
        call_id = message.call_id
        if isinstance(event, StatusUpdate):
            log.info("vapi status-update", vapi_call_id=call_id, status=event.status,
                     ended_reason=event.ended_reason)
            if event.status == "ended" and call_id:
                self._calls.vapi_call_ended(call_id)
        elif isinstance(event, EndOfCallReport):
            log.info("vapi end-of-call-report", vapi_call_id=call_id,
                     ended_reason=event.ended_reason)
            if call_id:
                self._calls.vapi_call_ended(call_id)
        elif isinstance(event, ToolCalls):
            calls = event.tool_call_list or ()
            log.warning("vapi tool-calls answered as unavailable", vapi_call_id=call_id,
                        count=len(calls))
            return {"results": [
                {"toolCallId": call.id, "name": call.tool_name, "result": NO_TOOLS_RESULT}
                for call in calls]}
        else:
            log.debug("vapi webhook ignored", vapi_call_id=call_id, type=event.type)
        return {}


def _read_body(request: IRequest, limit: int) -> bytes | None:
    """The raw request body, or None if it is larger than ``limit`` bytes."""
    declared = request.getHeader(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(limit + 1)
    return None if len(body) > limit else body
