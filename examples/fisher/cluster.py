"""k-means (k-means++ seeds, several seeded restarts run together), the speaker count's Ward
merges, Viterbi smoothing and re-segmentation of speaker changes.

Each k-means iteration is one `@lampy.sum` region over the points (assignment plus per-cluster
counts and sums, for all restarts at once, so one call per iteration); the frame likelihoods of
re-segmentation are a `@lampy.elemwise` region over frames. Distances in k-means are computed
elementwise, not with a matrix product, so every executor assigns every point identically.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import linkage

import lampy

from .flsd import class_sums


def _sq_dist(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared distances (restarts x points x k) from x (n x d) to centroids (restarts x k x d).

    One elementwise pass per dimension: exact whatever the chunking (no BLAS blocking), and
    without the (restarts x n x k x d) temporary of a broadcast difference.
    """
    d2 = np.zeros((centroids.shape[0], x.shape[0], centroids.shape[1]))
    for j in range(x.shape[1]):
        diff = x[None, :, None, j] - centroids[:, None, :, j]
        d2 += diff * diff
    return d2


@lampy.sum(shared=("centroids",))
def kmeans_partials(x: np.ndarray, centroids: np.ndarray) -> dict[str, np.ndarray]:
    """Assign a chunk's points to the nearest centroid of every restart; per-cluster counts/sums."""
    restarts, k, dims = centroids.shape
    d2 = _sq_dist(x, centroids)
    labels = d2.argmin(axis=2)
    flat = (labels + k * np.arange(restarts)[:, None]).ravel()
    sums = np.empty((restarts * k, dims))
    for j in range(dims):
        sums[:, j] = np.bincount(flat, np.tile(x[:, j], restarts), minlength=restarts * k)
    return {
        "n": np.bincount(flat, minlength=restarts * k).reshape(restarts, k).astype(np.float64),
        "s": sums.reshape(restarts, k, dims),
        "inertia": np.take_along_axis(d2, labels[:, :, None], axis=2).sum(axis=(1, 2)),
    }


@lampy.elemwise(shared=("centroids",))
def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (k x d) for each point."""
    return _sq_dist(x, centroids[None])[0].argmin(axis=1)


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance
    from the centres so far."""
    centres = [x[rng.integers(x.shape[0])]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1))
    return np.array(centres)


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, restarts: int = 10, max_iter: int = 100, tol: float = 1e-8
) -> tuple[np.ndarray, np.ndarray, float]:
    """Best of `restarts` seeded k-means runs: (labels, centroids, inertia).

    All restarts iterate together, one region call per iteration; converged ones drop out.

    Labels are renumbered in order of first appearance, so equal partitions give equal labels.
    """
    rng = np.random.default_rng(seed)
    centroids = np.stack([kmeans_pp(x, k, rng) for _ in range(restarts)])
    scale = tol * float((x * x).sum(axis=1).mean() + 1e-30)
    inertia = np.zeros(restarts)
    active = np.arange(restarts)
    for _ in range(max_iter):
        p = kmeans_partials(x, centroids[active])
        inertia[active] = p["inertia"]
        filled = p["n"][:, :, None] > 0
        old = centroids[active]
        new = np.where(filled, p["s"] / np.maximum(p["n"], 1.0)[:, :, None], old)
        centroids[active] = new
        active = active[((new - old) ** 2).sum(axis=(1, 2)) > scale]
        if active.size == 0:
            break
    best = int(np.argmin(inertia))
    labels = assign(x, centroids[best])
    relabel = _first_appearance_map(labels, k)
    ordered = np.empty_like(centroids[best])
    ordered[relabel] = centroids[best]
    return relabel[labels], ordered, float(inertia[best])


def _first_appearance_map(labels: np.ndarray, k: int) -> np.ndarray:
    """Map old label -> new label numbering labels by first appearance (unused ones last)."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(order.size)
    relabel[np.setdiff1d(np.arange(k), order)] = np.arange(order.size, k)
    return relabel


def first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance."""
    return _first_appearance_map(labels, int(labels.max()) + 1)[labels]


