"""Orchestration in a lambda: calls of lampy's lambda run a whole job (orchestrator="lambda").

The job is an `Assignment`: the pickled template, the shared arrays, the split arrays (large
ones as `lampy.remote` references, published as for any job) and the executor's options. The
client sends it in one COORDINATE frame, a `Summons`, to the coordinator lambda (the same code
deployed under a name of its own, `coordinator_of`), which keeps it in a job store (an array
server, `remote/_jobs.py`) as a signed spec; a detached job's client writes the spec there
first, and summons with the job's id alone. The sandbox that takes it holds the job's lease and
runs the loop the client runs otherwise (`OpenLambdaExecutor._run_job`: lampy's
ChunkScheduler, retries with backoff, straggler backups, exactly-once), its calls going to the
chunks' lambda on the same OpenLambda worker through `StreamTransport` (asyncio streams: a
sandbox has no aiohttp, and its calls in flight take no thread, since OpenLambda counts a
sandbox's threads against its process limit), every frame signed with the lambda's secret.
The coordinator never unpickles the user's function. While it orchestrates, the thread that
runs it is named after the job (`thread_name`), so an operator (or a test) on the worker's
host can single its sandbox out.

Durable state: each accepted outcome is recorded in the store as it comes, write-once, so no
chunk is merged twice whoever ran it; a coordinator that takes over loads the records and runs
only the rest. The hand-off rule: a coordinator orchestrates while its own remaining lifetime
(the platform's runtime limit counts from its call) exceeds `handoff_margin`; then, since a
fresh call has the whole limit ahead of it, it stops launching, summons a successor naming its
own lease generation (so the successor may take the lease at once), waits until the successor
holds it, and answers. A coordinator killed outright simply stops renewing its lease (`LEASE_S`);
whoever watches the job (the client, or `lampy.job(id)` from any process) summons a new one
once it has expired.

A reduction's partials are merged in lambdas, `fan_in` at a time, level by level (COMBINE
frames to the chunks' lambda, or, for groups under HERE_BYTES, in the coordinator's own
lambda): exactly the subtrees of the client's own `tree_merge`, so the answer is bit-identical
to client orchestration, and the client receives only those subtrees (one value, or one per
level beside a chunk it ran itself). An elemwise job's results are stored on the client's array
server by the chunks themselves; the report holds their references.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import itertools
import os
import secrets
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lampy._errors import RemoteArrayError, RetriesExhausted
from lampy.runtime._codec import Positional
from lampy.runtime._combine import Merged, subtrees, tree_merge
from lampy.runtime._job import Job, SplitArray
from lampy.runtime._plan import Rows
from lampy.runtime._scheduler import backoff
from lampy.runtime._worker_side import Outcome
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._protocol import (
    Accounting,
    Caller,
    JobState,
    PlatformFailure,
    coordinator_of,
    run_url,
)
from lampy.runtime.openlambda._transport import StreamTransport, ThreadTransport
from lampy.runtime.remote._jobs import JobStore, at_rest
from lampy.runtime.remote._results import Offer

if TYPE_CHECKING:  # imported where used: the executor imports this module
    from lampy.runtime.openlambda._executor import OpenLambdaExecutor

MAX_FAN_IN = 256  # partials one combine call merges at most: a subtree 8 levels high ...
COMBINE_BYTES = 4 << 20  # ... and at most about this many bytes of them (see `fan_in`)
#: A group of partials this small merges in the coordinator itself, with the same rule and the
#: same tree (as its last values are merged): the call would cost more than the merge, and on
#: OpenLambda each combine call beside the chunk calls is one more outstanding call, for which
#: the scaler starts a sandbox and then stops one, so a chunk call waits for a cold start.
HERE_BYTES = 1 << 20
LEASE_S = 3.0  # a coordinator's lease lasts this long unless renewed ...
RENEW_S = 0.5  # ... which it is this often
TAKEOVER_WAIT_S = 5.0  # a coordinator handing off waits this long for its successor's lease
RECORD_BATCH_S = 0.02  # outcomes accepted within this long go to the store in one request
REPORT_EVERY = 4  # renewals between two posts of a coordinator's counts (`lampy job ID`)
#: The threads a stock OpenLambda lets a sandbox run (`limits.procs`, which counts threads): a
#: coordinator stays within it whatever its concurrency (its calls take no thread; it runs
#: the handler's, the event loop's, the lease's, the recorder's, and one for a hand-off).
PROCS_LIMIT = 10


@dataclass(frozen=True)
class Assignment(Positional):
    """A whole job, as the client sends it to its first coordinator (a detached job's client
    writes it to the job store itself)."""

    job: str  # the job's id
    template: bytes  # the pickled (function, args, kwargs): passed on, never unpickled here
    inline: bool  # small enough to ride with every chunk call
    whole: tuple[np.ndarray, ...]
    split: tuple[SplitArray, ...]
    chunks: Runs  # the chunks' rows, as runs of sizes (a 1,000-chunk job's are two runs)
    keep_going: bool
    first: int  # the call's number of chunk 0 (the client ran the earlier ones)
    combine: bytes | None  # the pickled combine rule; None: elemwise
    offer: tuple[str, int] | None  # where chunk results go on the client's array server
    url: str  # the OpenLambda worker, as sandboxes reach it
    #: the executor's options (name, concurrency, timeout, attempts...) that differ from
    #: their defaults; `settings` has them all
    options: dict[str, Any]
    lifetime: float  # the platform's runtime limit: how long one call may orchestrate
    #: What the caller's side needs to finish a detached job (lampy.submit): the pickled
    #: region, plan and outcomes of chunks run in the caller; never unpickled in a lambda.
    caller_side: bytes | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The executor's options for this job, each as given or at its default."""
        from lampy.runtime.openlambda._executor import SPEC_OPTIONS

        return {**SPEC_OPTIONS, **self.options}


