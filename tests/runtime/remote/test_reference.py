"""References: remote and local-file slices equal numpy slicing; bad inputs give typed errors."""

from __future__ import annotations

import itertools
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lampy
from lampy._errors import RemoteArrayError, RemoteArrayNotFound, RemoteArrayRefused
from lampy.runtime.remote._reference import RemoteArray, materialize, remote, upload

from .conftest import Server

names = itertools.count()
DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.integer_dtypes(endianness=">", sizes=(16, 64)),
    hnp.floating_dtypes(endianness="=", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="="),
    st.just(np.dtype([("x", "<f4"), ("n", "u1")])),
)


@st.composite
def arrays_and_rows(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9))
    array = draw(hnp.arrays(dtype, shape))
    start = draw(st.integers(-shape[0] - 2, shape[0] + 2))
    stop = draw(st.integers(-shape[0] - 2, shape[0] + 2))
    return array, start, stop


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=60)
@given(case=arrays_and_rows(), over_http=st.booleans())
def test_slices_equal_numpy_slices(
    server: Server, case: tuple[np.ndarray, int, int], over_http: bool
) -> None:
    array, start, stop = case
    url = server.save(f"h/{next(names)}.npy", array)
    location = url if over_http else str(server.root / url.rpartition(f"{server.url}/")[2])
    reference = remote(location)
    assert reference.shape == array.shape and reference.dtype == array.dtype
    part = reference[start:stop]
    assert isinstance(part, RemoteArray) and part.shape == array[start:stop].shape
    assert same(part.fetch(), array[start:stop])
    assert same(np.asarray(part), array[start:stop])
    assert same(part[1:][:2].fetch(), array[start:stop][1:][:2])


def test_a_reference_is_small_and_travels(server: Server) -> None:
    url = server.save("big.npy", np.zeros((1000, 100)))
    reference = remote(url)[10:20]
    moved = pickle.loads(pickle.dumps(reference))
    assert len(pickle.dumps(reference)) < 1000
    assert same(moved.fetch(), np.zeros((10, 100)))
    assert materialize(moved).shape == (10, 100) and materialize(3) == 3


def test_other_keys_read_the_rows(server: Server) -> None:
    array = np.arange(30).reshape(10, 3)
    reference = remote(server.save("keys.npy", array))
    assert same(reference[4], array[4])
    assert same(reference[::3], array[::3])
    assert same(reference[2:6, 1], array[2:6, 1])


def test_local_file_rows_are_mapped_copy_on_write(tmp_path: Path) -> None:
    array = np.arange(20.0).reshape(10, 2)
    np.save(tmp_path / "m.npy", array)
    rows = remote(f"file://{tmp_path}/m.npy")[3:5].fetch()
    rows[:] = -1  # a private mapping: the file keeps its data
    assert same(np.load(tmp_path / "m.npy"), array)


def test_upload_returns_a_reference(server: Server) -> None:
    array = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    reference = upload(f"{server.url}/up/{next(names)}.npy", array)
    assert same(reference.fetch(), np.ascontiguousarray(array))
    with pytest.raises(RemoteArrayError, match="numeric ndarray"):
        upload(f"{server.url}/x.npy", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(RemoteArrayError, match="http"):
        upload("/tmp/x.npy", array)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://host/x.npy", "use http"),
        ("http:///x.npy", "no host"),
        ("http://127.0.0.1:1/x.txt", ".npy files only"),
        ("http://127.0.0.1:1/x.npy?a=1", "no query"),
        ("file://otherhost/x.npy", "only local files"),
    ],
)
def test_bad_urls(url: str, why: str) -> None:
    with pytest.raises(RemoteArrayError, match=why):
        remote(url)


def test_nothing_listening() -> None:
    from lampy.testing import free_port

    with pytest.raises(RemoteArrayError, match="Is `lampy serve` running"):
        remote(f"http://127.0.0.1:{free_port()}/x.npy")


@pytest.mark.parametrize("over_http", [True, False], ids=["http", "file"])
def test_missing_non_npy_truncated_and_unreadable_files(server: Server, over_http: bool) -> None:
    def location(name: str) -> str:
        return f"{server.url}/{name}" if over_http else str(server.root / name)

    with pytest.raises(RemoteArrayNotFound):
        remote(location("missing.npy"))
    (server.root / "text.npy").write_text("not numpy")
    with pytest.raises(RemoteArrayError, match="not a .npy file"):
        remote(location("text.npy"))
    np.save(server.root / "short.npy", np.arange(100))
    with open(server.root / "short.npy", "r+b") as file:
        file.truncate(os.path.getsize(server.root / "short.npy") - 8)
    with pytest.raises(RemoteArrayError, match="truncated.*800 data bytes"):
        remote(location("short.npy"))
    np.save(server.root / "objects.npy", np.array([{}, []], dtype=object))
    with pytest.raises(RemoteArrayError, match="Python objects"):
        remote(location("objects.npy"))
    np.save(server.root / "fortran.npy", np.asfortranarray(np.ones((4, 3))))
    with pytest.raises(RemoteArrayError, match="Fortran order"):
        remote(location("fortran.npy"))
    np.save(server.root / "scalar.npy", np.float64(3))
    with pytest.raises(RemoteArrayError, match="0-d"):
        remote(location("scalar.npy"))
    np.save(server.root / "vector-f.npy", np.asfortranarray(np.arange(4)))  # 1-d: rows contiguous
    assert same(remote(location("vector-f.npy"))[1:3].fetch(), np.arange(1, 3))


