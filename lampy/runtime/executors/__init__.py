"""The executor registry: names to executor classes, loaded on first use; and what an
executor is written with.

An executor is one module plus one registration: its "module:Class" path, imported only when
the executor is first asked for, so its dependencies load only then (the default, `local`,
loads with lampy: see the end of this module). lampy's own are registered
below; users add theirs with `lampy.register_executor`. One instance is kept per (name,
options), so a local pool or an HTTP session is reused across calls.

Writing one: subclass `Executor`; `run(job)` starts each chunk a `ChunkScheduler` hands out on
a worker, where `run_task(call, job.rows(chunk), job.whole)` runs it, and tells the scheduler
how each attempt ended (`finished` with the `Outcome`, or `failed` when the worker was lost).
tests/toy_executor.py is a whole one in a few lines.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import re
import threading
from typing import Any

from lampy._errors import LampyError, OptionError, UnknownExecutorError
from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._scheduler import ChunkScheduler
from lampy.runtime._worker_side import Outcome, run_task
from lampy.runtime.executors._base import Executor

__all__ = [
    "ChunkScheduler",
    "Costs",
    "Executor",
    "Job",
    "Outcome",
    "check_name",
    "executor_class",
    "get",
    "names",
    "register",
    "run_task",
    "shutdown",
    "unregister",
]

_REGISTRY: dict[str, str | type[Executor]] = {
    "inline": "lampy.runtime.executors._inline:InlineExecutor",
    "local": "lampy.runtime.executors._local:LocalExecutor",
    "openlambda": "lampy.runtime.openlambda._executor:OpenLambdaExecutor",
    "dask": "lampy.runtime.executors._dask:DaskExecutor",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register(name: str, target: str | type[Executor]) -> None:
    """Make an executor available by name: `target` is its class, or "module:Class" to import
    on first use (so its dependencies load only then). Registering a name again replaces it.

    >>> register("mine", "lampy.runtime.executors._inline:InlineExecutor")
    >>> "mine" in names()
    True
    >>> unregister("mine")
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise OptionError(
            f"an executor name is lowercase letters, digits and _, starting with a letter; "
            f"got {name!r}"
        )
    if isinstance(target, str):
        if not _TARGET.match(target):
            raise OptionError(
                f"register {name!r}: give 'module:Class' or the class; got {target!r}"
            )
    elif not (isinstance(target, type) and issubclass(target, Executor)):
        raise OptionError(
            f"register {name!r}: the class must subclass lampy.Executor; got {target!r}"
        )
    with _lock:
        _REGISTRY[name] = target
        for key in [k for k in _instances if k[0] == name]:
            _instances.pop(key).close()


def unregister(name: str) -> None:
    """Forget an executor registered by name (closing its instances)."""
    with _lock:
        _REGISTRY.pop(check_name(name))
        for key in [k for k in _instances if k[0] == name]:
            _instances.pop(key).close()


_instances: dict[tuple[str, tuple[tuple[str, Any], ...]], Executor] = {}
_lock = threading.Lock()


def names() -> list[str]:
    return sorted(_REGISTRY)


def check_name(name: str) -> str:
    if name not in _REGISTRY:
        raise UnknownExecutorError(
            f"unknown executor {name!r}; known executors: {', '.join(names())}"
        )
    return name


def executor_class(name: str) -> type[Executor]:
    target = _REGISTRY[check_name(name)]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise LampyError(f"the {name} executor cannot load: {exc}") from exc
        except AttributeError:
            raise LampyError(f"the {name} executor cannot load: {module} has no {attr}") from None
        if not (isinstance(target, type) and issubclass(target, Executor)):
            raise LampyError(f"the {name} executor: {target!r} is not a lampy.Executor subclass")
        _REGISTRY[name] = target
    return target


def get(name: str, options: dict[str, Any]) -> Executor:
    """The shared executor instance for this name and these options."""
    cls = executor_class(name)
    parsed = cls.parse_options(options)
    key = (name, tuple(sorted(parsed.items())))
    with _lock:
        if key not in _instances:
            _instances[key] = cls(**parsed)
        return _instances[key]


@atexit.register
def shutdown() -> None:
    """Close every executor made so far (worker pools, sessions); later calls start anew."""
    with _lock:
        instances = list(_instances.values())
        _instances.clear()
    for executor in instances:
        executor.close()


# The default executor loads with lampy, not on its first call: that call is often a program's
# first, and the import (about 15 ms) would make a cold `chunks="auto"` call on `local` slower
# than the same call on `inline` (bench/bench_scale.py, "auto never loses").
with contextlib.suppress(LampyError):
    executor_class("local")
