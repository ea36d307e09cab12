"""A parallel region: a numpy function, its hint, and how a call of it runs.

The decorated function stays a plain function (same signature and docstring, picklable). A call
goes one way through the house: bind the arguments, plan (timing a probe when chunks="auto"),
run the chunks on an executor, combine the results.
"""

from __future__ import annotations

import asyncio
import functools
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from lampy._errors import OptionError, RemoteTraceback, RetriesExhausted, SerializationError
from lampy.regions._binding import Binding, Shared, bind, parameter_names
from lampy.regions._partial import Coverage, Partial, check_fraction
from lampy.runtime import _blas as blas
from lampy.runtime import executors
from lampy.runtime._codec import dumps
from lampy.runtime._combine import concatenate, tree_merge
from lampy.runtime._job import Job, chunk_label
from lampy.runtime._plan import Plan, Probe, plan, probe_rows
from lampy.runtime._settings import (
    Chunks,
    check_chunks,
    resolve_chunks,
    resolve_executor,
    resolve_options,
)
from lampy.runtime._worker_side import Outcome, run_chunk
from lampy.runtime.executors._base import Executor
from lampy.runtime.remote._results import Sink, sink_of

PLANS_KEPT = 32  # auto decisions remembered per function (by argument shapes)


@dataclass(frozen=True)
class Region:
    """What a decorator says about a function. `combine` None means elemwise."""

    function: Callable[..., Any]
    combine: Callable[[Any, Any], Any] | None = None
    finalize: Callable[[Any], Any] | None = None
    shared: frozenset[str] = frozenset()
    chunks: Chunks | None = None
    executor: str | None = None
    allow_partial: float | None = None  # reductions only: see lampy.regions._partial

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise OptionError(f"a region must decorate a callable; got {self.function!r}")
        for role in ("combine", "finalize"):
            value = getattr(self, role)
            if value is not None and not callable(value):
                raise OptionError(f"{role} must be callable, like combine(a, b); got {value!r}")
        if self.chunks is not None:
            check_chunks(self.chunks)
        check_fraction(self.allow_partial)
        if self.executor is not None:
            executors.check_name(self.executor)
        names = parameter_names(self.function)
        unknown = sorted(self.shared - names) if names is not None else []
        if unknown:
            raise OptionError(
                f"shared names {unknown} are not parameters of {self.function.__qualname__}; "
                f"its parameters: {sorted(names or ())}"
            )

    def merge(self, results: list[Any], sink: Sink | None = None) -> Any:
        """The chunks' results combined into what the undecorated call returns (an elemwise
        result written where `sink` says, when the executor's options name one)."""
        if self.combine is None:
            return concatenate(results, sink)
        return self.finish(tree_merge(results, self.combine))

    def answer(self, value: Any, coverage: Coverage) -> Any:
        """The call's return value: `Partial(value, coverage)` when partial answers are on."""
        return value if self.allow_partial is None else Partial(value, coverage)

    def finish(self, partial: Any) -> Any:
        return self.finalize(partial) if self.finalize is not None else partial


