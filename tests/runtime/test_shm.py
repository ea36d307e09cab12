"""Shared memory through the local pool: results returned in place, shared inputs never
copied, exact answers for every layout, and nothing left behind."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lampy
from lampy.runtime import _serial as serial
from lampy.runtime import _shm as shm
from lampy.runtime import executors
from lampy.runtime._job import Part
from lampy.runtime.executors import _in_place as in_place
from lampy.runtime.executors._caller_memory import CannotRead, read_into, readable
from lampy.runtime.executors._local import LocalExecutor
from lampy.runtime.executors._local_worker import _can_read, _takes_out


@lampy.elemwise(chunks=4, executor="local")
def scaled(x: np.ndarray, factor: float = 2.0) -> np.ndarray:
    return x * factor


@lampy.elemwise(chunks=4, executor="local")
def pieces(x: np.ndarray) -> dict[str, object]:
    return {"sum": x.sum(axis=1), "both": (x[:, :1].astype(np.float32), x.astype(">i8"))}


def copied_bytes_during(call: object) -> float:
    """Seconds the copy threads spent (0 when nothing was copied into the arena)."""
    before = serial.snapshot()
    call()  # type: ignore[operator]
    return serial.since(before).get("copy threads", 0.0)


def open_memfds() -> int:
    return sum("memfd:lampy" in os.readlink(f"/proc/self/fd/{fd}") for fd in _fds())


def _fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
            found.append(fd)
        except OSError:
            pass
    return found


def test_empty_and_asshared_are_ordinary_arrays_in_shared_memory() -> None:
    x = lampy.empty((10, 3), np.int16)
    assert type(x) is np.ndarray and x.shape == (10, 3) and x.dtype == np.int16
    assert x.flags.writeable and x.flags.c_contiguous and not x.any()
    assert shm.is_shared(x) and shm.is_shared(x[2:5]) and not shm.is_shared(x[:, 1])
    y = np.arange(12.0).reshape(3, 4).astype(">f4")
    s = lampy.asshared(y)
    assert shm.is_shared(s) and s.dtype == y.dtype and np.array_equal(s, y)
    assert lampy.asshared(s) is s  # already there: itself, as np.asarray does
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    assert np.array_equal(lampy.asshared(fortran), fortran)
    assert lampy.empty(5).shape == (5,) and lampy.empty(0).size == 0


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 << 20), min_size=1, max_size=6), data=st.data())
def test_empty_is_zeros_when_it_takes_a_dropped_arrays_memory(
    sizes: list[int], data: st.DataObject
) -> None:
    """A dropped array's file serves a later one of about its size (no new pages to fault in),
    and the new array is all zeros all the same, whatever was written into the old one."""
    gc.collect()
    earlier = shm._kept[:]  # files kept before: this test's own come first
    shm._kept.clear()
    try:
        _take_dropped_memory(sizes, data)
    finally:
        shm._kept[:0] = earlier


def _take_dropped_memory(sizes: list[int], data: st.DataObject) -> None:
    for nbytes in sizes:
        old = lampy.empty(nbytes, np.uint8)
        old[:] = data.draw(st.integers(1, 255))
        del old
        gc.collect()
        kept = {os.fstat(fd).st_ino for _, fd in shm._kept}  # this test's dropped files
        new = lampy.empty(nbytes // 8, np.float64)
        assert not new.any()
        where = shm.locate(new)
        if nbytes >= 8:  # the file just dropped fits it: no new file
            assert where is not None and os.fstat(where[0]).st_ino in kept
        del new
        gc.collect()


def test_kept_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "SEGMENTS_KEPT_BYTES", 1 << 20)
    gc.collect()
    before = open_memfds()
    arrays = [lampy.empty(300_000, np.uint8) for _ in range(5)]
    del arrays
    gc.collect()
    assert open_memfds() - before <= 3  # three of 300 kB fit in 1 MiB: the rest are closed


def test_what_cannot_live_in_shared_memory_is_refused() -> None:
    with pytest.raises(lampy.UnsplittableError, match="Python objects"):
        lampy.empty(3, object)
    with pytest.raises(lampy.UnsplittableError, match="Python objects"):
        lampy.asshared(np.array([1, "a"], dtype=object))
    with pytest.raises(lampy.UnsplittableError, match="masked"):
        lampy.asshared(np.ma.masked_array([1, 2], mask=[0, 1]))
    with pytest.raises(ValueError, match="negative"):
        lampy.empty((2, -1))


def test_an_elemwise_result_is_a_view_of_one_shared_output() -> None:
    x = np.random.default_rng(0).random((1000, 16))
    result = scaled(x)
    assert type(result) is np.ndarray and np.array_equal(result, x * 2)
    assert shm.is_shared(result) and result.flags.writeable and result.flags.c_contiguous
    nested = pieces(x)
    want = pieces.__wrapped__(x)
    assert np.array_equal(nested["sum"], want["sum"])
    for got, expected in zip(nested["both"], want["both"], strict=True):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert shm.is_shared(got)


def test_chained_regions_copy_nothing_and_shared_inputs_are_not_copied() -> None:
    x = lampy.asshared(np.random.default_rng(1).random((4000, 8)))
    scaled(x)  # warm
    assert copied_bytes_during(lambda: scaled(x)) == 0.0
    first = scaled(x)
    assert copied_bytes_during(lambda: scaled(first, 0.5)) == 0.0
    np.testing.assert_array_equal(scaled(first, 0.5), x)
    assert copied_bytes_during(lambda: scaled(x[100:900])) == 0.0  # a slice: still in place
    plain = np.random.default_rng(2).random((4000, 8))
    assert copied_bytes_during(lambda: scaled(plain)) > 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::2],  # strided rows
        lambda a: a[:, ::-1],  # reversed columns
        lambda a: np.asfortranarray(a),
        lambda a: a.T.copy().T,  # non-contiguous of a shared copy
        lambda a: a.astype(">f8"),  # other byte order
        lambda a: a[7:7],  # no rows
    ],
)
def test_views_and_layouts_of_shared_arrays_give_numpys_answer(make: object) -> None:
    base = lampy.asshared(np.random.default_rng(3).random((301, 5)))
    x = make(base)  # type: ignore[operator]
    got = scaled(x)
    want = scaled.__wrapped__(x)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_a_chunk_writing_into_its_shared_input_writes_it_as_inline_does() -> None:
    @lampy.elemwise(chunks=3)
    def clobber(x: np.ndarray) -> np.ndarray:
        x[:] = -1
        return x + 0

    for executor in ("inline", "local"):
        x = lampy.asshared(np.arange(30.0))
        with lampy.using(executor=executor):
            assert np.array_equal(clobber(x), np.full(30, -1.0))
        assert np.array_equal(x, np.full(30, -1.0)), executor


def test_results_that_cannot_be_shared_still_come_back() -> None:
    @lampy.elemwise(chunks=3, executor="local")
    def labels(x: np.ndarray) -> np.ndarray:
        return np.array([f"r{v:g}" for v in x], dtype=object)

    x = np.arange(9.0)
    assert list(labels(x)) == [f"r{v:g}" for v in x]


def lampy_files_in_dev_shm() -> set[str]:
    folder = Path("/dev/shm")
    return {p.name for p in folder.iterdir() if "lampy" in p.name} if folder.is_dir() else set()


def test_dropped_results_free_their_memory_and_leave_no_file() -> None:
    x = np.random.default_rng(4).random((2000, 32))
    scaled(x)
    gc.collect()
    before, files = open_memfds(), lampy_files_in_dev_shm()
    result = scaled(x)
    assert open_memfds() > before
    del result
    gc.collect()
    assert open_memfds() == before
    assert lampy_files_in_dev_shm() == files


def mapped_inodes(pid: int) -> set[int]:
    """Inodes of lampy's shared files that process `pid` maps."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {int(line.split()[4]) for line in lines if "memfd:lampy" in line}


