"""Transports: how a frame reaches lampy's lambda and its answer comes back.

One method, `post`: send a signed frame, return the answer (its status, and its body or a
reader that took the frame in as it arrived). `AiohttpTransport` speaks HTTP to an OpenLambda
worker from the client. Inside a sandbox (numpy and cloudpickle, not aiohttp) a coordinator
uses the standard library: `StreamTransport`, asyncio streams on its event loop, for its calls
(no thread per call: an OpenLambda sandbox may run only 10 threads, `limits.procs`), and
`ThreadTransport`, a blocking call in a thread, for the one call that must outlive its answer
(summoning its successor at a hand-off);
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

    What a coordinator summons its successor with (a call that outlives its own answer). Each
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


class StreamTransport(Transport):
    """HTTP/1.1 with asyncio streams (the standard library) on the caller's event loop.

    What a coordinator inside a sandbox calls its own worker with: however many calls are in
    flight, they take no thread (OpenLambda counts a sandbox's threads against its process
    limit, 10 by default). Connections are kept alive and reused, at most `concurrency` idle.
    """

    def __init__(self, url: str, concurrency: int, secret: bytes) -> None:
        self.url, self.secret, self.concurrency = url, secret, concurrency
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path or "/"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        return await asyncio.wait_for(self._post(frame), timeout)

    async def _post(self, frame: frames.Outgoing) -> Reply:
        """One exchange, never repeated here: a frame sent twice is refused as a replay, so a
        connection cut short is the caller's to retry, with a fresh frame."""
        while self._idle:  # skip kept connections the server has closed meanwhile
            reader, writer = self._idle.pop()
            if not (reader.at_eof() or writer.is_closing()):
                return await self._exchange(reader, writer, frame)
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(reader, writer, frame)

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frame: frames.Outgoing,
    ) -> Reply:
        keep = False
        try:
            head = (
                f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {frame.size}\r\n\r\n"
            )
            writer.write(head.encode())
            for piece in frame:
                writer.write(piece)
                await writer.drain()
            status, headers = await _head(reader, await reader.readline())
            reply, keep = await self._answer(reader, status, headers)
            return reply
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
        finally:
            if keep and len(self._idle) < self.concurrency:
                self._idle.append((reader, writer))
            else:
                writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, status: int, headers: dict[str, str]
    ) -> tuple[Reply, bool]:
        """The answer, and whether the connection may carry another request."""
        keep = headers.get("connection", "").lower() != "close"
        header = headers.get("content-length")
        if header is None:  # chunked or till the end (error texts only): read some, then close
            return Reply(status, await reader.read(TEXT_BYTES)), False
        length = int(header)
        if status != 200:
            body = await reader.readexactly(min(length, TEXT_BYTES))
            if length > TEXT_BYTES:
                return Reply(status, body), False
            return Reply(status, body), keep
        head = await reader.readexactly(min(length, frames.HEAD_BYTES))
        answer = frames.Reader(head, self.secret)  # allocates once the head is signed
        if answer.total != length:
            raise FrameError(f"answer of {length:,} bytes does not match its frame")
        while answer.missing:
            piece = await reader.read(min(answer.missing, frames.SLICE))
            if not piece:
                raise ConnectionError(f"answer ended after {answer.got:,} of {length:,} bytes")
            answer.feed(piece)
        return Reply(200, reader=answer), keep

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()


async def _head(reader: asyncio.StreamReader, status_line: bytes) -> tuple[int, dict[str, str]]:
    """The status and the (lower-cased) headers of an HTTP/1.1 answer."""
    if not status_line:
        raise ConnectionError("the connection closed before an answer")
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return int(parts[1]), headers
        if not line:
            raise asyncio.IncompleteReadError(line, None)
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


if TYPE_CHECKING:
    from lampy.runtime.openlambda._aiohttp import AiohttpTransport

__all__ = ["AiohttpTransport", "Reply", "StreamTransport", "ThreadTransport", "Transport"]


def __getattr__(name: str) -> Any:
    """`AiohttpTransport`, imported on first use: a sandbox has no aiohttp."""
    if name == "AiohttpTransport":
        from lampy.runtime.openlambda._aiohttp import AiohttpTransport

        return AiohttpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