@dataclass(frozen=True)
class Runs(Positional):
    """Contiguous chunks as runs of equal sizes: (size, count) pairs from `start`; others
    (never made by the planner today) kept as they are in `rows`."""

    start: int
    sizes: tuple[tuple[int, int], ...] = ()
    rows: tuple[Rows, ...] | None = None

    @classmethod
    def of(cls, chunks: tuple[Rows, ...]) -> Runs:
        """
        >>> Runs.of(((0, 4), (4, 8), (8, 11))).sizes, Runs.of(((0, 4), (4, 8))).chunks()
        (((4, 2), (3, 1)), ((0, 4), (4, 8)))
        """
        if not chunks or any(a[1] != b[0] for a, b in itertools.pairwise(chunks)):
            return cls(0, (), chunks)
        sizes: list[tuple[int, int]] = []
        for start, stop in chunks:
            size = stop - start
            if sizes and sizes[-1][0] == size:
                sizes[-1] = (size, sizes[-1][1] + 1)
            else:
                sizes.append((size, 1))
        return cls(chunks[0][0], tuple(sizes))

    def chunks(self) -> tuple[Rows, ...]:
        if self.rows is not None:
            return self.rows
        found, at = [], self.start
        for size, count in self.sizes:
            for _ in range(count):
                found.append((at, at + size))
                at += size
        return tuple(found)


@dataclass(frozen=True)
class Summons(Positional):
    """What a COORDINATE frame carries: which job, where its state is, and why."""

    job: str
    store: str  # the array server holding the job's state
    why: str  # "start", "hand-off" (a predecessor chose this call), "revive" (a watcher did)
    expect: int | None = None  # the lease generation a predecessor hands over
    #: The job, for the coordinator to write to the store when the client did not (one client
    #: call per job). Not a signed frame of its own: the COORDINATE frame that carries it is
    #: signed, and the coordinator signs the spec it keeps in the store.
    assignment: Assignment | None = None


@dataclass
class Report(Positional):
    """A finished job: outcomes by chunk (a reduction's merged subtrees as `Merged` values
    under each subtree's first chunk), kept in the store as the job's result."""

    outcomes: dict[int, Outcome]
    combines: int = 0  # combine calls made
    combine_error: Outcome | None = None  # the combine rule raised (the user's error)
    merged: list[tuple[int, int]] = field(default_factory=list)  # subtrees answered
    holder: str = ""  # the coordinator that finished it
    #: the store's status once the report was kept (in the answer to the summoning call only)
    status: dict[str, Any] | None = None


