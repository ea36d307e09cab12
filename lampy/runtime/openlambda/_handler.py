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

Two more frames serve orchestration in a lambda (_coordinator.py): COORDINATE, a whole job this
sandbox orchestrates, answered with its report; COMBINE, partials merged here for a coordinator.
"""

from __future__ import annotations

import os
import secrets
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from lampy._errors import BadSignature, FrameError, VersionMismatch
from lampy.runtime._codec import dumps_out_of_band
from lampy.runtime._worker_side import Templates, run_task
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.remote._results import store

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_STATUS = {400: "400 Bad Request", 401: "401 Unauthorized", 413: "413 Payload Too Large"}
_templates = Templates()  # the jobs this sandbox has seen
#: This sandbox's identity, made when it imported the handler. Not a process id: every
#: OpenLambda sandbox runs in its own PID namespace, where the handler is pid 1.
SANDBOX = secrets.token_hex(8)


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

    Only the fixed-size head is read before the sender is known: nothing is allocated for
    what the frame declares until the head's own tag, time and nonce pass. Nothing is
    unpickled unless the whole frame arrived and its tag matches.
    """
    length = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    reader = frames.Reader(_read_exactly(stream, min(length, frames.HEAD_BYTES)), secret)
    if reader.total != length:
        raise FrameError(f"truncated frame: Content-Length {length:,}, frame {reader.total:,}")
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
        return frames.encode(frames.PONG, SANDBOX, secret)
    if frame.kind == frames.COORDINATE:  # a whole job to orchestrate from here
        from lampy.runtime.openlambda._coordinator import coordinate

        said = coordinate(frame.value, secret, SANDBOX)
        return frames.encode(frames.RESULT, ((frame.value.job, "coordinate"), said), secret)
    if frame.kind == frames.COMBINE:  # partials to merge, for a coordinator
        from lampy.runtime.openlambda._coordinator import combine_here

        asked, rule, partials = frame.value
        merged = combine_here(asked[0], rule, partials)
        answer = (merged.value, merged.error, merged.traceback)
        return frames.encode(frames.RESULT, (asked, answer), secret)
    if frame.kind != frames.TASK:
        raise FrameError(f"expected a task frame, got {frames.KINDS[frame.kind]}")
    # (key, chunks, template, whole, parts, offer, attempt): with an offer (a place on the
    # client's array server), large result arrays are stored there instead of answered
    key, chunks, template, whole, parts, offer, attempt = frame.value
    job = _templates.load(key, template, whole) if template is not None else _templates.get(key)
    if job is None:
        return frames.encode(frames.MISSING, key, secret)
    outcomes = []
    for chunk, rows in zip(chunks, parts, strict=True):  # stop at the first user error
        encode = dumps_out_of_band if offer is None else _storing(offer, f"{chunk}-{attempt}")
        outcome = run_task(job.call, rows, job.extras, encode)
        outcomes.append((outcome.value, outcome.error, outcome.traceback))
        if outcome.error is not None:
            break
    # the echo of (job, chunks, attempt) lets the executor drop an answer not for its call
    return frames.encode(frames.RESULT, ((key, chunks, attempt), outcomes), secret)


def _storing(offer: tuple[str, int], name: str) -> Callable[[Any], Any]:
    """An encoder that first stores large result arrays at the offered place (their files
    named after the chunk and call, so two calls never write the same file)."""

    def encode(value: Any) -> Any:
        return dumps_out_of_band(store(value, offer, name))

    return encode
