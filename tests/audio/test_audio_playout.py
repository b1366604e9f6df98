"""Downlink playout: re-framing, lead, gaps, underruns, marks, barge-in, overflow, adaptation.

A small model of Twilio's player (independent of the code under test) receives
the actions, plays the frames in order at 8000 bytes/s from when they arrive,
echoes marks when the audio before them has played, and on ``clear`` drops what
is queued and echoes every pending mark at once.  The tests look at what that
player actually "heard".
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audio.playout import (
    FRAME_BYTES,
    FRAME_NS,
    SEND_CLEAR,
    MarkStatus,
    PlayoutAction,
    PlayoutBuffer,
    PlayoutConfig,
    SendClear,
    SendMark,
    SendMedia,
)

MS = 1_000_000
NS_PER_BYTE = 125_000


@dataclasses.dataclass
class Played:
    start: int
    end: int
    payload: bytes


class TwilioPlayer:
    """What Twilio does with our messages (zero network delay unless told otherwise)."""

    def __init__(self, downlink_delay_ns: int = 0, uplink_delay_ns: int = 0) -> None:
        self.downlink = downlink_delay_ns
        self.uplink = uplink_delay_ns
        self.played: list[Played] = []
        self.queue_end = 0
        self.pending_marks: list[tuple[str, int]] = []  # (name, time it finishes playing)
        self.echoes: list[tuple[int, str]] = []  # (arrival time at the gateway, name)
        self.clears: list[int] = []
        self.max_queued_after_send = 0

    def receive(self, now: int, actions: Iterable[PlayoutAction]) -> None:
        arrival = now + self.downlink
        for action in actions:
            if isinstance(action, SendMedia):
                start = max(self.queue_end, arrival)
                end = start + len(action.payload) * NS_PER_BYTE
                self.played.append(Played(start, end, action.payload))
                self.queue_end = end
                self.max_queued_after_send = max(self.max_queued_after_send, end - arrival)
            elif isinstance(action, SendMark):
                self.pending_marks.append((action.name, max(self.queue_end, arrival)))
            else:
                assert isinstance(action, SendClear)
                self.clear(arrival)

    def clear(self, at: int) -> None:
        self.clears.append(at)
        kept = []
        for item in self.played:
            if item.start >= at:
                continue
            if item.end > at:
                cut = (at - item.start) // NS_PER_BYTE
                kept.append(Played(item.start, at, item.payload[:cut]))
            else:
                kept.append(item)
        self.played = kept
        self.queue_end = min(self.queue_end, at)
        for name, due in self.pending_marks:
            self.echoes.append((min(due, at) + self.uplink, name))
        self.pending_marks = []

    def due_echoes(self, now: int) -> list[tuple[int, str]]:
        """Echoes that have reached the gateway by ``now``, in order."""
        still = []
        for name, due in self.pending_marks:
            if due + self.uplink <= now:
                self.echoes.append((due + self.uplink, name))
            else:
                still.append((name, due))
        self.pending_marks = still
        ready = sorted(e for e in self.echoes if e[0] <= now)
        self.echoes = [e for e in self.echoes if e[0] > now]
        return ready

    def heard(self) -> bytes:
        return b"".join(item.payload for item in self.played)

    def gaps(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Silent intervals between consecutive played pieces within [start, end]."""
        result = []
        for before, after in zip(self.played, self.played[1:], strict=False):
            if (
                after.start > before.end
                and before.end >= start
                and (end is None or after.start <= end)
            ):
                result.append((before.end, after.start))
        return result


class Call:
    """Drives a PlayoutBuffer with a tick every 20 ms against a TwilioPlayer."""

    def __init__(self, config: PlayoutConfig | None = None, player: TwilioPlayer | None = None):
        self.playout = PlayoutBuffer(config)
        self.player = player or TwilioPlayer()
        self.now = 0
        self.sent_actions: list[PlayoutAction] = []
        self.echo_results: list[tuple[str, MarkStatus]] = []

    def tick(self, now: int) -> Sequence[PlayoutAction]:
        self.now = now
        for at, name in self.player.due_echoes(now):
            self.echo_results.append((name, self.playout.on_mark_echo(name, max(at, 0))))
        actions = self.playout.tick(now)
        self.sent_actions.extend(actions)
        self.player.receive(now, actions)
        return actions

    def run(
        self,
        until: int,
        pushes: Sequence[tuple[int, bytes]] = (),
        end_of_utterance_at: int | None = None,
        step: int = FRAME_NS,
        start: int | None = None,
    ) -> None:
        pending = sorted(pushes, key=lambda p: p[0])
        index = 0
        t = self.now if start is None else start
        while t <= until:
            while index < len(pending) and pending[index][0] <= t:
                self.playout.push(pending[index][1])
                index += 1
            if (
                end_of_utterance_at is not None
                and end_of_utterance_at <= t
                and index == len(pending)
            ):
                self.playout.end_of_utterance()
                end_of_utterance_at = None
            self.tick(t)
            t += step
        self.now = until

    def media(self) -> list[bytes]:
        return [a.payload for a in self.sent_actions if isinstance(a, SendMedia)]

    def marks(self) -> list[str]:
        return [a.name for a in self.sent_actions if isinstance(a, SendMark)]


