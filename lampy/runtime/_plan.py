"""Planning: how a call is cut into chunks and where they run. Pure: no I/O, no clocks.

With `chunks="auto"` the caller first times the function on a small leading slice of the rows
(the probe) and hands the measurement in here. The plan weighs the serial time this predicts
against the executor's costs (start-up, moving bytes, per-chunk overhead) and fans out only
when that pays; otherwise the call runs in the caller's process as one plain function call.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

Rows = tuple[int, int]

# Chosen with bench/bench_overheads.py (fan-out break-even on the 2-core reference machine):
# fan out only when the predicted parallel time beats the serial time by this factor.
FAN_OUT_MARGIN = 0.8
# The probe sees at most this many bytes of split input (1/64 of the rows at most), so probing
# costs little and a memory-bound function is judged from data that fits in cache.
PROBE_BYTES = 1 << 21
PROBE_FRACTION = 64
# Chunks per worker when fanning out: more than one evens out uneven chunks and stragglers,
# and cache-sized chunks beat one big block (bench/bench_core.py: 1.4x with 2 chunks, 1.8x with 8).
# An auto plan's chunks are at most this large, and shrink toward the end (`tapered_rows`).
CHUNKS_PER_WORKER = 4
# A tapered chunk is never so small that its fixed costs (the executor's per chunk, the
# function's per call) pass this share of its time.
TAPER_FIXED_SHARE = 0.05
# A fanned-out elemwise chunk runs where it lands as several calls of the function, on blocks
# of rows as small as the probe's (cache-sized: (a) of bench/bench_core.py computes 1.2x faster
# per row on 256-row blocks than on 2,048-row chunks, its temporaries staying in cache), when a
# call's fixed cost is at most this share of a block's time. A function with a large fixed
# cost gets larger blocks, up to BLOCKS_UP_TO times the probe's rows, then none.
BLOCK_FIXED_SHARE = 0.05
BLOCKS_UP_TO = 4


@dataclass(frozen=True)
class Costs:
    """What running chunks on an executor costs, as the planner models it."""

    workers: int
    startup_s: float = 0.0
    seconds_per_byte: float = 0.0
    seconds_per_chunk: float = 0.0
    #: Results may cost more per byte than inputs (fresh memory, then joined); None: the same.
    seconds_per_result_byte: float | None = None
    #: The executor starts its workers in the background (`start()`): while it is not warm
    #: (`startup_s` > 0), auto never waits for it, since a start-up on a busy machine can take
    #: many times its estimate; the call runs here and later calls use the warm workers.
    starts_in_background: bool = False
    #: Arrays already in lampy's shared memory reach the workers where they are (the local
    #: pool maps them by descriptor): they cost no bytes moved, whatever their size.
    maps_shared_memory: bool = False
    #: Where chunks run, an elemwise chunk may be run as calls on blocks of its rows
    #: (`Job.block_rows`): the local pool does.
    runs_blocks: bool = False

    @property
    def result_byte_seconds(self) -> float:
        """Seconds per byte of results brought back."""
        if self.seconds_per_result_byte is None:
            return self.seconds_per_byte
        return self.seconds_per_result_byte


@dataclass(frozen=True)
class Probe:
    """The function timed in the caller's process: on one row, then on rows [0, rows).

    Two points separate a call's fixed cost from its cost per row, so a function with a large
    fixed overhead is not mistaken for heavy work (every chunk pays the fixed cost again).
    """

    rows: int
    seconds: float
    result_bytes: int
    call_seconds: float = 0.0

    @property
    def row_seconds(self) -> float:
        return max(self.seconds - self.call_seconds, 0.0) / self.rows


@dataclass(frozen=True)
class Plan:
    """The chunks of one call, where they run, and why."""

    executor: str
    rows: int
    row_bytes: int
    shared_bytes: int
    chunks: tuple[Rows, ...]
    fan_out: bool
    reason: str
    probe: Probe | None = field(default=None, compare=False)
    #: The executor is cold, and once started it would save more than its start-up on a call
    #: like this one: start it in the background after this call, for later calls.
    warm_up: bool = False
    #: Who runs the chunks' scheduling when not the calling process (an executor's
    #: `orchestrated_by`, e.g. a coordinator lambda).
    orchestrated_by: str = ""
    #: Seconds per row a chunk should take where it runs, as priced from the probe (`pace`):
    #: what an executor judges stragglers by before it has timed this function itself. None
    #: without a probe.
    pace: float | None = field(default=None, compare=False)
    #: Rows per call of the function within a chunk where it runs (`block_rows`), or None: one
    #: call per chunk.
    block_rows: int | None = None

    @property
    def bytes_per_chunk(self) -> list[int]:
        return [(stop - start) * self.row_bytes for start, stop in self.chunks]

    def __str__(self) -> str:
        where = self.executor if self.fan_out else "the calling process (no fan-out)"
        sizes = [stop - start for start, stop in self.chunks]
        rows = f"{min(sizes)}-{max(sizes)}" if sizes and min(sizes) != max(sizes) else sizes[0]
        blocks = f", run in blocks of {self.block_rows} rows" if self.block_rows else ""
        return (
            f"{len(self.chunks)} chunk(s) of {rows} rows{blocks} "
            f"({self.row_bytes:,} bytes per row) on {where}; "
            f"{self.rows} rows x {self.row_bytes:,} bytes split, {self.shared_bytes:,} bytes "
            f"shared. Why: {self.reason}"
        ) + (
            f"; orchestrated by {self.orchestrated_by}"
            if self.fan_out and self.orchestrated_by
            else ""
        )


def blocks_of(rows: Rows, block_rows: int | None) -> tuple[Rows, ...]:
    """A chunk's rows cut into calls of at most `block_rows` rows, evenly (None: one call).

    >>> blocks_of((100, 110), 4)
    ((100, 104), (104, 107), (107, 110))
    >>> blocks_of((0, 10), None)
    ((0, 10),)
    """
    start, stop = rows
    if block_rows is None or stop - start <= block_rows:
        return (rows,)
    return split_rows(stop - start, -(-(stop - start) // block_rows), start)


def split_rows(rows: int, chunks: int, start: int = 0) -> tuple[Rows, ...]:
    """Cut rows [start, start + rows) into `chunks` contiguous ranges, sizes differing by <= 1.

    Like np.array_split, the first ranges take the extra rows; never more ranges than rows,
    but always at least one (an empty call still runs once).

    >>> split_rows(10, 3)
    ((0, 4), (4, 7), (7, 10))
    >>> split_rows(2, 5)
    ((0, 1), (1, 2))
    >>> split_rows(0, 4)
    ((0, 0),)
    >>> split_rows(4, 2, start=6)
    ((6, 8), (8, 10))
    """
    n = max(1, min(chunks, rows))
    base, extra = divmod(rows, n)
    bounds = [start]
    for i in range(n):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return tuple(itertools.pairwise(bounds))


def tapered_rows(rows: int, workers: int, least: int, start: int = 0) -> tuple[Rows, ...]:
    """Cut rows [start, start + rows) into chunks that shrink toward the end (guided
    self-scheduling): each takes 1 / (2 * workers) of the rows still left, at most 1 /
    (workers * CHUNKS_PER_WORKER) of them all, and at least `least` rows (the last may hold
    from half that to one and a half times).

    Chunks go to whichever worker is free, in order, so the call ends when the last ones do:
    short last chunks leave no worker idle for long while another finishes a long one, and a
    worker slowed by a neighbour on its core simply takes fewer of them.

    >>> [b - a for a, b in tapered_rows(1000, 2, 20)]
    [125, 125, 125, 125, 125, 94, 71, 53, 40, 30, 22, 20, 20, 25]
    >>> tapered_rows(7, 2, 20, start=5)
    ((5, 6), (6, 7), (7, 8), (8, 9), (9, 10), (10, 11), (11, 12))
    """
    most = max(1, -(-rows // (workers * CHUNKS_PER_WORKER)))
    least = max(1, min(least, most))
    bounds = [start]
    left = rows
    while left > 0:
        size = min(left, max(least, min(most, -(-left // (2 * workers)))))
        if 2 * (left - size) < least:  # no stub under half the least after the last chunk
            size = left
        bounds.append(bounds[-1] + size)
        left -= size
    return tuple(itertools.pairwise(bounds)) or ((start, start),)


def probe_rows(rows: int, row_bytes: int) -> int:
    """How many leading rows the auto planner times: small, but at least one.

    >>> probe_rows(1_000_000, 8)
    15625
    >>> probe_rows(1000, 1 << 20)
    2
    >>> probe_rows(3, 8)
    1
    """
    by_bytes = PROBE_BYTES // max(row_bytes, 1)
    return max(1, min(rows // PROBE_FRACTION, by_bytes))


def block_rows(probe: Probe, chunk_rows: int) -> int | None:
    """Rows per call of a rowwise function within a chunk of `chunk_rows` rows: the fewest,
    from the probe's rows up, at which a call's fixed cost is at most BLOCK_FIXED_SHARE of its
    time; None (one call per chunk) when that is more than BLOCKS_UP_TO times the probe's rows
    or leaves fewer than two blocks to a chunk.

    >>> block_rows(Probe(rows=256, seconds=1e-3, result_bytes=0, call_seconds=2e-5), 2048)
    256
    >>> block_rows(Probe(rows=256, seconds=1e-3, result_bytes=0, call_seconds=1.5e-4), 2048)
    904
    >>> block_rows(Probe(rows=256, seconds=1e-3, result_bytes=0, call_seconds=5e-4), 2048) is None
    True
    >>> block_rows(Probe(rows=256, seconds=1e-3, result_bytes=0, call_seconds=0.0), 300) is None
    True
    """
    if probe.rows < 2 or probe.row_seconds <= 0:
        return None  # one point: a call's fixed cost is not known
    least = probe.call_seconds / (BLOCK_FIXED_SHARE * probe.row_seconds)
    rows = max(probe.rows, math.ceil(least))
    if rows > BLOCKS_UP_TO * probe.rows or 2 * rows > chunk_rows:
        return None
    return rows


def plan(
    *,
    executor: str,
    costs: Costs,
    rows: int,
    row_bytes: int,
    shared_bytes: int,
    chunks: int | None,
    probe: Probe | None = None,
    sent_row_bytes: int | None = None,
    sent_shared_bytes: int | None = None,
    here_seconds: float | None = None,
    rowwise: bool = False,
) -> Plan:
    """Plan a call: `chunks` given means exactly that many (fewer only if rows run out).

    `sent_row_bytes` (default `row_bytes`) is what the executor itself moves per row: rows of a
    reference (lampy.remote) are read by the workers, in parallel, not sent by the caller; the
    probe, which read them here, has already priced that reading into the work per row.
    `sent_shared_bytes` (default `shared_bytes`) is the same for the arrays every chunk gets
    whole: an executor that `maps_shared_memory` moves none of those in lampy's shared memory.

    `chunks=None` means auto; then a `probe` of the leading rows must be given unless the
    executor has a single worker or there are fewer than two rows. In auto mode a fan-out plan
    starts with the probe's rows as chunk 0 (already computed) and splits the rest.

    `here_seconds`: what whole calls like this one took in the caller, when some did. It is
    the serial time then, not the probe's: the probe times a slice that fits in cache, and a
    whole call may take longer (its temporaries are fresh memory the size of the data), while
    the chunks are cache-sized as the probe was, so the fanned-out estimate keeps the probe's.

    `rowwise`: the function treats rows independently (elemwise), so an auto plan may have
    each chunk run as calls on blocks of rows as small as the probe's (`block_rows`), which
    keeps the probe's pace where chunks run: the estimate counts each call's fixed cost.

    >>> one = Costs(workers=1)
    >>> plan(executor="inline", costs=one, rows=100, row_bytes=8, shared_bytes=0,
    ...      chunks=None).reason
    'the executor runs one chunk at a time'
    >>> two = Costs(workers=2, seconds_per_byte=1e-9, seconds_per_chunk=1e-4)
    >>> heavy = Probe(rows=10, seconds=1.0, result_bytes=80)
    >>> p = plan(executor="local", costs=two, rows=1000, row_bytes=8, shared_bytes=0,
    ...          chunks=None, probe=heavy)
    >>> p.fan_out, p.chunks[:2], len(p.chunks)
    (True, ((0, 10), (10, 134)), 25)
    >>> light = Probe(rows=10, seconds=1e-6, result_bytes=80)
    >>> plan(executor="local", costs=two, rows=1000, row_bytes=8, shared_bytes=0,
    ...      chunks=None, probe=light).fan_out
    False
    """

    def result(
        chunks: tuple[Rows, ...],
        fan_out: bool,
        reason: str,
        warm_up: bool = False,
        blocks: int | None = None,
    ) -> Plan:
        sent_row = row_bytes if sent_row_bytes is None else sent_row_bytes
        expected = None if probe is None else pace(probe, costs, sent_row)
        return Plan(
            executor,
            rows,
            row_bytes,
            shared_bytes,
            chunks,
            fan_out,
            reason,
            probe,
            warm_up,
            pace=expected,
            block_rows=blocks,
        )

    if chunks is not None:
        reason = f"chunks={chunks} was asked for" + (
            f"; only {rows} rows to split" if chunks > max(rows, 1) else ""
        )
        return result(split_rows(rows, chunks), True, reason)
    whole = split_rows(rows, 1)
    if costs.workers <= 1:
        return result(whole, False, "the executor runs one chunk at a time")
    if rows < 2:
        return result(whole, False, f"{rows} row(s) cannot be split")
    if probe is None:
        raise ValueError("auto planning on a parallel executor needs a probe")
    if here_seconds is None:
        serial, timed = probe.call_seconds + probe.row_seconds * rows, ""
    else:
        serial, timed = here_seconds, f", the whole call here {here_seconds * 1e3:.3g} ms"
    rest = rows - probe.rows
    split = tapered_rows(rest, costs.workers, _least_rows(probe, costs), start=probe.rows)
    count = len(split)
    largest = split[0][1] - split[0][0]
    blocks = block_rows(probe, largest) if rowwise and costs.runs_blocks else None
    calls = sum(len(blocks_of(c, blocks)) for c in split)
    sent = rows * (row_bytes if sent_row_bytes is None else sent_row_bytes)
    sent += (shared_bytes if sent_shared_bytes is None else sent_shared_bytes) * costs.workers
    returned = probe.result_bytes / probe.rows * rest
    started = (
        probe.seconds
        + sent * costs.seconds_per_byte
        + returned * costs.result_byte_seconds
        + count * costs.seconds_per_chunk
        + (probe.row_seconds * rest + calls * probe.call_seconds) / costs.workers
    )
    parallel = started + costs.startup_s
    estimate = f"serial {serial * 1e3:.3g} ms against fanned out {parallel * 1e3:.3g} ms"
    wait_not = costs.starts_in_background and costs.startup_s > 0
    if rest < 1 or parallel >= FAN_OUT_MARGIN * serial or wait_not:
        warm_up = (
            costs.startup_s > 0
            and rest >= 1
            and started < FAN_OUT_MARGIN * serial
            and serial - started >= costs.startup_s
        )
        reason = f"fan-out does not pay: {estimate} (from a probe of {probe.rows} rows{timed})"
        if wait_not and parallel < FAN_OUT_MARGIN * serial:
            reason = (
                f"the workers are not started yet, and a call never waits for them: {estimate} "
                f"(from a probe of {probe.rows} rows)"
            )
        elif costs.startup_s > 0:
            reason += f", {costs.startup_s * 1e3:.3g} ms of it starting the workers"
        if warm_up:
            reason += (
                f"; starting the workers in the background after this call, as later calls "
                f"will pay ({started * 1e3:.3g} ms)"
            )
        return result(whole, False, reason, warm_up)
    chunked = ((0, probe.rows), *split)
    reused = ", reused as chunk 0" if here_seconds is None else timed
    reason = f"fan-out pays: {estimate} (from a probe of {probe.rows} rows{reused})"
    return result(chunked, True, reason, blocks=blocks)


def _least_rows(probe: Probe, costs: Costs) -> int:
    """The fewest rows a tapered chunk may have: its fixed costs, a call of the function and
    the executor's own per chunk (`seconds_per_chunk` is that share of it each of the workers
    pays), at most TAPER_FIXED_SHARE of its time.

    >>> _least_rows(Probe(rows=10, seconds=0.01, result_bytes=0), Costs(workers=2,
    ...     seconds_per_chunk=1e-4))
    4
    """
    if probe.row_seconds <= 0:
        return probe.rows
    fixed = probe.call_seconds + costs.seconds_per_chunk * costs.workers
    return max(1, math.ceil(fixed / (TAPER_FIXED_SHARE * probe.row_seconds)))


def pace(probe: Probe, costs: Costs, sent_row_bytes: int) -> float:
    """Seconds per row a chunk should take on the executor, by the probe: its time per row
    here (its fixed cost shared among its rows, so a chunk of as many rows or more is not
    expected sooner than it can be), plus moving a row there and its result back.

    >>> costs = Costs(workers=2, seconds_per_byte=1e-9)
    >>> round(pace(Probe(rows=10, seconds=0.02, result_bytes=80), costs, 8), 9)
    0.002000016
    """
    moved = sent_row_bytes * costs.seconds_per_byte
    returned = probe.result_bytes / probe.rows * costs.result_byte_seconds
    return probe.seconds / probe.rows + moved + returned


def warm_saving(
    *,
    costs: Costs,
    rows: int,
    row_bytes: int,
    shared_bytes: int,
    seconds: float,
    result_bytes: int,
    sent_row_bytes: int | None = None,
    sent_shared_bytes: int | None = None,
) -> float:
    """The seconds a warm executor would have saved on a call that just took `seconds` in the
    caller (no probe: a cold pool that starts in the background is never waited for, so a
    cold call runs here and is timed whole); 0 when it would not have fanned out. Starting
    the workers pays once such savings, summed over calls, exceed the start-up.

    >>> two = Costs(workers=2, startup_s=0.4, seconds_per_byte=1e-9, starts_in_background=True)
    >>> round(warm_saving(costs=two, rows=10**6, row_bytes=8, shared_bytes=0, seconds=2.0,
    ...                   result_bytes=8 * 10**6), 3)
    0.984
    >>> warm_saving(costs=two, rows=10**6, row_bytes=8, shared_bytes=0, seconds=0.01,
    ...             result_bytes=8 * 10**6)
    0.0
    """
    if costs.workers <= 1 or rows < 2:
        return 0.0
    count = min(rows, costs.workers * CHUNKS_PER_WORKER)
    sent = rows * (row_bytes if sent_row_bytes is None else sent_row_bytes)
    sent += (shared_bytes if sent_shared_bytes is None else sent_shared_bytes) * costs.workers
    started = (
        sent * costs.seconds_per_byte
        + result_bytes * costs.result_byte_seconds
        + count * costs.seconds_per_chunk
        + seconds / costs.workers
    )
    return seconds - started if started < FAN_OUT_MARGIN * seconds else 0.0
