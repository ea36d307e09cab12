"""The local executor (the default): a pool of worker processes on this machine.

The pool starts on first use and is reused across calls. Arrays travel through shared memory,
never pickled per chunk (ARCHITECTURE.md, "The local pool's data path"):
- an input already in shared memory (a region's result, `lampy.empty`, `lampy.asshared`) is
  passed by descriptor and offset; other inputs are copied into the pool's arena by threads,
  chunk by chunk, while the first chunks already run;
- an elemwise job's workers write their rows into one shared output that the caller returns
  as an ordinary ndarray (no copy out); reductions send their partials back, large buffers
  in shared memory too;
- references (lampy.remote) are not copied in: each worker reads, or maps from a local file,
  its own rows.
A worker that dies, or runs a chunk longer than `timeout` seconds (it is then killed), is replaced
and its chunk retried as the chunk scheduler says (`attempts`); then the chunk is lost. A retried
chunk rewrites its own rows of the output, and a worker left mid-chunk is killed before the call
returns, so nothing writes into a result after it is returned.

Workers are fresh interpreters (`python -m lampy.runtime.executors._local_worker`), not forks, so
a script without an `if __name__ == "__main__"` guard is never re-imported by the pool, and no
lock held by a thread of the caller is inherited. Started ahead of need (`start`), they import
at idle priority and take no CPU time from the caller meanwhile.

One pool per size serves every option set: `timeout` and `attempts` are per call, so ten
different timeouts still use the same workers. Workers watch this process's lifeline
(lampy.runtime._sweep) and exit the moment it dies, even mid-chunk and even by SIGKILL; SIGTERM
unwinds the caller like SIGINT, stopping the pool on the way out.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from lampy._errors import OptionError, RemoteError, WorkerLost
from lampy.runtime import _serial as serial
from lampy.runtime import _shm as shm
from lampy.runtime._codec import layout_of, loads
from lampy.runtime._combine import Leaf
from lampy.runtime._job import Job, is_row_source
from lampy.runtime._plan import Costs
from lampy.runtime._scheduler import ATTEMPTS, ChunkScheduler, check_attempts
from lampy.runtime._shm import anonymous_file, load_from_file, locate, output
from lampy.runtime._sweep import exit_on_sigterm, lifeline
from lampy.runtime._tree import leaves, map_leaves
from lampy.runtime._worker_side import TEMPLATES_KEPT, Outcome
from lampy.runtime.executors._base import Executor
from lampy.runtime.executors._caller_memory import readable
from lampy.runtime.executors._local_worker import (
    ASK,
    ArrayRef,
    CallerArray,
    FileArray,
    Output,
    recv_fds,
    send_fds,
)

TIMEOUT_S = 3600.0  # per chunk by default: bounds a hung chunk, spares any sane long one
# Measured by bench/bench_overheads.py and bench/bench_scale.py on the 2-core reference machine.
# Start-up took 0.16-0.40 s there when quiet, and 4-9 s with other jobs running: so "auto" never
# waits for it (Costs.starts_in_background); this estimate only decides whether starting the
# pool after a call is worth it.
STARTUP_S = 0.4
SECONDS_PER_BYTE = 1 / 6.5e9  # copied into the arena (by threads, pipelined) and mapped
SECONDS_PER_RESULT_BYTE = 1 / 4e9  # written by the workers into the shared output (fresh pages)
SECONDS_PER_CHUNK = 1.1e-4  # one chunk's messages and scheduling, at the least
# A chunk's round trip beyond its work (messages, both processes waking up) is measured on
# every chunk and averaged with this weight: on a busy machine it was 1-1.5 ms, not 0.11 ms
# (bench/bench_scale.py, k-means partials), and auto must price what it meets.
ROUND_TRIP_WEIGHT = 0.2
ARENA_KEPT_BYTES = 1 << 30  # a larger arena is released after its job instead of reused
COPY_BLOCK_BYTES = 8 << 20  # shared arrays are copied in blocks this size, by several threads
ADVICE = (
    "A worker killed by SIGKILL is often the out-of-memory killer: ask for more chunks "
    "(chunks=N). A chunk that needs more time: lampy.using(executor='local', timeout=...)."
)
# A worker started ahead of need imports at idle priority (it then takes no CPU time from the
# caller, which runs its call itself meanwhile) and returns to normal priority when it is ready,
# or as soon as a job waits for it.
_IDLE = getattr(os, "SCHED_IDLE", None)


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _normal_priority(pid: int) -> None:
    """Every thread of process `pid` back to normal priority (BLAS starts its threads while
    the worker imports, at idle priority; a policy is per thread)."""
    if _IDLE is None:
        return
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for tid in threads:
        # gone, or not ours to change: it finishes importing at idle priority
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


class _Arena:
    """A shared-memory file for a job's arrays that do not live in shared memory already,
    reused from call to call. Copies into it are made by threads, chunk by chunk in order, so
    the first chunks start while later rows are still being copied."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.size = 0
        self.map: mmap.mmap | None = None

    def reserve(self, total: int) -> None:
        if self.fd is None or total > self.size:
            self.release()
            self.size = max(total, mmap.ALLOCATIONGRANULARITY)
            self.fd = anonymous_file(self.size)
            self.map = mmap.mmap(self.fd, self.size)

    def view(self, offset: int, like: np.ndarray) -> np.ndarray:
        view: np.ndarray = np.ndarray(like.shape, like.dtype, buffer=self.map, offset=offset)
        return view

    def release(self) -> None:
        if self.map is not None:
            self.map.close()
        if self.fd is not None:
            shm.retire(self.fd)  # workers keep it mapped until told
        self.fd, self.map, self.size = None, None, 0


