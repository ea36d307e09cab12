"""Frames: how tasks and results travel between the executor and the deployed handler.

A frame is binary and versioned; numpy buffers travel out of band (pickle protocol 5) and are
written as they are, never joined into one bytes object. Every frame is signed with
HMAC-SHA256 under the shared secret, and the tag is checked before anything is unpickled:
unpickling is running code, so an unsigned frame must never reach `pickle.loads`.

Nothing is allocated for a frame before its sender is known: the fixed-size prefix, which
declares the frame's lengths, is signed on its own (the head tag), so a receiver reads those
`HEAD_BYTES`, checks them, and only then makes room for what they declare. The prefix also
carries the frame's time and a random nonce: a frame outside the time window, with a time that
is not finite, or whose nonce this process has seen, is refused (`Replayed`) before anything
else is read, so a captured task or answer cannot be played again.

The whole frame's tag comes last, so both ends hash while the bytes move (the sender slice by
slice as it writes, the receiver as slices arrive) instead of in a separate pass before sending
or after receiving; a receiver still unpickles nothing until the whole frame is in and the tag
matches.

Layout (integers little-endian):

    offset  size  field
    0       4     magic b"LMPY"
    4       1     format version
    5       1     kind (TASK, RESULT, PING, PONG, MISSING, MISMATCH, COORDINATE, COMBINE)
    6       2     reserved, zero
    8       4     header length H
    12      8     body length B
    20      8     time the frame was made (Unix seconds, float64)
    28      16    nonce (random)
    44      32    head tag: HMAC-SHA256 of bytes 0-43
    76      H     header: u16 n, n bytes "python numpy cloudpickle" versions, u32 count of
                  out-of-band buffers, u64 pickle length, one u64 per buffer
    76+H    B     body: the pickle, then each buffer, at offsets (from the frame's start)
                  aligned to 64 bytes
    76+H+B  32    HMAC-SHA256 of everything before it
"""

from __future__ import annotations

import hashlib
import hmac
import platform
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np

from lampy._errors import BadSignature, FrameError, TooLarge, VersionMismatch
from lampy.runtime._codec import MAX_FRAME_BYTES, dumps_out_of_band, layout_of, loads, padding
from lampy.runtime._secret import Freshness, nonce

MAGIC = b"LMPY"
FORMAT = 2
TASK, RESULT, PING, PONG, MISSING, MISMATCH, COORDINATE, COMBINE = range(1, 9)
KINDS = {
    COORDINATE: "coordinate",  # a whole job, for a lambda to orchestrate (_coordinator.py)
    COMBINE: "combine",  # partials to merge in a lambda
    TASK: "task",
    RESULT: "result",
    PING: "ping",
    PONG: "pong",
    MISSING: "missing",
    MISMATCH: "mismatch",
}
_PREFIX = struct.Struct("<4sBBHIQd16s")
PREFIX_BYTES = _PREFIX.size
TAG_BYTES = 32
HEAD_BYTES = PREFIX_BYTES + TAG_BYTES  # what a receiver reads before it knows the sender
SLICE = 1 << 20  # large buffers are hashed and written in slices of this size
MAX_HEADER_BYTES = 1 << 16
OUT_OF_BAND_BYTES = 1 << 16  # smaller buffers are cheaper in band
VERSIONS = f"{platform.python_version()} {np.__version__} {cloudpickle.__version__}"

Buffer = bytes | bytearray | memoryview
FRESHNESS = Freshness()  # the nonces of every frame this process took


class Replayed(BadSignature):
    """A signed frame refused for its time or nonce: replayed, too old, or from the future."""


@dataclass
class Frame:
    kind: int
    versions: str
    value: Any


