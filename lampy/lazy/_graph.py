"""The graph behind lazy arrays: nodes, how they fuse into lampy regions, and how they run.

Nodes are immutable and know their shape and dtype, so errors surface when the graph is built.
Running a graph first turns it into a schedule (pure, no I/O), which `.explain()` prints and
`.run()` follows:

- row-wise nodes (ufuncs, `where`, reshapes keeping axis 0, reductions along another axis,
  `x @ w` with `w` of 1 or 2 dims) fuse into one `@lampy.elemwise` region: each chunk runs the
  whole chain on its rows, so no intermediate array travels. Operands that have the region's
  rows are split; broadcast operands (fewer dims, or a leading length of 1) are shared.
- reductions over axis 0 or all axes become `@lampy.sum` / `@lampy.reduce` regions whose chunk
  first runs the fused chain feeding them; `v @ M` with a 1-d `v` is a sum over row blocks.
- a call of a decorated region with lazy arguments is a `region` node: it runs as that region,
  and its chunk first runs the fused chain feeding its split arguments (one round trip).
- moves (leading-axis slices, transposes, concatenation) and sources run in the caller: they
  copy or view data that is already there, and every region's result comes back to the caller.

`run(submatrix=(r, c))` cuts 2-D element-wise steps into r x c blocks: c column blocks, each run
as the same region over r row chunks, the column blocks at the same time. Other region steps run
with r * c row chunks.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lampy._errors import OptionError, ResultError, UnsupportedOperation, UsageError
from lampy.regions._binding import shared
from lampy.regions._function import ParallelFunction
from lampy.regions._region import Region
from lampy.regions._runner import RegionRunner
from lampy.runtime import executors
from lampy.runtime._combine import add
from lampy.runtime._job import RowSource
from lampy.runtime._plan import split_rows
from lampy.runtime._settings import Chunks, resolve_executor, resolve_options

MOVES = ("source", "getitem", "transpose", "concatenate")
OPERATIONS = ("ufunc", "where", "matmul", "reshape", "reduce", *MOVES)
#: The numpy functions a node may name, and nothing else: a graph read from a file names them
#: as text, so `apply` looks names up here, never with getattr on numpy (np.load, np.savetxt).
#: Ufuncs with one output and no core signature are what lazy arrays record.
UFUNCS: Mapping[str, np.ufunc] = {
    f.__name__: f
    for f in vars(np).values()
    if isinstance(f, np.ufunc) and f.nout == 1 and f.signature is None
}
REDUCTIONS: Mapping[str, Callable[..., Any]] = {
    "sum": np.sum,
    "mean": np.mean,
    "min": np.min,
    "max": np.max,
}


@dataclass(frozen=True, eq=False)
class Node:
    """One operation: its inputs (nodes or scalars), parameters, and result shape and dtype.

    `params` holds only JSON-friendly values (str, int, None, tuples of ints), so a graph saves
    as it is. A source holds its array in `data`, or the `.npy` file it reads in `path`.
    """

    op: str
    args: tuple[Any, ...]
    params: Mapping[str, Any]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    data: np.ndarray | RowSource | None = field(default=None, repr=False)  # a source's
    path: str | None = None
    function: ParallelFunction | None = field(default=None, repr=False)  # op "region" only

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def inputs(self) -> list[Node]:
        return [a for a in self.args if isinstance(a, Node)]

    def label(self) -> str:
        """A short name for printing: `exp`, `sum(axis=0)`, `source[1000x3]`."""
        if self.op == "ufunc":
            return str(self.params["name"])
        if self.op == "reduce":
            return f"{self.params['kind']}(axis={self.params['axis']})"
        if self.op == "source":
            return "source" + (f" {self.path}" if self.path else "")
        if self.op == "region":
            return f"{self.params['kind']} {self.params['function'].rpartition(':')[2]}"
        return self.op


def walk(root: Node) -> list[Node]:
    """Every node reachable from `root`, inputs before the nodes that use them."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((n, False) for n in reversed(node.inputs()) if id(n) not in seen)
    return order


