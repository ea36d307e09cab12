"""Watching a job that lambdas orchestrate: wait for its result, and summon a coordinator
whenever none holds the job's lease (the first, or after one was killed without handing off).

The client that started the job watches it; so does `lampy.job(id)` from any other process,
which is how a job survives its client. Watching costs a long-polled request to the job store
now and then, never a request per chunk.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from lampy._errors import ExecutionError, RemoteArrayNotFound
from lampy.runtime._scheduler import backoff
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._coordinator import LEASE_S, TAKEOVER_WAIT_S, Report, Summons
from lampy.runtime.openlambda._protocol import Caller, PlatformFailure
from lampy.runtime.remote._jobs import JobStore, at_rest


class JobCancelled(ExecutionError):
    """The job was cancelled (`lampy.job(id).cancel()` or `lampy job ID --cancel`)."""


#: How often a client looks at the lease while its summoned coordinator's call is open: a lapse
#: shows only LEASE_S + TAKEOVER_WAIT_S after the last renewal anyway.
WATCH_S = LEASE_S + TAKEOVER_WAIT_S
#: ... from this share of the coordinator's lifetime on: a frozen coordinator's call ends at the
#: platform's runtime limit anyway, so looking earlier would only save time in that rare case,
#: and it would cost every job that outlasts the first look a call: a cold first 1,000-chunk
#: job on OpenLambda (over 8 s under load) made 2 client calls where 1 is the design.
FIRST_WATCH_SHARE = 0.5


#: How long a watcher's result request is held when nothing happens (the store holds one 30 s
#: at most): after a hand-off the client asks once a while, not once per lease.
RESULT_WAIT_S = 25.0
#: The status of a job whose spec was not written yet: no lease, summon one with the job.
NOT_WRITTEN: dict[str, Any] = {
    "state": "running",
    "lease": None,
    "created": 0,
    "done": 0,
    "chunks": None,
}


class StoreRefused(ExecutionError):
    """A coordinator lambda could not use the job store (its answer, or why unreachable)."""


async def watch(
    caller: Caller,
    store: JobStore,
    summons: Summons,
    attempts: int,
    first_backoff: float,
    lifetime: float,
    start: bool,
    deadline: float | None = None,
) -> tuple[Report, dict[str, Any]]:
    """The job's report and its final status; summons coordinators as needed (the first one
    when `start`). Gives up after `attempts` summonses in a row that brought no progress, or
    at `deadline` (time.monotonic()) with a TimeoutError; the job goes on."""
    loop = asyncio.get_running_loop()
    call: asyncio.Future[Any] | None = None
    summoned, progress, failure, what = 0, -1, "", ""

    def summon(why: str) -> asyncio.Future[Any]:
        nonlocal summoned
        summoned += 1
        asked = replace(summons, why=why)  # with the job, when the client sends it so
        return asyncio.ensure_future(caller.coordinate(asked, lifetime + 10.0))

    if start:
        call = summon("start")
    try:
        while True:
            if call is not None:  # the summoned coordinator answers first: wait for it
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                given_up = await _given_up(call, store, left, lifetime)  # ... or not
                if given_up is not None:
                    call.cancel()
                    failure, what, detail = given_up, "lapsed", None
                elif not call.done():
                    raise _still_running(summons)
                else:
                    try:
                        what, detail = call.result()
                    except PlatformFailure as lost:  # its sandbox died, or ran past its limit
                        failure, what, detail = str(lost), "lost", None
                call = None
                if isinstance(detail, Report) and detail.status is not None:
                    return detail, detail.status  # it finished the job: no need to ask
                if what == "cancelled":
                    raise JobCancelled(f"job {summons.job} was cancelled")
                if what == "store refused":
                    raise StoreRefused(
                        f"job {summons.job}: its coordinator lambda could not keep the job's "
                        f"state on the job store {summons.store}: {detail}. The store must "
                        "be a `lampy serve` that the platform's sandboxes reach, with the "
                        "same LAMPY_SECRET as the deployed lambda (`lampy deploy` sends this "
                        "process's)."
                    )
            # a long poll: it answers as soon as the result is in, or the job has had no live
            # lease for LEASE_S (a coordinator to summon), else after RESULT_WAIT_S
            wait = 0.0 if what in ("done", "finished already", "lapsed") else RESULT_WAIT_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            data, status = await loop.run_in_executor(None, _result, store, wait)
            if data is not None:
                report: Report = frames.decode(data, store.secret, freshness=at_rest()).value
                return report, await loop.run_in_executor(None, store.status)
            if deadline is not None and time.monotonic() >= deadline:
                raise _still_running(summons)
            if status["state"] == "cancelled":
                raise JobCancelled(f"job {summons.job} was cancelled")
            lease, now = status["lease"], time.time()
            starting = lease is None and now - (status["created"] or 0) < LEASE_S  # summoned
            if starting or (lease is not None and lease["until"] > now):
                continue
            if status["done"] > progress:
                progress, summoned = status["done"], 0
            if summoned >= attempts:
                raise ExecutionError(
                    f"job {summons.job}: {summoned} coordinators in a row made no progress "
                    f"({status['done']} of {status['chunks']} chunks done). The last failure: "
                    f"{failure or 'none reported'}. Check the worker, then re-attach with "
                    f"lampy.job({summons.job!r}, store={summons.store!r}).result()"
                )
            if summoned:
                await asyncio.sleep(backoff(summoned, first_backoff))
            call = summon("revive" if start or summoned else "re-attach")
    finally:
        if call is not None and not call.done():
            call.cancel()
        store.close()


async def _given_up(
    call: asyncio.Future[Any], store: JobStore, left: float | None, lifetime: float
) -> str | None:
    """Wait for a summoned coordinator's answer (`left` seconds at most); None when it came (or
    `left` ran out), else why the call is given up on while still open:
    - the lease was renewed after the summons and has lapsed since (by more than a hand-off's
      wait): a coordinator that hangs (a frozen sandbox) keeps its call open until the
      platform's runtime limit (`lifetime`), though it stopped orchestrating;
    - the job's spec, which the first coordinator writes as it starts, is still not in the
      store: the platform took the call and never ran it (OpenLambda drops a call queued
      behind a failed round trip, docs/openlambda.md), and would leave it open until the
      call's timeout.
    Looked at from half that limit on, every WATCH_S, so a job shorter than that costs its
    client no call to the store."""
    loop = asyncio.get_running_loop()
    summoned = time.time()
    end = None if left is None else loop.time() + left
    first = max(WATCH_S, FIRST_WATCH_SHARE * lifetime)
    while True:
        wait, first = first, WATCH_S
        if end is not None:
            wait = min(wait, max(0.0, end - loop.time()))
        await asyncio.wait({call}, timeout=wait)
        if call.done() or (end is not None and loop.time() >= end):
            return None
        status = await loop.run_in_executor(None, _status, store)
        if status["chunks"] is None:
            return "its coordinator never started (the platform took the call, never ran it)"
        lease = status["lease"]
        if lease is None or status["state"] != "running":
            continue
        renewed = lease["until"] - LEASE_S  # a coordinator's last renewal
        if renewed > summoned and lease["until"] + TAKEOVER_WAIT_S < time.time():
            # (a coordinator handing off stops renewing, and answers within that)
            return "its coordinator stopped renewing its lease, its call still open"


def _result(store: JobStore, wait: float) -> tuple[bytes | None, dict[str, Any]]:
    try:
        data, status = store.result(wait, orphaned=LEASE_S)
    except RemoteArrayNotFound:  # its spec comes with the first coordinator, lost on the way
        time.sleep(min(wait, LEASE_S))
        return None, dict(NOT_WRITTEN)
    return data, status or {}


def _status(store: JobStore) -> dict[str, Any]:
    try:
        return store.status()
    except RemoteArrayNotFound:
        return dict(NOT_WRITTEN)


def _still_running(summons: Summons) -> TimeoutError:
    return TimeoutError(
        f"job {summons.job} is still running; re-attach later with "
        f"lampy.job('{summons.job}@{summons.store}').result()"
    )
