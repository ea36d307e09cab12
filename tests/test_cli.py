"""The `lampy` command, run for real: every mistake is one line on stderr with status 2 (usage)
or 1 (failure), no traceback unless asked for, and servers say a port is taken before any
banner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import lampy

SCRIPT = Path(sys.executable).with_name("lampy")
LAMPY = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lampy.cli"]


def lampy_command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAMPY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LAMPY_DEBUG": "", "COLUMNS": "200", **env},
    )


def one_line_error(done: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    """Exit `status`, nothing on stdout, and exactly one stderr line containing `text`."""
    assert done.returncode == status, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert text in lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _NotAWorker(BaseHTTPRequestHandler):
    """An HTTP service that is not OpenLambda: 405 to everything."""

    def do_GET(self) -> None:
        self.send_error(405)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def wrong_service() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotAWorker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_version() -> None:
    done = lampy_command("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"lampy {lampy.__version__}"


def test_help_shows_the_defaults() -> None:
    done = lampy_command("worker", "--help")
    assert done.returncode == 0
    assert "(default: 5000)" in done.stdout and "(default: 127.0.0.1)" in done.stdout
    assert "(default: 5050)" in lampy_command("serve", "--help").stdout


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_port_in_use_is_reported_before_any_banner(
    command: str, taken_port: int, tmp_path: Path
) -> None:
    args = [command, str(tmp_path)] if command == "serve" else [command]
    done = lampy_command(*args, "--port", str(taken_port))
    one_line_error(done, 1, f"port {taken_port} on 127.0.0.1 is in use")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["worker", "--port", "99999"], "a port is 0..65535"),
        (["worker", "--port", "http"], "not a port number"),
        (["worker", "--max-sandboxes", "0"], "must be above 0"),
        (["worker", "--chaos", "kill"], "needs a probability"),
        (["deploy", "--url", "127.0.0.1:5300"], "write it like http://127.0.0.1:5300"),
        (["deploy"], "one of the arguments --url --output is required"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_usage_mistakes(args: list[str], text: str) -> None:
    one_line_error(lampy_command(*args), 2, text)


def test_serve_a_missing_directory() -> None:
    done = lampy_command("serve", "/nonexistent-lampy-dir")
    one_line_error(done, 1, "lampy serve: /nonexistent-lampy-dir is not a directory")


def test_deploy_to_nothing_listening(closed_port: int) -> None:
    done = lampy_command("deploy", "--url", f"http://127.0.0.1:{closed_port}")
    one_line_error(done, 1, f"nothing answers at http://127.0.0.1:{closed_port}")
    assert f"lampy worker --port {closed_port}" in done.stderr


def test_deploy_to_a_service_that_is_not_openlambda(wrong_service: str) -> None:
    done = lampy_command("deploy", "--url", wrong_service)
    one_line_error(done, 1, f"{wrong_service} is not an OpenLambda worker")


class _ReadyButRefusing(BaseHTTPRequestHandler):
    """Answers GET /status like a worker, then refuses the upload as aiohttp does: the body
    repeats the status ("405: Method Not Allowed")."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"ready\n")

    def do_POST(self) -> None:
        body = b"405: Method Not Allowed"
        self.send_response(405)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_deploy_refused_names_the_status_once() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ReadyButRefusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        done = lampy_command("deploy", "--url", url)
    finally:
        server.shutdown()
        server.server_close()
    one_line_error(done, 1, "answered 405: Method Not Allowed")
    assert "405: 405" not in done.stderr


def test_deploy_output_to_a_missing_directory() -> None:
    done = lampy_command("deploy", "--output", "/nonexistent-lampy-dir/x.tgz")
    one_line_error(done, 1, "cannot write /nonexistent-lampy-dir/x.tgz: No such file")


def test_calibrate_into_a_cache_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    done = lampy_command("calibrate", XDG_CACHE_HOME=str(tmp_path / "a-file"))
    one_line_error(done, 1, "lampy calibrate: ")
    assert "Not a directory" in done.stderr


@pytest.mark.parametrize("how", ["flag before", "flag after", "environment"])
def test_debug_adds_the_traceback(how: str) -> None:
    deploy = ["deploy", "--output", "/nonexistent-lampy-dir/x.tgz"]
    args = {"flag before": ["--debug", *deploy], "flag after": [*deploy, "--debug"]}
    done = (
        lampy_command(*deploy, LAMPY_DEBUG="1")
        if how == "environment"
        else lampy_command(*args[how])
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.splitlines()[-1].startswith("lampy deploy: cannot write")


@pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes get their own users only under root")
def test_worker_whose_folder_sandbox_users_cannot_reach(tmp_path: Path, closed_port: int) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)  # like pytest's own /tmp/pytest-of-root
    done = lampy_command("worker", "--port", str(closed_port), TMPDIR=str(closed))
    one_line_error(done, 1, "sandboxes run as their own users and cannot reach")
    assert "set TMPDIR to a folder they may pass through" in done.stderr
    assert not any(closed.iterdir())  # its folder went with it
