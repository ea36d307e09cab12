"""The local pool: started once, reused, and whole again after a worker is killed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from lampy.runtime.executors.local import LocalExecutor


def pool() -> LocalExecutor:
    executor = executors.get("local", {})
    assert isinstance(executor, LocalExecutor)
    return executor


@lampy.elemwise(chunks=4, executor="local")
def double(x: np.ndarray) -> np.ndarray:
    return x * 2


def slow_unless_done(x: np.ndarray, flag: str) -> np.ndarray:
    """Blocks the chunk holding row 0 until `flag` exists, so a test can kill its worker."""
    if x[0] == 0 and not os.path.exists(flag):
        Path(flag + ".started").write_text(str(os.getpid()))
        while not os.path.exists(flag):
            time.sleep(0.01)
    return x + 1


def test_pool_is_reused_across_calls() -> None:
    x = np.arange(100.0)
    np.testing.assert_array_equal(double(x), x * 2)
    pids = pool().worker_pids()
    np.testing.assert_array_equal(double(x), x * 2)
    assert pool().worker_pids() == pids
    assert len(pids) == pool().size


def test_worker_killed_between_calls_is_replaced() -> None:
    x = np.arange(100.0)
    double(x)
    victim = pool().worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    np.testing.assert_array_equal(double(x), x * 2)
    assert victim not in pool().worker_pids()


def test_worker_killed_during_a_chunk_is_replaced_and_chunk_retried(tmp_path: Path) -> None:
    flag = str(tmp_path / "go")
    f = lampy.elemwise(chunks=4, executor="local")(slow_unless_done)
    x = np.arange(40.0)

    result: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: result.append(f(x, flag)))
    thread.start()
    started = Path(flag + ".started")
    deadline = time.monotonic() + 20
    while not started.exists():
        assert time.monotonic() < deadline, "the chunk never started"
        time.sleep(0.01)
    os.kill(int(started.read_text()), signal.SIGKILL)
    Path(flag).write_text("go")  # the retried chunk finds the flag and finishes
    thread.join(timeout=30)
    assert not thread.is_alive()
    np.testing.assert_array_equal(result[0], x + 1)


def kill_self(x: np.ndarray) -> np.ndarray:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_chunk_that_always_kills_its_worker_fails_with_worker_lost() -> None:
    f = lampy.elemwise(chunks=2, executor="local")(kill_self)
    with pytest.raises(lampy.WorkerLost, match=r"chunk \d \(rows \d+:\d+\).*killed by SIGKILL"):
        f(np.arange(10))
    x = np.arange(100.0)
    np.testing.assert_array_equal(double(x), x * 2)  # the pool is whole again


def test_workers_option_sets_pool_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMPY_LOCAL_WORKERS", "3")
    x = np.arange(30.0)
    with lampy.using(chunks=6):
        np.testing.assert_array_equal(lampy.elemwise(lambda a: a - 1)(x), x - 1)
    sized = executors.get("local", {"workers": "3"})
    assert isinstance(sized, LocalExecutor) and len(sized.worker_pids()) == 3
    sized.close()
    with pytest.raises(
        lampy.OptionError, match="option 'workers' of the local executor must be int"
    ):
        executors.get("local", {"workers": "three"})


def test_large_results_come_back_through_shared_memory() -> None:
    x = np.random.default_rng(0).random((4096, 64))  # 2 MiB: above the in-band limit
    np.testing.assert_array_equal(double(x), x * 2)
    assert double(x).flags.writeable
