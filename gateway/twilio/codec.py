"""Twilio Media Streams wire codec: JSON text frames to typed messages and back.

Sans-io: nothing here touches a socket, a reactor or a clock. The Autobahn
protocol (phase 2) hands every frame to :meth:`MediaStreamDecoder.decode` (or to
:class:`gateway.twilio.stream.MediaStreamState`, which wraps it) and writes the
bytes produced by :class:`OutboundEncoder`.

Inbound messages (``connected``, ``start``, ``media``, ``dtmf``, ``mark``,
``stop``) decode to frozen :mod:`msgspec` structs, a tagged union on ``"event"``.
The ``media`` path is the hot one (about 50 frames a second per call): msgspec
parses the JSON, converts the numeric strings and decodes the base64 payload to
``bytes`` in a single pass of C code.

Field rules (Twilio sends every ``media`` value and ``sequenceNumber`` as a
string; ``sampleRate`` and ``channels`` as numbers):

- integer fields accept the string form Twilio sends (``"4"``) and a JSON number;
  they must be ``0 <= n <= 2**53``;
- fields the gateway uses are required: a message without them is a
  ``missing-field`` violation; fields it does not use (``chunk``, ``track``,
  ``tracks``, ``mediaFormat``, the ``stop`` body, ``connected``'s
  ``protocol``/``version``) are optional;
- extra fields are ignored, and so are unknown events (Twilio adds events): they
  decode to :class:`UnknownMessage` so the caller can count them.

Every other bad input raises :class:`MediaStreamProtocolError`, whose
:attr:`~MediaStreamProtocolError.kind` says what was wrong; no other exception
escapes :meth:`MediaStreamDecoder.decode`.
"""

from __future__ import annotations

import binascii
import enum
from typing import Annotated, Final, TypeAlias

import msgspec

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ConnectedMessage",
    "DtmfBody",
    "DtmfMessage",
    "InboundMessage",
    "MarkBody",
    "MarkMessage",
    "MediaBody",
    "MediaFormat",
    "MediaMessage",
    "MediaStreamDecoder",
    "MediaStreamProtocolError",
    "OutboundEncoder",
    "StartBody",
    "StartMessage",
    "StopBody",
    "StopMessage",
    "UnknownMessage",
    "ViolationKind",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest inbound frame accepted. A 20 ms media frame is about 400 bytes; a
