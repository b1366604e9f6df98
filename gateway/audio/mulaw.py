"""G.711 mu-law encoding and decoding with numpy lookup tables.

Twilio Media Streams and (in its ``mulaw`` format) Vapi's call socket carry
8 kHz mu-law: one byte per sample, 160 bytes per 20 ms frame.  The stdlib
``audioop`` module is gone in Python 3.13, so the codec lives here.

Both tables are built once, at import, from the ITU-T reference algorithm (the
``ulaw_compress`` / ``ulaw_expand`` routines of the G.191 Software Tool Library,
the reference implementation of G.711):

- decoding is a 256-entry ``int16`` table indexed by the code byte;
- encoding is a 65536-entry ``uint8`` table indexed by the ``uint16`` view of
  the 16-bit sample, so a whole frame is one ``take``.

Note on compatibility: the reference encoder quantises a negative sample ``x``
by the magnitude ``(~x) >> 2`` (one's complement), as G.191 does.  The old
Sun/CCITT ``g711.c`` code (and therefore ``audioop.lin2ulaw``) uses
``(-x) >> 2`` instead and, for negative samples only, sometimes picks the next
code up (508 of the 65536 inputs differ, each by one step).  Decoding is
identical in both.  Both encoders give the decoder's own
output values back unchanged, so a decode/encode round trip is lossless
(except that the code 0x7F, "negative zero", comes back as 0xFF).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MULAW_DECODE_TABLE",
    "MULAW_ENCODE_TABLE",
    "MULAW_SILENCE",
    "decode",
    "decode_to_pcm16_bytes",
    "encode",
    "encode_pcm16_bytes",
    "silence",
]

MULAW_SILENCE: Final = 0xFF
"""The mu-law code for a zero sample (what Twilio and Vapi treat as silence)."""

_BIAS: Final = 33  # the reference algorithm's bias, on the 14-bit magnitude
_CLIP: Final = 0x1FFF  # largest biased 14-bit magnitude


def _build_decode_table() -> npt.NDArray[np.int16]:
    """Expand every code with the reference ``ulaw_expand`` arithmetic (vectorised)."""
    codes = np.arange(256, dtype=np.int32)
    sign = np.where(codes < 0x80, -1, 1)
    inverted = ~codes
    exponent = (inverted >> 4) & 0x07
    mantissa = inverted & 0x0F
    step = 4 << (exponent + 1)
    magnitude = (0x80 << exponent) + step * mantissa + step // 2 - 4 * _BIAS
    table: npt.NDArray[np.int16] = (sign * magnitude).astype(np.int16)
    return table


def _build_encode_table() -> npt.NDArray[np.uint8]:
    """Compress every int16 value with the reference ``ulaw_compress`` arithmetic.

    The table is indexed by the sample's bit pattern read as ``uint16``.
    """
    samples = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)
    negative = samples < 0
    magnitude = np.where(negative, (~samples) >> 2, samples >> 2) + _BIAS
    magnitude = np.minimum(magnitude, _CLIP)
    # segment number: 1 + position of the highest set bit of (magnitude >> 6), 1..8
    segment = np.ones_like(magnitude)
    shifted = magnitude >> 6
    while np.any(shifted):
        segment += shifted != 0
        shifted >>= 1
    high_nibble = 8 - segment
    low_nibble = 0x0F - ((magnitude >> segment) & 0x0F)
    code = (high_nibble << 4) | low_nibble
    code = np.where(negative, code, code | 0x80)
    table: npt.NDArray[np.uint8] = code.astype(np.uint8)
    return table


MULAW_DECODE_TABLE: Final[npt.NDArray[np.int16]] = _build_decode_table()
"""256 int16 values: ``MULAW_DECODE_TABLE[code]`` is the linear sample."""
MULAW_DECODE_TABLE.setflags(write=False)

MULAW_ENCODE_TABLE: Final[npt.NDArray[np.uint8]] = _build_encode_table()
"""65536 codes: ``MULAW_ENCODE_TABLE[sample.view(uint16)]`` is the mu-law byte."""
MULAW_ENCODE_TABLE.setflags(write=False)


def decode(data: bytes | bytearray | memoryview) -> npt.NDArray[np.int16]:
    """Decode mu-law bytes into a new int16 array (one sample per byte)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    return MULAW_DECODE_TABLE.take(codes)


def encode(samples: npt.NDArray[np.int16]) -> bytes:
    """Encode int16 samples into mu-law bytes (one byte per sample)."""
    if samples.dtype != np.int16:
        raise TypeError(f"mu-law encoding needs int16 samples, not {samples.dtype}")
    return MULAW_ENCODE_TABLE.take(samples.view(np.uint16)).tobytes()


def decode_to_pcm16_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """Decode mu-law bytes into little-endian 16-bit PCM bytes at the same rate."""
    return decode(data).astype("<i2", copy=False).tobytes()


def encode_pcm16_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """Encode little-endian 16-bit PCM bytes (even length) into mu-law bytes."""
    if len(data) % 2:
        raise ValueError("16-bit PCM input must have an even number of bytes")
    samples = np.frombuffer(data, dtype="<i2")
    return MULAW_ENCODE_TABLE.take(samples.view("<u2")).tobytes()


_SILENCE_FRAME: Final = bytes([MULAW_SILENCE]) * 160


def silence(n_bytes: int) -> bytes:
    """Return ``n_bytes`` of mu-law silence (``0xFF`` bytes)."""
    if n_bytes == len(_SILENCE_FRAME):
        return _SILENCE_FRAME
    return bytes([MULAW_SILENCE]) * n_bytes
