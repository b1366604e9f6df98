"""The Media Streams codec: every message kind, every kind of bad input, and fuzzing."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.twilio.codec import (
    ConnectedMessage,
    DtmfMessage,
    MarkMessage,
    MediaMessage,
    MediaStreamDecoder,
    MediaStreamProtocolError,
    OutboundEncoder,
    StartMessage,
    StopMessage,
    UnknownMessage,
    ViolationKind,
)

PAYLOAD = bytes(range(160))
PAYLOAD_B64 = base64.b64encode(PAYLOAD).decode()

# Shapes as Twilio sends them: media values and sequenceNumber are strings.
CONNECTED: dict[str, Any] = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
START: dict[str, Any] = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
    "start": {
        "accountSid": "AC123",
        "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
        "callSid": "CA123",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"streamToken": "abc", "From": "+15550001111"},
    },
}
MEDIA: dict[str, Any] = {
    "event": "media",
    "sequenceNumber": "4",
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
    "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": PAYLOAD_B64},
}
DTMF: dict[str, Any] = {
    "event": "dtmf",
    "sequenceNumber": "5",
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
    "dtmf": {"track": "inbound_track", "digit": "1"},
}
MARK: dict[str, Any] = {
    "event": "mark",
    "sequenceNumber": "6",
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
    "mark": {"name": "reply-1"},
}
STOP: dict[str, Any] = {
    "event": "stop",
    "sequenceNumber": "7",
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
    "stop": {"accountSid": "AC123", "callSid": "CA123"},
}
ALL_INBOUND = [CONNECTED, START, MEDIA, DTMF, MARK, STOP]

decoder = MediaStreamDecoder()


def encode(message: Any) -> bytes:
    return json.dumps(message).encode()


def with_field(message: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``message`` with the dotted ``path`` set (or removed if value is ...)."""
    copy: dict[str, Any] = json.loads(json.dumps(message))
    *parents, last = path.split(".")
    target = copy
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return copy


def violation_of(frame: bytes | str, is_binary: bool = False) -> ViolationKind:
    with pytest.raises(MediaStreamProtocolError) as info:
        decoder.decode(frame, is_binary)
    return info.value.kind


# -- every message kind ----------------------------------------------------------------


def test_connected() -> None:
    message = decoder.decode(encode(CONNECTED))
    assert message == ConnectedMessage(protocol="Call", version="1.0.0")


def test_start() -> None:
    message = decoder.decode(encode(START))
    assert isinstance(message, StartMessage)
    assert message.sequence_number == 1
    assert message.stream_sid == "MZ18ad3ab5a668481ce02b83e7395059f0"
    assert message.start.call_sid == "CA123"
    assert message.start.account_sid == "AC123"
    assert message.start.tracks == ("inbound",)
    assert message.start.media_format is not None
    assert message.start.media_format.sample_rate == 8000
    assert message.start.custom_parameters == {"streamToken": "abc", "From": "+15550001111"}


def test_media_payload_is_decoded_bytes_and_numbers_are_ints() -> None:
    message = decoder.decode(encode(MEDIA))
    assert isinstance(message, MediaMessage)
    assert message.sequence_number == 4
    assert message.media.payload == PAYLOAD
    assert message.media.timestamp == 5
    assert message.media.chunk == 2
    assert message.media.track == "inbound"


def test_dtmf_mark_stop() -> None:
    dtmf = decoder.decode(encode(DTMF))
    assert isinstance(dtmf, DtmfMessage)
    assert dtmf.dtmf.digit == "1"
    mark = decoder.decode(encode(MARK))
    assert isinstance(mark, MarkMessage)
    assert mark.mark.name == "reply-1"
    stop = decoder.decode(encode(STOP))
    assert isinstance(stop, StopMessage)
    assert stop.sequence_number == 7
    assert stop.stop.call_sid == "CA123"


def test_text_frames_may_be_str_or_bytes() -> None:
    assert decoder.decode(json.dumps(MEDIA)) == decoder.decode(encode(MEDIA))


@pytest.mark.parametrize("message", ALL_INBOUND, ids=lambda m: m["event"])
def test_every_inbound_kind_round_trips(message: dict[str, Any]) -> None:
    decoded = decoder.decode(encode(message))
    again = decoder.decode(msgspec.json.encode(decoded))
    assert again == decoded
    assert msgspec.json.decode(msgspec.json.encode(decoded))["event"] == message["event"]


