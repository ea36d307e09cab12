"""The local pool under every interleaving of worker deaths the dispatch loop must survive:
a worker that never says it is ready, one killed before it does, a replacement that dies at
once (also while another is being replaced), workers that all fail to start, a worker whose
socket outlives it, and a worker that leaves after its chunk.

Faults are forced, not waited for: the workers' command is swapped for a script that takes a
token from a directory and then dies, hangs or records its pid before becoming a real worker,
and chunks kill their own worker on their first attempt. Each call runs in a thread joined with
a bound, so a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import contextvars
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from lampy.runtime.executors import _in_place as in_place
from lampy.runtime.executors import _local as local
from lampy.runtime.executors._local import LocalExecutor, WorkersDidNotStart

SIZE = 3  # a pool of its own: the suite's default-sized pool is left alone
FAULTY_WORKER = """
import glob, os, sys, time
tokens = sys.argv[1]
for token in sorted(glob.glob(os.path.join(tokens, "*"))):
    try:
        os.remove(token)
    except FileNotFoundError:
        continue  # another worker took it
    how = token.rsplit("-", 1)[1]
    with open(os.path.join(tokens + ".pids", how), "a") as pids:
        pids.write(f"{os.getpid()}\\n")
    if how == "die":
        os._exit(3)
    if how == "hang":  # never says it is ready; leaves when its parent does
        while os.read(int(sys.argv[3]), 1):
            pass
        os._exit(0)
    break  # "pid": a real worker, whose pid the test knows
