"""What a decorator returns: the user's function, marked as a parallel region.

It stays a plain function to its callers (same signature and docstring, picklable, a method
when defined in a class); calling it runs the region through its runner. A call with a lazy
argument instead becomes a node of that argument's graph: such values offer
`__lampy_region_call__`, so this module needs no import of the lazy layer above it.
"""

from __future__ import annotations

import asyncio
import functools
import types
from typing import TYPE_CHECKING, Any

from lampy.regions._binding import Shared
from lampy.regions._region import Region
from lampy.regions._runner import RegionRunner
from lampy.runtime._plan import Plan

if TYPE_CHECKING:
    from lampy.regions._submit import JobHandle


class ParallelFunction:
    """A function marked as a parallel region; call it like the original."""

    def __init__(self, region: Region) -> None:
        self.region = region
        functools.update_wrapper(self, region.function)
        self.runner = RegionRunner(region)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "runner"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, runner=RegionRunner(state["region"]))

    def __repr__(self) -> str:
        kind = "elemwise" if self.region.combine is None else "reduce"
        return f"<lampy.{kind} region {self.region.function.__qualname__}>"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = (a.value if isinstance(a, Shared) else a for a in (*args, *kwargs.values()))
        deferred = next((v for v in values if hasattr(type(v), "__lampy_region_call__")), None)
        if deferred is not None:  # a lazy argument: the call becomes a node of its graph
            return type(deferred).__lampy_region_call__(self, args, kwargs)
        return self.runner.run(args, kwargs)

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        """The same call for code inside an event loop: the loop keeps running meanwhile."""
        return await asyncio.to_thread(self, *args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> JobHandle:
        """Start this call in lambdas and return its handle at once: `lampy.submit(self, ...)`.

        Needs `lampy.using(executor="openlambda", orchestrator="lambda")`; the handle's id
        re-attaches from any process (`lampy.job(id).result()`).
        """
        from lampy.regions._submit import submit  # _submit builds on this module

        return submit(self, *args, **kwargs)

    def explain(self, *args: Any, **kwargs: Any) -> Plan:
        """The plan a call with these arguments would follow, without running the job.

        With chunks="auto" on a parallel executor, planning times the function on a small
        leading slice of the rows (the probe), as the call itself would.
        """
        return self.runner.explain(args, kwargs)
