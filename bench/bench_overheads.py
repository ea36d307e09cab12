"""The local executor's costs, which the "auto" planner's constants come from.

lampy/runtime/executors/_local.py takes STARTUP_S, SECONDS_PER_CHUNK, SECONDS_PER_BYTE and
SECONDS_PER_RESULT_BYTE from
these figures (each row's `note` prints the measured value), and the dask executor its
SECONDS_PER_CHUNK and SECONDS_PER_BYTE. The local pool's SECONDS_PER_CHUNK is only a floor:
the pool measures every chunk's round trip beyond its work and prices that (on a busy machine
1-3 ms, where 1000 pipelined no-op chunks here show about 0.1 ms each). Fan-out pays when
the work saved, (1 - 1/workers) of the serial time, exceeds these costs with a margin
(FAN_OUT_MARGIN in lampy/runtime/_plan.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from conftest import Row, with_dask_client

import lampy
from lampy.runtime.executors._local import LocalExecutor

CHUNKS = 1000
ROWS = 256 * 1024  # rows of 128 float64: 256 MiB in, 2 MiB back (a typical small result)


def noop(x: np.ndarray) -> np.ndarray:
    return x


def copy(x: np.ndarray) -> np.ndarray:
    return x.copy()


def first_column(x: np.ndarray) -> np.ndarray:
    return x[:, :1].copy()


def test_pool_startup(benchmark: Any) -> None:
    def start_and_run_one() -> None:
        pool = LocalExecutor()
        try:
            pool.start()
            pool.run(_job(np.zeros(2), chunks=((0, 1), (1, 2))))
        finally:
            pool.close()

    benchmark.group = "local pool start-up"
    benchmark.pedantic(start_and_run_one, rounds=3, iterations=1)
    benchmark.extra_info.update(
        system="start 2 workers, run 2 chunks",
        note=f"STARTUP_S ~ {benchmark.stats.stats.median:.2f}",
    )


def test_chunk_overhead(benchmark: Any) -> None:
    f = lampy.elemwise(chunks=CHUNKS, executor="local")(noop)
    x = np.zeros(CHUNKS)
    f(x)  # start the pool
    benchmark.group = f"{CHUNKS} no-op chunks"
    benchmark.pedantic(f, args=(x,), rounds=5, iterations=1)
    per_chunk = benchmark.stats.stats.median / CHUNKS
    benchmark.extra_info.update(system="lampy local", note=f"SECONDS_PER_CHUNK ~ {per_chunk:.1e}")


def test_bytes_moved(benchmark: Any) -> None:
    x = np.random.default_rng(0).random((ROWS, 128))
    f = lampy.elemwise(chunks=8, executor="local")(first_column)
    f(x)  # start the pool and size the arena
    baseline = _median_seconds(first_column, x)
    benchmark.group = "256 MiB into the pool, small result"
    benchmark.pedantic(f, args=(x,), rounds=5, iterations=1)
    extra = benchmark.stats.stats.median - baseline
    moved = x.nbytes + ROWS * 8  # in to the workers and the result back, as the planner counts
    benchmark.extra_info.update(
        system="lampy local, 8 chunks",
        note=f"numpy {baseline * 1e3:.0f} ms; SECONDS_PER_BYTE ~ 1/{moved / extra:.2g}",
    )


def test_result_bytes(benchmark: Any) -> None:
    x = np.random.default_rng(0).random((ROWS, 128))
    f = lampy.elemwise(chunks=8, executor="local")(copy)
    f(x)
    baseline = _median_seconds(copy, x)
    benchmark.group = "256 MiB in and out of the pool (copy)"
    benchmark.pedantic(f, args=(x,), rounds=5, iterations=1)
    extra = benchmark.stats.stats.median - baseline - x.nbytes / 6.5e9  # less the way in
    benchmark.extra_info.update(
        system="lampy local, 8 chunks",
        note=f"numpy {baseline * 1e3:.0f} ms; SECONDS_PER_RESULT_BYTE ~ 1/{x.nbytes / extra:.2g}",
    )


def _median_seconds(fn: Any, *args: Any) -> float:
    import time

    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _job(x: np.ndarray, chunks: tuple[tuple[int, int], ...]) -> Any:
    from lampy.runtime._job import Job, Part

    return Job(noop, (Part(0),), {}, (x,), (), chunks)


def test_dask_chunk_overhead(benchmark: Any, row: Row, dask_client: Any) -> None:
    """lampy/runtime/executors/dask.py takes SECONDS_PER_CHUNK from this row."""
    row(f"{CHUNKS} no-op chunks on Dask", "lampy dask executor (LocalCluster of processes)")
    client = with_dask_client(row, dask_client)
    f = lampy.elemwise(chunks=CHUNKS, executor="dask")(noop)
    x = np.zeros(CHUNKS)
    with lampy.using(executor="dask", client=client):
        f(x)
        benchmark.pedantic(f, args=(x,), rounds=3, iterations=1)
    per_chunk = benchmark.stats.stats.median / CHUNKS
    benchmark.extra_info["note"] = f"SECONDS_PER_CHUNK ~ {per_chunk:.1e}"


def test_dask_bytes_moved(benchmark: Any, row: Row, dask_client: Any) -> None:
    """lampy/runtime/executors/dask.py takes SECONDS_PER_BYTE from this row."""
    row("256 MiB to Dask workers, small result", "lampy dask executor, 8 chunks")
    client = with_dask_client(row, dask_client)
    x = np.random.default_rng(0).random((ROWS, 128))
    f = lampy.elemwise(chunks=8, executor="dask")(first_column)
    baseline = _median_seconds(first_column, x)
    with lampy.using(executor="dask", client=client):
        f(x)
        benchmark.pedantic(f, args=(x,), rounds=3, iterations=1)
    from lampy.runtime.executors._dask import SECONDS_PER_CHUNK

    extra = benchmark.stats.stats.median - baseline - 8 * SECONDS_PER_CHUNK  # less the chunks
    moved = x.nbytes + ROWS * 8
    benchmark.extra_info["note"] = f"SECONDS_PER_BYTE ~ 1/{moved / extra:.2g}"
