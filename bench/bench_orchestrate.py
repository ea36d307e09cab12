"""Orchestration in lambdas against orchestration by the client, side by side in one run (issue 18).

One workload: a 1,000-chunk `@lampy.sum` over a 19 MiB input (published by reference, so
chunk calls carry no rows in either mode), chunks=1000 so both modes merge the same tree.
- client traffic: calls and bytes the client process sends and receives, to the platform (its
  frames) and to the job store (the array server's /jobs requests), per job. Target: lambda
  orchestration >= 100x fewer calls and bytes than client orchestration (noted per row).
- end to end on `lampy worker` and on OpenLambda's own worker (../shared/olreal; the kit's
  fixture, or a running worker with lampy deployed named by LAMPY_BENCH_OLREAL_URL). Target:
  lambda orchestration no worse than 1.2x client orchestration (noted per row).
- a slow client link: every call the client makes waits 50 ms more (`Link`; a client far
  from its platform, whose array server stays near); the coordinator, beside the worker,
  pays it once per job.
- a client whose link is the bottleneck (`Link`: 50 ms and 100 Mbit/s, shared by every
  call the client makes, to the platform and to the job store; a model, not a throttled
  network): a 200-chunk `@lampy.sum` of 512 KiB partials (a Gram matrix) over an input
  that already lives on an array server beside the platform (a `lampy.remote` reference).
  Client orchestration takes every partial over the link; lambda orchestration, its job
  state on that array server, only the answer.
Client orchestration runs with its automatic batching (several tiny chunks per call) and,
as the issue counts it, with one call per chunk (batch=1).
Each mode's answer is checked equal to numpy's tree bit for bit.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import Row, olreal_kit, served_arrays, started_olreal

import lampy
from lampy.runtime import executors
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.runtime.openlambda._transport import AiohttpTransport, Reply
from lampy.runtime.remote import _jobs as jobs
from lampy.runtime.remote._reference import remote

CHUNKS = 1000
ROWS, COLUMNS = 300 * CHUNKS, 8  # 19.2 MB: over PUBLISH_BYTES, so sent by reference
GROUP = "1,000-chunk @lampy.sum ({})"
LINK_S = 0.05  # the slow link's wait per client call
MODES = ("client", "client, one call per chunk", "lambda")


def energy(x: np.ndarray) -> np.ndarray:
    return (np.sin(x) ** 2).sum(axis=0)


REGION = lampy.sum(chunks=CHUNKS)(energy)


class Traffic:
    """Calls and bytes at the client, to the platform and to the job store."""

    calls = bytes = store_calls = store_bytes = 0

    @classmethod
    def reset(cls) -> None:
        cls.calls = cls.bytes = cls.store_calls = cls.store_bytes = 0

    @classmethod
    def total(cls) -> tuple[int, int]:
        return cls.calls + cls.store_calls, cls.bytes + cls.store_bytes


class Link:
    """The client's link, modelled: each transfer waits `latency_s`, and the bytes of all
    transfers share `bytes_per_s` one after another (a transfer waits for the ones before)."""

    def __init__(self, latency_s: float = 0.0, bytes_per_s: float = float("inf")) -> None:
        self.latency_s, self.bytes_per_s = latency_s, bytes_per_s
        self.busy_until = 0.0
        self.lock = threading.Lock()

    def wait_s(self, size: int) -> float:
        """How long a transfer of `size` bytes that ends now (at loopback speed) takes."""
        with self.lock:
            now = time.monotonic()
            self.busy_until = max(now, self.busy_until) + size / self.bytes_per_s
            return self.busy_until - now + self.latency_s


FAST = Link()
link = FAST  # the link of the case running now


class Counting(AiohttpTransport):
    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        reply = await super().post(frame, timeout)
        size = frame.size + (reply.reader.total if reply.reader else len(reply.body))
        await asyncio.sleep(link.wait_s(size))
        Traffic.calls += 1
        Traffic.bytes += size
        return reply


@pytest.fixture(autouse=True)
def count_store_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the client's job-store requests (a coordinator's run in sandboxes, not here)."""
    original = jobs.JobStore._call

    def counted(self: jobs.JobStore, method: str, path: str, data: bytes | None = None, **kw: Any):  # type: ignore[no-untyped-def]
        status, answer = original(self, method, path, data, **kw)
        size = len(data or b"") + len(answer) + 300  # + headers, roughly
        time.sleep(link.wait_s(size))
        Traffic.store_calls += 1
        Traffic.store_bytes += size
        return status, answer

    monkeypatch.setattr(jobs.JobStore, "_call", counted)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, Any]:
    x = np.random.default_rng(0).standard_normal((ROWS, COLUMNS))
    with lampy.using(executor="inline"):
        return x, REGION(x)


def executor_for(url: str, mode: str, store: str = "") -> OpenLambdaExecutor:
    executor = OpenLambdaExecutor(
        url=url,
        orchestrator="lambda" if mode == "lambda" else "client",
        batch=1 if "one call per chunk" in mode else 0,
        timeout=120.0,
        progress="off",
        runtime_limit=30.0,
        store=store if mode == "lambda" else "",
    )
    executor.transport = Counting(executor.endpoint, executor.concurrency, executor.secret)
    summoner = executor.summoner  # the coordinator lambda's calls, counted the same
    summoner.transport = Counting(summoner.endpoint, executor.concurrency, executor.secret)
    return executor


