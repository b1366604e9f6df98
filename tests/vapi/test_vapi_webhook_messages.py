"""Parsing Vapi's server-URL webhook bodies: assistant-request with its numbers,
status-update, end-of-call-report, tool-calls, unknown types, malformed bodies
(each with a reason for the 400), and random bodies."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.vapi.codec import EndOfCallReport, StatusUpdate, ToolCall, ToolCalls, UnknownEvent
from gateway.vapi.webhook_messages import (
    AssistantRequest,
    ServerEvent,
    WebhookBodyError,
    parse_server_message,
)


def body(message: Any) -> bytes:
    return json.dumps({"message": message}).encode()


def test_assistant_request_with_numbers_on_the_message() -> None:
    parsed = parse_server_message(body({
        "type": "assistant-request",
        "call": {"id": "call-1", "type": "inboundPhoneCall"},
        "phoneNumber": {"number": "+15550100100", "id": "pn-1"},
        "customer": {"number": "+15550100199"},
    }))
    assert parsed == AssistantRequest(call_id="call-1", dialled_number="+15550100100",
                                      customer_number="+15550100199")


def test_assistant_request_with_numbers_inside_the_call() -> None:
    parsed = parse_server_message(body({
        "type": "assistant-request",
        "call": {"id": "call-2", "phoneNumber": {"number": "+15550100100"},
                 "customer": {"number": "+15550100199"}},
    }))
    assert parsed == AssistantRequest("call-2", "+15550100100", "+15550100199")


@pytest.mark.parametrize("message", [
    {"type": "assistant-request"},
    {"type": "assistant-request", "call": "not an object"},
    {"type": "assistant-request", "call": {"id": 5, "customer": {"number": 15550100199}}},
    {"type": "assistant-request", "call": {"id": ""}, "phoneNumber": None, "customer": []},
])
def test_assistant_request_fields_are_read_leniently(message: dict[str, Any]) -> None:
    assert parse_server_message(body(message)) == AssistantRequest(None, None, None)


def test_status_update() -> None:
    parsed = parse_server_message(body({
        "type": "status-update", "status": "ended", "endedReason": "silence-timed-out",
        "call": {"id": "call-3"}}))
    assert parsed == ServerEvent("call-3", StatusUpdate(status="ended",
                                                        ended_reason="silence-timed-out"))


def test_end_of_call_report() -> None:
    parsed = parse_server_message(body({
        "type": "end-of-call-report", "endedReason": "customer-ended-call",
        "durationSeconds": 61.5, "artifact": {"transcript": "..."}, "call": {"id": "call-4"}}))
    assert parsed == ServerEvent("call-4", EndOfCallReport("customer-ended-call", 61.5))


def test_tool_calls() -> None:
    parsed = parse_server_message(body({
        "type": "tool-calls", "call": {"id": "call-5"},
        "toolCallList": [{"id": "tc-1", "name": "book", "parameters": {"day": "monday"}}]}))
    assert parsed == ServerEvent("call-5", ToolCalls(
        tool_call_list=[ToolCall(id="tc-1", name="book", parameters={"day": "monday"})]))


@pytest.mark.parametrize("message_type", ["hang", "speech-update", "conversation-update",
                                          "transfer-destination-request", "new-thing"])
def test_other_types_are_unknown(message_type: str) -> None:
    # even a known socket event with odd fields: only the three typed ones are checked
    parsed = parse_server_message(body({"type": message_type, "status": 5,
                                        "call": {"id": "c"}}))
    assert parsed == ServerEvent("c", UnknownEvent(type=message_type))


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b"{}", "no 'message' object"),
    (b'{"message": "x"}', "no 'message' object"),
    (b'{"message": {}}', "no string 'type'"),
    (b'{"message": {"type": 3}}', "no string 'type'"),
    (body({"type": "status-update", "status": 1}), "bad status-update message"),
    (body({"type": "end-of-call-report", "durationSeconds": "x"}),
     "bad end-of-call-report message"),
    (body({"type": "tool-calls", "toolCallList": "x"}), "bad tool-calls message"),
])
def test_malformed_bodies_have_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(WebhookBodyError) as caught:
        parse_server_message(raw)
    assert reason in caught.value.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=3),
    max_leaves=10,
)
message_fields = st.dictionaries(
    st.sampled_from(["call", "phoneNumber", "customer", "status", "endedReason",
                     "durationSeconds", "toolCallList"]), json_values)


@settings(max_examples=300)
@given(st.sampled_from(["assistant-request", "status-update", "end-of-call-report",
                        "tool-calls", "hang"]), message_fields)
def test_random_messages_parse_or_raise_the_body_error(message_type: str,
                                                      fields: dict[str, Any]) -> None:
    try:
        parsed = parse_server_message(body({**fields, "type": message_type}))
    except WebhookBodyError:
        return
    assert isinstance(parsed, (AssistantRequest, ServerEvent))


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_random_bytes_parse_or_raise_the_body_error(raw: bytes) -> None:
    with contextlib.suppress(WebhookBodyError):
        parse_server_message(raw)


def test_bad_utf8_inside_json_is_a_body_error() -> None:
    with pytest.raises(WebhookBodyError):
        parse_server_message(b'{"message": {"type": "\xff"}}')
