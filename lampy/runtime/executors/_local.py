"""The local executor (the default): a pool of worker processes on this machine.

The pool starts on first use and is reused across calls. A job's arrays are copied once into a
shared-memory arena that the workers map, so array bytes are never pickled per chunk; each worker
maps only its chunk's rows. Large results come back in shared memory too and are used in place.
References (lampy.remote) are not copied in: each worker reads, or maps from a local file, its
own rows.
A worker that dies, or runs a chunk longer than `timeout` seconds (it is then killed), is replaced
and its chunk retried as the chunk scheduler says (`attempts`); then the chunk is lost.

Workers are fresh interpreters (`python -m lampy.runtime.executors._local_worker`), not forks, so
a script without an `if __name__ == "__main__"` guard is never re-imported by the pool, and no
lock held by a thread of the caller is inherited.

One pool per size serves every option set: `timeout` and `attempts` are per call, so ten
different timeouts still use the same workers. Workers watch this process's lifeline
(lampy.runtime._sweep) and exit the moment it dies, even mid-chunk and even by SIGKILL; SIGTERM
unwinds the caller like SIGINT, stopping the pool on the way out.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from lampy._errors import OptionError, RemoteError, WorkerLost
from lampy.runtime._codec import layout_of, loads
from lampy.runtime._job import Job, SplitArray, is_row_source
from lampy.runtime._plan import Costs
from lampy.runtime._scheduler import ATTEMPTS, ChunkScheduler, check_attempts
from lampy.runtime._shm import anonymous_file, load_from_file
from lampy.runtime._sweep import exit_on_sigterm, lifeline
from lampy.runtime._worker_side import TEMPLATES_KEPT, Outcome
from lampy.runtime.executors._base import Executor
from lampy.runtime.executors._local_worker import ArrayRef

TIMEOUT_S = 3600.0  # per chunk by default: bounds a hung chunk, spares any sane long one
# Measured by bench/bench_overheads.py on the 2-core reference machine.
STARTUP_S = 0.17  # starting the pool: interpreters importing numpy, in parallel
SECONDS_PER_BYTE = 1 / 6.5e9  # into the arena and mapped by a worker
SECONDS_PER_RESULT_BYTE = 1 / 1.4e9  # written to fresh shared memory, then joined (copy row)
SECONDS_PER_CHUNK = 1.1e-4  # one chunk's messages and scheduling
ARENA_KEPT_BYTES = 1 << 30  # a larger arena is released after its job instead of reused
ADVICE = (
    "A worker killed by SIGKILL is often the out-of-memory killer: ask for more chunks "
    "(chunks=N). A chunk that needs more time: lampy.using(executor='local', timeout=...)."
)


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _Arena:
    """A shared-memory file holding a job's arrays in C order, reused from call to call."""

    def __init__(self) -> None:
        self.id = 0
        self.fd: int | None = None
        self.size = 0
        self.map: mmap.mmap | None = None

    def place(self, arrays: tuple[SplitArray, ...]) -> list[ArrayRef]:
        """Copy the arrays in; row sources stay as they are (each worker reads its own rows)."""
        layout, total = layout_of([0 if is_row_source(a) else a.nbytes for a in arrays])
        if self.fd is None or total > self.size:
            self.release()
            self.size = max(total, mmap.ALLOCATIONGRANULARITY)
            self.fd = anonymous_file(self.size)
            self.map = mmap.mmap(self.fd, self.size)
            self.id += 1
        refs: list[ArrayRef] = []
        for (offset, _), array in zip(layout, arrays, strict=True):
            if not isinstance(array, np.ndarray):
                refs.append(array)
                continue
            target: np.ndarray = np.ndarray(
                array.shape, array.dtype, buffer=self.map, offset=offset
            )
            np.copyto(target, array, casting="no")
            refs.append((offset, array.dtype, array.shape))
        return refs

    def release(self) -> None:
        if self.map is not None:
            self.map.close()
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.map, self.size = None, None, 0


