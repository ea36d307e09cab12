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
from dataclasses import dataclass, field, replace
from typing import Any

from lampy._errors import RemoteTraceback, RetriesExhausted, SerializationError
from lampy.regions._binding import Binding, bind
from lampy.regions._partial import Coverage
from lampy.regions._region import Region
from lampy.runtime import _blas as blas
from lampy.runtime import _serial as serial
from lampy.runtime import executors
from lampy.runtime._codec import dumps
from lampy.runtime._combine import Destination
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
# A kept elemwise plan that keeps its calls here is checked again once the executor's price
# per chunk is this many times below the price it was made at, and made again (with a new
# probe) if at today's price its timings would fan out: the local pool learns its price from
# every job (it varies 5x between calls here), and a plan made while the machine was busy kept
# later calls here for good. A plan that fans out is kept: its own jobs keep the price
# learnt, which calls kept here would no longer do (a price rising for a moment sent a
# compute-bound region here for good).
PRICE_DRIFT = 2.0
# A warm auto plan whose chunks may run in blocks (`Plan.block_rows`) runs its first calls with
# and without them, in turn, BLOCK_TRIALS times each; blocks are kept when the quicker of their
# calls beats the quicker of the others by this factor. Whether cache-sized calls pay depends
# on the function (the Fisher features batch their rows themselves: blocks cost them 6 %).
BLOCK_TRIALS = 2
BLOCKS_MARGIN = 0.95
# An auto call on a pool still starting is probed when its split arrays hold this much (the
# probe is then at most 1/64 of the work): if fanning out would pay and the call would outlast
# the start-up, its chunks run here while the workers start, and the workers take the rest.
# Any other cold call runs here whole (a smaller one unprobed).
COLD_PROBE_BYTES = PROBE_BYTES
HERE_WHILE_STARTING = "the workers are starting: the chunks run here until they are up"


@dataclass(frozen=True)
class Call:
    """One call's arguments bound, and where it runs (`RegionRunner.prepare`)."""

    binding: Binding
    executor: Executor
    chunks: int | None  # the chunk count asked for; None: auto
    name: str  # the executor's name as asked for (a class may be registered under several)


@dataclass(frozen=True)
class Planned:
    """A call's plan and the job that runs it (`RegionRunner.plan`)."""

    plan: Plan
    job: Job  # the chunks the caller has not run; its chunk 0 is the call's chunk `job.first`
    done: dict[int, Outcome]  # the chunks the caller ran (the probe's rows), by number


@dataclass
class _BlockTrial:
    """A kept plan's fanned-out calls, timed in blocks of `rows` rows (True) and without."""

    rows: int
    seconds: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})


