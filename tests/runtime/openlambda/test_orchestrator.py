"""Orchestration in lambdas (orchestrator="lambda"), on real `lampy worker` processes.

A coordinator lambda runs the job's scheduler, merges partials in combine lambdas, keeps the
job's state in the array server's job store, and hands off before its runtime limit; the
client may go away and re-attach. Every answer is checked bit for bit against the client's own
orchestration (or inline), and every chunk merged exactly once, from the store's own records
and the coordinators' counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import lampy
from lampy._errors import ExecutionError, RetriesExhausted
from lampy.runtime import executors
from lampy.runtime._codec import dumps
from lampy.runtime._combine import Merged, subtrees, tree_merge
from lampy.runtime._secret import Freshness
from lampy.runtime._settings import resolve_options
from lampy.runtime._worker_side import Outcome
from lampy.runtime.openlambda import _coordinator as coordinator
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._coordinator import (
    MAX_FAN_IN,
    PROCS_LIMIT,
    chunks_of,
    fan_in,
    handoff_margin,
    nbytes,
    next_orchestrator,
    thread_name,
)
from lampy.runtime.openlambda._deploy import upload
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.runtime.openlambda._protocol import Accounting, JobState
from lampy.runtime.openlambda._transport import AiohttpTransport, Reply
from lampy.runtime.openlambda._watch import JobCancelled, StoreRefused
from lampy.runtime.remote import _publish
from lampy.runtime.remote._jobs import CANCEL_GRACE_S, TOMBSTONE, JobStore
from lampy.testing import (
    assert_same,
    free_port,
    openlambda_worker,
    wait_ready,
    worker_stats,
)

from .test_executor import double, make_job
from .test_worker import request

ROOT = Path(__file__).resolve().parents[3]


def bracket(a: str, b: str) -> str:
    return f"({a}{b})"


def letters(x: np.ndarray) -> str:
    return "".join(chr(ord("a") + int(v) % 26) for v in x)


def energy(x: np.ndarray) -> np.ndarray:
    return (np.sin(x) ** 2).sum(axis=0)


def slow_energy(x: np.ndarray) -> np.ndarray:
    time.sleep(0.04)
    return (np.sin(x) ** 2).sum(axis=0)


def executor_in_use() -> OpenLambdaExecutor:
    executor = executors.get("openlambda", resolve_options("openlambda"))
    assert isinstance(executor, OpenLambdaExecutor)
    return executor


def assert_merged_once(executor: OpenLambdaExecutor, chunks: int) -> dict[str, Any]:
    """Every chunk accepted once over all coordinators, the store holding one record each."""
    account, status = executor.accounts[-1], executor.statuses[-1]
    assert status["state"] == "done" and status["done"] == chunks
    assert sorted(account.accepted) == list(range(chunks))
    assert set(account.accepted.values()) == {1}
    mine = [set(chunks_of(c["accepted"])) for c in status["counters"].values()]
    assert sum(len(m) for m in mine) == chunks  # disjoint: no chunk merged by two
    return status


# -- the tree -------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 2, 3, 7, 8, 9, 13, 33, 64, 100, 1000, 1057])
@pytest.mark.parametrize("width", [2, 8, 32, MAX_FAN_IN])
def test_subtrees_and_fan_in_levels_rebuild_the_client_tree(total: int, width: int) -> None:
    """What a coordinator builds (the subtrees lacking the client's chunks, each merged
    `width` at a time level by level) is the client's own tree, bracket for bracket."""
    leaves = [chr(ord("a") + i % 26) for i in range(total)]
    expected = tree_merge(leaves, bracket)
    for first in range(min(total, 3)):
        nodes = []
        for lo, hi in subtrees(first, total):
            level = leaves[lo:hi]
            while len(level) > 1:
                groups = [level[i : i + width] for i in range(0, len(level), width)]
                level = [tree_merge(g, bracket) for g in groups]
            nodes.append(Merged(level[0], hi - lo))
        assert tree_merge(leaves[:first] + nodes, bracket) == expected


def test_a_combine_call_merges_many_small_partials_or_a_few_large_ones() -> None:
    assert fan_in(nbytes(np.zeros(8))) == MAX_FAN_IN
    assert fan_in(nbytes(np.zeros(1 << 16))) == 4  # 512 KiB each: 2 MiB a call
    assert fan_in(nbytes((np.zeros(1 << 20), 3))) == 2  # never fewer than a pair
    assert all(fan_in(n) & (fan_in(n) - 1) == 0 for n in (1, 10**3, 10**5, 10**7))


class FakeCaller:
    """Combine calls merged here with `bracket` (a single-layer unit test of the merger),
    counting the calls made while chunks still arrive."""

    def __init__(self) -> None:
        self.calls = 0

    async def combine(self, job: str, number: int, rule: bytes, partials: list[Any]) -> Outcome:
        self.calls += 1
        await asyncio.sleep(0)
        return Outcome(value=tree_merge(partials, bracket))


