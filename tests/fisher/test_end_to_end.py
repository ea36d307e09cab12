import json
from pathlib import Path

import numpy as np
import pytest

from examples.fisher import diarize, synth
from examples.fisher.audio import read_wav
from examples.fisher.cli import main
from examples.fisher.pipeline import DiarizationError
from examples.fisher.rttm import Turn, read_rttm
from examples.fisher.scoring import score

from .conftest import SAMPLE_RTTM, SAMPLE_WAV

TARGET_DER = 0.10


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, int]:
    return read_wav(SAMPLE_WAV)


def test_bundled_sample_within_target(executor: str, sample: tuple[np.ndarray, int]) -> None:
    result = diarize(*sample, seed=0)
    assert result.n_speakers == 2
    assert score(read_rttm(SAMPLE_RTTM), result.turns).der <= TARGET_DER


def test_same_labels_on_every_executor(sample: tuple[np.ndarray, int]) -> None:
    import lampy

    labels = {}
    for name in ("inline", "local"):
        with lampy.using(executor=name):
            labels[name] = diarize(*sample, n_speakers=2, seed=3).frame_labels
    np.testing.assert_array_equal(labels["inline"], labels["local"])


def test_cli_json_and_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["diarize", str(SAMPLE_WAV), "--reference", str(SAMPLE_RTTM), "--executor", "inline"]
    assert main([*args, "--json", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speakers"] == 2
    assert out["score"]["der"] <= TARGET_DER
    assert set(out["timings"]) >= {"features", "flsd", "cluster", "total"}
    rttm = read_rttm(tmp_path / "two_speakers.rttm")
    assert [t.speaker for t in rttm] == [t["speaker"] for t in out["turns"]]


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["diarize", str(SAMPLE_WAV), "--speakers", "2", "--reference", str(SAMPLE_RTTM)]) == 0
    )
    out = capsys.readouterr().out
    assert "DER (no collar)" in out and "speaker purity" in out and "features" in out


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.wav").write_text("not audio")
    assert main(["diarize", str(tmp_path / "x.wav")]) == 2
    assert "not a wav file" in capsys.readouterr().err


def test_too_little_audio_or_speech() -> None:
    with pytest.raises(DiarizationError, match=r"0\.50 s of audio; need at least 2\.00 s"):
        diarize(np.zeros(8000, dtype=np.float32), 16000)
    silent = diarize(np.zeros(16000 * 5, dtype=np.float32), 16000)
    assert silent.turns == [] and silent.count.note == "no speech found"
    with pytest.raises(DiarizationError, match="at least 1, got 0"):
        diarize(np.zeros(16000 * 5, dtype=np.float32), 16000, n_speakers=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_samples_that_are_not_numbers_are_named(
    executor: str, bad: float, sample: tuple[np.ndarray, int]
) -> None:
    """On every executor, and under warnings as errors: the features stage runs in the caller
    on some (inline, or a call auto keeps here), and numpy must not fail it first."""
    signal, rate = sample
    broken = signal.copy()
    broken[[rate // 2, rate]] = bad
    with pytest.raises(DiarizationError, match=r"holds 2 samples that are not numbers .* 0\.500 s"):
        diarize(broken, rate)


def test_generated_conversation(tmp_path: Path) -> None:
    if not synth.have_tools():
        pytest.skip(synth.INSTALL_HINT)
    wav, rttm = tmp_path / "c.wav", tmp_path / "c.rttm"
    turns = synth.generate(wav, rttm, n_speakers=2, seconds=30, seed=123)
    written = read_rttm(rttm)
    assert [(t.start, t.speaker) for t in written] == [(t.start, t.speaker) for t in turns]
    assert [t.end for t in written] == pytest.approx([t.end for t in turns], abs=1e-9)
    assert {t.speaker for t in turns} == {"S0", "S1"}
    result = diarize(*read_wav(wav), seed=0)
    assert score(turns, result.turns).der <= TARGET_DER
    first = wav.read_bytes()
    synth.generate(tmp_path / "d.wav", tmp_path / "d.rttm", n_speakers=2, seconds=30, seed=123)
    assert (tmp_path / "d.wav").read_bytes() == first
    synth.generate(tmp_path / "e.wav", tmp_path / "e.rttm", n_speakers=2, seconds=30, seed=124)
    assert (tmp_path / "e.wav").read_bytes() != first


def test_png_timeline(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: no PNG timeline")
    from examples.fisher.plot import save_timeline

    reference = read_rttm(SAMPLE_RTTM)
    hypothesis = [Turn(t.start, t.end, f"h{t.speaker}") for t in reference]
    png = tmp_path / "t.png"
    assert save_timeline(png, hypothesis, reference, {"hS0": "S0", "hS1": "S1"}) is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_turns_keep_quieter_speech_in_noise(
    sample: tuple[np.ndarray, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below 12 dB SNR the turns' speech mask splits lower (quiet word ends are nearer the
    noise); clustering's mask, and both on clean audio, keep the VAD's split."""
    from examples.fisher import pipeline, vad

    splits: list[float] = []
    real = vad.speech_mask

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        splits.append(float(kwargs["split"]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline.vad, "speech_mask", spy)
    signal, rate = sample
    diarize(signal, rate, n_speakers=2)
    assert splits == [0.5, 0.5]
    rng = np.random.default_rng(0)
    spoken = np.zeros(signal.size, dtype=bool)
    for t in read_rttm(SAMPLE_RTTM):
        spoken[round(t.start * rate) : round(t.end * rate)] = True
    power = float(np.mean(signal[spoken].astype(np.float64) ** 2))
    noisy = signal + rng.normal(0.0, np.sqrt(power / 10), signal.size)  # 10 dB SNR
    splits.clear()
    p = pipeline.Params()
    diarize(noisy.astype(np.float32), rate, n_speakers=2, params=p)
    assert splits == [p.vad_split, p.noisy_label_split] and p.noisy_label_split < p.vad_split
