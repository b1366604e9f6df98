"""``POST /vapi/events`` through the real twisted.web stack (StubTreq over Klein)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import known_secrets
import pytest
from ini import minimal_ini
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.task import Clock

from gateway.config import parse_settings
from gateway.vapi.routes import NO_TOOLS_RESULT, VapiRoutes

SECRET = known_secrets.VAPI_WEBHOOK_SECRET
URL = "http://127.0.0.1:8080/vapi/events"


class FakeCalls:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def vapi_call_ended(self, vapi_call_id: str) -> bool:
        self.ended.append(vapi_call_id)
        return True


def make(**vapi: str) -> tuple[StubTreq, FakeCalls, Clock]:
    settings = parse_settings(minimal_ini(
        vapi=vapi, assistant={"id": "asst-default"},
        routing={"+15551230001": "asst-sales"}), "gw.ini", {})
    clock = Clock()
    clock.advance(1_700_000_000)
    calls = FakeCalls()
    app = Klein()
    VapiRoutes(settings, calls=calls, clock=clock).register(app)
    return StubTreq(app.resource()), calls, clock


def post(treq: StubTreq, body: Any, headers: dict[str, str] | None = None
         ) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = treq.post(URL, data=raw, headers=headers or {}).result  # type: ignore[attr-defined]
    content = treq.content(response).result  # type: ignore[attr-defined]
    return response.code, json.loads(content)


def message(kind: str, **fields: Any) -> dict[str, Any]:
    return {"message": {"type": kind, "call": {"id": "vapi-call-7"}, **fields}}


SECRET_HEADERS = {"X-Vapi-Secret": SECRET}


def test_assistant_request_is_answered_from_routing() -> None:
    treq, _, _ = make()
    body = message("assistant-request", phoneNumber={"number": "+1 555 123 0001"},
                   customer={"number": "+15550009999"})
    assert post(treq, body, SECRET_HEADERS) == (200, {"assistantId": "asst-sales"})
    other = message("assistant-request", phoneNumber={"number": "+15550000000"})
    assert post(treq, other, SECRET_HEADERS) == (200, {"assistantId": "asst-default"})
    no_number = message("assistant-request")
    assert post(treq, no_number, SECRET_HEADERS) == (200, {"assistantId": "asst-default"})


@pytest.mark.parametrize("headers", [{}, {"X-Vapi-Secret": "wrong-secret-value"},
                                     {"Authorization": f"Bearer {SECRET}"}])
def test_shared_secret_refuses_anything_else(headers: dict[str, str]) -> None:
    treq, calls, _ = make()
    assert post(treq, message("status-update", status="ended"), headers) == (
        401, {"error": "unauthorized"})
    assert calls.ended == []


def test_bearer_token_in_a_configurable_header() -> None:
    treq, _, _ = make(webhook_auth="bearer", webhook_header="X-Gateway-Token")
    body = message("assistant-request")
    assert post(treq, body, {"X-Gateway-Token": f"Bearer {SECRET}"})[0] == 200
    assert post(treq, body, {"X-Gateway-Token": "Bearer nope"})[0] == 401
    assert post(treq, body, {"Authorization": f"Bearer {SECRET}"})[0] == 401


def _signed(body: bytes, timestamp: int, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return {"x-signature": digest.hexdigest(), "x-timestamp": str(timestamp)}


def test_hmac_signature_with_bounded_skew() -> None:
    treq, _, clock = make(webhook_auth="hmac", webhook_max_skew="60")
    raw = json.dumps(message("assistant-request")).encode()
    now = int(clock.seconds())
    assert post(treq, raw, _signed(raw, now))[0] == 200
    assert post(treq, raw, _signed(raw, now - 61))[0] == 401  # too old
    assert post(treq, raw + b" ", _signed(raw, now))[0] == 401  # tampered body
    assert post(treq, raw, _signed(raw, now, "another-secret"))[0] == 401
    assert post(treq, raw, {"x-timestamp": str(now)})[0] == 401


def test_status_update_ended_ends_the_local_call() -> None:
    treq, calls, _ = make()
    body = message("status-update", status="ended", endedReason="customer-ended-call")
    assert post(treq, body, SECRET_HEADERS) == (200, {})
    assert calls.ended == ["vapi-call-7"]
    assert post(treq, message("status-update", status="in-progress"), SECRET_HEADERS) == (
        200, {})
    assert calls.ended == ["vapi-call-7"]


def test_end_of_call_report_ends_the_local_call() -> None:
    treq, calls, _ = make()
    body = message("end-of-call-report", endedReason="assistant-ended-call",
                   durationSeconds=12.5)
    assert post(treq, body, SECRET_HEADERS) == (200, {})
    assert calls.ended == ["vapi-call-7"]


def test_tool_calls_are_answered_as_unavailable() -> None:
    treq, _, _ = make()
    body = message("tool-calls", toolCallList=[
        {"id": "t1", "name": "book"}, {"id": "t2", "function": {"name": "cancel"}}])
    assert post(treq, body, SECRET_HEADERS) == (200, {"results": [
        {"toolCallId": "t1", "name": "book", "result": NO_TOOLS_RESULT},
        {"toolCallId": "t2", "name": "cancel", "result": NO_TOOLS_RESULT}]})


def test_other_messages_get_an_empty_object() -> None:
    treq, calls, _ = make()
    assert post(treq, message("speech-update", status="started"), SECRET_HEADERS) == (200, {})
    assert post(treq, message("brand-new-type"), SECRET_HEADERS) == (200, {})
    assert calls.ended == []


@pytest.mark.parametrize(("body", "reason"), [
    (b"{not json", "body is not valid JSON"),
    (b"[1, 2]", "body is not a JSON object"),
    (b'{"msg": {}}', "body has no 'message' object"),
    (b'{"message": {"type": 5}}', "message has no string 'type'"),
])
def test_malformed_bodies_get_400_with_a_reason(body: bytes, reason: str) -> None:
    treq, _, _ = make()
    assert post(treq, body, SECRET_HEADERS) == (400, {"error": reason})


def test_oversized_body_gets_413() -> None:
    treq, _, _ = make(max_message_size="4096")
    body = message("conversation-update", messages=["x" * 5000])
    assert post(treq, body, SECRET_HEADERS) == (413, {"error": "body too large"})


def test_no_auth_is_explicit() -> None:
    treq, calls, _ = make(webhook_auth="none", webhook_secret="")
    assert post(treq, message("status-update", status="ended"))[0] == 200
    assert calls.ended == ["vapi-call-7"]
