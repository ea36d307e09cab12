import itertools

import numpy as np
import pytest

from examples.fisher import cluster


def _blobs(k: int = 3, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(k), n // k)
    centres = np.array([[0, 0], [8, 0], [0, 8], [8, 8]])[:k]
    return centres[truth] + rng.normal(size=(truth.size, 2)), truth


def test_kmeans_partials_match_loop(executor: str) -> None:
    x, _ = _blobs()
    centroids = np.random.default_rng(1).normal(size=(2, 3, 2))
    p = cluster.kmeans_partials(x, centroids)
    for r in range(2):
        d = [[np.sum((xi - c) ** 2) for c in centroids[r]] for xi in x]
        labels = np.argmin(d, axis=1)
        np.testing.assert_array_equal(p["n"][r], np.bincount(labels, minlength=3))
        for j in range(3):
            np.testing.assert_allclose(p["s"][r, j], x[labels == j].sum(axis=0), atol=1e-9)
        np.testing.assert_allclose(p["inertia"][r], np.min(d, axis=1).sum())


def test_kmeans_recovers_blobs_with_canonical_labels(executor: str) -> None:
    x, truth = _blobs()
    labels, centroids, inertia = cluster.kmeans(x, 3, seed=4)
    np.testing.assert_array_equal(labels, truth)
    assert centroids.shape == (3, 2)
    assert inertia == pytest.approx(((x - centroids[labels]) ** 2).sum())


def test_kmeans_is_seeded() -> None:
    x, _ = _blobs(4, 200, seed=3)
    a = cluster.kmeans(x, 4, seed=7, restarts=2)
    b = cluster.kmeans(x, 4, seed=7, restarts=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_viterbi_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    centroids = np.array([[0.0], [1.0]])
    x = rng.normal(0.5, 0.6, size=(7, 1))
    stay = 0.8
    d2 = (x - centroids.T) ** 2
    var = d2.min(axis=1).mean() + 1e-12
    best, best_path = -np.inf, None
    for path in itertools.product([0, 1], repeat=7):
        ll = -d2[0, path[0]] / (2 * var)
        for t in range(1, 7):
            ll += np.log(stay if path[t] == path[t - 1] else 1 - stay) - d2[t, path[t]] / (2 * var)
        if ll > best:
            best, best_path = ll, path
    np.testing.assert_array_equal(cluster.viterbi(x, centroids, stay), best_path)


def _stepwise_viterbi(
    x: np.ndarray, centroids: np.ndarray, stay: float, pauses: np.ndarray | None = None
) -> np.ndarray:
    """The textbook recursion, one Python step per frame, dense k x k transitions (all alike
    at a step across a pause)."""
    k = centroids.shape[0]
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(axis=2)
    log_emit = -d2 / (2.0 * (d2.min(axis=1).mean() / x.shape[1] + 1e-12))
    log_trans = np.full((k, k), np.log((1 - stay) / max(k - 1, 1)))
    np.fill_diagonal(log_trans, np.log(stay))
    score = log_emit[0] - np.log(k)
    back = np.zeros((x.shape[0], k), dtype=int)
    for t in range(1, x.shape[0]):
        across = pauses is not None and pauses[t - 1]
        cand = score[:, None] + (np.full((k, k), np.log(1.0 / k)) if across else log_trans)
        back[t] = cand.argmax(axis=0)
        score = cand.max(axis=0) + log_emit[t]
    path = [int(score.argmax())]
    for t in range(x.shape[0] - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return np.array(path[::-1])


@pytest.mark.parametrize("seed", range(6))
def test_viterbi_in_pieces_matches_the_stepwise_recursion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(2, 9)), int(rng.integers(2, 600))
    centroids = rng.standard_normal((k, 3))
    truth = np.repeat(rng.integers(0, k, n // 6 + 1), 6)[:n]
    x = centroids[truth] + rng.standard_normal((n, 3)) * rng.uniform(0.3, 1.5)
    stay = float(rng.uniform(max(1.0 / k, 0.6), 0.99))
    want = _stepwise_viterbi(x, centroids, stay)
    for piece in (None, 1, 2, 7, n + 5):  # ragged last piece, one piece, one step per piece
        np.testing.assert_array_equal(cluster.viterbi(x, centroids, stay, piece), want)
    pauses = rng.random(n - 1) < 0.05
    want = _stepwise_viterbi(x, centroids, stay, pauses)
    for piece in (None, 1, 7, n + 5):
        got = cluster.viterbi(x, centroids, stay, piece, pauses)
        np.testing.assert_array_equal(got, want)


def test_a_short_reply_after_a_pause_keeps_its_speaker() -> None:
    # Three windows of the other voice between two long turns: two switches cost more than
    # their emissions gain, unless the reply is set off by pauses, where speakers change.
    wobble = 0.3 * (-1.0) ** np.arange(43)
    x = (np.array([0.0] * 20 + [0.8] * 3 + [0.0] * 20) + wobble)[:, None]
    centroids = np.array([[0.0], [1.0]])
    assert not cluster.viterbi(x, centroids, stay=0.999).any()
    pauses = np.zeros(x.shape[0] - 1, dtype=bool)
    pauses[[19, 22]] = True  # the steps into window 20 and into window 23
    path = cluster.viterbi(x, centroids, stay=0.999, pauses=pauses)
    np.testing.assert_array_equal(path, [0] * 20 + [1] * 3 + [0] * 20)


def test_viterbi_refuses_a_stay_below_chance() -> None:
    with pytest.raises(ValueError, match="stay must be in"):
        cluster.viterbi(np.zeros((5, 1)), np.array([[0.0], [1.0], [2.0]]), stay=0.2)


def test_viterbi_removes_a_one_step_blip() -> None:
    x = np.array([[0.0]] * 10 + [[0.52]] + [[0.0]] * 10)
    path = cluster.viterbi(x, np.array([[0.0], [1.0]]), stay=0.99)
    assert not path.any()


def test_first_appearance() -> None:
    np.testing.assert_array_equal(
        cluster.first_appearance(np.array([2, 2, 0, 1, 0])), [0, 0, 1, 2, 1]
    )


def _two_voices_and_a_reply(reply_label: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames: speaker 0 (300), a pause, a 20-frame reply of speaker 1 labelled `reply_label`,
    a pause, speaker 0 again (300), a pause, speaker 1 (300)."""
    rng = np.random.default_rng(0)
    parts = [
        rng.normal(0, 1, (300, 3)),
        np.zeros((10, 3)),
        rng.normal(4, 1, (20, 3)),
        np.zeros((10, 3)),
        rng.normal(0, 1, (300, 3)),
        np.zeros((10, 3)),
        rng.normal(4, 1, (300, 3)),
    ]
    labels = np.concatenate(
        [
            np.zeros(300, np.int64),
            np.full(10, -1),
            np.full(20, reply_label),
            np.full(10, -1),
            np.zeros(300, np.int64),
            np.full(10, -1),
            np.ones(300, np.int64),
        ]
    )
    return np.vstack(parts), labels


def test_resegment_gives_a_short_run_to_the_speaker_its_frames_fit() -> None:
    x, labels = _two_voices_and_a_reply(reply_label=0)
    out = cluster.resegment(x, labels, reach=5, short_run=40)
    np.testing.assert_array_equal(out[310:330], 1)
    # Everything else stays, silence included.
    rest = np.r_[0:310, 330 : labels.size]
    np.testing.assert_array_equal(out[rest], labels[rest])


def test_resegment_leaves_short_runs_alone_when_asked_or_when_they_fit() -> None:
    x, labels = _two_voices_and_a_reply(reply_label=0)
    np.testing.assert_array_equal(cluster.resegment(x, labels, reach=5, short_run=0), labels)
    # Runs as long as short_run are not short.
    np.testing.assert_array_equal(cluster.resegment(x, labels, reach=5, short_run=20), labels)
    right, truth = _two_voices_and_a_reply(reply_label=1)
    np.testing.assert_array_equal(cluster.resegment(right, truth, reach=5, short_run=40), truth)


def test_resegment_short_runs_go_only_to_modelled_speakers() -> None:
    # Speaker 2 has only the 20-frame reply (under min_frames): no model, so the reply goes to
    # the modelled speaker that fits it (1), never stays with or moves to an unmodelled one.
    x, labels = _two_voices_and_a_reply(reply_label=2)
    out = cluster.resegment(x, labels, reach=5, min_frames=50, short_run=40)
    np.testing.assert_array_equal(out[310:330], 1)
