"""A decorated region called with lazy arguments: the call becomes a `region` node of the graph.

`f(x_lazy, ...)` returns a lazy array at once; when the graph runs, the node runs as the region
`f` (its own hint, combine rule and decorator options), and each of its chunks first runs the
fused chain feeding its split arguments, so `f(np.exp(a) + b)` is still one round trip a chunk.

The result's shape and dtype are inferred as dask's `map_blocks` infers its `meta`: by calling the
undecorated function in the caller on stand-ins, ones of each argument's dtype (split arguments
with a few rows, shared ones whole, as read-only broadcasts that take no memory). An elemwise
region must give one result row per input row; a reduction's stand-in partial, finalized, gives
its result. The same calls (1 row, then the planner's probe rows; the best of two each) time
the function for the cost model, as the region planner's own probe does. If the real result
differs from the inferred shape or dtype when the graph runs, the run fails with `ResultError`
rather than continuing with a different graph than the one that was checked.

`declare(region, shape, dtype)` is the way out for a function that cannot run on ones (it
checks its values, say): the result is declared, with None for the split rows, and the function
does not run until the graph does (so `.explain()` has no time estimate for it).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lampy._errors import SplitLengthError, UnsplittableError, UnsupportedOperation, UsageError
from lampy.lazy._array import LazyArray, array
from lampy.lazy._graph import Node
from lampy.regions._binding import Shared, named_arguments
from lampy.regions._function import ParallelFunction
from lampy.runtime._plan import probe_rows

Declared = tuple[tuple[int | None, ...], np.dtype[Any]]


def declare(
    function: ParallelFunction, shape: Sequence[int | None], dtype: Any
) -> Callable[..., LazyArray]:
    """`function` called lazily with its result declared rather than inferred on stand-ins.

    `shape` is the result's shape, None standing for the split arguments' rows (elemwise:
    `(None, 3)`); a reduction's result has no rows to stand for. The returned callable takes
    the region's arguments and always builds a graph node, numpy arguments included.

    >>> import numpy as np, lampy
    >>> @lampy.elemwise
    ... def checked(x):
    ...     assert (x > 0).all(), "positive values only"
    ...     return np.log(x)[:, :1]
    >>> lazy_checked = declare(checked, (None, 1), np.float64)
    >>> lazy_checked(lampy.array(np.full((6, 2), 0.5)) * 2).run(executor="inline").shape
    (6, 1)
    """
    if not isinstance(function, ParallelFunction):
        raise UsageError(f"declare takes a lampy region (a decorated function); got {function!r}")
    bad = [d for d in shape if d is not None and (isinstance(d, bool) or not isinstance(d, int))]
    if bad or any(d is not None and d < 0 for d in shape):
        raise UsageError(f"declare: shape must hold ints >= 0 and None for the rows; got {shape!r}")
    result: Declared = (tuple(shape), np.dtype(dtype))

    def declared(*args: Any, **kwargs: Any) -> LazyArray:
        return call(function, args, kwargs, result)

    return declared


def call(
    function: ParallelFunction,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    result: Declared | None = None,
) -> LazyArray:
    """The lazy result of calling region `function` with at least one lazy argument."""
    region = function.region
    if region.allow_partial is not None:
        raise UnsupportedOperation(
            f"{_name(function)} has allow_partial set, so it returns lampy.Partial, which "
            "cannot be a lazy array; call it with numpy arguments (x.run())"
        )
    values, names, keywords = _arguments(region.function, args, kwargs)
    operands: list[Any] = []
    split: list[bool] = []
    for name, value in zip(names, values, strict=True):
        is_shared = isinstance(value, Shared) or name.partition("[")[0] in region.shared
        value = value.value if isinstance(value, Shared) else value
        if isinstance(value, np.ndarray) and not (is_shared and value.dtype == object):
            value = array(value)
        if not isinstance(value, LazyArray):
            operands.append(value)
            continue
        if value.ndim == 0 and not is_shared:
            raise UnsplittableError(
                f"argument {name!r} of {_name(function)} is a 0-d lazy array, which has "
                f"no axis 0 to split; pass lampy.shared({name}) if every chunk needs it"
            )
        operands.append(value.node)
        split.append(not is_shared)
    rows = _rows(function, names, operands, split)
    if result is None:
        shape, dtype, call_s, row_s = _infer(function, operands, keywords, split, rows)
    else:
        shape, dtype, call_s, row_s = _declared(function, result, split, rows), result[1], 0.0, 0.0
    params = {
        "function": f"{region.function.__module__}:{region.function.__qualname__}",
        "kind": "elemwise" if region.combine is None else "reduce",
        "keywords": keywords,
        "split": tuple(split),
        "rows": rows,
        "seconds_per_call": call_s,
        "seconds_per_row": row_s,
        "declared": result is not None,
    }
    return LazyArray(Node("region", tuple(operands), params, shape, dtype, function=function))


def _arguments(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[list[Any], list[str], tuple[str, ...]]:
    """The call's values in order, their names, and the names of those passed by keyword
    (a TypeError as the function itself would raise for a bad call)."""
    named = named_arguments(function, args, kwargs)
    keywords = tuple(name for name, positional, _ in named if not positional)
    return [value for *_, value in named], [name for name, *_ in named], keywords


def _rows(
    function: ParallelFunction, names: list[str], operands: list[Any], split: list[bool]
) -> int:
    """The split arguments' common length on axis 0 (0 when nothing is split)."""
    arrays = [(n, a) for n, a in zip(names, operands, strict=True) if isinstance(a, Node)]
    lengths = [(n, a.shape[0]) for (n, a), s in zip(arrays, split, strict=True) if s]
    if len({length for _, length in lengths}) > 1:
        described = ", ".join(f"{n} has {length} rows" for n, length in lengths)
        raise SplitLengthError(
            f"split arguments of {_name(function)} differ in length on axis 0: "
            f"{described}. Mark arrays every chunk needs whole with lampy.shared(x)"
        )
    return lengths[0][1] if lengths else 0


