"""Shared fixtures: most tests run once per executor, with numpy (inline) as the reference."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import lampy

EXECUTORS = ["inline", "local", "openlambda"]

settings.register_profile(
    "lampy", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("lampy")


@pytest.fixture(scope="session")
def openlambda_options(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A `lampy worker` on a free loopback port with lampy deployed; `using` options for it."""
    from lampy.runtime.openlambda.deploy import upload

    os.environ.setdefault("LAMPY_SECRET", "lampy-test-secret")  # never the user's own
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    registry = tmp_path_factory.mktemp("openlambda-registry")
    command = [sys.executable, "-m", "lampy.cli", "worker", "--port", str(port)]
    command += ["--registry", str(registry), "--max-sandboxes", "4"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/status", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("lampy worker did not start") from None
                time.sleep(0.05)
        upload(url, "lampy")
        yield {"url": url}
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each executor's name, with `using` set so calls inside the test run there."""
    options = {}
    if request.param == "openlambda":
        options = request.getfixturevalue("openlambda_options")
    with lampy.using(executor=request.param, **options):
        yield request.param


def assert_same(actual: Any, expected: Any, exact: bool = True) -> None:
    """Equal leaf by leaf, with the same dtype and shape; exact or allclose."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key], exact)
    elif isinstance(expected, tuple | list):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e, exact)
    else:
        a, e = np.asarray(actual), np.asarray(expected)
        assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, a.shape, e.dtype, e.shape)
        if exact:
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-9)
