"""Per-stream state of a Twilio Media Stream: ordering, counters, gaps, outbound frames.

Sans-io: :class:`MediaStreamState` consumes frames (or decoded messages) and
returns at most one :data:`StreamEvent` per frame for the call session; it never
touches a socket or a clock. The Autobahn protocol (:mod:`gateway.twilio.media`)
is a thin loop around it::

    def onMessage(self, payload, isBinary):
        event = self.stream.receive_frame(payload, isBinary)
        if type(event) is Audio:
            self.session.on_stream_audio(event)
        elif isinstance(event, CloseStream):
            self.sendClose(event.code, event.reason)
        ...

Order enforced: ``connected`` -> ``start`` -> ``media``/``dtmf``/``mark`` ->
``stop``. A ``start`` without a preceding ``connected`` is tolerated (the stream
is usable); a second ``connected``, anything stream-scoped before ``start``, a
duplicate ``start``, a ``streamSid`` other than the one in ``start`` and anything
after ``stop`` are violations. Each violation returns :class:`Violation`; the one
that reaches ``max_violations`` returns :class:`CloseStream` instead, as does a
fatal one (a ``mediaFormat`` other than mu-law/8000/mono) at once. After
:class:`CloseStream` every further frame is ignored (returns ``None``).

Close codes (:class:`CloseCode`): the application range (4000-4999) mirrors the
RFC 6455 codes (4008 <-> 1008 policy violation, 4003 <-> 1003 unsupported data,
4009 <-> 1009 message too big) because Autobahn's ``sendClose`` accepts only 1000
or 3000-4999. Twilio logs any server close as 31921 and continues with the TwiML
after ``</Connect>`` (the spoken fallback), so the code is for our logs.

Sequence numbers (one counter across all message kinds, ``start`` is 1): gaps
and regressions are counted, never violations. Media timestamps (ms since the
stream started) are compared with the audio received so far: when audio is
missing, :class:`Audio` says how much (``gap_ms``) and how many whole 20 ms
frames of mu-law silence (0xFF) to insert before its payload (``gap_frames``).
The first media frame sets the baseline and never reports a gap.

Marks: an echoed mark comes back as ``MarkEcho(name)`` and nothing more. Twilio
echoes every pending mark on ``clear`` exactly as if it had played; telling those
echoes apart is the playout buffer's job (:mod:`gateway.audio.playout` names its
marks by generation), so this module keeps no mark bookkeeping of its own.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Final, TypeAlias

import msgspec

from gateway.twilio.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConnectedMessage,
    DtmfMessage,
    InboundMessage,
    MarkMessage,
    MediaBody,
    MediaMessage,
    MediaStreamDecoder,
    MediaStreamProtocolError,
    OutboundEncoder,
    StartMessage,
    StopMessage,
    UnknownMessage,
    ViolationKind,
)

__all__ = [
    "FRAME_BYTES",
    "FRAME_MS",
    "SILENCE_BYTE",
    "Audio",
    "CloseCode",
    "CloseStream",
    "Dtmf",
    "MarkEcho",
    "MediaStreamState",
    "Started",
    "Stopped",
    "StreamEvent",
    "StreamNotStartedError",
    "StreamStats",
    "Violation",
]

SAMPLES_PER_MS: Final = 8
"""8 kHz mu-law: one byte per sample, eight per millisecond."""
FRAME_MS: Final = 20
FRAME_BYTES: Final = FRAME_MS * SAMPLES_PER_MS
SILENCE_BYTE: Final = 0xFF
"""Mu-law encoding of zero amplitude, for filling gaps."""

EXPECTED_ENCODING: Final = "audio/x-mulaw"
EXPECTED_SAMPLE_RATE: Final = 8000
EXPECTED_CHANNELS: Final = 1

_RESYNC_SAMPLES: Final = 1000 * SAMPLES_PER_MS
"""A timestamp this far behind the audio received means the timeline restarted."""
_MAX_UNKNOWN_EVENT_NAMES: Final = 16
_OTHER_UNKNOWN_EVENTS: Final = "(other)"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses on the Twilio socket."""

    NORMAL = 1000
    UNSUPPORTED_DATA = 4003
    POLICY_VIOLATION = 4008
    MESSAGE_TOO_BIG = 4009
    INTERNAL_ERROR = 4011


