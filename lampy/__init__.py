"""lampy: numpy for OpenLambda.

Mark a numpy function as a parallel region and its calls run split into chunks on worker
processes (the default), or on OpenLambda sandboxes, returning what the function would have.

    import lampy

    @lampy.elemwise
    def spectra(frames):
        return np.abs(np.fft.rfft(frames, axis=1))
"""

from typing import Any

from lampy._errors import (
    BadSignature,
    ExecutionError,
    FrameError,
    GraphRefused,
    LampyError,
    OptionError,
    RemoteArrayError,
    RemoteArrayNotFound,
    RemoteArrayRefused,
    RemoteError,
    RemoteTraceback,
    ResultError,
    RetriesExhausted,
    SerializationError,
    ShapeError,
    SplitLengthError,
    TooLarge,
    UnknownExecutorError,
    UnsplittableError,
    UnsupportedOperation,
    UsageError,
    VersionMismatch,
    WorkerLost,
)
from lampy.lazy import LazyArray, array, calibrate, declare, load_graph, save_graph
from lampy.regions._binding import shared
from lampy.regions._decorators import elemwise, reduce, sum
from lampy.regions._function import ParallelFunction
from lampy.regions._partial import Coverage, Partial
from lampy.regions._submit import JobHandle, job, submit
from lampy.runtime import _allocator, executors
from lampy.runtime._plan import Plan
from lampy.runtime._settings import resolve_executor, resolve_options, using
from lampy.runtime._shm import asshared, empty
from lampy.runtime.executors import Executor
from lampy.runtime.executors import register as register_executor
from lampy.runtime.remote._reference import RemoteArray, remote, upload

__version__ = "0.1.0"

# This process's numpy temporaries reuse freed memory, as in lampy's workers (an auto probe's
# one-row calls would otherwise leave glibc's thresholds where later calls fault in fresh pages).
_allocator.keep_freed_memory()


def prewarm(n: int, executor: str | None = None, **options: Any) -> int:
    """Warm `n` workers of the executor in use (the `lampy.using` block's, else LAMPY_EXECUTOR,
    else the default) or of the one named, before a large fan-out; returns how many answered.

    Only an executor that starts workers on demand can (openlambda: its sandboxes); any
    other raises UsageError. Options are those of `lampy.using(executor=..., ...)`, which
    they override.
    """
    name = resolve_executor(executor)
    if not executors.executor_class(name).can_prewarm:
        raise UsageError(
            f"lampy.prewarm: the {name} executor cannot pre-warm workers (it starts none on "
            'demand); pre-warm one that can, e.g. lampy.prewarm(n, executor="openlambda")'
        )
    return executors.get(name, {**resolve_options(name), **options}).prewarm(n)


__all__ = [
    "BadSignature",
    "Coverage",
    "ExecutionError",
    "Executor",
    "FrameError",
    "GraphRefused",
    "JobHandle",
    "LampyError",
    "LazyArray",
    "OptionError",
    "ParallelFunction",
    "Partial",
    "Plan",
    "RemoteArray",
    "RemoteArrayError",
    "RemoteArrayNotFound",
    "RemoteArrayRefused",
    "RemoteError",
    "RemoteTraceback",
    "ResultError",
    "RetriesExhausted",
    "SerializationError",
    "ShapeError",
    "SplitLengthError",
    "TooLarge",
    "UnknownExecutorError",
    "UnsplittableError",
    "UnsupportedOperation",
    "UsageError",
    "VersionMismatch",
    "WorkerLost",
    "__version__",
    "array",
    "asshared",
    "calibrate",
    "declare",
    "elemwise",
    "empty",
    "job",
    "load_graph",
    "prewarm",
    "reduce",
    "register_executor",
    "remote",
    "save_graph",
    "shared",
    "submit",
    "sum",
    "upload",
    "using",
]
