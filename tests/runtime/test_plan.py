"""Planning is pure: the same inputs give the same plan, and auto fans out only when it pays."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lampy.runtime._plan import (
    BLOCK_FIXED_SHARE,
    BLOCKS_UP_TO,
    CHUNKS_PER_WORKER,
    TAPER_FIXED_SHARE,
    Costs,
    Probe,
    block_rows,
    plan,
    probe_rows,
    split_rows,
    tapered_rows,
)

TWO = Costs(workers=2, startup_s=0.0, seconds_per_byte=1 / 2.5e9, seconds_per_chunk=4e-4)


@given(rows=st.integers(0, 10_000), chunks=st.integers(1, 200), start=st.integers(0, 50))
def test_split_rows_covers_every_row_once(rows: int, chunks: int, start: int) -> None:
    ranges = split_rows(rows, chunks, start)
    assert ranges[0][0] == start and ranges[-1][1] == start + rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [stop - begin for begin, stop in ranges]
    assert len(ranges) == max(1, min(chunks, rows))
    assert max(sizes) - min(sizes) <= 1


@given(
    rows=st.integers(0, 100_000),
    workers=st.integers(1, 64),
    least=st.integers(1, 5_000),
    start=st.integers(0, 50),
)
def test_tapered_rows_cover_every_row_once_and_shrink(
    rows: int, workers: int, least: int, start: int
) -> None:
    ranges = tapered_rows(rows, workers, least, start)
    assert ranges[0][0] == start and ranges[-1][1] == start + rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [stop - begin for begin, stop in ranges]
    most = max(1, -(-rows // (workers * CHUNKS_PER_WORKER)))
    floor = min(least, most)
    assert all(floor <= size <= most for size in sizes[:-1])
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)  # shrinking toward the end ...
    assert sizes[-1] <= max(most, 1.5 * floor)  # the last takes a stub ...
    if len(sizes) > 1:
        assert sizes[-1] >= floor / 2  # ... or is no stub itself


def test_an_auto_plan_ends_on_short_chunks() -> None:
    probe = Probe(rows=19, seconds=19 * 5e-4, result_bytes=19 * 19_456, call_seconds=1e-4)
    p = plan(chunks=None, probe=probe, rowwise=True, **common(rows=2253, row_bytes=102_400))  # type: ignore[arg-type]
    sizes = [stop - start for start, stop in p.chunks]
    assert p.fan_out and sizes[0] == 19 and sum(sizes) == 2253
    assert sizes[1] == -(-(2253 - 19) // (2 * CHUNKS_PER_WORKER))
    fixed = probe.call_seconds + TWO.seconds_per_chunk * TWO.workers
    assert min(sizes[1:-1]) * probe.row_seconds * TAPER_FIXED_SHARE >= fixed * (1 - 1e-9)
    assert max(sizes[-3:]) < sizes[1] / 4  # the call ends on chunks a quarter the size or less


@given(rows=st.integers(2, 10**9), row_bytes=st.integers(1, 10**8))
def test_probe_is_small_and_leaves_rows_to_split(rows: int, row_bytes: int) -> None:
    k = probe_rows(rows, row_bytes)
    assert 1 <= k <= max(1, rows // 64)


def common(**kw: object) -> dict[str, object]:
    return {
        "executor": "local",
        "costs": TWO,
        "rows": 100_000,
        "row_bytes": 8_000,
        "shared_bytes": 0,
    } | kw


def test_memory_bound_work_stays_in_process() -> None:
    # a + b: ~0.1 ns per byte, cheaper than moving the bytes to workers
    probe = Probe(rows=256, seconds=256 * 8000 * 1e-10, result_bytes=256 * 8000)
    p = plan(chunks=None, probe=probe, **common())  # type: ignore[arg-type]
    assert not p.fan_out and "does not pay" in p.reason


def test_compute_bound_work_fans_out_and_reuses_the_probe() -> None:
    probe = Probe(rows=256, seconds=0.05, result_bytes=256 * 64)
    p = plan(chunks=None, probe=probe, **common())  # type: ignore[arg-type]
    least = math.ceil(2 * TWO.seconds_per_chunk / (TAPER_FIXED_SHARE * probe.row_seconds))
    assert p.fan_out and p.chunks[0] == (0, 256)
    assert p.chunks[1:] == tapered_rows(100_000 - 256, 2, least, start=256)
    assert "reused as chunk 0" in p.reason


def test_a_cold_pool_raises_the_bar() -> None:
    probe = Probe(rows=256, seconds=0.001, result_bytes=0)
    warm = plan(chunks=None, probe=probe, **common(row_bytes=80))  # type: ignore[arg-type]
    cold_costs = Costs(workers=2, startup_s=0.15)
    cold = plan(chunks=None, probe=probe, **common(row_bytes=80, costs=cold_costs))  # type: ignore[arg-type]
    assert warm.fan_out and not warm.warm_up
    assert not cold.fan_out and cold.warm_up
    assert "starting the workers in the background after this call" in cold.reason


def test_a_cold_pool_is_not_started_for_calls_that_would_not_repay_its_start_up() -> None:
    # warm, fan-out would save about 0.19 s of 0.39 s: less than a 0.35 s start-up
    probe = Probe(rows=256, seconds=0.001, result_bytes=0)
    cold_costs = Costs(workers=2, startup_s=0.35)
    cold = plan(chunks=None, probe=probe, **common(row_bytes=80, costs=cold_costs))  # type: ignore[arg-type]
    assert not cold.fan_out and not cold.warm_up
    assert "of it starting the workers" in cold.reason


def test_a_cold_pool_is_waited_for_only_when_that_clearly_beats_running_here() -> None:
    heavy = Probe(rows=256, seconds=0.01, result_bytes=0)  # 3.9 s serial
    cold_costs = Costs(workers=2, startup_s=0.4)
    p = plan(chunks=None, probe=heavy, **common(row_bytes=80, costs=cold_costs))  # type: ignore[arg-type]
    assert p.fan_out and not p.warm_up


def test_a_pool_that_starts_in_the_background_is_never_waited_for() -> None:
    heavy = Probe(rows=256, seconds=0.01, result_bytes=0)  # 3.9 s serial, ~2 s fanned out
    cold = Costs(workers=2, startup_s=0.4, starts_in_background=True)
    p = plan(chunks=None, probe=heavy, **common(row_bytes=80, costs=cold))  # type: ignore[arg-type]
    assert not p.fan_out and p.warm_up and "never waits" in p.reason
    warm = Costs(workers=2, startup_s=0.0, starts_in_background=True)
    assert plan(chunks=None, probe=heavy, **common(row_bytes=80, costs=warm)).fan_out  # type: ignore[arg-type]


def test_fixed_call_cost_is_not_mistaken_for_work() -> None:
    # 2 ms per call whatever the rows, as for a small k-means step: one probe row costs as much
    # as six, so the work hardly grows with rows and fan-out cannot pay
    probe = Probe(rows=6, seconds=0.002, result_bytes=80, call_seconds=0.0019)
    p = plan(chunks=None, probe=probe, **common(rows=400, row_bytes=40))  # type: ignore[arg-type]
    assert not p.fan_out and "does not pay" in p.reason
    naive = Probe(rows=6, seconds=0.002, result_bytes=80)
    assert plan(chunks=None, probe=naive, **common(rows=400, row_bytes=40)).fan_out  # type: ignore[arg-type]


def test_explicit_chunks_are_kept() -> None:
    p = plan(chunks=3, **common(rows=10))  # type: ignore[arg-type]
    assert p.fan_out and p.chunks == ((0, 4), (4, 7), (7, 10))
    assert "chunks=3 was asked for" in str(p)
    few = plan(chunks=30, **common(rows=10))  # type: ignore[arg-type]
    assert len(few.chunks) == 10 and "only 10 rows" in few.reason


def test_rows_the_workers_read_themselves_cost_the_caller_nothing_to_send() -> None:
    """A reference's rows (lampy.remote) are read by each worker, not pushed by the caller."""
    # The probe read 1000 rows of 8 kB in 8 ms (1 GB/s): splitting that reading between two
    # workers pays; pushing the same bytes through the caller first does not.
    probe = Probe(rows=1000, seconds=0.008, result_bytes=8000)
    pushed = plan(chunks=None, probe=probe, **common())  # type: ignore[arg-type]
    pulled = plan(chunks=None, probe=probe, sent_row_bytes=0, **common())  # type: ignore[arg-type]
    assert not pushed.fan_out and pulled.fan_out


