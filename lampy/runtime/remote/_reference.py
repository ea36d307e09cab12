"""References to `.npy` arrays on an array server or a local disk, and reading their rows.

`remote(url)` reads the array's metadata once (shape, dtype, order, where the data starts, the
file's version) and returns a `RemoteArray`: a few hundred bytes that regions accept wherever
they accept an array, as a split argument. Slicing rows gives a narrower reference without
reading anything; `fetch()` reads exactly those rows:

- over HTTP, with one signed Range request whose body is read straight into the new array's
  memory (`readinto`: no intermediate bytes object);
- from a local path or `file://` URL, by mapping the rows' bytes copy-on-write (no read at all
  until touched; writes stay in the process, as with the local executor's shared memory).

C-ordered rows are contiguous in the file, so a row range is one byte range. Fortran-ordered
arrays of two or more dimensions are refused: their rows are scattered through the file.
Every read sends the version the reference was made from, so a file rewritten since then is
refused rather than misread.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lampy._errors import (
    RemoteArrayError,
    RemoteArrayNotFound,
    RemoteArrayRefused,
)
from lampy.runtime._secret import load_secret
from lampy.runtime._shm import map_private
from lampy.runtime.remote import _auth as auth
from lampy.runtime.remote._npy import NpyMeta, header_bytes, read_meta, version_of

VERSION_HEADER = "X-Lampy-Version"  # a read names the file version its reference was made from
TIMEOUT_S = 60.0  # per socket operation of a read or upload
UPLOAD_SLICE = 1 << 20  # uploads are written in slices of this size (no joined copy)
_pool: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
_pool_lock = threading.Lock()


@atexit.register
def _close_pool() -> None:
    """Close the kept-alive connections (left open, each warns when collected at exit)."""
    with _pool_lock:
        connections = [c for idle in _pool.values() for c in idle]
        _pool.clear()
    for connection in connections:
        connection.close()


@dataclass(frozen=True)
class RemoteArray:
    """Rows [start, stop) of a C-ordered `.npy` array at `url` (http, https or file)."""

    url: str
    meta: NpyMeta
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.meta.shape[1:])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.meta.dtype

    @property
    def ndim(self) -> int:
        return len(self.meta.shape)

    @property
    def itemsize(self) -> int:
        return self.meta.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.meta.shape[1:], dtype=np.int64)) * self.itemsize

    @property
    def nbytes(self) -> int:
        return (self.stop - self.start) * self.row_bytes

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        rows = "" if (self.start, self.stop) == (0, self.meta.shape[0]) else "[rows "
        rows += f"{self.start}:{self.stop}]" if rows else ""
        return f"lampy.remote({self.url!r}){rows} shape={self.shape} dtype={self.dtype}"

    def __getitem__(self, key: Any) -> Any:
        """Rows by a step-1 slice: a narrower reference, nothing read. Other keys: read, index."""
        if isinstance(key, slice) and key.step in (None, 1):
            rows = range(self.start, self.stop)[key]
            return replace(self, start=rows.start, stop=max(rows.start, rows.stop))
        return self.fetch()[key]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """`np.asarray(reference)` reads its rows."""
        data = self.fetch()
        return data if dtype is None else data.astype(dtype, copy=False)

    def fetch(self) -> np.ndarray:
        """The referenced rows as a new ndarray (over HTTP) or a private mapping (a file)."""
        if self.nbytes == 0:
            return np.empty(self.shape, self.dtype)
        first = self.meta.offset + self.start * self.row_bytes
        if self.url.startswith("file:"):
            return self._map(first)
        out = np.empty(self.shape, self.dtype)
        last = first + out.nbytes - 1
        headers = {"Range": f"bytes={first}-{last}", VERSION_HEADER: self.meta.version}
        with _request("GET", self.url, headers) as response:
            _check(response, self.url, expect=206)
            length = response.getheader("Content-Length")
            if length is None or int(length) != out.nbytes:
                raise RemoteArrayError(
                    f"{self.url}: asked for bytes {first}-{last} ({out.nbytes:,}), the server "
                    f"answered {length} bytes"
                )
            _read_into(response, out.reshape(-1).view(np.uint8).data, self.url)
        return out

    def _map(self, first: int) -> np.ndarray:
        path = _file_path(self.url)
        try:
            with open(path, "rb") as file:
                if version_of(os.fstat(file.fileno())) != self.meta.version:
                    raise RemoteArrayError(_changed(self.url))
                view = map_private(file.fileno(), first, self.nbytes)
        except FileNotFoundError:
            raise RemoteArrayNotFound(f"{self.url}: the file is gone") from None
        return np.frombuffer(view, self.dtype).reshape(self.shape)


def materialize(value: Any) -> Any:
    """An ndarray for a reference (its rows read), any other value unchanged."""
    return value.fetch() if isinstance(value, RemoteArray) else value


def remote(
    location: str | os.PathLike[str] | RemoteArray,
    dtype: Any = None,
    shape: tuple[int, ...] | None = None,
) -> RemoteArray:
    """A reference to the `.npy` array at an `http(s)://` URL (served by `lampy serve`), a
    `file://` URL or a local path; reads only its metadata now.

    `dtype` and `shape`, when given, are checked against the file, so a wrong file fails here
    rather than in a chunk.
    """
    if isinstance(location, RemoteArray):
        reference = location
    else:
        url = _normalize(location)
        meta = _file_meta(url) if url.startswith("file:") else _http_meta(url)
        if not meta.shape:
            raise RemoteArrayError(
                f"{url} holds a 0-d array, which has no rows to split; read it with numpy.load"
            )
        if meta.fortran_order and len(meta.shape) > 1:
            raise RemoteArrayError(
                f"{url} is stored in Fortran order, so its rows are not contiguous in the file "
                "and cannot be read by range; save it in C order: "
                "numpy.save(path, numpy.ascontiguousarray(a))"
            )
        reference = RemoteArray(url, meta, 0, meta.shape[0])
    if dtype is not None and np.dtype(dtype) != reference.dtype:
        raise RemoteArrayError(
            f"{reference.url} holds {reference.dtype}, not the expected {np.dtype(dtype)}"
        )
    if shape is not None and tuple(shape) != reference.shape:
        raise RemoteArrayError(
            f"{reference.url} has shape {reference.shape}, not the expected {tuple(shape)}"
        )
    return reference


def upload(url: str, array: np.ndarray) -> RemoteArray:
    """PUT `array` to an array server as the `.npy` file at `url`; returns its reference."""
    url = _normalize(url)
    if url.startswith("file:"):
        raise RemoteArrayError(f"upload needs an http(s) URL of a lampy server; got {url}")
    if not isinstance(array, np.ndarray) or array.dtype.hasobject or array.ndim == 0:
        what = "a 0-d array" if isinstance(array, np.ndarray) and array.ndim == 0 else ""
        raise RemoteArrayError(
            f"upload takes a numeric ndarray with rows; got {what or type(array).__name__}"
        )
    data = np.ascontiguousarray(array)
    header = header_bytes(data.shape, data.dtype)
    flat = data.reshape(-1).view(np.uint8).data

    def body() -> Iterator[bytes | memoryview]:
        yield header
        for start in range(0, flat.nbytes, UPLOAD_SLICE):
            yield flat[start : start + UPLOAD_SLICE]

    length = str(len(header) + flat.nbytes)
    with _request("PUT", url, {"Content-Length": length}, body) as response:
        _check(response, url, expect=201)
        try:
            record = json.loads(response.read())
        except ValueError as exc:
            raise RemoteArrayError(f"{url}: the upload's answer is not JSON ({exc})") from None
    meta = NpyMeta.from_json(record, url)  # the server's answer: no second request
    return RemoteArray(url, meta, 0, meta.shape[0])


# -- HTTP -------------------------------------------------------------------------------------


class _Exchange:
    """One request's response; the connection goes back to the pool only if fully read."""

    def __init__(self, key: tuple[str, str, int], connection: http.client.HTTPConnection) -> None:
        self.key, self.connection = key, connection
        self.response: http.client.HTTPResponse | None = None

    def __enter__(self) -> http.client.HTTPResponse:
        assert self.response is not None
        return self.response

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        response = self.response
        if kind is None and response is not None and not response.isclosed():
            response.read()  # drain a short error body so the connection can be reused
        if kind is None and response is not None and not response.will_close:
            with _pool_lock:
                _pool.setdefault(self.key, []).append(self.connection)
        else:
            self.connection.close()


