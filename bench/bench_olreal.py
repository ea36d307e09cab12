"""OpenLambda's own worker against `lampy worker`, side by side in one run (issue 13).

The openlambda executor's costs (STARTUP_S, SECONDS_PER_BYTE, SECONDS_PER_CHUNK), its pre-warm
timing and the scheduler's straggler rule were tuned on `lampy worker`. These rows measure the
same things on the real platform (../shared/olreal), each a median, for both workers:
- warm call: one signed ping on a warm sandbox, and a one-chunk lampy call;
- cold sandbox: the first call after a redeploy (a new sandbox; packages already installed);
- first call after the first deploy on a fresh worker (OpenLambda pip-installs numpy then);
- per byte: a one-chunk identity call of 8 MiB (inside the call) and 64 MiB (by reference);
- per chunk: 400 no-op chunks, one call each, 32 in flight;
- pre-warm: 8 concurrent pings on a lambda with one warm sandbox, each holding its sandbox
  0.05 s (PREWARM_HOLD_S), 0.2 s or 0.5 s, and how many sandboxes the worker made for them;
- (f) fan-out: 10,000 no-op chunks through lampy (automatic batching; one call per chunk)
  against raw aiohttp, the same count of tiny POSTs with the same concurrency to a trivial
  lambda on the same worker (target >= 0.5 for batching);
- data path: 256 MiB there and back in one lampy call against the same bytes echoed over raw
  loopback TCP (target >= 0.2).
- a 64-chunk job just after a redeploy: cold (its sandboxes start as its chunks arrive) against
  pre-warmed ahead (`prewarm(8)` first, untimed) and pre-warmed together (`prewarm(8)` in a
  thread started with the job, timed until the job's answer);
- a first 10,000-chunk no-op job on a fresh lambda (just after a redeploy), with calls in flight
  fixed at 4, all 32 at once (the old default) and the default rule (START_SLOTS, growing while
  answers come back unqueued, at most LOCAL_SLOTS_PER_CORE per core for a worker on this
  machine), with the sandboxes the worker made and the slots reached (the rows of
  START_SLOTS and LOCAL_SLOTS_PER_CORE);
- 10,000 warm no-op chunks at a fixed batch of 20, 78 (automatic batching's) and 312 chunks
  per call (the rows of CALLS_PER_SLOT);
- the Fisher hour (examples/fisher's pipeline on one hour of generated audio): inline against
  the openlambda executor with chunks="auto" and with 8 chunks per region, DER alike;
- (a) compute-bound elemwise (bench_core's rfft + small matmul, 16384 x 1024) in 8 chunks
  against numpy alone, on each worker.
The notes give the derived figure (seconds per byte moved, per chunk) beside the constant it
checks. Without the kit the OpenLambda rows skip, saying why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import json
import os
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from bench_core import BASIS, FRAMES, spectral_features  # (a), as bench_core.py times it
from conftest import Row, olreal_kit, started_olreal
from rawnet import TcpEcho, raw_posts

import lampy
from lampy.runtime import executors
from lampy.runtime._settings import resolve_options
from lampy.runtime.openlambda import _executor as constants
from lampy.runtime.openlambda._deploy import upload
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.runtime.remote import _auth as auth

LAMPY_WORKER, OLREAL = "lampy worker", "OpenLambda's own worker"
FIRST = "lampy-first"  # the lambda deployed first on each fresh worker
REGISTRY_CACHE_S = 5.5  # OpenLambda looks for new code of a lambda every 5 s (registry_cache_ms)
CHUNKS = 400
SMALL, LARGE = 8 << 20, 64 << 20  # under and over PUBLISH_BYTES (16 MiB): inline, by reference
FAN_OUT_CHUNKS, CONCURRENCY = 10_000, 32
DATA = np.random.default_rng(1).standard_normal(32 << 20)  # 256 MiB
TRIVIAL = """
def app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
"""


@pytest.fixture(scope="module")
def olreal_worker() -> Iterator[str]:
    """OpenLambda's own worker, fresh, with nothing deployed yet."""
    yield from started_olreal()


