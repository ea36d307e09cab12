"""An array server (`lampy serve`) in a real subprocess on a free loopback port."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lampy.testing import free_port, wait_ready


@dataclass
class Server:
    url: str
    root: Path
    process: subprocess.Popen[bytes] | None = None  # the `lampy serve`, when started here

    def save(self, name: str, array: np.ndarray) -> str:
        """Save `array` under the served directory; its URL."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
        return f"{self.url}/{name}"


@contextmanager
def array_server(root: Path, *options: str) -> Iterator[Server]:
    """`lampy serve root` until the block ends (the secret comes from LAMPY_SECRET)."""
    port = free_port()
    command = [sys.executable, "-m", "lampy.cli", "serve", str(root), "--port", str(port)]
    process = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process)
        yield Server(url, root, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, lampy_secret: bytes) -> Iterator[Server]:
    """One array server for the session, serving a fresh directory."""
    with array_server(tmp_path_factory.mktemp("served")) as running:
        yield running


@pytest.fixture
def start_server(tmp_path: Path, lampy_secret: bytes) -> Iterator[Callable[..., Server]]:
    """Start servers with extra command-line options (all stopped after the test)."""
    numbers = itertools.count()
    with ExitStack() as stack:

        def start(*options: str) -> Server:
            root = tmp_path / f"root{next(numbers)}"
            root.mkdir()
            return stack.enter_context(array_server(root, *options))

        yield start
