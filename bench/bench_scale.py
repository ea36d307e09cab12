"""Scaling with the cores: workloads (a)-(e) on 1, 2, 4, ... workers, against numpy alone.

For each workload of bench/bench_core.py ((a) rfft + matmul, (b) a + b, (c) Gram and class
sums, (d) a k-means step) and (e) the Fisher diarization of one hour (the example's public
pipeline entry point, `examples.fisher.diarize`, as bench/bench_fisher.py runs it):

- numpy alone (the baseline: all cores for BLAS), and numpy on one core (the Fisher pipeline
  sets one BLAS thread for its own small products, examples/fisher/threads.py, so for (e) the
  two rows run the same code: their gap is the run's noise);
- lampy `local` with 1, 2, 4, ... workers up to the machine's cores, each with its own pool
  (chunks: max(8, 4 per worker) for (a)-(d); the pipeline's own `chunks="auto"` for (e));
- the caller's serial share of each row, from lampy's own counters (lampy/runtime/_serial.py):
  what the caller spends probing, copying inputs, pickling and sending, waiting for workers to
  start and combining, over the call's time. For (e) it is the whole caller's: the time no
  region was out at the workers (the pipeline's own numpy between regions, regions run here,
  lampy's probing, pickling and combining) plus the waits inside a fan-out for input copies
  and starting workers, over the run's wall time: the share more workers cannot shrink. The
  row's note adds the caller's CPU time over the wall time and over all CPU time (the caller's
  and the workers', from /proc).

Also, side by side in the same run:
- (b) with its inputs already in shared memory (`lampy.asshared`), 8 chunks: the function
  as written (`a + b`, whose worker writes its rows twice: numpy's own result, then the
  shared output) and with numpy's `out=` parameter (computed straight into the output);
- (a)'s two parts in numpy alone (window, rfft and log: one thread; the matmul: all BLAS
  threads) and on one core, which give the machine's ceiling for (a): numpy on one core
  over the cores, against numpy alone;
- chaining two elemwise regions against the two regions alone;
- "auto never loses": the first call of a fresh process, `chunks="auto"` on `local` (pool
  cold: probe and start-up included) against `inline`, per workload, and the Fisher CLI as a
  user runs it; each round is paired with a fresh `inline` process and the median of the
  pairs' ratios is noted (`paired`), with two inline processes as the control.

Rows go to the "Scaling with the cores" section of bench/RESULTS.md (bench/conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, Row, cores
from threadpoolctl import threadpool_limits

import lampy
from lampy.runtime import _serial as serial
from lampy.runtime import executors

WORKERS = sorted({*(2**i for i in range(cores().bit_length()) if 2**i <= cores()), cores()})
SHARE_TARGET = 0.05  # the caller's serial share on (a) and (b)
GROUPS = {
    "a": "(a) rfft + small matmul, 16384 x 1024",
    "b": "(b) a + b, 256 MiB each",
    "c": "(c) Gram matrix and per-class sums, 262144 x 64",
    "d": "(d) one k-means iteration, 10^6 points",
    "e": "(e) Fisher diarization, 1 hour of audio",
}


def chunks_for(workers: int) -> int:
    return max(8, 4 * workers)


def warm(workers: int) -> None:
    """Start a pool of `workers` and wait until every worker is up."""
    pool = executors.get("local", {"workers": workers})
    pool.start()
    deadline = time.monotonic() + 120
    while not pool.is_warm():
        assert time.monotonic() < deadline, "the pool did not start within 120 s"
        time.sleep(0.02)


def counted(fn: Callable[[], Any], shares: list[float], phases: list[dict[str, float]]) -> Any:
    """`fn` with the caller's serial share of each call recorded."""

    def run() -> Any:
        before = serial.snapshot()
        start = time.perf_counter()
        value = fn()
        wall = time.perf_counter() - start
        spent = serial.since(before)
        shares.append(serial.serial_seconds(spent) / wall)
        phases.append(spent)
        return value

    return run