@pytest.fixture(scope="module", params=[LAMPY_WORKER, OLREAL])
def platform(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(which, URL) of a fresh worker; lampy is deployed as "lampy" by `deployed`."""
    fixture = "worker" if request.param == LAMPY_WORKER else "olreal_worker"
    yield request.param, request.getfixturevalue(fixture)


def wait_answers(url: str, name: str) -> float:
    secret = os.environ["LAMPY_SECRET"].encode()
    return float(olreal_kit().wait_deployed(url, secret, name))


@pytest.fixture(scope="module")
def deployed(platform: tuple[str, str]) -> Iterator[tuple[str, OpenLambdaExecutor]]:
    """lampy deployed and warm on the platform; (which, an executor for it)."""
    which, url = platform
    upload(url)
    wait_answers(url, "lampy")
    executor = OpenLambdaExecutor(url=url, timeout=120.0)
    yield which, executor
    executor.close()


def active() -> OpenLambdaExecutor:
    """The openlambda executor the `lampy.using` block around the call uses."""
    runner = executors.get("openlambda", resolve_options("openlambda"))
    assert isinstance(runner, OpenLambdaExecutor)
    return runner


def ping(executor: OpenLambdaExecutor) -> None:
    executor._loop.run(executor.caller.ping(0.0))


def noop(x: np.ndarray) -> np.ndarray:
    return x


def test_first_call_after_the_first_deploy(
    benchmark: Any, row: Row, platform: tuple[str, str]
) -> None:
    """Runs first on each fresh worker: on OpenLambda it includes the pip install. As
    `lampy deploy --url` does, it uploads both lambdas (chunks' and coordinator's) and waits
    for both to answer."""
    which, url = platform
    row("first call after the first deploy on a fresh worker", which)

    def deploy_and_call() -> None:
        upload(url, FIRST)
        wait_answers(url, FIRST)

    benchmark.pedantic(deploy_and_call, rounds=1, iterations=1)


def test_warm_ping(benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor]) -> None:
    which, executor = deployed
    row("warm call: one signed ping", which)
    benchmark.pedantic(ping, args=(executor,), rounds=30, iterations=1, warmup_rounds=3)


def test_warm_one_chunk_call(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor]
) -> None:
    which, executor = deployed
    row("warm call: a one-chunk lampy call", which)
    f = lampy.elemwise(noop, chunks=1)
    x = np.zeros(8)
    with lampy.using(executor="openlambda", url=executor.url, timeout=120.0):
        benchmark.pedantic(f, args=(x,), rounds=20, iterations=1, warmup_rounds=2)


def test_cold_sandbox(benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor]) -> None:
    """A redeploy retires the lambda's sandboxes, so the next call starts a new one."""
    which, executor = deployed
    row(
        "cold sandbox: first call after a redeploy",
        which,
        note=f"vs STARTUP_S {constants.STARTUP_S:g} s",
    )

    def redeploy() -> None:
        upload(executor.url)
        time.sleep(REGISTRY_CACHE_S)  # both workers alike, so the real one sees the new code

    benchmark.pedantic(ping, args=(executor,), setup=redeploy, rounds=3, iterations=1)


@pytest.mark.parametrize("nbytes", [SMALL, LARGE], ids=["8MiB", "64MiB"])
def test_per_byte(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor], nbytes: int
) -> None:
    which, executor = deployed
    how = "inside the call" if nbytes == SMALL else "by reference"
    row(f"one chunk of {nbytes >> 20} MiB there and back ({how})", which)
    f = lampy.elemwise(noop, chunks=1)
    x = np.random.default_rng(0).standard_normal(nbytes // 8)
    with lampy.using(executor="openlambda", url=executor.url, timeout=120.0):
        got = benchmark.pedantic(f, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    np.testing.assert_array_equal(got, x)
    rate = 2 * nbytes / benchmark.stats.stats.median
    benchmark.extra_info["note"] = (
        f"{rate / 1e9:.2f} GB/s moved; "
        f"SECONDS_PER_BYTE 1/{1 / constants.SECONDS_PER_BYTE / 1e9:.2f}e9"
    )


def test_per_chunk(benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor]) -> None:
    which, executor = deployed
    row(f"{CHUNKS} no-op chunks, one call each, 32 in flight", which)
    f = lampy.elemwise(noop, chunks=CHUNKS)
    x = np.zeros(CHUNKS)
    with lampy.using(executor="openlambda", url=executor.url, batch=1, timeout=120.0):
        f(x)  # the sandboxes this needs, up and warm
        benchmark.pedantic(f, args=(x,), rounds=3, iterations=1)
    per_chunk = benchmark.stats.stats.median / CHUNKS
    benchmark.extra_info["note"] = (
        f"{per_chunk * 1e3:.2f} ms per chunk; "
        f"SECONDS_PER_CHUNK {constants.SECONDS_PER_CHUNK * 1e3:g} ms"
    )


def sandboxes_made(url: str) -> int:
    """Sandboxes the worker made so far, from its /stats (each worker names it its own way)."""
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
        stats = json.load(answer)
    return int(stats.get("sandboxes_created", stats.get("Create().cnt", 0)))


@pytest.mark.parametrize("hold", [0.05, 0.2, 0.5])
def test_prewarm_hold(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor], hold: float
) -> None:
    which, executor = deployed
    row(f"8 concurrent pings holding their sandbox {hold:g} s, one sandbox warm", which)
    before: list[int] = []

    def one_warm_sandbox() -> None:
        upload(executor.url)
        time.sleep(REGISTRY_CACHE_S)
        ping(executor)
        before.append(sandboxes_made(executor.url))

    async def burst() -> None:
        await asyncio.gather(*(executor.caller.ping(hold) for _ in range(8)))

    benchmark.pedantic(
        lambda: executor._loop.run(burst()), setup=one_warm_sandbox, rounds=1, iterations=1
    )
    made = sandboxes_made(executor.url) - before[-1]
    benchmark.extra_info["note"] = (
        f"{made} sandboxes made; PREWARM_HOLD_S {constants.PREWARM_HOLD_S:g} s"
    )


