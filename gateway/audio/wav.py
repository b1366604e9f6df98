"""WAV files of mono telephone audio: the one RIFF/WAVE reader and writer of the project.

The developer tools and benchmarks use it: the call simulator's caller clips and its
recording of what the caller heard, the local assistant's clips, the audio benchmarks.
(The daemon's own call recordings are written as they grow, by
:mod:`gateway.bridge.recording`.)

Sans-io at the core: :func:`parse_wav` turns the bytes of a file into a
:class:`WavClip` (the samples as stored, their rate and encoding) and
:func:`encode_wav` turns a clip back into the bytes of a file; :func:`read_wav` and
:func:`write_wav` are thin file wrappers.  :meth:`WavClip.converted` changes a clip's
encoding and rate with the gateway's own G.711 tables (:mod:`gateway.audio.mulaw`) and
resampler (:func:`gateway.audio.resample.resample_clip`), so a converted clip lines up
with the original.

What is read: mono only; G.711 mu-law (format tag 7, 8 bits; the stdlib :mod:`wave`
module cannot read it) or 16-bit little-endian PCM (tag 1), either also as
``WAVE_FORMAT_EXTENSIBLE`` with that sub-format; any positive rate.  Chunks other than
``fmt`` and ``data`` (``fact``, ``LIST``, ``cue`` ...) are skipped, and chunks of odd
size are followed by their pad byte, as RIFF requires.  The RIFF size field is not
trusted, and a ``data`` chunk that runs past the end of the file (a writer that
stopped early) gives the audio that is there; an odd trailing byte of 16-bit PCM is
dropped.  Anything else raises :class:`WavError`, whose message says what is wrong.

What is written: mono, 16-bit PCM (the canonical 44-byte header, byte for byte what
:mod:`wave` writes) or mu-law (an 18-byte ``fmt`` and the ``fact`` chunk that non-PCM
formats carry, then ``data`` and its pad byte).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from gateway.audio import mulaw
from gateway.audio.resample import resample_clip

__all__ = [
    "FORMAT_EXTENSIBLE",
    "FORMAT_MULAW",
    "FORMAT_PCM",
    "WavClip",
    "WavEncoding",
    "WavError",
    "encode_wav",
    "parse_wav",
    "read_wav",
    "write_wav",
]

WavEncoding = Literal["mulaw", "pcm_s16le"]
"""How a clip's samples are stored (the names of the call socket's audio formats)."""

FORMAT_PCM: Final = 1
FORMAT_MULAW: Final = 7
FORMAT_EXTENSIBLE: Final = 0xFFFE
"""``fmt`` format tags; an extensible format's real tag opens its sub-format GUID."""

_RIFF_HEADER: Final = struct.Struct("<4sI4s")
_CHUNK_HEADER: Final = struct.Struct("<4sI")
_FMT: Final = struct.Struct("<HHIIHH")  # tag, channels, rate, byte rate, block align, bits
_SUBFORMAT_OFFSET: Final = 24  # in an extensible fmt chunk (after cbSize and two fields)
_BYTES_PER_SAMPLE: Final[dict[str, int]] = {"mulaw": 1, "pcm_s16le": 2}
_NS_PER_SECOND: Final = 1_000_000_000


class WavError(ValueError):
    """Bytes or a file that are not a WAV file this module reads; the message says why."""


@dataclass(frozen=True)
class WavClip:
    """Mono audio as a WAV file stores it: mu-law bytes or 16-bit little-endian PCM bytes."""

    encoding: WavEncoding
    sample_rate: int
    data: bytes

    def __post_init__(self) -> None:
        if self.encoding not in _BYTES_PER_SAMPLE:
            raise ValueError(f"encoding must be 'mulaw' or 'pcm_s16le', not {self.encoding!r}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample rate must be positive, not {self.sample_rate}")
        if len(self.data) % _BYTES_PER_SAMPLE[self.encoding]:
            raise ValueError("16-bit PCM data must have an even number of bytes")

    @property
    def sample_count(self) -> int:
        """Samples in the clip."""
        return len(self.data) // _BYTES_PER_SAMPLE[self.encoding]

    @property
    def duration_ns(self) -> int:
        """The clip's length in integer nanoseconds."""
        return self.sample_count * _NS_PER_SECOND // self.sample_rate

    def samples(self) -> npt.NDArray[np.int16]:
        """The clip as a new array of int16 samples."""
        if self.encoding == "mulaw":
            return mulaw.decode(self.data)
        return np.frombuffer(self.data, dtype="<i2").astype(np.int16)

    def converted(self, encoding: WavEncoding, sample_rate: int) -> WavClip:
        """The clip in ``encoding`` at ``sample_rate`` (itself when it already is).

        A new rate is reached with :func:`~gateway.audio.resample.resample_clip`: the
        result starts with the original and has ``sample_count * new // old`` samples.
        """
        if encoding == self.encoding and sample_rate == self.sample_rate:
            return self
        samples = resample_clip(self.samples(), self.sample_rate, sample_rate)
        if encoding == "mulaw":
            return WavClip(encoding, sample_rate, mulaw.encode(samples))
        return WavClip(encoding, sample_rate, samples.astype("<i2", copy=False).tobytes())


