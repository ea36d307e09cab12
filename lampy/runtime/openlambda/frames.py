"""Frames: how tasks and results travel between the executor and the deployed handler.

A frame is binary and versioned; numpy buffers travel out of band (pickle protocol 5) and are
written as they are, never joined into one bytes object. Every frame is signed with
HMAC-SHA256 under the shared secret, and the tag is checked before anything is unpickled:
unpickling is running code, so an unsigned frame must never reach `pickle.loads`.

Layout (integers little-endian):

    offset  size  field
    0       4     magic b"LMPY"
    4       1     format version
    5       1     kind (TASK, RESULT, PING, PONG, MISSING, MISMATCH)
    6       2     reserved, zero
    8       4     header length H
    12      8     body length B
    20      32    HMAC-SHA256 over bytes 0:20, the header and the body
    52      H     header: u16 n, n bytes "python numpy cloudpickle" versions, u32 count of
                  out-of-band buffers, u64 pickle length, one u64 per buffer
    52+H    B     body: the pickle, then each buffer, at offsets (from the frame's start)
                  aligned to 64 bytes
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np

from lampy.errors import ExecutionError
from lampy.runtime.codec import dumps_out_of_band, loads

MAGIC = b"LMPY"
FORMAT = 1
TASK, RESULT, PING, PONG, MISSING, MISMATCH = range(1, 7)
KINDS = {
    TASK: "task",
    RESULT: "result",
    PING: "ping",
    PONG: "pong",
    MISSING: "missing",
    MISMATCH: "mismatch",
}
_PREFIX = struct.Struct("<4sBBHIQ")
PREFIX_BYTES = _PREFIX.size + 32
ALIGN = 64
MAX_HEADER_BYTES = 1 << 16
OUT_OF_BAND_BYTES = 1 << 16  # smaller buffers are cheaper in band
#: Largest body accepted (LAMPY_MAX_FRAME_BYTES overrides): bigger frames are refused unread.
MAX_FRAME_BYTES = int(os.environ.get("LAMPY_MAX_FRAME_BYTES", 8 << 30))
VERSIONS = f"{platform.python_version()} {np.__version__} {cloudpickle.__version__}"

Buffer = bytes | bytearray | memoryview


class FrameError(ExecutionError):
    """A frame is malformed, truncated, too large, or not signed with our secret."""

    status = 400


class BadSignature(FrameError):
    """The HMAC tag does not match: wrong secret, or the frame was altered."""

    status = 401


class TooLarge(FrameError):
    """The frame declares more bytes than the receiver accepts."""

    status = 413


class VersionMismatch(ExecutionError):
    """The two ends run different Python minor versions, so functions cannot be unpickled."""


@dataclass
class Frame:
    kind: int
    versions: str
    value: Any


def _pad(offset: int) -> int:
    return -offset % ALIGN


def _dumps(value: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Plain pickle when it can (5x faster to start than cloudpickle), else cloudpickle.

    Plain pickle only succeeds where it stores classes and functions by a name it has checked
    here; a function or class that exists by value only fails it and goes to cloudpickle.
    """
    buffers: list[pickle.PickleBuffer] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes >= OUT_OF_BAND_BYTES:
            buffers.append(buffer)
            return False
        return True

    try:
        return pickle.dumps(value, protocol=5, buffer_callback=keep), buffers
    except Exception:
        return dumps_out_of_band(value, OUT_OF_BAND_BYTES)


def encode(kind: int, value: Any, secret: bytes) -> list[Buffer]:
    """The frame as a list of buffers to write in order (array data is not copied)."""
    data, oob = _dumps(value)
    raws = [b.raw() for b in oob]
    versions = VERSIONS.encode()
    header = b"".join(
        [
            struct.pack("<H", len(versions)),
            versions,
            struct.pack(f"<IQ{len(raws)}Q", len(raws), len(data), *(r.nbytes for r in raws)),
        ]
    )
    body: list[Buffer] = [data]
    offset = PREFIX_BYTES + len(header) + len(data)
    for raw in raws:
        if pad := _pad(offset):
            body.append(bytes(pad))
            offset += pad
        body.append(raw.cast("B") if raw.format != "B" else raw)
        offset += raw.nbytes
    body_bytes = offset - PREFIX_BYTES - len(header)
    prefix = _PREFIX.pack(MAGIC, FORMAT, kind, 0, len(header), body_bytes)
    mac = hmac.new(secret, prefix, hashlib.sha256)
    mac.update(header)
    for part in body:
        mac.update(part)
    return [prefix + mac.digest() + header, *body]


def size(parts: Sequence[Buffer]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def check_prefix(prefix: Buffer, max_bytes: int | None = None) -> int:
    """The whole frame's length, from its first PREFIX_BYTES bytes; refuses bad or huge frames."""
    if len(prefix) < PREFIX_BYTES:
        raise FrameError(f"truncated frame: {len(prefix)} bytes, a frame has at least 52")
    magic, version, kind, _, header, body = _PREFIX.unpack_from(prefix)
    max_bytes = MAX_FRAME_BYTES if max_bytes is None else max_bytes
    if magic != MAGIC:
        raise FrameError(f"not a lampy frame (starts with {bytes(magic)!r})")
    if version != FORMAT:
        raise FrameError(f"lampy frame format {version}, this side speaks {FORMAT}: upgrade lampy")
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if header > MAX_HEADER_BYTES or body > max_bytes:
        raise TooLarge(
            f"frame of {header + body:,} bytes refused: the limit is {max_bytes:,} "
            "(LAMPY_MAX_FRAME_BYTES)"
        )
    return PREFIX_BYTES + int(header) + int(body)


def decode(frame: Buffer, secret: bytes, max_bytes: int | None = None) -> Frame:
    """Check length, tag and versions, then unpickle (buffers are views into `frame`)."""
    view = memoryview(frame)
    total = check_prefix(view[:PREFIX_BYTES], max_bytes)
    if view.nbytes != total:
        raise FrameError(f"truncated frame: {view.nbytes:,} bytes of {total:,}")
    _, _, kind, _, header_len, _ = _PREFIX.unpack_from(view)
    mac = hmac.new(secret, view[: _PREFIX.size], hashlib.sha256)
    mac.update(view[PREFIX_BYTES:])
    if not hmac.compare_digest(mac.digest(), view[_PREFIX.size : PREFIX_BYTES]):
        raise BadSignature(
            "frame signature does not match: the two ends use different LAMPY_SECRET values "
            "(redeploy with `lampy deploy`), or the frame was altered"
        )
    header = view[PREFIX_BYTES : PREFIX_BYTES + header_len]
    try:
        (n,) = struct.unpack_from("<H", header)
        versions = bytes(header[2 : 2 + n]).decode()
        count, pickle_len = struct.unpack_from("<IQ", header, 2 + n)
        lengths = struct.unpack_from(f"<{count}Q", header, 2 + n + 12)
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed frame header: {exc}") from None
    check_versions(versions)
    offset = PREFIX_BYTES + header_len + pickle_len
    buffers = []
    for length in lengths:
        offset += _pad(offset)
        buffers.append(view[offset : offset + length])
        offset += length
    if offset != total:
        raise FrameError("malformed frame: buffer lengths do not add up to the body length")
    start = PREFIX_BYTES + header_len
    try:
        value = loads(view[start : start + pickle_len], buffers)
    except Exception as exc:
        raise FrameError(f"cannot unpickle a {KINDS[kind]} frame: {exc!r}") from exc
    return Frame(kind, versions, value)


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
