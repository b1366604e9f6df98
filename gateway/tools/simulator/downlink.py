"""What the gateway sends on the media socket, checked as strictly as Twilio checks it.

Twilio accepts three messages from the server, JSON text frames only::

    {"event":"media","streamSid":"MZ…","media":{"payload":"<base64 mu-law>"}}
    {"event":"mark","streamSid":"MZ…","mark":{"name":"…"}}
    {"event":"clear","streamSid":"MZ…"}

:class:`GatewayMessageChecker` decodes each frame (msgspec, one pass, base64
included) and returns the message when Twilio would act on it, after writing every
protocol violation into a :class:`ViolationLog`:

- binary frames, frames that are not JSON or not an object;
- any other ``event`` (Twilio's error 31924), a missing ``event``;
- missing or extra fields, wrong types, payloads that are not valid base64
  (Twilio's warnings 31950/31951);
- a missing or wrong ``streamSid``, or any message before ``start`` was sent (the
  gateway cannot know the stream SID yet);
- ``media`` payloads that are not whole 20 ms frames (not a multiple of 160
  bytes; Twilio plays them, but irregular chunks are heard as jitter), or empty.

Messages with a wrong or missing stream SID, or that do not decode, are not acted
on; media that is only oddly sized still plays.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Final, TypeAlias

import msgspec

from gateway.audio.playout import FRAME_BYTES
from gateway.tools.simulator.playout import MAX_SAMPLES

__all__ = [
    "GatewayClear",
    "GatewayMark",
    "GatewayMedia",
    "GatewayMessage",
    "GatewayMessageChecker",
    "ViolationKind",
    "ViolationLog",
    "ViolationSample",
]

_MAX_DETAIL_CHARS: Final = 120


class ViolationKind(enum.StrEnum):
    """What the gateway did wrong."""

    BINARY_FRAME = "binary-frame"
    MALFORMED_JSON = "malformed-json"
    NOT_AN_OBJECT = "not-an-object"
    UNKNOWN_EVENT = "unknown-event"
    MISSING_FIELD = "missing-field"
    UNEXPECTED_FIELD = "unexpected-field"
    WRONG_TYPE = "wrong-type"
    BAD_BASE64 = "bad-base64"
    MISSING_STREAM_SID = "missing-stream-sid"
    WRONG_STREAM_SID = "wrong-stream-sid"
    BEFORE_START = "before-start"
    PARTIAL_FRAME = "partial-frame"
    EMPTY_PAYLOAD = "empty-payload"
    BAD_TWIML = "bad-twiml"
    """Not on the socket: a ``<Connect><Stream>`` Twilio would refuse."""


class ViolationSample(msgspec.Struct, frozen=True):
    """One violation: when (ms after ``start``; None before it), what, and a short detail."""

    at_ms: float | None
    kind: str
    detail: str


class ViolationLog:
    """Every violation counted by kind; the first :data:`MAX_SAMPLES` kept with details."""

    __slots__ = ("by_kind", "samples")

    def __init__(self) -> None:
        self.by_kind: Counter[ViolationKind] = Counter()
        self.samples: list[ViolationSample] = []

    @property
    def total(self) -> int:
        """All violations so far."""
        return self.by_kind.total()

    def add(self, kind: ViolationKind, detail: str, at_ms: float | None) -> None:
        """Count one violation."""
        self.by_kind[kind] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(ViolationSample(at_ms, kind.value, detail[:_MAX_DETAIL_CHARS]))


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """Twilio's server messages: no field more, none less."""


class _MediaBody(_Strict, frozen=True):
    payload: bytes


class _MarkBody(_Strict, frozen=True):
    name: str


class _Event(_Strict, frozen=True, tag_field="event"):
    pass


class GatewayMedia(_Event, frozen=True, tag="media"):
    """Audio for the caller (``media.payload`` already base64-decoded)."""

    stream_sid: str
    media: _MediaBody


class GatewayMark(_Event, frozen=True, tag="mark"):
    """A mark to echo once the audio before it has played."""

    stream_sid: str
    mark: _MarkBody


class GatewayClear(_Event, frozen=True, tag="clear"):
    """Drop the queued audio and echo every pending mark."""

    stream_sid: str


GatewayMessage: TypeAlias = GatewayMedia | GatewayMark | GatewayClear


class _EventProbe(msgspec.Struct):
    event: object = None


class GatewayMessageChecker:
    """Decodes and checks the gateway's frames for one stream (see the module docstring)."""

    __slots__ = ("_decoder", "_probe", "started", "stream_sid", "violations")

    def __init__(self, stream_sid: str, violations: ViolationLog) -> None:
        self.stream_sid: Final = stream_sid
        self.violations: Final = violations
        self.started = False
        """Set once ``start`` has been sent."""
        self._decoder: msgspec.json.Decoder[GatewayMessage] = msgspec.json.Decoder(
            GatewayMessage
        )
        self._probe = msgspec.json.Decoder(_EventProbe)

    def check(self, frame: bytes, is_binary: bool, at_ms: float | None) -> GatewayMessage | None:
        """The message if Twilio would act on it; violations are logged either way."""
        if is_binary:
            self.violations.add(ViolationKind.BINARY_FRAME, f"{len(frame)} bytes", at_ms)
            return None
        try:
            message = self._decoder.decode(frame)
        except msgspec.ValidationError as error:
            self._invalid(frame, str(error), at_ms)
            return None
        except (msgspec.DecodeError, UnicodeDecodeError) as error:
            self.violations.add(ViolationKind.MALFORMED_JSON, str(error), at_ms)
            return None
        if not self.started:
            self.violations.add(ViolationKind.BEFORE_START, f"{_event(message)} before start",
                                at_ms)
            return None
        if message.stream_sid != self.stream_sid:
            self.violations.add(ViolationKind.WRONG_STREAM_SID,
                                f"{_event(message)} for {message.stream_sid[:40]!r}", at_ms)
            return None
        if type(message) is GatewayMedia:
            size = len(message.media.payload)
            if size % FRAME_BYTES:
                self.violations.add(ViolationKind.PARTIAL_FRAME,
                                    f"{size} bytes is not a multiple of {FRAME_BYTES}", at_ms)
            elif not size:
                self.violations.add(ViolationKind.EMPTY_PAYLOAD, "empty media payload", at_ms)
        return message

    def _invalid(self, frame: bytes, reason: str, at_ms: float | None) -> None:
        if reason.startswith("Invalid value") and "`$.event`" in reason:
            try:
                event = self._probe.decode(frame).event
            except msgspec.MsgspecError:
                event = "?"
            kind = ViolationKind.UNKNOWN_EVENT
            reason = f"event {str(event)[:40]!r} (only media, mark and clear are allowed)"
        elif reason.startswith("Object missing required field `streamSid`"):
            kind = ViolationKind.MISSING_STREAM_SID
        elif reason.startswith("Object missing required field"):
            kind = ViolationKind.MISSING_FIELD
        elif reason.startswith("Object contains unknown field"):
            kind = ViolationKind.UNEXPECTED_FIELD
        elif reason.startswith("Invalid base64"):
            kind = ViolationKind.BAD_BASE64
        elif reason.startswith("Expected `object`") and "$." not in reason:
            kind = ViolationKind.NOT_AN_OBJECT
        else:
            kind = ViolationKind.WRONG_TYPE
        self.violations.add(kind, reason, at_ms)


_EVENT_NAMES: Final[dict[type[GatewayMessage], str]] = {
    GatewayMedia: "media", GatewayMark: "mark", GatewayClear: "clear",
}


def _event(message: GatewayMessage) -> str:
    return _EVENT_NAMES[type(message)]
