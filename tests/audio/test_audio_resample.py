"""Streaming resampler: chunking invariance, measured delay, passband and stopband, transcoders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from gateway.audio import mulaw
from gateway.audio.resample import (
    PcmToTwilio,
    StreamingResampler,
    TwilioToPcm,
    design_lowpass,
)

RATE_PAIRS = [
    (8000, 16000),
    (16000, 8000),
    (8000, 24000),
    (24000, 8000),
    (8000, 48000),
    (48000, 8000),
    (8000, 22050),
    (22050, 8000),
]


def sweep(
    rate: int, seconds: float, f_start: float, f_end: float, amplitude: float
) -> npt.NDArray[np.int16]:
    t = np.arange(int(rate * seconds)) / rate
    chirp = signal.chirp(t, f0=f_start, t1=seconds, f1=f_end, method="logarithmic")
    samples: npt.NDArray[np.int16] = np.rint(amplitude * chirp).astype(np.int16)
    return samples


def one_shot(in_rate: int, out_rate: int, samples: np.ndarray) -> np.ndarray:
    resampler = StreamingResampler(in_rate, out_rate)
    return np.concatenate([resampler.process(samples), resampler.flush()])


def streamed(in_rate: int, out_rate: int, samples: np.ndarray, sizes: list[int]) -> np.ndarray:
    resampler = StreamingResampler(in_rate, out_rate)
    parts = []
    position = 0
    index = 0
    while position < samples.size:
        size = sizes[index % len(sizes)]
        index += 1
        parts.append(resampler.process(samples[position : position + size]))
        position += size
    parts.append(resampler.flush())
    return np.concatenate(parts)


def tone_response(
    in_rate: int, out_rate: int, freq: float, amplitude: float = 8000.0
) -> tuple[float, float, npt.NDArray[np.float64]]:
    """Feed a pure tone; fit amplitude and phase of the same tone in the settled output."""
    seconds = 0.5
    t = np.arange(int(in_rate * seconds)) / in_rate
    tone = np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    out = one_shot(in_rate, out_rate, tone).astype(np.float64)
    t_out = np.arange(out.size) / out_rate
    settled = slice(int(0.05 * out_rate), int(0.45 * out_rate))
    basis = np.column_stack(
        [np.sin(2 * np.pi * freq * t_out[settled]), np.cos(2 * np.pi * freq * t_out[settled])]
    )
    (a, b), *_ = np.linalg.lstsq(basis, out[settled], rcond=None)
    gain = np.hypot(a, b) / amplitude
    phase = np.arctan2(b, a)  # output = sin(w t + phase) -> delay = -phase / w
    residual = out[settled] - basis @ np.array([a, b])
    return float(gain), float(phase), residual


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_streaming_in_random_chunks_equals_one_shot(in_rate: int, out_rate: int) -> None:
    samples = sweep(in_rate, 1.0, 50, 0.45 * min(in_rate, out_rate), 20000)
    reference = one_shot(in_rate, out_rate, samples)
    rng = np.random.default_rng(in_rate + out_rate)
    sizes = [int(s) for s in rng.integers(0, 700, size=64)]
    assert np.array_equal(streamed(in_rate, out_rate, samples, sizes), reference)


@settings(max_examples=40, deadline=None)
@given(
    pair=st.sampled_from(RATE_PAIRS[:4]),
    sizes=st.lists(st.integers(0, 900), min_size=1, max_size=30).filter(any),
)
def test_any_chunking_gives_the_one_shot_output(pair: tuple[int, int], sizes: list[int]) -> None:
    in_rate, out_rate = pair
    samples = sweep(in_rate, 0.3, 100, 0.45 * min(in_rate, out_rate), 15000)
    assert np.array_equal(
        streamed(in_rate, out_rate, samples, sizes), one_shot(in_rate, out_rate, samples)
    )


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_no_discontinuities_at_20ms_chunk_boundaries(in_rate: int, out_rate: int) -> None:
    """Streamed in 20 ms chunks, the output follows the ideal delayed sweep everywhere."""
    seconds = 1.0
    f_end = 3400.0
    samples = sweep(in_rate, seconds, 100, f_end, 12000)
    resampler = StreamingResampler(in_rate, out_rate)
    chunk = in_rate // 50
    out = np.concatenate(
        [resampler.process(samples[i : i + chunk]) for i in range(0, samples.size, chunk)]
        + [resampler.flush()]
    ).astype(np.float64)
    t_out = np.arange(out.size) / out_rate - resampler.delay_s
    ideal = 12000 * signal.chirp(t_out, f0=100, t1=seconds, f1=f_end, method="logarithmic")
    inside = (t_out > 0.01) & (t_out < seconds - 0.01)
    # about 0.05 % of full scale: integer rounding on both sides plus the 0.003 dB ripple
    assert np.max(np.abs(out[inside] - ideal[inside])) < 16


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_group_delay_is_at_most_2ms_and_matches_the_reported_delay(
    in_rate: int, out_rate: int
) -> None:
    resampler = StreamingResampler(in_rate, out_rate)
    assert resampler.delay_s <= 0.002
    assert resampler.delay_ns == round(resampler.delay_s * 1e9)
    # 100 and 300 Hz have periods longer than the delay, so their phase gives it
    # unambiguously; higher tones must agree with it modulo their period
    # (a linear-phase filter delays every frequency by the same time).
    for freq in (100.0, 300.0, 1000.0, 2000.0, 3000.0, 3400.0):
        _, phase, _ = tone_response(in_rate, out_rate, freq)
        period = 1 / freq
        measured = (-phase / (2 * np.pi * freq)) % period
        if period > 2 * resampler.delay_s:
            assert measured == pytest.approx(resampler.delay_s, abs=2e-6)
        else:
            offset = (measured - resampler.delay_s) % period
            assert min(offset, period - offset) < 2e-6


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_passband_is_flat_to_3400_hz(in_rate: int, out_rate: int) -> None:
    gains_db = []
    for freq in (100.0, 300.0, 1000.0, 2000.0, 3000.0, 3400.0):
        gain, _, residual = tone_response(in_rate, out_rate, freq)
        gains_db.append(20 * np.log10(gain))
        # what is not the tone (aliases, images, rounding) is far below it
        assert np.sqrt(np.mean(residual**2)) / (8000 / np.sqrt(2)) < 10 ** (-55 / 20)
    assert max(abs(g) for g in gains_db) < 0.05  # target was +-0.5 dB


@pytest.mark.parametrize("freq", [4600.0, 5500.0, 7000.0, 7900.0])
def test_downsampling_rejects_aliases(freq: float) -> None:
    """16 -> 8 kHz: tones above 4.6 kHz would fold into the telephone band."""
    t = np.arange(16000) / 16000
    tone = np.rint(10000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    out = one_shot(16000, 8000, tone)[400:7600].astype(np.float64)
    assert np.sqrt(np.mean(out**2)) / (10000 / np.sqrt(2)) < 10 ** (-60 / 20)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3400.0])
def test_upsampling_rejects_images(freq: float) -> None:
    """8 -> 16 kHz: the image at 8000 - f must be gone."""
    t = np.arange(8000) / 8000
    tone = np.rint(10000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    out = one_shot(8000, 16000, tone)[800:15200].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    freqs = np.fft.rfftfreq(out.size, 1 / 16000)
    peak = spectrum.max()
    image = spectrum[np.abs(freqs - (8000 - freq)) < 50].max()
    assert 20 * np.log10(image / peak) < -60


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (16000, 8000), (8000, 48000)])
def test_filter_response_checked_with_scipy(in_rate: int, out_rate: int) -> None:
    resampler = StreamingResampler(in_rate, out_rate)
    common = in_rate * resampler.up
    freqs, response = signal.freqz(resampler.taps, worN=8192, fs=common)
    magnitude_db = 20 * np.log10(np.abs(response) / resampler.up + 1e-12)
    passband = magnitude_db[freqs <= 3400]
    stopband = magnitude_db[freqs >= 4600]
    assert passband.max() - passband.min() < 0.01
    assert stopband.max() < -70
    _, delay = signal.group_delay((resampler.taps, [1.0]), w=[100.0, 1000.0, 3000.0], fs=common)
    assert np.allclose(delay / common, resampler.delay_s)


def test_constant_input_gives_constant_output_without_image_tone() -> None:
    for in_rate, out_rate in RATE_PAIRS:
        out = one_shot(in_rate, out_rate, np.full(in_rate // 10, 10000, dtype=np.int16))
        settled = out[out.size // 4 : out.size // 2]
        assert np.all(np.abs(settled.astype(np.int32) - 10000) <= 1), (in_rate, out_rate)


def test_output_length_after_flush() -> None:
    for in_rate, out_rate in RATE_PAIRS:
        resampler = StreamingResampler(in_rate, out_rate)
        n_in = 1234
        total = resampler.process(np.zeros(n_in, np.int16)).size + resampler.flush().size
        delay_common = round(resampler.delay_s * in_rate * resampler.up)
        expected = -(-(n_in * resampler.up + delay_common) // resampler.down)
        assert total == expected, (in_rate, out_rate)


def test_flush_resets_and_reset_forgets() -> None:
    samples = sweep(8000, 0.2, 200, 3000, 10000)
    resampler = StreamingResampler(8000, 16000)
    first = np.concatenate([resampler.process(samples), resampler.flush()])
    second = np.concatenate([resampler.process(samples), resampler.flush()])
    assert np.array_equal(first, second)
    resampler.process(samples[:77])
    resampler.reset()
    assert np.array_equal(np.concatenate([resampler.process(samples), resampler.flush()]), first)


def test_clipping_saturates_instead_of_wrapping() -> None:
    square = np.tile(np.array([32767] * 8 + [-32768] * 8, dtype=np.int16), 100)
    out = one_shot(8000, 16000, square)
    assert out.max() == 32767
    assert out.min() == -32768


def test_equal_rates_pass_through() -> None:
    resampler = StreamingResampler(8000, 8000)
    samples = np.arange(-50, 50, dtype=np.int16)
    assert np.array_equal(resampler.process(samples), samples)
    assert resampler.delay_s == 0
    assert resampler.flush().size == 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        StreamingResampler(0, 8000)
    with pytest.raises(ValueError):
        StreamingResampler(8000, 16000, max_delay_ms=0)
    with pytest.raises(ValueError):
        StreamingResampler(8000, 16000).process(np.zeros((2, 2), np.int16))
    with pytest.raises(ValueError):
        design_lowpass(4, 1000, 8000, 1.0)


def test_design_lowpass_sums_to_gain_and_is_symmetric() -> None:
    taps = design_lowpass(65, 4000, 16000, 2.0)
    assert taps.sum() == pytest.approx(2.0)
    assert np.allclose(taps, taps[::-1])


# ---------------------------------------------------------------- transcoders


def pcm_bytes(rate: int, seconds: float) -> bytes:
    return sweep(rate, seconds, 100, 3400, 12000).astype("<i2").tobytes()


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 1601), min_size=1, max_size=20).filter(any))
def test_pcm_to_twilio_accepts_any_byte_split(cuts: list[int]) -> None:
    data = pcm_bytes(16000, 0.2)
    whole = PcmToTwilio(16000)
    expected = whole.process(data) + whole.flush()
    split = PcmToTwilio(16000)
    parts = []
    position = 0
    index = 0
    while position < len(data):
        size = cuts[index % len(cuts)]
        index += 1
        parts.append(split.process(data[position : position + size]))
        position = min(position + size, len(data))
        assert split.pending_bytes == position % 2
    parts.append(split.flush())
    assert b"".join(parts) == expected


def test_pcm_to_twilio_holds_an_odd_byte() -> None:
    transcoder = PcmToTwilio(8000)
    sample = np.array([1000], dtype="<i2").tobytes()
    assert transcoder.process(sample[:1]) == b""
    assert transcoder.pending_bytes == 1
    assert transcoder.process(sample[1:]) == mulaw.encode(np.array([1000], np.int16))
    assert transcoder.pending_bytes == 0
    transcoder.process(b"\x01")
    assert transcoder.flush() == b""
    assert transcoder.pending_bytes == 0


def test_pcm_to_twilio_at_8k_is_plain_encoding() -> None:
    data = pcm_bytes(8000, 0.1)
    transcoder = PcmToTwilio(8000)
    assert transcoder.delay_s == 0
    assert transcoder.process(data) == mulaw.encode_pcm16_bytes(data)


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_twilio_to_pcm_streams_like_one_shot(rate: int) -> None:
    payload = mulaw.encode(sweep(8000, 0.5, 100, 3400, 12000))
    whole = TwilioToPcm(rate)
    expected = whole.process(payload) + whole.flush()
    framed = TwilioToPcm(rate)
    got = b"".join(framed.process(payload[i : i + 160]) for i in range(0, len(payload), 160))
    assert got + framed.flush() == expected
    assert len(expected) % 2 == 0


def test_round_trip_16k_through_twilio_keeps_the_signal() -> None:
    """16 kHz PCM -> 8 kHz mu-law -> 16 kHz PCM, 20 ms chunks: 4 ms total delay, G.711 noise."""
    data = pcm_bytes(16000, 1.0)
    down, up = PcmToTwilio(16000), TwilioToPcm(16000)
    mu = b"".join(down.process(data[i : i + 640]) for i in range(0, len(data), 640))
    mu += down.flush()
    back = b"".join(up.process(mu[i : i + 160]) for i in range(0, len(mu), 160)) + up.flush()
    delay = round((down.delay_s + up.delay_s) * 16000)
    assert delay == 64
    original = np.frombuffer(data, "<i2").astype(np.float64)
    received = np.frombuffer(back, "<i2").astype(np.float64)[delay : delay + original.size]
    noise = received[800:-800] - original[800:-800]
    snr = 10 * np.log10(np.mean(original[800:-800] ** 2) / np.mean(noise**2))
    assert snr > 30  # G.711 mu-law gives about 38 dB on a loud sweep


def test_transcoder_reset_drops_state() -> None:
    data = pcm_bytes(16000, 0.1)
    transcoder = PcmToTwilio(16000)
    fresh = transcoder.process(data)
    transcoder.process(data[:333])
    transcoder.reset()
    assert transcoder.pending_bytes == 0
    assert transcoder.process(data) == fresh
    uplink = TwilioToPcm(16000)
    first = uplink.process(b"\x10" * 160)
    uplink.reset()
    assert uplink.process(b"\x10" * 160) == first


def test_audio_core_imports_neither_twisted_nor_scipy() -> None:
    code = (
        "import sys, gateway.audio.mulaw, gateway.audio.resample, gateway.audio.playout;"
        "bad = sorted(m for m in ('twisted', 'scipy', 'soxr', 'socket', 'asyncio')"
        " if m in sys.modules);"
        "print(','.join(bad))"
    )
    repository = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repository
    )
    assert result.stdout.strip() == ""