def measure(
    benchmark: Any, fn: Callable[[], Any], rounds: int, workers: int | None, **info: Any
) -> Any:
    shares: list[float] = []
    phases: list[dict[str, float]] = []
    run = counted(fn, shares, phases)
    run()  # warm: imports, plans, pools
    shares.clear()
    phases.clear()
    value = benchmark.pedantic(run, rounds=rounds, iterations=1)
    keys = sorted({k for p in phases for k in p})
    benchmark.extra_info.update(
        scaling={
            "workers": workers,
            "serial_share": statistics.median(shares) if workers else None,
            "phases_ms": {k: statistics.median(p.get(k, 0.0) for p in phases) * 1e3 for k in keys},
        },
        **info,
    )
    return value


# -- (a)-(d) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core() -> Any:
    import bench_core  # the workloads and their data, as bench_core.py times them

    return bench_core


SYSTEMS = ["numpy", "numpy-1core", *(f"local-{n}" for n in WORKERS)]
CASES = [(w, s) for w in "abcd" for s in SYSTEMS] + [("b", "shared-8"), ("b", "shared-8-out")]


def add_into(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(b) with numpy's `out=` convention: the local pool passes each chunk its rows of the
    shared output, so the sum is written once."""
    return np.add(a, b, out=out)


@pytest.mark.parametrize(("workload", "system"), CASES)
def test_scaling(benchmark: Any, row: Row, core: Any, workload: str, system: str) -> None:
    w = core.WORKLOADS[workload]
    group = GROUPS[workload]
    want = w.numpy()
    if system == "numpy":
        row(group, "numpy alone", baseline=True)
        got = measure(benchmark, w.numpy, 5, None)
    elif system == "numpy-1core":
        row(group, "numpy alone, one core", one_core=True)

        def one_core() -> Any:
            with threadpool_limits(1):
                return w.numpy()

        got = measure(benchmark, one_core, 5, 1)
    elif system.startswith("shared-8"):
        n = cores()
        out = system.endswith("-out")
        row(
            group,
            "lampy local, 8 chunks, inputs already shared (lampy.asshared)"
            + (", the function with numpy's out= (add_into)" if out else ""),
            target=0.9,
            share_target=SHARE_TARGET,
        )
        args = tuple(lampy.asshared(a) if isinstance(a, np.ndarray) else a for a in w.args)
        if out:
            f = lampy.elemwise(executor="local", chunks=8)(add_into)
        else:
            f = w.region(executor="local", chunks=8)
        warm(n)
        with lampy.using(executor="local", workers=n):
            got = measure(benchmark, lambda: f(*args), 5, n)
    else:
        n = int(system.split("-")[1])
        info: dict[str, Any] = {}
        if workload == "a" and n == cores():
            info["target"] = 1.8
        if workload in "ab":
            info["share_target"] = SHARE_TARGET
        row(group, f"lampy local, {chunks_for(n)} chunks", **info)
        f = w.region(executor="local", chunks=chunks_for(n))
        warm(n)
        with lampy.using(executor="local", workers=n):
            got = measure(benchmark, lambda: f(*w.args), 5, n)
    core._check(got, want, w.exact)


# -- (a)'s parts: the machine's ceiling --------------------------------------------------------

PARTS_GROUP = "(a)'s parts in numpy alone: the ceiling on this machine"


@pytest.mark.parametrize("part", ["whole", "whole-1core", "rfft", "matmul", "matmul-1core"])
def test_a_parts(benchmark: Any, row: Row, core: Any, part: str) -> None:
    """Where numpy alone's time on (a) goes: the window, rfft and log run on one thread, the
    matmul on every BLAS thread. Perfect scaling on n cores takes numpy-on-one-core's time
    over n; that over numpy alone's time is the best speed-up (a) can show here."""
    frames, basis = core.FRAMES, core.BASIS
    spectra = np.log1p(np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1)))
    runs: dict[str, Callable[[], Any]] = {
        "whole": lambda: core.spectral_features(frames, basis),
        "whole-1core": lambda: core.spectral_features(frames, basis),
        "rfft": lambda: np.log1p(np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1))),
        "matmul": lambda: spectra @ basis,
        "matmul-1core": lambda: spectra @ basis,
    }
    names = {
        "whole": "numpy alone, the whole of (a)",
        "whole-1core": "numpy alone on one core, the whole of (a)",
        "rfft": "numpy alone, window + rfft + log (one thread)",
        "matmul": f"numpy alone, the matmul ({cores()} BLAS threads)",
        "matmul-1core": "numpy alone, the matmul on one core",
    }
    row(PARTS_GROUP, names[part], baseline=part == "whole", one_core=part == "whole-1core")
    fn = runs[part]
    if part.endswith("1core"):

        def one_core() -> Any:
            with threadpool_limits(1):
                return runs[part]()

        fn = one_core
    measure(benchmark, fn, 7, 1 if part.endswith("1core") else None)


