"""The local pool sends a busy worker its next chunk ahead (while more chunks wait than there
are workers): the worker keeps what arrives while it waits for an answer, and a chunk that
waited behind a lost one runs again without being charged an attempt."""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection

import numpy as np

import lampy
from lampy.runtime._shm import anonymous_file
from lampy.runtime.executors._local_worker import _forget, _Inbox, send_fds

from .test_local import kill_on_row_5


def test_messages_that_come_before_the_answer_wait_their_turn() -> None:
    ours, theirs = socket.socketpair()
    caller, worker = Connection(ours.detach()), Connection(theirs.detach())
    fd = anonymous_file(4096)
    os.pwrite(fd, b"x", 0)
    inode = os.fstat(fd).st_ino
    try:
        caller.send(("job", "j", b"template", [], [], None))
        caller.send(("chunk", "j", 3, 0, 10, None, [None], "ask"))
        send_fds(caller, [fd])
        caller.send(("out", None, []))
        inbox = _Inbox(worker)
        (answer, passed) = inbox.answer()
        assert answer == ("out", None, []) and passed == []
        job, _ = inbox.next()
        chunk, maps = inbox.next()
        assert job[0] == "job" and chunk[:3] == ("chunk", "j", 3) and len(maps) == 1
        assert maps[0][:1] == b"x", "the chunk's file came with it, mapped"
        # a later chunk names the file by inode: no descriptor, the same mapping
        caller.send(("chunk", "j", 4, 10, 20, None, [inode], None))
        chunk, again = inbox.next()
        assert chunk[:3] == ("chunk", "j", 4) and again[0] is maps[0]
        caller.send(("forget", [inode]))
        assert inbox.next() == (("forget", [inode]), [])
    finally:
        _forget([inode])  # what serve does on "forget"
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
