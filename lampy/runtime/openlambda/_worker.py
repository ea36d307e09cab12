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

What it adds, because it also runs where OpenLambda's containers do not (docs/security.md):
every registry request must be signed with the shared secret (`lampy deploy` signs; an
upload's bytes are hashed under the signature); an upload streams to disk within a size limit
and a limit on concurrent uploads, and is unpacked then, off the event loop, within limits on
extracted bytes and members, and refused with the reason when it cannot run. Run as root, each
uploaded version gets its own user id, owning its folder (0700), and its sandboxes run as that
user, so one lambda cannot read another's files (the deployed lampy's `.env` holds the secret).
Replacing or deleting a lambda answers its waiting calls at once (the new version serves them,
or they get OpenLambda's "not found"), and its folder goes when its last call ends. The
working folder `/tmp/lampy-worker-<pid>-*` is locked while the worker lives; a worker killed
outright leaves it behind, and the next one to start removes it.

With a chaos plan (`--chaos`, see chaos.py) the worker also injects faults into `/run` calls, the
way a real platform fails: it kills sandboxes mid-call, answers 502 or 429, hangs past the
runtime limit, resets connections, damages answers, replays earlier answers and drops calls
unanswered (as OpenLambda does behind a failed round trip); it counts each as `chaos_<fault>` in
`/stats`.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import fcntl
import hashlib
import html
import ipaddress
import json
import math
import os
import posixpath
import re
import secrets
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import zlib
from collections import Counter, deque
from pathlib import Path

from aiohttp import web

from lampy._errors import OptionError
from lampy.runtime._secret import Freshness, load_secret, private_dir, sweep_parts
from lampy.runtime.openlambda import _olconfig as olconfig
from lampy.runtime.openlambda._chaos import FaultPlan
from lampy.runtime.remote import _auth as auth

NAME = re.compile(r"^[A-Za-z0-9.\-_]+$")
NAME_PATTERN = r"^[A-Za-z0-9\.\-\_]+$"  # NAME as OpenLambda's error texts spell it
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
#: Counters `GET /stats` shows from the start (a monitor need not special-case a fresh worker).
ALWAYS_COUNTED = ("requests", "cold_starts", "warm_starts", "sandboxes_created")
MAX_UPLOAD_BYTES = 256 << 20  # a registry upload (lampy's own lambda is about 1 MB)
MAX_EXTRACTED_BYTES = 1 << 30  # files unpacked from one upload, in all
MAX_MEMBERS = 10_000  # entries of one upload's tarball
UPLOAD_SLOTS = 2  # uploads received at once; more are answered 429
SANDBOX_UIDS = (1 << 30, 1 << 31)  # the range each uploaded version's user id is drawn from
OWNER_FILE = ".owner"  # in the working folder, written once its lock is held


class SandboxError(Exception):
    """A sandbox could not be created (its f.py failed to import, or the process died)."""


class CallerGone(Exception):
    """The caller hung up, before its body reached the sandbox or while its answer streamed;
    the sandbox itself is fine."""


class Retired(Exception):
    """The lambda a call waited for was replaced or deleted (or the worker is stopping)."""


class Unrunnable(Exception):
    """An upload that could never run: over a limit, or without an entry point (lampy's own
    check, 400), or one OpenLambda refuses too (not a tar.gz, a bad ol.yaml: 500, its text)."""

    def __init__(self, why: str, like_openlambda: bool = False) -> None:
        super().__init__(why)
        self.like_openlambda = like_openlambda

    def answer(self, name: str) -> web.Response:
        if self.like_openlambda:
            return _error(
                500, f"Failed to add lambda: failed to extract config from temp tarball: {self}"
            )
        return _error(400, f"lambda {name} refused: {self}")


# How numpy and its BLAS pick their kernels here (this machine's OPENBLAS_CORETYPE, say): a
# sandbox computes as the client on this machine does, to the bit. Thread counts are set below.
NUMERICS_PREFIXES = ("OPENBLAS_", "MKL_", "NPY_")


def _passed_to_sandboxes(name: str) -> bool:
    """Whether a variable of the worker's environment reaches its sandboxes: the basics a
    process needs, and how numpy computes; nothing else (no secrets, no paths of the user's)."""
    return name in ("PATH", "HOME", "LANG", "TMPDIR") or name.startswith(NUMERICS_PREFIXES)


class Sandbox:
    """One sandbox process serving one lambda's code over a Unix socket."""

    def __init__(self, process: asyncio.subprocess.Process, path: str) -> None:
        self.process, self.path = process, path
        self.fresh = True
        self.idle_since = time.monotonic()

    @classmethod
    async def start(
        cls, directory: Path, workdir: Path, serial: int, uid: int | None = None
    ) -> Sandbox:
        """Start one sandbox of the code in `directory`, as user `uid` when given.

        The worker makes the listening socket and hands it over, so the sandbox needs no
        access to the working folder, only to its own code (see docs/security.md).
        """
        path = str(workdir / f"sb{serial}.sock")
        log = workdir / f"sb{serial}.log"
        env = {k: v for k, v in os.environ.items() if _passed_to_sandboxes(k)}
        env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        become = []
        if uid is not None:  # the sandbox becomes `uid` before it reads the lambda's code
            env["HOME"] = str(directory)
            become = [str(uid)]
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)  # only the worker connects
            listener.listen(1)
            with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as errors:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    SANDBOX_SCRIPT,
                    str(directory),
                    str(listener.fileno()),
                    *become,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errors,
                    env=env,
                    cwd=directory,
                    pass_fds=(listener.fileno(),),
                )
        finally:
            listener.close()  # the sandbox holds it now
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        except asyncio.CancelledError:  # its lambda retired (or the worker stops): no orphan
            process.kill()
            await process.wait()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        if line != b"ready\n":
            if process.returncode is None:
                process.kill()
            await process.wait()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
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

    def __init__(
        self, name: str, directory: Path, uid: int | None, config: olconfig.LambdaConfig
    ) -> None:
        self.name, self.directory, self.uid, self.config = name, directory, uid, config
        self.retired = False  # replaced or deleted: its folder goes with its last sandbox
        self.sandboxes: list[Sandbox] = []
        self.idle: list[Sandbox] = []
        self.waiters: deque[asyncio.Future[Sandbox]] = deque()
        self.starts: set[asyncio.Task[Sandbox]] = set()  # sandboxes on their way up
        self.outstanding = 0
        self.average_ms = TARGET_QUEUE_MS
        self.scaler: asyncio.Task[None] | None = None

    @property
    def starting(self) -> int:
        return len(self.starts)

    async def remove(self, sandbox: Sandbox) -> None:
        """Take a sandbox out of this lambda's pools (idle or busy) and stop it."""
        if sandbox in self.idle:
            self.idle.remove(sandbox)
        if sandbox in self.sandboxes:
            self.sandboxes.remove(sandbox)
        await sandbox.stop()
        await self.drop_if_drained()

    async def retire(self) -> None:
        """Answer every waiting call now (`Retired`), stop idle and starting sandboxes; busy
        ones end with their call, and the folder with the last of them."""
        self.retired = True
        if self.scaler is not None:
            self.scaler.cancel()
        for start in self.starts:
            start.cancel()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Retired(self.name))
        await asyncio.gather(*(self.remove(sb) for sb in list(self.idle)))
        await self.drop_if_drained()

    async def drop_if_drained(self) -> None:
        if self.retired and not self.sandboxes and not self.starting:
            await asyncio.to_thread(shutil.rmtree, self.directory, True)


