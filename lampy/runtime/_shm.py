"""Shared memory for the local executor: anonymous files handed between processes by descriptor.

Arrays are written once into an anonymous file (memfd on Linux) and each worker maps just the
rows of its chunk. Files have no name, so nothing is left behind in /dev/shm when a process is
killed: the memory goes when the last descriptor and mapping close.

Segments: shared memory this process keeps as ordinary ndarrays (`lampy.empty`,
`lampy.asshared`, an elemwise result of the local pool). Each is one anonymous file mapped
here; the registry remembers its address range and descriptor, so an array that lives in one
(or a view of one) is handed to workers by descriptor and offset, never copied. The registry
holds no reference to the mapping: when the user drops the last array, the mapping is
unmapped and its descriptor closed (`weakref.finalize`), and the memory is freed once no
worker still maps it (workers map a chunk's rows only for that chunk).
"""

from __future__ import annotations

import bisect
import mmap
import os
import pickle
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lampy._errors import UnsplittableError
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


def _mapping(fd: int, offset: int, nbytes: int, private: bool) -> memoryview:
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
    mapped = mmap.mmap(
        fd,
        offset - start + nbytes,
        flags=flags,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=start,
    )
    return memoryview(mapped)[offset - start :]


def map_private(fd: int, offset: int, nbytes: int) -> memoryview:
    """Map bytes [offset, offset + nbytes) of a file copy-on-write: writes stay in this process."""
    if nbytes == 0:
        return memoryview(bytearray(0))
    return _mapping(fd, offset, nbytes, private=True)


def map_shared(fd: int, offset: int, nbytes: int) -> memoryview:
    """Map bytes [offset, offset + nbytes) of a file for writing into it (others see the writes)."""
    if nbytes == 0:
        return memoryview(bytearray(0))
    return _mapping(fd, offset, nbytes, private=False)


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


# -- segments -----------------------------------------------------------------------------


@dataclass
class _Entry:
    size: int
    fd: int
    #: An output the local pool made for one call: the caller may still write the rows it
    #: computed itself (the auto probe's) into it, once, when joining (see `join_in_place`).
    fresh: bool = False


_lock = threading.RLock()  # finalizers may run in any thread, even one holding it
_starts: list[int] = []  # sorted start addresses of live segments
_segments: dict[int, _Entry] = {}


def _address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, np.uint8).__array_interface__["data"][0])


# Dropped segments kept for the next ones: fresh shared memory costs a page fault per 4 KiB page
# (shmem gets no transparent huge pages unless the system enables them), which made a fresh
# output cost 5x numpy's own fresh array (bench/bench_scale.py), and a fresh `lampy.empty` 12x
# (18 MiB: 12 ms against numpy's 1 ms); a kept file's pages are there already, and workers keep
# it mapped. Bounded, like an allocator's free list.
SEGMENTS_KEPT_BYTES = 1 << 30
_kept: list[tuple[int, int]] = []  # (size, descriptor) of dropped segments, oldest first
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_listeners: list[Callable[[list[int]], None]] = []


def _forget(address: int, fd: int, reuse: bool) -> None:
    gone: list[int] = []
    with _lock:
        entry = _segments.pop(address, None)
        if entry is not None:
            del _starts[bisect.bisect_left(_starts, address)]
        if reuse and entry is not None and entry.size <= SEGMENTS_KEPT_BYTES:
            _kept.append((entry.size, fd))
            while sum(size for size, _ in _kept) > SEGMENTS_KEPT_BYTES:
                gone.append(_close(_kept.pop(0)[1]))
        else:
            gone.append(_close(fd))
    _tell(gone)


def _close(fd: int) -> int:
    inode = os.fstat(fd).st_ino
    os.close(fd)
    return inode


def _tell(inodes: list[int]) -> None:
    if inodes:
        for listener in list(_listeners):
            listener(inodes)


def retire(fd: int) -> None:
    """Close a shared file that workers may keep mapped, telling the listeners its inode."""
    _tell([_close(fd)])


