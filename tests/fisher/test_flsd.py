import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from examples.fisher import flsd


def _labelled(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, size=(4, 6))
    classes = rng.integers(0, 4, size=500)
    x = means[classes] + rng.normal(size=(500, 6)) @ np.diag([1, 2, 0.5, 1, 3, 1])
    return x, classes


def test_scatter_from_partial_sums_equals_direct_formulas(executor: str) -> None:
    x, classes = _labelled()
    within, between = flsd.scatter_matrices(x, classes)
    m = x.mean(axis=0)
    sw = np.zeros((6, 6))
    sb = np.zeros((6, 6))
    for c in range(4):
        xc = x[classes == c]
        mc = xc.mean(axis=0)
        sw += (xc - mc).T @ (xc - mc)
        sb += len(xc) * np.outer(mc - m, mc - m)
    np.testing.assert_allclose(within, sw, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(between, sb, rtol=1e-9, atol=1e-8)


def test_projection_solves_generalized_eigenproblem(executor: str) -> None:
    x, classes = _labelled(1)
    w = flsd.flsd_projection(x, classes, dims=3, regularization=0.0)
    within, between = flsd.scatter_matrices(x, classes)
    values = scipy.linalg.eigh(between, within, eigvals_only=True)[::-1][:3]
    np.testing.assert_allclose(between @ w, within @ w * values, rtol=1e-6, atol=1e-6)


def test_projection_never_exceeds_classes_minus_one() -> None:
    x, classes = _labelled(2)
    assert flsd.flsd_projection(x, classes, dims=10).shape == (6, 3)


def test_projection_matches_sklearn_lda_directions() -> None:
    lda_module = pytest.importorskip(
        "sklearn.discriminant_analysis", reason="scikit-learn is not installed"
    )
    x, classes = _labelled(3)
    w = flsd.flsd_projection(x, classes, dims=3, regularization=0.0)
    lda = lda_module.LinearDiscriminantAnalysis(solver="eigen").fit(x, classes)
    for ours, theirs in zip(w.T, lda.scalings_[:, :3].T, strict=True):
        cosine = ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs)
        assert abs(cosine) > 0.999


def test_time_blocks_and_standardize() -> None:
    classes = flsd.time_blocks(np.array([0.1, 0.4, 0.6, 2.2, 2.3]), 0.5)
    assert list(classes) == [0, 0, 1, 2, 2]
    z = flsd.standardize(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_allclose(z, [[-1.0, 0.0], [1.0, 0.0]])


def test_run_blocks_never_straddle_a_pause() -> None:
    # Two runs of speech; slots of 0.75 s count from each run's own start.
    times = np.array([0.1, 0.5, 0.9, 1.0, 1.1, 1.8, 2.1])
    run = np.array([0, 0, 0, 2, 2, 2, 2])
    classes = flsd.run_blocks(times, run, 0.75)
    # 0.9 is 0.8 s into its run: a slot of its own. 1.0 opens the next run's first slot,
    # although the time grid's slot [0.75, 1.5) would put it with 0.9.
    assert list(classes) == [0, 0, 1, 2, 2, 3, 3]
    assert list(flsd.time_blocks(times, 0.75)[2:5]) == [1, 1, 1]
    assert flsd.run_blocks(np.zeros(0), np.zeros(0, dtype=np.int64), 0.75).size == 0


@given(
    rows=st.integers(0, 300),
    columns=st.integers(1, 8),
    classes=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_class_sums_equal_add_at_bit_for_bit(
    rows: int, columns: int, classes: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, columns))
    labels = rng.integers(0, classes, rows)
    expected = np.zeros((classes, columns))
    np.add.at(expected, labels, x)
    np.testing.assert_array_equal(flsd.class_sums(x, labels, classes), expected)