@pytest.mark.parametrize("keep_going", [False, True])
@pytest.mark.parametrize(
    ("total", "first", "lost", "width"),
    [
        (1, 0, (), 2),
        (9, 1, (3,), 2),
        (40, 0, (0, 17), 4),
        (40, 1, (39,), 4),
        (100, 1, (5, 6, 50), 2),
        (257, 0, (), 256),
        (300, 2, (299,), 8),
    ],
)
def test_partials_merge_as_they_arrive_into_the_client_tree(
    monkeypatch: pytest.MonkeyPatch,
    keep_going: bool,
    total: int,
    first: int,
    lost: tuple[int, ...],
    width: int,
) -> None:
    """Arriving in any order, some chunks left out (allow_partial) or none, the merger builds
    the subtrees the client merges with its own chunks into its own tree, bracket for
    bracket; and it merges while chunks still arrive, not only at the end."""
    if lost and not keep_going:
        lost = ()  # a job that may not leave chunks out loses none here
    monkeypatch.setattr(coordinator, "fan_in", lambda size: width)
    monkeypatch.setattr(coordinator, "HERE_BYTES", 0)  # every group by a combine call
    letters_ = [chr(ord("a") + i % 26) for i in range(first + total)]
    chunks = total - 0  # the coordinator's chunks: positions first ... first + total - 1
    outcomes = {
        c: Outcome(error=RetriesExhausted("lost"))
        if c in lost
        else Outcome(value=letters_[first + c])
        for c in range(chunks)
    }
    assignment = SimpleNamespace(
        first=first,
        keep_going=keep_going,
        combine=dumps(bracket),
        job="j",
        settings={"attempts": 1, "backoff": 0.0},
    )
    caller = FakeCaller()

    async def run() -> tuple[dict[int, Outcome], int]:
        merger = coordinator._Merger(
            caller, assignment, coordinator.Report({}), Accounting("j", chunks)
        )  # type: ignore[arg-type]
        order = list(range(chunks))
        random.Random(total).shuffle(order)
        for c in order:
            if c not in lost:  # a lost chunk is decided only at the end
                merger.stream(c, outcomes[c])
                await asyncio.sleep(0)
        streamed = caller.calls
        done = dict(outcomes)
        await merger.finish(done, streamed=True)
        return done, streamed

    done, streamed = asyncio.run(run())
    kept = [letters_[first + c] for c in range(chunks) if c not in lost]
    client = letters_[:first] + [done[c].value for c in sorted(done) if done[c].error is None]
    assert tree_merge(client, bracket) == tree_merge(letters_[:first] + kept, bracket)
    full_groups_before_a_loss = (min(lost, default=chunks) - first) // width
    if full_groups_before_a_loss >= 2:
        assert streamed > 0  # merged while chunks still came


def test_small_partials_merge_in_the_coordinator_into_the_same_tree() -> None:
    """1,000 partials of a few floats: no combine call (each would be one more outstanding
    call for OpenLambda's scaler), the coordinator merges them with the job's rule, bracket for
    bracket as the client would."""
    partials = [np.full(4, float(i)) for i in range(1000)]
    assignment = SimpleNamespace(
        first=0, keep_going=False, combine=dumps(np.add), job="small", settings={"attempts": 1}
    )
    caller = FakeCaller()

    async def run() -> dict[int, Outcome]:
        merger = coordinator._Merger(
            caller, assignment, coordinator.Report({}), Accounting("small", 1000)
        )  # type: ignore[arg-type]
        done = {c: Outcome(value=p) for c, p in enumerate(partials)}
        for c in random.Random(3).sample(range(1000), 1000):
            merger.stream(c, done[c])
            await asyncio.sleep(0)
        await merger.finish(done, streamed=True)
        return done

    done = asyncio.run(run())
    assert caller.calls == 0 and list(done) == [0]
    np.testing.assert_array_equal(done[0].value.value, tree_merge(partials, np.add))


def test_the_hand_off_rule_prefers_the_longer_remaining_lifetime() -> None:
    margin = handoff_margin(30.0)
    assert margin == 3.0 and handoff_margin(2.0) == 1.0
    assert next_orchestrator(20.0, 30.0, margin) == "this call"
    assert next_orchestrator(2.0, 30.0, margin) == "fresh call"
    assert next_orchestrator(0.5, 0.4, margin) == "this call"  # no one has more time


# -- on the session's worker ----------------------------------------------------------------


def test_float_sums_and_ordered_reductions_equal_client_orchestration(worker_url: str) -> None:
    x = np.random.default_rng(5).standard_normal((6_000, 3))
    text = np.arange(37)
    total = lampy.sum(chunks=64)(energy)
    ordered = lampy.reduce(bracket, chunks=13)(letters)
    with lampy.using(executor="openlambda", url=worker_url, progress="off"):
        expected = (total(x), ordered(text))
    with lampy.using(executor="openlambda", url=worker_url, orchestrator="lambda", progress="off"):
        got = (total(x), ordered(text))
        executor = executor_in_use()
        merged = [executor.reports[-2].merged, executor.reports[-1].merged]
        assert merged == [[(0, 64)], [(0, 13)]]  # merged in lambdas, not here
    assert_same(got[0], expected[0], exact=True)
    assert got[1] == expected[1]  # the same brackets: the same tree
    assert got[1].startswith("((((abc")


def weighted_gram(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x @ w).T @ x


def test_partials_and_shared_arguments_of_megabytes_go_through_the_job_store(
    worker_url: str,
) -> None:
    """A 400 x 400 partial is 1.3 MB, and so is the shared `w`: the coordinator's records
    and the job's spec are larger than a web server takes by default."""
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((8 * 16, 400)), rng.standard_normal((400, 400))
    region = lampy.sum(chunks=8, shared=["w"])(weighted_gram)
    with lampy.using(executor="openlambda", url=worker_url, progress="off"):
        expected = region(x, w)
    with lampy.using(executor="openlambda", url=worker_url, orchestrator="lambda", progress="off"):
        got = region(x, w)
    assert_same(got, expected, exact=True)


