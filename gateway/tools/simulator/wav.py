"""The call simulator's audio: caller clips as 20 ms mu-law frames, and the recording of
what the caller heard, as WAV files through :mod:`gateway.audio.wav`.

Caller clips are read as that module reads them (mono, 8-bit mu-law or 16-bit PCM at
any rate) and converted to what Twilio sends: 8 kHz mu-law.  Recordings are written
at 8 kHz, mu-law (``--record-format mulaw``) or 16-bit PCM (``pcm16``).
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from gateway.audio import mulaw, wav
from gateway.audio.playout import FRAME_BYTES
from gateway.audio.resample import TWILIO_RATE
from gateway.audio.wav import WavError

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

_RECORDING_ENCODINGS: Final[dict[RecordingFormat, wav.WavEncoding]] = {
    "mulaw": "mulaw", "pcm16": "pcm_s16le"}


def read_wav_as_mulaw(path: str | Path) -> bytes:
    """The audio of a mono WAV file as 8 kHz mu-law bytes (:class:`WavError` if unusable)."""
    return wav.read_wav(path).converted("mulaw", TWILIO_RATE).data


def write_wav(path: str | Path, audio: bytes | bytearray, encoding: RecordingFormat) -> None:
    """Write 8 kHz mono mu-law ``audio`` as a WAV file in ``encoding``."""
    heard = wav.WavClip("mulaw", TWILIO_RATE, bytes(audio))
    wav.write_wav(path, heard.converted(_RECORDING_ENCODINGS[encoding], TWILIO_RATE))


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
