"""The local pool: started once, reused, and whole again after a worker is killed."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from lampy.runtime.executors._local import LocalExecutor

from .test_local_faults import gone


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
        Path(flag + ".pid").write_text(str(os.getpid()))  # whole before the test can read it
        os.replace(flag + ".pid", flag + ".started")
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
    wait_until(lambda: gone(victim), 30, "SIGKILL did not end the worker")
    np.testing.assert_array_equal(double(x), x * 2)
    assert victim not in pool().worker_pids()


def test_worker_killed_during_a_chunk_is_replaced_and_chunk_retried(tmp_path: Path) -> None:
    flag = str(tmp_path / "go")
    f = lampy.elemwise(chunks=4, executor="local")(slow_unless_done)
    x = np.arange(40.0)

    result: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: result.append(f(x, flag)), daemon=True)
    thread.start()
    started = Path(flag + ".started")
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline, "the chunk never started"
            time.sleep(0.01)
        os.kill(int(started.read_text()), signal.SIGKILL)
    finally:  # even if this test fails: the call ends, and the pool is free for the next
        Path(flag).write_text("go")  # the retried chunk finds the flag and finishes
    thread.join(timeout=60)
    assert not thread.is_alive()
    np.testing.assert_array_equal(result[0], x + 1)


def kill_on_row_0(x: np.ndarray) -> np.ndarray:
    if 0 in x:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_chunk_that_always_kills_its_worker_exhausts_its_retries() -> None:
    f = lampy.elemwise(chunks=2)(kill_on_row_0)
    with lampy.using(executor="local", attempts=3), pytest.raises(lampy.RetriesExhausted) as caught:
        f(np.arange(10))
    error = caught.value
    assert re.match(r"chunk 0 of 2 \(rows 0:5\) was lost: all 3 attempts failed", str(error))
    assert error.chunk == 0 and error.rows == (0, 5) and len(error.causes) == 3
    assert all("killed by SIGKILL" in cause for cause in error.causes)
    assert isinstance(error.__cause__, lampy.WorkerLost)
    x = np.arange(100.0)
    np.testing.assert_array_equal(double(x), x * 2)  # the pool is whole again


def hang_once(x: np.ndarray, marker: str) -> np.ndarray:
    """Hangs on the first attempt at the chunk holding row 0; later attempts answer."""
    if x[0] == 0 and not os.path.exists(marker):
        Path(marker).write_text("hung")
        time.sleep(3600)
    return x + 1


def test_hung_chunk_is_killed_at_its_timeout_and_retried(tmp_path: Path) -> None:
    x = np.arange(20.0)
    # 3 s: a replaced worker's first chunk imports this test module, slow on a loaded machine
    with lampy.using(executor="local", timeout=3.0, chunks=2):
        np.testing.assert_array_equal(lampy.elemwise(hang_once)(x, str(tmp_path / "m")), x + 1)


def hang(x: np.ndarray) -> np.ndarray:
    time.sleep(3600)
    return x


def test_chunk_that_always_hangs_fails_within_its_retry_budget() -> None:
    start = time.monotonic()
    with (
        lampy.using(executor="local", timeout=0.5, chunks=2, attempts=3),
        pytest.raises(
            lampy.RetriesExhausted, match=r"within timeout=0.5s and was killed"
        ) as caught,
    ):
        lampy.elemwise(hang)(np.arange(10.0))
    assert len(caught.value.causes) == 3
    assert time.monotonic() - start < 15  # 3 attempts of 0.5 s, plus replacing workers


def kill_on_row_5(x: np.ndarray) -> dict[str, np.ndarray]:
    if 5 in x:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"n": np.array(len(x)), "s": x.sum(0)}


def test_partial_sum_merges_the_chunks_that_succeeded() -> None:
    f = lampy.sum(chunks=10, allow_partial=0.8)(kill_on_row_5)
    with lampy.using(executor="local", attempts=3):
        value, coverage = f(np.arange(100))
    assert isinstance(coverage, lampy.Coverage) and not coverage.complete
    assert list(coverage.lost) == [0] and coverage.fraction == 0.9
    assert coverage.merged == tuple(range(1, 10))
    assert int(value["n"]) == 90 and int(value["s"]) == np.arange(10, 100).sum()
    assert str(coverage).startswith("90.0% of rows (90 of 100), 9 of 10 chunks; lost: chunk 0")


def test_partial_sum_below_its_fraction_raises_the_lost_chunk() -> None:
    f = lampy.sum(chunks=10, allow_partial=0.95)(kill_on_row_5)
    with lampy.using(executor="local", attempts=3), pytest.raises(lampy.RetriesExhausted) as caught:
        f(np.arange(100))
    assert str(caught.value).startswith(
        "allow_partial=0.95 needs 95.0% of the rows; the chunks that succeeded cover 90.0% of "
        "rows (90 of 100), 9 of 10 chunks; lost: chunk 0 (rows 0:10). The first lost chunk: "
        "chunk 0 of 10 (rows 0:10) was lost: all 3 attempts failed"
    )
    assert caught.value.chunk == 0 and isinstance(caught.value.__cause__, lampy.WorkerLost)


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


def wait_until(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_an_auto_plan_made_on_a_cold_pool_holds_for_cold_calls_only() -> None:
    """A plan priced with the pool's start-up must not outlive the start-up (it would keep a
    region from ever fanning out); once every worker is up, the region plans again."""
    executor = executors.get("local", {"workers": 5})
    executor.close()  # cold: no worker of this size is running
    f = lampy.elemwise(np.sqrt)
    x = np.arange(100_000.0)
    try:
        with lampy.using(executor="local", workers=5):
            assert not executor.is_warm() and executor.costs().startup_s > 0
            f.explain(x)
            assert [key[-1] for key in f.runner._plans] == [False]
            executor.start()
            assert executor.costs().startup_s > 0  # started is not warm: they still import
            wait_until(executor.is_warm, 60, "the pool never finished starting")
            assert executor.costs().startup_s == 0
            f.explain(x)
            assert sorted(key[-1] for key in f.runner._plans) == [False, True]
    finally:
        executor.close()


def sleepy(x: np.ndarray) -> np.ndarray:
    time.sleep(0.05)
    return x + 1


def test_auto_prices_the_round_trips_it_measures_not_the_work() -> None:
    executor = pool()
    double(np.arange(100.0))  # warm
    executor.pool.round_trip = 1.0  # a wrong guess: measured chunks pull it down
    f = lampy.elemwise(chunks=4 * executor.size, executor="local")(sleepy)
    np.testing.assert_array_equal(f(np.arange(100.0)), np.arange(100.0) + 1)
    # 50 ms of work per chunk is the chunk's own, not a round trip's
    assert executor.pool.round_trip < 1.0 * 0.8**4
    executor.pool.round_trip = 0.0
    f(np.arange(100.0))
    assert 0.0 < executor.pool.round_trip < 0.05
    assert executor.costs().seconds_per_chunk == max(
        1.1e-4, executor.pool.round_trip / executor.size
    )


def heavy_rows(x: np.ndarray) -> np.ndarray:
    time.sleep(1.2e-3 * len(x))  # 1.2 s for 1000 rows: a warm pool saves 0.8 s of it
    return x * 3


def test_a_cold_auto_call_runs_here_and_starts_the_pool_without_waiting_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first auto call of a cold pool: it runs in this process and returns while the
    pool's workers have not even begun to start (each start is held here until the call has
    returned), so no foreground wait on start-up is possible; later calls use the pool."""
    from lampy.runtime.executors import _local as local

    executor = executors.get("local", {"workers": 3})
    assert isinstance(executor, LocalExecutor)
    executor.close()
    go = threading.Event()

    class Held(local._Worker):
        def __init__(self, *args: object) -> None:
            assert go.wait(60)
            super().__init__(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "_Worker", Held)
    x = np.arange(1000.0)
    f = lampy.elemwise(heavy_rows)
    try:
        with lampy.using(executor="local", workers=3, chunks="auto"):
            np.testing.assert_array_equal(f(x), x * 3)
            assert executor.pool.starting() and not executor.worker_pids()
            go.set()
            wait_until(executor.is_warm, 60, "the pool never finished starting")
            assert f.explain(x).fan_out  # warm now: the same call fans out
    finally:
        go.set()
        executor.close()


