"""Downlink jitter buffer and playout decisions (Vapi -> Twilio), sans-io.

Vapi sends the assistant's mu-law audio in bursts of any size, usually faster
than real time and sometimes with stalls.  Twilio plays whatever we queue, in
order, at exactly 8000 bytes/s until we send ``clear``.  :class:`PlayoutBuffer`
sits between the two:

- :meth:`~PlayoutBuffer.push` appends Vapi's bytes to a bounded local buffer.
  When the buffer is full, the OLDEST audio is dropped and counted.
- :meth:`~PlayoutBuffer.tick` (the bridge calls it every 20 ms, and may also
  call it right after a push) returns what to send to Twilio: exact 160-byte
  frames (:class:`SendMedia`), :class:`SendMark` every ``mark_every_frames``
  frames, nothing else.  Time is an integer count of nanoseconds passed in by
  the caller; nothing here reads a clock, and nothing counts ticks.
- :meth:`~PlayoutBuffer.barge_in` drops everything and returns :class:`SendClear`.

How the bridge uses it (one buffer per call):

- each Vapi binary frame (mu-law, or PCM through ``PcmToTwilio``): ``push``,
  then ``tick(now)`` at once so speech starts without waiting for the next tick;
- every 20 ms: ``tick(now)``; send the actions to Twilio in order (``tick(now,
  paused=True)`` while the socket's transport cannot take more: see Back-pressure);
- Vapi ``speech-update`` assistant/stopped: ``end_of_utterance()``;
- Vapi ``user-interrupted`` or ``speech-update`` user/started: ``barge_in(now)``
  (and ``reset()`` any ``PcmToTwilio``, so no tail of the old speech leaks out);
- Twilio ``mark`` event: ``on_mark_echo(name, now)``;
- a second Twilio stream replaces the first: ``restart(now)`` (no clear, no barge-in);
- periodically, for logs and metrics: ``stats(now)``.

Twilio's queue model
--------------------
``play_until_ns`` estimates when Twilio's queue runs dry.  Each frame sent at
``now`` moves it to ``max(play_until_ns, now) + 20 ms``, so at any time Twilio
holds ``max(0, play_until_ns - now)`` of our audio (the *lead*).  Each tick
sends whole frames until the lead would exceed the target lead (so Twilio holds
at most the target right after a tick; barge-in can throw away at most that
much).  Frames due are worked out from absolute time, so a late tick is caught
up at once, but never by more than ``max_catch_up_frames`` frames per tick.
When speech starts after idle, the first tick sends up to the whole target
lead at once: no start-up delay is added.  A Vapi stall is bridged, with no gap
heard, as long as it ends before Twilio's queue plus the local buffer runs out,
that is, while it is shorter than the lead plus the audio buffered locally when
it began (less up to one tick, 20 ms, when ticks and arrivals are not aligned).

Marks named ``g<generation>:p<position>`` (position = frames sent so far on this
stream) come back when Twilio has played up to them.
:meth:`~PlayoutBuffer.on_mark_echo` counts those frames as played and
re-anchors the model.  An echo proves that the frame finished playing by the
echo's arrival time, so if the model still expects that frame to be playing,
the model is pulled earlier (Twilio dropped or skipped audio).  The model is
never pushed later: a late echo cannot be told apart from a slow uplink, and
pushing the model later would make us send too little.  Echoes of marks from
an older generation (Twilio echoes every pending mark on ``clear``) are stale:
they are counted but never treated as played.

Utterances and underruns
------------------------
An utterance starts with the first audio pushed while idle and ends when
:meth:`~PlayoutBuffer.end_of_utterance` has been called (Vapi's
``speech-update`` assistant/stopped) and everything buffered has been sent.  An
*underrun* is a gap inside an utterance: a frame goes out after Twilio's queue
(by the model) had already run dry.  Each is counted, with its length in ms.
A gap that is followed by no more audio is the end of speech, not an underrun.
A partial trailing frame (< 160 bytes) is padded with 0xFF silence only when
the utterance is finished or when Twilio's queue would run dry before the next
tick.  If no audio arrives for ``utterance_timeout_ms`` (measured at ticks)
and no end-of-utterance came (the speech-update was lost, or Vapi stalled
longer than that), the utterance is closed as if it had ended and counted in
``utterance_timeouts``.  Audio after that starts a new utterance, so the gap
is not an underrun: no lead could cover it, and counting it would push the
lead to its maximum.

Adaptive lead
-------------
How the target lead adapts, modelled on three adaptive jitter buffers:

- Asterisk's ``jitterbuf.c``: target = observed jitter + 40 ms; it grows at
  once and shrinks only a little at a time, and most easily in silence.
- PJSIP's ``jbuf.c``: when the observed burst level has stayed below the
  prefetch for a stable period, it shrinks by a third of the unused headroom
  (at least one frame), and it grows at once.
- WebRTC NetEq's ``DelayManager``: target = a high quantile of a histogram of
  arrival delays that forgets slowly (forget factor 0.983 per update): quick
  to grow, slow to shrink.

Our case differs in one way that shapes the rule.  Everything not yet played
is either at Twilio (the lead) or here (the local buffer), and the local part
is sent as soon as the lead allows.  So the *split* does not change which Vapi
stalls are heard (only the total does).  What the lead alone must cover is
*delivery*: our own late ticks (a busy reactor) and slow transport to Twilio.
Nor can we stretch audio: a shorter lead simply means sending less ahead,
which is inaudible, and a longer lead can only be built from audio already
here (no start-up delay is ever added).  The rule:

- *Grow at once*: an underrun with gap ``g`` raises the target to
  ``target + g`` (rounded up to whole frames, at most ``max_lead_ms``): the
  lead that would have covered that gap.  This is cheap insurance even when
  the cause was Vapi.  The shrink period restarts.
- *Measure the need*: while the lead is in force (the previous tick left whole
  frames behind because of it), the time since that tick is how long Twilio
  had to play from the lead alone.  Per period we keep the longest such
  interval, plus the largest rise in mark-echo lag over its minimum (jitter on
  the path to Twilio and back).  needed = longest interval + one frame (the
  lead is topped up in whole frames) + echo jitter.
- *Shrink slowly, in silence*: once the lead has been in force for
  ``lead_shrink_hold_ms`` with no underrun, the next idle tick (between
  utterances) lowers the target by a third of the headroom ``target - needed``
  (at least one frame, PJSIP style), never below ``min_lead_ms``, and starts
  a new period.  Without that evidence (e.g. audio arriving just in time, so
  the lead is never in force) the target does not shrink.

Back-pressure
-------------
The queue model only says what Twilio *should* hold; a Twilio side that stops reading
its socket would still be fed in real time, the kernel's buffers would absorb seconds
of audio, and the caller would hear it late, all at once.  Two limits stop that:

- *Unconfirmed audio*: frames sent in this generation and not yet confirmed played
  by a mark echo are at most ``max_unconfirmed_ms`` (whole frames, rounded down;
  0: no limit).  Everything Twilio holds, plus everything on the way to it, is
  unconfirmed, so the limit bounds both, whatever the model says.  Normal playout
  never meets it: unconfirmed audio is about the lead plus a mark interval plus
  one round trip, and the limit must be at least ``max_lead_ms`` plus
  ``mark_every_frames`` frames (so a mark is always among the unconfirmed frames
  and its echo can release the hold).
- *A paused transport*: ``tick(now, paused=True)`` (the socket's write buffer is
  full) sends nothing at all.

While either holds, audio waits in the bounded local buffer (whose overflow drops
the oldest, counted) and the utterance is not finished (its closing mark waits
too).  Sending resumes on the first tick after echoes come back or the transport
drains.  The model ran dry meanwhile, but that gap is back-pressure, not late
delivery: it is not an underrun and does not grow the lead.  Holds are counted by
cause (``unconfirmed_holds``, ``paused_holds``) with their total time
(``held_ms``): a hold begins when audio the lead asks for cannot go, and ends when
nothing waits or when, the transport not paused, at least ``mark_every_frames``
frames of the limit are left unused after a tick (after a stall, echoes that each
release a few frames straight back into the limit are one hold).  A ``clear`` or
a new stream leaves nothing unconfirmed and ends any hold.

The model is not moved by a hold: after a stall it says Twilio ran dry while
Twilio still holds up to the limit; sending is then paced by the echoes (the limit
bounds what Twilio holds) until the local backlog is played or cleared.

Barge-in
--------
:meth:`~PlayoutBuffer.barge_in` empties the local buffer, returns
:class:`SendClear`, bumps the generation and resets the queue model.  It reports
how much audio Twilio held at that moment (the lead: at most the target).
Signals that come within ``barge_in_window_ms`` of a counted barge-in are the
same barge-in (Vapi sends both ``user-interrupted`` and a user ``speech-update``).
They drop the local buffer again, but a second ``clear`` goes out only if
frames were sent since the first.

Performance: a tick that sends nothing returns a shared empty tuple and
allocates nothing.  A tick that sends allocates one list, one payload ``bytes``
per frame and one small frozen dataclass per action.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from gateway.audio.mulaw import MULAW_SILENCE

__all__ = [
    "FRAME_BYTES",
    "FRAME_NS",
    "SEND_CLEAR",
    "BargeInReport",
    "MarkStatus",
    "PlayoutAction",
    "PlayoutBuffer",
    "PlayoutConfig",
    "PlayoutStats",
    "SendClear",
    "SendMark",
    "SendMedia",
]

FRAME_BYTES: Final = 160
"""One 20 ms frame of 8 kHz mu-law."""
FRAME_NS: Final = 20_000_000
"""Duration of one frame in nanoseconds."""
NS_PER_BYTE: Final = 125_000
"""Duration of one mu-law sample (8000 per second) in nanoseconds."""
_NS_PER_MS: Final = 1_000_000
_MAX_OUTSTANDING_MARKS: Final = 256
_MARK_NAME: Final = re.compile(r"g(\d{1,12}):p(\d{1,15})")
_SILENCE_BYTE: Final = bytes([MULAW_SILENCE])


@dataclass(frozen=True, slots=True)
class SendMedia:
    """Send this mu-law payload to Twilio as one ``media`` message."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class SendMark:
    """Send a ``mark`` with this name to Twilio."""

    name: str


