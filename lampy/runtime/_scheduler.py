"""The chunk scheduler: one set of rules for every executor about the fate of chunks.

It owns the retry budget (`ATTEMPTS` and `backoff`, one default for every executor, each executor's
`attempts` option), the `RetriesExhausted` message with every attempt's cause, the rule to stop at
the first failed chunk unless the job keeps going past lost ones (partial answers), exactly-once
recording of outcomes, and which stragglers deserve a backup.

It does no I/O and keeps no clock of its own (the executor passes `now`), so the same class
runs in the client or inside a lambda. Executors only start chunks on workers and report how
each attempt ended:

    scheduler = ChunkScheduler(job, attempts, advice="what to do when a chunk is lost")
    while not scheduler.done:
        chunk = scheduler.next()          # None: nothing to start now
        ... start it, wait for something to end ...
        scheduler.finished(chunk, outcome, now)    # an answer (value or user error)
        scheduler.failed(chunk, "why")             # the platform lost this attempt
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections import deque

from lampy._errors import OptionError, RetriesExhausted
from lampy.runtime._job import Job
from lampy.runtime._worker_side import Outcome

# The retry budget, a budget of time: a chunk lost to the platform runs again after waiting
# `backoff(failures)`, 0.1 s doubling up to 4 s, for at most ATTEMPTS attempts in all. The waits
# span `retry_span()` = 10.3 s, so a job rides out a worker that restarts within 10 s; a chunk
# that kills its worker every time is lost after 8 attempts. Executors whose platform replaces
# workers on its own (openlambda) wait; the local pool replaces its worker at once, so does not.
ATTEMPTS = 8
BACKOFF_S = 0.1
BACKOFF_CAP_S = 4.0
STRAGGLER_DONE = 0.75  # backups only once this share of chunks is done (or all but one) ...
STRAGGLER_FACTOR = 4.0  # ... for chunks running this many times the median ...
# ... and at least this much longer than it: above a new sandbox's start (bench_olreal.py row
# "cold sandbox": 0.25 to 0.58 s on OpenLambda, up to 1.2 s on a loaded `lampy worker`), so a
# call that merely waits for a sandbox gets no backup (each backup holds a sandbox more).
STRAGGLER_MIN_S = 1.0
# Judged by a pace instead (an earlier job's, or the caller's probe's), a chunk waits longer:
# this job's sandboxes may be cold where that job's were warm (a cold start with the
# template's load took up to 3 s on a loaded machine), a sandbox may compute slower than the
# caller did, and a backup for every chunk in flight would flood the platform.
STRAGGLER_PACE_MIN_S = 5.0


def check_attempts(attempts: object) -> int:
    """Validate an executor's `attempts` option: a positive int."""
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise OptionError(f"attempts must be a positive int; got {attempts!r}")
    return attempts


def backoff(failures: int, first: float = BACKOFF_S) -> float:
    """The wait before running a chunk again after its `failures`-th lost attempt: `first`
    doubling per failure, at most BACKOFF_CAP_S, plus up to `first` of jitter (so the chunks
    of a worker that died together do not all knock at once)."""
    return min(BACKOFF_CAP_S, first * 2.0 ** (failures - 1)) + random.uniform(0, first)


def retry_span(attempts: int = ATTEMPTS, first: float = BACKOFF_S) -> float:
    """The least time from a chunk's first lost attempt to its last one (waits without jitter):
    how long a platform may be away and the job still complete.

    >>> round(retry_span(), 1)
    10.3
    """
    return sum(min(BACKOFF_CAP_S, first * 2.0 ** (n - 1)) for n in range(1, attempts))