def handoff_margin(lifetime: float) -> float:
    """How much of its lifetime a coordinator keeps for handing off: stopping, summoning a
    successor, and seeing it hold the lease (a cold sandbox on a loaded machine: ~1 s)."""
    return min(lifetime / 2, max(1.0, 0.1 * lifetime))


def next_orchestrator(own_left: float, fresh: float, margin: float) -> str:
    """Who orchestrates next, by remaining lifetime: this call while it has more than
    `margin` left; else a fresh call (the platform's whole runtime limit ahead of it), when
    that is longer; else this call still (no one has more time)."""
    return "fresh call" if own_left <= margin and fresh > own_left else "this call"


def coordinate(summons: Summons, secret: bytes, sandbox: str) -> tuple[str, Any]:
    """Orchestrate the job `summons` names from this sandbox until it is done or handed off.

    Answers (what happened, detail): "done" (the report, with the store's status), "handed
    off" (to whom), "busy" (another live coordinator holds the lease), "cancelled",
    "finished already", or "store refused" (the job store's answer, or why it cannot be
    reached: for the caller to name, not lampy's handler failing).
    """
    with named_thread(thread_name(summons.job)):
        try:
            return _coordinate(summons, secret, sandbox)
        except RemoteArrayError as refused:  # StoreError, or the job is not on the store
            return "store refused", str(refused)


def thread_name(job: str) -> str:
    """The name a coordinator gives its thread while it orchestrates `job` (15 characters,
    the kernel's limit): seen from the host in /proc/PID/task/TID/comm, where a sandbox's own
    process id (1 on OpenLambda) means nothing. A hash: the job's id is not shown."""
    return "lampy-" + hashlib.sha256(job.encode()).hexdigest()[:9]


_PR_SET_NAME, _PR_GET_NAME = 15, 16


