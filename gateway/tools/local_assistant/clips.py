"""The audio the local assistant speaks: WAV clips, read and converted to a call's format.

Three clips ship with the package in ``gateway/tools/clips/`` (8 kHz mu-law WAV,
about 150 KB in all): ``agent`` (10.9 s of an assistant speaking), ``caller``
(5.1 s) and ``interrupt`` (2.2 s). A clip is named by one of those names or
given as a path to a mono WAV file, 16-bit PCM at any rate or 8-bit mu-law.

:func:`clip_audio` returns a clip as raw bytes in a call's socket format
(:class:`~gateway.vapi.calls.AudioFormat`): mu-law at 8 kHz straight from the
file, anything else decoded with :mod:`gateway.audio.mulaw` and resampled
with :class:`~gateway.audio.resample.StreamingResampler` (the resampler's
2 ms group delay is trimmed, so the converted clip lasts as long as the
original). Results are cached per clip and format.

The 16 kHz versions of the clips are not shipped: the sources are telephone-band
recordings already, and they would add about 580 KB.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.audio import mulaw
from gateway.audio.resample import StreamingResampler
from gateway.vapi.calls import AudioFormat

__all__ = [
    "PACKAGED_CLIPS",
    "ClipError",
    "WavClip",
    "clip_audio",
    "clip_path",
    "read_wav",
]

PACKAGED_CLIPS: Final = ("agent", "caller", "interrupt")
"""Names of the clips shipped in ``gateway/tools/clips/`` (``<name>_8k_ulaw.wav``)."""

_WAVE_FORMAT_PCM: Final = 1
_WAVE_FORMAT_MULAW: Final = 7
_WAVE_FORMAT_EXTENSIBLE: Final = 0xFFFE


class ClipError(ValueError):
    """A clip name that is not known, or a WAV file this module cannot read."""


@dataclass(frozen=True)
class WavClip:
    """A mono clip as it was stored: mu-law bytes or little-endian 16-bit PCM bytes."""

    encoding: str  # "mulaw" or "pcm_s16le"
    sample_rate: int
    data: bytes

    @property
    def duration_ns(self) -> int:
        """The clip's length in integer nanoseconds."""
        samples = len(self.data) if self.encoding == "mulaw" else len(self.data) // 2
        return samples * 1_000_000_000 // self.sample_rate

    def samples(self) -> npt.NDArray[np.int16]:
        """The clip as int16 samples."""
        if self.encoding == "mulaw":
            return mulaw.decode(self.data)
        return np.frombuffer(self.data, dtype="<i2").astype(np.int16)


def clip_path(name: str) -> Path:
    """The file of a packaged clip name, or ``name`` itself if it names a ``.wav`` file."""
    if name in PACKAGED_CLIPS:
        packaged = resources.files("gateway.tools").joinpath(f"clips/{name}_8k_ulaw.wav")
        return Path(str(packaged))
    if name.lower().endswith(".wav"):
        return Path(name)
    raise ClipError(f"unknown clip {name!r}: use one of {', '.join(PACKAGED_CLIPS)} "
                    "or a path to a .wav file")


def read_wav(data: bytes) -> WavClip:
    """Parse a RIFF/WAVE file holding mono 16-bit PCM or 8-bit mu-law."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ClipError("not a RIFF/WAVE file")
    offset = 12
    fmt: tuple[int, int, int, int] | None = None
    while offset + 8 <= len(data):
        chunk_id = data[offset:offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = data[offset + 8:offset + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise ClipError("short fmt chunk")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                (tag,) = struct.unpack_from("<H", body, 24)  # the sub-format GUID's first field
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise ClipError("data chunk before the fmt chunk")
            return _clip_from(fmt, body)
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    raise ClipError("no data chunk")


def _clip_from(fmt: tuple[int, int, int, int], body: bytes) -> WavClip:
    tag, channels, rate, bits = fmt
    if channels != 1:
        raise ClipError(f"{channels} channels: only mono clips are supported")
    if not 8000 <= rate <= 48000:
        raise ClipError(f"sample rate {rate} Hz is outside 8000..48000")
    if tag == _WAVE_FORMAT_MULAW and bits == 8:
        return WavClip("mulaw", rate, bytes(body))
    if tag == _WAVE_FORMAT_PCM and bits == 16:
        return WavClip("pcm_s16le", rate, bytes(body[: len(body) // 2 * 2]))
    raise ClipError(f"WAV format {tag} with {bits} bits: only 16-bit PCM or 8-bit mu-law")


@functools.lru_cache(maxsize=8)
def _load(name: str) -> WavClip:
    path = clip_path(name)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ClipError(f"cannot read clip {name!r}: {error.strerror}") from None
    try:
        return read_wav(data)
    except ClipError as error:
        raise ClipError(f"clip {name!r}: {error}") from None


def _resampled(samples: npt.NDArray[np.int16], in_rate: int, out_rate: int
               ) -> npt.NDArray[np.int16]:
    """The whole clip at ``out_rate``, aligned (group delay trimmed) and of the same length."""
    if in_rate == out_rate:
        return samples
    resampler = StreamingResampler(in_rate, out_rate)
    lead = round(resampler.delay_out_samples)
    out = np.concatenate((resampler.process(samples), resampler.flush()))
    wanted = samples.size * out_rate // in_rate
    return out[lead:lead + wanted]


@functools.lru_cache(maxsize=32)
def clip_audio(name: str, audio: AudioFormat) -> bytes:
    """The clip ``name`` as raw bytes in the call's format (cached)."""
    clip = _load(name)
    if clip.encoding == audio.encoding and clip.sample_rate == audio.sample_rate:
        return clip.data
    samples = _resampled(clip.samples(), clip.sample_rate, audio.sample_rate)
    if audio.encoding == "mulaw":
        return mulaw.encode(samples)
    return samples.astype("<i2", copy=False).tobytes()
