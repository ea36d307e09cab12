"""The dask executor against a real Dask cluster of processes (the session's, from conftest).

The region suite runs on it through the `executor` fixture; these tests cover what only Dask has:
how the executor finds its cluster, its errors, and workers that die during a job.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lampy
from lampy.runtime import executors

distributed = pytest.importorskip("distributed", reason="dask: pip install 'lampy[dask]'")


def pid_rows(x: np.ndarray) -> np.ndarray:
    """Each row answers the process id that ran it."""
    return np.full(len(x), os.getpid())


def test_an_existing_client_runs_the_chunks_and_stays_open(dask_address: str) -> None:
    with distributed.Client(dask_address, set_as_default=False) as client:
        worker_pids = set(client.run(os.getpid).values())
        with lampy.using(executor="dask", client=client, chunks=8):
            pids = set(lampy.elemwise(pid_rows)(np.zeros(64)).tolist())
        assert pids <= worker_pids and os.getpid() not in pids, (pids, worker_pids)
        assert client.status == "running"


def test_the_default_client_is_used_when_no_address_is_given(dask_address: str) -> None:
    x = np.arange(40.0)
    with distributed.Client(dask_address) as client, lampy.using(executor="dask", chunks=4):
        assert set(lampy.elemwise(pid_rows)(x).tolist()) <= set(client.run(os.getpid).values())


def test_without_a_cluster_the_error_says_how_to_name_one() -> None:
    with pytest.raises(ValueError):
        distributed.default_client()  # no default Client in this process
    with (
        lampy.using(executor="dask", chunks=2),
        pytest.raises(lampy.OptionError, match=r"needs a cluster: .*address='tcp://HOST:8786'"),
    ):
        lampy.elemwise(pid_rows)(np.zeros(4))


def test_address_from_the_environment(dask_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMPY_EXECUTOR", "dask")
    monkeypatch.setenv("LAMPY_DASK_ADDRESS", dask_address)
    x = np.arange(30.0)
    np.testing.assert_array_equal(lampy.elemwise(chunks=3)(np.negative)(x), -x)


def test_an_address_nothing_listens_on_fails_fast_and_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        start = time.monotonic()
        with (
            lampy.using(executor="dask", address=address, chunks=2),
            pytest.raises(
                lampy.ExecutionError,
                match=rf"cannot reach the Dask scheduler at {address} .*running",
            ),
        ):
            lampy.elemwise(pid_rows)(np.zeros(4))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"address": "nonsense://x"}, r"address must be a Dask scheduler address .*nonsense"),
        ({"address": "127.0.0.1"}, r"address must be .*missing port"),
        ({"client": "tcp://127.0.0.1:8786"}, r"client= takes a distributed.Client"),
        ({"client": object()}, r"client must be a distributed.Client"),
        ({"attempts": 0}, r"attempts must be a positive int"),
    ],
)
def test_bad_options_fail_before_any_work(options: dict[str, object], match: str) -> None:
    with (
        lampy.using(executor="dask", chunks=2, **options),
        pytest.raises(lampy.OptionError, match=match),
    ):
        lampy.elemwise(pid_rows)(np.zeros(4))


def test_address_and_client_together_are_refused(dask_address: str) -> None:
    with (
        distributed.Client(dask_address, set_as_default=False) as client,
        lampy.using(executor="dask", address=dask_address, client=client, chunks=2),
        pytest.raises(lampy.OptionError, match="not both"),
    ):
        lampy.elemwise(pid_rows)(np.zeros(4))


def test_a_result_dask_cannot_send_back_is_the_chunks_error(dask_address: str) -> None:
    def locks(x: np.ndarray) -> list[threading.Lock]:
        return [threading.Lock() for _ in x]

    with (
        lampy.using(executor="dask", address=dask_address, chunks=2),
        pytest.raises(TypeError, match="pickle") as caught,
    ):
        lampy.elemwise(locks)(np.zeros(4))
    assert "raised in lampy chunk 0 of 2 (rows 0:2)" in caught.value.__notes__


def copy_rows(x: np.ndarray) -> np.ndarray:
    return x.copy()


@pytest.mark.parametrize("chunks", [1, 3])
def test_results_come_back_exactly_even_big_endian(dask_address: str, chunks: int) -> None:
    x = np.arange(100, dtype=">i2")
    f = lampy.elemwise(chunks=chunks)(copy_rows)
    with lampy.using(executor="inline"):
        expected = f(x)  # one chunk: x's own dtype; several: numpy's concatenate makes it native
    with lampy.using(executor="dask", address=dask_address):
        result = f(x)
    assert result.dtype == expected.dtype and result.tobytes() == expected.tobytes()
    assert result.flags.writeable


def wait_unless_done(x: np.ndarray, flag: str) -> np.ndarray:
    """Blocks the chunk holding row 0 until `flag` exists, so a test can kill its worker."""
    if x[0] == 0 and not os.path.exists(flag):
        Path(flag + ".pid").write_text(str(os.getpid()))
        os.replace(flag + ".pid", flag + ".started")  # whole, never half-written
        while not os.path.exists(flag):
            time.sleep(0.01)
    return x + 1


def test_worker_killed_during_a_chunk_its_chunk_runs_again(
    dask_address: str, tmp_path: Path
) -> None:
    flag = str(tmp_path / "go")
    f = lampy.elemwise(chunks=4, executor="dask")(wait_unless_done)
    x = np.arange(40.0)
    result: list[np.ndarray] = []

    def call() -> None:
        with lampy.using(executor="dask", address=dask_address):
            result.append(f(x, flag))

    thread = threading.Thread(target=call)
    thread.start()
    started = Path(flag + ".started")
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the chunk never started"
            time.sleep(0.01)
        os.kill(int(started.read_text()), signal.SIGKILL)
    finally:
        Path(flag).write_text("go")  # the chunk's next attempt finds the flag and finishes
    thread.join(timeout=60)
    assert not thread.is_alive()
    np.testing.assert_array_equal(result[0], x + 1)


def kill_on_row_5(x: np.ndarray) -> dict[str, np.ndarray]:
    if 5 in x:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"n": np.array(len(x)), "s": x.sum(0)}


def test_a_chunk_that_always_kills_its_worker_is_lost_after_its_attempts(
    dask_address: str,
) -> None:
    f = lampy.sum(chunks=4, executor="dask")(kill_on_row_5)
    with (
        lampy.using(executor="dask", address=dask_address, attempts=2),
        pytest.raises(
            lampy.RetriesExhausted,
            match=r"^chunk 0 of 4 \(rows 0:10\) was lost: all 2 attempts failed",
        ) as caught,
    ):
        f(np.arange(40))
    error = caught.value
    assert error.chunk == 0 and error.rows == (0, 10) and len(error.causes) == 2
    assert all("left the cluster" in c or "KilledWorker" in c for c in error.causes)
    with lampy.using(executor="dask", address=dask_address):  # the cluster is whole again
        x = np.arange(40.0)
        np.testing.assert_array_equal(lampy.elemwise(chunks=4)(np.negative)(x), -x)


def test_partial_sum_merges_the_chunks_whose_workers_lived(dask_address: str) -> None:
    f = lampy.sum(chunks=10, executor="dask", allow_partial=0.8)(kill_on_row_5)
    with lampy.using(executor="dask", address=dask_address, attempts=1):
        value, coverage = f(np.arange(100))
    assert list(coverage.lost) == [0] and coverage.merged == tuple(range(1, 10))
    assert int(value["n"]) == 90 and int(value["s"]) == np.arange(10, 100).sum()


def test_without_dask_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails
    monkeypatch.delitem(sys.modules, "lampy.runtime.executors._dask")
    monkeypatch.setitem(executors._REGISTRY, "dask", "lampy.runtime.executors._dask:DaskExecutor")
    with pytest.raises(lampy.LampyError, match=r"pip install 'lampy\[dask\]'"):
        executors.executor_class("dask")
    with pytest.raises(ImportError, match=r"pip install 'lampy\[dask\]'"):
        importlib.import_module("lampy.runtime.executors._dask")
