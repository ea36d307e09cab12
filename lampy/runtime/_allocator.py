"""glibc's malloc in lampy's processes: freed memory is kept for the next temporaries.

glibc maps each large allocation afresh and hands freed memory back to the OS, by thresholds
that move with what the process freed before. numpy code that makes and frees temporaries of a
few MB, batch after batch, can then fault in fresh pages on every batch, and how often depends
on the process's history: on this 2-core machine the Fisher features of the bundled sample took
35 ms a call in a fresh process, 47 ms once a one-row call had come first (as an auto probe
does), and 15 ms with the thresholds fixed; the one-hour CLI, inline, 3.9 s against 2.05 s.
So lampy fixes them in its workers and, at `import lampy`, in the calling process.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from typing import Any

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_FREE_BYTES = 64 << 20  # freed heap a process keeps for its next temporaries
MMAP_ABOVE_BYTES = 32 << 20  # larger allocations are mapped (and unmapped) each time
#: Set to 0 to leave glibc's own thresholds alone (in the caller and in local workers).
OPT_OUT = "LAMPY_KEEP_FREED_MEMORY"
_GLIBC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@cache
def libc() -> Any:
    """The C library, found among this process's own symbols: `ctypes.util.find_library`
    would start an `ldconfig -p` process in the caller and in every worker at start-up."""
    return ctypes.CDLL(None, use_errno=True)


def keep_freed_memory() -> bool:
    """Keep up to KEEP_FREE_BYTES of freed heap, and serve allocations under MMAP_ABOVE_BYTES
    from it, instead of glibc's moving thresholds. Returns whether they were set: not when
    LAMPY_KEEP_FREED_MEMORY=0, when the user set glibc's MALLOC_* variables, or where there is
    no mallopt (not glibc)."""
    if os.environ.get(OPT_OUT, "").strip() == "0":
        return False
    if any(name in os.environ for name in _GLIBC_VARIABLES):
        return False
    try:
        mallopt = libc().mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES)
    )
