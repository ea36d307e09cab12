"""OpenLambda's own Go worker (the kit at ../shared/olreal) as a second platform for the suite.

The suite's `executor` fixture runs every registered executor, so registering the openlambda
executor again as "olreal", with options naming the real worker, runs the whole region suite on
OpenLambda itself as well as on `lampy worker` (issue 13). Registration happens only where the
kit exists (developer machines and CI; not a user's own clone), and the header of the run says
which. The worker is started once per session with the kit's `setup.sh` in its own directory
and on a free loopback port, lampy is deployed with lampy's own deploy code, and the worker is
stopped at the end whatever happened. A worker that cannot be built or started skips the olreal
tests with a one-line reason, as does LAMPY_TEST_OLREAL_SKIP (set by .ci/run when its build
failed). Environment: LAMPY_TEST_OLREAL_DIR, the kit's build and worker directory (default
/tmp/lampy-olreal-tests; reused across runs, so only the first run builds: 8 minutes here with
the apt packages, under a load average of 10).
Not LAMPY_OLREAL_*: that prefix holds the "olreal" executor's own options.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import lampy
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._deploy import upload
from lampy.testing import free_port

NAME = "olreal"
KIT = Path(__file__).resolve().parents[2] / "shared" / "olreal"
DIR = Path(os.environ.get("LAMPY_TEST_OLREAL_DIR", "/tmp/lampy-olreal-tests"))
SKIP = os.environ.get("LAMPY_TEST_OLREAL_SKIP", "")
SETUP_TIMEOUT_S = 900.0  # a first build: apt packages, Go, a Debian root filesystem
# A worker stops in a second or two, unless a call is still queued when it is told to: it never
# answers that call, and `ol worker down` waits 60 s for it (seen after most suite runs). So it
# gets this long, then SIGKILL for it and its sandboxes.
STOP_TIMEOUT_S = 15.0
# The first call after a deploy makes OpenLambda pip-install requirements.txt (numpy) in a
# sandbox: 8 to 10 s here, more with a slow package index.
DEPLOY_TIMEOUT_S = 300.0
# The client's wait per call: twice the default, for cold sandboxes on a loaded machine.
CALL_TIMEOUT_S = 120.0


# Tests that fail on the real worker for a known lampy bug: xfail(strict=True) there only.
KNOWN_BUGS: dict[str, str] = {}  # test node id -> the lampy bug that fails it on olreal only


class Unavailable(Exception):
    """The real worker could not be built or started here (not a lampy failure)."""


if KIT.is_dir():
    lampy.register_executor(NAME, "lampy.runtime.openlambda._executor:OpenLambdaExecutor")
    REASON = ""
else:
    REASON = f"olreal: not registered: no OpenLambda kit at {KIT} (../shared/olreal)"


def pytest_report_header() -> str:
    """One line saying whether the suite also runs on OpenLambda's own worker, and why not."""
    if REASON:
        return REASON
    where = f"OpenLambda's own worker from {KIT}, built in {DIR}"
    return f"olreal: {where}" + (f" (skipped: {SKIP})" if SKIP else "")


def mark_items(items: list[pytest.Item]) -> None:
    """Mark the olreal runs of KNOWN_BUGS as strict xfails; and when the kit has yet to build
    in DIR, give every olreal test the build's time, since whichever runs first waits for it
    (called from tests/conftest.py)."""
    built = (DIR / "ol" / "ol").exists() and (DIR / "rootfs" / "runtimes" / "python").is_dir()
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_olreal = callspec is not None and callspec.params.get("executor") == NAME
        if not (on_olreal or "olreal_url" in getattr(item, "fixturenames", ())):
            continue
        if not built:
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT_S + 120))
        reason = KNOWN_BUGS.get(item.nodeid.partition("[")[0])
        if reason and on_olreal:
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))


