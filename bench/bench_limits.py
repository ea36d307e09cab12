"""The machine's limits, measured in the same run as everything they are compared with.

Memory bandwidth (np.copyto), raw loopback TCP, and raw aiohttp (one call's round trip, and
many calls' throughput) between two processes. Numpy on one core is measured per workload, in
that workload's group (bench_core.py), where it sets the compute limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from conftest import Row
from rawnet import TcpEcho, raw_posts, trivial_server

GROUP = "machine limits"
BYTES = 256 * 1024 * 1024
POSTS = 10_000
SEQUENTIAL = 200


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with trivial_server() as url:
        yield url


def test_memory_bandwidth(benchmark: Any, row: Row) -> None:
    row(GROUP, "memory copy: np.copyto, 256 MiB")
    src = np.ones(BYTES // 8)
    dst = np.empty_like(src)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=7, iterations=1, warmup_rounds=1)
    rate = 2 * BYTES / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(note=f"{rate:.1f} GB/s read+write", bytes_per_s=rate * 1e9)


def test_tcp_loopback(benchmark: Any, row: Row) -> None:
    row(GROUP, "raw TCP on loopback: 256 MiB there and back, one connection")
    data = np.ones(BYTES // 8)
    benchmark.pedantic(TcpEcho(data.nbytes), args=(data,), rounds=3, iterations=1)
    rate = 2 * BYTES / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(note=f"{rate:.1f} GB/s", bytes_per_s=rate * 1e9)


def test_aiohttp_round_trip(benchmark: Any, row: Row, server: str) -> None:
    row(GROUP, f"raw aiohttp round trip: {SEQUENTIAL} tiny POSTs one after another")

    def sequential() -> None:
        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                for _ in range(SEQUENTIAL):
                    async with session.post(server, data=b"x" * 100) as answer:
                        await answer.read()

        asyncio.run(main())

    benchmark.pedantic(sequential, rounds=3, iterations=1, warmup_rounds=1)
    per_call = benchmark.stats.stats.median / SEQUENTIAL
    benchmark.extra_info.update(note=f"{per_call * 1e6:.0f} us per call", seconds=per_call)


def test_aiohttp_throughput(benchmark: Any, row: Row, server: str) -> None:
    row(GROUP, f"raw aiohttp throughput: {POSTS:,} tiny POSTs, 32 in flight")
    benchmark.pedantic(raw_posts, args=(server, POSTS), rounds=3, iterations=1)
    rate = POSTS / benchmark.stats.stats.median
    benchmark.extra_info.update(note=f"{rate:,.0f} calls/s", calls_per_s=rate)