def test_shared_bytes_a_pool_does_not_move_cost_nothing() -> None:
    """Arrays every chunk gets whole are priced per worker, unless the executor does not move
    them (`sent_shared_bytes`: the local pool maps those already in lampy's shared memory)."""
    probe = Probe(rows=1000, seconds=0.008, result_bytes=8000)
    small = common(row_bytes=8, shared_bytes=1 << 30)
    moved = plan(chunks=None, probe=probe, **small)  # type: ignore[arg-type]
    mapped = plan(chunks=None, probe=probe, sent_shared_bytes=0, **small)  # type: ignore[arg-type]
    assert not moved.fan_out and mapped.fan_out
    assert mapped.shared_bytes == 1 << 30  # the plan still says what the chunks share


def test_an_auto_plan_prices_a_chunks_pace_from_its_probe() -> None:
    """Seconds per row where the chunks run: the probe's time per row (its fixed cost shared
    among its rows) plus moving the rows that are sent and their results; none without a
    probe, as with an explicit chunk count."""
    probe = Probe(rows=256, seconds=0.05, result_bytes=256 * 64, call_seconds=0.01)
    p = plan(chunks=None, probe=probe, **common())  # type: ignore[arg-type]
    moved = (8_000 + 64) * TWO.seconds_per_byte
    assert p.fan_out and p.pace == pytest.approx(0.05 / 256 + moved)
    by_reference = plan(chunks=None, probe=probe, sent_row_bytes=0, **common())  # type: ignore[arg-type]
    assert by_reference.pace == pytest.approx(0.05 / 256 + 64 * TWO.seconds_per_byte)
    assert plan(chunks=4, **common()).pace is None  # type: ignore[arg-type]


