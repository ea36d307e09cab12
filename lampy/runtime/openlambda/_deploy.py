"""`lampy deploy`: build the self-contained lambda tarball, and upload it to a worker.

The sandbox has only what `requirements.txt` lists, not lampy, so lampy's own source travels
inside the tarball under `lampy/`: all of it (it is small), because a pickled argument may refer
to any lampy object (a method region's `self` holds a ParallelFunction). Importing lampy needs
only numpy and cloudpickle; aiohttp and tenacity are imported by the caller-side modules alone.
`requirements.txt` pins the caller's exact numpy and cloudpickle (and their dependencies), since
pickles move between the two ends; `.env` carries the secret that signs frames, so the tarball
is written 0600 (`save`) and its upload is signed, its bytes hashed under the signature
(`lampy worker` refuses unsigned registry requests; OpenLambda's own registry checks nothing).
One tarball is uploaded twice (`deployed`): as NAME, whose calls run chunks, and as
NAME-coordinator, whose calls orchestrate jobs (orchestrator="lambda"), so the platform sizes
the two apart.

An upload is not a lambda ready to run: OpenLambda installs `requirements.txt` (numpy) in a
sandbox on the lambda's first call, and holds that call meanwhile (seconds with a warm package
cache, minutes without). `wait_answering` pings both lambdas until they answer, reports how long
it has waited, and stops at the first answer that says it never will: pip's own error when the
install fails, a lambda that answers but not with this secret.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from lampy._errors import FrameError, VersionMismatch
from lampy.runtime._secret import load_secret, write_private
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._protocol import coordinator_of, run_url
from lampy.runtime.remote import _auth as auth

PINNED = ("numpy", "cloudpickle")
# numpy on one thread per sandbox: the parallelism is across sandboxes, and OpenLambda counts
# threads against a sandbox's process limit (`limits.procs`, 10 by default), which OpenBLAS's
# thread per core would exceed on a large machine. OpenLambda's runtime loads `.env` before
# it imports f.py, so these apply before numpy starts.
ONE_THREAD = b"OMP_NUM_THREADS=1\nOPENBLAS_NUM_THREADS=1\nMKL_NUM_THREADS=1\n"
WAIT_S = 600.0  # `lampy deploy --url` waits this long for the first answer (pip, cold index)
PROGRESS_EVERY_S = 10.0  # a progress line this often while waiting
RETRY_AFTER_S = 1.0  # between pings that got a passing failure
NO_ANSWER = "no answer yet"  # what a wait reports before its lambda answered anything
# OpenLambda's answer when pip fails: the installer lambda's traceback, which ends in this.
PIP_FAILED = re.compile(r"pip install failed for (\S+) \(exit code (\d+)\): (.*)", re.S)
F_PY = '''"""lampy's handler for OpenLambda: a WSGI app taking signed binary frames (see lampy/)."""

from lampy.runtime.openlambda._handler import app

