"""The FLsD diarization pipeline on one hour of generated 2-speaker audio, per executor.

"numpy alone" is the same code with every lampy region on the `inline` executor. The hour is
generated on demand with espeak-ng and sox and cached in $LAMPY_FISHER_BENCH_DATA (default
/tmp/lampy-fisher). The pyAudioAnalysis peer runs in its own venv, found at
$LAMPY_PAA_PYTHON (default bench/.peers/paa/bin/python).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Row, with_dask_client

import lampy
from examples.fisher import diarize
from examples.fisher.rttm import Turn
from examples.fisher.scoring import score
from lampy.regions._runner import BLOCK_TRIALS
from lampy.testing import openlambda_worker

TARGET_DER = 0.10
PAA_PYTHON = Path(
    os.environ.get("LAMPY_PAA_PYTHON", Path(__file__).parent / ".peers" / "paa" / "bin" / "python")
)
PAA_SCRIPT = """
import json, sys, time
import numpy as np
from pyAudioAnalysis import audioSegmentation as aS
start = time.perf_counter()
labels = aS.speaker_diarization(sys.argv[1], int(sys.argv[2]), plot_res=False)
labels = labels[0] if isinstance(labels, tuple) else labels
print(json.dumps({"seconds": time.perf_counter() - start, "labels": np.asarray(labels).tolist()}))
"""


@pytest.fixture(scope="module")
def openlambda_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `lampy worker` on loopback with lampy deployed (one sandbox per core)."""
    os.environ.setdefault("LAMPY_SECRET", "lampy-bench-secret")
    with openlambda_worker(tmp_path_factory.mktemp("registry"), max_sandboxes=2) as url:
        yield url


PIPELINE = "(e) Fisher diarization, 1 hour of audio"


@pytest.mark.timeout(3600)
def test_pyaudioanalysis_peer(benchmark, row: Row, hour) -> None:  # type: ignore[no-untyped-def]
    row(PIPELINE, "pyAudioAnalysis 0.3.14 speaker_diarization (peer)")
    if not PAA_PYTHON.exists():
        row.skip(
            f"pyAudioAnalysis is not set up in {PAA_PYTHON}: run `make bench-peers` "
            "(or set LAMPY_PAA_PYTHON to a Python that has pyAudioAnalysis==0.3.14)"
        )
    wav, signal, rate, reference = hour

    def run() -> dict[str, object]:
        out = subprocess.run(
            [str(PAA_PYTHON), "-c", PAA_SCRIPT, str(wav), "2"],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout.splitlines()[-1])

    peer = benchmark.pedantic(run, rounds=1, iterations=1)
    labels = np.asarray(peer["labels"], dtype=int)
    step = signal.size / rate / max(labels.size, 1)
    hyp = [Turn(i * step, (i + 1) * step, f"c{label}") for i, label in enumerate(labels)]
    scored = score(reference, hyp)
    benchmark.extra_info.update(
        der=round(scored.der, 4),
        inner_seconds=peer["seconds"],
        note=f"DER {scored.der:.2%}",
    )


# The dask row last: its cluster (see the dask_client fixture) would slow the rows after it.
@pytest.mark.parametrize("executor", ["inline", "local", "openlambda", "dask"])
def test_pipeline_one_hour(  # type: ignore[no-untyped-def]
    benchmark, row: Row, hour, executor: str, request
) -> None:
    """Targets: local at least 1.8x faster than numpy alone (the same code run inline)."""
    system = {
        "inline": "numpy alone (the same code, lampy inline)",
        "dask": "lampy dask executor (distributed LocalCluster)",
    }.get(executor, f"lampy {executor}")
    row(
        PIPELINE,
        system,
        baseline=executor == "inline",
        **({"target": 1.8} if executor == "local" else {}),
    )
    options: dict[str, object] = {}
    if executor == "openlambda":
        options = {"url": request.getfixturevalue("openlambda_url")}
    elif executor == "dask":
        options = {"client": with_dask_client(row, request.getfixturevalue("dask_client"))}
    _, signal, rate, reference = hour
    with lampy.using(executor=executor, **options):
        diarize(signal[: rate * 60], rate, n_speakers=2)  # warm the workers up
        if executor == "local":  # auto settles (its block trial: two calls each way)
            for _ in range(2 * BLOCK_TRIALS):
                diarize(signal, rate, n_speakers=2)
        result = benchmark.pedantic(
            diarize, args=(signal, rate), kwargs={"n_speakers": 2}, rounds=5, iterations=1
        )
    scored = score(reference, result.turns)
    benchmark.extra_info.update(
        der=round(scored.der, 4),
        der_collar=round(scored.der_collar, 4),
        stages=result.timings,
        caller_cpu=result.caller_cpu,
        note=f"DER {scored.der:.2%}",
    )
    assert scored.der <= TARGET_DER
