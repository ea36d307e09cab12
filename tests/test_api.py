"""The public surface: exactly these names, and the decorated function stays a function."""

from __future__ import annotations

import inspect

import cloudpickle
import numpy as np

import lampy

PUBLIC = {
    "BadSignature",
    "Coverage",
    "Executor",
    "FrameError",
    "GraphRefused",
    "JobHandle",
    "TooLarge",
    "VersionMismatch",
    "ExecutionError",
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
    "UnknownExecutorError",
    "UnsplittableError",
    "UnsupportedOperation",
    "UsageError",
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
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(lampy.__all__) == PUBLIC
    assert len(lampy.__all__) == len(PUBLIC)
    for name in lampy.__all__:
        assert hasattr(lampy, name)


def test_every_error_is_a_lampy_error() -> None:
    for name in lampy.__all__:
        value = getattr(lampy, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, lampy.LampyError) or value is lampy.RemoteTraceback


@lampy.elemwise
def scaled(x: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """Multiply rows by a factor."""
    return x * factor


def test_decorated_function_keeps_name_signature_and_doc() -> None:
    assert scaled.__name__ == "scaled"
    assert scaled.__doc__ == "Multiply rows by a factor."
    assert str(inspect.signature(scaled)) == str(inspect.signature(scaled.__wrapped__))


def test_decorated_function_pickles_with_cloudpickle() -> None:
    again = cloudpickle.loads(cloudpickle.dumps(scaled))
    x = np.arange(12.0).reshape(6, 2)
    with lampy.using(executor="inline"):
        np.testing.assert_array_equal(again(x, 3.0), x * 3.0)


def test_small_call_needs_no_setup() -> None:
    np.testing.assert_array_equal(scaled(np.ones((3, 2))), np.full((3, 2), 2.0))
