"""A local worker process: receives jobs and chunks over a Unix socket and runs them.

Started by the local executor as `python -c "from lampy.runtime.executors._local_worker import
main; main()" FD LIFELINE [idle]` (its WORKER_COMMAND), where FD is its end of a socket pair
and LIFELINE the read end of the executor's process lifeline: the worker exits at once when the
executor's process dies, even mid-chunk. "idle": the executor put it at idle priority while it
imports; it returns to normal priority when ready.
Messages
(pickled, over a private socket; "+ descriptors" are passed alongside, SCM_RIGHTS):

parent -> worker
  ("path", sys_path, probe, modules)        once, so functions importable in the parent import here;
                                            probe: (pid, address, bytes) of the caller's memory to
                                            read as a test, or None (the pool copies inputs itself);
                                            modules: those of the regions the pool starts for,
                                            imported before "ready" (a first job then waits for
                                            no import; one that fails is left to that job)
  ("job", job_id, template, split, whole, block_rows)
                                            the pickled (function, args, kwargs), where each
                                            array is: ArrayRef (descriptor number and offset, or
                                            an address in the caller's memory, ...), and the
                                            rows per call within a chunk (Job.block_rows)
  ("chunk", job_id, chunk, start, stop, split, files, output) + descriptors
                                            run one chunk; `files` hold its arrays (and the
                                            output, when `output` says where), each the inode
                                            of a file this worker maps already, or None: its
                                            descriptor follows; split: where its rows are when
                                            not where the job said (None), e.g. still only in
                                            the caller's memory
  ("out", output, files) [+ descriptor]     the answer to "spec": where the rows go, or None
  ("forget", inodes)                        files to unmap (the caller let them go, or keeps
                                            what this worker maps bounded)
worker -> parent
  ("ready", reads)                           once, when imports are done (chunk clocks start then);
                                            reads: whether it could read the caller's probe
  ("spec", chunk, spec)                      an elemwise chunk's rows, described: where to?
  ("wrote", chunk, busy, leaving)            its rows are in the output
  ("ok", chunk, payload, layout, busy, leaving) [+ descriptor when layout]   the pickled result
  ("error", chunk, pickled_exception, traceback_text, busy, leaving)
                                            busy: the seconds the chunk took here (the caller
                                            learns the rest of a round trip from it); leaving:
                                            the worker exits after this answer (an array the
                                            function kept lives in the output), so the caller
                                            sends it nothing more and starts a fresh one

A file's descriptor is passed once: the worker maps the file (by inode) and keeps it mapped
for the chunks that follow, which name it by inode. Mapping a file again would fault in every
4 KiB page once more, which cost more than the work in memory-bound chunks
(bench/bench_scale.py), and passing descriptors with every chunk took a `sendmsg` in the
caller and a `recvmsg`, `fstat` and `close` per file here (256 no-op chunks on 2 workers: 105-107
us a chunk with them, 100 us without; 8 chunks 213-218 against 188-201 us). The caller knows
what each worker maps and alone decides what it unmaps ("forget"): the files it let go,
before its next job or at once when the pool is idle, and the oldest beyond FILES_KEPT.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import mmap
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.reduction import recvfds, sendfds
from typing import Any

import numpy as np

from lampy.runtime._allocator import keep_freed_memory
from lampy.runtime._codec import dumps
from lampy.runtime._combine import Leaf, spec_of
from lampy.runtime._job import RowSource, SplitArray
from lampy.runtime._plan import blocks_of
from lampy.runtime._shm import dump_to_file
from lampy.runtime._sweep import watch
from lampy.runtime._tree import leaves
from lampy.runtime._worker_side import Loaded, Outcome, Templates, run_task
from lampy.runtime.executors import _in_place as in_place
from lampy.runtime.executors._caller_memory import read_into
from lampy.runtime.executors._in_place import Slots


@dataclass(frozen=True)
class FileArray:
    """An array stored C-ordered at `offset` of the chunk's descriptor number `file` (-1: an
    array without bytes, made by the worker)."""

    file: int
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CallerArray:
    """A C-ordered array at `address` in the caller's memory: each worker copies its chunk's
    rows itself (process_vm_readv), so the caller copies nothing."""

    address: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


# an array in shared memory or in the caller's memory, or a row source (lampy.remote) whose
# rows a worker reads
ArrayRef = FileArray | CallerArray | RowSource


@dataclass(frozen=True)
class Output:
    """Where an elemwise job's rows go: its result's structure with a `Leaf` per array, and
    each array's offset in the file the chunk's descriptor number `file` names."""

    spec: Any
    offsets: tuple[int, ...]
    file: int


ASK = "ask"  # the output is not made yet: describe the rows and wait for the answer


def send_fds(conn: Connection, fds: list[int]) -> None:
    if fds:
        with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
            sendfds(s, fds)


def recv_fds(conn: Connection, count: int) -> list[int]:
    if not count:
        return []
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        return list(recvfds(s, count))


FILES_KEPT = 256  # files a worker keeps mapped at most (the caller sees to it)
_files: dict[int, mmap.mmap] = {}  # inode -> the whole file, mapped shared


def _mapped(files: list[int | None], fds: list[int]) -> list[mmap.mmap]:
    """A message's files, mapped: each one this worker maps already (by inode), or the next
    of the descriptors passed with the message, mapped whole and kept (its descriptor is
    closed: a mapping holds its own)."""
    passed = iter(fds)
    maps = []
    for inode in files:
        if inode is None:
            fd = next(passed)
            status = os.fstat(fd)
            if status.st_ino not in _files:
                _files[status.st_ino] = mmap.mmap(fd, status.st_size)
            os.close(fd)
            inode = status.st_ino
        maps.append(_files[inode])
    return maps


def _forget(inodes: list[int]) -> None:
    for inode in inodes:
        mapped = _files.pop(inode, None)
        if mapped is not None:
            with contextlib.suppress(BufferError):  # in use: unmapped when its arrays go
                mapped.close()


_caller = 0  # the caller's process id, whose memory CallerArray addresses are in
_many_arrays: deque[str] = deque(maxlen=64)  # jobs whose chunks make too many arrays for
# lampy.runtime.executors._in_place (its per-allocation cost would show)


def _can_read(probe: tuple[int, int, bytes] | None) -> bool:
    """Whether the caller's probe bytes read back right (then CallerArray inputs work)."""
    if probe is None:
        return False
    pid, address, expected = probe
    got = np.empty(len(expected), np.uint8)
    try:
        read_into(pid, address, got)
    except OSError:
        return False
    return got.tobytes() == expected


