import struct
from pathlib import Path

import numpy as np
import pytest

from examples.fisher.audio import (
    AudioNotFoundError,
    AudioTooShortError,
    EmptyAudioError,
    NonFiniteAudioError,
    NotWavError,
    read_wav,
    write_wav,
)


def _wav(path: Path, samples: bytes, tag: int, channels: int, rate: int, bits: int) -> Path:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, 4, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 4) + b"INFO"
    body += b"data" + struct.pack("<I", len(samples)) + samples
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_roundtrip_16_bit(tmp_path: Path) -> None:
    signal = np.sin(np.arange(8000) / 10.0).astype(np.float32) * 0.5
    write_wav(tmp_path / "a.wav", signal, 8000)
    read, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000
    np.testing.assert_allclose(read, signal, atol=1 / 32767)


def test_stereo_float_is_mixed_to_mono(tmp_path: Path) -> None:
    left = np.linspace(-1, 1, 100)
    right = np.zeros(100)
    raw = np.stack([left, right], axis=1).astype("<f4").tobytes()
    signal, rate = read_wav(_wav(tmp_path / "f.wav", raw, 3, 2, 22050, 32))
    assert rate == 22050
    np.testing.assert_allclose(signal, left / 2, atol=1e-7)


ENCODINGS = [
    (1, 8, np.uint8),
    (1, 16, "<i2"),
    (1, 24, None),
    (1, 32, "<i4"),
    (3, 32, "<f4"),
    (3, 64, "<f8"),
]


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize(("tag", "bits", "dtype"), ENCODINGS)
def test_every_encoding_reads_as_its_float64_decoding_rounded_once(
    tmp_path: Path, tag: int, bits: int, dtype: object, channels: int
) -> None:
    """Full-scale random samples of every encoding, mono and interleaved, with a partial frame
    at the end: the channels' float64 mean, scaled to [-1, 1], rounded once to float32."""
    rng = np.random.default_rng(bits * 10 + channels)
    n = 999 * channels
    if tag == 3:
        values = rng.uniform(-1.0, 1.0, n)
        raw = values.astype(dtype).tobytes()  # type: ignore[call-overload]
        scaled = values.astype(dtype).astype(np.float64)  # type: ignore[call-overload]
    elif bits == 24:
        ints = rng.integers(-(1 << 23), 1 << 23, n)
        raw = b"".join(int(v & 0xFFFFFF).to_bytes(3, "little") for v in ints)
        scaled = ints / float(1 << 23)
    elif bits == 8:
        ints = rng.integers(0, 256, n)
        raw = ints.astype(np.uint8).tobytes()
        scaled = (ints - 128.0) / 128.0
    else:
        info = np.iinfo(dtype)  # type: ignore[type-var]
        ints = rng.integers(info.min, info.max, n, endpoint=True)
        raw = ints.astype(dtype).tobytes()  # type: ignore[call-overload]
        scaled = ints / float(1 << (bits - 1))
    partial = b"\x01" * (bits // 8 * channels - 1)  # less than a frame: not read
    signal, _ = read_wav(_wav(tmp_path / "e.wav", raw + partial, tag, channels, 8000, bits))
    expected = scaled.reshape(-1, channels).mean(axis=1).astype(np.float32)
    assert signal.dtype == np.float32
    np.testing.assert_array_equal(signal, expected)


def test_float_samples_that_are_not_numbers_name_the_file(tmp_path: Path) -> None:
    values = np.zeros(4000, "<f4")
    values[[800, 900, 1000]] = [np.nan, np.inf, -np.inf]
    with pytest.raises(NonFiniteAudioError, match=r"3 samples are not numbers .* 0\.100 s"):
        read_wav(_wav(tmp_path / "nan.wav", values.tobytes(), 3, 1, 8000, 32))


def test_pcm_8_and_24_bit(tmp_path: Path) -> None:
    signal, _ = read_wav(_wav(tmp_path / "u8.wav", bytes([128, 255, 0]), 1, 1, 8000, 8))
    np.testing.assert_allclose(signal, [0.0, 127 / 128, -1.0])
    raw = b"\x00\x00\x40" + b"\x00\x00\xc0"
    signal, _ = read_wav(_wav(tmp_path / "24.wav", raw, 1, 1, 8000, 24))
    np.testing.assert_allclose(signal, [0.5, -0.5])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioNotFoundError, match="no such file"):
        read_wav(tmp_path / "nope.wav")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.wav").write_bytes(b"")
    with pytest.raises(EmptyAudioError, match="0 bytes"):
        read_wav(tmp_path / "e.wav")


def test_wav_without_samples(tmp_path: Path) -> None:
    with pytest.raises(EmptyAudioError, match="no samples"):
        read_wav(_wav(tmp_path / "z.wav", b"", 1, 1, 8000, 16))


def test_not_a_wav(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_text("ID3 this is an mp3, honest")
    with pytest.raises(NotWavError, match="RIFF/WAVE"):
        read_wav(tmp_path / "x.wav")


def test_unsupported_encoding(tmp_path: Path) -> None:
    with pytest.raises(NotWavError, match="format tag 6"):
        read_wav(_wav(tmp_path / "alaw.wav", b"\x00" * 10, 6, 1, 8000, 8))


def test_too_short(tmp_path: Path) -> None:
    write_wav(tmp_path / "s.wav", np.zeros(800), 8000)
    with pytest.raises(AudioTooShortError, match=r"0\.10 s of audio, need at least 2\.00 s"):
        read_wav(tmp_path / "s.wav", min_seconds=2.0)
