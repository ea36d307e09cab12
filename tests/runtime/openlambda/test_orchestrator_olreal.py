"""Orchestration in lambdas on OpenLambda's own worker (../shared/olreal): a coordinator in a
real SOCK sandbox calls the worker's own URL, merges in combine lambdas and hands off.

The worker is the suite's session worker (tests/olreal.py), or one already running with the
URL in LAMPY_TEST_OLREAL_URL (lampy is deployed on it here).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from lampy.runtime._settings import resolve_options
from lampy.runtime.openlambda._coordinator import chunks_of
from lampy.runtime.openlambda._deploy import upload
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.testing import assert_same
from tests.olreal import CALL_TIMEOUT_S, wait_deployed

from .test_orchestrator import energy, slow_energy, wave


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
    with lampy.using(executor="openlambda", **options(real_url, runtime_limit=4.0)):
        got = region(x)
        executor = executors.get("openlambda", resolve_options("openlambda"))
        assert isinstance(executor, OpenLambdaExecutor)
        status = executor.statuses[-1]
    assert_same(got, expected, exact=True)
    assert status["state"] == "done" and status["done"] == 300
    assert any(e["why"].startswith("hand-off") for e in status["events"]), status["events"]
    accepted = [set(chunks_of(c["accepted"])) for c in status["counters"].values()]
    assert sum(len(a) for a in accepted) == 300 and set().union(*accepted) == set(range(300))
