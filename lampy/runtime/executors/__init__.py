"""The executor registry: names to executor classes, loaded on first use.

An executor is one module plus one line here: its "module:Class" path, imported only when the
executor is first asked for, so its dependencies load only then. One instance is kept per
(name, options), so a local pool or an HTTP session is reused across calls.
"""

from __future__ import annotations

import atexit
import importlib
import threading
from typing import Any

from lampy._errors import LampyError, UnknownExecutorError
from lampy.runtime.executors._base import Executor

_REGISTRY: dict[str, str | type[Executor]] = {
    "inline": "lampy.runtime.executors._inline:InlineExecutor",
    "local": "lampy.runtime.executors._local:LocalExecutor",
    "openlambda": "lampy.runtime.openlambda._executor:OpenLambdaExecutor",
    "dask": "lampy.runtime.executors._dask:DaskExecutor",
}
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
        assert isinstance(target, type) and issubclass(target, Executor)
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
