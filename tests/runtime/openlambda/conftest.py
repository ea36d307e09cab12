"""Fixtures: in-thread `lampy worker`s whose knobs and state tests can reach, and a `lampy
worker` process a test may signal and restart (`worker_process`).

The shared secret and the `lampy worker` subprocess (`worker_url`) come from tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import lampy
from lampy.runtime.openlambda._worker import Worker, sweep_workdirs
from lampy.testing import free_port, wait_ready, worker_command
from tests.olreal import CALL_TIMEOUT_S
from tests.olreal import NAME as OLREAL
from tests.olreal import REASON as NO_OLREAL

# Tests taking `openlambda` run on `lampy worker` and on OpenLambda's own worker.
PLATFORMS = [
    "openlambda",
    pytest.param(OLREAL, marks=pytest.mark.skipif(bool(NO_OLREAL), reason=NO_OLREAL)),
]


class ThreadWorker:
    """A `Worker` served on loopback from a thread, for tests that need its knobs or state."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner = web.AppRunner(worker.app(), access_log=None)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start())
        wait_ready(self.url)

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[object]:
    """make_worker(**knobs) -> ThreadWorker; all are stopped after the test."""
    started: list[ThreadWorker] = []

    def make(**knobs: object) -> ThreadWorker:
        started.append(ThreadWorker(Worker(tmp_path / f"registry{len(started)}", **knobs)))  # type: ignore[arg-type]
        return started[-1]

    yield make
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session", autouse=True)
def no_worker_folder_left() -> Iterator[None]:
    """Workers these tests SIGKILL on purpose leave their folder (with a lambda's `.env`);
    the next `lampy worker` to start would sweep it, and so does the end of the session."""
    yield
    sweep_workdirs()


@pytest.fixture(params=PLATFORMS)
def platform(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(executor name, URL): `lampy worker`, or OpenLambda's own worker."""
    if request.param == OLREAL:
        return OLREAL, request.getfixturevalue("olreal_url")
    return "openlambda", request.getfixturevalue("worker_url")


@pytest.fixture
def openlambda(platform: tuple[str, str]) -> Iterator[str]:
    executor, url = platform
    timeout = {"timeout": CALL_TIMEOUT_S} if executor == OLREAL else {}
    with lampy.using(executor=executor, url=url, **timeout):
        yield url


@pytest.fixture
def worker_process(tmp_path: Path, lampy_secret: bytes) -> Iterator[Any]:
    """start() -> (url, process) for a `lampy worker` on one port; start() again restarts it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = worker_command(port, tmp_path / "registry", max_sandboxes=2)
    started: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[str, subprocess.Popen[bytes]]:
        started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        wait_ready(url, started[-1])
        return url, started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(timeout=10)
