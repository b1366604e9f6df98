"""The audio the local assistant speaks: WAV clips, read and converted to a call's format.

Three clips ship with the tools (:data:`gateway.tools.PACKAGED_CLIPS`, 8 kHz mu-law
WAV in ``gateway/tools/clips/``): ``agent`` (10.9 s of an assistant speaking),
``caller`` (5.1 s) and ``interrupt`` (2.2 s). A clip is named by one of those names
or given as a path to a mono WAV file, 16-bit PCM or 8-bit mu-law at 8000..48000 Hz
(read by :mod:`gateway.audio.wav`).

:func:`clip_audio` returns a clip as raw bytes in a call's socket format
(:class:`~gateway.vapi.calls.AudioFormat`): mu-law at 8 kHz straight from the
file, anything else converted by :meth:`~gateway.audio.wav.WavClip.converted`
(the resampler's 2 ms group delay is trimmed, so the converted clip lasts as long
as the original). Results are cached per clip and format.

The 16 kHz versions of the clips are not shipped: the sources are telephone-band
recordings already, and they would add about 580 KB.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Final

from gateway.audio import wav
from gateway.audio.wav import WavClip, WavError
from gateway.tools import PACKAGED_CLIPS, packaged_clip
from gateway.vapi.calls import AudioFormat

__all__ = [
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "PACKAGED_CLIPS",
    "ClipError",
    "WavClip",
    "clip_audio",
    "clip_path",
    "read_wav",
]

MIN_SAMPLE_RATE: Final = 8000
MAX_SAMPLE_RATE: Final = 48000
"""The sample rates the local assistant handles, in clips and in calls."""


class ClipError(WavError):
    """A clip name that is not known, or a WAV file this module cannot read."""


def clip_path(name: str) -> Path:
    """The file of a packaged clip name, or ``name`` itself if it names a ``.wav`` file."""
    if name in PACKAGED_CLIPS:
        return packaged_clip(name)
    if name.lower().endswith(".wav"):
        return Path(name)
    raise ClipError(f"unknown clip {name!r}: use one of {', '.join(PACKAGED_CLIPS)} "
                    "or a path to a .wav file")


def read_wav(data: bytes) -> WavClip:
    """Parse a WAV file the local assistant can play (mono 16-bit PCM or 8-bit mu-law,
    8000..48000 Hz); :class:`ClipError` otherwise."""
    try:
        return _playable(wav.parse_wav(data))
    except WavError as error:
        raise ClipError(str(error)) from None


def _playable(clip: WavClip) -> WavClip:
    if not MIN_SAMPLE_RATE <= clip.sample_rate <= MAX_SAMPLE_RATE:
        raise ClipError(f"sample rate {clip.sample_rate} Hz is outside "
                        f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
    return clip


@functools.lru_cache(maxsize=8)
def _load(name: str) -> WavClip:
    path = clip_path(name)
    try:
        return _playable(wav.read_wav(path))
    except WavError as error:
        raise ClipError(f"clip {name!r}: {error}") from None


@functools.lru_cache(maxsize=32)
def clip_audio(name: str, audio: AudioFormat) -> bytes:
    """The clip ``name`` as raw bytes in the call's format (cached)."""
    return _load(name).converted(audio.encoding, audio.sample_rate).data
