"""Benchmark reporting: ratios measured side by side in one run, written to bench/RESULTS.md.

Every benchmark names its `group` (one workload) and, in `extra_info`, its `system` (the `row`
fixture sets both). Per row the table shows the median time and two ratios:
- against the baseline: the group's baseline row (`extra_info["baseline"] = True`; numpy alone
  for every workload) divided by this row's time, so above 1 is faster;
- against the machine's limit: the group's `limit_s` (the best time this machine allows, e.g.
  the bytes moved at the measured memory bandwidth, or numpy on one core divided by the cores)
  divided by this row's time, so 1 is at the ceiling.
A row may carry a `target` (a minimum ratio to the baseline) and `beats` (systems of the same
group it must be faster than); it is then marked met or missed. A row whose peer is not
installed is still listed, marked skipped with the reason (`row.skip`). RESULTS.json holds the
raw figures beside the table.

Rows that carry `extra_info["scaling"]` (bench/bench_scale.py) go to their own generated section,
"## Scaling with the cores", with the workers, efficiency and the caller's serial share. The
file is rewritten section by section: a generated section whose rows did not run this time is
kept as it was, and the hand-written sections after them are kept verbatim.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

# The Fisher example and the test helpers live in the checkout, not in the installed package.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).with_name("RESULTS.md")
PEERS_HINT = "run `make bench-peers`"
_skipped: list[dict[str, str]] = []


def olreal_kit() -> ModuleType:
    """tests/olreal.py, which starts and stops OpenLambda's own worker for the test suite too."""
    return importlib.import_module("tests.olreal")


def started_olreal() -> Iterator[str]:
    """A fresh OpenLambda worker of the kit, for a bench module's fixture to yield from; the
    module's OpenLambda rows skip, saying why, where the kit is absent or cannot start one."""
    os.environ.setdefault("LAMPY_SECRET", "lampy-bench-secret")
    kit = olreal_kit()
    if kit.REASON:
        pytest.skip(kit.REASON)
    try:
        with kit.real_worker() as url:
            yield url
    except kit.Unavailable as exc:
        pytest.skip(f"olreal: {exc}")


@dataclass
class Row:
    """Names a benchmark's row; `skip` lists it as skipped, with why, and skips the test."""

    benchmark: Any
    node: pytest.Item

    def __call__(self, group: str, system: str, **info: Any) -> None:
        self.benchmark.group = group
        self.benchmark.extra_info.update(system=system, **info)
        self.node.user_properties.append(("row", (group, system)))

    def skip(self, reason: str) -> None:
        group, system = dict(self.node.user_properties)["row"]
        _skipped.append({"group": group, "system": system, "reason": reason})
        pytest.skip(reason)

    def need(self, module: str, what: str) -> Any:
        """Import a peer, or skip this row saying how to install it."""
        try:
            return __import__(module, fromlist=["_"])
        except ImportError:
            self.skip(f"{what} is not installed: {PEERS_HINT}")


