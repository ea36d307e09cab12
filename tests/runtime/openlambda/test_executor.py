"""The executor against a scripted flaky transport that calls the real handler in-process.

Failures are planned per chunk and per attempt, and attempt counts are asserted exactly: platform
failures are retried, user exceptions and configuration errors never are.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import lampy
from lampy._errors import ExecutionError, RetriesExhausted
from lampy.regions import _runner as runner_module
from lampy.runtime import _scheduler as scheduler_module
from lampy.runtime import executors
from lampy.runtime._job import Job, Part, Whole
from lampy.runtime._plan import split_rows
from lampy.runtime._scheduler import ChunkScheduler
from lampy.runtime._secret import Freshness
from lampy.runtime._worker_side import Outcome, Templates
from lampy.runtime.openlambda import _executor as module
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda import _handler as handler
from lampy.runtime.openlambda import _loop as loop_module
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.runtime.openlambda._transport import Reply, Transport
from lampy.testing import InProcessTransport, free_port
from tests.conftest import SECRET

from .test_frames import Tripwire, unpickled

NOT_FOUND = 'lambda "lampy" not found in blob store (/tmp/registry)'


class Scripted(InProcessTransport):
    """Runs the real handler; `plan[(chunk, attempt)]` is a status, an exception, or a delay."""

    def __init__(self, plan: dict[tuple[int, int], Any] | None = None) -> None:
        super().__init__()
        self.plan = plan or {}
        self.attempts: Counter[int] = Counter()
        self.templates = 0
        self.calls = 0

    async def post(self, outgoing: frames.Outgoing, timeout: float) -> Reply:
        body = outgoing.join()
        peek = Freshness()  # a look at the task: the handler must still take it as new
        frame = frames.decode(bytearray(body), SECRET.encode(), freshness=peek)
        if frame.kind == frames.TASK:
            chunk = frame.value[1][0]
            self.calls += 1
            self.attempts[chunk] += 1
            self.templates += frame.value[2] is not None
            action = self.plan.get((chunk, self.attempts[chunk]))
            if isinstance(action, int):
                text = NOT_FOUND if action == 500 else "lambda function queue is full"
                return Reply(action, text.encode())
            if isinstance(action, float):
                await asyncio.sleep(action)
            elif action == "forget":
                handler._templates = Templates()
            elif action is not None:
                raise action
        return await super().post(outgoing, timeout)


def make_job(function: Any, x: np.ndarray, chunks: int, *whole: np.ndarray) -> Job:
    args = (Part(0), *(Whole(i) for i in range(len(whole))))
    return Job(function, args, {}, (x,), whole, split_rows(len(x), chunks))


@pytest.fixture
def run() -> Iterator[Any]:
    made: list[OpenLambdaExecutor] = []

    def run(transport: Transport, job: Job, **options: Any) -> dict[int, Any]:
        made.append(OpenLambdaExecutor(transport=transport, backoff=0.001, **options))
        return made[-1].run(job)

    yield run
    for executor in made:
        executor.close()


def double(x: np.ndarray) -> np.ndarray:
    return x * 2


def test_platform_failures_are_retried_exact_counts(run: Any) -> None:
    plan = {
        (0, 1): ConnectionRefusedError("connection refused"),
        (1, 1): 429,
        (1, 2): 502,
        (2, 1): asyncio.TimeoutError(),
        (3, 1): ConnectionResetError("reset by peer"),
        (3, 2): 503,
        (3, 3): 504,
    }
    transport = Scripted(plan)
    x = np.arange(100.0)
    outcomes = run(transport, make_job(double, x, 5), attempts=4)
    assert transport.attempts == {0: 2, 1: 3, 2: 2, 3: 4, 4: 1}
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(5)]), x * 2)


def test_user_exceptions_are_not_retried(run: Any) -> None:
    def picky(x: np.ndarray) -> np.ndarray:
        if x[0] == 50:
            raise ArithmeticError("row 50 is cursed")
        return x

    transport = Scripted()
    outcomes = run(transport, make_job(picky, np.arange(100.0), 4))
    errors = [o for o in outcomes.values() if o.error is not None]
    assert len(errors) == 1 and isinstance(errors[0].error, ArithmeticError)
    assert "row 50 is cursed" in errors[0].traceback and "picky" in errors[0].traceback
    assert transport.attempts[2] == 1 and max(transport.attempts.values()) == 1


def test_retries_exhausted_names_chunk_rows_and_every_cause(run: Any) -> None:
    plan = {(1, 1): 502, (1, 2): ConnectionResetError("reset"), (1, 3): 429}
    transport = Scripted(plan)
    outcomes = run(transport, make_job(double, np.arange(10.0), 2), attempts=3)
    error = outcomes[1].error
    assert isinstance(error, RetriesExhausted) and (error.chunk, error.rows) == (1, (5, 10))
    text = str(error)
    assert "chunk 1 of 2 (rows 5:10) was lost: all 3 attempts" in text
    assert "attempt 1: HTTP 502" in text and "attempt 2: ConnectionResetError: reset" in text
    assert "attempt 3: HTTP 429: lambda function queue is full" in text
    assert "attempts= (now 3)" in text and len(error.causes) == 3
    assert outcomes[1].traceback == "lambda function queue is full"  # the platform's last words
    assert transport.attempts[1] == 3


@settings(max_examples=30)
@given(
    count=st.integers(1, 12),
    batch=st.integers(1, 4),
    first=st.integers(0, 3),
    attempts=st.integers(1, 3),
    doomed=st.sets(st.integers(0, 11), max_size=4),
)
def test_every_give_up_names_its_chunk(
    count: int, batch: int, first: int, attempts: int, doomed: set[int]
) -> None:
    """Chunks whose calls fail every attempt each get their own error: chunk, rows, causes.
    The others of a failed batch run again one per call (their own calls answer), unless the
    batch's call was their only attempt."""
    x = np.arange(count * 3.0)
    chunks = split_rows(len(x), count)
    job = Job(double, (Part(0),), {}, (x,), (), chunks, keep_going=True, first=first)
    calls = [tuple(range(i, min(i + batch, count))) for i in range(0, count, batch)]
    doomed_calls = [call for call in calls if call[0] in doomed]  # plans key on a call's first
    plan = {(call[0], a): 502 for call in doomed_calls for a in range(1, attempts + 1)}
    executor = OpenLambdaExecutor(
        transport=Scripted(plan), backoff=0.0, attempts=attempts, batch=batch
    )
    try:
        outcomes = executor.run(job)
    finally:
        executor.close()
    lost = {call[0] for call in doomed_calls}
    if attempts == 1:
        lost |= {chunk for call in doomed_calls for chunk in call}
    assert sorted(outcomes) == list(range(count))  # keep_going: every other chunk still ran
    for chunk, outcome in outcomes.items():
        if chunk not in lost:
            np.testing.assert_array_equal(outcome.value, x[slice(*chunks[chunk])] * 2)
            continue
        error = outcome.error
        assert isinstance(error, RetriesExhausted)
        assert (error.chunk, error.rows) == (first + chunk, chunks[chunk])
        assert str(error).startswith(f"{job.label(chunk)} was lost: all {attempts} attempts")
        assert len(error.causes) == attempts and all("HTTP 502" in c for c in error.causes)
    assert executor.accounts[-1].lost == lost


