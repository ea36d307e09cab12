"""The region runner: how one call of a region runs, below the decorators.

One way through the house: bind the arguments, plan (timing a probe when chunks="auto"), run
the chunks on an executor, combine the results. Decorated functions call it, and so do lazy
graphs, one runner per graph step, so an auto decision made once on a started executor is kept
for later calls with the same shapes (no re-probing, and the same call always follows the same
plan: bit-identical float reductions).
"""

from __future__ import annotations

import inspect
import linecache
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import replace
from typing import Any

from lampy._errors import RemoteTraceback, RetriesExhausted, SerializationError
from lampy.regions._binding import Binding, bind
from lampy.regions._partial import Coverage
from lampy.regions._region import Region
from lampy.runtime import _blas as blas
from lampy.runtime import _serial as serial
from lampy.runtime import executors
from lampy.runtime._codec import dumps
from lampy.runtime._job import Job, chunk_label
from lampy.runtime._plan import (
    PROBE_BYTES,
    Costs,
    Plan,
    Probe,
    Rows,
    plan,
    probe_rows,
    split_rows,
    warm_saving,
)
from lampy.runtime._settings import Chunks, resolve_chunks, resolve_executor, resolve_options
from lampy.runtime._tree import leaves
from lampy.runtime._worker_side import Outcome, run_task
from lampy.runtime.executors import Executor

PLANS_KEPT = 32  # auto decisions remembered per region (by argument shapes)
# An auto call on a pool still starting is probed when its split arrays hold this much (the
# probe is then at most 1/64 of the work): if fanning out would pay and the call would outlast
# the start-up, its chunks run here while the workers start, and the workers take the rest.
# Any other cold call runs here whole (a smaller one unprobed).
COLD_PROBE_BYTES = PROBE_BYTES
HERE_WHILE_STARTING = "the workers are starting: the chunks run here until they are up"


