"""Load-test probes of the simulator (``--bench-probe``, used by ``make bench``).

With a :class:`BenchProbe` on the run's :class:`~gateway.tools.simulator.call.MediaClock`:

- every uplink ``media`` frame carries a **tag** instead of the caller clip: 4 magic
  bytes, then three 8-byte big-endian wall-clock times in nanoseconds -- when the
  simulator sent the frame, and two slots (zero here) for a cooperating assistant to
  fill in when it received the frame and when it sent it back (``bench/load_assistant.py``
  does, for its ``echo`` script); the rest of the 160 bytes is mu-law silence;
- every downlink ``media`` payload that starts with the tag is an echo of one of those
  frames: the time from sending it to receiving its echo, less the time the assistant
  held it (its echo delay), is the latency the gateway added on the way there and back
  (two passes through the gateway, loopback TCP, the assistant's and the simulator's
  reading).  It is measured where Twilio's queue begins, so Twilio's playout (the
  gateway's playout lead) is not part of it.  Samples go into 0.1 ms histograms;
- every ``clear`` is kept with the call's ``t0`` and the 20 ms slots that played audio in
  the two seconds before it, so the driver can tell, given when the assistant signalled
  barge-in, how long the caller kept hearing the assistant (and the reaction time).

All times are wall-clock (``reactor.seconds()``), comparable across processes on one
machine.
"""

from __future__ import annotations

import binascii
from collections import Counter
from collections.abc import Iterable
from typing import Any, Final

from gateway.audio.mulaw import MULAW_SILENCE
from gateway.audio.playout import FRAME_BYTES

__all__ = ["SLOT_HISTORY", "TAG_MAGIC", "BenchProbe", "ClearRecord"]

TAG_MAGIC: Final = b"\xa5VGT"
"""The first 4 bytes of a tagged frame."""
_TAG_BYTES: Final = 4 + 3 * 8
_BUCKET_NS: Final = 100_000
"""Histogram resolution: 0.1 ms."""
SLOT_HISTORY: Final = 100
"""Audio slots kept for each ``clear`` (2 s)."""


class ClearRecord:
    """One ``clear`` a call received: when, and the audio slots played before it."""

    __slots__ = ("at_ns", "audio_slots", "call_sid", "t0_ns")

    def __init__(self, call_sid: str, t0_ns: int, at_ns: int, audio_slots: list[int]) -> None:
        self.call_sid = call_sid
        self.t0_ns = t0_ns
        self.at_ns = at_ns
        self.audio_slots = audio_slots

    def as_dict(self) -> dict[str, Any]:
        return {"call_sid": self.call_sid, "t0_ns": self.t0_ns, "at_ns": self.at_ns,
                "audio_slots": self.audio_slots}


class BenchProbe:
    """Tags the uplink, times the echoes, keeps the clears (see the module docstring)."""

    def __init__(self) -> None:
        self._frame = bytearray(bytes([MULAW_SILENCE]) * FRAME_BYTES)
        self._frame[:4] = TAG_MAGIC
        self.round_trip: Counter[int] = Counter()
        """Gateway-added latency, there and back (0.1 ms buckets)."""
        self.uplink: Counter[int] = Counter()
        """Simulator send to assistant receipt (0.1 ms buckets)."""
        self.downlink: Counter[int] = Counter()
        """Assistant send to simulator receipt (0.1 ms buckets)."""
        self.held: Counter[int] = Counter()
        """Assistant receipt to assistant send: its echo delay and its own lateness."""
        self.untagged_media = 0
        self.clears: list[ClearRecord] = []

    # -- uplink ----------------------------------------------------------------------------

    def uplink_payload(self, now_ns: int) -> bytes:
        """The base64 text of a tagged frame sent at ``now_ns``."""
        frame = self._frame
        frame[4:12] = now_ns.to_bytes(8, "big")
        return binascii.b2a_base64(frame, newline=False)

    # -- downlink --------------------------------------------------------------------------

    def downlink_payload(self, payload: bytes, now_ns: int) -> None:
        """A ``media`` payload from the gateway (one or more frames), received at ``now_ns``."""
        for at in range(0, len(payload) - _TAG_BYTES + 1, FRAME_BYTES):
            if payload[at : at + 4] != TAG_MAGIC:
                self.untagged_media += 1
                continue
            sent = int.from_bytes(payload[at + 4 : at + 12], "big")
            received = int.from_bytes(payload[at + 12 : at + 20], "big")
            returned = int.from_bytes(payload[at + 20 : at + 28], "big")
            if not received or not returned:
                self.untagged_media += 1
                continue
            up = received - sent
            down = now_ns - returned
            self.uplink[up // _BUCKET_NS] += 1
            self.downlink[down // _BUCKET_NS] += 1
            self.round_trip[(up + down) // _BUCKET_NS] += 1
            self.held[(returned - received) // _BUCKET_NS] += 1

    def clear(self, call_sid: str, t0_ns: int, now_ns: int, audio_slots: Iterable[int]) -> None:
        """A call received ``clear`` at ``now_ns``."""
        self.clears.append(ClearRecord(call_sid, t0_ns, now_ns, list(audio_slots)))

    # -- the result ------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: histograms as {bucket of 0.1 ms: count} and the clears."""
        return {
            "bucket_ms": _BUCKET_NS / 1_000_000,
            "round_trip": {str(k): v for k, v in sorted(self.round_trip.items())},
            "uplink": {str(k): v for k, v in sorted(self.uplink.items())},
            "downlink": {str(k): v for k, v in sorted(self.downlink.items())},
            "held": {str(k): v for k, v in sorted(self.held.items())},
            "untagged_media": self.untagged_media,
            "clears": [record.as_dict() for record in self.clears],
        }