def test_lambda_not_found_is_not_retried_and_says_deploy(run: Any) -> None:
    transport = Scripted({(0, 1): 500})
    with pytest.raises(ExecutionError, match="lampy deploy --url .* --name lampy"):
        run(transport, make_job(double, np.arange(10.0), 1))
    assert transport.attempts[0] == 1


def test_straggler_gets_a_backup_and_counts_once(run: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(scheduler_module, "STRAGGLER_MIN_S", 0.1)
    transport = Scripted({(5, 1): 30.0})
    start = time.monotonic()
    x = np.arange(80.0)
    executor = OpenLambdaExecutor(transport=transport, backoff=0.001)
    try:
        outcomes = executor.run(make_job(double, x, 8))
    finally:
        executor.close()
    assert time.monotonic() - start < 5
    assert executor.backups == 1 and transport.attempts[5] == 2
    assert sorted(outcomes) == list(range(8))
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(8)]), x * 2)


@pytest.mark.parametrize("chunks", [2, 3])
def test_the_last_chunk_of_a_small_job_gets_a_backup(chunks: int, monkeypatch: Any) -> None:
    """The share-of-chunks-done rule alone would never back up the last of 2 or 3 chunks, so
    a call the platform drops (OpenLambda loses one queued behind a failed round trip) would
    wait for the call's timeout."""
    monkeypatch.setattr(scheduler_module, "STRAGGLER_MIN_S", 0.1)
    last = chunks - 1
    transport = Scripted({(last, 1): 30.0})  # never answered before the 30 s timeout
    x = np.arange(10.0 * chunks)
    executor = OpenLambdaExecutor(transport=transport, backoff=0.001, timeout=30.0)
    start = time.monotonic()
    try:
        outcomes = executor.run(make_job(double, x, chunks))
    finally:
        executor.close()
    assert time.monotonic() - start < 5
    assert executor.backups == 1 and transport.attempts[last] == 2
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(chunks)]), x * 2)
    assert set(executor.accounts[-1].accepted.values()) == {1}


