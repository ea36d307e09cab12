"""The executor registry: lampy's own executors, users' registrations, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from tests.toy_executor import ThreadsExecutor


def test_lampys_own_and_the_toy_executor_are_registered() -> None:
    assert {"inline", "local", "openlambda", "dask", "threads"} <= set(executors.names())


def test_a_registered_class_runs_regions_and_can_be_unregistered() -> None:
    lampy.register_executor("threads_again", ThreadsExecutor)
    try:
        with lampy.using(executor="threads_again", chunks=3):
            assert lampy.elemwise(np.negative)(np.arange(9)).tolist() == [-i for i in range(9)]
    finally:
        executors.unregister("threads_again")
    with pytest.raises(lampy.UnknownExecutorError, match="unknown executor 'threads_again'"):
        lampy.using(executor="threads_again").__enter__()


def test_a_module_path_is_imported_on_first_use() -> None:
    lampy.register_executor("lazy_threads", "tests.toy_executor:ThreadsExecutor")
    try:
        assert executors.executor_class("lazy_threads") is ThreadsExecutor
    finally:
        executors.unregister("lazy_threads")


@pytest.mark.parametrize(
    ("name", "target", "message"),
    [
        ("Bad-Name", ThreadsExecutor, "lowercase letters, digits and _"),
        ("ok", "no_colon_here", "give 'module:Class' or the class"),
        ("ok", dict, "must subclass lampy.Executor"),
    ],
)
def test_bad_registrations_are_refused(name: str, target: object, message: str) -> None:
    with pytest.raises(lampy.OptionError, match=message):
        lampy.register_executor(name, target)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.no_such_module:Thing", "cannot load: No module named 'tests.no_such_module'"),
        ("tests.toy_executor:Missing", "tests.toy_executor has no Missing"),
        ("tests.toy_executor:lampy", "is not a lampy.Executor subclass"),
    ],
)
def test_a_broken_registration_fails_when_first_used(target: str, message: str) -> None:
    lampy.register_executor("broken", target)
    try:
        with pytest.raises(lampy.LampyError, match=message):
            executors.executor_class("broken")
    finally:
        executors.unregister("broken")


def test_capabilities_are_declared_not_probed() -> None:
    inline = executors.get("inline", {})
    assert not inline.can_prewarm and inline.is_warm() and inline.result_sink is None
    with pytest.raises(lampy.UsageError, match="the inline executor cannot pre-warm"):
        lampy.prewarm(2, executor="inline")
    assert executors.executor_class("openlambda").can_prewarm