@pytest.fixture
def row(benchmark: Any, request: pytest.FixtureRequest) -> Row:
    return Row(benchmark, request.node)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def served_arrays(arrays: dict[str, np.ndarray]) -> Iterator[str]:
    """`lampy serve` on loopback serving `arrays` as NAME.npy (in /dev/shm where there is one):
    its base URL. An array server near the platform, for `lampy.remote` references."""
    from lampy.testing import free_port, wait_ready

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="lampy-bench-", dir=shm) as root:
        for name, array in arrays.items():
            np.save(Path(root) / f"{name}.npy", array)
        port = free_port()
        command = [sys.executable, "-m", "lampy.cli", "serve", root, "--port", str(port)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `lampy worker` on loopback with 4 sandboxes, lampy deployed, for one bench module."""
    from lampy.runtime import executors
    from lampy.testing import openlambda_worker

    os.environ.setdefault("LAMPY_SECRET", "lampy-bench-secret")
    try:
        with openlambda_worker(tmp_path_factory.mktemp("registry"), max_sandboxes=4) as url:
            yield url
    finally:
        executors.shutdown()


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A distributed LocalCluster of processes (one per core, one thread each), on loopback.

    Workers start with one BLAS thread each (Dask's default), like lampy's local pool. Even idle,
    a cluster costs the other rows time (its scheduler runs in this process), so it lives for
    one module only, asked for lazily by the rows that use it, and those rows run last. The
    environment it changes is put back at once.
    """
    try:
        import distributed
    except ImportError:
        yield None
        return
    saved = dict(os.environ)
    try:
        cluster = distributed.LocalCluster(
            n_workers=cores(),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.CRITICAL,
        )
    finally:
        # LocalCluster leaves MALLOC_TRIM_THRESHOLD_=65536 and one-thread BLAS settings in this
        # process's environment; every process started later (a lampy pool, a lampy worker)
        # would inherit them, and the trim threshold alone made lampy's workers several times
        # slower here (fresh pages on every allocation).
        os.environ.clear()
        os.environ.update(saved)
    with cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client


def with_dask_client(row: Row, client: Any) -> Any:
    """The session's Dask client, or skip the row when dask.distributed is missing."""
    if client is None:
        row.skip(f"dask.distributed is not installed: {PEERS_HINT}")
    return client


def timed_median(fn: Callable[[], Any], rounds: int = 5) -> float:
    """Median seconds of `fn()` over a few rounds (for limits measured inside a test)."""
    import time

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _ratio(numerator: float | None, median: float) -> str:
    return f"{numerator / median:.2f}x" if numerator and median else ""


SCALING = "## Scaling with the cores"
SCALING_INTRO = [
    SCALING,
    "",
    "Generated by `bench/bench_scale.py` (in `make bench`). *speed-up*: numpy alone's time over",
    "this row's. *efficiency*: numpy on one core's time over this row's, divided by the workers",
    "(1 is perfect scaling). *serial share*: the time the caller itself spends probing, copying",
    "inputs, pickling and sending, waiting for workers to start and combining results, over the",
    "row's time (median of the rounds; lampy's own counters of the caller's time per phase).",
    "For (e), the Fisher hour, it is the whole caller's: the time no region was out at the",
    "workers (the pipeline's own numpy work included) plus those waits, over the row's time.",
    "",
]


def _scaling_rows(benchmarks: list[Any]) -> list[str]:
    """The scaling table: one row per workload, system and worker count."""
    lines = [
        "| workload | system | workers | median | speed-up | efficiency | serial share "
        "| target | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[str, list[Any]] = defaultdict(list)
    for bench in benchmarks:
        groups[bench.group or bench.name].append(bench)
    for group, members in groups.items():
        members.sort(key=lambda b: not b.extra_info.get("baseline"))
        base = next((b.stats.median for b in members if b.extra_info.get("baseline")), None)
        one = next((b.stats.median for b in members if b.extra_info.get("one_core")), None)
        medians = {b.extra_info.get("system", b.name): b.stats.median for b in members}
        for bench in members:
            info, median = bench.extra_info, bench.stats.median
            workers = info["scaling"].get("workers")
            share = info["scaling"].get("serial_share")
            efficiency = f"{one / median / workers:.2f}" if one and workers and median else ""
            target, verdict = _verdict(info, median, base, medians, [])
            if "share_target" in info and share is not None:
                target = "; ".join(
                    t for t in (target, f"serial share <= {info['share_target']:.0%}") if t
                )
                ok = share <= info["share_target"] and verdict in ("", "met")
                verdict = "met" if ok else "missed"
            note = info.get("note", "")
            system = info.get("system", bench.name) + (f" ({note})" if note else "")
            lines.append(
                f"| {group} | {system} | {workers or ''} | {median * 1e3:,.1f} ms | "
                f"{_ratio(base, median)} | {efficiency} | "
                f"{'' if share is None else f'{share:.1%}'} | {target} | {verdict} |"
            )
    return lines


def _sections(text: str) -> tuple[list[str], list[str], list[str]]:
    """An existing RESULTS.md cut into its main table, its scaling section (both generated)
    and the hand-written sections after them."""
    lines = text.splitlines()
    table = [line for line in lines[: _first_heading(lines)] if line.startswith("|")]
    start = _first_heading(lines)
    scaling: list[str] = []
    if start < len(lines) and lines[start] == SCALING:
        end = _first_heading(lines, start + 1)
        scaling, start = lines[start:end], end
    return table, scaling, lines[start:]


def _first_heading(lines: list[str], start: int = 0) -> int:
    return next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))


