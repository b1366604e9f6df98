"""PESQ figures for the gateway's PCM audio path against plain G.711 (a script, not a test).

Run from the repository root:

    PYTHONPATH=. python bench/bench_audio_quality.py [extra clip directories...]

For every ``*_16k.wav`` clip (16-bit mono PCM at 16 kHz) in ``tests/audio/clips``
and in any directory given on the command line, it compares:

- plain:  16 kHz -> 8 kHz with scipy's offline zero-phase ``resample_poly``,
          G.711 mu-law encode + decode (the baseline: best-case G.711);
- ours:   the streaming path the bridge uses, in 20 ms chunks: ``PcmToTwilio``
          (our 2 ms resampler + our encoder), then ``TwilioToPcm`` back to 16 kHz.

Scores (MOS-LQO, ITU-T P.862 via the ``pesq`` package):

- NB@8k   narrowband PESQ at 8 kHz of the mu-law signal Twilio gets
          (reference: the clip resampled offline to 8 kHz);
- NB@16k  narrowband PESQ of the full 16 kHz round trip against the original;
- WB@16k  wideband PESQ (P.862.2) of the round trip, for information only
          (G.711 is narrowband; WB is bound to score low).

If a matching ``*_8k_ulaw.wav`` lies next to a clip, its NB@8k score is shown
too ("file"), as a second opinion on the baseline.  Needs numpy, scipy, pesq.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pesq import pesq
from scipy.signal import resample_poly

from gateway.audio import mulaw
from gateway.audio.resample import PcmToTwilio, TwilioToPcm
from gateway.audio.wav import read_wav

REPOSITORY = Path(__file__).resolve().parent.parent


def read_pcm16(path: Path) -> npt.NDArray[np.int16]:
    clip = read_wav(path)
    if (clip.encoding, clip.sample_rate) != ("pcm_s16le", 16000):
        raise ValueError(f"{path}: expected mono 16-bit 16 kHz PCM")
    return clip.samples()


def read_mulaw_wav(path: Path) -> bytes:
    """The audio of a mono 8 kHz mu-law WAVE file."""
    clip = read_wav(path)
    if (clip.encoding, clip.sample_rate) != ("mulaw", 8000):
        raise ValueError(f"{path}: expected mono 8 kHz mu-law")
    return clip.data


def to_int16(samples: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


def scores(path: Path, directories: list[Path]) -> dict[str, float]:
    ref16 = read_pcm16(path)
    ref8 = to_int16(resample_poly(ref16.astype(np.float64), 1, 2))
    plain8 = mulaw.decode(mulaw.encode(ref8))
    plain16 = to_int16(resample_poly(plain8.astype(np.float64), 2, 1))

    downlink, uplink = PcmToTwilio(16000), TwilioToPcm(16000)
    pcm = ref16.astype("<i2").tobytes()
    mu = b"".join(downlink.process(pcm[i : i + 640]) for i in range(0, len(pcm), 640))
    mu += downlink.flush()
    back = b"".join(uplink.process(mu[i : i + 160]) for i in range(0, len(mu), 160))
    back += uplink.flush()
    down_delay = round(downlink.delay_s * 8000)
    total_delay = round((downlink.delay_s + uplink.delay_s) * 16000)
    ours8 = mulaw.decode(mu)[down_delay : down_delay + ref8.size]
    ours16 = np.frombuffer(back, "<i2")[total_delay : total_delay + ref16.size]

    result = {
        "seconds": ref16.size / 16000,
        "nb8_plain": pesq(8000, ref8, plain8, "nb"),
        "nb8_ours": pesq(8000, ref8, ours8, "nb"),
        "nb16_plain": pesq(16000, ref16, plain16, "nb"),
        "nb16_ours": pesq(16000, ref16, ours16, "nb"),
        "wb16_plain": pesq(16000, ref16, plain16, "wb"),
        "wb16_ours": pesq(16000, ref16, ours16, "wb"),
    }
    ulaw_name = path.name.replace("_16k.wav", "_8k_ulaw.wav")
    candidates = [d / ulaw_name for d in directories if (d / ulaw_name).exists()]
    if candidates:
        ulaw_file = candidates[0]
        supplied = mulaw.decode(read_mulaw_wav(ulaw_file))
        n = min(supplied.size, ref8.size)
        result["nb8_file"] = pesq(8000, ref8[:n], supplied[:n], "nb")
    return result


def main(argv: list[str]) -> int:
    directories = [REPOSITORY / "tests" / "audio" / "clips", *(Path(a) for a in argv)]
    seen: set[str] = set()
    clips = []
    for directory in directories:
        for path in sorted(directory.glob("*_16k.wav")):
            if path.name not in seen:
                seen.add(path.name)
                clips.append(path)
    print("command: PYTHONPATH=. python bench/bench_audio_quality.py " + " ".join(argv))
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}")
    header = (
        f"{'clip':<22}{'sec':>6} | {'NB@8k plain':>11}{'ours':>7}{'diff':>7}{'file':>7} | "
        f"{'NB@16k plain':>12}{'ours':>7}{'diff':>7} | {'WB@16k plain':>12}{'ours':>7}"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    started = time.perf_counter()
    for path in clips:
        r = scores(path, directories)
        d8 = r["nb8_ours"] - r["nb8_plain"]
        d16 = r["nb16_ours"] - r["nb16_plain"]
        worst = max(worst, abs(d8), abs(d16))
        file_score = f"{r['nb8_file']:7.3f}" if "nb8_file" in r else f"{'-':>7}"
        print(
            f"{path.name:<22}{r['seconds']:6.1f} | {r['nb8_plain']:11.3f}{r['nb8_ours']:7.3f}"
            f"{d8:+7.3f}{file_score} | {r['nb16_plain']:12.3f}{r['nb16_ours']:7.3f}{d16:+7.3f} | "
            f"{r['wb16_plain']:12.3f}{r['wb16_ours']:7.3f}"
        )
    elapsed = time.perf_counter() - started
    verdict = "PASS" if worst <= 0.1 else "FAIL"
    print(f"largest |ours - plain| (NB): {worst:.3f} MOS -> {verdict} (target 0.1)")
    print(f"time: {elapsed:.1f} s")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
