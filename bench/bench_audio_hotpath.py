"""Hot-path timings of the audio core, per 20 ms frame, and the resamplers' measured delay.

Run from the repository root:

    PYTHONPATH=. python bench/bench_audio_hotpath.py

Each figure is the best of several runs of many iterations (microseconds per
20 ms frame of one call, one core).  At 50 frames per second per direction, N
microseconds per frame costs N * 50 / 1e6 of a core per call (e.g. 10 us ->
0.05 %).  Not a test: timings depend on the machine.
"""

from __future__ import annotations

import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from gateway.audio import mulaw
from gateway.audio.playout import FRAME_NS, PlayoutAction, PlayoutBuffer, SendMark
from gateway.audio.resample import PcmToTwilio, StreamingResampler, TwilioToPcm

RUNS = 7


def best_us_per_call(body: Callable[[int], None], iterations: int) -> float:
    """Run ``body(iterations)`` RUNS times; the fastest run, in microseconds per iteration."""
    best = float("inf")
    for _ in range(RUNS):
        started = time.perf_counter_ns()
        body(iterations)
        best = min(best, (time.perf_counter_ns() - started) / iterations / 1000)
    return best


def speech_like(rate: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    voiced = np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.clip(6000 * voiced + 800 * rng.standard_normal(t.size), -32768, 32767).astype(
        np.int16
    )


ECHO_AFTER_NS = 100_000_000
"""Twilio echoes each mark this long after it was sent (the lead, 80 ms, has played)."""


class Echoes:
    """Twilio's mark echoes: each mark comes back ``ECHO_AFTER_NS`` after it was sent
    (without them the buffer holds at ``max_unconfirmed_ms`` and stops sending)."""

    def __init__(self, playout: PlayoutBuffer) -> None:
        self._playout = playout
        self._due: deque[tuple[int, str]] = deque()

    def sent(self, actions: Sequence[PlayoutAction], now: int) -> None:
        for action in actions:
            if type(action) is SendMark:
                self._due.append((now + ECHO_AFTER_NS, action.name))

    def arrive(self, now: int) -> None:
        due = self._due
        while due and due[0][0] <= now:
            self._playout.on_mark_echo(due.popleft()[1], now)


def bench_jitter_steady(iterations: int) -> None:
    """Vapi sends 20 ms mu-law frames in real time: push one frame, tick once."""
    playout = PlayoutBuffer()
    echoes = Echoes(playout)
    frame = mulaw.encode(speech_like(8000, 0.02))
    now = 0
    for _ in range(iterations):
        playout.push(frame)
        echoes.arrive(now)
        echoes.sent(playout.tick(now), now)
        now += FRAME_NS


def bench_jitter_bursty(iterations: int) -> None:
    """Vapi sends 1 s of audio at once every 50 frames (odd sizes); one tick per frame."""
    playout = PlayoutBuffer()
    echoes = Echoes(playout)
    burst = mulaw.encode(speech_like(8000, 1.0))
    now = 0
    for index in range(iterations):
        if index % 50 == 0:
            playout.push(burst[:4001])
            playout.push(burst[4001:])
        echoes.arrive(now)
        echoes.sent(playout.tick(now), now)
        now += FRAME_NS


def bench_idle_tick(iterations: int) -> None:
    playout = PlayoutBuffer()
    now = 0
    for _ in range(iterations):
        playout.tick(now)
        now += FRAME_NS


def make_downlink_pcm(rate: int) -> Callable[[int], None]:
    chunk = speech_like(rate, 0.02).astype("<i2").tobytes()

    def body(iterations: int) -> None:
        transcoder = PcmToTwilio(rate)
        for _ in range(iterations):
            transcoder.process(chunk)

    return body


def make_uplink_pcm(rate: int) -> Callable[[int], None]:
    frame = mulaw.encode(speech_like(8000, 0.02))

    def body(iterations: int) -> None:
        transcoder = TwilioToPcm(rate)
        for _ in range(iterations):
            transcoder.process(frame)

    return body


def bench_downlink_pcm16k_full(iterations: int) -> None:
    """The whole PCM downlink: PCM 16k chunk -> mu-law -> jitter buffer -> tick."""
    chunk = speech_like(16000, 0.02).astype("<i2").tobytes()
    transcoder = PcmToTwilio(16000)
    playout = PlayoutBuffer()
    echoes = Echoes(playout)
    now = 0
    for _ in range(iterations):
        playout.push(transcoder.process(chunk))
        echoes.arrive(now)
        echoes.sent(playout.tick(now), now)
        now += FRAME_NS


def bench_encode(iterations: int) -> None:
    samples = speech_like(8000, 0.02)
    for _ in range(iterations):
        mulaw.encode(samples)


def bench_decode(iterations: int) -> None:
    frame = mulaw.encode(speech_like(8000, 0.02))
    for _ in range(iterations):
        mulaw.decode(frame)


def measured_delay_ms(in_rate: int, out_rate: int) -> float:
    """Centre of the impulse response (linear phase: it is the group delay), in ms."""
    resampler = StreamingResampler(in_rate, out_rate)
    impulse = np.zeros(in_rate // 10, dtype=np.int16)
    at = in_rate // 20
    impulse[at] = 30000
    step = in_rate // 50  # stream it in 20 ms chunks, as the bridge does
    out = np.concatenate(
        [resampler.process(impulse[i : i + step]) for i in range(0, impulse.size, step)]
        + [resampler.flush()]
    ).astype(np.float64)
    centre = float(np.sum(np.arange(out.size) * out) / np.sum(out))
    return (centre / out_rate - at / in_rate) * 1000


def main() -> int:
    print("command: PYTHONPATH=. python bench/bench_audio_hotpath.py")
    print(
        f"python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"{platform.machine()}, {platform.processor() or 'cpu ?'}"
    )
    print(f"best of {RUNS} runs; microseconds per 20 ms frame")
    rows: list[tuple[str, Callable[[int], None], int]] = [
        ("jitter buffer push+tick, 20 ms frames in real time", bench_jitter_steady, 50_000),
        ("jitter buffer push+tick, 1 s bursts (per frame)", bench_jitter_bursty, 50_000),
        ("jitter buffer idle tick", bench_idle_tick, 200_000),
        ("mu-law encode 160 samples", bench_encode, 100_000),
        ("mu-law decode 160 bytes", bench_decode, 100_000),
        ("PCM 16k -> mu-law 8k (PcmToTwilio, 640 B)", make_downlink_pcm(16000), 20_000),
        ("mu-law 8k -> PCM 16k (TwilioToPcm, 160 B)", make_uplink_pcm(16000), 20_000),
        ("PCM 24k -> mu-law 8k (PcmToTwilio, 960 B)", make_downlink_pcm(24000), 20_000),
        ("mu-law 8k -> PCM 24k (TwilioToPcm, 160 B)", make_uplink_pcm(24000), 20_000),
        ("PCM 16k downlink: transcode + push + tick", bench_downlink_pcm16k_full, 20_000),
    ]
    for label, body, iterations in rows:
        print(f"  {label:<52} {best_us_per_call(body, iterations):8.2f} us")
    print("resampler group delay (design / measured from the impulse response):")
    pairs = [(8000, 16000), (16000, 8000), (8000, 24000), (24000, 8000), (8000, 48000)]
    for in_rate, out_rate in pairs:
        design = StreamingResampler(in_rate, out_rate).delay_s * 1000
        print(
            f"  {in_rate:>5} -> {out_rate:<5} Hz  {design:6.3f} ms / "
            f"{measured_delay_ms(in_rate, out_rate):6.3f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
