"""Results by reference: large chunk results go to the client's array server, not into answers.

An answer frame carries every byte of a chunk's result through the platform's front door and
is hashed on both ends. When the client offers a place (`offered`: a directory of its array
server, when one runs), the handler PUTs each result array over `RESULT_BYTES` as a `.npy`
file there and answers a `Stored` reference instead.
The client's server runs on the client's machine, so the client then maps the file it received
(no second transfer) and removes it at once; files of answers it did not take (a retry's, a
backup's twin) go with the job's directory when the job ends.

Where an elemwise result ends up is the `results` option of the openlambda executor (a `Sink`):

- "auto" (default): an ordinary ndarray, equal to numpy bit for bit; results travel by
  reference when the client's array server runs (publishing a large argument started it),
  none is started for results alone;
- "mmap:PATH": a `.npy` file at PATH, returned memory-mapped (a `numpy.memmap`);
- "remote": a `.npy` file on the client's array server, returned as a `lampy.remote`
  reference that the next region takes as an argument (each of its chunks reads its rows).
  It lives until the client process exits (the server's directory is removed then).

Both of these start the server when needed. The handler imports this module inside sandboxes:
it needs only the standard library, numpy and lampy.
"""

from __future__ import annotations

import shutil
import threading
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lampy._errors import OptionError, RemoteArrayError, ResultError
from lampy.runtime._tree import map_leaves
from lampy.runtime.remote import _publish as publish
from lampy.runtime.remote._npy import write
from lampy.runtime.remote._reference import RemoteArray, upload

# Chosen with bench/bench_remote.py ("result threshold" rows: 8 chunks, `lampy worker` on
# loopback, 3 runs): results of 128 KiB per chunk came back faster in the answers (1.02x-1.7x);
# at 512 KiB answers won one run by 1.4x and references two by 1.03x-1.12x; from 2 MiB
# references won every run (1.12x-1.46x). Smaller arrays ride in the answer frame.
RESULT_BYTES = 2 << 20
MODES = '"auto", "mmap:/path/out.npy" or "remote"'


@dataclass(frozen=True)
class Stored:
    """A chunk's result array, stored by the handler as a `.npy` file on the client's server."""

    reference: RemoteArray


@dataclass(frozen=True)
class Offer:
    """Where a job's large results may go: a URL prefix (a directory of the client's server),
    the threshold in bytes, and that directory on the client's disk (never sent)."""

    url: str
    min_bytes: int
    directory: Path

    @property
    def task(self) -> tuple[str, int]:
        """What the handler is told: the URL prefix and the threshold."""
        return self.url, self.min_bytes


_running: set[str] = set()  # jobs whose result directories are in use
_running_lock = threading.Lock()


@contextmanager
def offered(job_id: str, platform_url: str, start: bool) -> Iterator[Offer | None]:
    """A place for the job's large results while it runs: a directory of this process's array
    server, if it runs (started first when `start`), else None (results travel in answers).

    Afterwards the job's directory is removed, with any other finished job's directory a late
    upload (a call abandoned by the client but still running) created again.
    """
    server = publish.serving(platform_url, start)
    if server is None:
        yield None
        return
    directory, url = server
    root = directory / "results"
    with _running_lock:
        _running.add(job_id)
    try:
        yield Offer(f"{url}/results/{job_id}/", RESULT_BYTES, root / job_id)
    finally:
        with _running_lock:
            _running.discard(job_id)
            done = [d for d in root.iterdir() if d.name not in _running] if root.is_dir() else []
        for path in done:
            shutil.rmtree(path, ignore_errors=True)


# -- in the sandbox ---------------------------------------------------------------------------