def test_dtype_and_shape_mismatches(server: Server) -> None:
    url = server.save("expected.npy", np.zeros((5, 2), np.float32))
    assert remote(url, dtype="float32", shape=(5, 2)).shape == (5, 2)
    with pytest.raises(RemoteArrayError, match="holds float32, not the expected float64"):
        remote(url, dtype=np.float64)
    with pytest.raises(RemoteArrayError, match=r"has shape \(5, 2\), not the expected \(2, 5\)"):
        remote(url, shape=(2, 5))


def test_refused_authentication(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.save("secret.npy", np.zeros(3))
    reference = remote(url)
    monkeypatch.setenv("LAMPY_SECRET", "not the server's secret")
    with pytest.raises(RemoteArrayRefused, match="different LAMPY_SECRET"):
        remote(url)
    with pytest.raises(RemoteArrayRefused, match="different LAMPY_SECRET"):
        reference.fetch()


@pytest.mark.parametrize("over_http", [True, False], ids=["http", "file"])
def test_a_file_rewritten_or_removed_after_referencing(server: Server, over_http: bool) -> None:
    name = f"moving{over_http}.npy"
    url = server.save(name, np.zeros((6, 2)))
    reference = remote(url if over_http else str(server.root / name))
    time.sleep(0.01)
    server.save(name, np.ones((12, 2)))
    with pytest.raises(RemoteArrayError, match="rewritten after this reference was made"):
        reference[:3].fetch()
    (server.root / name).unlink()
    with pytest.raises(RemoteArrayNotFound):
        reference[:3].fetch()


def test_lampy_array_of_a_url_is_lazy_and_by_reference(server: Server) -> None:
    array = np.random.default_rng(3).standard_normal((50, 4))
    lazy = lampy.array(server.save("lazy.npy", array))
    assert lazy.shape == (50, 4)
    np.testing.assert_allclose(
        (np.exp(lazy) * 2).sum(axis=0).run(executor="inline"), (np.exp(array) * 2).sum(axis=0)
    )
    np.testing.assert_array_equal(np.asarray(lazy[10:20].T.run(executor="inline")), array[10:20].T)


def test_a_saved_graph_keeps_the_reference_not_the_data(server: Server, tmp_path: Path) -> None:
    array = np.arange(40.0).reshape(20, 2)
    reference = remote(server.save("graph.npy", array))[5:15]
    saved = lampy.save_graph(np.sqrt(lampy.array(reference)) + 1, tmp_path / "g.json")
    text = saved.read_text()
    assert reference.url in text and '"rows": [\n     5,\n     15\n    ]' in text
    assert "data" not in text and not list(tmp_path.glob("*.npy"))  # nothing read or copied
    loaded = lampy.load_graph(saved, urls=[server.url])
    np.testing.assert_array_equal(loaded.run(executor="inline"), np.sqrt(array[5:15]) + 1)
    server.save("graph.npy", array[:12])  # the file shrank: the saved rows no longer exist
    with pytest.raises(lampy.UsageError, match=r"rows 5:15 now have shape \(7, 2\)"):
        lampy.load_graph(saved, urls=[server.url])


def test_names_that_need_escaping(server: Server) -> None:
    array = np.arange(6).reshape(3, 2)
    server.save("with space/a b%.npy", array)
    for location in (
        f"{server.url}/with space/a b%25.npy",
        str(server.root / "with space/a b%.npy"),
    ):
        assert same(remote(location)[1:].fetch(), array[1:])


@pytest.mark.parametrize("size", [12, 300_000])
def test_an_upload_over_a_kept_connection_the_server_closed_is_sent_afresh(
    server: Server, size: int
) -> None:
    """A pooled keep-alive connection the server has closed meanwhile (its idle timeout; seen
    as a chunk's result failing with BrokenPipeError on OpenLambda) costs an upload nothing:
    it goes again, whole, over a fresh connection."""
    import http.client
    import socket
    import urllib.parse

    from lampy.runtime.remote import _reference

    with socket.create_server(("127.0.0.1", 0)) as listener:
        stale = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1])
        stale.connect()
        accepted, _ = listener.accept()
        accepted.close()  # the server's side of the kept connection ends
    parts = urllib.parse.urlsplit(server.url)
    with _reference._pool_lock:
        _reference._pool.setdefault(("http", parts.hostname or "", parts.port or 80), []).append(
            stale
        )
    array = np.arange(size, dtype=np.float64)  # 96 B, or 2.4 MB: more than a socket buffers
    reference = upload(f"{server.url}/up/{next(names)}.npy", array)
    assert same(reference.fetch(), array)
