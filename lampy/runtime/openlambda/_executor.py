"""The `openlambda` executor: each chunk is one HTTP call to lampy's lambda on an OpenLambda worker.

`run()` is synchronous but the calls are asynchronous: one pooled aiohttp session lives on an
event loop in a background thread, so a caller that is itself inside a running loop (Jupyter)
works too. Bodies always carry Content-Length (OpenLambda reads a chunked body as empty).
Split arrays over `PUBLISH_BYTES` travel by reference (lampy.runtime.remote._publish): each
sandbox reads its rows from an array server instead of the client pushing them in the call.
Results over `RESULT_BYTES` travel back the same way when that server runs (or the option
results="mmap:PATH" | "remote" asks for it): lampy.runtime.remote._results.

Failures are sorted before anything is retried. Platform failures (connection refused or reset,
429, 502 and other 5xx, client timeouts, an answer that fails its signature or is not for the
call that asked) are retried with exponential backoff and jitter, up to `attempts`; then the
chunk's outcome is a `RetriesExhausted` naming it and every attempt's cause. A user exception
comes back in-band with HTTP 200 and is never retried; a missing lambda, a refused request
signature or a version mismatch are not retried either, and their errors say what to do.
Every call carries its (job, chunks, attempt) and the handler echoes it, so a late duplicate or
a superseded attempt's answer is recognised and dropped. Chunks are pure, so a straggler gets a
backup call; the first valid answer wins and every chunk is counted once (`accounts` keeps
the tally per job). When a job has far more tiny chunks than call slots, several ride in one call
(each still runs and answers on its own). Jobs longer than 2 s show a progress line on a
terminal (option progress="auto" | "on" | "off").
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp
import cloudpickle
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from lampy._errors import (
    BadSignature,
    ExecutionError,
    FrameError,
    OptionError,
    RemoteArrayError,
    RetriesExhausted,
    SerializationError,
)
from lampy.runtime._codec import dumps
from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._secret import load_secret
from lampy.runtime._worker_side import Outcome
from lampy.runtime.executors._base import Executor
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.remote._publish import published
from lampy.runtime.remote._results import Offer, Sink, collect, offered

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:5000"
# Measured with bench/bench_openlambda.py against `lampy worker` on the 2-core reference machine.
STARTUP_S = 0.2  # a cold call: a sandbox starts and imports numpy and lampy
SECONDS_PER_BYTE = 1 / 0.29e9  # per byte moved, through the worker and a sandbox
SECONDS_PER_CHUNK = 6.5e-4  # one call per chunk, 32 in flight
SMALL_BYTES = 1 << 16  # smaller frames are joined: one write beats several
INLINE_BYTES = 1 << 16  # smaller templates ride along with every call: a miss costs more
CALLS_PER_SLOT = 4  # automatic batching leaves at least this many calls per slot
BATCH_BYTES = 1 << 20  # ... and batches at most this many bytes of split input
STRAGGLER_DONE = 0.75  # backups only once this share of chunks is done ...
STRAGGLER_FACTOR = 4.0  # ... for calls running this many times the median ...
STRAGGLER_MIN_S = 0.5  # ... and at least this much longer than it
# With prewarm=N, the first job of this many chunks warms N sandboxes first. Off by default:
# bench/bench_openlambda.py shows the job's own calls ramp the platform up as fast, so warming
# pays only when done ahead of time (lampy.prewarm while the caller prepares its data).
AUTO_PREWARM_CHUNKS = 32
PROGRESS_AFTER_S = 2.0  # a progress line appears for jobs running longer than this
PREWARM_HOLD_S = 0.05  # each pre-warm call holds its sandbox this long, so calls spread out
PREWARM_PATIENCE_S = 1.0  # ... and stops once no new sandbox answered for this long (a cold
# start is STARTUP_S on a quiet machine, several times that on a loaded one)
_REMOTE_PACKAGES = {"numpy", "cloudpickle", "lampy"}  # the deploy tarball carries lampy
_pickle_lock = threading.Lock()


ACCOUNTS_KEPT = 64  # jobs whose accounting the executor keeps


class PlatformFailure(Exception):
    """A failure of the platform, not of the chunk: worth another attempt.

    `kind` sorts it for the accounting ("http 502", "timeout", "connection", "corrupt",
    "stale"); `text` is what the platform said, if anything (the give-up error's traceback).
    """

    def __init__(self, cause: str, kind: str, text: str = "") -> None:
        super().__init__(cause)
        self.kind, self.text = kind, text


#: Failure kinds that are answers received and refused, rather than attempts with no answer.
DROPPED = ("corrupt", "stale")


@dataclass
class Accounting:
    """What became of one job's calls, so tests (and curious users) can check exactly-once.

    When the job ends, every chunk that ran has exactly one accepted answer or is `lost`
    (given up after the retry budget); answers that arrived but were not taken are counted in
    `dropped` by why: "corrupt" (failed the signature or frame checks), "stale" (signed, but
    for another job, chunk or attempt: a late duplicate), "superseded" (a backup's twin
    answered first). `failures` counts attempts that got no answer, by kind ("http 502",
    "http 429", "timeout", "connection").
    """

    job: str
    chunks: int
    attempts: Counter[int] = field(default_factory=Counter)  # calls that carried each chunk
    accepted: Counter[int] = field(default_factory=Counter)  # answers taken, per chunk
    lost: set[int] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0  # calls cancelled in flight (a backup's twin, a job that stopped early)

    def note(self, failure: PlatformFailure) -> None:
        (self.dropped if failure.kind in DROPPED else self.failures)[failure.kind] += 1


@dataclass
class Reply:
    """An answer: its status, and its body, or for a frame the reader that took it in."""

    status: int
    body: bytes | bytearray = b""
    reader: frames.Reader | None = None


class Transport(ABC):
    """One method: POST a frame to the lambda, return the answer."""

    @abstractmethod
    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply: ...

    async def close(self) -> None:  # noqa: B027 (most transports hold nothing)
        """Release connections."""


class _FramePayload(Payload):
    """A frame written slice by slice with a known size, so aiohttp sends Content-Length."""

    def __init__(self, frame: frames.Outgoing) -> None:
        super().__init__(frame, content_type="application/octet-stream")
        self._frame = frame
        self._size = frame.size

    async def write(self, writer: AbstractStreamWriter) -> None:
        for piece in self._frame:  # slices: asyncio copies whatever a write cannot send now
            await writer.write(piece)
            await writer.drain()

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a lampy frame is binary")


class AiohttpTransport(Transport):
    """HTTP to an OpenLambda worker through one pooled session (made on the loop that uses it)."""

    def __init__(self, url: str, concurrency: int, secret: bytes) -> None:
        self.url, self.concurrency, self.secret = url, concurrency, secret
        self._session: aiohttp.ClientSession | None = None

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.concurrency)
            self._session = aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20)
        data = frame.join() if frame.size <= SMALL_BYTES else _FramePayload(frame)
        async with self._session.post(
            self.url, data=data, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            length = response.content_length
            if response.status != 200 or length is None:
                return Reply(response.status, await response.read())
            prefix = await response.content.readexactly(min(length, frames.PREFIX_BYTES))
            if frames.check_prefix(prefix) != length:  # before Reader allocates what it claims
                raise FrameError(f"answer of {length:,} bytes does not match its frame")
            reader = frames.Reader(prefix, self.secret)
            while reader.missing:
                chunk = await response.content.readany()
                if not chunk:
                    raise aiohttp.ClientPayloadError(
                        f"answer ended after {reader.got:,} of {length:,} bytes"
                    )
                reader.feed(chunk)
            return Reply(200, reader=reader)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Loop:
    """An event loop in a daemon thread, so sync callers can run coroutines from any context."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(
                target=self.loop.run_forever, name="lampy-openlambda", daemon=True
            )
            self.thread.start()
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()
        self.loop = self.thread = None


