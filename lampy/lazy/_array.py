"""Lazy arrays: numpy's operators and a core set of its functions build a graph, run later.

Every operation checks shapes and dtypes as numpy would, when it is written, so a bad expression
fails before anything runs. Operations outside the supported set raise instead of quietly
computing in the caller: a silent fallback would copy everything to the client.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from lampy._errors import ShapeError, UnsupportedOperation, UsageError
from lampy.lazy._graph import Node, check_submatrix, evaluate, source
from lampy.regions._function import ParallelFunction
from lampy.runtime._settings import Chunks, using
from lampy.runtime.remote._reference import RemoteArray, remote

SUPPORTED_FUNCTIONS = (
    "sum, mean, min, max (axis None or an int), matmul, dot, transpose, concatenate (axis 0), "
    "reshape (keeping axis 0), where, and leading-axis slicing"
)
SUPPORTED_UFUNCS = "any numpy ufunc with one output, called plainly (no out=, where=, dtype=)"


class LazyArray(NDArrayOperatorsMixin):
    """A numpy-like array whose operations build a graph; `.run()` computes it with lampy."""

    __slots__ = ("node",)

    @staticmethod
    def __lampy_region_call__(
        function: ParallelFunction, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> LazyArray:
        """A region called with a lazy argument: the call becomes a node of the graph.

        `ParallelFunction.__call__` looks for this on its arguments' types, so the regions
        layer needs no import of this one (see lampy.lazy._calls).
        """
        from lampy.lazy._calls import call  # _calls builds lazy arrays: imported when used

        return call(function, args, kwargs)

    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def shape(self) -> tuple[int, ...]:
        return self.node.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.node.dtype

    @property
    def ndim(self) -> int:
        return self.node.ndim

    @property
    def size(self) -> int:
        return self.node.size

    @property
    def nbytes(self) -> int:
        return self.node.nbytes

    def __len__(self) -> int:
        if not self.shape:
            raise UnsupportedOperation("len() of a 0-d lazy array")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"lampy.LazyArray(shape={self.shape}, dtype={self.dtype}, op={self.node.label()})"

    def __bool__(self) -> bool:
        raise UnsupportedOperation(
            "the truth value of a lazy array is known only after it runs; use bool(x.run())"
        )

    def __iter__(self) -> Any:
        raise UnsupportedOperation(
            "iterating a lazy array would compute it row by row; use x.run()"
        )

    # --- running --------------------------------------------------------------------------

    def run(
        self,
        executor: str | None = None,
        chunks: Chunks | None = None,
        submatrix: tuple[int, int] | None = None,
        **options: Any,
    ) -> Any:
        """Compute with lampy regions; options default as for any region call.

        `submatrix=(r, c)` cuts 2-D element-wise work into r x c blocks (instead of `chunks`).
        Other keywords are the executor's options, as in `lampy.using(executor, **options)`.
        """
        blocks = check_submatrix(submatrix, chunks)
        if not options:
            return evaluate(self.node, executor, chunks, blocks)
        with using(executor, **options):
            return evaluate(self.node, executor, chunks, blocks)

    compute = run

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        result = np.asarray(self.run())
        return result if dtype is None else result.astype(dtype)

    def explain(
        self,
        executor: str | None = None,
        chunks: Chunks | None = None,
        submatrix: tuple[int, int] | None = None,
    ) -> Any:
        """The schedule after fusion with cost estimates per executor; nothing runs."""
        from lampy.lazy._cost import explain

        return explain(self.node, executor, chunks, submatrix)

    def graph(self) -> Any:
        """The graph behind this array, for saving, printing as DOT or inspecting."""
        from lampy.lazy._io import Graph

        return Graph(self.node)

    # --- numpy protocols ------------------------------------------------------------------

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        name = ufunc.__name__
        if method != "__call__" or kwargs:
            what = f"np.{name}.{method}" if method != "__call__" else f"np.{name}"
            extra = f" with {sorted(kwargs)}" if kwargs else ""
            raise UnsupportedOperation(
                f"{what}{extra} is not supported on lazy arrays; supported: {SUPPORTED_UFUNCS}"
            )
        if ufunc is np.matmul:
            return matmul(*inputs)
        if ufunc.nout != 1 or ufunc.signature is not None:
            raise UnsupportedOperation(
                f"np.{name} is not supported on lazy arrays; supported: {SUPPORTED_UFUNCS}"
            )
        args = tuple(_operand(x) for x in inputs)
        shape = _broadcast(name, args)
        dtype = _dtype_of(name, lambda *xs: ufunc(*xs), args)
        return LazyArray(Node("ufunc", args, {"name": name}, shape, dtype))

    def __array_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        handler = _FUNCTIONS.get(func)
        if handler is None:
            raise UnsupportedOperation(
                f"np.{getattr(func, '__name__', func)} is not supported on lazy arrays; "
                f"supported: {SUPPORTED_FUNCTIONS}. Call .run() first to get a numpy array"
            )
        return handler(*args, **kwargs)

    # --- methods as on ndarray ------------------------------------------------------------

    def sum(self, axis: int | None = None) -> LazyArray:
        return reduction("sum", self, axis)

    def mean(self, axis: int | None = None) -> LazyArray:
        return reduction("mean", self, axis)

    def min(self, axis: int | None = None) -> LazyArray:
        return reduction("min", self, axis)

    def max(self, axis: int | None = None) -> LazyArray:
        return reduction("max", self, axis)

    def reshape(self, *shape: Any) -> LazyArray:
        return reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes: Any) -> LazyArray:
        return transpose(self, (axes[0] if len(axes) == 1 else axes) if axes else None)

    @property
    def T(self) -> LazyArray:
        return transpose(self)

    def __getitem__(self, key: Any) -> LazyArray:
        return getitem(self, key)


def array(obj: Any, dtype: Any = None) -> LazyArray:
    """A lazy array from a list, an ndarray, a lazy array, the path of a `.npy` file, or the
    http(s) URL of one on an array server (`lampy serve`) or a `lampy.remote` reference to one,
    read by reference.

    A `.npy` file is read when the graph runs (only its header now), so a saved graph keeps
    the path rather than the data.
    """
    if isinstance(obj, LazyArray):
        if dtype is not None and np.dtype(dtype) != obj.dtype:
            raise UnsupportedOperation(
                "lampy.array cannot change a lazy array's dtype; pass numpy data"
            )
        return obj
    if isinstance(obj, RemoteArray) or (
        isinstance(obj, str) and obj.startswith(("http://", "https://"))
    ):
        # only the metadata now; chunks read their own rows
        reference = obj if isinstance(obj, RemoteArray) else remote(obj, dtype)
        if dtype is not None and np.dtype(dtype) != reference.dtype:
            raise UsageError(f"{reference.url} holds {reference.dtype}, not {np.dtype(dtype)}")
        data: Any = reference  # array-like: regions split it, other steps read it (__array__)
        return LazyArray(Node("source", (), {}, reference.shape, reference.dtype, data=data))
    if isinstance(obj, str | os.PathLike):
        path = os.fspath(obj)
        if not path.endswith(".npy"):
            raise UsageError(f"lampy.array reads .npy files; got the path {path!r}")
        if not os.path.exists(path):
            raise UsageError(f"lampy.array: no such file {path!r}")
        node = source(None, path)
        if dtype is not None and np.dtype(dtype) != node.dtype:
            raise UsageError(f"{path!r} holds {node.dtype}, not {np.dtype(dtype)}")
        return LazyArray(node)
    try:
        data = np.asarray(obj, dtype=dtype)
    except ValueError:
        data = np.empty(0, object)
    if data.dtype == object:
        raise UnsupportedOperation(
            f"lampy.array needs numeric data; {type(obj).__name__} became an object array "
            "(ragged lists or mixed types?)"
        )
    return LazyArray(source(data))


# ----------------------------------------------------------------------------------------------
# Building nodes


def _operand(x: Any) -> Any:
    """A node for arrays (lazy or not), the value itself for scalars."""
    if isinstance(x, LazyArray):
        return x.node
    if isinstance(x, bool | int | float | complex | np.generic):
        return x
    value = np.asarray(x)
    if value.ndim == 0:
        return value[()]
    return array(value).node


def _node(x: Any, what: str) -> Node:
    operand = _operand(x)
    if not isinstance(operand, Node):
        raise UnsupportedOperation(f"{what} needs arrays, not the scalar {operand!r}")
    return operand


def _shape_of(x: Any) -> tuple[int, ...]:
    return x.shape if isinstance(x, Node) else ()


def _broadcast(name: str, args: Sequence[Any]) -> tuple[int, ...]:
    shapes = [_shape_of(a) for a in args]
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        described = " and ".join(str(s) for s in shapes)
        raise ShapeError(
            f"operands could not be broadcast together in {name}: shapes {described}"
        ) from None


def _dtype_of(name: str, f: Callable[..., Any], args: Sequence[Any]) -> np.dtype[Any]:
    """Result dtype from numpy itself on empty stand-ins: exact, weak Python scalars included."""
    stand_ins = [np.empty((0,), a.dtype) if isinstance(a, Node) else a for a in args]
    try:
        return np.asarray(f(*stand_ins)).dtype
    except (TypeError, ValueError, OverflowError) as why:
        dtypes = ", ".join(str(a.dtype) if isinstance(a, Node) else repr(a) for a in args)
        raise UnsupportedOperation(f"{name} cannot take ({dtypes}): {why}") from None


def _only(name: str, kwargs: dict[str, Any], allowed: Sequence[str]) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise UnsupportedOperation(
            f"np.{name} on lazy arrays takes only {list(allowed)}; got {extra}. "
            f"Supported: {SUPPORTED_FUNCTIONS}"
        )


def _axis(name: str, node: Node, axis: Any) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise UnsupportedOperation(
            f"{name} on lazy arrays takes axis=None or one int; got axis={axis!r}"
        )
    if not -node.ndim <= axis < node.ndim:
        raise ShapeError(f"{name}: axis {axis} is out of bounds for shape {node.shape}")
    return int(axis) % node.ndim


def reduction(kind: str, x: Any, axis: Any = None, **kwargs: Any) -> LazyArray:
    _only(kind, kwargs, ())
    node = _node(x, kind)
    ax = _axis(kind, node, axis)
    length = node.size if ax is None else node.shape[ax]
    if length == 0 and kind != "sum":
        raise ShapeError(f"{kind} of an empty axis (shape {node.shape}, axis={ax}) has no value")
    shape = () if ax is None else node.shape[:ax] + node.shape[ax + 1 :]
    dtype = _dtype_of(kind, getattr(np, kind), [np.ones((1,), node.dtype)])
    return LazyArray(Node("reduce", (node,), {"kind": kind, "axis": ax}, shape, dtype))


def matmul(a: Any, b: Any, **kwargs: Any) -> LazyArray:
    """`a @ b` with `b` of 1 or 2 dims: by row blocks of `a`, or a sum over blocks for 1-d `a`."""
    _only("matmul", kwargs, ())
    left, right = _node(a, "matmul"), _node(b, "matmul")
    if left.ndim == 0 or right.ndim == 0 or right.ndim > 2:
        raise UnsupportedOperation(
            f"matmul on lazy arrays needs a left operand of 1+ dims and a right operand of 1 or "
            f"2 dims; got shapes {left.shape} and {right.shape}"
        )
    if left.shape[-1] != right.shape[0]:
        raise ShapeError(
            f"matmul: shapes {left.shape} and {right.shape} do not match: "
            f"{left.shape[-1]} (last of the left) != {right.shape[0]} (first of the right)"
        )
    shape = left.shape[:-1] + right.shape[1:]
    dtype = _dtype_of(
        "matmul", np.matmul, [np.empty((0, 1), left.dtype), np.empty((1, 0), right.dtype)]
    )
    return LazyArray(Node("matmul", (left, right), {}, shape, dtype))


def dot(a: Any, b: Any, **kwargs: Any) -> LazyArray:
    _only("dot", kwargs, ())
    left, right = _node(a, "dot"), _node(b, "dot")
    if left.ndim > 2:
        raise UnsupportedOperation(
            f"dot on lazy arrays takes 1-d or 2-d operands; got {left.shape}"
        )
    return matmul(left, right)


def transpose(a: Any, axes: Any = None) -> LazyArray:
    node = _node(a, "transpose")
    order = tuple(range(node.ndim))[::-1] if axes is None else tuple(int(i) for i in axes)
    if sorted(i % max(node.ndim, 1) for i in order) != list(range(node.ndim)):
        raise ShapeError(f"transpose: axes {axes!r} are not a permutation for shape {node.shape}")
    order = tuple(i % node.ndim for i in order)
    shape = tuple(node.shape[i] for i in order)
    return LazyArray(Node("transpose", (node,), {"axes": order}, shape, node.dtype))


def concatenate(arrays: Any, axis: Any = 0, **kwargs: Any) -> LazyArray:
    _only("concatenate", kwargs, ())
    if axis != 0:
        raise UnsupportedOperation(
            f"concatenate on lazy arrays joins along axis 0 only; got axis={axis!r}"
        )
    nodes = tuple(_node(x, "concatenate") for x in arrays)
    if not nodes:
        raise ShapeError("concatenate needs at least one array")
    trailing = {n.shape[1:] for n in nodes}
    if any(n.ndim == 0 for n in nodes) or len(trailing) > 1:
        shapes = ", ".join(str(n.shape) for n in nodes)
        raise ShapeError(
            f"concatenate along axis 0 needs arrays of 1+ dims with equal trailing shapes; "
            f"got {shapes}"
        )
    shape = (sum(n.shape[0] for n in nodes), *nodes[0].shape[1:])
    dtype = np.result_type(*(n.dtype for n in nodes))
    return LazyArray(Node("concatenate", nodes, {}, shape, dtype))


def reshape(a: Any, shape: Any = None, order: str = "C", **kwargs: Any) -> LazyArray:
    _only("reshape", kwargs, ())
    node = _node(a, "reshape")
    wanted = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    if order != "C" or node.ndim == 0 or not wanted or wanted[0] != node.shape[0]:
        raise UnsupportedOperation(
            f"reshape on lazy arrays must keep the leading axis (order 'C'): "
            f"{node.shape} -> {wanted} is not supported"
        )
    rest = int(np.prod(node.shape[1:], dtype=np.int64))
    trailing = list(int(d) for d in wanted[1:])
    if trailing.count(-1) == 1:
        known = int(np.prod([d for d in trailing if d != -1], dtype=np.int64))
        trailing[trailing.index(-1)] = rest // known if known and rest % known == 0 else -2
    if any(d < 0 for d in trailing) or int(np.prod(trailing, dtype=np.int64)) != rest:
        raise ShapeError(f"cannot reshape shape {node.shape} into {wanted}")
    new_shape = (node.shape[0], *trailing)
    return LazyArray(Node("reshape", (node,), {"shape": new_shape}, new_shape, node.dtype))


def where(condition: Any, x: Any = None, y: Any = None) -> LazyArray:
    if x is None or y is None:
        raise UnsupportedOperation("where on lazy arrays needs all three of condition, x and y")
    args = (_operand(condition), _operand(x), _operand(y))
    if not any(isinstance(a, Node) for a in args):
        raise UnsupportedOperation("where needs at least one array")
    shape = _broadcast("where", args)
    dtype = _dtype_of("where", np.where, args)
    return LazyArray(Node("where", args, {}, shape, dtype))


def getitem(a: LazyArray, key: Any) -> LazyArray:
    """Indexing along the leading axis only: `x[3]`, `x[2:10:2]`, `x[:5, :]`."""
    node = a.node
    rest: tuple[Any, ...] = ()
    if isinstance(key, tuple):
        key, rest = (key[0], key[1:]) if key else (slice(None), ())
    if node.ndim == 0 or any(r not in (slice(None), Ellipsis) for r in rest):
        raise UnsupportedOperation(
            f"lazy arrays support indexing along the leading axis only (x[i], x[a:b:c]); "
            f"got {key!r} with {rest!r} on shape {node.shape}"
        )
    n = node.shape[0]
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        if not -n <= key < n:
            raise UsageError(f"index {key} is out of bounds for axis 0 with size {n}")
        params: dict[str, Any] = {"index": int(key) % n}
        shape = node.shape[1:]
    elif isinstance(key, slice):
        params = {"start": key.start, "stop": key.stop, "step": key.step}
        shape = (len(range(*key.indices(n))), *node.shape[1:])
    else:
        raise UnsupportedOperation(
            f"lazy arrays support integer and slice indexing of the leading axis; got {key!r}"
        )
    return LazyArray(Node("getitem", (node,), params, shape, node.dtype))


def _reduction_function(kind: str) -> Callable[..., LazyArray]:
    def reduce_(a: Any, axis: Any = None, **kwargs: Any) -> LazyArray:
        return reduction(kind, a, axis, **kwargs)

    return reduce_


_FUNCTIONS: dict[Callable[..., Any], Callable[..., LazyArray]] = {
    np.sum: _reduction_function("sum"),
    np.mean: _reduction_function("mean"),
    np.min: _reduction_function("min"),
    np.max: _reduction_function("max"),
    np.amin: _reduction_function("min"),
    np.amax: _reduction_function("max"),
    np.dot: dot,
    np.transpose: transpose,
    np.concatenate: concatenate,
    np.reshape: reshape,
    np.where: where,
}