def _infer(
    function: ParallelFunction,
    operands: list[Any],
    keywords: tuple[str, ...],
    split: list[bool],
    rows: int,
) -> tuple[tuple[int, ...], np.dtype[Any], float, float]:
    """(shape, dtype, seconds per call, seconds per row) from calls on stand-ins."""
    region = function.region
    row_bytes = sum(
        n.nbytes // max(n.shape[0], 1)
        for n, s in zip([a for a in operands if isinstance(a, Node)], split, strict=True)
        if s
    )
    many = min(rows, max(2, probe_rows(rows, row_bytes)))  # 2+ rows: a row count is telling
    small = min(1, many)

    def run(count: int) -> tuple[Any, float]:
        flags = iter(split)
        values = [
            _stand_in(a, count if next(flags) else None) if isinstance(a, Node) else a
            for a in operands
        ]
        cut = len(values) - len(keywords)
        named = dict(zip(keywords, values[cut:], strict=True))
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                value = region.function(*values[:cut], **named)
                if region.combine is not None:
                    value = region.finish(value)
        except Exception as why:
            raise UnsupportedOperation(
                f"cannot infer the lazy result of {_name(function)}: called on stand-ins "
                f"(ones) of {count} row(s), it raised {type(why).__name__}: {why}. Call it with "
                "numpy arguments instead (x.run())"
            ) from why
        return value, time.perf_counter() - start

    # best of two for each point: the first call also pays one-time costs (imports, caches)
    first = min(run(small)[1] for _ in range(2))
    (value, seconds), (_, again) = run(many), run(many)
    seconds = min(seconds, again)
    per_row = max(0.0, (seconds - first) / (many - small)) if many > small else 0.0
    per_call = max(0.0, first - small * per_row)
    if not isinstance(value, np.ndarray | np.generic | int | float | complex | bool):
        raise UnsupportedOperation(
            f"{_name(function)} returned {type(value).__name__}; a lazy region call "
            "must return one numpy array. Call it with numpy arguments instead (x.run())"
        )
    result = np.asarray(value)
    if region.combine is not None or not any(split):
        return result.shape, result.dtype, per_call, per_row
    if result.ndim == 0 or result.shape[0] != many:
        raise UnsupportedOperation(
            f"elemwise region {_name(function)} returned shape {result.shape} for "
            f"{many} stand-in row(s); a lazy call needs one result row per input row to know "
            "its shape. Call it with numpy arguments instead (x.run())"
        )
    return (rows, *result.shape[1:]), result.dtype, per_call, per_row


def _declared(
    function: ParallelFunction, result: Declared, split: list[bool], rows: int
) -> tuple[int, ...]:
    """The declared shape with its None filled in by the split rows."""
    shape = result[0]
    if None in shape and (function.region.combine is not None or not any(split)):
        raise UsageError(
            f"declared shape {shape} for {_name(function)}: None stands for the split rows, "
            "which only an elemwise region with split arguments has; give every dimension"
        )
    return tuple(rows if d is None else d for d in shape)


def _name(function: ParallelFunction) -> str:
    return str(getattr(function.region.function, "__qualname__", function))


def _stand_in(node: Node, rows: int | None) -> np.ndarray:
    """Ones of the node's dtype: `rows` leading rows, or (None) its whole shape as a read-only
    broadcast, which takes no memory however large the shared array."""
    if rows is None:
        return np.broadcast_to(np.ones((), node.dtype), node.shape)
    return np.ones((rows, *node.shape[1:]), node.dtype)
