"""Speech quality (PESQ, ITU-T P.862) of the PCM path against plain G.711.

The gateway's PCM path is 16 kHz PCM -> (our resampler + our encoder) -> 8 kHz
mu-law -> (our decoder + our resampler) -> 16 kHz PCM, streamed in 20 ms
chunks.  The baseline is the same clip through plain G.711, with scipy's
offline zero-phase ``resample_poly`` for the rate changes.  The brief: within
0.1 MOS.  Full figures for every clip: ``bench/bench_audio_quality.py``.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy.signal import resample_poly

from gateway.audio import mulaw
from gateway.audio.resample import PcmToTwilio, TwilioToPcm

pesq = pytest.importorskip("pesq").pesq

CLIPS = Path(__file__).parent / "clips"


def read_pcm16(path: Path) -> npt.NDArray[np.int16]:
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.int16)


def to_int16(samples: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("clip", ["agent_16k.wav", "caller_16k.wav"])
def test_pcm_path_scores_within_0_1_mos_of_plain_g711(clip: str) -> None:
    ref16 = read_pcm16(CLIPS / clip)
    ref8 = to_int16(resample_poly(ref16.astype(np.float64), 1, 2))

    plain8 = mulaw.decode(mulaw.encode(ref8))
    plain16 = to_int16(resample_poly(plain8.astype(np.float64), 2, 1))

    downlink, uplink = PcmToTwilio(16000), TwilioToPcm(16000)
    pcm = ref16.astype("<i2").tobytes()
    mu = b"".join(downlink.process(pcm[i : i + 640]) for i in range(0, len(pcm), 640))
    mu += downlink.flush()
    back = b"".join(uplink.process(mu[i : i + 160]) for i in range(0, len(mu), 160))
    back += uplink.flush()
    ours8 = mulaw.decode(mu)[16 : 16 + ref8.size]  # 2 ms resampler delay = 16 samples
    ours16 = np.frombuffer(back, "<i2")[64 : 64 + ref16.size]  # 2 + 2 ms = 64 samples

    narrow_plain = pesq(8000, ref8, plain8, "nb")
    narrow_ours = pesq(8000, ref8, ours8, "nb")
    round_trip_plain = pesq(16000, ref16, plain16, "nb")
    round_trip_ours = pesq(16000, ref16, ours16, "nb")

    assert narrow_plain > 3.5  # sanity: the clip is speech and G.711 is good
    assert narrow_ours == pytest.approx(narrow_plain, abs=0.1)
    assert round_trip_ours == pytest.approx(round_trip_plain, abs=0.1)
