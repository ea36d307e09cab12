"""Reading and writing wav files without scipy, so every error names the file and the cause."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

import lampy

from . import features

_PCM = 1
_FLOAT = 3
_EXTENSIBLE = 0xFFFE


class AudioError(ValueError):
    """Base class of every error raised while reading audio."""


class AudioNotFoundError(AudioError, FileNotFoundError):
    """The path does not exist or is not a file."""


class NotWavError(AudioError):
    """The file is not a RIFF/WAVE file, or uses an encoding we do not read."""


class EmptyAudioError(AudioError):
    """The file is a wav file without any samples."""


class AudioTooShortError(AudioError):
    """The recording is shorter than the pipeline needs."""


class NonFiniteAudioError(AudioError):
    """A floating-point wav file holds samples that are NaN or infinite."""


def read_wav(path: str | Path, min_seconds: float = 0.0) -> tuple[np.ndarray, int]:
    """Return (mono float32 signal in [-1, 1], sample rate) from a PCM or IEEE-float wav file.

    Stereo and multichannel files are averaged to mono. The signal lives in lampy's shared
    memory (`lampy.empty`), so regions on the local executor take it without a copy, and is
    followed there by zeros (`features.room_after`), so the features need no serial join. A
    mono file is decoded straight into it (an hour at 16 kHz: no 460 MB float64 temporaries),
    to the same values as through float64: every encoding's samples scale by a power of two.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioNotFoundError(f"{path}: no such file")
    data = memoryview(path.read_bytes())  # slices of it are views, not copies
    if len(data) == 0:
        raise EmptyAudioError(f"{path}: the file is empty (0 bytes)")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise NotWavError(f"{path}: not a wav file (no RIFF/WAVE header)")
    fmt, samples = _chunks(path, data)
    tag, channels, rate, bits = fmt
    width = _sample_bytes(path, tag, bits)
    frames = len(samples) // (width * channels)
    if frames == 0:
        raise EmptyAudioError(f"{path}: the wav file holds no samples")
    seconds = frames / rate
    if seconds < min_seconds:
        raise AudioTooShortError(
            f"{path}: {seconds:.2f} s of audio, need at least {min_seconds:.2f} s"
        )
    samples = samples[: frames * width * channels]
    # In lampy's shared memory: the local pool's workers read the recording where it is. The
    # zeros kept after it let the features cut its last, partial block as a view too.
    shared = lampy.empty(frames + features.room_after(rate), np.float32)[:frames]
    if channels == 1:
        _decode(samples, tag, bits, shared)
    else:
        signal = np.empty(frames * channels)
        _decode(samples, tag, bits, signal)
        np.copyto(shared, signal.reshape(-1, channels).mean(axis=1), casting="same_kind")
    if tag == _FLOAT and not np.isfinite(shared).all():  # integer samples always are
        bad = np.flatnonzero(~np.isfinite(shared))
        raise NonFiniteAudioError(
            f"{path}: {bad.size} samples are not numbers (NaN or infinity), the first at "
            f"{bad[0] / rate:.3f} s: repair or re-export the file"
        )
    return shared, rate


def _chunks(
    path: Path, data: bytes | memoryview
) -> tuple[tuple[int, int, int, int], bytes | memoryview]:
    """Walk the RIFF chunks and return the parsed 'fmt ' chunk and the raw 'data' bytes."""
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise NotWavError(f"{path}: truncated 'fmt ' chunk")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            if channels == 0 or rate == 0:
                raise NotWavError(f"{path}: {channels} channels at {rate} Hz")
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise NotWavError(f"{path}: 'data' chunk before 'fmt ' chunk")
            return fmt, body
        pos += 8 + size + (size & 1)
    raise NotWavError(f"{path}: no 'fmt ' and 'data' chunks")


def _sample_bytes(path: Path, tag: int, bits: int) -> int:
    """Bytes per sample of an encoding `_decode` reads."""
    if (tag == _PCM and bits in (8, 16, 24, 32)) or (tag == _FLOAT and bits in (32, 64)):
        return bits // 8
    raise NotWavError(f"{path}: unsupported wav encoding (format tag {tag}, {bits} bits)")


def _decode(raw: bytes | memoryview, tag: int, bits: int, out: np.ndarray) -> None:
    """Decode whole interleaved samples (of an encoding `_sample_bytes` accepts) into `out`,
    scaled to [-1, 1]."""
    if tag == _FLOAT:
        np.copyto(out, np.frombuffer(raw, "<f4" if bits == 32 else "<f8"), casting="same_kind")
    elif bits == 8:
        np.subtract(np.frombuffer(raw, np.uint8), 128.0, out=out)
        out /= 128.0
    elif bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        np.multiply(np.where(v >= 1 << 23, v - (1 << 24), v), 2.0**-23, out=out)
    else:
        np.multiply(np.frombuffer(raw, "<i2" if bits == 16 else "<i4"), 2.0 ** (1 - bits), out=out)


def write_wav(path: str | Path, signal: np.ndarray, rate: int) -> None:
    """Write a mono 16-bit PCM wav file (samples are clipped to [-1, 1])."""
    pcm = (np.clip(signal, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    _write_pcm16(Path(path), pcm, rate)


def trim_wav(path: str | Path, seconds: float) -> float:
    """Cut a mono 16-bit PCM wav file (as `write_wav` writes) to at most `seconds`, in place.

    The samples are kept as bytes, so what remains is bit-identical. Returns the new length.
    """
    path = Path(path)
    (tag, channels, rate, bits), samples = _chunks(path, path.read_bytes())
    if (tag, channels, bits) != (_PCM, 1, 16):
        raise NotWavError(f"{path}: trim_wav handles mono 16-bit PCM only")
    kept = samples[: 2 * round(seconds * rate)]
    _write_pcm16(path, kept, rate)
    return len(kept) / 2 / rate


def _write_pcm16(path: Path, pcm: bytes, rate: int) -> None:
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(pcm),
        b"WAVE",
        b"fmt ",
        16,
        _PCM,
        1,
        rate,
        rate * 2,
        2,
        16,
        b"data",
        len(pcm),
    )
    path.write_bytes(header + pcm)
