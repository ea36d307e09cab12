"""The user's own code reaches the sandbox, however it is split over modules.

A sandbox has the standard library, numpy, cloudpickle and lampy only. The regions here call
helpers of sibling modules, of a subpackage, a helper cached with lru_cache, a module object,
and classes of another module, from a package of the test tree (`userpkg`), from top-level
modules of a folder on sys.path, and from a script run as `__main__` that imports a module
beside it: on `lampy worker` and on OpenLambda's own worker, none of it installed there.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

import lampy
from lampy.runtime.openlambda import _protocol as protocol
from tests.olreal import CALL_TIMEOUT_S
from tests.olreal import NAME as OLREAL
from tests.runtime.openlambda.userpkg import regions
from tests.runtime.openlambda.userpkg.shapes import Summary, Window

HELPERS = """
from functools import cache
import numpy as np

class Gain:
    def __init__(self, factor):
        self.factor = factor

@cache
def ramp(n):
    return np.linspace(0.0, 1.0, n)

def apply(rows, gain):
    return rows * ramp(rows.shape[1]) * gain.factor
"""
REGIONS = """
import lampy
from {helpers} import Gain, apply

@lampy.elemwise(chunks=4)
def ramped(rows, gain):
    return apply(rows, gain)
"""
SCRIPT = """
import numpy as np
import lampy
from {helpers} import Gain, apply

@lampy.elemwise(chunks=3)
def ramped(rows, gain):
    return apply(rows, gain)

rows = np.arange(24.0).reshape(6, 4)
assert np.array_equal(ramped(rows, Gain(2.0)), apply(rows, Gain(2.0)))
print("equal")
"""


@pytest.fixture
def top_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """Two top-level modules of the user's, in a folder on sys.path (as a project's scripts
    folder is): the regions module imports the helpers module. Unique names per test."""
    suffix = os.urandom(4).hex()
    helpers, regions_name = f"own_helpers_{suffix}", f"own_regions_{suffix}"
    (tmp_path / f"{helpers}.py").write_text(HELPERS)
    (tmp_path / f"{regions_name}.py").write_text(REGIONS.format(helpers=helpers))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module(regions_name)
    for name in (regions_name, helpers):
        sys.modules.pop(name, None)


def test_a_package_split_over_modules(platform: tuple[str, str], openlambda: str) -> None:
    rows = np.random.default_rng(3).standard_normal((40, 32))
    window = Window(width=5, gain=1.5)
    with lampy.using(chunks=4):
        got = regions.smoothed(rows, window)
        total = regions.summary(rows)
    if platform[0] == OLREAL:
        # Its sandboxes do not get this machine's BLAS settings (OPENBLAS_CORETYPE, say): the
        # convolution's short sums may round in other kernels. `lampy worker` passes them on.
        np.testing.assert_allclose(got, regions.reference(rows, window), rtol=1e-15, atol=1e-15)
    else:
        np.testing.assert_array_equal(got, regions.reference(rows, window))
    assert isinstance(total, Summary)  # the user's own class, back as itself
    assert total.count == 40 and total.total == pytest.approx(rows.sum())


def test_top_level_modules_of_the_user(openlambda: str, top_level: types.ModuleType) -> None:
    rows = np.arange(48.0).reshape(12, 4)
    gain = top_level.Gain(3.0)
    np.testing.assert_array_equal(top_level.ramped(rows, gain), top_level.apply(rows, gain))


def test_a_script_and_a_module_beside_it(platform: tuple[str, str], tmp_path: Path) -> None:
    """The common case: `python script.py`, whose regions call a module next to it."""
    _, url = platform
    helpers = f"own_helpers_{os.urandom(4).hex()}"
    (tmp_path / f"{helpers}.py").write_text(HELPERS)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(helpers=helpers))
    env = {
        **os.environ,
        "LAMPY_EXECUTOR": "openlambda",
        "LAMPY_OPENLAMBDA_URL": url,
        "LAMPY_OPENLAMBDA_TIMEOUT": str(CALL_TIMEOUT_S),
    }
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "equal"


def test_what_counts_as_the_users_own_code(tmp_path: Path) -> None:
    own = {module.__name__ for module in protocol._own_code()}
    assert "tests" in own  # a source tree, not installed
    assert not own & {"numpy", "cloudpickle", "lampy", "json", "aiohttp", "pytest", "__main__"}
    installed = tmp_path / "lib" / "site-packages" / "vendored"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    fake = types.ModuleType("vendored")
    fake.__file__ = str(installed / "__init__.py")
    fake.__path__ = [str(installed)]
    assert not protocol._is_own_code("vendored", fake)  # installed: it travels by name
    mine = types.ModuleType("mine")
    mine.__file__ = str(tmp_path / "mine.py")
    assert protocol._is_own_code("mine", mine)
    assert not protocol._is_own_code("made_here", types.ModuleType("made_here"))  # no file


def test_registrations_are_undone_and_a_cached_helper_keeps_its_settings() -> None:
    from tests.runtime.openlambda.userpkg import helpers

    data = protocol.by_value(helpers.taper, helpers.taper)
    assert cloudpickle.list_registry_pickle_by_value() == set()
    copy = cloudpickle.loads(data)
    assert copy is not helpers.taper  # a copy, made from the function's own code
    assert copy.cache_parameters() == helpers.taper.cache_parameters()
    np.testing.assert_array_equal(copy(7), helpers.taper(7))