class Outgoing:
    """A frame ready to send: its size, and its bytes in slices, signed as they are taken.

    Iterate once: the HMAC is computed during iteration and its tag is the last slice.
    """

    def __init__(self, parts: list[Buffer], secret: bytes) -> None:
        self.parts, self.secret = parts, secret
        self.size = sum(memoryview(p).nbytes for p in parts) + TAG_BYTES

    def __iter__(self) -> Iterator[Buffer]:
        mac = hmac.new(self.secret, digestmod=hashlib.sha256)
        for part in self.parts:
            if len(part) <= SLICE:
                mac.update(part)
                yield part
                continue
            view = memoryview(part)
            for start in range(0, view.nbytes, SLICE):
                piece = view[start : start + SLICE]
                mac.update(piece)
                yield piece
        yield mac.digest()

    def join(self) -> bytes:
        return b"".join(self)


def encode(kind: int, value: Any, secret: bytes) -> Outgoing:
    """The frame of `value` (array data is not copied; it is signed as it is sent)."""
    data, oob = dumps_out_of_band(value, OUT_OF_BAND_BYTES)
    raws = [b.raw() for b in oob]
    versions = VERSIONS.encode()
    header = b"".join(
        [
            struct.pack("<H", len(versions)),
            versions,
            struct.pack(f"<IQ{len(raws)}Q", len(raws), len(data), *(r.nbytes for r in raws)),
        ]
    )
    start = HEAD_BYTES + len(header) + len(data)
    layout, end = layout_of([r.nbytes for r in raws], start)
    body: list[Buffer] = [data]
    for (offset, _), raw in zip(layout, raws, strict=True):
        if pad := offset - start:
            body.append(bytes(pad))
        body.append(raw.cast("B") if raw.format != "B" else raw)
        start = offset + raw.nbytes
    body_bytes = end - HEAD_BYTES - len(header)
    prefix = _PREFIX.pack(MAGIC, FORMAT, kind, 0, len(header), body_bytes, time.time(), nonce())
    head_tag = hmac.new(secret, prefix, hashlib.sha256).digest()
    return Outgoing([prefix + head_tag + header, *body], secret)


def check_head(
    head: Buffer, secret: bytes, max_bytes: int | None = None, freshness: Freshness | None = None
) -> int:
    """The whole frame's length, from its first HEAD_BYTES bytes, once they are signed, fresh
    and new; refuses bad, huge, unsigned or replayed frames without reading further."""
    view = memoryview(head)[:HEAD_BYTES]
    if view[: len(MAGIC)] != MAGIC[: view.nbytes]:
        raise FrameError(f"not a lampy frame (starts with {bytes(view[: len(MAGIC)])!r})")
    if view.nbytes < HEAD_BYTES:
        raise FrameError(
            f"truncated frame: {view.nbytes} bytes, a frame has at least {HEAD_BYTES + TAG_BYTES}"
        )
    _, version, kind, _, header, body, when, once = _PREFIX.unpack_from(view)
    max_bytes = MAX_FRAME_BYTES if max_bytes is None else max_bytes
    if version != FORMAT:
        raise FrameError(f"lampy frame format {version}, this side speaks {FORMAT}: upgrade lampy")
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if header > MAX_HEADER_BYTES:
        raise FrameError(
            f"malformed frame: a header of {header:,} bytes (at most {MAX_HEADER_BYTES:,})"
        )
    if body > max_bytes:
        raise TooLarge(
            f"frame of {header + body:,} bytes refused: the limit is {max_bytes:,} "
            "(LAMPY_MAX_FRAME_BYTES)"
        )
    expected = hmac.new(secret, view[:PREFIX_BYTES], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, view[PREFIX_BYTES:]):
        raise _mismatch()
    stale = (freshness or FRESHNESS).check(when, bytes(once))
    if stale is not None:
        raise Replayed(f"{KINDS[kind]} frame refused: {stale}")
    return HEAD_BYTES + int(header) + int(body) + TAG_BYTES


