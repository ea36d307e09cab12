"""`lampy serve` refuses replayed and non-finite signed requests, and a server killed mid-PUT
leaves no `.part` file once a server starts again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lampy.runtime.remote import _auth as auth
from lampy.testing import free_port, wait_ready

from .conftest import Server, array_server
from .test_server import npy_bytes, request


@pytest.mark.parametrize("when", ["nan", "inf", "-inf", "NaN"])
def test_a_non_finite_time_is_refused(server: Server, when: str) -> None:
    server.save("timed.npy", np.zeros(3))
    key = os.environ["LAMPY_SECRET"].encode()
    once = "00" * 16
    headers = {
        auth.TIME_HEADER: when,
        auth.NONCE_HEADER: once,
        auth.SIGNATURE_HEADER: auth.signature(key, "GET", "/timed.npy", "", "", when, once),
    }
    status, text = request(server, "GET", "/timed.npy", headers, signed=False)
    assert status == 401 and b"not a finite number" in text


def test_a_replayed_request_is_refused(server: Server) -> None:
    server.save("once.npy", np.zeros(3))
    headers = auth.sign(os.environ["LAMPY_SECRET"].encode(), "GET", "/once.npy")
    assert request(server, "GET", "/once.npy", headers, signed=False)[0] == 200
    status, text = request(server, "GET", "/once.npy", headers, signed=False)
    assert status == 401 and b"seen before" in text


def test_a_server_killed_mid_put_leaves_no_part_file_after_a_restart(
    tmp_path: Path, lampy_secret: bytes
) -> None:
    root = tmp_path / "served"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lampy.cli", "serve", str(root), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_ready(url, process)
        body = npy_bytes(np.zeros(100_000))
        length = str(len(body))
        headers = auth.sign(lampy_secret, "PUT", "/cut.npy", "", length)
        headers["Content-Length"] = length
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            conn.sendall(f"PUT /cut.npy HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
            conn.sendall(body[: len(body) // 2])
            deadline = time.monotonic() + 10
            while not list(root.glob(".*.part")) and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert list(root.glob(".*.part"))  # killed outright: the partial upload is still there
    with array_server(root):
        assert list(root.glob(".*.part")) == []
