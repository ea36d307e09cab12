"""Regions over references on every executor equal numpy; each chunk reads only its rows."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lampy
from lampy._errors import RemoteArrayError, RemoteArrayNotFound, SplitLengthError
from lampy.regions._binding import bind
from lampy.runtime._job import Job, Part
from lampy.runtime._plan import split_rows
from lampy.runtime.executors._local import _Arena, _Placed
from lampy.runtime.executors._local_worker import FileArray
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.runtime.openlambda._transport import AiohttpTransport, Reply
from lampy.runtime.remote import _publish as publish
from lampy.runtime.remote._reference import RemoteArray, remote
from lampy.testing import assert_same

from .conftest import Server

RNG = np.random.default_rng(7)
NAMES = itertools.count()
DATA = RNG.standard_normal((1000, 6))
LABELS = RNG.integers(0, 50, size=1000).astype(np.int32)


@lampy.elemwise(chunks=4)
def scaled(x: np.ndarray, labels: np.ndarray, factor: float) -> np.ndarray:
    return x * factor + labels[:, None]


@lampy.sum(chunks=5)
def gram(x: np.ndarray) -> np.ndarray:
    return x.T @ x


@lampy.reduce(lambda a, b: np.maximum(a, b), chunks=3)
def column_max(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (x * weights).max(axis=0)


@lampy.elemwise(chunks=3)
def rows_seen(x: np.ndarray) -> np.ndarray:
    """Each row's own values, to show every chunk received exactly its rows."""
    return x.copy()


@pytest.fixture(scope="module")
def urls(server: Server) -> dict[str, str]:
    return {
        "data": server.save("regions/data.npy", DATA),
        "labels": server.save("regions/labels.npy", LABELS),
    }


def test_elemwise_over_references_equals_numpy(executor: str, urls: dict[str, str]) -> None:
    data, labels = remote(urls["data"]), remote(urls["labels"])
    assert_same(scaled(data, labels, 2.0), DATA * 2.0 + LABELS[:, None])
    assert_same(scaled(data, LABELS, 0.5), DATA * 0.5 + LABELS[:, None])  # mixed with an array
    assert_same(rows_seen(data[100:901]), DATA[100:901])  # a slice of a reference


def test_reductions_over_references_equal_numpy(executor: str, urls: dict[str, str]) -> None:
    data = remote(urls["data"])
    assert_same(gram(data), DATA.T @ DATA, exact=False)
    weights = np.linspace(0, 1, 6)
    assert_same(column_max(data, lampy.shared(weights)), (DATA * weights).max(axis=0))
    # a shared reference is read once by the caller and sent whole
    assert_same(
        column_max(data, lampy.shared(remote(urls["data"])[:1])),
        (DATA * DATA[:1]).max(axis=0),
    )


def test_local_file_references(executor: str, tmp_path: Path) -> None:
    np.save(tmp_path / "local.npy", DATA)
    for location in (str(tmp_path / "local.npy"), f"file://{tmp_path}/local.npy"):
        assert_same(scaled(remote(location), LABELS, 3.0), DATA * 3.0 + LABELS[:, None])


def test_auto_chunks_and_plain_calls_read_references(executor: str, urls: dict[str, str]) -> None:
    @lampy.elemwise
    def plus_one(x: np.ndarray) -> np.ndarray:
        return x + 1

    assert_same(plus_one(remote(urls["data"])), DATA + 1)


def test_lengths_are_checked_before_anything_is_read(urls: dict[str, str]) -> None:
    with pytest.raises(SplitLengthError, match="x has 1000 rows, labels has 999"):
        scaled(remote(urls["data"]), LABELS[:999], 1.0)


def test_a_chunk_that_cannot_read_its_rows_names_itself(executor: str, server: Server) -> None:
    url = server.save("regions/vanishing.npy", DATA)
    reference = remote(url)
    (server.root / "regions/vanishing.npy").unlink()
    with pytest.raises(RemoteArrayNotFound) as caught:
        rows_seen(reference)
    notes = getattr(caught.value, "__notes__", [])  # every executor reads in run_task
    assert any(re.match(r"raised in lampy chunk \d of 3 \(rows \d+:\d+\)", n) for n in notes)


class Counting(AiohttpTransport):
    """The real transport, counting the bytes of every frame the client sends."""

    sent = 0

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        Counting.sent += frame.size
        return await super().post(frame, timeout)


