"""(e) The Fisher pipeline's two heavy stages on one hour of audio, against Dask and TensorFlow,
and the serial remainder of every stage.

- short-term features: the 38 features of every 50 ms frame (`frame_features`, rfft, filter
  banks, entropies), over rows of blocks of frames (a view of the recording plus the few
  samples around each row);
- FLsD scatter sums: per-class counts and sums and the Gram matrix of the mid-term vectors
  (`scatter_partials`).
numpy alone is the undecorated function; lampy local is the region as the pipeline calls it
(chunks="auto"); Dask runs the same function per block of rows with dask.array (8 chunks);
TensorFlow computes the same quantities with its own ops (tf.signal.rfft, segment sums,
matmul), checked against numpy. The whole pipeline on each executor is in bench_fisher.py.

The serial remainder: the whole pipeline on `local`, speaker count given and found, with, per
stage, the CPU time the calling process spent (its own numpy work plus lampy moving data and
combining): what more workers cannot shrink; and the run's serial share (the caller's time
alone over the wall time; its CPU over all CPU). It is written into the row's note and, per
stage, into RESULTS.json.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import Row, cores, with_dask_client
from threadpoolctl import threadpool_limits

import lampy
from examples.fisher import diarize, features, flsd, vad
from examples.fisher.pipeline import Params
from lampy.runtime import _serial as serial
from lampy.runtime import executors

CHUNKS = 8
FEATURES = "(e) Fisher stage: short-term features of 1 hour"
SCATTER = "(e) Fisher stage: FLsD scatter sums of 1 hour"
SYSTEMS = ["numpy", "numpy-1core", "local", "dask-threads", "dask-distributed", "tensorflow"]
NAMES = {
    "numpy": "numpy alone",
    "numpy-1core": "numpy alone, one core",
    "local": 'lampy local, chunks="auto" (as the pipeline runs it)',
    "dask-threads": f"Dask dask.array, threaded scheduler, {CHUNKS} chunks",
    "dask-distributed": f"Dask dask.array, distributed LocalCluster, {CHUNKS} chunks",
    "tensorflow": "TensorFlow (CPU)",
}
PEERS = [NAMES["dask-threads"], NAMES["dask-distributed"], NAMES["tensorflow"]]
frame_features = features.frame_features.__wrapped__  # type: ignore[attr-defined]
scatter_partials = flsd.scatter_partials.__wrapped__  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stage_inputs(hour: Any) -> dict[str, Any]:
    """The blocks of frames, and the mid-term vectors with their pseudo-classes, as diarize
    builds them."""
    _, signal, rate, _ = hour
    win, hop = features.frame_geometry(rate)
    body, edges = features.frame_rows(signal, win, hop)
    feats, step = features.short_term_features(signal, rate)
    p = Params()
    mfcc = feats[:, features.MFCC_COLUMNS]
    speech = vad.detect_speech(mfcc, step, features.mfcc_to_mel_db(rate))
    mid_win, mid_hop = round(p.mid_window / step), round(p.mid_step / step)
    voice = features.VOICE_COLUMNS
    mid, centres, count = features.mid_term_features(feats, speech, mid_win, mid_hop, voice)
    keep = count >= p.min_voiced * mid_win
    x = flsd.standardize(mid[keep])
    classes = flsd.time_blocks(centres[keep] * step, p.flsd_block)
    return {
        "features": (body, edges, rate, win, hop),
        "scatter": (x, classes, int(classes.max()) + 1),
    }


# rows that need the Dask cluster run last (see the dask_client fixture)
CASES = [(st, sy) for st in ("features", "scatter") for sy in SYSTEMS if sy != "dask-distributed"]
CASES += [("features", "dask-distributed"), ("scatter", "dask-distributed")]


@pytest.mark.parametrize(("stage", "system"), CASES)
def test_stage(
    benchmark: Any,
    row: Row,
    request: pytest.FixtureRequest,
    stage_inputs: dict[str, Any],
    stage: str,
    system: str,
) -> None:
    group = FEATURES if stage == "features" else SCATTER
    info: dict[str, Any] = {"beats": PEERS} if system == "local" else {}
    row(group, NAMES[system], baseline=system == "numpy", **info)
    args = stage_inputs[stage]
    plain = frame_features if stage == "features" else scatter_partials
    fn: Callable[[], Any]
    if system == "numpy":
        fn = lambda: plain(*args)  # noqa: E731
    elif system == "numpy-1core":

        def fn() -> Any:
            with threadpool_limits(1):
                return plain(*args)

    elif system == "local":
        region = features.frame_features if stage == "features" else flsd.scatter_partials

        def fn() -> Any:
            with lampy.using(executor="local"):
                return region(*args)

    elif system.startswith("dask"):
        da = row.need("dask.array", "Dask (dask[distributed])")
        client = None
        if system == "dask-distributed":
            client = with_dask_client(row, request.getfixturevalue("dask_client"))
        fn = _dask(da, stage, args, client)
    else:
        tf = row.need("tensorflow", "TensorFlow (tensorflow-cpu)")
        fn = _tf_features(tf, *args) if stage == "features" else _tf_scatter(tf, *args)
    fn()  # warm: pools started, graphs traced
    rounds = 3 if stage == "features" or system == "dask-distributed" else 5  # features: ~2 s
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1)
    _check(result, plain(*args))
    if system == "numpy-1core":
        benchmark.extra_info["limit_s"] = benchmark.stats.stats.median / cores()


def _check(result: Any, want: Any) -> None:
    if isinstance(want, dict):
        for key in want:
            _check(result[key], want[key])
    else:
        np.testing.assert_allclose(result, want, rtol=1e-6, atol=1e-8)


def _dask(da: Any, stage: str, args: tuple[Any, ...], client: Any) -> Callable[[], Any]:
    if stage == "features":
        body, edges, rate, win, hop = args
        rows = -(-body.shape[0] // CHUNKS)
        source = da.from_array(body, chunks=(rows, -1))
        around = da.from_array(edges, chunks=(rows, -1))
        collection = da.map_blocks(
            frame_features,
            source,
            around,
            rate,
            win,
            hop,
            chunks=(source.chunks[0], (body.shape[1] // hop,), (len(features.FEATURE_NAMES),)),
            new_axis=2,
            dtype=np.float64,
        )
        unpack: Callable[[Any], Any] = lambda value: value  # noqa: E731
    else:
        x, classes, n_classes = args
        like = scatter_partials(x[:2], classes[:2], n_classes)
        keys = sorted(like)
        size = sum(np.size(like[k]) for k in keys)
        rows = -(-x.shape[0] // CHUNKS)
        xs = da.from_array(x, chunks=(rows, -1))
        cs = da.from_array(classes[:, None], chunks=(rows, 1))

        def block(xb: np.ndarray, cb: np.ndarray) -> np.ndarray:
            p = scatter_partials(xb, cb[:, 0], n_classes)
            return np.concatenate([np.ravel(p[k]) for k in keys])[None, :]

        nblocks = len(xs.chunks[0])
        collection = da.map_blocks(
            block, xs, cs, chunks=((1,) * nblocks, (size,)), dtype=np.float64
        ).sum(axis=0)

        def unpack(value: np.ndarray) -> dict[str, np.ndarray]:
            out, at = {}, 0
            for k in keys:
                out[k] = value[at : at + np.size(like[k])].reshape(np.shape(like[k]))
                at += np.size(like[k])
            return out

    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "large graph": numpy inputs inside
            if client is not None:
                return unpack(client.compute(collection).result())
            return unpack(collection.compute(scheduler="threads", num_workers=cores()))

    return run


def _tf_features(
    tf: Any, body: np.ndarray, edges: np.ndarray, rate: int, win: int, hop: int
) -> Callable[[], Any]:
    """The features of examples/fisher/features.block_features, in TensorFlow ops."""
    fbank, dct, chroma = (tf.constant(m) for m in features._filters(rate, win))
    n_bins, per_block, batch = win // 2, body.shape[1] // hop, 64
    freqs = tf.constant(np.arange(n_bins) * rate / win)
    eps = features.EPS

    def entropy(parts: Any) -> Any:
        p = parts / (tf.reduce_sum(parts, axis=-1, keepdims=True) + eps)
        return -tf.reduce_sum(p * tf.math.log(p + eps) / np.log(2.0), axis=-1)

    @tf.function(reduce_retracing=True)
    def one_batch(chunk: Any) -> Any:
        frames = tf.signal.frame(tf.cast(chunk, tf.float64), win, hop)[:, : per_block + 1]
        nb = tf.shape(frames)[0]
        spectra = tf.abs(tf.signal.rfft(tf.reshape(frames, (-1, win))))[:, :n_bins] / n_bins
        spectra = tf.reshape(spectra, (nb, per_block + 1, n_bins))
        prev_mag = tf.reshape(spectra[:, :-1], (-1, n_bins))
        mag = tf.reshape(spectra[:, 1:], (-1, n_bins))
        x = tf.reshape(frames[:, 1:], (-1, win))
        signs = tf.sign(x)
        zcr = tf.reduce_sum(tf.abs(signs[:, 1:] - signs[:, :-1]), axis=1) / (2.0 * (win - 1))
        energy = tf.reduce_sum(x * x, axis=1) / win
        sub = win // 10
        energy_entropy = entropy(tf.reduce_sum(tf.reshape(x[:, : 10 * sub], (-1, 10, sub)) ** 2, 2))
        total = tf.reduce_sum(mag, axis=1) + eps
        centroid = tf.reduce_sum(mag * freqs, axis=1) / total
        spread = tf.sqrt(tf.reduce_sum(mag * (freqs - centroid[:, None]) ** 2, axis=1) / total)
        power = mag * mag
        bsub = n_bins // 10
        spectral_entropy = entropy(
            tf.reduce_sum(tf.reshape(power[:, : 10 * bsub], (-1, 10, bsub)), 2)
        )
        prev_total = tf.reduce_sum(prev_mag, axis=1, keepdims=True) + eps
        flux = tf.reduce_sum((mag / total[:, None] - prev_mag / prev_total) ** 2, axis=1)
        cum = tf.cumsum(power, axis=1)
        above = tf.cast(cum > 0.9 * cum[:, -1:], tf.int32)
        rolloff = tf.where(
            cum[:, -1] > 0, tf.cast(tf.argmax(above, axis=1), tf.float64) / n_bins, 0.0
        )
        cepstra = (tf.math.log(mag @ fbank + eps) / np.log(10.0)) @ dct
        mfcc, finer = cepstra[:, : features.N_MFCC], cepstra[:, features.N_MFCC :]
        c = (power @ chroma) / (tf.reduce_sum(power, axis=1, keepdims=True) + eps)
        scalars = [zcr, energy, energy_entropy, centroid / (rate / 2.0), spread / (rate / 2.0)]
        scalars += [spectral_entropy, flux, rolloff]
        chroma_std = tf.math.reduce_std(c, 1)[:, None]
        out = tf.concat([tf.stack(scalars, axis=1), mfcc, c, chroma_std, finer], 1)
        return tf.reshape(out, (nb, per_block, -1))

    def run() -> np.ndarray:
        data = tf.concat([edges[:, :hop], body, edges[:, hop:]], axis=1)  # rows as frame_rows cut
        parts = [one_batch(data[lo : lo + batch]) for lo in range(0, body.shape[0], batch)]
        return tf.concat(parts, axis=0).numpy()

    return run


def _tf_scatter(tf: Any, x: np.ndarray, classes: np.ndarray, n_classes: int) -> Callable[[], Any]:
    def run() -> dict[str, np.ndarray]:
        xt, ct = tf.constant(x), tf.constant(classes)
        return {
            "n": tf.cast(tf.math.bincount(ct, minlength=n_classes), tf.float64).numpy(),
            "s": tf.math.unsorted_segment_sum(xt, ct, n_classes).numpy(),
            "g": tf.matmul(xt, xt, transpose_a=True).numpy(),
        }

    return run


SERIAL = "(e) Fisher pipeline on local: serial remainder per stage"


@pytest.mark.parametrize("count", ["given", "found"])
def test_serial_remainder_per_stage(benchmark: Any, row: Row, hour: Any, count: str) -> None:
    """The hour on local; per stage, the caller's CPU time against the stage's wall time, and
    for the whole run the caller's serial share: its time alone (no region out at the
    workers, or waiting inside one for copies or start-up) over the wall time, and its CPU
    time over all CPU time (its own and the workers', from /proc)."""
    from bench_scale import process_cpu

    row(SERIAL, f"lampy local, speaker count {count}: caller CPU / wall per stage (median of 3)")
    _, signal, rate, _ = hour
    results, alone, of_all = [], [], []
    pool = executors.get("local", {})

    def run() -> None:
        pids = pool.worker_pids()  # type: ignore[attr-defined]
        before, workers_cpu = serial.snapshot(), process_cpu(pids)
        cpu, start = time.process_time(), time.perf_counter()
        results.append(diarize(signal, rate, n_speakers=2 if count == "given" else None))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        spent = serial.since(before)
        waits = spent.get("copy", 0.0) + spent.get("start-up", 0.0)
        alone.append((wall - spent.get("job", 0.0) + waits) / wall)
        if pool.worker_pids() == pids:  # type: ignore[attr-defined]  # (none replaced)
            of_all.append(cpu / (cpu + process_cpu(pids) - workers_cpu))

    pool.start()  # up and warm first: a call while it starts runs in the caller
    deadline = time.monotonic() + 120
    while not pool.is_warm():
        assert time.monotonic() < deadline, "the pool did not start within 120 s"
        time.sleep(0.02)
    with lampy.using(executor="local"):
        diarize(signal[: rate * 60], rate, n_speakers=2)  # plans and imports warm
        benchmark.pedantic(run, rounds=3, iterations=1)
    stages = list(results[0].timings)
    cpu = {s: float(np.median([r.caller_cpu[s] for r in results])) for s in stages}
    wall = {s: float(np.median([r.timings[s] for r in results])) for s in stages}
    total = benchmark.stats.stats.median
    share = float(np.median(alone))
    benchmark.extra_info.update(
        caller_cpu=cpu, stage_wall=wall, serial_share=share, caller_cpu_of_all=of_all
    )
    parts = ", ".join(f"{s} {cpu[s]:.2f}/{wall[s]:.2f}" for s in stages)
    cpu_share = f", {np.median(of_all):.0%} of all CPU" if of_all else ""
    benchmark.extra_info["note"] = (
        f"{results[0].n_speakers} speakers; caller CPU {sum(cpu.values()):.2f} s of {total:.2f} s"
        f"{cpu_share}; serial share {share:.0%}; per stage, s: {parts}"
    )
