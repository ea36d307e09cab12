"""The default retry budget rides out a worker that restarts within a few seconds."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np

import lampy
from lampy.runtime import executors
from lampy.runtime._scheduler import ATTEMPTS, BACKOFF_CAP_S, retry_span
from lampy.runtime.openlambda._deploy import upload
from lampy.testing import free_port, wait_ready, worker_command


def test_the_default_budget_spans_at_least_ten_seconds() -> None:
    assert retry_span() >= 10.0
    assert retry_span(ATTEMPTS - 1) < 10.0  # the last attempt is the one that gets there
    assert retry_span(3, 0.001) < BACKOFF_CAP_S  # small budgets stay small (tests, impatience)


def slow_square(x: np.ndarray) -> np.ndarray:
    time.sleep(0.15)
    return x * x


def test_worker_killed_4s_into_a_job_and_restarted_gives_the_exact_answer(
    tmp_path: Path, lampy_secret: bytes
) -> None:
    """With default settings: SIGKILL `lampy worker` 4 s into the job, start it again on the
    same port (it finds lampy in its registry directory), and the job completes exactly."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = worker_command(port, tmp_path / "registry", max_sandboxes=2)
    started = [subprocess.Popen(command, stdout=subprocess.DEVNULL)]
    x = np.arange(6000.0).reshape(3000, 2)
    answer: list[np.ndarray] = []

    def run() -> None:
        with lampy.using(executor="openlambda", url=url):  # every other option its default
            answer.append(lampy.elemwise(chunks=60)(slow_square)(x))

    job = threading.Thread(target=run)
    try:
        wait_ready(url, started[0])
        upload(url, "lampy")
        job.start()
        time.sleep(4.0)
        calls = executors.get("openlambda", {"url": url}).accounts
        assert job.is_alive() and calls, "the job is not running on the worker"
        started[0].kill()
        started[0].wait()
        started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))  # sweeps the first's
        wait_ready(url, started[1])
        job.join(timeout=60)
        assert not job.is_alive() and answer, "the job did not complete"
        np.testing.assert_array_equal(answer[0], x * x)
        assert calls[-1].failures["connection"] > 0  # the job did see the worker go
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        executors.get("openlambda", {"url": url}).close()
