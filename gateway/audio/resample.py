"""Low-delay streaming sample-rate conversion, and the PCM <-> Twilio mu-law transcoders.

:func:`resample_clip` runs the same filter over a whole clip (a WAV file, not a
stream) and trims its delay, so the result lines up with the original.

Why not soxr: python-soxr's ``ResampleStream`` was measured (soxr 1.1.0, 20 ms
chunks, 8 <-> 16 kHz): at ``LQ``..``VHQ`` it holds back 4 to 117 ms of output
while streaming, and how much it holds back moves from chunk to chunk. ``QQ``
holds back only 0.25 ms, but it is a cubic interpolator with poor alias
rejection.  Neither fits a telephone bridge, so this module uses its own filter.

The filter
----------
One linear-phase FIR low-pass designed at the common rate
``lcm(in_rate, out_rate)`` and run as a polyphase filter (only the outputs we
keep are computed, and no zeros are multiplied):

- Kaiser-windowed sinc with ``beta = 7``.  The cutoff is the lower rate's
  Nyquist frequency (4 kHz for an 8 kHz side), so the filter is a half-band
  filter for 8 <-> 16 kHz.
- Length ``N = 2 * floor(max_delay * lcm_rate) + 1``.  The group delay is
  ``(N - 1) / 2`` samples at the common rate, so it never exceeds
  ``max_delay_ms`` (default 2 ms).  8 <-> 16 kHz: 65 taps, delay exactly 2.000 ms.
  8 <-> 24 kHz: 97 taps; 8 <-> 48 kHz: 193 taps; 8 <-> 22.05 kHz: 14113 taps at
  3.528 MHz (33 per phase); all have a 2.000 ms delay.
- Each polyphase branch is scaled to unity DC gain, so a constant input gives a
  constant output with no image tone.
- Measured response of the design, for 8 kHz on either side: -0.001..+0.003 dB
  from 0 to 3.4 kHz, -6 dB at 4 kHz, at least 71 dB of attenuation from 4.6 kHz
  up.  A 4.6 kHz component folds down to 3.4 kHz, so the whole 300-3400 Hz
  telephone band is free of aliases.

Streaming: the last ``ceil(N / L) - 1`` input samples and the phase of the next
output are kept between calls, so cutting the input into chunks of any size
(even empty or one-sample chunks) gives the same output as one call over the
whole signal (to within one LSB from floating-point summation order).
``flush()`` drains the delayed tail and resets.

Everything here is sans-io and pure numpy (scipy is used only by the tests).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.audio import mulaw

__all__ = [
    "TWILIO_RATE",
    "PcmToTwilio",
    "StreamingResampler",
    "TwilioToPcm",
    "design_lowpass",
    "resample_clip",
]

TWILIO_RATE: Final = 8000
"""Twilio Media Streams sample rate (mu-law, mono)."""

KAISER_BETA: Final = 7.0
"""Kaiser window shape: about 72 dB of stopband with the 2 ms design."""

_PER_PHASE_LIMIT: Final = 16  # up to this many phases: one strided mat-vec per phase


def design_lowpass(
    num_taps: int, cutoff_hz: float, rate_hz: float, gain: float
) -> npt.NDArray[np.float64]:
    """Design a linear-phase Kaiser-windowed sinc low-pass filter.

    ``num_taps`` must be odd (so the delay is a whole number of samples);
    the taps sum to ``gain``.
    """
    if num_taps < 1 or num_taps % 2 == 0:
        raise ValueError("num_taps must be a positive odd number")
    if not 0 < cutoff_hz <= rate_hz / 2:
        raise ValueError("cutoff must lie in (0, rate/2]")
    centre = (num_taps - 1) // 2
    offsets = np.arange(num_taps, dtype=np.float64) - centre
    normalised = 2.0 * cutoff_hz / rate_hz
    taps = normalised * np.sinc(normalised * offsets) * np.kaiser(num_taps, KAISER_BETA)
    taps *= gain / taps.sum()
    return taps


def resample_clip(
    samples: npt.NDArray[np.int16], in_rate: int, out_rate: int
) -> npt.NDArray[np.int16]:
    """A whole signal (a clip, not a stream) at ``out_rate``, aligned with the input.

    The resampler's group delay is trimmed and the result has
    ``len(samples) * out_rate // in_rate`` samples, so the converted clip starts and
    lasts as the original does.  Equal rates return ``samples`` itself.
    """
    if in_rate == out_rate:
        return samples
    resampler = StreamingResampler(in_rate, out_rate)
    lead = round(resampler.delay_out_samples)
    out = np.concatenate((resampler.process(samples), resampler.flush()))
    wanted = samples.size * out_rate // in_rate
    return out[lead : lead + wanted]


class StreamingResampler:
    """Convert a stream of int16 samples from ``in_rate`` to ``out_rate``, keeping state.

    Rates must be positive integers; any rational ratio works (the filter is
    designed at ``lcm(in_rate, out_rate)``).  Equal rates pass samples through
    unchanged with no delay.
    """

    __slots__ = (
        "_delay_upsampled",
        "_history",
        "_next_time",
        "_reversed_phases",
        "_total_in",
        "_total_out",
        "_window",
        "down",
        "in_rate",
        "out_rate",
        "taps",
        "up",
    )

    def __init__(self, in_rate: int, out_rate: int, *, max_delay_ms: float = 2.0) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError("sample rates must be positive")
        if max_delay_ms <= 0:
            raise ValueError("max_delay_ms must be positive")
        self.in_rate: Final = int(in_rate)
        self.out_rate: Final = int(out_rate)
        common = math.gcd(self.in_rate, self.out_rate)
        self.up: Final = self.out_rate // common
        """Interpolation factor L (output samples per ``down`` input samples)."""
        self.down: Final = self.in_rate // common
        """Decimation factor M."""
        if self.up == 1 and self.down == 1:
            taps = np.ones(1, dtype=np.float64)
        else:
            common_rate = self.in_rate * self.up
            half = math.floor(max_delay_ms * 1e-3 * common_rate + 1e-9)
            if half < 1:
                raise ValueError("max_delay_ms is too small for these rates")
            cutoff = min(self.in_rate, self.out_rate) / 2
            taps = design_lowpass(2 * half + 1, cutoff, common_rate, gain=float(self.up))
            # unity DC gain in every polyphase branch (no image tone on constant input)
            padded_len = -(-taps.size // self.up) * self.up
            padded = np.zeros(padded_len, dtype=np.float64)
            padded[: taps.size] = taps
            branches = padded.reshape(-1, self.up)
            taps = (branches / branches.sum(axis=0)).reshape(-1)[: taps.size]
        self.taps: Final[npt.NDArray[np.float64]] = taps
        """The prototype filter at the common rate (read-only)."""
        self.taps.setflags(write=False)
        self._window = -(-taps.size // self.up)  # taps per polyphase branch (K)
        padded = np.zeros(self._window * self.up, dtype=np.float64)
        padded[: taps.size] = taps
        # phases[p, i] = taps[p + i * up]; reversed so that it lines up with a forward window
        phases = padded.reshape(self._window, self.up).T
        self._reversed_phases = np.ascontiguousarray(phases[:, ::-1])
        self._delay_upsampled = (taps.size - 1) // 2
        self._history = np.zeros(self._window - 1, dtype=np.float64)
        self._next_time = (self._window - 1) * self.up
        self._total_in = 0
        self._total_out = 0

    @property
    def delay_s(self) -> float:
        """Group delay of the conversion, in seconds (constant: linear phase)."""
        return self._delay_upsampled / (self.in_rate * self.up)

    @property
    def delay_ns(self) -> int:
        """Group delay, rounded to integer nanoseconds."""
        return round(self._delay_upsampled * 1_000_000_000 / (self.in_rate * self.up))

    @property
    def delay_out_samples(self) -> float:
        """Group delay in output samples (may be fractional, e.g. 15.5 at 8 kHz for 16 -> 8 kHz)."""
        return self._delay_upsampled / self.down

    def reset(self) -> None:
        """Forget all state, as if newly created."""
        self._history[:] = 0.0
        self._next_time = (self._window - 1) * self.up
        self._total_in = 0
        self._total_out = 0

    def process(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """Convert the next chunk; returns as many output samples as are complete."""
        if samples.ndim != 1:
            raise ValueError("expected a mono (1-D) sample array")
        if self.up == 1 and self.down == 1:
            self._total_in += samples.size
            self._total_out += samples.size
            return samples.astype(np.int16, copy=True)
        out = self._filter(samples.astype(np.float64))
        self._total_in += samples.size
        self._total_out += out.size
        return out

    def flush(self) -> npt.NDArray[np.int16]:
        """Return the delayed tail of the signal, then reset.

        After ``flush`` the total output covers the whole input plus the group
        delay: ``ceil((n_in * up + delay) / down)`` samples.
        """
        if self.up == 1 and self.down == 1:
            self.reset()
            return np.zeros(0, dtype=np.int16)
        end = self._total_in * self.up + self._delay_upsampled
        wanted = -(-end // self.down) - self._total_out
        tail = self._filter(np.zeros(self._window + self.down + 1, dtype=np.float64))
        if wanted < tail.size:
            tail = tail[: max(wanted, 0)]
        self.reset()
        return tail

    def _filter(self, chunk: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
        up, down, window = self.up, self.down, self._window
        if self._history.size:
            buffer = np.concatenate((self._history, chunk))
        else:
            buffer = np.ascontiguousarray(chunk)
        size = buffer.size
        last_time = size * up - 1
        count = 0 if self._next_time > last_time else (last_time - self._next_time) // down + 1
        result = np.empty(count, dtype=np.float64)
        if count:
            step = buffer.strides[0]
            if up <= _PER_PHASE_LIMIT:
                # Outputs k, k + up, k + 2 up, ... share one phase and their input
                # windows start `down` samples apart: one strided view and one
                # mat-vec per phase, no copies.
                for offset in range(min(up, count)):
                    time = self._next_time + offset * down
                    first = time // up - window + 1
                    n = (count - offset + up - 1) // up
                    block = np.ndarray(
                        (n, window), np.float64, buffer, first * step, (down * step, step)
                    )
                    result[offset::up] = block @ self._reversed_phases[time % up]
            else:
                windows = np.ndarray(
                    (size - window + 1, window), np.float64, buffer, 0, (step, step)
                )
                times = self._next_time + down * np.arange(count, dtype=np.int64)
                gathered = windows[times // up - window + 1]
                result = np.einsum("nk,nk->n", gathered, self._reversed_phases[times % up])
        keep = window - 1
        if keep:
            self._history = buffer[size - keep :].copy()
        self._next_time += count * down - (size - keep) * up
        np.rint(result, out=result)
        np.clip(result, -32768, 32767, out=result)
        return result.astype(np.int16)


class _PcmCarry:
    """Holds the odd byte of a 16-bit PCM byte stream until its partner arrives."""

    __slots__ = ("_odd",)

    def __init__(self) -> None:
        self._odd = b""

    def take_samples(self, data: bytes | bytearray | memoryview) -> npt.NDArray[np.int16]:
        if self._odd:
            data = self._odd + bytes(data)
            self._odd = b""
        if len(data) % 2:
            self._odd = bytes(data[-1:])
            data = data[:-1]
        return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)

    @property
    def pending(self) -> int:
        return len(self._odd)

    def clear(self) -> None:
        self._odd = b""


class PcmToTwilio:
    """Stateful transcoder: pcm_s16le bytes at ``pcm_rate`` -> 8 kHz mu-law bytes (downlink).

    Input may be cut anywhere, even mid-sample: an odd trailing byte is kept
    for the next call.  Output length varies with the input; the playout buffer
    re-frames it.
    """

    __slots__ = ("_carry", "_resampler", "pcm_rate")

    def __init__(self, pcm_rate: int, *, max_delay_ms: float = 2.0) -> None:
        self.pcm_rate: Final = pcm_rate
        self._carry = _PcmCarry()
        self._resampler = StreamingResampler(pcm_rate, TWILIO_RATE, max_delay_ms=max_delay_ms)

    @property
    def delay_s(self) -> float:
        """Group delay added by the rate conversion (0 when ``pcm_rate`` is 8000)."""
        return self._resampler.delay_s

    @property
    def pending_bytes(self) -> int:
        """Input bytes held back (0 or 1: half a sample)."""
        return self._carry.pending

    def process(self, pcm: bytes | bytearray | memoryview) -> bytes:
        """Transcode the next chunk of PCM bytes."""
        samples = self._carry.take_samples(pcm)
        return mulaw.encode(self._resampler.process(samples))

    def flush(self) -> bytes:
        """Return the delayed tail (end of an utterance or of the call) and reset.

        A dangling half sample is dropped.
        """
        self._carry.clear()
        return mulaw.encode(self._resampler.flush())

    def reset(self) -> None:
        """Drop all state (e.g. on barge-in, so no tail of the old speech leaks out)."""
        self._carry.clear()
        self._resampler.reset()


class TwilioToPcm:
    """Stateful transcoder: 8 kHz mu-law bytes -> pcm_s16le bytes at ``pcm_rate`` (uplink)."""

    __slots__ = ("_resampler", "pcm_rate")

    def __init__(self, pcm_rate: int, *, max_delay_ms: float = 2.0) -> None:
        self.pcm_rate: Final = pcm_rate
        self._resampler = StreamingResampler(TWILIO_RATE, pcm_rate, max_delay_ms=max_delay_ms)

    @property
    def delay_s(self) -> float:
        """Group delay added by the rate conversion (0 when ``pcm_rate`` is 8000)."""
        return self._resampler.delay_s

    def process(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Transcode the next chunk of mu-law bytes."""
        samples = self._resampler.process(mulaw.decode(payload))
        return samples.astype("<i2", copy=False).tobytes()

    def flush(self) -> bytes:
        """Return the delayed tail and reset."""
        return self._resampler.flush().astype("<i2", copy=False).tobytes()

    def reset(self) -> None:
        """Drop all state."""
        self._resampler.reset()
