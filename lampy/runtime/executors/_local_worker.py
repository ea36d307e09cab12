"""A local worker process: receives jobs and chunks over a Unix socket and runs them.

Started by the local executor as `python -m lampy.runtime.executors._local_worker FD LIFELINE`,
where FD is its end of a socket pair and LIFELINE the read end of the executor's process
lifeline: the worker exits at once when the executor's process dies, even mid-chunk. Messages
(pickled, over a private socket):

parent -> worker
  ("path", sys_path)                       once, so functions importable in the parent import here
  ("arena", arena_id) + descriptor         the file holding the job's arrays
  ("job", job_id, template, split, whole)  the pickled (function, args, kwargs) and array locations
  ("chunk", job_id, chunk, start, stop)    run one chunk
worker -> parent
  ("ready",)                                once, when imports are done (chunk clocks start then)
  ("ok", chunk, payload, layout) [+ descriptor when layout]   the pickled result
  ("error", chunk, pickled_exception, traceback_text)
"""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from lampy.runtime._codec import dumps
from lampy.runtime._job import RowSource, SplitArray
from lampy.runtime._shm import array_in, dump_to_file
from lampy.runtime._sweep import watch
from lampy.runtime._worker_side import Outcome, Templates, run_task

# (offset, dtype, shape) in the arena, or a row source (lampy.remote) whose rows a worker reads
ArrayRef = tuple[int, np.dtype[Any], tuple[int, ...]] | RowSource


def serve(conn: Connection) -> None:
    arena: int | None = None
    templates = Templates()
    conn.send(("ready",))
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
            templates.load(job_id, template, (split, whole))
        elif kind == "chunk":
            _, job_id, chunk, start, stop = message
            assert arena is not None, "chunk before arena"
            job = templates.get(job_id)
            assert job is not None, "chunk of a job this worker was not sent"
            split, whole = job.extras
            rows = [_array(arena, ref, (start, stop)) for ref in split]
            outcome = run_task(job.call, rows, [_array(arena, r) for r in whole], dump_to_file)
            _reply(conn, chunk, outcome)


def _array(arena: int, ref: ArrayRef, rows: tuple[int, int] | None = None) -> SplitArray:
    """An array in the arena (or its rows), or a row source's rows (read by the worker side)."""
    if not isinstance(ref, tuple):
        return ref if rows is None else ref[rows[0] : rows[1]]
    return array_in(arena, *ref, rows=rows)


def _reply(conn: Connection, chunk: int, outcome: Outcome) -> None:
    if outcome.error is None:
        payload, layout, fd = outcome.value
        conn.send(("ok", chunk, payload, layout))
        if fd is not None:
            send_handle(conn, fd, os.getppid())
            os.close(fd)
        return
    conn.send(("error", chunk, dumps(outcome.error), outcome.traceback))


def main() -> None:
    watch(int(sys.argv[2]), lambda: os._exit(1))  # the executor's process is gone
    serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    main()