def dies_on_a_negative_row(x: np.ndarray) -> np.ndarray:
    if (x < 0).any():
        os.kill(os.getpid(), signal.SIGKILL)  # its sandbox dies at every attempt
    return (np.sin(x) ** 2).sum(axis=0)


def test_a_partial_sum_leaves_a_lost_chunk_out_as_client_orchestration_does(
    worker_url: str,
) -> None:
    """allow_partial under lambda orchestration: the lost chunk's successors move up in the
    tree, merged as they come; the answer and its coverage are client orchestration's."""
    x = np.abs(np.random.default_rng(11).standard_normal((640, 2))) + 0.1
    x[400, 1] = -1.0  # chunk 40 of 64
    region = lampy.sum(chunks=64, allow_partial=0.9)(dies_on_a_negative_row)
    options = {"url": worker_url, "attempts": 2, "backoff": 0.01, "progress": "off"}
    with lampy.using(executor="openlambda", **options):
        expected, expected_coverage = region(x)
    with lampy.using(executor="openlambda", orchestrator="lambda", **options):
        got, coverage = region(x)
        report = executor_in_use().reports[-1]
    assert list(coverage.lost) == [40] == list(expected_coverage.lost)
    assert coverage.merged == expected_coverage.merged
    assert_same(got, expected, exact=True)
    assert report.merged == [(0, 63)]  # one value for the client: merged in lambdas


class Counting(AiohttpTransport):
    """The client's transports, counting their calls (and to where) and bytes both ways."""

    calls = sent = received = 0
    to: list[str] = []

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        reply = await super().post(frame, timeout)
        Counting.calls += 1
        Counting.to.append(self.url)
        Counting.sent += frame.size
        Counting.received += reply.reader.total if reply.reader else len(reply.body)
        return reply


@pytest.mark.parametrize("chunks", [40, 160])
def test_the_client_makes_one_call_however_many_chunks(worker_url: str, chunks: int) -> None:
    x = np.random.default_rng(1).standard_normal((chunks * 10, 2))
    counted: dict[str, tuple[int, int]] = {}
    for mode in ("client", "lambda"):  # the client's calls as the issue counts them: one a chunk
        batch = 1 if mode == "client" else 0
        executor = OpenLambdaExecutor(
            url=worker_url, orchestrator=mode, progress="off", batch=batch
        )
        executor.transport = Counting(executor.endpoint, 32, executor.secret)
        executor.summoner.transport = Counting(executor.summoner.endpoint, 32, executor.secret)
        Counting.calls = Counting.sent = Counting.received = 0
        Counting.to = []
        lampy.register_executor("counted", OpenLambdaExecutor)
        executors._instances[("counted", ())] = executor
        try:
            with lampy.using(executor="counted"):
                lampy.sum(chunks=chunks)(energy)(x)
        finally:
            executors.unregister("counted")
        counted[mode] = (Counting.calls, Counting.sent + Counting.received)
    assert counted["client"][0] >= chunks
    assert counted["lambda"][0] == 1
    assert Counting.to == [f"{worker_url}/run/lampy-coordinator"]
    assert counted["lambda"][1] * 5 < counted["client"][1]


class Recording(AiohttpTransport):
    """The client's transport, keeping the bytes of each call: (request, answer)."""

    calls: list[tuple[bytes, bytes]] = []

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        reply = await super().post(frame, timeout)
        answer = bytes(reply.reader.buffer) if reply.reader else bytes(reply.body)
        Recording.calls.append((frame.join(), answer))
        return reply


CALL_BYTES = 8  # the opcodes making one object of a class from its values (and their memo)


def around(frame: bytes) -> int:
    """The bytes a frame adds around its pickle: its signed head, its header, its tag."""
    header = frames._PREFIX.unpack_from(frame)[4]
    return frames.HEAD_BYTES + header + frames.TAG_BYTES


