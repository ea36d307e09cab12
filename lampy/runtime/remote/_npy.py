"""What a `.npy` file holds, read from its header: the facts a row-range read needs.

Shared by the server (which checks files before serving them) and by references to local
files, so both refuse the same files with the same words.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lampy._errors import RemoteArrayError


@dataclass(frozen=True)
class NpyMeta:
    """Shape, dtype, storage order, where the data starts, and the file's version."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    offset: int
    version: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": self.fortran_order,
            "offset": self.offset,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str) -> NpyMeta:
        try:
            descr = record["dtype"]
            if isinstance(descr, list):  # structured dtypes: JSON turned tuples into lists
                descr = [tuple(field) for field in descr]
            return cls(
                tuple(int(n) for n in record["shape"]),
                np.lib.format.descr_to_dtype(descr),
                bool(record["fortran_order"]),
                int(record["offset"]),
                str(record["version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteArrayError(f"{where}: malformed metadata {record!r} ({exc})") from None


def version_of(stat: os.stat_result) -> str:
    """A file's version: changes whenever it is rewritten (mtime in ns, size)."""
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


def read_meta(file: BinaryIO, where: str) -> NpyMeta:
    """The metadata of an open `.npy` file; refuses non-npy, object and truncated files."""
    stat = os.fstat(file.fileno())
    try:
        major, minor = np.lib.format.read_magic(file)
        read_header = (
            np.lib.format.read_array_header_1_0
            if (major, minor) == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(file)
    except (ValueError, OSError, SyntaxError) as exc:
        raise RemoteArrayError(
            f"{where} is not a .npy file numpy can read ({exc}); write it with numpy.save"
        ) from None
    if dtype.hasobject:
        raise RemoteArrayError(
            f"{where} holds Python objects (dtype {dtype}), which a reader must unpickle; "
            "only plain numeric and fixed-size dtypes are served"
        )
    meta = NpyMeta(tuple(shape), dtype, bool(fortran_order), file.tell(), version_of(stat))
    if stat.st_size < meta.offset + meta.nbytes:
        raise RemoteArrayError(
            f"{where} is truncated: its header declares {meta.nbytes:,} data bytes "
            f"({shape} {dtype}) but the file holds {max(stat.st_size - meta.offset, 0):,}"
        )
    return meta


def header_bytes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    """The `.npy` header (magic included) of a C-ordered array of this shape and dtype."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, header)
    except ValueError:  # a header over 64 KiB (very many dims or fields) needs format 2.0
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, header)
    return out.getvalue()


WRITE_BLOCK_BYTES = 64 << 20  # a part converted to the file's dtype this much at a time


def write(path: Path, parts: Sequence[np.ndarray]) -> NpyMeta:
    """Write the parts joined along axis 0 as one C-ordered `.npy` file at `path`, with the
    dtype np.concatenate gives, atomically (a hidden partial file, then a rename: a reader of
    an earlier file at `path` keeps its own bytes). Returns the new file's metadata.

    The bytes go in with plain writes, a part's own where its dtype and layout are the file's
    (converted a block at a time otherwise): filling a memory map of the file instead took a
    page fault per page, twice the time (a 2 GiB array published before any chunk leaves)."""
    dtype = np.result_type(*parts)
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RemoteArrayError(f"cannot write {path}: {exc}") from None
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    header = header_bytes(shape, np.dtype(dtype))
    try:
        with open(partial, "wb") as file:
            file.write(header)
            for part in parts:
                rows = max(1, WRITE_BLOCK_BYTES // max(part[:1].nbytes, 1))
                for lo in range(0, part.shape[0], rows):
                    block = np.ascontiguousarray(part[lo : lo + rows], dtype=dtype)
                    file.write(block.reshape(-1).view(np.uint8).data)
        os.replace(partial, path)
    except OSError as exc:
        raise RemoteArrayError(f"cannot write {path}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return NpyMeta(shape, np.dtype(dtype), False, len(header), version_of(path.stat()))
