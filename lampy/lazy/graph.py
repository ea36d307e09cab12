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
- moves (leading-axis slices, transposes, concatenation) and sources run in the caller: they
  copy or view data that is already there, and every region's result comes back to the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lampy.errors import UsageError
from lampy.regions.binding import shared
from lampy.regions.decorators import elemwise
from lampy.regions.decorators import reduce as reduce_region
from lampy.regions.decorators import sum as sum_region
from lampy.runtime.settings import Chunks

Scalar = bool | int | float | complex | np.generic
REDUCTIONS = ("sum", "mean", "min", "max")
MOVES = ("source", "getitem", "transpose", "concatenate")


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
    data: np.ndarray | None = field(default=None, repr=False)
    path: str | None = None

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


def load_source(node: Node) -> np.ndarray:
    if node.data is not None:
        return node.data
    assert node.path is not None
    return np.asarray(np.load(node.path))


# ----------------------------------------------------------------------------------------------
# Applying one operation to numpy values: the same code runs on whole arrays and on chunks.


def apply(op: str, params: Mapping[str, Any], values: Sequence[Any]) -> Any:
    """Run one node's operation with numpy. Row-wise ops give each chunk its own rows back."""
    if op == "ufunc":
        return getattr(np, params["name"])(*values)
    if op == "where":
        return np.where(*values)
    if op == "matmul":
        return np.matmul(*values)
    if op == "reshape":
        (x,) = values
        return x.reshape((x.shape[0], *params["shape"][1:]))
    if op == "reduce":
        (x,) = values
        return getattr(np, params["kind"])(x, axis=params["axis"])
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
        return getattr(np, self.terminal)(x, axis=self.axis)


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


def _combine_min(a: Any, b: Any) -> Any:
    return np.minimum(a, b)


def _combine_max(a: Any, b: Any) -> Any:
    return np.maximum(a, b)


# ----------------------------------------------------------------------------------------------
# Schedules: the graph cut into steps, each materializing one node.


@dataclass(frozen=True)
class Step:
    """One node made concrete: by a region (`kind` elemwise or reduce) or in the caller."""

    kind: str  # "source", "move", "elemwise", "reduce", "caller"
    node: Node
    leaves: tuple[Node, ...]  # inputs materialized by earlier steps
    split: tuple[bool, ...]  # per leaf: split by rows (True) or shared whole
    fused: tuple[Node, ...]  # the nodes this step computes (its program, in order)
    function: ChunkFunction | None = None

    @property
    def rows(self) -> int:
        return next(
            (leaf.shape[0] for leaf, s in zip(self.leaves, self.split, strict=True) if s), 0
        )

    @property
    def is_region(self) -> bool:
        return self.kind in ("elemwise", "reduce")


def schedule(root: Node) -> list[Step]:
    """The steps that compute `root`, in order; every node appears in at most one step.

    >>> import numpy as np
    >>> a = source(np.ones((4, 2)))
    >>> e = Node("ufunc", (a, 1.0), {"name": "add"}, (4, 2), np.dtype("float64"))
    >>> [s.kind for s in schedule(Node("ufunc", (e,), {"name": "exp"}, e.shape, e.dtype))]
    ['source', 'elemwise']
    """
    steps: list[Step] = []
    done: set[int] = set()

    def materialize(node: Node) -> None:
        if id(node) in done:
            return
        if node.op == "source":
            steps.append(Step("source", node, (), (), (node,)))
        elif is_rowwise(node) or is_leading(node):
            steps.append(_region_step(node, materialize))
        else:
            for n in node.inputs():
                materialize(n)
            kind = "move" if node.op in MOVES else "caller"
            steps.append(Step(kind, node, tuple(node.inputs()), (), (node,)))
        done.add(id(node))

    materialize(root)
    return steps


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

    if is_rowwise(node):
        outputs: tuple[Ref, ...] = (inline(node),)
        function = ChunkFunction(Program((), ()), "rows")
        kind = "elemwise"
    elif node.op == "matmul":
        outputs = (inline(node.args[0]), inline(node.args[1]))
        function = ChunkFunction(Program((), ()), "dot")
        kind = "reduce"
    else:
        x = node.args[0]
        outputs = (inline(x),)
        kind = "reduce"
        accumulate = None
        if node.params["kind"] == "mean":
            accumulate = str(_mean_accumulator(x.dtype)) if _mean_accumulator(x.dtype) else None
        function = ChunkFunction(
            Program((), ()), node.params["kind"], node.params["axis"], accumulate
        )
    if kind == "reduce":
        fused.append(node)
    program = Program(tuple(instructions), outputs)
    return Step(
        kind,
        node,
        tuple(leaves),
        tuple(split),
        tuple(fused),
        dataclasses.replace(function, program=program),
    )


def _mean_accumulator(dtype: np.dtype[Any]) -> np.dtype[Any] | None:
    """numpy's mean sums ints and bools in float64 and float16 in float32."""
    if dtype.kind in "biu":
        return np.dtype("float64")
    if dtype == np.float16:
        return np.dtype("float32")
    return None


# ----------------------------------------------------------------------------------------------
# Running a schedule.


def evaluate(root: Node, executor: str | None = None, chunks: Chunks | None = None) -> Any:
    """Compute `root`: follow its schedule, running each region step as a lampy region."""
    values: dict[int, Any] = {}
    for step in schedule(root):
        values[id(step.node)] = run_step(
            step, [values[id(n)] for n in step.leaves], executor, chunks
        )
    return values[id(root)]


def run_step(step: Step, leaves: list[Any], executor: str | None, chunks: Chunks | None) -> Any:
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
    options: dict[str, Any] = {"chunks": chunks, "executor": executor}
    if step.kind == "elemwise":
        region = elemwise(**options)(function)
    elif function.terminal in ("sum", "dot"):
        region = sum_region(**options)(function)
    elif function.terminal == "mean":
        region = sum_region(finalize=MeanFinalize(str(node.dtype)), **options)(function)
    else:
        combine = _combine_min if function.terminal == "min" else _combine_max
        region = reduce_region(combine, **options)(function)
    arguments = [v if s else shared(v) for v, s in zip(leaves, step.split, strict=True)]
    return region(*arguments)