@dataclass
class _JobState:
    job: Job
    template: bytes
    inline: bool
    account: Accounting
    offer: Offer | None = None  # where large results may go (the client's array server)
    sends: int = 0
    tries: Counter[int] = field(default_factory=Counter)  # attempts so far, by a call's first chunk


class _Progress:
    """One line on stderr for jobs running longer than PROGRESS_AFTER_S (terminals only)."""

    def __init__(self, total: int, mode: str) -> None:
        self.total = total
        self.enabled = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        if not self.enabled or elapsed < PROGRESS_AFTER_S:
            return
        if now - self.last < 0.2 and done < self.total:  # at most 5 updates a second
            return
        self.last, self.shown = now, True
        share = done / self.total
        sys.stderr.write(f"\rlampy: {done}/{self.total} chunks ({share:.0%}) {elapsed:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


class OpenLambdaExecutor(Executor):
    name = "openlambda"
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
    }

    def __init__(
        self,
        url: str = DEFAULT_URL,
        name: str = "lampy",
        concurrency: int = 32,
        timeout: float = 60.0,
        attempts: int = 4,
        backoff: float = 0.05,
        prewarm: int = 0,
        batch: int = 0,
        progress: str = "auto",
        results: str = "auto",
        transport: Transport | None = None,
    ) -> None:
        for option, value in (("concurrency", concurrency), ("attempts", attempts)):
            if isinstance(value, bool) or value < 1:
                raise OptionError(f"{option} must be a positive int; got {value!r}")
        if progress not in ("auto", "on", "off"):
            raise OptionError(f'progress must be "auto", "on" or "off"; got {progress!r}')
        if isinstance(batch, bool) or batch < 0:
            raise OptionError(f"batch must be 0 (automatic) or chunks per call; got {batch!r}")
        if timeout <= 0 or backoff < 0:
            raise OptionError(f"timeout must be > 0 and backoff >= 0; got {timeout}, {backoff}")
        self.url, self.lambda_name = url.rstrip("/"), name
        #: Where an elemwise result goes (the region asks): see lampy.runtime.remote._results.
        self.sink = replace(Sink.parse(results), platform=self.url)
        self.endpoint = f"{self.url}/run/{name}"
        self.concurrency, self.timeout = concurrency, timeout
        self.attempts, self.backoff, self.auto_prewarm = attempts, backoff, prewarm
        self.batch, self.progress = batch, progress
        self.secret = load_secret()
        self.transport = transport or AiohttpTransport(self.endpoint, concurrency, self.secret)
        self.backups = 0  # backup calls sent for stragglers, for tests and monitoring
        self.accounts: deque[Accounting] = deque(maxlen=ACCOUNTS_KEPT)  # the latest jobs'
        self._loop = _Loop()
        self._called = False
        self._asked = 0  # the largest pre-warm asked for so far

    def costs(self) -> Costs:
        return Costs(
            workers=self.concurrency,
            startup_s=0.0 if self._called else STARTUP_S,
            seconds_per_byte=SECONDS_PER_BYTE,
            seconds_per_chunk=SECONDS_PER_CHUNK,
        )

    def run(self, job: Job) -> dict[int, Outcome]:
        # large arrays travel by reference, both ways
        start = self.sink.mode != "auto"  # the caller asked for results on disk
        with published(job, self.url) as sent, offered(job.id, self.url, start) as offer:
            return self._run_sent(sent, offer)

    def _run_sent(self, job: Job, offer: Offer | None) -> dict[int, Outcome]:
        template = _template(job)
        payload = len(template) + sum(a.nbytes for a in job.whole)
        account = Accounting(job.id, len(job.chunks))
        self.accounts.append(account)
        state = _JobState(job, template, payload <= INLINE_BYTES, account, offer)
        if len(job.chunks) >= AUTO_PREWARM_CHUNKS and self._asked < self.auto_prewarm:
            self.prewarm(self.auto_prewarm)  # once: the platform may cap sandboxes lower
        self._called = True
        return self._loop.run(self._run_job(state))

    def prewarm(self, n: int, timeout: float = 30.0) -> int:
        """Send concurrent no-op calls until `n` sandboxes answered (or no more appear).

        OpenLambda adds at most one sandbox per 100 ms while calls wait, so a large fan-out
        on a cold lambda ramps up slowly; warming first lets the real chunks start in parallel.
        Returns how many distinct sandboxes answered.
        """
        self._asked = max(self._asked, n)
        self._called = True
        return self._loop.run(self._prewarm(n, timeout))

    def close(self) -> None:
        if self._loop.loop is not None:
            self._loop.run(self.transport.close())
        self._loop.stop()

    # -- on the loop ------------------------------------------------------------------------

    async def _prewarm(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        stale, grew = 0, time.monotonic()

        def waiting() -> bool:  # a capped platform is given up on only after a cold start's time
            return stale < 2 or time.monotonic() - grew < PREWARM_PATIENCE_S

        while len(seen) < n and waiting() and time.monotonic() < deadline:
            before = len(seen)
            calls = [self._ping() for _ in range(n)]
            for answer in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(answer, ExecutionError):
                    raise answer
                if isinstance(answer, int):
                    seen.add(answer)
            stale = stale + 1 if len(seen) == before else 0
            grew = grew if stale else time.monotonic()
        return len(seen)

    async def _ping(self) -> int:
        frame = await self._exchange(frames.encode(frames.PING, PREWARM_HOLD_S, self.secret))
        if frame.kind != frames.PONG or not isinstance(frame.value, int):
            raise PlatformFailure(f"expected a pong, got {_describe(frame)}", "stale")
        return frame.value

    async def _run_job(self, state: _JobState) -> dict[int, Outcome]:
        """Keep `concurrency` calls in flight; back up stragglers; first valid answer wins.

        Calls report to one queue, so each completion costs O(1) however many chunks a job
        has (asyncio.wait over every pending task would cost O(chunks) per completion).
        """
        units = _batches(len(state.job.chunks), self._batch_size(state.job))
        loop = asyncio.get_running_loop()
        finished: asyncio.Queue[tuple[int, asyncio.Task[list[Outcome]]]] = asyncio.Queue()
        todo = deque(range(len(units)))
        running: dict[int, list[asyncio.Task[list[Outcome]]]] = {}
        started: dict[int, float] = {}
        durations: list[float] = []
        done: dict[int, Outcome] = {}
        answered = 0
        progress = _Progress(len(state.job.chunks), self.progress)
        backed_up: set[int] = set()
        account = state.account

        def launch(unit: int) -> None:
            task = asyncio.ensure_future(self._with_retries(state, units[unit]))
            task.add_done_callback(lambda t: finished.put_nowait((unit, t)))
            running.setdefault(unit, []).append(task)
            started.setdefault(unit, loop.time())

        try:
            while answered < len(units):
                while todo and len(running) < self.concurrency:
                    launch(todo.popleft())
                late = answered >= STRAGGLER_DONE * len(units) and durations
                if late and finished.empty():
                    median = statistics.median(durations)
                    slow = max(STRAGGLER_FACTOR * median, median + STRAGGLER_MIN_S)
                    for unit in set(running) - backed_up:
                        if loop.time() - started[unit] > slow:
                            backed_up.add(unit)
                            self.backups += 1
                            launch(unit)
                    try:
                        unit, task = await asyncio.wait_for(finished.get(), 0.05)
                    except asyncio.TimeoutError:
                        continue
                else:
                    unit, task = await finished.get()
                copies = running.get(unit, [])
                if task not in copies:  # the twin of an answered call
                    if not task.cancelled() and task.exception() is None:
                        account.dropped["superseded"] += 1  # answered before its cancel landed
                    continue
                copies.remove(task)
                if task.cancelled() or task.exception() is not None:
                    if copies:  # the other copy may still give a valid answer
                        continue
                    raise task.exception() or asyncio.CancelledError()
                if copies and any(isinstance(o.error, RetriesExhausted) for o in task.result()):
                    continue  # this copy gave up; its twin may still get an answer
                answered += 1
                durations.append(loop.time() - started[unit])
                for twin in running.pop(unit):
                    account.cancelled += twin.cancel()
                # a call stops at its first user error, so it may answer fewer chunks
                outcomes = {
                    chunk: _collected(state.offer, outcome)
                    for chunk, outcome in zip(units[unit], task.result(), strict=False)
                }
                for chunk, outcome in outcomes.items():
                    if chunk in done:  # cannot happen while units are disjoint: never merge twice
                        account.dropped["superseded"] += 1
                        continue
                    done[chunk] = outcome
                    if isinstance(outcome.error, RetriesExhausted):
                        account.lost.add(chunk)
                    else:
                        account.accepted[chunk] += 1
                progress.update(len(done))
                errors = [o.error for o in outcomes.values() if o.error is not None]
                lost = all(isinstance(e, RetriesExhausted) for e in errors)
                if errors and not (lost and state.job.keep_going):
                    return done
            return done
        finally:
            progress.close()
            tasks = [task for copies in running.values() for task in copies]
            account.cancelled += sum(task.cancel() for task in tasks)
            await asyncio.gather(*tasks, return_exceptions=True)

    def _batch_size(self, job: Job) -> int:
        """Chunks per call: 1 unless chunks far outnumber call slots and are small in bytes.

        Each call still runs its chunks one by one through run_chunk and answers each
        chunk's outcome; batching only spares per-call overhead (about 1 ms through an
        OpenLambda worker) when a job has many more tiny chunks than slots.
        """
        if self.batch:
            return self.batch
        by_count = len(job.chunks) // (self.concurrency * CALLS_PER_SLOT)
        rows = max(stop - start for start, stop in job.chunks)
        row_bytes = sum(a[:1].nbytes for a in job.split)
        by_bytes = BATCH_BYTES // max(1, rows * row_bytes)
        return max(1, min(by_count, by_bytes))

    async def _with_retries(self, state: _JobState, chunks: tuple[int, ...]) -> list[Outcome]:
        """The chunks' outcomes; platform failures are retried with backoff, up to `attempts`.

        Attempts are numbered per call across its backups, so each answer can be matched to
        the attempt that asked. After the budget, every chunk of the call becomes a
        `RetriesExhausted` outcome rather than a raise: the caller decides what a lost chunk
        means (an error, or a gap in a partial answer).
        """
        causes: list[str] = []
        last: PlatformFailure | None = None
        said = ""  # the platform's last words (a 502 body, a handler's traceback)
        while True:
            state.tries[chunks[0]] += 1
            attempt = state.tries[chunks[0]]
            state.account.attempts.update(chunks)
            try:
                return await self._call(state, chunks, attempt)
            except PlatformFailure as exc:
                state.account.note(exc)
                causes.append(f"attempt {attempt}: {exc}")
                last, said = exc, exc.text or said
            if len(causes) >= self.attempts:
                return [self._give_up(state, chunk, chunks, causes, said, last) for chunk in chunks]
            await asyncio.sleep(self._backoff(len(causes)))

    def _give_up(
        self,
        state: _JobState,
        chunk: int,
        chunks: tuple[int, ...],
        causes: list[str],
        said: str,
        last: PlatformFailure | None,
    ) -> Outcome:
        """A lost chunk's outcome: which chunk, every attempt's cause, and what to do."""
        job = state.job
        along = ""
        if len(chunks) > 1:
            along = f" (it travelled with {len(chunks) - 1} other chunks in each call)"
        tried = "\n".join(f"  {cause}" for cause in causes)
        error = RetriesExhausted(
            f"{job.label(chunk)} was lost: all {len(causes)} attempts at {self.endpoint} "
            f"failed, each time in the platform, not in your code{along}:\n{tried}\n"
            f"Check the worker (is it up? GET {self.url}/status and /stats), or for a busy or "
            f"flaky platform raise attempts= (now {self.attempts}) or timeout= "
            f"(now {self.timeout:g} s).",
            chunk=job.first + chunk,
            rows=job.chunks[chunk],
            causes=tuple(causes),
        )
        error.__cause__ = last
        return Outcome(error=error, traceback=said)

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter: about backoff * 2**(failures - 1), at most 2 s."""
        return min(2.0, self.backoff * 2.0 ** (failures - 1)) + random.uniform(0, self.backoff)

    async def _call(self, state: _JobState, chunks: tuple[int, ...], attempt: int) -> list[Outcome]:
        """One attempt: send the task (the template only where needed) and read the results.

        The answer must echo this call's (job, chunks, attempt); any other signed answer (a
        replayed or late duplicate, a superseded attempt's) is dropped and the attempt fails.
        """
        job = state.job
        parts = tuple(tuple(a[slice(*job.chunks[c])] for a in job.split) for c in chunks)
        with_template = state.inline or state.sends < self.concurrency
        asked = (job.id, chunks, attempt)
        while True:
            if with_template:
                state.sends += 1
            task = (
                job.id,
                chunks,
                state.template if with_template else None,
                job.whole if with_template else None,
                parts,
                state.offer.task if state.offer is not None else None,  # for large results
                attempt,
            )
            frame = await self._exchange(frames.encode(frames.TASK, task, self.secret))
            missing = frame.kind == frames.MISSING and frame.value == job.id
            if missing and not with_template:
                with_template = True  # this sandbox has not seen the job yet
                continue
            answered = frame.kind == frames.RESULT and isinstance(frame.value, tuple)
            if not answered or frame.value[0] != asked:
                raise PlatformFailure(
                    f"dropped an answer not for this call: got {_describe(frame)}, "
                    f"asked {_describe_call(asked)}",
                    "stale",
                )
            outcomes = [Outcome(v, error, traceback) for v, error, traceback in frame.value[1]]
            complete = len(outcomes) == len(chunks) or (outcomes and outcomes[-1].error)
            if not complete:
                raise FrameError(f"{len(outcomes)} results for {len(chunks)} chunks")
            return outcomes

    async def _exchange(self, frame: frames.Outgoing) -> frames.Frame:
        """POST a frame; the answer's frame, or the failure sorted into retry or not.

        A 200 answer that fails the frame checks was damaged on the way (a wrong secret is
        refused with 401 before anything runs), so it is retried like a lost answer.
        """
        try:
            reply = await self.transport.post(frame, self.timeout)
            if reply.status == 200:
                if reply.reader:
                    return reply.reader.frame()
                return frames.decode(reply.body, self.secret)
        except asyncio.TimeoutError:
            raise PlatformFailure(
                f"no answer within timeout={self.timeout:g} s (the client's wait; the "
                "platform's own runtime limit answers 502 instead)",
                "timeout",
            ) from None
        except (OSError, aiohttp.ClientError) as exc:
            raise PlatformFailure(f"{type(exc).__name__}: {exc}", "connection") from None
        except BadSignature:  # our request's signature was accepted: the answer was altered
            raise PlatformFailure(
                "dropped a damaged answer: its signature does not match", "corrupt"
            ) from None
        except FrameError as exc:
            raise PlatformFailure(f"dropped a damaged answer: {exc}", "corrupt") from None
        text = bytes(reply.body[:2000]).decode(errors="replace").strip()
        if reply.status == 500 and text.startswith("lambda ") and "not found" in text:
            raise ExecutionError(
                f"lambda {self.lambda_name!r} is not deployed on {self.url} ({text}). "
                f"Run `lampy deploy --url {self.url} --name {self.lambda_name}` first."
            )
        if reply.status == 500 and text.startswith("lampy handler failed"):
            raise ExecutionError(
                f"lampy's handler at {self.endpoint} failed outside user code; is the deployed "
                f"lampy the same version as this one? (`lampy deploy` again) {text}"
            )
        if reply.status == 401:
            raise BadSignature(f"{self.endpoint} refused our frame (401): {text}")
        if reply.status == 429 or reply.status >= 500:
            first = text.splitlines()[0] if text else ""
            raise PlatformFailure(f"HTTP {reply.status}: {first}", f"http {reply.status}", text)
        raise ExecutionError(f"{self.endpoint} answered HTTP {reply.status}: {text}")


def _collected(offer: Offer | None, outcome: Outcome) -> Outcome:
    """An accepted outcome with the results its chunk stored read back from the client's disk
    (and their files removed); a result that cannot be read becomes the chunk's error."""
    if offer is None or outcome.error is not None:
        return outcome
    try:
        return Outcome(collect(outcome.value, offer))
    except RemoteArrayError as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def _describe_call(call: Any) -> str:
    """A (job, chunks, attempt) triple as messages show it."""
    try:
        job, chunks, attempt = call
        which = f"chunk {chunks[0]}" if len(chunks) == 1 else f"chunks {chunks[0]}-{chunks[-1]}"
        return f"job {str(job)[:8]} {which} attempt {attempt}"
    except (TypeError, ValueError, IndexError):
        return repr(call)[:80]


def _describe(frame: frames.Frame) -> str:
    """What an answer is, for a message about an answer that was not the one asked for."""
    if frame.kind == frames.RESULT and isinstance(frame.value, tuple) and frame.value:
        return f"the result for {_describe_call(frame.value[0])}"
    return f"a {frames.KINDS[frame.kind]} frame"


def _batches(count: int, size: int) -> list[tuple[int, ...]]:
    """Consecutive chunk indices in groups of `size`.

    >>> _batches(5, 2)
    [(0, 1), (2, 3), (4,)]
    """
    return [tuple(range(i, min(i + size, count))) for i in range(0, count, size)]


def _template(job: Job) -> bytes:
    """The job's (function, args, kwargs), with the function's own module pickled by value.

    A sandbox has only the standard library, numpy, cloudpickle and lampy, so a function from the
    user's module (or a test module) must travel by value, with the helpers it calls there.
    """
    module = sys.modules.get(getattr(job.function, "__module__", "") or "")
    if module is None or module.__name__ == "__main__" or _installed_remotely(module.__name__):
        return job.template
    with _pickle_lock:
        cloudpickle.register_pickle_by_value(module)
        try:
            return dumps((job.function, job.args, dict(job.kwargs)))
        except Exception as exc:
            raise SerializationError(
                f"cannot send {job.function.__qualname__} by value from module "
                f"{module.__name__}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            cloudpickle.unregister_pickle_by_value(module)


def _installed_remotely(module: str) -> bool:
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top in _REMOTE_PACKAGES


def prewarm(n: int, **options: Any) -> int:
    """Warm `n` sandboxes of the openlambda executor that calls here would use; returns the count.

    Options are those of `lampy.using(executor="openlambda", ...)`, which they override.
    """
    from lampy.runtime import executors
    from lampy.runtime._settings import resolve_options

    executor = executors.get("openlambda", {**resolve_options("openlambda"), **options})
    assert isinstance(executor, OpenLambdaExecutor)
    return executor.prewarm(n)