# -- (e) ---------------------------------------------------------------------------------------


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("system", SYSTEMS)
def test_scaling_fisher_hour(
    benchmark: Any, row: Row, hour: tuple[Path, Any, int, list[Any]], system: str
) -> None:
    from examples.fisher import diarize

    _, signal, rate, _ = hour
    group = GROUPS["e"]

    def inline() -> Any:
        with lampy.using(executor="inline"):
            return diarize(signal, rate, n_speakers=2)

    if system == "numpy":
        row(group, "numpy alone (the same code, lampy inline)", baseline=True)
        result = measure(benchmark, inline, 3, None)
    elif system == "numpy-1core":
        row(group, "numpy alone, one core (lampy inline)", one_core=True)

        def one_core() -> Any:
            with threadpool_limits(1):
                return inline()

        result = measure(benchmark, one_core, 3, 1)
    else:
        n = int(system.split("-")[1])
        row(group, 'lampy local, chunks="auto" (the pipeline as it is)')
        warm(n)

        def local() -> Any:
            with lampy.using(executor="local", workers=n):
                return diarize(signal, rate, n_speakers=2)

        result = measure_pipeline(benchmark, local, 3, n)
    benchmark.extra_info["turns"] = len(result.turns)


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) these processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure_pipeline(benchmark: Any, fn: Callable[[], Any], rounds: int, workers: int) -> Any:
    """`measure` for a whole pipeline on `local`: its serial share is the caller's time alone
    (outside every fan-out, plus the waits inside one for copies and start-up) over the wall
    time, and the note gives the caller's CPU over the wall time and over all CPU time."""
    pool = executors.get("local", {"workers": workers})
    alone: list[float] = []
    over_wall: list[float] = []
    over_all: list[float] = []
    phases: list[dict[str, float]] = []

    def run() -> Any:
        pids = pool.worker_pids()  # type: ignore[attr-defined]
        before, workers_cpu = serial.snapshot(), process_cpu(pids)
        cpu, start = time.process_time(), time.perf_counter()
        value = fn()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        spent = serial.since(before)
        waits = spent.get("copy", 0.0) + spent.get("start-up", 0.0)
        alone.append((wall - spent.get("job", 0.0) + waits) / wall)
        over_wall.append(cpu / wall)
        if pool.worker_pids() == pids:  # type: ignore[attr-defined]  # (none replaced)
            over_all.append(cpu / (cpu + process_cpu(pids) - workers_cpu))
        phases.append(spent)
        return value

    run()  # warm: imports, plans
    for figures in (alone, over_wall, over_all, phases):
        figures.clear()
    value = benchmark.pedantic(run, rounds=rounds, iterations=1)
    keys = sorted({k for p in phases for k in p})
    share = statistics.median(alone)
    benchmark.extra_info.update(
        scaling={
            "workers": workers,
            "serial_share": share,
            "phases_ms": {k: statistics.median(p.get(k, 0.0) for p in phases) * 1e3 for k in keys},
            "caller_cpu_over_wall": statistics.median(over_wall),
            "caller_cpu_over_all_cpu": statistics.median(over_all) if over_all else None,
        },
        note=(
            f"caller CPU {statistics.median(over_wall):.0%} of the wall time"
            + (f", {statistics.median(over_all):.0%} of all CPU" if over_all else "")
            + f"; with this serial share, 16 workers run at most "
            f"{1 / (share + (1 - share) * workers / 16):.1f}x this row's speed (Amdahl)"
        ),
    )
    return value


