"""The WAV reader and writer (gateway.audio.wav): files built chunk by chunk, the stdlib's
own output, the packaged clips, and every way a file can be unusable."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from gateway.audio import mulaw
from gateway.audio.wav import (
    FORMAT_EXTENSIBLE,
    FORMAT_MULAW,
    FORMAT_PCM,
    WavClip,
    WavError,
    encode_wav,
    parse_wav,
    read_wav,
    write_wav,
)
from gateway.tools import PACKAGED_CLIPS, packaged_clip

PCM_BYTES = struct.pack("<4h", 0, 1000, -1000, 32767)
MULAW_BYTES = bytes([0xFF, 0x80, 0x00, 0x7F, 0x10])  # odd length: the data chunk is padded


def chunk(chunk_id: bytes, body: bytes, *, pad: bool = True) -> bytes:
    """One RIFF chunk: id, size, body and (for an odd size) its pad byte."""
    return chunk_id + struct.pack("<I", len(body)) + body + (b"\x00" if pad and len(body) & 1
                                                              else b"")


def fmt(tag: int = FORMAT_PCM, bits: int = 16, rate: int = 8000, channels: int = 1,
        extra: bytes = b"") -> bytes:
    block = channels * bits // 8
    return chunk(b"fmt ", struct.pack("<HHIIHH", tag, channels, rate, rate * block, block,
                                      bits) + extra)


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def extensible(sub_format: int, bits: int) -> bytes:
    """A WAVE_FORMAT_EXTENSIBLE fmt chunk: cbSize 22, valid bits, channel mask, GUID."""
    guid = struct.pack("<H", sub_format) + bytes.fromhex("000000001000800000aa00389b71")
    return fmt(FORMAT_EXTENSIBLE, bits, extra=struct.pack("<HHI", 22, bits, 4) + guid)


def stdlib_wav(folder: Path, rate: int) -> Path:
    """``PCM_BYTES`` written by the stdlib's ``wave`` module, mono 16-bit at ``rate``."""
    path = folder / "stdlib.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(PCM_BYTES)
    return path


# -- reading -------------------------------------------------------------------------------


def test_pcm16_and_mulaw_files_are_read_as_stored() -> None:
    pcm = parse_wav(riff(fmt(FORMAT_PCM, 16, 16000), chunk(b"data", PCM_BYTES)))
    assert pcm == WavClip("pcm_s16le", 16000, PCM_BYTES)
    assert pcm.samples().tolist() == [0, 1000, -1000, 32767] and pcm.samples().dtype == np.int16
    law = parse_wav(riff(fmt(FORMAT_MULAW, 8), chunk(b"fact", struct.pack("<I", 5)),
                         chunk(b"data", MULAW_BYTES)))
    assert law == WavClip("mulaw", 8000, MULAW_BYTES)
    assert law.samples().tolist() == mulaw.decode(MULAW_BYTES).tolist()


def test_extra_and_odd_sized_chunks_are_skipped_with_their_pad_byte() -> None:
    odd_list = chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00Lavf\x00")  # 17 bytes, then a pad
    assert len(odd_list) == 8 + 17 + 1
    blob = riff(chunk(b"JUNK", b"\x00" * 3), fmt(FORMAT_MULAW, 8), odd_list,
                chunk(b"fact", struct.pack("<I", 5)), chunk(b"data", MULAW_BYTES),
                chunk(b"cue ", b"\x01" * 7))
    assert parse_wav(blob).data == MULAW_BYTES  # the data's own pad byte is not audio
    assert parse_wav(bytearray(blob)).data == MULAW_BYTES


def test_extensible_formats_are_read_by_their_sub_format() -> None:
    assert parse_wav(riff(extensible(FORMAT_PCM, 16), chunk(b"data", PCM_BYTES))).encoding == (
        "pcm_s16le")
    assert parse_wav(riff(extensible(FORMAT_MULAW, 8), chunk(b"data", MULAW_BYTES))).encoding == (
        "mulaw")
    with pytest.raises(WavError, match="format 65534"):  # no room for the sub-format
        parse_wav(riff(fmt(FORMAT_EXTENSIBLE, 16), chunk(b"data", PCM_BYTES)))


def test_a_cut_short_data_chunk_gives_the_audio_that_is_there() -> None:
    whole = riff(fmt(FORMAT_PCM, 16), chunk(b"data", PCM_BYTES))
    assert parse_wav(whole[:-3]).data == PCM_BYTES[:4]  # and the odd byte is dropped
    law = riff(fmt(FORMAT_MULAW, 8), chunk(b"data", MULAW_BYTES))
    assert parse_wav(law[:-3]).data == MULAW_BYTES[:3]
    assert parse_wav(riff(fmt(), chunk(b"data", b""))).sample_count == 0


def test_files_written_by_the_stdlib_wave_module_are_read(tmp_path: Path) -> None:
    path = stdlib_wav(tmp_path, 22050)
    assert read_wav(path) == WavClip("pcm_s16le", 22050, PCM_BYTES)


@pytest.mark.parametrize("name", PACKAGED_CLIPS)
def test_the_packaged_clips_are_8k_mulaw(name: str) -> None:
    clip = read_wav(packaged_clip(name))
    assert (clip.encoding, clip.sample_rate) == ("mulaw", 8000)
    assert 2_000_000_000 < clip.duration_ns < 12_000_000_000


