"""`AiohttpTransport`: the client's HTTP to an OpenLambda worker (see _transport.py)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from lampy._errors import FrameError
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._transport import SMALL_BYTES, TEXT_BYTES, Reply, Transport


class _FramePayload(Payload):
    """A frame written slice by slice with a known size, so aiohttp sends Content-Length."""

    def __init__(self, frame: frames.Outgoing) -> None:
        super().__init__(frame, content_type="application/octet-stream")
        self._frame = frame
        self._size = frame.size

    async def write(self, writer: AbstractStreamWriter) -> None:
        for piece in self._frame:  # slices: asyncio copies whatever a write cannot send now
            await writer.write(piece)
            await writer.drain()

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a lampy frame is binary")


class AiohttpTransport(Transport):
    """HTTP to an OpenLambda worker through one pooled session (made on the loop that uses it)."""

    cut_short = (OSError, asyncio.IncompleteReadError, aiohttp.ClientError)

    def __init__(self, url: str, concurrency: int, secret: bytes) -> None:
        self.url, self.concurrency, self.secret = url, concurrency, secret
        self._session: aiohttp.ClientSession | None = None

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.concurrency)
            self._session = aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20)
        data = frame.join() if frame.size <= SMALL_BYTES else _FramePayload(frame)
        async with self._session.post(
            self.url, data=data, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            length = response.content_length
            if response.status != 200 or length is None:  # a text: its start is enough
                return Reply(response.status, await response.content.read(TEXT_BYTES))
            head = await response.content.readexactly(min(length, frames.HEAD_BYTES))
            reader = frames.Reader(head, self.secret)  # allocates once the head is signed
            if reader.total != length:
                raise FrameError(f"answer of {length:,} bytes does not match its frame")
            while reader.missing:
                chunk = await response.content.readany()
                if not chunk:
                    raise aiohttp.ClientPayloadError(
                        f"answer ended after {reader.got:,} of {length:,} bytes"
                    )
                reader.feed(chunk)
            return Reply(200, reader=reader)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