class _Inbox:
    """The caller's messages, each with the descriptors passed after it. The caller may send
    the next chunk (and its job) while this worker is still on one, even while the chunk waits
    for the answer to its "spec": those messages wait here, in order, until their turn."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.waiting: deque[tuple[tuple[Any, ...], list[mmap.mmap]]] = deque()

    def next(self) -> tuple[tuple[Any, ...], list[mmap.mmap]]:
        """The next message and its files, mapped. EOFError: the caller is gone."""
        return self.waiting.popleft() if self.waiting else self._read()

    def answer(self) -> tuple[tuple[Any, ...], list[mmap.mmap]]:
        """The answer to a "spec" just sent (messages that came before it wait their turn)."""
        while (message := self._read())[0][0] != "out":
            self.waiting.append(message)
        return message

    def _read(self) -> tuple[tuple[Any, ...], list[mmap.mmap]]:
        message = self.conn.recv()
        at = _FILES_AT.get(message[0])
        if at is None:
            return message, []
        files = message[at]
        return message, _mapped(files, recv_fds(self.conn, files.count(None)))


# where a message lists its files, whose descriptors not yet passed follow it (see the
# module's docstring)
_FILES_AT = {"chunk": 6, "out": 2}


def serve(conn: Connection, idle: bool = False) -> None:
    """Answer the caller's messages until it closes the socket (`idle`: started at idle
    priority, back to normal once its imports are done)."""
    global _caller
    templates = Templates()
    _, path, probe, modules = conn.recv()
    sys.path[:0] = [p for p in path if p not in sys.path]
    _import_ahead(modules)
    if idle:
        normal_priority(os.getpid())
    _caller = probe[0] if probe is not None else 0
    conn.send(("ready", _can_read(probe)))
    inbox = _Inbox(conn)
    # Seconds spent loading a job (unpickling its template: the function's module imported
    # here the first time), counted as its next chunk's work: the caller averages what a
    # chunk costs beyond its work into the pool's per-chunk price, which a first import of
    # seconds would inflate for the plans made after it.
    loading: dict[str, float] = {}
    while True:
        try:
            message, maps = inbox.next()
        except EOFError:
            return
        kind = message[0]
        if kind == "forget":
            _forget(message[1])
        elif kind == "job":
            _, job_id, template, split, whole, block_rows = message
            started = time.perf_counter()
            templates.load(job_id, template, (split, whole, block_rows))
            loading[job_id] = time.perf_counter() - started
        elif kind == "chunk":
            _, job_id, chunk, start, stop, split, _, output = message
            answer, slots = _chunk(
                inbox,
                templates,
                job_id,
                chunk,
                (start, stop),
                split,
                maps,
                output,
                loading.pop(job_id, 0.0),
            )
            del maps
            # the chunk's values are gone now: an array still in the output is one the
            # function kept, which a later chunk's rows would change under it
            leaving = _holds(slots)
            _send_answer(conn, answer, leaving)
            if leaving:
                return  # said so in the answer: the caller sends nothing more here


def _holds(slots: list[Slots]) -> bool:
    """Whether an array still lives in the output's rows (a cycle may keep a dropped one
    until collected: collected first, only when it matters)."""
    if not any(s.held() for s in slots):
        return False
    gc.collect()
    return any(s.held() for s in slots)


# an answer to send once the chunk's values are dropped: the message and a descriptor to pass
Answer = tuple[tuple[Any, ...], int | None]


def _send_answer(conn: Connection, answer: Answer, leaving: bool) -> None:
    message, fd = answer
    conn.send((*message, leaving))
    if fd is not None:
        send_fds(conn, [fd])
        os.close(fd)


def _chunk(
    inbox: _Inbox,
    templates: Templates,
    job_id: str,
    chunk: int,
    rows: tuple[int, int],
    split: list[ArrayRef] | None,
    maps: list[mmap.mmap],
    output: Output | str | None,
    loading: float,
) -> tuple[Answer, list[Slots]]:
    """Run one chunk; returns its answer, to send, and the output rows offered to its
    allocations (`serve` checks, once the chunk's values are gone, that nothing kept them,
    and says in the answer whether this worker leaves). `loading`: the seconds its job took
    to load just before, counted in the answer's busy time as the chunk's work.

    An elemwise chunk of a job with `block_rows` runs as one call per block of rows, each
    block's result written into the output while it is in cache. Rows that do not go into
    the output after all (their structure differs from the output's) are sent back as one
    value: the chunk then runs again as one call (functions are pure: chunks may run twice).
    """
    started = time.perf_counter() - loading
    job = templates.get(job_id)
    assert job is not None, "chunk of a job this worker was not sent"
    run = _Rows(inbox, job, (job_id, chunk), split or job.extras[0], maps, output)
    blocks = blocks_of(rows, job.extras[2]) if output is not None else (rows,)
    outcome: Outcome | None = None
    for block in blocks:
        outcome = run.call(block)
        if outcome is not None:
            break
    if outcome is None:  # every block's rows are in the output
        return (("wrote", chunk, run.busy(started)), None), run.slots
    if outcome.error is None and len(blocks) > 1:
        run.output = None
        outcome = run.call(rows)
        assert outcome is not None
    return _answer(chunk, _encoded(outcome), run.busy(started)), run.slots


def _encoded(outcome: Outcome) -> Outcome:
    """A value encoded to send (an error here is the chunk's, as in run_task); an error (made
    portable by run_task already) as it is."""
    if outcome.error is not None:
        return outcome
    value = outcome.value
    return run_task((lambda: value, (), {}), [], [], dump_to_file)


class _Rows:
    """Calls of one job's function on rows of one chunk, each writing its result into the
    output when there is one (asking the caller where it is the first time)."""

    def __init__(
        self,
        inbox: _Inbox,
        job: Loaded,
        names: tuple[str, int],
        split: list[ArrayRef],
        maps: list[mmap.mmap],
        output: Output | str | None,
    ) -> None:
        self.inbox, self.job, self.split, self.maps = inbox, job, split, maps
        self.job_id, self.chunk = names
        self.output = output
        self.takes = _takes_out(job.call)
        self.whole = [_array(maps, ref) for ref in job.extras[1]]  # views: made once a chunk
        self.slots: list[Slots] = []
        self.waited = 0.0  # seconds spent waiting for the caller's answer

    def busy(self, started: float) -> float:
        """The seconds the chunk took here since `started` (waiting for the caller is not
        busy)."""
        return time.perf_counter() - started - self.waited

    def call(self, rows: tuple[int, int]) -> Outcome | None:
        """Run the function on these rows: None when its result is in the output, else its
        outcome (the value as returned, or the error)."""
        parts = [_array(self.maps, ref, rows) for ref in self.split]
        call, target, offered = self.job.call, None, None
        if isinstance(self.output, Output):
            target = _rows_of(self.output, self.maps[self.output.file], rows)
            if target is not None and self.takes is not None:  # numpy's out=: written there
                call = (self.takes[0], self.takes[1], {**self.takes[2], "out": target})
            elif target is not None and self.job_id not in _many_arrays and in_place.available():
                offered = target if isinstance(target, tuple) else (target,)  # allocated there
        with in_place.results_into(offered or ()) as slots:
            outcome = run_task(call, parts, self.whole, _keep)
        self.slots.append(slots)
        if slots.exhausted:  # a function making many arrays: its next chunks go without
            _many_arrays.append(self.job_id)
        del parts
        if outcome.error is not None or self.output is None:
            return outcome
        value = outcome.value
        spec = spec_of(value, rows[1] - rows[0])
        if target is not None and _is_same(value, target):  # no copy: computed there
            return None
        if self.output == ASK and spec is not None:
            asked = time.perf_counter()
            self.inbox.conn.send(("spec", self.chunk, spec))
            (_, output, _), passed = self.inbox.answer()
            self.waited += time.perf_counter() - asked
            placed = isinstance(output, Output)
            self.output = replace(output, file=len(self.maps)) if placed else None
            self.maps += passed
        if isinstance(self.output, Output) and spec is not None and spec == self.output.spec:
            _write(value, self.output, self.maps[self.output.file], rows)
            return None
        return outcome


def _keep(value: Any) -> Any:
    return value


def _takes_out(call: Any) -> Any:
    """The call, when its function has numpy's `out=None` parameter and the call leaves it
    unset: the chunk then passes its rows of the output as `out`, and a function that honours
    it computes straight into the result (no second write). Else None."""
    if not isinstance(call, tuple):
        return None  # the job could not be unpickled: its chunk reports that
    function, args, kwargs = call
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    named = [p for p in parameters if p.name == "out"]
    if not named or "out" in kwargs or named[0].default is not None:
        return None
    out = named[0]
    if out.kind is inspect.Parameter.KEYWORD_ONLY:
        return call
    if out.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and parameters.index(out) >= len(args):
        return call
    return None


def _rows_of(output: Output, mapped: mmap.mmap, rows: tuple[int, int]) -> Any:
    """The chunk's rows of the output: an array, or a tuple of arrays as numpy's `out=` takes
    for several results. None for other structures (dicts, nested): those are copied."""
    specs = output.spec if isinstance(output.spec, tuple) else (output.spec,)
    if not all(isinstance(spec, Leaf) for spec in specs):
        return None
    views = tuple(
        np.ndarray(
            (rows[1] - rows[0], *spec.trailing),
            spec.dtype,
            buffer=mapped,
            offset=offset + rows[0] * spec.row_bytes,
        )
        for spec, offset in zip(specs, output.offsets, strict=True)
    )
    return views if isinstance(output.spec, tuple) else views[0]


def _is_same(value: Any, out: Any) -> bool:
    """Whether the chunk returned the `out` it was given (each array in place)."""
    got, given = (value, out) if isinstance(out, tuple) else ((value,), (out,))
    if not isinstance(got, tuple) or len(got) != len(given):
        return False
    return all(
        type(a) is np.ndarray
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        for a, b in zip(got, given, strict=True)
    )


def _write(value: Any, output: Output, mapped: mmap.mmap, rows: tuple[int, int]) -> None:
    """Copy the chunk's rows of each array into the output, where they belong. A result that
    lives in the output already (in another array's rows: its allocation got them) is
    copied aside first, so no write clobbers rows not read yet."""
    arrays = leaves(value)
    targets = [
        np.ndarray(leaf.shape, spec.dtype, buffer=mapped, offset=offset + rows[0] * spec.row_bytes)
        for leaf, spec, offset in zip(arrays, leaves(output.spec), output.offsets, strict=True)
    ]
    arrays = [
        leaf.copy() if any(np.may_share_memory(leaf, t) for t in targets) else leaf
        for leaf in arrays
    ]
    for target, leaf in zip(targets, arrays, strict=True):
        np.copyto(target, leaf, casting="no")


def _array(maps: list[mmap.mmap], ref: ArrayRef, rows: tuple[int, int] | None = None) -> SplitArray:
    """An array in shared memory (or its rows), or a row source's rows (read by the worker
    side). Arrays in shared memory are views of it: a chunk that writes into its input
    writes into the caller's array, as the same function called in the caller would. Rows in
    the caller's memory are copied here (writes change only the copy, as with the arena)."""
    if not isinstance(ref, FileArray | CallerArray):
        return ref if rows is None else ref[rows[0] : rows[1]]
    start, stop = rows if rows is not None else (0, ref.shape[0] if ref.shape else 1)
    shape = ref.shape if rows is None else (stop - start, *ref.shape[1:])
    row_bytes = ref.dtype.itemsize * int(np.prod(ref.shape[1:], dtype=np.int64))
    if isinstance(ref, CallerArray):
        rows_here: np.ndarray = np.empty(shape, ref.dtype)
        read_into(_caller, ref.address + start * row_bytes, rows_here)
        return rows_here
    if ref.file < 0:  # no bytes at all
        return np.empty(shape, ref.dtype)
    mapped = maps[ref.file]
    view: np.ndarray = np.ndarray(
        shape, ref.dtype, buffer=mapped, offset=ref.offset + start * row_bytes
    )
    return view


def _answer(chunk: int, outcome: Outcome, busy: float) -> Answer:
    if outcome.error is None:
        payload, layout, fd = outcome.value
        return ("ok", chunk, payload, layout, busy), fd
    return ("error", chunk, dumps(outcome.error), outcome.traceback, busy), None


def _import_ahead(modules: list[str]) -> None:
    """Import the modules of the regions the pool starts for, as their first job would (by
    unpickling its function): a module that takes seconds to import (one that imports a large
    library, or loads data) would otherwise make the first fanned-out call wait for it, where
    the caller would have run it here. A module that fails to import is left to that job,
    which reports the error with its traceback."""
    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def normal_priority(pid: int) -> None:
    """Every thread of process `pid` back to normal priority (BLAS starts its threads while
    the worker imports, at idle priority; a policy is per thread). A thread gone, or not ours
    to change, or no scheduling policies here: left as it is."""
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for tid in threads:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def main() -> None:
    watch(int(sys.argv[2]), lambda: os._exit(1))  # the executor's process is gone
    keep_freed_memory()
    # started ahead of need ("idle"): its imports, the regions' modules too, at idle priority
    serve(Connection(int(sys.argv[1])), idle=len(sys.argv) > 3 and sys.argv[3] == "idle")
    # no interpreter teardown: arrays a function kept may still be freed through the memory
    # handler of lampy.runtime.executors._in_place, which teardown would have taken apart
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
