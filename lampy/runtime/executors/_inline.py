"""The inline executor: chunks run one after another in the caller's process.

It is the reference semantics every other executor must match, and it needs no set-up.
"""

from __future__ import annotations

import time

from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._scheduler import ChunkScheduler
from lampy.runtime._worker_side import Outcome, run_task
from lampy.runtime.executors._base import Executor


class InlineExecutor(Executor):
    name = "inline"
    needs_pickle = False

    def costs(self) -> Costs:
        return Costs(workers=1)

    def run(self, job: Job) -> dict[int, Outcome]:
        call = (job.function, job.args, dict(job.kwargs))
        scheduler = ChunkScheduler(job)
        while (chunk := scheduler.next()) is not None:
            scheduler.start(chunk, time.monotonic())
            outcome = run_task(call, job.rows(chunk), job.whole)
            scheduler.finished(chunk, outcome, time.monotonic())
        return scheduler.outcomes
