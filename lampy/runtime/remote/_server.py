"""`lampy serve DIR`: an aiohttp server for the `.npy` files under one directory.

    GET /status                  "ready" (unsigned: for health checks)
    GET /name.npy?meta           JSON: shape, dtype, fortran_order, offset (of the data), version
    GET /name.npy  + Range       those bytes of the file (206, sent with sendfile: no copy here)
    PUT /name.npy  + body        a whole .npy file; checked, then moved into place atomically
    /jobs/<id>/...               durable job state for orchestration in lambdas (_jobs.py)

Every request but /status is signed with the shared secret (see `auth`). A read names the file
version its reference was made from (`X-Lampy-Version`), and a file rewritten since is answered
412 instead of bytes that moved. Paths must stay inside DIR (no `..`, no hidden names, no
symlink leading out), name a `.npy` file, and uploads must declare their length, at most
`max_upload` bytes. It binds 127.0.0.1 unless told otherwise.

An upload is written to a hidden `.part` file beside its target, locked (flock) while it is
written; a server killed mid-upload leaves it behind, so every start sweeps the `.part` files
nobody holds a lock on any more (`sweep_parts`).
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from lampy._errors import RemoteArrayError, RemoteArrayNotFound, RemoteArrayRefused
from lampy.runtime._codec import MAX_FRAME_BYTES
from lampy.runtime._secret import Freshness, load_secret, sweep_parts
from lampy.runtime.remote import _auth as auth
from lampy.runtime.remote import _jobs as jobs
from lampy.runtime.remote._npy import NpyMeta, read_meta
from lampy.runtime.remote._reference import VERSION_HEADER

DEFAULT_PORT = 5050
MAX_UPLOAD_BYTES = MAX_FRAME_BYTES  # what lampy's frames may carry
SLICE = 1 << 20  # uploads are written, and files sent, in slices of this size
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    """A request answered with `status` and a one-line reason."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def make_app(
    root: Path, secret: bytes, max_upload: int = MAX_UPLOAD_BYTES, job_ttl: float = jobs.JOB_TTL_S
) -> web.Application:
    """The server's application: `root`'s `.npy` files, requests signed with `secret`; the
    state of jobs orchestrated in lambdas kept `job_ttl` seconds after their last activity."""
    base = root.resolve(strict=True)
    freshness = Freshness()  # nonces of the requests this server took

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Refused as exc:
            return web.Response(status=exc.status, text=f"{exc}\n")
        except RemoteArrayError as exc:
            return web.Response(status=exc.status, text=f"{exc}\n")

    async def status(request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    async def get(request: web.Request) -> web.StreamResponse:
        _authorize(request, secret, freshness)
        name = request.match_info["tail"]
        path = _resolve(base, name)
        try:
            with open(path, "rb") as file:
                meta = read_meta(file, name)
        except (FileNotFoundError, IsADirectoryError):
            raise RemoteArrayNotFound(f"no array {name!r} here") from None
        if "meta" in request.query:
            return web.json_response(meta.to_json())
        wanted = request.headers.get(VERSION_HEADER)
        if wanted is not None and wanted != meta.version:
            raise _Refused(412, f"{name} changed since the reference was made")
        return web.FileResponse(path, chunk_size=SLICE)

    async def put(request: web.Request) -> web.Response:
        _authorize(request, secret, freshness)
        name = request.match_info["tail"]
        path = _resolve(base, name)
        length = request.content_length
        if length is None:
            raise _Refused(411, "an upload must declare its Content-Length")
        if length > max_upload:
            raise _Refused(
                413,
                f"upload of {length:,} bytes refused: this server takes at most {max_upload:,} "
                "(lampy serve --max-upload)",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            meta = await _receive(request, partial, length, name)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return web.json_response(meta.to_json(), status=201)

    # aiohttp reads at most 1 MiB of a body by default: the job endpoints (records of large
    # partials, a spec with large shared arguments) take what an upload may carry
    app = web.Application(middlewares=[errors], client_max_size=max_upload)
    app.router.add_get("/status", status)
    jobs.add_routes(
        app, base, max_upload, lambda request: _authorize(request, secret, freshness), job_ttl
    )
    app.router.add_get("/{tail:.+}", get)
    app.router.add_put("/{tail:.+}", put)
    return app


async def _receive(request: web.Request, partial: Path, length: int, name: str) -> NpyMeta:
    """Write the body to `partial` and check it is a whole `.npy` file of `length` bytes."""
    got = 0
    with open(partial, "wb") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # held while written: sweep_parts leaves it alone
        async for piece in request.content.iter_chunked(SLICE):
            got += len(piece)
            if got > length:
                raise _Refused(400, f"body longer than its Content-Length {length:,}")
            file.write(piece)
    if got != length:
        raise _Refused(400, f"body ended after {got:,} of {length:,} bytes")
    with open(partial, "rb") as file:
        meta = read_meta(file, name)
    if length != meta.offset + meta.nbytes:
        extra = length - meta.offset - meta.nbytes
        raise RemoteArrayError(
            f"{name}: {extra:,} bytes follow the array's data; upload exactly one .npy file"
        )
    return meta


def _authorize(request: web.Request, secret: bytes, freshness: Freshness) -> None:
    why = auth.check(secret, request.method, request.raw_path, request.headers, freshness)
    if why is not None:
        raise _Refused(401, f"refused: {why}")


def _resolve(base: Path, name: str) -> Path:
    """The file `name` names under `base`; refuses anything that could lead outside it."""
    parts = name.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts) or "\\" in name:
        raise RemoteArrayRefused(
            f"path {name!r} refused: it must be a relative path inside the served directory, "
            "without '..' or hidden (dot) names"
        )
    if not name.endswith(".npy"):
        raise RemoteArrayError(f"{name!r} is not a .npy name: this server serves .npy files only")
    path = base / name
    if not path.resolve().is_relative_to(base):
        raise RemoteArrayRefused(f"path {name!r} refused: it leads outside the served directory")
    return path


def serve(
    root: Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_upload: int = MAX_UPLOAD_BYTES,
    job_ttl: float = jobs.JOB_TTL_S,
) -> None:
    """Run the server until interrupted (the `lampy serve` command)."""
    if not root.is_dir():
        raise SystemExit(f"lampy serve: {root} is not a directory")
    app = make_app(root, load_secret(), max_upload, job_ttl)
    swept = sweep_parts(root)
    left = f" (removed {swept} partial uploads an earlier server left)" if swept else ""
    print(f"lampy serve: {root.resolve()} on http://{host}:{port}{left}", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None)
