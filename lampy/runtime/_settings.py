"""Where a call runs by default: `lampy.using(...)` blocks, then environment variables.

Precedence, most specific first: options on the decorator, the innermost `using` block, the
environment (`LAMPY_EXECUTOR`, `LAMPY_CHUNKS`, and `LAMPY_<EXECUTOR>_<OPTION>` such as
`LAMPY_LOCAL_WORKERS=4` or `LAMPY_OPENLAMBDA_URL=...`), then the built-in defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from lampy._errors import OptionError

DEFAULT_EXECUTOR = "local"
Chunks = int | Literal["auto"]


@dataclass(frozen=True)
class Settings:
    """Defaults for calls: executor name, chunk count, and options per executor name."""

    executor: str | None = None
    chunks: Chunks | None = None
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def options_for(self, executor: str) -> dict[str, Any]:
        return dict(self.options.get(executor, {}))


_DEFAULTS = Settings()
_current: ContextVar[Settings] = ContextVar("lampy_settings", default=_DEFAULTS)


def check_chunks(chunks: object) -> Chunks:
    """Validate a `chunks` option: a positive int or "auto"."""
    if chunks == "auto":
        return "auto"
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise OptionError(f'chunks must be a positive int or "auto"; got {chunks!r}')
    return chunks


@contextmanager
def using(
    executor: str | None = None, chunks: Chunks | None = None, **executor_options: Any
) -> Iterator[None]:
    """Set defaults for every lampy call inside the block (per thread and per task).

    >>> import lampy
    >>> with lampy.using(executor="inline", chunks=4):
    ...     pass
    """
    from lampy.runtime.executors import check_name

    outer = _current.get()
    name = check_name(executor) if executor is not None else resolve_executor(None)
    options = dict(outer.options)
    if executor_options:
        options[name] = MappingProxyType({**outer.options.get(name, {}), **executor_options})
    inner = replace(
        outer,
        executor=executor if executor is not None else outer.executor,
        chunks=check_chunks(chunks) if chunks is not None else outer.chunks,
        options=options,
    )
    token = _current.set(inner)
    try:
        yield
    finally:
        _current.reset(token)


def resolve_executor(explicit: str | None) -> str:
    """The executor a call uses: the decorator's, the `using` block's, the env's, or "local"."""
    return (
        explicit
        or _current.get().executor
        or os.environ.get("LAMPY_EXECUTOR")
        or (DEFAULT_EXECUTOR)
    )


def resolve_chunks(explicit: Chunks | None) -> Chunks:
    """The chunk count a call uses, resolved the same way (default "auto")."""
    if explicit is not None:
        return explicit
    if _current.get().chunks is not None:
        return _current.get().chunks  # type: ignore[return-value]
    env = os.environ.get("LAMPY_CHUNKS")
    if env is None:
        return "auto"
    try:
        return check_chunks(env if env == "auto" else int(env))
    except ValueError:
        raise OptionError(f'LAMPY_CHUNKS must be a positive int or "auto"; got {env!r}') from None


def resolve_options(executor: str) -> dict[str, Any]:
    """Executor options from the environment, overridden by the `using` blocks around the call."""
    prefix = f"LAMPY_{executor.upper()}_"
    options: dict[str, Any] = {
        key[len(prefix) :].lower(): value
        for key, value in os.environ.items()
        if key.startswith(prefix)
    }
    options.update(_current.get().options_for(executor))
    return options
