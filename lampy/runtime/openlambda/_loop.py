"""The executor's background: an event loop in a thread, and a progress line for long jobs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
PROGRESS_AFTER_S = 2.0  # a progress line appears for jobs running longer than this


class Loop:
    """An event loop in a daemon thread, so sync callers can run coroutines from any context."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = self.spawn(coroutine)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coroutine` on the loop without waiting for it."""
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(
                target=self.loop.run_forever, name="lampy-openlambda", daemon=True
            )
            self.thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()
        self.loop = self.thread = None


class Progress:
    """One line on stderr for jobs running longer than PROGRESS_AFTER_S (terminals only)."""

    def __init__(self, total: int, mode: str) -> None:
        self.total = total
        self.enabled = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        if not self.enabled or elapsed < PROGRESS_AFTER_S:
            return
        if now - self.last < 0.2 and done < self.total:  # at most 5 updates a second
            return
        self.last, self.shown = now, True
        share = done / self.total
        sys.stderr.write(f"\rlampy: {done}/{self.total} chunks ({share:.0%}) {elapsed:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
