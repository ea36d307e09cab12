"""The deployed handler: OpenLambda imports it as `f.py`'s `app`, a WSGI application.

WSGI (not `f(event)`) because OpenLambda hands a WSGI app the raw body, so binary frames pass
untouched. The handler catches everything: a user exception is an in-band RESULT with HTTP 200,
so the executor can tell it from a platform failure; a bad frame gets a 4xx text answer and is
never unpickled. Every answer has a Content-Length: without one an OpenLambda answer never ends.

A task carries its job's key and, when the executor thinks this sandbox may lack it, the pickled
(function, args, kwargs) template and shared arrays; warm sandboxes keep the last few jobs, so
the template travels once per job per sandbox, and a miss is answered MISSING. A split argument
may arrive as a reference (lampy.remote): the handler reads the chunk's rows itself, with one
Range request straight into a new array. When the task offers a place for large results (the
client's array server), result arrays over the offer's threshold are uploaded there and the
answer carries their references (lampy.runtime.remote._results).
"""

from __future__ import annotations

import os
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from lampy._errors import BadSignature, FrameError, RemoteArrayError, RemoteError, VersionMismatch
from lampy.runtime._codec import dumps, loads
from lampy.runtime._job import Part, Placeholder
from lampy.runtime._worker_side import Outcome, run_filled
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.remote._reference import materialize
from lampy.runtime.remote._results import store

JOBS_KEPT = 8
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_jobs: OrderedDict[str, tuple[Call | Outcome, tuple[Any, ...]]] = OrderedDict()
_STATUS = {400: "400 Bad Request", 401: "401 Unauthorized", 413: "413 Payload Too Large"}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[frames.Buffer]:
    """Answer one request: a signed frame in, a signed frame (or a short error text) out."""
    body: Iterable[frames.Buffer]
    try:
        answer = _serve(environ)
        status, kind, body, length = "200 OK", "application/octet-stream", answer, answer.size
    except FrameError as exc:
        text = f"{exc}\n".encode()
        status, kind, body, length = _STATUS[exc.status], "text/plain", [text], len(text)
    except Exception:
        text = f"lampy handler failed:\n{traceback.format_exc()}".encode()
        status, kind, body, length = "500 Internal Server Error", "text/plain", [text], len(text)
    start_response(status, [("Content-Type", kind), ("Content-Length", str(length))])
    return body  # a frame signs itself as the server takes its slices


def _secret() -> bytes:
    secret = os.environ.get("LAMPY_SECRET", "")
    if not secret:
        raise BadSignature(
            "LAMPY_SECRET is not set in this lambda (its .env): redeploy with `lampy deploy`"
        )
    return secret.encode()


def _read(environ: dict[str, Any], secret: bytes) -> frames.Frame:
    """The request's frame, read by Content-Length and hashed as it arrives.

    Refused early when the prefix is bad or declares too much; nothing is unpickled unless
    the whole frame arrived and its tag matches.
    """
    length = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    prefix = _read_exactly(stream, min(length, frames.PREFIX_BYTES))
    total = frames.check_prefix(prefix)  # before Reader allocates what an unsigned prefix claims
    if total != length:
        raise FrameError(f"truncated frame: Content-Length {length:,}, frame {total:,}")
    reader = frames.Reader(prefix, secret)
    while reader.missing:
        chunk = stream.read(min(reader.missing, frames.SLICE))
        if not chunk:
            break
        reader.feed(chunk)
    return reader.frame()


def _read_exactly(stream: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _serve(environ: dict[str, Any]) -> frames.Outgoing:
    secret = _secret()
    try:
        frame = _read(environ, secret)
    except VersionMismatch:
        return frames.encode(frames.MISMATCH, None, secret)
    if frame.kind == frames.PING:
        hold = float(frame.value or 0)
        time.sleep(min(max(hold, 0.0), 1.0))  # lets concurrent pings occupy distinct sandboxes
        return frames.encode(frames.PONG, os.getpid(), secret)
    if frame.kind != frames.TASK:
        raise FrameError(f"expected a task frame, got {frames.KINDS[frame.kind]}")
    # (key, chunks, template, whole, parts[, offer], attempt): a task without an offer (from
    # a client that offers no place for results) has its results answered in the frame
    key, chunks, template, whole, parts, *offered, attempt = frame.value
    offer = offered[0] if offered else None
    if template is not None:
        _jobs[key] = (_load(template), whole)
        while len(_jobs) > JOBS_KEPT:
            _jobs.popitem(last=False)
    elif key not in _jobs:
        return frames.encode(frames.MISSING, key, secret)
    _jobs.move_to_end(key)
    call, shared = _jobs[key]
    outcomes = []
    for chunk, chunk_parts in zip(chunks, parts, strict=True):  # stop at the first user error
        outcome = call if isinstance(call, Outcome) else _run(call, shared, chunk_parts)
        if offer is not None and outcome.error is None:
            outcome = _stored(outcome, offer, f"{chunk}-{attempt}")
        outcomes.append(outcome)
        if outcome.error is not None:
            break
    return _result((key, chunks, attempt), outcomes, secret)


def _load(template: bytes) -> Call | Outcome:
    """The job's (function, args, kwargs), or the error unpickling them raised (a user error)."""
    try:
        return loads(template)  # type: ignore[no-any-return]
    except Exception as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def _run(call: Call, whole: tuple[Any, ...], parts: tuple[Any, ...]) -> Outcome:
    function, args, kwargs = call

    def lookup(p: Placeholder) -> Any:
        return materialize(parts[p.index]) if isinstance(p, Part) else whole[p.index]

    try:
        return run_filled(function, args, kwargs, lookup)
    except BaseException as exc:  # SystemExit and friends must not end the sandbox
        text = f"{type(exc).__qualname__}: {exc}"
        return Outcome(error=RemoteError(text), traceback=traceback.format_exc())


def _stored(outcome: Outcome, offer: tuple[str, int], name: str) -> Outcome:
    """The outcome with its large result arrays uploaded to the offered place; a failed upload
    (refused, server gone) is the chunk's error, named by the executor like a failed read."""
    try:
        return Outcome(store(outcome.value, offer, name))
    except RemoteArrayError as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def _result(call: tuple[Any, ...], outcomes: list[Outcome], secret: bytes) -> frames.Outgoing:
    """The RESULT frame: the task's (job, chunks, attempt), then (value, error, traceback) per
    chunk run; the echo lets the executor drop an answer that is not for the call it made."""
    try:
        return frames.encode(frames.RESULT, (call, [_triple(o) for o in outcomes]), secret)
    except Exception:  # some value cannot be pickled: that chunk's outcome becomes the error
        triples = [_triple(_picklable(o)) for o in outcomes]
        return frames.encode(frames.RESULT, (call, triples), secret)


def _picklable(outcome: Outcome) -> Outcome:
    try:
        dumps(outcome.value)
        return outcome
    except Exception as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def _triple(outcome: Outcome) -> tuple[Any, BaseException | None, str]:
    if outcome.error is None:
        return (outcome.value, None, "")
    error: BaseException | None = outcome.error
    try:  # cloudpickle carries exception classes that came by value with the function
        loads(dumps(error))
    except Exception:
        error = outcome.portable().error
    return (None, error, outcome.traceback)
