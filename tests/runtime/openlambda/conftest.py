"""Fixtures: a shared secret, a `lampy worker` subprocess with lampy deployed, in-thread workers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from lampy.runtime.openlambda.deploy import upload
from lampy.runtime.openlambda.worker import Worker

SECRET = "test-secret-for-lampy"


@pytest.fixture(scope="session", autouse=True)
def lampy_secret() -> Iterator[bytes]:
    """Every test signs with a known secret (never the user's ~/.config one)."""
    old = os.environ.get("LAMPY_SECRET")
    os.environ["LAMPY_SECRET"] = SECRET
    yield SECRET.encode()
    if old is None:
        del os.environ["LAMPY_SECRET"]
    else:
        os.environ["LAMPY_SECRET"] = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"lampy worker exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/status", timeout=1) as answer:
                if answer.read() == b"ready\n":
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"lampy worker at {url} did not become ready")


@pytest.fixture(scope="session")
def worker_url(tmp_path_factory: pytest.TempPathFactory, lampy_secret: bytes) -> Iterator[str]:
    """A `lampy worker` process on a free loopback port, with lampy's lambda deployed."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    registry = tmp_path_factory.mktemp("registry")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "lampy.cli", "worker", "--port", str(port)),
            *("--registry", str(registry), "--max-sandboxes", "4", "--runtime-limit", "20"),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_ready(url, process)
        upload(url, "lampy", lampy_secret)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


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