def store(value: Any, offer: tuple[str, int], name: str) -> Any:
    """`value` with each plain ndarray leaf over the threshold uploaded and replaced by a
    `Stored` reference (leaves of tuples, lists and dicts too). Files are named `name-i.npy`,
    so two attempts at a chunk never write the same file."""
    url, min_bytes = offer
    count = 0

    def one(leaf: np.ndarray) -> Any:
        nonlocal count
        if leaf.ndim == 0 or leaf.dtype.hasobject or leaf.nbytes < max(min_bytes, 1):
            return leaf
        count += 1
        target = f"{url}{name}-{count}.npy"
        try:
            return Stored(upload(target, leaf))
        except RemoteArrayError as exc:
            raise type(exc)(
                f"this chunk's result ({leaf.shape} {leaf.dtype}, {leaf.nbytes:,} bytes) could "
                f"not be stored on the client's array server: {exc}. The client runs that "
                "server on the address the platform reaches it by: check that sandboxes can "
                "connect to it, and that it is still running"
            ) from None

    return map_leaves(value, lambda leaf: one(leaf) if type(leaf) is np.ndarray else leaf)


# -- on the client ----------------------------------------------------------------------------


def collect(value: Any, offer: Offer) -> Any:
    """`value` with each `Stored` leaf mapped from the file the handler uploaded (removed at
    once: the mapping keeps its pages), or read over HTTP when the offered directory is not on
    this machine (a job re-attached from elsewhere). Refuses references outside the offer."""

    def one(leaf: Stored) -> np.ndarray:
        reference = leaf.reference
        if not reference.url.startswith(offer.url):
            raise RemoteArrayError(
                f"a chunk answered a stored result at {reference.url}, outside the place "
                f"offered ({offer.url})"
            )
        relative = urllib.parse.unquote(reference.url[len(offer.url) :])
        if "/" in relative or relative.startswith("."):
            raise RemoteArrayError(f"a stored result names a bad file {relative!r}")
        path = offer.directory / relative
        if not path.parent.is_dir():  # the server runs elsewhere (a job store): read over HTTP
            return reference.fetch()
        url = "file://" + urllib.parse.quote(str(path))
        local = RemoteArray(url, reference.meta, 0, reference.meta.shape[0])
        try:
            return local.fetch()
        finally:
            path.unlink(missing_ok=True)

    return map_leaves(value, lambda leaf: one(leaf) if type(leaf) is Stored else leaf)


@dataclass(frozen=True)
class Sink:
    """Where an elemwise region's concatenated result goes (the `results` option)."""

    mode: str = "auto"
    path: Path | None = None
    platform: str = ""  # the executor's URL: "remote" results are served where it reaches

    @classmethod
    def parse(cls, text: str) -> Sink:
        """The sink an option names; a bad one is refused before anything runs."""
        if text in ("auto", "remote"):
            return cls(text)
        if text.startswith("mmap:"):
            path = Path(text[len("mmap:") :]).expanduser()
            if path.suffix != ".npy" or path.name.startswith("."):
                raise OptionError(f"results={text!r}: name a .npy file, as mmap:/path/out.npy")
            return cls("mmap", path.absolute())
        raise OptionError(f"results must be {MODES}; got {text!r}")

    def assemble(self, parts: Sequence[Any]) -> Any:
        """The chunks' arrays joined along axis 0 into this sink's destination ("mmap" or
        "remote"), with the dtype and values np.concatenate gives, written once."""
        if not parts or not all(isinstance(p, np.ndarray) and p.ndim > 0 for p in parts):
            raise ResultError(
                f"results={self._option()} stores one array per call; this elemwise region "
                "returned something else (tuples and dicts are returned as usual only with "
                "results='auto')"
            )
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            shapes = sorted({p.shape[1:] for p in parts})
            raise ResultError(f"chunk results differ in their trailing shapes: {shapes}")
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        if self.mode == "mmap":
            assert self.path is not None
            write(self.path, parts)
            return np.load(self.path, mmap_mode="r+")
        server = publish.serving(self.platform or "http://127.0.0.1", start=True)
        if server is None:
            raise RemoteArrayError(
                f"results='remote' keeps the result on this machine's array server, but the "
                f"route from {self.platform} to this machine is unknown; use results='mmap:...'"
            )
        directory, url = server
        name = f"kept/{uuid.uuid4().hex}.npy"
        meta = write(directory / name, parts)
        return RemoteArray(f"{url}/{name}", meta, 0, shape[0])

    def _option(self) -> str:
        return f"'mmap:{self.path}'" if self.mode == "mmap" else f"{self.mode!r}"