``start`` with several ``<Parameter>``s (each under 500 characters) a few KiB."""

_MAX_WIRE_INT: Final = 2**53

WireInt: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=_MAX_WIRE_INT)]
"""A non-negative integer that Twilio may send as a JSON string."""


class ViolationKind(enum.StrEnum):
    """What was wrong with an inbound frame or with the order of messages.

    The first group is raised by the codec; the second is detected by the
    per-stream state (:mod:`gateway.twilio.stream`).
    """

    # Codec (one frame on its own).
    BINARY_FRAME = "binary-frame"
    OVERSIZED = "oversized"
    MALFORMED_JSON = "malformed-json"
    NOT_AN_OBJECT = "not-an-object"
    MISSING_FIELD = "missing-field"
    WRONG_TYPE = "wrong-type"
    BAD_VALUE = "bad-value"
    BAD_BASE64 = "bad-base64"
    # Stream state (a frame in its context).
    BEFORE_START = "before-start"
    OUT_OF_ORDER = "out-of-order"
    DUPLICATE_START = "duplicate-start"
    WRONG_STREAM_SID = "wrong-stream-sid"
    AFTER_STOP = "after-stop"
    UNSUPPORTED_MEDIA_FORMAT = "unsupported-media-format"


class MediaStreamProtocolError(Exception):
    """An inbound frame the codec cannot turn into a message.

    ``detail`` is a short, log-safe description (it never echoes the payload).
    """

    def __init__(self, kind: ViolationKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind: Final = kind
        self.detail: Final = detail


class _WireStruct(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=False):
    """Base of every wire struct: immutable, snake_case attributes, camelCase keys."""


class _EventStruct(_WireStruct, frozen=True, tag_field="event"):
    """Base of the inbound messages: tagged by the ``event`` key."""


class ConnectedMessage(_EventStruct, frozen=True, tag="connected"):
    """First message on the socket; it carries no stream SID or sequence number."""

    protocol: str = ""
    version: str = ""


class MediaFormat(_WireStruct, frozen=True):
    """``start.mediaFormat``: always mu-law, 8000 Hz, mono according to Twilio."""

    encoding: str
    sample_rate: WireInt
    channels: WireInt


class StartBody(_WireStruct, frozen=True):
    """The ``start`` object of a ``start`` message."""

    account_sid: str
    call_sid: str
    stream_sid: str | None = None
    tracks: tuple[str, ...] = ()
    media_format: MediaFormat | None = None
    custom_parameters: dict[str, str] = msgspec.field(default_factory=dict)


class StartMessage(_EventStruct, frozen=True, tag="start"):
    """Stream metadata, sent once after ``connected``."""

    sequence_number: WireInt
    stream_sid: str
    start: StartBody


class MediaBody(_WireStruct, frozen=True):
    """The ``media`` object: ``payload`` is already base64-decoded raw mu-law."""

    payload: bytes
    timestamp: WireInt
    chunk: WireInt = 0
    track: str = "inbound"


class MediaMessage(_EventStruct, frozen=True, tag="media"):
    """A chunk of caller audio (160 bytes = 20 ms in practice)."""

    sequence_number: WireInt
    stream_sid: str
    media: MediaBody


class DtmfBody(_WireStruct, frozen=True):
    """The ``dtmf`` object."""

    digit: str
    track: str = "inbound_track"


class DtmfMessage(_EventStruct, frozen=True, tag="dtmf"):
    """A key the caller pressed (bidirectional streams only)."""

    sequence_number: WireInt
    stream_sid: str
    dtmf: DtmfBody


class MarkBody(_WireStruct, frozen=True):
    """The ``mark`` object."""

    name: str


class MarkMessage(_EventStruct, frozen=True, tag="mark"):
    """Echo of a mark the gateway sent (played, or flushed by ``clear``)."""

    sequence_number: WireInt
    stream_sid: str
    mark: MarkBody


class StopBody(_WireStruct, frozen=True):
    """The ``stop`` object; Twilio gives no reason."""

    account_sid: str = ""
    call_sid: str = ""


class StopMessage(_EventStruct, frozen=True, tag="stop"):
    """The stream has ended."""

    sequence_number: WireInt
    stream_sid: str
    stop: StopBody = msgspec.field(default_factory=StopBody)


class UnknownMessage(msgspec.Struct, frozen=True):
    """A well-formed message whose ``event`` the codec does not know; ignore it."""

    event: str


InboundMessage: TypeAlias = (
    ConnectedMessage | StartMessage | MediaMessage | DtmfMessage | MarkMessage | StopMessage
)

KNOWN_EVENTS: Final = frozenset({"connected", "start", "media", "dtmf", "mark", "stop"})


class _EventProbe(msgspec.Struct):
    """Only the ``event`` key: used to explain why a frame failed to decode."""

    event: str


class MediaStreamDecoder:
    """Decodes inbound Media Streams frames. Stateless apart from its settings."""

    __slots__ = ("_decoder", "_max_message_bytes", "_probe")

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self._max_message_bytes = max_message_bytes
        # strict=False lets integer fields accept Twilio's numeric strings.
        self._decoder: msgspec.json.Decoder[InboundMessage] = msgspec.json.Decoder(
            InboundMessage, strict=False
        )
        self._probe = msgspec.json.Decoder(_EventProbe)

    @property
    def max_message_bytes(self) -> int:
        """The frame size limit; give the same value to Autobahn's maxMessagePayloadSize."""
        return self._max_message_bytes

    def decode(
        self, frame: bytes | str, is_binary: bool = False
    ) -> InboundMessage | UnknownMessage:
        """Decode one WebSocket frame.

        :param frame: the payload as Autobahn delivers it (``bytes``; UTF-8 text).
        :param is_binary: Autobahn's ``isBinary``: Twilio only sends text frames.
        :raises MediaStreamProtocolError: for anything that is not a valid message.
        """
        if is_binary:
            raise MediaStreamProtocolError(ViolationKind.BINARY_FRAME, "binary frame")
        if len(frame) > self._max_message_bytes:
            raise MediaStreamProtocolError(
                ViolationKind.OVERSIZED,
                f"{len(frame)} bytes > limit {self._max_message_bytes}",
            )
        try:
            return self._decoder.decode(frame)
        except msgspec.ValidationError as error:
            return self._explain(frame, error)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
            raise MediaStreamProtocolError(
                ViolationKind.MALFORMED_JSON, _first_line(error)
            ) from None

    def _explain(self, frame: bytes | str, error: msgspec.ValidationError) -> UnknownMessage:
        """Turn a validation failure into an UnknownMessage or a classified error."""
        try:
            probe = self._probe.decode(frame)
        except msgspec.ValidationError as probe_error:
            text = str(probe_error)
            if text.startswith("Expected `object`"):
                kind = ViolationKind.NOT_AN_OBJECT
            elif text.startswith("Object missing required field"):
                kind = ViolationKind.MISSING_FIELD
            else:
                kind = ViolationKind.WRONG_TYPE
            raise MediaStreamProtocolError(kind, _first_line(probe_error)) from None
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as probe_error:
            raise MediaStreamProtocolError(
                ViolationKind.MALFORMED_JSON, _first_line(probe_error)
            ) from None
        if probe.event not in KNOWN_EVENTS:
            return UnknownMessage(event=probe.event)
        raise MediaStreamProtocolError(
            _classify(str(error)), f"{probe.event}: {_first_line(error)}"
        ) from None


