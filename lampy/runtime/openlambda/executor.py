"""The `openlambda` executor: each chunk is one HTTP call to lampy's lambda on an OpenLambda worker.

`run()` is synchronous but the calls are asynchronous: one pooled aiohttp session lives on an
event loop in a background thread, so a caller that is itself inside a running loop (Jupyter)
works too. Bodies always carry Content-Length (OpenLambda reads a chunked body as empty).

Failures are sorted before anything is retried. Platform failures (connection refused or reset,
429, 502 and other 5xx, client timeouts) are retried with exponential backoff and jitter
(tenacity); a user exception comes back in-band with HTTP 200 and is never retried; a missing
lambda, a signature or version mismatch are not retried either, and their errors say what to do.
Chunks are pure, so a straggler gets a backup call; the first valid answer wins and every chunk
is counted once. When a job has far more tiny chunks than call slots, several ride in one call
(each still runs and answers on its own). Jobs longer than 2 s show a progress line on a
terminal (option progress="auto" | "on" | "off").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import cloudpickle
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from lampy.errors import (
    BadSignature,
    ExecutionError,
    FrameError,
    OptionError,
    RetriesExhausted,
    SerializationError,
)
from lampy.runtime.codec import dumps
from lampy.runtime.entry import Outcome
from lampy.runtime.executors.base import Executor
from lampy.runtime.job import Job
from lampy.runtime.openlambda import frames
from lampy.runtime.openlambda.secret import load_secret
from lampy.runtime.plan import Costs

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
_REMOTE_PACKAGES = {"numpy", "cloudpickle", "lampy"}  # the deploy tarball carries lampy
_pickle_lock = threading.Lock()


class PlatformFailure(Exception):
    """A failure of the platform, not of the chunk: worth another attempt."""


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
            reader = frames.Reader(prefix, self.secret)  # refuses oversized frames unread
            if reader.total != length:
                raise FrameError(f"answer of {length:,} bytes does not match its frame")
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
    sends: int = 0


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
        self.endpoint = f"{self.url}/run/{name}"
        self.concurrency, self.timeout = concurrency, timeout
        self.attempts, self.backoff, self.auto_prewarm = attempts, backoff, prewarm
        self.batch, self.progress = batch, progress
        self.secret = load_secret()
        self.transport = transport or AiohttpTransport(self.endpoint, concurrency, self.secret)
        self.backups = 0  # backup calls sent for stragglers, for tests and monitoring
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
        template = _template(job)
        payload = len(template) + sum(a.nbytes for a in job.whole)
        state = _JobState(job, template, inline=payload <= INLINE_BYTES)
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
        stale = 0
        while len(seen) < n and stale < 2 and time.monotonic() < deadline:
            before = len(seen)
            calls = [self._ping() for _ in range(n)]
            for answer in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(answer, ExecutionError):
                    raise answer
                if isinstance(answer, int):
                    seen.add(answer)
            stale = stale + 1 if len(seen) == before else 0
        return len(seen)

    async def _ping(self) -> int:
        frame = await self._exchange(frames.encode(frames.PING, PREWARM_HOLD_S, self.secret))
        if frame.kind != frames.PONG or not isinstance(frame.value, int):
            raise FrameError(f"expected a pong, got a {frames.KINDS[frame.kind]} frame")
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
                if task not in copies:  # a cancelled twin of an answered call
                    continue
                copies.remove(task)
                if task.cancelled() or task.exception() is not None:
                    if copies:  # the other copy may still give a valid answer
                        continue
                    raise task.exception() or asyncio.CancelledError()
                answered += 1
                durations.append(loop.time() - started[unit])
                for twin in running.pop(unit):
                    twin.cancel()
                # a call stops at its first user error, so it may answer fewer chunks
                outcomes = dict(zip(units[unit], task.result(), strict=False))
                done |= outcomes
                progress.update(len(done))
                if any(o.error is not None for o in outcomes.values()):
                    return done
            return done
        finally:
            progress.close()
            tasks = [task for copies in running.values() for task in copies]
            for task in tasks:
                task.cancel()
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

        The first attempt runs directly: tenacity's per-attempt cost shows at 10,000 chunks.
        """
        causes: list[str] = []

        async def attempt() -> list[Outcome]:
            try:
                return await self._call(state, chunks)
            except PlatformFailure as exc:
                causes.append(str(exc))
                raise

        with contextlib.suppress(PlatformFailure):
            return await attempt()
        if self.attempts > 1:
            await asyncio.sleep(self._backoff(1))
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.attempts - 1),
                wait=lambda retry: self._backoff(retry.attempt_number + 1),
                retry=retry_if_exception_type(PlatformFailure),
                reraise=True,
            )
            with contextlib.suppress(PlatformFailure):
                return await retrying(attempt)
        start, stop = state.job.chunks[chunks[0]][0], state.job.chunks[chunks[-1]][1]
        which = f"chunk {chunks[0]}" if len(chunks) == 1 else f"chunks {chunks[0]}-{chunks[-1]}"
        tried = "\n".join(f"  attempt {i}: {cause}" for i, cause in enumerate(causes, 1))
        raise RetriesExhausted(
            f"{which} (rows {start}:{stop}) failed on all {len(causes)} attempts at "
            f"{self.endpoint}; the platform, not the chunk, failed each time:\n{tried}\n"
            f"Check the worker (is it running? GET {self.url}/status), or raise "
            "attempts= / timeout= for a busy platform."
        )

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter: about backoff * 2**(failures - 1), at most 2 s."""
        return min(2.0, self.backoff * 2.0 ** (failures - 1)) + random.uniform(0, self.backoff)

    async def _call(self, state: _JobState, chunks: tuple[int, ...]) -> list[Outcome]:
        """One attempt: send the task (the template only where needed) and read the results."""
        job = state.job
        parts = tuple(tuple(a[slice(*job.chunks[c])] for a in job.split) for c in chunks)
        with_template = state.inline or state.sends < self.concurrency
        while True:
            if with_template:
                state.sends += 1
            task = (
                job.id,
                chunks,
                state.template if with_template else None,
                job.whole if with_template else None,
                parts,
            )
            frame = await self._exchange(frames.encode(frames.TASK, task, self.secret))
            if frame.kind == frames.MISSING and not with_template:
                with_template = True  # this sandbox has not seen the job yet
                continue
            if frame.kind != frames.RESULT:
                raise FrameError(f"expected a result, got a {frames.KINDS[frame.kind]}")
            outcomes = [Outcome(value, error, traceback) for value, error, traceback in frame.value]
            complete = len(outcomes) == len(chunks) or (outcomes and outcomes[-1].error)
            if not complete:
                raise FrameError(f"{len(outcomes)} results for {len(chunks)} chunks")
            return outcomes

    async def _exchange(self, frame: frames.Outgoing) -> frames.Frame:
        """POST a frame; the answer's frame, or the failure sorted into retry or not."""
        try:
            reply = await self.transport.post(frame, self.timeout)
        except asyncio.TimeoutError:
            raise PlatformFailure(
                f"no answer within timeout={self.timeout:g} s (the client's wait; the "
                "platform's own runtime limit answers 502 instead)"
            ) from None
        except (OSError, aiohttp.ClientError) as exc:
            raise PlatformFailure(f"{type(exc).__name__}: {exc}") from None
        if reply.status == 200:
            return reply.reader.frame() if reply.reader else frames.decode(reply.body, self.secret)
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
            raise PlatformFailure(f"HTTP {reply.status}: {text.splitlines()[0] if text else ''}")
        raise ExecutionError(f"{self.endpoint} answered HTTP {reply.status}: {text}")


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
    from lampy.runtime.settings import resolve_options

    executor = executors.get("openlambda", {**resolve_options("openlambda"), **options})
    assert isinstance(executor, OpenLambdaExecutor)
    return executor.prewarm(n)