def test_the_coordinator_call_carries_each_part_once(worker_url: str) -> None:
    """The client's one call for a job is signed once each way, and its bytes are the job's
    parts and the answer's, once each: the request, the template, the combine rule, the
    input, the job's id, the store's and the worker's addresses and the chunks, named by three
    classes; the answer, the merged value, the coordinator's name and the job's status, each
    string in it once. So a frame signed inside the frame, a part sent twice, field names
    beside the values, or options at the defaults the lambda has anyway, would each exceed the
    bound (the 1,000-chunk sum's 3,462 bytes a job were 2,620 without them; issue 18 asks
    for 100x fewer than client orchestration's 271 kB)."""
    x = np.random.default_rng(2).standard_normal((400, 2))
    executor = OpenLambdaExecutor(url=worker_url, orchestrator="lambda", progress="off")
    executor.summoner.transport = Recording(executor.summoner.endpoint, 32, executor.secret)
    Recording.calls = []
    lampy.register_executor("recorded", OpenLambdaExecutor)
    executors._instances[("recorded", ())] = executor
    try:
        with lampy.using(executor="recorded"):
            lampy.sum(chunks=40)(energy)(x)
    finally:
        executors.unregister("recorded")
    [(request, answer)] = Recording.calls
    assert request.count(frames.MAGIC) == answer.count(frames.MAGIC) == 1  # signed once

    fresh = Freshness()  # this process took both nonces already
    summons = frames.decode(request, executor.secret, freshness=fresh).value
    job = summons.assignment
    assert job.options == {}  # all at their defaults: the lambda has them
    runs = job.chunks
    parts = (summons.job, summons.store, summons.why, job.template, job.combine, job.split)
    parts += (job.whole, job.url, job.options, job.lifetime, runs.start, runs.sizes, runs.rows)
    named = (type(summons), type(job), type(runs))
    asked = len(dumps((named, parts, job.inline, job.keep_going, job.first, job.offer)))
    asked += CALL_BYTES * len(named)
    assert len(request) <= around(request) + asked, (len(request), around(request), asked)

    (echo, what), (done, report) = frames.decode(answer, executor.secret, freshness=fresh).value
    assert echo == summons.job and done == "done"
    known = {summons.job: echo, report.holder: report.holder}
    status = coordinator.one_copy(json.loads(json.dumps(report.status)), known)
    parts = (echo, what, done, report.outcomes, report.merged, report.holder, status)
    said = len(dumps((type(report), parts, report.combines, report.combine_error)))
    said += CALL_BYTES
    assert len(answer) <= around(answer) + said, (len(answer), around(answer), said)


def test_the_coordinator_is_a_lambda_of_its_own(worker_url: str) -> None:
    """Summonses go to NAME-coordinator, not to the chunks' lambda NAME (whose sandboxes the
    platform sizes from the chunks' calls alone). Where only NAME is deployed (a lampy older
    than the coordinator lambda), the error names the command that deploys both."""
    x = np.arange(400.0)
    upload(worker_url, "solo")
    assert request(worker_url, "DELETE", "/registry/solo-coordinator")[0] == 200
    options = {"url": worker_url, "name": "solo", "progress": "off", "attempts": 2}
    with (
        lampy.using(executor="openlambda", orchestrator="lambda", **options),
        pytest.raises(
            ExecutionError,
            match=(
                r"lambda 'solo-coordinator' is not deployed on http://127\.0\.0\.1:\d+ .*"
                r"Run `lampy deploy --url http://127\.0\.0\.1:\d+ --name solo` first"
            ),
        ),
    ):
        lampy.sum(chunks=8)(energy)(x)
    with lampy.using(executor="openlambda", **options):  # the chunks' lambda answers
        np.testing.assert_allclose(lampy.sum(chunks=8)(energy)(x), energy(x))


def test_a_chunks_error_and_a_combine_error_reach_the_caller(worker_url: str) -> None:
    def fails(x: np.ndarray) -> np.ndarray:
        if x[0] == 50:
            raise ValueError(f"bad rows from {x[0]}")
        return x.sum(axis=0)

    def bad_combine(a: Any, b: Any) -> Any:
        raise KeyError("combine refused")

    with lampy.using(executor="openlambda", url=worker_url, orchestrator="lambda", progress="off"):
        with pytest.raises(ValueError, match="bad rows from 50.0") as caught:
            lampy.sum(chunks=10)(fails)(np.arange(100.0))
        assert any("chunk 5 of 10" in note for note in caught.value.__notes__)
        with pytest.raises(KeyError, match="combine refused") as raised:
            lampy.reduce(bad_combine, chunks=4)(energy)(np.ones((8, 2)))
        assert "merging partials in a lambda" in str(raised.value.__cause__)


