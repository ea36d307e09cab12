"""Helpers for testing code that uses lampy, with real parts rather than mocks.

`openlambda_worker()` starts a real `lampy worker` on a free loopback port with lampy's lambda
deployed, so a test or benchmark can run regions on the openlambda executor exactly as a user
would against OpenLambda. `chaos()` runs a region on such a worker while it injects faults
(sandboxes killed mid-call, 502, 429, hangs, resets, damaged, duplicated and dropped answers)
and checks the answer is the inline executor's, so users can test their own code under failure.
`InProcessTransport` runs the openlambda executor against lampy's real handler in this process
(no worker, no network), and `assert_same` compares answers leaf by leaf.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lampy.runtime._net import free_port, wait_ready
from lampy.runtime._tree import zip_leaves
from lampy.runtime.openlambda._transport import Reply, Transport

__all__ = [
    "DEFAULT_PLAN",
    "ChaosReport",
    "InProcessTransport",
    "assert_same",
    "chaos",
    "free_port",
    "openlambda_worker",
    "wait_ready",
    "worker_command",
    "worker_stats",
]

#: The fault plan `chaos()` uses by default: the mix `lampy worker --chaos` documents (22%).
DEFAULT_PLAN = "kill=0.05,502=0.05,429=0.05,hang=0.02,reset=0.02,corrupt=0.01,duplicate=0.02"


def worker_command(
    port: int,
    registry: Path,
    max_sandboxes: int = 4,
    runtime_limit: float = 30.0,
    chaos: str | None = None,
    chaos_seed: int = 0,
) -> list[str]:
    """The `lampy worker` command line for these settings (for tests that manage the process)."""
    command = [sys.executable, "-m", "lampy.cli", "worker", "--port", str(port)]
    command += ["--registry", str(registry), "--max-sandboxes", str(max_sandboxes)]
    command += ["--runtime-limit", str(runtime_limit)]
    if chaos is not None:
        command += ["--chaos", chaos, "--chaos-seed", str(chaos_seed)]
    return command


@contextmanager
def openlambda_worker(
    registry: Path,
    max_sandboxes: int = 4,
    runtime_limit: float = 30.0,
    name: str = "lampy",
    start_timeout: float = 30.0,
    chaos: str | None = None,
    chaos_seed: int = 0,
) -> Iterator[str]:
    """A `lampy worker` on 127.0.0.1 with lampy deployed as `name` (and `name`-coordinator,
    as `lampy deploy` does); yields its URL.

    The worker and the deploy read the secret from LAMPY_SECRET (or the user's config dir), so
    set LAMPY_SECRET first to keep a test away from the user's own secret. With `chaos` (a
    `--chaos` plan) the worker injects faults into calls, dealt from `chaos_seed`.
    """
    from lampy.runtime.openlambda._deploy import upload

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = worker_command(port, registry, max_sandboxes, runtime_limit, chaos, chaos_seed)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_ready(url, process, start_timeout)
        upload(url, name)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def worker_stats(url: str) -> dict[str, int]:
    """The worker's `GET /stats` counters (with a chaos plan: `chaos_<fault>`, what it did)."""
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
        return dict(json.load(answer))


