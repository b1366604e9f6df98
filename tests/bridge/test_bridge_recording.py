"""Call recording: the stereo timeline, the always-valid WAV file, the recorder and writer.

Files are checked with the standard :mod:`wave` module.  File operations run either
through a manual runner (each queued operation runs when the test says, on the test's
thread, so the file can be read between writes) or, in one test, through the writer's
real thread pool under the real reactor (pytest-twisted).  No test sleeps.
"""

from __future__ import annotations

import errno
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure

from gateway.audio.mulaw import MULAW_DECODE_TABLE
from gateway.audio.playout import FRAME_NS, PlayoutBuffer, PlayoutConfig, SendMedia
from gateway.bridge.recording import (
    BYTES_PER_SECOND,
    CallRecorder,
    RecordingWriter,
    StereoTimeline,
    WavFile,
)

T = TypeVar("T")
MS = 1_000_000
SECOND = 1_000_000_000
T0 = 1_000 * SECOND  # an arbitrary monotonic origin
CALLER_CODE = 0x1F  # loud, negative
ASSISTANT_CODE = 0x9F  # loud, positive
CALLER_LEVEL = int(MULAW_DECODE_TABLE[CALLER_CODE])
ASSISTANT_LEVEL = int(MULAW_DECODE_TABLE[ASSISTANT_CODE])
SID = "CA0123456789abcdef0123456789abcdef"


def frame(code: int, size: int = 160) -> bytes:
    return bytes([code]) * size


def samples(ms: float) -> int:
    return int(ms * 8)


def stereo(pcm: bytes) -> np.ndarray[Any, np.dtype[np.int16]]:
    return np.frombuffer(pcm, dtype="<i2").reshape(-1, 2)


