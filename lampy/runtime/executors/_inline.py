"""The inline executor: chunks run one after another in the caller's process.

It is the reference semantics every other executor must match, and it needs no set-up.
"""

from __future__ import annotations

from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._worker_side import Outcome, run_chunk
from lampy.runtime.executors._base import Executor


class InlineExecutor(Executor):
    name = "inline"
    needs_pickle = False

    def costs(self) -> Costs:
        return Costs(workers=1)

    def run(self, job: Job) -> dict[int, Outcome]:
        outcomes = {}
        for chunk in range(len(job.chunks)):
            outcomes[chunk] = run_chunk(job.function, *job.arguments(chunk))
            if outcomes[chunk].error is not None:
                break
        return outcomes