def speech(n_bytes: int, seed: int = 1) -> bytes:
    """Stand-in mu-law speech: random bytes that avoid 0xFF so padding is recognisable."""
    rng = random.Random(seed)
    return bytes(rng.randrange(0, 0xFF) for _ in range(n_bytes))


def padded(data: bytes) -> bytes:
    return data + b"\xff" * (-len(data) % FRAME_BYTES)


# --------------------------------------------------------------------------- basics


def test_idle_tick_sends_nothing_and_allocates_nothing() -> None:
    playout = PlayoutBuffer()
    first = playout.tick(0)
    assert first == ()
    assert playout.tick(FRAME_NS) is first


def test_speech_start_fills_the_lead_at_once_then_one_frame_per_tick() -> None:
    call = Call()
    call.playout.push(speech(8000))
    first = call.tick(0)
    assert [type(a) for a in first] == [SendMedia] * 4  # 80 ms lead, no start-up delay
    assert call.playout.queued_at_twilio_ns(0) == 80 * MS
    for k in range(1, 20):
        actions = call.tick(k * FRAME_NS)
        assert sum(isinstance(a, SendMedia) for a in actions) == 1
        assert call.playout.queued_at_twilio_ns(k * FRAME_NS) == 80 * MS


def test_repeated_tick_at_the_same_time_sends_nothing_more() -> None:
    call = Call()
    call.playout.push(speech(8000))
    assert len(call.tick(0)) == 4
    assert call.tick(0) == ()
    assert call.tick(5 * MS) == ()  # a quarter frame later: still within the lead


def test_burst_is_reframed_into_exact_frames_and_played_gap_free() -> None:
    data = speech(16000)  # 2 s
    pieces = []
    rng = random.Random(3)
    position = 0
    while position < len(data):
        size = rng.randrange(1, 900)
        pieces.append((0, data[position : position + size]))
        position += size
    call = Call()
    call.run(until=3000 * MS, pushes=pieces, end_of_utterance_at=0)
    assert all(len(p) == FRAME_BYTES for p in call.media())
    assert call.player.heard() == padded(data)
    assert call.player.gaps() == []
    stats = call.playout.stats(call.now)
    assert stats.underruns == 0
    assert stats.frames_sent == 100
    assert stats.bytes_sent == 16000
    assert stats.padded_frames == 0
    assert call.player.max_queued_after_send <= 80 * MS  # never more than the lead at Twilio
    assert not call.playout.in_utterance


def test_partial_last_frame_is_padded_at_end_of_utterance() -> None:
    data = speech(1000)
    call = Call()
    call.run(until=400 * MS, pushes=[(0, data)], end_of_utterance_at=0)
    assert call.player.heard() == padded(data)
    last = call.media()[-1]
    assert last[:40] == data[960:] and last[40:] == b"\xff" * 120
    assert call.playout.stats(call.now).padded_frames == 1
    # the utterance's end is marked, so the bridge can learn when it finished playing
    assert call.marks()[-1] == "g0:p7"


def test_partial_frame_mid_utterance_is_padded_only_when_twilio_would_run_dry() -> None:
    data = speech(5 * FRAME_BYTES + 80)
    call = Call()
    call.playout.push(data)
    call.tick(0)  # 4 frames, Twilio until 80 ms
    call.tick(20 * MS)  # 5th frame, Twilio until 100 ms
    for t in (40, 60, 80):
        assert call.tick(t * MS) == ()  # 60, 40, 20 ms still queued: wait for more bytes
    assert call.playout.buffered_bytes == 80
    actions = call.tick(100 * MS)  # Twilio runs dry now: pad and send, just in time
    assert [a.payload for a in actions if isinstance(a, SendMedia)] == [data[-80:] + b"\xff" * 80]
    call.tick(110 * MS)
    assert call.playout.buffered_bytes == 0
    stats = call.playout.stats(110 * MS)
    assert stats.padded_frames == 1
    assert stats.underruns == 0
    assert call.player.gaps() == []


def test_a_partial_first_frame_waits_for_the_rest() -> None:
    call = Call()
    call.playout.push(speech(100))
    assert call.tick(0) == ()
    call.playout.push(speech(60, seed=2))
    assert len(call.tick(FRAME_NS)) == 1