def open_inodes() -> set[int]:
    """Inodes of lampy's shared files this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "memfd:lampy" in os.readlink(f"/proc/self/fd/{fd}"):
                found.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:
            pass
    return found


def test_workers_unmap_what_the_caller_lets_go() -> None:
    from lampy.runtime import executors

    pids = executors.get("local", {}).worker_pids()  # type: ignore[attr-defined]
    x = lampy.asshared(np.random.default_rng(5).random((2000, 32)))
    y = scaled(x)
    held = set().union(*(mapped_inodes(pid) for pid in pids))
    assert held, "kept mapped for the next chunks (no page faults again)"
    scaled(x)
    assert set().union(*(mapped_inodes(pid) for pid in pids)) <= held | open_inodes()
    del x, y
    for _ in range(3):  # outputs are kept for reuse: push them out with larger ones
        scaled(lampy.asshared(np.ones((2000 * 40, 32))))
    gc.collect()
    deadline = time.monotonic() + 10
    while True:
        mapped = set().union(*(mapped_inodes(pid) for pid in pids))
        if mapped <= open_inodes() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert mapped <= open_inodes(), "workers map only files the caller still holds"


def test_a_file_goes_to_a_worker_once_and_workers_map_a_bounded_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file's descriptor is passed to a worker once (later chunks name it), and a worker maps
    at most FILES_KEPT files: the caller tells it to forget the oldest beyond that."""
    from lampy.runtime import executors
    from lampy.runtime.executors import _local

    passed: list[int] = []
    send_fds = _local.send_fds

    def counted(conn: Any, fds: list[int]) -> None:
        passed.extend(fds)
        send_fds(conn, fds)

    monkeypatch.setattr(_local, "send_fds", counted)
    monkeypatch.setattr(_local, "FILES_KEPT", 3)
    x = lampy.asshared(np.arange(4000.0).reshape(1000, 4))
    np.testing.assert_array_equal(scaled(x), 2 * x)
    first = len(passed)
    np.testing.assert_array_equal(scaled(x), 2 * x)  # the input again: named, not passed
    assert len(passed) - first < first
    inputs = [lampy.asshared(np.full((1000, 4), float(i))) for i in range(6)]  # six files
    for i, each in enumerate(inputs):
        np.testing.assert_array_equal(scaled(each, 3.0), 3.0 * i)
    pids = executors.get("local", {}).worker_pids()  # type: ignore[attr-defined]
    assert pids
    for pid in pids:
        assert len(mapped_inodes(pid)) <= 3