class Worker:
    """The worker's state and its aiohttp application."""

    def __init__(
        self,
        registry: Path,
        max_sandboxes: int = 2 * (os.cpu_count() or 1),
        runtime_limit: float = 30.0,
        queue_limit: int = QUEUE_LIMIT,
        chaos: FaultPlan | None = None,
        secret: bytes | None = None,
        max_upload: int = MAX_UPLOAD_BYTES,
        max_extracted: int = MAX_EXTRACTED_BYTES,
        upload_slots: int = UPLOAD_SLOTS,
    ) -> None:
        self.registry = private_dir(registry)
        self.secret = secret or load_secret()
        self.freshness = Freshness()  # nonces of the registry requests taken
        self.chaos = chaos.dealer() if chaos is not None else None
        self.answers: deque[bytes] = deque(maxlen=ANSWERS_KEPT)  # for chaos duplicates
        self.max_sandboxes = max_sandboxes
        self.runtime_limit = runtime_limit
        self.queue_limit = queue_limit
        self.max_upload, self.max_extracted = max_upload, max_extracted
        self.upload_slots, self.uploading = upload_slots, 0
        self.isolated = os.geteuid() == 0  # each version its own user (root can switch)
        self.lambdas: dict[str, Lambda] = {}
        self.stats: Counter[str] = Counter()
        self.serial = 0
        self._stopping: set[asyncio.Task[None]] = set()
        self.swept = sweep_workdirs() + sweep_parts(self.registry)
        self.workdir, self._lock = _locked_workdir(0o711 if self.isolated else 0o700)
        closed = _closed_to_others(self.workdir) if self.isolated else None
        if closed is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            os.close(self._lock)
            raise OptionError(
                f"sandboxes run as their own users and cannot reach {self.workdir}: {closed} "
                "is closed to other users; set TMPDIR to a folder they may pass through "
                "(such as /tmp)"
            )

    def app(self) -> web.Application:
        app = web.Application(handler_args={"read_bufsize": IO_CHUNK})
        app.router.add_route("*", "/{path:.*}", self.route)
        app.on_startup.append(self.load_registry)
        app.on_shutdown.append(self.shutdown)
        app.on_cleanup.append(self.cleanup)
        return app

    async def load_registry(self, app: web.Application | None = None) -> None:
        """Unpack the lambdas an earlier worker left in the registry (checked as uploads are)."""
        for blob in sorted(self.registry.glob("*.tar.gz")):
            name = blob.name[: -len(".tar.gz")]
            try:
                self._install(name, *await asyncio.to_thread(self._unpack, name, blob))
            except Unrunnable as exc:
                print(f"lampy worker: skipped {blob}: {exc}", file=sys.stderr, flush=True)

    async def shutdown(self, app: web.Application | None = None) -> None:
        """Answer every call now: waiting ones get "not found", busy ones lose their sandbox
        (502), before the server waits for its handlers to end (it would wait them out)."""
        lambdas = list(self.lambdas.values())
        self.lambdas.clear()
        await asyncio.gather(*(lam.retire() for lam in lambdas))
        await asyncio.gather(*(lam.remove(sb) for lam in lambdas for sb in list(lam.sandboxes)))

    async def cleanup(self, app: web.Application | None = None) -> None:
        """Remove the working folder (every lambda's unpacked code) and release its lock."""
        await self.shutdown()
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.close(self._lock)

    # -- routing, as OpenLambda's Go ServeMux routes ------------------------------------------

    async def route(self, request: web.Request) -> web.StreamResponse:
        """Dispatch on the decoded path as Go's ServeMux does: a path that is not clean
        (`//`, `.`, `..`) and `/run`, `/registry` without their slash are redirected (301);
        `/status` and `/stats` take any method; anything else is 404 `404 page not found`."""
        path = request.path
        clean = _clean_path(path)
        if request.method != "CONNECT" and clean != path:
            return _redirect(request, clean)
        if path in ("/run", "/registry"):
            return _redirect(request, path + "/")
        if path == "/status":
            return await self.status(request)
        if path == "/stats":
            return await self.get_stats(request)
        if path.startswith("/registry/"):
            return await self.registry_request(request, path.removeprefix("/registry/"))
        if path.startswith("/run/"):
            return await self.run(request)
        return _error(404, "404 page not found")

    async def registry_request(self, request: web.Request, rest: str) -> web.StreamResponse:
        """OpenLambda's RegistryHandler: list, config, upload, delete; 501 for reading a
        lambda's code (OpenLambda has no such endpoint), 405 for other methods."""
        if rest == "":
            if request.method == "GET":
                return await self.list_lambdas(request)
            return _error(405, "method not allowed")
        parts = rest.split("/", 1)
        if len(parts) == 2 and parts[1] == "config" and request.method == "GET":
            return await self.config(request, parts[0])
        if request.method == "POST":
            return await self.upload(request, rest)
        if request.method == "DELETE":
            return await self.delete(request, rest)
        if request.method == "GET":
            return _error(501, "not implemented")
        return _error(405, "method not allowed")

    # -- plain endpoints --------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    async def get_stats(self, request: web.Request) -> web.Response:
        counts = {key: 0 for key in ALWAYS_COUNTED} | dict(self.stats)
        counts["sandboxes"] = sum(len(lam.sandboxes) for lam in self.lambdas.values())
        counts["idle_sandboxes"] = sum(len(lam.idle) for lam in self.lambdas.values())
        counts["outstanding"] = sum(lam.outstanding for lam in self.lambdas.values())
        return web.json_response(counts)

    # -- registry ---------------------------------------------------------------------------

    def _blob(self, name: str) -> Path:
        return self.registry / f"{name}.tar.gz"

    def _refused(self, request: web.Request) -> web.Response | None:
        """401 unless the request is signed with the worker's secret, recent and new."""
        why = auth.check(
            self.secret, request.method, request.raw_path, request.headers, self.freshness
        )
        if why is None:
            return None
        self.stats["registry_refused"] += 1
        return _error(401, f"registry request refused: {why}; sign it (`lampy deploy` does)")

    async def list_lambdas(self, request: web.Request) -> web.Response:
        """The names as a JSON list (OpenLambda's order is its map's, so any order; sorted)."""
        if refused := self._refused(request):
            return refused
        names = sorted(p.name[: -len(".tar.gz")] for p in self.registry.glob("*.tar.gz"))
        return web.Response(
            body=olconfig.go_json(names), content_type="text/plain", charset="utf-8"
        )

    async def upload(self, request: web.Request, name: str) -> web.Response:
        """Stream the tarball to disk, unpack and check it off the loop, then swap it in."""
        if bad := _bad_name(name):
            return bad
        if refused := self._refused(request):
            return refused
        length = request.content_length
        if length is None:
            return _text(411, "an upload must declare its Content-Length")
        if length > self.max_upload:
            limit = f"{self.max_upload:,}"
            return _text(413, f"upload of {length:,} bytes refused: the limit is {limit}")
        if self.uploading >= self.upload_slots:
            return _text(429, f"{self.uploading} uploads in progress: try again when they end")
        self.uploading += 1
        part = self.registry / f".{name}.{secrets.token_hex(8)}.part"
        try:
            why = await self._receive(request, part, length)
            if why is not None:
                return _text(400, why)
            directory, uid, config = await asyncio.to_thread(self._unpack, name, part)
            os.replace(part, self._blob(name))
            old = self._install(name, directory, uid, config)
            if old is not None:
                await old.retire()
        except Unrunnable as exc:
            self.stats["uploads_refused"] += 1
            return exc.answer(name)
        finally:
            self.uploading -= 1
            part.unlink(missing_ok=True)
        return web.Response(status=201, text=f"Lambda {name} uploaded successfully")

    async def _receive(self, request: web.Request, part: Path, length: int) -> str | None:
        """Write the body to `part` (0600, locked while written); why it is refused, if it is."""
        digest, got = hashlib.sha256(), 0
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # sweep_parts leaves a file being written alone
            async for piece in request.content.iter_chunked(IO_CHUNK):
                got += len(piece)
                if got > length:
                    return f"body longer than its Content-Length {length:,}"
                digest.update(piece)
                file.write(piece)
        if got != length:
            return f"body ended after {got:,} of {length:,} bytes"
        signed = request.headers.get(auth.DIGEST_HEADER)
        if signed is None or signed != digest.hexdigest():
            return f"the body's SHA-256 is not the signed {auth.DIGEST_HEADER} ({signed})"
        return None

    def _unpack(self, name: str, blob: Path) -> tuple[Path, int | None, olconfig.LambdaConfig]:
        """Unpack `blob` into a new folder (a thread's work: it reads and writes disk).

        Refused when it is not a tar.gz, has more than MAX_MEMBERS entries or more than
        `max_extracted` bytes of files (counted from each entry's header, before its bytes
        are unpacked), has an entry the tarfile "data" filter refuses (links or paths that
        lead out, devices), or has no entry point OpenLambda's runtime would find; or when
        OpenLambda would refuse it (not a tar.gz, an `ol.yaml` it cannot read). An `ol.yaml`
        environment is written to the lambda's `.env`, over the tarball's own, as OpenLambda
        writes it.
        """
        directory = self.workdir / f"{name}-{secrets.token_hex(6)}"
        directory.mkdir(mode=0o700)
        uid = secrets.randbelow(SANDBOX_UIDS[1] - SANDBOX_UIDS[0]) + SANDBOX_UIDS[0]
        try:
            _extract(blob, directory, self.max_extracted)
            config = _read_config(directory)
            if config.environment:
                env = directory / ".env"
                env.unlink(missing_ok=True)  # a link in the tarball is replaced, not followed
                env.write_text(config.env_file())
            _check_entry(directory)
            if not self.isolated:
                return directory, None, config
            for folder, _, files in os.walk(directory):
                os.chown(folder, uid, uid)
                for file in files:
                    os.chown(os.path.join(folder, file), uid, uid, follow_symlinks=False)
            return directory, uid, config
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _install(
        self, name: str, directory: Path, uid: int | None, config: olconfig.LambdaConfig
    ) -> Lambda | None:
        """Make `directory` the code of `name`; the version it replaces, to retire."""
        old = self.lambdas.get(name)
        self.lambdas[name] = Lambda(name, directory, uid, config)
        return old

    async def delete(self, request: web.Request, name: str) -> web.Response:
        if bad := _bad_name(name):
            return bad
        if refused := self._refused(request):
            return refused
        if not self._blob(name).exists():
            return _error(500, f"lambda {name} not found")
        self._blob(name).unlink()
        lam = self.lambdas.pop(name, None)
        if lam is not None:
            await lam.retire()
        return web.Response(text=f"Lambda {name} deleted successfully")

    async def config(self, request: web.Request, name: str) -> web.Response:
        """The lambda's `ol.yaml` as OpenLambda reads it, in OpenLambda's JSON."""
        if bad := _bad_name(name):
            return bad
        if refused := self._refused(request):
            return refused
        lam = self.lambdas.get(name)
        if lam is None:
            blob = self._blob(name)
            return _error(
                404,
                f'failed to load lambda "{name}": failed to open blob reader: '
                f"open {blob}: no such file or directory",
            )
        return web.Response(body=lam.config.to_json(), content_type="application/json")

    # -- running ----------------------------------------------------------------------------

    def _not_found(self, name: str) -> web.Response:
        bucket, key = f"file://{self.registry}", f"{name}.tar.gz"
        return _text(
            500, f'lambda "{name}" not found in blob store (bucket="{bucket}", key="{key}")'
        )

    async def run(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if len(parts) < 2:
            answer = web.Response(status=500, text="expected invocation format: /run/<lambda-name>")
            answer.headers["Access-Control-Allow-Origin"] = "*"
            return answer
        name = parts[1]
        if not NAME.match(name):
            return _text(500, f"invalid function name {_go_quote(name)}; must match {NAME_PATTERN}")
        lam = self.lambdas.get(name)
        if lam is None:
            return self._not_found(name)
        if not lam.config.allows(request.method):
            allowed = " ".join(lam.config.http or [])
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
            return _text(502, "RoundTrip failed: injected by --chaos\n\nSandbox State: running")
        if fault == "lose":
            self.stats["chaos_lose"] += 1
            await _until_hung_up(request)
            return _text(500, "the caller hung up")
        lam.outstanding += 1
        try:
            while True:
                try:
                    sandbox = await self._acquire(lam)
                    break
                except Retired:  # replaced or deleted while this call waited
                    newer = self.lambdas.get(name)
                    if newer is None or newer is lam:
                        return self._not_found(name)
                    lam.outstanding -= 1  # the new version serves it
                    lam = newer
                    lam.outstanding += 1
                except SandboxError as exc:  # OpenLambda: the sandbox resets the connection
                    self.stats["sandbox_failures"] += 1
                    return _text(
                        502,
                        "RoundTrip failed: EOF: the sandbox exited before it answered\n\n"
                        f"Sandbox State: could not start; its last words:\n{exc}",
                    )
                except OverflowError:
                    self.stats["queue_full"] += 1
                    return _text(429, "lambda function queue is full")
            self.stats["cold_starts" if sandbox.fresh else "warm_starts"] += 1
            sandbox.fresh = False
            return await self._forward(lam, sandbox, request, fault)
        finally:
            lam.outstanding -= 1

    async def _acquire(self, lam: Lambda) -> Sandbox:
        if lam.retired:
            raise Retired(lam.name)
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
        self.serial += 1
        start = asyncio.ensure_future(
            Sandbox.start(lam.directory, self.workdir, self.serial, lam.uid)
        )
        lam.starts.add(start)
        try:
            await asyncio.wait({start})  # not cancelled with this call: retire() cancels it
        except asyncio.CancelledError:
            start.cancel()
            raise
        finally:
            lam.starts.discard(start)
        if start.cancelled():  # its lambda retired while the sandbox started
            await lam.drop_if_drained()
            raise Retired(lam.name)
        try:
            sandbox = start.result()
        except SandboxError as failed:
            while lam.waiters:
                waiter = lam.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(SandboxError(str(failed)))
            await lam.drop_if_drained()
            raise
        self.stats["sandboxes_created"] += 1
        lam.sandboxes.append(sandbox)
        self._release(lam, sandbox)

    def _release(self, lam: Lambda, sandbox: Sandbox, served: bool = False) -> None:
        """Hand a sandbox to the next waiting call, or keep it idle; stop it instead when its
        code was replaced or deleted, or when it `served` a call of a lambda whose ol.yaml
        says `reuse-sandbox: false`."""
        if lam.retired or (served and not lam.config.reuse_sandbox):
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
            return _text(502, f"RoundTrip failed: {why}\n\nSandbox State: {sandbox.state()}")
        except CallerGone:  # the sandbox is fine: its connection closed before or after a call
            self.stats["callers_gone"] += 1
            self._release(lam, sandbox)
            return prepared[0] if prepared else _text(500, "the caller hung up")
        except asyncio.CancelledError:  # the caller hung up mid-call: the sandbox state is unknown
            await asyncio.shield(lam.remove(sandbox))
            raise
        elapsed_ms = (time.monotonic() - start) * 1e3
        lam.average_ms = 0.8 * lam.average_ms + 0.2 * elapsed_ms
        self._release(lam, sandbox, served=True)
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


async def _until_hung_up(request: web.Request) -> None:
    """Wait for the caller to close its connection (aiohttp does not cancel the handler)."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.1)


async def _send(request: web.Request, writer: asyncio.StreamWriter) -> None:
    """Forward the request: method, path, headers and body, as the OpenLambda worker does."""
    has_length = request.content_length is not None
    lines = [f"{request.method} {request.raw_path} HTTP/1.1", "Host: root"]  # as OpenLambda
    for key, value in request.headers.items():
        if key.lower() not in HOP_BY_HOP and (has_length or key.lower() != "content-length"):
            lines.append(f"{key}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if has_length and (request.content_length or 0) <= SMALL_BYTES:  # one write, one wake-up
        try:
            body = await request.read()
        except (OSError, asyncio.IncompleteReadError) as exc:  # nothing reached the sandbox
            raise CallerGone from exc
        writer.write(head + body)
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


def _error(status: int, text: str) -> web.Response:
    """An answer as Go's http.Error writes it: the text, a newline, nosniff."""
    answer = _text(status, text)
    answer.headers["X-Content-Type-Options"] = "nosniff"
    return answer


def _bad_name(name: str) -> web.Response | None:
    if NAME.match(name):
        return None
    return _error(400, f"invalid function name {_go_quote(name)}; must match {NAME_PATTERN}")


def _go_quote(text: str) -> str:
    """`text` as Go's %q writes it, for the printable text of a name (JSON's escaping)."""
    return json.dumps(text, ensure_ascii=False)


def _clean_path(path: str) -> str:
    """Go's ServeMux cleanPath: `.`, `..` and repeated slashes resolved, a final slash kept."""
    if not path.startswith("/"):
        path = "/" + path
    clean = "/" + posixpath.normpath(path).lstrip("/")
    return clean + "/" if path.endswith("/") and clean != "/" else clean


def _redirect(request: web.Request, location: str) -> web.Response:
    """Go's 301 for a path the ServeMux rewrote: an HTML link for GET, nothing otherwise."""
    if request.query_string:
        location += "?" + request.query_string
    answer = web.Response(status=301, headers={"Location": location})
    if request.method in ("GET", "HEAD"):
        answer.content_type, answer.charset = "text/html", "utf-8"
    if request.method == "GET":
        answer.text = f'<a href="{html.escape(location)}">Moved Permanently</a>.\n\n'
    return answer


def _read_config(directory: Path) -> olconfig.LambdaConfig:
    """The lambda's `ol.yaml` (OpenLambda's defaults without one); refused as OpenLambda
    refuses it."""
    path = directory / olconfig.FILENAME
    try:
        text = path.read_text(errors="replace") if path.is_file() else None
        return olconfig.parse(text)
    except olconfig.ConfigError as exc:
        raise Unrunnable(str(exc), like_openlambda=True) from None


def _extract(blob: Path, directory: Path, max_bytes: int) -> None:
    """Unpack `blob` into `directory` entry by entry, within MAX_MEMBERS and `max_bytes`.

    What is not a gzip stream is refused with the words of OpenLambda's Go gzip reader.
    """
    with blob.open("rb") as file:
        head = file.read(10)
    if len(head) < 10 or head[:2] != b"\x1f\x8b":
        why = "EOF" if not head else "unexpected EOF" if len(head) < 10 else "gzip: invalid header"
        raise Unrunnable(f"invalid .gz file: {why}", like_openlambda=True)
    members = unpacked = 0
    try:
        with tarfile.open(blob, mode="r:gz") as tar:
            for member in tar:
                members += 1
                unpacked += member.size if member.isfile() else 0
                if members > MAX_MEMBERS:
                    raise Unrunnable(f"more than {MAX_MEMBERS:,} entries in the tarball")
                if unpacked > max_bytes:
                    raise Unrunnable(
                        f"its files unpack to more than {max_bytes:,} bytes (at {member.name})"
                    )
                tar.extract(member, directory, filter="data")
    except tarfile.FilterError as exc:  # lampy's own refusal: a path or link leading out
        raise Unrunnable(f"unsafe entry in the tarball: {exc}") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise Unrunnable(f"invalid tar: {exc}", like_openlambda=True) from None


def _check_entry(directory: Path) -> None:
    """Refuse code OpenLambda's Python runtime could never start: no entry file, one that
    does not parse, or one that binds neither OL_WSGI_ENTRY, `f` nor `app`."""
    env = _read_env(directory / ".env")
    name = env.get("OL_ENTRY_FILE", "f.py")
    path = directory / name
    if not path.is_file():
        raise Unrunnable(f"no {name} at the top of the tarball: OpenLambda imports it")
    try:
        tree = ast.parse(path.read_bytes(), name)
    except (SyntaxError, ValueError) as exc:
        raise Unrunnable(f"{name} does not parse: {exc}") from None
    bound: set[str] = set()  # names bound anywhere: a heuristic that errs toward accepting
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {alias.asname or alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    wanted = [env["OL_WSGI_ENTRY"]] if "OL_WSGI_ENTRY" in env else ["f", "app"]
    if "*" not in bound and not bound & set(wanted):
        raise Unrunnable(f"{name} defines none of {', '.join(wanted)}: nothing to call")


def _read_env(path: Path) -> dict[str, str]:
    """KEY=value lines of a lambda's `.env`, read as the sandbox will."""
    if not path.is_file():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    pairs = (line.strip().partition("=") for line in lines if not line.startswith("#"))
    return {k.strip(): v.strip().strip("'\"") for k, eq, v in pairs if eq}


def _closed_to_others(path: Path) -> Path | None:
    """The first folder above `path` that other users may not pass through, if any."""
    for folder in reversed(path.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def _locked_workdir(mode: int) -> tuple[Path, int]:
    """A new working folder and the descriptor of its lock, held while this process lives.

    The owner file is written once the lock is held: `sweep_workdirs` removes only folders
    that have it and whose lock it can take, so it never takes a live worker's folder (nor
    one of an older lampy that made no lock).
    """
    path = Path(tempfile.mkdtemp(prefix=f"lampy-worker-{os.getpid()}-"))
    os.chmod(path, mode)  # 0711 when sandboxes are other users: they reach their own folder
    lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    (path / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return path, lock


def sweep_workdirs() -> int:
    """Remove the working folders of workers that died without cleaning up (killed outright:
    their folder may hold a lambda's `.env`, the secret); how many were removed."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob("lampy-worker-*"):
        try:
            if path.lstat().st_uid != os.geteuid() or not (path / OWNER_FILE).exists():
                continue
            lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its worker is alive
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            os.close(lock)
    return removed


def check_exposure(host: str, expose: bool) -> None:
    """Refuse a non-loopback `host` unless `expose` says to bind it anyway."""
    if not _loopback(host) and not expose:
        raise OptionError(
            f"--host {host} is not a loopback address: anyone who can reach it could call "
            "every lambda (/run needs no signature, as in OpenLambda). Pass "
            "--expose-run-to-network to bind it anyway (registry requests stay signed)"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str = "127.0.0.1",
    port: int = 5000,
    registry: Path | None = None,
    max_sandboxes: int | None = None,
    runtime_limit: float = 30.0,
    chaos: FaultPlan | None = None,
    expose: bool = False,
) -> None:
    """Run a worker until interrupted (the `lampy worker` command).

    A non-loopback `host` needs `expose`: /run, /status and /stats take no signature (as in
    OpenLambda), so anyone who can reach the address can call every lambda's code.
    """
    check_exposure(host, expose)
    worker = Worker(
        registry
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lampy/registry",
        max_sandboxes or 2 * (os.cpu_count() or 1),
        runtime_limit,
        chaos=chaos,
    )
    faults = f", chaos {chaos} seed {chaos.seed}" if chaos is not None else ""
    swept = f", removed {worker.swept} leftovers of dead workers" if worker.swept else ""
    users = "one user per lambda" if worker.isolated else "sandboxes share this user"
    print(
        f"lampy worker on http://{host}:{port} (registry {worker.registry}, "
        f"up to {worker.max_sandboxes} sandboxes, {users}, runtime limit {runtime_limit:g} s"
        f"{faults}{swept})",
        flush=True,
    )
    web.run_app(worker.app(), host=host, port=port, print=None, access_log=None)