__all__ = ["app"]
'''


def requirements() -> list[str]:
    """`name==version` for numpy, cloudpickle and everything they need, as installed here."""
    pins: dict[str, str] = {}
    todo = list(PINNED)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in pins:
            continue
        dist = metadata.distribution(name)
        pins[key] = f"{dist.metadata['Name']}=={dist.version}"
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    return sorted(pins.values(), key=str.lower)


def build(secret: bytes | None = None) -> bytes:
    """The lambda as a tar.gz, ready for POST /registry/<name>."""
    root = Path(__file__).resolve().parents[2]
    files = {
        "f.py": F_PY.encode(),
        "requirements.txt": ("\n".join(requirements()) + "\n").encode(),
        ".env": b"LAMPY_SECRET=" + (secret or load_secret()) + b"\n" + ONE_THREAD,
    }
    for path in sorted(root.rglob("*.py")):
        files[f"lampy/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(time.time())
            info.mode = 0o600 if name == ".env" else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def save(path: Path, secret: bytes | None = None) -> None:
    """Write the tarball to `path`, readable by this user only (it holds the secret)."""
    write_private(path, build(secret))


def deployed(name: str) -> tuple[str, str]:
    """The lambdas `lampy deploy --name NAME` makes: NAME runs chunks, and the same code under
    its own name coordinates jobs (orchestrator="lambda", see `coordinator_of`)."""
    return name, coordinator_of(name)


def upload(url: str, name: str = "lampy", secret: bytes | None = None) -> str:
    """POST the tarball to `url`/registry/ as each of `deployed(name)`, signed; the worker's
    answers, one line each, or an error saying why."""
    key = secret or load_secret()
    data = build(key)
    return "\n".join(_upload(url, each, data, key) for each in deployed(name))


def _upload(url: str, name: str, data: bytes, key: bytes) -> str:
    target = f"/registry/{name}"
    signed = auth.sign(key, "POST", target, "", str(len(data)), hashlib.sha256(data).hexdigest())
    request = urllib.request.Request(
        f"{url.rstrip('/')}{target}",
        data=data,
        method="POST",
        headers={"Content-Type": "application/gzip", "Content-Length": str(len(data)), **signed},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text: str = answer.read().decode(errors="replace").strip()
            if answer.status != 201:
                raise RuntimeError(f"expected 201 from {request.full_url}, got {answer.status}")
            return text
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip().removeprefix(f"{exc.code}: ")
        said = (body.splitlines() or [exc.reason])[0]  # servers often repeat the status
        raise RuntimeError(f"{request.full_url} answered {exc.code}: {said}") from None


class DeployError(Exception):
    """A deployed lambda that does not answer, and why (pip's own words when pip failed)."""


def pip_error(text: str) -> str | None:
    """pip's own error lines from OpenLambda's answer to a call whose install failed."""
    found = PIP_FAILED.search(text)
    if found is None:
        return None
    package, code, output = found.groups()
    output = output.split("\n\nDuring handling", 1)[0].strip().rstrip("'").strip()
    said = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR")]
    return f"pip could not install {package} (exit code {code}): " + (
        " ".join(said) or output.splitlines()[-1] if output else "no output"
    )


def wait_answering(
    url: str,
    name: str = "lampy",
    secret: bytes | None = None,
    timeout: float = WAIT_S,
    progress: Callable[[float, str], None] | None = None,
) -> float:
    """Ping each of `deployed(name)` at `url` until it answers, `timeout` seconds at most in
    all; the seconds it took.

    A refused connection, 429, 502..504 and "not found" (OpenLambda sees new code within 5 s)
    are waited through; `progress(seconds, last answer)` is called every PROGRESS_EVERY_S
    meanwhile. Raises DeployError at once when pip failed or the lambda answers something
    else than a pong, and when `timeout` passes (naming the last answer).
    """
    key = secret or load_secret()
    start = time.monotonic()
    latest = NO_ANSWER
    done = threading.Event()

    def heard(answer: str) -> None:
        nonlocal latest
        latest = answer

    def report() -> None:
        while progress is not None and not done.wait(PROGRESS_EVERY_S):
            progress(time.monotonic() - start, latest)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        for each in deployed(name):
            if not _wait_one(url, each, key, start + timeout, heard):
                raise DeployError(
                    f"{each} did not answer within {timeout:g} s (last: {latest}); "
                    "a slow package index may need a longer --timeout"
                )
        return time.monotonic() - start
    finally:
        done.set()


def _wait_one(
    url: str, name: str, key: bytes, deadline: float, heard: Callable[[str], None]
) -> bool:
    """Ping `name` until it answers a pong (True) or `deadline`, a `time.monotonic()` time,
    passes (False). `heard` is told NO_ANSWER, then each other answer as it comes (progress
    lines, and the time-out's message). DeployError at once when an answer says it never will.
    """
    ping = frames.encode(frames.PING, 0, key).join()
    last = NO_ANSWER
    heard(last)
    while (left := deadline - time.monotonic()) > 0:
        request = urllib.request.Request(run_url(url, name), data=ping)
        try:
            with urllib.request.urlopen(request, timeout=left) as answer:
                body = answer.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            last = f"HTTP {exc.code}: {_gist(text)}"
            heard(last)
            if (said := pip_error(text)) is not None:
                raise DeployError(said) from None
            passing = exc.code in (429, 502, 503, 504) or "not found in blob store" in text
            if not passing:
                raise DeployError(f"{name} answered {last}") from None
        except OSError as exc:  # refused, reset, or this ping's own time ran out
            if not (isinstance(exc, TimeoutError) and last != NO_ANSWER):
                last = f"{type(exc).__name__}: {exc}"  # a time-out says less
                heard(last)
        else:
            try:
                if frames.decode(body, key).kind == frames.PONG:
                    return True
            except (FrameError, VersionMismatch) as exc:
                raise DeployError(
                    f"{name} answers, but not as this lampy ({exc}): "
                    "was it deployed with another secret or another lampy?"
                ) from None
            raise DeployError(f"{name} answered a ping with something else than a pong")
        time.sleep(min(RETRY_AFTER_S, max(0.0, deadline - time.monotonic())))
    return False


def _gist(text: str) -> str:
    """A platform's answer in one line: a traceback's last line, anything else's first."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "(empty)"
    return (lines[-1] if lines[0].startswith("Traceback") else lines[0]).strip()[:300]