def test_join_in_place_refuses_what_is_not_laid_out_for_it() -> None:
    s = lampy.empty((10, 2))
    s[:] = np.arange(20.0).reshape(10, 2)
    assert shm.join_in_place([s[:4], s[4:]]) is not None  # adjacent: a view, no copy
    assert shm.join_in_place([s[4:], s[:4]]) is None  # out of order
    assert shm.join_in_place([s[:4], s[5:]]) is None  # a gap
    assert shm.join_in_place([np.zeros((4, 2)), s[4:]]) is None  # not a fresh output
    assert shm.join_in_place([np.zeros((4, 2)), np.ones((6, 2))]) is None


def test_auto_fan_out_puts_the_probes_rows_in_place_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """An auto plan reuses the probe's rows (computed here) as chunk 0: they are copied into
    the workers' output once, and the answer is still one shared array equal to numpy's."""
    from lampy.regions import _runner as runner_module

    original = runner_module._timed

    def heavy(job: object, chunk: int) -> tuple[float, object]:
        _, outcome = original(job, chunk)  # type: ignore[arg-type]
        start, stop = job.chunks[chunk]  # type: ignore[attr-defined]
        return 1e-3 * (stop - start), outcome  # 1 ms per row: fan-out clearly pays

    monkeypatch.setattr(runner_module, "_timed", heavy)
    f = lampy.elemwise(executor="local")(lambda x: (np.sqrt(x), x.astype(np.float32)))
    from lampy.runtime import executors

    pool = executors.get("local", {})
    pool.start()
    deadline = time.monotonic() + 60
    while not pool.is_warm():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    x = np.random.default_rng(9).random((5000, 4))
    assert f.explain(x).fan_out
    root, narrow = f(x)
    assert np.array_equal(root, np.sqrt(x)) and np.array_equal(narrow, x.astype(np.float32))
    assert shm.is_shared(root) and shm.is_shared(narrow)


def warm_pool() -> LocalExecutor:
    executor = executors.get("local", {})
    assert isinstance(executor, LocalExecutor)
    executor.start()
    deadline = time.monotonic() + 60
    while not executor.is_warm():
        assert time.monotonic() < deadline, "the pool did not start"
        time.sleep(0.01)
    return executor


