"""A toy executor, registered from this one test module: chunks run on a thread pool.

It shows what a new executor is: one class behind `lampy.Executor` and one registration. The
whole region suite runs on it (tests/conftest.py parametrizes over the registry).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import lampy
from lampy.runtime.executors import ChunkScheduler, Costs, Executor, Job, Outcome, run_task


class ThreadsExecutor(Executor):
    name = "threads"
    needs_pickle = False  # threads share the caller's objects

    def costs(self) -> Costs:
        return Costs(workers=4)

    def run(self, job: Job) -> dict[int, Outcome]:
        scheduler = ChunkScheduler(job)
        call = (job.function, job.args, dict(job.kwargs))
        with ThreadPoolExecutor(4) as pool:
            started = {
                c: pool.submit(run_task, call, job.rows(c), job.whole)
                for c in iter(scheduler.next, None)
            }
            for chunk, future in started.items():
                scheduler.finished(chunk, future.result(), 0.0)
        return scheduler.outcomes


lampy.register_executor("threads", ThreadsExecutor)