def source(data: np.ndarray | None, path: str | None = None) -> Node:
    """A leaf node; with `path`, the array is read from that `.npy` file when the graph runs."""
    if path is not None:
        header = np.load(path, mmap_mode="r")
        return Node("source", (), {}, tuple(header.shape), header.dtype, path=path)
    assert data is not None
    return Node("source", (), {}, tuple(data.shape), data.dtype, data=data)


def load_source(node: Node) -> np.ndarray | RowSource:
    """A source's array; a reference stays one (regions split it, each chunk reads its rows)."""
    if node.data is not None:
        return node.data
    assert node.path is not None
    return np.asarray(np.load(node.path))


# ----------------------------------------------------------------------------------------------
# Applying one operation to numpy values: the same code runs on whole arrays and on chunks.


def apply(op: str, params: Mapping[str, Any], values: Sequence[Any]) -> Any:
    """Run one node's operation with numpy. Row-wise ops give each chunk its own rows back."""
    if op == "ufunc":
        return allowed(UFUNCS, params["name"], "numpy ufunc")(*values)
    if op == "where":
        return np.where(*values)
    if op == "matmul":
        return np.matmul(*values)
    if op == "reshape":
        (x,) = values
        return x.reshape((x.shape[0], *params["shape"][1:]))
    if op == "reduce":
        (x,) = values
        return allowed(REDUCTIONS, params["kind"], "reduction")(x, axis=params["axis"])
    if op == "transpose":
        return np.transpose(values[0], params["axes"])
    if op == "concatenate":
        return np.concatenate(values, axis=0)
    if op == "getitem":
        (x,) = values
        if "index" in params:
            return x[params["index"]]
        return x[params["start"] : params["stop"] : params["step"]]
    raise UsageError(f"unknown lazy operation {op!r}")


def allowed(table: Mapping[str, Any], name: object, what: str) -> Any:
    """`table[name]`, or an error listing what a lazy node may name instead."""
    if not isinstance(name, str) or name not in table:
        known = ", ".join(sorted(table)) if len(table) < 10 else "one output, no signature"
        raise UnsupportedOperation(f"{name!r} is not a {what} lazy arrays run ({known})")
    return table[name]


def is_rowwise(node: Node) -> bool:
    """Whether each row of the result depends only on the same row of its aligned inputs."""
    if node.ndim == 0:
        return False
    if node.op in ("ufunc", "where", "reshape"):
        return True
    if node.op == "reduce":
        return not is_leading(node)
    return node.op == "matmul" and node.args[0].ndim >= 2


def is_leading(node: Node) -> bool:
    """Whether the node reduces over axis 0 of its input (a reduce region)."""
    if node.op == "reduce":
        x = node.args[0]
        return x.ndim >= 1 and (node.params["axis"] is None or node.params["axis"] == 0)
    return node.op == "matmul" and node.args[0].ndim == 1


def aligned(node: Node, position: int) -> bool:
    """Whether input `position` of a row-wise node has the node's rows (so it is split)."""
    arg = node.args[position]
    if not isinstance(arg, Node):
        return False
    if node.op in ("ufunc", "where"):
        return arg.ndim == node.ndim and arg.shape[0] == node.shape[0]
    return position == 0


# ----------------------------------------------------------------------------------------------
# Programs: a fused chain of row-wise operations, run by every chunk on its rows.

Ref = tuple[str, Any]  # ("leaf", i) | ("value", i) | ("const", scalar)


@dataclass(frozen=True)
class Instruction:
    op: str
    params: Mapping[str, Any]
    args: tuple[Ref, ...]


