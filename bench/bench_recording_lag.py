"""Reactor lag with call recording off and on, at 50 concurrent calls.

The real reactor runs one 20 ms LoopingCall that drives every simulated call: each
tick, for each call, the caller frames and assistant frames due by then (one of each
per 20 ms, Twilio timestamps following real time) and the recorder's tick.  A separate
100 ms LoopingCall measures reactor lag: how late it fires against its own grid.  The
same load runs (after a 2 s warm-up) first with recording off (no recorders), then on (a
:class:`~gateway.bridge.recording.RecordingWriter` writing to a temporary directory,
its real thread pool), and each phase prints p50 / p99 / max lag, and the reactor-thread
time the 20 ms driver tick took.  With recording on, every file is then closed and
checked with the ``wave`` module.

Run:  .venv/bin/python bench/bench_recording_lag.py [--calls 50] [--seconds 20]
      [--dir PATH] [--flush-interval 0.8]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred

from gateway.bridge.recording import BYTES_PER_SECOND, CallRecorder, RecordingWriter
from gateway.logs import configure_structlog

FRAME_NS = 20_000_000
LEAD_NS = 80_000_000
MAX_FRAMES_PER_TICK = 10
CALLER_FRAME = bytes(range(96, 256))  # 160 bytes of not-silence
ASSISTANT_FRAME = bytes(range(0, 160))


@dataclass
class SimulatedCall:
    """One call's media clock and (with recording on) its recorder."""

    call_sid: str
    started_ns: int
    recorder: CallRecorder | None
    frames: int = 0

    def advance(self, now_ns: int) -> None:
        due = min((now_ns - self.started_ns) // FRAME_NS - self.frames, MAX_FRAMES_PER_TICK)
        recorder = self.recorder
        for _ in range(max(due, 0)):
            if recorder is not None:
                recorder.caller(CALLER_FRAME, now_ns, timestamp_ms=20 * self.frames)
                recorder.assistant(ASSISTANT_FRAME, now_ns + LEAD_NS)
            self.frames += 1
        if due > MAX_FRAMES_PER_TICK:  # a long stall: skip, as Twilio's stream would gap
            self.frames = (now_ns - self.started_ns) // FRAME_NS
        if recorder is not None:
            recorder.tick(now_ns)


@dataclass
class PhaseResult:
    name: str
    lags_ms: list[float] = field(default_factory=list)
    driver_ms: list[float] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


class LagProbe:
    """A 100 ms LoopingCall that records how late each firing is against its grid."""

    INTERVAL = 0.1

    def __init__(self, reactor: Any, lags_ms: list[float]) -> None:
        self._reactor = reactor
        self._lags = lags_ms
        self._loop = task.LoopingCall(self._fired)
        self._loop.clock = reactor
        self._expected = 0.0

    def start(self) -> None:
        self._loop.start(self.INTERVAL, now=False)
        assert self._loop.starttime is not None
        self._expected = self._loop.starttime + self.INTERVAL

    def stop(self) -> None:
        self._loop.stop()

    def _fired(self) -> None:
        now = self._reactor.seconds()
        self._lags.append((now - self._expected) * 1000)
        start = self._loop.starttime
        assert start is not None
        # the next grid point, as LoopingCall schedules it (missed ticks are skipped)
        self._expected = start + self.INTERVAL * ((now - start) // self.INTERVAL + 1)


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def run_phase(reactor: Any, name: str, calls: int, seconds: float,
                    writer: RecordingWriter | None) -> PhaseResult:
    result = PhaseResult(name)
    now = time.monotonic_ns()
    simulated = [
        SimulatedCall(f"CA{n:032x}", now,
                      writer.recorder(f"CA{n:032x}") if writer is not None else None)
        for n in range(calls)
    ]

    def drive() -> None:
        started = time.perf_counter()
        now_ns = time.monotonic_ns()
        for call in simulated:
            call.advance(now_ns)
        result.driver_ms.append((time.perf_counter() - started) * 1000)

    driver = task.LoopingCall(drive)
    driver.clock = reactor
    probe = LagProbe(reactor, result.lags_ms)
    driver.start(0.02, now=False)
    probe.start()
    await sleep(reactor, seconds)
    probe.stop()
    driver.stop()
    if writer is not None:
        end = time.monotonic_ns()
        closing = [c.recorder.close(end) for c in simulated if c.recorder is not None]
        outcomes = await DeferredList(closing, consumeErrors=True)
        result.files = [path for ok, path in outcomes if ok and path is not None]
    return result


def row(result: PhaseResult) -> str:
    lags = np.array(result.lags_ms)
    drive = np.array(result.driver_ms)
    return (f"{result.name:<10} {len(lags):>6} {np.percentile(lags, 50):>8.2f} "
            f"{np.percentile(lags, 99):>8.2f} {lags.max():>8.2f}   "
            f"{drive.mean():>7.3f} {np.percentile(drive, 99):>7.3f} {drive.max():>7.3f}")


def check_files(files: list[Path], calls: int, seconds: float) -> str:
    lengths = []
    for path in files:
        with wave.open(str(path), "rb") as wav:
            assert wav.getnchannels() == 2 and wav.getframerate() == 8000
            lengths.append(wav.getnframes() / 8000)
    total = sum(p.stat().st_size for p in files)
    return (f"{len(files)}/{calls} files valid (wave module), {min(lengths):.2f}-"
            f"{max(lengths):.2f} s each (phase {seconds:.0f} s), "
            f"{total / 1e6:.1f} MB written ({total / BYTES_PER_SECOND / len(files):.1f} s "
            f"of stereo PCM per call)")


async def main(reactor: Any, options: argparse.Namespace) -> None:
    configure_structlog("warning")
    base = Path(options.dir) if options.dir else Path(tempfile.mkdtemp(prefix="rec-bench-"))
    directory = base / "recordings"
    try:
        await run_phase(reactor, "warm-up", options.calls, 2.0, None)  # not reported
        off = await run_phase(reactor, "off", options.calls, options.seconds, None)
        writer = RecordingWriter(directory, flush_interval_s=options.flush_interval,
                                 reactor=reactor)
        writer.startService()
        on = await run_phase(reactor, "on", options.calls, options.seconds, writer)
        await writer.stopService()
        command = " ".join([".venv/bin/python", *sys.argv])
        print(f"command: {command}")
        print(f"{options.calls} calls, a caller and an assistant frame per call every 20 ms, "
              f"{options.seconds:.0f} s per phase; recordings in {directory} "
              f"(flush every {options.flush_interval} s)")
        print()
        print("reactor lag of a 100 ms LoopingCall (ms late)     driver tick, all calls (ms)")
        print(f"{'recording':<10} {'ticks':>6} {'p50':>8} {'p99':>8} {'max':>8}   "
              f"{'mean':>7} {'p99':>7} {'max':>7}")
        print(row(off))
        print(row(on))
        print()
        print(check_files(on.files, options.calls, options.seconds))
    finally:
        if not options.dir and not options.keep:
            shutil.rmtree(base, ignore_errors=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dir", help="write recordings here (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--flush-interval", type=float, default=0.8)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    task.react(lambda reactor: ensureDeferred(main(reactor, arguments)))
