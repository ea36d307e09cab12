"""The job store on `lampy serve` (durable state for orchestration in lambdas), over real HTTP.

Its promises: nothing is created or read without a signature; a chunk's outcome is recorded
once (the second write is refused, so no chunk is merged twice); the lease goes to one holder
at a time, to the successor its holder names, or to anyone once it lapsed; a cancelled job
grants no lease.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.remote._jobs import (
    CANCEL_GRACE_S,
    TOMBSTONE,
    JobStore,
    StoreError,
    at_rest,
    status_of,
    sweep,
)

from .conftest import Server, array_server


def new_job(server: Server, chunks: int = 4) -> JobStore:
    store = JobStore(server.url, uuid.uuid4().hex)
    store.create(frames.encode(frames.COORDINATE, {"spec": True}, store.secret).join(), chunks)
    return store


def raw(server: Server, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request(method, path, body=body or None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_unsigned_requests_are_refused_and_create_nothing(server: Server) -> None:
    job = uuid.uuid4().hex
    status, text = raw(server, "PUT", f"/jobs/{job}/spec?chunks=4", b"x" * 100)
    assert status == 401 and b"unsigned" in text
    assert not (server.root / "jobs" / job).exists()
    with new_job(server) as store:
        assert raw(server, "GET", f"/jobs/{store.job}")[0] == 401
        assert raw(server, "GET", f"/jobs/{store.job}/chunks")[0] == 401


def test_a_bad_job_id_is_refused() -> None:
    with pytest.raises(StoreError, match="32 hex digits"):
        JobStore("http://127.0.0.1:1", "../../etc")


def test_an_outcome_is_recorded_once(server: Server) -> None:
    with new_job(server) as store:
        first = frames.encode(frames.RESULT, "first", store.secret).join()
        second = frames.encode(frames.RESULT, "second", store.secret).join()
        assert store.record([(0, first), (1, first)]) == []
        assert store.record([(1, second), (2, second)]) == [1]  # chunk 1 kept its first answer
        kept = {
            c: frames.decode(f, store.secret, freshness=at_rest()).value for c, f in store.records()
        }
        assert kept == {0: "first", 1: "first", 2: "second"}
        assert store.status()["done"] == 3


def test_large_records_and_specs_are_taken(server: Server) -> None:
    """Partials of several MiB (a Gram matrix) and a spec with large shared arguments pass
    (aiohttp alone reads at most 1 MiB of a body)."""
    big = b"\x01" * (3 << 20)
    store = JobStore(server.url, uuid.uuid4().hex)
    with store:
        assert store.create(frames.encode(frames.COORDINATE, big, store.secret).join(), 2)
        assert frames.decode(store.spec(), store.secret, freshness=at_rest()).value == big
        records = [(c, frames.encode(frames.RESULT, big, store.secret).join()) for c in (0, 1)]
        assert store.record(records) == []
        kept = [
            frames.decode(f, store.secret, freshness=at_rest()).value for _, f in store.records()
        ]
        assert kept == [big, big]


def test_the_lease_goes_to_one_holder_at_a_time(server: Server) -> None:
    with new_job(server) as store:
        status, lease = store.lease("a", 0.5, None, "start", 30.0)
        assert status == 200 and lease["holder"] == "a" and lease["generation"] == 1
        status, held = store.lease("b", 3.0, None, "revive", 30.0)
        assert status == 409 and held["holder"] == "a"
        assert store.lease("a", 0.5, 1, "renew", 29.0)[0] == 200  # the holder renews
        status, handed = store.lease("c", 3.0, 1, "hand-off", 30.0)  # the successor named
        assert status == 200 and handed["holder"] == "c" and handed["generation"] == 2
        assert store.lease("a", 3.0, 1, "renew", 28.0)[0] == 409  # the old holder lost it
        status, _ = store.lease("d", 3.0, None, "revive", 30.0)
        assert status == 409
        time.sleep(3.2)  # c's lease lapses: anyone may take the job over
        status, revived = store.lease("d", 3.0, None, "revive", 30.0)
        assert status == 200 and revived["generation"] == 3
        events = [(e["from"], e["to"], e["why"]) for e in store.status()["events"]]
        assert events == [(None, "a", "start"), ("a", "c", "hand-off"), ("c", "d", "revive")]


def test_a_cancelled_job_grants_no_lease_and_a_result_is_kept_once(server: Server) -> None:
    with new_job(server) as done, new_job(server) as cancelled:
        assert done.put_result(b"one") and not done.put_result(b"two")
        assert done.result(0)[0] == b"one" and done.status()["state"] == "done"
        assert done.lease("late", 3.0, None, "revive", 30.0) == (409, {"done": True})
        assert cancelled.cancel()["state"] == "cancelled"
        assert cancelled.lease("x", 3.0, None, "start", 30.0) == (410, {"cancelled": True})
        assert cancelled.result(0)[0] is None


def test_a_result_request_waits_for_the_result(server: Server) -> None:
    import threading

    with new_job(server) as store:
        threading.Timer(0.3, store.put_result, args=(b"late",)).start()
        start = time.monotonic()
        assert store.result(5.0)[0] == b"late"
        assert 0.2 < time.monotonic() - start < 3.0
        assert store.result(0.0)[0] == b"late"


def test_a_result_request_held_while_the_lease_lives_answers_once_it_lapses(
    server: Server,
) -> None:
    """A watcher asks once a while: its request is held while a coordinator renews the lease,
    and answered, with the status, as soon as the job has had no live lease for `orphaned`
    seconds (counted from the request at the earliest, so one just summoned may start)."""
    with new_job(server) as store:
        start = time.monotonic()
        data, status = store.result(10.0, orphaned=0.5)  # no lease at all
        assert data is None and status is not None and status["lease"] is None
        assert 0.4 < time.monotonic() - start < 3.0
        renewing = threading.Event()

        def renew() -> None:
            generation = store.lease("a", 0.6, None, "start", 30.0)[1]["generation"]
            while not renewing.wait(0.2):
                store.lease("a", 0.6, generation, "renew", 30.0)

        threading.Thread(target=renew, daemon=True).start()
        time.sleep(0.3)
        start = time.monotonic()
        assert store.result(1.5, orphaned=0.5)[0] is None  # held to its wait: the lease lives
        assert time.monotonic() - start > 1.4
        renewing.set()  # the coordinator stops: lapsed 0.6 s later, orphaned 0.5 s after that
        start = time.monotonic()
        data, status = store.result(10.0, orphaned=0.5)
        assert data is None and status is not None and status["lease"]["holder"] == "a"
        assert time.monotonic() - start < 3.0


def test_a_held_result_request_answers_at_once_when_the_server_stops(
    tmp_path: Path, lampy_secret: bytes
) -> None:
    """SIGTERM ends `lampy serve` at once: a result request held open (up to 30 s) answers
    "no result yet" rather than keeping the server alive until its wait runs out."""
    answers: list[bytes | None] = []
    with array_server(tmp_path) as server, new_job(server) as store:
        assert server.process is not None
        waiting = threading.Thread(target=lambda: answers.append(store.result(25.0)[0]))
        waiting.start()
        time.sleep(0.5)  # the request is held by now
        server.process.terminate()
        server.process.wait(timeout=10)  # before the fix: 25 s, the request's wait
        waiting.join(timeout=10)
    assert answers == [None]


def test_a_fetched_job_keeps_only_its_status_and_refuses_a_new_lease(server: Server) -> None:
    with new_job(server, chunks=3) as store:
        store.record([(0, b"x"), (1, b"y")])
        assert store.put_result(b"report")
        store.delete()
        status = store.status()
        assert status["state"] == "done" and status["fetched"] and status["done"] == 2
        assert store.lease("late", 3.0, None, "revive", 30.0) == (409, {"done": True})
        with pytest.raises(StoreError, match="its result was fetched"):
            store.result(0)
        names = {p.name for p in (server.root / "jobs" / store.job).iterdir()}
        assert names <= TOMBSTONE


def test_the_sweep_leaves_a_job_being_created_alone(tmp_path: Path) -> None:
    """PUT spec makes the job's folder, then writes meta.json: a sweep in between must not take
    the folder (the job's creation failed with FileNotFoundError, a 500), unless the folder
    itself is older than the ttl (a creation that died half-way)."""
    young, old = tmp_path / "jobs" / ("a" * 32), tmp_path / "jobs" / ("b" * 32)
    for folder in (young, old):
        (folder / "chunks").mkdir(parents=True)
    now = time.time()
    os.utime(old, (now - 200, now - 200))
    assert sweep(tmp_path, ttl=100.0, now=now) == ["b" * 32]
    assert young.is_dir() and not old.exists()


def test_the_sweep_ends_jobs_past_their_ttl_and_entombs_cancelled_ones(tmp_path: Path) -> None:
    root = tmp_path
    for job in ("a" * 32, "b" * 32, "c" * 32):
        (root / "jobs" / job / "chunks").mkdir(parents=True)
        (root / "jobs" / job / "meta.json").write_text('{"chunks": 2}')
        (root / "jobs" / job / "spec").write_bytes(b"spec")
        (root / "jobs" / job / "chunks" / "0").write_bytes(b"x")
        for own in ("published", "results"):
            (root / own / job).mkdir(parents=True)
            (root / own / job / "0.npy").write_bytes(b"data")
    (root / "jobs" / ("c" * 32) / "cancelled").write_text("now")
    now = time.time()
    assert sweep(root, ttl=100.0, now=now) == []  # all active: nothing goes yet
    assert sweep(root, ttl=100.0, now=now + CANCEL_GRACE_S + 1) == []
    entombed = {p.name for p in (root / "jobs" / ("c" * 32)).iterdir()}
    assert entombed == {"meta.json", "cancelled"} and not (root / "published" / ("c" * 32)).exists()
    assert status_of(root / "jobs" / ("c" * 32))["done"] == 1  # the count survives
    assert sorted(sweep(root, ttl=100.0, now=now + 101)) == ["a" * 32, "b" * 32, "c" * 32]
    assert not [p for own in ("jobs", "published", "results") for p in (root / own).iterdir()]