class RegionRunner:
    """Runs the calls of one region; keeps its auto plans across calls."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self._whole_seconds: dict[Hashable, float] = {}  # a kept plan's last call here, timed
        self._block_trials: dict[Hashable, _BlockTrial | None] = {}  # None: decided
        self._prices: dict[Hashable, float] = {}  # a kept plan's executor price per chunk
        self._saving = 0.0  # what a warm pool would have saved this region's cold calls so far
        self._modules = _imported_for(region.function)  # by workers as they start

    def run(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        executor: str | None = None,
        chunks: Chunks | None = None,
    ) -> Any:
        """What the undecorated function returns for these arguments. `executor` and `chunks`
        apply where the region's own options leave them open (a lazy graph's run() options)."""
        call = self.prepare(args, kwargs, executor, chunks)
        binding, where = call.binding, call.executor
        costs = where.costs()
        cold = _cold(costs, call.chunks)
        if cold and not _large(binding):
            return self._here_then_start(binding, where, costs)
        planned = self.plan(call, as_warm=cold)
        if cold and not (planned.plan.fan_out and _outlasts_startup(planned.plan, costs)):
            return self._here_then_start(binding, where, costs)
        if not planned.plan.fan_out:
            whole, _, seconds = self._whole_here(binding, planned.plan.chunks, where)
            if planned.plan.warm_up:  # after the call, which the start-up must not slow down
                self._start(where)
            else:
                self._learn(call, planned.plan, costs, seconds)
            return self.region.answer(whole, Coverage(planned.plan.chunks))
        done = planned.done
        job: Job | None = planned.job
        if where.needs_pickle:  # before any chunk runs here: a call that cannot leave says so
            with serial.timing("send"):
                _check_serializable(planned.job, binding)
        if cold:
            self._start(where)
            done = self._here_while_starting(call, planned)
            job = self._rest(call, planned.plan, len(done))
        if job is not None:
            started = time.perf_counter()
            outcomes = where.run(job)
            if not cold and call.chunks is None:
                self._try_blocks(call, planned.plan, time.perf_counter() - started)
            done = done | {chunk + job.first: outcome for chunk, outcome in outcomes.items()}
        return self.answer(done, planned.plan, where.needs_pickle, where.result_sink)

    def _start(self, where: Executor) -> None:
        """Start the executor's workers in the background, this region's module imported."""
        where.import_ahead(self._modules)
        where.start()

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
            self._start(where)
        return self.region.answer(whole, Coverage(rows))

    def _here_while_starting(self, call: Call, planned: Planned) -> dict[int, Outcome]:
        """A call that would fan out, on workers still starting: its chunks run here, in
        order, until the workers are up, and they take the rest. The call never waits for
        them (on a busy machine a start-up can take seconds) and is split as a warm call is,
        so it gives the answer the calls after it give. A user error is raised at once.
        Returns the outcomes of the chunks done here (the probe's among them)."""
        done = dict(planned.done)
        chunks = planned.plan.chunks
        job = call.binding.job(self.region.function, chunks)
        task = (job.function, job.args, dict(job.kwargs))
        with serial.timing("here"), blas.one_thread():  # as in a worker, as the probe was
            for chunk in range(len(done), len(chunks)):
                if call.executor.is_warm():
                    break
                done[chunk] = outcome = run_task(task, job.rows(chunk), job.whole)
                if outcome.error is not None:
                    _raise_remote(outcome, chunk, planned.plan, False, job.function)
        return done

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
        call = self.prepare(args, kwargs, executor, chunks)
        costs = call.executor.costs()
        if not (_cold(costs, call.chunks) and _large(call.binding)):
            return self._plan(call)[0]
        made = self._plan(call, as_warm=True)[0]
        if made.fan_out and _outlasts_startup(made, costs):
            return replace(made, reason=f"{made.reason}; {HERE_WHILE_STARTING}")
        return self._plan(call)[0]

    def prepare(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        executor: str | None = None,
        chunks: Chunks | None = None,
    ) -> Call:
        """A call's arguments bound and its executor chosen: the first step of `run`, and of a
        call started without waiting for it (`lampy.submit`). Bad arguments raise here."""
        region = self.region
        name = resolve_executor(region.executor or executor)
        where = executors.get(name, resolve_options(name))
        count = resolve_chunks(region.chunks if region.chunks is not None else chunks)
        binding = bind(region.function, region.shared, args, kwargs)
        return Call(binding, where, None if count == "auto" else count, name)

    def plan(self, call: Call, as_warm: bool = False) -> Planned:
        """The call's plan (timing a probe here when chunks="auto") and the job of the chunks
        the caller has not run: all of them, or all but the probe's, reused as chunk 0.
        `as_warm`: plan as if the executor's workers were up (a cold call that runs its chunks
        here until they are)."""
        call_plan, probe = self._plan(call, as_warm)
        done = {0: probe} if probe is not None else {}
        job = self._rest(call, call_plan, len(done))
        assert job is not None, "a plan has at least one chunk beyond the probe's"
        return Planned(call_plan, job, done)

    def _rest(self, call: Call, call_plan: Plan, first: int) -> Job | None:
        """The job of the plan's chunks from `first` on (None when there are none left)."""
        region = self.region
        if first >= len(call_plan.chunks):
            return None
        return call.binding.job(
            region.function,
            call_plan.chunks[first:],
            keep_going=region.allow_partial is not None,
            first=first,
            joins_rows=region.combine is None,
            combine=region.combine,
            pace=call_plan.pace,
            block_rows=call_plan.block_rows,
        )

    def answer(
        self,
        done: dict[int, Outcome],
        call_plan: Plan,
        remote: bool,
        sink: Destination | None = None,
        split: bool = True,
    ) -> Any:
        """What the call returns, from the outcomes of its chunks (numbered within the call):
        a user error raised with its chunk, a lost chunk raised unless partial answers allow
        it, the rest merged (into the executor's result `sink`, if any). `remote`: the
        chunks ran in other processes (their tracebacks are text); `split` False: the call
        split no array."""
        region = self.region
        coverage = self._coverage(done, call_plan, remote)
        # an executor that merged partials answers a Merged subtree for its first chunk only
        values = [done[c].value for c in coverage.merged if c in done]
        with serial.timing("combine"):
            merged = region.merge(values, call_plan.chunks, coverage.merged, sink, split)
        return region.answer(merged, coverage)

    def _plan(self, call: Call, as_warm: bool = False) -> tuple[Plan, Outcome | None]:
        """The plan, and the probe's outcome when the plan reuses it as chunk 0 (`as_warm`:
        priced as if the workers were up)."""
        binding, executor = call.binding, call.executor
        costs = executor.costs()
        if as_warm:
            costs = replace(costs, startup_s=0.0)
        if call.chunks is not None or costs.workers <= 1 or binding.rows < 2:
            return self._make_plan(call, costs, None), None
        # A plan made on a cold executor priced its start-up: it is kept for cold calls only,
        # and the first call on the warm executor plans again.
        warm = costs.startup_s == 0
        key = _plan_key(call, warm)
        if key in self._plans and self._holds(call, key, costs):
            self._plans.move_to_end(key)
            return self._plans[key], None
        rows = probe_rows(binding.rows, binding.row_bytes)
        job = binding.job(self.region.function, ((0, 1), (0, rows)))
        with serial.timing("probe"), blas.one_thread():  # as in a worker; no BLAS threads left
            # the one-row call twice: a first call may set things up once (numpy's FFT plans)
            call_seconds = min(_timed(job, 0)[0], _timed(job, 0)[0])
            seconds, outcome = _timed(job, 1)
        if rows == 1:
            call_seconds = 0.0  # one point only: all of it counts as per-row work
        probe = Probe(rows, seconds, _nbytes(outcome.value), min(call_seconds, seconds))
        result = self._make_plan(call, costs, probe)
        if warm or not result.fan_out:
            self._keep(key, result, costs)
        return result, outcome if result.fan_out else None

    def _keep(self, key: Hashable, made: Plan, costs: Costs) -> None:
        """Keep a plan for the calls after, with the price per chunk it was made at."""
        for forgotten in (self._whole_seconds, self._block_trials):
            forgotten.pop(key, None)  # (a plan made again starts its trials again)
        self._plans[key] = made
        self._plans.move_to_end(key)
        self._prices[key] = costs.seconds_per_chunk
        while len(self._plans) > PLANS_KEPT:
            evicted = self._plans.popitem(last=False)[0]
            for kept in (self._whole_seconds, self._block_trials, self._prices):
                kept.pop(evicted, None)

    def _holds(self, call: Call, key: Hashable, costs: Costs) -> bool:
        """Whether a kept plan holds at the executor's price per chunk now. One that fans out
        does (see PRICE_DRIFT), and one that keeps its calls here does unless the price has
        fallen PRICE_DRIFT-fold since it was made and its own timings, priced now, would fan
        out (else the price it holds at is today's). A reduction's plan always holds: its
        float answer depends on its chunks, and a kept plan promises repeated calls the same
        bits."""
        kept = self._plans[key]
        if self.region.combine is not None or kept.probe is None or kept.fan_out:
            return True
        then, now = self._prices.get(key, costs.seconds_per_chunk), costs.seconds_per_chunk
        if now >= then / PRICE_DRIFT:
            return True
        if self._make_plan(call, costs, kept.probe).fan_out:
            return False
        self._prices[key] = now
        return True

    def _learn(self, call: Call, kept: Plan, costs: Costs, seconds: float) -> None:
        """A warm auto plan that ran the call here whole is planned again from what whole
        calls took: the probe times a slice that fits in cache, and a whole call can take much
        longer (its temporaries are fresh memory the size of the data), which would otherwise
        keep every later call of these shapes here. The shorter of the last two whole calls
        counts, so one busy moment does not send the region's calls out. Elemwise regions
        only: a reduction's float answer depends on its chunks, and a kept plan promises
        repeated calls the same bits. Calls no slower than the probe foretold cost no new plan."""
        probe, key = kept.probe, _plan_key(call, warm=True)
        if self.region.combine is not None or probe is None or costs.startup_s > 0:
            return
        if self._plans.get(key) is not kept:
            return
        last = self._whole_seconds.get(key)
        self._whole_seconds[key] = seconds
        if last is None or min(last, seconds) <= probe.call_seconds + probe.row_seconds * kept.rows:
            return
        again = self._make_plan(call, costs, probe, here_seconds=min(last, seconds))
        if again.fan_out:
            self._keep(key, again, costs)

    def _try_blocks(self, call: Call, ran: Plan, seconds: float) -> None:
        """A warm auto plan's fanned-out call took `seconds`. While it is not known whether
        its chunks gain from running in blocks, the next call runs the other way (the kept
        plan alternates); once each way has run BLOCK_TRIALS times, the quicker is kept
        (blocks only when clearly quicker, by the shortest call of each way, so a first call's
        one-off costs, such as the workers importing the function's module, do not count)."""
        key = _plan_key(call, warm=True)
        if self._plans.get(key) is not ran:
            return  # not the kept plan
        if key in self._block_trials:
            trial = self._block_trials[key]
            if trial is None:
                return  # decided
        elif ran.block_rows is None:
            return  # nothing to try
        else:
            trial = self._block_trials[key] = _BlockTrial(ran.block_rows)
        trial.seconds[ran.block_rows is not None].append(seconds)
        if min(len(times) for times in trial.seconds.values()) < BLOCK_TRIALS:
            self._plans[key] = replace(ran, block_rows=None if ran.block_rows else trial.rows)
            return
        self._block_trials[key] = None
        quicker = min(trial.seconds[True]) < BLOCKS_MARGIN * min(trial.seconds[False])
        self._plans[key] = replace(ran, block_rows=trial.rows if quicker else None)

    def _make_plan(
        self, call: Call, costs: Costs, probe: Probe | None, here_seconds: float | None = None
    ) -> Plan:
        """`plan` for this call on `costs` (see there for `probe` and `here_seconds`); an
        elemwise region's chunks may run in blocks of rows."""
        binding, executor = call.binding, call.executor
        moved_rows, moved_whole = binding.moved_bytes(costs.maps_shared_memory)
        made = plan(
            executor=call.name,
            costs=costs,
            rows=binding.rows,
            row_bytes=binding.row_bytes,
            shared_bytes=binding.shared_bytes,
            chunks=call.chunks,
            probe=probe,
            sent_row_bytes=moved_rows,
            sent_shared_bytes=moved_whole,
            here_seconds=here_seconds,
            rowwise=self.region.combine is None,
        )
        return replace(made, orchestrated_by=getattr(executor, "orchestrated_by", ""))

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


def _imported_for(function: Any) -> tuple[str, ...]:
    """The module a worker imports to unpickle `function`: its own, when the function travels
    by name (it is what its module holds under its name, as for a function wrapped where it
    is used: `lampy.elemwise(module.f)`); none when it travels by value (decorated in place,
    the module holds the region instead; defined in a script or a function). Workers import
    it while they start, so a module that takes seconds to import does not stall the first
    call that fans out; a module they would not import is not imported for them."""
    module = getattr(function, "__module__", None)
    if not isinstance(module, str) or module == "__main__":
        return ()
    found: Any = sys.modules.get(module)
    for name in getattr(function, "__qualname__", "<none>").split("."):
        found = getattr(found, name, None)
    return (module,) if found is function else ()


def _plan_key(call: Call, warm: bool) -> Hashable:
    """What a region's auto plans are kept by: the executor, the arguments' shapes, and
    whether the plan priced a start-up."""
    return (call.name, id(call.executor), call.binding.shapes, warm)


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
