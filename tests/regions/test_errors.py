"""Bad input fails before any work is sent; user exceptions keep their type and say where."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import lampy
from lampy.runtime import executors


def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x + y


def test_split_lengths_differ(executor: str) -> None:
    with pytest.raises(lampy.SplitLengthError, match="x has 1000 rows, y has 999") as info:
        lampy.elemwise(add)(np.zeros(1000), np.zeros(999))
    assert isinstance(info.value, ValueError)
    assert "lampy.shared" in str(info.value)


def test_zero_d_array_cannot_be_split(executor: str) -> None:
    with pytest.raises(lampy.UnsplittableError, match="'y' is a 0-d array"):
        lampy.elemwise(add)(np.zeros(4), np.array(3.0))
    # as a shared argument it is fine
    result = lampy.elemwise(add, chunks=2)(np.zeros(4), lampy.shared(np.array(3.0)))
    np.testing.assert_array_equal(result, np.full(4, 3.0))


def test_object_arrays_cannot_be_split(executor: str) -> None:
    with pytest.raises(lampy.UnsplittableError, match="'x' has object dtype"):
        lampy.elemwise(add)(np.array([1, "a"], dtype=object), np.zeros(2))


def test_unpicklable_argument_is_named() -> None:
    f = lampy.elemwise(chunks=2, executor="local")(lambda x, lock: x)
    with pytest.raises(lampy.SerializationError, match="argument 'lock' \\(lock\\)"):
        f(np.zeros(4), threading.Lock())


def test_unpicklable_function_is_named() -> None:
    lock = threading.Lock()

    def holds_lock(x: np.ndarray) -> np.ndarray:
        with lock:
            return x

    with pytest.raises(lampy.SerializationError, match="the function .*holds_lock"):
        lampy.elemwise(chunks=2, executor="local")(holds_lock)(np.zeros(4))


@pytest.mark.parametrize("combine", [None, 3, "add"])
def test_combine_must_be_callable(combine: object) -> None:
    with pytest.raises(lampy.OptionError, match="combine"):
        lampy.reduce(combine)(add)  # type: ignore[arg-type]


def test_finalize_must_be_callable() -> None:
    with pytest.raises(lampy.OptionError, match="finalize must be callable"):
        lampy.sum(finalize=1)(add)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunks", [0, -2, 1.5, "many", True])
def test_chunks_must_be_a_positive_int_or_auto(chunks: object) -> None:
    with pytest.raises(lampy.OptionError, match="chunks must be a positive int"):
        lampy.elemwise(chunks=chunks)(add)  # type: ignore[arg-type]
    with pytest.raises(lampy.OptionError), lampy.using(chunks=chunks):  # type: ignore[arg-type]
        pass


def test_chunks_from_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMPY_CHUNKS", "zero")
    with pytest.raises(lampy.OptionError, match="LAMPY_CHUNKS"):
        lampy.elemwise(add)(np.zeros(2), np.zeros(2))


def test_unknown_executor_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(lampy.UnknownExecutorError, match="'gpu'.*inline, local"):
        lampy.elemwise(executor="gpu")(add)
    with pytest.raises(lampy.UnknownExecutorError), lampy.using(executor="gpu"):
        pass
    monkeypatch.setenv("LAMPY_EXECUTOR", "gpu")
    with pytest.raises(lampy.UnknownExecutorError):
        lampy.elemwise(add)(np.zeros(2), np.zeros(2))


def test_unknown_executor_option() -> None:
    expected = "no option 'url'; its options: attempts, timeout, workers"
    with pytest.raises(lampy.OptionError, match=expected), lampy.using(executor="local", url="x"):
        lampy.elemwise(add, chunks=2)(np.zeros(2), np.zeros(2))


def test_shared_names_must_be_parameters() -> None:
    with pytest.raises(lampy.OptionError, match=r"\['window'\] are not parameters"):
        lampy.elemwise(shared=("window",))(add)


def test_wrong_call_raises_the_functions_own_type_error(executor: str) -> None:
    with pytest.raises(TypeError, match="missing a required argument: 'y'"):
        lampy.elemwise(add)(np.zeros(2))


def test_elemwise_result_must_have_rows(executor: str) -> None:
    with pytest.raises(
        lampy.ResultError, match=r"chunk 0 of 2 \(rows 0:2\) returned a float.*@lampy.reduce"
    ):
        lampy.elemwise(chunks=2)(lambda x: float(x.sum()))(np.zeros(4))


class BadRow(ValueError):
    pass


def fails_on_row_7(x: np.ndarray) -> np.ndarray:
    if (x == 7).any():
        raise BadRow(f"row with 7 among {x.tolist()}")
    return x


def test_user_exception_keeps_type_and_names_chunk(executor: str) -> None:
    f = lampy.elemwise(chunks=5)(fails_on_row_7)
    with pytest.raises(BadRow, match=r"row with 7 among \[6, 7\]") as info:
        f(np.arange(10))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "chunk 3 of 5 (rows 6:8)" in notes
    if executors.executor_class(executor).needs_pickle:  # from another process: its traceback
        cause = info.value.__cause__
        assert isinstance(cause, lampy.RemoteTraceback)
        assert "fails_on_row_7" in cause.text and "rows 6:8" in cause.text


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)
        self.lock = threading.Lock()


def raises_unpicklable(x: np.ndarray) -> np.ndarray:
    raise Unpicklable(1, 2)


def test_exception_that_cannot_travel_becomes_remote_error() -> None:
    f = lampy.elemwise(chunks=2, executor="local")(raises_unpicklable)
    with pytest.raises(lampy.RemoteError, match="Unpicklable: 1") as info:
        f(np.arange(4))
    assert "raises_unpicklable" in info.value.__cause__.text  # type: ignore[union-attr]


def test_probe_failure_raises_directly() -> None:
    with pytest.raises(BadRow):
        lampy.elemwise(executor="local")(fails_on_row_7)(np.arange(5000) % 8)


def test_a_bare_reduce_says_it_needs_its_combine_rule() -> None:
    @lampy.reduce  # type: ignore[arg-type]
    def largest(x: np.ndarray) -> np.ndarray:
        return x.max(axis=0)

    with pytest.raises(lampy.OptionError, match=r"largest was decorated with a bare @lampy"):
        largest(np.arange(4))  # type: ignore[arg-type]


def test_split_length_hint_names_the_arguments_to_share() -> None:
    @lampy.elemwise
    def scaled(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return x * weights[: len(x)]

    with pytest.raises(lampy.SplitLengthError, match=r"lampy.shared\(weights\) at the call"):
        scaled(np.ones(10), np.ones(3))


def test_remote_tracebacks_show_the_file_and_line_of_functions_sent_by_value(
    tmp_path: Path,
) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import numpy as np, lampy\n"
        "def boom(x):\n"
        "    raise ValueError('boom here')\n"
        "try:\n"
        "    lampy.elemwise(chunks=2, executor='local')(boom)(np.arange(4))\n"
        "except ValueError as error:\n"
        "    print(error.__cause__)\n"
    )
    printed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert f'File "{script}", line 3, in boom' in printed and "raise ValueError" in printed
    assert "<dynamic-code>" not in printed
