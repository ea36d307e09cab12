"""What only OpenLambda's own worker can show: its sandboxes, its errors, its limits.

The region suite runs on it through the "olreal" executor (tests/olreal.py); these tests are
about the platform itself. Skipped where the kit is absent or the worker cannot be built.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import lampy
from lampy._errors import ExecutionError
from lampy.runtime.openlambda._deploy import deployed, upload
from tests.olreal import CALL_TIMEOUT_S, NAME, REASON, sandbox_pids, wait_deployed
from tests.runtime.openlambda.test_worker import request

pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON)


@pytest.fixture
def olreal(olreal_url: str) -> Iterator[str]:
    with lampy.using(executor=NAME, url=olreal_url, timeout=CALL_TIMEOUT_S):
        yield olreal_url


def test_prewarm_reaches_several_sandboxes(olreal: str) -> None:
    assert lampy.prewarm(3, executor=NAME) >= 2


def test_every_sandbox_is_pid_1(olreal: str) -> None:
    """Why lampy tells sandboxes apart by a token, not a process id (prewarm counted one)."""

    def pids(x: np.ndarray) -> np.ndarray:
        return np.full(len(x), os.getpid())

    assert set(lampy.elemwise(pids, chunks=4)(np.arange(8)).tolist()) == {1}


def test_numpy_runs_on_one_thread_in_every_sandbox(olreal: str) -> None:
    """lampy's `.env` sets the BLAS thread counts before numpy loads: OpenLambda counts
    threads against a sandbox's process limit, and the parallelism is across sandboxes."""

    def threads(x: np.ndarray) -> np.ndarray:
        names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        return np.array([[os.environ.get(name) == "1" for name in names]] * len(x))

    assert lampy.elemwise(threads, chunks=2)(np.arange(4)).all()


def test_missing_lambda_says_deploy(olreal: str) -> None:
    with (
        lampy.using(executor=NAME, name="not-deployed"),
        pytest.raises(ExecutionError, match="lampy deploy --url .* --name not-deployed"),
    ):
        lampy.elemwise(np.negative, chunks=2)(np.arange(4))


def slow_square(x: np.ndarray) -> np.ndarray:
    time.sleep(0.2)
    return x * x


def test_sandboxes_killed_from_outside_mid_job(olreal: str) -> None:
    """SIGKILL every sandbox of the worker twice during a job: the answer is exact or the
    error names the lost chunk, and the job ends well within its retry budget."""
    killed: list[int] = []
    done = threading.Event()

    def killer() -> None:
        for _ in range(2):
            deadline = time.monotonic() + 30
            while not (pids := sandbox_pids()) and time.monotonic() < deadline:
                time.sleep(0.05)
            if done.wait(0.5):
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass

    x = np.arange(24.0)
    thread = threading.Thread(target=killer)
    thread.start()
    start = time.monotonic()
    try:
        with lampy.using(attempts=6, timeout=60.0):
            got = lampy.elemwise(slow_square, chunks=24)(x)
        np.testing.assert_array_equal(got, x * x)
    except lampy.RetriesExhausted as exc:
        assert exc.rows is not None and f"(rows {exc.rows[0]}:{exc.rows[1]})" in str(exc)
    finally:
        done.set()
        thread.join()
    assert killed, "no sandbox was found to kill"
    assert time.monotonic() - start < 100


def past_the_runtime_limit(x: np.ndarray) -> np.ndarray:
    time.sleep(45)  # OpenLambda ends a call after limits.runtime_sec, 30 s by default
    return x


@pytest.mark.slow
def test_a_call_past_the_runtime_limit_is_a_502_naming_its_chunk(olreal: str) -> None:
    with (
        lampy.using(attempts=1),
        pytest.raises(lampy.RetriesExhausted, match=r"HTTP 502: RoundTrip failed") as info,
    ):
        lampy.elemwise(past_the_runtime_limit, chunks=2)(np.arange(4))
    assert info.value.rows in {(0, 2), (2, 4)}


def ends_its_sandbox_on_row_0(x: np.ndarray) -> np.ndarray:
    if 0 in x:
        os._exit(3)  # the round trip fails: 502 RoundTrip failed: EOF
    time.sleep(0.5)
    return x.sum(keepdims=True)


def test_a_call_openlambda_drops_gets_its_answer_from_a_backup(
    olreal: str, lampy_secret: bytes
) -> None:
    """OpenLambda drops a call queued behind a failed round trip (docs/openlambda.md): never
    run, never answered. Of 3 chunks, one ends its sandbox; the others must still answer well
    within the call's timeout, by a backup of the dropped call. A lambda of its own starts with
    one instance, where the calls queue (on a warm lambda with many, a drop is rarer)."""
    name = "lampy-drops"
    upload(olreal, name)
    try:
        wait_deployed(olreal, lampy_secret, name)
        region = lampy.sum(chunks=3, allow_partial=0.3)(ends_its_sandbox_on_row_0)
        for _ in range(3):
            start = time.monotonic()
            with lampy.using(name=name, attempts=1, timeout=60.0):
                value, coverage = region(np.arange(6))
            assert list(coverage.lost) == [0] and value.tolist() == [2 + 3 + 4 + 5]
            assert time.monotonic() - start < 20  # a dropped call waits 60 s without a backup
    finally:
        for each in deployed(name):
            request(olreal, "DELETE", f"/registry/{each}")