def viterbi(x: np.ndarray, centroids: np.ndarray, stay: float) -> np.ndarray:
    """Most likely label path under an HMM with Gaussian states at the centroids.

    Each step keeps its state with probability `stay`; the emission variance is the mean
    within-cluster variance. The loop runs over time steps (mid-term windows), each step a
    vectorized max over k x k transitions.
    """
    k = centroids.shape[0]
    d2 = _sq_dist(x, centroids[None])[0]
    var = d2.min(axis=1).mean() / x.shape[1] + 1e-12
    log_emit = -d2 / (2.0 * var)
    if k == 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    log_trans = np.full((k, k), np.log((1.0 - stay) / (k - 1)))
    np.fill_diagonal(log_trans, np.log(stay))
    back = np.empty((x.shape[0], k), dtype=np.int64)
    score = log_emit[0] - np.log(k)
    for t in range(1, x.shape[0]):
        cand = score[:, None] + log_trans
        back[t] = cand.argmax(axis=0)
        score = cand[back[t], np.arange(k)] + log_emit[t]
    path = np.empty(x.shape[0], dtype=np.int64)
    path[-1] = int(score.argmax())
    for t in range(x.shape[0] - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def piece_means(x: np.ndarray, segment: np.ndarray, size: int) -> np.ndarray:
    """Means of consecutive runs of at most `size` rows inside each segment (rows in time order).

    Averaging a few windows damps what was said while a piece stays short enough to hold one
    voice; pieces never straddle a pause.
    """
    starts = np.flatnonzero(np.concatenate([[True], segment[1:] != segment[:-1]]))
    run = np.repeat(np.arange(starts.size), np.diff(np.append(starts, segment.size)))
    position = np.arange(segment.size) - starts[run]
    key = run * (segment.size + 1) + position // size
    _, piece = np.unique(key, return_inverse=True)
    counts = np.bincount(piece).astype(np.float64)
    return class_sums(x, piece, counts.size) / counts[:, None]


def merge_heights(pieces: np.ndarray, count: int) -> np.ndarray:
    """Ward linkage heights of the last `count` merges, last first: heights[j] joins j + 2
    clusters into j + 1 (zeros past the number of pieces)."""
    heights = np.zeros(count)
    if pieces.shape[0] > 1:
        last = linkage(pieces, "ward")[::-1, 2][:count]
        heights[: last.size] = last
    return heights


@lampy.elemwise(shared=("means", "inv_var", "log_norm"))
def frame_loglik(
    x: np.ndarray, means: np.ndarray, inv_var: np.ndarray, log_norm: np.ndarray
) -> np.ndarray:
    """Log-likelihood of each frame (rows of x) under each speaker's diagonal Gaussian."""
    out = np.empty((x.shape[0], means.shape[0]))
    for s in range(means.shape[0]):
        d = x - means[s]
        out[:, s] = log_norm[s] - 0.5 * (d * d * inv_var[s]).sum(axis=1)
    return out


def resegment(x: np.ndarray, labels: np.ndarray, reach: int, min_frames: int = 20) -> np.ndarray:
    """Move each change of speaker to the frame where the two speakers' models split best.

    `labels` (-1 = silence) come from clustering mid-term windows a second long, so a change can
    be off by half a window. Each speaker gets a diagonal Gaussian over its frames' features
    `x`; where one speaker's run meets another's without a pause, the boundary moves (within
    `reach` frames and the two runs) to the split that maximizes the log-likelihood of the
    frames before under the first speaker plus the frames after under the second. Speakers
    with fewer than `min_frames` frames keep their boundaries.
    """
    k = int(labels.max()) + 1
    counts = np.bincount(labels[labels >= 0], minlength=max(k, 1))
    if k < 2 or np.count_nonzero(counts >= min_frames) < 2:
        return labels
    means = np.zeros((k, x.shape[1]))
    var = np.ones((k, x.shape[1]))
    for s in np.flatnonzero(counts >= min_frames):
        mine = x[labels == s]
        means[s], var[s] = mine.mean(axis=0), mine.var(axis=0) + 1e-3
    log_norm = -0.5 * np.log(2.0 * np.pi * var).sum(axis=1)
    starts = np.flatnonzero(np.concatenate([[True], labels[1:] != labels[:-1]]))
    ends = np.append(starts[1:], labels.size)
    first, second = labels[starts[:-1]], labels[starts[1:]]
    modelled = counts >= min_frames
    movable = np.flatnonzero((first >= 0) & (second >= 0) & modelled[first] & modelled[second])
    if movable.size == 0:
        return labels
    # Only the frames around a movable change are scored: (changes x 2 reach) frames.
    lo = np.maximum(starts[movable + 1] - reach, starts[movable])
    hi = np.minimum(starts[movable + 1] + reach, ends[movable + 1])
    spans = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    scored = np.concatenate(spans)
    ll = frame_loglik(x[scored], means, 1.0 / var, log_norm)
    out = labels.copy()
    offset = 0
    for r, span in zip(movable, spans, strict=True):
        a, b = first[r], second[r]
        part = ll[offset : offset + span.size]
        offset += span.size
        gain = np.concatenate([[0.0], np.cumsum(part[:, a] - part[:, b])])
        split = int(np.argmax(gain))
        out[span[:split]], out[span[split:]] = a, b
    return out