class ParallelFunction:
    """A function marked as a parallel region; call it like the original."""

    def __init__(self, region: Region) -> None:
        self.region = region
        functools.update_wrapper(self, region.function)
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_plans"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _plans=OrderedDict())

    def __repr__(self) -> str:
        kind = "elemwise" if self.region.combine is None else "reduce"
        return f"<lampy.{kind} region {self.region.function.__qualname__}>"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = (a.value if isinstance(a, Shared) else a for a in (*args, *kwargs.values()))
        if any(hasattr(type(v), "__lampy_lazy__") for v in values):
            # A lazy argument makes the call a graph node. Local import: lampy.lazy builds on
            # lampy.regions, so a module-level import here would be a cycle.
            from lampy.lazy._calls import call

            return call(self, args, kwargs)
        binding, executor, chunks = self._prepare(args, kwargs)
        call_plan, probe = self._plan(binding, executor, chunks)
        if call_plan.warm_up:
            executor.start()
        if not call_plan.fan_out:
            value = self.region.function(*binding.direct_args, **binding.direct_kwargs)
            whole = self.region.merge([value], sink_of(executor))
            return self.region.answer(whole, Coverage(call_plan.chunks))
        done = {0: probe} if probe is not None else {}
        offset = len(done)  # the probe's rows, already computed, are chunk 0
        job = binding.job(
            self.region.function,
            call_plan.chunks[offset:],
            keep_going=self.region.allow_partial is not None,
            first=offset,
        )
        if executor.needs_pickle:
            _check_serializable(job, binding)
        outcomes = executor.run(job)
        done |= {chunk + offset: outcome for chunk, outcome in outcomes.items()}
        coverage = self._coverage(done, call_plan, executor.needs_pickle)
        merged = [done[c].value for c in coverage.merged]
        return self.region.answer(self.region.merge(merged, sink_of(executor)), coverage)

    def _coverage(self, done: dict[int, Outcome], call_plan: Plan, remote: bool) -> Coverage:
        """Which chunks to merge; raises a user error, or a lost chunk unless partial is allowed.

        A user exception is always raised (the lowest chunk first): skipping it would hide a bug.
        """
        lost: dict[int, RetriesExhausted] = {}
        for chunk in sorted(done):
            error = done[chunk].error
            if isinstance(error, RetriesExhausted):
                lost[chunk] = error
            elif error is not None:
                _raise_remote(done[chunk], chunk, call_plan, remote)
        coverage = Coverage(call_plan.chunks, lost)
        if lost:
            needed = self.region.allow_partial
            if needed is None or coverage.fraction < needed:
                first = min(lost)
                error = lost[first]
                if needed is not None:
                    error = RetriesExhausted(
                        f"allow_partial={needed} needs {needed:.1%} of the rows; the chunks "
                        f"that succeeded cover {coverage}. The first lost chunk: {error}",
                        chunk=error.chunk,
                        rows=error.rows,
                        causes=error.causes,
                    )
                    error.__cause__ = lost[first].__cause__
                _raise_lost(error, done[first].traceback)
        return coverage

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        """The same call for code inside an event loop: the loop keeps running meanwhile."""
        return await asyncio.to_thread(self, *args, **kwargs)

    def explain(self, *args: Any, **kwargs: Any) -> Plan:
        """The plan a call with these arguments would follow, without running the job.

        With chunks="auto" on a parallel executor, planning times the function on a small
        leading slice of the rows (the probe), as the call itself would.
        """
        binding, executor, chunks = self._prepare(args, kwargs)
        return self._plan(binding, executor, chunks)[0]

    def _prepare(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[Binding, Executor, int | None]:
        name = resolve_executor(self.region.executor)
        executor = executors.get(name, resolve_options(name))
        chunks = resolve_chunks(self.region.chunks)
        binding = bind(self.region.function, self.region.shared, args, kwargs)
        return binding, executor, None if chunks == "auto" else chunks

    def _plan(
        self, binding: Binding, executor: Executor, chunks: int | None
    ) -> tuple[Plan, Outcome | None]:
        """The plan, and the probe's outcome when the plan reuses it as chunk 0."""
        costs = executor.costs()

        def make(probe: Probe | None) -> Plan:
            return plan(
                executor=executor.name,
                costs=costs,
                rows=binding.rows,
                row_bytes=binding.row_bytes,
                shared_bytes=binding.shared_bytes,
                chunks=chunks,
                probe=probe,
                sent_row_bytes=binding.sent_row_bytes,
            )

        if chunks is not None or costs.workers <= 1 or binding.rows < 2:
            return make(None), None
        # An auto decision made on a started executor is kept for calls with the same shapes:
        # the same call then always follows the same plan (bit-identical float reductions) and
        # skips the probe.
        key = (executor.name, id(executor), binding.shapes)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key], None
        rows = probe_rows(binding.rows, binding.row_bytes)
        job = binding.job(self.region.function, ((0, 1), (0, rows)))
        with blas.one_thread():  # as in a worker, and no BLAS threads left spinning
            (call_seconds, _), (seconds, outcome) = (_timed(job, 0), _timed(job, 1))
        if rows == 1:
            call_seconds = 0.0  # one point only: all of it counts as per-row work
        probe = Probe(rows, seconds, _nbytes(outcome.value), min(call_seconds, seconds))
        result = make(probe)
        if costs.startup_s == 0:
            self._plans[key] = result
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        return result, outcome if result.fan_out else None


def _timed(job: Job, chunk: int) -> tuple[float, Outcome]:
    """Run one chunk in this process and time it; a user error is raised as it is."""
    start = time.perf_counter()
    outcome = run_chunk(job.function, *job.arguments(chunk))
    seconds = time.perf_counter() - start
    if outcome.error is not None:
        raise outcome.error
    return seconds, outcome


def _nbytes(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, tuple | list):
        return sum(_nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 8))


def _check_serializable(job: Job, binding: Binding) -> None:
    """Fail before sending anything when cloudpickle cannot carry the job; name the culprit."""
    try:
        job.template  # noqa: B018 (computed once and cached for the executor)
    except Exception as failure:
        culprit, cause = f"the function {job.function.__qualname__}", failure
        for name, value in binding.constants:
            try:
                dumps(value)
            except Exception as why:
                culprit, cause = f"argument {name!r} ({type(value).__name__})", why
                break
        raise SerializationError(
            f"cannot send {culprit} to worker processes: cloudpickle failed with "
            f"{type(cause).__name__}: {cause}. Pass picklable values, or use executor='inline'."
        ) from cause


def _raise_lost(error: RetriesExhausted, traceback: str) -> None:
    """A lost chunk's error, with the last remote traceback when the platform sent one."""
    if traceback:
        raise error from RemoteTraceback(traceback)
    raise error


def _raise_remote(outcome: Outcome, chunk: int, call_plan: Plan, remote: bool) -> None:
    """Re-raise a chunk's user exception with its own type, naming the chunk and its rows."""
    error = outcome.error
    assert error is not None
    where = f"raised in lampy {chunk_label(chunk, len(call_plan.chunks), call_plan.chunks[chunk])}"
    if hasattr(error, "add_note"):
        error.add_note(where)
    if remote:
        raise error from RemoteTraceback(f"{where}\n{outcome.traceback}")
    raise error