class ChunkScheduler:
    """What became of each chunk of one job, and what to run next."""

    def __init__(
        self, job: Job, attempts: int = ATTEMPTS, advice: str = "", pace: float | None = None
    ) -> None:
        """`pace`: seconds per row this function's chunks took in an earlier job, or else
        the caller's estimate from its probe (`Job.pace`), if known; it judges stragglers
        before this job has answers of its own to take a median of."""
        self.job, self.attempts, self.advice = job, check_attempts(attempts), advice
        self.pace = pace
        self.outcomes: dict[int, Outcome] = {}
        self.causes: dict[int, list[str]] = {}
        self.stopped = False
        self._last: dict[int, BaseException] = {}  # the latest cause that is an exception
        self._todo = deque(range(len(job.chunks)))
        self._again: list[int] = []  # chunks to run again, lowest first (so batches hold)
        self._running: dict[int, int] = {}  # chunk -> attempts in flight (backups included)
        self._started: dict[int, float] = {}  # chunk -> when its first copy in flight started
        self._durations: list[float] = []
        self._paces: list[float] = []  # seconds per row of each answered chunk
        self._backed_up: set[int] = set()

    @property
    def done(self) -> bool:
        """Every chunk has its outcome, or the job stopped at a failed one."""
        return self.stopped or len(self.outcomes) == len(self.job.chunks)

    @property
    def running(self) -> int:
        """Chunks with an attempt in flight."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Chunks waiting to start (at most: one that has since finished may still count)."""
        return len(self._todo) + len(self._again)

    def next(self) -> int | None:
        """The next chunk to start (retries first, lowest first), or None."""
        while (self._again or self._todo) and not self.stopped:
            chunk = heapq.heappop(self._again) if self._again else self._todo.popleft()
            if chunk not in self.outcomes and chunk not in self._running:
                return chunk
        return None

    def start(self, chunk: int, now: float) -> int:
        """Note an attempt leaving for a worker; returns its number (1 for the first)."""
        self._running[chunk] = self._running.get(chunk, 0) + 1
        self._started.setdefault(chunk, now)
        return len(self.causes.get(chunk, ())) + 1

    def finished(self, chunk: int, outcome: Outcome, now: float) -> bool:
        """An answer for `chunk`. False when it already has one (a duplicate: drop it)."""
        self._ended(chunk)
        if chunk in self.outcomes:
            return False
        self.outcomes[chunk] = outcome
        started = self._started.pop(chunk, None)
        if started is not None and outcome.error is None:
            self._durations.append(now - started)
            self._paces.append((now - started) / self._rows(chunk))
        lost = isinstance(outcome.error, RetriesExhausted)
        if outcome.error is not None and not (lost and self.job.keep_going):
            self.stopped = True
        return True

    def failed(self, chunk: int, cause: BaseException | str, last_words: str = "") -> bool:
        """The platform lost an attempt at `chunk` (`cause` says how): charge it. True when the
        chunk is to run again; False when it is now lost (its outcome a RetriesExhausted), or
        another copy is still in flight, or it has its answer already."""
        self._ended(chunk)
        if chunk in self.outcomes:
            return False
        causes = self.causes.setdefault(chunk, [])
        causes.append(str(cause))
        if isinstance(cause, BaseException):
            self._last[chunk] = cause
        if chunk in self._running:
            return False  # a backup's twin is still running: it may yet answer
        if len(causes) < self.attempts:
            heapq.heappush(self._again, chunk)
            return True
        self.finished(chunk, Outcome(error=self._lost(chunk), traceback=last_words), 0.0)
        return False

    def again(self, chunk: int) -> None:
        """Run `chunk` again without charging an attempt (its worker left for another reason)."""
        self._ended(chunk)
        if chunk not in self.outcomes and chunk not in self._running:
            heapq.heappush(self._again, chunk)

    def stragglers(self, now: float) -> list[int]:
        """Chunks worth a backup attempt: those running far longer than they should (chunks
        are pure, so a second copy is safe; the first answer wins). "Should" is the median of
        this job's chunks once most are done (at least all but one, so a job of two or three
        chunks has its last one backed up too); before that, the `pace` (an earlier job's,
        or the caller's estimate), if known. A call the platform never answers is one such
        chunk: OpenLambda drops a call queued behind a failed round trip (docs/openlambda.md),
        and only a backup gets its answer before the call's timeout, a lone chunk's included."""
        chunks, done = len(self.job.chunks), len(self.outcomes)
        if self._durations and done >= min(STRAGGLER_DONE * chunks, chunks - 1):
            median = statistics.median(self._durations)
            expected, least = dict.fromkeys(self._running, median), STRAGGLER_MIN_S
        elif self.pace is not None:
            expected = {c: self.pace * self._rows(c) for c in self._running}
            least = STRAGGLER_PACE_MIN_S
        else:
            return []
        late = [
            c
            for c, took in expected.items()
            if c not in self._backed_up
            and now - self._started.get(c, now) > max(STRAGGLER_FACTOR * took, took + least)
        ]
        self._backed_up.update(late)
        return late

    def measured_pace(self) -> float | None:
        """The median seconds per row of this job's answered chunks: the next job's `pace`."""
        return statistics.median(self._paces) if self._paces else None

    def _rows(self, chunk: int) -> int:
        start, stop = self.job.chunks[chunk]
        return max(1, stop - start)

    def _ended(self, chunk: int) -> None:
        left = self._running.get(chunk, 0) - 1
        if left > 0:
            self._running[chunk] = left
        else:
            self._running.pop(chunk, None)

    def _lost(self, chunk: int) -> RetriesExhausted:
        causes = self.causes[chunk]
        tried = "\n".join(f"  attempt {i}: {cause}" for i, cause in enumerate(causes, 1))
        error = RetriesExhausted(
            f"{self.job.label(chunk)} was lost: all {len(causes)} attempts failed, each time in "
            f"the platform, not in your code:\n{tried}\n{self.advice}".rstrip(),
            chunk=self.job.first + chunk,
            rows=self.job.chunks[chunk],
            causes=tuple(causes),
        )
        error.__cause__ = self._last.get(chunk)
        return error
