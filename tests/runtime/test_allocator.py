"""The calling process keeps freed memory for its next temporaries from `import lampy` on, as
lampy's workers do (tests/runtime/executors/test_local.py), unless the user says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lampy.runtime import _allocator

BATCHES = """
import resource
import numpy as np
import lampy

def batch(value):
    a = np.full(1 << 20, value)  # three 8 MB temporaries, freed together: numpy's pattern
    b = np.sin(a)
    return float((b * a)[0])

batch(0.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    batch(float(i))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_after_import(**env: str) -> int:
    """Minor page faults of 40 batches of numpy temporaries in a fresh process that imported
    lampy, with these environment variables."""
    clean = {k: v for k, v in os.environ.items() if k not in (_allocator.OPT_OUT, *env)}
    done = subprocess.run(
        [sys.executable, "-c", BATCHES], env=clean | env, capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_the_caller_reuses_freed_memory_unless_told_not_to() -> None:
    kept = faults_after_import()
    assert kept < 500  # the batches reuse the heap
    assert faults_after_import(LAMPY_KEEP_FREED_MEMORY="0") > 10 * max(kept, 100)
    assert faults_after_import(MALLOC_TRIM_THRESHOLD_="131072") > 10 * max(kept, 100)


def test_the_user_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_allocator.OPT_OUT, "0")
    assert not _allocator.keep_freed_memory()
    monkeypatch.delenv(_allocator.OPT_OUT)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not _allocator.keep_freed_memory()


def test_a_c_library_without_mallopt_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """musl, macOS: no mallopt; `import lampy` must still work there."""
    monkeypatch.delenv(_allocator.OPT_OUT, raising=False)
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_allocator, "libc", lambda: object())
    assert not _allocator.keep_freed_memory()
