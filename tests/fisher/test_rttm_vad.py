from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.fisher import vad
from examples.fisher.rttm import RttmError, Turn, format_rttm, labels_to_turns, read_rttm


def test_rttm_roundtrip(tmp_path: Path) -> None:
    turns = [Turn(0.5, 2.25, "spk0"), Turn(3.0, 4.0, "spk1")]
    text = format_rttm(turns, "conv")
    assert text.splitlines()[0] == "SPEAKER conv 1 0.500 1.750 <NA> <NA> spk0 <NA> <NA>"
    (tmp_path / "a.rttm").write_text(";; comment\n" + text)
    assert read_rttm(tmp_path / "a.rttm") == turns


def test_bad_rttm(tmp_path: Path) -> None:
    (tmp_path / "b.rttm").write_text("SPEAKER conv 1 zero 1.0 <NA> <NA> A <NA> <NA>\n")
    with pytest.raises(RttmError, match=r"b\.rttm:1: bad start"):
        read_rttm(tmp_path / "b.rttm")


def test_labels_to_turns_merges_short_same_speaker_gaps() -> None:
    labels = np.array([-1, 0, 0, -1, 0, 1, 1, -1, -1, -1, 1])
    assert labels_to_turns(labels, step=0.5, max_gap=1.0) == [
        Turn(0.5, 2.5, "spk0"),
        Turn(2.5, 3.5, "spk1"),
        Turn(5.0, 5.5, "spk1"),
    ]


def _turns_speaker_by_speaker(
    labels: np.ndarray, step: float, max_gap: float, offset: float
) -> list[Turn]:
    """labels_to_turns the slow, plain way: each speaker's runs, sorted, merged one by one."""
    turns = []
    for label in np.unique(labels[labels >= 0]):
        starts, ends = vad.runs(labels == label)
        turns += [
            Turn(offset + s * step, offset + e * step, f"spk{label}")
            for s, e in zip(starts, ends, strict=True)
        ]
    turns.sort(key=lambda t: t.start)
    merged: list[Turn] = []
    for turn in turns:
        last = merged[-1] if merged else None
        if last and last.speaker == turn.speaker and turn.start - last.end < max_gap:
            merged[-1] = Turn(last.start, turn.end, last.speaker)
        else:
            merged.append(turn)
    return merged


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-1, 3), st.integers(1, 6)), max_size=40),
    st.sampled_from([0.025, 0.1, 0.5]),
    st.sampled_from([0.0, 0.025, 0.6, 1.0]),
    st.sampled_from([0.0, 0.0125]),
)
def test_labels_to_turns_is_the_speaker_by_speaker_merge(
    runs: list[tuple[int, int]], step: float, max_gap: float, offset: float
) -> None:
    labels = np.repeat([r[0] for r in runs], [r[1] for r in runs]).astype(np.int64)
    expected = _turns_speaker_by_speaker(labels, step, max_gap, offset)
    assert labels_to_turns(labels, step, max_gap, offset) == expected


