"""The client's watch over a coordinator it summoned (one layer: a stand-in job store, times
shrunk). Lambda orchestration costs the client one call a job; looking at the lease while the
coordinator's call is open is what may add to that, so when it looks is tested here."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lampy.runtime.openlambda import _watch
from lampy.runtime.openlambda._coordinator import LEASE_S


class Store:
    """A job store that counts the status requests and answers with a given lease."""

    def __init__(self, lease_until: float | None, chunks: int | None = 8) -> None:
        self.looks, self.chunks = 0, chunks
        self.lease = None if lease_until is None else {"until": lease_until}

    def status(self) -> dict[str, Any]:
        self.looks += 1
        return {
            "state": "running",
            "lease": self.lease,
            "created": 0,
            "done": 0,
            "chunks": self.chunks,  # None: no coordinator wrote the job's spec yet
        }


@pytest.fixture(autouse=True)
def fast_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_watch, "WATCH_S", 0.05)


async def answered_after(seconds: float, store: Store, lifetime: float) -> tuple[str | None, float]:
    """Why the watch gave up on a call answered after `seconds` (None: it waited for it)."""
    loop = asyncio.get_running_loop()
    call: asyncio.Future[Any] = loop.create_future()
    loop.call_later(seconds, call.set_result, ("done", None))
    started = time.monotonic()
    given_up = await _watch._given_up(call, store, None, lifetime)  # type: ignore[arg-type]
    call.cancel()
    return given_up, time.monotonic() - started


def test_a_job_shorter_than_half_the_runtime_limit_costs_the_client_no_look() -> None:
    store = Store(lease_until=time.time() + 60)
    given_up, _ = asyncio.run(answered_after(0.3, store, lifetime=1.0))
    assert given_up is None and store.looks == 0


def test_a_longer_job_is_looked_at_from_half_the_runtime_limit_on() -> None:
    store = Store(lease_until=time.time() + 60)  # renewed, not lapsed: the call is waited for
    given_up, took = asyncio.run(answered_after(0.8, store, lifetime=1.0))
    assert given_up is None and took >= 0.8
    assert 1 <= store.looks <= 0.3 / 0.05 + 1  # from 0.5 s on, every WATCH_S


class Later:
    """`time` for the watch: the real time at the summons, 20 s later at every look."""

    def __init__(self) -> None:
        self.summoned: float | None = None

    def time(self) -> float:
        if self.summoned is None:
            self.summoned = time.time()
            return self.summoned
        return time.time() + 20.0


def test_a_lease_renewed_after_the_summons_then_lapsed_gives_up_on_the_open_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Later()
    monkeypatch.setattr(_watch, "time", clock)
    store = Store(lease_until=time.time() + LEASE_S + 1.0)  # renewed 1 s after the summons
    given_up, took = asyncio.run(answered_after(30.0, store, lifetime=1.0))
    assert given_up is not None and "stopped renewing its lease" in given_up
    assert store.looks == 1 and 0.5 <= took < 5.0


def test_a_lease_not_renewed_since_the_summons_is_still_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lease that lapsed before the summons is the last coordinator's: the summoned one may
    still be starting, so its call is waited for."""
    monkeypatch.setattr(_watch, "time", Later())
    store = Store(lease_until=time.time() - 0.5)
    given_up, _ = asyncio.run(answered_after(0.8, store, lifetime=1.0))
    assert given_up is None and store.looks >= 1


def test_a_call_whose_coordinator_never_started_is_given_up_at_the_first_look() -> None:
    """The first coordinator writes the job's spec as it starts: none by the first look means
    the platform took the call and never ran it (OpenLambda drops one queued behind a failed
    round trip), which would otherwise hold the job until the call's timeout."""
    store = Store(lease_until=None, chunks=None)
    given_up, took = asyncio.run(answered_after(30.0, store, lifetime=1.0))
    assert given_up is not None and "never started" in given_up
    assert store.looks == 1 and 0.5 <= took < 5.0
