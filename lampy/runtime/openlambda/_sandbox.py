"""One sandbox of `lampy worker`: serves a lambda the way OpenLambda's Python runtime does.

Run as a script (`python sandbox.py LAMBDA_DIR FD [UID]`), not as part of lampy: a sandbox
sees only the lambda's directory and the installed packages, like an OpenLambda sandbox, so a
deployed tarball that forgot a module fails here too. Standard library only. FD is a listening
Unix socket the worker made and handed over, so the sandbox needs no access to the worker's
folder.

With UID (a worker run as root), the sandbox becomes that user before it reads any of the
lambda's files (`become`): one user per uploaded version, owning only its own folder, so a
lambda cannot read another's files (the deployed lampy's `.env` holds the secret), nor the
worker's registry or root's kept secret. Where the interpreter lives in a folder other users
cannot enter (a pyenv under /root), that folder is replaced, in the sandbox's own mount
namespace, by an empty one through which only the interpreter's and packages' folders show.

Like min-image/runtimes/python/server_common.py: load `.env`, import `f.py` (or OL_ENTRY_FILE),
pick OL_WSGI_ENTRY, then `f(event)` (JSON in and out), then `app` (WSGI); serve one request at a
time on a Unix socket with backlog 1. The previous connection is closed only when the next one
arrives, as there: an answer without Content-Length therefore never ends.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, cast

Handler = Callable[[dict[str, Any], BinaryIO], tuple[str, list[tuple[str, str]], Iterable[Any]]]


def load_env(directory: str) -> None:
    path = os.path.join(directory, ".env")
    if not os.path.exists(path):
        return
    with open(path) as file:
        for line in file:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':  # as OpenLambda quotes
                    value = value[1:-1].replace('\\"', '"')
                os.environ[key.strip()] = value.strip("'")


class _Body:
    """wsgi.input: reads exactly Content-Length bytes of the raw body, then end of input."""

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self.stream, self.left = stream, length

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.stream.read(n) if n else b""
        self.left -= len(data)
        return data


def wsgi_handler(app: Callable[..., Iterable[Any]]) -> Handler:
    def handle(environ: dict[str, Any], stream: BinaryIO) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        environ["wsgi.input"] = _Body(stream, length)
        answer: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> None:
            answer[:] = [status, headers]

        body = app(environ, start_response)  # exceptions are not caught, as in OpenLambda
        return answer[0], answer[1], body

    return handle


def json_handler(f: Callable[[Any], Any]) -> Handler:
    def handle(environ: dict[str, Any], stream: BinaryIO) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = stream.read(length) if length else b""
        try:
            data = json.dumps(f(json.loads(raw) if raw else {})).encode()
            status, kind = "200 OK", "application/json"
        except Exception:
            data, kind = traceback.format_exc().encode(), "text/plain"
            status = "500 Internal Server Error"
        return status, [("Content-Type", kind), ("Content-Length", str(len(data)))], [data]

    return handle


def entry(directory: str) -> Handler:
    name = os.environ.get("OL_ENTRY_FILE", "f.py").removesuffix(".py")
    module = importlib.import_module(name)
    wsgi = os.environ.get("OL_WSGI_ENTRY")
    if wsgi:
        return wsgi_handler(getattr(module, wsgi))
    if hasattr(module, "f"):
        return json_handler(module.f)
    if hasattr(module, "app"):
        return wsgi_handler(module.app)
    raise RuntimeError(f"{name}.py in {directory} defines neither f(event) nor app")


def read_request(stream: BinaryIO) -> dict[str, Any] | None:
    line = stream.readline(65537).decode("latin-1").rstrip("\r\n")
    if not line:
        return None
    method, target, version = line.split(" ", 2)
    path, _, query = target.partition("?")
    parts = path.split("/")  # "", "run", the lambda's name, then the app's own path
    environ: dict[str, Any] = {  # as OpenLambda's runtime (server_common.py) makes it
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "/run/" + (parts[2] if len(parts) > 2 else ""),
        "PATH_INFO": "/" + "/".join(parts[3:]),
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": version,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    while True:
        header = stream.readline(65537).decode("latin-1").rstrip("\r\n")
        if not header:
            host = environ.get("HTTP_HOST", "")
            environ["SERVER_NAME"], _, environ["SERVER_PORT"] = host.partition(":")
            return environ
        key, _, value = header.partition(":")
        key = key.strip().upper().replace("-", "_")
        if key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            environ[key] = value.strip()
        else:
            environ[f"HTTP_{key}"] = value.strip()


def respond(conn: socket.socket, status: str, headers: list[tuple[str, str]], body: Any) -> None:
    """Send the answer: a small one in one send (one wake-up), a large one as it is produced."""
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    try:
        if length is not None and int(length) <= 1 << 16:
            conn.sendall(b"".join([head.encode("latin-1"), *body]))
        else:
            conn.sendall(head.encode("latin-1"))
            for part in body:
                conn.sendall(part)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this sandbox when its worker dies (even by SIGKILL), so a crashed
    worker leaves no orphans blocked in accept; elsewhere the worker's shutdown stops them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the worker died before the request took effect
        sys.exit(1)


CLONE_NEWNS, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = (
    0x20000,
    2,
    4,
    4096,
    16384,
    1 << 18,
)


def become(uid: int) -> None:
    """Become `uid` (and its group, no others) for good, keeping the interpreter in view."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

    needed = {os.path.realpath(p) for p in [sys.base_prefix, sys.prefix, *sys.path] if p}
    blocked = sorted(
        {(a, c) for p in needed if os.path.exists(p) for a, c in _closed_ancestors(p)},
        key=lambda pair: len(pair[0]),
    )
    if blocked:
        check(libc.unshare(CLONE_NEWNS), "unshare")
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate")
    for closed in dict.fromkeys(a for a, _ in blocked):  # outermost first
        keep = {c: os.open(os.path.join(closed, c), os.O_PATH) for a, c in blocked if a == closed}
        options = b"mode=0711"
        check(
            libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), closed
        )
        for child, fd in keep.items():
            os.mkdir(os.path.join(closed, child))
            source, target = f"/proc/self/fd/{fd}".encode(), os.path.join(closed, child).encode()
            check(libc.mount(source, target, None, MS_BIND | MS_REC, None), "bind")
            os.close(fd)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _closed_ancestors(path: str) -> list[tuple[str, str]]:
    """(folder, child) for each folder on the way to `path` that other users cannot enter."""
    parts = path.strip("/").split("/")
    found = []
    for depth in range(len(parts)):
        folder = "/" + "/".join(parts[:depth])
        if not os.stat(folder).st_mode & 0o001:
            found.append((folder, parts[depth]))
    return found


def main() -> None:
    directory, fd = os.path.abspath(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        become(int(sys.argv[3]))
    die_with_parent()  # after changing user, which clears it
    sys.path[0] = directory
    os.chdir(directory)
    load_env(directory)
    handle = entry(directory)
    server = socket.socket(fileno=fd)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    previous: list[Any] = []
    while True:
        conn, _ = server.accept()
        for held in previous:
            held.close()
        stream = cast(BinaryIO, conn.makefile("rb"))
        environ = read_request(stream)
        if environ is not None:
            status, headers, body = handle(environ, stream)
            with contextlib.suppress(OSError):  # the worker hung up: serve the next call
                respond(conn, status, headers, body)
        previous = [stream, conn]


if __name__ == "__main__":
    main()