class Reader:
    """Receives one frame into a buffer of its declared size, hashing bytes as they arrive.

    Made from the frame's first HEAD_BYTES: the buffer is allocated only once they are
    signed, fresh and new (`check_head`).
    """

    def __init__(
        self,
        head: Buffer,
        secret: bytes,
        max_bytes: int | None = None,
        freshness: Freshness | None = None,
    ) -> None:
        self.total = check_head(head, secret, max_bytes, freshness)
        self.buffer = bytearray(self.total)
        self.mac = hmac.new(secret, digestmod=hashlib.sha256)
        self.got = 0
        self.feed(head)

    @property
    def missing(self) -> int:
        return self.total - self.got

    def feed(self, chunk: Buffer) -> None:
        n = len(chunk)
        if n > self.missing:
            raise FrameError(f"frame longer than declared: {self.got + n:,} of {self.total:,}")
        memoryview(self.buffer)[self.got : self.got + n] = chunk
        self.take(n)

    def take(self, n: int) -> None:
        """`n` more bytes were written into `buffer` at `got` (read straight into it)."""
        if n > self.missing:
            raise FrameError(f"frame longer than declared: {self.got + n:,} of {self.total:,}")
        signed_end = self.total - TAG_BYTES
        if self.got < signed_end:
            self.mac.update(memoryview(self.buffer)[self.got : min(self.got + n, signed_end)])
        self.got += n

    def frame(self) -> Frame:
        """The frame, once complete and correctly signed; nothing is unpickled before."""
        if self.missing:
            raise FrameError(f"truncated frame: {self.got:,} bytes of {self.total:,}")
        return _load(memoryview(self.buffer), self.mac.digest())


def decode(
    frame: Buffer, secret: bytes, max_bytes: int | None = None, freshness: Freshness | None = None
) -> Frame:
    """Check head, length and tag, then versions, then unpickle (buffers are views into
    `frame`)."""
    view = memoryview(frame)
    total = check_head(view, secret, max_bytes, freshness)
    if view.nbytes != total:
        raise FrameError(f"truncated frame: {view.nbytes:,} bytes of {total:,}")
    return _load(view, hmac.new(secret, view[: total - TAG_BYTES], hashlib.sha256).digest())


def _load(view: memoryview, digest: bytes) -> Frame:
    if not hmac.compare_digest(digest, view[-TAG_BYTES:]):
        raise _mismatch()
    kind, header_len = _PREFIX.unpack_from(view)[2:5:2]
    header = view[HEAD_BYTES : HEAD_BYTES + header_len]
    try:
        (n,) = struct.unpack_from("<H", header)
        versions = bytes(header[2 : 2 + n]).decode()
        count, pickle_len = struct.unpack_from("<IQ", header, 2 + n)
        lengths = struct.unpack_from(f"<{count}Q", header, 2 + n + 12)
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed frame header: {exc}") from None
    check_versions(versions)
    offset = HEAD_BYTES + header_len + pickle_len
    buffers = []
    for length in lengths:
        offset += padding(offset)
        buffers.append(view[offset : offset + length])
        offset += length
    if offset != view.nbytes - TAG_BYTES:
        raise FrameError("malformed frame: buffer lengths do not add up to the body length")
    start = HEAD_BYTES + header_len
    try:
        value = loads(view[start : start + pickle_len], buffers)
    except Exception as exc:
        raise FrameError(f"cannot unpickle a {KINDS[kind]} frame: {exc!r}") from exc
    return Frame(kind, versions, value)


def _mismatch() -> BadSignature:
    return BadSignature(
        "frame signature does not match: the two ends use different LAMPY_SECRET values "
        "(redeploy with `lampy deploy`), or the frame was altered"
    )


def check_versions(theirs: str) -> None:
    """Refuse a peer on another Python minor version: cloudpickled functions would not load."""
    ours = VERSIONS.split()
    other = theirs.split() or ["unknown"]
    if ours[0].rsplit(".", 1)[0] != other[0].rsplit(".", 1)[0]:
        raise VersionMismatch(
            f"Python versions differ: this side runs Python {ours[0]}, the other side "
            f"Python {other[0]}; cloudpickle cannot move functions between Python minor "
            "versions. Run lampy with the Python minor version of the OpenLambda sandbox."
        )