class RegionRunner:
    """Runs the calls of one region; keeps its auto plans across calls."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self._saving = 0.0  # what a warm pool would have saved this region's cold calls so far

    def run(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        executor: str | None = None,
        chunks: Chunks | None = None,
    ) -> Any:
        """What the undecorated function returns for these arguments. `executor` and `chunks`
        apply where the region's own options leave them open (a lazy graph's run() options)."""
        binding, where, count, name = self._prepare(args, kwargs, executor, chunks)
        region = self.region
        costs = where.costs()
        cold = _cold(costs, count)
        if cold and not _large(binding):
            return self._here_then_start(binding, where, costs)
        call_plan, probe = self._plan(binding, where, count, name, as_warm=cold)
        if cold and not (call_plan.fan_out and _outlasts_startup(call_plan, costs)):
            return self._here_then_start(binding, where, costs)
        if not call_plan.fan_out:
            whole, _, _ = self._whole_here(binding, call_plan.chunks, where)
            if call_plan.warm_up:  # after the call, which the start-up must not slow down
                where.start()
            return region.answer(whole, Coverage(call_plan.chunks))
        done = {0: probe} if probe is not None else {}  # the probe's rows are chunk 0
        if cold:
            where.start()
            self._here_while_starting(binding, call_plan, where, done)
        offset = len(done)  # chunks [0, offset) are done here
        if offset < len(call_plan.chunks):
            job = binding.job(
                region.function,
                call_plan.chunks[offset:],
                keep_going=region.allow_partial is not None,
                first=offset,
                joins_rows=region.combine is None,
                combine=region.combine,
            )
            if where.needs_pickle:
                with serial.timing("send"):
                    _check_serializable(job, binding)
            outcomes = where.run(job)
            done |= {chunk + offset: outcome for chunk, outcome in outcomes.items()}
        coverage = self._coverage(done, call_plan, where.needs_pickle)
        # an executor that merged partials answers a Merged subtree for its first chunk only
        values = [done[c].value for c in coverage.merged if c in done]
        with serial.timing("combine"):
            merged = region.merge(values, call_plan.chunks, coverage.merged, where.result_sink)
        return region.answer(merged, coverage)

    def _here_then_start(self, binding: Binding, where: Executor, costs: Costs) -> Any:
        """An auto call while the pool is cold or starting that the workers could not help
        (small, over before they could be up, or not worth fanning out): it is never waited
        for, so the call runs here, timed whole, and the pool starts afterwards once it would
        have saved more than its start-up, summed over this region's cold calls (many small
        calls pay it as one large call does)."""
        rows = split_rows(binding.rows, 1)
        whole, value, seconds = self._whole_here(binding, rows, where)
        moved_rows, moved_whole = binding.moved_bytes(costs.maps_shared_memory)
        self._saving += warm_saving(
            costs=costs,
            rows=binding.rows,
            row_bytes=binding.row_bytes,
            shared_bytes=binding.shared_bytes,
            seconds=seconds,
            result_bytes=_nbytes(value),
            sent_row_bytes=moved_rows,
            sent_shared_bytes=moved_whole,
        )
        if self._saving >= costs.startup_s:
            self._saving = 0.0
            where.start()
        return self.region.answer(whole, Coverage(rows))

    def _here_while_starting(
        self, binding: Binding, call_plan: Plan, where: Executor, done: dict[int, Outcome]
    ) -> None:
        """A call that would fan out, on workers still starting: its chunks run here, in
        order, until the workers are up, and they take the rest. The call never waits for
        them (on a busy machine a start-up can take seconds) and is split as a warm call is,
        so it gives the answer the calls after it give. A user error is raised at once."""
        job = binding.job(self.region.function, call_plan.chunks)
        call = (job.function, job.args, dict(job.kwargs))
        with serial.timing("here"), blas.one_thread():  # as in a worker, as the probe was
            for chunk in range(len(done), len(call_plan.chunks)):
                if where.is_warm():
                    return
                done[chunk] = outcome = run_task(call, job.rows(chunk), job.whole)
                if outcome.error is not None:
                    _raise_remote(outcome, chunk, call_plan, False, job.function)

    def _whole_here(
        self, binding: Binding, rows: tuple[Rows, ...], where: Executor
    ) -> tuple[Any, Any, float]:
        """The whole call in this process, combined as one chunk through the executor's sink:
        (what to answer, the function's own value, its seconds)."""
        region = self.region
        start = time.perf_counter()
        value = region.function(*binding.direct_args, **binding.direct_kwargs)
        seconds = time.perf_counter() - start
        with serial.timing("combine"):
            whole = region.merge([value], rows, (0,), where.result_sink, bool(binding.split))
        return whole, value, seconds

    def explain(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        executor: str | None = None,
        chunks: Chunks | None = None,
    ) -> Plan:
        """The plan a call with these arguments would follow, without running the job."""
        binding, where, count, name = self._prepare(args, kwargs, executor, chunks)
        costs = where.costs()
        cold = _cold(costs, count)
        if not (cold and _large(binding)):
            return self._plan(binding, where, count, name)[0]
        made = self._plan(binding, where, count, name, as_warm=True)[0]
        if made.fan_out and _outlasts_startup(made, costs):
            return replace(made, reason=f"{made.reason}; {HERE_WHILE_STARTING}")
        return self._plan(binding, where, count, name)[0]

    def _prepare(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        executor: str | None,
        chunks: Chunks | None,
    ) -> tuple[Binding, Executor, int | None, str]:
        """The call's arguments bound, its executor, chunk count (None: auto) and the name the
        executor was asked for (a class may be registered under several)."""
        region = self.region
        name = resolve_executor(region.executor or executor)
        where = executors.get(name, resolve_options(name))
        count = resolve_chunks(region.chunks if region.chunks is not None else chunks)
        binding = bind(region.function, region.shared, args, kwargs)
        return binding, where, None if count == "auto" else count, name

    def _plan(
        self,
        binding: Binding,
        executor: Executor,
        chunks: int | None,
        name: str,
        as_warm: bool = False,
    ) -> tuple[Plan, Outcome | None]:
        """The plan, and the probe's outcome when the plan reuses it as chunk 0. `as_warm`:
        plan as if the executor's workers were up (a cold call that runs its chunks here
        until they are)."""
        costs = executor.costs()
        if as_warm:
            costs = replace(costs, startup_s=0.0)
        moved_rows, moved_whole = binding.moved_bytes(costs.maps_shared_memory)

        def make(probe: Probe | None) -> Plan:
            made = plan(
                executor=name,
                costs=costs,
                rows=binding.rows,
                row_bytes=binding.row_bytes,
                shared_bytes=binding.shared_bytes,
                chunks=chunks,
                probe=probe,
                sent_row_bytes=moved_rows,
                sent_shared_bytes=moved_whole,
            )
            return replace(made, orchestrated_by=getattr(executor, "orchestrated_by", ""))

        if chunks is not None or costs.workers <= 1 or binding.rows < 2:
            return make(None), None
        # A plan made on a cold executor priced its start-up: it is kept for cold calls only,
        # and the first call on the warm executor plans again.
        warm = costs.startup_s == 0
        key = (name, id(executor), binding.shapes, warm)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key], None
        rows = probe_rows(binding.rows, binding.row_bytes)
        job = binding.job(self.region.function, ((0, 1), (0, rows)))
        with serial.timing("probe"), blas.one_thread():  # as in a worker; no BLAS threads left
            (call_seconds, _), (seconds, outcome) = (_timed(job, 0), _timed(job, 1))
        if rows == 1:
            call_seconds = 0.0  # one point only: all of it counts as per-row work
        probe = Probe(rows, seconds, _nbytes(outcome.value), min(call_seconds, seconds))
        result = make(probe)
        if warm or not result.fan_out:
            self._plans[key] = result
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        return result, outcome if result.fan_out else None

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
                _raise_remote(done[chunk], chunk, call_plan, remote, self.region.function)
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


