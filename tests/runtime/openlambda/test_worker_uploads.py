"""`lampy worker`'s registry under load and abuse: uploads streamed within limits, unpacked at
upload off the event loop, refused with the reason when they cannot run; replaced and deleted
code answers its waiting calls at once and leaves no folder; a killed worker's folder is swept."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lampy.runtime.openlambda import _worker as worker_module
from lampy.testing import openlambda_worker

from .test_worker import JSON_F, install, request, run_json, signed, tarball

VERSIONED_F = """
import time
def f(event):
    time.sleep(event.get("sleep", 0))
    return {"version": VERSION}
VERSION = %d
"""


def bomb(unpacked: int) -> bytes:
    """A tar.gz of a few KB whose one file unpacks to `unpacked` bytes of zeros."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("f.py"), io.BytesIO(b""))
        info = tarfile.TarInfo("zeros.bin")
        info.size = unpacked
        tar.addfile(info, _Zeros(unpacked))
    return out.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def upload(url: str, name: str, body: bytes) -> tuple[int, bytes]:
    status, _, text = request(url, "POST", f"/registry/{name}", body)
    return status, text


def folders(worker: Any) -> list[str]:
    return sorted(p.name for p in worker.worker.workdir.iterdir() if p.is_dir())


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"g.py": "def f(event): ...\n"}, b"no f.py at the top of the tarball"),
        ({"f.py": "def f(event:\n"}, b"f.py does not parse"),
        ({"f.py": "import json\nx = 1\n"}, b"defines none of f, app"),
        ({"f.py": "def f(e): ...\n", ".env": "OL_WSGI_ENTRY=serve\n"}, b"defines none of serve"),
        ({"f.py": "def f(e): ...\n", "../escape.py": "x = 1\n"}, b"unsafe entry in the tarball"),
    ],
    ids=["no-entry", "syntax", "nothing-to-call", "no-wsgi-entry", "dotdot"],
)
def test_a_tarball_that_cannot_run_is_refused_at_upload(
    make_worker: Any, files: dict[str, str], why: bytes
) -> None:
    worker = make_worker()
    status, text = upload(worker.url, "bad", tarball(files))
    assert status == 400 and why in text and b"lambda bad refused" in text
    assert json.loads(request(worker.url, "GET", "/registry/")[2]) == []
    assert folders(worker) == []  # a refused upload leaves no folder behind


def test_not_a_tarball_is_refused(make_worker: Any) -> None:
    worker = make_worker()
    status, text = upload(worker.url, "junk", b"not a tarball")  # OpenLambda's answer
    assert status == 500 and b"invalid .gz file: gzip: invalid header" in text
    status, text = upload(worker.url, "junk", tarball({"f.py": "def f(e): ..."})[:40])
    assert status == 500 and b"invalid tar: " in text


def test_a_gzip_bomb_is_refused_at_its_header_and_the_loop_keeps_answering(
    make_worker: Any,
) -> None:
    worker = make_worker(max_extracted=1 << 20)
    started = time.monotonic()
    status, text = upload(worker.url, "bomb", bomb(64 << 20))  # 64 MiB of zeros in ~64 KB
    assert status == 400 and b"unpack to more than 1,048,576 bytes" in text
    assert time.monotonic() - started < 5  # refused from the header, not after unpacking
    assert folders(worker) == []


def test_unpacking_runs_off_the_event_loop(make_worker: Any, monkeypatch: Any) -> None:
    worker = make_worker()
    real = worker_module._extract

    def slow(blob: Path, directory: Path, max_bytes: int) -> None:
        time.sleep(1.5)
        real(blob, directory, max_bytes)

    monkeypatch.setattr(worker_module, "_extract", slow)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(upload, worker.url, "echo", tarball({"f.py": JSON_F}))
        time.sleep(0.3)
        started = time.monotonic()
        assert request(worker.url, "GET", "/status")[0] == 200
        assert time.monotonic() - started < 0.5
        assert pending.result()[0] == 201


