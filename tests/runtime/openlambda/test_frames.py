"""Frames: binary, versioned, buffers out of band and uncopied, signed; bad ones never unpickled."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from lampy._errors import BadSignature, FrameError, TooLarge, VersionMismatch
from lampy.runtime.openlambda import _frames as frames

KEY = b"k" * 32
unpickled: list[str] = []


def record(name: str) -> None:
    unpickled.append(name)


class Tripwire:
    """Records when it is unpickled: a refused frame must never get that far."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (record, ("tripwire",))


def join(frame: frames.Outgoing) -> bytearray:
    return bytearray(frame.join())


def test_round_trip_keeps_arrays_out_of_band_and_uncopied() -> None:
    array = np.arange(1 << 16, dtype=np.float64)
    outgoing = frames.encode(frames.RESULT, {"a": array, "n": 3}, KEY)
    assert any(np.shares_memory(np.frombuffer(p, np.uint8), array) for p in outgoing.parts[1:])
    assert any(np.shares_memory(np.frombuffer(p, np.uint8), array) for p in outgoing)
    frame = frames.decode(join(outgoing), KEY)
    assert frame.kind == frames.RESULT and frame.versions == frames.VERSIONS
    np.testing.assert_array_equal(frame.value["a"], array)
    assert frame.value["a"].flags.writeable and frame.value["a"].flags.aligned


def test_header_carries_versions_and_lengths() -> None:
    data = join(frames.encode(frames.PING, None, KEY))
    magic, version, kind, _, header, body, when, _ = struct.unpack_from("<4sBBHIQd16s", data)
    assert (magic, version, kind) == (b"LMPY", frames.FORMAT, frames.PING)
    assert len(data) == frames.HEAD_BYTES + header + body + frames.TAG_BYTES
    assert frames.VERSIONS.encode() in data[frames.HEAD_BYTES :]
    assert abs(when - time.time()) < 60


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d[:-32] + bytes(32),  # unsigned (zero tag)
        lambda d: d[:-40] + bytes([d[-40] ^ 1]) + d[-39:],  # altered body
    ],
    ids=["unsigned", "altered"],
)
def test_bad_tag_is_refused_before_unpickling(tamper: object) -> None:
    unpickled.clear()
    data = join(frames.encode(frames.TASK, Tripwire(), KEY))
    with pytest.raises(BadSignature, match="LAMPY_SECRET"):
        frames.decode(tamper(data), KEY)  # type: ignore[operator]
    assert unpickled == []


def test_wrong_secret_is_refused_before_unpickling() -> None:
    unpickled.clear()
    data = join(frames.encode(frames.TASK, Tripwire(), b"other secret"))
    with pytest.raises(BadSignature):
        frames.decode(data, KEY)
    assert unpickled == []
    frames.decode(join(frames.encode(frames.TASK, Tripwire(), KEY)), KEY)
    assert unpickled == ["tripwire"]  # the same frame, signed right, does unpickle


def test_truncated_and_oversized_frames_are_refused() -> None:
    data = join(frames.encode(frames.TASK, np.zeros(1 << 14), KEY))
    with pytest.raises(FrameError, match="truncated"):
        frames.decode(data[:-10], KEY)
    with pytest.raises(FrameError, match="truncated"):
        frames.decode(data[:30], KEY)
    with pytest.raises(TooLarge, match="refused"):
        frames.decode(data, KEY, max_bytes=1000)
    with pytest.raises(FrameError, match="not a lampy frame"):
        frames.decode(b"GET / HTTP/1.1\r\n" * 4, KEY)


def test_reader_hashes_as_bytes_arrive_and_refuses_early() -> None:
    head = frames.HEAD_BYTES
    data = join(frames.encode(frames.RESULT, np.arange(1 << 18), KEY))
    reader = frames.Reader(data[:head], KEY)
    for start in range(head, len(data), 4096):
        reader.feed(data[start : start + 4096])
    np.testing.assert_array_equal(reader.frame().value, np.arange(1 << 18))
    data = join(frames.encode(frames.RESULT, np.arange(1 << 18), KEY))
    with pytest.raises(TooLarge):
        frames.Reader(data[:head], KEY, max_bytes=1000)
    partial = frames.Reader(data[:head], KEY)
    partial.feed(data[head:200])
    with pytest.raises(FrameError, match="truncated"):
        partial.frame()
    unpickled.clear()
    forged = join(frames.encode(frames.TASK, Tripwire(), KEY))
    forged[-40] ^= 1  # the head is intact and signed, the body altered
    reader = frames.Reader(forged[:head], KEY)
    reader.feed(forged[head:])
    with pytest.raises(BadSignature):
        reader.frame()
    assert unpickled == []


def test_python_minor_mismatch_names_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "VERSIONS", "3.10.12 1.26.4 3.0.0")
    data = join(frames.encode(frames.PING, None, KEY))
    monkeypatch.undo()
    ours = frames.VERSIONS.split()[0]
    with pytest.raises(VersionMismatch, match=f"Python {ours}.*Python 3.10.12"):
        frames.decode(data, KEY)
