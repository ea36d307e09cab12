"""Shared fixtures: the lampy executors every region test runs on, and the bundled sample."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import lampy

DATA = Path(__file__).resolve().parents[2] / "examples" / "fisher" / "data"
SAMPLE_WAV = DATA / "two_speakers.wav"
SAMPLE_RTTM = DATA / "two_speakers.rttm"


@pytest.fixture(params=["inline", "local"])
def executor(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test body with lampy regions on each executor."""
    with lampy.using(executor=request.param):
        yield request.param
