"""The openlambda executor against `lampy worker` on loopback, as ratios measured in one run.

- (f) fan-out overhead: 10,000 no-op chunks through the executor, against raw aiohttp POSTs
  (same count, same concurrency) to a trivial aiohttp server in another process, the machine's
  limit for this workload. Target >= 0.5. Two rows: automatic batching (many tiny chunks share
  a call) and one call per chunk, whose ratio is the per-call overhead of a trip through the
  worker and a sandbox; lampy local and Dask distributed (10,000 tasks) for comparison.
- data path: a 256 MiB float64 array to one call and back, against the same bytes echoed over
  a raw loopback TCP socket. Target >= 0.05.
- cold vs warm: one call right after a redeploy (no sandbox) against one on a warm sandbox.
- pre-warm: a 64-chunk job (each chunk waits 50 ms, like a call to a slow service) on a cold
  lambda: without pre-warm, after `prewarm(4)` done ahead, and with `prewarm(4)` timed too
  (`lampy worker` here allows 4 sandboxes: twice the 2 cores).

The executor's STARTUP_S, SECONDS_PER_CHUNK and SECONDS_PER_BYTE come from these figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import Row, with_dask_client
from rawnet import TcpEcho, raw_posts, trivial_server

import lampy
from lampy.runtime.openlambda._deploy import upload
from lampy.runtime.openlambda._executor import OpenLambdaExecutor

CHUNKS = 10_000
CONCURRENCY = 32
DATA = np.random.default_rng(0).standard_normal(32 * 1024 * 1024)  # 256 MiB
FAN_OUT = f"(f) fan-out: {CHUNKS:,} no-op chunks"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with trivial_server() as url:
        yield url


def noop(x: np.ndarray) -> np.ndarray:
    return x


def wait_50ms(x: np.ndarray) -> np.ndarray:
    time.sleep(0.05)
    return x


def test_fan_out_raw_aiohttp(benchmark: Any, row: Row, server: str) -> None:
    """The machine's limit for (f): the same count of tiny POSTs, no lampy at all."""
    row(FAN_OUT, f"raw aiohttp: {CHUNKS:,} tiny POSTs to a trivial server", baseline=True)
    benchmark.pedantic(raw_posts, args=(server, CHUNKS), rounds=3, iterations=1)
    benchmark.extra_info["limit_s"] = benchmark.stats.stats.median


@pytest.mark.parametrize("batch", [0, 1])
def test_fan_out_openlambda(benchmark: Any, row: Row, worker: str, batch: int) -> None:
    how = "automatic batching" if batch == 0 else "one call per chunk (batch=1)"
    row(FAN_OUT, f"lampy openlambda, {how}", **({"target": 0.5} if batch == 0 else {}))
    f = lampy.elemwise(noop, chunks=CHUNKS, executor="openlambda")
    x = np.zeros(CHUNKS)
    with lampy.using(executor="openlambda", url=worker, concurrency=CONCURRENCY, batch=batch):
        f(x)  # sandboxes up and warm
        benchmark.pedantic(f, args=(x,), rounds=3 if batch != 1 else 2, iterations=1)
    per_chunk = benchmark.stats.stats.median / CHUNKS
    benchmark.extra_info["note"] = f"{per_chunk * 1e6:.0f} us per chunk"


def test_fan_out_local(benchmark: Any, row: Row) -> None:
    row(FAN_OUT, "lampy local")
    f = lampy.elemwise(noop, chunks=CHUNKS, executor="local")
    x = np.zeros(CHUNKS)
    f(x)
    benchmark.pedantic(f, args=(x,), rounds=3, iterations=1)
    benchmark.extra_info["note"] = f"{benchmark.stats.stats.median / CHUNKS * 1e6:.0f} us per chunk"


DATA_PATH = "data path: 256 MiB there and back"


def test_data_path_raw_tcp(benchmark: Any, row: Row) -> None:
    row(DATA_PATH, "raw loopback TCP echo", baseline=True)
    benchmark.pedantic(TcpEcho(DATA.nbytes), args=(DATA,), rounds=3, iterations=1)
    benchmark.extra_info["limit_s"] = benchmark.stats.stats.median


