"""Choosing the assistant: number normalisation, the routing table, overrides, and
the assistant-request answer checked against the shapes vapi.md documents."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.vapi.assistants import (
    AssistantById,
    InlineAssistant,
    RoutingTable,
    assistant_request_answer,
    choose_assistant,
    merge_overrides,
    normalize_number,
    twilio_call_overrides,
)

SALES = AssistantById("asst-sales", overrides={"variableValues": {"team": "sales"}})
SUPPORT = AssistantById("asst-support")
INLINE = InlineAssistant({
    "firstMessage": "Hello, Dr. Smith's office.",
    "model": {"provider": "openai", "model": "gpt-4o",
              "messages": [{"role": "system", "content": "You book appointments."}]},
    "voice": {"provider": "11labs", "voiceId": "v-1"},
    "backgroundSound": "off",
})
TABLE = RoutingTable(routes={"+1 (555) 010-0100": SALES, "+15550100101": INLINE},
                     default=SUPPORT)


@pytest.mark.parametrize(("raw", "normal"), [
    ("+15550100100", "+15550100100"),
    ("+1 (555) 010-0100", "+15550100100"),
    ("+1.555.010.0100", "+15550100100"),
    ("15550100100", "15550100100"),  # no country code is guessed
    ("client:alice", None),
    ("", None),
    ("+", None),
    ("+1234567890123456", None),  # longer than E.164 allows
])
def test_normalize_number(raw: str, normal: str | None) -> None:
    assert normalize_number(raw) == normal


def test_routing_by_dialled_number_with_a_default() -> None:
    assert choose_assistant(TABLE, "+15550100100") is SALES
    assert choose_assistant(TABLE, "+1 555 010 0101") is INLINE
    assert choose_assistant(TABLE, "+15550100999") is SUPPORT
    assert choose_assistant(TABLE, None) is SUPPORT
    assert choose_assistant(TABLE, "client:alice") is SUPPORT
    assert choose_assistant(RoutingTable(), "+15550100100") is None


def test_routing_table_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="not a phone number"):
        RoutingTable(routes={"sales": SALES})
    with pytest.raises(ValueError, match="listed twice"):
        RoutingTable(routes={"+15550100100": SALES, "+1 555 010 0100": SUPPORT})
    with pytest.raises(ValueError):
        AssistantById(" ")
    with pytest.raises(ValueError):
        InlineAssistant({})


def test_merge_overrides_merges_variable_values() -> None:
    base = {"variableValues": {"team": "sales", "tier": "gold"}, "firstMessage": "Hi"}
    extra = {"variableValues": {"tier": "vip", "callerNumber": "+1555"}, "maxDurationSeconds": 300}
    assert merge_overrides(base, extra) == {
        "variableValues": {"team": "sales", "tier": "vip", "callerNumber": "+1555"},
        "firstMessage": "Hi", "maxDurationSeconds": 300}
    assert merge_overrides(None, None) == {}
    assert base["variableValues"] == {"team": "sales", "tier": "gold"}  # inputs untouched


def test_twilio_call_overrides() -> None:
    assert twilio_call_overrides(caller_number="+15550100199", dialled_number="+15550100100",
                                 call_sid="CA123") == {
        "variableValues": {"twilioCallSid": "CA123", "callerNumber": "+15550100199",
                           "dialledNumber": "+15550100100"}}
    recreated = twilio_call_overrides(caller_number=None, dialled_number=None, call_sid="CA1",
                                      first_message="Sorry, we got cut off. Where were we?")
    assert recreated == {"variableValues": {"twilioCallSid": "CA1"},
                         "firstMessage": "Sorry, we got cut off. Where were we?"}


# vapi.md: the answer is top-level JSON, one of {"assistantId": ...} (optional
# "assistantOverrides"), {"assistant": {...}}, {"destination": {...}}, {"error": "..."}.
DOCUMENTED_ANSWER_KEYS = [{"assistantId"}, {"assistantId", "assistantOverrides"},
                          {"assistant"}, {"error"}]


@pytest.mark.parametrize(("choice", "expected"), [
    (SUPPORT, {"assistantId": "asst-support"}),
    (SALES, {"assistantId": "asst-sales",
             "assistantOverrides": {"variableValues": {"team": "sales"}}}),
    (INLINE, {"assistant": dict(INLINE.assistant)}),
    (None, {"error": "Sorry, this number is not in service."}),
])
def test_assistant_request_answer(choice: Any, expected: dict[str, Any]) -> None:
    answer = assistant_request_answer(choice, "Sorry, this number is not in service.")
    assert answer == expected
    assert set(answer) in DOCUMENTED_ANSWER_KEYS
    assert "message" not in answer  # top level, not wrapped