def triple(a: np.ndarray) -> np.ndarray:
    return a * 3


def test_a_lone_chunk_never_answered_is_judged_by_the_last_jobs_pace(monkeypatch: Any) -> None:
    """A 1-chunk job has no median of its own to call its chunk late: the pace of the same
    function's last job on this executor judges it, so a call the platform drops costs
    seconds, not the call's timeout. A job of another function has no pace to go by."""
    monkeypatch.setattr(scheduler_module, "STRAGGLER_PACE_MIN_S", 0.2)
    transport = Scripted({(0, 2): 30.0, (0, 4): 1.0})  # job 2's call is never answered
    x = np.arange(10.0)
    executor = OpenLambdaExecutor(transport=transport, backoff=0.001, timeout=30.0)
    try:
        executor.run(make_job(double, x, 1))  # the pace of `double` on 10 rows is known now
        start = time.monotonic()
        outcomes = executor.run(make_job(double, x, 1))
        took = time.monotonic() - start
        assert took < 5 and executor.backups == 1 and transport.attempts[0] == 3
        np.testing.assert_array_equal(outcomes[0].value, x * 2)
        slow = executor.run(make_job(triple, x, 1))  # 1 s, no earlier job to judge it by
    finally:
        executor.close()
    assert executor.backups == 1 and transport.attempts[0] == 4
    np.testing.assert_array_equal(slow[0].value, x * 3)


def test_a_first_jobs_lone_chunk_is_judged_by_its_callers_pace(monkeypatch: Any) -> None:
    """A first job of a function has no earlier pace here: the pace its caller expects
    (`Job.pace`, from an auto plan's probe) judges its dropped call instead. Once this executor
    has timed the function, its measured pace wins: an estimate of an hour a row holds no
    backup back. A job with neither waits for its answer (1 s here, no backup)."""
    monkeypatch.setattr(scheduler_module, "STRAGGLER_PACE_MIN_S", 0.2)
    transport = Scripted({(0, 1): 30.0, (0, 3): 30.0, (0, 5): 1.0})  # jobs 1, 2 never answered
    x = np.arange(10.0)
    executor = OpenLambdaExecutor(transport=transport, backoff=0.001, timeout=30.0)
    try:
        start = time.monotonic()
        first = executor.run(replace(make_job(double, x, 1), pace=1e-3))
        assert time.monotonic() - start < 5 and executor.backups == 1
        assert transport.attempts[0] == 2
        np.testing.assert_array_equal(first[0].value, x * 2)
        start = time.monotonic()
        second = executor.run(replace(make_job(double, x, 1), pace=3600.0))
        assert time.monotonic() - start < 5 and executor.backups == 2
        assert transport.attempts[0] == 4
        np.testing.assert_array_equal(second[0].value, x * 2)
        slow = executor.run(make_job(triple, x, 1))  # 1 s: no pace of `triple`, no estimate
    finally:
        executor.close()
    assert executor.backups == 2 and transport.attempts[0] == 5
    np.testing.assert_array_equal(slow[0].value, x * 3)


