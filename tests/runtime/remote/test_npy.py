from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lampy._errors import RemoteArrayError
from lampy.runtime.remote import _npy


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 7), min_size=1, max_size=4),
    st.sampled_from(["float64", "int32", "float32", "datetime64[s]", "complex64"]),
    st.booleans(),
    st.integers(1, 100),
)
def test_written_file_is_the_parts_joined(
    tmp_path_factory: pytest.TempPathFactory, rows: list[int], dtype: str, strided: bool, block: int
) -> None:
    """Any parts, strided or not, in blocks of any size: np.load reads back exactly what
    np.concatenate gives, and the metadata names where the data starts."""
    rng = np.random.default_rng(sum(rows))
    parts = []
    for i, n in enumerate(rows):
        values = rng.integers(0, 1000, size=(n, 6 if strided else 3))
        # Mixed numeric dtypes join as numpy promotes them; dates only with dates.
        kind = dtype if i % 2 == 0 or dtype.startswith("datetime") else "int16"
        part = values.astype(kind)
        parts.append(part[:, ::2] if strided else part)
    path = tmp_path_factory.mktemp("npy") / "joined.npy"
    _npy.WRITE_BLOCK_BYTES, kept = block, _npy.WRITE_BLOCK_BYTES
    try:
        meta = _npy.write(path, parts)
    finally:
        _npy.WRITE_BLOCK_BYTES = kept
    want = np.concatenate(parts, axis=0)
    got = np.load(path)
    assert got.dtype == want.dtype and got.shape == want.shape == meta.shape
    np.testing.assert_array_equal(got, want)
    with open(path, "rb") as file:
        assert _npy.read_meta(file, str(path)).offset == meta.offset
    assert path.stat().st_size == meta.offset + meta.nbytes


def test_a_write_that_fails_leaves_no_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RemoteArrayError, match="cannot write"):
        _npy.write(blocker / "a.npy", [np.zeros(3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
