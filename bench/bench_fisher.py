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
from pathlib import Path

import numpy as np
import pytest

import lampy
from examples.fisher import cluster, diarize, synth
from examples.fisher.audio import read_wav
from examples.fisher.rttm import Turn, read_rttm
from examples.fisher.scoring import score

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


def _openlambda_ready() -> str | None:
    """None when the openlambda executor answers a tiny call, else why not.

    It reads its worker from LAMPY_OPENLAMBDA_URL (start one with `lampy worker`, then
    `lampy deploy --url ...`).
    """
    try:
        with lampy.using(executor="openlambda"):
            cluster.assign(np.zeros((4, 2)), np.zeros((1, 2)))
    except lampy.LampyError as exc:
        return f"openlambda executor not set up ({type(exc).__name__}: {exc})"
    return None


@pytest.mark.parametrize("executor", ["inline", "local", "openlambda"])
def test_pipeline_one_hour(benchmark, hour, executor: str) -> None:  # type: ignore[no-untyped-def]
    if executor == "openlambda" and (why := _openlambda_ready()):
        pytest.skip(why)
    _, signal, rate, reference = hour
    with lampy.using(executor=executor):
        diarize(signal[: rate * 60], rate, n_speakers=2)  # warm the workers up
        result = benchmark.pedantic(
            diarize, args=(signal, rate), kwargs={"n_speakers": 2}, rounds=5, iterations=1
        )
    scored = score(reference, result.turns)
    benchmark.extra_info.update(
        der=round(scored.der, 4), der_collar=round(scored.der_collar, 4), stages=result.timings
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

    peer = benchmark.pedantic(run, rounds=1, iterations=1)
    labels = np.asarray(peer["labels"], dtype=int)
    step = signal.size / rate / max(labels.size, 1)
    hyp = [Turn(i * step, (i + 1) * step, f"c{label}") for i, label in enumerate(labels)]
    scored = score(reference, hyp)
    benchmark.extra_info.update(der=round(scored.der, 4), inner_seconds=peer["seconds"])