def probe_timed(monkeypatch: Any, row_seconds: float) -> None:
    """Auto probes take `row_seconds` a row, whatever the function really takes."""
    original = runner_module._timed

    def timed(job: Job, chunk: int) -> tuple[float, Outcome]:
        _, outcome = original(job, chunk)
        start, stop = job.chunks[chunk]
        return row_seconds * (stop - start), outcome

    monkeypatch.setattr(runner_module, "_timed", timed)


@pytest.mark.parametrize("chunks", ["auto", 4])
def test_a_first_calls_dropped_calls_wait_for_timeout_only_without_a_probe(
    chunks: str | int, monkeypatch: Any
) -> None:
    """Every chunk's first call is dropped (never answered within the 30 s timeout) or, for
    chunks=4, delayed 1 s. chunks="auto" times a probe here (5 us a row: 0.5 s in all, worth
    fanning out), whose pace gets each call a backup after 0.2 s (the pace floor here); with
    chunks=4 there is no probe and no earlier job: each call is waited for, with no backup."""
    monkeypatch.setattr(scheduler_module, "STRAGGLER_PACE_MIN_S", 0.2)
    monkeypatch.setattr(module.os, "cpu_count", lambda: 2)
    probe_timed(monkeypatch, 5e-6)
    delay = 30.0 if chunks == "auto" else 1.0
    transport = Scripted({(chunk, 1): delay for chunk in range(64)})
    executor = OpenLambdaExecutor(transport=transport, backoff=0.001, timeout=30.0)
    executor.prewarm(1)  # warm: the plan pays no start-up
    lampy.register_executor("scripted", OpenLambdaExecutor)
    executors._instances[("scripted", ())] = executor
    x = np.arange(100_000.0)
    try:
        with lampy.using(executor="scripted", chunks=chunks):
            start = time.monotonic()
            np.testing.assert_array_equal(lampy.elemwise(double)(x), x * 2)
            took = time.monotonic() - start
    finally:
        executors.unregister("scripted")
    sent = executor.accounts[-1].chunks
    if chunks == "auto":
        assert took < 5 and executor.backups == sent > 1  # a probe, then the chunks left
        assert transport.attempts == dict.fromkeys(range(sent), 2)
    else:
        assert took >= 1 and executor.backups == 0 and sent == 4
        assert transport.attempts == dict.fromkeys(range(4), 1)


def test_a_chunk_is_judged_by_pace_in_proportion_to_its_rows() -> None:
    """Before a job has its own median, a chunk of many rows may run longer than one of few."""
    job = Job(double, (Part(0),), {}, (np.zeros(1000),), (), ((0, 10), (10, 1000)))
    scheduler = ChunkScheduler(job, pace=0.01)  # 0.1 s for 10 rows, 9.9 s for 990
    for chunk in (0, 1):
        assert scheduler.next() == chunk
        scheduler.start(chunk, now=0.0)
    least = scheduler_module.STRAGGLER_PACE_MIN_S
    assert scheduler.stragglers(now=least) == []
    assert scheduler.stragglers(now=0.1 + least + 0.01) == [0]
    assert scheduler.stragglers(now=4 * 9.9 - 0.01) == []
    assert scheduler.stragglers(now=4 * 9.9 + 0.01) == [1]
    scheduler.finished(0, Outcome(value=np.zeros(10)), now=0.5)
    assert scheduler.measured_pace() == pytest.approx(0.05)


