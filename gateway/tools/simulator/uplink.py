"""The caller's side of the media stream, sans-io: what to send, and when.

- :class:`TwilioStreamMessages` builds the frames Twilio sends (``connected``,
  ``start``, ``media``, mark echoes, ``stop``) with one ``sequenceNumber`` counter
  across all of them, starting at ``"1"`` with ``start``.  The JSON around a media
  payload is a prebuilt bytes template: a media frame costs one ``%`` format.
- :class:`CallerTimeline` says which 20 ms frame the caller sends at each position:
  the caller clip from ``audio_at``, the interrupt clip from ``interrupt_at`` (it
  wins where they overlap), mu-law silence (0xFF) everywhere else.  Frames are
  handed out as precomputed base64 text.
- :class:`UplinkClock` is the absolute 20 ms send clock of one stream.  Frame ``k``
  is due at ``t0 + k * 20 ms``; the number of frames due is worked out from the
  integer-nanosecond time on every tick (never by counting ticks), so a late tick
  sends every frame it owes at once and the next tick is back on the grid, with no
  drift.  A tick up to :data:`EARLY_SLACK_NS` early counts as on time (reactor
  times are floats).  After a stall of more than ``max_catch_up_frames`` frames
  the oldest owed frames are skipped (and counted): Twilio's timestamps then jump,
  which the gateway must fill with silence.
"""

from __future__ import annotations

from typing import Final

import msgspec

from gateway.audio.playout import FRAME_NS
from gateway.tools.simulator.wav import SILENCE_FRAME_BASE64, CallerAudio

__all__ = [
    "EARLY_SLACK_NS",
    "FRAME_MS",
    "CallerTimeline",
    "TwilioStreamMessages",
    "UplinkClock",
]

FRAME_MS: Final = FRAME_NS // 1_000_000
"""One 20 ms frame (:data:`~gateway.audio.playout.FRAME_NS`), in milliseconds."""
EARLY_SLACK_NS: Final = 1_000_000
"""Times within 1 ms of a 20 ms boundary count as the boundary (float reactor time)."""

_encode = msgspec.json.encode


class TwilioStreamMessages:
    """The JSON text frames of one Twilio media stream, numbered as Twilio numbers them."""

    __slots__ = ("_account_sid", "_call_sid", "_media_template", "_sid", "_stop", "media_sent",
                 "sequence", "stream_sid")

    def __init__(self, *, stream_sid: str, call_sid: str, account_sid: str) -> None:
        self.stream_sid: Final = stream_sid
        self._call_sid = call_sid
        self._account_sid = account_sid
        self._sid = _encode(stream_sid)
        self.sequence = 0
        """The last ``sequenceNumber`` used (``start`` is 1)."""
        self.media_sent = 0
        """Media frames built so far (the last ``chunk``)."""
        self._media_template = (
            b'{"event":"media","sequenceNumber":"%d","streamSid":'
            + self._sid.replace(b"%", b"%%")
            + b',"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
        )
        self._stop = _encode({"accountSid": account_sid, "callSid": call_sid})

    @staticmethod
    def connected() -> bytes:
        """The first message: it carries no stream SID and no sequence number."""
        return b'{"event":"connected","protocol":"Call","version":"1.0.0"}'

    def start(self, custom_parameters: dict[str, str]) -> bytes:
        """``start`` (sequence 1): one inbound mu-law 8000 Hz mono track."""
        self.sequence += 1
        return _encode({
            "event": "start",
            "sequenceNumber": str(self.sequence),
            "streamSid": self.stream_sid,
            "start": {
                "accountSid": self._account_sid,
                "streamSid": self.stream_sid,
                "callSid": self._call_sid,
                "tracks": ["inbound"],
                "customParameters": custom_parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        })

    def media(self, timestamp_ms: int, payload_base64: bytes) -> bytes:
        """A ``media`` frame; ``payload_base64`` is already base64 text."""
        self.sequence += 1
        self.media_sent += 1
        return self._media_template % (
            self.sequence, self.media_sent, timestamp_ms, payload_base64
        )

    def mark(self, name: str) -> bytes:
        """The echo of a mark the gateway sent."""
        self.sequence += 1
        return b"".join((
            b'{"event":"mark","sequenceNumber":"%d","streamSid":' % self.sequence,
            self._sid, b',"mark":{"name":', _encode(name), b"}}",
        ))

    def stop(self) -> bytes:
        """``stop``: the caller hung up (Twilio gives no reason)."""
        self.sequence += 1
        return b"".join((
            b'{"event":"stop","sequenceNumber":"%d","streamSid":' % self.sequence,
            self._sid, b',"stop":', self._stop, b"}",
        ))


class CallerTimeline:
    """Which frame the caller sends at each 20 ms position of the stream."""

    __slots__ = ("_audio", "_audio_at", "_interrupt", "_interrupt_at")

    def __init__(self, audio: CallerAudio | None = None, *, audio_at_ms: int = 0,
                 interrupt: CallerAudio | None = None,
                 interrupt_at_ms: int | None = None) -> None:
        self._audio = audio.encoded_frames if audio is not None else ()
        self._audio_at = audio_at_ms // FRAME_MS
        self._interrupt = interrupt.encoded_frames if interrupt is not None else ()
        self._interrupt_at = interrupt_at_ms // FRAME_MS if interrupt_at_ms is not None else 0

    def frame(self, index: int) -> tuple[bytes, bool]:
        """The base64 payload of frame ``index`` and whether it is caller speech."""
        position = index - self._interrupt_at
        if 0 <= position < len(self._interrupt):
            return self._interrupt[position], True
        position = index - self._audio_at
        if 0 <= position < len(self._audio):
            return self._audio[position], True
        return SILENCE_FRAME_BASE64, False


class UplinkClock:
    """The absolute 20 ms send clock of one stream (see the module docstring)."""

    __slots__ = ("max_catch_up_frames", "next_frame", "skipped_frames", "t0_ns")

    def __init__(self, t0_ns: int, *, max_catch_up_frames: int = 50) -> None:
        if max_catch_up_frames < 1:
            raise ValueError("max_catch_up_frames must be at least 1")
        self.t0_ns: Final = t0_ns
        self.max_catch_up_frames: Final = max_catch_up_frames
        self.next_frame = 0
        """Index of the next frame to send."""
        self.skipped_frames = 0
        """Frames never sent because a stall owed more than ``max_catch_up_frames``."""

    def frames_due(self, now_ns: int, *, limit: int | None = None) -> range:
        """The indexes of the frames to send now (and marks them sent).

        :param limit: never hand out frames from this index on (the end of the call).
        """
        due = (now_ns - self.t0_ns + EARLY_SLACK_NS) // FRAME_NS + 1
        if limit is not None and due > limit:
            due = limit
        first = self.next_frame
        if due <= first:
            return range(0)
        if due - first > self.max_catch_up_frames:
            self.skipped_frames += due - first - self.max_catch_up_frames
            first = due - self.max_catch_up_frames
        self.next_frame = due
        return range(first, due)
