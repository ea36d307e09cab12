"""The openlambda executor with orchestrator="lambda", registered as "orchestrated" for tests.

The suite's `executor` fixture runs every registered executor, so this registration runs the
whole region suite (and any test taking `executor`) with a coordinator lambda orchestrating
each job on `lampy worker` (issue 18; tests/olreal.py registers the same on OpenLambda's own
worker): its answers must be those of client orchestration, bit
for bit (the reference is numpy through the inline executor).
"""

from __future__ import annotations

from typing import Any

import pytest

import lampy
from tests.olreal import ORCHESTRATED as ON_OLREAL

NAME = "orchestrated"
lampy.register_executor(NAME, "lampy.runtime.openlambda._executor:OpenLambdaExecutor")

# Tests that watch the combine rule run in the caller's process: under lambda orchestration it
# runs in lambdas (their answers are still checked; the order of merges is checked by
# tests/runtime/openlambda/test_orchestrator.py through the answers themselves).
IN_CALLER_ONLY = {
    "tests/regions/test_reduce.py::test_reduce_merges_as_an_ordered_tree": (
        "records its merges in the caller's memory; a coordinator merges in lambdas"
    ),
}


def mark_items(items: list[pytest.Item]) -> None:
    """Skip the orchestrated runs of IN_CALLER_ONLY (on both workers), saying why."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("executor") not in (NAME, ON_OLREAL):
            continue
        reason = IN_CALLER_ONLY.get(item.nodeid.split("[")[0])
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"orchestrated: {reason}"))


@pytest.fixture
def orchestrated_options(worker_url: str) -> dict[str, Any]:
    return {"url": worker_url, "orchestrator": "lambda", "runtime_limit": 20.0}  # as the worker