class Unanswered(InProcessTransport):
    """A platform that takes every call and never answers one (a dropped call, a hung worker)."""

    async def post(self, outgoing: frames.Outgoing, timeout: float) -> Reply:
        await asyncio.sleep(timeout)
        raise asyncio.TimeoutError


def test_prewarm_keeps_to_its_timeout_when_no_ping_is_answered() -> None:
    """Its pings wait no longer than prewarm's own timeout, not the calls' (60 s here)."""
    executor = OpenLambdaExecutor(transport=Unanswered(), timeout=60.0)
    start = time.monotonic()
    try:
        with pytest.raises(ExecutionError, match="no sandbox answered a pre-warm call"):
            executor.prewarm(2, timeout=0.5)
    finally:
        executor.close()
    assert time.monotonic() - start < 3


def test_a_batched_straggler_gets_one_backup_call(monkeypatch: Any) -> None:
    """A slow call carrying several chunks is copied once, not once per chunk: each of its
    chunks is late at the same moment, and copies beyond the first only load the platform."""
    monkeypatch.setattr(scheduler_module, "STRAGGLER_MIN_S", 0.1)
    transport = Scripted({(4, 1): 30.0})  # the call of chunks 4-7 hangs on its first attempt
    x = np.arange(160.0)
    executor = OpenLambdaExecutor(transport=transport, backoff=0.001, batch=4)
    try:
        outcomes = executor.run(make_job(double, x, 16))
    finally:
        executor.close()
    assert executor.backups == 1 and transport.attempts[4] == 2
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(16)]), x * 2)
    assert set(executor.accounts[-1].accepted.values()) == {1}


class KilledBy(Scripted):
    """Every call that carries chunk 5 fails as a killed sandbox does (502)."""

    async def post(self, outgoing: frames.Outgoing, timeout: float) -> Reply:
        frame = frames.decode(bytearray(outgoing.join()), SECRET.encode(), freshness=Freshness())
        if 5 in frame.value[1]:
            return Reply(502, b"RoundTrip failed: EOF")
        return await InProcessTransport.post(self, outgoing, timeout)


def test_a_chunk_that_kills_its_call_loses_none_of_its_batch_mates() -> None:
    """A batch the platform lost runs again one chunk per call: only the chunk that kills
    its sandbox every time is lost, not the chunks that shared its call."""
    executor = OpenLambdaExecutor(transport=KilledBy(), backoff=0.001, attempts=2, batch=4)
    x = np.arange(160.0)
    job = make_job(double, x, 16)
    job = Job(job.function, job.args, job.kwargs, job.split, job.whole, job.chunks, keep_going=True)
    try:
        outcomes = executor.run(job)
    finally:
        executor.close()
    assert [c for c in range(16) if outcomes[c].error is not None] == [5]
    assert isinstance(outcomes[5].error, RetriesExhausted)
    kept = [c for c in range(16) if c != 5]
    np.testing.assert_array_equal(
        np.concatenate([outcomes[c].value for c in kept]), np.delete(x, range(50, 60)) * 2
    )
    assert executor.accounts[-1].attempts[4] == 2  # its batch's failed call, then alone


class Twins(Scripted):
    """Chunk 5's first copy fails slowly on every attempt; its backup (2nd call) answers last."""

    async def post(self, outgoing: frames.Outgoing, timeout: float) -> Reply:
        body = outgoing.join()
        chunks = frames.decode(bytearray(body), SECRET.encode(), freshness=Freshness()).value[1]
        if chunks == (5,):
            self.attempts[5] += 1
            backup = self.attempts[5] == 2
            await asyncio.sleep(0.6 if backup else 0.2)
            if not backup:
                return Reply(502, b"RoundTrip failed: EOF")
        return await InProcessTransport.post(self, outgoing, timeout)