def test_data_path_openlambda(benchmark: Any, row: Row, worker: str) -> None:
    row(DATA_PATH, "lampy openlambda, one call", target=0.05)
    f = lampy.elemwise(noop, chunks=1, executor="openlambda")
    with lampy.using(executor="openlambda", url=worker):
        result = benchmark.pedantic(f, args=(DATA,), rounds=3, iterations=1, warmup_rounds=1)
    np.testing.assert_array_equal(result, DATA)
    rate = 2 * DATA.nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["note"] = f"{rate:.2f} GB/s moved"


def ping(executor: OpenLambdaExecutor) -> None:
    executor._loop.run(executor.caller.ping(0))


@pytest.fixture(scope="module")
def pinger(worker: str) -> Iterator[OpenLambdaExecutor]:
    executor = OpenLambdaExecutor(url=worker)
    yield executor
    executor.close()


def test_warm_call(benchmark: Any, pinger: OpenLambdaExecutor) -> None:
    ping(pinger)
    benchmark.group = "one call: cold vs warm"
    benchmark.extra_info.update(system="warm sandbox", baseline=True)
    benchmark.pedantic(ping, args=(pinger,), rounds=50, iterations=1, warmup_rounds=3)


def test_cold_call(benchmark: Any, worker: str, pinger: OpenLambdaExecutor) -> None:
    benchmark.group = "one call: cold vs warm"
    benchmark.extra_info.update(system="cold: first call after a redeploy")
    benchmark.pedantic(ping, args=(pinger,), setup=lambda: upload(worker) and None, rounds=5)


def cold_lambda(worker: str, warm: int) -> None:
    """Redeploy (so no sandbox is left from earlier rounds), then warm `warm` sandboxes."""
    upload(worker)
    if warm:
        executor = OpenLambdaExecutor(url=worker)
        executor.prewarm(warm)
        executor.close()


def job_of_64(worker: str, warm_inside: int = 0) -> None:
    executor = OpenLambdaExecutor(url=worker)
    try:
        if warm_inside:
            executor.prewarm(warm_inside)
        f = lampy.elemwise(wait_50ms, chunks=64, executor="openlambda")
        with lampy.using(executor="openlambda", url=worker):
            f(np.zeros(64))
    finally:
        executor.close()


@pytest.mark.parametrize("mode", ["cold", "prewarmed ahead", "prewarm included"])
def test_prewarm(benchmark: Any, worker: str, mode: str) -> None:
    benchmark.group = "64 chunks of 50 ms on a cold lambda (4 sandboxes at most)"
    benchmark.extra_info.update(
        system={
            "cold": "no prewarm",
            "prewarmed ahead": "prewarm(4) before, untimed",
            "prewarm included": "prewarm(4) then the job, timed together",
        }[mode],
        baseline=mode == "cold",
    )
    ahead = 4 if mode == "prewarmed ahead" else 0
    inside = 4 if mode == "prewarm included" else 0
    benchmark.pedantic(
        job_of_64,
        args=(worker, inside),
        setup=lambda: cold_lambda(worker, ahead),
        rounds=3,
        iterations=1,
    )


# Last in the module: the Dask cluster it starts (dask_client) would slow the rows after it.
def test_fan_out_dask_distributed(benchmark: Any, row: Row, dask_client: Any) -> None:
    row(FAN_OUT, "Dask distributed (LocalCluster of processes): client.map of no-op tasks")
    client = with_dask_client(row, dask_client)
    parts = np.array_split(np.zeros(CHUNKS), CHUNKS)

    def run() -> None:
        client.gather(client.map(noop, parts, pure=False))

    benchmark.pedantic(run, rounds=1, iterations=1)  # ~10 s a round: the cluster is warm
    benchmark.extra_info["note"] = f"{benchmark.stats.stats.median / CHUNKS * 1e6:.0f} us per task"