def trivial_lambda(url: str) -> str:
    """A lambda that reads its body and answers "ok", deployed as "trivial"; its /run URL."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo("f.py")
        info.size = len(TRIVIAL)
        tar.addfile(info, io.BytesIO(TRIVIAL.encode()))
    data = out.getvalue()
    secret = os.environ["LAMPY_SECRET"].encode()
    digest = hashlib.sha256(data).hexdigest()
    headers = auth.sign(secret, "POST", "/registry/trivial", "", str(len(data)), digest)
    request = urllib.request.Request(f"{url}/registry/trivial", data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=60):
        pass
    return f"{url}/run/trivial"


def fan_out_group(which: str) -> str:
    return f"(f) fan-out on {which}: {FAN_OUT_CHUNKS:,} no-op chunks"


@pytest.mark.timeout(900)  # OpenLambda under load may start a sandbox per call waiting
def test_fan_out_raw_aiohttp(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor]
) -> None:
    """The platform's own limit for (f): tiny POSTs to a trivial lambda, no lampy at all."""
    which, executor = deployed
    row(
        fan_out_group(which),
        f"raw aiohttp: {FAN_OUT_CHUNKS:,} POSTs to a trivial lambda",
        baseline=True,
    )
    target = trivial_lambda(executor.url)
    raw_posts(target, CONCURRENCY * 4, CONCURRENCY)  # its sandboxes up and warm
    benchmark.pedantic(
        raw_posts, args=(target, FAN_OUT_CHUNKS, CONCURRENCY), rounds=1, iterations=1
    )
    per_call = benchmark.stats.stats.median / FAN_OUT_CHUNKS
    benchmark.extra_info["note"] = f"{per_call * 1e3:.2f} ms per call"


# One call per chunk on OpenLambda takes minutes (10,000 calls, a sandbox per call in flight at
# first): more than the suite's 120 s per test.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("batch", [0, 1], ids=["batched", "one-call-each"])
def test_fan_out_lampy(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor], batch: int
) -> None:
    which, executor = deployed
    how = "automatic batching" if batch == 0 else "one call per chunk (batch=1)"
    row(fan_out_group(which), f"lampy, {how}", **({"target": 0.5} if batch == 0 else {}))
    f = lampy.elemwise(noop, chunks=FAN_OUT_CHUNKS)
    x = np.zeros(FAN_OUT_CHUNKS)
    options = {"url": executor.url, "timeout": 120.0, "concurrency": CONCURRENCY, "batch": batch}
    with lampy.using(executor="openlambda", **options):
        f(x)  # sandboxes up and warm
        got = benchmark.pedantic(f, args=(x,), rounds=3 if batch == 0 else 1, iterations=1)
    np.testing.assert_array_equal(got, x)
    per_chunk = benchmark.stats.stats.median / FAN_OUT_CHUNKS
    benchmark.extra_info["note"] = f"{per_chunk * 1e6:.0f} us per chunk"


def data_path_group(which: str) -> str:
    return f"data path on {which}: 256 MiB there and back"


def test_data_path_raw_tcp(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor]
) -> None:
    which, _ = deployed
    row(data_path_group(which), "raw loopback TCP echo", baseline=True)
    benchmark.pedantic(TcpEcho(DATA.nbytes), args=(DATA,), rounds=3, iterations=1)


