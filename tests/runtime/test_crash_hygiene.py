"""Nothing of lampy's outlives a client killed mid-job, and local pools are not multiplied.

Each test runs a real client script in a subprocess, signals it in the middle of a job, and
checks that the processes it started are gone and its files removed within a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lampy
from lampy.runtime import executors
from lampy.runtime._sweep import claim, release, sweep
from lampy.runtime.executors._local import LocalExecutor
from tests.runtime.openlambda.test_chaos import alive, children

GONE_WITHIN_S = 5.0


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def client(script: str, stderr: Path, *args: str) -> subprocess.Popen[bytes]:
    """A Python script of a user of lampy, started as its own process; its stderr (and that of
    whatever it starts) goes to a file, so a child left behind holds no pipe of ours."""
    with stderr.open("wb") as errors:
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )


def finish(process: subprocess.Popen[bytes], how: signal.Signals, stderr: Path) -> None:
    """Send `how` and wait for the client to end as that signal ends a process."""
    process.send_signal(how)
    process.wait(timeout=30)
    expected = -signal.SIGKILL if how == signal.SIGKILL else 128 + signal.SIGTERM
    assert process.returncode == expected, stderr.read_text()


LOCAL_JOB = """
    import os, sys, time
    import numpy as np
    import lampy

    def slow(x, where):
        open(os.path.join(where, str(os.getpid())), "w").close()  # this chunk started
        time.sleep(60)
        return x

    lampy.elemwise(chunks=2, executor="local")(slow)(np.arange(10.0), sys.argv[1])
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_client_leaves_no_local_workers(tmp_path: Path, how: signal.Signals) -> None:
    started, stderr = tmp_path / "started", tmp_path / "stderr"
    started.mkdir()
    process = client(LOCAL_JOB, stderr, str(started))
    try:
        wait_for(lambda: len(os.listdir(started)) == 2, 30, "the chunks did not start")
        workers = [int(name) for name in os.listdir(started)]
        assert process.pid not in workers  # the chunks ran in the pool
        finish(process, how, stderr)
    finally:
        process.kill()
        process.wait()
    wait_for(lambda: not any(map(alive, workers)), GONE_WITHIN_S, f"workers {workers} live on")
    assert "Traceback" not in stderr.read_text()  # no worker died noisily (BrokenPipeError)


PUBLISHING_JOB = """
    import sys, time
    import numpy as np
    import lampy

    def slow(x):
        time.sleep(2)
        return x

    with lampy.using(executor="openlambda", url=sys.argv[1], progress="off"):
        lampy.elemwise(chunks=2)(slow)(np.zeros((2_200_000, 1)))  # 17.6 MB: published
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_client_leaves_no_array_server_and_no_published_files(
    worker_url: str, how: signal.Signals, tmp_path: Path
) -> None:
    stderr = tmp_path / "stderr"
    process = client(PUBLISHING_JOB, stderr, worker_url)
    try:

        def publishing() -> bool:
            servers = [p for p in children(process.pid) if b"serve" in _cmdline(p)]
            return bool(servers) and any(Path(_served(servers[0])).glob("*.npy"))

        wait_for(publishing, 30, "the client did not publish its array")
        (server,) = [p for p in children(process.pid) if b"serve" in _cmdline(p)]
        directory = Path(_served(server))
        time.sleep(0.5)  # the calls are out
        finish(process, how, stderr)
    finally:
        process.kill()
        process.wait()
    wait_for(lambda: not alive(server), GONE_WITHIN_S, "the array server lives on")
    wait_for(lambda: not directory.exists(), GONE_WITHIN_S, f"{directory} is left behind")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _served(pid: int) -> str:
    """The directory an array server serves: the argument after `serve`."""
    arguments = _cmdline(pid).split(b"\0")
    return arguments[arguments.index(b"serve") + 1].decode()


def test_the_sweep_removes_only_directories_whose_owner_is_gone(tmp_path: Path) -> None:
    dead = Path(tempfile.mkdtemp(prefix="lampy-publish-1-", dir=tmp_path))
    (dead / "left.npy").write_bytes(b"x" * 100)
    mine = Path(tempfile.mkdtemp(prefix="lampy-publish-2-", dir=tmp_path))
    claim(mine)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from lampy.runtime._sweep import claim\nclaim(Path(sys.argv[1]))\n"
         "print('held', flush=True)\ntime.sleep(60)", str(tmp_path / "theirs")],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    (tmp_path / "theirs").mkdir()
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        pattern = str(tmp_path / "*")
        assert sweep(pattern) == [str(dead)]
        assert mine.exists() and (tmp_path / "theirs").exists()
        holder.kill()
        holder.wait()
        assert sweep(pattern) == [str(tmp_path / "theirs")]  # its owner died by SIGKILL
    finally:
        holder.kill()
        holder.communicate()
        release(mine)
    assert sweep(pattern) == [str(mine)]


def test_one_local_pool_serves_every_timeout() -> None:
    """timeout and attempts are per call: ten timeouts do not start ten pools."""
    x = np.arange(40.0)
    pids: set[int] = set()
    for timeout in range(1, 11):
        with lampy.using(executor="local", timeout=float(100 + timeout), attempts=2 + timeout):
            np.testing.assert_array_equal(lampy.elemwise(chunks=4)(np.negative)(x), -x)
            local = executors.get("local", {"timeout": 100.0 + timeout, "attempts": 2 + timeout})
            assert isinstance(local, LocalExecutor)
            pids.update(local.worker_pids())
    assert len(pids) == local.size


def test_workers_started_from_a_thread_outlive_the_thread() -> None:
    """Workers watch the process, not the thread that started them (a parent-death signal
    would kill them when that thread ends, and lampy runs in whatever thread calls it)."""
    local = executors.get("local", {})
    assert isinstance(local, LocalExecutor)
    local.close()
    starter = threading.Thread(target=local.start)
    starter.start()
    starter.join()
    deadline = time.monotonic() + 60
    while local.pool.starting():  # start() hands the process starts to a thread of its own
        assert time.monotonic() < deadline, "the pool's starter thread did not finish"
        time.sleep(0.01)
    pids = local.worker_pids()
    assert len(pids) == local.size
    x = np.arange(20.0)
    np.testing.assert_array_equal(lampy.elemwise(chunks=2, executor="local")(np.negative)(x), -x)
    assert local.worker_pids() == pids and all(map(alive, pids))
