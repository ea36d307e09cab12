"""Workers read their chunk's rows straight from the caller's memory (Linux process_vm_readv).

An input that is not in shared memory used to be copied into the pool's arena by the caller's
threads before its chunks could leave: a serial step that grows with the data, and the first
chunk waited for it. Instead, each worker copies its own rows from the caller's address space
into its own memory, all workers at once, while the caller only sends addresses. Linux allows
this between processes of one user (ptrace access: same credentials, the caller dumpable, no
Yama restriction on reading a parent); `readable()` checks what the caller can know, and the
pool falls back to the arena when it says no or a worker reports that it could not read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from functools import cache
from typing import Any

import numpy as np

from lampy.runtime._allocator import libc


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@cache
def _syscall() -> Any:
    """libc's process_vm_readv, or None where there is none (not Linux, old libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = libc().process_vm_readv
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_ssize_t
    function.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    return function


class CannotRead(OSError):
    """A worker could not read the caller's memory (the pool then copies inputs itself)."""


def read_into(pid: int, address: int, target: np.ndarray) -> None:
    """Copy `target.nbytes` bytes at `address` in process `pid` into `target` (C-contiguous).
    The GIL is released meanwhile (ctypes)."""
    function = _syscall()
    if function is None:
        raise CannotRead(errno.ENOSYS, "process_vm_readv is not available here")
    done, total = 0, target.nbytes
    base = int(target.__array_interface__["data"][0])
    while done < total:
        local = _IoVec(base + done, total - done)
        remote = _IoVec(address + done, total - done)
        got = function(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            code = ctypes.get_errno() if got < 0 else errno.EIO
            raise CannotRead(code, f"process_vm_readv from pid {pid}: {os.strerror(code)}")
        done += got


def readable() -> bool:
    """Whether workers (this process's children, same user) can read this process's memory.

    Checks what can be known here: the call exists and no seccomp filter refuses it (a read
    of this very process), this process is dumpable (else only privileged processes may read
    it), and Yama does not restrict reading a non-descendant (a child reading its parent).
    """
    probe = np.arange(8, dtype=np.int64)
    copy = np.zeros_like(probe)
    try:
        read_into(os.getpid(), int(probe.__array_interface__["data"][0]), copy)
    except OSError:
        return False
    if not np.array_equal(probe, copy):
        return False
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as scope:
            if scope.read().strip() != "0":
                return False
    except OSError:
        pass  # no Yama: ordinary same-user rules
    return _dumpable()


def _dumpable() -> bool:
    pr_get_dumpable = 3
    try:
        return bool(libc().prctl(pr_get_dumpable, 0, 0, 0, 0) == 1)
    except (OSError, AttributeError):
        return False