def test_runs_gaps_and_blips() -> None:
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0], dtype=bool)
    starts, ends = vad.runs(mask)
    assert list(starts) == [1, 4, 8] and list(ends) == [3, 5, 10]
    assert list(vad.fill_gaps(mask, 1).astype(int)) == [0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    assert list(vad.drop_short(mask, 2).astype(int)) == [0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0]


def test_detect_speech_on_bursts_and_silence() -> None:
    rng = np.random.default_rng(0)
    energy = np.full(400, 1e-7) * rng.uniform(0.5, 2.0, 400)
    energy[100:200] = 1e-2
    energy[150] = 1e-7  # a one-frame pause inside speech
    energy[300] = 1e-2  # a one-frame click
    speech = vad.detect_speech(10 * np.log10(energy), step=0.025)
    assert speech[100:200].all()
    # Levels are smoothed over 3 frames, so a run may grow by one frame at either end.
    assert not speech[:99].any() and not speech[201:].any()


def test_detect_speech_follows_the_noise_floor() -> None:
    """The same bursts found over a quiet floor and over a floor 40 dB louder that leaves them
    only 8 dB above it; steady noise alone holds no speech."""
    rng = np.random.default_rng(1)
    bands = rng.normal(0.0, 1.0, (800, 40))
    bursts = np.zeros(800, dtype=bool)
    for start in (100, 300, 550):
        bursts[start : start + 80] = True
    for floor in (-80.0, -40.0):
        levels = floor + bands + np.where(bursts, 8.0 if floor > -50 else 48.0, 0.0)[:, None]
        speech = vad.detect_speech(levels, step=0.025)
        assert (speech == bursts).mean() > 0.97
    assert not vad.detect_speech(-40.0 + bands, step=0.025).any()


def test_otsu_threshold_splits_two_groups() -> None:
    values = np.r_[np.full(50, 1.0), np.full(30, 9.0)]
    assert 1.0 < vad.otsu_threshold(values) < 9.0


def test_run_index() -> None:
    mask = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    assert list(vad.run_index(mask)) == [0, 0, 1, 1, 2, 3]


def test_run_starts_of_labels() -> None:
    starts, run = vad.run_starts(np.array([-1, 2, 2, 0, 0, 0, -1]))
    assert list(starts) == [0, 1, 3, 6]
    assert list(run) == [0, 1, 1, 2, 2, 2, 3]


def test_shrink_trims_both_ends_of_every_run() -> None:
    mask = np.array([0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=bool)
    np.testing.assert_array_equal(
        vad.shrink(mask, 1), [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    )  # a run touching the end of the recording loses only its inner end
    np.testing.assert_array_equal(vad.shrink(mask, 0), mask)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_moving_average_matches_scipy(size: int) -> None:
    from scipy.ndimage import uniform_filter1d

    x = np.random.default_rng(size).normal(size=(50, 3))
    want = uniform_filter1d(x, size, axis=0, mode="nearest")
    np.testing.assert_allclose(vad.moving_average(x, size), want, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("size", [2, 3, 4, 7])
def test_moving_average_adds_the_clipped_rows_in_order(rows: int, size: int) -> None:
    """Bit for bit the sum of rows i - size // 2 ... clipped to the ends, added in order:
    recordings shorter than the window included."""
    x = np.random.default_rng(rows * size).normal(size=(rows, 2)).astype(np.float32)
    index = np.arange(rows)[:, None] - size // 2 + np.arange(size)
    picked = x[np.clip(index, 0, rows - 1)].astype(np.float64)
    want = picked[:, 0]
    for shift in range(1, size):
        want = want + picked[:, shift]
    np.testing.assert_array_equal(vad.moving_average(x, size), want / size)


def test_speech_scores_do_not_depend_on_the_chunking(executor: str) -> None:
    import lampy

    rng = np.random.default_rng(4)
    feats = rng.normal(size=(5000, 20))  # the coefficients are columns 3..15, smoothed over 3
    columns = slice(3, 16)
    to_levels = rng.normal(size=(13, 40))
    floor = rng.normal(size=40)
    frames = np.arange(5000)
    with lampy.using(executor="inline"):
        whole = vad.band_excess(frames, feats, columns, 3, to_levels, floor)
    with lampy.using(executor=executor, chunks=3):
        chunked = vad.band_excess(frames, feats, columns, 3, to_levels, floor)
    # Bit for bit: no BLAS in the product, and each chunk smooths its frames as the whole does.
    np.testing.assert_array_equal(chunked, whole)
    levels = vad.moving_average(feats[:, columns], 3) @ to_levels - floor
    want = np.sort(levels, axis=1)[:, -10:].mean(axis=1)
    np.testing.assert_allclose(whole, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 6),
    st.integers(1, 5),
    st.data(),
)
def test_smoothed_rows_are_the_moving_average_s(
    rows: int, size: int, every: int, data: st.DataObject
) -> None:
    """Any span of rows, consecutive or spaced, bit for bit as the whole matrix's moving
    average gives them: near the recording's ends too."""
    start = data.draw(st.integers(0, rows))
    stop = data.draw(st.integers(start, rows))
    feats = np.random.default_rng(rows * size).normal(size=(rows, 5)).astype(np.float32)
    want = vad.moving_average(feats[:, 1:4], size)[start:stop:every]
    got = vad.smoothed_rows(feats, slice(1, 4), size, start, stop, every)
    np.testing.assert_array_equal(got, want)


def test_the_floors_sample_does_not_depend_on_the_chunking(executor: str) -> None:
    import lampy

    feats = np.random.default_rng(6).normal(size=(4001, 20))
    frames = np.arange(0, 4001, vad.SAMPLE_EVERY)
    with lampy.using(executor=executor, chunks=3):
        chunked = vad.spaced_rows(frames, feats, slice(3, 16), 3)
    want = vad.moving_average(feats[:, 3:16], 3)[:: vad.SAMPLE_EVERY]
    np.testing.assert_array_equal(chunked, want)  # bit for bit, the ends' rows too


def test_band_floors_do_not_depend_on_the_chunking(executor: str) -> None:
    import lampy

    rng = np.random.default_rng(5)
    coefs = rng.normal(size=(3000, 13))
    to_levels = rng.normal(size=(13, 40))
    with lampy.using(executor="inline"):
        whole = vad.band_floors(to_levels.T, coefs, 10.0)
    with lampy.using(executor=executor, chunks=3):
        chunked = vad.band_floors(to_levels.T, coefs, 10.0)
    np.testing.assert_array_equal(chunked, whole)  # bit for bit: each band alone
    want = np.percentile(coefs @ to_levels, 10.0, axis=0)
    np.testing.assert_allclose(whole, want, rtol=1e-12, atol=1e-12)
