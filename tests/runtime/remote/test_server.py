"""`lampy serve` over real HTTP: signed range reads, metadata, uploads, and what it refuses."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lampy.cli import main
from lampy.runtime.remote import _auth as auth
from lampy.runtime.remote import _server as server_module
from lampy.runtime.remote._reference import VERSION_HEADER

from .conftest import Server


def request(
    server: Server,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    secret: bytes | None = None,
    signed: bool = True,
) -> tuple[int, bytes]:
    """One raw request (`target` sent exactly as given), signed unless told otherwise."""
    headers = dict(headers or {})
    if body is not None:
        headers.setdefault("Content-Length", str(len(body)))
    if signed:
        key = secret or os.environ["LAMPY_SECRET"].encode()
        range_, length = headers.get("Range", ""), headers.get("Content-Length", "")
        headers |= auth.sign(key, method, target, range_, length)
    parts = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_status_needs_no_signature(server: Server) -> None:
    assert request(server, "GET", "/status", signed=False) == (200, b"ready\n")


def test_metadata_and_range_read_match_the_file(server: Server) -> None:
    array = np.arange(60, dtype=">i4").reshape(12, 5)
    server.save("meta/a.npy", array)
    status, body = request(server, "GET", "/meta/a.npy?meta")
    meta = json.loads(body)
    assert status == 200
    assert (meta["shape"], meta["dtype"], meta["fortran_order"]) == ([12, 5], ">i4", False)
    raw = (server.root / "meta/a.npy").read_bytes()
    assert meta["offset"] == len(raw) - array.nbytes
    first, last = meta["offset"] + 20, meta["offset"] + 59
    status, body = request(server, "GET", "/meta/a.npy", {"Range": f"bytes={first}-{last}"})
    assert status == 206
    assert np.array_equal(np.frombuffer(body, ">i4").reshape(2, 5), array[1:3])


def test_a_read_of_a_rewritten_file_is_refused(server: Server) -> None:
    server.save("changing.npy", np.zeros(4))
    status, body = request(server, "GET", "/changing.npy?meta")
    version = json.loads(body)["version"]
    time.sleep(0.01)
    server.save("changing.npy", np.ones(8))
    status, body = request(server, "GET", "/changing.npy", {VERSION_HEADER: version})
    assert status == 412 and b"changed since the reference" in body


@pytest.mark.parametrize(
    ("headers", "secret", "why"),
    [
        ({}, None, b"unsigned request"),
        ({}, b"another secret", b"different LAMPY_SECRET"),
        ({auth.TIME_HEADER: "1000", auth.SIGNATURE_HEADER: "00"}, None, b"unsigned request"),
    ],
    ids=["unsigned", "wrong-secret", "stale"],
)
def test_bad_signatures_are_refused(
    server: Server, headers: dict[str, str], secret: bytes | None, why: bytes
) -> None:
    server.save("signed.npy", np.zeros(3))
    signed = secret is not None
    status, body = request(server, "GET", "/signed.npy", headers, secret=secret, signed=signed)
    assert status == 401 and why in body


def test_a_signature_covers_the_range(server: Server) -> None:
    """A signed request with its Range changed afterwards is refused."""
    server.save("ranged.npy", np.zeros(100))
    headers = auth.sign(os.environ["LAMPY_SECRET"].encode(), "GET", "/ranged.npy", "bytes=0-9")
    headers["Range"] = "bytes=0-799"
    status, _ = request(server, "GET", "/ranged.npy", headers, signed=False)
    assert status == 401


@pytest.mark.parametrize(
    "target",
    [
        "/../outside.npy",
        "/%2e%2e/outside.npy",
        "/inside/../../outside.npy",
        "/inside/%2E%2E/%2E%2E/outside.npy",
        "/.hidden.npy",
        "/link.npy",
        "//etc/outside.npy",
    ],
)
def test_paths_outside_the_directory_are_refused(server: Server, target: str) -> None:
    outside = server.root.parent / "outside.npy"
    np.save(outside, np.arange(5))
    (server.root / "inside").mkdir(exist_ok=True)
    np.save(server.root / ".hidden.npy", np.arange(5))
    if not (server.root / "link.npy").is_symlink():
        (server.root / "link.npy").symlink_to(outside)
    for method in ("GET", "PUT"):
        body = npy_bytes(np.arange(3)) if method == "PUT" else None
        status, text = request(server, method, target, body=body)
        assert status in (403, 404), (method, target, status, text)
    assert np.array_equal(np.load(outside), np.arange(5))  # never overwritten


def test_not_npy_names_and_files_are_refused(server: Server) -> None:
    (server.root / "notes.txt").write_text("hello")
    status, body = request(server, "GET", "/notes.txt")
    assert status == 422 and b"serves .npy files only" in body
    (server.root / "fake.npy").write_text("hello")
    status, body = request(server, "GET", "/fake.npy?meta")
    assert status == 422 and b"not a .npy file" in body


def test_upload_then_read(server: Server) -> None:
    array = np.random.default_rng(1).standard_normal((7, 3)).astype(np.float32)
    status, body = request(server, "PUT", "/up/new.npy", body=npy_bytes(array))
    assert status == 201 and json.loads(body)["shape"] == [7, 3]
    assert np.array_equal(np.load(server.root / "up/new.npy"), array)


@pytest.mark.parametrize(
    ("body", "status", "why"),
    [
        (b"not an array at all", 422, b"not a .npy file"),
        (npy_bytes(np.arange(10))[:-8], 422, b"truncated"),
        (npy_bytes(np.arange(10)) + b"extra", 422, b"bytes follow the array"),
        (npy_bytes(np.array([1, "a"], dtype=object)), 422, b"Python objects"),
    ],
    ids=["garbage", "truncated", "trailing", "objects"],
)
def test_bad_uploads_are_refused_and_leave_nothing(
    server: Server, body: bytes, status: int, why: bytes
) -> None:
    before = set(server.root.rglob("*"))
    got, text = request(server, "PUT", "/bad-upload.npy", body=body)
    assert got == status and why in text
    assert set(server.root.rglob("*")) == before  # no file, no partial file


def test_oversize_and_unsized_uploads_are_refused(start_server: Callable[..., Server]) -> None:
    small = start_server("--max-upload", "1000")
    status, text = request(small, "PUT", "/big.npy", body=npy_bytes(np.zeros(200)))
    assert status == 413 and b"at most 1,000" in text
    status, text = request(small, "PUT", "/small.npy", body=npy_bytes(np.zeros(10)))
    assert status == 201

    def chunked() -> list[bytes]:
        return [npy_bytes(np.zeros(2))]

    parts = urllib.parse.urlsplit(small.url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    headers = auth.sign(os.environ["LAMPY_SECRET"].encode(), "PUT", "/chunked.npy")
    connection.request("PUT", "/chunked.npy", body=iter(chunked()), headers=headers)
    assert connection.getresponse().status == 411
    connection.close()


def test_serve_refuses_a_missing_directory(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["serve", os.path.join(tmp_path, "nowhere")])


def test_serve_binds_loopback_unless_told(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`lampy serve DIR` passes host 127.0.0.1, the default port and a day's job ttl to the
    server; --job-ttl sets it."""
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(server_module, "serve", lambda *args: calls.append(args))
    assert main(["serve", str(tmp_path)]) == 0
    assert main(["serve", str(tmp_path), "--job-ttl", "60"]) == 0
    assert calls == [
        (tmp_path, "127.0.0.1", 5050, server_module.MAX_UPLOAD_BYTES, 86400.0),
        (tmp_path, "127.0.0.1", 5050, server_module.MAX_UPLOAD_BYTES, 60.0),
    ]