main = "from lampy.runtime.executors._local_worker import main; main()"
os.execv(sys.executable, [sys.executable, "-c", main, *sys.argv[2:]])
"""


class Faults:
    """Tokens the next worker starts take, in order: "die", "hang" or "pid"."""

    def __init__(self, directory: Path) -> None:
        self.tokens = directory / "tokens"
        self.tokens.mkdir()
        Path(f"{self.tokens}.pids").mkdir()
        self.count = 0

    def add(self, *hows: str) -> None:
        for how in hows:
            self.count += 1
            (self.tokens / f"{self.count:04d}-{how}").touch()

    def pids(self, how: str) -> list[int]:
        path = Path(f"{self.tokens}.pids") / how
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def left(self) -> int:
        return len(list(self.tokens.iterdir()))


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    script = tmp_path / "faulty_worker.py"
    script.write_text(FAULTY_WORKER)
    made = Faults(tmp_path)
    monkeypatch.setattr(local, "WORKER_COMMAND", (sys.executable, str(script), str(made.tokens)))
    yield made


@pytest.fixture
def executor() -> Iterator[LocalExecutor]:
    made = executors.get("local", {"workers": SIZE})
    assert isinstance(made, LocalExecutor)
    made.close()
    yield made
    made.close()


def bounded(call: Callable[[], Any], seconds: float = 60) -> Any:
    """`call()` in a thread (with this thread's `lampy.using` options); fails (instead of
    hanging) if it has not returned in time."""
    got: list[Any] = []
    failed: list[BaseException] = []
    context = contextvars.copy_context()

    def run() -> None:
        try:
            got.append(context.run(call))
        except BaseException as error:
            failed.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not return within {seconds} s"
    if failed:
        raise failed[0]
    return got[0]


def plus_one(x: np.ndarray) -> np.ndarray:
    return x + 1


def run_plus_one(chunks: int = 2 * SIZE, **options: Any) -> None:
    x = np.arange(60.0)
    with lampy.using(executor="local", workers=SIZE, chunks=chunks, **options):
        np.testing.assert_array_equal(bounded(lambda: lampy.elemwise(plus_one)(x)), x + 1)


def gone(pid: int) -> bool:
    """Process `pid` has ended: every thread of it (its parent may not have reaped it yet; a
    zombie leader whose other threads still exit is not gone, nor waitable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], 0)[0])
    finally:
        os.close(fd)


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_workers_that_never_say_they_are_ready_are_replaced_at_their_deadline(
    faults: Faults, executor: LocalExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker hangs before it is ready: the job kills them at their start-up deadline
    and runs on their replacements (which get the usual deadline: the machine may be busy)."""
    monkeypatch.setattr(local, "STARTUP_TIMEOUT_S", 5.0)
    faults.add(*["hang"] * SIZE)
    start = time.monotonic()
    thread = threading.Thread(target=run_plus_one, daemon=True)
    thread.start()
    wait_for(lambda: len(faults.pids("hang")) == SIZE, "the workers never started")
    monkeypatch.setattr(local, "STARTUP_TIMEOUT_S", 60.0)  # for the replacements
    thread.join(60)
    assert not thread.is_alive()
    assert time.monotonic() - start >= 5.0  # it did wait for the hung ones, as long as allowed
    hung = faults.pids("hang")
    assert not set(hung) & set(executor.worker_pids())
    wait_for(lambda: all(map(gone, hung)), "a hung worker was not killed")  # SIGKILL is sent


def test_workers_killed_before_they_say_ready_are_replaced(
    faults: Faults, executor: LocalExecutor
) -> None:
    faults.add(*["hang"] * SIZE)
    start = time.monotonic()
    thread = threading.Thread(target=run_plus_one, daemon=True)
    thread.start()
    wait_for(lambda: len(faults.pids("hang")) == SIZE, "the workers never started")
    for pid in faults.pids("hang"):
        os.kill(pid, signal.SIGKILL)
    thread.join(45)
    assert not thread.is_alive()
    # their deaths were noticed, not their start-up deadline (60 s) reached
    assert time.monotonic() - start < local.STARTUP_TIMEOUT_S
    assert not set(faults.pids("hang")) & set(executor.worker_pids())


def kill_first_attempt(x: np.ndarray, markers: str) -> np.ndarray:
    """Each chunk kills its worker on its first attempt (a marker per chunk says it did)."""
    marker = Path(markers) / f"{int(x[0])}"
    if not marker.exists():
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


def test_workers_killed_together_with_a_replacement_dying_at_once(
    faults: Faults, executor: LocalExecutor, tmp_path: Path
) -> None:
    """Every worker dies on its chunk at once; while they are replaced, the first replacement
    dies before it is ready, and the second one too: the chunks still complete."""
    markers = tmp_path / "markers"
    markers.mkdir()
    run_plus_one()  # warm: all three started
    faults.add("die", "die")
    x = np.arange(60.0)
    f = lampy.elemwise(kill_first_attempt)
    with lampy.using(executor="local", workers=SIZE, chunks=SIZE):
        np.testing.assert_array_equal(bounded(lambda: f(x, str(markers))), x + 1)
    assert len(list(markers.iterdir())) == SIZE and faults.left() == 0
    assert len(faults.pids("die")) == 2


def test_workers_that_cannot_start_end_the_job_with_a_typed_error(
    faults: Faults, executor: LocalExecutor
) -> None:
    faults.add(*["die"] * (local.START_FAILURES_PER_WORKER * SIZE + SIZE))
    start = time.monotonic()
    with pytest.raises(WorkersDidNotStart) as caught:
        run_plus_one()
    assert time.monotonic() - start < 45
    message = str(caught.value)
    assert message.startswith(
        f"the local pool's workers could not start: {local.START_FAILURES_PER_WORKER * SIZE} "
        "in a row were lost before running a chunk (the last: worker pid "
    )
    assert "exited with code 3 before it was ready" in message
    assert "executor='inline'" in message
    assert isinstance(caught.value, lampy.WorkerLost)
    for token in faults.tokens.iterdir():
        token.unlink(missing_ok=True)  # a worker still starting may take one meanwhile
    run_plus_one()  # the pool starts again once workers can


def test_workers_that_hang_at_start_end_the_job_within_the_deadlines(
    faults: Faults, executor: LocalExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "STARTUP_TIMEOUT_S", 0.5)
    faults.add(*["hang"] * (local.START_FAILURES_PER_WORKER * SIZE))
    with pytest.raises(WorkersDidNotStart, match=r"did not finish starting within 0.5 s"):
        run_plus_one()
    # each one the job gave up on was killed; any still starting stays in the pool (on a
    # loaded machine a worker can be past its deadline before it even took its token)
    hung = faults.pids("hang")
    wait_for(
        lambda: all(gone(pid) or pid in executor.worker_pids() for pid in hung),
        "a hung worker was neither killed nor kept",
    )
    executor.close()
    wait_for(lambda: all(map(gone, hung)), "close() left a hung worker")


def fork_then_die(x: np.ndarray, marker: str) -> np.ndarray:
    """On its first attempt the chunk forks a child, which inherits the worker's socket and
    keeps it open, then kills its worker: no end of file comes on that socket."""
    if x[0] == 0 and not os.path.exists(marker):
        child = os.fork()
        if child == 0:
            time.sleep(100)
            os._exit(0)
        Path(marker + ".tmp").write_text(str(child))
        os.replace(marker + ".tmp", marker)
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polled"])
def test_a_worker_whose_socket_outlives_it_is_still_noticed(
    executor: LocalExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    if not pidfd:
        monkeypatch.setattr(local, "_pidfd", lambda pid: None)
    marker = str(tmp_path / "forked")
    x = np.arange(60.0)
    f = lampy.elemwise(fork_then_die)
    start = time.monotonic()
    try:
        with lampy.using(executor="local", workers=SIZE, chunks=2 * SIZE):
            np.testing.assert_array_equal(bounded(lambda: f(x, marker), 80), x + 1)
        assert time.monotonic() - start < 80  # not the child's 100 s
    finally:
        if os.path.exists(marker):
            os.kill(int(Path(marker).read_text()), signal.SIGKILL)


KEPT: list[np.ndarray] = []


def keeps(x: np.ndarray) -> np.ndarray:
    result = x + 1
    KEPT.append(result)  # lives on in the worker, in the output's memory
    return result * 1


@pytest.mark.skipif(not in_place.available(), reason="numpy without memory handlers")
def test_a_worker_leaving_after_its_chunk_is_sent_nothing_more(
    executor: LocalExecutor,
) -> None:
    """A worker that kept an array in the output exits after answering: the caller must not
    hand it the next chunk (with attempts=1, a chunk sent to it would be lost)."""
    x = np.random.default_rng(3).random((12 * 40_000, 1))  # 320 KB a chunk: in-place sized
    f = lampy.elemwise(keeps)
    with lampy.using(executor="local", workers=SIZE, chunks=12, attempts=1):
        for _ in range(2):
            np.testing.assert_array_equal(bounded(lambda: f(x)), x + 1)


def test_a_dead_worker_does_not_break_is_warm(executor: LocalExecutor) -> None:
    run_plus_one()
    deadline = time.monotonic() + 60
    while not executor.is_warm():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim = executor.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    while not gone(victim):
        time.sleep(0.01)
    assert not executor.is_warm()  # and it did not raise: the dead worker is replaced
    assert victim not in executor.worker_pids() and len(executor.worker_pids()) == SIZE
    while not executor.is_warm():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_workers_start_at_normal_priority_where_idle_could_not_be_undone(
    executor: LocalExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    if local._IDLE is None:
        pytest.skip("no SCHED_IDLE here")
    monkeypatch.setattr(local, "_idle_is_reversible", lambda: False)
    executor.start()
    wait_for(lambda: len(executor.worker_pids()) == SIZE, "the pool did not start")
    assert {os.sched_getscheduler(pid) for pid in executor.worker_pids()} == {os.SCHED_OTHER}


def test_start_returns_before_any_worker_starts_and_a_starting_pool_is_not_warm(
    executor: LocalExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() hands the process starts to a thread: here each start waits until the test
    lets it, and start() still returns; the pool is not warm (nor blocks is_warm) meanwhile."""
    go = threading.Event()

    class Held(local._Worker):
        def __init__(self, *args: Any) -> None:
            assert go.wait(60)
            super().__init__(*args)

    monkeypatch.setattr(local, "_Worker", Held)
    executor.start()
    assert executor.pool.starting() and not executor.worker_pids()
    assert not executor.is_warm()
    go.set()
    wait_for(executor.is_warm, "the pool never became warm", 60)
    assert len(executor.worker_pids()) == SIZE and not executor.pool.starting()
    run_plus_one()  # and it serves jobs


def test_idle_priority_is_used_only_where_it_can_be_undone() -> None:
    if local._IDLE is None:
        pytest.skip("no SCHED_IDLE here")
    may = os.geteuid() == 0 or __import__("resource").getrlimit(__import__("resource").RLIMIT_NICE)[
        0
    ] >= 20 - os.getpriority(os.PRIO_PROCESS, 0)
    assert local._idle_is_reversible() is may
