"""The FLsD diarization pipeline on one hour of generated 2-speaker audio, per executor.

"numpy alone" is the same code with every lampy region on the `inline` executor. The hour is
generated on demand with espeak-ng and sox and cached in $LAMPY_FISHER_BENCH_DATA (default
/tmp/lampy-fisher). The pyAudioAnalysis peer runs in its own venv, found at
$LAMPY_PAA_PYTHON (default bench/.peers/paa/bin/python).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import lampy
from examples.fisher import diarize, synth
from examples.fisher.audio import read_wav
from examples.fisher.rttm import Turn, read_rttm
from examples.fisher.scoring import score
from lampy.testing import openlambda_worker

SECONDS = 3600.0
SEED = 1
TARGET_DER = 0.10
CACHE = Path(os.environ.get("LAMPY_FISHER_BENCH_DATA", "/tmp/lampy-fisher"))
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
def hour() -> tuple[Path, np.ndarray, int, list[Turn]]:
    """The cached hour of audio (generated on first use), its samples, rate and reference."""
    # The generator's source is part of the name, so a changed generator never reuses old audio.
    version = hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()[:10]
    wav = CACHE / f"hour_2spk_seed{SEED}_{version}.wav"
    rttm = wav.with_suffix(".rttm")
    if not (wav.exists() and rttm.exists()):
        if not synth.have_tools():
            pytest.skip(synth.INSTALL_HINT)
        CACHE.mkdir(parents=True, exist_ok=True)
        synth.generate(wav, rttm, n_speakers=2, seconds=SECONDS, seed=SEED)
    signal, rate = read_wav(wav)
    return wav, signal, rate, read_rttm(rttm)


@pytest.fixture(scope="module")
def openlambda_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `lampy worker` on loopback with lampy deployed (one sandbox per core)."""
    os.environ.setdefault("LAMPY_SECRET", "lampy-bench-secret")
    with openlambda_worker(tmp_path_factory.mktemp("registry"), max_sandboxes=2) as url:
        yield url


@pytest.mark.parametrize("executor", ["inline", "local", "openlambda"])
def test_pipeline_one_hour(benchmark, hour, executor: str, request) -> None:  # type: ignore[no-untyped-def]
    """Targets: local at least 1.6x faster than numpy alone (the same code run inline)."""
    options = {"url": request.getfixturevalue("openlambda_url")} if executor == "openlambda" else {}
    benchmark.group = "Fisher diarization, 1 hour of audio"
    system = "numpy alone (lampy inline)" if executor == "inline" else f"lampy {executor}"
    benchmark.extra_info.update(system=system, baseline=executor == "inline")
    if executor == "local":
        benchmark.extra_info["target"] = 1.6
    _, signal, rate, reference = hour
    with lampy.using(executor=executor, **options):
        diarize(signal[: rate * 60], rate, n_speakers=2)  # warm the workers up
        result = benchmark.pedantic(
            diarize, args=(signal, rate), kwargs={"n_speakers": 2}, rounds=5, iterations=1
        )
    scored = score(reference, result.turns)
    benchmark.extra_info.update(
        der=round(scored.der, 4),
        der_collar=round(scored.der_collar, 4),
        stages=result.timings,
        note=f"DER {scored.der:.2%}",
    )
    assert scored.der <= TARGET_DER


@pytest.mark.timeout(3600)
def test_pyaudioanalysis_peer(benchmark, hour) -> None:  # type: ignore[no-untyped-def]
    if not PAA_PYTHON.exists():
        pytest.skip(
            f"pyAudioAnalysis peer not set up: no {PAA_PYTHON} (make a venv there with "
            "pyAudioAnalysis==0.3.14 and the pins in ../shared/fisher.md, or set LAMPY_PAA_PYTHON)"
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

    benchmark.group = "Fisher diarization, 1 hour of audio"
    peer = benchmark.pedantic(run, rounds=1, iterations=1)
    labels = np.asarray(peer["labels"], dtype=int)
    step = signal.size / rate / max(labels.size, 1)
    hyp = [Turn(i * step, (i + 1) * step, f"c{label}") for i, label in enumerate(labels)]
    scored = score(reference, hyp)
    benchmark.extra_info.update(
        der=round(scored.der, 4),
        inner_seconds=peer["seconds"],
        system="pyAudioAnalysis 0.3.14 speaker_diarization (peer)",
        note=f"DER {scored.der:.2%}",
    )
