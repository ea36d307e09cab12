"""Every error lampy raises, in one hierarchy.

```
LampyError
├── UsageError                bad input, raised before any work is sent
│   ├── SplitLengthError      split arrays differ in length on axis 0   (also ValueError)
│   ├── UnsplittableError     a 0-d or object-dtype array to split     (also TypeError)
│   ├── SerializationError    cloudpickle cannot serialize the function or an argument
│   ├── OptionError           a bad option: chunks, combine, finalize  (also ValueError)
│   ├── ShapeError            lazy operand shapes that do not fit      (also ValueError)
│   ├── UnsupportedOperation  an operation lazy arrays do not offer    (also TypeError)
│   ├── GraphRefused          a graph file asks for more than it may   (also PermissionError)
│   └── UnknownExecutorError  an executor name that is not registered  (also ValueError)
├── ResultError               chunk results that cannot be combined    (also TypeError)
├── RemoteArrayError          a remote array cannot be read or written: bad URL, not a .npy
│   │                         file, truncated, changed since referenced, dtype or shape
│   │                         not as expected, order not row-contiguous, server failure
│   ├── RemoteArrayNotFound   no such array on the server or disk  (also FileNotFoundError)
│   └── RemoteArrayRefused    the server refused: signature or path (also PermissionError)
└── ExecutionError            a chunk failed for a reason outside user code
    ├── WorkerLost            the process running a chunk died
    ├── RemoteError           user code raised an exception whose type cannot travel back
    ├── RetriesExhausted      a chunk kept failing until the retry budget was spent
    ├── VersionMismatch       client and sandbox run different Python minor versions
    └── FrameError            a wire frame is malformed or truncated          (HTTP 400)
        ├── BadSignature      its HMAC tag does not match our secret          (HTTP 401)
        └── TooLarge          it declares more bytes than the receiver takes  (HTTP 413)
```

A user exception raised inside a chunk reaches the caller with its own type; lampy chains a
`RemoteTraceback` to it and adds a note naming the chunk and its rows.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadSignature",
    "ExecutionError",
    "FrameError",
    "GraphRefused",
    "LampyError",
    "OptionError",
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
]


class LampyError(Exception):
    """The root of every error lampy raises itself."""


class UsageError(LampyError):
    """The call cannot run as written; nothing was sent to any worker."""


class SplitLengthError(UsageError, ValueError):
    """Arrays split along axis 0 must all have the same length there."""


class UnsplittableError(UsageError, TypeError):
    """An argument that lampy would split cannot be split (0-d, object dtype)."""


class GraphRefused(UsageError, PermissionError):
    """A graph file asks for more than `load_graph` does for a file it cannot trust.

    The message names the node and what it asked for, and the `load_graph` argument that
    allows it (`regions=`, `paths=`, `urls=` or `trusted=True`).
    """


class SerializationError(UsageError, TypeError):
    """cloudpickle cannot serialize what a remote executor must send."""


class OptionError(UsageError, ValueError):
    """An option such as `chunks`, `combine` or `finalize` has a bad value."""


class UnknownExecutorError(UsageError, ValueError):
    """No executor is registered under the given name."""


class ShapeError(UsageError, ValueError):
    """Lazy operands whose shapes do not fit, raised as the expression is written.

    Also a ValueError, so code catching numpy's broadcasting errors catches it too.
    """


class UnsupportedOperation(UsageError, TypeError):
    """A numpy operation or argument lazy arrays do not offer; the message lists what they do.

    Also a TypeError, as numpy raises for an operation a type does not support.
    """


class ResultError(LampyError, TypeError):
    """Chunk results do not have the shape the region's combine rule needs."""


class RemoteArrayError(LampyError):
    """A remote array (`lampy.remote`) cannot be read or written; the message names its URL.

    `status` is the HTTP status `lampy serve` answers such a request with.
    """

    status = 422


class RemoteArrayNotFound(RemoteArrayError, FileNotFoundError):
    """No array at that URL or path."""

    status = 404


class RemoteArrayRefused(RemoteArrayError, PermissionError):
    """The array server refused the request: a bad signature, or a path outside its directory."""

    status = 403


class ExecutionError(LampyError):
    """A chunk failed outside user code; the message names the chunk and its rows."""


class WorkerLost(ExecutionError):
    """The worker process running a chunk died (killed, out of memory, crashed)."""


class RemoteError(ExecutionError):
    """User code raised an exception whose type could not be sent back; its text is kept."""


class RetriesExhausted(ExecutionError):
    """A chunk failed on every attempt the retry budget allowed.

    `chunk` and `rows` say which chunk (numbered within the call); `causes` holds each
    attempt's cause in order. The message says all of it; the last attempt's exception, when
    there was one, is chained as `__cause__`.
    """

    def __init__(
        self,
        message: str,
        *,
        chunk: int | None = None,
        rows: tuple[int, int] | None = None,
        causes: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.chunk, self.rows, self.causes = chunk, rows, causes

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_retries, (str(self), self.chunk, self.rows, self.causes))


class VersionMismatch(ExecutionError):
    """The two ends run different Python minor versions, so functions cannot be unpickled."""


class FrameError(ExecutionError):
    """A wire frame is malformed, truncated, too large, or not signed with our secret.

    `status` is the HTTP status a lampy server answers such a frame with.
    """

    status = 400


class BadSignature(FrameError):
    """The HMAC tag does not match: wrong secret, or the frame was altered."""

    status = 401


class TooLarge(FrameError):
    """The frame declares more bytes than the receiver accepts."""

    status = 413


def _rebuild_retries(
    message: str, chunk: int | None, rows: tuple[int, int] | None, causes: tuple[str, ...]
) -> RetriesExhausted:
    return RetriesExhausted(message, chunk=chunk, rows=rows, causes=causes)


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a worker (chained as its cause)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nRemote traceback:\n{self.text}"
