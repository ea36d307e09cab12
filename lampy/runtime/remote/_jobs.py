"""Durable job state on an array server: what lets a lambda orchestrate, hand off, and the
client go away (orchestrator="lambda", lampy.runtime.openlambda._coordinator).

A job lives in `jobs/<id>/` under the server's directory, never in a coordinator's memory:

    spec            the job, a signed frame (the coordinator's `Assignment`), written once
    chunks/<n>      chunk n's outcome, a signed frame, written ONCE: a second write is refused,
                    so no chunk is merged twice however many coordinators ran it
    lease.json      who orchestrates: holder, until (Unix time), generation, remaining lifetime
    events.jsonl    hand-offs and revivals, one JSON object a line
    counters.json   each coordinator's counts (calls, retries, failures), by holder
    result          the job's report, a signed frame, written once
    cancelled       present once the job was cancelled

and, beside them, the job's own files: `published/<id>/` (its inputs, uploaded by reference)
and `results/<id>/` (its elemwise results).

A job's files have a lifetime. Once its result is fetched (`JobHandle.result()`: a DELETE),
and on cancel once its coordinator has had the time to see it (CANCEL_GRACE_S), everything
goes but a tombstone of a few hundred bytes (TOMBSTONE: its status, which `lampy job ID` still
shows); `ttl` seconds after its last activity (its creation, a lease, its result, its fetch or
its cancellation: `lampy serve --job-ttl`, a day by default), all of it goes. A sweep runs
every few seconds (SWEEP_S at most).

Endpoints (`lampy serve`, every request signed like the rest of the server; a JSON body's
SHA-256 is signed too):

    PUT  /jobs/<id>/spec?chunks=N      create the job
    GET  /jobs/<id>/spec
    GET  /jobs/<id>                    status (JSON): chunks, done, lease, events, counters, state
    PUT  /jobs/<id>/chunks             record outcomes (u32 chunk, u64 length, frame ...);
                                       answers the chunks refused as recorded already
    GET  /jobs/<id>/chunks             every recorded outcome (u32 chunk, u64 length, frame ...)
    POST /jobs/<id>/lease              take or renew the orchestrator's lease (JSON), 409 if held
    POST /jobs/<id>/counters           a coordinator's counts (JSON)
    PUT  /jobs/<id>/result             the report, once
    GET  /jobs/<id>/result?wait=S[&orphaned=T]
                                       the report; 202 with the status if none within S
                                       seconds, or (given T) once the job has had no live
                                       lease for T seconds: a watcher's one request a while
    POST /jobs/<id>/cancel             stop: leases are refused from then on (410)
    DELETE /jobs/<id>                  its result was fetched: remove its files, keep its status

The lease rule: a lease is granted when none is held, when the holder's has expired, or when
the request names the current generation (the holder renewing, or the successor it chose
taking over). Frames at rest are checked for their signature and versions, not their age.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lampy._errors import RemoteArrayError, RemoteArrayNotFound
from lampy.runtime._secret import Freshness, load_secret
from lampy.runtime.remote import _auth as auth

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_WAIT_S = 30.0  # the longest a result request is held open
LEASE_LOOK_S = 0.25  # how often a held result request reads the lease, when asked to
MAX_JSON_BYTES = 1 << 16
JOB_TTL_S = 24 * 3600.0  # a job's files are kept this long after its last activity
CANCEL_GRACE_S = 10.0  # a cancelled job's files outlive its coordinator's last renewal (0.5 s)
SWEEP_S = 60.0  # the longest between two sweeps (shorter for a short ttl)
#: A job's files beside its folder, by the job's id.
OWN_FILES = ("published", "results")
#: What a cancelled job keeps until its ttl: enough to say so.
TOMBSTONE = {"meta.json", "cancelled", "fetched", "lease.json", "events.jsonl", "counters.json"}
REMOVED = (
    "job {job}: its files were removed (its result was fetched, or it was cancelled); "
    "`lampy job ID` still shows its status\n"
)
_RECORD = struct.Struct("<IQ")

# -- on the server ----------------------------------------------------------------------------


def add_routes(
    app: Any,
    root: Path,
    max_upload: int,
    authorize: Callable[[Any], None],
    ttl: float = JOB_TTL_S,
) -> None:
    """Register the job endpoints on `lampy serve`'s aiohttp application (before its
    catch-all routes): jobs are kept under `root`/jobs, each for `ttl` seconds after its last
    activity at most (a background sweep)."""
    from aiohttp import web

    jobs = root / "jobs"
    locks: dict[str, asyncio.Lock] = {}
    stopping = asyncio.Event()  # set as the server stops: held result requests answer now

    async def stop_waiting(app: Any) -> None:
        stopping.set()

    def where(request: web.Request, exists: bool = True) -> Path:
        authorize(request)
        job = request.match_info["job"]
        if not JOB_ID.match(job):
            raise web.HTTPBadRequest(text=f"bad job id {job!r}: 32 hex digits\n")
        folder = jobs / job
        if exists and not (folder / "meta.json").exists():
            raise web.HTTPNotFound(
                text=f"no job {job} here (a job is removed once its result is fetched, and "
                f"{ttl:g} s after its last activity)\n"
            )
        return folder

    async def body(request: web.Request, limit: int) -> bytes:
        length = request.content_length
        if length is None or length > limit:
            raise web.HTTPRequestEntityTooLarge(
                max_size=limit, actual_size=length or 0, text=f"at most {limit:,} bytes\n"
            )
        data = await request.read()
        digest = request.headers.get(auth.DIGEST_HEADER)
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise web.HTTPBadRequest(text="the body does not match its signed digest\n")
        return data

    async def json_body(request: web.Request) -> dict[str, Any]:
        if auth.DIGEST_HEADER not in request.headers:
            raise web.HTTPBadRequest(text="a job's JSON request must sign its body's digest\n")
        try:
            value = json.loads(await body(request, MAX_JSON_BYTES))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"not JSON: {exc}\n") from None
        if not isinstance(value, dict):
            raise web.HTTPBadRequest(text="expected a JSON object\n")
        return value

    async def put_spec(request: web.Request) -> web.Response:
        folder = where(request, exists=False)
        try:
            chunks = int(request.query.get("chunks", ""))
        except ValueError:
            raise web.HTTPBadRequest(text="?chunks=N is required\n") from None
        data = await body(request, max_upload)
        (folder / "chunks").mkdir(parents=True, exist_ok=True)
        _write(folder / "meta.json", json.dumps({"chunks": chunks, "created": time.time()}))
        if not _write_once(folder / "spec", data):
            raise web.HTTPConflict(text="this job exists already\n")
        return web.Response(status=201, text="created\n")

    async def get_file(request: web.Request) -> web.Response:
        folder = where(request)
        try:
            return web.Response(body=(folder / request.match_info["file"]).read_bytes())
        except FileNotFoundError:  # a tombstone keeps the job's status only
            raise web.HTTPGone(text=REMOVED.format(job=folder.name)) from None

    async def put_chunks(request: web.Request) -> web.Response:
        folder = where(request)
        if (folder / "cancelled").exists():
            raise web.HTTPGone(text=f"job {folder.name} was cancelled\n")
        data = memoryview(await body(request, max_upload))
        try:
            records = list(_unbundle(data))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"bad records: {exc}\n") from None
        refused = [chunk for chunk, frame in records if not _record(folder, chunk, frame)]
        return web.json_response({"refused": refused})

    async def get_chunks(request: web.Request) -> web.StreamResponse:
        folder = where(request)
        found = [p for p in (folder / "chunks").iterdir() if p.name.isdigit()]
        data = bundle([(int(p.name), p.read_bytes()) for p in found])
        return web.Response(body=data, content_type="application/octet-stream")

    async def lease(request: web.Request) -> web.Response:
        folder = where(request)
        asked = await json_body(request)
        holder, seconds = str(asked.get("holder", "")), float(asked.get("seconds", 0))
        if not 0 < len(holder) <= 200 or not 0 < seconds <= 3600:
            raise web.HTTPBadRequest(
                text="a lease needs a holder (at most 200 characters) and 0 < seconds <= 3600\n"
            )
        async with locks.setdefault(folder.name, asyncio.Lock()):
            if (folder / "cancelled").exists():
                return web.json_response({"cancelled": True}, status=410)
            if (folder / "result").exists() or (folder / "fetched").exists():
                return web.json_response({"done": True}, status=409)
            now = time.time()
            current = _read_json(folder / "lease.json")
            free = current is None or current["until"] < now
            named = current is not None and asked.get("expect") == current["generation"]
            if not (free or named):
                return web.json_response(current, status=409)
            generation = 0 if current is None else current["generation"]
            changed = current is None or current["holder"] != holder
            granted = {
                "holder": holder,
                "until": now + seconds,
                "generation": generation + 1 if changed else generation,
                "since": now if current is None or changed else current["since"],
                "lifetime": float(asked.get("lifetime", seconds)),
            }
            _write(folder / "lease.json", json.dumps(granted))
            if changed:
                event = {
                    "at": now,
                    "to": holder,
                    "from": None if current is None else current["holder"],
                    "why": str(asked.get("why", "start"))[:200],
                }
                with open(folder / "events.jsonl", "a") as log:
                    log.write(json.dumps(event) + "\n")
            return web.json_response(granted)

    async def counters(request: web.Request) -> web.Response:
        folder = where(request)
        asked = await json_body(request)
        async with locks.setdefault(folder.name, asyncio.Lock()):
            known = _read_json(folder / "counters.json") or {}
            known[str(asked.get("holder", "?"))] = asked.get("counts", {})
            _write(folder / "counters.json", json.dumps(known))
        return web.Response(text="noted\n")

    async def put_result(request: web.Request) -> web.Response:
        folder = where(request)
        data = await body(request, max_upload)
        if not _write_once(folder / "result", data):
            return web.Response(status=409, text="the job has its result already\n")
        return web.Response(status=201, text="stored\n")

    async def get_result(request: web.Request) -> web.Response:
        folder = where(request)
        try:
            wait = min(max(float(request.query.get("wait", "0")), 0.0), MAX_WAIT_S)
            orphaned = float(request.query.get("orphaned", "inf"))
        except ValueError:
            raise web.HTTPBadRequest(text="?wait=seconds&orphaned=seconds\n") from None
        arrived, deadline = time.time(), time.monotonic() + wait
        look = 0.0  # when to read the lease next (a few times a second, not every 20 ms)
        while True:
            path = folder / "result"
            if path.exists():
                with contextlib.suppress(FileNotFoundError):  # unless fetched meanwhile
                    return web.Response(body=path.read_bytes())
            if (folder / "fetched").exists():
                raise web.HTTPGone(text=REMOVED.format(job=folder.name))
            over = stopping.is_set() or time.monotonic() >= deadline
            if orphaned < math.inf and time.monotonic() >= look:
                look = time.monotonic() + LEASE_LOOK_S
                lease = _read_json(folder / "lease.json")
                live = max(lease["until"] if lease else 0.0, arrived)  # or since asked
                over = over or time.time() - live >= orphaned
            if over or (folder / "cancelled").exists():
                return web.json_response(status_of(folder), status=202)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.02)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_of(where(request)))

    async def cancel(request: web.Request) -> web.Response:
        folder = where(request)
        if not (folder / "cancelled").exists():
            _write(folder / "cancelled", str(time.time()))
        return web.json_response(status_of(folder))

    async def delete(request: web.Request) -> web.Response:
        folder = where(request)
        async with locks.setdefault(folder.name, asyncio.Lock()):
            _write(folder / "fetched", str(time.time()))
            entomb(root, folder)
        return web.Response(text="removed\n")

    async def sweeping(app: Any) -> Any:
        async def sweep_now_and_then() -> None:
            while True:
                await asyncio.to_thread(sweep, root, ttl, time.time())
                await asyncio.sleep(max(min(SWEEP_S, ttl / 4, CANCEL_GRACE_S / 4), 0.25))

        task = asyncio.ensure_future(sweep_now_and_then())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(sweeping)
    app.on_shutdown.append(stop_waiting)

    app.router.add_put("/jobs/{job}/spec", put_spec)
    app.router.add_get("/jobs/{job}/{file:spec}", get_file)
    app.router.add_put("/jobs/{job}/chunks", put_chunks)
    app.router.add_get("/jobs/{job}/chunks", get_chunks)
    app.router.add_post("/jobs/{job}/lease", lease)
    app.router.add_post("/jobs/{job}/counters", counters)
    app.router.add_put("/jobs/{job}/result", put_result)
    app.router.add_get("/jobs/{job}/result", get_result)
    app.router.add_post("/jobs/{job}/cancel", cancel)
    app.router.add_get("/jobs/{job}", status)
    app.router.add_delete("/jobs/{job}", delete)


def remove(root: Path, job: str, keep: frozenset[str] | set[str] = frozenset()) -> None:
    """Remove the job's files under `root` (its folder but the names in `keep`, and its
    published inputs and stored results)."""
    folder = root / "jobs" / job
    for own in OWN_FILES:
        shutil.rmtree(root / own / job, ignore_errors=True)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name not in keep:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def sweep(root: Path, ttl: float, now: float) -> list[str]:
    """Remove the jobs whose last activity is older than `ttl` seconds, and the files of the
    jobs cancelled over CANCEL_GRACE_S ago; the jobs removed whole."""
    removed = []
    for folder in (root / "jobs").glob("*"):
        if not JOB_ID.match(folder.name):
            continue
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile (a DELETE)
            names = {path.name for path in folder.iterdir()}
            touched = {
                name: (folder / name).stat().st_mtime
                for name in ("meta.json", "lease.json", "result", "cancelled")
                if name in names
            }
            # a folder whose meta.json is not written yet is a job being created: its own
            # time counts, so the sweep does not pull the folder from under its creation
            last = max(touched.values(), default=folder.stat().st_mtime)
            if now - last > ttl:
                remove(root, folder.name)
                removed.append(folder.name)
            elif "spec" in names and now - touched.get("cancelled", now) > CANCEL_GRACE_S:
                entomb(root, folder)
    return removed


def entomb(root: Path, folder: Path) -> None:
    """Remove a job's files but its status (TOMBSTONE), which keeps its count of chunks done."""
    meta = _read_json(folder / "meta.json") or {}
    chunks = folder / "chunks"
    if chunks.is_dir():
        meta["done"] = sum(1 for p in chunks.iterdir() if p.name.isdigit())
        _write(folder / "meta.json", json.dumps(meta))
    remove(root, folder.name, keep=TOMBSTONE)


