"""`lampy worker`: an OpenLambda-compatible worker for development, tests and single machines.

It speaks OpenLambda's HTTP interface (see DESIGN's openlambda notes): `/run/<name>[/...]`,
`/status`, `/stats` and the registry, with the same status codes and error texts. Each sandbox is
a separate process (`sandbox.py`) that imports the lambda's `f.py` the way OpenLambda's Python
runtime does and serves one request at a time over a Unix socket; this process forwards method,
URI, headers and body there and copies the answer back, streaming both ways.

Scaling follows go/worker/lambda/lambdaFunction.go: about one sandbox per 10 ms of outstanding
work, adding or removing at most one sandbox per 100 ms; the first call of an idle lambda starts
one at once. A call past the runtime limit kills its sandbox and gets 502 `RoundTrip failed`.
What differs: no cgroups or freezer (idle sandboxes just block in accept), packages come from
this interpreter rather than `requirements.txt`, and an idle sandbox is kept at least
`IDLE_GRACE_S` before it is scaled down, so a pre-warm survives until the job that follows it.

With a chaos plan (`--chaos`, see chaos.py) the worker also injects faults into `/run` calls, the
way a real platform fails: it kills sandboxes mid-call, answers 502 or 429, hangs past the
runtime limit, resets connections, damages answers and replays earlier answers; it counts each
as `chaos_<fault>` in `/stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

from aiohttp import web

from lampy.runtime.openlambda._chaos import FaultPlan

NAME = re.compile(r"^[A-Za-z0-9.\-_]+$")
SANDBOX_SCRIPT = str(Path(__file__).with_name("_sandbox.py"))
QUEUE_LIMIT = 1024  # OpenLambda's waiting-request bound per lambda
SCALE_TICK_S = 0.1  # at most one sandbox added or removed per tick
TARGET_QUEUE_MS = 10.0  # one sandbox per this much outstanding work
IDLE_GRACE_S = 2.0  # an idle sandbox is kept this long before scaling down removes it
START_TIMEOUT_S = 60.0  # a sandbox that is not ready by then could not be created
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"}
IO_CHUNK = 1 << 20
SMALL_BYTES = 1 << 16  # bodies up to this size are forwarded whole, in one write
ANSWERS_KEPT = 16  # with a chaos plan: recent answers kept for replaying as duplicates


class SandboxError(Exception):
    """A sandbox could not be created (its f.py failed to import, or the process died)."""


class CallerGone(Exception):
    """The caller hung up while its answer was streaming; the sandbox itself is fine."""


class Sandbox:
    """One sandbox process serving one lambda's code over a Unix socket."""

    def __init__(self, process: asyncio.subprocess.Process, path: str) -> None:
        self.process, self.path = process, path
        self.fresh = True
        self.idle_since = time.monotonic()

    @classmethod
    async def start(cls, directory: Path, workdir: Path, serial: int) -> Sandbox:
        path = str(workdir / f"sb{serial}.sock")
        log = workdir / f"sb{serial}.log"
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(log, "wb") as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                SANDBOX_SCRIPT,
                str(directory),
                path,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
                env=env,
            )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        if line != b"ready\n":
            if process.returncode is None:
                process.kill()
            await process.wait()
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise SandboxError("\n".join(tail) or f"exited with code {process.returncode}")
        return cls(process, path)

    def state(self) -> str:
        code = self.process.returncode
        if code is None:
            return f"running (pid {self.process.pid})"
        return f"exited with code {code}" if code >= 0 else f"killed by signal {-code}"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Lambda:
    """A registered lambda: its code, its sandboxes, and the calls waiting for one."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name, self.directory = name, directory
        self.methods = _allowed_methods(directory)
        self.sandboxes: list[Sandbox] = []
        self.idle: list[Sandbox] = []
        self.waiters: deque[asyncio.Future[Sandbox]] = deque()
        self.starting = 0
        self.outstanding = 0
        self.average_ms = TARGET_QUEUE_MS
        self.scaler: asyncio.Task[None] | None = None

    async def remove(self, sandbox: Sandbox) -> None:
        """Take a sandbox out of this lambda's pools (idle or busy) and stop it."""
        if sandbox in self.idle:
            self.idle.remove(sandbox)
        if sandbox in self.sandboxes:
            self.sandboxes.remove(sandbox)
        await sandbox.stop()