class _Worker:
    """One worker process and its end of a private socket pair."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        fds = (theirs.fileno(), lifeline())
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lampy.runtime.executors._local_worker", *map(str, fds)],
                pass_fds=fds,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        self.conn = Connection(ours.detach())
        self.ready = False  # its imports are done: a chunk's clock starts only then
        self.arena_id = 0
        self.jobs: deque[str] = deque(maxlen=TEMPLATES_KEPT)
        self.conn.send(("path", sys.path))

    def send(
        self, job: Job, chunk: int, arena: _Arena, split: list[ArrayRef], whole: list[ArrayRef]
    ) -> None:
        if self.arena_id != arena.id:
            assert arena.fd is not None
            self.conn.send(("arena", arena.id))
            send_handle(self.conn, arena.fd, self.process.pid)
            self.arena_id = arena.id
        if job.id not in self.jobs:
            self.conn.send(("job", job.id, job.template, split, whole))
            self.jobs.append(job.id)
        self.conn.send(("chunk", job.id, chunk, *job.chunks[chunk]))

    def receive(self) -> Outcome | None:
        """The chunk's outcome, or None for the worker's "ready" message."""
        message = self.conn.recv()
        if message[0] == "ready":
            self.ready = True
            return None
        if message[0] == "ok":
            _, _, payload, layout = message
            fd = recv_handle(self.conn) if layout else None
            return Outcome(value=load_from_file(payload, layout, fd))
        _, _, error, traceback = message
        try:
            exc = loads(error)
        except Exception as why:
            exc = RemoteError(f"an exception that cannot be unpickled here ({why})")
        return Outcome(error=exc, traceback=traceback)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_status(self) -> str:
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            name = signal.Signals(-code).name
            hint = (
                " (the kernel's out-of-memory killer sends this too)" if name == "SIGKILL" else ""
            )
            return f"was killed by {name}{hint}"
        return f"exited with code {code}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


class _Pool:
    """The worker processes of one size and their arena; one job at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: list[_Worker] = []
        self.arena = _Arena()
        self.lock = threading.Lock()

    def fill(self) -> None:
        """Start workers up to the pool's size (they import in the background)."""
        if not self.workers:
            exit_on_sigterm()
        while len(self.workers) < self.size:
            self.workers.append(self._start())

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []
        self.arena.release()

    def _start(self) -> _Worker:
        env = dict(os.environ)
        threads = str(max(1, available_cpus() // self.size))
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        return _Worker(env)

    def replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        fresh = self._start()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def drop(self, worker: _Worker) -> None:
        """Stop a worker left mid-chunk; the next job starts its replacement."""
        worker.stop()
        self.workers.remove(worker)


_pools: dict[int, _Pool] = {}
_pools_lock = threading.Lock()


def _pool(size: int) -> _Pool:
    """The pool of `size` workers this process shares across option sets."""
    with _pools_lock:
        if size not in _pools:
            _pools[size] = _Pool(size)
        return _pools[size]


class LocalExecutor(Executor):
    name = "local"
    option_types = {"workers": int, "timeout": float, "attempts": int}

    def __init__(
        self, workers: int | None = None, timeout: float = TIMEOUT_S, attempts: int = ATTEMPTS
    ) -> None:
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise OptionError(f"workers must be a positive int; got {workers!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise OptionError(
                f"timeout must be seconds per chunk > 0 (float('inf') for none); got {timeout!r}"
            )
        self.size = workers or available_cpus()
        self.timeout = float(timeout)
        self.attempts = check_attempts(attempts)
        self.pool = _pool(self.size)

    def costs(self) -> Costs:
        return Costs(
            workers=self.size,
            startup_s=0.0 if self.is_warm() else STARTUP_S,
            seconds_per_byte=SECONDS_PER_BYTE,
            seconds_per_chunk=SECONDS_PER_CHUNK,
            seconds_per_result_byte=SECONDS_PER_RESULT_BYTE,
        )

    def is_warm(self) -> bool:
        return bool(self.pool.workers)

    def start(self) -> None:
        """Start the worker processes (they import in the background; nothing waits)."""
        with self.pool.lock:
            self.pool.fill()

    def run(self, job: Job) -> dict[int, Outcome]:
        pool = self.pool
        with pool.lock:
            pool.fill()
            refs = pool.arena.place(job.split + job.whole)
            try:
                return self._dispatch(job, refs[: len(job.split)], refs[len(job.split) :])
            finally:
                if pool.arena.size > ARENA_KEPT_BYTES:
                    pool.arena.release()

    def close(self) -> None:
        """Stop the pool's workers (shared with other option sets: the next call restarts)."""
        with self.pool.lock:
            self.pool.close()

    def worker_pids(self) -> list[int]:
        """The pool's process ids (for tests and monitoring)."""
        return [w.process.pid for w in self.pool.workers]

    def _dispatch(
        self, job: Job, split: list[ArrayRef], whole: list[ArrayRef]
    ) -> dict[int, Outcome]:
        """Keep every worker busy; a worker that dies or passes its chunk's deadline is
        replaced and the scheduler decides whether its chunk runs again."""
        pool, arena = self.pool, self.pool.arena
        scheduler = ChunkScheduler(job, self.attempts, ADVICE)
        idle = list(pool.workers)
        busy: dict[Any, tuple[_Worker, int, float]] = {}  # conn -> worker, chunk, deadline
        try:
            while not scheduler.done:
                while idle and (chunk := scheduler.next()) is not None:
                    worker = idle.pop()
                    try:
                        worker.send(job, chunk, arena, split, whole)
                    except OSError:  # died while idle: replace it; the chunk never ran
                        idle.append(pool.replace(worker))
                        scheduler.again(chunk)
                        continue
                    scheduler.start(chunk, time.monotonic())
                    busy[worker.conn] = (worker, chunk, self._deadline(worker))
                wake = min(deadline for _, _, deadline in busy.values()) - time.monotonic()
                ready = wait(list(busy), timeout=max(0.0, wake) if wake < 86400 else None)
                now = time.monotonic()
                expired = [] if ready else [c for c, (_, _, end) in busy.items() if end <= now]
                for conn in ready:
                    worker, chunk, _ = busy.pop(conn)
                    try:
                        outcome = worker.receive()
                    except (EOFError, OSError):
                        idle.append(pool.replace(worker))
                        scheduler.failed(
                            chunk, WorkerLost(f"worker pid {worker.pid} {worker.exit_status()}")
                        )
                        continue
                    if outcome is None:  # "ready": the chunk's clock starts now
                        busy[conn] = (worker, chunk, self._deadline(worker))
                        continue
                    idle.append(worker)
                    scheduler.finished(chunk, outcome, now)
                for conn in expired:
                    worker, chunk, _ = busy.pop(conn)
                    worker.process.kill()
                    idle.append(pool.replace(worker))
                    why = (
                        f"did not finish the chunk within timeout={self.timeout:g}s and was killed"
                    )
                    scheduler.failed(chunk, WorkerLost(f"worker pid {worker.pid} {why}"))
            return scheduler.outcomes
        finally:
            for worker, _, _ in busy.values():  # abandoned mid-chunk: their state is unknown
                pool.drop(worker)

    def _deadline(self, worker: _Worker) -> float:
        """When a chunk just sent to `worker` is overdue (never, until the worker is ready)."""
        return time.monotonic() + self.timeout if worker.ready else float("inf")
