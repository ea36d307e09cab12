"""Transports: how a frame reaches lampy's lambda and its answer comes back.

One method, `post`: send a signed frame, return the answer (its status, and its body or a
reader that took the frame in as it arrived). `AiohttpTransport` speaks HTTP to an OpenLambda
worker from the client; `ThreadTransport` does the same with the standard library alone, for a
coordinator inside a sandbox (which has numpy and cloudpickle, not aiohttp);
`lampy.testing.InProcessTransport` calls the real handler in this process, for tests.
A transport raises `ConnectionError` (an OSError) for a connection cut short.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import urllib.parse
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lampy._errors import FrameError
from lampy.runtime.openlambda import _frames as frames

SMALL_BYTES = 1 << 16  # smaller frames are joined: one write beats several
TEXT_BYTES = 1 << 16  # what is read of an answer that is not a frame (an error text)


@dataclass
class Reply:
    """An answer: its status, and its body, or for a frame the reader that took it in."""

    status: int
    body: bytes | bytearray = b""
    reader: frames.Reader | None = None


class Transport(ABC):
    """One method: POST a frame to the lambda, return the answer."""

    @abstractmethod
    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply: ...

    #: What a cut connection raises through this transport (a platform failure, retried).
    cut_short: tuple[type[BaseException], ...] = (OSError, asyncio.IncompleteReadError)

    async def close(self) -> None:  # noqa: B027 (most transports hold nothing)
        """Release connections."""


class ThreadTransport(Transport):
    """HTTP with the standard library: each call blocks one of `concurrency` threads.

    What a coordinator inside a sandbox calls its own worker with (no aiohttp there). Each
    thread keeps one kept-alive connection; the answer is read by its Content-Length into a
    frame reader, which allocates only once the frame's head is signed.
    """

    def __init__(self, url: str, concurrency: int, secret: bytes) -> None:
        self.url, self.secret = url, secret
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path or "/"
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="lampy-call")
        self._local = threading.local()

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._pool, self._post, frame, timeout)
        return await asyncio.wait_for(call, timeout)

    def _post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        connection.timeout = timeout
        self._local.connection = None
        try:
            connection.putrequest("POST", self.path, skip_accept_encoding=True)
            connection.putheader("Content-Type", "application/octet-stream")
            connection.putheader("Content-Length", str(frame.size))
            connection.endheaders()
            for piece in frame:
                connection.send(piece)
            response = connection.getresponse()
            reply = self._answer(response)
        except (http.client.HTTPException, OSError) as exc:
            connection.close()
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            connection.close()
            raise
        if response.will_close:
            connection.close()
        else:
            self._local.connection = connection
        return reply

    def _answer(self, response: http.client.HTTPResponse) -> Reply:
        header = response.getheader("Content-Length")
        if response.status != 200 or header is None:
            body = response.read(TEXT_BYTES)
            response.read()  # the rest of a long text, so the connection can be reused
            return Reply(response.status, body)
        length = int(header)
        head = response.read(min(length, frames.HEAD_BYTES))
        reader = frames.Reader(head, self.secret)  # allocates once the head is signed
        if reader.total != length:
            raise FrameError(f"answer of {length:,} bytes does not match its frame")
        view = memoryview(reader.buffer)
        while reader.missing:
            got = response.readinto(view[reader.got : reader.got + frames.SLICE])
            if not got:
                raise ConnectionError(f"answer ended after {reader.got:,} of {length:,} bytes")
            reader.take(got)
        return Reply(200, reader=reader)

    async def close(self) -> None:
        self._pool.shutdown(wait=False)


if TYPE_CHECKING:
    from lampy.runtime.openlambda._aiohttp import AiohttpTransport

__all__ = ["AiohttpTransport", "Reply", "ThreadTransport", "Transport"]


def __getattr__(name: str) -> Any:
    """`AiohttpTransport`, imported on first use: a sandbox has no aiohttp."""
    if name == "AiohttpTransport":
        from lampy.runtime.openlambda._aiohttp import AiohttpTransport

        return AiohttpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