def _classify(message: str) -> ViolationKind:
    """Map a msgspec ValidationError message to a violation kind."""
    if message.startswith("Object missing required field"):
        return ViolationKind.MISSING_FIELD
    if message.startswith("Invalid base64"):
        return ViolationKind.BAD_BASE64
    if message.startswith("Integer value out of range") or " >= " in message or " <= " in message:
        return ViolationKind.BAD_VALUE
    return ViolationKind.WRONG_TYPE


def _first_line(error: BaseException) -> str:
    """A bounded, single-line description of a decoding error for the log."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


_json_encode = msgspec.json.encode
_b64encode = binascii.b2a_base64


class OutboundEncoder:
    """Builds the frames the gateway sends to Twilio for one stream.

    The JSON around the payload is prepared once per stream, so a media frame
    costs one base64 encoding and one join.
    """

    __slots__ = ("_clear", "_mark_prefix", "_media_prefix", "stream_sid")

    _MEDIA_SUFFIX: Final = b'"}}'
    _MARK_SUFFIX: Final = b"}}"

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid: Final = stream_sid
        sid = _json_encode(stream_sid)
        self._media_prefix = b'{"event":"media","streamSid":' + sid + b',"media":{"payload":"'
        self._mark_prefix = b'{"event":"mark","streamSid":' + sid + b',"mark":{"name":'
        self._clear = b'{"event":"clear","streamSid":' + sid + b"}"

    def media(self, payload: bytes | bytearray | memoryview) -> bytes:
        """A ``media`` frame carrying raw mu-law (prefer multiples of 160 bytes)."""
        return b"".join(
            (self._media_prefix, _b64encode(payload, newline=False), self._MEDIA_SUFFIX)
        )

    def mark(self, name: str) -> bytes:
        """A ``mark`` frame; Twilio echoes it when the audio queued before it has played."""
        return b"".join((self._mark_prefix, _json_encode(name), self._MARK_SUFFIX))

    def clear(self) -> bytes:
        """A ``clear`` frame: drops Twilio's buffered audio and echoes every pending mark."""
        return self._clear
