"""`python -m examples.fisher`, run for real: mistakes are one line on stderr with status 2
(the command line or an input file is wrong) or 1 (the work failed), and `make run`'s command
writes and names its RTTM and PNG, the executor and the comparison with inline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples.fisher import synth
from examples.fisher.audio import read_wav, write_wav
from examples.fisher.rttm import read_rttm

from .conftest import SAMPLE_RTTM, SAMPLE_WAV

ROOT = Path(__file__).resolve().parents[2]
WAV = str(SAMPLE_WAV)


def fisher(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.fisher", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "LAMPY_DEBUG": "", "COLUMNS": "200", **env},
    )


def one_line_error(done: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    """Exit `status` and exactly one stderr line containing `text` (so no traceback)."""
    assert done.returncode == status, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert text in lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bad inputs, made once: references that cannot be this recording's, silence, noise."""
    where = tmp_path_factory.mktemp("inputs")
    sample = SAMPLE_RTTM.read_text()
    paths = {name: where / f"{name}.rttm" for name in ("empty", "other", "long", "sparse")}
    paths["empty"].write_text("")
    paths["other"].write_text(sample.replace("two_speakers", "another_file"))
    paths["long"].write_text(sample + "SPEAKER two_speakers 1 300.0 5.0 <NA> <NA> S0\n")
    paths["sparse"].write_text("SPEAKER two_speakers 1 1.0 0.5 <NA> <NA> S0 <NA> <NA>\n")
    paths["file"] = where / "a-file"
    paths["file"].write_text("not a directory")
    rate = 16000
    paths["silent.wav"] = where / "silent.wav"
    write_wav(paths["silent.wav"], np.zeros(5 * rate), rate)
    paths["noise.wav"] = where / "noise.wav"
    write_wav(paths["noise.wav"], np.random.default_rng(0).normal(0, 0.1, 10 * rate), rate)
    return paths


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--reference", "/nonexistent.rttm"], "/nonexistent.rttm: no such file"),
        (["--reference", WAV], "not an RTTM file (not text)"),
        (["--reference", "{empty}"], "no SPEAKER lines, so nothing to score against"),
        (["--reference", "{other}"], "holds turns of another_file, none of two_speakers"),
        (["--reference", "{long}"], "turns run to 305.0 s but"),
        (["--out", "{file}"], "is a file; --out names a directory"),
        (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["--speakers", "0"], "argument --speakers: must be at least 1"),
        (["--chunks", "0"], "argument --chunks: must be at least 1"),
        (["--executor", "bogus"], "'inline', 'local', 'openlambda', 'dask'"),
        (["--url", "http://127.0.0.1:1"], "--url is for --executor openlambda or dask"),
    ],
)
def test_diarize_usage_mistakes(args: list[str], text: str, files: dict[str, Path]) -> None:
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    done = fisher("diarize", WAV, *args)
    one_line_error(done, 2, text)
    assert done.stdout == ""


def test_speakers_beyond_the_audio_say_why() -> None:
    done = fisher("diarize", WAV, "--speakers", "50")
    one_line_error(done, 2, "lasts 42.9 s, room for at most 21 speakers (2 s of audio each)")


def test_no_speech_names_the_file(files: dict[str, Path]) -> None:
    done = fisher("diarize", str(files["silent.wav"]))
    assert done.returncode == 0, done.stderr  # an answer: nobody speaks
    assert f"warning: {files['silent.wav']}: cannot tell how many speakers" in done.stderr
    assert "no speech found" in done.stderr and "speakers: cannot tell" in done.stdout