def test_numbers_may_also_arrive_as_json_numbers() -> None:
    message = with_field(MEDIA, "sequenceNumber", 4)
    message = with_field(message, "media.timestamp", 5)
    assert decoder.decode(encode(message)) == decoder.decode(encode(MEDIA))


def test_extra_fields_are_ignored() -> None:
    message = with_field(MEDIA, "media.newThing", {"x": [1, 2]})
    message = with_field(message, "extra", "yes")
    assert decoder.decode(encode(message)) == decoder.decode(encode(MEDIA))


def test_optional_fields_may_be_missing() -> None:
    message = with_field(MEDIA, "media.chunk", ...)
    message = with_field(message, "media.track", ...)
    decoded = decoder.decode(encode(message))
    assert isinstance(decoded, MediaMessage)
    assert decoded.media.track == "inbound"
    stop = decoder.decode(encode(with_field(STOP, "stop", ...)))
    assert isinstance(stop, StopMessage)
    start = with_field(START, "start.mediaFormat", ...)
    start = with_field(start, "start.customParameters", ...)
    decoded_start = decoder.decode(encode(start))
    assert isinstance(decoded_start, StartMessage)
    assert decoded_start.start.custom_parameters == {}
    assert decoder.decode(b'{"event":"connected"}') == ConnectedMessage()


def test_unknown_events_decode_to_unknown() -> None:
    assert decoder.decode(b'{"event":"transcript","text":[1]}') == UnknownMessage("transcript")
    assert decoder.decode(b'{"event":""}') == UnknownMessage("")


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b"{bad", ViolationKind.MALFORMED_JSON),
        (b"", ViolationKind.MALFORMED_JSON),
        (b'{"event":"stop"} trailing', ViolationKind.MALFORMED_JSON),
        (b"\xff\xfe{}", ViolationKind.MALFORMED_JSON),
        (b"[]", ViolationKind.NOT_AN_OBJECT),
        (b'"media"', ViolationKind.NOT_AN_OBJECT),
        (b"42", ViolationKind.NOT_AN_OBJECT),
        (b"null", ViolationKind.NOT_AN_OBJECT),
        (b"{}", ViolationKind.MISSING_FIELD),
        (b'{"streamSid":"MZ"}', ViolationKind.MISSING_FIELD),
        (b'{"event":5}', ViolationKind.WRONG_TYPE),
        (b'{"event":null}', ViolationKind.WRONG_TYPE),
        (b'{"event":["media"]}', ViolationKind.WRONG_TYPE),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, ViolationKind.MALFORMED_JSON),
    ],
)
def test_malformed_frames(frame: bytes, kind: ViolationKind) -> None:
    assert violation_of(frame) is kind


@pytest.mark.parametrize(
    ("path", "value", "kind"),
    [
        ("media.payload", ..., ViolationKind.MISSING_FIELD),
        ("media.timestamp", ..., ViolationKind.MISSING_FIELD),
        ("media", ..., ViolationKind.MISSING_FIELD),
        ("streamSid", ..., ViolationKind.MISSING_FIELD),
        ("sequenceNumber", ..., ViolationKind.MISSING_FIELD),
        ("streamSid", 17, ViolationKind.WRONG_TYPE),
        ("streamSid", None, ViolationKind.WRONG_TYPE),
        ("media", "x", ViolationKind.WRONG_TYPE),
        ("media.payload", 12, ViolationKind.WRONG_TYPE),
        ("media.timestamp", "five", ViolationKind.WRONG_TYPE),
        ("media.timestamp", "4.5", ViolationKind.WRONG_TYPE),
        ("media.timestamp", "-20", ViolationKind.BAD_VALUE),
        ("sequenceNumber", "9" * 30, ViolationKind.BAD_VALUE),
        ("media.payload", "not base64!", ViolationKind.BAD_BASE64),
        ("media.payload", "AAE", ViolationKind.BAD_BASE64),
    ],
)
def test_bad_media_messages(path: str, value: Any, kind: ViolationKind) -> None:
    assert violation_of(encode(with_field(MEDIA, path, value))) is kind


@pytest.mark.parametrize(
    ("message", "path", "value", "kind"),
    [
        (START, "start.callSid", ..., ViolationKind.MISSING_FIELD),
        (START, "start.accountSid", ..., ViolationKind.MISSING_FIELD),
        (START, "start", ..., ViolationKind.MISSING_FIELD),
        (START, "start.customParameters", {"a": 1}, ViolationKind.WRONG_TYPE),
        (START, "start.mediaFormat.sampleRate", "fast", ViolationKind.WRONG_TYPE),
        (DTMF, "dtmf.digit", ..., ViolationKind.MISSING_FIELD),
        (DTMF, "dtmf.digit", 1, ViolationKind.WRONG_TYPE),
        (MARK, "mark.name", ..., ViolationKind.MISSING_FIELD),
        (STOP, "stop", [], ViolationKind.WRONG_TYPE),
    ],
)
def test_bad_other_messages(
    message: dict[str, Any], path: str, value: Any, kind: ViolationKind
) -> None:
    assert violation_of(encode(with_field(message, path, value))) is kind


