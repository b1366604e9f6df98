"""The per-stream state: ordering, violations, close, sequence and timestamp gaps, marks
(echoed by name only: the playout buffer owns mark bookkeeping)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.twilio.codec import ViolationKind
from gateway.twilio.stream import (
    FRAME_BYTES,
    Audio,
    CloseCode,
    CloseStream,
    Dtmf,
    MarkEcho,
    MediaStreamState,
    Started,
    Stopped,
    StreamEvent,
    StreamNotStartedError,
    Violation,
)

SID = "MZ0001"
FRAME = bytes([0x7F]) * FRAME_BYTES


class Twilio:
    """Builds frames the way Twilio numbers them: one sequence counter from start = 1."""

    def __init__(self, stream_sid: str = SID) -> None:
        self.stream_sid = stream_sid
        self.sequence = 0

    def _next(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    @staticmethod
    def connected() -> bytes:
        return b'{"event":"connected","protocol":"Call","version":"1.0.0"}'

    def start(self, **media_format: Any) -> bytes:
        fmt = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1, **media_format}
        return _json(
            {
                "event": "start",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": "AC1",
                    "streamSid": self.stream_sid,
                    "callSid": "CA1",
                    "tracks": ["inbound"],
                    "mediaFormat": fmt,
                    "customParameters": {"streamToken": "tok", "CallSid": "CA1"},
                },
            }
        )

    def media(self, timestamp: int, payload: bytes = FRAME, sequence: int | None = None) -> bytes:
        if sequence is not None:
            self.sequence = sequence - 1
        return _json(
            {
                "event": "media",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "media": {
                    "track": "inbound",
                    "chunk": "1",
                    "timestamp": str(timestamp),
                    "payload": base64.b64encode(payload).decode(),
                },
            }
        )

    def dtmf(self, digit: str) -> bytes:
        return self._simple("dtmf", {"track": "inbound_track", "digit": digit})

    def mark(self, name: str) -> bytes:
        return self._simple("mark", {"name": name})

    def stop(self) -> bytes:
        return self._simple("stop", {"accountSid": "AC1", "callSid": "CA1"})

    def _simple(self, event: str, body: dict[str, str]) -> bytes:
        return _json(
            {
                "event": event,
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                event: body,
            }
        )


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def started_state(**options: Any) -> tuple[MediaStreamState, Twilio]:
    state = MediaStreamState(**options)
    twilio = Twilio()
    assert state.receive_frame(twilio.connected()) is None
    assert isinstance(state.receive_frame(twilio.start()), Started)
    return state, twilio


def violation_kind(event: StreamEvent | None) -> ViolationKind:
    assert isinstance(event, Violation | CloseStream), event
    return event.kind


# -- the normal life of a stream -------------------------------------------------------


def test_a_whole_stream() -> None:
    state = MediaStreamState()
    twilio = Twilio()
    assert not state.started
    assert state.receive_frame(twilio.connected()) is None
    started = state.receive_frame(twilio.start())
    assert started == Started(
        call_sid="CA1",
        stream_sid=SID,
        account_sid="AC1",
        custom_parameters={"streamToken": "tok", "CallSid": "CA1"},
        tracks=("inbound",),
    )
    assert state.started
    assert state.stream_sid == SID
    assert state.call_sid == "CA1"
    assert state.receive_frame(twilio.media(0)) == Audio(FRAME, 0)
    assert state.receive_frame(twilio.media(20)) == Audio(FRAME, 20)
    assert state.receive_frame(twilio.dtmf("7")) == Dtmf("7")
    state.mark_frame("m1")
    assert state.receive_frame(twilio.mark("m1")) == MarkEcho("m1")
    assert state.receive_frame(twilio.stop()) == Stopped(SID)
    assert state.stopped
    stats = state.stats.as_dict()
    assert stats["violations"] == {}
    assert stats["sequence_gaps"] == 0
    assert stats["media_frames"] == 2
    assert stats["frames"] == 7


def test_start_without_connected_is_tolerated() -> None:
    state = MediaStreamState()
    assert isinstance(state.receive_frame(Twilio().start()), Started)
    assert not state.stats.violations


# -- ordering violations ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["media", "dtmf", "mark", "stop"])
def test_stream_messages_before_start(kind: str) -> None:
    state = MediaStreamState()
    twilio = Twilio()
    state.receive_frame(twilio.connected())
    frame = {
        "media": lambda: twilio.media(0),
        "dtmf": lambda: twilio.dtmf("1"),
        "mark": lambda: twilio.mark("x"),
        "stop": twilio.stop,
    }[kind]()
    assert violation_kind(state.receive_frame(frame)) is ViolationKind.BEFORE_START


def test_media_before_connected_is_before_start() -> None:
    state = MediaStreamState()
    assert violation_kind(state.receive_frame(Twilio().media(0))) is ViolationKind.BEFORE_START


def test_wrong_stream_sid() -> None:
    state, _ = started_state()
    other = Twilio("MZother")
    other.sequence = 1
    event = state.receive_frame(other.media(0))
    assert violation_kind(event) is ViolationKind.WRONG_STREAM_SID
    assert state.stats.media_frames == 0


def test_start_whose_inner_stream_sid_differs_is_refused() -> None:
    frame = json.loads(Twilio().start())
    frame["start"]["streamSid"] = "MZdifferent"
    state = MediaStreamState()
    assert violation_kind(state.receive_frame(_json(frame))) is ViolationKind.WRONG_STREAM_SID
    assert not state.started


def test_duplicate_start() -> None:
    state, twilio = started_state()
    assert violation_kind(state.receive_frame(twilio.start())) is ViolationKind.DUPLICATE_START
    assert state.stream_sid == SID


def test_repeated_connected() -> None:
    state = MediaStreamState()
    state.receive_frame(Twilio.connected())
    assert violation_kind(state.receive_frame(Twilio.connected())) is ViolationKind.OUT_OF_ORDER


def test_anything_after_stop() -> None:
    state, twilio = started_state()
    assert isinstance(state.receive_frame(twilio.stop()), Stopped)
    for frame in (twilio.media(0), twilio.start(), Twilio.connected(), twilio.stop()):
        assert violation_kind(state.receive_frame(frame)) is ViolationKind.AFTER_STOP
    assert state.stats.violations[ViolationKind.AFTER_STOP] == 4


def test_unknown_events_are_counted_not_violations() -> None:
    state, _ = started_state()
    assert state.receive_frame(b'{"event":"transcription","x":1}') is None
    assert state.receive_frame(b'{"event":"transcription"}') is None
    assert state.stats.unknown_events == {"transcription": 2}
    assert not state.stats.violations


def test_unknown_event_names_are_bounded() -> None:
    state, _ = started_state()
    for index in range(100):
        state.receive_frame(json.dumps({"event": f"new-{index}"}).encode())
    assert len(state.stats.unknown_events) == 17
    assert state.stats.unknown_events["(other)"] == 84
    assert sum(state.stats.unknown_events.values()) == 100


# -- violations lead to close ----------------------------------------------------------


def test_max_violations_closes_with_policy_violation() -> None:
    state, _ = started_state(max_violations=3)
    first = state.receive_frame(b"{bad")
    assert isinstance(first, Violation)
    assert (first.kind, first.total) == (ViolationKind.MALFORMED_JSON, 1)
    assert isinstance(state.receive_frame(b"[]"), Violation)
    close = state.receive_frame(b'{"event":"media"}')
    assert close == CloseStream(
        code=CloseCode.POLICY_VIOLATION,
        reason="too many protocol violations (last: missing-field)",
        kind=ViolationKind.MISSING_FIELD,
    )
    assert isinstance(close, CloseStream)
    assert close.code == 4008
    assert state.closing
    # Once closing, frames are ignored, good or bad.
    assert state.receive_frame(Twilio().media(0)) is None
    assert state.receive_frame(b"{bad") is None
    assert state.stats.ignored_after_close == 2
    assert state.stats.violations[ViolationKind.MALFORMED_JSON] == 1


@pytest.mark.parametrize(
    ("frame", "is_binary", "code"),
    [
        (b"\x00\x01", True, CloseCode.UNSUPPORTED_DATA),
        (b"{" + b" " * 100 + b"}", False, CloseCode.MESSAGE_TOO_BIG),
        (b"{bad", False, CloseCode.POLICY_VIOLATION),
    ],
)
def test_close_code_follows_the_last_violation(frame: bytes, is_binary: bool, code: int) -> None:
    state = MediaStreamState(max_violations=1, max_message_bytes=64)
    event = state.receive_frame(frame, is_binary)
    assert isinstance(event, CloseStream)
    assert event.code == code


def test_unsupported_media_format_closes_at_once() -> None:
    state = MediaStreamState(max_violations=None)
    state.receive_frame(Twilio.connected())
    event = state.receive_frame(Twilio().start(sampleRate=16000))
    assert isinstance(event, CloseStream)
    assert event.kind is ViolationKind.UNSUPPORTED_MEDIA_FORMAT
    assert event.code == CloseCode.UNSUPPORTED_DATA
    assert not state.started


def test_no_violation_limit() -> None:
    state, _ = started_state(max_violations=None)
    for _ in range(1000):
        assert isinstance(state.receive_frame(b"{bad"), Violation)


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        MediaStreamState(max_violations=0)
    with pytest.raises(ValueError):
        MediaStreamState(max_gap_frames=-1)


# -- sequence numbers ------------------------------------------------------------------


def test_sequence_gaps_and_regressions_are_counted() -> None:
    state, twilio = started_state()  # start was 1
    state.receive_frame(twilio.media(0, sequence=2))
    state.receive_frame(twilio.media(20, sequence=5))  # 3 and 4 missing
    state.receive_frame(twilio.media(40, sequence=9))  # 6, 7, 8 missing
    state.receive_frame(twilio.media(60, sequence=4))  # late / duplicate
    state.receive_frame(twilio.media(80, sequence=10))
    stats = state.stats
    assert (stats.sequence_gaps, stats.sequence_missing, stats.sequence_regressions) == (2, 5, 1)
    assert not stats.violations


def test_sequence_counts_across_message_kinds() -> None:
    state, twilio = started_state()
    state.receive_frame(twilio.media(0))
    state.receive_frame(twilio.dtmf("1"))
    state.mark_frame("a")
    state.receive_frame(twilio.mark("a"))
    state.receive_frame(twilio.stop())
    assert state.stats.sequence_gaps == 0


# -- media timestamps and gaps ---------------------------------------------------------


def gaps(
    state: MediaStreamState, twilio: Twilio, timestamps: list[int], size: int = 160
) -> list[tuple[int, int]]:
    found = []
    for timestamp in timestamps:
        event = state.receive_frame(twilio.media(timestamp, bytes(size)))
        assert isinstance(event, Audio)
        assert event.timestamp_ms == timestamp
        found.append((event.gap_ms, event.gap_frames))
    return found


def test_no_gaps_on_a_regular_stream() -> None:
    state, twilio = started_state()
    assert gaps(state, twilio, [0, 20, 40, 60, 80]) == [(0, 0)] * 5


def test_first_frame_sets_the_baseline() -> None:
    state, twilio = started_state()
    assert gaps(state, twilio, [4380, 4400]) == [(0, 0), (0, 0)]


def test_missing_frames_are_reported() -> None:
    state, twilio = started_state()
    assert gaps(state, twilio, [0, 20, 80, 100, 160]) == [
        (0, 0),
        (0, 0),
        (40, 2),
        (0, 0),
        (40, 2),
    ]
    assert (state.stats.gap_events, state.stats.gap_ms, state.stats.gap_frames) == (2, 80, 4)


def test_jitter_below_one_frame_is_not_a_gap_and_does_not_accumulate() -> None:
    state, twilio = started_state()
    # Timestamps wobble by a few ms around the 20 ms grid: no gap, ever.
    assert gaps(state, twilio, [0, 23, 38, 61, 79, 100, 124, 140]) == [(0, 0)] * 8


def test_a_lost_frame_hidden_by_jitter_is_reported_on_the_next_packet() -> None:
    state, twilio = started_state()
    # Frame at 40 lost; the one at 60 arrives stamped 57: 17 ms < one frame...
    # ...but the timeline is kept, so the next on-time frame shows the frame.
    assert gaps(state, twilio, [0, 20, 57, 80]) == [(0, 0), (0, 0), (0, 0), (20, 1)]


def test_half_frames_and_sub_frame_gaps() -> None:
    state, twilio = started_state()
    # 80-byte (10 ms) payloads; a 30 ms hole gives one whole frame plus 10 ms.
    assert gaps(state, twilio, [0, 10, 20, 60, 70], size=80) == [
        (0, 0),
        (0, 0),
        (0, 0),
        (30, 1),
        (0, 0),
    ]


def test_a_huge_gap_is_capped_and_the_timeline_resyncs() -> None:
    state, twilio = started_state(max_gap_frames=5)
    assert gaps(state, twilio, [0, 20, 10_020, 10_040]) == [
        (0, 0),
        (0, 0),
        (9980, 5),
        (0, 0),
    ]


def test_timestamps_going_back_far_resync() -> None:
    state, twilio = started_state()
    assert gaps(state, twilio, [5000, 5020, 0, 20, 60]) == [
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (20, 1),
    ]
    assert state.stats.timestamp_resyncs == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=60))
def test_gap_frames_account_for_every_lost_frame(losses: list[int]) -> None:
    """On a perfect 20 ms grid, the frames reported equal the frames dropped."""
    state, twilio = started_state(max_gap_frames=1000)
    timestamp = 0
    reported = 0
    for lost in losses:
        event = state.receive_frame(twilio.media(timestamp))
        assert isinstance(event, Audio)
        reported += event.gap_frames
        timestamp += (lost + 1) * 20
    assert reported == sum(losses[:-1])


# -- marks and clear -------------------------------------------------------------------


def test_mark_echoes_carry_just_the_name() -> None:
    """Whether an echo means "played" or "flushed by clear" is the playout buffer's
    call (its mark names carry the generation); the stream only passes names on."""
    state, twilio = started_state()
    state.mark_frame("g1-a")
    state.clear_frame()
    assert state.receive_frame(twilio.mark("g1-a")) == MarkEcho("g1-a")
    assert state.receive_frame(twilio.mark("never-sent")) == MarkEcho("never-sent")
    assert not state.stats.violations
    assert "unexpected_marks" not in state.stats.as_dict()


def test_outbound_frames() -> None:
    state, _ = started_state()
    assert json.loads(state.media_frame(FRAME)) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": base64.b64encode(FRAME).decode()},
    }
    assert json.loads(state.mark_frame("m"))["mark"] == {"name": "m"}
    assert json.loads(state.clear_frame()) == {"event": "clear", "streamSid": SID}


def test_outbound_frames_need_a_started_stream() -> None:
    state = MediaStreamState()
    for send in (
        lambda: state.media_frame(FRAME),
        lambda: state.mark_frame("m"),
        state.clear_frame,
    ):
        with pytest.raises(StreamNotStartedError):
            send()


# -- fuzzing the state: any sequence of frames gives events, never exceptions ----------

frames = st.one_of(
    st.sampled_from(
        [
            Twilio.connected(),
            Twilio().start(),
            Twilio().media(0),
            Twilio().media(20),
            Twilio().dtmf("1"),
            Twilio().mark("m"),
            Twilio().stop(),
            Twilio("MZother").media(40),
            b'{"event":"unknown"}',
            b"{bad",
        ]
    ),
    st.binary(max_size=50),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(frames, st.booleans()), max_size=30))
def test_fuzz_frame_sequences(sequence: list[tuple[bytes, bool]]) -> None:
    state = MediaStreamState(max_violations=5)
    for frame, is_binary in sequence:
        event = state.receive_frame(frame, is_binary)
        assert event is None or isinstance(
            event, Started | Audio | Dtmf | MarkEcho | Stopped | Violation | CloseStream
        )
    assert sum(state.stats.violations.values()) <= len(sequence)