def _copy(target: np.ndarray, source: np.ndarray) -> None:
    start = time.perf_counter()
    np.copyto(target, source, casting="no")
    serial.add("copy threads", time.perf_counter() - start)


class _Placed:
    """Where a job's arrays are for its workers, and which chunks' rows are there yet.

    Arrays already in shared memory (C-contiguous, in a segment: `lampy.empty`, a region's
    result) are passed by descriptor and offset: no byte is copied. Others are copied into the
    arena by `copier` threads: shared arrays first (in blocks, in parallel), then each chunk's
    rows in chunk order. A chunk whose rows are not there yet when a worker is free for it
    does not wait: when the workers can read this process's memory (`readers` > 0), that
    worker copies its rows itself, from here (`rows_for`). The first `readers` chunks (one
    per worker) always do, so they leave at once, and the copy threads fill the arena for the
    later ones meanwhile (a copy at memory speed: reading another process's memory is about
    3x slower per byte). The caller never waits for a copy that grows with the data.
    """

    def __init__(self, job: Job, arena: _Arena, copier: ThreadPoolExecutor, readers: int) -> None:
        arrays = job.split + job.whole
        homes = [None if is_row_source(a) else locate(a) for a in arrays]  # type: ignore[arg-type]
        copied = [
            0 if is_row_source(a) or h is not None else a.nbytes
            for a, h in zip(arrays, homes, strict=True)
        ]
        layout, total = layout_of(copied)
        self.fds: list[int] = []
        refs: list[ArrayRef] = []
        targets: list[np.ndarray | None] = []
        if any(copied):
            arena.reserve(total)
            assert arena.fd is not None
            self.fds.append(arena.fd)
        for array, home, (offset, nbytes) in zip(arrays, homes, layout, strict=True):
            targets.append(None)
            if is_row_source(array):
                refs.append(array)  # type: ignore[arg-type]
                continue
            assert isinstance(array, np.ndarray)
            if home is not None:
                fd, at = home
                if fd not in self.fds:
                    self.fds.append(fd)
                refs.append(FileArray(self.fds.index(fd), at, array.dtype, array.shape))
                continue
            if not nbytes:  # nothing to map: the worker makes it
                refs.append(FileArray(-1, 0, array.dtype, array.shape))
                continue
            refs.append(FileArray(0, offset, array.dtype, array.shape))
            targets[-1] = arena.view(offset, array)
        count = len(job.split)
        self.split, self.whole = refs[:count], refs[count:]
        # the split refs of a chunk its worker reads from here, when any array would be copied
        # (and every such array can be read where it is)
        sources = list(zip(self.split, targets[:count], job.split, strict=True))
        direct = [
            _by_address(array) if target is not None else ref for ref, target, array in sources
        ]
        readable = all(target is None or _readable_here(array) for _, target, array in sources)
        self.direct = direct if readers and readable and direct != self.split else None
        self.went_direct: set[int] = set(range(readers)) if self.direct is not None else set()
        self.shared: list[Future[None]] = []
        for target, array in zip(targets[count:], job.whole, strict=True):
            if target is not None and target.nbytes <= COPY_BLOCK_BYTES:
                with serial.timing("copy"):  # at once: waking a thread up could take longer
                    np.copyto(target, array, casting="no")
            elif target is not None:
                self.shared += _blocks(copier, target, array)
        self.ready: list[list[Future[None]]] = []
        for chunk, (start, stop) in enumerate(job.chunks):
            pending: list[Future[None]] = []
            for target, array in zip(targets[:count], job.split, strict=True):
                if chunk in self.went_direct:
                    break
                if target is not None and stop > start:  # in blocks: all threads on a chunk
                    pending += _blocks(copier, target[start:stop], array[start:stop])
            self.ready.append(pending)

    def rows_for(self, chunk: int) -> list[ArrayRef] | None:
        """Where the chunk's worker finds its rows: None for the job's refs (its rows are in
        the arena; waits for them only when workers cannot read here), or refs by address
        in this process's memory (the worker copies them; their arena copies are dropped).
        The shared arrays are in place when this returns."""
        _wait(self.shared)
        if chunk in self.went_direct:
            return self.direct
        pending = self.ready[chunk]
        if self.direct is not None and not all(f.done() for f in pending):
            for future in pending:
                future.cancel()  # one already running finishes into rows nobody reads
            self.went_direct.add(chunk)
            return self.direct
        _wait(pending)
        return None

    def cancel(self) -> None:
        """Drop copies not started yet (the job ended early) and wait for the running ones."""
        every = [self.shared, *self.ready]
        for pending in every:
            for future in pending:
                future.cancel()
        for pending in every:
            for future in pending:
                if not future.cancelled():
                    future.exception()