_CLOSE_CODE_BY_KIND: Final = {
    ViolationKind.BINARY_FRAME: CloseCode.UNSUPPORTED_DATA,
    ViolationKind.UNSUPPORTED_MEDIA_FORMAT: CloseCode.UNSUPPORTED_DATA,
    ViolationKind.OVERSIZED: CloseCode.MESSAGE_TOO_BIG,
}
_FATAL_KINDS: Final = frozenset({ViolationKind.UNSUPPORTED_MEDIA_FORMAT})


class Started(msgspec.Struct, frozen=True):
    """The stream has started; ``custom_parameters`` are the TwiML ``<Parameter>``s."""

    call_sid: str
    stream_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    tracks: tuple[str, ...]


class Audio(msgspec.Struct, frozen=True, gc=False):
    """Caller audio: raw mu-law, preceded by ``gap_frames`` frames of missing audio.

    ``gap_ms`` is the audio missing before this payload according to Twilio's
    timestamps; ``gap_frames`` is the number of whole 20 ms frames of silence to
    insert for it, capped at the state's ``max_gap_frames``.
    """

    payload: bytes
    timestamp_ms: int
    gap_ms: int = 0
    gap_frames: int = 0


class Dtmf(msgspec.Struct, frozen=True, gc=False):
    """The caller pressed a key."""

    digit: str


class MarkEcho(msgspec.Struct, frozen=True, gc=False):
    """Twilio echoed a mark: it played, or a ``clear`` flushed it (the playout
    buffer tells which, from the mark's name)."""

    name: str


class Stopped(msgspec.Struct, frozen=True, gc=False):
    """Twilio ended the stream; close the socket normally."""

    stream_sid: str


class Violation(msgspec.Struct, frozen=True, gc=False):
    """A frame was rejected; ``total`` counts every violation on this stream so far."""

    kind: ViolationKind
    detail: str
    total: int


class CloseStream(msgspec.Struct, frozen=True, gc=False):
    """Close the socket with ``code`` and ``reason``; ``kind`` is the last violation."""

    code: int
    reason: str
    kind: ViolationKind


StreamEvent: TypeAlias = Started | Audio | Dtmf | MarkEcho | Stopped | Violation | CloseStream


class StreamNotStartedError(RuntimeError):
    """An outbound frame was requested before ``start`` gave the stream SID."""


class StreamStats:
    """Counters for the end-of-call log line."""

    __slots__ = (
        "frames",
        "gap_events",
        "gap_frames",
        "gap_ms",
        "ignored_after_close",
        "media_frames",
        "sequence_gaps",
        "sequence_missing",
        "sequence_regressions",
        "timestamp_resyncs",
        "unknown_events",
        "violations",
    )

    def __init__(self) -> None:
        self.frames = 0
        self.media_frames = 0
        self.violations: Counter[ViolationKind] = Counter()
        self.unknown_events: Counter[str] = Counter()
        self.sequence_gaps = 0
        self.sequence_missing = 0
        self.sequence_regressions = 0
        self.gap_events = 0
        self.gap_ms = 0
        self.gap_frames = 0
        self.timestamp_resyncs = 0
        self.ignored_after_close = 0

    def as_dict(self) -> dict[str, object]:
        """A plain dict for structured logging."""
        return {
            "frames": self.frames,
            "media_frames": self.media_frames,
            "violations": {kind.value: count for kind, count in self.violations.items()},
            "unknown_events": dict(self.unknown_events),
            "sequence_gaps": self.sequence_gaps,
            "sequence_missing": self.sequence_missing,
            "sequence_regressions": self.sequence_regressions,
            "gap_events": self.gap_events,
            "gap_ms": self.gap_ms,
            "gap_frames": self.gap_frames,
            "timestamp_resyncs": self.timestamp_resyncs,
            "ignored_after_close": self.ignored_after_close,
        }


class _Phase(enum.Enum):
    AWAITING_CONNECTED = enum.auto()
    AWAITING_START = enum.auto()
    STREAMING = enum.auto()
    STOPPED = enum.auto()
    CLOSING = enum.auto()


