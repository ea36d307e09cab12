"""Results by reference: large chunk results go to the client's array server, come back equal
to numpy, land in a memory-mapped file or stay remote, and leave no files behind."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lampy
from lampy._errors import OptionError, RemoteArrayError, ResultError
from lampy.runtime import executors
from lampy.runtime._settings import resolve_options
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._executor import OpenLambdaExecutor
from lampy.runtime.openlambda._transport import AiohttpTransport, Reply
from lampy.runtime.remote import _publish as publish
from lampy.runtime.remote import _results as results
from lampy.runtime.remote._reference import RemoteArray, upload
from lampy.runtime.remote._results import Sink
from lampy.testing import assert_same, free_port

from .conftest import Server

RNG = np.random.default_rng(11)
DATA = RNG.standard_normal((2000, 16))  # 256 KiB: 4 chunks of 64 KiB results


@lampy.elemwise(chunks=4)
def shifted(x: np.ndarray) -> np.ndarray:
    return x * 3.0 - 1.0


@lampy.elemwise(chunks=4)
def several(x: np.ndarray) -> dict[str, Any]:
    return {"pair": (x + 1, x[:, :2].astype(np.float32)), "labels": (x[:, 0] > 0).astype(np.int8)}


@lampy.sum(chunks=4)
def tiled_sums(x: np.ndarray) -> np.ndarray:
    """A 32 KiB partial per chunk: partials by reference too."""
    return np.tile(x.sum(axis=0), (256, 1))


def fortran_copy(x: np.ndarray) -> np.ndarray:
    return np.asfortranarray(x)  # stored in C order, equal values


class Received(AiohttpTransport):
    """The real transport, counting the bytes of the answers the client receives."""

    got = 0

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        reply = await super().post(frame, timeout)
        Received.got += reply.reader.total if reply.reader else len(reply.body)
        return reply


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results over 16 KiB travel by reference (the test arrays are small)."""
    monkeypatch.setattr(results, "RESULT_BYTES", 16 << 10)


@pytest.fixture
def on_openlambda(worker_url: str) -> Iterator[Callable[..., OpenLambdaExecutor]]:
    """Enter `using(executor="openlambda", ...)` for the test; returns the executor instance
    regions use there, counting answers (its own transport is back after the test)."""
    with ExitStack() as stack:

        def enter(transport: type[Received] = Received, **options: Any) -> OpenLambdaExecutor:
            stack.enter_context(lampy.using(executor="openlambda", url=worker_url, **options))
            executor = executors.get("openlambda", resolve_options("openlambda"))
            assert isinstance(executor, OpenLambdaExecutor)
            original = executor.transport
            counting = transport(executor.endpoint, executor.concurrency, executor.secret)

            def restore() -> None:
                executor._loop.run(counting.close())
                executor.transport = original

            executor.transport = counting
            stack.callback(restore)
            Received.got = 0
            return executor

        yield enter


@pytest.fixture
def served_here(worker_url: str) -> Path:
    """The client's array server (as publishing starts it); its directory."""
    server = publish.serving(worker_url, start=True)
    assert server is not None
    return server[0]


def leftovers(directory: Path) -> list[Path]:
    return [p for p in (directory / "results").rglob("*") if p.is_file()]


def test_large_results_come_back_by_reference(
    on_openlambda: Callable[..., OpenLambdaExecutor], served_here: Path, small_threshold: None
) -> None:
    executor = on_openlambda()
    result = shifted(DATA)
    assert type(result) is np.ndarray and result.tobytes() == (DATA * 3.0 - 1.0).tobytes()
    assert Received.got < DATA.nbytes / 4, Received.got  # references, not the bytes
    assert_same(several(DATA), several.__wrapped__(DATA))  # leaves of dicts and tuples
    assert_same(tiled_sums(DATA), np.tile(DATA.sum(axis=0), (256, 1)), exact=False)
    account = executor.accounts[-1]
    assert set(account.accepted.values()) == {1} and not account.lost
    assert leftovers(served_here) == []


def test_without_a_running_server_results_travel_in_answers(
    on_openlambda: Callable[..., OpenLambdaExecutor], small_threshold: None
) -> None:
    publish._publisher.stop()  # "auto" never starts a server just for results
    on_openlambda()
    assert shifted(DATA).tobytes() == (DATA * 3.0 - 1.0).tobytes()
    assert Received.got > DATA.nbytes
    assert publish._publisher.process is None


@pytest.mark.parametrize("name", ["inline", "local"])
def test_other_executors_give_an_ordinary_result(name: str, small_threshold: None) -> None:
    with lampy.using(executor=name):
        result = shifted(DATA)
    assert type(result) is np.ndarray and result.tobytes() == (DATA * 3.0 - 1.0).tobytes()


def test_results_into_a_memory_mapped_file(
    on_openlambda: Callable[..., OpenLambdaExecutor], tmp_path: Path, small_threshold: None
) -> None:
    path = tmp_path / "out" / "result.npy"
    on_openlambda(results=f"mmap:{path}")
    first = shifted(DATA)
    assert isinstance(first, np.memmap) and Path(first.filename) == path
    assert first.tobytes() == (DATA * 3.0 - 1.0).tobytes()
    assert np.load(path).tobytes() == first.tobytes()
    second = shifted(DATA[:10])  # too small to fan out: still written to the file
    assert second.shape == (10, 16) and np.load(path).shape == (10, 16)
    assert first.tobytes() == (DATA * 3.0 - 1.0).tobytes()  # the earlier map is intact
    with pytest.raises(ResultError, match="stores one array per call"):
        several(DATA)
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.npy"]  # no partial files