ROWS = 1 << 18  # 2 MiB of float64 rows: a cold call this large is probed
PROBED = ROWS // 64  # the probe's rows (chunk 0)


def tagged_rows(x: np.ndarray, caller: int, workers: int) -> np.ndarray:
    """Each row tripled and tagged with the process that computed it; 4 us of work a row. In
    the caller, past the probe's rows, it waits until the pool is up (so that the workers
    take the chunks after this one, whatever the machine's load)."""
    time.sleep(4e-6 * len(x))
    if os.getpid() == caller and x.size and x[0] >= PROBED:
        pool = executors.get("local", {"workers": workers})
        deadline = time.monotonic() + 60
        while not pool.is_warm() and time.monotonic() < deadline:
            time.sleep(0.01)
    return np.column_stack([x * 3, np.full(len(x), float(os.getpid()))])


def test_a_large_cold_call_runs_its_chunks_here_until_the_workers_are_up() -> None:
    """The first call of a cold pool that outlasts its start-up: it starts the pool, runs the
    chunks here meanwhile (never waiting for the workers), and the workers, once up, take the
    rest; split as a warm call is, and answered alike."""
    from lampy.runtime import _serial as serial

    executor = executors.get("local", {"workers": 3})
    assert isinstance(executor, LocalExecutor)
    executor.close()
    x = np.arange(float(ROWS))
    f = lampy.elemwise(tagged_rows)
    try:
        with lampy.using(executor="local", workers=3, chunks="auto"):
            assert "the chunks run here until they are up" in f.explain(x, os.getpid(), 3).reason
            before = serial.snapshot()
            got = f(x, os.getpid(), 3)
            here = serial.since(before).get("here", 0.0)
            np.testing.assert_array_equal(got[:, 0], x * 3)
            who = got[:, 1].astype(int)
            assert set(who[: PROBED + 1]) == {os.getpid()}  # chunk 0 and the next ran here
            assert set(who[PROBED:]) - {os.getpid()} <= set(executor.worker_pids())
            assert set(who) & set(executor.worker_pids())  # the workers took the rest
            assert here > 0
            plan = f.explain(x, os.getpid(), 3)
            assert plan.fan_out and "run here" not in plan.reason  # warm: the same chunks
    finally:
        executor.close()


