"""OpenLambda's own Go worker (the kit at ../shared/olreal) as a second platform for the suite.

The suite's `executor` fixture runs every registered executor, so registering the openlambda
executor again as "olreal", with options naming the real worker, runs the whole region suite on
OpenLambda itself as well as on `lampy worker` (issue 13). Registration happens only where the
kit exists (developer machines and CI; not a user's own clone), and the header of the run says
which. The worker is started once per session with the kit's `setup.sh` in its own directory
and on a free loopback port, lampy is deployed with lampy's own deploy code (waiting, as
`lampy deploy --url` does, until it answers), and the worker is stopped at the end whatever
happened. Where the kit exists, a worker that cannot be built or started fails the tests that
need it, with the reason: only a clone without the kit skips them.
Every test that needs an OpenLambda worker, real or `lampy worker`, is marked `openlambda`
(`make test-ol` runs them alone).
Environment: LAMPY_TEST_OLREAL_DIR, the kit's build and worker directory (default
/tmp/lampy-olreal-tests; reused across runs, so only the first run builds: 8 minutes here with
the apt packages, under a load average of 10); LAMPY_TEST_OLREAL_PORT, its port (default: a
free one). Not LAMPY_OLREAL_*: that prefix holds the "olreal" executor's own options.
One real worker at a time per machine: the kit names every worker's cgroup pool `w-sandboxes`,
so a second worker started meanwhile panics ("cg-N: file exists").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import lampy
from lampy.runtime.openlambda._deploy import DeployError, upload, wait_answering
from lampy.testing import free_port

NAME = "olreal"
KIT = Path(__file__).resolve().parents[2] / "shared" / "olreal"
DIR = Path(os.environ.get("LAMPY_TEST_OLREAL_DIR", "/tmp/lampy-olreal-tests"))
PORT = int(os.environ.get("LAMPY_TEST_OLREAL_PORT") or 0)  # 0: a free port
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
    return f"olreal: OpenLambda's own worker from {KIT}, built in {DIR}"


OPENLAMBDA_FIXTURES = {"olreal_url", "worker_url", "openlambda_options", "olreal_options"}


def mark_items(items: list[pytest.Item]) -> None:
    """Mark every test that needs an OpenLambda worker `openlambda` (for `make test-ol`), the
    olreal runs of KNOWN_BUGS as strict xfails, and, when the kit has yet to build in DIR,
    give every olreal test the build's time, since whichever runs first waits for it (called
    from tests/conftest.py)."""
    built = (DIR / "ol" / "ol").exists() and (DIR / "rootfs" / "runtimes" / "python").is_dir()
    for item in items:
        callspec = getattr(item, "callspec", None)
        platform = callspec.params.get("executor") if callspec is not None else None
        fixtures = set(getattr(item, "fixturenames", ()))
        on_olreal = platform == NAME
        in_package = item.nodeid.startswith("tests/runtime/openlambda/")
        if platform in ("openlambda", NAME) or fixtures & OPENLAMBDA_FIXTURES or in_package:
            item.add_marker(pytest.mark.openlambda)
        if not (on_olreal or "olreal_url" in fixtures):
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
            yield _setup(directory, PORT or free_port())
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
    """Wait as `lampy deploy --url` waits, until the lambda answers a ping; the seconds it
    took (on OpenLambda, the first call's pip install)."""
    start = time.monotonic()
    try:
        wait_answering(url, name, secret, timeout=DEPLOY_TIMEOUT_S)
    except DeployError as exc:
        raise AssertionError(f"lampy deployed at {url}: {exc}") from None
    return time.monotonic() - start


@pytest.fixture(scope="session")
def olreal_url(lampy_secret: bytes) -> Iterator[str]:
    """OpenLambda's own worker for the session, lampy deployed and answering; its URL.

    Where the kit exists, a worker that cannot be built, started or deployed to is a failure
    of every test that needs it (the kit is part of every developer machine and CI)."""
    if REASON:
        pytest.skip(REASON)
    failed = ""
    try:
        with real_worker() as url:
            upload(url)
            wait_deployed(url, lampy_secret)
            yield url
    except Unavailable as exc:  # outside the `with`: the failure is reported, not raised in it
        failed = str(exc)
    if failed:
        pytest.fail(f"olreal: OpenLambda's worker could not be started: {failed}", pytrace=False)


@pytest.fixture
def olreal_options(olreal_url: str) -> dict[str, Any]:
    return {"url": olreal_url, "timeout": CALL_TIMEOUT_S}
