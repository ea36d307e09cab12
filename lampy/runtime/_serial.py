"""Where the caller's own time goes while a region runs: cumulative seconds per phase.

The caller's serial share (what it does while workers wait, or after they are done) is what
caps scaling with the cores, so the runner and the local executor add up their phases here,
and benchmarks read them (bench/bench_scale.py). Cheap: two clock reads per phase per call.

Phases: "probe" (the auto probe, run here), "here" (chunks run here while the workers start),
"start-up" (a job waiting for workers still importing), "copy" (waiting for an input copy
before a chunk could leave), "send" (pickling the job and handing chunks out), "combine"
(joining or merging the results), "job" (the executor's whole run, for reference). "copy
threads" is the copying done by the copy threads, summed over threads: caller CPU, but in
parallel with the workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_seconds: dict[str, float] = {}


def add(phase: str, seconds: float) -> None:
    """Count `seconds` more in `phase`."""
    with _lock:
        _seconds[phase] = _seconds.get(phase, 0.0) + seconds


@contextmanager
def timing(phase: str) -> Iterator[None]:
    """Count the time the block takes in `phase`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add(phase, time.perf_counter() - start)


def snapshot() -> dict[str, float]:
    """The seconds counted so far, per phase (subtract two snapshots to time a call)."""
    with _lock:
        return dict(_seconds)


def since(before: dict[str, float]) -> dict[str, float]:
    """Seconds per phase counted since `before` (a snapshot)."""
    now = snapshot()
    return {phase: now[phase] - before.get(phase, 0.0) for phase in now}


SERIAL_PHASES = ("probe", "here", "start-up", "copy", "send", "combine")


def serial_seconds(phases: dict[str, float]) -> float:
    """The caller's serial time in these phase figures."""
    return sum(phases.get(p, 0.0) for p in SERIAL_PHASES)
