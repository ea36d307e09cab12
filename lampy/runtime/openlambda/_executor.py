"""The `openlambda` executor: each chunk is one HTTP call to lampy's lambda on an OpenLambda worker.

`run()` is synchronous but the calls are asynchronous: one pooled aiohttp session lives on an
event loop in a background thread (`_loop.py`), so a caller that is itself inside a running
loop (Jupyter) works too. Split arrays over `PUBLISH_BYTES` travel by reference
(lampy.runtime.remote._publish): each sandbox reads its rows from an array server instead of the
client pushing them in the call. Results over `RESULT_BYTES` travel back the same way when that
server runs (or the option results="mmap:PATH" | "remote" asks for it).

This module keeps `concurrency` calls in flight and reports each to the chunk scheduler, which
decides what runs again: a platform failure (`_protocol.py` sorts them) waits the scheduler's
exponential backoff with jitter and is charged an attempt (by default 8 attempts spanning 10 s, so
a worker that restarts within that time loses no job); a straggler gets a backup call, and the
first valid answer wins (`accounts` keeps the tally per job, so tests can check exactly-once). When
a job has far more tiny chunks than call slots, several ride in one call (each still runs and
answers on its own). Jobs longer than 2 s show a progress line on a terminal (option
progress="auto" | "on" | "off").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import inspect
import ipaddress
import os
import shutil
import time
import traceback
import urllib.parse
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from lampy._errors import ExecutionError, OptionError, RemoteTraceback, RetriesExhausted
from lampy.runtime._combine import Destination
from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._scheduler import ATTEMPTS, BACKOFF_S, ChunkScheduler, backoff, check_attempts
from lampy.runtime._secret import load_secret
from lampy.runtime._worker_side import Outcome
from lampy.runtime.executors._base import Executor
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._coordinator import Assignment, Report, Runs, Summons, fold
from lampy.runtime.openlambda._detached import forget
from lampy.runtime.openlambda._loop import Loop, Progress
from lampy.runtime.openlambda._protocol import (
    INLINE_BYTES,
    Accounting,
    Caller,
    JobState,
    PlatformFailure,
    by_value,
    coordinator_of,
    run_url,
    template_of,
)
from lampy.runtime.openlambda._transport import Transport
from lampy.runtime.openlambda._watch import watch
from lampy.runtime.remote._jobs import JobStore
from lampy.runtime.remote._publish import published, serving
from lampy.runtime.remote._results import Offer, Sink, collect, offered

DEFAULT_URL = "http://127.0.0.1:5000"
# Measured with bench/bench_olreal.py on OpenLambda's own worker (the reference platform),
# beside `lampy worker`, on the 2-core machine: medians of four runs (docs/openlambda.md), under
# load averages of 10 to 18. One set for both workers: where they differ, OpenLambda's figure.
# Row "cold sandbox: first call after a redeploy": OpenLambda 0.25 to 0.58 s (0.51 s in the last
# run), lampy worker 0.28 to 1.2 s (the higher under load 18).
STARTUP_S = 0.5  # a cold call: a sandbox starts and imports numpy and lampy
# Rows "one chunk of 8 MiB / 64 MiB there and back": OpenLambda 0.37 to 0.70 GB/s moved,
# lampy worker 0.12 to 0.81 GB/s (lowest under load 18): the old 0.29 GB/s stays, in between.
SECONDS_PER_BYTE = 1 / 0.29e9  # per byte moved, through the worker and a sandbox
# Row "400 no-op chunks, one call each, 32 in flight": OpenLambda 1.6, 1.8, 3.9 and 4.4 ms a
# chunk (median 2.8 ms); lampy worker 1.1 to 5.0 ms.
SECONDS_PER_CHUNK = 2.8e-3  # one call per chunk, 32 in flight
# Calls in flight start at START_SLOTS and grow by half (at least one) when an answer comes
# back unqueued, its time per chunk within QUEUED_FACTOR of the fastest of its job (once
# START_SLOTS answers have set that), from a call sent at the level reached so far (so growth
# follows fresh news, not answers of calls sent before the last step); at most `concurrency`,
# and the level reached carries over to the executor's next jobs. OpenLambda starts a sandbox
# for about every 10 ms of outstanding work, so calls in flight beyond what the worker serves
# at once buy sandboxes (each importing numpy), not speed, while a few calls in flight leave a
# worker with many cores idle. Row "a first 10,000-chunk no-op job on a fresh lambda"
# (bench_olreal.py, 2 cores; docs/openlambda.md has the runs). A simulated worker of 64
# sandboxes gets all 32 in about five round trips, one of 2 sandboxes stays at 6
# (test_calls_in_flight_grow_while_answers_come_back_unqueued).
START_SLOTS = 4
QUEUED_FACTOR = 2.0
# A worker on this machine (a loopback URL) shares its cores, which lampy knows: calls in
# flight there stop at this many per core (more cannot compute sooner, and each one waiting may
# start a sandbox); the growth above is for workers whose size lampy cannot know. Row "a first
# 10,000-chunk no-op job on a fresh lambda", third run (load average 12 to 19): on OpenLambda
# 4 in flight took 1.6 s (4 or 5 sandboxes made), 32 at once 7.0 s (13 to 50 made), growing
# from 4 19.7 s (17 to 84 made at 13 to 19 in flight): the answers of no-op calls, served back
# to back by a busy sandbox, do not show the wait. OpenLambda's floods are not lampy's calls
# alone: the fourth run made 41 and 72 sandboxes with 4 in flight (bench/RESULTS.md).
LOCAL_SLOTS_PER_CORE = 2
# Row "10,000 warm no-op chunks by chunks per call": OpenLambda 2.63 / 0.85 / 0.95 s at 20 / 78
# / 312 chunks a call, lampy worker 2.34 / 1.15 / 1.01 s: 78, what 4 calls per slot of 32
# slots make, is OpenLambda's best (its 15 ms a call is paid 128 times, and the calls still
# spread over the sandboxes); 4x fewer calls gain `lampy worker` 12% and lose OpenLambda 12%.
# Slots are the calls this executor keeps in flight at most (`most_slots`): on a worker on this
# machine, 2 per core, not `concurrency`. Each call's end is a moment OpenLambda's scaler sees
# one call fewer outstanding and may stop a sandbox (one per 100 ms), and the next call then
# waits for a new one: a 1,000-chunk job at 7 chunks a call (slots of 32) made 16-20 sandboxes
# on 2 cores and took 4.6-7.1 s, at 62 (slots of 4) 4-6 sandboxes and 1.9-3.0 s (hand probe,
# 5 interleaved pairs, load 7-9; docs/openlambda.md).
CALLS_PER_SLOT = 4  # automatic batching leaves at least this many calls per slot
BATCH_BYTES = 1 << 20  # ... and batches at most this many bytes of split input
# With prewarm=N, the first job of this many chunks warms N sandboxes first. Off by default:
# warming pays only when done ahead of time (lampy.prewarm while the caller prepares its data).
# Row "a 64-chunk job just after a redeploy" (bench_olreal.py, two runs): pre-warmed ahead
# 1.9x and 6.3x faster than cold on OpenLambda, 3.4x and 5.0x on lampy worker; pre-warmed
# together (started with the job in a thread, timed to the job's answer) 3.7x on OpenLambda
# but 0.79x on lampy worker, whose 4 sandboxes the pings' holds take from the job (timed to
# the pre-warm's end as well: 0.50x and 0.38x). Automatic pre-warming would cost capped workers.
AUTO_PREWARM_CHUNKS = 32
# Row "8 concurrent pings holding their sandbox 0.05 / 0.2 / 0.5 s, one sandbox warm": OpenLambda
# made 3 / 5 / 6 sandboxes in every run (it adds one per 100 ms), lampy worker 0-1 / 1-3 / 3;
# 0.2 s gets most of them for less than half the wait of 0.5 s.
PREWARM_HOLD_S = 0.2  # each pre-warm call holds its sandbox this long, so calls spread out
PREWARM_PATIENCE_S = 1.0  # ... and stops once no new sandbox answered for this long (a cold
# start is STARTUP_S on a quiet machine, several times that on a loaded one)
ACCOUNTS_KEPT = 64  # jobs whose accounting the executor keeps
PACES_KEPT = 256  # functions whose pace the executor keeps (a few bytes each)
# OpenLambda's default limits.runtime_sec: how long one call may run, so how long one
# coordinator lambda may orchestrate before it hands the job off (orchestrator="lambda")
RUNTIME_LIMIT_S = 30.0
Unit = tuple[int, ...]  # the chunks one call carries


class OpenLambdaExecutor(Executor):
    name = "openlambda"
    can_prewarm = True
    option_types = {
        "url": str,
        "name": str,
        "concurrency": int,
        "timeout": float,
        "attempts": int,
        "backoff": float,
        "prewarm": int,
        "batch": int,
        "progress": str,
        "results": str,
        "orchestrator": str,
        "store": str,
        "runtime_limit": float,
    }

    def __init__(
        self,
        url: str = DEFAULT_URL,
        name: str = "lampy",
        concurrency: int = 32,
        timeout: float = 60.0,
        attempts: int = ATTEMPTS,
        backoff: float = BACKOFF_S,
        prewarm: int = 0,
        batch: int = 0,
        progress: str = "auto",
        results: str = "auto",
        orchestrator: str = "client",
        store: str = "",
        runtime_limit: float = RUNTIME_LIMIT_S,
        transport: Transport | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or concurrency < 1:
            raise OptionError(f"concurrency must be a positive int; got {concurrency!r}")
        if progress not in ("auto", "on", "off"):
            raise OptionError(f'progress must be "auto", "on" or "off"; got {progress!r}')
        if isinstance(batch, bool) or batch < 0:
            raise OptionError(f"batch must be 0 (automatic) or chunks per call; got {batch!r}")
        if timeout <= 0 or backoff < 0:
            raise OptionError(f"timeout must be > 0 and backoff >= 0; got {timeout}, {backoff}")
        if orchestrator not in ("client", "lambda"):
            raise OptionError(
                f'orchestrator must be "client" (this process runs the job) or "lambda" (a '
                f"call of the deployed lambda does); got {orchestrator!r}"
            )
        if runtime_limit <= 0:
            raise OptionError(f"runtime_limit must be > 0 seconds; got {runtime_limit!r}")
        self.orchestrator, self.store, self.runtime_limit = orchestrator, store, runtime_limit
        self.url, self.lambda_name = url.rstrip("/"), name
        #: Where an elemwise result goes: see lampy.runtime.remote._results.
        self.sink = replace(Sink.parse(results), platform=self.url)
        self.concurrency, self.timeout = concurrency, timeout
        self.attempts, self.backoff, self.auto_prewarm = check_attempts(attempts), backoff, prewarm
        self.batch, self.progress = batch, progress
        self.secret = load_secret()
        coordinator = coordinator_of(name)
        if transport is None:
            from lampy.runtime.openlambda._transport import AiohttpTransport

            chunks: Transport = AiohttpTransport(run_url(self.url, name), concurrency, self.secret)
            summons: Transport = AiohttpTransport(
                run_url(self.url, coordinator), concurrency, self.secret
            )
        else:
            chunks = summons = transport  # a given transport carries every call
        #: calls the chunks' lambda (chunks, pre-warm pings)
        self.caller = Caller(chunks, self.secret, self.url, name, timeout, concurrency)
        #: calls the coordinator lambda (orchestrator="lambda"), deployed beside the chunks'
        self.summoner = Caller(
            summons, self.secret, self.url, coordinator, timeout, concurrency, deployed_as=name
        )
        self.backups = 0  # backup calls sent for stragglers, for tests and monitoring
        #: seconds per row of the latest job of each (template, row size): judges stragglers
        #: in the next such job before it has answers of its own (a lone chunk never has);
        #: a first job goes by the pace its auto plan expects (`Job.pace`), if it has one
        self._paces: dict[tuple[bytes, int], float] = {}
        self.accounts: deque[Accounting] = deque(maxlen=ACCOUNTS_KEPT)  # the latest jobs'
        #: what the coordinator lambdas of the latest jobs reported (orchestrator="lambda")
        self.reports: deque[Report] = deque(maxlen=ACCOUNTS_KEPT)
        self.statuses: deque[dict[str, Any]] = deque(maxlen=ACCOUNTS_KEPT)  # their job stores'
        self._loop = Loop()
        local = _on_this_machine(self.url)
        cores = os.cpu_count() or 1
        #: the most calls in flight: `concurrency`, or for a worker on this machine no more
        #: than LOCAL_SLOTS_PER_CORE per core
        self.most_slots = min(concurrency, LOCAL_SLOTS_PER_CORE * cores) if local else concurrency
        #: chunks that compute at once, as `chunks="auto"` plans them (see `costs`)
        self.parallel = min(concurrency, cores) if local else concurrency
        #: calls in flight now: START_SLOTS, grown while answers come back unqueued
        self.slots = min(self.most_slots, START_SLOTS)
        self._called = False
        self._asked = 0  # the largest pre-warm asked for so far
        self._summoned: set[concurrent.futures.Future[Any]] = set()  # detached jobs' first calls

    @property
    def endpoint(self) -> str:
        return self.caller.endpoint

    @property
    def transport(self) -> Transport:
        """How calls travel (replaceable, e.g. by lampy.testing.InProcessTransport)."""
        return self.caller.transport

    @transport.setter
    def transport(self, transport: Transport) -> None:
        self.caller.transport = transport

    def costs(self) -> Costs:
        """What `chunks="auto"` plans with. Workers: `parallel`, `concurrency` or, for a worker
        on this machine, its cores, which the sandboxes share. Row "(e) the Fisher hour, on
        OpenLambda's own worker" (2 cores): with 32 counted, auto fanned out the features stage
        and took 10.5 s against 5.0 s inline; with 2, it kept the stages here (8.6 s against
        14.2 s inline in a noisier run)."""
        return Costs(
            workers=self.parallel,
            startup_s=0.0 if self.is_warm() else STARTUP_S,
            seconds_per_byte=SECONDS_PER_BYTE,
            seconds_per_chunk=SECONDS_PER_CHUNK,
        )

    def is_warm(self) -> bool:
        return self._called

    @property
    def orchestrated_by(self) -> str:
        """Where a job's scheduling runs, for `explain()`: "" for this process."""
        if self.orchestrator != "lambda":
            return ""
        store = self.store or "this process's array server"
        return (
            f"a coordinator lambda ({self.summoner.endpoint}), handing off to a fresh call "
            f"before its {self.runtime_limit:g} s runtime limit; the job's state on {store}"
        )

    @property
    def result_sink(self) -> Destination | None:
        return self.sink if self.sink.mode != "auto" else None

    def run(self, job: Job) -> dict[int, Outcome]:
        # large arrays travel by reference, both ways; a coordinator lambda stores elemwise
        # results on the array server, so it starts for that
        lambda_ = self.orchestrator == "lambda"
        start = self.sink.mode != "auto" or (lambda_ and job.combine is None)
        store = self.store if lambda_ else ""
        with published(job, self.url, store) as sent, offered(job.id, self.url, start) as offer:
            if lambda_:
                return self._orchestrated(sent, offer)
            return self._run_sent(sent, offer)

    def submit(self, job: Job, caller_side: Any) -> str:
        """Start `job` in lambdas and return at once: its id, "JOB@STORE", which any process
        with the secret re-attaches to (lampy.job). `caller_side` is what finishes it there
        (pickled with the function's module by value, like the job's template)."""
        if self.orchestrator != "lambda":
            raise OptionError(
                "a detached job needs orchestrator='lambda': with 'client' this process runs "
                "the job, so it cannot go away"
            )
        with published(job, self.url, self.store, keep=True) as sent:
            offer = self._detached_offer(sent) if job.combine is None else None
            store, assignment = self._prepare_job(sent, offer, by_value(caller_side, job.function))
            spec = frames.encode(frames.COORDINATE, assignment, self.secret).join()
            with store:  # the handle is valid at once, before any coordinator started
                store.create(spec, len(job.chunks))
        summons = Summons(job.id, store.server, "start")
        self._summoned.add(self._loop.spawn(self.summoner.coordinate(summons, self.runtime_limit)))
        self._summoned = {f for f in self._summoned if not f.done()}
        return f"{job.id}@{store.server}"

    def _detached_offer(self, job: Job) -> Offer:
        """Where a detached job's elemwise results go: the store, or this process's server
        (kept until it exits: nothing here knows when the job's results are read)."""
        if self.store:
            url = f"{self.store.rstrip('/')}/results/{job.id}/"
            return Offer(url, 1, Path("/nonexistent"))
        server = serving(self.url, start=True)
        if server is None:
            raise ExecutionError(f"no array server reachable from {self.url}: pass store=URL")
        directory, url = server
        return Offer(f"{url}/results/{job.id}/", 1, directory / "results" / job.id)

    def _run_sent(self, job: Job, offer: Offer | None) -> dict[int, Outcome]:
        template = template_of(job)
        payload = len(template) + sum(a.nbytes for a in job.whole)
        account = Accounting(job.id, len(job.chunks))
        self.accounts.append(account)
        state = JobState(job, template, payload <= INLINE_BYTES, account, offer)
        if len(job.chunks) >= AUTO_PREWARM_CHUNKS and self._asked < self.auto_prewarm:
            self.prewarm(self.auto_prewarm)  # once: the platform may cap sandboxes lower
        return self.run_state(state)

    def run_state(self, state: JobState) -> dict[int, Outcome]:
        """Run a job made ready to send (the client's, or a coordinator's in a sandbox)."""
        self._called = True
        return self._loop.run(self._run_job(state))

    def _orchestrated(self, job: Job, offer: Offer | None) -> dict[int, Outcome]:
        """Write the job to the job store, summon a coordinator lambda (_coordinator.py) and
        watch the job until its report is in the store (_watch.py)."""
        store, assignment = self._prepare_job(job, offer if job.combine is None else None, None)
        account = Accounting(job.id, len(job.chunks))
        self.accounts.append(account)
        # the job rides with the summons: the coordinator writes it to the store
        summons = Summons(job.id, store.server, "start", assignment=assignment)
        watching = watch(
            self.summoner, store, summons, self.attempts, self.backoff, self.runtime_limit, True
        )
        try:
            report, status = self._loop.run(watching)
        finally:
            self._forget(job.id)
        self.reports.append(report)
        self.statuses.append(status)
        totals = fold(account, status["counters"])
        self.backups += totals["backups"]
        if report.combine_error is not None:
            error = report.combine_error
            assert error.error is not None
            raise error.error from RemoteTraceback(
                f"raised by the combine rule, merging partials in a lambda\n{error.traceback}"
            )
        if offer is None:
            return report.outcomes
        return {c: _collected(o, offer) for c, o in report.outcomes.items()}

    def _prepare_job(
        self, job: Job, offer: Offer | None, caller_side: bytes | None
    ) -> tuple[JobStore, Assignment]:
        """The job's store and the job as a coordinator runs it (every elemwise result array
        goes to `offer`'s server, so the report holds references)."""
        store = self._job_store(job.id)
        rule = by_value(job.combine, job.combine) if job.combine is not None else None
        template = template_of(job)
        payload = len(template) + sum(a.nbytes for a in job.whole)
        options = {
            "name": self.lambda_name,
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "attempts": self.attempts,
            "backoff": self.backoff,
            "batch": self.batch,
        }
        options = {k: v for k, v in options.items() if v != SPEC_OPTIONS[k]}
        assignment = Assignment(
            job.id,
            template,
            payload <= INLINE_BYTES,
            job.whole,
            job.split,
            Runs.of(job.chunks),
            job.keep_going,
            job.first,
            rule,
            None if offer is None else (offer.url, 1),
            self.url,
            options,
            self.runtime_limit,
            caller_side,
        )
        self._called = True
        return store, assignment

    def _forget(self, job: str) -> None:
        """Remove a finished job's state (its answer is here) from its store, or from this
        process's own array server."""
        if self.store:
            forget(self.store, job)
            return
        server = serving(self.url, start=False)
        if server is None:
            return
        jobs = server[0] / "jobs"
        shutil.rmtree(jobs / job, ignore_errors=True)
        for folder in (jobs, server[0] / "results"):
            with contextlib.suppress(OSError):  # still holding another job's files
                folder.rmdir()

    def _job_store(self, job: str) -> JobStore:
        """The job's state: on the `store` server, else on this process's array server."""
        if self.store:
            return JobStore(self.store, job)
        server = serving(self.url, start=True)
        if server is None:
            raise ExecutionError(
                f"orchestrator='lambda' keeps the job's state on an array server the platform "
                f"reaches, but the route from {self.url} to this machine is unknown: run "
                "`lampy serve DIR --host ADDRESS` where the platform reaches it and pass "
                "store='http://ADDRESS:PORT'"
            )
        return JobStore(server[1], job)

    def prewarm(self, n: int, timeout: float = 30.0) -> int:
        """Send concurrent no-op calls until `n` sandboxes answered (or no more appear).

        OpenLambda adds at most one sandbox per 100 ms while calls wait, so a large fan-out
        on a cold lambda ramps up slowly; warming first lets the real chunks start in parallel.
        Returns how many distinct sandboxes answered.
        """
        self._asked = max(self._asked, n)
        self._called = True
        warm = self._loop.run(self._prewarm(n, timeout))
        self.slots = max(self.slots, min(warm, self.most_slots))  # each serves a call at once
        return warm

    def close(self) -> None:
        if self._loop.loop is not None:
            self._loop.run(self.transport.close())
            if self.summoner.transport is not self.transport:
                self._loop.run(self.summoner.transport.close())
        self._loop.stop()

    # -- on the loop ------------------------------------------------------------------------

    async def _prewarm(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        seen: set[str] = set()  # sandboxes, by the token each made
        stale, grew = 0, time.monotonic()

        def waiting() -> bool:  # a capped platform is given up on only after a cold start's time
            return stale < 2 or time.monotonic() - grew < PREWARM_PATIENCE_S

        failure: BaseException | None = None
        while len(seen) < n and waiting() and time.monotonic() < deadline:
            before = len(seen)
            left = max(PREWARM_HOLD_S, deadline - time.monotonic())  # a ping never answered
            calls = [self.caller.ping(PREWARM_HOLD_S, left) for _ in range(n)]  # waits no longer
            for answer in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(answer, ExecutionError):
                    raise answer
                if isinstance(answer, str):
                    seen.add(answer)
                elif isinstance(answer, BaseException):
                    failure = answer
            stale = stale + 1 if len(seen) == before else 0
            grew = grew if stale else time.monotonic()
        if not seen and failure is not None:
            raise ExecutionError(
                f"no sandbox answered a pre-warm call at {self.endpoint} ({failure}); is the "
                f"OpenLambda worker up (GET {self.url}/status), and lampy deployed there?"
            ) from failure
        return len(seen)

    async def _run_job(self, state: JobState) -> dict[int, Outcome]:
        """Keep `concurrency` calls in flight; the scheduler says what runs (again).

        Calls report to one queue, so each completion costs O(1) however many chunks a job
        has (asyncio.wait over every pending task would cost O(chunks) per completion).
        """
        job, account = state.job, state.account
        advice = (
            f"Check the worker (is it up? GET {self.url}/status and /stats), or for a busy or "
            f"flaky platform raise attempts= (now {self.attempts}) or timeout= "
            f"(now {self.timeout:g} s)."
        )
        row_bytes = sum(a[:1].nbytes for a in job.split)
        kind = (hashlib.blake2b(state.template).digest(), row_bytes)
        # the pace measured here wins; a first job goes by its caller's estimate, if any
        scheduler = ChunkScheduler(job, self.attempts, advice, pace=self._paces.get(kind, job.pace))
        size = self._batch_size(job, row_bytes)
        alone: set[int] = set()  # chunks of a call the platform lost: each runs again alone, so
        # a chunk that kills its sandbox does not spend its batch-mates' attempts with its own
        loop = asyncio.get_running_loop()
        for chunk, known in state.done.items():  # a job taken over: these ran before
            scheduler.finished(chunk, known, loop.time())
        finished: asyncio.Queue[tuple[Unit, asyncio.Task[list[Outcome]]]] = asyncio.Queue()
        running: dict[Unit, list[asyncio.Task[list[Outcome]]]] = {}
        started: dict[asyncio.Task[list[Outcome]], tuple[float, int]] = {}  # when, at what slots
        fastest = float("inf")  # the least time per chunk of an answer in this job
        answers = 0  # ... which the first START_SLOTS answers set (a job's first calls are
        # slow: a cold sandbox, the template), before any answer counts as unqueued
        progress = Progress(len(job.chunks), self.progress)

        def launch(unit: Unit) -> None:
            attempt = max(scheduler.start(chunk, loop.time()) for chunk in unit)
            account.attempts.update(unit)
            task = asyncio.ensure_future(self._attempt(state, unit, attempt))
            started[task] = loop.time(), self.slots
            task.add_done_callback(lambda t: finished.put_nowait((unit, t)))
            running.setdefault(unit, []).append(task)

        try:
            while not scheduler.done:
                if state.stop is not None and state.stop():
                    break  # in-flight calls are cancelled below: their chunks stay to run
                while len(running) < self.slots:
                    unit = _take(scheduler, size, alone)
                    if not unit:
                        break
                    launch(unit)
                late = set(scheduler.stragglers(loop.time()))
                for unit in {u for u in running if not late.isdisjoint(u)}:  # one copy a call
                    self.backups += 1
                    launch(unit)
                judged = len(scheduler.outcomes) or scheduler.pace is not None
                busy = judged and scheduler.running
                wait = 0.05 if busy or state.stop is not None else None
                try:
                    unit, task = await asyncio.wait_for(finished.get(), wait)
                except asyncio.TimeoutError:
                    continue
                sent, level = started.pop(task, (loop.time(), 0))
                took = (loop.time() - sent) / len(unit)
                copies = running.get(unit, [])
                if task not in copies:  # the twin of an answered call
                    if not task.cancelled() and task.exception() is None:
                        account.dropped["superseded"] += 1  # answered before its cancel landed
                    continue
                copies.remove(task)
                if not copies:
                    del running[unit]
                failure = task.exception()
                if isinstance(failure, PlatformFailure):
                    account.note(failure)
                    if len(unit) > 1:
                        alone.update(unit)
                    for chunk in unit:
                        scheduler.failed(chunk, failure, failure.text)
                    continue
                if failure is not None:
                    raise failure
                fastest, answers = min(fastest, took), answers + 1
                unqueued = answers > START_SLOTS and took <= QUEUED_FACTOR * fastest
                if unqueued and level >= self.slots:  # the worker keeps up at this level
                    grown = min(self.most_slots, self.slots + max(1, self.slots // 2))
                    self.slots = max(self.slots, grown)
                for chunk, outcome in zip(unit, task.result(), strict=False):
                    if scheduler.finished(chunk, outcome, loop.time()):
                        account.accepted[chunk] += 1
                        if state.record is not None:
                            state.record(chunk, outcome)
                    else:
                        account.dropped["superseded"] += 1
                for twin in running.pop(unit, []):
                    account.cancelled += twin.cancel()
                progress.update(len(scheduler.outcomes))
            account.lost.update(
                c for c, o in scheduler.outcomes.items() if isinstance(o.error, RetriesExhausted)
            )
            state.complete = scheduler.done
            return scheduler.outcomes
        finally:
            pace = scheduler.measured_pace()
            if pace is not None:
                self._paces.pop(kind, None)  # the latest job last: the oldest go first
                self._paces[kind] = pace
                while len(self._paces) > PACES_KEPT:
                    del self._paces[next(iter(self._paces))]
            progress.close()
            tasks = [task for copies in running.values() for task in copies]
            account.cancelled += sum(task.cancel() for task in tasks)
            await asyncio.gather(*tasks, return_exceptions=True)

    def _batch_size(self, job: Job, row_bytes: int) -> int:
        """Chunks per call: 1 unless chunks far outnumber call slots and are small in bytes.

        Each call still runs its chunks one by one through the worker side and answers each
        chunk's outcome; batching spares per-call overhead (about 1 ms through an OpenLambda
        worker) and, above all, the sandboxes OpenLambda's scaler stops and starts again at
        each call's end (see CALLS_PER_SLOT) when a job has many more tiny chunks than slots.
        `row_bytes`: one row of the job's split arguments.
        """
        if self.batch:
            return self.batch
        by_count = len(job.chunks) // (self.most_slots * CALLS_PER_SLOT)
        rows = max(stop - start for start, stop in job.chunks)
        by_bytes = BATCH_BYTES // max(1, rows * row_bytes)
        return max(1, min(by_count, by_bytes))

    async def _attempt(self, state: JobState, unit: Unit, attempt: int) -> list[Outcome]:
        """One call; a platform failure waits its backoff before it is reported, unless it
        was the last attempt."""
        try:
            return await self.caller.call(state, unit)
        except PlatformFailure:
            if attempt < self.attempts:
                await asyncio.sleep(backoff(attempt, self.backoff))
            raise


#: The options a job's spec gives its coordinators' executor, at their defaults: a spec carries
#: only those that differ (the deployed lambda runs this lampy, whose defaults these are).
SPEC_OPTIONS = {
    name: inspect.signature(OpenLambdaExecutor).parameters[name].default
    for name in ("name", "concurrency", "timeout", "attempts", "backoff", "batch")
}


def _collected(outcome: Outcome, offer: Offer) -> Outcome:
    """A chunk's outcome with the results its chunk stored read back from the client's disk."""
    if outcome.error is not None:
        return outcome
    try:
        return Outcome(value=collect(outcome.value, offer))
    except Exception as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def _take(scheduler: ChunkScheduler, size: int, alone: set[int]) -> Unit:
    """Up to `size` chunks to start in one call; a chunk in `alone` goes in a call of its own
    (one that comes after others is put back, to lead the next call)."""
    unit: list[int] = []
    while len(unit) < size and (chunk := scheduler.next()) is not None:
        if chunk in alone:
            if unit:
                scheduler.again(chunk)
                break
            return (chunk,)
        unit.append(chunk)
    return tuple(unit)


def _on_this_machine(url: str) -> bool:
    """Whether the worker at `url` runs here: a loopback address."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