def test_too_many_members_are_refused(make_worker: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(worker_module, "MAX_MEMBERS", 5)
    worker = make_worker()
    files = {"f.py": JSON_F} | {f"m{i}.txt": "x" for i in range(10)}
    status, text = upload(worker.url, "many", tarball(files))
    assert status == 400 and b"more than 5 entries" in text


def test_size_limit_and_length_are_checked_before_the_body_is_read(make_worker: Any) -> None:
    worker = make_worker(max_upload=1000)
    status, text = upload(worker.url, "big", tarball({"f.py": JSON_F + "#" * 5000}) + bytes(2000))
    assert status == 413 and b"the limit is 1,000" in text
    headers = signed("POST", "/registry/chunked") | {"Transfer-Encoding": "chunked"}
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as conn:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        conn.sendall(f"POST /registry/chunked HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        conn.sendall(b"5\r\nhello\r\n0\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.1 411")


def test_concurrent_uploads_beyond_the_limit_get_429(make_worker: Any) -> None:
    worker = make_worker(upload_slots=1)
    body = tarball({"f.py": JSON_F})
    with start_upload(worker.port, "slow", body, 10) as slow:  # holds the one slot
        deadline = time.monotonic() + 5
        while worker.worker.uploading == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, text = upload(worker.url, "other", body)
        assert status == 429 and b"uploads in progress" in text
        slow.sendall(body[10:])
        assert slow.recv(100).startswith(b"HTTP/1.1 201")
    assert upload(worker.url, "other", body)[0] == 201


def start_upload(port: int, name: str, body: bytes, sent: int) -> socket.socket:
    """A signed upload of `body` whose first `sent` bytes only are sent (the caller ends it)."""
    headers = signed("POST", f"/registry/{name}", body) | {"Content-Length": str(len(body))}
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    conn.sendall(f"POST /registry/{name} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    conn.sendall(body[:sent])
    return conn


def _calls(url: str, n: int, sleep: float = 0.0) -> list[Any]:
    """Start `n` calls of lambda "v" at once; their futures."""
    pool = ThreadPoolExecutor(n)
    futures = [pool.submit(run_json, url, "v", {"sleep": sleep}) for _ in range(n)]
    pool.shutdown(wait=False)
    return futures


def queue_behind_a_busy_call(worker: Any, seconds: float) -> tuple[Path, list[Any], list[Any]]:
    """Lambda "v" (version 1) on one sandbox, busy for `seconds` with one call while six more
    wait; its folder, the busy call and the waiting calls."""
    install(worker.url, "v", {"f.py": VERSIONED_F % 1})
    assert json.loads(run_json(worker.url, "v", {})[1]) == {"version": 1}
    busy = _calls(worker.url, 1, sleep=seconds)
    time.sleep(0.2)
    waiting = _calls(worker.url, 6)
    time.sleep(0.3)
    return worker.worker.lambdas["v"].directory, busy, waiting


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_replaced_or_deleted_code_answers_waiting_calls_and_leaves_no_folder(
    make_worker: Any, change: str
) -> None:
    """4 of 8 waiting calls were never answered; now the new version serves them, or a
    deleted lambda's "not found" answers them, at once."""
    worker = make_worker(max_sandboxes=1)
    folder, busy, waiting = queue_behind_a_busy_call(worker, 1.0)
    started = time.monotonic()
    if change == "replace":
        install(worker.url, "v", {"f.py": VERSIONED_F % 2})
    else:
        assert request(worker.url, "DELETE", "/registry/v")[0] == 200
    answers = [f.result(timeout=15) for f in waiting]
    assert time.monotonic() - started < 8
    if change == "replace":
        assert [(s, json.loads(body)) for s, body in answers] == [(200, {"version": 2})] * 6
    else:
        assert all(s == 500 and b'lambda "v" not found' in body for s, body in answers)
    assert busy[0].result(timeout=15)[0] == 200  # the old version finished its own call
    deadline = time.monotonic() + 5
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not folder.exists()  # the old folder went with its last sandbox


def test_stopping_answers_waiting_calls_promptly(make_worker: Any) -> None:
    """The worker once took 62 s to stop while calls waited."""
    worker = make_worker(max_sandboxes=1)
    _, busy, waiting = queue_behind_a_busy_call(worker, 30.0)
    started = time.monotonic()
    worker.stop()
    worker.stop = lambda: None  # the fixture's own stop
    for future in [*busy, *waiting]:
        with contextlib.suppress(OSError):  # the connection closed: an answer too
            future.result(timeout=10)
    assert time.monotonic() - started < 10


def test_a_killed_workers_folder_and_secret_are_swept_by_the_next(
    worker_process: Any, make_worker: Any
) -> None:
    from lampy.runtime.openlambda._deploy import upload as deploy

    url, process = worker_process()
    deploy(url)
    left = [p for p in Path("/tmp").glob(f"lampy-worker-{process.pid}-*")]
    assert len(left) == 1
    assert list(left[0].glob("lampy-*/.env"))  # the secret is in there
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert left[0].exists()  # killed outright: nothing cleaned up
    make_worker()  # any worker that starts sweeps it
    assert not left[0].exists()


def test_a_live_workers_folder_is_never_swept(make_worker: Any) -> None:
    first = make_worker()
    assert worker_module.sweep_workdirs() == 0
    assert first.worker.workdir.exists()


def test_a_stopped_worker_leaves_nothing(tmp_path: Path, lampy_secret: bytes) -> None:
    before = set(Path("/tmp").glob("lampy-worker-*-*"))  # this lampy's folders
    with openlambda_worker(tmp_path / "registry", max_sandboxes=1):
        pass
    assert set(Path("/tmp").glob("lampy-worker-*-*")) <= before


def test_an_upload_killed_midway_leaves_no_part_file(make_worker: Any) -> None:
    worker = make_worker()
    with start_upload(worker.port, "cut", tarball({"f.py": JSON_F}), 10):
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while list(worker.worker.registry.glob(".*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(worker.worker.registry.iterdir()) == []
