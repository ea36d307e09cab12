"""Detached calls: `lampy.submit(f, ...)` starts a region's call in lambdas and returns a
`JobHandle` at once; `lampy.job(id)` re-attaches to it from any process.

The call is bound and planned here as an ordinary call is (`RegionRunner`), then handed to an
executor that can run it without this process (the openlambda executor with
orchestrator="lambda"). Everything needed to finish it (the region with its combine and
finalize rules, the plan, the outcome of a chunk this process ran to plan it) travels with the
job into its store, signed, so whoever re-attaches merges the answer exactly as this process
would have.
"""

from __future__ import annotations

from typing import Any

from lampy._errors import UsageError
from lampy.regions._function import ParallelFunction
from lampy.regions._runner import RegionRunner
from lampy.runtime._codec import loads
from lampy.runtime._worker_side import Outcome

FINISHED = "done"


class JobHandle:
    """A call running in lambdas; its `id` outlives this process (`lampy.job(id)`)."""

    def __init__(self, id: str, store: str | None = None) -> None:
        from lampy.runtime.openlambda._detached import parse_id

        self.store, self.job = parse_id(id, store)
        self._fetched: tuple[Any, BaseException | None] | None = None  # (answer, error)

    @property
    def id(self) -> str:
        """ "JOB@STORE": the job and the array server that keeps its state."""
        return f"{self.job}@{self.store}"

    def __repr__(self) -> str:
        return f"lampy.job({self.id!r})"

    def status(self) -> dict[str, Any]:
        """The job's progress (as `lampy job ID` shows it): state, chunks done, the lease
        (which lambda orchestrates, its remaining lifetime), hand-offs, counters."""
        from lampy.runtime.openlambda._detached import status

        return status(self.store, self.job)

    def done(self) -> bool:
        return bool(self.status()["state"] == FINISHED)

    def cancel(self) -> dict[str, Any]:
        """Stop the job: its coordinator stops at its next lease renewal, none is summoned
        again, and `result()` raises JobCancelled. Returns the job's status."""
        from lampy.runtime.openlambda._detached import cancel

        return cancel(self.store, self.job)

    def result(self, timeout: float | None = None) -> Any:
        """What the call returns, exactly as if it had been called directly; waits for it
        (summoning a coordinator whenever none holds the job), at most `timeout` seconds.

        Once fetched, the job and its files are removed from its store: this handle keeps
        the answer (or the error); another handle of the job finds it gone."""
        from lampy.runtime.openlambda._detached import attach, forget

        if self._fetched is None:
            attached = attach(self.store, self.job, timeout)
            if attached.assignment.caller_side is None:
                raise UsageError(
                    f"job {self.job} was started by a plain call, not lampy.submit: its caller "
                    "merged (or merges) the answer; lampy job ID shows its progress"
                )
            try:
                self._fetched = (self._answer(attached), None)
            except Exception as raised:
                self._fetched = (None, raised)
            forget(self.store, self.job)
        answer, failure = self._fetched
        if failure is not None:
            raise failure
        return answer

    def _answer(self, attached: Any) -> Any:
        """The call's answer from the finished job, merged as the caller would have."""
        report, assignment = attached.report, attached.assignment
        if report.combine_error is not None:
            error = report.combine_error.error
            assert error is not None
            raise error
        region, call_plan, before, split = loads(assignment.caller_side)
        offset = len(before)
        done: dict[int, Outcome] = dict(before)
        done |= {chunk + offset: outcome for chunk, outcome in attached.outcomes.items()}
        return RegionRunner(region).answer(done, call_plan, remote=True, split=split)


def submit(function: Any, *args: Any, **kwargs: Any) -> JobHandle:
    """Start `function(*args, **kwargs)` (a lampy region) in lambdas; a handle at once.

    Needs the openlambda executor with orchestrator="lambda" (`lampy.using(...)`); with
    store=URL of a `lampy serve` of its own, the job survives this process entirely.
    """
    if not isinstance(function, ParallelFunction):
        raise UsageError(
            f"lampy.submit takes a function decorated with @lampy.elemwise, @lampy.reduce or "
            f"@lampy.sum; got {function!r}"
        )
    runner = function.runner
    call = runner.prepare(args, kwargs)
    start = getattr(call.executor, "submit", None)
    if start is None or getattr(call.executor, "orchestrator", "") != "lambda":
        raise UsageError(
            f"lampy.submit needs an executor that runs a job without its caller: "
            f"lampy.using(executor='openlambda', orchestrator='lambda'); the call would run "
            f"on {call.name!r}"
        )
    planned = runner.plan(call)
    split = bool(call.binding.split)
    return JobHandle(start(planned.job, (function.region, planned.plan, planned.done, split)))


def job(id: str, store: str | None = None) -> JobHandle:
    """The handle of a job `lampy.submit` started, from its id ("JOB@STORE", or the job's
    32 hex digits with `store`), in this process or any other."""
    return JobHandle(id, store)