def on_retire(listener: Callable[[list[int]], None]) -> None:
    """Call `listener(inodes)` whenever shared files are let go (in whichever thread drops
    them), so whoever maps them elsewhere can unmap them."""
    _listeners.append(listener)


def adopt(
    fd: int, size: int, fresh: bool = False, reuse: bool = False, populate: bool = False
) -> mmap.mmap:
    """Map a whole anonymous file as a segment; the segment owns `fd` from now on. `reuse`: a
    dropped segment whose file may serve a later one (see `_kept_file`). `populate`: its pages
    mapped in one call (a kept file's exist already), not one fault at a time."""
    flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
    mapped = mmap.mmap(fd, size, flags=flags)
    address = _address(mapped)
    with _lock:
        _segments[address] = _Entry(size, fd, fresh)
        bisect.insort(_starts, address)
    weakref.finalize(mapped, _forget, address, fd, reuse)
    return mapped


def _kept_file(nbytes: int) -> tuple[int, int] | None:
    """(size, descriptor) of a dropped segment's file that fits `nbytes` (up to twice the
    size, or a page), taken off the kept list; None when none is kept."""
    most = max(2 * nbytes, mmap.PAGESIZE)
    with _lock:
        fits = [i for i, (size, _) in enumerate(_kept) if nbytes <= size <= most]
        return _kept.pop(fits[0]) if fits else None


def segment(nbytes: int) -> mmap.mmap:
    """A zero-filled segment of `nbytes` bytes (at least one page). A dropped segment's file
    is used again when one fits: mapped with its pages in place in one call and zeroed, which
    costs a fifth of the page faults of a new file's first writes."""
    kept = _kept_file(nbytes)
    if kept is None:
        size = max(nbytes, mmap.PAGESIZE)
        return adopt(anonymous_file(size), size, reuse=True)
    size, fd = kept
    mapped = adopt(fd, size, reuse=True, populate=True)
    np.frombuffer(mapped, np.uint8, count=nbytes).fill(0)
    return mapped


def output(nbytes: int) -> tuple[mmap.mmap, int]:
    """A segment for an output the pool's workers fill entirely: the file of a dropped segment
    of about this size when one is kept (its bytes are garbage until written), else new."""
    size, fd = _kept_file(nbytes) or (max(nbytes, mmap.PAGESIZE), -1)
    if fd < 0:
        fd = anonymous_file(size)
    return adopt(fd, size, fresh=True, reuse=True), fd


def empty(shape: int | tuple[int, ...], dtype: Any = float) -> np.ndarray:
    """A new zero-filled C-ordered array in lampy's shared memory: an ordinary ndarray.

    Fill it in place and pass it (or any contiguous slice of it) to regions on the local
    executor: the workers map its rows where they are, so no byte is copied. Results of
    elemwise regions on `local` live in shared memory too, so chained regions copy nothing.
    The memory goes when the last array using it is dropped (kept, up to 1 GiB in all, for
    the next arrays and results of about its size). Object dtypes cannot live
    in shared memory (a `lampy.UnsplittableError`, also a TypeError).
    """
    kind = np.dtype(dtype)
    _check_dtype(kind, "lampy.empty")
    dims = (int(shape),) if isinstance(shape, int | np.integer) else tuple(map(int, shape))
    if any(d < 0 for d in dims):
        raise ValueError(f"lampy.empty: negative dimensions are not allowed; got {dims}")
    nbytes = int(np.prod(dims, dtype=np.int64)) * kind.itemsize
    array: np.ndarray = np.ndarray(dims, kind, buffer=segment(nbytes))
    return array


def asshared(array: Any) -> np.ndarray:
    """`array` in lampy's shared memory: itself when it is there already (C-contiguous in
    shared memory: a region's result, `lampy.empty`), else a C-ordered copy with the same
    values, shape and dtype (byte order included). Like `np.asarray`, for shared memory.

    Do this once for an input that many region calls read: each call then hands it to the
    workers without copying it. Subclasses (masked arrays, matrices) would lose what they
    add, and object dtypes cannot be shared: both are a `lampy.UnsplittableError`.
    """
    if isinstance(array, np.ndarray) and type(array) not in (np.ndarray, np.memmap):
        kind = f"{type(array).__module__}.{type(array).__qualname__}"
        raise UnsplittableError(
            f"lampy.asshared: a {kind} would lose what its subclass adds; pass np.asarray(...) "
            "(and a masked array's mask as a second array)"
        )
    values = np.asarray(array)
    if locate(values) is not None:
        return values
    _check_dtype(values.dtype, "lampy.asshared")
    copy = empty(values.shape, values.dtype)
    np.copyto(copy, values, casting="no")
    return copy


