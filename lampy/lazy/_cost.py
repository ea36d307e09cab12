"""Cost estimates for lazy graphs, and `.explain()`: what would run where, and how long.

Each node costs seconds per element of its result (per element of its input for reductions),
one constant per operation, measured on 4 Mi float64 elements with numpy alone. Those constants
include the memory traffic of one unfused numpy call, so a fused chain is estimated as the sum
of its members (pessimistic by the traffic fusion saves). Matmul costs its flops at a measured
GEMM rate: the caller's BLAS with all its threads for numpy in the caller, one BLAS thread in
each worker (workers run one each). Both rates are measured, not one scaled by the core count:
on a shared machine a two-thread GEMM often gains nothing. Executors add their own costs
(start-up, bytes moved, result bytes, per chunk) from the same `Costs` the region planner uses.

`calibrate()` measures the constants on this machine and caches them in the user's cache dir
(`$XDG_CACHE_HOME/lampy/lazy_costs.json`); without that file the shipped defaults apply.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lampy.lazy._graph import Blocks, Node, Step, check_submatrix, schedule
from lampy.runtime import _blas as blas
from lampy.runtime import executors
from lampy.runtime._plan import CHUNKS_PER_WORKER, Costs
from lampy.runtime._settings import Chunks, resolve_chunks, resolve_executor, resolve_options

# Measured with calibrate() on the 2-core reference machine (2026-11-23), seconds per element of
# 4 Mi float64 (32 MiB, past the caches, as for arrays worth distributing). GEMM rates on a quiet
# machine: gemm_flops_caller with the caller's 2 BLAS threads (bench_lazy.py's 4096x1024 @
# 1024x256 took 18.9 ms: 1.14e11; DESIGN.md's 4096-square: 1.2e11), gemm_flops with one thread
# as in a worker (~6e10; 4.5e10 with the other core busy). The old single rate, 1024-square with
# 2 threads measured under load (~5.4e10), put bench_lazy.py's `a @ w` at 0.47 of its estimate.
DEFAULTS: dict[str, float] = {
    "ufunc": 2.2e-9,
    "exp": 2.3e-9,
    "log": 2.5e-9,
    "sqrt": 1.9e-9,
    "sin": 9.5e-9,
    "cos": 14.5e-9,
    "tanh": 2.9e-9,
    "where": 2.6e-9,
    "reduce": 0.3e-9,
    "copy": 1.35e-9,
    "gemm_flops": 6e10,
    "gemm_flops_caller": 1.14e11,
}
#: The flops one element costs, for reporting (transcendentals counted as ~20 flops).
FLOPS_PER_ELEMENT = {"exp": 20, "log": 20, "sin": 20, "cos": 20, "tanh": 20, "sqrt": 4}
CALIBRATED_UFUNCS = ("exp", "log", "sqrt", "sin", "cos", "tanh")


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lampy" / "lazy_costs.json"


def constants() -> dict[str, float]:
    """The shipped defaults, overridden by calibrated values when `calibrate()` has run."""
    merged = dict(DEFAULTS)
    path = cache_path()
    if path.exists():
        merged.update({k: float(v) for k, v in json.loads(path.read_text()).items()})
    return merged


def calibrate(elements: int = 1 << 22, repeats: int = 5) -> dict[str, float]:
    """Measure every constant with numpy alone (best of `repeats`) and cache the result."""
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(elements)) + 1
    y = rng.standard_normal(elements)

    def best(f: Callable[[], Any], n: int = elements) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times) / n

    measured = {name: best(functools.partial(getattr(np, name), x)) for name in CALIBRATED_UFUNCS}
    measured["ufunc"] = best(lambda: np.add(x, y))
    measured["where"] = best(lambda: np.where(x, x, y))
    measured["reduce"] = best(lambda: x.sum())
    measured["copy"] = best(lambda: x.copy())
    side = 1024
    a = rng.standard_normal((side, side))
    measured["gemm_flops_caller"] = 1 / best(lambda: a @ a, n=2 * side**3)
    with blas.one_thread():  # as in a worker
        measured["gemm_flops"] = 1 / best(lambda: a @ a, n=2 * side**3)
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(measured, indent=1) + "\n")
    return measured


def node_seconds(node: Node, c: dict[str, float], caller: bool = False) -> float:
    """Estimated numpy time for one node on its whole input, in the caller or in a worker."""
    if node.op == "source":
        return 0.0
    if node.op == "matmul":
        return node_flops(node) / c["gemm_flops_caller" if caller else "gemm_flops"]
    if node.op == "region":  # timed on stand-ins when the call was written
        rows = int(node.params["rows"])
        return float(node.params["seconds_per_call"]) + rows * float(node.params["seconds_per_row"])
    if node.op == "reduce":
        return int(node.args[0].size) * c["reduce"]
    if node.op == "ufunc":
        return node.size * c.get(str(node.params["name"]), c["ufunc"])
    if node.op == "where":
        return node.size * c["where"]
    return node.size * c["copy"]


def node_flops(node: Node) -> int:
    if node.op == "matmul":
        return 2 * node.size * int(node.args[0].shape[-1])
    if node.op == "reduce":
        return int(node.args[0].size)
    if node.op in ("ufunc", "where"):
        return node.size * FLOPS_PER_ELEMENT.get(str(node.params.get("name")), 1)
    return 0


@dataclass(frozen=True)
class StepCost:
    """One schedule step with its estimates on one executor.

    `parallel` is how many workers the step keeps busy at once: what pre-warming should start.
    """

    step: Step
    chunks: int
    flops: int
    bytes_moved: int
    seconds: float
    parallel: int = 0
    blocks: Blocks | None = None


def step_cost(
    step: Step,
    costs: Costs,
    chunks: int,
    c: dict[str, float],
    asked: bool = True,
    submatrix: Blocks | None = None,
) -> StepCost:
    """The step's estimated seconds on an executor with `costs`, cut into `chunks`.

    A single-worker executor runs numpy in the caller, whose BLAS uses all its threads; workers
    run one BLAS thread each. With `asked` False (chunks="auto"), a region counts as fanning out
    only when the estimate says that pays, as the region planner's probe would find.
    """
    serial = sum(node_seconds(n, c, caller=True) for n in step.fused)
    flops = sum(node_flops(n) for n in step.fused)
    if not step.is_region or costs.workers <= 1:
        return StepCost(step, 1, flops, 0, serial)
    compute = sum(node_seconds(n, c) for n in step.fused)
    blocks = submatrix if submatrix is not None and step.by_blocks else None
    if blocks is not None:  # as many blocks as fit: one row and one column at least
        chunks = max(1, min(blocks[0], step.rows)) * max(1, min(blocks[1], step.node.shape[1]))
    else:
        chunks = max(1, min(chunks, step.rows))
    parallel = min(chunks, costs.workers)
    split = sum(n.nbytes for n, s in zip(step.leaves, step.split, strict=True) if s)
    whole = sum(n.nbytes for n, s in zip(step.leaves, step.split, strict=True) if not s)
    result = step.node.nbytes * (1 if step.kind == "elemwise" else chunks)
    moved = split + whole * parallel + result
    seconds = (
        costs.startup_s
        + (split + whole * parallel) * costs.seconds_per_byte
        + result * costs.result_byte_seconds
        + chunks * costs.seconds_per_chunk
        + compute / parallel
    )
    if not asked and seconds >= serial:
        return StepCost(step, 1, flops, 0, serial)  # the planner would run it in the caller
    return StepCost(step, chunks, flops, moved, seconds, parallel, blocks)


@dataclass(frozen=True)
class Explanation:
    """The schedule of a lazy array and its cost on each executor; print it to read it."""

    steps: list[Step]
    estimates: dict[str, list[StepCost]]
    workers: dict[str, int]
    chunks: Chunks
    submatrix: Blocks | None = None
    warms: frozenset[str] = frozenset()  # executors that can pre-warm workers (openlambda)

    @property
    def regions(self) -> list[Step]:
        return [s for s in self.steps if s.is_region]

    def seconds(self, executor: str) -> float:
        return sum(c.seconds for c in self.estimates[executor])

    def prewarm(self, executor: str) -> int:
        """Workers to start ahead of the fan-out: the most any region keeps busy at once.

        Only executors in `warms` act on it (openlambda); for others it is informative.
        """
        return max((c.parallel for c in self.estimates[executor]), default=0)

    def __str__(self) -> str:
        lines = [f"{len(self.regions)} region(s) after fusion, {len(self.steps)} step(s):"]
        first = next(iter(self.estimates.values()))
        for i, cost in enumerate(first):
            step = cost.step
            what = " -> ".join(n.label() for n in step.fused)
            lines.append(f"  {i}. {step.kind:8s} {what}  => {step.node.shape} {step.node.dtype}")
            if step.is_region:
                split = sum(step.split)
                work = "flops"
                if step.kind == "region":
                    declared = step.node.params.get("declared")
                    work = (
                        "declared result: no time estimate" if declared else "time from stand-ins"
                    )
                amount = "" if step.kind == "region" else f"{cost.flops:,} "
                lines.append(
                    f"       {step.rows} rows; {split} split input(s), "
                    f"{len(step.split) - split} shared; {amount}{work}"
                )
        for name, costs in self.estimates.items():
            moved = sum(c.bytes_moved for c in costs)
            chunks = max((c.chunks for c in costs if c.step.is_region), default=0)
            blocks = next((c.blocks for c in costs if c.blocks), None)
            cut = f"{blocks[0]}x{blocks[1]} blocks" if blocks else f"{chunks} chunk(s)"
            count = self.prewarm(name)
            busy = f", pre-warm {count}" if name in self.warms else f", {count} busy at once"
            lines.append(
                f"  on {name}: ~{self.seconds(name) * 1e3:.3g} ms, {moved:,} bytes moved, "
                f"up to {cut} per region{busy if self.workers[name] > 1 else ''}"
            )
        if self.chunks == "auto" and self.submatrix is None:
            lines.append(
                f"  (chunks=auto: estimated with {CHUNKS_PER_WORKER} chunks per worker where "
                "that pays; at run time each region's planner decides from a timed probe)"
            )
        return "\n".join(lines)


def explain(
    root: Node,
    executor: str | None = None,
    chunks: Chunks | None = None,
    submatrix: Blocks | None = None,
) -> Explanation:
    """Estimates on `inline`, `local` and the executor the run would use."""
    blocks = check_submatrix(submatrix, chunks)
    steps = schedule(root)
    chosen = resolve_executor(executor)
    wanted = resolve_chunks(chunks)
    c = constants()
    estimates: dict[str, list[StepCost]] = {}
    workers: dict[str, int] = {}
    warms: set[str] = set()
    for name in dict.fromkeys((chosen, "inline", "local")):
        instance = executors.get(name, resolve_options(name))
        costs = instance.costs()
        if instance.can_prewarm:
            warms.add(name)
        if blocks is not None:
            count, asked = blocks[0] * blocks[1], True
        elif wanted != "auto":
            count, asked = wanted, True
        else:
            count, asked = costs.workers * CHUNKS_PER_WORKER, False
        estimates[name] = [step_cost(s, costs, count, c, asked, blocks) for s in steps]
        workers[name] = costs.workers
    return Explanation(steps, estimates, workers, wanted, blocks, frozenset(warms))