def test_a_coordinate_frame_signed_with_another_secret_is_refused(worker_url: str) -> None:
    import urllib.error
    import urllib.request

    from lampy.runtime.openlambda._coordinator import Summons

    frame = frames.encode(frames.COORDINATE, Summons("0" * 32, "http://x", "start"), b"wrong")
    request = urllib.request.Request(f"{worker_url}/run/lampy", data=frame.join(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    refused.value.close()


# -- hand-offs, kills, detached jobs: a worker each -----------------------------------------


@pytest.fixture
def short_worker(tmp_path: Path) -> Iterator[str]:
    """A worker whose runtime limit (2.5 s) is shorter than the jobs sent to it."""
    with openlambda_worker(tmp_path / "registry", max_sandboxes=4, runtime_limit=2.5) as url:
        yield url


def test_a_runtime_limit_shorter_than_the_job_hands_off_and_stays_exact(
    short_worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and the client, waiting on the store after the first coordinator handed off, asks
    it once a while (a held request answered when the result is in), not once per lease."""
    x = np.random.default_rng(2).standard_normal((2_400, 3))
    region = lampy.sum(chunks=240)(slow_energy)
    with lampy.using(executor="inline"):
        expected = region(x)
    asked: list[str] = []
    ask = JobStore._call

    def counted(self: JobStore, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(f"{method} {path}")
        return ask(self, method, path, *args, **kwargs)

    monkeypatch.setattr(JobStore, "_call", counted)  # the client's requests (sandboxes: not)
    options = {"orchestrator": "lambda", "runtime_limit": 2.5, "progress": "off"}
    with lampy.using(executor="openlambda", url=short_worker, **options):
        started = time.monotonic()
        got = region(x)
        took, client_asked = time.monotonic() - started, list(asked)
        status = assert_merged_once(executor_in_use(), 240)
    assert_same(got, expected, exact=True)
    handoffs = [e for e in status["events"] if e["why"].startswith("hand-off")]
    assert len(handoffs) >= 1, status["events"]
    revived = sum(e["why"] == "revive" for e in status["events"])
    assert len(client_asked) <= 2 + 2 * revived + took / 25, (client_asked, took, revived)
    took = [len(chunks_of(c.get("took_over", []))) for c in status["counters"].values()]
    assert max(took) > 0  # a successor started from the store's records


def coordinator_pids(job: str, among: Callable[[int], bool] = lambda pid: True) -> set[int]:
    """The processes (as this host numbers them) with a thread named for coordinating `job`:
    a sandbox's own pid (1 on OpenLambda) does not say which sandbox it is."""
    name = thread_name(job)
    found = set()
    for comm in Path("/proc").glob("[0-9]*/task/*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == name and among(int(comm.parts[2])):
                found.add(int(comm.parts[2]))
    return found


def kill_the_coordinator_when(
    done: int,
    killed: list[int],
    among: Callable[[int], bool] = lambda pid: True,
    sent: signal.Signals = signal.SIGKILL,
) -> None:
    """SIGKILL (or `sent`), from outside, the process orchestrating the running job once `done`
    of its chunks are recorded (the job found in this process's array server, its default
    store)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not killed:
        for folder in (_publish._publisher.directory or Path("/nonexistent")).glob("jobs/*"):
            with (
                contextlib.suppress(Exception),
                JobStore(_publish._publisher.url, folder.name) as s,
            ):
                status = s.status()
                if status["done"] >= done and status["state"] == "running":
                    pids = coordinator_pids(folder.name, among)
                    assert len(pids) <= 1, pids  # one coordinator holds the job
                    for pid in pids:
                        os.kill(pid, sent)
                        killed.append(pid)
                        return
        time.sleep(0.05)


def assert_revived_and_merged_once(status: dict[str, Any], chunks: int) -> None:
    """The killed coordinator reported nothing after its last counts; a revived one took over
    the store's records and ran only the rest: every chunk recorded and accepted once."""
    assert any(e["why"] == "revive" for e in status["events"]), status["events"]
    assert status["state"] == "done" and status["done"] == chunks
    last = max(status["counters"].values(), key=lambda c: len(chunks_of(c.get("took_over", []))))
    took, ran = set(chunks_of(last.get("took_over", []))), set(chunks_of(last["accepted"]))
    assert len(took) >= 10 and not took & ran and took | ran == set(range(chunks))


def test_the_coordinators_sandbox_killed_mid_job(short_worker: str) -> None:
    """SIGKILL from outside: the lease lapses, the client summons another coordinator, which
    takes over from the store's records."""
    x = np.random.default_rng(3).standard_normal((1_200, 3))
    region = lampy.sum(chunks=120)(slow_energy)
    with lampy.using(executor="inline"):
        expected = region(x)
    options = {"orchestrator": "lambda", "runtime_limit": 2.5, "progress": "off"}
    killed: list[int] = []
    killer = threading.Thread(target=kill_the_coordinator_when, args=(10, killed))
    with lampy.using(executor="openlambda", url=short_worker, **options):
        killer.start()
        got = region(x)
        killer.join()
        status = executor_in_use().statuses[-1]
    assert killed, "the coordinator was never seen holding the job"
    assert_same(got, expected, exact=True)
    assert_revived_and_merged_once(status, 120)


def test_a_frozen_coordinator_is_replaced_once_its_lease_lapses(tmp_path: Path) -> None:
    """SIGSTOP from outside: the coordinator's call stays open (until the platform's runtime
    limit, 40 s here), but its lease lapses within LEASE_S, and the client, watching the lease
    from half that limit on, summons another coordinator, which takes over from the store's
    records before the frozen call ends."""
    x = np.random.default_rng(4).standard_normal((1_200, 3))
    region = lampy.sum(chunks=120)(slow_energy)
    with lampy.using(executor="inline"):
        expected = region(x)
    options = {"orchestrator": "lambda", "runtime_limit": 40.0, "progress": "off"}
    stopped: list[int] = []
    stopper = threading.Thread(
        target=kill_the_coordinator_when, args=(10, stopped), kwargs={"sent": signal.SIGSTOP}
    )
    registry = tmp_path / "registry"
    with openlambda_worker(registry, max_sandboxes=4, runtime_limit=40.0) as url:
        try:
            with lampy.using(executor="openlambda", url=url, **options):
                started = time.monotonic()
                stopper.start()
                got = region(x)
                took = time.monotonic() - started
                stopper.join()
                status = executor_in_use().statuses[-1]
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert stopped, "the coordinator was never seen holding the job"
    assert took < 40.0, took  # not the runtime limit of the frozen call
    assert_same(got, expected, exact=True)
    assert_revived_and_merged_once(status, 120)


def test_a_coordinator_runs_ten_threads_at_most_whatever_its_concurrency(worker_url: str) -> None:
    """A stock OpenLambda lets a sandbox run 10 processes, threads included: a coordinator
    of concurrency 32 stays within that in a real sandbox (its calls in flight follow the
    client's rule here; test_a_coordinators_calls_in_flight_take_no_thread holds 32)."""
    x = np.random.default_rng(9).standard_normal((3_200, 2))
    options = {"orchestrator": "lambda", "concurrency": 32, "batch": 1, "progress": "off"}
    with lampy.using(executor="openlambda", url=worker_url, **options):
        lampy.sum(chunks=320)(slow_energy)(x)
        status = executor_in_use().statuses[-1]
    peaks = [c["threads"] for c in status["counters"].values()]
    assert peaks and all(2 <= peak <= PROCS_LIMIT for peak in peaks), peaks


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    """A `lampy serve` of its own (serving tmp_path/"store"): job state that outlives the
    client."""
    with serving_store(tmp_path / "store") as url:
        yield url


@contextlib.contextmanager
def serving_store(served: Path, *options: str, secret: str = "") -> Iterator[str]:
    """`lampy serve` of `served` (with this process's secret, unless `secret`): its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served.mkdir()
    command = [sys.executable, "-m", "lampy.cli", "serve", str(served), "--port", str(port)]
    env = {**os.environ, "LAMPY_SECRET": secret} if secret else None
    process = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL, env=env)
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def files_of(served: Path, job: str) -> list[str]:
    """What the store keeps of a job: its folder's files, its inputs, its results."""
    found = []
    for own in ("jobs", "published", "results"):
        folder = served / own / job
        found += [f"{own}/{p.name}" for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(found)


CLIENT = """
import sys, time
import numpy as np
import lampy
from tests.runtime.openlambda.test_orchestrator import slow_energy
url, store, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
x = np.random.default_rng(4).standard_normal((1_500, 3))
with lampy.using(executor="openlambda", url=url, orchestrator="lambda", store=store,
                 runtime_limit=limit, timeout=120.0, progress="off"):
    handle = lampy.submit(lampy.sum(chunks=150)(slow_energy), x)
print(handle.id, flush=True)
time.sleep(60)  # killed before this ends
"""

ATTACH = """
import sys
import numpy as np
import lampy
np.save(sys.argv[2], lampy.job(sys.argv[1]).result(timeout=120))
"""


def test_the_client_killed_mid_job_and_a_new_process_reattaches(
    short_worker: str, store: str, tmp_path: Path
) -> None:
    kill_the_client_then_reattach(short_worker, store, 2.5, tmp_path)


def kill_the_client_then_reattach(url: str, store: str, limit: float, tmp_path: Path) -> None:
    """A client submits a 150-chunk job (coordinators living `limit` seconds) and is SIGKILLed
    after 20 chunks; a new process re-attaches by the job's id and gets the exact answer, every
    chunk merged once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, url, store, str(limit)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert client.stdout is not None
        job_id = client.stdout.readline().strip()
        handle = lampy.job(job_id)
        deadline = time.monotonic() + 30
        while handle.status()["done"] < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.kill()  # SIGKILL mid-job: no goodbye
        client.wait()
        if client.stdout is not None:
            client.stdout.close()
    assert handle.status()["state"] == "running"
    out = tmp_path / "answer.npy"
    subprocess.run([sys.executable, "-c", ATTACH, job_id, str(out)], env=env, check=True)
    with lampy.using(executor="inline"):
        expected = lampy.sum(chunks=150)(slow_energy)(
            np.random.default_rng(4).standard_normal((1_500, 3))
        )
    assert_same(np.load(out), expected, exact=True)
    status = handle.status()
    assert status["state"] == "done" and status["done"] == 150
    accepted = [set(chunks_of(c["accepted"])) for c in status["counters"].values()]
    assert sum(len(a) for a in accepted) == 150 and set().union(*accepted) == set(range(150))


def test_cancel_stops_the_job_and_removes_its_files(
    short_worker: str, store: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(6).standard_normal((3_000, 3))
    options = {"orchestrator": "lambda", "store": store, "runtime_limit": 2.5, "progress": "off"}
    with lampy.using(executor="openlambda", url=short_worker, **options):
        handle = lampy.submit(lampy.sum(chunks=300)(slow_energy), x)
    deadline = time.monotonic() + 30
    while handle.status()["done"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.cancel()["state"] == "cancelled"
    with pytest.raises(JobCancelled, match="cancelled"):
        handle.result(timeout=30)
    time.sleep(2 * 0.5 + 1.0)  # a renewal refused, in-flight chunks ended
    settled = handle.status()["done"]
    time.sleep(1.5)
    assert handle.status()["done"] == settled < 300  # nothing runs any more
    served, deadline = tmp_path / "store", time.monotonic() + CANCEL_GRACE_S + 10
    while "jobs/spec" in files_of(served, handle.job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(files_of(served, handle.job)) <= {f"jobs/{name}" for name in TOMBSTONE}
    status = handle.status()  # the tombstone still says what happened
    assert status["state"] == "cancelled" and status["done"] == settled


def test_lampy_job_shows_progress_and_answers_a_mistake_in_one_line(
    worker_url: str, store: str
) -> None:
    options = {"orchestrator": "lambda", "store": store, "runtime_limit": 20.0, "progress": "off"}
    with lampy.using(executor="openlambda", url=worker_url, **options):
        handle = lampy.submit(lampy.sum(chunks=12)(energy), np.ones((120, 2)))
    assert_same(handle.result(timeout=60), np.full(2, 120 * np.sin(1.0) ** 2), exact=False)
    shown = subprocess.run(
        [sys.executable, "-m", "lampy.cli", "job", handle.id],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert shown.returncode == 0, shown.stderr
    assert f"job {handle.id}: done, 12 of 12 chunks done (100%)" in shown.stdout
    assert "orchestrators: 1, hand-offs: 0" in shown.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "lampy.cli", "job", "nope"], capture_output=True, text=True
    )
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert json.dumps(handle.status())  # the status is plain JSON


def test_a_region_submits_itself(worker_url: str, store: str) -> None:
    options = {"orchestrator": "lambda", "store": store, "runtime_limit": 20.0, "progress": "off"}
    total = lampy.sum(chunks=6)(energy)
    x = np.arange(60.0).reshape(30, 2)
    with lampy.using(executor="openlambda", url=worker_url, **options):
        handle = total.submit(x)
    again = lampy.job(handle.id)
    assert_same(again.result(timeout=60), energy(x), exact=False)
    assert_same(again.result(timeout=60), energy(x), exact=False)  # kept by the handle
    with pytest.raises(lampy.RemoteArrayError, match="its result was fetched"):
        handle.result(timeout=60)  # fetched already: the store removed the job's files
    assert handle.status()["state"] == "done" and handle.status()["fetched"]
    with pytest.raises(lampy.UsageError, match="orchestrator='lambda'"):
        total.submit(x)  # the default executor cannot run a job without its caller


def big_wave_job(worker_url: str, store: str) -> tuple[lampy.JobHandle, np.ndarray]:
    """A detached elemwise job with an input published by reference (over PUBLISH_BYTES) and
    results stored on the store."""
    x = np.random.default_rng(12).standard_normal((1_100_000, 2))  # 17.6 MB
    options = {"orchestrator": "lambda", "store": store, "runtime_limit": 20.0, "progress": "off"}
    with lampy.using(executor="openlambda", url=worker_url, **options):
        handle = lampy.elemwise(chunks=4)(wave).submit(x)
    return handle, x


def test_a_fetched_result_removes_the_job_and_its_files(
    worker_url: str, store: str, tmp_path: Path
) -> None:
    handle, x = big_wave_job(worker_url, store)
    deadline = time.monotonic() + 60
    while handle.status()["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.1)
    kept = files_of(tmp_path / "store", handle.job)
    assert {"jobs/spec", "jobs/result"} <= set(kept), kept
    assert any(f.startswith("published/") for f in kept) and any(
        f.startswith("results/") for f in kept
    ), kept
    assert_same(handle.result(timeout=60), wave(x), exact=True)
    assert set(files_of(tmp_path / "store", handle.job)) <= {f"jobs/{n}" for n in TOMBSTONE}
    assert handle.status()["done"] == 4  # the status stays, until the ttl


def test_an_unfetched_job_is_removed_after_its_ttl(worker_url: str, tmp_path: Path) -> None:
    with serving_store(tmp_path / "store", "--job-ttl", "1.5") as store:
        handle, _ = big_wave_job(worker_url, store)
        deadline = time.monotonic() + 60
        while handle.status()["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert files_of(tmp_path / "store", handle.job)
        time.sleep(1.5 + 1.0)  # the ttl since its result, and a sweep
        assert files_of(tmp_path / "store", handle.job) == []
        with pytest.raises(lampy.RemoteArrayNotFound, match="after its last activity"):
            handle.status()


# -- chaos ----------------------------------------------------------------------------------

CHAOS_PLAN = (
    "kill=0.03,502=0.03,429=0.03,hang=0.01,reset=0.03,corrupt=0.03,duplicate=0.03,lose=0.01"
)


def wave(x: np.ndarray) -> np.ndarray:
    return np.sin(x) * 3.0 + x


@pytest.mark.chaos
@pytest.mark.parametrize("seed", [1, 2])
def test_twenty_percent_mixed_faults_give_the_inline_answer_bit_for_bit(
    tmp_path: Path, seed: int
) -> None:
    """Faults hit chunk calls, combine calls, hand-offs and the coordinators themselves (a
    killed or hung coordinator is revived from the store's records)."""
    x = np.random.default_rng(seed).standard_normal(200 * 40)
    regions = {"sum": lampy.sum(chunks=200)(energy), "elemwise": lampy.elemwise(chunks=200)(wave)}
    with lampy.using(executor="inline"):
        expected = {kind: region(x) for kind, region in regions.items()}
    options = {
        "orchestrator": "lambda",
        "runtime_limit": 3.0,
        "attempts": 12,
        "backoff": 0.02,
        "timeout": 10.0,
        "progress": "off",
        "batch": 2,  # 100 calls a job: enough for the plan to deal faults whatever the batching
    }
    registry = tmp_path / "registry"
    counters = []
    with (
        openlambda_worker(registry, 4, 3.0, chaos=CHAOS_PLAN, chaos_seed=seed) as url,
        lampy.using(executor="openlambda", url=url, **options),
    ):
        for kind, region in regions.items():
            start = time.monotonic()
            got = region(x)
            assert time.monotonic() - start < 120
            assert_same(got, expected[kind], exact=True)
            status = executor_in_use().statuses[-1]
            assert status["state"] == "done" and status["done"] == 200
            counters += status["counters"].values()
    retried = [
        sum(c.get("failures", {}).values()) + sum(c.get("dropped", {}).values()) for c in counters
    ]
    assert sum(retried)


def test_explain_says_where_orchestration_runs() -> None:
    region = lampy.sum(chunks=4)(energy)
    with lampy.using(executor="openlambda", url="http://127.0.0.1:9", orchestrator="lambda"):
        shown = str(region.explain(np.ones((100, 2))))
    coordinator = "http://127.0.0.1:9/run/lampy-coordinator"
    assert f"orchestrated by a coordinator lambda ({coordinator})" in shown
    assert "before its 30 s runtime limit" in shown
    with lampy.using(executor="openlambda", url="http://127.0.0.1:9"):
        assert "orchestrated" not in str(region.explain(np.ones((100, 2))))


def test_a_coordinators_chunks_get_sandboxes_after_short_calls(tmp_path: Path) -> None:
    """After very short calls, a lambda's scaler wants one sandbox for a few calls in flight
    (min(outstanding, outstanding x mean time / 10 ms); `lampy worker` follows OpenLambda).
    Were the coordinator a call of the chunks' lambda, its own sandbox would be that one, and
    its chunk calls would wait for a sandbox until the runtime limit ended the call. On a
    lambda of its own, the job runs at once, without a hand-off."""
    x = np.arange(6400.0)
    with openlambda_worker(tmp_path / "registry", max_sandboxes=4, runtime_limit=20.0) as url:
        options = {"url": url, "progress": "off", "runtime_limit": 20.0}
        with lampy.using(executor="openlambda", batch=1, **options):  # 400 calls of ~1 ms
            lampy.elemwise(chunks=400)(np.negative)(x)
        deadline = time.monotonic() + 15.0  # the scaler drops idle sandboxes after 2 s
        while worker_stats(url)["sandboxes"] > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker_stats(url)["sandboxes"] == 1
        with lampy.using(executor="openlambda", orchestrator="lambda", **options):
            executor = executor_in_use()
            start = time.monotonic()
            total = lampy.sum(chunks=64)(energy)(x)
            took = time.monotonic() - start
    np.testing.assert_allclose(total, energy(x))
    events = executor.statuses[-1]["events"]
    assert [e["why"] for e in events] == ["start"], events
    assert took < 10.0  # a stalled job takes the runtime limit, 20 s


def test_a_store_that_refuses_the_coordinator_is_named_with_its_answer(
    worker_url: str, tmp_path: Path
) -> None:
    """A job store of another secret refuses the coordinator's requests (401): the client's
    error names the store and its answer, not a failure of lampy's handler."""
    x = np.random.default_rng(2).standard_normal((40, 2))
    with (
        serving_store(tmp_path / "store", secret="not-the-lambdas-secret") as store,
        lampy.using(executor="openlambda", url=worker_url, orchestrator="lambda", store=store),
        pytest.raises(StoreRefused) as refused,
    ):
        lampy.sum(chunks=4)(energy)(x)
    message = str(refused.value)
    assert store in message and "HTTP 401" in message and "LAMPY_SECRET" in message
    assert "outside user code" not in message, message


def _noting(status: list[str]) -> Callable[[str, Any], None]:
    return lambda line, headers: status.append(line)


class HeldServer:
    """An HTTP/1.1 server on loopback, one thread, that answers lampy's frames with the real
    handler once `hold` seconds have passed; records the most requests it held at once."""

    def __init__(self, hold: float) -> None:
        self.hold, self.held, self.most = hold, 0, 0
        self.open: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from lampy.runtime.openlambda._handler import app

        self.open.add(writer)
        try:
            while await reader.readline():  # a request line
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    length = int(value) if name.lower() == "content-length" else length
                body = await reader.readexactly(length)
                self.held += 1
                self.most = max(self.most, self.held)
                await asyncio.sleep(self.hold)
                self.held -= 1
                environ = {"CONTENT_LENGTH": str(length), "wsgi.input": io.BytesIO(body)}
                status: list[str] = []
                answer = b"".join(bytes(p) for p in app(environ, _noting(status)))
                head = f"HTTP/1.1 {status[0]}\r\nContent-Length: {len(answer)}\r\n\r\n"
                writer.write(head.encode() + answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()

    async def _close(self) -> None:
        self.server.close()
        for writer in list(self.open):
            writer.close()
        await asyncio.sleep(0.05)  # the handlers see their connections end

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_a_coordinators_calls_in_flight_take_no_thread() -> None:
    """A coordinator's executor (StreamTransport) with 32 calls in flight runs
    no more threads than with one: OpenLambda counts a sandbox's threads against its process
    limit (10), so calls in flight must not each take one."""
    from lampy.runtime.openlambda._coordinator import _threads
    from lampy.runtime.openlambda._transport import StreamTransport

    server = HeldServer(hold=0.05)
    secret = os.environ["LAMPY_SECRET"].encode()
    endpoint = f"http://127.0.0.1:{server.port}/run/lampy"
    executor = OpenLambdaExecutor(
        url="http://10.1.2.3:5000",  # not this machine's: its cap is `concurrency`, not cores
        transport=StreamTransport(endpoint, 32, secret),
        batch=1,
        progress="off",
    )
    executor.slots = 32  # as if grown: the worker kept up
    x = np.arange(640.0)
    job = make_job(double, x, 320)
    state = JobState(job, dumps((double, job.args, {})), True, Accounting(job.id, 320), None)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, _threads())

    before = _threads()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcomes = executor.run_state(state)
    finally:
        done.set()
        sampler.join()
        executor.close()
        server.stop()
    got = np.concatenate([outcomes[c].value for c in range(320)])
    np.testing.assert_array_equal(got, x * 2)
    assert server.most == 32
    # the executor's event loop and this test's sampler: nothing per call
    assert peak <= before + 2, (before, peak)