def fails_past_the_probe(x: np.ndarray) -> np.ndarray:
    time.sleep(4e-6 * len(x))
    if (x == PROBED + 1).any():
        raise ValueError("row 4097 is bad")
    return x


def test_a_user_error_in_a_chunk_run_here_names_the_chunk() -> None:
    executor = executors.get("local", {"workers": 3})
    executor.close()
    try:
        bad = pytest.raises(ValueError, match="row 4097 is bad")
        with lampy.using(executor="local", workers=3, chunks="auto"), bad as caught:
            lampy.elemwise(fails_past_the_probe)(np.arange(float(ROWS)))
        assert any(n.startswith("raised in lampy chunk 1 of") for n in caught.value.__notes__)
    finally:
        executor.close()


def slow_with(x: np.ndarray, guard: object) -> np.ndarray:
    time.sleep(4e-6 * len(x))
    return x


def test_a_large_cold_call_that_cannot_leave_says_so_before_running_here() -> None:
    """As a warm call would: no chunk runs here first (the answer would depend on whether the
    pool came up in time)."""
    executor = executors.get("local", {"workers": 3})
    executor.close()
    ran = []
    f = lampy.elemwise(lambda x, guard: ran.append(len(x)) or slow_with(x, guard))
    try:
        unpicklable = pytest.raises(lampy.SerializationError, match="argument 'guard' \\(lock\\)")
        with lampy.using(executor="local", workers=3, chunks="auto"), unpicklable:
            f(np.arange(float(ROWS)), threading.Lock())
        assert ran == [1, 1, PROBED]  # the probe's calls only (one row twice, then its rows)
    finally:
        executor.close()


