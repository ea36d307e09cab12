"""A local worker process: receives jobs and chunks over a Unix socket and runs them.

Started by the local executor as `python -m lampy.runtime.executors._local_worker FD`, where FD is
its end of a socket pair. Messages (pickled, over a private socket):

parent -> worker
  ("path", sys_path)                       once, so functions importable in the parent import here
  ("arena", arena_id) + descriptor         the file holding the job's arrays
  ("job", job_id, template, split, whole)  the pickled (function, args, kwargs) and array locations
  ("chunk", job_id, chunk, start, stop)    run one chunk
worker -> parent
  ("ok", chunk, payload, layout) [+ descriptor when layout]   the pickled result
  ("error", chunk, pickled_exception, traceback_text)
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from lampy.runtime._codec import dumps, loads
from lampy.runtime._job import Part, Placeholder
from lampy.runtime._shm import array_in, dump_to_file
from lampy.runtime._worker_side import Outcome, run_filled
from lampy.runtime.remote._reference import RemoteArray

# (offset, dtype, shape) in the arena, or a reference (lampy.remote) whose rows a worker reads
ArrayRef = tuple[int, np.dtype[Any], tuple[int, ...]] | RemoteArray
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
JOBS_KEPT = 4


def serve(conn: Connection) -> None:
    arena: int | None = None
    jobs: OrderedDict[str, tuple[Call | Outcome, list[ArrayRef], list[ArrayRef]]] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        kind = message[0]
        if kind == "path":
            sys.path[:0] = [p for p in message[1] if p not in sys.path]
        elif kind == "arena":
            if arena is not None:
                os.close(arena)
            arena = recv_handle(conn)
        elif kind == "job":
            _, job_id, template, split, whole = message
            jobs[job_id] = (_load(template), split, whole)
            while len(jobs) > JOBS_KEPT:
                jobs.popitem(last=False)
        elif kind == "chunk":
            _, job_id, chunk, start, stop = message
            assert arena is not None, "chunk before arena"
            outcome = _run(arena, *jobs[job_id], (start, stop))
            _reply(conn, chunk, outcome)


def _load(template: bytes) -> Call | Outcome:
    """The job's (function, args, kwargs), or the error that unpickling them raised."""
    try:
        return loads(template)  # type: ignore[no-any-return]
    except Exception as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def _run(
    arena: int,
    call: Call | Outcome,
    split: list[ArrayRef],
    whole: list[ArrayRef],
    rows: tuple[int, int],
) -> Outcome:
    if isinstance(call, Outcome):
        return call
    function, args, kwargs = call

    def lookup(p: Placeholder) -> np.ndarray:
        if isinstance(p, Part):
            return _array(arena, split[p.index], rows)
        return _array(arena, whole[p.index], None)

    return run_filled(function, args, kwargs, lookup)


def _array(arena: int, ref: ArrayRef, rows: tuple[int, int] | None) -> np.ndarray:
    """An array in the arena (or its rows), or a reference's rows read here."""
    if isinstance(ref, RemoteArray):
        return ref.fetch() if rows is None else ref[rows[0] : rows[1]].fetch()
    return array_in(arena, *ref, rows=rows)


def _reply(conn: Connection, chunk: int, outcome: Outcome) -> None:
    if outcome.error is None:
        try:
            payload, layout, fd = dump_to_file(outcome.value)
        except Exception as exc:
            outcome = Outcome(error=exc, traceback=traceback.format_exc())
        else:
            conn.send(("ok", chunk, payload, layout))
            if fd is not None:
                send_handle(conn, fd, os.getppid())
                os.close(fd)
            return
    portable = outcome.portable()
    conn.send(("error", chunk, dumps(portable.error), portable.traceback))


def main() -> None:
    serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    main()