def _check_dtype(kind: np.dtype[Any], who: str) -> None:
    if kind.hasobject:
        raise UnsplittableError(
            f"{who}: dtype {kind} holds Python objects, which cannot live in shared memory; "
            "use a numeric dtype"
        )


def locate(array: np.ndarray) -> tuple[int, int] | None:
    """(descriptor, byte offset) of a C-contiguous array's bytes inside a live segment; None
    when it lives elsewhere (or is not contiguous, or is empty). Valid while `array` lives."""
    if array.nbytes == 0 or not array.flags.c_contiguous:
        return None
    pointer = int(array.__array_interface__["data"][0])
    with _lock:
        i = bisect.bisect_right(_starts, pointer) - 1
        if i < 0:
            return None
        start = _starts[i]
        entry = _segments[start]
        if pointer + array.nbytes > start + entry.size:
            return None
        return entry.fd, pointer - start


def is_shared(array: np.ndarray) -> bool:
    """Whether workers can map `array` where it is (no copy)."""
    return locate(array) is not None


def _owner(array: np.ndarray) -> Any:
    """The object at the end of `array`'s base chain (what owns its memory)."""
    owner: Any = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner


def join_in_place(parts: list[np.ndarray]) -> np.ndarray | None:
    """The parts joined along axis 0 without copying them, or None when they are not laid out
    for that: parts in one segment, each where its rows belong in one C-ordered array.

    Parts that live elsewhere (the caller's own rows, computed by the auto probe) are copied
    into their place, but only in a fresh output of the local pool, and only once: after this
    the output is an ordinary result that nothing writes into any more.
    """
    first = parts[0]
    if not all(type(p) is np.ndarray and p.dtype == first.dtype for p in parts):
        return None
    if any(p.shape[1:] != first.shape[1:] for p in parts):
        return None
    row_bytes = first.dtype.itemsize * int(np.prod(first.shape[1:], dtype=np.int64))
    rows = sum(p.shape[0] for p in parts)
    if row_bytes == 0 or rows == 0:
        return None
    placed = [(i, locate(p)) for i, p in enumerate(parts)]
    anchor = next(((i, where) for i, where in placed if where is not None), None)
    if anchor is None:
        return None
    i, (fd, offset) = anchor
    owner = _owner(parts[i])
    if not isinstance(owner, mmap.mmap):
        return None
    start = offset - sum(p.shape[0] for p in parts[:i]) * row_bytes
    with _lock:
        entry = next((e for e in _segments.values() if e.fd == fd), None)
        if entry is None or start < 0 or start + rows * row_bytes > entry.size:
            return None
        strays = [j for j, where in placed if where is None]
        at = start
        for j, where in placed:
            if where is not None and (where[0] != fd or where[1] != at):
                return None
            at += parts[j].nbytes
        if strays and not entry.fresh:
            return None
        entry.fresh = False
    joined: np.ndarray = np.ndarray((rows, *first.shape[1:]), first.dtype, owner, start)
    at = 0
    for j, part in enumerate(parts):
        if j in strays:
            joined[at : at + part.shape[0]] = part
        at += part.shape[0]
    return joined


# -- results through files ---------------------------------------------------------------


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
    """Undo `dump_to_file`; arrays come back as views of the file's memory (no copy), in a
    segment, so passing them on to the pool copies nothing either."""
    if fd is None:
        return pickle.loads(payload)
    view = memoryview(adopt(fd, layout[-1][0] + layout[-1][1]))
    return pickle.loads(payload, buffers=[view[o : o + n] for o, n in layout])
