"""Data by reference on the openlambda executor (`lampy worker` on loopback), in one run.

- 2 GiB input: one elemwise region (row sums) over a 2 GiB float64 array, 64 chunks. Push (the
  array in memory, its rows inside each call's frame, publishing off) is the baseline, against
  pull (a `lampy.remote` reference to the same array on `lampy serve`: each sandbox reads its
  rows with one Range request) and auto-publish (the in-memory array, published on demand).
  Each row notes the bytes the client sent in frames. Targets: pull no slower than push
  (>= 1x), and >= 100x fewer bytes sent (asserted).
- publish threshold: push against auto-publish for one array of 1, 4, 16 and 64 MiB; where
  publishing starts to win sets `lampy.runtime.remote._publish.PUBLISH_BYTES`.
- large results: a region whose result is 1024x its input (a quarter of the large input's
  size, 64 chunks), its result arrays sent back in the answers against PUT to the client's
  array server by reference; each row notes the bytes the client received in answers.
- result threshold: the same for results of 1, 4, 16 and 64 MiB (8 chunks); where references
  start to win sets `lampy.runtime.remote._results.RESULT_BYTES`.

LAMPY_BENCH_REMOTE_BYTES shrinks the large input (e.g. 268435456 for a quick check).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import served_arrays

import lampy
from lampy.runtime import executors
from lampy.runtime._settings import resolve_options
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.runtime.openlambda._transport import AiohttpTransport, Reply
from lampy.runtime.remote import _publish as publish
from lampy.runtime.remote import _results as results
from lampy.runtime.remote._reference import RemoteArray, remote

COLUMNS = 1024  # 8 KiB rows
TOTAL_BYTES = int(os.environ.get("LAMPY_BENCH_REMOTE_BYTES", 2 << 30))
CHUNKS = 64
THRESHOLD_SIZES = [1 << 20, 4 << 20, 16 << 20, 64 << 20]
LARGE = "input of {:.3g} GiB through one region, {} chunks"
RESULT = "result of {:.3g} GiB from one region, {} chunks"


class Counting(AiohttpTransport):
    """The real transport, counting the bytes of the frames the client sends and receives."""

    sent = received = 0

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        Counting.sent += frame.size
        reply = await super().post(frame, timeout)
        Counting.received += reply.reader.total if reply.reader else len(reply.body)
        return reply


def row_sums(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=1)


def make(nbytes: int) -> np.ndarray:
    rows = nbytes // (COLUMNS * 8)
    array = np.arange(rows * COLUMNS, dtype=np.float64).reshape(rows, COLUMNS)
    return np.remainder(array, 1000, out=array)  # in place: one 2 GiB array, not two


@pytest.fixture(scope="module")
def counted(worker: str) -> Iterator[OpenLambdaExecutor]:
    """The executor instance regions use under `lampy.using(executor="openlambda", url=...)`."""
    with lampy.using(executor="openlambda", url=worker):
        executor = executors.get("openlambda", resolve_options("openlambda"))
        assert isinstance(executor, OpenLambdaExecutor)
        executor.transport = Counting(executor.endpoint, executor.concurrency, executor.secret)
        yield executor


@pytest.fixture(scope="module")
def large() -> np.ndarray:
    return make(TOTAL_BYTES)


@pytest.fixture(scope="module")
def served(large: np.ndarray) -> Iterator[str]:
    """The large array as a file on `lampy serve`."""
    with served_arrays({"large": large}) as url:
        yield f"{url}/large.npy"


def run(worker: str, argument: np.ndarray | RemoteArray, threshold: int, chunks: int) -> Any:
    region = lampy.elemwise(row_sums, chunks=chunks)
    saved, publish.PUBLISH_BYTES = publish.PUBLISH_BYTES, threshold
    try:
        with lampy.using(executor="openlambda", url=worker):
            return region(argument)
    finally:
        publish.PUBLISH_BYTES = saved


MODES = {
    "push": "push: rows inside each call's frame (publishing off)",
    "pull": "pull: lampy.remote reference to lampy serve",
    "publish": "auto-publish: the in-memory array published on demand",
}


@pytest.mark.timeout(900)  # 2 GiB pushed four times on a busy 2-core machine
@pytest.mark.parametrize("mode", list(MODES))
def test_large_input(
    benchmark: Any,
    worker: str,
    counted: OpenLambdaExecutor,
    large: np.ndarray,
    served: str,
    mode: str,
) -> None:
    argument: np.ndarray | RemoteArray = remote(served) if mode == "pull" else large
    threshold = 0 if mode == "publish" else 1 << 62
    expected = row_sums(large)
    np.testing.assert_array_equal(run(worker, argument, threshold, CHUNKS), expected)  # warm
    Counting.sent = 0
    benchmark.group = LARGE.format(TOTAL_BYTES / 2**30, CHUNKS)
    result = benchmark.pedantic(
        run, args=(worker, argument, threshold, CHUNKS), rounds=3, iterations=1
    )
    np.testing.assert_array_equal(result, expected)
    sent = Counting.sent / 3
    benchmark.extra_info.update(
        system=MODES[mode],
        note=f"client sent {sent / 1e6:,.3f} MB per job",
        sent_bytes=sent,
        **({"baseline": True} if mode == "push" else {"target": 1.0}),
    )
    if mode == "pull":
        assert sent * 100 <= large.nbytes, f"only {large.nbytes / sent:.0f}x fewer bytes"


@pytest.mark.parametrize("nbytes", THRESHOLD_SIZES)
@pytest.mark.parametrize("mode", ["push", "publish"])
def test_publish_threshold(benchmark: Any, worker: str, mode: str, nbytes: int) -> None:
    array = make(nbytes)
    threshold = 0 if mode == "publish" else 1 << 62
    run(worker, array, threshold, 8)  # warm
    benchmark.group = f"publish threshold: {nbytes >> 20} MiB, 8 chunks"
    benchmark.pedantic(run, args=(worker, array, threshold, 8), rounds=7, iterations=1)
    benchmark.extra_info.update(
        system="auto-publish" if mode == "publish" else "push", baseline=mode == "push"
    )


def widened(x: np.ndarray) -> np.ndarray:
    """Rows of COLUMNS float64 from one int64 each: a result 1024x the input."""
    return np.multiply.outer(x, np.ones(COLUMNS))


def run_results(worker: str, rows: int, threshold: int, chunks: int) -> Any:
    region = lampy.elemwise(widened, chunks=chunks)
    saved, results.RESULT_BYTES = results.RESULT_BYTES, threshold
    try:
        with lampy.using(executor="openlambda", url=worker):
            return region(np.arange(rows, dtype=np.int64))
    finally:
        results.RESULT_BYTES = saved


RESULT_MODES = {
    "answer": "in the answers: result arrays inside each call's frame",
    "reference": "by reference: PUT to the client's array server, mapped by the client",
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", list(RESULT_MODES))
def test_large_results(benchmark: Any, worker: str, counted: OpenLambdaExecutor, mode: str) -> None:
    assert publish.serving(worker, start=True) is not None  # the server publishing starts
    rows = TOTAL_BYTES // 4 // (COLUMNS * 8)
    threshold = 1 if mode == "reference" else 1 << 62
    expected = widened(np.arange(rows, dtype=np.int64))
    np.testing.assert_array_equal(run_results(worker, rows, threshold, CHUNKS), expected)  # warm
    Counting.received = 0
    benchmark.group = RESULT.format(expected.nbytes / 2**30, CHUNKS)
    result = benchmark.pedantic(
        run_results, args=(worker, rows, threshold, CHUNKS), rounds=3, iterations=1
    )
    np.testing.assert_array_equal(result, expected)
    received = Counting.received / 3
    benchmark.extra_info.update(
        system=RESULT_MODES[mode],
        note=f"client received {received / 1e6:,.3f} MB in answers per job",
        received_bytes=received,
        **({"baseline": True} if mode == "answer" else {"target": 1.0}),
    )
    if mode == "reference":
        assert received * 100 <= expected.nbytes, f"only {expected.nbytes / received:.0f}x fewer"


@pytest.mark.parametrize("nbytes", THRESHOLD_SIZES)
@pytest.mark.parametrize("mode", list(RESULT_MODES))
def test_result_threshold(benchmark: Any, worker: str, mode: str, nbytes: int) -> None:
    assert publish.serving(worker, start=True) is not None
    rows = nbytes // (COLUMNS * 8)
    threshold = 1 if mode == "reference" else 1 << 62
    run_results(worker, rows, threshold, 8)  # warm
    benchmark.group = f"result threshold: {nbytes >> 20} MiB, 8 chunks of {nbytes >> 13} KiB"
    benchmark.pedantic(run_results, args=(worker, rows, threshold, 8), rounds=7, iterations=1)
    benchmark.extra_info.update(system=mode, baseline=mode == "answer")
