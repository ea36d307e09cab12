"""Jobs that outlive their client: started without waiting, re-attached by id from any process.

A job orchestrated in lambdas keeps everything in its job store (remote/_jobs.py), so any
process holding the shared secret can watch it to the end: `attach(store, job)` reads the job's
spec for the worker's address, then watches it (summoning a coordinator if none holds it,
_watch.py) and returns the coordinator's report with each stored result read back. Stored
results and published arrays live on the store's server: for a job to survive its client,
that is a `lampy serve` of its own (the executor's `store` option), not the client's.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lampy._errors import OptionError
from lampy.runtime._secret import load_secret
from lampy.runtime._worker_side import Outcome
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._coordinator import Assignment, Report, Summons, chunks_of
from lampy.runtime.openlambda._loop import Loop
from lampy.runtime.openlambda._protocol import Caller, coordinator_of, run_url
from lampy.runtime.openlambda._watch import watch
from lampy.runtime.remote._jobs import JOB_ID, JobStore, at_rest
from lampy.runtime.remote._results import Offer, collect


def parse_id(text: str, store: str | None = None) -> tuple[str, str]:
    """(store URL, job id) from a job handle's id, "JOB@http://host:port", or a bare job id
    with `store`."""
    job, _, where = text.strip().partition("@")
    where = where or (store or "")
    if not JOB_ID.match(job) or not where:
        raise OptionError(
            f"a lampy job id is 32 hex digits, then @ and its job store's URL "
            f"(as JobHandle.id prints it), or the 32 digits with store=URL; got {text!r}"
        )
    return where.rstrip("/"), job


@dataclass
class Attached:
    """A finished job as a watcher gets it back."""

    assignment: Assignment
    report: Report
    status: dict[str, Any]
    outcomes: dict[int, Outcome]


def attach(store_url: str, job: str, timeout: float | None = None) -> Attached:
    """Watch the job to its end from this process; its report and outcomes (stored results
    read back over HTTP)."""
    store = JobStore(store_url, job)
    secret = load_secret()
    try:
        assignment: Assignment = frames.decode(store.spec(), secret, freshness=at_rest()).value
    except BaseException:
        store.close()
        raise
    options = assignment.settings
    from lampy.runtime.openlambda._transport import AiohttpTransport

    coordinator = coordinator_of(options["name"])
    endpoint = run_url(assignment.url, coordinator)
    transport = AiohttpTransport(endpoint, options["concurrency"], secret)
    caller = Caller(
        transport, secret, assignment.url, coordinator, options["timeout"], 1, options["name"]
    )
    loop = Loop()
    try:
        summons = Summons(job, store.server, "re-attach")
        watching = watch(
            caller,
            store,
            summons,
            options["attempts"],
            options["backoff"],
            assignment.lifetime,
            False,
            None if timeout is None else time.monotonic() + timeout,
        )
        report, status = loop.run(watching)
        loop.run(transport.close())
    finally:
        loop.stop()
    return Attached(assignment, report, status, read_back(report.outcomes, assignment))


def read_back(outcomes: dict[int, Outcome], assignment: Assignment) -> dict[int, Outcome]:
    """Outcomes with the results their chunks stored on the array server read over HTTP."""
    if assignment.offer is None:
        return outcomes
    offer = Offer(assignment.offer[0], 0, Path("/nonexistent"))  # not this machine's: HTTP
    read: dict[int, Outcome] = {}
    for chunk, outcome in outcomes.items():
        if outcome.error is not None:
            read[chunk] = outcome
            continue
        try:
            read[chunk] = Outcome(value=collect(outcome.value, offer))
        except Exception as exc:
            read[chunk] = Outcome(error=exc, traceback=traceback.format_exc())
    return read


def status(store_url: str, job: str) -> dict[str, Any]:
    with JobStore(store_url, job) as store:
        return store.status()


def forget(store_url: str, job: str) -> None:
    """Remove the files of a job whose result was fetched from its store, all but its status
    (best effort: a store gone meanwhile removes nothing; its ttl ends them in any case)."""
    with contextlib.suppress(Exception), JobStore(store_url, job) as store:
        store.delete()


def cancel(store_url: str, job: str) -> dict[str, Any]:
    with JobStore(store_url, job) as store:
        return store.cancel()


def describe(status: dict[str, Any], store: str) -> str:
    """A job's status as `lampy job ID` prints it: progress first, then who orchestrates,
    the hand-offs, and what the chunk calls went through."""
    total, done = status["chunks"] or 0, status["done"]
    share = f" ({done / total:.0%})" if total else ""
    lines = [
        f"job {status['job']}@{store}: {status['state']}, {done} of {total} chunks done{share}"
    ]
    lease, now = status["lease"], time.time()
    if lease is not None and status["state"] == "running":
        if lease["until"] > now:
            held = now - lease["since"]
            left, lasts = lease["lifetime"], lease["until"] - now
            lines.append(
                f"orchestrated by lambda {lease['holder']} for {held:.1f} s (lifetime left "
                f"{left:.1f} s when it last renewed; lease {lasts:.1f} s)"
            )
        else:
            lines.append(
                f"no lambda orchestrates it now (the last, {lease['holder']}, let its lease "
                f"lapse {now - lease['until']:.1f} s ago): re-attach with lampy.job(ID).result()"
            )
    elif lease is not None:
        lines.append(f"last orchestrated by lambda {lease['holder']}")
    events = status["events"]
    handoffs = [e for e in events if e["from"] is not None]
    lines.append(f"orchestrators: {len(events)}, hand-offs: {len(handoffs)}")
    for event in events:
        when = time.strftime("%H:%M:%S", time.localtime(event["at"]))
        lines.append(f"  {when} {event['why']}: {event['to']}")
    counters = status["counters"]
    attempts = sum(
        int(n) * len(chunks_of(runs))
        for counts in counters.values()
        for n, runs in counts.get("attempts", {}).items()
    )
    retried: dict[str, int] = {}
    for counts in counters.values():
        for kind, n in {**counts.get("failures", {}), **counts.get("dropped", {})}.items():
            retried[kind] = retried.get(kind, 0) + n
    backups = sum(c.get("backups", 0) for c in counters.values())
    combines = sum(c.get("combines", 0) for c in counters.values())
    listed = ", ".join(f"{k} {v}" for k, v in sorted(retried.items())) or "none"
    lines.append(
        f"chunk calls (as last reported): {attempts} attempts; failed or "
        f"dropped: {listed}; straggler backups {backups}; combine calls {combines}"
    )
    return "\n".join(lines)