BLOCKS = Costs(workers=2, seconds_per_byte=1 / 2.5e9, seconds_per_chunk=4e-4, runs_blocks=True)
CACHE_SIZED = Probe(rows=256, seconds=1e-2, result_bytes=256 * 512, call_seconds=2e-4)


def test_rowwise_chunks_run_in_blocks_of_the_probes_rows_where_the_pool_can() -> None:
    made = plan(**common(costs=BLOCKS, chunks=None, probe=CACHE_SIZED, rowwise=True))
    assert made.fan_out and made.block_rows == 256
    assert "run in blocks of 256 rows" in str(made)


@pytest.mark.parametrize(
    ("costs", "rowwise", "chunks"),
    [(TWO, True, None), (BLOCKS, False, None), (BLOCKS, True, 8)],
    ids=["the executor calls once per chunk", "a reduction", "chunks given"],
)
def test_no_blocks_unless_auto_plans_rowwise_work_for_a_pool_that_runs_them(
    costs: Costs, rowwise: bool, chunks: int | None
) -> None:
    made = plan(**common(costs=costs, chunks=chunks, probe=CACHE_SIZED, rowwise=rowwise))
    assert made.fan_out and made.block_rows is None


@given(
    rows=st.integers(1, 4096),
    seconds=st.floats(1e-5, 1.0),
    share=st.floats(0.0, 1.0),
    chunk_rows=st.integers(1, 10**6),
)
def test_blocks_pay_each_calls_fixed_cost_at_most_5_percent(
    rows: int, seconds: float, share: float, chunk_rows: int
) -> None:
    probe = Probe(rows=rows, seconds=seconds, result_bytes=0, call_seconds=share * seconds)
    size = block_rows(probe, chunk_rows)
    if size is not None:
        assert rows <= size <= BLOCKS_UP_TO * rows and 2 * size <= chunk_rows
        assert probe.call_seconds <= BLOCK_FIXED_SHARE * probe.row_seconds * size * (1 + 1e-9)


def test_a_large_fixed_cost_gets_no_blocks() -> None:
    costly = Probe(rows=256, seconds=1e-2, result_bytes=256 * 512, call_seconds=5e-3)
    made = plan(**common(costs=BLOCKS, chunks=None, probe=costly, rowwise=True))
    assert made.block_rows is None
    assert made.fan_out