def _rows(benchmarks: list[Any]) -> list[str]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for bench in benchmarks:
        groups[bench.group or bench.name].append(bench)
    skipped: dict[str, list[dict[str, str]]] = defaultdict(list)
    for skip in _skipped:
        groups.setdefault(skip["group"], [])
        skipped[skip["group"]].append(skip)
    lines = [
        "| workload | system | median | vs baseline | vs machine limit | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, members in groups.items():
        members.sort(key=lambda b: not b.extra_info.get("baseline"))  # baseline first
        base = next((b.stats.median for b in members if b.extra_info.get("baseline")), None)
        limit = next((b.extra_info["limit_s"] for b in members if "limit_s" in b.extra_info), None)
        medians = {b.extra_info.get("system", b.name): b.stats.median for b in members}
        for bench in members:
            info, median = bench.extra_info, bench.stats.median
            target, verdict = _verdict(info, median, base, medians, skipped[group])
            note = info.get("note", "")
            system = info.get("system", bench.name) + (f" ({note})" if note else "")
            lines.append(
                f"| {group} | {system} | {median * 1e3:,.1f} ms | {_ratio(base, median)} | "
                f"{_ratio(limit, median)} | {target} | {verdict} |"
            )
        for skip in skipped[group]:
            lines.append(f"| {group} | {skip['system']} | skipped: {skip['reason']} |  |  |  |  |")
    return lines


def _verdict(
    info: dict[str, Any],
    median: float,
    base: float | None,
    medians: dict[str, float],
    skipped: list[dict[str, str]],
) -> tuple[str, str]:
    """The row's target text and whether it was met (against numpy and named peers)."""
    wanted, verdicts = [], []
    if "target" in info and base:
        wanted.append(f">= {info['target']:g}x baseline")
        verdicts.append(base / median >= info["target"])
    beats = info.get("beats", [])
    if beats:
        wanted.append("faster than " + ", ".join(beats))
    unknown = False
    for peer in beats:
        if peer in medians:
            verdicts.append(median < medians[peer])
        elif any(s["system"] == peer for s in skipped):
            unknown = True
    if not wanted:
        return "", ""
    if not all(verdicts):
        return "; ".join(wanted), "missed"
    return "; ".join(wanted), "met (some peers skipped)" if unknown else "met"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b.stats]
    if not benchmarks and not _skipped:
        return
    scaled = [b for b in benchmarks if b.extra_info.get("scaling")]
    plain = [b for b in benchmarks if not b.extra_info.get("scaling")]
    old_table, old_scaling, hand = _sections(RESULTS.read_text() if RESULTS.exists() else "")
    lines = _rows(plain) if plain or _skipped else old_table
    scaling = SCALING_INTRO + _scaling_rows(scaled) + [""] if scaled else old_scaling
    terminalreporter.write_sep("=", "lampy benchmark ratios (medians, one run)")
    for line in (_rows(plain) if plain or _skipped else []) + (
        _scaling_rows(scaled) if scaled else []
    ):
        terminalreporter.write_line(line)
    header = [
        "# Benchmark results",
        "",
        "Generated by `make bench` (medians; every ratio measured side by side in one run on a",
        f"{cores()}-core machine). *vs baseline*: the baseline's time (numpy alone, for every",
        "workload) over this row's, so above 1 is faster. *vs machine limit*: the best time the",
        "machine allows for the workload (bytes at the measured memory bandwidth, numpy on one",
        "core over the cores, raw aiohttp or TCP) over this row's time; 1 is at the ceiling.",
        "Raw figures: RESULTS.json.",
        "",
        '*The sections from "How these figures were made" on are written by hand: `make bench`',
        "rewrites the tables and keeps those sections, so update their figures when these change.*",
        "",
    ]
    RESULTS.write_text("\n".join(header + lines + [""] + scaling + hand) + "\n")
    raw = [
        {"group": b.group, "name": b.name, "median_s": b.stats.median, "extra_info": b.extra_info}
        for b in benchmarks
    ] + [{**s, "skipped": True} for s in _skipped]
    RESULTS.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


@pytest.fixture(scope="session")
def copy_bytes_per_s() -> float:
    """Memory bandwidth as np.copyto sees it (read + write bytes per second), for limits."""
    import numpy as np

    src = np.ones(32 * 1024 * 1024)
    dst = np.empty_like(src)
    return 2 * src.nbytes / timed_median(lambda: np.copyto(dst, src), rounds=7)


@pytest.fixture(scope="session")
def hour() -> tuple[Path, Any, int, list[Any]]:
    """One hour of generated 2-speaker audio (espeak-ng and sox; cached in
    $LAMPY_FISHER_BENCH_DATA, default /tmp/lampy-fisher): path, samples, rate, reference turns.
    """
    import hashlib

    from examples.fisher import synth
    from examples.fisher.audio import read_wav
    from examples.fisher.rttm import read_rttm

    cache = Path(os.environ.get("LAMPY_FISHER_BENCH_DATA", "/tmp/lampy-fisher"))
    # The generator's source is part of the name, so a changed generator never reuses old audio.
    version = hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()[:10]
    wav = cache / f"hour_2spk_seed1_{version}.wav"
    rttm = wav.with_suffix(".rttm")
    if not (wav.exists() and rttm.exists()):
        if not synth.have_tools():
            pytest.skip(synth.INSTALL_HINT)
        cache.mkdir(parents=True, exist_ok=True)
        synth.generate(wav, rttm, n_speakers=2, seconds=3600.0, seed=1)
    signal, rate = read_wav(wav)
    return wav, signal, rate, read_rttm(rttm)
