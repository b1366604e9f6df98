"""WAV files in and out of the call simulator: caller clips as 20 ms mu-law frames,
and the recording of what the caller heard.

Read: mono WAVE files, either G.711 mu-law at 8000 Hz (format tag 7, which the
stdlib ``wave`` module cannot read) or 16-bit PCM at any rate (format tag 1, or
WAVE_FORMAT_EXTENSIBLE with the PCM sub-format), converted to 8 kHz mu-law with the
gateway's own streaming resampler and G.711 tables (:mod:`gateway.audio`).

Write: 8 kHz mono, mu-law (format tag 7, with the ``fact`` chunk non-PCM formats
carry) or 16-bit PCM.
"""

from __future__ import annotations

import binascii
import struct
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from gateway.audio import mulaw
from gateway.audio.playout import FRAME_BYTES
from gateway.audio.resample import TWILIO_RATE, PcmToTwilio

__all__ = [
    "SILENCE_FRAME",
    "SILENCE_FRAME_BASE64",
    "CallerAudio",
    "RecordingFormat",
    "WavError",
    "read_wav_as_mulaw",
    "write_wav",
]

RecordingFormat = Literal["mulaw", "pcm16"]

SILENCE_FRAME: Final = mulaw.silence(FRAME_BYTES)
"""20 ms of mu-law silence (0xFF)."""
SILENCE_FRAME_BASE64: Final = binascii.b2a_base64(SILENCE_FRAME, newline=False)
"""The same, as the base64 text of a ``media`` payload."""

_FORMAT_PCM: Final = 1
_FORMAT_MULAW: Final = 7
_FORMAT_EXTENSIBLE: Final = 0xFFFE
_RIFF_HEADER: Final = struct.Struct("<4sI4s")
_CHUNK_HEADER: Final = struct.Struct("<4sI")
_FMT: Final = struct.Struct("<HHIIHH")


class WavError(ValueError):
    """The file is not a WAVE file the simulator can use; the message says why."""


def read_wav_as_mulaw(path: str | Path) -> bytes:
    """The audio of a mono WAVE file as 8 kHz mu-law bytes."""
    try:
        blob = Path(path).read_bytes()
    except OSError as error:
        raise WavError(f"{path}: cannot read: {error.strerror}") from None
    if len(blob) < _RIFF_HEADER.size:
        raise WavError(f"{path}: not a WAVE file")
    riff, _, wave_id = _RIFF_HEADER.unpack_from(blob)
    if riff != b"RIFF" or wave_id != b"WAVE":
        raise WavError(f"{path}: not a WAVE file")
    position = _RIFF_HEADER.size
    fmt: tuple[int, int, int, int] | None = None  # format tag, channels, rate, bits
    while position + _CHUNK_HEADER.size <= len(blob):
        chunk_id, size = _CHUNK_HEADER.unpack_from(blob, position)
        body = blob[position + _CHUNK_HEADER.size : position + _CHUNK_HEADER.size + size]
        if chunk_id == b"fmt ":
            fmt = _read_fmt(path, body)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavError(f"{path}: data chunk before the fmt chunk")
            return _to_mulaw(path, fmt, body)
        position += _CHUNK_HEADER.size + size + (size & 1)
    raise WavError(f"{path}: no data chunk")


def _read_fmt(path: str | Path, body: bytes) -> tuple[int, int, int, int]:
    if len(body) < _FMT.size:
        raise WavError(f"{path}: fmt chunk too short")
    tag, channels, rate, _, _, bits = _FMT.unpack_from(body)
    if tag == _FORMAT_EXTENSIBLE and len(body) >= 26:
        (tag,) = struct.unpack_from("<H", body, 24)  # first two bytes of the sub-format GUID
    if channels != 1:
        raise WavError(f"{path}: {channels} channels; the simulator needs mono")
    return tag, channels, rate, bits


def _to_mulaw(path: str | Path, fmt: tuple[int, int, int, int], data: bytes) -> bytes:
    tag, _, rate, bits = fmt
    if tag == _FORMAT_MULAW:
        if rate != TWILIO_RATE:
            raise WavError(f"{path}: mu-law at {rate} Hz; only 8000 Hz mu-law is accepted")
        return data
    if tag == _FORMAT_PCM and bits == 16:
        converter = PcmToTwilio(rate)
        return converter.process(data[: len(data) & ~1]) + converter.flush()
    raise WavError(
        f"{path}: format {tag} with {bits} bits; use 8 kHz mu-law or 16-bit PCM"
    )


def write_wav(path: str | Path, audio: bytes | bytearray, encoding: RecordingFormat) -> None:
    """Write 8 kHz mono mu-law ``audio`` as a WAVE file in ``encoding``."""
    if encoding == "pcm16":
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(TWILIO_RATE)
            out.writeframes(mulaw.decode_to_pcm16_bytes(audio))
        return
    size = len(audio)
    pad = b"\x00" if size & 1 else b""
    fmt = _FMT.pack(_FORMAT_MULAW, 1, TWILIO_RATE, TWILIO_RATE, 1, 8) + b"\x00\x00"
    chunks = b"".join((
        _CHUNK_HEADER.pack(b"fmt ", len(fmt)), fmt,
        _CHUNK_HEADER.pack(b"fact", 4), struct.pack("<I", size),
        _CHUNK_HEADER.pack(b"data", size), bytes(audio), pad,
    ))
    Path(path).write_bytes(_RIFF_HEADER.pack(b"RIFF", 4 + len(chunks), b"WAVE") + chunks)


class CallerAudio:
    """A clip the simulated caller says: whole 20 ms mu-law frames and their base64.

    The base64 text of every frame is computed once here, so a clip shared by many
    simulated calls costs nothing per frame sent.  The last frame is padded with
    silence.
    """

    __slots__ = ("encoded_frames", "frames", "name")

    def __init__(self, audio: bytes, name: str = "clip") -> None:
        remainder = len(audio) % FRAME_BYTES
        if remainder:
            audio += mulaw.silence(FRAME_BYTES - remainder)
        self.name: Final = name
        self.frames: Final[Sequence[bytes]] = tuple(
            audio[i : i + FRAME_BYTES] for i in range(0, len(audio), FRAME_BYTES)
        )
        self.encoded_frames: Final[Sequence[bytes]] = tuple(
            binascii.b2a_base64(frame, newline=False) for frame in self.frames
        )

    @classmethod
    def from_wav(cls, path: str | Path) -> CallerAudio:
        """Read a clip (see :func:`read_wav_as_mulaw`)."""
        return cls(read_wav_as_mulaw(path), name=Path(path).name)

    @property
    def duration_ms(self) -> int:
        """Length in milliseconds (whole frames)."""
        return len(self.frames) * 20

    def __repr__(self) -> str:
        return f"<CallerAudio {self.name} {self.duration_ms} ms>"
