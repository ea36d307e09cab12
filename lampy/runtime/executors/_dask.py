# mypy: disallow-untyped-calls=False
# (distributed is only partly annotated; its calls are checked where it has annotations.)
"""The `dask` executor: each chunk is one task on an existing Dask cluster (dask.distributed).

For users who already run Dask rather than OpenLambda: decorated code stays unchanged, and
`lampy.using(executor="dask", address="tcp://HOST:8786")` (or `client=` an existing
`distributed.Client`, or a default Client made before the call) sends its chunks to the cluster.
lampy starts no cluster of its own here, so nothing surprising runs on the caller's machine.

How a job travels: the pickled (function, args, kwargs) template and the shared arrays are
scattered once to every worker (`broadcast`, so losing one worker does not lose them); each
chunk's rows are scattered to one worker, so array bytes go straight from the caller to a
worker, never through the scheduler or inside the task graph. A worker keeps the unpickled
template of its last few jobs, so each chunk unpickles only its rows. Functions travel as the
other executors send them (cloudpickle, by reference when importable), so the workers need
lampy, numpy and the modules the function imports: the same environment as the caller.

Failures are sorted as in the other executors. A user exception is the chunk's outcome, never
retried. A worker that dies (killed, out of memory, restarted by its nanny) loses the rows it
held: its chunks run again, each alone on an idle worker, and a chunk whose lone run kills its
worker is charged an attempt; after `attempts` it is reported lost (`RetriesExhausted` naming
the chunk, its rows and each attempt's cause). See `_Run`. A cluster that cannot
be reached fails fast with an `ExecutionError` naming the address; a worker that cannot run
lampy's task at all (lampy missing there) fails the call with one that says what to check.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import CancelledError
from typing import Any

try:
    import distributed
    from distributed import Future, as_completed
    from distributed.comm.addressing import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend
except ImportError as exc:  # the registry turns this into "the dask executor cannot load: ..."
    raise ImportError(
        f"dask.distributed is not installed ({exc}); install it with: pip install 'lampy[dask]'"
    ) from exc

from lampy._errors import ExecutionError, OptionError
from lampy.runtime._codec import dumps_out_of_band
from lampy.runtime._job import Job, aligned
from lampy.runtime._plan import Costs
from lampy.runtime._scheduler import ATTEMPTS, ChunkScheduler, check_attempts
from lampy.runtime._tree import map_leaves
from lampy.runtime._worker_side import Outcome, Templates, decoded, run_task
from lampy.runtime.executors._base import Executor

CONNECT_TIMEOUT_S = 10.0
# Measured by bench/bench_overheads.py against a 2-worker LocalCluster on the reference machine
# (a busy one: other jobs shared its 2 cores), so "auto" fans out to Dask only for heavy work.
SECONDS_PER_BYTE = 1 / 4.6e8  # scattered to a worker over TCP, and back
SECONDS_PER_CHUNK = 3.6e-3  # one task through the scheduler and back
DEPTH = 16  # chunk tasks per worker thread at a time (one running): hides the round trip
WORKER_WAIT_S = 60.0  # for a worker to come back when every worker has left

Pickled = tuple[bytes, list[memoryview]]  # a chunk's value from dumps_out_of_band
_templates = Templates()  # on a worker: the jobs it has seen
ADVICE = (
    "A worker killed by SIGKILL is often the out-of-memory killer: ask for more chunks "
    "(chunks=N) or give the workers more memory."
)
_LOST_DATA = (
    "its task was cancelled: the Dask worker holding the chunk's rows left the cluster "
    "(killed, out of memory, or restarted by its nanny)"
)


class DaskExecutor(Executor):
    name = "dask"
    option_types = {"address": str, "client": object, "attempts": int, "connect_timeout": float}

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(options.get("client"), str):
            raise OptionError(
                "the dask executor's client= takes a distributed.Client; for a scheduler "
                "address use address='tcp://HOST:8786' (or LAMPY_DASK_ADDRESS)"
            )
        return super().parse_options(options)

    def __init__(
        self,
        address: str | None = None,
        client: distributed.Client | None = None,
        attempts: int = ATTEMPTS,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        if client is not None and not isinstance(client, distributed.Client):
            raise OptionError(f"client must be a distributed.Client; got {client!r}")
        if client is not None and address is not None:
            raise OptionError(
                f"give the dask executor address= or client=, not both (address={address!r})"
            )
        if not connect_timeout > 0:
            raise OptionError(f"connect_timeout must be seconds > 0; got {connect_timeout!r}")
        if address is not None:
            _check_address(address)
        self.address, self.connect_timeout = address, connect_timeout
        self.attempts = check_attempts(attempts)
        self._given = client
        self._own: distributed.Client | None = None
        self._lock = threading.Lock()

    def costs(self) -> Costs:
        threads = sum(self.client().nthreads().values())
        return Costs(
            workers=max(1, threads),
            seconds_per_byte=SECONDS_PER_BYTE,
            seconds_per_chunk=SECONDS_PER_CHUNK,
        )

    def client(self) -> distributed.Client:
        """The Client this executor uses: the one given, one of its own, or the default one."""
        if self._given is not None:
            if self._given.status in ("closing", "closed"):
                raise OptionError(
                    "the distributed.Client given as client= is closed; pass an open one"
                )
            return self._given
        if self.address is None:
            try:
                default: distributed.Client = distributed.default_client()
            except ValueError:
                raise OptionError(
                    "the dask executor needs a cluster: lampy.using(executor='dask', "
                    "address='tcp://HOST:8786') (or LAMPY_DASK_ADDRESS), client=an existing "
                    "distributed.Client, or a Client made before the call"
                ) from None
            return default
        with self._lock:
            if self._own is None or self._own.status in ("closing", "closed"):
                self._own = self._connect(self.address)
            return self._own

    def run(self, job: Job) -> dict[int, Outcome]:
        if not job.chunks:
            return {}
        client = self.client()
        try:
            return _Run(client, job, self.attempts).go()
        except (OSError, TimeoutError) as exc:
            where = getattr(client.scheduler, "address", "?")
            raise ExecutionError(
                f"the Dask scheduler at {where} stopped answering during the job "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def close(self) -> None:
        with self._lock:
            if self._own is not None:
                self._own.close()
                self._own = None

    def _connect(self, address: str) -> distributed.Client:
        where = f"the Dask scheduler at {address}"
        try:
            _probe(address, self.connect_timeout)
            return distributed.Client(address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ExecutionError(
                f"cannot reach {where} within connect_timeout={self.connect_timeout:g}s "
                f"({type(exc).__name__}: {exc}). Is the scheduler running (`dask scheduler`), "
                "and is the address the one it printed?"
            ) from exc


class _Run:
    """One job on the cluster: scatter, submit, collect, and resend chunks whose worker left.

    Every chunk's rows are scattered up front, spread over the workers by their threads, but a
    worker gets at most `DEPTH` chunk tasks per thread at a time (so it never waits for the
    client); more go out as tasks finish, to the worker holding their rows or to an idle one,
    which fetches them.

    When a worker dies, which of its chunks killed it cannot be told (Dask does not say which
    task was running, and a finished task's result dies with it), so none is charged yet: they
    all become suspects, and each suspect is run again alone on a worker that has nothing else
    to do. A worker that dies then died running that chunk: only that is charged an attempt.
    So a poisonous chunk uses up its own attempts, never its neighbours'.
    """

    def __init__(self, client: distributed.Client, job: Job, attempts: int) -> None:
        self.client, self.job = client, job
        self.scheduler = ChunkScheduler(job, attempts, ADVICE)
        self.prefix = f"lampy-{getattr(job.function, '__name__', 'chunk')}-{job.id}"
        self.shared: list[Future[Any]] = []
        self.tasks: dict[Future[Any], tuple[int, str]] = {}  # -> chunk, the worker running it
        self.sent: dict[int, int] = {}  # chunk -> submissions so far (unique task keys)
        self.threads: dict[str, int] = {}  # live worker -> threads
        self.inflight: dict[str, set[Future[Any]]] = {}  # worker -> its tasks not answered
        self.waiting: dict[str, deque[tuple[int, Future[Any]]]] = {}  # rows held, no task yet
        self.suspects: deque[int] = deque()  # chunks lost with a worker, to run alone
        self.alone: dict[str, Future[Any]] = {}  # worker -> the suspect it runs alone
        self.gone: set[str] = set()

    def go(self) -> dict[int, Outcome]:
        scheduler = self.scheduler
        self._scatter(list(iter(scheduler.next, None)))
        pending = as_completed(loop=self.client.loop, with_results=True, raise_errors=False)
        try:
            pending.update(self._submit())
            for batch in pending.batches():
                for future, result in batch:
                    self._settle(future, result)
                    self.suspects.extend(iter(scheduler.next, None))  # lost: to run alone
                    if scheduler.done:
                        return scheduler.outcomes
                pending.update(self._submit())
            return scheduler.outcomes
        finally:
            if self.tasks:
                self.client.cancel(list(self.tasks))

    def _scatter(self, chunks: list[int]) -> None:
        """Send the chunks' rows to live workers, in proportion to their threads."""
        self._find_workers()
        load = {w: len(self.waiting[w]) + len(self.inflight[w]) for w in self.threads}
        placement: dict[str, list[int]] = {}
        for chunk in chunks:
            worker = min(load, key=lambda w: load[w] / self.threads[w])
            placement.setdefault(worker, []).append(chunk)
            load[worker] += 1
        for worker, mine in placement.items():
            parts = self._rows_to(worker, mine)
            if parts is None:  # the worker just left: place these again
                self._scatter(mine)
                continue
            self.waiting[worker].extend(zip(mine, parts, strict=True))

    def _rows_to(self, worker: str, chunks: list[int]) -> list[Future[Any]] | None:
        rows = [self.job.rows(c) for c in chunks]
        try:
            parts: list[Future[Any]] = self.client.scatter(rows, workers=[worker], hash=False)
        except KeyError:  # the scheduler no longer knows this worker: it just left
            self.gone.add(worker)
            self.threads = {}
            return None
        return parts

    def _submit(self) -> list[Future[Any]]:
        """Top every live worker up to DEPTH tasks per thread; idle ones take rows from others.

        A suspect goes to a worker with nothing in flight and runs there alone; while suspects
        wait and none runs, one worker gets no new work, so that it drains.
        """
        self._find_workers()
        if not self.shared or any(f.status != "finished" for f in self.shared):
            self.shared = self.client.scatter(
                [self.job.template, *self.job.whole], broadcast=True, hash=False
            )
        draining = next(iter(self.threads)) if self.suspects and not self.alone else None
        futures: list[Future[Any]] = []
        for worker, threads in list(self.threads.items()):
            if worker in self.alone:
                continue
            if self.suspects and not self.inflight[worker]:
                chunk = self.suspects.popleft()
                parts = self._rows_to(worker, [chunk])
                if parts is None:
                    self.suspects.appendleft(chunk)
                    continue
                self.alone[worker] = self._send(worker, [(chunk, parts[0])])[0]
                futures.append(self.alone[worker])
                continue
            if worker == draining:
                continue
            mine: list[tuple[int, Future[Any]]] = []
            while len(mine) < DEPTH * threads - len(self.inflight[worker]):
                source = worker if self.waiting[worker] else max(self.waiting, key=self._backlog)
                if not self.waiting[source]:
                    break
                mine.append(self.waiting[source].popleft())
            if mine:
                futures += self._send(worker, mine)
        return futures

    def _send(self, worker: str, mine: list[tuple[int, Future[Any]]]) -> list[Future[Any]]:
        keys = []
        for c, _ in mine:
            self.sent[c] = self.sent.get(c, 0) + 1
            keys.append(f"{self.prefix}-{c}-{self.sent[c]}")
        mapped: list[Future[Any]] = self.client.map(
            _run_on_worker,
            [part for _, part in mine],
            key=keys,
            pure=False,
            workers=[worker],
            allow_other_workers=True,  # a hint: a worker that left must not strand the task
            job_id=self.job.id,
            template=self.shared[0],
            whole=self.shared[1:],
        )
        for future, (c, _) in zip(mapped, mine, strict=True):
            self.tasks[future] = (c, worker)
            self.inflight[worker].add(future)
        return mapped

    def _backlog(self, worker: str) -> int:
        return len(self.waiting[worker])

    def _find_workers(self) -> None:
        """The live workers and their threads (asked again after a loss); waits if none."""
        if self.threads:
            return
        for _ in range(2):
            alive: dict[str, int] = self.client.nthreads()
            self.threads = {w: n for w, n in alive.items() if w not in self.gone}
            if self.threads:
                break
            try:
                self.client.wait_for_workers(len(alive) + 1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                break
        if not self.threads:
            raise ExecutionError(
                f"the Dask cluster has no worker left to run {self.job.label(0)} and the rest "
                f"(waited {WORKER_WAIT_S:g}s); is its nanny or autoscaler up?"
            )
        for worker in self.threads:
            self.inflight.setdefault(worker, set())
            self.waiting.setdefault(worker, deque())
        for worker in [w for w in self.waiting if w not in self.threads]:
            chunks = [c for c, _ in self.waiting.pop(worker)]  # their rows left with it
            self._scatter(chunks)

    def _settle(self, future: Future[Any], result: Any) -> None:
        """Tell the scheduler how this task ended (see the class for lost workers).

        `result` is what as_completed gathered: the chunk's error Outcome or pickled value, a
        CancelledError, or for a task that raised, (type, exception, traceback).
        """
        chunk, worker = self.tasks.pop(future)
        self.inflight.get(worker, set()).discard(future)
        ran_alone = self.alone.get(worker) is future
        if ran_alone:
            del self.alone[worker]
        if future.status == "finished":
            self.scheduler.finished(chunk, _decoded(result), 0.0)
            return
        error = result if isinstance(result, BaseException) else result[1]
        if isinstance(error, distributed.KilledWorker):  # Dask gave up after its own retries
            self.scheduler.failed(chunk, f"KilledWorker: {error}")
        elif isinstance(error, CancelledError):
            if worker not in self.gone and worker not in self.client.nthreads():
                self.gone.add(worker)
                self.threads = {}
            if ran_alone:
                self.scheduler.failed(chunk, _LOST_DATA)
            else:
                self.scheduler.again(chunk)  # lost among others: not charged, run alone next
        else:
            raise ExecutionError(
                f"{self.job.label(chunk)}: a Dask worker could not run lampy's task "
                f"({type(error).__name__}: {error}). Are lampy, numpy and cloudpickle installed "
                "on the workers, at the versions used here?"
            ) from error


def _decoded(result: Outcome | Pickled) -> Outcome:
    """A finished task's outcome; arrays aligned (Dask's buffers may leave them at odd
    addresses, where numpy rounds differently)."""
    if isinstance(result, Outcome):
        return result
    payload, buffers = result
    return decoded(payload, buffers, lambda value: map_leaves(value, aligned))


def _run_on_worker(
    parts: tuple[Any, ...], *, job_id: str, template: bytes, whole: list[Any]
) -> Outcome | Pickled:
    """Run one chunk on a Dask worker: its error, or its value pickled by lampy's codec.

    The value is pickled here, not by Dask, so it comes back exactly (Dask's own pickling of
    an object holding arrays turns big-endian arrays native) and its array bytes still travel
    out of band, as memoryviews Dask sends without copying.
    """
    outcome = run_task(_templates.load(job_id, template).call, parts, whole, _encode)
    return outcome if outcome.error is not None else outcome.value


def _encode(value: Any) -> Pickled:
    payload, buffers = dumps_out_of_band(value)
    return payload, [buffer.raw() for buffer in buffers]


def _check_address(address: str) -> None:
    """Refuse a malformed scheduler address before connecting (Dask's own parser says why)."""
    try:
        scheme = parse_address(address)[0]
        get_backend(scheme)  # an unknown scheme raises here, naming the known ones
        if scheme in ("tcp", "tls"):
            get_address_host_port(address)
    except ValueError as exc:
        raise OptionError(
            f"address must be a Dask scheduler address like 'tcp://HOST:8786'; got {address!r} "
            f"({exc})"
        ) from None


def _probe(address: str, timeout: float) -> None:
    """Fail fast and cleanly on a TCP address nothing listens on.

    A `distributed.Client` that fails to connect is left half-made and complains when collected,
    so plain TCP is tried first; other schemes (tls, ws, ucx) go straight to the Client.
    """
    if parse_address(address)[0] != "tcp":
        return
    host, port = get_address_host_port(address)
    socket.create_connection((host, port), timeout=timeout).close()
