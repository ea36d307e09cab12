"""Shared memory for the local executor: anonymous files handed between processes by descriptor.

Arrays are written once into an anonymous file (memfd on Linux) and each worker maps just the
rows of its chunk. Files have no name, so nothing is left behind in /dev/shm when a process is
killed: the memory goes when the last descriptor and mapping close.
"""

from __future__ import annotations

import mmap
import os
import pickle
import tempfile
from typing import Any

import numpy as np

from lampy.runtime._codec import Layout, dumps_out_of_band, layout_of


def anonymous_file(size: int) -> int:
    """A new unnamed read-write file of `size` bytes, as a descriptor the caller owns."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("lampy", os.MFD_CLOEXEC)
    else:  # macOS and others: an unlinked temporary file
        handle, path = tempfile.mkstemp(
            prefix="lampy-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        os.unlink(path)
        fd = handle
    os.ftruncate(fd, size)
    return fd


def map_private(fd: int, offset: int, nbytes: int) -> memoryview:
    """Map bytes [offset, offset + nbytes) of a file copy-on-write: writes stay in this process."""
    if nbytes == 0:
        return memoryview(bytearray(0))
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(
        fd,
        offset - start + nbytes,
        flags=mmap.MAP_PRIVATE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=start,
    )
    return memoryview(mapped)[offset - start :]


def array_in(
    fd: int,
    offset: int,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """A C-ordered array stored at `offset` of a file, or just its rows [start, stop)."""
    if rows is None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return np.frombuffer(map_private(fd, offset, nbytes), dtype=dtype).reshape(shape)
    start, stop = rows
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    view = map_private(fd, offset + start * row_bytes, (stop - start) * row_bytes)
    return np.frombuffer(view, dtype=dtype).reshape((stop - start, *shape[1:]))


def dump_to_file(value: Any, min_size: int = 1 << 16) -> tuple[bytes, Layout, int | None]:
    """Pickle `value`; its large buffers go to a new anonymous file, returned as a descriptor."""
    payload, buffers = dumps_out_of_band(value, min_size)
    if not buffers:
        return payload, [], None
    raws = [b.raw() for b in buffers]
    layout, size = layout_of([r.nbytes for r in raws])
    fd = anonymous_file(size)
    with mmap.mmap(fd, size) as mapped:
        for (offset, nbytes), raw in zip(layout, raws, strict=True):
            mapped[offset : offset + nbytes] = raw
    return payload, layout, fd


def load_from_file(payload: bytes, layout: Layout, fd: int | None) -> Any:
    """Undo `dump_to_file`; arrays come back as views of the file's memory (no copy)."""
    if fd is None:
        return pickle.loads(payload)
    try:
        view = memoryview(mmap.mmap(fd, layout[-1][0] + layout[-1][1]))
    finally:
        os.close(fd)
    return pickle.loads(payload, buffers=[view[o : o + n] for o, n in layout])
