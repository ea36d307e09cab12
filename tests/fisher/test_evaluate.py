"""The development set's split and conditions, and the evaluation that runs on it."""

from pathlib import Path

import numpy as np
import pytest

import lampy
from examples.fisher import devset, evaluate, synth
from examples.fisher.rttm import Turn


def test_split_is_fixed_and_voices_never_cross_it() -> None:
    tune, report = devset.conversations("tune"), devset.conversations("report")
    assert devset.conversations("tune", 2)[:2] == devset.conversations("tune", 5)[:2]
    assert {c.seed for c in tune}.isdisjoint({c.seed for c in report})
    assert [c.n_speakers for c in report[::5]] == list(range(1, 9))

    def variants(conversations: list[devset.Conversation]) -> set[str]:
        return {v.name.split("+")[1] for c in conversations for v in devset.cast(c)}

    assert variants(tune).isdisjoint(variants(report))
    assert not variants(tune) & {"m3", "m7", "f2", "f5"}
    eight = devset.cast(report[-1])
    assert len({v.name.split("+")[1] for v in eight}) == 8
    assert np.all(np.diff(sorted(v.pitch for v in eight)) > 0)


def test_long_conversations_are_their_own_and_stay_in_their_split() -> None:
    short, long = devset.conversations("tune", 2), devset.conversations("tune", 2, minutes=20)
    assert {c.seed for c in short}.isdisjoint({c.seed for c in long})
    assert {c.name for c in short}.isdisjoint({c.name for c in long})
    assert all(c.seconds == 1200.0 and c.name.endswith("-20min") for c in long)
    assert [c.n_speakers for c in long[::2]] == list(range(1, 9))
    report = devset.conversations("report", 2, minutes=20)
    tune_pool = set(devset.VARIANTS[0::2])
    assert {v.name.split("+")[1] for c in long for v in devset.cast(c)} <= tune_pool
    assert not {v.name.split("+")[1] for c in report for v in devset.cast(c)} & tune_pool
    with pytest.raises(ValueError, match="minutes must be 0"):
        devset.conversations("tune", 1, minutes=-1)


def test_noise_is_added_at_the_stated_snr_and_levels_change() -> None:
    rate = devset.RATE
    t = np.arange(4 * rate) / rate
    clean = (0.3 * np.sin(2 * np.pi * 200 * t) * (t < 2)).astype(np.float32)
    turns = [Turn(0.0, 2.0, "S0")]
    noisy, out_rate = devset.degrade(clean, turns, "snr10", seed=3)
    noise = noisy.astype(np.float64) - clean
    assert out_rate == rate
    # The SNR is set against the noise's variance (its slow drift, ~0.3 dB, is not counted).
    snr = 10 * np.log10(devset.speech_power(clean, turns, rate) / np.var(noise))
    assert snr == pytest.approx(10.0, abs=0.05)
    assert np.array_equal(noisy, devset.degrade(clean, turns, "snr10", seed=3)[0])
    quiet, _ = devset.degrade(clean, turns, "level", seed=3)
    gain_db = 20 * np.log10(np.abs(quiet[clean != 0] / clean[clean != 0]))
    assert gain_db.min() >= -32.01 and gain_db.max() <= -5.99


def test_evaluate_refuses_unknown_conditions() -> None:
    with pytest.raises(synth.SynthError, match="conditions from"):
        evaluate.evaluate("tune", 1, ("clean", "underwater"))


def test_report_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not synth.have_tools():
        pytest.skip(synth.INSTALL_HINT)
    monkeypatch.setenv("LAMPY_FISHER_DEV_DATA", str(tmp_path))
    one = devset.conversations("tune", 1)[0]
    todo = [evaluate.Case(one, condition, 0) for condition in ("clean", "telephone")]
    with lampy.using(executor="inline"):
        outcomes = evaluate.run(todo)
    assert (tmp_path / devset.cache_dir().name / f"{one.name}.telephone.wav").exists()
    text = evaluate.report(outcomes, known=False, title="t")
    assert "| clean |" in text and "| telephone |" in text and "Speaker count right" in text
    for o in outcomes:
        assert 0.0 <= o.values["der"] < 0.25 and o.values["found"] == 1