@contextmanager
def real_worker(directory: Path = DIR) -> Iterator[str]:
    """A real OpenLambda worker built and run from `directory` on a free loopback port.

    A lock on the directory keeps two test sessions from sharing one worker; holding it, a
    worker still running there was left by a session that died, and is stopped first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "session.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Unavailable(
                f"{directory} is in use by another test session; "
                "set LAMPY_TEST_OLREAL_DIR to another directory"
            ) from None
        _stop(directory)  # a worker left running by a session that was killed
        try:
            yield _setup(directory, free_port())
        finally:
            _stop(directory)


def _setup(directory: Path, port: int) -> str:
    log = directory / "setup.log"
    try:
        with log.open("w") as out:
            done = subprocess.run(
                ["bash", str(KIT / "setup.sh"), str(directory), str(port)],
                stdout=subprocess.PIPE,
                stderr=out,
                text=True,
                timeout=SETUP_TIMEOUT_S,
                check=False,
            )
    except subprocess.TimeoutExpired:
        raise Unavailable(f"setup.sh took over {SETUP_TIMEOUT_S:g} s (log {log})") from None
    lines = done.stdout.split()
    if done.returncode != 0 or not lines or not lines[-1].startswith("http://"):
        said = log.read_text(errors="replace").strip().splitlines() or ["no output"]
        raise Unavailable(f"setup.sh failed (exit {done.returncode}): {said[-1]} (log {log})")
    return lines[-1]


def _stop(directory: Path) -> None:
    """stop.sh; for a worker it could not stop in time, SIGKILL and stop.sh again (which then
    only removes the sandboxes' cgroups)."""
    if _stop_sh(directory):
        return
    for pid in [*_worker_pids(directory), *sandbox_pids(directory)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _stop_sh(directory)


def _stop_sh(directory: Path) -> bool:
    """Run the kit's stop.sh; False when it did not finish in STOP_TIMEOUT_S (it is killed)."""
    command = ["bash", str(KIT / "stop.sh"), str(directory)]
    quiet = subprocess.DEVNULL
    with subprocess.Popen(command, stdout=quiet, stderr=quiet, start_new_session=True) as stopping:
        try:
            stopping.wait(STOP_TIMEOUT_S)
            return True
        except subprocess.TimeoutExpired:
            os.killpg(stopping.pid, signal.SIGKILL)  # stop.sh and the `ol worker down` it waits on
            stopping.wait()
            return False


def _worker_pids(directory: Path) -> list[int]:
    """The worker started from `directory`, if its recorded process is still that worker."""
    try:
        pid = int((directory / "w" / "worker" / "worker.pid").read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return []
    return [pid] if command[0] == bytes(directory / "ol" / "ol") else []


def sandbox_pids(directory: Path = DIR) -> list[int]:
    """The processes of the worker's sandboxes in `directory`: their root is under it."""
    roots = str(directory / "w" / "worker" / "root-sandboxes")
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "root").startswith(roots):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found


def wait_deployed(url: str, secret: bytes, name: str = "lampy") -> float:
    """Ping the lambda until a sandbox answers; the seconds it took (the pip install).

    Every platform answer but a pong (500 while pip installs, 502, a refused connection) is
    waited through until DEPLOY_TIMEOUT_S, then reported with the worker's last words.
    """
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < DEPLOY_TIMEOUT_S:
        request = urllib.request.Request(
            f"{url}/run/{name}", data=frames.encode(frames.PING, 0, secret).join()
        )
        try:
            with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as answer:
                if frames.decode(answer.read(), secret).kind == frames.PONG:
                    return time.monotonic() - start
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read().decode(errors='replace').strip()[:500]}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    raise AssertionError(f"lampy deployed at {url} never answered a ping: {last}")


@pytest.fixture(scope="session")
def olreal_url(lampy_secret: bytes) -> Iterator[str]:
    """OpenLambda's own worker for the session, lampy deployed and answering; its URL."""
    if REASON or SKIP:
        pytest.skip(REASON or f"olreal: {SKIP}")
    try:
        with real_worker() as url:
            upload(url)
            wait_deployed(url, lampy_secret)
            yield url
    except Unavailable as exc:
        pytest.skip(f"olreal: {exc}")


@pytest.fixture
def olreal_options(olreal_url: str) -> dict[str, Any]:
    return {"url": olreal_url, "timeout": CALL_TIMEOUT_S}
