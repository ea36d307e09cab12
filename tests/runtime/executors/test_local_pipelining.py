"""The local pool sends a busy worker its next chunk ahead (while more chunks wait than there
are workers): the worker keeps what arrives while it waits for an answer, and a chunk that
waited behind a lost one runs again without being charged an attempt."""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection

import numpy as np

import lampy
from lampy.runtime.executors._local_worker import _Inbox, send_fds

from .test_local import kill_on_row_5


def test_messages_that_come_before_the_answer_wait_their_turn() -> None:
    ours, theirs = socket.socketpair()
    caller, worker = Connection(ours.detach()), Connection(theirs.detach())
    read, write = os.pipe()
    try:
        caller.send(("job", "j", b"template", [], [], None))
        caller.send(("chunk", "j", 3, 0, 10, None, 1, "ask"))
        send_fds(caller, [read])
        caller.send(("out", None, 0))
        inbox = _Inbox(worker)
        (answer, passed) = inbox.answer()
        assert answer == ("out", None, 0) and passed == []
        job, _ = inbox.next()
        chunk, fds = inbox.next()
        assert job[0] == "job" and chunk[:3] == ("chunk", "j", 3) and len(fds) == 1
        os.write(write, b"x")
        assert os.read(fds[0], 1) == b"x", "the chunk's descriptor came with it"
        os.close(fds[0])
        caller.send(("forget", [1]))
        assert inbox.next() == (("forget", [1]), [])
    finally:
        for fd in (read, write):
            os.close(fd)
        caller.close()
        worker.close()


def test_a_chunk_that_waited_behind_a_lost_one_runs_again_uncharged() -> None:
    # 2 workers, 10 chunks: each worker has a chunk waiting behind its first, and with one
    # attempt each, a waiting chunk charged for its worker's death would be lost too
    f = lampy.sum(chunks=10, allow_partial=0.8)(kill_on_row_5)  # chunk 0 kills its worker
    with lampy.using(executor="local", workers=2, attempts=1):
        value, coverage = f(np.arange(100))
    assert list(coverage.lost) == [0]
    assert int(value["n"]) == 90 and int(value["s"]) == np.arange(10, 100).sum()


def test_results_are_whole_when_every_worker_has_a_chunk_waiting() -> None:
    x = np.arange(4000.0).reshape(1000, 4)
    f = lampy.elemwise(chunks=64)(np.sqrt)
    with lampy.using(executor="local", workers=2):
        for _ in range(3):
            np.testing.assert_array_equal(f(x), np.sqrt(x))
