"""G.711 mu-law tables checked bit for bit against a plain-Python copy of the ITU reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.audio import mulaw


def reference_ulaw_compress(sample: int) -> int:
    """ITU-T G.191 STL ``ulaw_compress`` for one 16-bit sample, written out plainly."""
    absno = ((~sample) >> 2) + 33 if sample < 0 else (sample >> 2) + 33
    absno = min(absno, 0x1FFF)
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    high_nibble = 0x0008 - segno
    low_nibble = 0x000F - ((absno >> segno) & 0x000F)
    code = (high_nibble << 4) | low_nibble
    if sample >= 0:
        code |= 0x0080
    return code


def reference_ulaw_expand(code: int) -> int:
    """ITU-T G.191 STL ``ulaw_expand`` for one code."""
    sign = -1 if code < 0x0080 else 1
    mantissa = ~code
    exponent = (mantissa >> 4) & 0x0007
    segment = exponent + 1
    mantissa &= 0x000F
    step = 4 << segment
    return sign * ((0x0080 << exponent) + step * mantissa + step // 2 - 4 * 33)


def test_decode_table_matches_reference_for_all_256_codes() -> None:
    expected = [reference_ulaw_expand(code) for code in range(256)]
    assert mulaw.MULAW_DECODE_TABLE.dtype == np.int16
    assert mulaw.MULAW_DECODE_TABLE.tolist() == expected
    assert mulaw.decode(bytes(range(256))).tolist() == expected


def test_encode_table_matches_reference_for_all_65536_inputs() -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    expected = bytes(reference_ulaw_compress(int(s)) for s in samples)
    assert mulaw.encode(samples) == expected
    assert mulaw.MULAW_ENCODE_TABLE[samples.view(np.uint16)].tobytes() == expected


def test_well_known_values() -> None:
    assert mulaw.MULAW_SILENCE == 0xFF
    assert mulaw.decode(b"\xff\x7f\x00\x80").tolist() == [0, 0, -32124, 32124]
    assert mulaw.encode(np.array([0, -1, 32767, -32768], dtype=np.int16)) == b"\xff\x7f\x80\x00"


def test_decode_then_encode_is_lossless_except_negative_zero() -> None:
    codes = bytes(range(256))
    again = mulaw.encode(mulaw.decode(codes))
    expected = bytearray(codes)
    expected[0x7F] = 0xFF  # both zeros decode to 0, which encodes as 0xFF
    assert again == bytes(expected)


def test_silence() -> None:
    assert mulaw.silence(160) == b"\xff" * 160
    assert mulaw.silence(3) == b"\xff\xff\xff"
    assert mulaw.silence(0) == b""
    assert not mulaw.decode(mulaw.silence(160)).any()


def test_pcm16_byte_helpers() -> None:
    samples = np.array([0, 1000, -1000, 32767, -32768], dtype=np.int16)
    pcm = samples.astype("<i2").tobytes()
    assert mulaw.encode_pcm16_bytes(pcm) == mulaw.encode(samples)
    decoded = mulaw.decode_to_pcm16_bytes(mulaw.encode(samples))
    assert np.frombuffer(decoded, "<i2").tolist() == mulaw.decode(mulaw.encode(samples)).tolist()
    with pytest.raises(ValueError, match="even"):
        mulaw.encode_pcm16_bytes(b"\x00\x01\x02")


def test_encode_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError):
        mulaw.encode(np.zeros(4, dtype=np.int32))


def test_decode_accepts_buffers_and_tables_are_read_only() -> None:
    data = bytearray(b"\x00\xff\x80")
    assert mulaw.decode(memoryview(data)).tolist() == mulaw.decode(bytes(data)).tolist()
    with pytest.raises(ValueError):
        mulaw.MULAW_DECODE_TABLE[0] = 1
    with pytest.raises(ValueError):
        mulaw.MULAW_ENCODE_TABLE[0] = 1


@given(hnp.arrays(np.int16, st.integers(0, 400)))
def test_round_trip_error_is_within_half_a_quantisation_step(samples: np.ndarray) -> None:
    back = mulaw.decode(mulaw.encode(samples)).astype(np.int32)
    error = np.abs(back - samples.astype(np.int32))
    # segment step is 8 << exponent; the bias and clipping keep the error within a step
    assert np.all(error <= np.abs(samples.astype(np.int32)) // 16 + 8)