def test_results_kept_remote_feed_the_next_region(
    on_openlambda: Callable[..., OpenLambdaExecutor], small_threshold: None
) -> None:
    executor = on_openlambda(results="remote")
    kept = shifted(DATA)
    assert isinstance(kept, RemoteArray) and kept.url.startswith("http://127.0.0.1:")
    assert np.asarray(kept).tobytes() == (DATA * 3.0 - 1.0).tobytes()
    Received.got = 0
    again = shifted(kept)  # the next region reads its rows from the server
    sent_back = Received.got
    assert np.asarray(again).tobytes() == ((DATA * 3.0 - 1.0) * 3.0 - 1.0).tobytes()
    assert sent_back < DATA.nbytes / 4
    assert executor.sink.mode == "remote"
    for lazy in (lampy.array(kept), lampy.array(kept.url)):  # a lazy array over it, run anywhere
        assert_same((lazy + 1).run(executor="inline"), (DATA * 3.0 - 1.0) + 1)
    tail = lampy.array(kept[100:])  # a narrower reference keeps its rows
    assert_same(tail.run(executor="inline"), (DATA * 3.0 - 1.0)[100:])
    with pytest.raises(lampy.UsageError, match="holds float64, not int32"):
        lampy.array(kept, dtype=np.int32)


def test_bad_results_options_are_refused_before_running() -> None:
    for bad in ("mmap", "mmap:/tmp/out.txt", "disk", "mmap:/tmp/.hidden.npy"):
        with pytest.raises(OptionError, match="results"):
            Sink.parse(bad)
    with pytest.raises(OptionError, match="results must be"):
        OpenLambdaExecutor(results="somewhere")


@pytest.fixture
def offered_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, str], None]:
    """Make the executor offer results a place of the test's choosing."""

    def point(directory: Path, url: str) -> None:
        monkeypatch.setattr(publish, "serving", lambda platform, start: (directory, url))

    return point


def test_a_refused_upload_is_a_typed_error_naming_the_chunk(
    on_openlambda: Callable[..., OpenLambdaExecutor],
    start_server: Callable[..., Server],
    offered_at: Callable[[Path, str], None],
    small_threshold: None,
) -> None:
    small = start_server("--max-upload", "1000")
    offered_at(small.root, small.url)
    on_openlambda()
    with pytest.raises(RemoteArrayError, match=r"could not be stored.*HTTP 413") as caught:
        shifted(DATA)
    notes = getattr(caught.value, "__notes__", [])
    assert any(re.match(r"raised in lampy chunk \d of 4 \(rows \d+:\d+\)", n) for n in notes)
    assert not list(small.root.rglob("*.npy"))


def test_a_server_gone_is_a_typed_error_naming_the_chunk(
    on_openlambda: Callable[..., OpenLambdaExecutor],
    tmp_path: Path,
    offered_at: Callable[[Path, str], None],
    small_threshold: None,
) -> None:

    offered_at(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    on_openlambda()
    with pytest.raises(RemoteArrayError, match=r"could not be stored.*cannot reach") as caught:
        shifted(DATA)
    assert any("raised in lampy chunk" in n for n in getattr(caught.value, "__notes__", []))


class LosesFirstAnswers(Received):
    """Drops the first `losses` answers after they arrived (their uploads already made)."""

    losses = 0

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        reply = await super().post(frame, timeout)
        if LosesFirstAnswers.losses > 0:
            LosesFirstAnswers.losses -= 1
            raise aiohttp.ClientPayloadError("answer lost on the way (test)")
        return reply


def test_a_retried_chunk_is_counted_once_and_leaves_no_files(
    on_openlambda: Callable[..., OpenLambdaExecutor], served_here: Path, small_threshold: None
) -> None:
    LosesFirstAnswers.losses = 2
    executor = on_openlambda(LosesFirstAnswers)
    result = shifted(DATA)
    account = executor.accounts[-1]
    assert result.tobytes() == (DATA * 3.0 - 1.0).tobytes()
    assert sum(account.attempts.values()) == 4 + 2 and account.failures["connection"] == 2
    assert set(account.accepted.values()) == {1}
    assert leftovers(served_here) == []  # the lost answers' uploads went with the job


def test_upload_refuses_a_0d_array(server: Server) -> None:
    with pytest.raises(RemoteArrayError, match="0-d"):
        upload(f"{server.url}/zero.npy", np.array(1.0))


@settings(max_examples=12, deadline=None)
@given(
    array=hnp.arrays(
        st.one_of(hnp.integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes()),
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=24),
    ),
    chunks=st.integers(1, 5),
)
def test_stored_results_equal_the_inline_executor(
    worker_url: str, array: np.ndarray, chunks: int
) -> None:
    server = publish.serving(worker_url, start=True)
    assert server is not None
    region = lampy.elemwise(fortran_copy, chunks=chunks)
    saved, results.RESULT_BYTES = results.RESULT_BYTES, 1  # every result array by reference
    try:
        with lampy.using(executor="openlambda", url=worker_url):
            got = region(array)
    finally:
        results.RESULT_BYTES = saved
    with lampy.using(executor="inline"):
        expected = region(array)
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
    assert leftovers(server[0]) == []