def test_a_copy_that_gives_up_waits_for_its_twin(monkeypatch: Any) -> None:
    monkeypatch.setattr(scheduler_module, "STRAGGLER_MIN_S", 0.05)
    executor = OpenLambdaExecutor(transport=Twins(), backoff=0.001, attempts=2)
    x = np.arange(80.0)
    try:
        outcomes = executor.run(make_job(double, x, 8))
    finally:
        executor.close()
    assert executor.backups == 1 and outcomes[5].error is None
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(8)]), x * 2)
    account = executor.accounts[-1]
    # the first copy failed once and was not run again: its twin was still in flight
    assert account.failures["http 502"] == 1 and account.attempts[5] == 2
    assert set(account.accepted.values()) == {1} and not account.lost


def test_template_travels_once_per_sandbox_and_after_a_miss(run: Any) -> None:
    big = np.ones(20_000)  # template + shared arrays above INLINE_BYTES: sent by key later

    def scaled(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x * w.sum()

    transport = Scripted({(6, 1): "forget"})  # a fresh sandbox sees chunk 6 first
    x = np.arange(16.0)
    outcomes = run(transport, make_job(scaled, x, 8, big), concurrency=2)
    assert transport.templates == 3  # the first wave of 2, then once after the miss
    assert transport.attempts[6] == 2
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(8)]), x * 20_000)


def test_many_small_chunks_are_batched_each_answered_once(run: Any) -> None:
    def halve(x: np.ndarray) -> np.ndarray:
        if x[0] == 5003:
            raise ValueError("chunk 5003")
        return x / 2

    transport = Scripted()
    x = np.arange(1000.0)
    outcomes = run(transport, make_job(halve, x, 1000), concurrency=2)
    assert transport.calls == 2 * module.CALLS_PER_SLOT  # 8 calls of 125 chunks
    assert sorted(outcomes) == list(range(1000))
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(1000)]), x / 2)
    # a user error ends its call's batch: later chunks of that call are not run
    outcomes = run(Scripted(), make_job(halve, np.arange(5000.0, 6000.0), 1000), concurrency=2)
    assert isinstance(outcomes[3].error, ValueError) and 4 not in outcomes
    one_each = Scripted()
    run(one_each, make_job(halve, x, 1000), concurrency=2, batch=1)
    assert one_each.calls == 1000


class Forged(Transport):
    """Answers every call with a frame signed under another secret (or cut short)."""

    def __init__(self, cut: int = 0) -> None:
        self.cut = cut

    async def post(self, outgoing: frames.Outgoing, timeout: float) -> Reply:
        secret = SECRET.encode() if self.cut else b"attacker"
        body = frames.encode(frames.RESULT, Tripwire(), secret).join()
        return Reply(200, body[: -self.cut] if self.cut else body)


@pytest.mark.parametrize("cut", [0, 5])
def test_bad_answers_are_refused_before_unpickling_and_retried(run: Any, cut: int) -> None:
    unpickled.clear()
    outcomes = run(Forged(cut), make_job(double, np.arange(4.0), 1), attempts=2)
    error = outcomes[0].error
    assert isinstance(error, RetriesExhausted) and len(error.causes) == 2
    assert ("truncated" if cut else "signature does not match") in str(error)
    assert unpickled == []


