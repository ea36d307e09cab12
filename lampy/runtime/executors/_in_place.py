"""A chunk's result array allocated straight in its rows of the shared output (worker side).

An elemwise worker used to compute its result in fresh memory and then copy it into the
shared output: every result byte written twice, which made memory-bound regions (`a + b`)
lose to numpy alone. While a chunk runs, `results_into` installs a numpy memory handler
(NEP 49: `PyDataMem_SetHandler`, per context, so only this thread's arrays are concerned) that
gives an allocation of exactly a result array's size its rows of the output, once; every other
allocation goes to numpy's own handler. When the function's result is the array that got them
(`a + b`, `np.sqrt(x)`, most elementwise code), nothing is copied. When it is not (the slot
went to a temporary), the result is copied as before: correct either way.

An array that got a slot and outlives the chunk (kept by the function in a global) would alias
the output: `Slots.held()` says so, and the worker then exits after answering (the pool starts
a fresh one), so no such array can see a later result change under it. Functions that make
many small arrays would pay for the handler's Python callbacks: after `ALLOCATIONS` of them in
a chunk, numpy's own handler is back.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np

MIN_BYTES = 1 << 18  # smaller results are cheap to copy, and small sizes are common
# Each allocation through the handler costs about 4 us of Python (ctypes): a chunk that makes
# more arrays than this (a loop over rows) gets numpy's own handler back for the rest of it,
# and says so (`Slots.exhausted`), so its job's later chunks run without it.
ALLOCATIONS = 256

_MALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_CALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
_REALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class _Allocator(ctypes.Structure):
    _fields_ = [
        ("ctx", ctypes.c_void_p),
        ("malloc", _MALLOC),
        ("calloc", _CALLOC),
        ("realloc", _REALLOC),
        ("free", _FREE),
    ]


class _Handler(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 127),
        ("version", ctypes.c_uint8),
        ("allocator", _Allocator),
    ]


_CAPSULE_NAME = ctypes.c_char_p(b"mem_handler")  # numpy's name; must outlive the capsule


class Slots:
    """The output rows offered to this chunk's allocations: address -> (size, taken)."""

    def __init__(self, views: Sequence[np.ndarray]) -> None:
        self.free: dict[int, int] = {}  # address -> size, not handed out
        self.taken: dict[int, int] = {}  # handed out, not freed yet
        self.left = ALLOCATIONS  # allocations before numpy's handler is put back
        self.exhausted = False  # it was: the chunk made too many arrays
        self.previous: Any = None  # the handler to put back
        for view in views:
            if view.nbytes >= MIN_BYTES and view.flags.c_contiguous:
                self.free[int(view.__array_interface__["data"][0])] = view.nbytes

    def held(self) -> bool:
        """Whether an array still lives in the output's memory (after the chunk's result and
        temporaries were dropped, only one the function kept does)."""
        return bool(self.taken)


class _Numpy:
    """numpy's own allocator, called with the GIL held (a plain ctypes call releases it, and a
    callback numpy made without the GIL, as it does for large zeroed arrays, then cannot)."""

    def __init__(self, allocator: _Allocator) -> None:
        def held(kind: Any, function: Any) -> Any:
            address = ctypes.cast(function, ctypes.c_void_p).value or 0
            return ctypes.PYFUNCTYPE(kind._restype_, *kind._argtypes_)(address)

        self.ctx = allocator.ctx
        self.malloc = held(_MALLOC, allocator.malloc)
        self.calloc = held(_CALLOC, allocator.calloc)
        self.realloc = held(_REALLOC, allocator.realloc)
        self.free = held(_FREE, allocator.free)


class _State(threading.local):
    slots: Slots | None = None


_state = _State()
_all_taken: dict[int, Slots] = {}  # every slot handed out and not freed, by address