@pytest.mark.skipif(not readable(), reason="workers cannot read this process's memory here")
def test_workers_read_their_first_chunks_rows_from_the_caller() -> None:
    pool = warm_pool()
    assert pool.pool.reads_caller()
    chunks = pool.size  # one chunk per worker: every worker reads its own rows

    @lampy.elemwise(chunks=chunks, executor="local")
    def clobbered(x: np.ndarray) -> np.ndarray:
        y = x * 3
        x[:] = -1  # a copy's rows: the caller's array is not touched
        return y

    x = np.random.default_rng(4).random((5000, 7))
    keep = x.copy()
    before = serial.snapshot()
    got = clobbered(x)
    spent = serial.since(before)
    np.testing.assert_array_equal(got, keep * 3)
    np.testing.assert_array_equal(x, keep)
    assert spent.get("copy threads", 0.0) == 0.0 and spent.get("copy", 0.0) == 0.0
    # later chunks come through the arena, copied while the first ones run
    more = lampy.elemwise(chunks=4 * chunks, executor="local")(clobbered.__wrapped__)
    np.testing.assert_array_equal(more(x), keep * 3)
    np.testing.assert_array_equal(x, keep)


def test_inputs_workers_cannot_read_in_place_are_copied_here() -> None:
    pool = warm_pool()

    def mixed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * 2 + b[:, :1]

    f = lampy.elemwise(chunks=pool.size, executor="local")(mixed)
    x = np.random.default_rng(9).random((4000, 8))
    for view in (x[::2], x[:, ::3], np.asfortranarray(x), x.astype(">f8")):
        plain = x[: len(view)]  # next to a strided split array: both are copied here
        np.testing.assert_array_equal(f(view, plain), mixed(view, plain))
        np.testing.assert_array_equal(f(plain, view), mixed(plain, view))


def test_inputs_are_copied_here_when_workers_cannot_read_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = warm_pool()
    monkeypatch.setattr(pool.pool, "reads_caller", lambda: False)
    x = np.random.default_rng(5).random((4000, 8))
    assert copied_bytes_during(lambda: scaled(x)) > 0.0
    np.testing.assert_array_equal(scaled(x), x * 2)


def test_a_worker_that_cannot_read_the_caller_says_so_at_start() -> None:
    assert not _can_read((os.getpid(), 0, b"\x01\x02"))  # address 0: unreadable anywhere
    assert not _can_read(None)
    if readable():
        probe = np.frombuffer(b"lampy", np.uint8).copy()
        address = int(probe.__array_interface__["data"][0])
        assert _can_read((os.getpid(), address, probe.tobytes()))


def test_read_into_reports_an_unreadable_address() -> None:
    with pytest.raises(CannotRead):
        read_into(os.getpid(), 8, np.empty(4, np.uint8))