def test_closing_a_pool_kills_every_worker_before_waiting_for_any(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool of N ends in one worker's exit time, not N in turn (at the program's exit too)."""
    from lampy.runtime.executors import _local as local

    executor = executors.get("local", {"workers": 3})
    assert isinstance(executor, LocalExecutor)
    x = np.arange(30.0)
    with lampy.using(executor="local", workers=3):
        np.testing.assert_array_equal(lampy.elemwise(chunks=3)(np.negative)(x), -x)
    pids = executor.worker_pids()
    assert len(pids) == 3
    events: list[tuple[str, int]] = []
    kill, stop = local._Worker.kill, local._Worker.stop

    def recorded_kill(worker: local._Worker) -> None:
        events.append(("kill", worker.pid))
        kill(worker)

    def recorded_stop(worker: local._Worker, wait: float = local.STOP_WAIT_S) -> None:
        events.append(("reap", worker.pid))
        stop(worker, wait)

    monkeypatch.setattr(local._Worker, "kill", recorded_kill)
    monkeypatch.setattr(local._Worker, "stop", recorded_stop)
    executor.close()
    first_reap = events.index(("reap", pids[0]))
    assert {pid for kind, pid in events[:first_reap] if kind == "kill"} == set(pids)
    assert all(gone(pid) for pid in pids) and not executor.worker_pids()


def test_reading_the_callers_memory_starts_no_helper_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ctypes.util.find_library` runs `ldconfig -p`: a process start in the caller and in every
    worker at start-up, for a library already loaded. libc comes from the process's symbols."""
    import ctypes.util

    from lampy.runtime import _allocator
    from lampy.runtime.executors import _caller_memory as caller_memory

    def refused(name: str) -> str:
        raise AssertionError(f"find_library({name!r}) starts an ldconfig process")

    expected = caller_memory.readable()
    caches = (_allocator.libc, caller_memory._syscall)
    monkeypatch.setattr(ctypes.util, "find_library", refused)
    for cached in caches:
        cached.cache_clear()
    try:
        assert caller_memory.readable() == expected
        if expected:
            got = np.zeros(4)
            source = np.arange(4.0)
            caller_memory.read_into(os.getpid(), source.__array_interface__["data"][0], got)
            np.testing.assert_array_equal(got, source)
    finally:
        for cached in caches:
            cached.cache_clear()


def minor_faults(pids: list[int]) -> int:
    """Minor page faults these processes have taken so far (/proc/PID/stat, field 10)."""
    return sum(int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[7]) for p in pids)


@lampy.elemwise(chunks=2, executor="local")
def in_batches(x: np.ndarray) -> np.ndarray:
    """Large temporaries made and freed batch after batch (8 MB each), as the Fisher features
    do: heap memory that glibc would hand back to the OS after every batch."""
    out = np.empty(x.shape[0])
    for row in range(x.shape[0]):
        a = np.full(1 << 20, x[row])
        b = np.sin(a)
        c = b * a
        out[row] = c[0]
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_keep_freed_memory_for_the_next_batch() -> None:
    """A worker reuses the memory its last batch freed: repeating the call takes next to no
    new pages (with glibc's own thresholds, some thousands)."""
    x = np.arange(40.0)
    want = np.sin(x) * x
    np.testing.assert_array_equal(in_batches(x), want)  # the pool warm
    pids = pool().worker_pids()
    before = minor_faults(pids)
    np.testing.assert_array_equal(in_batches(x), want)
    assert pool().worker_pids() == pids
    assert minor_faults(pids) - before < 500


