"""How chunks="auto" decides on a pool that may be cold, starting or warm: unit tests of the
runner's logic with a model executor and fixed probe timings (no clock in the assertions)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import lampy
from lampy._errors import RetriesExhausted
from lampy.regions import _runner as runner_module
from lampy.runtime import executors
from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._worker_side import Outcome
from lampy.runtime.executors._inline import InlineExecutor

ROWS = 100_000
PROBE_CALLS = 3  # a probe runs the one-row call twice (the second is timed warm), then its rows
events: list[str] = []


class ModelPool(InlineExecutor):
    """A pool as the planner sees it: cold until `warm` is set; records what is asked of it."""

    name = "modelpool"
    needs_pickle = False
    warm = False
    startup_s = 0.4
    background = False  # as the local pool: starts in the background, never waited for
    maps = False  # as the local pool: arrays in lampy's shared memory are not moved
    blocks = False  # as the local pool: runs an elemwise chunk in blocks of rows
    block_rows: list[int | None] = []  # each job's, in order
    seconds = {True: 0.0, False: 0.0}  # what a job takes with blocks and without
    per_chunk = 1e-4  # its price per chunk (the local pool learns its own from its jobs)

    def costs(self) -> Costs:
        return Costs(
            workers=2,
            startup_s=0.0 if self.warm else self.startup_s,
            seconds_per_byte=1e-10,
            seconds_per_chunk=self.per_chunk,
            starts_in_background=self.background,
            maps_shared_memory=self.maps,
            runs_blocks=self.blocks,
        )

    def is_warm(self) -> bool:
        return self.warm

    def start(self) -> None:
        events.append("start")

    def run(self, job: Job) -> dict[int, Outcome]:
        events.append("fan out")
        self.block_rows.append(job.block_rows)
        time.sleep(self.seconds[job.block_rows is not None])
        return super().run(job)


@pytest.fixture
def pool() -> Iterator[type[ModelPool]]:
    events.clear()
    ModelPool.warm, ModelPool.startup_s, ModelPool.background = False, 0.4, False
    ModelPool.maps, ModelPool.blocks, ModelPool.block_rows = False, False, []
    ModelPool.seconds, ModelPool.per_chunk = {True: 0.0, False: 0.0}, 1e-4
    executors.register("modelpool", ModelPool)
    try:
        yield ModelPool
    finally:
        executors.unregister("modelpool")


def timings(monkeypatch: pytest.MonkeyPatch, row_seconds: float) -> list[int]:
    """Probes take `row_seconds` per row (and nothing per call); returns the probed chunks."""
    probed: list[int] = []
    original = runner_module._timed

    def timed(job: Job, chunk: int) -> tuple[float, Outcome]:
        probed.append(chunk)
        _, outcome = original(job, chunk)
        start, stop = job.chunks[chunk]
        return row_seconds * (stop - start), outcome

    monkeypatch.setattr(runner_module, "_timed", timed)
    return probed


def region() -> Any:
    @lampy.elemwise(executor="modelpool")
    def double(x: np.ndarray) -> np.ndarray:
        events.append(f"call {len(x)} rows")
        return x * 2

    return double


X = np.arange(float(ROWS))


def test_heavy_work_on_a_cold_pool_runs_here_then_starts_the_pool(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 s here, about 0.5 s fanned out warm, 0.9 s with a 0.4 s start-up: not clearly faster
    timings(monkeypatch, 1e-5)
    f = region()
    np.testing.assert_array_equal(f(X), X * 2)
    calls = [e for e in events if not e.startswith("call") or e.endswith(f"{ROWS} rows")]
    assert calls == [f"call {ROWS} rows", "start"]  # the start-up never slows the call down


def test_light_work_never_starts_the_pool(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    timings(monkeypatch, 1e-8)  # 1 ms in all: the pool could never repay its start-up
    f = region()
    f(X)
    assert "start" not in events and "fan out" not in events


def test_a_cold_pool_is_waited_for_when_that_clearly_beats_running_here(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    timings(monkeypatch, 1e-4)  # 10 s here, about 5 s fanned out: worth a 0.4 s start-up
    f = region()
    np.testing.assert_array_equal(f(X), X * 2)
    assert "fan out" in events and "start" not in events


def test_a_cold_plan_holds_until_the_pool_is_warm(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    probed = timings(monkeypatch, 1e-5)
    f = region()
    f(X)
    assert len(probed) == PROBE_CALLS
    f(X)
    assert len(probed) == PROBE_CALLS, "a second cold call plans from the kept cold plan"
    assert events.count("start") == 2  # asked again (starting twice is starting once)
    pool.warm = True
    events.clear()
    f(X)
    assert len(probed) == 2 * PROBE_CALLS and "fan out" in events, "warm: planned again"
    events.clear()
    f(X)
    assert len(probed) == 2 * PROBE_CALLS and "fan out" in events, "the warm plan is kept"


def test_a_starting_pool_prices_what_is_left_of_its_start_up(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    timings(monkeypatch, 1e-5)
    pool.startup_s = 0.05  # almost up: 0.55 s fanned out against 1 s here
    f = region()
    f(X)
    assert "fan out" in events


def test_a_pool_starting_in_the_background_is_never_waited_for(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold: the call runs here, timed whole (no probe), and the pool starts after it when a
    warm pool would have saved more than its start-up; warm: the pool is used."""
    pool.background = True
    probed = timings(monkeypatch, 1e-4)

    @lampy.elemwise(executor="modelpool")
    def slow(x: np.ndarray) -> np.ndarray:
        events.append(f"call {len(x)} rows")
        time.sleep(0.03 if len(x) < ROWS else 1.2)  # 1.2 s here: about 0.6 s fanned out
        return x * 2

    np.testing.assert_array_equal(slow(X), X * 2)
    assert events == [f"call {ROWS} rows", "start"] and not probed
    events.clear()
    np.testing.assert_array_equal(region()(X), X * 2)  # quick: not worth a start-up
    assert events == [f"call {ROWS} rows"] and not probed
    pool.warm = True
    events.clear()
    slow(X)
    assert "fan out" in events and probed  # warm: probed, and the pool is used


