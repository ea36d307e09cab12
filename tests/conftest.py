"""Shared fixtures: most tests run once per executor, with numpy (inline) as the reference."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import lampy
from lampy.testing import openlambda_worker

EXECUTORS = ["inline", "local", "openlambda"]
SECRET = "test-secret-for-lampy"

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


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each executor's name, with `using` set so calls inside the test run there."""
    options = {}
    if request.param == "openlambda":
        options = {"url": request.getfixturevalue("worker_url")}
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