def _request(
    method: str,
    url: str,
    headers: dict[str, str],
    body: Callable[[], Iterator[bytes | memoryview]] | None = None,
    query: str = "",
) -> _Exchange:
    """Send one signed request (a pooled keep-alive connection, one retry if it went stale:
    `body` makes the body's pieces afresh for each try)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{query}" if query else "")
    key = (
        parts.scheme,
        parts.hostname or "",
        parts.port or (443 if parts.scheme == "https" else 80),
    )
    for attempt in (1, 2):
        signed = auth.sign(  # afresh for each try: a nonce is used once
            load_secret(),
            method,
            target,
            headers.get("Range", ""),
            headers.get("Content-Length", ""),
        )
        with _pool_lock:
            idle = _pool.get(key)
            connection = idle.pop() if idle else None
        reused = connection is not None
        if connection is None:
            kind = http.client.HTTPSConnection if key[0] == "https" else http.client.HTTPConnection
            connection = kind(key[1], key[2], timeout=TIMEOUT_S)
        exchange = _Exchange(key, connection)
        try:
            pieces = None if body is None else body()
            connection.request(method, target, body=pieces, headers={**headers, **signed})
            exchange.response = connection.getresponse()
            return exchange
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            connection.close()
            if reused and attempt == 1:
                continue  # a kept-alive connection the server had closed: once more, fresh
            raise RemoteArrayError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            connection.close()
            raise RemoteArrayError(
                f"cannot reach {url}: {type(exc).__name__}: {exc}. Is `lampy serve` running "
                "there, and is the address reachable from here?"
            ) from None
    raise AssertionError("unreachable")


def _check(response: http.client.HTTPResponse, url: str, expect: int) -> None:
    """Raise the typed error for an answer other than `expect`."""
    if response.status == expect:
        return
    text = response.read(4000).decode(errors="replace").strip()
    message = f"{url}: {text or response.reason} (HTTP {response.status})"
    if response.status in (401, 403):
        raise RemoteArrayRefused(message)
    if response.status == 404:
        raise RemoteArrayNotFound(message)
    if response.status == 412:
        raise RemoteArrayError(_changed(url))
    raise RemoteArrayError(message)


def _read_into(response: http.client.HTTPResponse, view: memoryview, url: str) -> None:
    got = 0
    while got < view.nbytes:
        n = response.readinto(view[got:])
        if not n:
            raise RemoteArrayError(
                f"{url}: the answer ended after {got:,} of {view.nbytes:,} bytes"
            )
        got += n


def _http_meta(url: str) -> NpyMeta:
    with _request("GET", url, {}, query="meta") as response:
        _check(response, url, expect=200)
        try:
            record = json.loads(response.read())
        except ValueError as exc:
            raise RemoteArrayError(
                f"{url}: metadata is not JSON ({exc}); is it `lampy serve`?"
            ) from None
    return NpyMeta.from_json(record, url)


# -- URLs and files ---------------------------------------------------------------------------


def _normalize(location: str | os.PathLike[str]) -> str:
    """An http(s) or file URL of a `.npy` file; a bad one is refused with what was wrong."""
    text = os.fspath(location)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise RemoteArrayError(f"bad array URL {text!r}: no host")
        if parts.query or parts.fragment:
            raise RemoteArrayError(f"bad array URL {text!r}: no query or fragment is allowed")
        path = urllib.parse.quote(parts.path, safe="/%")  # spaces and such, escaped once
    elif parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise RemoteArrayError(f"bad file URL {text!r}: only local files (file:///path)")
        path = urllib.parse.unquote(parts.path)
    elif parts.scheme == "" or len(parts.scheme) == 1:  # a path (or a Windows drive letter)
        path = os.path.abspath(text)
    else:
        raise RemoteArrayError(
            f"bad array URL {text!r}: use http(s)://host:port/name.npy, file:///path.npy or a path"
        )
    if not path.endswith(".npy"):
        raise RemoteArrayError(f"bad array URL {text!r}: lampy reads .npy files only")
    if parts.scheme in ("http", "https"):
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return "file://" + urllib.parse.quote(path)


def _file_path(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path)


def _file_meta(url: str) -> NpyMeta:
    try:
        with open(_file_path(url), "rb") as file:
            return read_meta(file, url)
    except FileNotFoundError:
        raise RemoteArrayNotFound(f"{url}: no such file") from None
    except IsADirectoryError:
        raise RemoteArrayError(f"{url} is a directory, not a .npy file") from None


def _changed(url: str) -> str:
    return (
        f"{url} was rewritten after this reference was made, so its rows may have moved; "
        "make a new reference with lampy.remote"
    )
