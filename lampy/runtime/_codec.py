"""Serialization shared by the remote executors: cloudpickle with protocol 5.

Large buffers (numpy array data) travel out of band, so callers can place them in shared memory
or write them to a socket without copying them into one pickle.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle

PROTOCOL = 5
ALIGN = 64  # out-of-band buffers start at multiples of this, for SIMD loads
#: The largest message a receiver takes (a frame body, an upload); LAMPY_MAX_FRAME_BYTES overrides.
MAX_FRAME_BYTES = int(os.environ.get("LAMPY_MAX_FRAME_BYTES", 8 << 30))
Layout = list[tuple[int, int]]  # (offset, nbytes) of each buffer


class Positional:
    """A dataclass pickled as its fields' values in order, not as a dict naming each: in the
    small frames of orchestration in lambdas the names weighed more than most values."""

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return type(self), tuple(values)


def padding(offset: int) -> int:
    """Bytes to skip from `offset` to the next aligned buffer start.

    >>> padding(0), padding(1), padding(64), padding(65)
    (0, 63, 0, 63)
    """
    return -offset % ALIGN


def layout_of(sizes: Sequence[int], start: int = 0) -> tuple[Layout, int]:
    """Aligned offsets for buffers of these sizes placed from `start`, and where they end.

    >>> layout_of([3, 70], start=10)
    ([(64, 3), (128, 70)], 198)
    """
    layout, end = [], start
    for size in sizes:
        offset = end + padding(end)
        layout.append((offset, size))
        end = offset + size
    return layout, end


def dumps(obj: Any) -> bytes:
    """Pickle `obj` in band (functions by value where they cannot be imported by name)."""
    return cloudpickle.dumps(obj, protocol=PROTOCOL)  # type: ignore[no-any-return]


def dumps_out_of_band(obj: Any, min_size: int = 1 << 16) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle a value (a result, a task of arrays), keeping buffers >= `min_size` out of band.

    Plain pickle is tried first: it starts about 5x faster than cloudpickle, and it only
    succeeds where it stores classes and functions by a name it has checked in this process;
    anything that exists by value only makes it fail, and cloudpickle takes over.
    """
    buffers: list[pickle.PickleBuffer] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes >= min_size:
            buffers.append(buffer)
            return False
        return True

    try:
        return pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep), buffers
    except Exception:
        buffers.clear()
        return cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep), buffers


def loads(data: bytes | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """Unpickle data made by `dumps` or `dumps_out_of_band` (buffers in the same order)."""
    return pickle.loads(data, buffers=buffers)