def parse_wav(blob: bytes | bytearray) -> WavClip:
    """The clip in the bytes of a WAV file; :class:`WavError` says why not."""
    if len(blob) < _RIFF_HEADER.size:
        raise WavError(f"not a WAVE file: {len(blob)} bytes, shorter than a RIFF header")
    riff, _, wave_id = _RIFF_HEADER.unpack_from(blob)
    if riff != b"RIFF" or wave_id != b"WAVE":
        raise WavError("not a WAVE file: no RIFF/WAVE header")
    position = _RIFF_HEADER.size
    fmt: tuple[int, int, int, int] | None = None  # format tag, channels, rate, bits
    while position + _CHUNK_HEADER.size <= len(blob):
        chunk_id, size = _CHUNK_HEADER.unpack_from(blob, position)
        start = position + _CHUNK_HEADER.size
        body = bytes(blob[start : start + size])
        if chunk_id == b"fmt ":
            fmt = _read_fmt(body)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavError("the data chunk comes before the fmt chunk")
            return _clip(fmt, body)
        position = start + size + (size & 1)  # chunks are padded to an even length
    raise WavError("no data chunk" if fmt is not None else "no fmt chunk")


def _read_fmt(body: bytes) -> tuple[int, int, int, int]:
    if len(body) < _FMT.size:
        raise WavError(f"fmt chunk of {len(body)} bytes is too short ({_FMT.size} at least)")
    tag, channels, rate, _, _, bits = _FMT.unpack_from(body)
    if tag == FORMAT_EXTENSIBLE and len(body) >= _SUBFORMAT_OFFSET + 2:
        (tag,) = struct.unpack_from("<H", body, _SUBFORMAT_OFFSET)
    if channels != 1:
        raise WavError(f"{channels} channels: only mono is supported")
    if rate == 0:
        raise WavError("sample rate of 0 Hz")
    return tag, channels, rate, bits


def _clip(fmt: tuple[int, int, int, int], data: bytes) -> WavClip:
    tag, _, rate, bits = fmt
    if tag == FORMAT_MULAW and bits == 8:
        return WavClip("mulaw", rate, data)
    if tag == FORMAT_PCM and bits == 16:
        return WavClip("pcm_s16le", rate, data[: len(data) & ~1])
    raise WavError(f"format {tag} with {bits} bits: only 16-bit PCM or 8-bit mu-law")


def encode_wav(clip: WavClip) -> bytes:
    """The bytes of a mono WAV file holding ``clip`` (see the module docstring)."""
    size = len(clip.data)
    rate = clip.sample_rate
    if clip.encoding == "pcm_s16le":
        fmt = _FMT.pack(FORMAT_PCM, 1, rate, rate * 2, 2, 16)
        chunks = [(b"fmt ", fmt), (b"data", clip.data)]
    else:
        fmt = _FMT.pack(FORMAT_MULAW, 1, rate, rate, 1, 8) + b"\x00\x00"  # cbSize 0
        chunks = [(b"fmt ", fmt), (b"fact", struct.pack("<I", size)), (b"data", clip.data)]
    body = b"".join(_CHUNK_HEADER.pack(chunk_id, len(content)) + content
                    + (b"\x00" if len(content) & 1 else b"") for chunk_id, content in chunks)
    return _RIFF_HEADER.pack(b"RIFF", 4 + len(body), b"WAVE") + body


def read_wav(path: str | Path) -> WavClip:
    """The clip in the WAV file at ``path``; a :class:`WavError` message starts with it."""
    try:
        blob = Path(path).read_bytes()
    except OSError as error:
        raise WavError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return parse_wav(blob)
    except WavError as error:
        raise WavError(f"{path}: {error}") from None


def write_wav(path: str | Path, clip: WavClip) -> None:
    """Write ``clip`` as a WAV file at ``path`` (replacing it); ``OSError`` as it comes."""
    Path(path).write_bytes(encode_wav(clip))