def test_oversized_answer_is_refused_unread(monkeypatch: Any) -> None:
    """Over real HTTP: a server whose answer claims a 1 TB frame; the client reads 20 bytes,
    and takes it for an answer damaged on the way (retried, then the chunk is given up)."""
    prefix = frames.encode(frames.RESULT, None, b"x").join()[:12]
    huge = prefix + (1 << 40).to_bytes(8, "little")

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=huge + bytes(1000))

    app = web.Application()
    app.router.add_route("*", "/run/lampy", answer)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    executor = OpenLambdaExecutor(url=f"http://127.0.0.1:{port}", backoff=0.001, attempts=2)
    try:
        error = executor.run(make_job(double, np.arange(4.0), 1))[0].error
        assert isinstance(error, RetriesExhausted) and "refused" in str(error)
    finally:
        executor.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_progress_line_for_long_jobs(
    run: Any, monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(loop_module, "PROGRESS_AFTER_S", 0.0)
    run(Scripted(), make_job(double, np.arange(8.0), 8), progress="on")
    assert "lampy: 8/8 chunks (100%)" in capsys.readouterr().err
    run(Scripted(), make_job(double, np.arange(8.0), 8), progress="off")
    assert capsys.readouterr().err == ""


class Sandboxes(InProcessTransport):
    """A worker of `sandboxes` that each serve one call at a time, `service` seconds a call
    (the real handler answers); records the most calls that were in flight at once."""

    def __init__(self, sandboxes: int, service: float) -> None:
        super().__init__()
        self.free = asyncio.Semaphore(sandboxes)
        self.service, self.in_flight, self.most = service, 0, 0

    async def post(self, outgoing: frames.Outgoing, timeout: float) -> Reply:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            async with self.free:
                await asyncio.sleep(self.service)
                return await super().post(outgoing, timeout)
        finally:
            self.in_flight -= 1


def test_calls_in_flight_grow_while_answers_come_back_unqueued(run: Any) -> None:
    """A worker that serves every call at once (many cores) gets `concurrency` calls in
    flight after a few round trips; one that serves 2 at a time stays far below (calls past
    its sandboxes queue, and on OpenLambda queued calls start sandboxes)."""
    x = np.arange(4096.0)
    remote = "http://10.1.2.3:5000"  # a worker elsewhere: its size is unknown here
    wide = Sandboxes(sandboxes=64, service=0.02)
    run(wide, make_job(double, x, 512), url=remote, concurrency=32, batch=1)
    assert wide.most == 32
    narrow = Sandboxes(sandboxes=2, service=0.02)
    outcomes = run(narrow, make_job(double, x, 512), url=remote, concurrency=32, batch=1)
    assert module.START_SLOTS <= narrow.most <= 9
    np.testing.assert_array_equal(np.concatenate([outcomes[c].value for c in range(512)]), x * 2)


def test_slots_start_low_and_carry_over_to_the_next_job() -> None:
    remote = "http://10.1.2.3:5000"
    executor = OpenLambdaExecutor(transport=Sandboxes(64, 0.0), url=remote, concurrency=32)
    try:
        assert executor.slots == module.START_SLOTS
        executor.run(make_job(double, np.arange(4096.0), 512))
        grown = executor.slots
        assert grown > module.START_SLOTS
        executor.run(make_job(double, np.arange(64.0), 8))
        assert executor.slots >= grown  # the next job starts where the last one got to
    finally:
        executor.close()
    small = OpenLambdaExecutor(concurrency=2)
    assert small.slots == 2  # never above `concurrency`
    small.close()


def test_a_worker_on_this_machine_gets_its_cores_worth(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker on loopback shares this machine's cores with the caller: `chunks="auto"`
    plans with as many workers as it has cores, and calls in flight stop at 2 per core (and
    `concurrency` at most); a remote one gets `concurrency` for both."""
    monkeypatch.setattr(module.os, "cpu_count", lambda: 6)
    for url, workers, most in [
        ("http://127.0.0.1:5000", 6, 12),
        ("http://localhost:5000", 6, 12),
        ("http://[::1]:5000", 6, 12),
        ("http://10.1.2.3:5000", 32, 32),
        ("http://ol.example:5000", 32, 32),
    ]:
        executor = OpenLambdaExecutor(url=url, concurrency=32)
        assert (executor.costs().workers, executor.most_slots) == (workers, most), url
        executor.close()
    small = OpenLambdaExecutor(url="http://127.0.0.1:5000", concurrency=4)
    assert (small.costs().workers, small.most_slots, small.slots) == (4, 4, 4)
    small.close()
    wide = Sandboxes(sandboxes=64, service=0.0)
    local = OpenLambdaExecutor(transport=wide, url="http://127.0.0.1:5000", concurrency=32)
    local.run(make_job(double, np.arange(4096.0), 512))
    local.close()
    # grown past its start while answers came back unqueued (how far depends on the machine's
    # load: 9 of 12 under a load average of 4), never past 2 per core
    assert module.START_SLOTS < local.slots <= 12 and wide.most <= 12
