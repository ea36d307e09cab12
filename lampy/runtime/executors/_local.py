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
returns, so nothing writes into a result after it is returned. A job never waits forever: see
`_Dispatch` (start-up deadlines, deaths seen through pidfds, WorkersDidNotStart).

Workers are fresh interpreters (`python -c "...; _local_worker.main()"`), not forks, so
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
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
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
    FILES_KEPT,
    ArrayRef,
    CallerArray,
    FileArray,
    Output,
    normal_priority,
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
# not `-m`: lampy imports its default executor, which imports the worker's module, and runpy
# would then run that module a second time as __main__
WORKER_COMMAND = (
    sys.executable,
    "-c",
    "from lampy.runtime.executors._local_worker import main; main()",
)
# A worker a job waits for that has not said it is ready after this long (hurried to normal
# priority; start-up took up to 9 s on the loaded reference machine) is killed and replaced;
# this many losses per worker before any chunk finishes mean workers cannot start here.
STARTUP_TIMEOUT_S = 60.0
START_FAILURES_PER_WORKER = 3
START_ADVICE = (
    "Their errors, if any, are on this process's stderr. Check that "
    f"`{sys.executable} -c 'import lampy'` works here, or run on executor='inline'."
)
LIVENESS_S = 1.0  # without pidfds, how often a waiting job looks whether its workers live
STOP_WAIT_S = 5.0  # a killed worker not gone by then is left to be reaped later


