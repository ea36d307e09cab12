"""The openlambda executor against `lampy worker` on loopback, as ratios measured in one run.

- fan-out overhead: 10,000 no-op chunks through the executor, against raw aiohttp POSTs (same
  count, same concurrency) to a trivial aiohttp server in another process. Target >= 0.5.
  Two rows: automatic batching (many tiny chunks share a call) and one call per chunk, whose
  ratio is the per-call overhead of a trip through the worker and a sandbox.
- data path: a 256 MiB float64 array to one call and back, against the same bytes echoed over
  a raw loopback TCP socket. Target >= 0.05.
- cold vs warm: one call right after a redeploy (no sandbox) against one on a warm sandbox.
- pre-warm: a 64-chunk job (each chunk waits 50 ms, like a call to a slow service) on a cold
  lambda: without pre-warm, after `prewarm(4)` done ahead, and with `prewarm(4)` timed too
  (`lampy worker` here allows 4 sandboxes: twice the 2 cores).

The executor's STARTUP_S, SECONDS_PER_CHUNK and SECONDS_PER_BYTE come from these figures.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from lampy.runtime.openlambda import frames
from lampy.runtime.openlambda.deploy import upload
from lampy.runtime.openlambda.executor import OpenLambdaExecutor
from lampy.testing import free_port, openlambda_worker

CHUNKS = 10_000
CONCURRENCY = 32
DATA = np.random.default_rng(0).standard_normal(32 * 1024 * 1024)  # 256 MiB
TRIVIAL_SERVER = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.Response(body=b"ok")
app = web.Application()
app.router.add_post("/", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    os.environ.setdefault("LAMPY_SECRET", "lampy-bench-secret")
    try:
        with openlambda_worker(tmp_path_factory.mktemp("registry"), max_sandboxes=4) as url:
            yield url
    finally:
        executors.shutdown()


@pytest.fixture(scope="module")
def trivial_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(port)])
    try:
        wait_for(port, process)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=10)


def noop(x: np.ndarray) -> np.ndarray:
    return x


def wait_50ms(x: np.ndarray) -> np.ndarray:
    time.sleep(0.05)
    return x


def raw_posts(url: str) -> None:
    async def main() -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                async with limit, session.post(url, data=b"x" * 100) as answer:
                    await answer.read()

            await asyncio.gather(*(one() for _ in range(CHUNKS)))

    asyncio.run(main())


def test_fan_out_raw_aiohttp(benchmark: Any, trivial_server: str) -> None:
    benchmark.group = f"fan-out: {CHUNKS:,} tiny calls"
    benchmark.extra_info.update(system="raw aiohttp POSTs to a trivial server", baseline=True)
    benchmark.pedantic(raw_posts, args=(trivial_server,), rounds=3, iterations=1)


@pytest.mark.parametrize("batch", [0, 1])
def test_fan_out_openlambda(benchmark: Any, worker: str, batch: int) -> None:
    f = lampy.elemwise(noop, chunks=CHUNKS, executor="openlambda")
    x = np.zeros(CHUNKS)
    with lampy.using(executor="openlambda", url=worker, concurrency=CONCURRENCY, batch=batch):
        f(x)  # sandboxes up and warm
        benchmark.group = f"fan-out: {CHUNKS:,} tiny calls"
        benchmark.pedantic(f, args=(x,), rounds=3 if batch != 1 else 2, iterations=1)
    per_chunk = benchmark.stats.stats.median / CHUNKS
    how = "automatic batching" if batch == 0 else "one call per chunk (batch=1)"
    benchmark.extra_info.update(
        system=f"lampy openlambda, no-op chunks, {how}",
        note=f"{per_chunk * 1e6:.0f} us per chunk",
        **({"target": 0.5} if batch == 0 else {}),
    )


ECHO_BUFFERS = [bytearray(DATA.nbytes), bytearray(DATA.nbytes)]  # allocated once, untimed


def echo_over_tcp(data: np.ndarray) -> None:
    """Send the bytes to an echo thread over loopback TCP and read them back."""
    view = memoryview(data).cast("B")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def receive(conn: socket.socket, into: bytearray) -> None:
        target, got = memoryview(into), 0
        while got < len(into):
            got += conn.recv_into(target[got : got + (1 << 22)])

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            receive(conn, ECHO_BUFFERS[0])
            conn.sendall(ECHO_BUFFERS[0])

    thread = threading.Thread(target=echo)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(view)
        receive(client, ECHO_BUFFERS[1])
    thread.join()
    server.close()


def test_data_path_raw_tcp(benchmark: Any) -> None:
    benchmark.group = "data path: 256 MiB there and back"
    benchmark.extra_info.update(system="raw loopback TCP echo", baseline=True)
    benchmark.pedantic(echo_over_tcp, args=(DATA,), rounds=3, iterations=1)


def test_data_path_openlambda(benchmark: Any, worker: str) -> None:
    f = lampy.elemwise(noop, chunks=1, executor="openlambda")
    with lampy.using(executor="openlambda", url=worker):
        benchmark.group = "data path: 256 MiB there and back"
        result = benchmark.pedantic(f, args=(DATA,), rounds=3, iterations=1, warmup_rounds=1)
    np.testing.assert_array_equal(result, DATA)
    rate = 2 * DATA.nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(
        system="lampy openlambda, one call", target=0.05, note=f"{rate:.2f} GB/s moved"
    )


def ping(executor: OpenLambdaExecutor) -> None:
    executor._loop.run(executor._exchange(frames.encode(frames.PING, 0, executor.secret)))


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


def test_results_path() -> None:
    """The figures land in bench/RESULTS.md through bench/conftest.py."""
    assert Path(__file__).with_name("conftest.py").exists()