# -- chaining ------------------------------------------------------------------------------------

CHAIN_X = np.random.default_rng(7).standard_normal((4096, 8192))  # 256 MiB
CHAIN_GROUP = "chaining two elemwise regions, 256 MiB, 8 chunks"


@lampy.elemwise(chunks=8, executor="local")
def log_magnitude(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.abs(x))


@lampy.elemwise(chunks=8, executor="local")
def scaled(y: np.ndarray) -> np.ndarray:
    return y * 3.0 + 1.0


@pytest.mark.parametrize("how", ["alone", "chained"])
def test_chaining(benchmark: Any, row: Row, how: str) -> None:
    """Two regions alone (each on an ordinary array) against the second fed the first's
    result: chaining must cost no more (nothing is copied between them)."""
    other = np.random.default_rng(8).standard_normal(CHAIN_X.shape)
    warm(cores())
    if how == "alone":
        row(CHAIN_GROUP, "the two regions alone, one after the other", baseline=True)

        def run() -> Any:
            log_magnitude(CHAIN_X)
            return scaled(other)

        measure(benchmark, run, 5, cores())
    else:
        row(CHAIN_GROUP, "chained: scaled(log_magnitude(x))", target=1.0)
        got = measure(benchmark, lambda: scaled(log_magnitude(CHAIN_X)), 5, cores())
        np.testing.assert_array_equal(got, np.log1p(np.abs(CHAIN_X)) * 3.0 + 1.0)


# -- auto never loses, first call included -------------------------------------------------------

PAIRS = 9  # interleaved fresh-process pairs per row (each row's own process against a partner's)
# Freed in each fresh process before it says "ready" (untimed, the same for every executor): on
# this VM a fresh page of memory costs the kernel 0.05-1 us to fault in depending on where the
# host backs it (the same 641 faults of `a + b` on 256 MiB took 27-595 ms of system time in
# plain numpy, no lampy: bench/RESULTS.md, "Where lampy loses"), so without it the first-call
# rows measure which process got slow pages. Pages freed here are cheap to fault in again.
SCRATCH_BYTES = 1 << 30