class WorkersDidNotStart(WorkerLost):
    """The local pool could not start its worker processes (a typed WorkerLost)."""


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@cache
def _idle_is_reversible() -> bool:
    """Whether this process may take a thread back from idle priority to normal: root, or an
    RLIMIT_NICE that allows it. Where it may not, a worker started at idle priority would stay
    there, so workers start at normal priority instead. Tried on a throwaway thread."""
    if _IDLE is None:
        return False
    reversible: list[bool] = []

    def attempt() -> None:
        tid = threading.get_native_id()
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            reversible.append(False)
        else:
            reversible.append(True)

    thread = threading.Thread(target=attempt, name="lampy-priority-probe")
    thread.start()
    thread.join()
    return reversible == [True]


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
    """One worker process, its end of a private socket pair, and a descriptor that becomes
    readable when the process ends (Linux pidfd; None elsewhere, and then its liveness is
    polled), so a death is noticed even if the socket's other end outlived the process."""

    def __init__(
        self,
        env: dict[str, str],
        idle: bool,
        probe: tuple[int, int, bytes] | None,
        modules: list[str],
    ) -> None:
        ours, theirs = socket.socketpair()
        fds = (theirs.fileno(), lifeline())
        with theirs:
            self.process = subprocess.Popen(
                [*WORKER_COMMAND, *map(str, fds), *(["idle"] if idle else [])],
                pass_fds=fds,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        if idle:  # at once: it has only begun to import
            with contextlib.suppress(OSError):
                os.sched_setscheduler(self.process.pid, os.SCHED_IDLE, os.sched_param(0))
        self.conn = Connection(ours.detach())
        self.sentinel = _pidfd(self.process.pid)
        self.ready = False  # its imports are done: it is sent chunks only then
        self.started_at = time.monotonic()  # its start-up clock (restarted when hurried)
        self.startup_deadline = self.started_at + STARTUP_TIMEOUT_S
        self.busy = 0.0  # the seconds its last chunk took in the worker, as it said
        self.leaving = False  # it said it exits after its last answer
        self.reads = False  # it read the caller's probe: it can copy rows from our memory
        self.idle = idle
        self.jobs: deque[str] = deque(maxlen=TEMPLATES_KEPT)
        self.maps: OrderedDict[int, None] = OrderedDict()  # inodes of the files it maps
        with contextlib.suppress(OSError):  # gone already: its end of file tells
            self.conn.send(("path", sys.path, probe, modules))

    def hurry(self) -> None:
        """A job waits for this worker: back to normal priority if it started at idle, and
        its start-up clock starts now (idle, it may have had no CPU time at all)."""
        if self.idle:
            normal_priority(self.pid)
            self.idle = False
            self.started_at = time.monotonic()
            self.startup_deadline = self.started_at + STARTUP_TIMEOUT_S

    def poll_ready(self) -> bool:
        """Whether its imports are done (reads its "ready" message if it came; False for a
        worker that died first)."""
        if not self.ready:
            try:
                if self.conn.poll(0):
                    self.receive()
            except (EOFError, OSError):
                return False
        return self.ready

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(
        self,
        job: Job,
        chunk: int,
        placed: _Placed,
        rows: list[ArrayRef] | None,
        output: _Output | None,
        joins: bool,
    ) -> None:
        """Send a chunk (and its job, the first time); only to a ready worker, which reads
        everything sent to it, so no send blocks on a worker that never reads."""
        assert self.ready, "a chunk for a worker still starting"
        with serial.timing("send"):
            if job.id not in self.jobs:
                self.conn.send(
                    ("job", job.id, job.template, placed.split, placed.whole, job.block_rows)
                )
                self.jobs.append(job.id)
            fds = list(placed.fds)
            where: Output | str | None = None
            if output is not None:
                where = output.described(len(fds))
                fds.append(output.fd)
            elif joins:
                where = ASK
            files, passed = self._files(fds)
            self.conn.send(("chunk", job.id, chunk, *job.chunks[chunk], rows, files, where))
            send_fds(self.conn, passed)

    def _files(self, fds: list[int]) -> tuple[list[int | None], list[int]]:
        """A message's files as the worker knows them: the inode of each file it maps already,
        or None where the descriptor must be passed (returned too, in order). It maps at most
        FILES_KEPT: the oldest others are forgotten first (it unmaps only when told, so what
        it maps is always what this says)."""
        inodes = [os.fstat(fd).st_ino for fd in fds]
        files: list[int | None] = [i if i in self.maps else None for i in inodes]
        passed = [fd for fd, file in zip(fds, files, strict=True) if file is None]
        for inode in inodes:
            self.maps[inode] = None
            self.maps.move_to_end(inode)
        oldest = list(self.maps)[: max(0, len(self.maps) - FILES_KEPT)]
        if oldest:
            self.conn.send(("forget", oldest))
            self.forgot(oldest)
        return files, passed

    def forgot(self, inodes: list[int]) -> None:
        """The worker was told to unmap these files."""
        for inode in inodes:
            self.maps.pop(inode, None)

    def answer(self, output: _Output | None) -> None:
        """Tell a worker that described its rows where they go (None: send them back)."""
        if output is None:
            self.conn.send(("out", None, []))
            return
        files, passed = self._files([output.fd])
        self.conn.send(("out", output.described(-1), files))  # the worker numbers the file
        send_fds(self.conn, passed)

    def receive(self) -> tuple[str, Any]:
        """The worker's next message: ("ready", None), ("spec", spec), ("wrote", None) or
        ("outcome", Outcome). EOFError or OSError: it is gone."""
        message = self.conn.recv()
        kind = message[0]
        if kind == "ready":
            self.ready, self.reads = True, bool(message[1])
            return "ready", None
        if kind == "spec":
            return kind, message[2]
        self.busy, self.leaving = message[-2], bool(message[-1])
        if kind == "wrote":
            return kind, None
        if kind == "ok":
            _, _, payload, layout, _, _ = message
            fd = recv_fds(self.conn, 1)[0] if layout else None
            return "outcome", Outcome(value=load_from_file(payload, layout, fd))
        _, _, error, traceback, _, _ = message
        try:
            exc = loads(error)
        except Exception as why:
            exc = RemoteError(f"an exception that cannot be unpickled here ({why})")
        return "outcome", Outcome(error=exc, traceback=traceback)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_status(self) -> str:
        """How it ended (waits a moment for a worker whose socket closed to finish exiting)."""
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

    def kill(self) -> None:
        """Send it SIGKILL (if still running), without waiting for it to go."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.kill()

    def stop(self, wait: float = STOP_WAIT_S) -> None:
        """Kill it (if still running) and reap it; bounded: a process that does not go within
        `wait` seconds is left to be reaped later."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=wait)
        self.conn.close()
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None


def _pidfd(pid: int) -> int | None:
    """A descriptor readable once process `pid` (our child, not yet reaped) has ended."""
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        return None


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
        self.starter: threading.Thread | None = None  # starting workers in the background
        self.in_job = False  # a job holds `lock` (others hold it for moments only)
        self.modules: list[str] = []  # every worker imports them before it is ready
        self._starter_lock = threading.Lock()
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
            # only to ready workers, which read all they are sent (so no send here can block
            # on one that never reads); a worker still starting has mapped nothing yet
            for worker in [w for w in self.workers if w.ready]:
                with contextlib.suppress(OSError):  # gone: its mappings went with it
                    worker.conn.send(("forget", inodes))
                worker.forgot(inodes)

    def fill(self, idle: bool = False) -> None:
        """Start workers up to the pool's size (they import in the background), in place of
        any that died meanwhile."""
        for worker in [w for w in self.workers if not w.alive()]:
            self.drop(worker)
        if not self.workers:
            exit_on_sigterm()
            self.started_at = time.monotonic()
        while len(self.workers) < self.size:
            self.workers.append(self._start(idle))

    def ready(self) -> bool:
        """Whether every worker has finished starting (none would make a job wait). A worker
        that died is replaced (in the background). Workers still importing at idle priority
        well past the usual start-up (a busy machine gives idle processes no time) go back to
        normal priority, so the pool does start."""
        now = time.monotonic()
        for worker in self.workers:
            if not worker.ready and not worker.idle and worker.startup_deadline <= now:
                worker.stop()  # never became ready: the next line starts another
        if self.workers and not all(w.alive() for w in self.workers):
            self.fill(idle=True)
        if len(self.workers) == self.size and all(w.poll_ready() for w in self.workers):
            return True
        if time.monotonic() - self.started_at > 2 * STARTUP_S:
            for worker in self.workers:
                worker.hurry()
        return False

    def start_in_background(self) -> None:
        """Fill the pool from a thread (idle priority), unless one is doing so already."""
        with self._starter_lock:
            if self.starting():
                return
            self.starter = threading.Thread(
                target=self._fill_idle, name="lampy-pool-start", daemon=True
            )
            self.starter.start()

    def starting(self) -> bool:
        """Whether the background thread is still starting workers."""
        return self.starter is not None and self.starter.is_alive()

    def _fill_idle(self) -> None:
        # a pool that cannot start says so to the next job that needs it, with the reason
        with self.lock, contextlib.suppress(WorkersDidNotStart):
            self.fill(idle=True)

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
        """Stop every worker: all are killed first, then reaped within one STOP_WAIT_S in all
        (one by one, a pool of 16 would wait for 16 exits in turn, at the caller's exit too)."""
        for worker in self.workers:
            worker.kill()
        deadline = time.monotonic() + STOP_WAIT_S
        for worker in self.workers:
            worker.stop(wait=max(0.0, deadline - time.monotonic()))
        self.workers = []
        self.arena.release()

    def _start(self, idle: bool = False) -> _Worker:
        env = dict(os.environ)
        threads = str(max(1, available_cpus() // self.size))
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        try:
            return _Worker(env, idle and _idle_is_reversible(), self._probe(), self.modules)
        except OSError as why:  # fork or exec failed: no process to wait for
            raise WorkersDidNotStart(
                f"the local pool could not start a worker process: {why}. {START_ADVICE}"
            ) from why

    def replace(self, worker: _Worker) -> _Worker:
        """Stop `worker` and start a fresh one in its place."""
        self.drop(worker)
        fresh = self._start()
        self.workers.append(fresh)
        return fresh

    def drop(self, worker: _Worker) -> None:
        """Stop a worker (left mid-chunk, or dead); the next job starts its replacement."""
        worker.stop()
        if worker in self.workers:
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
            maps_shared_memory=True,
            runs_blocks=True,
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
        if self.pool.starting():
            return False
        if self.pool.in_job:
            return bool(self.pool.workers)  # a job is running on the pool: it is up
        with self.pool.lock:  # else held for moments only (telling workers what to unmap)
            return self.pool.ready()

    def start(self) -> None:
        """Start the worker processes in the background and return at once: a thread starts
        them (on 16 cores, 16 process starts would take the caller tens of ms), and they import
        at idle priority, taking no CPU time from this process meanwhile."""
        exit_on_sigterm()  # here: only the main thread may set a signal handler
        self.pool.start_in_background()

    def import_ahead(self, modules: Iterable[str]) -> None:
        known = self.pool.modules  # a new list: a worker starting in a thread keeps its own
        self.pool.modules = [*known, *(m for m in modules if m not in known)]

    def run(self, job: Job) -> dict[int, Outcome]:
        pool = self.pool
        with pool.lock, serial.timing("job"):
            pool.fill()
            readers = pool.size if pool.reads_caller() else 0
            placed = _Placed(job, pool.arena, pool.copier, readers)
            pool.in_job = True
            try:
                pool.forget()
                return _Dispatch(pool, job, placed, self.timeout, self.attempts).run()
            finally:
                pool.in_job = False
                placed.cancel()
                if pool.arena.size > ARENA_KEPT_BYTES:
                    pool.arena.release()
                pool.forget()
                # a worker that died once the job no longer needed it: replaced now, not
                # when the next job finds it
                for worker in [w for w in pool.workers if not w.alive()]:
                    with contextlib.suppress(WorkersDidNotStart):
                        pool.replace(worker)

    def close(self) -> None:
        """Stop the pool's workers (shared with other option sets: the next call restarts)."""
        with self.pool.lock:
            self.pool.close()

    def worker_pids(self) -> list[int]:
        """The pool's process ids (for tests and monitoring)."""
        return [w.process.pid for w in self.pool.workers]


@dataclass
class _Sent:
    """A chunk sent to a worker. The worker is on it once the chunk before it there, if any,
    is answered: its `deadline` (monotonic) and `since` (perf_counter, for the round trip)
    count from then (infinite and 0 while it waits)."""

    chunk: int
    deadline: float = float("inf")
    since: float = 0.0

    def begin(self, timeout: float) -> None:
        self.deadline, self.since = time.monotonic() + timeout, time.perf_counter()


class _Dispatch:
    """One job on the pool: keep every ready worker busy until each chunk has its outcome.

    Every worker is in one place: `idle` (ready, no chunk), `starting` (not ready yet: sent
    nothing until it is, so no send can block on a worker that never reads) or `busy` (on a
    chunk, and perhaps with the next one waiting in its socket: while more chunks wait than
    there are workers, each busy worker is sent one more, so it goes on at once instead of
    waiting for this process to hear its answer; the last ones go to whichever worker is free
    first). The loop never waits forever: it waits on the connection and the process of each
    starting and busy worker (whose death is noticed at once: end of file, or its pidfd), with a
    timeout at the earliest deadline, which is finite for a starting worker (STARTUP_TIMEOUT_S)
    and is the chunk's `timeout` for a busy one. Without pidfds it wakes every LIVENESS_S to
    look at the processes itself. A worker that dies or passes its deadline is replaced; a busy
    one's chunk is charged to the scheduler (which decides whether it runs again; a chunk that
    waited behind it runs again uncharged), a starting one's loss is charged to the pool's
    start-up, and START_FAILURES_PER_WORKER such losses per worker in a row, with no chunk
    finishing in between, end the job with WorkersDidNotStart.

    An elemwise job's workers write their rows into one shared output, made when the first of
    them describes its rows; each such chunk's outcome is a view of its rows there.
    """

    def __init__(
        self, pool: _Pool, job: Job, placed: _Placed, timeout: float, attempts: int
    ) -> None:
        self.pool, self.job, self.placed, self.timeout = pool, job, placed, timeout
        self.scheduler = ChunkScheduler(job, attempts, ADVICE)
        self.output: _Output | None = None
        self.idle = [w for w in pool.workers if w.ready]
        self.starting = [w for w in pool.workers if not w.ready]
        self.busy: dict[_Worker, list[_Sent]] = {}  # worker -> its chunk, and the one waiting
        self.failed_starts: list[str] = []  # workers lost in a row before running a chunk
        self.waiting = time.perf_counter() if not self.idle else 0.0  # for start-up

    def run(self) -> dict[int, Outcome]:
        for worker in self.starting:
            worker.hurry()
        try:
            with serial.timing("send"):
                self.job.template  # noqa: B018 (pickled once, before the first chunk leaves)
            while not self.scheduler.done:
                self._hand_out()
                if not self.scheduler.done:
                    self._wait()
            return self.scheduler.outcomes
        finally:
            for worker in list(self.busy):  # abandoned mid-chunk: their state is unknown
                self.pool.drop(worker)

    def _hand_out(self) -> None:
        """A chunk to each idle worker while there are chunks to start; then one more to each
        worker on a single chunk, while more chunks wait than there are workers (and, for
        rows joined in one output, once it is made: a chunk sent where its rows go computes
        them there)."""
        scheduler = self.scheduler
        while self.idle and (chunk := scheduler.next()) is not None:
            self._send(self.idle.pop(), chunk)
        if self.job.joins_rows and self.output is None:
            return
        for worker in [w for w, sent in self.busy.items() if len(sent) == 1]:
            if scheduler.waiting < self.pool.size or (chunk := scheduler.next()) is None:
                return
            self._send(worker, chunk)

    def _send(self, worker: _Worker, chunk: int) -> None:
        rows = self.placed.rows_for(chunk)
        try:
            worker.send(self.job, chunk, self.placed, rows, self.output, self.job.joins_rows)
        except OSError:  # it is gone: the chunk never ran there
            self.scheduler.again(chunk)
            if worker not in self.busy:
                self._failed_start(worker, f"worker pid {worker.pid} {worker.exit_status()}")
            # else its socket still holds what it said last (an answer, and that it leaves),
            # which the next wait reads before its end of file: the chunk it was on is not
            # lost before then
            return
        self.scheduler.start(chunk, time.monotonic())
        queue = self.busy.setdefault(worker, [])
        queue.append(_Sent(chunk))
        if len(queue) == 1:
            queue[0].begin(self.timeout)

    def _wait(self) -> None:
        """Wait for the first message, death or deadline among the busy and starting workers,
        and deal with every one that came."""
        watched: dict[Any, _Worker] = {}
        deadlines: list[float] = []
        unwatched = False  # a worker whose death only polling shows
        for worker in [*self.busy, *self.starting]:
            watched[worker.conn] = worker
            if worker.sentinel is not None:
                watched[worker.sentinel] = worker
            else:
                unwatched = True
            deadlines.append(self._deadline(worker))
        assert watched, "no chunk running and no worker starting, yet the job is not done"
        now = time.monotonic()
        wake = min(deadlines) - now
        if unwatched:
            wake = min(wake, LIVENESS_S)
        ready = wait(list(watched), timeout=None if wake == float("inf") else max(0.0, wake))
        for worker in dict.fromkeys(watched[r] for r in ready):  # once each, in order
            self._hear(worker)
        now = time.monotonic()
        for worker in [*self.busy, *self.starting]:
            if self._deadline(worker) <= now:
                self._overdue(worker)
            elif worker.sentinel is None and not worker.alive() and not worker.conn.poll(0):
                self._died(worker)

    def _deadline(self, worker: _Worker) -> float:
        if worker in self.busy:
            return self.busy[worker][0].deadline
        return worker.startup_deadline

    def _hear(self, worker: _Worker) -> None:
        """The worker's next message, or its death (its process ended: its socket is at end
        of file, or, if another process still holds the socket's other end, silent)."""
        try:
            if not worker.conn.poll(0):
                raise EOFError  # only its process sentinel woke us: it ended
            kind, value = worker.receive()
        except (EOFError, OSError):
            self._died(worker)
            return
        if kind == "ready":  # it may be sent chunks now
            self.starting.remove(worker)
            self.idle.append(worker)
            if self.waiting:
                serial.add("start-up", time.perf_counter() - self.waiting)
                self.waiting = 0.0
            return
        queue = self.busy[worker]
        chunk = queue[0].chunk
        if kind == "spec":  # still on its chunk: it asks where its rows go
            if self.output is None and value is not None:
                self.output = _Output(value, self.job.split[0].shape[0])
            same = self.output is not None and self.output.spec == value
            try:
                worker.answer(self.output if same else None)
            except OSError:
                self._died(worker)
            return
        if kind == "wrote":
            assert self.output is not None
            value = Outcome(value=self.output.rows(*self.job.chunks[chunk]))
        self.pool.timed(time.perf_counter() - queue.pop(0).since - worker.busy)
        if worker.leaving:  # it exits after this answer: never send it another chunk
            del self.busy[worker]
            for sent in queue:  # it will not run the chunk that waited there
                self.scheduler.again(sent.chunk)
            self.starting.append(self.pool.replace(worker))
        elif queue:
            queue[0].begin(self.timeout)
        else:
            del self.busy[worker]
            self.idle.append(worker)
        self.failed_starts.clear()
        self.scheduler.finished(chunk, value, time.monotonic())

    def _died(self, worker: _Worker) -> None:
        why = f"worker pid {worker.pid} {worker.exit_status()}"
        if worker in self.busy:
            self._lost(worker, WorkerLost(why))
        else:
            self.starting.remove(worker)
            self._failed_start(worker, f"{why} before it was ready")

    def _overdue(self, worker: _Worker) -> None:
        worker.process.kill()
        if worker in self.busy:
            why = f"did not finish the chunk within timeout={self.timeout:g}s and was killed"
            self._lost(worker, WorkerLost(f"worker pid {worker.pid} {why}"))
        else:
            self.starting.remove(worker)
            self._failed_start(
                worker,
                f"worker pid {worker.pid} did not finish starting within "
                f"{STARTUP_TIMEOUT_S:g} s and was killed",
            )

    def _lost(self, worker: _Worker, why: WorkerLost) -> None:
        """A busy worker is gone: its chunk is charged, the one waiting there runs again."""
        running, *waiting = self.busy.pop(worker)
        self.starting.append(self.pool.replace(worker))
        for sent in waiting:
            self.scheduler.again(sent.chunk)
        self.scheduler.failed(running.chunk, why)

    def _failed_start(self, worker: _Worker, why: str) -> None:
        """A worker was lost before it ran a chunk (while starting, or idle): a fresh one takes
        its place, unless too many were lost in a row: then the workers cannot start here."""
        self.failed_starts.append(why)
        if len(self.failed_starts) >= START_FAILURES_PER_WORKER * self.pool.size:
            self.pool.drop(worker)
            raise WorkersDidNotStart(
                f"the local pool's workers could not start: {len(self.failed_starts)} in a row "
                f"were lost before running a chunk (the last: {why}). {START_ADVICE}"
            )
        self.starting.append(self.pool.replace(worker))