def run_mode(
    benchmark: Any,
    url: str,
    mode: str,
    data: tuple[Any, Any],
    rounds: int,
    region: Any = REGION,
    store: str = "",
    over: Link = FAST,
) -> None:
    """Time `region` in one orchestration mode, the client's traffic going `over` a link."""
    global link
    x, expected = data
    executor = executor_for(url, mode, store)
    name = "bench_" + mode.replace(",", "").replace(" ", "_")
    lampy.register_executor(name, OpenLambdaExecutor)
    executors._instances[(name, ())] = executor
    link = over
    try:
        with lampy.using(executor=name):
            Traffic.reset()
            got = region(x)  # counted; and sandboxes up and warm, the input published
            calls, moved = Traffic.total()
            platform_calls, store_calls = Traffic.calls, Traffic.store_calls
            np.testing.assert_array_equal(got, expected)
            benchmark.pedantic(region, args=(x,), rounds=rounds, iterations=1)
            coordinators = executor.statuses[-1]["counters"] if executor.statuses else {}
    finally:
        link = FAST
        executors.unregister(name)
        executor.close()
    benchmark.extra_info["client_calls"], benchmark.extra_info["client_bytes"] = calls, moved
    benchmark.extra_info["note"] = (
        f"client: {calls} calls, {moved:,} bytes per job ({platform_calls} to the platform, "
        f"{store_calls} to the job store; {rounds} timed rounds; load average "
        f"{os.getloadavg()[0]:.1f} after them)"
    )
    for counts in coordinators.values():  # the last round's: where its time went
        benchmark.extra_info["note"] += (
            f"; coordinator: {counts.get('seconds')}, {counts.get('cpu_seconds')} s CPU, "
            f"{counts.get('slots')} calls in flight, {counts.get('combines')} combine calls"
        )


def olreal_url() -> Iterator[str]:
    given = os.environ.get("LAMPY_BENCH_OLREAL_URL")
    if given:
        yield given.rstrip("/")
        return
    yield from started_olreal()


@pytest.fixture(scope="module")
def real_worker() -> Iterator[str]:
    os.environ.setdefault("LAMPY_SECRET", "lampy-bench-secret")
    from lampy.runtime.openlambda._deploy import upload

    for url in olreal_url():
        upload(url)
        olreal_kit().wait_deployed(url, os.environ["LAMPY_SECRET"].encode())
        yield url


@pytest.fixture(params=["lampy worker", "OpenLambda's own worker", "lampy worker, slow link"])
def platform(request: pytest.FixtureRequest) -> tuple[str, str, Link]:
    if request.param == "OpenLambda's own worker":
        return request.param, request.getfixturevalue("real_worker"), FAST
    over = Link(latency_s=LINK_S) if "slow link" in request.param else FAST
    return request.param, request.getfixturevalue("worker"), over


results: dict[tuple[str, str], tuple[float, int, int]] = {}  # (platform, mode): figures


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", MODES)
def test_orchestration(
    benchmark: Any, row: Row, platform: tuple[str, str, Link], mode: str, data: Any
) -> None:
    which, url, over = platform
    row(GROUP.format(which), f"{mode} orchestration", baseline=mode == "client")
    # one call per chunk takes ~50 s a job on OpenLambda's own worker here: one round there
    rounds = 1 if "per chunk" in mode and "OpenLambda" in which else 5
    run_mode(benchmark, url, mode, data, rounds, over=over)
    results[(which, mode)] = (
        benchmark.stats.stats.median,
        benchmark.extra_info["client_calls"],
        benchmark.extra_info["client_bytes"],
    )
    if mode != "lambda":
        return
    calls, moved = benchmark.extra_info["client_calls"], benchmark.extra_info["client_bytes"]
    for peer in MODES[:-1]:
        if (which, peer) not in results:
            continue
        seconds, their_calls, their_bytes = results[(which, peer)]
        fewer = (their_calls / calls, their_bytes / moved)
        verdict = "met" if min(fewer) >= 100 else "MISSED"
        ratio = benchmark.stats.stats.median / seconds
        timing = "met" if ratio <= 1.2 else "MISSED"
        benchmark.extra_info["note"] += (
            f"; vs {peer}: {fewer[0]:.0f}x fewer calls, {fewer[1]:.0f}x fewer bytes (>= 100x: "
            f"{verdict}), time {ratio:.2f}x (<= 1.2x: {timing})"
        )


GRAM_CHUNKS, GRAM_ROWS, GRAM_COLUMNS = 200, 64, 256  # 26 MB in; 200 partials of 512 KiB
SLOW_LINK = Link(latency_s=LINK_S, bytes_per_s=100e6 / 8)  # 100 Mbit/s


def gram(x: np.ndarray) -> np.ndarray:
    return x.T @ x


GRAM = lampy.sum(chunks=GRAM_CHUNKS)(gram)


@pytest.fixture(scope="module")
def near_store() -> Iterator[tuple[str, tuple[Any, Any]]]:
    """`lampy serve` beside the platform, holding the Gram workload's input: its URL, and the
    input's reference with the answer computed inline."""
    x = np.random.default_rng(1).standard_normal((GRAM_CHUNKS * GRAM_ROWS, GRAM_COLUMNS))
    with served_arrays({"x": x}) as url, lampy.using(executor="inline"):
        yield url, (remote(f"{url}/x.npy"), GRAM(x))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["client", "lambda"])
@pytest.mark.parametrize("which", ["lampy worker", "OpenLambda's own worker"])
def test_client_link_bound(
    benchmark: Any,
    row: Row,
    request: pytest.FixtureRequest,
    near_store: tuple[str, Any],
    which: str,
    mode: str,
) -> None:
    url = request.getfixturevalue("real_worker" if "OpenLambda" in which else "worker")
    store, data = near_store
    row(
        f"200-chunk @lampy.sum of 512 KiB partials, client on a 100 Mbit/s, 50 ms link ({which})",
        f"{mode} orchestration",
        baseline=mode == "client",
    )
    run_mode(benchmark, url, mode, data, 3, GRAM, store, SLOW_LINK)