@dataclass
class ChaosReport:
    """What `chaos()` saw: the faults the worker dealt and what the executor made of them."""

    plan: str
    seed: int
    chunks: int  # chunks that ran on the worker
    seconds: float  # the call under faults
    inline_seconds: float  # the same call on the inline executor
    calls: int  # attempts sent, counting a batch of chunks once per chunk
    retried: int  # chunks that needed more than one attempt
    faults: dict[str, int]  # what the worker injected (its /stats chaos_<fault>)
    failures: dict[str, int]  # attempts that got no answer, by kind
    dropped: dict[str, int]  # answers refused (corrupt, stale duplicates, superseded)

    def __str__(self) -> str:
        def listed(counts: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"

        return (
            f"chaos plan {self.plan!r} seed {self.seed}: {self.chunks} chunks, answer equal to "
            f"inline, {self.seconds:.2f} s (inline {self.inline_seconds:.2f} s)\n"
            f"  worker injected: {listed(self.faults)}\n"
            f"  failed attempts: {listed(self.failures)}; answers dropped: "
            f"{listed(self.dropped)}; {self.retried} chunks retried"
        )


def chaos(
    region: Callable[..., Any],
    *args: Any,
    plan: str = DEFAULT_PLAN,
    seed: int = 0,
    chunks: int | None = None,
    exact: bool = True,
    attempts: int = 10,
    runtime_limit: float = 2.0,
    max_sandboxes: int = 4,
    **kwargs: Any,
) -> ChaosReport:
    """Run `region(*args, **kwargs)` under a seeded fault plan; check it equals inline.

    Starts a `lampy worker --chaos plan --chaos-seed seed` on loopback, runs the call there on
    the openlambda executor, one chunk a call (retry budget `attempts`; a hang costs
    `runtime_limit` seconds),
    and compares with the inline executor leaf by leaf: bit for bit when `exact`, else
    allclose (for float reductions whose chunking differs; give `chunks` to fix it). Raises
    AssertionError when the answers differ, when a chunk was lost or merged twice, or when the
    call never left the process (so no fault could reach it); returns a report otherwise.
    Without LAMPY_SECRET set, the run signs with a throwaway secret.

    >>> import numpy as np, lampy
    >>> from lampy.testing import chaos
    >>> @lampy.sum(chunks=20)
    ... def total(x):
    ...     return (x * x).sum()
    >>> report = chaos(total, np.arange(10_000), plan="kill=0.1,502=0.1,duplicate=0.1", seed=3)
    >>> report.chunks, report.failures["http 502"] > 0
    (20, True)
    """
    import lampy
    from lampy.runtime import executors
    from lampy.runtime._settings import resolve_options
    from lampy.runtime.openlambda._executor import OpenLambdaExecutor

    start = time.perf_counter()
    with lampy.using(executor="inline", chunks=chunks):
        expected = region(*args, **kwargs)
    inline_seconds = time.perf_counter() - start
    with (
        tempfile.TemporaryDirectory(prefix="lampy-chaos-") as registry,
        _throwaway_secret(),
        openlambda_worker(
            Path(registry), max_sandboxes, runtime_limit, chaos=plan, chaos_seed=seed
        ) as url,
    ):
        timeout = max(10.0, 3 * runtime_limit)  # the worker's 502 comes first
        # one chunk a call, so every chunk meets the plan on its own (automatic batching
        # would make 16 calls of a 1,000-chunk job on 2 cores, and so few faults)
        options = {
            "url": url,
            "attempts": attempts,
            "timeout": timeout,
            "progress": "off",
            "batch": 1,
        }
        with lampy.using(executor="openlambda", chunks=chunks, **options):
            executor = executors.get("openlambda", resolve_options("openlambda"))
            assert isinstance(executor, OpenLambdaExecutor)
            try:
                start = time.perf_counter()
                got = region(*args, **kwargs)
                seconds = time.perf_counter() - start
                faults = {
                    k.removeprefix("chaos_"): v
                    for k, v in worker_stats(url).items()
                    if k.startswith("chaos_")
                }
            finally:
                executor.close()
    accounts = list(executor.accounts)
    if not accounts:
        raise AssertionError(
            "the call ran in this process (the planner chose not to fan out), so no fault "
            "could reach it: give the region more work or chunks=N"
        )
    for account in accounts:
        twice = sorted(c for c, n in account.accepted.items() if n > 1)
        missing = sorted(set(range(account.chunks)) - set(account.accepted))
        if twice or missing or account.lost:
            raise AssertionError(
                f"exactly-once broken: chunks accepted twice {twice}, never answered "
                f"{missing}, lost {sorted(account.lost)}"
            )
    _compare(got, expected, exact, rtol=1e-9, against="inline")
    return ChaosReport(
        plan=plan,
        seed=seed,
        chunks=sum(a.chunks for a in accounts),
        seconds=seconds,
        inline_seconds=inline_seconds,
        calls=sum(sum(a.attempts.values()) for a in accounts),
        retried=sum(sum(n > 1 for n in a.attempts.values()) for a in accounts),
        faults=faults,
        failures=_total(a.failures for a in accounts),
        dropped=_total(a.dropped for a in accounts),
    )


@contextmanager
def _throwaway_secret() -> Iterator[None]:
    """A fresh LAMPY_SECRET for the run when none is set: the worker, the deploy and the
    executor agree on it, and the user's kept secret is neither needed nor created."""
    if os.environ.get("LAMPY_SECRET"):
        yield
        return
    os.environ["LAMPY_SECRET"] = secrets.token_hex(32)
    try:
        yield
    finally:
        os.environ.pop("LAMPY_SECRET", None)


def _total(counters: Iterable[Counter[str]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            total[key] = total.get(key, 0) + value
    return total


def assert_same(actual: Any, expected: Any, exact: bool = True) -> None:
    """Assert two answers are equal leaf by leaf (tuples, lists and dicts of arrays), with the
    same structure, dtypes and shapes: bit for bit when `exact`, else allclose (rtol 1e-6)."""
    _compare(actual, expected, exact, rtol=1e-6, against="expected")


def _compare(actual: Any, expected: Any, exact: bool, rtol: float, against: str) -> None:
    import numpy as np

    from lampy._errors import ResultError

    def same(pair: list[Any], where: str) -> None:
        e, a = np.asarray(pair[0]), np.asarray(pair[1])
        at = f"result{where}"
        assert (a.dtype, a.shape) == (e.dtype, e.shape), (
            f"{at}: got {a.dtype}{a.shape}, {against} {e.dtype}{e.shape}"
        )
        message = f"{at} differs from {against}"
        if exact:
            np.testing.assert_array_equal(a, e, err_msg=message)
        else:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-9, err_msg=message)

    try:
        zip_leaves([expected, actual], same)
    except ResultError as exc:
        raise AssertionError(f"the answer's structure differs from {against}: {exc}") from None


class InProcessTransport(Transport):
    """Calls lampy's real handler in this process, as an OpenLambda worker would, with no
    worker and no network (like httpx's WSGI transport): the openlambda executor's own tests
    use it, and a subclass can fail calls on purpose before passing them on.

        OpenLambdaExecutor(transport=InProcessTransport())
    """

    async def post(self, frame: Any, timeout: float) -> Reply:
        import io

        from lampy.runtime.openlambda._handler import app

        body = frame.join()
        environ = {
            "REQUEST_METHOD": "POST",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
        status: list[str] = []
        answer = app(environ, lambda line, headers: status.append(line))
        return Reply(int(status[0][:3]), b"".join(bytes(part) for part in answer))