def test_the_pool_moves_no_bytes_for_arrays_in_shared_memory() -> None:
    """The planner prices arrays already in lampy's shared memory at nothing on the local
    pool (they are mapped by descriptor), whatever their size."""
    pool = executors.get("local", {"workers": 2})
    assert pool.costs().maps_shared_memory
    region = lampy.elemwise(shared=("table",))(lambda x, table: x + table[0])
    table = lampy.empty(1 << 20)
    binding = region.runner.prepare((np.zeros(8), table), {}, "local").binding
    assert binding.moved_bytes(True) == (8, 0)  # x's 8 bytes a row are copied; not the table
    assert binding.moved_bytes(False) == (8, 8 << 20)  # an executor that moves both
    shared_x = lampy.asshared(np.zeros(8))
    shared_binding = region.runner.prepare((shared_x, table), {}, "local").binding
    assert shared_binding.moved_bytes(True) == (0, 0)


LOAD_S = 0.5


def _loaded_slowly(seconds: float) -> _SlowToLoad:
    time.sleep(seconds)
    return _SlowToLoad()


class _SlowToLoad:
    """An argument that takes LOAD_S to unpickle, as a job whose function's module a worker
    imports the first time."""

    def __reduce__(self) -> tuple[object, tuple[float]]:
        return (_loaded_slowly, (LOAD_S,))


@lampy.elemwise(chunks=2, executor="local")
def plus_one(x: np.ndarray, _: _SlowToLoad) -> np.ndarray:
    return x + 1


@lampy.elemwise(chunks=2, executor="local")
def plus(x: np.ndarray) -> np.ndarray:
    return x + 1


def test_loading_a_job_is_not_priced_as_each_chunks_overhead() -> None:
    """The pool prices a chunk's cost beyond its work from the round trips it sees; the time a
    worker spends loading a new job (a first import) is that job's work, not every chunk's."""
    x = np.arange(8.0)
    np.testing.assert_array_equal(plus_one(x, _SlowToLoad()), x + 1)  # the pool warm
    for _ in range(20):  # the average settles on quick chunks
        np.testing.assert_array_equal(plus(x), x + 1)
    np.testing.assert_array_equal(plus_one(x, _SlowToLoad()), x + 1)
    assert pool().pool.round_trip < 0.2 * LOAD_S / 4


SLOW_IMPORT = """
import os
from pathlib import Path

import lampy

Path(__file__).with_name(f"imported.{os.getpid()}").touch()


def triple(x):
    return x * 3


@lampy.elemwise
def decorated(x):
    return x * 3
"""


def test_workers_import_a_region_s_module_before_they_are_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A function wrapped where it is used (`lampy.elemwise(module.f)`) travels by name, so
    every worker imports its module for the first job: when the pool starts for it, they
    import it while they start, before they say they are ready, so that first job waits for
    no import (one that took seconds stalled it). A module that fails to import is left to
    its job. A function decorated in place travels by value: its module is not imported for
    it (a worker never ran that module's top-level code before, and still does not)."""
    from lampy.regions._runner import _imported_for

    (tmp_path / "lampy_slow_import.py").write_text(SLOW_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    import lampy_slow_import as module  # type: ignore[import-not-found]

    assert _imported_for(module.triple) == ("lampy_slow_import",)
    assert _imported_for(module.decorated.region.function) == ()
    assert _imported_for(lambda x: x) == ()
    executor = executors.get("local", {"workers": 3})
    assert isinstance(executor, LocalExecutor)
    executor.close()
    try:
        executor.import_ahead((*_imported_for(module.triple), "lampy_no_such_module"))
        executor.start()
        wait_until(executor.is_warm, 60, "the pool never finished starting")
        imported = {int(p.suffix[1:]) for p in tmp_path.glob("imported.*")} - {os.getpid()}
        assert imported == set(executor.worker_pids())
        x = np.arange(100.0)
        with lampy.using(executor="local", workers=3, chunks=3):
            np.testing.assert_array_equal(lampy.elemwise(module.triple)(x), x * 3)
    finally:
        executor.close()
        executor.pool.modules.clear()
