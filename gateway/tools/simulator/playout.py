"""Twilio's playout of the gateway's audio, modelled sans-io, and what the caller hears.

Twilio queues every ``media`` payload the gateway sends and plays the queue, in
order, at exactly 8000 bytes a second, in 20 ms frames (RTP's packet time).
:class:`TwilioPlayout` models that on a grid of 20 ms **slots** anchored at ``t0``
(the moment the simulator sent ``start``): slot ``k`` plays from
``t0 + k * 20 ms`` for 20 ms.

Rules (time is integer nanoseconds, always passed in; nothing here reads a clock):

- A slot plays the next 160 bytes of the queue, or what is left of it padded with
  silence, or silence when the queue is empty.  Its content is fixed at its start:
  audio that arrives later waits for the next slot.  (Arrivals within
  :data:`~gateway.tools.simulator.uplink.EARLY_SLACK_NS` after a slot's start still
  make it, so that events at the same instant give the same result in any order.)
- A ``mark`` is echoed when the audio queued before it has finished playing, that
  is at the end of the slot that played its last byte, or at once when everything
  queued before it has already played.  Echoes are handed back by whichever input
  first sees them due: the 20 ms tick (:meth:`TwilioPlayout.advance`), or the
  arrival of the next message.
- ``clear`` drops everything not yet played (the slot already playing finishes) and
  echoes every pending mark at once.

What it measures:

- **first audio**: the first ``media`` received, the first slot that played audio,
  the first slot whose peak reaches ``audible_peak`` (speech, not near-silence);
- **utterances and gaps**: a *dry run* is a run of silent slots after a slot that
  played audio, ended by a slot that plays audio again.  A dry run after a
  ``clear`` (the gateway cut the assistant off on purpose) starts a new utterance;
  so does one of at least ``utterance_gap_ms`` (default 300 ms: the pause between
  two answers).  Every other dry run is a **gap**: an audible hole in the middle of
  an utterance (the gateway let Twilio's queue run dry).  Silence after the last
  audio is the end of speech, not a gap.  Gaps are whole slots (20 ms each);
- **barge-in** (when the scenario interrupts at ``interrupt_at_ms``, rounded down
  to a slot): whether audio was playing in that slot, the assistant audio played
  from it until the first silent slot or ``clear``, and the time from the slot's
  start to the first ``clear``;
- every **clear**: when, how much queued audio it dropped, the marks it flushed,
  and how long after the last ``media`` it came.  When the interruption is not the
  simulator's (e.g. the local assistant's scripted ``interrupt``, which stops its own
  audio and signals barge-in), its start is unknown here: then these figures are the
  measurement (``dropped_ms`` is what the caller was spared, ``since_last_media_ms``
  how long the gateway took from the assistant's last audio to the ``clear``);
- **recording** (optional): every slot as the caller hears it, silence included,
  from ``t0`` to the end of the call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

import msgspec
import numpy as np

from gateway.audio import mulaw
from gateway.audio.playout import FRAME_BYTES, FRAME_NS
from gateway.tools.simulator.uplink import EARLY_SLACK_NS, FRAME_MS

__all__ = [
    "DEFAULT_AUDIBLE_PEAK",
    "DEFAULT_UTTERANCE_GAP_MS",
    "MAX_SAMPLES",
    "ClearSample",
    "GapSample",
    "TwilioPlayout",
    "ns_to_ms",
]

DEFAULT_UTTERANCE_GAP_MS: Final = 300
DEFAULT_AUDIBLE_PEAK: Final = 500
"""Peak sample (of 32767) from which a frame counts as audible: about -36 dBFS."""
MAX_SAMPLES: Final = 20
"""Gaps and clears are all counted; only the first this many are listed."""

_NS_PER_MS: Final = 1_000_000
_BYTES_PER_MS: Final = 8
_COMPACT_BYTES: Final = 64 * 1024
_NO_ECHOES: Final[tuple[str, ...]] = ()


class GapSample(msgspec.Struct, frozen=True):
    """One gap: where it began (ms after ``start``) and how long it was."""

    at_ms: int
    ms: int


class ClearSample(msgspec.Struct, frozen=True):
    """One ``clear`` received from the gateway."""

    at_ms: float
    """Arrival, ms after ``start``."""
    dropped_ms: float
    """Queued assistant audio it threw away (not yet played)."""
    marks_flushed: int
    """Pending marks it echoed at once."""
    since_last_media_ms: float | None
    """Time since the last ``media`` arrived (None: no media before it)."""


class TwilioPlayout:
    """The playout queue of one stream (see the module docstring)."""

    def __init__(self, t0_ns: int, *, utterance_gap_ms: int = DEFAULT_UTTERANCE_GAP_MS,
                 interrupt_at_ms: int | None = None, record: bool = False,
                 audible_peak: int = DEFAULT_AUDIBLE_PEAK) -> None:
        if utterance_gap_ms < FRAME_MS:
            raise ValueError("utterance_gap_ms must be at least one frame (20 ms)")
        self.t0_ns: Final = t0_ns
        self._utterance_gap_slots: Final = -(-utterance_gap_ms // FRAME_MS)
        self._audible_peak: Final = audible_peak
        # the queue, and positions in the stream of queued bytes
        self._queue = bytearray()
        self._read = 0
        self._enqueued = 0  # bytes queued since t0 (less what clears dropped)
        self._consumed = 0  # bytes taken by decided slots
        self._decided = 0  # slots whose content is fixed
        self._last_slot_bytes = 0  # audio bytes in the last decided slot
        self._finished_bytes = 0  # bytes of slots that have finished playing
        self._pending_marks: deque[tuple[int, str]] = deque()
        # utterances and gaps
        self._playing = False
        self._dry_from: int | None = None
        self._cleared = False
        # barge-in
        self._interrupt_slot: Final = (
            interrupt_at_ms // FRAME_MS if interrupt_at_ms is not None else None
        )
        self._after_interrupt = "pending" if interrupt_at_ms is not None else "done"
        self.ended = False
        # results
        self.first_media_ns: int | None = None
        self.last_media_ns: int | None = None
        self.first_audio_slot: int | None = None
        self.first_audible_slot: int | None = None
        self.media_bytes = 0
        self.played_slots = 0
        self.utterances = 0
        self.gap_count = 0
        self.gap_slots = 0
        self.longest_gap_slots = 0
        self.gaps: list[GapSample] = []
        self.clear_count = 0
        self.dropped_by_clear_bytes = 0
        self.clears: list[ClearSample] = []
        self.marks_received = 0
        self.marks_played = 0
        self.marks_flushed = 0
        self.speaking_at_interrupt: bool | None = None
        self.slots_after_interrupt = 0
        self.clear_after_interrupt_ns: int | None = None
        self.recording: bytearray | None = bytearray() if record else None
        self.audio_slot_log: deque[int] | None = None
        """When a deque: the slots that played audio are appended (load tests)."""

    # -- inputs ------------------------------------------------------------------------

    def advance(self, now_ns: int) -> Sequence[str]:
        """Play up to ``now_ns``; the names of the marks whose echo is now due."""
        relative = now_ns - self.t0_ns
        decided = (relative - EARLY_SLACK_NS + FRAME_NS - 1) // FRAME_NS
        if decided > self._decided:
            self._decide_until(decided)
        finished = (relative + EARLY_SLACK_NS) // FRAME_NS
        if finished >= self._decided:
            self._finished_bytes = self._consumed
        else:
            self._finished_bytes = self._consumed - self._last_slot_bytes
        return self._reached_marks()

    def on_media(self, payload: bytes, now_ns: int) -> Sequence[str]:
        """The gateway sent audio: queue it.  Returns mark echoes that became due."""
        echoes = self.advance(now_ns)
        if self.first_media_ns is None:
            self.first_media_ns = now_ns
        self.last_media_ns = now_ns
        self.media_bytes += len(payload)
        self._queue += payload
        self._enqueued += len(payload)
        return echoes

    def on_mark(self, name: str, now_ns: int) -> Sequence[str]:
        """The gateway sent a mark: echo it once the audio before it has played."""
        echoes = self.advance(now_ns)
        self.marks_received += 1
        self._pending_marks.append((self._enqueued, name))
        reached = self._reached_marks()
        return [*echoes, *reached] if echoes else reached

    def on_clear(self, now_ns: int) -> Sequence[str]:
        """The gateway sent clear: drop the queue; every pending mark is echoed now."""
        echoes = list(self.advance(now_ns))
        dropped = len(self._queue) - self._read
        self.clear_count += 1
        self.dropped_by_clear_bytes += dropped
        if len(self.clears) < MAX_SAMPLES:
            since = self.last_media_ns
            self.clears.append(ClearSample(
                at_ms=ns_to_ms(now_ns - self.t0_ns),
                dropped_ms=dropped / _BYTES_PER_MS,
                marks_flushed=len(self._pending_marks),
                since_last_media_ms=None if since is None else ns_to_ms(now_ns - since),
            ))
        flushed = [name for _, name in self._pending_marks]
        self._pending_marks.clear()
        self.marks_flushed += len(flushed)
        self._queue.clear()
        self._read = 0
        self._enqueued = self._consumed
        self._cleared = True
        if self._after_interrupt == "counting":
            self._after_interrupt = "done"
        interrupt = self._interrupt_slot
        if (interrupt is not None and self.clear_after_interrupt_ns is None
                and now_ns >= self.t0_ns + interrupt * FRAME_NS):
            self.clear_after_interrupt_ns = now_ns - (self.t0_ns + interrupt * FRAME_NS)
        return echoes + flushed

    def finish(self, now_ns: int) -> None:
        """The call ended at ``now_ns``: nothing plays after it (marks stay unanswered)."""
        if self.ended:
            return
        self.advance(now_ns)
        self.ended = True
        if self.recording is not None:
            finished_slots = max(0, (now_ns - self.t0_ns + EARLY_SLACK_NS) // FRAME_NS)
            self._pad_recording(finished_slots * FRAME_BYTES)

    # -- results -----------------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """Audio waiting in the queue (not yet in a slot)."""
        return len(self._queue) - self._read

    @property
    def pending_marks(self) -> int:
        """Marks not echoed yet."""
        return len(self._pending_marks)

    # -- internals -----------------------------------------------------------------------

    def _reached_marks(self) -> Sequence[str]:
        marks = self._pending_marks
        if not marks or marks[0][0] > self._finished_bytes:
            return _NO_ECHOES
        reached: list[str] = []
        finished = self._finished_bytes
        while marks and marks[0][0] <= finished:
            reached.append(marks.popleft()[1])
        self.marks_played += len(reached)
        return reached

    def _decide_until(self, target: int) -> None:
        if self.ended:
            return
        queue = self._queue
        while self._decided < target:
            available = len(queue) - self._read
            if available == 0:
                self._silent_slots(target)
                break
            take = FRAME_BYTES if available >= FRAME_BYTES else available
            start = self._read
            chunk = bytes(queue[start : start + take])
            self._read = start + take
            self._consumed += take
            self._last_slot_bytes = take
            self._audio_slot(self._decided, chunk)
            self._decided += 1
        if self._read >= _COMPACT_BYTES:
            del queue[: self._read]
            self._read = 0

    def _silent_slots(self, target: int) -> None:
        first = self._decided
        if self._playing:
            self._playing = False
            self._dry_from = first
        if self._after_interrupt == "counting":
            self._after_interrupt = "done"
        elif self._after_interrupt == "pending":
            interrupt = self._interrupt_slot
            if interrupt is not None and first <= interrupt < target:
                self._after_interrupt = "done"
                self.speaking_at_interrupt = False
        self._decided = target
        self._last_slot_bytes = 0

    def _audio_slot(self, slot: int, chunk: bytes) -> None:
        if self.audio_slot_log is not None:
            self.audio_slot_log.append(slot)
        if self.first_audio_slot is None:
            self.first_audio_slot = slot
        if self.first_audible_slot is None and _peak(chunk) >= self._audible_peak:
            self.first_audible_slot = slot
        if self._cleared:
            self._cleared = False
            self._dry_from = None
            self.utterances += 1
        elif not self._playing:
            dry_from = self._dry_from
            self._dry_from = None
            if dry_from is None or slot - dry_from >= self._utterance_gap_slots:
                self.utterances += 1
            else:
                self._count_gap(dry_from, slot - dry_from)
        self._playing = True
        self.played_slots += 1
        if self._after_interrupt == "counting":
            self.slots_after_interrupt += 1
        elif self._after_interrupt == "pending":
            interrupt = self._interrupt_slot
            assert interrupt is not None
            if slot >= interrupt:
                speaking = slot == interrupt
                self.speaking_at_interrupt = speaking
                self._after_interrupt = "counting" if speaking else "done"
                self.slots_after_interrupt = 1 if speaking else 0
        recording = self.recording
        if recording is not None:
            self._pad_recording(slot * FRAME_BYTES)
            recording += chunk
            if len(chunk) < FRAME_BYTES:
                recording += mulaw.silence(FRAME_BYTES - len(chunk))

    def _count_gap(self, first_slot: int, slots: int) -> None:
        self.gap_count += 1
        self.gap_slots += slots
        self.longest_gap_slots = max(self.longest_gap_slots, slots)
        if len(self.gaps) < MAX_SAMPLES:
            self.gaps.append(GapSample(at_ms=first_slot * FRAME_MS, ms=slots * FRAME_MS))

    def _pad_recording(self, size: int) -> None:
        recording = self.recording
        if recording is not None and len(recording) < size:
            recording += mulaw.silence(size - len(recording))


def _peak(chunk: bytes) -> int:
    return int(np.abs(mulaw.decode(chunk).astype(np.int32)).max())


def ns_to_ms(ns: int) -> float:
    """A time in nanoseconds as milliseconds to 0.1 ms, as the reports give times."""
    return round(ns / _NS_PER_MS, 1)
