"""Frames carry a time and a nonce in a head signed on its own: a replayed, old, future or
non-finite frame is refused, and nothing is allocated for what a frame declares until its head
is signed (in the handler, and in the client reading answers)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from lampy._errors import BadSignature
from lampy.runtime._secret import Freshness
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._deploy import upload as deploy
from lampy.runtime.openlambda._protocol import Caller, PlatformFailure
from lampy.runtime.openlambda._transport import AiohttpTransport, Reply, Transport

from .test_handler import add, call, outcomes, task

SECRET = b"test-secret-for-lampy"


def restamped(frame: bytes, when: float) -> bytes:
    """`frame` with another time, both tags signed again (a peer holding the secret)."""
    data = bytearray(frame[: -frames.TAG_BYTES])
    struct.pack_into("<d", data, 20, when)
    prefix = bytes(data[: frames.PREFIX_BYTES])
    data[frames.PREFIX_BYTES : frames.HEAD_BYTES] = hmac.new(SECRET, prefix, "sha256").digest()
    return bytes(data + hmac.new(SECRET, data, hashlib.sha256).digest())


def test_a_task_replayed_to_the_handler_does_not_run_again() -> None:
    body = task("replayed", add, (np.arange(4),))
    status, _, data = call(body)
    assert status == "200 OK" and outcomes(data, "replayed")[0][1] is None
    for _ in range(3):
        status, _, data = call(body)
        assert status == "401 Unauthorized" and b"seen before" in data


@pytest.mark.parametrize(
    ("shift", "why"),
    [(-400.0, b"from this clock"), (400.0, b"from this clock"), (math.nan, b"not a finite")],
    ids=["old", "future", "nan"],
)
def test_old_future_and_non_finite_times_are_refused(shift: float, why: bytes) -> None:
    body = restamped(task("stamped", add, (np.arange(4),)), time.time() + shift)
    status, _, data = call(body)
    assert status == "401 Unauthorized" and why in data


@pytest.mark.parametrize("when", [math.inf, -math.inf])
def test_infinite_times_are_refused(when: float) -> None:
    with pytest.raises(frames.Replayed, match="not a finite"):
        frames.decode(restamped(frames.encode(frames.PING, 0, SECRET).join(), when), SECRET)


def test_an_unsigned_head_claiming_gigabytes_allocates_nothing() -> None:
    """A 20-byte request declaring 2.5 GiB once held 2.6 GiB in a sandbox."""
    head = bytearray(frames.encode(frames.PING, 0, SECRET).join()[: frames.HEAD_BYTES])
    struct.pack_into("<Q", head, 12, 5 << 29)  # body of 2.5 GiB: the head tag no longer fits
    with mock.patch.object(frames, "bytearray", create=True, side_effect=AssertionError):
        status, _, data = call(bytes(head) + bytes(64), length=len(head) + (5 << 29))
    assert status == "401 Unauthorized" and b"signature does not match" in data


def test_freshness_memory_is_bounded_and_never_forgets_unsafely() -> None:
    fresh = Freshness(window=300, kept=4)
    now = time.time()
    for i in range(4):
        assert fresh.check(now - 10 + i, bytes([i])) is None
    assert fresh.check(now, bytes([9])) is None  # forgets nonce 0, the floor moves to its time
    assert "older than" in (fresh.check(now - 10, bytes([0])) or "")  # its replay: refused
    assert "seen before" in (fresh.check(now, bytes([9])) or "")
    assert fresh.check(now + 1, bytes([10])) is None


class Replaying(Transport):
    """Answers every call with the first answer it got from the real handler."""

    def __init__(self) -> None:
        self.first: bytes | None = None

    async def post(self, frame: frames.Outgoing, timeout: float) -> Reply:
        if self.first is None:
            _, _, self.first = call(frame.join())
        return Reply(200, self.first)


def test_the_client_refuses_an_answer_seen_before() -> None:
    caller = Caller(Replaying(), SECRET, "http://x", "lampy", 10.0, 1)

    async def twice() -> None:
        assert isinstance(await caller.ping(0), str)
        with pytest.raises(PlatformFailure, match="replayed") as info:
            await caller.ping(0)
        assert info.value.kind == "stale"

    asyncio.run(twice())


class FakeServer:
    """A raw loopback server that answers every request with `answer` and hangs up."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        writer.close()


@pytest.fixture
def fake_answer() -> Iterator[Any]:
    """fake_answer(bytes) -> the transport's Reply to a ping, from a server sending bytes."""

    def ask(answer: bytes) -> Reply:
        async def run() -> Reply:
            server = await asyncio.start_server(FakeServer(answer).serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            transport = AiohttpTransport(f"http://127.0.0.1:{port}/run/lampy", 1, SECRET)
            try:
                return await transport.post(frames.encode(frames.PING, 0, SECRET), 10)
            finally:
                await transport.close()
                server.close()
                await server.wait_closed()

        return asyncio.run(run())

    yield ask


def test_the_client_allocates_nothing_for_an_unsigned_answer(fake_answer: Any) -> None:
    """Four fake answers of 1 GiB once pushed a client to 4.1 GiB."""
    head = bytearray(frames.encode(frames.PONG, 1, b"someone else").join()[: frames.HEAD_BYTES])
    struct.pack_into("<Q", head, 12, 1 << 30)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % ((1 << 30) + 200) + head
    with (
        mock.patch.object(frames, "bytearray", create=True, side_effect=AssertionError),
        pytest.raises(BadSignature),
    ):
        fake_answer(bytes(answer))


def test_the_client_reads_only_the_start_of_an_error_answer(fake_answer: Any) -> None:
    body = b"x" * (1 << 20)
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % (1 << 30) + body
    reply = fake_answer(answer)
    assert reply.status == 500 and 0 < len(reply.body) <= 1 << 16


def test_a_task_captured_on_the_wire_runs_once_on_lampy_worker(
    make_worker: Any, tmp_path: Path
) -> None:
    """A task frame replayed three times to `lampy worker` (one sandbox) ran three more times."""
    import http.client

    worker = make_worker(max_sandboxes=1)
    deploy(worker.url)
    body = task("captured", add, (np.arange(4),))
    answers = []
    for _ in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=30)
        conn.request("POST", "/run/lampy", body=body)
        response = conn.getresponse()
        answers.append((response.status, response.read()))
        conn.close()
    assert answers[0][0] == 200
    assert [status for status, _ in answers[1:]] == [401, 401, 401]
    assert all(b"seen before" in text for _, text in answers[1:])