@pytest.fixture
def counted(worker_url: str) -> Iterator[OpenLambdaExecutor]:
    executor = OpenLambdaExecutor(url=worker_url)
    executor.transport = Counting(executor.endpoint, executor.concurrency, executor.secret)
    Counting.sent = 0
    try:
        yield executor
    finally:
        executor.close()


def copy_rows(x: np.ndarray) -> np.ndarray:
    return x.copy()


def run_on(executor: OpenLambdaExecutor, array: np.ndarray | RemoteArray) -> np.ndarray:
    """copy_rows over `array` in 3 chunks on this executor instance, through its interface."""
    job = bind(copy_rows, frozenset(), (array,), {}).job(copy_rows, split_rows(len(array), 3))
    outcomes = executor.run(job)
    return np.concatenate([outcomes[chunk].value for chunk in range(len(job.chunks))])


def test_references_cost_the_client_a_few_hundred_bytes(
    counted: OpenLambdaExecutor, server: Server
) -> None:
    wide = RNG.standard_normal((4000, 100))
    reference = remote(server.save("regions/wide.npy", wide))
    assert_same(run_on(counted, reference), wide)
    by_reference = Counting.sent
    Counting.sent = 0
    assert_same(run_on(counted, wide), wide)
    assert Counting.sent > wide.nbytes > 100 * by_reference, (by_reference, Counting.sent)


def test_large_in_memory_arguments_are_published(
    counted: OpenLambdaExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "PUBLISH_BYTES", DATA.nbytes // 2)
    assert_same(run_on(counted, DATA), DATA)
    assert Counting.sent < DATA.nbytes / 10, Counting.sent
    directory = publish._publisher.directory
    assert directory is not None and not any(directory.iterdir())  # removed after the job
    small = DATA[:400]  # below the threshold: pushed inline
    Counting.sent = 0
    assert_same(run_on(counted, small), small)
    assert Counting.sent > small.nbytes


def test_publishing_is_not_asked_of_an_unreachable_platform() -> None:
    assert publish._reachable_host("http://127.0.0.1:5000") == "127.0.0.1"
    assert publish._reachable_host("http://localhost:5000") == "127.0.0.1"
    assert publish._reachable_host("http://no-such-host.invalid:5000") is None


def test_async_callers_can_use_references(urls: dict[str, str]) -> None:
    with lampy.using(executor="inline"):
        result = asyncio.run(rows_seen.aio(remote(urls["data"])))
    assert_same(result, DATA)


def test_fetch_errors_inside_a_lazy_graph_are_typed(server: Server) -> None:
    lazy = lampy.array(server.save("regions/lazy-gone.npy", DATA))
    (server.root / "regions/lazy-gone.npy").unlink()
    with pytest.raises(RemoteArrayError):
        (lazy + 1).run(executor="inline")


def test_the_local_arena_leaves_references_to_the_workers(urls: dict[str, str]) -> None:
    reference = remote(urls["data"])
    arena = _Arena()
    job = Job(copy_rows, (Part(0), Part(1)), {}, (reference, np.arange(4.0)), (), ((0, 4),))
    try:
        with ThreadPoolExecutor(2) as copier:
            placed = _Placed(job, arena, copier, readers=0)
            assert placed.rows_for(0) is None  # the job's own refs: rows copied in
        assert placed.split[0] is reference
        copied = placed.split[1]
        assert isinstance(copied, FileArray) and (copied.dtype, copied.shape) == (
            np.dtype(float),
            (4,),
        )
        assert arena.size < reference.nbytes  # only the in-memory array was copied in
    finally:
        arena.release()


def copy_rows_region(chunks: int) -> lampy.ParallelFunction:
    return lampy.elemwise(copy_rows, chunks=chunks)


@settings(max_examples=15)
@given(
    array=hnp.arrays(
        st.one_of(hnp.integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes()),
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
    ),
    chunks=st.integers(1, 7),
    data=st.data(),
)
def test_every_chunk_gets_exactly_its_rows(
    executor: str, server: Server, array: np.ndarray, chunks: int, data: st.DataObject
) -> None:
    start = data.draw(st.integers(0, len(array) - 1))
    url = server.save(f"regions/random-{next(NAMES)}.npy", array)
    result = copy_rows_region(chunks)(remote(url)[start:])
    with lampy.using(executor="inline"):  # the reference semantics, on the array in memory
        expected = copy_rows_region(chunks)(array[start:])
    assert result.dtype == expected.dtype and result.tobytes() == expected.tobytes()
