"""Orchestration in a lambda: one call of lampy's lambda runs a whole job (orchestrator="lambda").

The client sends one COORDINATE frame: an `Assignment` holding the job's pickled template, its
shared arrays, its split arrays (large ones as `lampy.remote` references, published as for any
job) and the executor's options. The sandbox that takes it runs the same loop the client runs
otherwise (`OpenLambdaExecutor._run_job`: lampy's ChunkScheduler, retries with backoff,
straggler backups, exactly-once merging), its calls going to the same OpenLambda worker through
`ThreadTransport` (a sandbox has no aiohttp), each frame signed with the lambda's secret.

A reduction's partials are then merged in lambdas too, `FAN_IN` at a time, level by level
(COMBINE frames): exactly the subtrees of the client's own `tree_merge`, so the answer is
bit-identical to client orchestration; the client receives only those subtrees (one value, or
one per level beside a chunk it ran itself). An elemwise job's results are stored on the
client's array server by the chunks themselves; the coordinator answers their references.

The coordinator never unpickles the user's function: the template travels on as bytes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lampy._errors import RetriesExhausted
from lampy.runtime._combine import Merged, subtrees, tree_merge
from lampy.runtime._job import Job, SplitArray
from lampy.runtime._plan import Rows
from lampy.runtime._scheduler import backoff
from lampy.runtime._worker_side import Outcome
from lampy.runtime.openlambda._protocol import Accounting, Caller, JobState, PlatformFailure
from lampy.runtime.openlambda._transport import ThreadTransport
from lampy.runtime.remote._results import Offer

FAN_IN = 8  # partials one combine call merges: a subtree three levels high


@dataclass(frozen=True)
class Assignment:
    """A whole job, as the client hands it to a coordinator lambda."""

    job: str  # the job's id
    template: bytes  # the pickled (function, args, kwargs): passed on, never unpickled here
    inline: bool  # small enough to ride with every chunk call
    whole: tuple[np.ndarray, ...]
    split: tuple[SplitArray, ...]
    chunks: tuple[Rows, ...]
    keep_going: bool
    first: int  # the call's number of chunk 0 (the client ran the earlier ones)
    combine: bytes | None  # the pickled combine rule; None: elemwise
    offer: tuple[str, int] | None  # where chunk results go on the client's array server
    url: str  # the OpenLambda worker, as sandboxes reach it
    options: dict[str, Any]  # the executor's options: name, concurrency, timeout, attempts...


@dataclass
class Report:
    """What a coordinator answers: outcomes by chunk (a reduction's merged subtrees as
    `Merged` values under each subtree's first chunk), and what it took."""

    outcomes: dict[int, Outcome]
    account: Accounting
    sandbox: str  # which sandbox orchestrated (its token)
    seconds: float
    backups: int = 0
    combines: int = 0  # combine calls made
    combine_error: Outcome | None = None  # the combine rule raised (the user's error)
    merged_levels: list[tuple[int, int]] = field(default_factory=list)  # subtrees answered


def coordinate(assignment: Assignment, secret: bytes, sandbox: str) -> Report:
    """Run `assignment` from this sandbox; its report (a user's error is in it, not raised)."""
    from lampy.runtime.openlambda._executor import OpenLambdaExecutor

    options = assignment.options
    endpoint = f"{assignment.url}/run/{options['name']}"
    transport = ThreadTransport(endpoint, options["concurrency"], secret)
    executor = OpenLambdaExecutor(
        url=assignment.url, progress="off", transport=transport, **options
    )
    started = time.monotonic()
    try:
        job = Job(
            _never_called,
            (),
            {},
            assignment.split,
            assignment.whole,
            assignment.chunks,
            keep_going=assignment.keep_going,
            first=assignment.first,
            id=assignment.job,
        )
        account = Accounting(job.id, len(job.chunks))
        offer = None
        if assignment.offer is not None:  # file names unique to this coordinator
            url, min_bytes = assignment.offer
            offer = Offer(f"{url}c{secrets.token_hex(4)}-", min_bytes, _NOWHERE)
        state = JobState(job, assignment.template, assignment.inline, account, offer)
        state.collect = False  # stored results are the client's to read
        outcomes = executor.run_state(state)
        report = Report(outcomes, account, sandbox, 0.0, executor.backups)
        if assignment.combine is not None and _mergeable(outcomes, assignment.keep_going):
            executor._loop.run(_merge(executor.caller, assignment, report))
        report.seconds = time.monotonic() - started
        return report
    finally:
        executor.close()


def _never_called(*args: Any, **kwargs: Any) -> Any:
    """A coordinator's Job holds the template as bytes only; nothing calls its function."""
    raise AssertionError("a coordinator does not run the user's function")


_NOWHERE = Path("/nonexistent")  # an offer's directory on the client: a coordinator reads none


def _mergeable(outcomes: dict[int, Outcome], keep_going: bool) -> bool:
    """Whether the client will merge these outcomes (no user error, none lost unless the job
    keeps going past lost chunks): only then are they merged here."""
    for outcome in outcomes.values():
        lost = isinstance(outcome.error, RetriesExhausted)
        if outcome.error is not None and not (lost and keep_going):
            return False
    return True


async def _merge(caller: Caller, assignment: Assignment, report: Report) -> None:
    """Replace the partials in `report` by the subtrees of the client's tree that lack the
    chunks the client ran itself, each merged in combine calls `FAN_IN` partials at a time."""
    outcomes = report.outcomes
    kept = [c for c in sorted(outcomes) if outcomes[c].error is None]
    first = assignment.first  # positions 0..first-1 are the client's
    position = {first + i: chunk for i, chunk in enumerate(kept)}
    spans = subtrees(first, first + len(kept))
    rule = assignment.combine
    assert rule is not None
    number = 0

    async def combine(partials: list[Any]) -> Any:
        nonlocal number
        number += 1
        report.combines += 1
        call = number
        attempts = assignment.options["attempts"]
        for attempt in range(1, attempts + 1):
            try:
                outcome = await caller.combine(assignment.job, call, rule, partials)
            except PlatformFailure as failure:
                report.account.note(failure)
                if attempt == attempts:
                    raise
                await asyncio.sleep(backoff(attempt, assignment.options["backoff"]))
                continue
            if outcome.error is not None:
                raise CombineRaised(outcome)
            return outcome.value
        raise AssertionError("unreachable")

    async def subtree(lo: int, hi: int) -> Any:
        level = [outcomes[position[p]].value for p in range(lo, hi)]
        while len(level) > 1:  # groups of FAN_IN from the left: tree_merge's own pairs
            groups = [level[i : i + FAN_IN] for i in range(0, len(level), FAN_IN)]
            level = list(await asyncio.gather(*(_one(g, combine) for g in groups)))
        return level[0]

    try:
        values = await asyncio.gather(*(subtree(lo, hi) for lo, hi in spans))
    except CombineRaised as raised:
        report.combine_error = raised.outcome
        return
    for chunk in kept:
        del outcomes[chunk]
    for (lo, hi), value in zip(spans, values, strict=True):
        outcomes[position[lo]] = Outcome(value=Merged(value, hi - lo))
    report.merged_levels = spans


async def _one(group: list[Any], combine: Any) -> Any:
    return group[0] if len(group) == 1 else await combine(group)


class CombineRaised(Exception):
    """The user's combine rule raised in a combine lambda: the job's error."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome.error))
        self.outcome = outcome


# -- in the sandbox that merges ---------------------------------------------------------------


_rules: dict[str, Any] = {}  # the combine rules this sandbox unpickled, by job


def combine_here(job: str, rule: bytes, partials: list[Any]) -> Outcome:
    """Merge `partials` with the job's combine rule as `tree_merge` does; the user's error,
    if the rule raises, is the outcome."""
    from lampy.runtime._codec import loads

    try:
        if job not in _rules:
            while len(_rules) >= 8:
                _rules.pop(next(iter(_rules)))
            _rules[job] = loads(rule)
        return Outcome(value=tree_merge(partials, _rules[job]))
    except BaseException as exc:
        return Outcome(error=exc, traceback=traceback.format_exc()).portable()