FIRST_CALL = """
import sys, time
import numpy as np
import lampy
sys.path[:0] = [{root!r}]
rng = np.random.default_rng(0)
kind, executor = sys.argv[1], sys.argv[2]
if kind == "a":
    def fn(frames, basis):
        spectra = np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1))
        return np.log1p(spectra) @ basis
    args = (rng.standard_normal((16_384, 1024)), rng.standard_normal((513, 64)))
    region = lampy.elemwise(shared=("basis",))(fn)
elif kind == "b":
    def fn(a, b):
        return a + b
    args = (rng.standard_normal(32 * 1024 * 1024), rng.standard_normal(32 * 1024 * 1024))
    region = lampy.elemwise(fn)
elif kind == "c":
    from examples.fisher.flsd import scatter_partials
    x = rng.standard_normal((262_144, 64))
    args = (x, rng.integers(0, 64, x.shape[0]), 64)
    region = lampy.sum(scatter_partials.__wrapped__)
else:
    from examples.fisher.cluster import kmeans_partials
    args = (rng.standard_normal((1_000_000, 8)), rng.standard_normal((1, 8, 8)))
    region = lampy.sum(shared=("centroids",))(kmeans_partials.__wrapped__)
scratch = np.ones({scratch} // 8)
del scratch
print("ready", flush=True)
sys.stdin.readline()
with lampy.using(executor=executor):
    region(*args)
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def first_call_script(tmp_path: Path) -> Path:
    script = tmp_path / "first_call.py"
    script.write_text(FIRST_CALL.format(root=str(ROOT), scratch=SCRATCH_BYTES))
    return script


def paired(
    benchmark: Any,
    prepare: Callable[[str], Any],
    call: Callable[[Any], None],
    own: str,
    partner: str,
    rounds: int = PAIRS,
) -> float:
    """Time `call(prepare(own))` as the row's rounds, each paired with the same for `partner`,
    run just before the round (even rounds) or just after it (odd rounds), so both sides of a
    pair meet the same machine; returns the median over pairs of own's time over partner's
    (the figure to read on a shared machine, where the rows' medians drift between tests).
    `prepare` is untimed (a fresh process making its data); `call` is what a user waits for."""
    own_s: list[float] = []
    partner_s: list[float] = []
    rounds_seen: list[int] = []

    def timed(variant: str, into: list[float]) -> None:
        handle = prepare(variant)
        start = time.perf_counter()
        call(handle)
        into.append(time.perf_counter() - start)

    def setup() -> tuple[tuple[Any], dict[str, Any]]:
        rounds_seen.append(len(rounds_seen))
        if rounds_seen[-1] % 2 == 0:
            timed(partner, partner_s)
        return (prepare(own),), {}

    def target(handle: Any) -> None:
        start = time.perf_counter()
        call(handle)
        own_s.append(time.perf_counter() - start)

    def teardown(handle: Any) -> None:
        if rounds_seen[-1] % 2 == 1:
            timed(partner, partner_s)

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, iterations=1)
    ratio = statistics.median(o / p for o, p in zip(own_s, partner_s, strict=True))
    benchmark.extra_info["paired"] = {
        "own": own,
        "partner": partner,
        "ratio": ratio,
        "own_ms": [round(t * 1e3, 1) for t in own_s],
        "partner_ms": [round(t * 1e3, 1) for t in partner_s],
    }
    return ratio


@pytest.mark.parametrize("executor", ["inline", "local"])
@pytest.mark.parametrize("workload", ["a", "b", "c", "d"])
def test_first_call(
    benchmark: Any, row: Row, first_call_script: Path, workload: str, executor: str
) -> None:
    """The first call of a fresh process, timed alone: the process has made its data and
    imported lampy (untimed); the call pays the probe and, on `local`, the pool's start-up.
    Each round is paired with a fresh `inline` process (the inline row's partner is another
    inline process: the spread between two runs of the same code, in the same run)."""
    group = f"auto never loses, first call of a fresh process: {GROUPS[workload]}"
    processes: list[subprocess.Popen[str]] = []

    def prepare(variant: str) -> subprocess.Popen[str]:
        # The last process ends first: a pool it started after its call would otherwise
        # start up during this call and bill it for the other process.
        for earlier in processes:
            end_process(earlier)
        process = subprocess.Popen(
            [sys.executable, str(first_call_script), workload, variant],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, LAMPY_EXECUTOR=variant),
        )
        processes.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        return process

    def first_call(process: subprocess.Popen[str]) -> None:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "done"

    if executor == "inline":
        row(group, 'lampy inline, chunks="auto"', baseline=True)
    else:
        row(group, 'lampy local, chunks="auto", pool cold', target=1 / 1.05)
    try:
        ratio = paired(benchmark, prepare, first_call, executor, "inline")
    finally:
        for process in processes:
            end_process(process, kill=True)
    if executor == "inline":
        note = f"two inline processes, interleaved pairs: median ratio {ratio:.2f}"
    else:
        note = f"against inline in interleaved pairs: median time ratio {ratio:.2f}"
    benchmark.extra_info["note"] = note
    benchmark.extra_info["scaling"] = {"workers": cores() if executor == "local" else 1}


def end_process(process: subprocess.Popen[str], kill: bool = False) -> None:
    """Let a first-call process finish (or kill it), and close its pipes."""
    if process.poll() is None:
        if kill or process.stdin is None:
            process.kill()
        else:
            with contextlib.suppress(OSError):
                process.stdin.write("end\n")
                process.stdin.flush()
    process.wait(timeout=60)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


# -- the Fisher CLI, as a new user first runs it --------------------------------------------------

SAMPLE = ROOT / "examples" / "fisher" / "data" / "two_speakers.wav"
CLI_PAIRS = 11
HOUR_CLI_PAIRS = 5  # a round of the hour takes 5-7 s


@pytest.fixture(scope="module")
def ten_minutes(hour: tuple[Path, Any, int, list[Any]]) -> Path:
    """The hour's first 10 minutes, as a file of its own (cached beside the hour)."""
    from examples.fisher.audio import write_wav

    wav, signal, rate, _ = hour
    path = wav.with_name(f"{wav.stem}_first10min.wav")
    if not path.exists():
        write_wav(path, signal[: 600 * rate], rate)
    return path


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("executor", ["inline", "local"])
@pytest.mark.parametrize("recording", ["sample", "ten-minutes", "hour"])
def test_fisher_cli(
    benchmark: Any, row: Row, request: pytest.FixtureRequest, recording: str, executor: str
) -> None:
    """`python -m examples.fisher diarize FILE --executor E`, each round a fresh process,
    timed whole (start, imports, the pipeline, the pool's start and stop: what a user waits
    for), paired with a fresh `--executor inline` process (the inline row's partner is another
    inline process). The pipeline's own total (its --json "total") is kept as a note. On the
    hour, the pool starts while the feature stage runs, which its workers join once up."""
    if recording == "sample":
        wav, label = SAMPLE, "bundled 42 s sample"
    elif recording == "ten-minutes":
        wav, label = request.getfixturevalue("ten_minutes"), "10-minute file"
    else:
        wav, label = request.getfixturevalue("hour")[0], "one-hour file"
    group = f"the Fisher CLI, diarize on the {label}, a fresh process each round"
    command = [sys.executable, "-m", "examples.fisher", "diarize", str(wav), "--json"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    totals: dict[str, list[float]] = {"inline": [], "local": []}

    def run(variant: str) -> None:
        done = subprocess.run(
            [*command, "--executor", variant],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        totals[variant].append(json.loads(done.stdout)["timings"]["total"])

    run(executor)  # untimed: byte code written, files in the page cache
    totals[executor].clear()
    if executor == "inline":
        row(group, "--executor inline", baseline=True)
    else:
        row(group, "--executor local (the default)", target=1.0)
    rounds = HOUR_CLI_PAIRS if recording == "hour" else CLI_PAIRS
    ratio = paired(benchmark, lambda variant: variant, run, executor, "inline", rounds)
    own = statistics.median(totals[executor]) * 1e3
    if executor == "inline":
        pairs = f"two inline processes, interleaved pairs: median ratio {ratio:.2f}"
    else:
        pairs = f"against inline in interleaved pairs: median time ratio {ratio:.2f}"
    benchmark.extra_info["note"] = f"{pairs}; the pipeline's own total {own:,.0f} ms (median)"
    benchmark.extra_info["scaling"] = {"workers": cores() if executor == "local" else 1}


@pytest.fixture(scope="module", autouse=True)
def pools() -> Iterator[None]:
    """Each module's pools stop at its end (they hold memory and processes)."""
    yield
    for n in WORKERS:
        executors.get("local", {"workers": n}).close()
