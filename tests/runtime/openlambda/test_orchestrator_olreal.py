"""Orchestration in lambdas on OpenLambda's own worker (../shared/olreal): a coordinator in a
real SOCK sandbox calls the worker's own URL, merges in combine lambdas and hands off.

The worker is the suite's session worker (tests/olreal.py), or one already running with the
URL in LAMPY_TEST_OLREAL_URL (lampy is deployed on it here).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from lampy.runtime._settings import resolve_options
from lampy.runtime.openlambda._coordinator import PROCS_LIMIT, chunks_of
from lampy.runtime.openlambda._deploy import upload
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.testing import assert_same
from tests.olreal import CALL_TIMEOUT_S, DIR, W, wait_deployed

from .test_orchestrator import (
    assert_revived_and_merged_once,
    energy,
    kill_the_client_then_reattach,
    kill_the_coordinator_when,
    serving_store,
    slow_energy,
    wave,
)


@pytest.fixture(scope="module")
def real_url(request: pytest.FixtureRequest, lampy_secret: bytes) -> Iterator[str]:
    given = os.environ.get("LAMPY_TEST_OLREAL_URL")
    if not given:
        yield request.getfixturevalue("olreal_url")
        return
    upload(given)
    wait_deployed(given, lampy_secret)
    yield given


def options(url: str, **more: object) -> dict[str, object]:
    return {"url": url, "orchestrator": "lambda", "timeout": CALL_TIMEOUT_S, **more}


def test_sums_and_elemwise_equal_inline_on_the_real_worker(real_url: str) -> None:
    x = np.random.default_rng(7).standard_normal(30_000)
    regions = {"sum": lampy.sum(chunks=60)(energy), "elemwise": lampy.elemwise(chunks=12)(wave)}
    with lampy.using(executor="inline"):
        expected = {kind: region(x) for kind, region in regions.items()}
    with lampy.using(executor="openlambda", **options(real_url)):
        for kind, region in regions.items():
            assert_same(region(x), expected[kind], exact=True)
        executor = executors.get("openlambda", resolve_options("openlambda"))
        assert isinstance(executor, OpenLambdaExecutor)
        holder = executor.statuses[-1]["lease"]["holder"]
    assert holder.endswith(" pid 1")  # a real sandbox: its own PID namespace


def test_a_lifetime_shorter_than_the_job_hands_off_on_the_real_worker(real_url: str) -> None:
    """runtime_limit=4 s tells the coordinators they live 4 s (OpenLambda's own limit is
    30 s): they hand off to fresh calls on the real worker, and the answer stays exact."""
    x = np.random.default_rng(8).standard_normal((3_000, 3))
    region = lampy.sum(chunks=300)(slow_energy)
    with lampy.using(executor="inline"):
        expected = region(x)
    # 4 calls in flight: 300 chunks of 40 ms then take over 3 s, past the first coordinator's
    # 3 s of orchestration (with all 32 at once OpenLambda may finish them sooner)
    with lampy.using(executor="openlambda", **options(real_url, runtime_limit=4.0, concurrency=4)):
        got = region(x)
        executor = executors.get("openlambda", resolve_options("openlambda"))
        assert isinstance(executor, OpenLambdaExecutor)
        status = executor.statuses[-1]
    assert_same(got, expected, exact=True)
    assert status["state"] == "done" and status["done"] == 300
    assert any(e["why"].startswith("hand-off") for e in status["events"]), status["events"]
    accepted = [set(chunks_of(c["accepted"])) for c in status["counters"].values()]
    assert sum(len(a) for a in accepted) == 300 and set().union(*accepted) == set(range(300))


def in_a_sandbox(pid: int) -> bool:
    """Whether `pid` runs in one of the real worker's sandboxes (its root is under the
    worker's sandbox roots): nothing else is ever killed."""
    try:
        return os.readlink(f"/proc/{pid}/root").startswith(str(DIR / W / "worker"))
    except OSError:
        return False


def test_the_coordinators_sandbox_killed_mid_job_on_the_real_worker(real_url: str) -> None:
    """SIGKILL from outside to the one sandbox that orchestrates (found by its thread's name,
    since every sandbox is pid 1 in its own namespace): the lease lapses, the client summons
    another coordinator, which takes over from the store's records; the answer is exact and
    every chunk is merged once (the store's records and the coordinators' counts agree)."""
    if os.environ.get("LAMPY_TEST_OLREAL_URL"):
        pytest.skip("the worker was started elsewhere: its sandboxes' roots are unknown here")
    x = np.random.default_rng(10).standard_normal((3_000, 3))
    region = lampy.sum(chunks=300)(slow_energy)
    with lampy.using(executor="inline"):
        expected = region(x)
    killed: list[int] = []
    killer = threading.Thread(target=kill_the_coordinator_when, args=(30, killed, in_a_sandbox))
    with lampy.using(executor="openlambda", **options(real_url, runtime_limit=30.0)):
        killer.start()
        got = region(x)
        killer.join()
        status = executors.get("openlambda", resolve_options("openlambda")).statuses[-1]  # type: ignore[attr-defined]
    assert killed, "no sandbox was seen orchestrating the job"
    assert not Path(f"/proc/{killed[0]}").exists() or not in_a_sandbox(killed[0])
    assert_same(got, expected, exact=True)
    assert_revived_and_merged_once(status, 300)
    peaks = [c["threads"] for c in status["counters"].values()]
    assert all(peak <= PROCS_LIMIT for peak in peaks), peaks


def test_the_client_killed_mid_job_and_a_new_process_reattaches_on_the_real_worker(
    real_url: str, tmp_path: Path
) -> None:
    """The job lives on in real sandboxes (coordinators handing off every 4 s) while no client
    is there; a new process re-attaches and gets the exact answer."""
    with serving_store(tmp_path / "store") as store:
        kill_the_client_then_reattach(real_url, store, 4.0, tmp_path)