def add_out(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.add(a, b, out=out)


def given_out(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.full(x.shape[0], out is not None)


def test_a_function_with_numpys_out_parameter_computes_into_the_output() -> None:
    warm_pool()
    a = lampy.asshared(np.random.default_rng(6).random((6000, 4)))
    b = np.random.default_rng(7).random((6000, 4))
    f = lampy.elemwise(chunks=6, executor="local")(add_out)
    got = f(a, b)
    np.testing.assert_array_equal(got, a + b)
    assert shm.is_shared(got)
    # every chunk but the one that described the rows was given its rows of the output
    flags = lampy.elemwise(chunks=6, executor="local")(given_out)(a)
    assert flags.sum() >= 5000 - 1000 and not flags.all()
    with lampy.using(executor="inline"):
        assert not lampy.elemwise(chunks=6)(given_out)(a).any()


def test_out_is_passed_only_as_numpys_convention_and_when_left_unset() -> None:
    def other_default(x: np.ndarray, out: str = "rows") -> Any:
        return x

    def positional(x: np.ndarray, out: Any = None) -> Any:
        return x

    def keyword_only(x: np.ndarray, *, out: Any = None) -> Any:
        return x

    def varargs(*args: Any, **kwargs: Any) -> Any:
        return args[0]

    assert _takes_out((other_default, (Part(0),), {})) is None
    assert _takes_out((positional, (Part(0),), {})) is not None
    assert _takes_out((positional, (Part(0), None), {})) is None  # given by position
    assert _takes_out((keyword_only, (Part(0),), {"out": None})) is None  # given by name
    assert _takes_out((keyword_only, (Part(0),), {})) is not None
    assert _takes_out((varargs, (Part(0),), {})) is None
    assert _takes_out((len, (Part(0),), {})) is None  # no `out` parameter


def test_a_function_that_ignores_out_still_gives_its_own_result() -> None:
    @lampy.elemwise(chunks=5, executor="local")
    def fresh(x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if out is not None:
            out[0][:] = -7  # garbage into the output: the returned arrays are what counts
        return x + 1, (x * 2).astype(np.float32)

    x = np.random.default_rng(8).random((5000, 3))
    got = fresh(x)
    np.testing.assert_array_equal(got[0], x + 1)
    np.testing.assert_array_equal(got[1], (x * 2).astype(np.float32))


KEPT: list[np.ndarray] = []  # in a worker: what `keeps` held on to


def in_output_rows(x: np.ndarray) -> np.ndarray:
    """True in rows whose chunk ran with its allocations steered into the output."""
    from numpy._core.multiarray import get_handler_name

    return np.full(x.shape[0], float(get_handler_name() == "lampy_output_rows"))


def keeps(x: np.ndarray) -> np.ndarray:
    result = x + 1
    KEPT.append(result)  # lives on in the worker, in the output's memory
    return result * 1  # not the array in the output's rows: copied over it


@pytest.mark.skipif(not in_place.available(), reason="numpy without memory handlers")
def test_plain_results_are_allocated_in_their_output_rows() -> None:
    pool = warm_pool()
    x = lampy.asshared(np.random.default_rng(10).random((400_000, 1)))
    flags = lampy.elemwise(chunks=8, executor="local")(in_output_rows)(x)
    # all but the chunks sent before the first one described its rows (one per worker)
    assert flags.sum() >= (8 - pool.size) * 50_000 and not flags.all()
    cases: list[Any] = [
        lambda a: a + 1,
        lambda a: np.sqrt(a * a + 1.0),
        lambda a: (a * 2)[:, ::-1].copy(),
        lambda a: (a + 1, a * 2),  # two results of one size: either may get either's rows
        lambda a: (a * 2, np.exp(a)),
        lambda a: {"twice": a * 2, "n": np.ones(len(a), np.int32)},
        lambda a: (a * 2).astype(np.float32),
        lambda a: np.zeros_like(a) + a,
        lambda a: np.zeros((len(a), 1)) + a,  # zeroed in the rows (numpy drops the GIL there)
        lambda a: np.zeros((len(a), 7))[:, :1] + a,  # zeroed by numpy, without the GIL
        lambda a: np.concatenate([a, a])[: len(a)] + 0,
    ]
    for case in cases:
        got = lampy.elemwise(chunks=4, executor="local")(case)(x)
        want = case(np.asarray(x))
        if isinstance(want, dict):
            assert all(np.array_equal(got[k], want[k]) for k in want)
        elif isinstance(want, tuple):
            assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not in_place.available(), reason="numpy without memory handlers")
def test_a_worker_keeping_an_array_in_the_output_is_replaced() -> None:
    pool = warm_pool()
    before = set(pool.worker_pids())
    x = np.random.default_rng(11).random((400_000, 1))
    f = lampy.elemwise(chunks=4, executor="local")(keeps)
    first = f(x)
    np.testing.assert_array_equal(first, x + 1)
    np.testing.assert_array_equal(f(x), x + 1)
    np.testing.assert_array_equal(first, x + 1)  # a later call changed nothing in it
    assert set(pool.worker_pids()) != before  # those that kept one were let go


@pytest.mark.skipif(not in_place.available(), reason="numpy without memory handlers")
def test_a_chunk_making_many_arrays_gets_numpys_handler_back() -> None:
    from numpy._core.multiarray import get_handler_name

    out = np.empty((100_000, 1))
    x = np.ones_like(out)
    with in_place.results_into((out,)) as slots:
        first = x + 1  # the result's size: its rows
        assert np.shares_memory(first, out) and get_handler_name() == "lampy_output_rows"
        for _ in range(in_place.ALLOCATIONS):
            np.ones(3) + 1
        assert slots.exhausted and get_handler_name() != "lampy_output_rows"
        del first
        second = x + 2  # the rows are free again, but the handler is numpy's
        assert not np.shares_memory(second, out)
    assert not slots.held()
    np.testing.assert_array_equal(second, x + 2)