@dataclass(frozen=True)
class Program:
    """Instructions over the region's leaf arrays; `outputs` name what the chunk needs."""

    instructions: tuple[Instruction, ...]
    outputs: tuple[Ref, ...]

    def run(self, leaves: Sequence[Any]) -> list[Any]:
        values: list[Any] = []

        def get(ref: Ref) -> Any:
            kind, what = ref
            return leaves[what] if kind == "leaf" else values[what] if kind == "value" else what

        for step in self.instructions:
            values.append(apply(step.op, step.params, [get(a) for a in step.args]))
        return [get(ref) for ref in self.outputs]


@dataclass(frozen=True)
class ChunkFunction:
    """What a region runs per chunk: the program, then the partial of a reduction if any."""

    program: Program
    terminal: str  # "rows", "sum", "mean", "min", "max", "dot"
    axis: int | None = None
    accumulate: str | None = None  # dtype for mean's sums (numpy's rules: float64 for ints)

    def __call__(self, *leaves: Any) -> Any:
        values = self.program.run(leaves)
        if self.terminal == "rows":
            return values[0]
        if self.terminal == "dot":
            return np.matmul(values[0], values[1])
        x = values[0]
        if self.terminal == "mean":
            n = x.size if self.axis is None else x.shape[0]
            return {"s": np.sum(x, axis=self.axis, dtype=self.accumulate), "n": n}
        return REDUCTIONS[self.terminal](x, axis=self.axis)


@dataclass(frozen=True)
class MeanFinalize:
    """sum / count, cast back as numpy's mean does (float16 sums in float32, returns float16)."""

    dtype: str

    def __call__(self, partial: dict[str, Any]) -> Any:
        value = partial["s"] / partial["n"]
        dtype = np.dtype(self.dtype)
        if value.dtype == dtype:
            return value
        return value.astype(dtype) if isinstance(value, np.ndarray) else dtype.type(value)


class RegionCall:
    """A region node's chunk: the fused chain feeding its arrays, then the user's function.

    It takes the user's function's module and names (not `__wrapped__`, whose signature would
    replace this one), so remote executors send that module by value as for a direct call.
    """

    def __init__(
        self,
        program: Program,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        params: Mapping[str, Any],
    ) -> None:
        self.program, self.function = program, function
        self.constants = tuple(None if isinstance(a, Node) else a for a in args)
        self.arrays = tuple(isinstance(a, Node) for a in args)
        self.keywords: tuple[str, ...] = tuple(params["keywords"])
        self.__module__ = getattr(function, "__module__", None) or __name__
        self.__qualname__ = getattr(function, "__qualname__", type(self).__qualname__)
        self.__name__ = getattr(function, "__name__", type(self).__name__)

    def __call__(self, *leaves: Any) -> Any:
        values = iter(self.program.run(leaves))
        args = [
            next(values) if is_array else constant
            for is_array, constant in zip(self.arrays, self.constants, strict=True)
        ]
        split = len(args) - len(self.keywords)
        keywords = dict(zip(self.keywords, args[split:], strict=True))
        return self.function(*args[:split], **keywords)


def _combine_min(a: Any, b: Any) -> Any:
    return np.minimum(a, b)


def _combine_max(a: Any, b: Any) -> Any:
    return np.maximum(a, b)


# ----------------------------------------------------------------------------------------------
# Schedules: the graph cut into steps, each materializing one node.


