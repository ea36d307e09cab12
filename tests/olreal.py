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
free one); LAMPY_TEST_OLREAL_KIT, another kit (a copy whose setup.sh names its worker
directory otherwise than `w`, and so its cgroup pool: then it runs beside the default's).
Not LAMPY_OLREAL_*: that prefix holds the "olreal" executor's own options.
One real worker at a time per machine: the kit names every worker's cgroup pool `w-sandboxes`
(whatever its directory), so a second worker started meanwhile panics ("cg-N: file exists"),
and the kit's stop.sh removes the empty cgroups of that pool, a running worker's spares
included (it then panics creating a sandbox). So a session takes MACHINE_LOCK before it starts
a worker, and waits for it while another session's worker runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
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
KIT = Path(
    os.environ.get("LAMPY_TEST_OLREAL_KIT") or Path(__file__).resolve().parents[2] / "shared/olreal"
)
DIR = Path(os.environ.get("LAMPY_TEST_OLREAL_DIR", "/tmp/lampy-olreal-tests"))
PORT = int(os.environ.get("LAMPY_TEST_OLREAL_PORT") or 0)  # 0: a free port
SETUP_TIMEOUT_S = 900.0  # a first build: apt packages, Go, a Debian root filesystem


def _worker_dir_name() -> str:
    """The worker directory's name in DIR, as the kit's setup.sh sets it (`W="$B/w"`); it
    names the worker's cgroup pool too."""
    found = re.search(r'^W="\$B/([^"/]+)"', (KIT / "setup.sh").read_text(), re.M)
    return found.group(1) if found else "w"


W = _worker_dir_name() if KIT.is_dir() else "w"
POOL = Path(f"/sys/fs/cgroup/unified/{W}-sandboxes")  # its sandboxes' cgroups
MACHINE_LOCK = Path(f"/tmp/lampy-olreal-{W}-sandboxes.lock")  # held while a worker of it runs
MACHINE_WAIT_S = 1200.0  # how long a session waits for another session's worker to end
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


# The region suite under lambda orchestration (issue 18) on OpenLambda's own worker.
ORCHESTRATED = f"{NAME}_orchestrated"
PLATFORMS = (NAME, ORCHESTRATED)

if KIT.is_dir():
    for _name in PLATFORMS:
        lampy.register_executor(_name, "lampy.runtime.openlambda._executor:OpenLambdaExecutor")
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
        on_olreal = platform in PLATFORMS
        in_package = item.nodeid.startswith("tests/runtime/openlambda/")
        on_openlambda = platform in ("openlambda", "orchestrated", *PLATFORMS)
        if on_openlambda or fixtures & OPENLAMBDA_FIXTURES or in_package:
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

    The machine's lock keeps two test sessions from running a worker at once (one waits for
    the other, and for any worker of another directory still running); holding it, a worker
    still running from `directory` was left by a session that died. It is stopped, and the
    kit's stop.sh removes what a worker that died left in the shared cgroup pool (a new
    worker would panic on it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    with MACHINE_LOCK.open("a") as lock, (directory / "session.lock").open("a") as mine:
        deadline = time.monotonic() + MACHINE_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                try:  # the directory's own lock, which sessions of older lampy take alone
                    fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    raise
                others = [p for p in all_worker_pids() if p not in _worker_pids(directory)]
                if not others:
                    break
                fcntl.flock(mine, fcntl.LOCK_UN)
                fcntl.flock(lock, fcntl.LOCK_UN)
                waiting_for = f"OpenLambda worker {others[0]} of another session"
            except BlockingIOError:
                waiting_for = f"another test session (it holds {MACHINE_LOCK} or {mine.name})"
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"waited {MACHINE_WAIT_S:g} s for the {waiting_for} to end: the kit runs "
                    f"one worker per machine (they share the cgroup pool {POOL.name})"
                )
            time.sleep(1.0)
        _stop(directory)
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
        said = (log.read_text(errors="replace") + done.stdout).strip().splitlines()
        panic = [line for line in said if line.startswith("panic: ")]  # the worker's own end
        last = (panic or said or ["no output"])[-1]
        raise Unavailable(f"setup.sh failed (exit {done.returncode}): {last} (log {log})")
    return lines[-1]


def _stop(directory: Path) -> None:
    """stop.sh; then SIGKILL for what it left: a worker it could not stop in time, and the
    sandboxes of a worker that died (a panic leaves them running in the shared cgroup pool,
    where the next worker panics on their cgroups); then stop.sh again for the cgroups.
    Called holding MACHINE_LOCK with no other session's worker running, so whatever runs in
    the pool is a leftover."""
    stopped = _stop_sh(directory)
    leftovers = [*_worker_pids(directory), *sandbox_pids(directory), *pool_pids()]
    if stopped and not leftovers:
        return
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _stop_sh(directory)


def pool_pids() -> list[int]:
    """The processes in the kit's cgroup pool (every worker's sandboxes: one pool for all)."""
    found = []
    for procs in POOL.glob("**/cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(pid) for pid in procs.read_text().split()]
    return found


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
        pid = int((directory / W / "worker" / "worker.pid").read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return []
    return [pid] if command[0] == bytes(directory / "ol" / "ol") else []


def all_worker_pids() -> list[int]:
    """Every OpenLambda worker on this machine whose cgroup pool is ours (`ol worker up -p
    .../<W>`, from any directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        up = command[0].endswith(b"/ol/ol") and command[1:4] == [b"worker", b"up", b"-p"]
        if up and len(command) > 4 and Path(command[4].decode()).name == W:
            found.append(int(entry.name))
    return found


def sandbox_pids(directory: Path = DIR) -> list[int]:
    """The processes of the worker's sandboxes in `directory`: their root is under it."""
    roots = str(directory / W / "worker" / "root-sandboxes")
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


@pytest.fixture
def olreal_orchestrated_options(olreal_url: str) -> dict[str, Any]:
    return {"url": olreal_url, "timeout": CALL_TIMEOUT_S, "orchestrator": "lambda"}
