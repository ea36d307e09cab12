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
from lampy.runtime import executors
from lampy.runtime._plan import Plan
from lampy.runtime._settings import resolve_options, using
from lampy.runtime._shm import asshared, empty
from lampy.runtime.executors import Executor
from lampy.runtime.executors import register as register_executor
from lampy.runtime.remote._reference import RemoteArray, remote, upload

__version__ = "0.1.0"


def prewarm(n: int, executor: str = "openlambda", **options: Any) -> int:
    """Warm `n` workers of an executor that can pre-warm (OpenLambda sandboxes) before a large
    fan-out; returns how many answered.

    Options are those of `lampy.using(executor=..., ...)`, which they override.
    """
    return executors.get(executor, {**resolve_options(executor), **options}).prewarm(n)


__all__ = [
    "BadSignature",
    "Coverage",
    "ExecutionError",
    "Executor",
    "FrameError",
    "GraphRefused",
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
    "load_graph",
    "prewarm",
    "reduce",
    "register_executor",
    "remote",
    "save_graph",
    "shared",
    "sum",
    "upload",
    "using",
]