def test_too_short_names_the_file(tmp_path: Path) -> None:
    signal, rate = read_wav(SAMPLE_WAV)
    write_wav(tmp_path / "short.wav", signal[: rate // 2], rate)
    done = fisher("diarize", str(tmp_path / "short.wav"))
    one_line_error(done, 2, f"{tmp_path / 'short.wav'}: 0.50 s of audio, need at least 2.00 s")


def test_noise_gets_no_confident_speaker_count(files: dict[str, Path]) -> None:
    done = fisher("diarize", str(files["noise.wav"]))
    assert done.returncode == 0
    assert f"warning: {files['noise.wav']}: cannot tell how many speakers" in done.stderr


def test_der_above_100_percent_is_flagged(files: dict[str, Path]) -> None:
    done = fisher("diarize", WAV, "--reference", str(files["sparse"]), "--speakers", "2")
    assert done.returncode == 0, done.stderr
    assert "warning: DER" in done.stderr and "is the reference for this recording?" in done.stderr


def test_openlambda_without_a_worker_is_an_error(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    done = fisher("diarize", WAV, "--executor", "openlambda", "--url", url)
    one_line_error(done, 1, f"no OpenLambda worker answers at {url}")


def test_a_platform_failure_is_one_line(worker_url: str) -> None:
    done = fisher(
        "diarize",
        WAV,
        "--executor",
        "openlambda",
        "--url",
        worker_url,
        "--chunks",
        "2",
        LAMPY_OPENLAMBDA_NAME="not-deployed",
    )
    one_line_error(done, 1, "lampy failed: lambda 'not-deployed' is not deployed")


def test_help_lists_every_executor() -> None:
    done = fisher("diarize", "--help")
    assert done.returncode == 0
    for name in ("inline", "local", "openlambda", "dask", "--chunks"):
        assert name in done.stdout


def test_make_run_writes_and_names_its_outputs(tmp_path: Path) -> None:
    """What `make run` runs: the RTTM and PNG exist, the executor and inline's time are shown."""
    out = tmp_path / "out"
    done = fisher(
        "diarize", WAV, "--reference", str(SAMPLE_RTTM), "--out", str(out), "--compare-inline"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"wrote RTTM: {out / 'two_speakers.rttm'}" in lines
    assert f"wrote PNG: {out / 'two_speakers.png'}" in lines
    assert any(line.startswith("executor: local") for line in lines)
    assert any(line.startswith("time: local") and "against inline" in line for line in lines)
    assert read_rttm(out / "two_speakers.rttm", "two_speakers")
    assert (out / "two_speakers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (["{tmp}/x.wav", "--seconds", "0.5"], 2, "argument --seconds: must be at least 2 s"),
        (["{tmp}/x.wav", "--seconds", "-5"], 2, "argument --seconds: must be at least 2 s"),
        (["{tmp}/x.wav", "--seed", "-1"], 2, "argument --seed: must be at least 0"),
        (["{tmp}/x.wav", "--speakers", "9"], 2, "argument --speakers: must be 1..4"),
        (["{tmp}/x.mp3"], 2, "generate writes WAV audio only"),
        (["/nonexistent-dir/x.wav"], 1, "cannot write /nonexistent-dir/x.wav: no directory"),
    ],
)
def test_generate_mistakes(args: list[str], status: int, text: str, tmp_path: Path) -> None:
    done = fisher("generate", *(a.format(tmp=tmp_path) for a in args))
    one_line_error(done, status, text)
    assert list(tmp_path.iterdir()) == []  # nothing half-made left behind


def test_generate_makes_the_length_asked_for(tmp_path: Path) -> None:
    if not synth.have_tools():
        pytest.skip(synth.INSTALL_HINT)
    wav = tmp_path / "c.wav"
    done = fisher("generate", str(wav), "--seconds", "12.5", "--seed", "2")
    assert done.returncode == 0, done.stderr
    signal, rate = read_wav(wav)
    assert signal.size == 12.5 * rate
    turns = read_rttm(tmp_path / "c.rttm", "c")
    assert {t.speaker for t in turns} == {"S0", "S1"}
    assert max(t.end for t in turns) <= 12.5


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--per-count", "0"], "argument --per-count: must be at least 1"),
        (["--kmeans-seeds", "0"], "argument --kmeans-seeds: must be at least 1"),
        (["--conditions", "clean,underwater"], "unknown condition(s) underwater"),
        (["--split", "all"], "argument --split: invalid choice: 'all'"),
    ],
)
def test_evaluate_mistakes(args: list[str], text: str) -> None:
    one_line_error(fisher("evaluate", *args), 2, text)


def test_debug_shows_the_traceback() -> None:
    done = fisher("diarize", WAV, "--reference", "/nonexistent.rttm", LAMPY_DEBUG="1")
    assert done.returncode == 2
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.splitlines()[-1].endswith("/nonexistent.rttm: no such file")


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_comparison_gives_no_verdict_within_two_runs_spread() -> None:
    from examples.fisher.cli import _comparison

    assert _comparison("local", 0.10, 0.09, False).endswith(
        "local is about as fast (within 15%, two runs' usual spread)"
    )
    assert _comparison("local", 0.5, 1.0, False).endswith("local is 2.00x faster")
    assert _comparison("local", 1.0, 0.5, False).endswith("local is 2.00x slower")


def test_the_comparison_gives_no_verdict_when_nothing_fanned_out() -> None:
    """Both runs were then the same code in this process: "1.95x faster" was noise."""
    from examples.fisher.cli import _comparison

    said = _comparison("local", 0.06, 0.11, True)
    assert said.endswith("the same code ran in this process both times (nothing fanned out)")
    assert "faster" not in said and "slower" not in said