def _wait(pending: list[Future[None]]) -> None:
    """Block until these copies are done (timed as the caller's "copy" wait); a failed copy
    raises here."""
    if pending and not all(f.done() for f in pending):
        with serial.timing("copy"):
            for future in pending:
                future.exception()
    for future in pending:
        future.result()


def _readable_here(array: Any) -> bool:
    """Whether workers can copy their rows of `array` from this process's memory."""
    return type(array) is np.ndarray and array.nbytes > 0 and array.flags.c_contiguous


def _by_address(array: Any) -> CallerArray:
    """Where `array`'s bytes are in this process (valid for C-contiguous arrays only)."""
    assert isinstance(array, np.ndarray)
    return CallerArray(int(array.__array_interface__["data"][0]), array.dtype, array.shape)


def _blocks(
    copier: ThreadPoolExecutor, target: np.ndarray, source: np.ndarray
) -> list[Future[None]]:
    """Copy `source` into `target` in blocks of rows, by several threads."""
    if target.ndim == 0 or target.shape[0] < 2:
        return [copier.submit(_copy, target, source)]
    row_bytes = max(1, target.nbytes // target.shape[0])
    step = max(1, COPY_BLOCK_BYTES // row_bytes)
    return [
        copier.submit(_copy, target[i : i + step], source[i : i + step])
        for i in range(0, target.shape[0], step)
    ]


class _Output:
    """The shared output an elemwise job's workers write their rows into, made when the first
    chunk describes its rows (its structure and each array's trailing shape and dtype)."""

    def __init__(self, spec: Any, rows: int) -> None:
        specs: list[Leaf] = leaves(spec)
        layout, total = layout_of([rows * leaf.row_bytes for leaf in specs])
        self.spec = spec
        self.offsets = tuple(offset for offset, _ in layout)
        mapped, self.fd = output(total)
        arrays = iter(
            np.ndarray((rows, *leaf.trailing), leaf.dtype, buffer=mapped, offset=offset)
            for leaf, offset in zip(specs, self.offsets, strict=True)
        )
        self.arrays = map_leaves(spec, lambda leaf: next(arrays))

    def described(self, file: int) -> Output:
        return Output(self.spec, self.offsets, file)

    def rows(self, start: int, stop: int) -> Any:
        """A chunk's result: views of its rows of each array."""
        return map_leaves(self.arrays, lambda array: array[start:stop])


class _Worker:
    """One worker process and its end of a private socket pair."""

    def __init__(
        self, env: dict[str, str], idle: bool, probe: tuple[int, int, bytes] | None
    ) -> None:
        ours, theirs = socket.socketpair()
        fds = (theirs.fileno(), lifeline())
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lampy.runtime.executors._local_worker", *map(str, fds)]
                + (["idle"] if idle else []),
                pass_fds=fds,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        if idle:  # at once: it has only begun to import
            with contextlib.suppress(OSError):
                os.sched_setscheduler(self.process.pid, os.SCHED_IDLE, os.sched_param(0))
        self.conn = Connection(ours.detach())
        self.ready = False  # its imports are done: a chunk's clock starts only then
        self.sent_at = 0.0  # when its chunk left (perf_counter; 0: before it was ready)
        self.busy = 0.0  # the seconds its last chunk took in the worker, as it said
        self.reads = False  # it read the caller's probe: it can copy rows from our memory
        self.idle = idle
        self.jobs: deque[str] = deque(maxlen=TEMPLATES_KEPT)
        self.conn.send(("path", sys.path, probe))

    def hurry(self) -> None:
        """A job waits for this worker: back to normal priority if it started at idle."""
        if self.idle:
            _normal_priority(self.pid)
            self.idle = False

    def poll_ready(self) -> bool:
        """Whether its imports are done (reads its "ready" message if it came)."""
        if not self.ready and self.conn.poll(0):
            message = self.conn.recv()
            assert message[0] == "ready", message
            self.ready, self.reads = True, bool(message[1])
        return self.ready

    def send(
        self,
        job: Job,
        chunk: int,
        placed: _Placed,
        rows: list[ArrayRef] | None,
        output: _Output | None,
        joins: bool,
    ) -> None:
        with serial.timing("send"):
            if job.id not in self.jobs:
                self.conn.send(("job", job.id, job.template, placed.split, placed.whole))
                self.jobs.append(job.id)
            fds = list(placed.fds)
            where: Output | str | None = None
            if output is not None:
                where = output.described(len(fds))
                fds.append(output.fd)
            elif joins:
                where = ASK
            self.conn.send(("chunk", job.id, chunk, *job.chunks[chunk], rows, len(fds), where))
            send_fds(self.conn, fds)
            self.sent_at = time.perf_counter() if self.ready else 0.0  # start-up is not a trip

    def answer(self, output: _Output | None) -> None:
        """Tell a worker that described its rows where they go (None: send them back)."""
        if output is None:
            self.conn.send(("out", None, 0))
            return
        self.conn.send(("out", output.described(-1), 1))  # the worker numbers the file
        send_fds(self.conn, [output.fd])

    def receive(self) -> tuple[str, Any]:
        """The worker's next message: ("ready", None), ("spec", spec), ("wrote", None) or
        ("outcome", Outcome)."""
        message = self.conn.recv()
        kind = message[0]
        if kind == "ready":
            self.ready, self.reads = True, bool(message[1])
            return "ready", None
        if kind == "spec":
            return kind, message[2]
        self.busy = message[-1]
        if kind == "wrote":
            return kind, None
        if kind == "ok":
            _, _, payload, layout, _ = message
            fd = recv_fds(self.conn, 1)[0] if layout else None
            return "outcome", Outcome(value=load_from_file(payload, layout, fd))
        _, _, error, traceback, _ = message
        try:
            exc = loads(error)
        except Exception as why:
            exc = RemoteError(f"an exception that cannot be unpickled here ({why})")
        return "outcome", Outcome(error=exc, traceback=traceback)

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
    """The worker processes of one size, their arena and copy threads; one job at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: list[_Worker] = []
        self.arena = _Arena()
        self.copier = ThreadPoolExecutor(size, thread_name_prefix="lampy-copy")
        self.lock = threading.Lock()
        self.started_at = 0.0
        self.forgotten: list[int] = []  # inodes the workers are to unmap
        # bytes workers read back from this process's memory at start-up, to show they can
        self.probe = np.frombuffer(os.urandom(16), np.uint8).copy()
        self.may_read: bool | None = None  # readable(), asked once
        self.round_trip = SECONDS_PER_CHUNK * size  # a chunk's seconds beyond its work (average)
        self._forgotten_lock = threading.RLock()  # finalizers run in any thread
        shm.on_retire(self._retired)

    def _retired(self, inodes: list[int]) -> None:
        """Shared files were let go: the workers unmap them now if the pool is idle, else
        when its job ends."""
        with self._forgotten_lock:
            self.forgotten += inodes
        if self.lock.acquire(blocking=False):
            try:
                self.forget()
            finally:
                self.lock.release()

    def forget(self) -> None:
        """Tell the workers which files to unmap (under `lock`)."""
        with self._forgotten_lock:
            inodes, self.forgotten = self.forgotten, []
        if inodes:
            for worker in self.workers:
                with contextlib.suppress(OSError):  # gone: its mappings went with it
                    worker.conn.send(("forget", inodes))

    def fill(self, idle: bool = False) -> None:
        """Start workers up to the pool's size (they import in the background)."""
        if not self.workers:
            exit_on_sigterm()
            self.started_at = time.monotonic()
        while len(self.workers) < self.size:
            self.workers.append(self._start(idle))

    def ready(self) -> bool:
        """Whether every worker has finished starting (none would make a job wait). Workers
        still importing at idle priority well past the usual start-up (a busy machine gives
        idle processes no time) go back to normal priority, so the pool does start."""
        if len(self.workers) == self.size and all(w.poll_ready() for w in self.workers):
            return True
        if time.monotonic() - self.started_at > 2 * STARTUP_S:
            for worker in self.workers:
                worker.hurry()
        return False

    def timed(self, round_trip: float) -> None:
        """A chunk took `round_trip` seconds more than its work: averaged in."""
        weight = ROUND_TRIP_WEIGHT
        self.round_trip = (1 - weight) * self.round_trip + weight * max(0.0, round_trip)

    def reads_caller(self) -> bool:
        """Whether every worker is up and has shown it can read this process's memory (a
        job's inputs then need no copy here; a cold pool's first job copies them)."""
        return bool(self.workers) and all(w.ready and w.reads for w in self.workers)

    def _probe(self) -> tuple[int, int, bytes] | None:
        if self.may_read is None:
            self.may_read = readable()
        if not self.may_read:
            return None
        address = int(self.probe.__array_interface__["data"][0])
        return os.getpid(), address, self.probe.tobytes()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []
        self.arena.release()

    def _start(self, idle: bool = False) -> _Worker:
        env = dict(os.environ)
        threads = str(max(1, available_cpus() // self.size))
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        return _Worker(env, idle and _IDLE is not None, self._probe())

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
            startup_s=self._startup_left(),
            seconds_per_byte=SECONDS_PER_BYTE,
            # the planner adds this per chunk; each worker pays its chunks' round trips in turn
            seconds_per_chunk=max(SECONDS_PER_CHUNK, self.pool.round_trip / self.size),
            seconds_per_result_byte=SECONDS_PER_RESULT_BYTE,
            starts_in_background=True,
        )

    def _startup_left(self) -> float:
        """Seconds a job made now would wait for workers to finish starting (an estimate)."""
        if self.is_warm():
            return 0.0
        if not self.pool.workers:
            return STARTUP_S
        return max(STARTUP_S / 4, STARTUP_S - (time.monotonic() - self.pool.started_at))

    def is_warm(self) -> bool:
        """Every worker is up and has imported what it needs (a job now waits for nobody)."""
        if not self.pool.lock.acquire(blocking=False):
            return bool(self.pool.workers)  # a job is running on the pool: it is up
        try:
            return self.pool.ready()
        finally:
            self.pool.lock.release()

    def start(self) -> None:
        """Start the worker processes in the background: they import at idle priority, so
        they take no CPU time from this process meanwhile, and nothing waits for them."""
        with self.pool.lock:
            self.pool.fill(idle=True)

    def run(self, job: Job) -> dict[int, Outcome]:
        pool = self.pool
        with pool.lock, serial.timing("job"):
            pool.fill()
            readers = pool.size if pool.reads_caller() else 0
            placed = _Placed(job, pool.arena, pool.copier, readers)
            try:
                pool.forget()
                return self._dispatch(job, placed)
            finally:
                placed.cancel()
                if pool.arena.size > ARENA_KEPT_BYTES:
                    pool.arena.release()
                pool.forget()

    def close(self) -> None:
        """Stop the pool's workers (shared with other option sets: the next call restarts)."""
        with self.pool.lock:
            self.pool.close()

    def worker_pids(self) -> list[int]:
        """The pool's process ids (for tests and monitoring)."""
        return [w.process.pid for w in self.pool.workers]

    def _dispatch(self, job: Job, placed: _Placed) -> dict[int, Outcome]:
        """Keep every worker busy; a worker that dies or passes its chunk's deadline is
        replaced and the scheduler decides whether its chunk runs again.

        An elemwise job's workers write their rows into one shared output, made when the first
        of them describes its rows; each such chunk's outcome is a view of its rows there.
        """
        pool = self.pool
        scheduler = ChunkScheduler(job, self.attempts, ADVICE)
        joins, output = job.joins_rows, None
        total_rows = job.split[0].shape[0] if job.split else 0
        idle = list(pool.workers)
        busy: dict[Any, tuple[_Worker, int, float]] = {}  # conn -> worker, chunk, deadline
        waiting = 0.0 if all(w.ready for w in idle) else time.perf_counter()
        for worker in idle:
            worker.hurry()
        try:
            with serial.timing("send"):
                job.template  # noqa: B018 (pickled once, before the first chunk leaves)
            while not scheduler.done:
                while idle and (chunk := scheduler.next()) is not None:
                    worker = idle.pop()
                    rows = placed.rows_for(chunk)
                    try:
                        worker.send(job, chunk, placed, rows, output, joins)
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
                    worker, chunk, deadline = busy.pop(conn)
                    try:
                        kind, value = worker.receive()
                        if kind == "spec":
                            if output is None and value is not None:
                                output = _Output(value, total_rows)
                            worker.answer(
                                output if output is not None and output.spec == value else None
                            )
                    except (EOFError, OSError):
                        idle.append(pool.replace(worker))
                        scheduler.failed(
                            chunk, WorkerLost(f"worker pid {worker.pid} {worker.exit_status()}")
                        )
                        continue
                    if kind == "ready":  # the chunk's clock starts now
                        if waiting:
                            serial.add("start-up", time.perf_counter() - waiting)
                            waiting = 0.0
                        busy[conn] = (worker, chunk, self._deadline(worker))
                        continue
                    if kind == "spec":  # still on its chunk, writing its rows
                        busy[conn] = (worker, chunk, deadline)
                        continue
                    if kind == "wrote":
                        assert output is not None
                        value = Outcome(value=output.rows(*job.chunks[chunk]))
                    if waiting:
                        serial.add("start-up", time.perf_counter() - waiting)
                        waiting = 0.0
                    if worker.sent_at:
                        pool.timed(time.perf_counter() - worker.sent_at - worker.busy)
                    idle.append(worker)
                    scheduler.finished(chunk, value, now)
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
