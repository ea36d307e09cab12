"""The parallel-region hints: `@elemwise`, `@reduce(combine)` and `@sum`.

Each works bare (`@lampy.elemwise`) and with options (`@lampy.elemwise(chunks=8)`); options left
out come from `lampy.using(...)` blocks and the environment at call time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, overload

from lampy._errors import OptionError
from lampy.regions._function import ParallelFunction
from lampy.regions._region import Region
from lampy.runtime._combine import add
from lampy.runtime._settings import Chunks

Function = Callable[..., Any]
Decorator = Callable[[Function], ParallelFunction]


def _names(shared: Iterable[str]) -> frozenset[str]:
    if isinstance(shared, str):
        shared = (shared,)
    names = frozenset(shared)
    if not all(isinstance(n, str) for n in names):
        raise OptionError(f"shared must be parameter names; got {sorted(map(repr, names))}")
    return names


@overload
def elemwise(function: Function, /) -> ParallelFunction: ...
@overload
def elemwise(
    *, shared: Iterable[str] = (), chunks: Chunks | None = None, executor: str | None = None
) -> Decorator: ...
def elemwise(
    function: Function | None = None,
    /,
    *,
    shared: Iterable[str] = (),
    chunks: Chunks | None = None,
    executor: str | None = None,
) -> ParallelFunction | Decorator:
    """Split every array argument along axis 0, run chunks in parallel, concatenate results.

    Results are joined along axis 0 (leaf by leaf for tuples and dicts), so the function must
    treat rows independently. Arrays named in `shared` reach every chunk whole.
    """

    def decorate(f: Function) -> ParallelFunction:
        return ParallelFunction(Region(f, shared=_names(shared), chunks=chunks, executor=executor))

    return decorate(function) if function is not None else decorate


def reduce(
    combine: Callable[[Any, Any], Any],
    /,
    *,
    finalize: Callable[[Any], Any] | None = None,
    shared: Iterable[str] = (),
    chunks: Chunks | None = None,
    executor: str | None = None,
    allow_partial: float | None = None,
) -> Decorator:
    """Map each chunk to a partial, merge partials with `combine` as a tree, then `finalize`.

    `combine(a, b)` must be associative (order is kept, so it need not commute). With
    `allow_partial=0.99`, chunks lost to the platform may be left out while the rest cover 99%
    of the rows, and calls return `lampy.Partial(value, coverage)` (see lampy.regions._partial).
    """
    if not callable(combine):
        raise OptionError(
            f"reduce needs a combine function, as in @lampy.reduce(combine); got {combine!r}"
        )

    def decorate(f: Any) -> ParallelFunction:
        if not callable(f):  # bare @lampy.reduce: `combine` was the function, this its data
            name = getattr(combine, "__qualname__", repr(combine))
            raise OptionError(
                f"{name} was decorated with a bare @lampy.reduce, which needs its combine "
                f"rule: write @lampy.reduce(combine) (e.g. @lampy.reduce(np.maximum)), or "
                f"@lampy.sum for partials that add; it was then called with {type(f).__name__}"
            )
        return ParallelFunction(
            Region(
                f,
                combine=combine,
                finalize=finalize,
                shared=_names(shared),
                chunks=chunks,
                executor=executor,
                allow_partial=allow_partial,
            )
        )

    return decorate


@overload
def sum(function: Function, /) -> ParallelFunction: ...
@overload
def sum(
    *,
    finalize: Callable[[Any], Any] | None = None,
    shared: Iterable[str] = (),
    chunks: Chunks | None = None,
    executor: str | None = None,
    allow_partial: float | None = None,
) -> Decorator: ...
def sum(
    function: Function | None = None,
    /,
    *,
    finalize: Callable[[Any], Any] | None = None,
    shared: Iterable[str] = (),
    chunks: Chunks | None = None,
    executor: str | None = None,
    allow_partial: float | None = None,
) -> ParallelFunction | Decorator:
    """A reduce whose partials add leaf by leaf: `{"n": len(x), "s": x.sum(0)}`, `x.T @ x`."""
    decorate = reduce(
        add,
        finalize=finalize,
        shared=shared,
        chunks=chunks,
        executor=executor,
        allow_partial=allow_partial,
    )
    return decorate(function) if function is not None else decorate
