"""A lazy graph run on a cold openlambda executor pre-warms the sandboxes its estimate asks for."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import lampy
import lampy.lazy as lazy
from lampy.runtime import executors
from lampy.runtime._settings import resolve_options
from lampy.runtime.executors._base import Executor
from lampy.testing import assert_same

X = np.random.default_rng(3).uniform(-1, 1, (12, 5))


def _stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
        counts: dict[str, int] = json.load(answer)
        return {key: counts.get(key, 0) for key in ("requests", "sandboxes")}


@pytest.fixture
def cold(worker_url: str, request: pytest.FixtureRequest) -> Iterator[Executor]:
    """An openlambda executor of the test's own (its concurrency is unique), so it is cold."""
    concurrency = 3 + request.node.name.startswith("test_no_prewarm")
    with lampy.using(executor="openlambda", url=worker_url, concurrency=concurrency):
        instance = executors.get("openlambda", resolve_options("openlambda"))
        assert instance.costs().startup_s > 0
        yield instance
    instance.close()


def test_a_cold_run_prewarms_before_the_fan_out_and_a_warm_one_does_not(
    cold: Any, worker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expr = np.exp(lazy.array(X)) * 2 + 1
    plan = expr.explain(chunks=3)
    wanted = plan.prewarm("openlambda")
    # three chunks, as many calls in flight as the worker computes at once (on loopback, its cores)
    assert wanted == min(3, cold.costs().workers) and f"pre-warm {wanted}" in str(plan)
    events: list[tuple[str, Any, dict[str, int]]] = []
    prewarm, run = cold.prewarm, cold.run

    def spy_prewarm(n: int) -> int:
        before = _stats(worker_url)
        warmed = prewarm(n)
        events.append(("prewarm", (n, warmed, before), _stats(worker_url)))
        return int(warmed)

    def spy_run(job: Any) -> Any:
        events.append(("run", len(job.chunks), _stats(worker_url)))
        return run(job)

    monkeypatch.setattr(cold, "prewarm", spy_prewarm)
    monkeypatch.setattr(cold, "run", spy_run)
    assert_same(expr.run(chunks=3), np.exp(X) * 2 + 1)
    assert [e[0] for e in events] == ["prewarm", "run"]
    (_, (asked, warmed, before), after), (_, chunks, at_run) = events
    assert (asked, chunks) == (wanted, 3)
    assert 1 <= warmed <= asked, (warmed, asked)
    assert after["requests"] - before["requests"] >= asked  # the pre-warm pings reached it
    assert at_run["sandboxes"] >= warmed  # those sandboxes were up when the fan-out began
    events.clear()
    assert_same(expr.run(chunks=3), np.exp(X) * 2 + 1)
    assert [e[0] for e in events] == ["run"]  # warm now: no second pre-warm


def test_no_prewarm_when_the_estimate_says_the_caller_wins(
    cold: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(cold, "prewarm", asked.append)
    expr = lazy.array(X) + 1  # tiny: chunks="auto" would not fan out
    assert expr.explain().prewarm("openlambda") == 0
    assert_same(expr.run(), X + 1)
    assert asked == []
