"""Fuzzing the frame decoder: random and mutated frames are refused with a typed error, without
a crash and without unpickling anything (unpickling is running code).

Both decoding paths are fuzzed: `frames.decode` on a whole buffer (the handler's small bodies)
and `frames.Reader` fed in pieces (the executor's streamed answers). `loads` is replaced by a
tripwire so a frame that reached it is a failure even if unpickling would have been harmless.
A coverage-guided run with atheris is in fuzz_frames.py next to this file.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lampy._errors import FrameError, TooLarge, VersionMismatch
from lampy.runtime._secret import Freshness
from lampy.runtime.openlambda import _frames as frames

KEY = b"fuzz-secret"
VALID = [
    frames.encode(frames.TASK, ("job", (0, 1), b"template", (np.arange(3),), ()), KEY).join(),
    frames.encode(frames.RESULT, (("job", (0,), 1), [(np.ones(20_000), None, "")]), KEY).join(),
    frames.encode(frames.PONG, 1234, KEY).join(),
]


class Unpickled(BaseException):
    """Raised by the tripwire that stands in for `loads` (not an Exception: nothing catches it)."""


@pytest.fixture(autouse=True)
def tripwire() -> Iterator[mock.MagicMock]:
    with mock.patch.object(frames, "loads", side_effect=Unpickled) as loads:
        yield loads


def anytime() -> Freshness:
    """A fresh nonce memory with no time window: the VALID frames never age or repeat, so the
    fuzzing reaches past the head checks however long the suite has run."""
    return Freshness(window=math.inf)


def refused(data: bytes | bytearray, pieces: list[int]) -> None:
    """Decode `data` both ways; both must refuse it with a FrameError, never unpickling."""
    with pytest.raises(FrameError):
        frames.decode(bytearray(data), KEY, freshness=anytime())
    with pytest.raises(FrameError):
        # callers bound the claim by what they were sent (Content-Length) before reading
        head = bytes(data[: frames.HEAD_BYTES])
        reader = frames.Reader(head, KEY, max_bytes=len(data), freshness=anytime())
        at = frames.HEAD_BYTES
        for size in [*pieces, len(data)]:  # in pieces, then the rest
            reader.feed(data[at : at + size])
            at += size
        reader.frame()


@settings(max_examples=300)
@given(data=st.binary(max_size=400), pieces=st.lists(st.integers(1, 64), max_size=8))
def test_random_bytes_are_refused(data: bytes, pieces: list[int], tripwire: Any) -> None:
    refused(data, pieces)
    refused(frames.MAGIC + bytes([frames.FORMAT]) + data, pieces)  # past the magic check
    tripwire.assert_not_called()


@st.composite
def mutated(draw: st.DrawFn) -> bytearray:
    """A valid frame after one to four edits: flipped bytes, a cut, an insertion, a splice."""
    frame = bytearray(draw(st.sampled_from(VALID)))
    original = bytes(frame)
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["flip", "cut", "insert", "splice", "length"]))
        at = draw(st.integers(0, max(0, len(frame) - 1)))
        if edit == "flip" and frame:
            frame[at] ^= draw(st.integers(1, 255))
        elif edit == "cut":
            del frame[at : at + draw(st.integers(1, 64))]
        elif edit == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif edit == "splice":
            other = draw(st.sampled_from(VALID))
            frame[at:] = other[at:]
        else:  # rewrite one of the prefix's length fields
            offset = draw(st.sampled_from([8, 12]))
            value = draw(st.integers(0, 2**32 - 1))
            frame[offset : offset + 4] = value.to_bytes(4, "little")
    if bytes(frame) in VALID or bytes(frame) == original:
        frame[-1] ^= 0xFF  # every edit cancelled out: damage the tag instead
    return frame


@settings(max_examples=300)
@given(frame=mutated(), pieces=st.lists(st.integers(1, 4096), max_size=8))
def test_mutated_frames_are_refused(frame: bytearray, pieces: list[int], tripwire: Any) -> None:
    refused(frame, pieces)
    tripwire.assert_not_called()


@settings(max_examples=300)
@given(
    frame=st.sampled_from(VALID),
    at=st.integers(8, 200),
    value=st.binary(min_size=1, max_size=8),
)
def test_signed_frames_with_a_bad_header_fail_typed(
    frame: bytes, at: int, value: bytes, tripwire: Any
) -> None:
    """A peer holding the secret but sending a malformed header (a bug, not an attack): the
    error is still typed, and a header that no longer adds up never reaches `loads`."""
    data = bytearray(frame[: -frames.TAG_BYTES])
    data[at : at + len(value)] = value
    data[frames.PREFIX_BYTES : frames.HEAD_BYTES] = hmac.new(
        KEY, data[: frames.PREFIX_BYTES], hashlib.sha256
    ).digest()
    data += hmac.new(KEY, data, hashlib.sha256).digest()
    try:
        frames.decode(data, KEY, freshness=anytime())
    except (FrameError, VersionMismatch):
        pass
    except Unpickled:  # the header still adds up: only then may the pickle be read
        header = int.from_bytes(data[8:12], "little")
        body = int.from_bytes(data[12:20], "little")
        assert frames.HEAD_BYTES + header + body + frames.TAG_BYTES == len(data)


def test_an_oversized_header_is_malformed_not_too_large() -> None:
    head = bytearray(VALID[2][: frames.HEAD_BYTES])
    head[8:12] = (1 << 20).to_bytes(4, "little")
    with pytest.raises(FrameError, match="a header of 1,048,576 bytes") as info:
        frames.check_head(head, KEY)
    assert not isinstance(info.value, TooLarge)
