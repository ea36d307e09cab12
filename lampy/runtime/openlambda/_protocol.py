"""lampy's protocol with its lambda: one call is a signed task frame out, a result frame back.

`Caller` makes one attempt at a call and sorts what went wrong before anything is retried:
platform failures (connection refused or reset, 429, 502 and other 5xx, client timeouts, an
answer that fails its signature or is not for the call that asked) raise `PlatformFailure`,
which the chunk scheduler charges as a lost attempt; a missing lambda, a refused request
signature or a version mismatch raise errors that say what to do, and are not retried. A user
exception comes back in-band with HTTP 200 as the chunk's outcome.

Every call carries its (job, chunks, call number) and the handler echoes it, so a late
duplicate or a superseded call's answer is recognised and dropped. A task carries the job's
template only where the sandbox may lack it; a sandbox that answers MISSING gets it again.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import site
import sys
import sysconfig
import threading
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cloudpickle

from lampy._errors import (
    BadSignature,
    ExecutionError,
    FrameError,
    SerializationError,
)
from lampy.runtime._codec import PROTOCOL
from lampy.runtime._job import Job
from lampy.runtime._worker_side import Outcome, decoded
from lampy.runtime.openlambda import _frames as frames
from lampy.runtime.openlambda._transport import Transport
from lampy.runtime.remote._results import Offer, collect

INLINE_BYTES = 1 << 16  # smaller templates ride along with every call: a miss costs more
_REMOTE_PACKAGES = {"numpy", "cloudpickle", "lampy"}  # the deploy tarball carries lampy
_pickle_lock = threading.Lock()


def run_url(url: str, name: str) -> str:
    """Where calls of lambda `name` go on the worker at `url` (OpenLambda's /run/<name>)."""
    return f"{url.rstrip('/')}/run/{name}"


def coordinator_of(name: str) -> str:
    """The lambda that orchestrates jobs for lambda `name` (orchestrator="lambda"): the same
    code deployed under a name of its own. OpenLambda sizes each lambda's sandboxes from its
    own outstanding calls and their mean time (go/worker/lambda/lambdaFunction.go), so a
    coordinator under the chunks' name holds one of their sandboxes all job long, and after
    short calls the scaler takes it for all the capacity they need: its chunk calls waited
    for a sandbox that never came (docs/orchestration.md)."""
    return f"{name}-coordinator"


class PlatformFailure(Exception):
    """A failure of the platform, not of the chunk: worth another attempt.

    `kind` sorts it for the accounting ("http 502", "timeout", "connection", "corrupt",
    "stale"); `text` is what the platform said, if anything (the give-up error's traceback).
    """

    def __init__(self, cause: str, kind: str, text: str = "") -> None:
        super().__init__(cause)
        self.kind, self.text = kind, text


#: Failure kinds that are answers received and refused, rather than attempts with no answer.
DROPPED = ("corrupt", "stale")


@dataclass
class Accounting:
    """What became of one job's calls, so tests (and curious users) can check exactly-once.

    When the job ends, every chunk that ran has exactly one accepted answer or is `lost`
    (given up after the retry budget); answers that arrived but were not taken are counted in
    `dropped` by why: "corrupt" (failed the signature or frame checks), "stale" (signed, but
    for another job, chunk or attempt: a late duplicate), "superseded" (a backup's twin
    answered first). `failures` counts attempts that got no answer, by kind ("http 502",
    "http 429", "timeout", "connection").
    """

    job: str
    chunks: int
    attempts: Counter[int] = field(default_factory=Counter)  # calls that carried each chunk
    accepted: Counter[int] = field(default_factory=Counter)  # answers taken, per chunk
    lost: set[int] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0  # calls cancelled in flight (a backup's twin, a job that stopped early)

    def note(self, failure: PlatformFailure) -> None:
        (self.dropped if failure.kind in DROPPED else self.failures)[failure.kind] += 1


@dataclass
class JobState:
    """One job as the caller sends it: its template (sent where a sandbox may lack it)."""

    job: Job
    template: bytes
    inline: bool  # small enough to ride with every call
    account: Accounting
    offer: Offer | None = None  # where large results may go (the client's array server)
    #: Read stored results back here (the client); a coordinator passes the references on.
    collect: bool = True
    #: Outcomes known before the run starts (a coordinator taking over a job): not run again.
    done: dict[int, Outcome] = field(default_factory=dict)
    #: Told each accepted answer as it comes (a coordinator keeps the job's state durable).
    record: Callable[[int, Outcome], None] | None = None
    #: Asked between completions: True stops the run now (a hand-off, a cancelled job).
    stop: Callable[[], bool] | None = None
    #: Set by the run: every chunk has its outcome, or the job stopped at a failed one.
    complete: bool = False
    sends: int = 0  # calls that carried the template
    calls: int = 0  # calls made: each call's number, echoed by its answer


class Caller:
    """Makes single calls to one lambda through a transport."""

    def __init__(
        self,
        transport: Transport,
        secret: bytes,
        url: str,
        name: str,
        timeout: float,
        concurrency: int,
        deployed_as: str = "",
    ) -> None:
        self.transport, self.secret, self.url = transport, secret, url
        self.lambda_name, self.timeout, self.concurrency = name, timeout, concurrency
        self.endpoint = run_url(url, name)
        #: the name `lampy deploy` takes to deploy this lambda (a coordinator's is its chunks')
        self.deployed_as = deployed_as or name

    async def call(self, state: JobState, chunks: tuple[int, ...]) -> list[Outcome]:
        """One attempt at `chunks`: their outcomes (fewer after a user error), or a raise.

        The answer must echo this call's (job, chunks, number); any other signed answer (a
        replayed or late duplicate, a superseded call's) is dropped and the attempt fails.
        """
        job = state.job
        state.calls += 1
        number = state.calls  # this call's own: other calls go on while it waits
        parts = tuple(job.rows(c) for c in chunks)
        with_template = state.inline or state.sends < self.concurrency
        asked = (job.id, chunks, number)
        offer = state.offer.task if state.offer is not None else None
        while True:
            if with_template:
                state.sends += 1
            task = (
                job.id,
                chunks,
                state.template if with_template else None,
                job.whole if with_template else None,
                parts,
                offer,
                number,
            )
            frame = await self.exchange(frames.encode(frames.TASK, task, self.secret))
            missing = frame.kind == frames.MISSING and frame.value == job.id
            if missing and not with_template:
                with_template = True  # this sandbox has not seen the job yet
                continue
            answered = frame.kind == frames.RESULT and isinstance(frame.value, tuple)
            if not answered or frame.value[0] != asked:
                raise PlatformFailure(
                    f"dropped an answer not for this call: got {_describe(frame)}, "
                    f"asked {_describe_call(asked)}",
                    "stale",
                )
            results = frame.value[1]
            complete = len(results) == len(chunks) or (results and results[-1][1] is not None)
            if not complete:
                raise FrameError(f"{len(results)} results for {len(chunks)} chunks")
            reading = state.offer if state.collect else None
            return [_decoded(reading, *result) for result in results]

    async def combine(self, job: str, number: int, rule: bytes, partials: list[Any]) -> Outcome:
        """Merge `partials` in a lambda with the pickled combine `rule` (tree_merge's order);
        the merged value, or the rule's own error as the outcome."""
        asked = (job, "combine", number)
        frame = await self.exchange(
            frames.encode(frames.COMBINE, (asked, rule, partials), self.secret)
        )
        if frame.kind != frames.RESULT or not isinstance(frame.value, tuple):
            raise PlatformFailure(f"expected a combine result, got {_describe(frame)}", "stale")
        if frame.value[0] != asked:
            raise PlatformFailure("dropped a combine result not for this call", "stale")
        value, error, text = frame.value[1]
        return Outcome(value=value, error=error, traceback=text)

    async def coordinate(self, assignment: Any, timeout: float) -> Any:
        """Hand a whole job to a coordinator lambda; its report (a `_coordinator.Report`)."""
        asked = (assignment.job, "coordinate")
        frame = await self.exchange(
            frames.encode(frames.COORDINATE, assignment, self.secret), timeout
        )
        if frame.kind != frames.RESULT or not isinstance(frame.value, tuple):
            raise PlatformFailure(
                f"expected a coordinator's report, got {_describe(frame)}", "stale"
            )
        if frame.value[0] != asked:
            raise PlatformFailure("dropped a coordinator's report not for this job", "stale")
        return frame.value[1]

    async def ping(self, hold: float, timeout: float | None = None) -> str:
        """A no-op call that keeps its sandbox `hold` seconds; the sandbox's identity token."""
        frame = await self.exchange(frames.encode(frames.PING, hold, self.secret), timeout)
        if frame.kind != frames.PONG or not isinstance(frame.value, str):
            raise PlatformFailure(f"expected a pong, got {_describe(frame)}", "stale")
        return frame.value

    async def exchange(self, frame: frames.Outgoing, timeout: float | None = None) -> frames.Frame:
        """POST a frame; the answer's frame, or the failure sorted into retry or not.

        A 200 answer that fails the frame checks was damaged on the way (a wrong secret is
        refused with 401 before anything runs), so it is retried like a lost answer.
        """
        timeout = self.timeout if timeout is None else timeout
        try:
            reply = await self.transport.post(frame, timeout)
            if reply.status == 200:
                if reply.reader:
                    return reply.reader.frame()
                return frames.decode(reply.body, self.secret)
        except asyncio.TimeoutError:
            raise PlatformFailure(
                f"no answer within timeout={timeout:g} s (the client's wait; the "
                "platform's own runtime limit answers 502 instead)",
                "timeout",
            ) from None
        except self.transport.cut_short as exc:  # the connection was cut short
            raise PlatformFailure(f"{type(exc).__name__}: {exc}", "connection") from None
        except frames.Replayed as exc:  # an old answer played again (or a clock far off)
            raise PlatformFailure(f"dropped a replayed answer: {exc}", "stale") from None
        except BadSignature:  # our request's signature was accepted: the answer was altered
            raise PlatformFailure(
                "dropped a damaged answer: its signature does not match", "corrupt"
            ) from None
        except FrameError as exc:
            raise PlatformFailure(f"dropped a damaged answer: {exc}", "corrupt") from None
        text = bytes(reply.body[:2000]).decode(errors="replace").strip()
        if reply.status == 500 and text.startswith("lambda ") and "not found" in text:
            raise ExecutionError(
                f"lambda {self.lambda_name!r} is not deployed on {self.url} ({text}). "
                f"Run `lampy deploy --url {self.url} --name {self.deployed_as}` first."
            )
        if reply.status == 500 and text.startswith("lampy handler failed"):
            raise ExecutionError(
                f"lampy's handler at {self.endpoint} failed outside user code; is the deployed "
                f"lampy the same version as this one? (`lampy deploy` again) {text}"
            )
        if reply.status == 401:
            raise BadSignature(f"{self.endpoint} refused our frame (401): {text}")
        if reply.status == 429 or reply.status >= 500:
            first = text.splitlines()[0] if text else ""
            raise PlatformFailure(f"HTTP {reply.status}: {first}", f"http {reply.status}", text)
        raise ExecutionError(f"{self.endpoint} answered HTTP {reply.status}: {text}")


def _decoded(offer: Offer | None, value: Any, error: BaseException | None, text: str) -> Outcome:
    """A chunk's outcome from its answer: the value unpickled, with the results its chunk
    stored read back from the client's disk (their files removed)."""
    if error is not None:
        return Outcome(error=error, traceback=text)
    payload, buffers = value
    return decoded(payload, buffers, None if offer is None else partial(collect, offer=offer))


def _describe_call(call: Any) -> str:
    """A (job, chunks, attempt) triple as messages show it."""
    try:
        job, chunks, attempt = call
        which = f"chunk {chunks[0]}" if len(chunks) == 1 else f"chunks {chunks[0]}-{chunks[-1]}"
        return f"job {str(job)[:8]} {which} attempt {attempt}"
    except (TypeError, ValueError, IndexError):
        return repr(call)[:80]


def _describe(frame: frames.Frame) -> str:
    """What an answer is, for a message about an answer that was not the one asked for."""
    if frame.kind == frames.RESULT and isinstance(frame.value, tuple) and frame.value:
        return f"the result for {_describe_call(frame.value[0])}"
    return f"a {frames.KINDS[frame.kind]} frame"


def template_of(job: Job) -> bytes:
    """The job's (function, args, kwargs), with the user's own code pickled by value.

    A sandbox has only the standard library, numpy, cloudpickle and lampy, so a function from the
    user's code (or a test module) must travel by value, with the helpers it calls from its own
    module, its sibling modules and the user's other modules (`by_value`).

    This is a second pickling beside `Job.template`, and both are needed: `Job.template` is
    cloudpickle's default, which names an importable module's functions and classes (a
    function of `tests/x.py` is about a hundred bytes saying `tests.x.double`). That suits
    the local pool and Dask, whose workers import the caller's modules (by value, a class
    would arrive as a copy apart from the one the worker imports), and it is what the runner
    pickles before anything is sent, to fail early naming the argument cloudpickle cannot
    carry. A sandbox would fail to import that name, so what the lambda gets is this:
    the same (function, args, kwargs), larger, with the user's modules inside. Both are the
    caller's own bytes; only these are sent, in signed frames.
    """
    return by_value((job.function, job.args, dict(job.kwargs)), job.function)


def by_value(value: Any, function: Any) -> bytes:
    """`value` pickled with every module of the user's own code pickled by value.

    The user's own code is every top-level module or package loaded here that the sandbox
    lacks and that is not installed (`_own_code`): a region in `mypkg.regions` calling
    `mypkg.helpers.f`, or a script calling a function of `helpers.py` beside it, sends `f` by
    value too. cloudpickle then copies what is reached from `value` (functions, classes,
    module objects referenced as globals), not the whole package. Helpers cached with
    `functools.lru_cache` (or `functools.cache`) travel as their function and cache settings:
    cloudpickle would send them by name. Installed packages (site-packages) travel by
    reference: the sandbox must have them (lampy's `requirements.txt` holds numpy and
    cloudpickle). This is the sending side only: the sandbox still unpickles nothing that is
    not signed with the shared secret.
    """
    own = _own_code()
    with _pickle_lock:
        for module in own:
            cloudpickle.register_pickle_by_value(module)
        try:
            out = io.BytesIO()
            _ByValuePickler(out, protocol=PROTOCOL).dump(value)
            return out.getvalue()
        except Exception as exc:
            name = getattr(function, "__qualname__", type(function).__name__)
            raise SerializationError(
                f"cannot send {name} by value from {getattr(function, '__module__', '?')} "
                f"(with the user's modules {', '.join(m.__name__ for m in own)}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for module in own:
                cloudpickle.unregister_pickle_by_value(module)


class _ByValuePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with lru_cache-wrapped helpers of the user's code sent by value."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, functools._lru_cache_wrapper) and _sent_by_value(obj):
            settings = obj.cache_parameters()
            return lru_cached, (obj.__wrapped__, settings["maxsize"], settings["typed"])
        return super().reducer_override(obj)


def lru_cached(function: Callable[..., Any], maxsize: int | None, typed: bool) -> Any:
    """A helper cached with `functools.lru_cache`, made again where it is unpickled (its cache
    starts empty there, and lives as long as the sandbox keeps the job's template)."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(function)


def _sent_by_value(obj: Any) -> bool:
    top = (getattr(obj, "__module__", None) or "").partition(".")[0]
    return top == "__main__" or _OWN.get(top, False)


# Whether each top-level name loaded here is the user's own code: decided once per name.
_OWN: dict[str, bool] = {}


def _own_code() -> list[types.ModuleType]:
    """The top-level modules and packages of the user's own code loaded in this process.

    Own code is what the sandbox lacks and nobody installed: not `__main__` (cloudpickle sends
    it by value already), not the standard library, not lampy, numpy or cloudpickle (the deploy
    tarball carries them), not built into the interpreter, and with no file under an
    installation directory (the standard library's folders, a `site-packages` or
    `dist-packages` folder, wherever it is). So a project's source tree counts, editable
    installs (`pip install -e .`) included, and a package installed from an index does not: it
    travels by name, and the sandbox must have it.
    """
    own = []
    for name in [n for n in list(sys.modules) if "." not in n]:
        module = sys.modules.get(name)
        if not isinstance(module, types.ModuleType) or module.__name__ != name:
            continue  # not a module, or another name for one (multiprocessing's __mp_main__)
        if name not in _OWN:
            _OWN[name] = _is_own_code(name, module)
        if _OWN[name]:
            own.append(module)
    return own


def _is_own_code(name: str, module: types.ModuleType) -> bool:
    if name == "__main__" or name in sys.stdlib_module_names or name in _REMOTE_PACKAGES:
        return False
    places = [getattr(module, "__file__", None) or "", *(getattr(module, "__path__", None) or [])]
    places = [os.path.realpath(p) for p in places if isinstance(p, str) and p]
    return bool(places) and not any(_installed(p) for p in places)


def _installed(path: str) -> bool:
    """Whether `path` lies where packages are installed, not in someone's source tree."""
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(path == p or path.startswith(p + os.sep) for p in _install_roots())


@functools.cache
def _install_roots() -> tuple[str, ...]:
    """The folders packages are installed in: this interpreter's (a venv's) and its base's."""
    roots = set(site.getsitepackages()) | {site.getusersitepackages()}
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars)
        roots.update(paths.get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    return tuple(sorted({os.path.realpath(r) for r in roots if r}))