@cache
def _machinery() -> tuple[Any, Any, _Numpy] | None:
    """(numpy's set_handler, our handler's capsule, numpy's default allocator), or None where
    numpy has no memory handlers (before 1.22) or ctypes cannot reach them."""
    core: Any = None
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # 2, 1.x
        try:
            core = importlib.import_module(name)
            break
        except ImportError:
            continue
    if core is None:
        return None
    try:
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype = ctypes.py_object
        new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        table = ctypes.cast(get_pointer(core._ARRAY_API, None), ctypes.POINTER(ctypes.c_void_p))
        set_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(table[304])
        get_handler = ctypes.PYFUNCTYPE(ctypes.py_object)(table[305])
        default = get_handler()
        numpy_handler = _Handler.from_address(get_pointer(default, _CAPSULE_NAME.value))
        if numpy_handler.version != 1:
            return None
    except (AttributeError, ValueError, TypeError, OSError):
        return None
    ours = _Handler(b"lampy_output_rows", 1, _Allocator(None, *_CALLBACKS))
    _keep.extend([ours, default, numpy_handler])
    capsule = new_capsule(ctypes.addressof(ours), _CAPSULE_NAME, None)
    return set_handler, capsule, _Numpy(numpy_handler.allocator)


def _numpy() -> _Numpy:
    machinery = _machinery()
    assert machinery is not None
    return machinery[2]


def _counted() -> Slots | None:
    """This thread's slots, counting one allocation; numpy's handler goes back in place
    when the chunk has made too many."""
    slots = _state.slots
    if slots is not None:
        slots.left -= 1
        if slots.left <= 0:
            machinery = _machinery()
            assert machinery is not None
            machinery[0](slots.previous)  # this allocation is served; later ones are numpy's
            slots.exhausted = True
            _state.slots = None
    return slots


def _malloc(ctx: Any, size: int) -> int | None:
    slots = _counted()
    if slots is not None and size >= MIN_BYTES:
        for address, nbytes in slots.free.items():
            if nbytes == size:
                del slots.free[address]
                slots.taken[address] = size
                _all_taken[address] = slots
                return address
    numpy = _numpy()
    result: int | None = numpy.malloc(numpy.ctx, size)
    return result


def _calloc(ctx: Any, count: int, size: int) -> int | None:
    slots = _state.slots
    if slots is not None and count * size >= MIN_BYTES and count * size in slots.free.values():
        address = _malloc(ctx, count * size)
        if address:
            ctypes.memset(address, 0, count * size)
        return address
    _counted()
    numpy = _numpy()
    result: int | None = numpy.calloc(numpy.ctx, count, size)
    return result


def _realloc(ctx: Any, pointer: int | None, size: int) -> int | None:
    if pointer is not None and pointer in _all_taken:
        old = _all_taken[pointer].taken[pointer]
        numpy = _numpy()
        moved: int | None = numpy.malloc(numpy.ctx, size)
        if moved:
            ctypes.memmove(moved, pointer, min(old, size))
            _free(ctx, pointer, old)
        return moved
    numpy = _numpy()
    result: int | None = numpy.realloc(numpy.ctx, pointer, size)
    return result


def _free(ctx: Any, pointer: int | None, size: int) -> None:
    if pointer is not None and pointer in _all_taken:
        slots = _all_taken.pop(pointer)
        slots.taken.pop(pointer, None)
        return  # the output's memory: nothing to free
    numpy = _numpy()
    numpy.free(numpy.ctx, pointer, size)


_CALLBACKS = (_MALLOC(_malloc), _CALLOC(_calloc), _REALLOC(_realloc), _FREE(_free))
_keep: list[Any] = []  # what numpy points into, alive as long as the process


def available() -> bool:
    """Whether numpy's allocations can be steered here (numpy >= 1.22, handler version 1)."""
    return _machinery() is not None


@contextmanager
def results_into(views: Sequence[np.ndarray]) -> Iterator[Slots]:
    """While the block runs (in this thread), an allocation of exactly one of `views`' sizes
    gets that view's memory, once each."""
    machinery = _machinery()
    slots = Slots(views)
    if machinery is None or not slots.free:
        yield slots
        return
    set_handler, capsule, _ = machinery
    _state.slots = slots
    slots.previous = set_handler(capsule)
    try:
        yield slots
    finally:
        set_handler(slots.previous)
        _state.slots = None
        slots.free.clear()
