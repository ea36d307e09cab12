"""Shared fixtures: most tests run once per executor, with numpy (inline) as the reference."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import lampy
import tests.toy_executor  # noqa: F401 (registers the "threads" executor)
from lampy.runtime import executors
from lampy.testing import openlambda_worker
from tests.olreal import (  # noqa: F401 (registers "olreal", OpenLambda's own worker, if here)
    mark_items,
    olreal_options,
    olreal_orchestrated_options,
    olreal_url,
    pytest_report_header,
)
from tests.orchestrated import mark_items as mark_orchestrated
from tests.orchestrated import orchestrated_options  # noqa: F401 (registers "orchestrated")

SECRET = "test-secret-for-lampy"
RANDOM_IN_STRATEGY = (
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

settings.register_profile(
    "lampy", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("lampy")


@pytest.fixture(scope="session", autouse=True)
def lampy_secret() -> Iterator[bytes]:
    """Every test signs with a known secret, never the user's own (~/.config/lampy/secret)."""
    old = os.environ.get("LAMPY_SECRET")
    os.environ["LAMPY_SECRET"] = SECRET
    yield SECRET.encode()
    if old is None:
        del os.environ["LAMPY_SECRET"]
    else:
        os.environ["LAMPY_SECRET"] = old


@pytest.fixture(scope="session")
def worker_url(tmp_path_factory: pytest.TempPathFactory, lampy_secret: bytes) -> Iterator[str]:
    """One real `lampy worker` on a free loopback port, lampy deployed, for the whole session."""
    registry = tmp_path_factory.mktemp("openlambda-registry")
    with openlambda_worker(registry, max_sandboxes=4, runtime_limit=20) as url:
        yield url


@pytest.fixture(scope="session")
def dask_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small Dask cluster for the session: a scheduler and 2 one-thread workers, each its
    own process on loopback, as a real cluster is (a LocalCluster would run its scheduler in
    this process, and change this process's environment)."""
    distributed = pytest.importorskip("distributed", reason="dask: pip install 'lampy[dask]'")
    where = tmp_path_factory.mktemp("dask")
    file = where / "scheduler.json"
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # tests import on workers
    dask = [sys.executable, "-m", "dask"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    scheduler = subprocess.Popen(
        [*dask, "scheduler", "--scheduler-file", file, "--port", "0", *loopback], **quiet
    )
    two = ["--nworkers", "2", "--nthreads", "1", "--local-directory", where]
    workers = subprocess.Popen(
        [*dask, "worker", "--scheduler-file", file, *two, *loopback], **quiet
    )
    try:
        deadline = time.monotonic() + 60
        while not file.exists():  # written once the scheduler listens
            assert scheduler.poll() is None and time.monotonic() < deadline, "no dask scheduler"
            time.sleep(0.05)
        with distributed.Client(scheduler_file=str(file), timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            address = client.scheduler.address
        yield address
        executors.shutdown()  # the executors' Clients close before their cluster does
    finally:
        for process in (workers, scheduler):
            process.terminate()
            process.wait(timeout=30)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Dask's client thread draws from `random` (backoff while reconnecting after a worker
    died), which hypothesis takes for a strategy using `random`: not the dask tests' doing."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("executor") == "dask":
            item.add_marker(pytest.mark.filterwarnings(RANDOM_IN_STRATEGY))
    mark_items(items)
    mark_orchestrated(items)


@pytest.fixture
def openlambda_options(worker_url: str) -> dict[str, Any]:
    return {"url": worker_url}


@pytest.fixture
def dask_options(dask_address: str) -> dict[str, Any]:
    return {"address": dask_address}


@pytest.fixture(params=executors.names())
def executor(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each registered executor's name, with `using` set so calls inside the test run there.

    An executor that needs set-up (a worker, a cluster) gets its options from a fixture named
    `<name>_options`; any other runs with its defaults.
    """
    try:
        options = request.getfixturevalue(f"{request.param}_options")
    except pytest.FixtureLookupError:
        options = {}
    with lampy.using(executor=request.param, **options):
        yield request.param