class MediaStreamState:
    """The state of one Media Streams WebSocket, from ``connected`` to close."""

    def __init__(
        self,
        *,
        max_violations: int | None = 10,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_gap_frames: int = 100,
        decoder: MediaStreamDecoder | None = None,
    ) -> None:
        """
        :param max_violations: the violation that brings the total to this number
            returns :class:`CloseStream`; ``None`` never closes for violations
            (fatal ones still close).
        :param max_message_bytes: frame size limit (ignored if ``decoder`` is given).
        :param max_gap_frames: cap on ``Audio.gap_frames`` for one gap.
        """
        if max_violations is not None and max_violations < 1:
            raise ValueError("max_violations must be at least 1 (or None)")
        if max_gap_frames < 0:
            raise ValueError("max_gap_frames must not be negative")
        self._decoder = decoder or MediaStreamDecoder(max_message_bytes=max_message_bytes)
        self._max_violations = max_violations
        self._max_gap_frames = max_gap_frames
        self._phase = _Phase.AWAITING_CONNECTED
        self._stream_sid: str | None = None
        self._call_sid: str | None = None
        self._encoder: OutboundEncoder | None = None
        self._last_sequence = 0
        self._next_sample: int | None = None
        self._violation_total = 0
        self.stats: Final = StreamStats()

    # -- inspection ---------------------------------------------------------

    @property
    def stream_sid(self) -> str | None:
        """The stream SID from ``start``, or None before it."""
        return self._stream_sid

    @property
    def call_sid(self) -> str | None:
        """The call SID from ``start``, or None before it."""
        return self._call_sid

    @property
    def started(self) -> bool:
        """True from ``start`` on (also after ``stop``)."""
        return self._stream_sid is not None

    @property
    def stopped(self) -> bool:
        """True once Twilio sent ``stop``."""
        return self._phase is _Phase.STOPPED

    @property
    def closing(self) -> bool:
        """True once a :class:`CloseStream` was returned."""
        return self._phase is _Phase.CLOSING

    # -- inbound ------------------------------------------------------------

    def receive_frame(self, frame: bytes | str, is_binary: bool = False) -> StreamEvent | None:
        """Decode and process one WebSocket frame (Autobahn's ``onMessage`` arguments)."""
        if self._phase is _Phase.CLOSING:
            self.stats.ignored_after_close += 1
            return None
        try:
            message = self._decoder.decode(frame, is_binary)
        except MediaStreamProtocolError as error:
            self.stats.frames += 1
            return self._violation(error.kind, error.detail)
        return self.process(message)

    def process(self, message: InboundMessage | UnknownMessage) -> StreamEvent | None:
        """Process one decoded message; ``None`` means nothing for the session."""
        if self._phase is _Phase.CLOSING:
            self.stats.ignored_after_close += 1
            return None
        self.stats.frames += 1
        if isinstance(message, MediaMessage):  # the hot path first
            refusal = self._check_stream_message(message.stream_sid, "media")
            if refusal is not None:
                return refusal
            self.stats.media_frames += 1
            self._track_sequence(message.sequence_number)
            return self._audio(message.media)
        if isinstance(message, StartMessage):
            return self._start(message)
        if isinstance(message, DtmfMessage):
            refusal = self._check_stream_message(message.stream_sid, "dtmf")
            if refusal is not None:
                return refusal
            self._track_sequence(message.sequence_number)
            return Dtmf(digit=message.dtmf.digit)
        if isinstance(message, MarkMessage):
            refusal = self._check_stream_message(message.stream_sid, "mark")
            if refusal is not None:
                return refusal
            self._track_sequence(message.sequence_number)
            return MarkEcho(name=message.mark.name)
        if isinstance(message, StopMessage):
            refusal = self._check_stream_message(message.stream_sid, "stop")
            if refusal is not None:
                return refusal
            self._track_sequence(message.sequence_number)
            self._phase = _Phase.STOPPED
            return Stopped(stream_sid=message.stream_sid)
        if isinstance(message, ConnectedMessage):
            if self._phase is _Phase.AWAITING_CONNECTED:
                self._phase = _Phase.AWAITING_START
                return None
            if self._phase is _Phase.STOPPED:
                return self._violation(ViolationKind.AFTER_STOP, "connected after stop")
            return self._violation(ViolationKind.OUT_OF_ORDER, "repeated connected")
        self._count_unknown(message.event)
        return None

    # -- outbound -----------------------------------------------------------

    def media_frame(self, payload: bytes | bytearray | memoryview) -> bytes:
        """A ``media`` frame for this stream (raw mu-law, ideally whole 160-byte frames)."""
        return self._require_encoder().media(payload)

    def mark_frame(self, name: str) -> bytes:
        """A ``mark`` frame; its echo becomes :class:`MarkEcho`."""
        return self._require_encoder().mark(name)

    def clear_frame(self) -> bytes:
        """A ``clear`` frame: Twilio drops its buffered audio and echoes every pending mark."""
        return self._require_encoder().clear()

    # -- internals ----------------------------------------------------------

    def _require_encoder(self) -> OutboundEncoder:
        if self._encoder is None:
            raise StreamNotStartedError("no stream SID before the start message")
        return self._encoder

    def _check_stream_message(self, stream_sid: str, event: str) -> Violation | CloseStream | None:
        phase = self._phase
        if phase is _Phase.STREAMING:
            if stream_sid == self._stream_sid:
                return None
            return self._violation(ViolationKind.WRONG_STREAM_SID, f"{event} for another stream")
        if phase is _Phase.STOPPED:
            return self._violation(ViolationKind.AFTER_STOP, f"{event} after stop")
        return self._violation(ViolationKind.BEFORE_START, f"{event} before start")

    def _start(self, message: StartMessage) -> StreamEvent:
        phase = self._phase
        if phase is _Phase.STREAMING:
            return self._violation(ViolationKind.DUPLICATE_START, "second start")
        if phase is _Phase.STOPPED:
            return self._violation(ViolationKind.AFTER_STOP, "start after stop")
        body = message.start
        if body.stream_sid is not None and body.stream_sid != message.stream_sid:
            return self._violation(
                ViolationKind.WRONG_STREAM_SID, "start.streamSid differs from streamSid"
            )
        media_format = body.media_format
        if media_format is not None and (
            media_format.encoding != EXPECTED_ENCODING
            or media_format.sample_rate != EXPECTED_SAMPLE_RATE
            or media_format.channels != EXPECTED_CHANNELS
        ):
            return self._violation(
                ViolationKind.UNSUPPORTED_MEDIA_FORMAT,
                f"{media_format.encoding[:40]}/{media_format.sample_rate}/{media_format.channels}",
            )
        self._phase = _Phase.STREAMING
        self._stream_sid = message.stream_sid
        self._call_sid = body.call_sid
        self._encoder = OutboundEncoder(message.stream_sid)
        self._track_sequence(message.sequence_number)
        return Started(
            call_sid=body.call_sid,
            stream_sid=message.stream_sid,
            account_sid=body.account_sid,
            custom_parameters=body.custom_parameters,
            tracks=body.tracks,
        )

    def _track_sequence(self, sequence_number: int) -> None:
        last = self._last_sequence
        if sequence_number == last + 1:
            self._last_sequence = sequence_number
        elif sequence_number > last:
            self.stats.sequence_gaps += 1
            self.stats.sequence_missing += sequence_number - last - 1
            self._last_sequence = sequence_number
        else:
            self.stats.sequence_regressions += 1

    def _audio(self, media: MediaBody) -> Audio:
        payload = media.payload
        timestamp = media.timestamp
        at_sample = timestamp * SAMPLES_PER_MS
        next_sample = self._next_sample
        if next_sample is None:  # the first frame sets the baseline
            self._next_sample = at_sample + len(payload)
            return Audio(payload, timestamp)
        gap = at_sample - next_sample
        if gap < FRAME_BYTES:
            if gap < -_RESYNC_SAMPLES:
                self.stats.timestamp_resyncs += 1
                self._next_sample = at_sample + len(payload)
            else:
                self._next_sample = next_sample + len(payload)
            return Audio(payload, timestamp)
        frames = gap // FRAME_BYTES
        gap_ms = gap // SAMPLES_PER_MS
        stats = self.stats
        stats.gap_events += 1
        stats.gap_ms += gap_ms
        if frames > self._max_gap_frames:
            frames = self._max_gap_frames
            self._next_sample = at_sample + len(payload)
        else:
            self._next_sample = next_sample + frames * FRAME_BYTES + len(payload)
        stats.gap_frames += frames
        return Audio(payload, timestamp, gap_ms, frames)

    def _count_unknown(self, event: str) -> None:
        unknown = self.stats.unknown_events
        name = event[:64]
        if name in unknown or len(unknown) < _MAX_UNKNOWN_EVENT_NAMES:
            unknown[name] += 1
        else:
            unknown[_OTHER_UNKNOWN_EVENTS] += 1

    def _violation(self, kind: ViolationKind, detail: str) -> Violation | CloseStream:
        self.stats.violations[kind] += 1
        self._violation_total += 1
        total = self._violation_total
        if kind in _FATAL_KINDS:
            return self._close(kind, f"{kind.value}")
        if self._max_violations is not None and total >= self._max_violations:
            return self._close(kind, f"too many protocol violations (last: {kind.value})")
        return Violation(kind=kind, detail=detail, total=total)

    def _close(self, kind: ViolationKind, reason: str) -> CloseStream:
        self._phase = _Phase.CLOSING
        code = _CLOSE_CODE_BY_KIND.get(kind, CloseCode.POLICY_VIOLATION)
        return CloseStream(code=int(code), reason=reason, kind=kind)