def spans(channel: np.ndarray[Any, Any], level: int) -> list[tuple[int, int]]:
    """Runs of samples equal to ``level``, as (start, end) sample indices."""
    hit = np.concatenate(([0], (channel == level).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(hit))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def read_wav(path: Path) -> tuple[wave._wave_params, np.ndarray[Any, np.dtype[np.int16]]]:
    with wave.open(str(path), "rb") as wav:
        params = wav.getparams()
        data = wav.readframes(params.nframes)
    return params, stereo(data)


class ManualRunner:
    """Blocking work queued in order; the test runs it (on its own thread) when it likes."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.submitted = 0

    def __call__(self, work: Callable[[], T]) -> Deferred[T]:
        waiting: Deferred[T] = Deferred()
        self.queue.append((work, waiting))
        self.submitted += 1
        return waiting

    def run_all(self) -> None:
        while self.queue:
            work, waiting = self.queue.pop(0)
            try:
                result = work()
            except Exception:
                waiting.errback(Failure())
            else:
                waiting.callback(result)


def run_now(work: Callable[[], T]) -> Deferred[T]:
    """A runner that does the work at once (synchronously)."""
    try:
        return succeed(work())
    except Exception:
        return fail(Failure())


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """The recording module's log events during the test."""
    captured: list[dict[str, Any]] = []
    observer = cast(ILogObserver, captured.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(observer)


def recording_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("logger") == "gateway.recording"]


def feed_call(recorder: CallRecorder, *, start_ns: int, seconds: float,
              assistant_from_s: float, assistant_until_s: float, clear_at_s: float | None,
              lead_ns: int = 80 * MS, after_tick: Callable[[int], None] | None = None) -> int:
    """A call: a caller frame every 20 ms (Twilio timestamps), assistant frames sent
    ``lead_ns`` ahead of their play time, and an optional clear (the barge-in: the
    assistant says nothing more).  Returns the end time."""
    ticks = int(seconds * 50)
    interrupted = False
    for k in range(ticks):
        now = start_ns + (k + 1) * FRAME_NS  # frame k (timestamp 20k ms) arrives when it ends
        recorder.caller(frame(CALLER_CODE), now, timestamp_ms=20 * k)
        play_at = now + lead_ns
        t = play_at - start_ns
        if clear_at_s is not None and now - start_ns == int(clear_at_s * SECOND):
            recorder.cleared(now)
            interrupted = True
        if assistant_from_s * SECOND <= t < assistant_until_s * SECOND and not interrupted:
            recorder.assistant(frame(ASSISTANT_CODE), play_at)
        recorder.tick(now)
        if after_tick is not None:
            after_tick(now)
    return start_ns + ticks * FRAME_NS


# -- the timeline (sans-io) ------------------------------------------------------------------


def test_timeline_places_each_side_at_its_time_and_drops_cleared_audio() -> None:
    timeline = StereoTimeline(caller_late_ns=0)
    # caller: frames 0..49 (1 s), the first arriving at T0 + 20 ms (so time zero is T0)
    for k in range(50):
        timeline.caller(frame(CALLER_CODE), T0 + (k + 1) * FRAME_NS, timestamp_ms=20 * k)
    # assistant: 25 frames to play from 0.3 s (sent 80 ms ahead, all after time zero)
    for k in range(25):
        timeline.assistant(frame(ASSISTANT_CODE), T0 + 300 * MS + k * FRAME_NS)
    timeline.cleared(T0 + 450 * MS)  # barge-in: what would play from 0.45 s never did
    pcm = stereo(timeline.drain(T0 + 2 * SECOND))
    assert len(pcm) == samples(2000)
    assert spans(pcm[:, 0], CALLER_LEVEL) == [(0, samples(1000))]
    assert spans(pcm[:, 1], ASSISTANT_LEVEL) == [(samples(300), samples(450))]
    assert not pcm[samples(1000):, 0].any()  # silence after the caller's last frame
    assert timeline.cleared_samples == samples(800 - 450)
    assert timeline.pending_samples == 0


def test_timeline_keeps_assistant_audio_until_it_has_played() -> None:
    timeline = StereoTimeline(caller_late_ns=0)
    timeline.caller(frame(CALLER_CODE), T0 + FRAME_NS, timestamp_ms=0)
    timeline.assistant(frame(ASSISTANT_CODE), T0 + 100 * MS)  # queued at Twilio
    first = stereo(timeline.drain(T0 + 100 * MS))  # not played yet: not final
    assert len(first) == samples(100) and not first[:, 1].any()
    timeline.cleared(T0 + 110 * MS)  # half of it played, then the clear
    rest = stereo(timeline.drain(T0 + 200 * MS))
    assert spans(rest[:, 1], ASSISTANT_LEVEL) == [(0, samples(10))]


def test_caller_jitter_does_not_move_audio_but_late_frames_past_the_allowance_drop() -> None:
    rng = np.random.default_rng(7)
    timeline = StereoTimeline(caller_late_ns=100 * MS)
    drained: list[bytes] = []
    for k in range(100):
        jitter = int(rng.integers(0, 60)) * MS  # up to 60 ms late, out of step
        now = T0 + (k + 1) * FRAME_NS + jitter
        timeline.caller(frame(CALLER_CODE), now if k else T0 + FRAME_NS, timestamp_ms=20 * k)
        drained.append(timeline.drain(now))
    pcm = stereo(b"".join(drained) + timeline.finish(T0 + 3 * SECOND))
    assert spans(pcm[:, 0], CALLER_LEVEL) == [(0, samples(2000))]  # no gap, no overlap
    assert timeline.late_caller_samples == 0
    # a frame 300 ms late (beyond the 100 ms allowance) is dropped where it is final
    timeline = StereoTimeline(caller_late_ns=100 * MS)
    timeline.caller(frame(CALLER_CODE), T0 + FRAME_NS, timestamp_ms=0)
    timeline.drain(T0 + 300 * MS)  # final up to 200 ms
    timeline.caller(frame(CALLER_CODE), T0 + 500 * MS, timestamp_ms=180)  # [180, 200) ms
    assert timeline.late_caller_samples == 160
    timeline.caller(frame(CALLER_CODE), T0 + 500 * MS, timestamp_ms=190)  # half late
    assert timeline.late_caller_samples == 160 + 80
    pcm = stereo(timeline.finish(T0 + 500 * MS))
    assert spans(pcm[:, 0], CALLER_LEVEL) == [(0, samples(10))]  # [200, 210) ms


def test_a_new_stream_restarts_timestamps_without_overwriting() -> None:
    timeline = StereoTimeline(caller_late_ns=0)
    for k in range(10):
        timeline.caller(frame(CALLER_CODE), T0 + (k + 1) * FRAME_NS, timestamp_ms=20 * k)
    # a second stream starts 1 s later: its timestamps begin at 0 again
    for k in range(10):
        timeline.caller(frame(CALLER_CODE), T0 + SECOND + (k + 1) * FRAME_NS,
                        timestamp_ms=20 * k)
    pcm = stereo(timeline.finish(T0 + 2 * SECOND))
    assert spans(pcm[:, 0], CALLER_LEVEL) == [(0, samples(200)),
                                              (samples(1000), samples(1200))]


def test_without_timestamps_caller_frames_are_laid_end_to_end() -> None:
    timeline = StereoTimeline(caller_late_ns=0)
    for k in range(10):  # arriving in pairs
        timeline.caller(frame(CALLER_CODE), T0 + (k // 2 + 1) * 2 * FRAME_NS)
    pcm = stereo(timeline.finish(T0 + SECOND))
    assert spans(pcm[:, 0], CALLER_LEVEL) == [(0, samples(200))]


def test_finish_drops_assistant_audio_queued_after_the_end() -> None:
    timeline = StereoTimeline()
    timeline.caller(frame(CALLER_CODE), T0 + FRAME_NS, timestamp_ms=0)
    for k in range(10):
        timeline.assistant(frame(ASSISTANT_CODE), T0 + k * FRAME_NS)
    pcm = stereo(timeline.finish(T0 + 100 * MS))
    assert len(pcm) == samples(100)
    assert spans(pcm[:, 1], ASSISTANT_LEVEL) == [(0, samples(100))]
    assert timeline.finish(T0 + 200 * MS) == b"\x00" * 4 * samples(100)  # silence to the end


def test_play_times_from_the_playout_buffer_put_the_assistant_where_it_was_heard() -> None:
    """The wiring the session uses: play_at = now + queued at Twilio, +20 ms per frame."""
    playout = PlayoutBuffer(PlayoutConfig(initial_lead_ms=80))
    timeline = StereoTimeline(caller_late_ns=0)
    timeline.caller(frame(CALLER_CODE), T0 + FRAME_NS, timestamp_ms=0)  # time zero: T0
    playout.push(frame(ASSISTANT_CODE, 8000))  # 1 s of speech arrives at 100 ms
    for k in range(5, 40):  # ticks from 100 ms to 780 ms
        now = T0 + k * FRAME_NS
        if k == 25:  # barge-in at 500 ms: playout clears, the session reports it
            playout.barge_in(now)
            timeline.cleared(now)
        play_at = now + playout.queued_at_twilio_ns(now)
        for action in playout.tick(now):
            if isinstance(action, SendMedia):
                timeline.assistant(action.payload, play_at)
                play_at += FRAME_NS
    pcm = stereo(timeline.finish(T0 + SECOND))
    assert spans(pcm[:, 1], ASSISTANT_LEVEL) == [(samples(100), samples(500))]


def test_timeline_memory_is_bounded_by_lead_allowance_and_flush_interval() -> None:
    timeline = StereoTimeline(caller_late_ns=200 * MS)
    flush_ns = 800 * MS
    next_flush = T0 + flush_ns
    peak = 0
    total = 0
    for k in range(10 * 60 * 50):  # ten minutes
        now = T0 + (k + 1) * FRAME_NS
        timeline.caller(frame(CALLER_CODE), now, timestamp_ms=20 * k)
        timeline.assistant(frame(ASSISTANT_CODE), now + 300 * MS)  # the maximum lead
        if now >= next_flush:
            total += len(timeline.drain(now))
            next_flush = now + flush_ns
        peak = max(peak, timeline.pending_samples)
    bound_ms = 300 + 200 + 800 + 20
    assert peak <= samples(bound_ms), peak / 8
    assert total == 4 * timeline.final_position
    # never drained (a stuck recorder): held audio stops at the cap
    capped = StereoTimeline(max_pending_s=1.0)
    for k in range(200):
        capped.caller(frame(CALLER_CODE), T0 + (k + 1) * FRAME_NS, timestamp_ms=20 * k)
    assert capped.pending_samples == 8000
    assert capped.overflow_samples == 200 * 160 - 8000


# -- the WAV file ---------------------------------------------------------------------------


def test_wav_file_is_valid_after_create_and_after_every_append(tmp_path: Path) -> None:
    wav = WavFile.create(tmp_path / "new" / "dir", "CA1")
    params, data = read_wav(wav.path)
    assert (params.nchannels, params.sampwidth, params.framerate, params.nframes) == (
        2, 2, 8000, 0)
    assert params.comptype == "NONE"
    chunk = np.array([[100, -100]] * 800, dtype="<i2").tobytes()
    for n in range(1, 4):
        wav.append(chunk)
        params, data = read_wav(wav.path)
        assert params.nframes == 800 * n
        assert (data[:, 0] == 100).all() and (data[:, 1] == -100).all()
    raw = wav.path.read_bytes()
    assert raw[:4] == b"RIFF" and int.from_bytes(raw[4:8], "little") == len(raw) - 8
    assert int.from_bytes(raw[40:44], "little") == len(raw) - 44
    wav.close()
    with pytest.raises(ValueError, match="whole frames"):
        wav.append(b"\x00" * 6)
    second = WavFile.create(tmp_path / "new" / "dir", "CA1")  # never replaces a file
    assert second.path.name == "CA1-2.wav"
    second.close()
    assert read_wav(wav.path)[0].nframes == 2400


# -- the recorder -----------------------------------------------------------------------------


def manual_writer(directory: Path, clock: Clock | None = None,
                  **options: Any) -> tuple[RecordingWriter, ManualRunner]:
    runner = ManualRunner()
    writer = RecordingWriter(directory, run_blocking=runner, reactor=clock or Clock(),
                             **options)
    return writer, runner


def test_a_recorded_call_is_a_stereo_wav_aligned_as_heard(tmp_path: Path) -> None:
    writer, runner = manual_writer(tmp_path / "rec", flush_interval_s=1.0, caller_late_ms=200)
    recorder = writer.recorder(SID)
    runner.run_all()  # the file is created at once
    path = tmp_path / "rec" / f"{SID}.wav"
    assert recorder.path == path and read_wav(path)[0].nframes == 0
    seen_mid_call: list[int] = []

    def mid_call(now: int) -> None:
        if now == T0 + 3 * SECOND + FRAME_NS:  # the worker catches up; valid mid-call
            runner.run_all()
            params, data = read_wav(path)
            seen_mid_call.append(params.nframes)
            assert params.nchannels == 2 and spans(data[:, 0], CALLER_LEVEL)[0][0] == 0

    end = feed_call(recorder, start_ns=T0, seconds=4.0, assistant_from_s=1.0,
                    assistant_until_s=2.5, clear_at_s=2.0, after_tick=mid_call)
    # flushes every second from the first event (20 ms), each final up to 200 ms before
    assert seen_mid_call == [samples(3020 - 200)]
    closing = recorder.close(end)
    assert not closing.called
    runner.run_all()
    assert closing.called and closing.result == path
    params, data = read_wav(path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, 8000)
    assert params.nframes == samples(4000)
    assert spans(data[:, 0], CALLER_LEVEL) == [(0, samples(4000))]
    # the assistant played from 1.0 s; the clear at 2.0 s cut what was queued after it
    assert spans(data[:, 1], ASSISTANT_LEVEL) == [(samples(1000), samples(2000))]
    assert writer.open_recorders == 0
    assert recorder.close().result == path  # idempotent


def test_audio_goes_to_the_worker_at_most_once_per_flush_interval(tmp_path: Path) -> None:
    writer, runner = manual_writer(tmp_path, flush_interval_s=0.5)
    recorder = writer.recorder(SID)
    end = feed_call(recorder, start_ns=T0, seconds=10.0, assistant_from_s=0,
                    assistant_until_s=0, clear_at_s=None, after_tick=lambda _: runner.run_all())
    assert runner.submitted == 1 + 19  # the create, then one append per 0.5 s after the first
    recorder.close(end)
    runner.run_all()
    assert runner.submitted == 21


def test_calls_that_start_together_flush_at_different_times(tmp_path: Path) -> None:
    writer, runner = manual_writer(tmp_path, flush_interval_s=1.0)
    recorders = [writer.recorder(f"CA{n}") for n in range(10)]
    runner.run_all()
    first_flush: dict[str, int] = {}
    for k in range(60):  # 1.2 s: every call flushes once
        now = T0 + (k + 1) * FRAME_NS
        for recorder in recorders:
            recorder.caller(frame(CALLER_CODE), now, timestamp_ms=20 * k)
            recorder.tick(now)
            if runner.queue and recorder.call_sid not in first_flush:
                first_flush[recorder.call_sid] = now
            runner.run_all()
    assert len(first_flush) == 10
    assert len(set(first_flush.values())) >= 8  # spread over the interval, not one tick


def test_a_writer_that_was_never_started_does_not_break_calls(
        tmp_path: Path, events: list[dict[str, Any]]) -> None:
    writer = RecordingWriter(tmp_path, reactor=Clock())  # real threads, not started
    recorder = writer.recorder(SID)
    recorder.caller(frame(CALLER_CODE), T0, timestamp_ms=0)
    assert recorder.close(T0).result is None
    [failed] = recording_events(events)
    assert failed["event"] == "cannot start a file operation"
    assert list(tmp_path.iterdir()) == []


def test_a_slow_disk_coalesces_writes_and_never_blocks(tmp_path: Path) -> None:
    writer, runner = manual_writer(tmp_path, flush_interval_s=0.5)
    recorder = writer.recorder(SID)
    runner.run_all()
    end = feed_call(recorder, start_ns=T0, seconds=5.0, assistant_from_s=0,
                    assistant_until_s=0, clear_at_s=None)  # the worker never gets to run
    assert len(runner.queue) == 1  # one operation in flight per call, the rest waits
    assert recorder.pending_bytes > 0
    closing = recorder.close(end)
    runner.run_all()
    assert closing.result == tmp_path / f"{SID}.wav"
    assert read_wav(tmp_path / f"{SID}.wav")[0].nframes == samples(5000)


def test_a_directory_that_cannot_be_created_is_logged_once_and_the_call_goes_on(
        tmp_path: Path, events: list[dict[str, Any]]) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    writer = RecordingWriter(blocker / "recordings", run_blocking=run_now, reactor=Clock())
    recorder = writer.recorder(SID)
    assert not recorder.recording and recorder.done
    end = feed_call(recorder, start_ns=T0, seconds=3.0, assistant_from_s=0.5,
                    assistant_until_s=2.0, clear_at_s=1.0)  # nothing raises
    assert recorder.close(end).result is None
    [failed] = recording_events(events)
    assert failed["event"] == "recording failed; the call goes on unrecorded"
    assert failed["call_sid"] == SID and "recordings" in failed["path"]
    assert failed["errno"] == errno.ENOTDIR
    assert writer.open_recorders == 0


def test_disk_full_mid_call_stops_recording_and_keeps_a_valid_file(
        tmp_path: Path, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    writer = RecordingWriter(tmp_path, run_blocking=run_now, reactor=Clock(),
                             flush_interval_s=1.0)
    recorder = writer.recorder(SID)
    real_append = WavFile.append
    appends: list[int] = []

    def append_until_full(self: WavFile, pcm: bytes) -> None:
        if not pcm:
            return
        appends.append(len(pcm))
        if len(appends) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, pcm)

    monkeypatch.setattr(WavFile, "append", append_until_full)
    end = feed_call(recorder, start_ns=T0, seconds=6.0, assistant_from_s=0,
                    assistant_until_s=0, clear_at_s=None)
    assert not recorder.recording and len(appends) == 3  # nothing tried after the error
    assert recorder.close(end).result is None
    [failed] = recording_events(events)
    assert failed["error"] == "No space left on device" and failed["errno"] == errno.ENOSPC
    params, _ = read_wav(tmp_path / f"{SID}.wav")  # what was written is still a valid WAV
    assert params.nframes * 4 == sum(appends[:2])


def test_an_unsafe_call_sid_writes_nothing(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    writer = RecordingWriter(tmp_path / "rec", run_blocking=run_now, reactor=Clock())
    recorder = writer.recorder("../../etc/passwd")
    recorder.caller(frame(CALLER_CODE), T0, timestamp_ms=0)
    assert recorder.close(T0).result is None
    assert not (tmp_path / "rec").exists() and list(tmp_path.iterdir()) == []
    [refused] = recording_events(events)
    assert refused["event"] == "the CallSid is not a safe file name"


def test_a_bug_in_the_timeline_never_reaches_the_call(
        tmp_path: Path, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    writer = RecordingWriter(tmp_path, run_blocking=run_now, reactor=Clock())
    recorder = writer.recorder(SID)

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(StereoTimeline, "caller", broken)
    recorder.caller(frame(CALLER_CODE), T0, timestamp_ms=0)
    recorder.caller(frame(CALLER_CODE), T0 + FRAME_NS, timestamp_ms=20)
    assert recorder.close(T0).result is None
    [failed] = recording_events(events)
    assert "internal error" in failed["event"]
    assert read_wav(tmp_path / f"{SID}.wav")[0].nframes == 0  # valid, empty, closed


def test_a_disk_that_falls_behind_is_given_up_with_bounded_memory(
        tmp_path: Path, events: list[dict[str, Any]]) -> None:
    writer, runner = manual_writer(tmp_path, flush_interval_s=0.5, max_backlog_s=2.0)
    recorder = writer.recorder(SID)
    runner.run_all()
    peak = 0

    def watch(now: int) -> None:
        nonlocal peak
        peak = max(peak, recorder.pending_bytes)

    end = feed_call(recorder, start_ns=T0, seconds=10.0, assistant_from_s=0,
                    assistant_until_s=0, clear_at_s=None, after_tick=watch)
    assert peak <= 2 * BYTES_PER_SECOND
    assert not recorder.recording and recorder.pending_bytes == 0
    assert recorder.timeline.pending_samples == 0
    assert [e["event"] for e in recording_events(events)] == [
        "the disk is not keeping up with the recording"]
    closing = recorder.close(end)
    assert closing.result is None
    runner.run_all()  # the write in flight ends and the file is closed; valid as written
    assert read_wav(tmp_path / f"{SID}.wav")[0].nframes > 0


def test_stopping_the_writer_finishes_every_open_recording(tmp_path: Path) -> None:
    clock = Clock()
    writer, runner = manual_writer(tmp_path, clock)
    recorders = [writer.recorder(f"CA{n}") for n in range(3)]
    for recorder in recorders:
        feed_call(recorder, start_ns=T0, seconds=2.0, assistant_from_s=0.5,
                  assistant_until_s=1.0, clear_at_s=None)
    recorders[0].close(T0 + SECOND)  # one ended early; the others are still open
    stopped = writer.stopService()
    assert not stopped.called
    runner.run_all()
    assert stopped.called and writer.open_recorders == 0
    lengths = [read_wav(tmp_path / f"CA{n}.wav")[0].nframes for n in range(3)]
    assert lengths == [samples(2000)] * 3  # closed at the last time each one saw


def test_stopping_gives_up_on_a_hung_disk_after_the_timeout(tmp_path: Path,
                                                          events: list[dict[str, Any]]) -> None:
    clock = Clock()
    writer, _never_run = manual_writer(tmp_path, clock, stop_timeout_s=5.0)
    writer.recorder(SID)
    stopped = writer.stopService()
    clock.advance(5.0)
    assert stopped.called
    assert recording_events(events)[-1]["event"].startswith("recordings still being written")


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_real_worker_threads_write_the_file(tmp_path: Path) -> None:
    from twisted.internet import reactor

    writer = RecordingWriter(tmp_path, flush_interval_s=0.2, reactor=reactor)
    writer.startService()
    try:
        recorder = writer.recorder(SID)
        end = feed_call(recorder, start_ns=T0, seconds=3.0, assistant_from_s=1.0,
                        assistant_until_s=2.0, clear_at_s=1.5)
        path = await recorder.close(end)
    finally:
        await writer.stopService()
    assert path == tmp_path / f"{SID}.wav"
    params, data = read_wav(path)
    assert params.nframes == samples(3000)
    assert spans(data[:, 0], CALLER_LEVEL) == [(0, samples(3000))]
    assert spans(data[:, 1], ASSISTANT_LEVEL) == [(samples(1000), samples(1500))]
