"""The call-socket codec: every documented event, unknown types, error kinds,
control-message serialisation, round trips, and random input (only events or
CallMessageError ever come out)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.vapi.codec import (
    AddMessage,
    AssistantStalled,
    CallEvent,
    CallMessageError,
    ClientMessage,
    Control,
    ControlCommand,
    ConversationUpdate,
    EndCall,
    EndOfCallReport,
    MessageToAdd,
    ModelOutput,
    NumberDestination,
    Say,
    SipDestination,
    SpeechUpdate,
    StatusUpdate,
    ToolCall,
    ToolCalls,
    ToolFunction,
    Transcript,
    Transfer,
    UnknownEvent,
    UserInterrupted,
    decode_event,
    encode_message,
    is_barge_in,
    is_call_end,
)

GOLDEN: list[tuple[dict[str, Any], CallEvent]] = [
    ({"type": "speech-update", "status": "started", "role": "user", "turn": 3},
     SpeechUpdate(status="started", role="user", turn=3)),
    ({"type": "user-interrupted", "turnId": "t-9"}, UserInterrupted(turn_id="t-9")),
    ({"type": "user-interrupted"}, UserInterrupted()),
    ({"type": "transcript", "role": "user", "transcriptType": "final",
      "transcript": "I'd like an appointment"},
     Transcript(role="user", transcript_type="final", transcript="I'd like an appointment")),
    ({"type": "model-output", "output": "Sure,", "turnId": 4},
     ModelOutput(output="Sure,", turn_id=4)),
    ({"type": "status-update", "status": "ended", "endedReason": "customer-ended-call"},
     StatusUpdate(status="ended", ended_reason="customer-ended-call")),
    ({"type": "conversation-update", "messages": [{"role": "bot", "message": "Hi"}],
      "messagesOpenAIFormatted": []},
     ConversationUpdate(messages=[{"role": "bot", "message": "Hi"}])),
    ({"type": "hang"}, AssistantStalled()),
    ({"type": "end-of-call-report", "endedReason": "silence-timed-out", "durationSeconds": 42,
      "cost": 0.12, "summary": "..."},
     EndOfCallReport(ended_reason="silence-timed-out", duration_seconds=42.0)),
    ({"type": "tool-calls", "toolCallList": [
        {"id": "c1", "name": "book", "parameters": {"day": "monday"}},
        {"id": "c2", "type": "function", "function": {"name": "hours", "arguments": "{}"}}]},
     ToolCalls(tool_call_list=[
         ToolCall(id="c1", name="book", parameters={"day": "monday"}),
         ToolCall(id="c2", function=ToolFunction(name="hours", arguments="{}"))])),
    ({"type": "voice-input", "input": "hello"}, UnknownEvent(type="voice-input")),
    ({"type": "assistant.started"}, UnknownEvent(type="assistant.started")),
]


@pytest.mark.parametrize(("frame", "expected"), GOLDEN, ids=lambda v: str(v)[:30])
def test_documented_events_decode(frame: dict[str, Any], expected: CallEvent) -> None:
    assert decode_event(json.dumps(frame).encode()) == expected
    assert decode_event(json.dumps(frame)) == expected  # str frames too


def test_tool_names_come_from_either_shape() -> None:
    event = decode_event(json.dumps(GOLDEN[9][0]))
    assert isinstance(event, ToolCalls) and event.tool_call_list is not None
    assert [call.tool_name for call in event.tool_call_list] == ["book", "hours"]
    assert ToolCall(id="x").tool_name is None


def test_omitted_fields_are_none_and_extra_fields_are_ignored() -> None:
    assert decode_event(b'{"type":"speech-update","future":{"x":1}}') == SpeechUpdate()
    assert decode_event(b'{"type":"status-update","status":null}') == StatusUpdate()


@pytest.mark.parametrize(("frame", "kind"), [
    (b"", "malformed-json"),
    (b"{", "malformed-json"),
    (b"\xff\xfe{}", "malformed-json"),
    (b"NaN", "malformed-json"),
    (b"[" * 5000 + b"]" * 5000, "malformed-json"),
    (b'{"type":"model-output","output":1e999}', "malformed-json"),
    (b"[]", "not-an-object"),
    (b'"speech-update"', "not-an-object"),
    (b"null", "not-an-object"),
    (b"3", "not-an-object"),
    (b"{}", "missing-type"),
    (b'{"type":7}', "missing-type"),
    (b'{"type":null}', "missing-type"),
    (b'{"type":"speech-update","status":5}', "invalid-field"),
    (b'{"type":"speech-update","turn":"3"}', "invalid-field"),
    (b'{"type":"speech-update","turn":true}', "invalid-field"),
    (b'{"type":"end-of-call-report","durationSeconds":"long"}', "invalid-field"),
    (b'{"type":"tool-calls","toolCallList":{"id":"x"}}', "invalid-field"),
    (b'{"type":"conversation-update","messages":"none"}', "invalid-field"),
])
def test_bad_frames_raise_the_codec_error_with_a_kind(frame: bytes, kind: str) -> None:
    with pytest.raises(CallMessageError) as caught:
        decode_event(frame)
    assert caught.value.kind == kind


def test_the_error_never_quotes_the_frame() -> None:
    secret_ish = "do-not-log-this-transcript"
    with pytest.raises(CallMessageError) as caught:
        decode_event(json.dumps({"type": "transcript", "transcript": 5, "role": secret_ish}))
    assert secret_ish not in str(caught.value)


def test_barge_in_and_call_end_signals() -> None:
    assert is_barge_in(UserInterrupted())
    assert is_barge_in(SpeechUpdate(status="started", role="user"))
    assert not is_barge_in(SpeechUpdate(status="started", role="assistant"))
    assert not is_barge_in(SpeechUpdate(status="stopped", role="user"))
    assert not is_barge_in(AssistantStalled())
    assert is_call_end(StatusUpdate(status="ended"))
    assert is_call_end(EndOfCallReport())
    assert not is_call_end(StatusUpdate(status="in-progress"))
    assert not is_call_end(AssistantStalled())  # "hang" is a stall, not a hang-up


# --- gateway -> Vapi -------------------------------------------------------

CONTROL_GOLDEN: list[tuple[ClientMessage, dict[str, Any]]] = [
    (EndCall(), {"type": "end-call"}),
    (Say(content="One moment please."), {"type": "say", "content": "One moment please."}),
    (Say(content="Bye", end_call_after_spoken=True, interrupt_assistant_enabled=False,
         interruptions_enabled=False),
     {"type": "say", "content": "Bye", "endCallAfterSpoken": True,
      "interruptAssistantEnabled": False, "interruptionsEnabled": False}),
    (AddMessage(message=MessageToAdd(role="system", content="The caller is a VIP.")),
     {"type": "add-message", "message": {"role": "system", "content": "The caller is a VIP."}}),
    (AddMessage(message=MessageToAdd(role="user", content="hi"),
                trigger_response_enabled=False),
     {"type": "add-message", "message": {"role": "user", "content": "hi"},
      "triggerResponseEnabled": False}),
    *[(Control(control=command), {"type": "control", "control": command.value})
      for command in ControlCommand],
    (Transfer(destination=NumberDestination(number="+15550100199"), content="Transferring"),
     {"type": "transfer", "destination": {"type": "number", "number": "+15550100199"},
      "content": "Transferring"}),
    (Transfer(destination=SipDestination(sip_uri="sip:desk@example.com", message="hi")),
     {"type": "transfer",
      "destination": {"type": "sip", "sipUri": "sip:desk@example.com", "message": "hi"}}),
]


@pytest.mark.parametrize(("message", "wire"), CONTROL_GOLDEN, ids=lambda v: str(v)[:30])
def test_control_messages_serialise_as_documented(message: ClientMessage,
                                                  wire: dict[str, Any]) -> None:
    encoded = encode_message(message)
    assert json.loads(encoded) == wire
    assert msgspec.json.decode(encoded, type=ClientMessage) == message  # round trip


def test_control_values_are_the_documented_five() -> None:
    assert {c.value for c in ControlCommand} == {
        "mute-assistant", "unmute-assistant", "mute-customer", "unmute-customer",
        "say-first-message"}


# --- round trips and random input -----------------------------------------

text = st.text(max_size=20)
maybe_text = st.none() | text
turn_id = st.none() | text | st.integers(-(2**53), 2**53)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)

events = st.one_of(
    st.builds(SpeechUpdate, status=maybe_text, role=maybe_text,
              turn=st.none() | st.integers(0, 10**6)),
    st.builds(UserInterrupted, turn_id=turn_id),
    st.builds(Transcript, role=maybe_text, transcript_type=maybe_text, transcript=maybe_text),
    st.builds(ModelOutput, output=json_scalars, turn_id=turn_id),
    st.builds(StatusUpdate, status=maybe_text, ended_reason=maybe_text),
    st.builds(ConversationUpdate, messages=st.none() | st.lists(json_scalars, max_size=3)),
    st.just(AssistantStalled()),
    st.builds(EndOfCallReport, ended_reason=maybe_text,
              duration_seconds=st.none() | st.floats(0, 1e6)),
    st.builds(ToolCalls, tool_call_list=st.none() | st.lists(
        st.builds(ToolCall, id=maybe_text, name=maybe_text,
                  parameters=st.none() | st.dictionaries(text, json_scalars, max_size=3)),
        max_size=3)),
)


@given(events)
def test_events_round_trip(event: CallEvent) -> None:
    assert decode_event(msgspec.json.encode(event)) == event


def _decodes_or_codec_error(frame: bytes | str) -> None:
    try:
        result = decode_event(frame)
    except CallMessageError as error:
        assert error.kind in {"malformed-json", "not-an-object", "missing-type",
                              "invalid-field"}
    else:
        assert isinstance(result, (SpeechUpdate, UserInterrupted, Transcript, ModelOutput,
                                   StatusUpdate, ConversationUpdate, AssistantStalled,
                                   EndOfCallReport, ToolCalls, UnknownEvent))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_give_an_event_or_the_codec_error(frame: bytes) -> None:
    _decodes_or_codec_error(frame)


@settings(max_examples=300)
@given(json_values)
def test_random_json_gives_an_event_or_the_codec_error(value: Any) -> None:
    _decodes_or_codec_error(json.dumps(value))


KNOWN_TYPES = ["speech-update", "user-interrupted", "transcript", "model-output",
               "status-update", "conversation-update", "hang", "end-of-call-report",
               "tool-calls"]
FIELDS = ["status", "role", "turn", "turnId", "transcriptType", "transcript", "output",
          "endedReason", "messages", "durationSeconds", "toolCallList"]


@settings(max_examples=500)
@given(st.sampled_from(KNOWN_TYPES), st.dictionaries(st.sampled_from(FIELDS), json_values))
def test_known_types_with_random_fields_give_an_event_or_the_codec_error(
    event_type: str, fields: dict[str, Any]
) -> None:
    _decodes_or_codec_error(json.dumps({**fields, "type": event_type}))


@pytest.mark.parametrize(
    "frame", [b'"\xff"', b'{"type": "\xff"}', b'{"type":"transcript","x":"\xc3"}'])
def test_bad_utf8_inside_json_is_the_codecs_error(frame: bytes) -> None:
    # found by the property test: msgspec raises UnicodeDecodeError here
    with pytest.raises(CallMessageError):
        decode_event(frame)
