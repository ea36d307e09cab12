"""Workloads (a)-(d) on every system, side by side: numpy alone and its peers against lampy.

(a) compute-bound elemwise: per row block, rfft then a small matmul (128 MiB of rows).
(b) memory-bound elemwise: a + b on 256 MiB arrays.
(c) Gram matrix and per-class sums (the FLsD scatter partials of examples/fisher) on 128 MiB.
(d) one k-means iteration (assignment, per-cluster counts and sums) on 10^6 points.

Systems: numpy alone (the baseline), numpy on one core (whose time over the cores is the compute
limit), lampy inline / local / openlambda (a real `lampy worker`) / dask (lampy's executor on the
Dask cluster), Dask itself with the same chunking (dask.array, threaded scheduler and a
distributed LocalCluster of processes), TensorFlow on the CPU for (a) and (c), joblib for (a).
Every system computes the same answer (checked against numpy on every row). Peers that are not
installed are listed as skipped, with how to install them (`make bench-peers`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import Row, cores, with_dask_client
from threadpoolctl import threadpool_limits

import lampy
from examples.fisher.cluster import kmeans_partials
from examples.fisher.flsd import scatter_partials
from lampy.runtime import executors
from lampy.testing import openlambda_worker

CHUNKS = 8  # the same chunking for every chunked system
RNG = np.random.default_rng(0)
FRAMES = RNG.standard_normal((16_384, 1024))  # 128 MiB of float64 rows
BASIS = RNG.standard_normal((513, 64))
A = RNG.standard_normal(32 * 1024 * 1024)  # 256 MiB each
B = RNG.standard_normal(32 * 1024 * 1024)
GRAM_X = RNG.standard_normal((262_144, 64))  # 128 MiB
GRAM_CLASSES = RNG.integers(0, 64, GRAM_X.shape[0])
POINTS = RNG.standard_normal((1_000_000, 8))
CENTROIDS = RNG.standard_normal((1, 8, 8))  # 1 restart, k = 8, 8 dimensions
ALL = [
    "numpy",
    "numpy-1core",
    "inline",
    "local",
    "local-8",
    "openlambda",
    "lampy-dask",
    "dask-threads",
    "dask-distributed",
    "tensorflow",
    "joblib",
]
NAMES = {
    "numpy": "numpy alone",
    "numpy-1core": "numpy alone, one core",
    "inline": 'lampy inline, chunks="auto"',
    "local": 'lampy local, chunks="auto"',
    "local-8": f"lampy local, chunks={CHUNKS}",
    "openlambda": f"lampy openlambda (lampy worker), chunks={CHUNKS}",
    "lampy-dask": f"lampy dask executor (LocalCluster), chunks={CHUNKS}",
    "dask-threads": f"Dask dask.array, threaded scheduler, {CHUNKS} chunks",
    "dask-distributed": f"Dask dask.array, distributed LocalCluster, {CHUNKS} chunks",
    "tensorflow": "TensorFlow (CPU)",
    "joblib": f"joblib (loky processes), {CHUNKS} chunks",
}
WARM_CALLS = 5
DASK = [NAMES["dask-threads"], NAMES["dask-distributed"]]
PEER_NAMES = {"tensorflow": "TensorFlow (tensorflow-cpu)", "joblib": "joblib"}


def spectral_features(frames: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """A compute-heavy row-wise step: magnitude spectra projected on a small basis."""
    spectra = np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1))
    return np.log1p(spectra) @ basis


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


gram_partials = scatter_partials.__wrapped__  # type: ignore[attr-defined]
kmeans_step = kmeans_partials.__wrapped__  # type: ignore[attr-defined]


@dataclass
class Workload:
    group: str
    numpy: Callable[[], Any]
    region: Callable[..., Any]  # the lampy region: a decorator applied to the plain function
    args: tuple[Any, ...]
    dask: Callable[[Any], Any] | None = None  # builds the dask collection from `da`
    tensorflow: Callable[[Any], Callable[[], Any]] | None = None
    joblib: Callable[[Any], Callable[[], Any]] | None = None
    exact: bool = False
    #: (a), (c), (d): time of numpy on one core over the cores; (b): bytes at memory bandwidth
    memory_bytes: int | None = None
    targets: dict[str, dict[str, Any]] | None = None


def _pack(partials: dict[str, Any]) -> np.ndarray:
    return np.concatenate([np.ravel(partials[k]) for k in sorted(partials)])


def _unpack(packed: np.ndarray, like: dict[str, Any]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for key in sorted(like):
        size = np.size(like[key])
        out[key] = packed[at : at + size].reshape(np.shape(like[key]))
        at += size
    return out


def _dask_partials(
    da: Any, fn: Callable[..., dict[str, Any]], split: list[np.ndarray], *shared: Any
) -> Any:
    """A @lampy.sum-style reduction in dask.array: per-block partials (packed), summed."""
    like = fn(*(a[:2] for a in split), *shared)
    size = _pack(like).size
    rows = -(-split[0].shape[0] // CHUNKS)
    blocks = [da.from_array(a if a.ndim == 2 else a[:, None], chunks=(rows, -1)) for a in split]
    nblocks = len(blocks[0].chunks[0])

    def block(*parts: np.ndarray) -> np.ndarray:
        arrays = [p if s.ndim == 2 else p[:, 0] for p, s in zip(parts, split, strict=True)]
        return _pack(fn(*arrays, *shared))[None, :]

    summed = da.map_blocks(block, *blocks, chunks=((1,) * nblocks, (size,)), dtype=np.float64).sum(
        axis=0
    )
    return summed, like


def _dask_spectral(da: Any) -> Any:
    frames = da.from_array(FRAMES, chunks=(FRAMES.shape[0] // CHUNKS, -1))
    return frames.map_blocks(
        spectral_features, BASIS, chunks=(frames.chunks[0], (BASIS.shape[1],)), dtype=np.float64
    )


def _dask_add(da: Any) -> Any:
    rows = A.shape[0] // CHUNKS
    return da.from_array(A, chunks=rows) + da.from_array(B, chunks=rows)


def _dask_gram(da: Any) -> Any:
    summed, like = _dask_partials(da, gram_partials, [GRAM_X, GRAM_CLASSES], 64)
    return summed, like


def _dask_kmeans(da: Any) -> Any:
    return _dask_partials(da, kmeans_step, [POINTS], CENTROIDS)


def _tf_spectral(tf: Any) -> Callable[[], Any]:
    window = tf.constant(np.hanning(FRAMES.shape[1]))
    basis = tf.constant(BASIS)

    def run() -> np.ndarray:
        frames = tf.constant(FRAMES) * window
        spectra = tf.abs(tf.signal.rfft(frames))
        return (tf.math.log1p(spectra) @ basis).numpy()

    return run


def _tf_gram(tf: Any) -> Callable[[], dict[str, np.ndarray]]:
    def run() -> dict[str, np.ndarray]:
        x, classes = tf.constant(GRAM_X), tf.constant(GRAM_CLASSES)
        return {
            "n": tf.cast(tf.math.bincount(classes, minlength=64), tf.float64).numpy(),
            "s": tf.math.unsorted_segment_sum(x, classes, 64).numpy(),
            "g": tf.matmul(x, x, transpose_a=True).numpy(),
        }

    return run


def _joblib_spectral(joblib: Any) -> Callable[[], np.ndarray]:
    parallel = joblib.Parallel(n_jobs=cores(), backend="loky")
    blocks = np.array_split(FRAMES, CHUNKS)

    def run() -> np.ndarray:
        parts = parallel(joblib.delayed(spectral_features)(b, BASIS) for b in blocks)
        return np.concatenate(parts)

    return run


WORKLOADS = {
    "a": Workload(
        "(a) compute-bound elemwise: rfft + small matmul, 16384 x 1024",
        lambda: spectral_features(FRAMES, BASIS),
        lambda **o: lampy.elemwise(shared=("basis",), **o)(spectral_features),
        (FRAMES, BASIS),
        dask=_dask_spectral,
        tensorflow=_tf_spectral,
        joblib=_joblib_spectral,
        targets={
            "local": {"target": 1.8, "beats": DASK},
            "local-8": {"target": 1.8, "beats": DASK},
        },
    ),
    "b": Workload(
        "(b) memory-bound elemwise: a + b, 256 MiB each",
        lambda: add(A, B),
        lambda **o: lampy.elemwise(**o)(add),
        (A, B),
        dask=_dask_add,
        exact=True,
        memory_bytes=3 * A.nbytes,
        targets={"local": {"target": 0.95, "note": "must not fan out"}},
    ),
    "c": Workload(
        "(c) Gram matrix and per-class sums (FLsD scatter), 262144 x 64",
        lambda: gram_partials(GRAM_X, GRAM_CLASSES, 64),
        lambda **o: lampy.sum(**o)(gram_partials),
        (GRAM_X, GRAM_CLASSES, 64),
        dask=_dask_gram,
        tensorflow=_tf_gram,
        targets={"local": {"beats": DASK}, "local-8": {"beats": DASK}},
    ),
    "d": Workload(
        "(d) one k-means iteration, 10^6 points, k = 8, 8 dims",
        lambda: kmeans_step(POINTS, CENTROIDS),
        lambda **o: lampy.sum(shared=("centroids",), **o)(kmeans_step),
        (POINTS, CENTROIDS),
        dask=_dask_kmeans,
        targets={"local": {"beats": DASK}, "local-8": {"beats": DASK}},
    ),
}
CLUSTER = ("lampy-dask", "dask-distributed")  # rows that need the Dask cluster: run last
CASES = [(w, s) for w in WORKLOADS for s in ALL if s not in CLUSTER]
CASES += [(w, s) for w in WORKLOADS for s in CLUSTER]
SKIP = {
    ("b", "tensorflow"),
    ("b", "joblib"),
    ("c", "joblib"),
    ("d", "tensorflow"),
    ("d", "joblib"),
}


@pytest.fixture(scope="module")
def worker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import os

    os.environ.setdefault("LAMPY_SECRET", "lampy-bench-secret")
    with openlambda_worker(tmp_path_factory.mktemp("registry"), max_sandboxes=cores()) as url:
        yield url


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return {key: w.numpy() for key, w in WORKLOADS.items()}


def _check(result: Any, want: Any, exact: bool) -> None:
    if isinstance(want, dict):
        for key in want:
            _check(result[key], want[key], exact)
    elif exact:
        np.testing.assert_array_equal(result, want)
    else:
        np.testing.assert_allclose(result, want, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize(("workload", "system"), [c for c in CASES if c not in SKIP])
def test_workload(
    benchmark: Any,
    row: Row,
    request: pytest.FixtureRequest,
    expected: dict[str, Any],
    copy_bytes_per_s: float,
    workload: str,
    system: str,
) -> None:
    w = WORKLOADS[workload]
    info: dict[str, Any] = dict((w.targets or {}).get(system, {}))
    row(w.group, NAMES[system], baseline=system == "numpy", **info)
    rounds = 3 if system in ("openlambda", "dask-distributed", "lampy-dask") else 5
    fn: Callable[[], Any]
    if system == "numpy":
        fn = w.numpy
        if w.memory_bytes:
            benchmark.extra_info["limit_s"] = w.memory_bytes / copy_bytes_per_s
    elif system == "numpy-1core":

        def fn() -> Any:
            with threadpool_limits(1):
                return w.numpy()

    elif system in ("inline", "local", "local-8", "openlambda", "lampy-dask"):
        fn = _lampy(w, system, row, request)
    elif system.startswith("dask"):
        client = request.getfixturevalue("dask_client") if system in CLUSTER else None
        fn = _dask(w, system, row, client)
    else:  # tensorflow, joblib
        module = system
        make = w.tensorflow if system == "tensorflow" else w.joblib
        assert make is not None
        fn = make(
            row.need(module, {"tensorflow": "TensorFlow (tensorflow-cpu)"}.get(module, module))
        )
    # Warm: pools started, imports done, plans made. Auto settles by the fifth call: it
    # replans an elemwise call kept here from the last two whole calls, tries a fanned-out
    # plan's blocks against whole chunks (two calls each), and the first call that fans out
    # pays the workers' import of this module (docs/executors.md).
    for _ in range(WARM_CALLS):
        fn()
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1)
    _check(result, expected[workload], w.exact)
    if system == "local":  # what auto settled on, so a surprising row says why
        plan = fn.explain()  # type: ignore[attr-defined]
        blocks = f" in blocks of {plan.block_rows} rows" if plan.block_rows else ""
        settled = f"{len(plan.chunks)} chunks{blocks}" if plan.fan_out else "kept in the caller"
        note = info.get("note")
        benchmark.extra_info["note"] = f"{note}; auto: {settled}" if note else f"auto: {settled}"
    if system == "numpy-1core" and not w.memory_bytes:
        benchmark.extra_info["limit_s"] = benchmark.stats.stats.median / cores()


def _lampy(w: Workload, system: str, row: Row, request: pytest.FixtureRequest) -> Callable[[], Any]:
    options: dict[str, Any] = {}
    if system == "openlambda":
        options = {"url": request.getfixturevalue("worker_url")}
    elif system == "lampy-dask":
        client = with_dask_client(row, request.getfixturevalue("dask_client"))
        options = {"client": client}
    executor = {"local-8": "local", "lampy-dask": "dask"}.get(system, system)
    chunks = None if system in ("local", "inline") else CHUNKS
    if executor == "local":  # the pool warm before the rounds: auto never waits for it
        pool = executors.get("local", {})
        pool.start()
        deadline = time.monotonic() + 120
        while not pool.is_warm():
            assert time.monotonic() < deadline, "the local pool did not start within 120 s"
            time.sleep(0.02)
    f = w.region(executor=executor, chunks=chunks)

    def run() -> Any:
        with lampy.using(executor=executor, **options):
            return f(*w.args)

    def explain() -> lampy.Plan:
        with lampy.using(executor=executor, **options):
            return f.explain(*w.args)

    run.explain = explain  # type: ignore[attr-defined]
    return run


def _dask(w: Workload, system: str, row: Row, dask_client: Any) -> Callable[[], Any]:
    da = row.need("dask.array", "Dask (dask[distributed])")
    assert w.dask is not None
    built = w.dask(da)
    collection, like = built if isinstance(built, tuple) else (built, None)
    client = with_dask_client(row, dask_client) if system in CLUSTER else None

    def run() -> Any:
        with warnings.catch_warnings():
            # Dask warns that the numpy inputs ride inside the graph ("large graph"): that is
            # how dask.array takes in-memory numpy arrays, and part of what is measured here.
            warnings.simplefilter("ignore", UserWarning)
            if client is not None:
                value = client.compute(collection).result()
            else:
                value = collection.compute(scheduler="threads", num_workers=cores())
        return value if like is None else _unpack(value, like)

    return run
