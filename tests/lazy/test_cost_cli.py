"""`lampy calibrate`: measures the cost constants, caches them, and prints each with its unit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lampy.cli import main
from lampy.lazy._cost import DEFAULTS, cache_path, constants


def test_calibrate_prints_units_and_caches_every_constant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["calibrate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(DEFAULTS)
    flops = [line for line in lines if line.split()[0].startswith("gemm_flops")]
    assert len(flops) == 2 and all(line.endswith(" flop/s") for line in flops)
    assert all(line.endswith(" s per element") for line in lines if line not in flops)
    cached = json.loads(cache_path().read_text())
    assert cached.keys() == DEFAULTS.keys() and constants() == cached
