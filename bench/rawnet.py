"""The raw network paths lampy is measured against: loopback TCP and plain aiohttp.

Shared by bench_limits.py (the machine's limits) and bench_openlambda.py (lampy's ratios to them).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import numpy as np

from lampy.testing import free_port

CONCURRENCY = 32
TRIVIAL_SERVER = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.Response(body=b"ok")
app = web.Application()
app.router.add_post("/", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


@contextmanager
def trivial_server() -> Iterator[str]:
    """A trivial aiohttp server in another process on loopback; yields its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the trivial server did not listen on {port}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=10)


def raw_posts(url: str, count: int, concurrency: int = CONCURRENCY) -> None:
    """`count` tiny POSTs, `concurrency` in flight, through one aiohttp session."""

    async def main() -> None:
        limit = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                async with limit, session.post(url, data=b"x" * 100) as answer:
                    await answer.read()

            await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(main())


class TcpEcho:
    """Bytes sent to an echo thread over loopback TCP and read back (buffers made once)."""

    def __init__(self, nbytes: int) -> None:
        self.buffers = [bytearray(nbytes), bytearray(nbytes)]

    def __call__(self, data: np.ndarray) -> None:
        view = memoryview(data).cast("B")
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def receive(conn: socket.socket, into: bytearray) -> None:
            target, got = memoryview(into), 0
            while got < len(into):
                got += conn.recv_into(target[got : got + (1 << 22)])

        def echo() -> None:
            conn, _ = server.accept()
            with conn:
                receive(conn, self.buffers[0])
                conn.sendall(self.buffers[0])

        thread = threading.Thread(target=echo)
        thread.start()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(view)
            receive(client, self.buffers[1])
        thread.join()
        server.close()