class Worker:
    """The worker's state and its aiohttp application."""

    def __init__(
        self,
        registry: Path,
        max_sandboxes: int = 2 * (os.cpu_count() or 1),
        runtime_limit: float = 30.0,
        queue_limit: int = QUEUE_LIMIT,
        chaos: FaultPlan | None = None,
    ) -> None:
        self.registry = registry
        self.chaos = chaos.dealer() if chaos is not None else None
        self.answers: deque[bytes] = deque(maxlen=ANSWERS_KEPT)  # for chaos duplicates
        self.max_sandboxes = max_sandboxes
        self.runtime_limit = runtime_limit
        self.queue_limit = queue_limit
        self.lambdas: dict[str, Lambda] = {}
        self.stats: Counter[str] = Counter()
        self.serial = 0
        self._stopping: set[asyncio.Task[None]] = set()
        self.workdir = Path(tempfile.mkdtemp(prefix="lampy-worker-"))
        registry.mkdir(parents=True, exist_ok=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30, handler_args={"read_bufsize": IO_CHUNK})
        app.router.add_get("/status", self.status)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_get("/registry", self.list_lambdas)
        app.router.add_post("/registry/{name}", self.upload)
        app.router.add_delete("/registry/{name}", self.delete)
        app.router.add_get("/registry/{name}/config", self.config)
        app.router.add_route("*", "/run", self.run)
        app.router.add_route("*", "/run/{tail:.*}", self.run)
        app.on_cleanup.append(self.shutdown)
        return app

    async def shutdown(self, app: web.Application | None = None) -> None:
        for lam in self.lambdas.values():
            if lam.scaler is not None:
                lam.scaler.cancel()
            await asyncio.gather(*(sb.stop() for sb in lam.sandboxes))
        self.lambdas.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- plain endpoints --------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    async def get_stats(self, request: web.Request) -> web.Response:
        counts = dict(self.stats)
        counts["sandboxes"] = sum(len(lam.sandboxes) for lam in self.lambdas.values())
        counts["idle_sandboxes"] = sum(len(lam.idle) for lam in self.lambdas.values())
        counts["outstanding"] = sum(lam.outstanding for lam in self.lambdas.values())
        return web.json_response(counts)

    # -- registry ---------------------------------------------------------------------------

    def _blob(self, name: str) -> Path:
        return self.registry / f"{name}.tar.gz"

    async def list_lambdas(self, request: web.Request) -> web.Response:
        blobs = self.registry.glob("*.tar.gz")
        return web.json_response(sorted(p.name[: -len(".tar.gz")] for p in blobs))

    async def upload(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not NAME.match(name):
            return _text(400, f"bad lambda name {name!r}: names must match {NAME.pattern}")
        body = await request.read()
        try:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
                tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            return _text(400, f"could not read the uploaded tar.gz: {exc}")
        self._blob(name).write_bytes(body)
        await self._retire(name)
        return _text(201, f"Lambda {name} uploaded successfully")

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not NAME.match(name) or not self._blob(name).exists():
            return _text(404, f'lambda "{name}" not found in blob store ({self.registry})')
        self._blob(name).unlink()
        await self._retire(name)
        return _text(200, f"Lambda {name} deleted successfully")

    async def config(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        lam = self._lambda(name) if NAME.match(name) else None
        if lam is None:
            return _text(404, f'lambda "{name}" not found in blob store ({self.registry})')
        http = [{"method": m} for m in lam.methods or []]
        return web.json_response({"triggers": {"http": http}})

    async def _retire(self, name: str) -> None:
        """Forget loaded code: idle sandboxes stop now, busy ones when their call ends."""
        lam = self.lambdas.pop(name, None)
        if lam is None:
            return
        if lam.scaler is not None:
            lam.scaler.cancel()
        await asyncio.gather(*(lam.remove(sb) for sb in list(lam.idle)))

    def _lambda(self, name: str) -> Lambda | None:
        """The loaded lambda, extracting its blob on first use."""
        if name in self.lambdas:
            return self.lambdas[name]
        blob = self._blob(name)
        if not blob.exists():
            return None
        self.serial += 1
        directory = self.workdir / f"{name}-{self.serial}"
        with tarfile.open(blob, mode="r:gz") as tar:
            tar.extractall(directory, filter="data")
        lam = self.lambdas[name] = Lambda(name, directory)
        return lam

    # -- running ----------------------------------------------------------------------------

    async def run(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("tail", "").split("/", 1)[0]
        if not name:
            return _text(500, "expected invocation format: /run/<lambda-name>")
        lam = self._lambda(name) if NAME.match(name) else None
        if lam is None:
            return _text(500, f'lambda "{name}" not found in blob store ({self.registry})')
        if lam.methods and request.method not in lam.methods:
            allowed = " ".join(lam.methods)
            return _text(
                405, f"HTTP method not allowed. Sent: {request.method}, Allowed: [{allowed}]"
            )
        self.stats["requests"] += 1
        fault = self.chaos.draw() if self.chaos is not None else None
        if fault == "429":
            self.stats["chaos_429"] += 1
            return _text(429, "lambda function queue is full")
        if fault == "502":
            self.stats["chaos_502"] += 1
            return _text(502, "RoundTrip failed: injected by --chaos\nSandbox State: running")
        lam.outstanding += 1
        try:
            try:
                sandbox = await self._acquire(lam)
            except SandboxError as exc:
                self.stats["sandbox_failures"] += 1
                return _text(500, f"could not create Sandbox: {exc}")
            except OverflowError:
                self.stats["queue_full"] += 1
                return _text(429, "lambda function queue is full")
            self.stats["cold_starts" if sandbox.fresh else "warm_starts"] += 1
            sandbox.fresh = False
            return await self._forward(lam, sandbox, request, fault)
        finally:
            lam.outstanding -= 1

    async def _acquire(self, lam: Lambda) -> Sandbox:
        if lam.idle:
            return lam.idle.pop()
        if not lam.sandboxes and not lam.starting and self._room():
            await self._add(lam)
            if lam.idle:
                return lam.idle.pop()
        if len(lam.waiters) >= self.queue_limit:
            raise OverflowError
        waiter: asyncio.Future[Sandbox] = asyncio.get_running_loop().create_future()
        lam.waiters.append(waiter)
        if lam.scaler is None or lam.scaler.done():
            lam.scaler = asyncio.create_task(self._scale(lam))
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter in lam.waiters:
                lam.waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(lam, waiter.result())
            raise

    def _room(self) -> bool:
        total = sum(len(lam.sandboxes) + lam.starting for lam in self.lambdas.values())
        return total < self.max_sandboxes

    async def _evict(self, wanted: Lambda) -> None:
        """Make room for `wanted` by stopping the longest-idle sandbox of another lambda."""
        idle = [
            (sb.idle_since, lam, sb)
            for lam in self.lambdas.values()
            if lam is not wanted
            for sb in lam.idle
        ]
        if idle:
            _, lam, sandbox = min(idle, key=lambda entry: entry[0])
            self.stats["sandboxes_evicted"] += 1
            await lam.remove(sandbox)

    async def _add(self, lam: Lambda) -> None:
        """Start one sandbox and hand it to a waiting call (or keep it idle)."""
        lam.starting += 1
        self.serial += 1
        try:
            sandbox = await Sandbox.start(lam.directory, self.workdir, self.serial)
        except SandboxError as exc:
            while lam.waiters:
                waiter = lam.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(SandboxError(str(exc)))
            raise
        finally:
            lam.starting -= 1
        self.stats["sandboxes_created"] += 1
        lam.sandboxes.append(sandbox)
        self._release(lam, sandbox)

    def _release(self, lam: Lambda, sandbox: Sandbox) -> None:
        if self.lambdas.get(lam.name) is not lam:  # code replaced meanwhile
            task = asyncio.get_running_loop().create_task(lam.remove(sandbox))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
            return
        while lam.waiters:
            waiter = lam.waiters.popleft()
            if not waiter.done():
                waiter.set_result(sandbox)
                return
        sandbox.idle_since = time.monotonic()
        lam.idle.append(sandbox)

    async def _scale(self, lam: Lambda) -> None:
        """Every tick, move the sandbox count one step toward the outstanding work."""
        while self.lambdas.get(lam.name) is lam and (lam.outstanding or len(lam.sandboxes) > 1):
            work_ms = lam.outstanding * lam.average_ms
            desired = max(1, min(self.max_sandboxes, math.ceil(work_ms / TARGET_QUEUE_MS)))
            have = len(lam.sandboxes) + lam.starting
            if have < desired and lam.waiters and not self._room():
                await self._evict(lam)  # OpenLambda evicts idle sandboxes under pressure too
            if have < desired and self._room() and (lam.waiters or not lam.sandboxes):
                with contextlib.suppress(SandboxError):
                    await self._add(lam)
            elif have > desired and lam.idle:
                oldest = lam.idle[0]
                if time.monotonic() - oldest.idle_since >= IDLE_GRACE_S:
                    await lam.remove(oldest)
            await asyncio.sleep(SCALE_TICK_S)

    async def _forward(
        self, lam: Lambda, sandbox: Sandbox, request: web.Request, fault: str | None = None
    ) -> web.StreamResponse:
        start = time.monotonic()
        prepared: list[web.StreamResponse] = []

        async def exchange() -> web.StreamResponse:
            reader, writer = await asyncio.open_unix_connection(sandbox.path, limit=IO_CHUNK)
            try:
                await _send(request, writer)
                if fault == "kill":  # the sandbox dies with the call in its hands
                    self.stats["chaos_kill"] += 1
                    sandbox.process.kill()
                    await sandbox.process.wait()
                    raise ConnectionResetError("EOF: the sandbox died during the call")
                status, reason, headers, length = await _head(reader)
                whole = self.chaos is not None  # chaos may damage or replay any answer
                if whole or length is None or length <= SMALL_BYTES:  # no length: ends at EOF
                    body = await (reader.read() if length is None else reader.readexactly(length))
                    if fault == "hang":  # past the runtime limit: 502, the sandbox destroyed
                        self.stats["chaos_hang"] += 1
                        await asyncio.sleep(self.runtime_limit + 1)
                    answer = web.Response(status=status, reason=reason, body=body)
                    answer.headers.extend(headers)
                    return answer
                response = web.StreamResponse(status=status, reason=reason)
                response.headers.extend(headers)
                response.content_length = length
                await response.prepare(request)
                prepared.append(response)
                await _copy(reader, response, length)
                await response.write_eof()
                return response
            finally:
                writer.close()

        try:
            response = await asyncio.wait_for(exchange(), self.runtime_limit)
        except (asyncio.TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                why = f"context deadline exceeded (runtime limit {self.runtime_limit:g} s)"
            else:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            await lam.remove(sandbox)
            self.stats["roundtrip_failed"] += 1
            if prepared:  # too late for a status line: cut the answer short
                assert request.transport is not None
                request.transport.close()
                return prepared[0]
            return _text(502, f"RoundTrip failed: {why}\nSandbox State: {sandbox.state()}")
        except CallerGone:
            self.stats["callers_gone"] += 1
            self._release(lam, sandbox)
            return prepared[0]
        except asyncio.CancelledError:  # the caller hung up mid-call: the sandbox state is unknown
            await asyncio.shield(lam.remove(sandbox))
            raise
        elapsed_ms = (time.monotonic() - start) * 1e3
        lam.average_ms = 0.8 * lam.average_ms + 0.2 * elapsed_ms
        self._release(lam, sandbox)
        if self.chaos is not None and isinstance(response, web.Response) and response.status == 200:
            return self._after(request, response, fault)
        return response

    def _after(self, request: web.Request, answer: web.Response, fault: str | None) -> web.Response:
        """Chaos after a call ran: reset the connection, damage the answer, or replay an old one."""
        assert self.chaos is not None and isinstance(answer.body, bytes)
        body = answer.body
        if fault == "reset":
            self.stats["chaos_reset"] += 1
            assert request.transport is not None
            request.transport.abort()  # the caller sees the connection reset, no answer
        elif fault == "corrupt" and body:
            self.stats["chaos_corrupt"] += 1
            answer.body = self.chaos.corrupt(body)
        elif fault == "duplicate" and self.answers:
            self.stats["chaos_duplicate"] += 1
            answer.body = self.answers[self.chaos.pick(len(self.answers))]
        self.answers.append(body)
        return answer


async def _send(request: web.Request, writer: asyncio.StreamWriter) -> None:
    """Forward the request: method, path, headers and body, as the OpenLambda worker does."""
    has_length = request.content_length is not None
    lines = [f"{request.method} {request.raw_path} HTTP/1.1", "Host: localhost"]
    for key, value in request.headers.items():
        if key.lower() not in HOP_BY_HOP and (has_length or key.lower() != "content-length"):
            lines.append(f"{key}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if has_length and (request.content_length or 0) <= SMALL_BYTES:  # one write, one wake-up
        writer.write(head + await request.read())
    elif has_length:
        writer.write(head)
        async for chunk in request.content.iter_any():
            writer.write(chunk)
            await writer.drain()
    else:  # a chunked body reaches the sandbox empty, as in OpenLambda
        writer.write(head)
    await writer.drain()


async def _head(reader: asyncio.StreamReader) -> tuple[int, str, list[tuple[str, str]], int | None]:
    """The sandbox's status, reason, headers and Content-Length."""
    status_line = (await reader.readline()).decode("latin-1")
    if not status_line:
        raise ConnectionResetError("EOF: the sandbox closed the connection without answering")
    _, code, *reason = status_line.rstrip("\r\n").split(" ", 2)
    headers: list[tuple[str, str]] = []
    length: int | None = None
    while line := (await reader.readline()).decode("latin-1").rstrip("\r\n"):
        key, _, value = line.partition(":")
        if key.lower() == "content-length":
            length = int(value)
        elif key.lower() not in HOP_BY_HOP:
            headers.append((key.strip(), value.strip()))
    return int(code), reason[0] if reason else "", headers, length


async def _copy(reader: asyncio.StreamReader, response: web.StreamResponse, length: int) -> None:
    left = length
    while left:
        chunk = await reader.read(min(left, IO_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        try:
            await response.write(chunk)
        except (OSError, RuntimeError) as exc:  # aiohttp raises these when the caller hung up
            raise CallerGone from exc
        left -= len(chunk)


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text if text.endswith("\n") else text + "\n")


def _allowed_methods(directory: Path) -> list[str]:
    """HTTP methods listed in the lambda's ol.yaml (`- method: GET` lines); empty means any."""
    path = directory / "ol.yaml"
    if not path.exists():
        return []
    return re.findall(r"method:\s*[\"']?([A-Za-z]+)", path.read_text())


def serve(
    host: str = "127.0.0.1",
    port: int = 5000,
    registry: Path | None = None,
    max_sandboxes: int | None = None,
    runtime_limit: float = 30.0,
    chaos: FaultPlan | None = None,
) -> None:
    """Run a worker until interrupted (the `lampy worker` command)."""
    worker = Worker(
        registry or Path(tempfile.gettempdir()) / "lampy-registry",
        max_sandboxes or 2 * (os.cpu_count() or 1),
        runtime_limit,
        chaos=chaos,
    )
    faults = f", chaos {chaos} seed {chaos.seed}" if chaos is not None else ""
    print(
        f"lampy worker on http://{host}:{port} (registry {worker.registry}, "
        f"up to {worker.max_sandboxes} sandboxes, runtime limit {runtime_limit:g} s{faults})",
        flush=True,
    )
    web.run_app(worker.app(), host=host, port=port, print=None, access_log=None)