@dataclass(frozen=True, slots=True)
class SendClear:
    """Send ``clear`` to Twilio (drops everything it has queued)."""


SEND_CLEAR: Final = SendClear()
"""The one :class:`SendClear` instance the buffer hands out."""

PlayoutAction: TypeAlias = SendMedia | SendMark | SendClear
"""What :meth:`PlayoutBuffer.tick` and :meth:`PlayoutBuffer.barge_in` ask the bridge to send."""

_NO_ACTIONS: Final[tuple[PlayoutAction, ...]] = ()


class MarkStatus(enum.Enum):
    """What a mark echo meant."""

    PLAYED = "played"
    """One of our marks in the current generation: the audio before it has played."""
    STALE = "stale"
    """One of our marks from before a ``clear``: not played, only echoed by the clear."""
    UNKNOWN = "unknown"
    """Not a mark this buffer sent."""


@dataclass(frozen=True, slots=True)
class PlayoutConfig:
    """Tuning of the playout buffer; all durations are whole milliseconds.

    Lead values are rounded up to whole 20 ms frames.
    """

    initial_lead_ms: int = 80
    """Target lead (audio queued at Twilio) at the start of the call."""
    min_lead_ms: int = 40
    """The target lead never shrinks below this."""
    max_lead_ms: int = 300
    """The target lead never grows above this (barge-in throws away at most this much)."""
    lead_shrink_hold_ms: int = 5_000
    """Time the lead must be in force, with no underrun, before it may shrink one step."""
    max_buffer_ms: int = 10_000
    """Local buffer capacity; past it the oldest audio is dropped."""
    mark_every_frames: int = 5
    """Send a mark after every this many frames (5 = every 100 ms)."""
    max_catch_up_frames: int = 10
    """At most this many frames are sent in one tick (after a late tick, or at speech start)."""
    barge_in_window_ms: int = 500
    """Barge-in signals within this time of a counted barge-in are the same barge-in."""
    utterance_timeout_ms: int = 1_000
    """No new audio for this long (and less than a frame buffered) closes the utterance."""
    max_unconfirmed_ms: int = 1_000
    """At most this much audio is sent and not yet confirmed played by a mark echo; past
    it, sending holds and audio waits in the local buffer (0: no limit)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_lead_ms <= self.initial_lead_ms <= self.max_lead_ms:
            raise ValueError("leads must satisfy 0 < min_lead_ms <= initial_lead_ms <= max_lead_ms")
        if self.max_buffer_ms < 20:
            raise ValueError("max_buffer_ms must be at least one frame (20 ms)")
        if self.mark_every_frames < 1:
            raise ValueError("mark_every_frames must be at least 1")
        if self.max_catch_up_frames < 1:
            raise ValueError("max_catch_up_frames must be at least 1")
        if self.lead_shrink_hold_ms < 0 or self.barge_in_window_ms < 0:
            raise ValueError("lead_shrink_hold_ms and barge_in_window_ms must not be negative")
        if self.utterance_timeout_ms < 20:
            raise ValueError("utterance_timeout_ms must be at least one frame (20 ms)")
        if self.max_unconfirmed_ms < 0 or (
            self.max_unconfirmed_ms
            and self.max_unconfirmed_ms // 20
            < -(-self.max_lead_ms // 20) + self.mark_every_frames
        ):
            raise ValueError(
                "max_unconfirmed_ms must be 0 (no limit) or at least max_lead_ms plus "
                "mark_every_frames frames of 20 ms"
            )


@dataclass(frozen=True, slots=True)
class BargeInReport:
    """What :meth:`PlayoutBuffer.barge_in` did."""

    actions: tuple[PlayoutAction, ...]
    """``(SEND_CLEAR,)``; ``()`` for a repeat signal when nothing was sent since the last clear."""
    repeated: bool
    """True if this signal fell in the window of the previous barge-in (not counted again)."""
    queued_at_twilio_ms: float
    """Audio Twilio still held (by the model), now thrown away by the clear; at most the lead."""
    dropped_local_ms: float
    """Audio dropped from the local buffer."""


@dataclass(frozen=True, slots=True)
class PlayoutStats:
    """A snapshot of the buffer's counters (see :meth:`PlayoutBuffer.stats`)."""

    frames_sent: int
    bytes_sent: int
    padded_frames: int
    marks_sent: int
    frames_played: int
    """Frames confirmed played by mark echoes (never counts cleared audio)."""
    stale_mark_echoes: int
    underruns: int
    underrun_ms: float
    utterance_timeouts: int
    """Utterances closed because no audio came for ``utterance_timeout_ms`` and no end signal."""
    buffered_ms: float
    peak_buffered_ms: float
    lead_ms: float
    """Audio queued at Twilio now, by the model."""
    target_lead_ms: float
    overflow_drops: int
    overflow_dropped_ms: float
    barge_ins: int
    barge_in_cut_ms: float
    """Total audio thrown away at Twilio by barge-in clears."""
    generation: int
    utterances: int
    last_mark_echo_lag_ms: float | None
    """Echo arrival minus the model's finish time, for the last echoed mark (about one RTT)."""
    unconfirmed_ms: float
    """Audio sent in this generation and not yet confirmed played by a mark echo."""
    unconfirmed_holds: int
    """Times sending was held because ``max_unconfirmed_ms`` was reached."""
    paused_holds: int
    """Times sending was held because the transport was paused."""
    held_ms: float
    """Total time sending was held by either (the current hold included)."""