def test_data_path_lampy(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor]
) -> None:
    which, executor = deployed
    row(data_path_group(which), "lampy, one call", target=0.2)
    f = lampy.elemwise(noop, chunks=1)
    with lampy.using(executor="openlambda", url=executor.url, timeout=120.0):
        got = benchmark.pedantic(f, args=(DATA,), rounds=3, iterations=1, warmup_rounds=1)
    np.testing.assert_array_equal(got, DATA)
    rate = 2 * DATA.nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["note"] = f"{rate:.2f} GB/s moved"


JOB_CHUNKS = 64


@pytest.mark.parametrize("warm", ["cold", "ahead", "together"])
def test_job_cold_or_prewarmed(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor], warm: str
) -> None:
    """What pre-warming saves a job that starts right after a redeploy: done ahead (untimed),
    or started with the job (`lampy.prewarm` in a thread while the job runs; timed until the
    job's answer)."""
    which, executor = deployed
    group = f"a {JOB_CHUNKS}-chunk job just after a redeploy, on {which}"
    if warm == "ahead":
        row(group, "pre-warmed ahead: prewarm(8), untimed, then the job")
    elif warm == "together":
        row(group, "pre-warmed together: prewarm(8) in a thread started with the job")
    else:
        row(group, "cold: sandboxes start as the chunks arrive", baseline=True)
    rng = np.random.default_rng(2)
    frames, basis = rng.standard_normal((JOB_CHUNKS * 64, 1024)), rng.standard_normal((513, 16))
    f = lampy.elemwise(shared=("basis",), chunks=JOB_CHUNKS)(spectral_features)
    options = {"url": executor.url, "timeout": 120.0}

    warming: list[concurrent.futures.Future[int]] = []  # pre-warms that outlived their job
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def redeploy() -> None:
        for future in warming:
            future.result()
        upload(executor.url)
        time.sleep(REGISTRY_CACHE_S)  # the worker sees the new code: old sandboxes retire
        if warm == "ahead":
            executor.prewarm(8)

    def job() -> np.ndarray:
        if warm == "together":  # timed until the job's answer; the pre-warm may go on
            # a thread has no `lampy.using` block: it names the executor and its options
            warming.append(pool.submit(lampy.prewarm, 8, executor="openlambda", **options))
        return f(frames, basis)

    with pool, lampy.using(executor="openlambda", **options):
        got = benchmark.pedantic(job, setup=redeploy, rounds=3, iterations=1)
        for future in warming:
            future.result()
    np.testing.assert_allclose(got, spectral_features(frames, basis), rtol=1e-9, atol=1e-9)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rule", ["fixed-4", "fixed-32", "default"])
def test_first_fan_out_on_a_fresh_lambda(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor], rule: str
) -> None:
    """How many calls to keep in flight: a first 10,000-chunk job on a lambda just redeployed
    (one sandbox to start from), with the sandboxes the worker made for it."""
    which, executor = deployed
    group = f"a first {FAN_OUT_CHUNKS:,}-chunk no-op job on a fresh lambda, on {which}"
    if rule == "fixed-32":
        row(group, "32 calls in flight from the start (the old default)", baseline=True)
    elif rule == "fixed-4":
        row(group, "4 calls in flight (concurrency=4)")
    else:
        most = min(32, constants.LOCAL_SLOTS_PER_CORE * (os.cpu_count() or 1))
        row(group, f"default: {constants.START_SLOTS}, growing while unqueued to {most} here")
    f = lampy.elemwise(noop, chunks=FAN_OUT_CHUNKS)
    x = np.zeros(FAN_OUT_CHUNKS)
    options = {"url": executor.url, "timeout": 120.0}
    options["concurrency"] = 4 if rule == "fixed-4" else 32
    made: list[int] = []
    slots: list[int] = []

    def redeploy() -> None:
        upload(executor.url)
        time.sleep(REGISTRY_CACHE_S)  # old sandboxes retire: the job starts from one
        ping(executor)
        # a fresh executor each round: the slots it learned would carry over otherwise
        executors.shutdown()
        if rule == "fixed-32":
            active().slots = active().most_slots = 32
        made.append(sandboxes_made(executor.url))

    def job() -> np.ndarray:
        got = f(x)
        slots.append(active().slots)
        made[-1] = sandboxes_made(executor.url) - made[-1]
        return got

    with lampy.using(executor="openlambda", **options):
        got = benchmark.pedantic(job, setup=redeploy, rounds=3, iterations=1)
    np.testing.assert_array_equal(got, x)
    benchmark.extra_info["note"] = (
        f"sandboxes made {'/'.join(map(str, made))}; slots reached {'/'.join(map(str, slots))}"
    )


