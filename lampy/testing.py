"""Helpers for testing code that uses lampy, with real parts rather than mocks.

`openlambda_worker()` starts a real `lampy worker` on a free loopback port with lampy's lambda
deployed, so a test or benchmark can run regions on the openlambda executor exactly as a user
would against OpenLambda.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Wait until the worker at `url` answers `GET /status` (or its process has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/status", timeout=1):
                return
        except OSError:
            exited = process is not None and process.poll() is not None
            if exited or time.monotonic() > deadline:
                raise RuntimeError(f"lampy worker did not start on {url}") from None
            time.sleep(0.05)


@contextmanager
def openlambda_worker(
    registry: Path,
    max_sandboxes: int = 4,
    runtime_limit: float = 30.0,
    name: str = "lampy",
    start_timeout: float = 30.0,
) -> Iterator[str]:
    """A `lampy worker` on 127.0.0.1 with lampy deployed as `name`; yields its URL.

    The worker and the deploy read the secret from LAMPY_SECRET (or the user's config dir), so
    set LAMPY_SECRET first to keep a test away from the user's own secret.
    """
    from lampy.runtime.openlambda.deploy import upload

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lampy.cli", "worker", "--port", str(port)]
    command += ["--registry", str(registry), "--max-sandboxes", str(max_sandboxes)]
    command += ["--runtime-limit", str(runtime_limit)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_ready(url, process, start_timeout)
        upload(url, name)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