@dataclass(frozen=True)
class Step:
    """One node made concrete: by a region (`kind` elemwise or reduce) or in the caller."""

    kind: str  # "source", "move", "elemwise", "reduce", "region", "caller"
    node: Node
    leaves: tuple[Node, ...]  # inputs materialized by earlier steps
    split: tuple[bool, ...]  # per leaf: split by rows (True) or shared whole
    fused: tuple[Node, ...]  # the nodes this step computes (its program, in order)
    function: ChunkFunction | RegionCall | None = None
    #: The region step's runner, kept with the schedule: its auto plans hold across runs.
    runner: RegionRunner | None = field(default=None, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return next(
            (leaf.shape[0] for leaf, s in zip(self.leaves, self.split, strict=True) if s), 0
        )

    @property
    def is_region(self) -> bool:
        return self.kind in ("elemwise", "reduce", "region")

    @property
    def by_blocks(self) -> bool:
        """Whether `submatrix` may cut this step by columns too: a 2-D chain of ufuncs/where.

        Such a chain treats every column alike, so each column block of the result needs only
        the same columns of the operands (or all of a broadcast operand's single column).
        """
        return (
            self.kind == "elemwise"
            and self.node.ndim == 2
            and all(n.op in ("ufunc", "where") for n in self.fused)
        )


def schedule(root: Node) -> list[Step]:
    """The steps that compute `root`, in order; every node appears in at most one step.

    Made once per graph and kept with it (while the graph lives), so explaining, pre-warming
    and running share one schedule, and its region steps keep their plans across runs.

    >>> import numpy as np
    >>> a = source(np.ones((4, 2)))
    >>> e = Node("ufunc", (a, 1.0), {"name": "add"}, (4, 2), np.dtype("float64"))
    >>> [s.kind for s in schedule(Node("ufunc", (e,), {"name": "exp"}, e.shape, e.dtype))]
    ['source', 'elemwise']
    """
    if root in _schedules:
        return _schedules[root]
    steps: list[Step] = []
    done: set[int] = set()

    def materialize(node: Node) -> None:
        if id(node) in done:
            return
        if node.op == "source":
            steps.append(Step("source", node, (), (), (node,)))
        elif is_rowwise(node) or is_leading(node) or node.op == "region":
            steps.append(_region_step(node, materialize))
        else:
            for n in node.inputs():
                materialize(n)
            kind = "move" if node.op in MOVES else "caller"
            steps.append(Step(kind, node, tuple(node.inputs()), (), (node,)))
        done.add(id(node))

    materialize(root)
    _schedules[root] = steps
    return steps


_schedules: weakref.WeakKeyDictionary[Node, list[Step]] = weakref.WeakKeyDictionary()


def _region_step(node: Node, materialize: Callable[[Node], None]) -> Step:
    """Fuse `node` with the row-wise chain feeding it into one region step."""
    leaves: list[Node] = []
    split: list[bool] = []
    instructions: list[Instruction] = []
    fused: list[Node] = []
    computed: dict[int, int] = {}

    def leaf(n: Node, is_split: bool) -> Ref:
        for i, (other, s) in enumerate(zip(leaves, split, strict=True)):
            if other is n and s == is_split:
                return ("leaf", i)
        materialize(n)
        leaves.append(n)
        split.append(is_split)
        return ("leaf", len(leaves) - 1)

    def inline(n: Node) -> Ref:
        """The reference to aligned node `n` inside the program, fusing it when row-wise."""
        if not is_rowwise(n):
            return leaf(n, True)
        if id(n) in computed:
            return ("value", computed[id(n)])
        args: list[Ref] = []
        for position, arg in enumerate(n.args):
            if not isinstance(arg, Node):
                args.append(("const", arg))
            elif aligned(n, position):
                args.append(inline(arg))
            else:
                args.append(leaf(arg, False))
        instructions.append(Instruction(n.op, n.params, tuple(args)))
        fused.append(n)
        computed[id(n)] = len(instructions) - 1
        return ("value", computed[id(n)])

    if node.op == "region":
        split_flags = node.params["split"]
        outputs: tuple[Ref, ...] = tuple(
            (inline(a) if is_split else leaf(a, False))
            for a, is_split in zip(node.inputs(), split_flags, strict=True)
        )
        program = Program(tuple(instructions), outputs)
        assert node.function is not None
        call = RegionCall(program, node.function.region.function, node.args, node.params)
        fused.append(node)
        return _step("region", node, leaves, split, fused, call)
    if is_rowwise(node):
        outputs = (inline(node),)
        kind, terminal, axis, accumulate = "elemwise", "rows", None, None
    elif node.op == "matmul":
        outputs = (inline(node.args[0]), inline(node.args[1]))
        kind, terminal, axis, accumulate = "reduce", "dot", None, None
    else:
        x = node.args[0]
        outputs = (inline(x),)
        kind, terminal, axis = "reduce", node.params["kind"], node.params["axis"]
        wide = _mean_accumulator(x.dtype) if terminal == "mean" else None
        accumulate = str(wide) if wide is not None else None
    if kind == "reduce":
        fused.append(node)
    function = ChunkFunction(Program(tuple(instructions), outputs), terminal, axis, accumulate)
    return _step(kind, node, leaves, split, fused, function)


def _step(
    kind: str,
    node: Node,
    leaves: list[Node],
    split: list[bool],
    fused: list[Node],
    function: ChunkFunction | RegionCall,
) -> Step:
    """A region step with the region that runs it (kept with the step across runs)."""
    if isinstance(function, RegionCall):
        assert node.function is not None
        own = node.function.region
        region = Region(
            function,
            combine=own.combine,
            finalize=own.finalize,
            chunks=own.chunks,
            executor=own.executor,
        )
    elif kind == "elemwise":
        region = Region(function)
    elif function.terminal in ("sum", "dot"):
        region = Region(function, combine=add)
    elif function.terminal == "mean":
        region = Region(function, combine=add, finalize=MeanFinalize(str(node.dtype)))
    else:
        region = Region(
            function, combine=_combine_min if function.terminal == "min" else _combine_max
        )
    runner = RegionRunner(region)
    return Step(kind, node, tuple(leaves), tuple(split), tuple(fused), function, runner)


def _mean_accumulator(dtype: np.dtype[Any]) -> np.dtype[Any] | None:
    """numpy's mean sums ints and bools in float64 and float16 in float32."""
    if dtype.kind in "biu":
        return np.dtype("float64")
    if dtype == np.float16:
        return np.dtype("float32")
    return None


# ----------------------------------------------------------------------------------------------
# Running a schedule.


Blocks = tuple[int, int]


def check_submatrix(submatrix: object, chunks: Chunks | None) -> Blocks | None:
    """Validate `run(submatrix=...)`: None, or (row blocks, column blocks) as positive ints.

    >>> check_submatrix((2, 3), None)
    (2, 3)
    """
    if submatrix is None:
        return None
    if (
        not isinstance(submatrix, tuple | list)
        or len(submatrix) != 2
        or any(isinstance(n, bool) or not isinstance(n, int | np.integer) for n in submatrix)
    ):
        raise OptionError(
            f"submatrix must be (row blocks, column blocks), two ints like (2, 2); "
            f"got {submatrix!r}"
        )
    if min(submatrix) < 1:
        raise OptionError(f"submatrix needs at least one block on each axis; got {submatrix!r}")
    if chunks is not None:
        raise OptionError(
            f"give chunks= or submatrix=, not both: submatrix={tuple(submatrix)!r} already "
            f"sets the blocks (got chunks={chunks!r})"
        )
    return int(submatrix[0]), int(submatrix[1])


def evaluate(
    root: Node,
    executor: str | None = None,
    chunks: Chunks | None = None,
    submatrix: Blocks | None = None,
) -> Any:
    """Compute `root`: follow its schedule, running each region step as a lampy region.

    On an executor that can pre-warm (openlambda) and is still cold, first warms as many
    workers as the cost model says the widest region will use at once.
    """
    steps = schedule(root)
    _prewarm(root, executor, chunks, submatrix)
    values: dict[int, Any] = {}
    for step in steps:
        values[id(step.node)] = run_step(
            step, [values[id(n)] for n in step.leaves], executor, chunks, submatrix
        )
    return values[id(root)]


def _prewarm(
    root: Node, executor: str | None, chunks: Chunks | None, submatrix: Blocks | None
) -> None:
    name = resolve_executor(executor)
    instance = executors.get(name, resolve_options(name))
    if not instance.can_prewarm or instance.is_warm():
        return
    from lampy.lazy._cost import explain  # cost builds on this module

    count = explain(root, executor, chunks, submatrix).prewarm(name)
    if count > 0:
        instance.prewarm(count)


def run_step(
    step: Step,
    leaves: list[Any],
    executor: str | None,
    chunks: Chunks | None,
    submatrix: Blocks | None = None,
) -> Any:
    """One step on concrete inputs."""
    node = step.node
    if step.kind == "source":
        return load_source(node)
    if not step.is_region:
        values = iter(leaves)
        args = [next(values) if isinstance(a, Node) else a for a in node.args]
        return apply(node.op, node.params, args)
    function = step.function
    assert function is not None
    if step.rows == 0 and node.ndim >= 1 and step.kind == "elemwise":
        return function(*leaves)
    if submatrix is not None and step.by_blocks:
        return _run_blocks(step, leaves, executor, submatrix)
    if submatrix is not None:
        chunks = submatrix[0] * submatrix[1]
    assert step.runner is not None
    arguments = tuple(v if s else shared(v) for v, s in zip(leaves, step.split, strict=True))
    result = step.runner.run(arguments, {}, executor, chunks)
    if step.kind == "region":
        _check_result(node, result)
    return result


def column_blocks(step: Step, leaves: list[Any], blocks: int) -> list[list[Any]]:
    """Each leaf cut into column blocks (contiguous copies, so numpy takes its contiguous
    loops as on the whole array); a leaf with one column, or none, is broadcast whole.

    >>> a = source(np.arange(6.0).reshape(2, 3))
    >>> e = Node("ufunc", (a, 1.0), {"name": "add"}, (2, 3), np.dtype("float64"))
    >>> step = schedule(e)[-1]
    >>> [b[0].shape for b in column_blocks(step, [np.ones((2, 3))], 2)]
    [(2, 2), (2, 1)]
    """
    columns = step.node.shape[1]
    cuts = split_rows(columns, blocks)
    return [
        [
            np.ascontiguousarray(v[..., start:stop])
            if np.ndim(v) >= 1 and np.shape(v)[-1] == columns and columns != 1
            else v
            for v in leaves
        ]
        for start, stop in cuts
    ]


def _run_blocks(step: Step, leaves: list[Any], executor: str | None, blocks: Blocks) -> Any:
    """r x c blocks: the column blocks run at once (threads, each with the caller's lampy
    settings), each as the step's region over r row chunks; joined along axis 1."""
    rows, columns = blocks
    runner = step.runner
    assert runner is not None

    def one(block: list[Any]) -> Any:
        arguments = tuple(v if s else shared(v) for v, s in zip(block, step.split, strict=True))
        return runner.run(arguments, {}, executor, rows)

    parts = column_blocks(step, leaves, columns)
    context = contextvars.copy_context()
    with ThreadPoolExecutor(len(parts), thread_name_prefix="lampy-submatrix") as pool:
        results = list(pool.map(lambda block: context.copy().run(one, block), parts))
    return np.concatenate(results, axis=1)


def _check_result(node: Node, result: Any) -> None:
    """A region node's result must be what was inferred when the call was written."""
    value = np.asarray(result)
    if value.shape != node.shape or value.dtype != node.dtype:
        how = "declared" if node.params.get("declared") else "inferred from stand-ins"
        raise ResultError(
            f"region {node.params['function']} returned {value.shape} {value.dtype}, but its "
            f"lazy result was {how} as {node.shape} {node.dtype} when the expression was "
            "written. A region whose result shape or dtype depends on the values cannot be a "
            "lazy node: call it on numpy arrays (x.run())"
        )
