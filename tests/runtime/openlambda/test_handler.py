"""The handler as OpenLambda's runtime serves it: a plain WSGI environ whose input stops at
Content-Length, one request per call; every answer has a Content-Length."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from lampy.runtime._codec import dumps, loads
from lampy.runtime._job import Part, Whole
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda import _handler as handler

from .test_frames import Tripwire, unpickled


class Input:
    """wsgi.input as OpenLambda gives it: reads stop at Content-Length (more would hang)."""

    def __init__(self, data: bytes, length: int) -> None:
        self.stream, self.left = io.BytesIO(data + b"TRAILING BYTES OF THE NEXT REQUEST"), length

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.stream.read(n)


def call(body: bytes, length: int | None = None) -> tuple[str, dict[str, str], bytes]:
    length = len(body) if length is None else length
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/run/lampy",
        "CONTENT_LENGTH": str(length),
        "wsgi.input": Input(body, length),
    }
    answer: list[Any] = []
    parts = handler.app(environ, lambda status, headers: answer.extend([status, headers]))
    data = b"".join(bytes(p) for p in parts)
    headers = dict(answer[1])
    assert int(headers["Content-Length"]) == len(data)
    return answer[0], headers, data


def task(key: str, function: Any, parts: tuple[Any, ...], template: bool = True) -> bytes:
    value = (
        key,
        (0,),
        dumps((function, (Part(0), Whole(0)), {})) if template else None,
        (10,),
        (parts,),
        None,
        1,
    )
    return frames.encode(frames.TASK, value, b"test-secret-for-lampy").join()


def result(data: bytes) -> frames.Frame:
    return frames.decode(bytearray(data), b"test-secret-for-lampy")


def outcomes(data: bytes, key: str) -> list[tuple[Any, Any, str]]:
    """A RESULT's (value, error, traceback) triples, checking it echoes the task it answers."""
    frame = result(data)
    assert frame.kind == frames.RESULT and frame.value[0] == (key, (0,), 1)
    return [
        (None if value is None else loads(*value), error, text)
        for value, error, text in frame.value[1]
    ]


def add(x: np.ndarray, y: int) -> np.ndarray:
    return x + y


def fail(x: np.ndarray, y: int) -> None:
    raise KeyError("missing row")


def test_task_runs_and_template_is_cached() -> None:
    status, headers, data = call(task("job-a", add, (np.arange(4),)))
    assert status == "200 OK" and headers["Content-Type"] == "application/octet-stream"
    [(value, error, _)] = outcomes(data, "job-a")
    assert error is None
    np.testing.assert_array_equal(value, np.arange(4) + 10)
    # later chunks of the job carry only its key
    _, _, data = call(task("job-a", None, (np.arange(2),), template=False))
    np.testing.assert_array_equal(outcomes(data, "job-a")[0][0], [10, 11])


def test_unknown_job_key_answers_missing() -> None:
    _, _, data = call(task("never-sent", None, (np.arange(2),), template=False))
    frame = result(data)
    assert frame.kind == frames.MISSING and frame.value == "never-sent"


def test_user_exception_is_in_band_with_200() -> None:
    status, _, data = call(task("job-b", fail, (np.arange(4),)))
    assert status == "200 OK"
    [(_, error, traceback)] = outcomes(data, "job-b")
    assert isinstance(error, KeyError) and "missing row" in traceback and "fail" in traceback


def test_system_exit_in_user_code_does_not_escape() -> None:
    def leave(x: np.ndarray, y: int) -> None:
        raise SystemExit(3)

    status, _, data = call(task("job-c", leave, (np.arange(4),)))
    error = outcomes(data, "job-c")[0][1]
    assert status == "200 OK" and isinstance(error, SystemExit) and error.args == (3,)


def test_ping_answers_pong_with_the_sandbox_pid() -> None:
    ping = frames.encode(frames.PING, 0, b"test-secret-for-lampy")
    frame = result(call(ping.join())[2])
    assert frame.kind == frames.PONG and frame.value == handler.SANDBOX


@pytest.mark.parametrize("secret", [b"wrong secret", None])
def test_bad_signature_gets_401_and_nothing_unpickled(secret: bytes | None) -> None:
    unpickled.clear()
    body = frames.encode(frames.TASK, Tripwire(), secret or b"x").join()
    if secret is None:
        body = body[:-32] + bytes(32)
    status, headers, data = call(body)
    assert status == "401 Unauthorized" and headers["Content-Type"] == "text/plain"
    assert b"LAMPY_SECRET" in data and unpickled == []


def test_truncated_and_oversized_bodies_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    status, _, data = call(task("job-d", add, (np.arange(1000),))[:-7])
    assert status == "400 Bad Request" and b"truncated" in data
    body = task("job-d", add, (np.arange(1000),))
    status, _, data = call(body, length=len(body) - 7)  # input stops early
    assert status == "400 Bad Request" and b"truncated" in data
    monkeypatch.setattr(frames, "MAX_FRAME_BYTES", 100)
    status, _, data = call(task("job-d", add, (np.arange(1000),)))
    assert status == "413 Payload Too Large" and b"refused" in data


def test_missing_secret_refuses_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMPY_SECRET")
    status, _, data = call(task("job-e", add, (np.arange(4),)))
    assert status == "401 Unauthorized" and b"redeploy" in data


def test_empty_body_is_a_clear_400() -> None:
    status, _, data = call(b"")
    assert status == "400 Bad Request" and b"truncated" in data