def test_cold_calls_that_each_save_less_than_the_start_up_start_the_pool_together(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call would save about 0.11 s on a warm pool, a quarter of its 0.4 s start-up: the
    savings add up, and the pool starts after the call that brings them past it (the fourth;
    the third when sleeping overshoots on a busy machine)."""
    pool.background = True
    timings(monkeypatch, 1e-4)

    @lampy.elemwise(executor="modelpool")
    def middling(x: np.ndarray) -> np.ndarray:
        events.append("call")
        time.sleep(0.22)  # about 0.11 s fanned out: 0.11 s saved
        return x * 2

    for _ in range(2):
        middling(X)
    assert "start" not in events  # 0.22 s saved so far
    for _ in range(3):
        middling(X)
    assert events.count("start") == 1 and events.index("start") in (3, 4)


def whole_calls_taking(pauses: list[float]) -> Any:
    """A region whose whole calls (all the rows at once) take at least the next of `pauses`
    seconds, as a call whose temporaries are fresh memory can, while its chunks do not."""

    @lampy.elemwise(executor="modelpool")
    def double(x: np.ndarray) -> np.ndarray:
        if len(x) == ROWS:
            events.append("whole here")
            time.sleep(pauses.pop(0))
        return x * 2

    return double


def test_whole_calls_slower_than_the_probe_foretold_send_later_calls_out(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool.warm = True
    probed = timings(monkeypatch, 1e-8)  # 1 ms here by the probe, about 1.5 ms fanned out
    f = whole_calls_taking([0.02, 0.02])
    for _ in range(2):
        np.testing.assert_array_equal(f(X), X * 2)
    assert events == ["whole here", "whole here"]
    np.testing.assert_array_equal(f(X), X * 2)
    assert events[2:] == ["fan out"] and len(probed) == PROBE_CALLS, "planned again without a probe"
    assert "the whole call here" in f.explain(X).reason


def test_a_reduction_keeps_its_plan_whatever_its_whole_calls_take(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its float answer depends on its chunks: repeated calls give the same bits."""
    pool.warm = True
    timings(monkeypatch, 1e-8)
    pauses = [0.02] * 3

    @lampy.sum(executor="modelpool")
    def total(x: np.ndarray) -> float:
        if len(x) == ROWS:
            time.sleep(pauses.pop(0))
        return float(x.sum())

    assert len({total(X) for _ in range(3)}) == 1 and not pauses
    assert "fan out" not in events


def test_a_plan_made_at_a_higher_price_per_chunk_is_made_again(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan made while chunks cost a lot (a busy moment) does not keep later calls here once
    they cost little again; a fall that decides nothing else costs no new probe; a plan that
    fans out is kept when the price rises (its own jobs keep the price learnt: calls kept here
    would stop learning it, and stay here for good)."""
    pool.warm = True
    probed = timings(monkeypatch, 1e-7)  # 10 ms here by the probe
    f = region()
    runs = []
    # 0.04: within PRICE_DRIFT of 0.05; 0.02: beyond it, and still too dear to fan out
    for price in (0.05, 0.04, 0.02, 1e-4, 0.05):
        pool.per_chunk, before = price, len(events)
        np.testing.assert_array_equal(f(X), X * 2)
        runs.append(("fan out" in events[before:], len(probed) // PROBE_CALLS))
    # fanned out (from the low price on), and how many probes were made by then
    assert runs == [(False, 1), (False, 1), (False, 1), (True, 2), (True, 2)]


def test_a_reductions_plan_holds_whatever_the_price_per_chunk(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool.warm = True
    probed = timings(monkeypatch, 1e-7)

    @lampy.sum(executor="modelpool")
    def total(x: np.ndarray) -> float:
        return float(x.sum())

    pool.per_chunk = 0.05
    first = total(X)
    pool.per_chunk = 1e-4
    assert total(X) == first and "fan out" not in events and len(probed) == PROBE_CALLS


def test_one_slow_whole_call_among_quick_ones_keeps_the_calls_here(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool.warm = True
    timings(monkeypatch, 1e-8)
    f = whole_calls_taking([0.02, 0.0, 0.02, 0.02])
    for _ in range(3):
        f(X)
    assert "fan out" not in events, "the shorter of the last two whole calls counts"
    f(X)
    f(X)
    assert events[-1] == "fan out"


@pytest.mark.parametrize("maps", [True, False])
@pytest.mark.parametrize("where", ["shared memory", "private"])
def test_a_shared_input_costs_nothing_to_send_where_the_pool_maps_it(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch, maps: bool, where: str
) -> None:
    """A whole array already in lampy's shared memory reaches the workers of a pool that maps
    shared memory (the local pool) by descriptor: the planner prices no bytes for it there.
    A private copy, or an executor that moves such arrays, still pays for every worker's."""
    pool.warm, pool.maps = True, maps
    timings(monkeypatch, 1e-7)  # 10 ms here, about 6 ms fanned out before the table's bytes
    table = np.ones(4 << 20)  # 32 MiB to each of 2 workers at 1e-10 s a byte: 6.7 ms more
    if where == "shared memory":
        table = lampy.asshared(table)

    @lampy.elemwise(executor="modelpool", shared=("table",))
    def scaled(x: np.ndarray, table: np.ndarray) -> np.ndarray:
        return x * table[0]

    np.testing.assert_array_equal(scaled(X, table), X)
    assert ("fan out" in events) == (maps and where == "shared memory")


def test_a_planned_call_runs_elsewhere_and_is_answered_as_run_would(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `lampy.submit` does with the runner: prepare, plan, run the job elsewhere, answer.
    An auto plan reuses the probe's rows as chunk 0; an explicit count leaves every chunk to
    the job."""
    pool.warm = True
    timings(monkeypatch, 1e-4)
    runner = region().runner
    call = runner.prepare((X,), {})
    assert (call.name, call.chunks, call.binding.rows) == ("modelpool", None, ROWS)
    planned = runner.plan(call)
    assert planned.plan.fan_out and list(planned.done) == [0] and planned.job.first == 1
    assert planned.job.chunks == planned.plan.chunks[1:]
    # the probe took 1e-4 s a row; moving 16 bytes a row costs next to nothing
    assert planned.job.pace == planned.plan.pace == pytest.approx(1e-4, rel=1e-3)
    outcomes = call.executor.run(planned.job)
    done = planned.done | {chunk + 1: outcome for chunk, outcome in outcomes.items()}
    np.testing.assert_array_equal(runner.answer(done, planned.plan, remote=False), X * 2)
    counted = runner.plan(runner.prepare((X,), {}, chunks=3))
    assert counted.done == {} and counted.job.first == 0 and len(counted.job.chunks) == 3
    assert counted.job.pace is None  # no probe, no pace


def test_answer_raises_a_chunks_user_error_and_a_lost_chunk(pool: type[ModelPool]) -> None:
    runner = region().runner
    planned = runner.plan(runner.prepare((X,), {}, chunks=2))
    halves = [Outcome(value=X[:50_000] * 2), Outcome(value=X[50_000:] * 2)]
    cursed = {0: halves[0], 1: Outcome(error=ArithmeticError("cursed"))}
    with pytest.raises(ArithmeticError, match="cursed") as info:
        runner.answer(cursed, planned.plan, remote=False)
    assert "raised in lampy chunk 1 of 2 (rows 50000:100000)" in info.value.__notes__
    lost = RetriesExhausted("chunk 0 was lost", chunk=0, rows=(0, 50_000), causes=("502",))
    with pytest.raises(RetriesExhausted, match="chunk 0 was lost"):
        runner.answer({0: Outcome(error=lost), 1: halves[1]}, planned.plan, remote=True)
    both = runner.answer(dict(enumerate(halves)), planned.plan, remote=True)
    np.testing.assert_array_equal(both, X * 2)


@pytest.mark.parametrize(
    ("blocked", "unblocked", "kept"), [(0.02, 0.05, True), (0.05, 0.02, False)]
)
def test_blocks_are_tried_against_whole_chunks_and_the_quicker_way_is_kept(
    pool: type[ModelPool],
    monkeypatch: pytest.MonkeyPatch,
    blocked: float,
    unblocked: float,
    kept: bool,
) -> None:
    pool.warm, pool.blocks, pool.seconds = True, True, {True: blocked, False: unblocked}
    timings(monkeypatch, 1e-4)  # 10 s here, and each call's fixed cost 1e-4 s: blocks may pay
    f = region()
    for _ in range(2 * runner_module.BLOCK_TRIALS + 2):
        np.testing.assert_array_equal(f(X), X * 2)
    size = pool.block_rows[0]
    assert size is not None, "the plan's chunks may run in blocks"
    assert pool.block_rows[:4] == [size, None, size, None], "each way in turn"
    assert pool.block_rows[4:] == [size if kept else None] * 2, "then the quicker way"
    assert ("run in blocks" in str(f.explain(X))) is kept


def test_a_reduction_is_never_run_in_blocks(
    pool: type[ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool.warm, pool.blocks = True, True
    timings(monkeypatch, 1e-4)
    total = lampy.sum(executor="modelpool")(lambda x: x.sum())
    for _ in range(3):
        assert total(X) == X.sum()
    assert pool.block_rows == [None] * 3