def _cold(costs: Costs, count: int | None) -> bool:
    """An auto call on an executor whose workers start in the background and are not up."""
    return count is None and costs.starts_in_background and costs.startup_s > 0


def _large(binding: Binding) -> bool:
    """Whether a cold call is large enough to probe (`COLD_PROBE_BYTES`)."""
    return binding.rows * binding.row_bytes >= COLD_PROBE_BYTES


def _outlasts_startup(call_plan: Plan, costs: Costs) -> bool:
    """Whether the call, run here, would take longer than the workers take to start: only
    then can they take some of its chunks (a shorter one runs here whole)."""
    probe = call_plan.probe
    if probe is None:
        return False
    return probe.call_seconds + probe.row_seconds * call_plan.rows >= costs.startup_s


def _timed(job: Job, chunk: int) -> tuple[float, Outcome]:
    """Run one chunk in this process and time it; a user error is raised as it is."""
    start = time.perf_counter()
    outcome = run_task((job.function, job.args, dict(job.kwargs)), job.rows(chunk), job.whole)
    seconds = time.perf_counter() - start
    if outcome.error is not None:
        raise outcome.error
    return seconds, outcome


def _nbytes(value: Any) -> int:
    return sum(int(getattr(leaf, "nbytes", 8)) for leaf in leaves(value))


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


def _raise_remote(
    outcome: Outcome, chunk: int, call_plan: Plan, remote: bool, function: Any
) -> None:
    """Re-raise a chunk's user exception with its own type, naming the chunk and its rows."""
    error = outcome.error
    assert error is not None
    where = f"raised in lampy {chunk_label(chunk, len(call_plan.chunks), call_plan.chunks[chunk])}"
    if hasattr(error, "add_note"):
        error.add_note(where)
    if remote:
        text = _with_sources(outcome.traceback, function)
        raise error from RemoteTraceback(f"{where}\n{text}")
    raise error


def _with_sources(traceback: str, function: Any) -> str:
    """The remote traceback with the file names and source lines cloudpickle drops from
    functions it sends by value (they run as "<dynamic-code>"), found in the caller's module."""
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    files: dict[str, str] = {}
    for value in [function, *(vars(module).values() if module is not None else ())]:
        code = getattr(inspect.unwrap(value), "__code__", None) if callable(value) else None
        if code is not None:
            files.setdefault(code.co_name, code.co_filename)

    def restore(match: re.Match[str]) -> str:
        indent, line, name = match.group(1), match.group(2), match.group(3)
        path = files.get(name)
        if path is None:
            return match.group(0)
        source = linecache.getline(path, int(line)).strip()
        shown = f"\n{indent}  {source}" if source else ""
        return f'{indent}File "{path}", line {line}, in {name}{shown}'

    return re.sub(
        r'^( *)File "<dynamic-code>", line (\d+), in (\w+)$', restore, traceback, flags=re.M
    )