# --------------------------------------------------------------------------- stalls


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 1200), min_size=1, max_size=40),
    lateness=st.lists(st.floats(0, 1), min_size=1, max_size=40),
)
def test_bursty_stalling_input_is_gap_free_while_each_frame_arrives_in_time(
    sizes: list[int], lateness: list[float]
) -> None:
    """Chunks arrive in bursts and stalls, but each by the time its first frame must play.

    The time a frame must play is fixed by the utterance start: frame j plays
    20 ms * j after the first tick.  Any chunk may come as late as that for the
    earliest frame it completes: that covers every stall shorter than the lead
    plus what is buffered locally.
    """
    data = speech(sum(sizes), seed=len(sizes))
    pushes = []
    position = 0
    last_arrival = 0
    for index, size in enumerate(sizes):
        chunk = data[position : position + size]
        deadline = (position // FRAME_BYTES) * FRAME_NS  # its first frame's play time
        if index == 0:
            arrival = 0
        else:
            wanted = int(lateness[index % len(lateness)] * deadline)
            arrival = max(last_arrival, wanted // FRAME_NS * FRAME_NS)
            assert arrival <= deadline
        pushes.append((arrival, chunk))
        last_arrival = arrival
        position += size
    end = last_arrival + len(data) * NS_PER_BYTE + 500 * MS
    call = Call()
    call.run(until=end, pushes=pushes, end_of_utterance_at=last_arrival)
    assert call.player.gaps() == []
    assert call.player.heard() == padded(data)
    stats = call.playout.stats(call.now)
    assert stats.underruns == 0
    assert stats.underrun_ms == 0
    assert all(len(p) == FRAME_BYTES for p in call.media())
    assert call.player.max_queued_after_send <= stats.target_lead_ms * MS


def test_stall_within_lead_plus_local_buffer_is_not_heard() -> None:
    """Vapi bursts 200 ms, then nothing for 180 ms (< 80 ms lead + 120 ms local), then resumes."""
    data = speech(8 * 600)  # 600 ms
    first, rest = data[:1600], data[1600:]
    call = Call()
    call.run(until=2000 * MS, pushes=[(0, first), (180 * MS, rest)], end_of_utterance_at=180 * MS)
    assert call.player.gaps() == []
    assert call.playout.stats(call.now).underruns == 0


def test_stall_longer_than_everything_buffered_is_an_underrun_of_the_right_length() -> None:
    call = Call()
    data = speech(8 * 300)
    # 100 ms at once; the rest 300 ms after the start: Twilio runs dry at 100 ms
    call.run(
        until=1000 * MS,
        pushes=[(0, data[:800]), (300 * MS, data[800:])],
        end_of_utterance_at=300 * MS,
    )
    assert call.player.gaps() == [(100 * MS, 300 * MS)]
    stats = call.playout.stats(call.now)
    assert stats.underruns == 1
    assert stats.underrun_ms == 200
    assert call.player.heard() == padded(data)
    # the lead grew by the gap, at once
    assert stats.target_lead_ms == 280


def test_gap_before_end_of_utterance_is_not_an_underrun() -> None:
    call = Call()
    call.run(until=600 * MS, pushes=[(0, speech(800))])
    call.playout.end_of_utterance()  # speech-update arrives after Twilio ran dry
    call.run(until=900 * MS, start=620 * MS)
    stats = call.playout.stats(call.now)
    assert stats.underruns == 0
    assert not call.playout.in_utterance
    # the next utterance starts fresh: its first frame after idle is no underrun either
    call.run(
        until=1500 * MS,
        pushes=[(1000 * MS, speech(800))],
        end_of_utterance_at=1000 * MS,
        start=920 * MS,
    )
    assert call.playout.stats(call.now).underruns == 0
    assert call.playout.stats(call.now).utterances == 2


def test_utterance_closes_itself_when_audio_stops_without_an_end_signal() -> None:
    config = PlayoutConfig(utterance_timeout_ms=1000)
    call = Call(config)
    call.run(until=1500 * MS, pushes=[(0, speech(900))])  # 5 frames + 100 bytes, no end signal
    assert not call.playout.in_utterance
    stats = call.playout.stats(call.now)
    assert stats.utterance_timeouts == 1
    assert stats.padded_frames == 1  # the dangling 100 bytes went out padded
    call.run(until=3000 * MS, pushes=[(2500 * MS, speech(800))], start=1520 * MS)
    stats = call.playout.stats(call.now)
    assert stats.underruns == 0
    assert stats.utterances == 2
    assert stats.target_lead_ms == 80


# --------------------------------------------------------------------------- late ticks


def test_late_tick_catch_up_is_bounded_and_counted() -> None:
    call = Call(PlayoutConfig(max_catch_up_frames=3))
    call.playout.push(speech(8 * 2000))
    assert sum(isinstance(a, SendMedia) for a in call.tick(0)) == 3  # capped even at start
    actions = call.tick(500 * MS)  # the reactor stalled for half a second
    assert sum(isinstance(a, SendMedia) for a in actions) == 3
    stats = call.playout.stats(500 * MS)
    assert stats.underruns == 1  # Twilio ran dry at 60 ms: a real gap
    assert stats.underrun_ms == 440
    assert call.playout.queued_at_twilio_ns(500 * MS) <= stats.target_lead_ms * MS


def test_late_tick_refills_at_most_the_lead() -> None:
    call = Call(PlayoutConfig(max_lead_ms=120))
    call.playout.push(speech(8 * 5000))
    call.tick(0)
    for k in range(1, 10):
        call.tick(k * FRAME_NS)
    actions = call.tick(2000 * MS)
    sent = sum(isinstance(a, SendMedia) for a in actions)
    assert sent == 6  # the lead grew to its 120 ms maximum; the 1.8 s backlog stays local
    assert call.playout.queued_at_twilio_ns(2000 * MS) == 120 * MS
    assert call.playout.buffered_bytes == 8 * 5000 - (4 + 9 + 6) * FRAME_BYTES


def test_jittery_ticks_within_the_lead_cause_no_gap() -> None:
    rng = random.Random(7)
    call = Call()
    data = speech(8 * 3000)
    call.playout.push(data)
    call.playout.end_of_utterance()
    t = 0
    while t < 4000 * MS:
        call.tick(t + rng.randrange(0, 39 * MS))  # up to 39 ms late, on a 20 ms grid
        t += FRAME_NS
    assert call.player.gaps() == []
    assert call.player.heard() == padded(data)
    assert call.playout.stats(call.now).underruns == 0


# --------------------------------------------------------------------------- marks


def test_marks_every_n_frames_carry_generation_and_position() -> None:
    call = Call(PlayoutConfig(mark_every_frames=5))
    call.run(until=1000 * MS, pushes=[(0, speech(8 * 400))], end_of_utterance_at=0)
    assert call.marks() == ["g0:p5", "g0:p10", "g0:p15", "g0:p20"]
    # each mark comes right after its frame
    positions = []
    frames = 0
    for action in call.sent_actions:
        if isinstance(action, SendMedia):
            frames += 1
        elif isinstance(action, SendMark):
            positions.append(frames)
    assert positions == [5, 10, 15, 20]


def test_mark_echoes_count_played_frames() -> None:
    call = Call()
    call.run(until=2000 * MS, pushes=[(0, speech(8 * 1000))], end_of_utterance_at=0)
    assert {status for _, status in call.echo_results} == {MarkStatus.PLAYED}
    stats = call.playout.stats(call.now)
    assert stats.frames_played == 50
    assert stats.last_mark_echo_lag_ms == 0  # zero network delay in this model


def test_marks_echoed_by_a_clear_are_not_counted_as_played() -> None:
    call = Call()
    call.run(until=180 * MS, pushes=[(0, speech(8 * 2000))])  # mark g0:p10 plays until 200 ms
    played_before = call.playout.stats(call.now).frames_played
    assert played_before == 5
    report = call.playout.barge_in(190 * MS)
    call.player.receive(190 * MS, report.actions)
    call.run(until=400 * MS, start=220 * MS)
    stale = [name for name, status in call.echo_results if status is MarkStatus.STALE]
    assert stale  # Twilio echoed the pending marks on clear...
    assert all(name.startswith("g0:") for name in stale)
    stats = call.playout.stats(call.now)
    assert stats.frames_played == played_before  # ...and none of them counts as played
    assert stats.stale_mark_echoes == len(stale)


def test_unknown_and_malformed_mark_names_are_ignored() -> None:
    playout = PlayoutBuffer()
    for name in ("hello", "g0:p", "g0:p5:x", "gx:p1", "g9:p1", "g0:p999"):
        assert playout.on_mark_echo(name, 0) is MarkStatus.UNKNOWN
    assert playout.stats(0).frames_played == 0


def test_early_echo_pulls_the_queue_model_earlier() -> None:
    """If Twilio proves it played further than the model thinks, refill sooner."""
    call = Call()
    call.playout.push(speech(8 * 2000))
    actions = call.tick(0)
    call.tick(20 * MS)  # frame 5 sent: mark g0:p5 expected to finish at 100 ms
    assert [a.name for a in call.sent_actions if isinstance(a, SendMark)] == ["g0:p5"]
    assert call.playout.queued_at_twilio_ns(30 * MS) == 70 * MS
    assert actions
    # echo at 30 ms: Twilio says everything up to frame 5 has already played
    assert call.playout.on_mark_echo("g0:p5", 30 * MS) is MarkStatus.PLAYED
    assert call.playout.queued_at_twilio_ns(30 * MS) == 0
    # by 40 ms Twilio has been dry for 10 ms (the echo proves it): a real underrun,
    # so the lead grows to 100 ms and is refilled at once
    assert sum(isinstance(a, SendMedia) for a in call.playout.tick(40 * MS)) == 5
    stats = call.playout.stats(40 * MS)
    assert (stats.underruns, stats.underrun_ms, stats.target_lead_ms) == (1, 10, 100)


def test_late_echo_does_not_push_the_model_later() -> None:
    call = Call(player=TwilioPlayer(uplink_delay_ns=60 * MS))
    call.run(until=2000 * MS, pushes=[(0, speech(8 * 1500))], end_of_utterance_at=0)
    stats = call.playout.stats(call.now)
    assert stats.last_mark_echo_lag_ms == 60
    assert call.player.gaps() == []
    assert stats.frames_played == 75


# --------------------------------------------------------------------------- barge-in


def test_barge_in_clears_and_nothing_old_is_sent_afterwards() -> None:
    data = speech(8 * 2000)
    call = Call()
    call.run(until=500 * MS, pushes=[(0, data)])
    report = call.playout.barge_in(510 * MS)
    assert report.actions == (SEND_CLEAR,)
    assert not report.repeated
    assert 0 < report.queued_at_twilio_ms <= 80
    assert report.queued_at_twilio_ms == 70  # 80 ms after the tick at 500 ms, 10 ms played
    assert report.dropped_local_ms == 2000 - 29 * 20  # 4 frames at 0 ms, then one per tick
    assert call.playout.generation == 1
    call.player.receive(510 * MS, report.actions)
    # Twilio stops at the clear: nothing after 510 ms was heard
    assert max(item.end for item in call.player.played) == 510 * MS
    sent_before = len(call.media())
    call.run(until=1500 * MS, start=520 * MS)
    assert len(call.media()) == sent_before  # the old utterance is gone for good
    # a new answer starts a new generation with its own marks
    call.run(
        until=2500 * MS,
        pushes=[(1520 * MS, speech(8 * 200, seed=9))],
        end_of_utterance_at=1520 * MS,
        start=1520 * MS,
    )
    new_marks = call.marks()[-2:]
    assert all(name.startswith("g1:") for name in new_marks)
    stats = call.playout.stats(call.now)
    assert stats.barge_ins == 1
    assert stats.barge_in_cut_ms == 70


def test_repeated_barge_in_signals_within_the_window_count_once() -> None:
    call = Call(PlayoutConfig(barge_in_window_ms=500))
    call.run(until=300 * MS, pushes=[(0, speech(8 * 2000))])
    first = call.playout.barge_in(300 * MS)
    second = call.playout.barge_in(
        320 * MS
    )  # speech-update user/started right after user-interrupted
    assert first.actions == (SEND_CLEAR,)
    assert second.repeated
    assert second.actions == ()  # nothing was sent since the clear: no second clear
    assert call.playout.generation == 1
    # old audio still in flight from Vapi arrives and starts going out...
    call.playout.push(speech(800, seed=4))
    assert call.tick(340 * MS)
    third = call.playout.barge_in(400 * MS)  # ...a third signal within the window clears it again
    assert third.repeated
    assert third.actions == (SEND_CLEAR,)
    assert call.playout.generation == 2
    later = call.playout.barge_in(900 * MS)  # a new barge-in after the window
    assert not later.repeated
    assert call.playout.stats(900 * MS).barge_ins == 2


def test_barge_in_when_idle_still_clears_once() -> None:
    playout = PlayoutBuffer()
    report = playout.barge_in(0)
    assert report.actions == (SEND_CLEAR,)
    assert report.queued_at_twilio_ms == 0
    assert report.dropped_local_ms == 0


def test_restart_for_a_new_stream_neither_clears_nor_counts_a_barge_in() -> None:
    call = Call()
    data = speech(8 * 1000)
    call.run(until=200 * MS, pushes=[(0, data)])
    sent = len(call.media())
    call.playout.restart(210 * MS, keep_buffered=True)
    assert call.playout.generation == 1
    assert call.playout.queued_at_twilio_ns(210 * MS) == 0
    # the old stream's marks are stale now
    assert call.playout.on_mark_echo("g0:p10", 215 * MS) is MarkStatus.STALE
    actions = call.playout.tick(220 * MS)
    assert SEND_CLEAR not in actions
    frames = [a.payload for a in actions if isinstance(a, SendMedia)]
    assert frames[0] == data[sent * FRAME_BYTES : (sent + 1) * FRAME_BYTES]  # no audio lost
    assert len(frames) == 4  # the new stream's lead is filled at once; no underrun counted
    stats = call.playout.stats(220 * MS)
    assert (stats.barge_ins, stats.underruns) == (0, 0)
    call.playout.restart(240 * MS)
    assert call.playout.buffered_bytes == 0
    assert not call.playout.in_utterance
    assert call.playout.tick(260 * MS) == ()


# --------------------------------------------------------------------------- overflow


def test_overflow_drops_the_oldest_audio() -> None:
    call = Call(PlayoutConfig(max_buffer_ms=100))  # 800 bytes
    data = speech(1000)
    call.playout.push(data[:600])
    call.playout.push(data[600:])
    assert call.playout.buffered_bytes == 800
    stats = call.playout.stats(0)
    assert stats.overflow_drops == 1
    assert stats.overflow_dropped_ms == 25
    assert stats.peak_buffered_ms == 100
    call.playout.end_of_utterance()
    call.run(until=300 * MS, start=0)
    assert call.player.heard() == data[200:]


def test_one_push_larger_than_the_buffer_keeps_its_newest_part() -> None:
    playout = PlayoutBuffer(PlayoutConfig(max_buffer_ms=20))
    data = speech(500)
    playout.push(data)
    assert playout.buffered_bytes == 160
    actions = playout.tick(0)
    assert isinstance(actions[0], SendMedia) and actions[0].payload == data[-160:]


# --------------------------------------------------------------------------- back-pressure


class DeafTwilio(TwilioPlayer):
    """A Twilio side that stopped reading its socket: nothing arrives, nothing is echoed,
    until ``reading`` is set again (then what was written arrives at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = False
        self.unread: list[tuple[int, Sequence[PlayoutAction]]] = []

    def receive(self, now: int, actions: Iterable[PlayoutAction]) -> None:
        actions = list(actions)
        if not self.reading:
            self.unread.append((now, actions))
            return
        for _, held in self.unread:
            super().receive(now, held)
        self.unread = []
        super().receive(now, actions)

    def due_echoes(self, now: int) -> list[tuple[int, str]]:
        return super().due_echoes(now) if self.reading else []

    def written(self) -> int:
        return sum(isinstance(a, SendMedia) for _, actions in self.unread for a in actions)


def test_with_no_echoes_sending_stops_at_the_unconfirmed_limit() -> None:
    deaf = DeafTwilio()
    call = Call(PlayoutConfig(max_unconfirmed_ms=1000), player=deaf)
    call.playout.push(speech(8 * 5000))  # 5 s, more than the limit
    call.run(until=3000 * MS)
    assert deaf.written() == 50  # 1000 ms and not a frame more, however long it waits
    stats = call.playout.stats(call.now)
    assert stats.unconfirmed_ms == 1000
    assert call.playout.held
    assert (stats.unconfirmed_holds, stats.paused_holds) == (1, 0)
    assert stats.held_ms == 3000 - 940  # the 50th frame went at 920 ms: held from the next tick
    assert call.playout.buffered_bytes == 8 * 5000 - 50 * FRAME_BYTES  # waiting here
    assert stats.underruns == 0 and stats.target_lead_ms == 80  # not the lead's business


def test_mark_echoes_release_a_hold_and_its_gap_is_no_underrun() -> None:
    deaf = DeafTwilio()
    call = Call(PlayoutConfig(max_unconfirmed_ms=1000), player=deaf)
    data = speech(8 * 3000)
    call.playout.push(data)
    call.playout.end_of_utterance()
    call.run(until=1500 * MS)
    assert deaf.written() == 50
    deaf.reading = True  # Twilio reads again: 1 s arrives at once, plays, echoes come
    call.run(until=6000 * MS, start=1520 * MS)
    assert not call.playout.held and not call.playout.in_utterance
    assert deaf.max_queued_after_send <= 1000 * MS  # never more than the limit at Twilio
    assert call.player.heard() == data  # nothing lost, nothing reordered
    assert call.player.gaps() == []  # once it read again, the caller heard it all
    stats = call.playout.stats(call.now)
    assert stats.underruns == 0  # the model ran dry under back-pressure: not an underrun
    assert stats.target_lead_ms == 80
    assert stats.unconfirmed_ms == 0
    assert stats.unconfirmed_holds == 1  # echo by echo release is one hold
    assert stats.held_ms > 1000


def test_a_paused_transport_holds_every_frame_until_it_drains() -> None:
    call = Call()
    data = speech(8 * 400)
    call.playout.push(data[:1600])
    assert len(call.tick(0)) == 4  # the lead
    for t in range(20, 400, 20):  # the socket's buffer is full: nothing, not even marks
        assert call.playout.tick(t * MS, paused=True) == ()
    call.playout.push(data[1600:])
    call.playout.end_of_utterance()
    assert call.playout.tick(400 * MS, paused=True) == ()
    stats = call.playout.stats(400 * MS)
    assert stats.paused_holds == 1 and stats.unconfirmed_holds == 0
    assert call.playout.held and call.playout.in_utterance
    actions = call.tick(420 * MS)  # drained: the lead goes out at once
    assert sum(isinstance(a, SendMedia) for a in actions) == 4
    assert not call.playout.held
    call.run(until=1000 * MS, start=440 * MS)
    assert call.player.heard() == data
    stats = call.playout.stats(call.now)
    assert stats.underruns == 0 and stats.target_lead_ms == 80
    assert stats.held_ms == 420 - 20
    assert call.marks()[-1] == "g0:p20"  # the closing mark went once it could


def test_a_paused_transport_holds_the_closing_mark_too() -> None:
    playout = PlayoutBuffer()
    playout.push(speech(FRAME_BYTES * 3))
    assert [type(a) for a in playout.tick(0)] == [SendMedia] * 3  # unmarked yet (every 5)
    playout.end_of_utterance()
    assert playout.tick(FRAME_NS, paused=True) == ()  # nothing waits but the closing mark
    assert playout.in_utterance and not playout.held
    assert playout.tick(2 * FRAME_NS) == [SendMark("g0:p3")]
    assert not playout.in_utterance


def test_while_held_the_buffer_stays_bounded_and_drops_the_oldest_with_a_count() -> None:
    call = Call(PlayoutConfig(max_buffer_ms=500))  # 4000 bytes
    data = speech(8 * 2000)  # Vapi keeps talking in real time for 2 s
    for k in range(100):
        call.playout.push(data[k * FRAME_BYTES : (k + 1) * FRAME_BYTES])
        if k < 5:
            call.tick(k * FRAME_NS)
        else:
            assert call.playout.tick(k * FRAME_NS, paused=True) == ()
        assert call.playout.buffered_bytes <= 4000
    sent = len(call.media())
    stats = call.playout.stats(call.now)
    assert stats.buffered_ms == 500
    dropped = 8 * 2000 - sent * FRAME_BYTES - 4000
    assert dropped > 0 and stats.overflow_dropped_ms == dropped / 8
    assert stats.overflow_drops == dropped // FRAME_BYTES  # one count per push that overflowed
    call.playout.end_of_utterance()
    call.run(until=4000 * MS, start=100 * FRAME_NS)
    assert call.player.heard() == data[: sent * FRAME_BYTES] + data[-4000:]  # newest kept


def test_barge_in_while_held_clears_and_leaves_nothing_unconfirmed() -> None:
    deaf = DeafTwilio()
    call = Call(PlayoutConfig(max_unconfirmed_ms=1000), player=deaf)
    call.playout.push(speech(8 * 3000))
    call.run(until=1500 * MS)
    assert call.playout.held and call.playout.stats(call.now).unconfirmed_ms == 1000
    report = call.playout.barge_in(1510 * MS)
    assert report.actions == (SEND_CLEAR,)  # a clear is never held back
    assert report.dropped_local_ms == 3000 - 1000
    stats = call.playout.stats(1510 * MS)
    assert stats.unconfirmed_ms == 0 and stats.buffered_ms == 0
    assert not call.playout.held and stats.held_ms == 1510 - 940
    # the next answer goes out at once, though no echo of the old generation came
    call.playout.push(speech(8 * 500, seed=7))
    actions = call.tick(1520 * MS)
    assert sum(isinstance(a, SendMedia) for a in actions) == 4
    assert call.marks()[-1].startswith("g0:")  # the new one is not marked yet (4 frames)
    call.run(until=2000 * MS, start=1540 * MS)
    assert call.marks()[-1].startswith("g1:")
    # Twilio reads again: the cleared generation's echoes are stale, never "played"
    old = [a.name for _, acts in deaf.unread for a in acts
           if isinstance(a, SendMark) and a.name.startswith("g0:")]
    assert old and all(call.playout.on_mark_echo(name, 2000 * MS) is MarkStatus.STALE
                       for name in old)
    assert call.playout.stats(2000 * MS).frames_played == 0


def test_a_new_stream_ends_a_hold() -> None:
    deaf = DeafTwilio()
    call = Call(PlayoutConfig(max_unconfirmed_ms=1000), player=deaf)
    call.playout.push(speech(8 * 3000))
    call.run(until=1500 * MS)
    assert call.playout.held
    call.playout.restart(1510 * MS, keep_buffered=True)
    assert not call.playout.held and call.playout.unconfirmed_frames == 0
    assert len(call.playout.tick(1520 * MS)) >= 4  # the new stream gets the lead at once


def test_no_unconfirmed_limit_when_it_is_zero() -> None:
    deaf = DeafTwilio()
    call = Call(PlayoutConfig(max_unconfirmed_ms=0), player=deaf)
    call.playout.push(speech(8 * 3000))
    call.run(until=3000 * MS)
    assert deaf.written() == 150  # all of it, in real time: the old behaviour
    assert not call.playout.held


# --------------------------------------------------------------------------- adaptation


def test_lead_grows_after_underruns_up_to_the_maximum() -> None:
    config = PlayoutConfig(initial_lead_ms=80, max_lead_ms=200)
    call = Call(config)
    pushes = []
    t = 0
    for k in range(4):  # 100 ms of audio, then a 300 ms stall, four times
        pushes.append((t, speech(800, seed=k)))
        t += 400 * MS
    call.run(until=t, pushes=pushes)
    stats = call.playout.stats(call.now)
    assert stats.underruns == 3
    assert stats.target_lead_ms == 200


def test_lead_shrinks_slowly_and_only_between_utterances() -> None:
    config = PlayoutConfig(initial_lead_ms=300, min_lead_ms=40, lead_shrink_hold_ms=800)
    call = Call(config)
    targets_during_speech = set()
    targets_between = []
    t = 0
    for k in range(12):  # 1.2 s utterances sent in one burst each, 0.5 s pauses
        call.playout.push(speech(8 * 1200, seed=k))
        call.playout.end_of_utterance()
        end = t + 1700 * MS
        while t < end:
            call.tick(t)
            if call.playout.in_utterance:
                targets_during_speech.add((k, call.playout.target_lead_ns))
            t += FRAME_NS
        targets_between.append(call.playout.target_lead_ns // MS)
    # constant within each utterance
    assert len({k for k, _ in targets_during_speech}) == len(targets_during_speech)
    # steps down by a third of the unused headroom (ticks every 20 ms: 40 ms needed)
    assert targets_between[:8] == [220, 160, 120, 100, 80, 60, 40, 40]
    assert targets_between[-1] == 40
    assert call.playout.stats(call.now).underruns == 0


def test_lead_does_not_shrink_without_evidence() -> None:
    """Audio arriving just in time never leaves frames behind: the lead is never in force."""
    config = PlayoutConfig(initial_lead_ms=100, min_lead_ms=40, lead_shrink_hold_ms=500)
    call = Call(config)
    t = 0
    for _ in range(6):
        pushes = [(t + i * 100 * MS, speech(800, seed=i)) for i in range(10)]  # real time
        call.run(until=t + 1000 * MS, pushes=pushes, end_of_utterance_at=t + 900 * MS, start=t)
        call.run(until=t + 1500 * MS, start=t + 1020 * MS)
        t += 1520 * MS
    assert call.playout.target_lead_ns == 100 * MS


# --------------------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    config = PlayoutConfig()
    assert (config.initial_lead_ms, config.min_lead_ms, config.max_lead_ms) == (80, 40, 300)
    assert config.max_buffer_ms == 10_000
    assert config.mark_every_frames == 5
    assert config.max_catch_up_frames == 10
    with pytest.raises(ValueError):
        PlayoutConfig(min_lead_ms=100, initial_lead_ms=80)
    with pytest.raises(ValueError):
        PlayoutConfig(max_lead_ms=60)
    with pytest.raises(ValueError):
        PlayoutConfig(mark_every_frames=0)
    with pytest.raises(ValueError):
        PlayoutConfig(max_catch_up_frames=0)
    with pytest.raises(ValueError):
        PlayoutConfig(max_buffer_ms=10)
    assert config.max_unconfirmed_ms == 1000
    PlayoutConfig(max_unconfirmed_ms=0)  # no limit
    PlayoutConfig(max_unconfirmed_ms=400)  # 300 ms of lead + one mark interval
    with pytest.raises(ValueError):
        PlayoutConfig(max_unconfirmed_ms=399)
    with pytest.raises(ValueError):
        PlayoutConfig(mark_every_frames=40)  # a mark every 800 ms needs a larger limit
    with pytest.raises(ValueError):
        PlayoutConfig(max_unconfirmed_ms=-20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.min_lead_ms = 1  # type: ignore[misc]


def test_lead_values_are_rounded_up_to_whole_frames() -> None:
    playout = PlayoutBuffer(PlayoutConfig(initial_lead_ms=50, min_lead_ms=30, max_lead_ms=110))
    assert playout.target_lead_ns == 60 * MS
    playout.push(speech(8 * 500))
    assert len(playout.tick(0)) == 3


# --------------------------------------------------------------------------- properties


operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 2500)),
        st.tuples(st.just("tick"), st.integers(0, 200)),
        st.tuples(st.just("end"), st.just(0)),
        st.tuples(st.just("barge"), st.integers(0, 50)),
        st.tuples(st.just("paused-tick"), st.integers(0, 200)),
        st.tuples(st.just("reading"), st.integers(0, 1)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops=operations, mark_every=st.integers(1, 7), max_buffer_ms=st.integers(20, 600),
       max_unconfirmed_ms=st.sampled_from([0, 440, 1000]))
def test_invariants_under_random_operations(
    ops: list[tuple[str, int]], mark_every: int, max_buffer_ms: int, max_unconfirmed_ms: int
) -> None:
    config = PlayoutConfig(mark_every_frames=mark_every, max_buffer_ms=max_buffer_ms,
                           max_unconfirmed_ms=max_unconfirmed_ms)
    twilio = DeafTwilio()
    twilio.reading = True
    call = Call(config, player=twilio)
    playout = call.playout
    max_unconfirmed_frames = max_unconfirmed_ms // 20 or 1 << 62
    pushed = 0
    dropped_by_barge_in = 0
    now = 0
    for kind, value in ops:
        if kind == "push":
            playout.push(speech(value, seed=value))
            pushed += value
        elif kind == "tick":
            now += value * MS // 4
            position = playout.stats(now).frames_sent
            actions = call.tick(now)
            frames = 0
            for action in actions:
                if isinstance(action, SendMedia):
                    assert len(action.payload) == FRAME_BYTES
                    frames += 1
                    position += 1
                else:
                    assert isinstance(action, SendMark)  # tick never clears
                    assert action.name == f"g{playout.generation}:p{position}"
            assert frames <= config.max_catch_up_frames
            assert playout.queued_at_twilio_ns(now) <= 300 * MS
        elif kind == "paused-tick":
            now += value * MS // 4
            assert playout.tick(now, paused=True) == ()  # nothing at all while paused
        elif kind == "reading":
            twilio.reading = bool(value)  # a Twilio side that stops (or resumes) reading
        elif kind == "end":
            playout.end_of_utterance()
        else:
            now += value * MS
            report = playout.barge_in(now)
            call.player.receive(now, report.actions)
            dropped_by_barge_in += round(report.dropped_local_ms * 8)
            if report.actions:
                assert playout.unconfirmed_frames == 0 and not playout.held
        assert playout.unconfirmed_frames <= max_unconfirmed_frames
        stats = playout.stats(now)
        assert 40 * MS <= playout.target_lead_ns <= 300 * MS
        assert playout.buffered_bytes <= max_buffer_ms * 8
        assert stats.bytes_sent == stats.frames_sent * FRAME_BYTES
        accounted = pushed - round(stats.overflow_dropped_ms * 8) - dropped_by_barge_in
        real_sent = accounted - playout.buffered_bytes
        assert 0 <= stats.bytes_sent - real_sent <= stats.padded_frames * (FRAME_BYTES - 1)
        assert stats.frames_played <= stats.frames_sent