def _record(folder: Path, chunk: int, frame: memoryview) -> bool:
    return _write_once(folder / "chunks" / str(chunk), bytes(frame))


def bundle(records: list[tuple[int, bytes]]) -> bytes:
    """Outcome records as one body: (u32 chunk, u64 length, frame) each."""
    return b"".join(_RECORD.pack(chunk, len(frame)) + frame for chunk, frame in records)


def _unbundle(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    at = 0
    while at < len(data):
        if len(data) - at < _RECORD.size:
            raise ValueError("a truncated record")
        chunk, length = _RECORD.unpack_from(data, at)
        at += _RECORD.size
        if length > len(data) - at:
            raise ValueError("a truncated record")
        yield chunk, data[at : at + length]
        at += length


def status_of(folder: Path) -> dict[str, Any]:
    """A job's progress as `lampy job ID` shows it."""
    meta = _read_json(folder / "meta.json") or {}
    chunks = folder / "chunks"
    done = meta.get("done", 0)  # a cancelled job's tombstone keeps the count
    if chunks.is_dir():
        done = sum(1 for p in chunks.iterdir() if p.name.isdigit())
    events = []
    if (folder / "events.jsonl").exists():
        events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    state = "running"
    if (folder / "result").exists() or (folder / "fetched").exists():
        state = "done"
    elif (folder / "cancelled").exists():
        state = "cancelled"
    return {
        "job": folder.name,
        "state": state,
        "chunks": meta.get("chunks"),
        "done": done,
        "created": meta.get("created"),
        "lease": _read_json(folder / "lease.json"),
        "events": events,
        "counters": _read_json(folder / "counters.json") or {},
        "fetched": (folder / "fetched").exists(),  # its result fetched, its files removed
    }


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _write_once(path: Path, data: bytes) -> bool:
    """Create `path` with `data` unless it exists (atomic: a hard link never replaces)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_bytes(data)
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


# -- anywhere (the client, a coordinator in a sandbox): standard library only -----------------


class StoreError(RemoteArrayError):
    """The job store answered something other than what was asked."""


class JobStore:
    """One job's state on an array server, over signed HTTP (a connection per thread)."""

    def __init__(self, server: str, job: str, timeout: float = 60.0) -> None:
        if not JOB_ID.match(job):
            raise StoreError(f"bad job id {job!r}: a lampy job id is 32 hex digits")
        parts = urllib.parse.urlsplit(server)
        if parts.scheme != "http" or not parts.hostname:
            raise StoreError(f"bad job store {server!r}: use http://host:port of `lampy serve`")
        self.server, self.job, self.timeout = server.rstrip("/"), job, timeout
        self.host, self.port = parts.hostname, parts.port or 80
        self.secret = load_secret()
        self._local = threading.local()  # a kept-alive connection per thread
        self._open: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    @property
    def prefix(self) -> str:
        return f"/jobs/{self.job}"

    def create(self, spec: bytes, chunks: int) -> bool:
        """Create the job; False when it exists already (a summons sent again)."""
        return (
            self._call("PUT", "/spec", spec, query=f"chunks={chunks}", expect=(201, 409))[0] == 201
        )

    def spec(self) -> bytes:
        return self._call("GET", "/spec")[1]

    def status(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self._call("GET", "")[1])
        return value

    def record(self, records: list[tuple[int, bytes]]) -> list[int]:
        """Record chunks' outcomes in one request; the chunks refused because they were
        recorded already (another coordinator's answer is the one merged)."""
        answer = self._call("PUT", "/chunks", bundle(records), digest=True)[1]
        refused: list[int] = json.loads(answer)["refused"]
        return refused

    def records(self) -> Iterator[tuple[int, memoryview]]:
        return _unbundle(memoryview(self._call("GET", "/chunks")[1]))

    def lease(
        self, holder: str, seconds: float, expect: int | None, why: str, lifetime: float
    ) -> tuple[int, dict[str, Any]]:
        """Ask for the orchestrator's lease: (200, it) when granted; (409, the holder's),
        (409, {"done": True}) or (410, {"cancelled": True}) when not."""
        asked = {"holder": holder, "seconds": seconds, "expect": expect, "why": why}
        asked["lifetime"] = lifetime
        status, data = self._json("POST", "/lease", asked, expect=(200, 409, 410))
        return status, json.loads(data)

    def counters(self, holder: str, counts: dict[str, Any]) -> None:
        self._json("POST", "/counters", {"holder": holder, "counts": counts}, expect=(200,))

    def put_result(self, frame: bytes) -> bool:
        return self._call("PUT", "/result", frame, expect=(201, 409))[0] == 201

    def result(
        self, wait: float, orphaned: float | None = None
    ) -> tuple[bytes | None, dict[str, Any] | None]:
        """The report's frame; or None and the job's status when there is none within `wait`
        seconds, or (given `orphaned`) as soon as the job has had no live lease for that
        long (counted from this request at the earliest)."""
        query = f"wait={wait:g}" + ("" if orphaned is None else f"&orphaned={orphaned:g}")
        status, data = self._call("GET", "/result", query=query, expect=(200, 202))
        return (data, None) if status == 200 else (None, json.loads(data))

    def cancel(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self._json("POST", "/cancel", {}, expect=(200,))[1])
        return value

    def delete(self) -> None:
        """Remove the job and its files from the store now."""
        self._call("DELETE", "")

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connections of every thread."""
        with self._lock:
            kept, self._open = self._open, set()
        for connection in kept:
            connection.close()

    def _json(
        self, method: str, path: str, value: dict[str, Any], expect: tuple[int, ...]
    ) -> tuple[int, bytes]:
        data = json.dumps(value).encode()
        return self._call(method, path, data, expect=expect, digest=True)

    def _call(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        query: str = "",
        expect: tuple[int, ...] = (200,),
        digest: bool = False,
    ) -> tuple[int, bytes]:
        target = self.prefix + path + (f"?{query}" if query else "")
        length = "" if data is None else str(len(data))
        hashed = hashlib.sha256(data).hexdigest() if digest and data is not None else ""
        headers = auth.sign(self.secret, method, target, "", length, hashed)
        if data is not None:
            headers["Content-Length"] = length
        for attempt in (1, 2):
            connection: http.client.HTTPConnection | None = getattr(self._local, "kept", None)
            self._local.kept = None
            reused = connection is not None
            if connection is None:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                connection.request(method, target, body=data, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                if reused and attempt == 1:
                    headers = auth.sign(self.secret, method, target, "", length, hashed)
                    headers |= {"Content-Length": length} if data is not None else {}
                    continue  # a kept connection the server had closed: once more, fresh
                raise StoreError(
                    f"cannot reach the job store {self.server} ({type(exc).__name__}: {exc}); "
                    "is its `lampy serve` still running?"
                ) from None
        assert connection is not None
        if response.will_close:
            connection.close()
        else:
            self._local.kept = connection
            with self._lock:
                self._open.add(connection)
        if response.status in expect:
            return response.status, answer
        text = answer[:500].decode(errors="replace").strip()
        if response.status == 404:
            raise RemoteArrayNotFound(f"job {self.job} is not on {self.server} ({text})")
        raise StoreError(f"{method} {self.server}{target}: HTTP {response.status}: {text}")


AT_REST = math.inf  # frames kept in the store are checked for signature, not age


def at_rest() -> Freshness:
    """The freshness check for a frame read back from the store: its signature is what
    counts (the request that wrote it was fresh); it may be old and read many times."""
    return Freshness(window=AT_REST)