@pytest.mark.parametrize("batch", [20, 78, 312, 625])
def test_batch_size(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor], batch: int
) -> None:
    """Chunks per call on a warm lambda (automatic batching: 10,000 chunks over the executor's
    slots x CALLS_PER_SLOT calls; 625 on 2 cores, whose worker gets 4 slots, 78 at 32)."""
    which, executor = deployed
    auto = FAN_OUT_CHUNKS // (executor.most_slots * constants.CALLS_PER_SLOT)
    group = f"{FAN_OUT_CHUNKS:,} warm no-op chunks by chunks per call, on {which}"
    row(group, f"batch={batch}" + (" (automatic's)" if batch == auto else ""))
    f = lampy.elemwise(noop, chunks=FAN_OUT_CHUNKS)
    x = np.zeros(FAN_OUT_CHUNKS)
    options = {"url": executor.url, "timeout": 120.0, "concurrency": CONCURRENCY, "batch": batch}
    with lampy.using(executor="openlambda", **options):
        f(x)  # sandboxes up and warm, slots grown
        got = benchmark.pedantic(f, args=(x,), rounds=3, iterations=1)
    np.testing.assert_array_equal(got, x)
    benchmark.extra_info["note"] = (
        f"{benchmark.stats.stats.median / FAN_OUT_CHUNKS * 1e6:.0f} us per chunk"
    )


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("system", ["inline", "auto", "8"])
def test_fisher_hour(
    benchmark: Any,
    row: Row,
    deployed: tuple[str, OpenLambdaExecutor],
    hour: tuple[Any, np.ndarray, int, list[Any]],
    system: str,
) -> None:
    """The Fisher pipeline on one hour of audio: its regions' code lives in the examples.fisher
    package, split over several modules, and travels by value to the sandboxes."""
    from examples.fisher import diarize
    from examples.fisher.scoring import score

    which, executor = deployed
    group = f"(e) the Fisher hour, on {which}"
    if system == "inline":
        row(group, "numpy alone (the same code, lampy inline)", baseline=True)
        options: dict[str, Any] = {"executor": "inline"}
    else:
        row(group, "lampy openlambda, " + ("chunks=8" if system == "8" else 'chunks="auto"'))
        options = {"executor": "openlambda", "url": executor.url, "timeout": 120.0}
        if system == "8":
            options["chunks"] = 8
    _, signal, rate, reference = hour
    jobs = 0
    with lampy.using(**options):
        if system != "inline":
            runner = active()
            run = runner.run

            def counted(job: Any) -> Any:
                nonlocal jobs
                jobs += 1
                return run(job)

            runner.run = counted  # type: ignore[method-assign]
        diarize(signal[: rate * 60], rate, n_speakers=2)  # sandboxes up, code sent once
        sent = jobs
        result = benchmark.pedantic(
            diarize, args=(signal, rate), kwargs={"n_speakers": 2}, rounds=3, iterations=1
        )
    der = score(reference, result.turns).der
    benchmark.extra_info["note"] = f"DER {der:.2%}"
    if system != "inline":
        benchmark.extra_info["note"] += f"; {(jobs - sent) / 3:.0f} jobs sent per run"
    assert der <= 0.10


@pytest.mark.parametrize("system", ["numpy", "lampy"])
def test_compute_bound(
    benchmark: Any, row: Row, deployed: tuple[str, OpenLambdaExecutor], system: str
) -> None:
    which, executor = deployed
    group = f"(a) rfft + small matmul, 16384 x 1024, on {which}"
    frames, basis = FRAMES, BASIS
    if system == "numpy":
        row(group, "numpy alone", baseline=True)
        benchmark.pedantic(spectral_features, args=(frames, basis), rounds=5, warmup_rounds=1)
        return
    row(group, "lampy openlambda, chunks=8")
    f = lampy.elemwise(shared=("basis",), chunks=8)(spectral_features)
    with lampy.using(executor="openlambda", url=executor.url, timeout=120.0):
        got = benchmark.pedantic(f, args=(frames, basis), rounds=5, iterations=1, warmup_rounds=1)
    np.testing.assert_allclose(got, spectral_features(frames, basis), rtol=1e-9, atol=1e-9)