@pytest.mark.parametrize(("blob", "reason"), [
    (b"", "not a WAVE file: 0 bytes"),
    (b"RIFF\x04\x00\x00", "not a WAVE file: 7 bytes"),
    (b"hello, this is text", "not a WAVE file: no RIFF/WAVE header"),
    (b"RIFX" + riff(fmt())[4:], "no RIFF/WAVE header"),
    (b"RIFF\x04\x00\x00\x00AVI ", "no RIFF/WAVE header"),
    (riff(), "no fmt chunk"),
    (riff(fmt()), "no data chunk"),
    (riff(fmt()) + b"dat", "no data chunk"),  # a chunk header cut short
    (riff(chunk(b"data", PCM_BYTES), fmt()), "data chunk comes before the fmt chunk"),
    (riff(chunk(b"fmt ", b"\x01\x00\x01\x00"), chunk(b"data", PCM_BYTES)),
     "fmt chunk of 4 bytes is too short"),
    (riff(fmt())[:-6], "fmt chunk of 10 bytes is too short"),  # the file ends inside fmt
    (riff(fmt(channels=2), chunk(b"data", PCM_BYTES)), "2 channels: only mono"),
    (riff(fmt(channels=0), chunk(b"data", b"")), "0 channels"),
    (riff(fmt(rate=0), chunk(b"data", PCM_BYTES)), "sample rate of 0 Hz"),
    (riff(fmt(FORMAT_PCM, 24), chunk(b"data", b"\x00" * 6)), "format 1 with 24 bits"),
    (riff(fmt(FORMAT_PCM, 8), chunk(b"data", b"\x80")), "format 1 with 8 bits"),
    (riff(fmt(3, 32), chunk(b"data", b"\x00" * 8)), "format 3 with 32 bits"),
    (riff(fmt(FORMAT_MULAW, 16), chunk(b"data", b"\x00" * 8)), "format 7 with 16 bits"),
])
def test_unusable_files_are_refused_with_the_reason(blob: bytes, reason: str) -> None:
    with pytest.raises(WavError, match=reason):
        parse_wav(blob)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WavError, match=r"missing\.wav: cannot read: No such file"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(WavError, match=r"text\.wav: not a WAVE file"):
        read_wav(tmp_path / "text.wav")
    assert issubclass(WavError, ValueError)


# -- writing -------------------------------------------------------------------------------


def test_pcm16_is_written_byte_for_byte_as_the_stdlib_writes_it(tmp_path: Path) -> None:
    path = stdlib_wav(tmp_path, 16000)
    assert encode_wav(WavClip("pcm_s16le", 16000, PCM_BYTES)) == path.read_bytes()


def test_mulaw_is_written_with_fact_and_a_pad_byte() -> None:
    blob = encode_wav(WavClip("mulaw", 8000, MULAW_BYTES))
    assert blob == riff(
        chunk(b"fmt ", struct.pack("<HHIIHHH", FORMAT_MULAW, 1, 8000, 8000, 1, 8, 0)),
        chunk(b"fact", struct.pack("<I", 5)),
        chunk(b"data", MULAW_BYTES),
    )
    assert len(blob) % 2 == 0 and struct.unpack_from("<I", blob, 4)[0] == len(blob) - 8


@pytest.mark.parametrize("clip", [
    WavClip("mulaw", 8000, bytes(range(256)) + b"\x01"),
    WavClip("mulaw", 16000, b""),
    WavClip("pcm_s16le", 8000, PCM_BYTES),
    WavClip("pcm_s16le", 44100, PCM_BYTES * 3),
])
def test_what_is_written_reads_back_the_same(tmp_path: Path, clip: WavClip) -> None:
    assert parse_wav(encode_wav(clip)) == clip
    write_wav(tmp_path / "clip.wav", clip)
    assert read_wav(tmp_path / "clip.wav") == clip


def test_a_write_that_fails_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_wav(tmp_path / "no" / "such" / "dir.wav", WavClip("mulaw", 8000, b"\xff"))


# -- the clip ------------------------------------------------------------------------------


def test_clips_check_what_they_hold() -> None:
    with pytest.raises(ValueError, match="even number"):
        WavClip("pcm_s16le", 8000, b"\x00")
    with pytest.raises(ValueError, match="positive"):
        WavClip("mulaw", 0, b"")
    with pytest.raises(ValueError, match="encoding"):
        WavClip("alaw", 8000, b"")  # type: ignore[arg-type]
    assert WavClip("pcm_s16le", 16000, b"\x00" * 3200).duration_ns == 100_000_000
    assert WavClip("mulaw", 8000, b"\xff" * 800).duration_ns == 100_000_000


def test_conversion_keeps_the_clip_aligned_and_of_the_same_length() -> None:
    samples = np.zeros(1600, dtype=np.int16)  # 100 ms at 16 kHz with a click at 50 ms
    samples[800] = 20000
    pcm16k = WavClip("pcm_s16le", 16000, samples.astype("<i2").tobytes())
    assert pcm16k.converted("pcm_s16le", 16000) is pcm16k
    law8k = pcm16k.converted("mulaw", 8000)
    assert (law8k.encoding, law8k.sample_rate, law8k.sample_count) == ("mulaw", 8000, 800)
    assert abs(int(np.argmax(np.abs(law8k.samples()))) - 400) <= 1  # the click stays put
    back = law8k.converted("pcm_s16le", 16000)
    assert back.sample_count == 1600 and back.duration_ns == pcm16k.duration_ns
    assert abs(int(np.argmax(np.abs(back.samples()))) - 800) <= 2


def test_conversion_at_the_same_rate_is_only_the_codec() -> None:
    law = WavClip("mulaw", 8000, bytes(range(256)))
    pcm = law.converted("pcm_s16le", 8000)
    assert pcm.data == mulaw.decode_to_pcm16_bytes(law.data)
    assert pcm.converted("mulaw", 8000).data == mulaw.encode_pcm16_bytes(pcm.data)