def _frames_up(duration_ns: int) -> int:
    """Round a duration up to whole frames, in nanoseconds."""
    return -(-duration_ns // FRAME_NS) * FRAME_NS


class PlayoutBuffer:
    """Jitter buffer and playout scheduler for one call's downlink (see the module docstring)."""

    __slots__ = (
        "_barge_in_cut_ns",
        "_barge_ins",
        "_buffer",
        "_bytes_sent",
        "_capacity",
        "_confirmed",
        "_finishing",
        "_frames_in_utterance",
        "_frames_played",
        "_frames_sent",
        "_generation",
        "_generation_start",
        "_held_back",
        "_held_ns",
        "_held_since_ns",
        "_in_utterance",
        "_last_arrival_ns",
        "_last_barge_in_ns",
        "_last_echo_lag_ns",
        "_last_marked",
        "_last_now_ns",
        "_last_tick_ns",
        "_marks_sent",
        "_max_lead_ns",
        "_max_unconfirmed_frames",
        "_min_echo_lag_ns",
        "_min_lead_ns",
        "_outstanding",
        "_overflow_bytes",
        "_overflow_drops",
        "_padded_frames",
        "_paused_holds",
        "_peak_buffered",
        "_period_max_echo_jitter_ns",
        "_period_max_interval_ns",
        "_period_measured_ns",
        "_play_until_ns",
        "_pushed_seen",
        "_pushed_total",
        "_stale_echoes",
        "_target_lead_ns",
        "_unconfirmed_holds",
        "_underrun_ns",
        "_underruns",
        "_utterance_timeouts",
        "_utterances",
        "config",
    )

    def __init__(self, config: PlayoutConfig | None = None) -> None:
        self.config: Final = config if config is not None else PlayoutConfig()
        cfg = self.config
        self._buffer = bytearray()
        self._capacity = cfg.max_buffer_ms * 8
        self._min_lead_ns = _frames_up(cfg.min_lead_ms * _NS_PER_MS)
        self._max_lead_ns = _frames_up(cfg.max_lead_ms * _NS_PER_MS)
        self._target_lead_ns = _frames_up(cfg.initial_lead_ms * _NS_PER_MS)
        # frames that may be unconfirmed at once ("no limit": more than can ever be sent)
        self._max_unconfirmed_frames = cfg.max_unconfirmed_ms // 20 or 1 << 62
        self._play_until_ns = -(1 << 62)  # "long ago": nothing queued
        self._last_now_ns = -(1 << 62)
        self._generation = 0
        self._frames_sent = 0  # stream position: frames sent since the call started
        self._generation_start = 0  # stream position at the last clear
        self._confirmed = 0  # highest stream position confirmed played in this generation
        # (position, model finish time) of marks not yet echoed, oldest first
        self._outstanding: deque[tuple[int, int]] = deque(maxlen=_MAX_OUTSTANDING_MARKS)
        self._in_utterance = False
        self._finishing = False
        self._frames_in_utterance = 0
        self._last_marked = 0
        self._held_back = False
        self._last_tick_ns = 0
        self._min_echo_lag_ns: int | None = None
        self._period_measured_ns = 0
        self._period_max_interval_ns = 0
        self._period_max_echo_jitter_ns = 0
        self._last_barge_in_ns: int | None = None
        self._bytes_sent = 0
        self._padded_frames = 0
        self._marks_sent = 0
        self._frames_played = 0
        self._stale_echoes = 0
        self._underruns = 0
        self._underrun_ns = 0
        self._utterance_timeouts = 0
        self._pushed_total = 0
        self._pushed_seen = 0
        self._last_arrival_ns = 0
        self._peak_buffered = 0
        self._overflow_drops = 0
        self._overflow_bytes = 0
        self._barge_ins = 0
        self._barge_in_cut_ns = 0
        self._utterances = 0
        self._last_echo_lag_ns: int | None = None
        self._held_since_ns: int | None = None  # when the current hold began
        self._held_ns = 0
        self._unconfirmed_holds = 0
        self._paused_holds = 0

    # ------------------------------------------------------------------ queries

    @property
    def generation(self) -> int:
        """Bumped by every ``clear``; mark names carry it."""
        return self._generation

    @property
    def target_lead_ns(self) -> int:
        """The lead the buffer currently aims for."""
        return self._target_lead_ns

    @property
    def buffered_bytes(self) -> int:
        """Audio held locally, not yet sent to Twilio."""
        return len(self._buffer)

    @property
    def in_utterance(self) -> bool:
        """True from the first audio of an utterance until all of it has been sent."""
        return self._in_utterance

    @property
    def unconfirmed_frames(self) -> int:
        """Frames sent in this generation that no mark echo has confirmed played yet."""
        return self._frames_sent - self._confirmed

    @property
    def held(self) -> bool:
        """True while back-pressure holds audio the lead asks for (see the module docstring)."""
        return self._held_since_ns is not None

    def queued_at_twilio_ns(self, now_ns: int) -> int:
        """Audio Twilio still holds at ``now_ns``, by the model, at most the unconfirmed frames."""
        queued = self._play_until_ns - now_ns
        if queued <= 0:
            return 0
        unconfirmed = (self._frames_sent - max(self._confirmed, self._generation_start)) * FRAME_NS
        return min(queued, unconfirmed)

    def stats(self, now_ns: int) -> PlayoutStats:
        """Snapshot of the counters; ``now_ns`` is needed for the current lead."""
        lag = self._last_echo_lag_ns
        held_ns = self._held_ns
        if self._held_since_ns is not None:
            held_ns += max(0, now_ns - self._held_since_ns)
        return PlayoutStats(
            frames_sent=self._frames_sent,
            bytes_sent=self._bytes_sent,
            padded_frames=self._padded_frames,
            marks_sent=self._marks_sent,
            frames_played=self._frames_played,
            stale_mark_echoes=self._stale_echoes,
            underruns=self._underruns,
            underrun_ms=self._underrun_ns / _NS_PER_MS,
            utterance_timeouts=self._utterance_timeouts,
            buffered_ms=len(self._buffer) / 8,
            peak_buffered_ms=self._peak_buffered / 8,
            lead_ms=self.queued_at_twilio_ns(now_ns) / _NS_PER_MS,
            target_lead_ms=self._target_lead_ns / _NS_PER_MS,
            overflow_drops=self._overflow_drops,
            overflow_dropped_ms=self._overflow_bytes / 8,
            barge_ins=self._barge_ins,
            barge_in_cut_ms=self._barge_in_cut_ns / _NS_PER_MS,
            generation=self._generation,
            utterances=self._utterances,
            last_mark_echo_lag_ms=None if lag is None else lag / _NS_PER_MS,
            unconfirmed_ms=(self._frames_sent - self._confirmed) * FRAME_NS / _NS_PER_MS,
            unconfirmed_holds=self._unconfirmed_holds,
            paused_holds=self._paused_holds,
            held_ms=held_ns / _NS_PER_MS,
        )

    # ------------------------------------------------------------------ input

    def push(self, data: bytes | bytearray | memoryview) -> None:
        """Append mu-law bytes from Vapi (any size).  Overflow drops the oldest audio."""
        size = len(data)
        if not size:
            return
        self._pushed_total += size
        if not self._in_utterance:
            self._start_utterance()
        elif self._finishing:
            self._finishing = False  # more speech before the tail went out: one utterance
        buffer = self._buffer
        excess = len(buffer) + size - self._capacity
        if excess > 0:
            self._overflow_drops += 1
            self._overflow_bytes += excess
            if size >= self._capacity:
                buffer.clear()
                buffer += memoryview(data)[size - self._capacity :]
            else:
                del buffer[:excess]
                buffer += data
        else:
            buffer += data
        self._peak_buffered = max(self._peak_buffered, len(buffer))

    def end_of_utterance(self) -> None:
        """The assistant stopped speaking: send the tail (padding a partial frame), then go idle."""
        if self._in_utterance:
            self._finishing = True

    # ------------------------------------------------------------------ playout

    def tick(self, now_ns: int, paused: bool = False) -> Sequence[PlayoutAction]:
        """Decide what to send to Twilio at ``now_ns`` (integer nanoseconds, monotonic).

        ``paused``: the transport to Twilio cannot take more now; nothing is sent and
        the audio waits here (see Back-pressure in the module docstring).
        """
        now_ns = max(now_ns, self._last_now_ns)
        self._last_now_ns = now_ns
        if not self._in_utterance:
            self._last_tick_ns = now_ns
            self._maybe_shrink_lead()
            return _NO_ACTIONS

        if self._pushed_total != self._pushed_seen:
            self._pushed_seen = self._pushed_total
            self._last_arrival_ns = now_ns
        buffer = self._buffer
        timed_out = (
            not self._finishing
            and len(buffer) < FRAME_BYTES
            and now_ns - self._last_arrival_ns >= self.config.utterance_timeout_ms * _NS_PER_MS
        )
        if timed_out:
            self._utterance_timeouts += 1
            self._finishing = True

        queued = self._play_until_ns - now_ns
        if queued < 0:
            if (
                self._frames_in_utterance
                and buffer
                and not timed_out
                and self._held_since_ns is None  # a gap made by back-pressure is not one
            ):
                # Twilio ran dry mid-utterance and we have audio again: an underrun.
                # (A partial frame always goes out now, padded: Twilio is dry.)
                gap = -queued
                self._underruns += 1
                self._underrun_ns += gap
                self._grow_lead(gap)
            queued = 0
        target = self._target_lead_ns
        if self._held_back:
            # the last tick left audio behind because of the lead: how long Twilio
            # had to live on the lead alone is the time since that tick
            self._period_max_interval_ns = max(
                self._period_max_interval_ns, now_ns - self._last_tick_ns
            )
            self._period_measured_ns += now_ns - self._last_tick_ns

        max_frames = self.config.max_catch_up_frames
        room = min((target - queued) // FRAME_NS, max_frames)
        # back-pressure: the transport is paused, or the unconfirmed audio is at its limit
        allowed = (
            0 if paused else self._max_unconfirmed_frames - self._frames_sent + self._confirmed
        )
        limited = room > allowed
        if limited:
            room = allowed
        count = min(room, len(buffer) // FRAME_BYTES)
        actions: list[PlayoutAction] | None = None
        if count > 0:
            actions = []
            for _ in range(count):
                self._send_frame(bytes(buffer[:FRAME_BYTES]), now_ns, actions)
                del buffer[:FRAME_BYTES]
            queued = self._play_until_ns - now_ns
            room -= count

        partial = len(buffer)
        # pad a partial frame only at the end of speech, or when Twilio would run
        # dry before the next tick (if that tick comes on time)
        if (
            0 < partial < FRAME_BYTES
            and room > 0
            and (self._finishing or (self._frames_in_utterance and queued < FRAME_NS))
        ):
            if actions is None:
                actions = []
            self._padded_frames += 1
            padding = _SILENCE_BYTE * (FRAME_BYTES - partial)
            self._send_frame(bytes(buffer) + padding, now_ns, actions)
            buffer.clear()

        if limited and buffer:  # audio the lead asks for has to wait
            if self._held_since_ns is None:
                self._held_since_ns = now_ns
                if paused:
                    self._paused_holds += 1
                else:
                    self._unconfirmed_holds += 1
        elif self._held_since_ns is not None and (
            not buffer
            or (
                not paused
                and self._max_unconfirmed_frames - self._frames_sent + self._confirmed
                >= self.config.mark_every_frames
            )
        ):
            # over when nothing waits, or when a mark interval of slack is left (each
            # echo releasing a few frames straight back into the limit is one long hold)
            self._end_hold(now_ns)
        if self._finishing and not buffer and not paused:
            actions = self._finish_utterance(actions)
        # the lead is in force only if the lead (not back-pressure) left the audio behind
        self._held_back = not limited and len(buffer) >= FRAME_BYTES
        self._last_tick_ns = now_ns
        return _NO_ACTIONS if actions is None else actions

    def barge_in(self, now_ns: int) -> BargeInReport:
        """The caller interrupted: drop all pending audio and clear Twilio's queue."""
        now_ns = max(now_ns, self._last_now_ns)
        self._last_now_ns = now_ns
        queued = self.queued_at_twilio_ns(now_ns)
        dropped = len(self._buffer)
        last = self._last_barge_in_ns
        repeated = last is not None and now_ns - last < self.config.barge_in_window_ms * _NS_PER_MS
        self._buffer.clear()
        self._in_utterance = False
        self._finishing = False
        self._held_back = False
        self._frames_in_utterance = 0
        if self._held_since_ns is not None:  # nothing is left to hold
            self._end_hold(now_ns)
        actions: tuple[PlayoutAction, ...] = _NO_ACTIONS
        if not repeated or self._frames_sent > self._generation_start:
            actions = (SEND_CLEAR,)
            self._generation += 1
            self._generation_start = self._frames_sent
            self._confirmed = self._frames_sent
            self._outstanding.clear()
            self._play_until_ns = now_ns
            self._barge_in_cut_ns += queued
        if not repeated:
            self._barge_ins += 1
            self._last_barge_in_ns = now_ns
        return BargeInReport(
            actions=actions,
            repeated=repeated,
            queued_at_twilio_ms=queued / _NS_PER_MS if actions else 0.0,
            dropped_local_ms=dropped / 8,
        )

    def restart(self, now_ns: int, *, keep_buffered: bool = False) -> None:
        """A new Twilio stream replaced the old one: its queue starts empty.

        Bumps the generation (marks of the old stream become stale) and resets
        the queue model, without a ``clear`` (the new stream holds nothing) and
        without counting a barge-in.  Local audio is dropped unless
        ``keep_buffered``; kept audio starts a fresh utterance on the new stream.
        """
        now_ns = max(now_ns, self._last_now_ns)
        self._last_now_ns = now_ns
        self._generation += 1
        self._generation_start = self._frames_sent
        self._confirmed = self._frames_sent
        self._outstanding.clear()
        self._play_until_ns = now_ns
        self._held_back = False
        self._frames_in_utterance = 0
        if self._held_since_ns is not None:  # the new stream holds nothing unconfirmed
            self._end_hold(now_ns)
        if not keep_buffered:
            self._buffer.clear()
            self._in_utterance = False
            self._finishing = False

    def on_mark_echo(self, name: str, now_ns: int) -> MarkStatus:
        """Twilio echoed mark ``name`` at ``now_ns``: count played audio and re-anchor the model."""
        match = _MARK_NAME.fullmatch(name)
        if match is None:
            return MarkStatus.UNKNOWN
        generation, position = int(match.group(1)), int(match.group(2))
        if (
            generation != self._generation
            or position > self._frames_sent
            or position < self._generation_start
        ):
            if generation < self._generation:
                self._stale_echoes += 1
                return MarkStatus.STALE
            return MarkStatus.UNKNOWN
        now_ns = max(now_ns, self._last_now_ns)
        expected: int | None = None
        outstanding = self._outstanding
        while outstanding and outstanding[0][0] <= position:
            marked, finish = outstanding.popleft()
            if marked == position:
                expected = finish
        if position > self._confirmed:
            self._frames_played += position - self._confirmed
            self._confirmed = position
        if expected is not None:
            lag = now_ns - expected
            self._last_echo_lag_ns = lag
            if self._min_echo_lag_ns is None or lag < self._min_echo_lag_ns:
                self._min_echo_lag_ns = max(lag, 0)
            self._period_max_echo_jitter_ns = max(
                self._period_max_echo_jitter_ns, lag - self._min_echo_lag_ns
            )
            if lag < 0:
                # Proven played, yet the model says it is still playing: Twilio is
                # ahead of the model (it skipped or dropped audio).  Pull it earlier.
                self._play_until_ns += lag
                if outstanding:
                    self._outstanding = deque(
                        ((p, f + lag) for p, f in outstanding), maxlen=_MAX_OUTSTANDING_MARKS
                    )
        return MarkStatus.PLAYED

    # ------------------------------------------------------------------ internals

    def _start_utterance(self) -> None:
        self._in_utterance = True
        self._finishing = False
        self._frames_in_utterance = 0
        self._utterances += 1

    def _send_frame(self, payload: bytes, now_ns: int, actions: list[PlayoutAction]) -> None:
        self._play_until_ns = max(self._play_until_ns, now_ns) + FRAME_NS
        self._frames_sent += 1
        self._frames_in_utterance += 1
        self._bytes_sent += FRAME_BYTES
        actions.append(SendMedia(payload))
        if self._frames_sent % self.config.mark_every_frames == 0:
            self._send_mark(actions)

    def _send_mark(self, actions: list[PlayoutAction]) -> None:
        position = self._frames_sent
        self._last_marked = position
        self._marks_sent += 1
        self._outstanding.append((position, self._play_until_ns))
        actions.append(SendMark(f"g{self._generation}:p{position}"))

    def _finish_utterance(self, actions: list[PlayoutAction] | None) -> list[PlayoutAction] | None:
        """All of the utterance has been sent: mark its end (if not marked yet) and go idle."""
        if self._frames_in_utterance and self._last_marked != self._frames_sent:
            if actions is None:
                actions = []
            self._send_mark(actions)
        self._in_utterance = False
        self._finishing = False
        self._frames_in_utterance = 0
        return actions

    def _end_hold(self, now_ns: int) -> None:
        assert self._held_since_ns is not None
        self._held_ns += now_ns - self._held_since_ns
        self._held_since_ns = None

    def _grow_lead(self, gap_ns: int) -> None:
        self._target_lead_ns = min(self._max_lead_ns, _frames_up(self._target_lead_ns + gap_ns))
        self._start_period()

    def _start_period(self) -> None:
        self._period_measured_ns = 0
        self._period_max_interval_ns = 0
        self._period_max_echo_jitter_ns = 0

    def _maybe_shrink_lead(self) -> None:
        if self._period_measured_ns < self.config.lead_shrink_hold_ms * _NS_PER_MS:
            return
        target = self._target_lead_ns
        needed = _frames_up(
            self._period_max_interval_ns + FRAME_NS + self._period_max_echo_jitter_ns
        )
        headroom = target - needed
        if headroom > 0:
            step = max(FRAME_NS, headroom // 3 // FRAME_NS * FRAME_NS)
            self._target_lead_ns = max(self._min_lead_ns, target - step)
        self._start_period()