@contextlib.contextmanager
def named_thread(name: str) -> Iterator[None]:
    """This OS thread named `name` (prctl) while the block runs, then its name again. Where
    prctl is not to be had, the thread keeps its name: only finding it from outside suffers."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        before = ctypes.create_string_buffer(16)
        named = libc.prctl(_PR_GET_NAME, before, 0, 0, 0) == 0
        named = named and libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0
    except (OSError, AttributeError):
        named = False
    try:
        yield
    finally:
        if named:
            libc.prctl(_PR_SET_NAME, before.value, 0, 0, 0)


def _threads() -> int:
    """The threads this process runs now (what OpenLambda's process limit counts)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return threading.active_count()


def _coordinate(summons: Summons, secret: bytes, sandbox: str) -> tuple[str, Any]:
    started, cpu = time.monotonic(), time.process_time()
    store = JobStore(summons.store, summons.job)
    holder = f"{sandbox}/{secrets.token_hex(3)} pid {os.getpid()}"  # pid 1 on OpenLambda
    try:
        assignment = summons.assignment
        if assignment is not None:  # the job as the client sent it: kept first
            spec = frames.encode(frames.COORDINATE, assignment, secret).join()
            store.create(spec, len(assignment.chunks.chunks()))
        else:
            assignment = frames.decode(store.spec(), secret, freshness=at_rest()).value
        lease = _Lease(store, holder, assignment.lifetime)
        taken = lease.take(summons.expect, summons.why)
    except BaseException:
        store.close()
        raise
    if taken is not None:
        store.close()
        return taken
    from lampy.runtime.openlambda._executor import OpenLambdaExecutor

    options = assignment.settings
    endpoint = run_url(assignment.url, options["name"])  # the chunks' lambda
    successors = run_url(assignment.url, coordinator_of(options["name"]))
    transport = StreamTransport(endpoint, options["concurrency"], secret)
    executor = OpenLambdaExecutor(
        url=assignment.url, progress="off", transport=transport, **options
    )
    recorder = _Recorder(store, secret)
    merger: _Merger | None = None
    deadline = started + assignment.lifetime - handoff_margin(assignment.lifetime)
    try:
        state = _state(assignment, store, secret, recorder)
        known = sorted(state.done)
        merger = _Merger(executor.caller, assignment, Report({}, holder=holder), state.account)
        streaming = assignment.combine is not None
        if streaming:  # partials merged as they come, those recorded before first
            executor._loop.run(_stream(merger, state.done))
            state.record = _both(recorder.record, merger.stream)
        state.stop = lambda: lease.lost is not None or time.monotonic() >= deadline

        def counted() -> dict[str, Any]:
            return _counts(state.account, executor, known, summons.why, lease)

        lease.counts = counted
        lease.mark("setup", started)
        outcomes = executor.run_state(state)
        lease.mark("chunks")
        recorder.flush(state.account, outcomes)
        lease.mark("records")
        if lease.lost is not None:
            store.counters(holder, counted())
            return lease.lost, ""
        if not state.complete:
            left = assignment.lifetime - (time.monotonic() - started)
            successor = _hand_off(summons, lease, successors, secret, left)
            store.counters(holder, counted())
            return "handed off", successor
        counts = counted()
        report = merger.report
        report.outcomes = outcomes
        if merger.assignment.combine is not None and _mergeable(outcomes, assignment.keep_going):
            streamed = streaming and not recorder.refused  # else merge what the store holds
            executor._loop.run(merger.finish(outcomes, streamed))
        lease.mark("merge")
        counts["combines"] = report.combines
        counts["seconds"] = lease.phases
        counts["cpu_seconds"] = round(time.process_time() - cpu, 4)  # this sandbox's, all threads
        store.counters(holder, counts)
        store.put_result(frames.encode(frames.RESULT, report, secret).join())
        report.status = one_copy(store.status(), {summons.job: summons.job, holder: holder})
        return "done", report
    finally:
        if merger is not None:
            executor._loop.run(_abandon(merger))
        lease.release()
        recorder.close()
        executor.close()
        store.close()


def _state(assignment: Assignment, store: JobStore, secret: bytes, recorder: _Recorder) -> JobState:
    """The job as this coordinator runs it, with the outcomes recorded before it took over."""
    job = Job(
        _never_called,
        (),
        {},
        assignment.split,
        assignment.whole,
        assignment.chunks.chunks(),
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
    for chunk, frame in store.records():
        state.done[chunk] = frames.decode(frame, secret, freshness=at_rest()).value
    recorder.recorded.update(state.done)
    state.record = recorder.record
    return state


class _Lease:
    """This coordinator's hold on the job, renewed in a thread; `lost` says why it ended."""

    def __init__(self, store: JobStore, holder: str, lifetime: float) -> None:
        self.store, self.holder, self.lifetime = store, holder, lifetime
        self.started, self.began = time.monotonic(), time.time()  # the call's start
        self.generation: int | None = None
        self.lost: str | None = None
        self.counts: Callable[[], dict[str, Any]] | None = None  # progress, posted now and then
        self.peak = _threads()  # this process's threads, sampled at every renewal
        self.phases: dict[str, float] = {}  # where this coordinator's time went, in seconds
        self._last = self.started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, expect: int | None, why: str) -> tuple[str, str] | None:
        """Take the lease (None), or why not: the answer to give."""
        status, lease = self.store.lease(self.holder, LEASE_S, expect, why, self.left())
        if status == 410:
            return "cancelled", ""
        if lease.get("done"):
            return "finished already", ""
        if status == 409:
            return "busy", str(lease.get("holder", ""))
        self.generation = int(lease["generation"])
        self._thread = threading.Thread(target=self._renew, name="lampy-lease", daemon=True)
        self._thread.start()
        return None

    def left(self) -> float:
        return max(0.0, self.lifetime - (time.monotonic() - self.started))

    def mark(self, phase: str, since: float | None = None) -> None:
        """`phase` took the time since the last mark (or `since`)."""
        now = time.monotonic()
        self.phases[phase] = round(now - (self._last if since is None else since), 4)
        self._last = now

    def threads(self) -> int:
        self.peak = max(self.peak, _threads())
        return self.peak

    def _renew(self) -> None:
        beats = 0
        while not self._stop.wait(RENEW_S):
            beats += 1
            self.threads()
            if self.counts is not None and beats % REPORT_EVERY == 0:
                with contextlib.suppress(Exception):  # counts mid-change: the next one will do
                    self.store.counters(self.holder, self.counts())
            try:
                status, lease = self.store.lease(
                    self.holder, LEASE_S, self.generation, "renew", self.left()
                )
            except Exception:  # the store unreachable for a moment: the lease may still hold
                continue
            if status == 410:
                self.lost = "cancelled"
            elif status != 200:
                self.lost = "busy" if not lease.get("done") else "finished already"
            if self.lost is not None:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Recorder:
    """Writes accepted outcomes to the store from one thread, a batch per request, so the
    loop never waits on it and a 1,000-chunk job costs tens of requests, not a thousand."""

    def __init__(self, store: JobStore, secret: bytes) -> None:
        self.store, self.secret = store, secret
        self.recorded: dict[int, Outcome] = {}
        self.refused: set[int] = set()  # recorded first by another coordinator
        self._queue: list[tuple[int, bytes]] = []
        self._queued: set[int] = set()
        self._lock = threading.Condition()
        self._closing = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="lampy-record", daemon=True)
        self._thread.start()

    def record(self, chunk: int, outcome: Outcome) -> None:
        if chunk in self.recorded or chunk in self._queued:
            return
        frame = frames.encode(frames.RESULT, outcome, self.secret).join()
        with self._lock:
            self._queue.append((chunk, frame))
            self._queued.add(chunk)
            self._lock.notify()

    def _write(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                batch, self._queue = self._queue, []
                if not batch and self._closing:
                    return
                closing = self._closing
            if not closing:  # let a few more answers join the next batch (none will at the end)
                time.sleep(RECORD_BATCH_S)
            try:
                self.refused.update(self.store.record(batch))
            except BaseException as exc:  # the store is down: the job cannot be kept
                self._failure = exc
                return

    def flush(self, account: Accounting, outcomes: dict[int, Outcome]) -> None:
        """Record what is left (chunks lost after every attempt), wait for every write, and
        take the recorded outcome wherever another coordinator recorded a chunk first."""
        for chunk, outcome in outcomes.items():
            self.record(chunk, outcome)
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        for chunk in self._queued:
            if chunk in self.refused:  # another coordinator's answer is the one merged
                if account.accepted[chunk] > 0:
                    account.accepted[chunk] -= 1
                account.dropped["recorded"] += 1
            else:
                self.recorded[chunk] = outcomes[chunk]
        if self.refused:
            for chunk, frame in self.store.records():
                if chunk in outcomes:
                    outcomes[chunk] = frames.decode(frame, self.secret, freshness=at_rest()).value

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()


def _hand_off(summons: Summons, lease: _Lease, endpoint: str, secret: bytes, left: float) -> str:
    """Summon a fresh call to take over and wait until it holds the lease; its holder name.

    The call is made from a thread that outlives this answer: the successor answers it when
    done, and nobody needs that answer (the job's state is in the store).
    """
    choice = next_orchestrator(left, lease.lifetime, handoff_margin(lease.lifetime))
    successor = Summons(summons.job, summons.store, f"hand-off ({choice})", lease.generation)
    frame = frames.encode(frames.COORDINATE, successor, secret)
    transport = ThreadTransport(endpoint, 1, secret)
    call = threading.Thread(
        target=_call_quietly, args=(transport, frame, lease.lifetime * 2), daemon=True
    )
    call.start()
    lease.release()
    deadline = time.monotonic() + min(TAKEOVER_WAIT_S, max(0.5, left - 0.2))
    while time.monotonic() < deadline:
        holder = (lease.store.status().get("lease") or {}).get("holder", "")
        if holder and holder != lease.holder:
            return str(holder)
        time.sleep(0.05)
    return "(a successor was summoned; none holds the lease yet)"


def _call_quietly(transport: ThreadTransport, frame: frames.Outgoing, timeout: float) -> None:
    with contextlib.suppress(Exception):  # its answer is not needed: its work is in the store
        transport._post(frame, timeout)


def _counts(
    account: Accounting, executor: OpenLambdaExecutor, known: list[int], why: str, lease: _Lease
) -> dict[str, Any]:
    """What one coordinator did, as the store keeps it (`lampy job ID` shows the sums);
    chunk numbers as ranges, and what did not happen left out (readers take it as none), so
    a 1,000-chunk job's counts stay a few hundred bytes (the client gets them in its answer)."""
    by_count: dict[int, list[int]] = {}
    for chunk, n in account.attempts.items():
        by_count.setdefault(n, []).append(chunk)
    rare = {
        "took_over": ranges(known),  # chunks recorded before this coordinator started
        "lost": ranges(account.lost),
        "failures": dict(account.failures),
        "dropped": dict(account.dropped),
        "cancelled": account.cancelled,
        "backups": executor.backups,
    }
    return {
        "why": why,
        "accepted": ranges(c for c, n in account.accepted.items() if n > 0),
        "attempts": {str(n): ranges(chunks) for n, chunks in by_count.items()},
        **{kind: what for kind, what in rare.items() if what},
        "slots": executor.slots,  # its calls in flight at the end (grown from START_SLOTS)
        "combines": 0,
        "threads": lease.threads(),  # the most this process ran at once, as far as seen
        "seconds": lease.phases,
        "began": lease.began,  # when this coordinator's call started (its clock)
        "at": time.time(),
    }


def one_copy(value: Any, known: dict[str, str]) -> Any:
    """`value` (a store's JSON answer) with equal strings made one object (the one in `known`,
    else the first seen), so a pickle writes each once and then refers back to it (pickle's
    memo goes by identity): a status names its coordinator four times, and the answer's job.

    >>> a, b = one_copy([str(10**9), {str(10**9): 1}], {})
    >>> a is next(iter(b))
    True
    """
    if isinstance(value, str):
        return known.setdefault(value, value)
    if isinstance(value, dict):
        return {one_copy(k, known): one_copy(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [one_copy(v, known) for v in value]
    return value


def ranges(chunks: Iterable[int]) -> list[list[int]]:
    """Chunk numbers as [first, last] runs.

    >>> ranges([5, 0, 1, 2, 7, 6])
    [[0, 2], [5, 7]]
    """
    runs: list[list[int]] = []
    for chunk in sorted(chunks):
        if runs and runs[-1][1] == chunk - 1:
            runs[-1][1] = chunk
        else:
            runs.append([chunk, chunk])
    return runs


def chunks_of(runs: list[list[int]]) -> list[int]:
    """The chunk numbers of `ranges` runs."""
    return [c for first, last in runs for c in range(first, last + 1)]


def fold(account: Accounting, counters: dict[str, dict[str, Any]]) -> Counter[str]:
    """Every coordinator's counts (the store's) added into `account`; the totals of the
    other counts (backups, combines, hand-offs)."""
    totals: Counter[str] = Counter()
    for counts in counters.values():
        account.accepted.update(chunks_of(counts.get("accepted", [])))
        for n, runs in counts.get("attempts", {}).items():
            account.attempts.update({c: int(n) for c in chunks_of(runs)})
        account.lost.update(chunks_of(counts.get("lost", [])))
        account.failures.update(counts.get("failures", {}))
        account.dropped.update(counts.get("dropped", {}))
        account.cancelled += counts.get("cancelled", 0)
        totals.update(backups=counts.get("backups", 0), combines=counts.get("combines", 0))
    return totals


def _both(
    one: Callable[[int, Outcome], None], other: Callable[[int, Outcome], None]
) -> Callable[[int, Outcome], None]:
    def record(chunk: int, outcome: Outcome) -> None:
        one(chunk, outcome)
        other(chunk, outcome)

    return record


async def _stream(merger: _Merger, done: dict[int, Outcome]) -> None:
    for chunk, outcome in sorted(done.items()):
        merger.stream(chunk, outcome)


async def _abandon(merger: _Merger) -> None:
    merger.abandon()


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


def fan_in(partial_bytes: int) -> int:
    """How many partials one combine call merges: as many as fit in COMBINE_BYTES, at most
    MAX_FAN_IN, at least 2, a power of 2 (so each group is a subtree of the client's tree).
    Few calls for small partials (each call costs a round trip and a sandbox: 1,000 partials
    of a few floats take 3 calls, not 33 at 32 a call), frames of a few MiB for large ones.

    >>> fan_in(100), fan_in(1 << 20), fan_in(1 << 30)
    (256, 4, 2)
    """
    width = 2
    while width < MAX_FAN_IN and 2 * width * max(partial_bytes, 1) <= COMBINE_BYTES:
        width *= 2
    return width


def nbytes(value: Any) -> int:
    """About how many bytes a partial pickles to (its arrays' data, and a little per item)."""
    if isinstance(value, np.ndarray):
        return value.nbytes + 128
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value) + 16
    if isinstance(value, dict):
        return sum(nbytes(k) + nbytes(v) for k, v in value.items()) + 16
    if isinstance(value, bytes | str):
        return len(value) + 32
    return 64


class _Merger:
    """Merges partials in combine lambdas, `fan_in` at a time, into the subtrees of the
    client's tree that lack the chunks the client ran itself.

    As partials come (`stream`), each group of `fan_in` aligned nodes, a subtree of the
    client's tree whatever the job's final size, is merged as soon as its members are in,
    level by level; `finish` merges what is left at the right edge of each subtree once the
    outcomes are all in. A chunk's place in the tree is its position among the merged chunks:
    fixed at once unless the job may leave chunks out (`allow_partial`, keep_going); then it
    is known once every earlier chunk is decided, so partials wait for their predecessors (a
    chunk lost after every attempt is decided only at the end: the ones after it wait).
    """

    def __init__(
        self, caller: Caller, assignment: Assignment, report: Report, account: Accounting
    ) -> None:
        self.caller, self.assignment, self.report, self.account = (
            caller,
            assignment,
            report,
            account,
        )
        self.first = assignment.first  # positions before it are the client's
        self.blocks: _Blocks | None = None
        self.waiting: dict[int, Outcome] = {}  # decided chunks not yet placed (keep_going)
        self.placed = 0  # chunks placed so far, in order (keep_going)
        self.kept = 0  # ... of which merged (not left out)
        self.calls = 0

    async def combine(self, partials: list[Any]) -> Any:
        rule = self.assignment.combine
        assert rule is not None
        self.calls += 1
        self.report.combines += 1
        call, options = self.calls, self.assignment.settings
        for attempt in range(1, options["attempts"] + 1):
            try:
                outcome = await self.caller.combine(self.assignment.job, call, rule, partials)
            except PlatformFailure as failure:
                self.account.note(failure)
                if attempt == options["attempts"]:
                    raise
                await asyncio.sleep(backoff(attempt, options["backoff"]))
                continue
            if outcome.error is not None:
                raise CombineRaised(outcome)
            return outcome.value
        raise AssertionError("unreachable")

    def stream(self, chunk: int, outcome: Outcome) -> None:
        """A chunk's accepted outcome (on the loop): placed in the tree, merging what it
        completes."""
        if not self.assignment.keep_going:
            if outcome.error is None:
                self._place(self.first + chunk, outcome.value)
            return
        self.waiting[chunk] = outcome
        self._advance()

    def _advance(self) -> None:
        """Place the chunks whose predecessors are all decided (keep_going)."""
        while self.placed in self.waiting:
            decided = self.waiting.pop(self.placed)
            self.placed += 1
            if decided.error is None:
                self._place(self.first + self.kept, decided.value)
                self.kept += 1

    def _place(self, position: int, value: Any) -> None:
        if self.blocks is None:
            size = nbytes(value)
            width = fan_in(size)
            merge = self.combine if width * size > HERE_BYTES else self._merged_here
            self.blocks = _Blocks(self.first, width, merge)
        self.blocks.put(0, position, value)

    async def _merged_here(self, partials: list[Any]) -> Any:
        return self._here(partials)

    async def finish(self, outcomes: dict[int, Outcome], streamed: bool) -> None:
        """Replace the partials in `outcomes` by `Merged` subtrees (or set the report's
        combine error)."""
        report, first = self.report, self.first
        kept = [c for c in sorted(outcomes) if outcomes[c].error is None]
        position = {first + i: chunk for i, chunk in enumerate(kept)}
        if streamed and self.assignment.keep_going:  # the chunks lost are decided now
            for chunk in sorted(outcomes):
                if chunk >= self.placed:
                    self.waiting.setdefault(chunk, outcomes[chunk])
            self._advance()
        if not streamed or self.blocks is None:
            if self.blocks is not None:
                await self.blocks.stop()
            self.blocks = None
            for p, chunk in position.items():
                self._place(p, outcomes[chunk].value)
        spans = subtrees(first, first + len(kept))
        try:
            values = []
            if self.blocks is not None:
                await self.blocks.stop()
                values = [self.blocks.span(lo, hi, self._here) for lo, hi in spans]
        except CombineRaised as raised:
            report.combine_error = raised.outcome
            return
        for chunk in kept:
            del outcomes[chunk]
        for (lo, hi), value in zip(spans, values, strict=True):
            outcomes[position[lo]] = Outcome(value=Merged(value, hi - lo))
        report.merged = spans

    def _here(self, items: list[Any]) -> Any:
        """Merge `items` in this coordinator (what is left once every chunk is in)."""
        rule = self.assignment.combine
        assert rule is not None
        outcome = combine_here(self.assignment.job, rule, items)
        if outcome.error is not None:
            raise CombineRaised(outcome)
        return outcome.value

    def abandon(self) -> None:
        if self.blocks is not None:
            self.blocks.abandon()


class _Blocks:
    """The client's tree, merged from the bottom as its leaves come: a node at level j is the
    aligned block of fan_in**j positions [i * fan_in**j, (i + 1) * fan_in**j), a subtree of
    `tree_merge`'s tree over any number of partials that holds it whole (fan_in a power of 2).
    A block is merged once its `fan_in` members are in, unless it holds a position before
    `first` (the client's)."""

    def __init__(self, first: int, fan_in: int, combine: Any) -> None:
        self.first, self.fan_in, self.combine = first, fan_in, combine
        self.nodes: dict[tuple[int, int], Any] = {}  # (level, index): value
        self.tasks: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    def put(self, level: int, index: int, value: Any) -> None:
        self.nodes[(level, index)] = value
        group, above = index // self.fan_in, self.fan_in ** (level + 1)
        if group * above < self.first:
            return
        members = [(level, m) for m in range(group * self.fan_in, (group + 1) * self.fan_in)]
        if all(m in self.nodes for m in members):
            values = [self.nodes[m] for m in members]
            task = asyncio.ensure_future(self._merge(level + 1, group, values, members))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _merge(
        self, level: int, index: int, values: list[Any], members: list[tuple[int, int]]
    ) -> None:
        try:
            merged = await self.combine(values)
        except Exception as exc:  # the combine rule raised, or the platform failed throughout
            self.failure = self.failure or exc
            return
        for m in members:
            self.nodes.pop(m, None)
        self.put(level, index, merged)

    async def stop(self) -> None:
        """Stop the merges in flight (their members stay, to be merged by `span`): once every
        chunk is in, what is left is a few values a level, merged faster where they are than
        by a call; and a platform that sizes its sandboxes by the work in flight (OpenLambda:
        one per 10 ms of it) may have none free for a lone call beside the coordinator's own."""
        while self.tasks:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        if isinstance(self.failure, CombineRaised):
            raise self.failure

    def span(self, lo: int, hi: int, merge: Callable[[list[Any]], Any]) -> Any:
        """The value of the client's subtree over [lo, hi): its largest merged blocks and its
        leaves, merged by `merge` as `tree_merge` would (a `Merged` item per block)."""
        items: list[Any] = []
        at = lo
        top = 0
        while self.fan_in ** (top + 1) <= hi - lo:
            top += 1
        while at < hi:  # the highest merged block starting at `at` that fits (a leaf at least)
            level = next(
                j
                for j in range(top, -1, -1)
                if at % self.fan_in**j == 0
                and at + self.fan_in**j <= hi
                and (j, at // self.fan_in**j) in self.nodes
            )
            size = self.fan_in**level
            value = self.nodes[(level, at // size)]
            items.append(Merged(value, size) if level else value)
            at += size
        if len(items) == 1:
            return items[0].value if isinstance(items[0], Merged) else items[0]
        return merge(items)

    def abandon(self) -> None:
        for task in list(self.tasks):
            task.cancel()


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