def test_binary_frames_are_refused() -> None:
    assert violation_of(encode(MEDIA), is_binary=True) is ViolationKind.BINARY_FRAME


def test_oversized_frames_are_refused_before_parsing() -> None:
    small = MediaStreamDecoder(max_message_bytes=100)
    with pytest.raises(MediaStreamProtocolError) as info:
        small.decode(encode(MEDIA))
    assert info.value.kind is ViolationKind.OVERSIZED
    assert small.max_message_bytes == 100


def test_errors_never_echo_the_payload() -> None:
    secret_looking = "A" * 40 + "!!"
    with pytest.raises(MediaStreamProtocolError) as info:
        decoder.decode(encode(with_field(MEDIA, "media.payload", secret_looking)))
    assert secret_looking not in str(info.value)
    assert len(info.value.detail) <= 200


# -- fuzzing: a value or our own error, nothing else -----------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def decodes_or_raises_own_error(frame: bytes, is_binary: bool = False) -> None:
    try:
        result = decoder.decode(frame, is_binary)
    except MediaStreamProtocolError as error:
        assert isinstance(error.kind, ViolationKind)
        return
    assert isinstance(
        result,
        ConnectedMessage
        | StartMessage
        | MediaMessage
        | DtmfMessage
        | MarkMessage
        | StopMessage
        | UnknownMessage,
    )


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fuzz_random_json_values(value: Any) -> None:
    decodes_or_raises_own_error(json.dumps(value).encode())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_random_bytes(frame: bytes, is_binary: bool) -> None:
    decodes_or_raises_own_error(frame, is_binary)


def _paths(message: Any, prefix: str = "") -> list[str]:
    paths = []
    if isinstance(message, dict):
        for key, value in message.items():
            path = f"{prefix}{key}"
            paths.append(path)
            paths.extend(_paths(value, path + "."))
    return paths


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_messages(data: st.DataObject) -> None:
    message = data.draw(st.sampled_from(ALL_INBOUND))
    path = data.draw(st.sampled_from(_paths(message)))
    value = data.draw(json_values | st.just(...))
    decodes_or_raises_own_error(encode(with_field(message, path, value)))


# -- outbound --------------------------------------------------------------------------


def test_outbound_media() -> None:
    encoder = OutboundEncoder("MZabc")
    frame = encoder.media(PAYLOAD)
    assert json.loads(frame) == {
        "event": "media",
        "streamSid": "MZabc",
        "media": {"payload": PAYLOAD_B64},
    }
    assert encoder.media(memoryview(PAYLOAD)) == frame
    assert encoder.media(bytearray(PAYLOAD)) == frame
    assert json.loads(encoder.media(b""))["media"]["payload"] == ""


def test_outbound_mark_and_clear() -> None:
    encoder = OutboundEncoder("MZabc")
    assert json.loads(encoder.mark("reply-1")) == {
        "event": "mark",
        "streamSid": "MZabc",
        "mark": {"name": "reply-1"},
    }
    assert json.loads(encoder.clear()) == {"event": "clear", "streamSid": "MZabc"}


@settings(deadline=None)
@given(st.text(), st.text(), st.binary(max_size=400))
def test_outbound_frames_are_valid_json_for_any_strings(
    stream_sid: str, name: str, payload: bytes
) -> None:
    encoder = OutboundEncoder(stream_sid)
    media = json.loads(encoder.media(payload))
    assert media["streamSid"] == stream_sid
    assert base64.b64decode(media["media"]["payload"]) == payload
    assert json.loads(encoder.mark(name))["mark"]["name"] == name
    assert json.loads(encoder.clear())["streamSid"] == stream_sid


def test_bad_utf8_inside_json_is_the_codecs_error() -> None:
    # regression: msgspec raises UnicodeDecodeError for invalid UTF-8 in a JSON string
    with pytest.raises(MediaStreamProtocolError) as info:
        MediaStreamDecoder().decode(b'{"event": "\xff"}')
    assert info.value.kind is ViolationKind.MALFORMED_JSON
