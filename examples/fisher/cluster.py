"""k-means (k-means++ seeds, several seeded restarts run together), the speaker count's Ward
merges, Viterbi smoothing, and re-segmentation of speaker changes and of short runs.

Each k-means iteration is one `@lampy.sum` region over the points (assignment plus per-cluster
counts and sums, for all restarts at once, so one call per iteration); the frame likelihoods of
re-segmentation are a `@lampy.elemwise` region over frames. Distances in k-means are computed
elementwise, not with a matrix product, so every executor assigns every point identically.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

import lampy

from . import vad
from .flsd import class_sums


def _sq_dist(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared distances (restarts x k x points) from x (n x d) to centroids (restarts x k x d).

    One elementwise pass per dimension over the points' contiguous coordinates: exact whatever
    the chunking (no BLAS blocking), and without the (restarts x k x n x d) temporary of a
    broadcast difference.
    """
    return _sq_dist_t(np.ascontiguousarray(x.T), centroids)


def _sq_dist_t(coords: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """`_sq_dist` from the points' coordinates as rows (d x n)."""
    d2 = np.zeros((centroids.shape[0], centroids.shape[1], coords.shape[1]))
    diff = np.empty_like(d2)  # one temporary for every dimension's squares
    for j in range(coords.shape[0]):
        np.subtract(coords[j], centroids[:, :, j, None], out=diff)
        d2 += np.multiply(diff, diff, out=diff)
    return d2


def _nearest(d2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For squared distances (restarts x k x points), each point's nearest centroid per restart
    and its distance: argmin and min over k (the first of equal distances, as argmin), by one
    pass over each centroid's contiguous row rather than a reduction across rows k apart in
    memory (twice as fast: the k-means of the Fisher hour runs in the caller)."""
    best = d2[:, 0].copy()
    index = np.zeros(best.shape, dtype=np.int64)
    for j in range(1, d2.shape[1]):
        closer = d2[:, j] < best
        index[closer] = j
        np.minimum(best, d2[:, j], out=best)
    return index, best


POINT_BATCH = 2048  # points per pass: the (restarts x points x k) temporaries stay in cache


@lampy.sum(shared=("centroids",))
def kmeans_partials(x: np.ndarray, centroids: np.ndarray) -> dict[str, np.ndarray]:
    """Assign a chunk's points to the nearest centroid of every restart; per-cluster counts/sums.

    Points go through in cache-sized batches; the sums add up batch after batch.
    """
    restarts, k, dims = centroids.shape
    n = np.zeros(restarts * k)
    sums = np.zeros((restarts * k, dims))
    inertia = np.zeros(restarts)
    for lo in range(0, x.shape[0], POINT_BATCH):
        xb = x[lo : lo + POINT_BATCH]
        labels, nearest = _nearest(_sq_dist(xb, centroids))
        # One-hot rows (restart, cluster) x points: the counts and sums are one product.
        member = (labels[:, None, :] == np.arange(k)[None, :, None]).reshape(restarts * k, -1)
        weights = member.astype(np.float64)
        n += weights.sum(axis=1)
        sums += weights @ xb
        inertia += nearest.sum(axis=1)
    return {"n": n.reshape(restarts, k), "s": sums.reshape(restarts, k, dims), "inertia": inertia}


@lampy.elemwise(shared=("centroids",))
def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (k x d) for each point."""
    return _nearest(_sq_dist(x, centroids[None]))[0][0]


def kmeans_pp(x: np.ndarray, k: int, restarts: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds for each restart (restarts x k x d): each new centre drawn with
    probability proportional to squared distance from the centres so far.

    The restarts draw one after another from `rng`. This runs in the caller over every point,
    so the coordinates are transposed once for all restarts (`_sq_dist_t`), and no distances
    are computed after a restart's last centre.
    """
    coords = np.ascontiguousarray(x.T)
    seeds = np.empty((restarts, k, x.shape[1]))
    for r in range(restarts):
        seeds[r, 0] = x[rng.integers(x.shape[0])]
        d2 = np.full(x.shape[0], np.inf)
        for c in range(1, k):
            d2 = np.minimum(d2, _sq_dist_t(coords, seeds[None, None, r, c - 1])[0, 0])
            total = d2.sum()
            i = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
            seeds[r, c] = x[i]
    return seeds


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, restarts: int = 10, max_iter: int = 100, tol: float = 1e-8
) -> tuple[np.ndarray, np.ndarray, float]:
    """Best of `restarts` seeded k-means runs: (labels, centroids, inertia).

    All restarts iterate together, one region call per iteration; converged ones drop out.

    Labels are renumbered in order of first appearance, so equal partitions give equal labels.
    """
    rng = np.random.default_rng(seed)
    centroids = kmeans_pp(x, k, restarts, rng)
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


def viterbi(
    x: np.ndarray,
    centroids: np.ndarray,
    stay: float,
    piece: int | None = None,
    pauses: np.ndarray | None = None,
) -> np.ndarray:
    """Most likely label path under an HMM with Gaussian states at the centroids.

    Each step keeps its state with probability `stay` (at least 1 / k) and moves to each other
    state with an equal share of the rest, so the best way into state j is either staying in
    j or switching from the best state: k x k work per step, not k^3. A step across a pause
    (`pauses[t - 1]` True for the step into window t) makes every state equally likely:
    speakers change at pauses, and a short reply between two long turns of another speaker
    should not pay for two switches. The emission variance is the mean within-cluster
    variance. The time steps (mid-term windows) are cut into pieces of `piece` steps, and each
    loop below runs over the steps of one piece with all pieces at once, so an hour is a few
    hundred numpy steps, not 36,000 Python ones. A step inside a piece costs about eight numpy
    calls over its loops, a piece one in step 2: the default piece holds about the root of an
    eighth of the steps (the hour's smoothing 10-25 % faster than with the root of all):
    1. each piece's max-plus transfer matrix (best score from each state before the piece to
       each state at its end);
    2. the scores entering each piece, piece after piece (k x k steps);
    3. the usual Viterbi recursion inside every piece from its entering scores;
    4. for each piece and each state it may end in, the path back to its start; then, piece
       after piece from the last, the state each piece ends in.
    Ties go to the lowest state, as in the step-by-step recursion.
    """
    k, n = centroids.shape[0], x.shape[0]
    if k > 1 and not 1.0 / k <= stay < 1.0:
        raise ValueError(f"stay must be in [1/k, 1) for k = {k} states, got {stay}")
    d2 = _sq_dist(x, centroids[None])[0].T
    var = d2.min(axis=1).mean() / x.shape[1] + 1e-12
    log_emit = -d2 / (2.0 * var)
    if k == 1 or n < 2:
        return np.full(n, int(log_emit[0].argmax()) if n else 0, dtype=np.int64)
    steps = n - 1  # steps 1..n-1 follow the start
    size = piece or max(1, int(np.sqrt(steps / 8)))
    count = -(-steps // size)
    # Per step: the log probabilities of keeping the state and of moving to one other state.
    across = np.zeros(count * size, dtype=bool)
    if pauses is not None:
        across[:steps] = pauses
    log_stay = np.where(across, np.log(1.0 / k), np.log(stay)).reshape(count, size)
    log_switch = np.where(across, np.log(1.0 / k), np.log((1.0 - stay) / (k - 1)))
    log_switch = log_switch.reshape(count, size)
    emit = np.zeros((count * size, k))
    emit[:steps] = log_emit[1:]
    emit = emit.reshape(count, size, k)
    real = (np.arange(count * size) < steps).reshape(count, size)  # padding: no step at all
    # 1. transfer matrices, all pieces at once: (count, from, to)
    transfer = np.broadcast_to(log_switch[:, 0, None, None], (count, k, k)).copy()
    transfer[:, np.arange(k), np.arange(k)] = log_stay[:, 0, None]
    transfer = np.where(real[:, 0, None, None], transfer + emit[:, 0, None, :], _identity(k))
    for s in range(1, size):
        best = transfer.max(axis=2, keepdims=True) + log_switch[:, s, None, None]
        moved = np.maximum(transfer + log_stay[:, s, None, None], best) + emit[:, s, None, :]
        transfer = np.where(real[:, s, None, None], moved, transfer)
    # 2. scores entering each piece
    entering = np.empty((count, k))
    entering[0] = log_emit[0] - np.log(k)
    for p in range(1, count):
        entering[p] = (entering[p - 1][:, None] + transfer[p - 1]).max(axis=0)
    # 3. the recursion inside every piece, with back-pointers
    score = entering
    back = np.empty((count, size, k), dtype=np.int64)
    own = np.arange(k)
    for s in range(size):
        kept = score + log_stay[:, s, None]
        best = score.argmax(axis=1)[:, None]
        switched = np.take_along_axis(score, best, axis=1) + log_switch[:, s, None]
        back[:, s] = np.where(
            kept > switched, own, np.where(kept < switched, best, np.minimum(own, best))
        )
        back[:, s] = np.where(real[:, s, None], back[:, s], own)
        moved = np.maximum(kept, switched) + emit[:, s]
        score = np.where(real[:, s, None], moved, score)
    # 4. paths back from every possible end state of every piece
    state = np.broadcast_to(own, (count, k)).copy()
    traced = np.empty((count, k, size), dtype=np.int64)
    for s in range(size - 1, -1, -1):
        traced[:, :, s] = state
        state = np.take_along_axis(back[:, s], state, axis=1)
    # `state` is now, per piece and end state, the state just before the piece.
    path = np.empty((count, size), dtype=np.int64)
    end = int(score[-1].argmax())
    for p in range(count - 1, -1, -1):
        path[p] = traced[p, end]
        end = int(state[p, end])
    return np.concatenate([[end], path.reshape(-1)[:steps]])


def _identity(k: int) -> np.ndarray:
    """The max-plus identity (0 on the diagonal, -inf elsewhere): a step that changes nothing."""
    return np.where(np.eye(k, dtype=bool), 0.0, -np.inf)


def piece_means(x: np.ndarray, segment: np.ndarray, size: int) -> np.ndarray:
    """Means of consecutive runs of at most `size` rows inside each segment (rows in time order).

    Averaging a few windows damps what was said while a piece stays short enough to hold one
    voice; pieces never straddle a pause.
    """
    starts, run = vad.run_starts(segment)
    position = np.arange(segment.size) - starts[run]
    key = run * (segment.size + 1) + position // size
    _, piece = np.unique(key, return_inverse=True)
    counts = np.bincount(piece).astype(np.float64)
    return class_sums(x, piece, counts.size) / counts[:, None]


def merge_heights(pieces: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Ward linkage heights of the last `count` merges, last first: heights[j] joins j + 2
    clusters into j + 1; and each merge's effective size n_a n_b / (n_a + n_b) in pieces
    (zeros past the number of pieces)."""
    # Imported here: a worker that runs this module's regions need not load scipy (~0.4 s).
    from scipy.cluster.hierarchy import linkage

    heights, sizes = np.zeros(count), np.zeros(count)
    n = pieces.shape[0]
    if n > 1:
        merges = linkage(pieces, "ward")
        members = np.concatenate([np.ones(n), merges[:, 3]])
        a, b = members[merges[:, 0].astype(np.int64)], members[merges[:, 1].astype(np.int64)]
        last = merges[::-1][:count]
        heights[: last.shape[0]] = last[:, 2]
        sizes[: last.shape[0]] = (a * b / (a + b))[::-1][:count]
    return heights, sizes


def spread_sample(rows: np.ndarray, most: int) -> np.ndarray:
    """At most `most` of the rows, evenly spaced over all of them, in order."""
    if rows.shape[0] <= most:
        return rows
    return rows[np.arange(most) * rows.shape[0] // most]


def voice_merges(pieces: np.ndarray, count: int, per_voice: int) -> tuple[np.ndarray, np.ndarray]:
    """`merge_heights` with the merge that joins k clusters into k - 1 judged on at most
    `per_voice` * k pieces spread evenly over the recording: heights[j] and sizes[j] for
    k = j + 2, j < count.

    A Ward height grows with the root of the pieces' number, so one voice of an hour, whose
    turns and phrases differ a little, splits far above a threshold set on clips of a few
    minutes. Asked whether there are k voices, the count looks at about as many pieces per
    voice as such a clip holds: the answer depends on the voices' shares of the speech, not
    on the recording's length. At most `count` linkages of at most `per_voice` * (count + 1)
    pieces: bounded work, whatever the length.
    """
    heights, sizes = np.zeros(count), np.zeros(count)
    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for j in range(count):
        sample = spread_sample(pieces, per_voice * (j + 2))
        if sample.shape[0] not in done:
            done[sample.shape[0]] = merge_heights(sample, count)
        all_heights, all_sizes = done[sample.shape[0]]
        heights[j], sizes[j] = all_heights[j], all_sizes[j]
    return heights, sizes


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


@lampy.sum
def label_moments(
    x: np.ndarray, labels: np.ndarray, k: int, columns: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Per label 0..k-1, and for the unlabelled rows (-1) as label k: the count, and the sums
    of `x[:, columns]` and of its squares (one-hot products over cache-sized batches, of whole
    rows: gathering the columns of every row first cost more than the columns left out)."""
    n = np.zeros(k + 1)
    s = np.zeros((k + 1, x.shape[1]))
    q = np.zeros((k + 1, x.shape[1]))
    for lo in range(0, x.shape[0], POINT_BATCH):
        v = x[lo : lo + POINT_BATCH]
        cls = np.where(labels[lo : lo + POINT_BATCH] >= 0, labels[lo : lo + POINT_BATCH], k)
        member = (np.arange(k + 1)[:, None] == cls[None, :]).astype(np.float64)
        n += member.sum(axis=1)
        s += member @ v
        q += member @ (v * v)
    picked = list(columns)
    return {"n": n, "s": s[:, picked], "q": q[:, picked]}


def resegment(
    feats: np.ndarray,
    labels: np.ndarray,
    reach: int,
    columns: tuple[int, ...] | None = None,
    min_frames: int = 20,
    short_run: int = 0,
) -> np.ndarray:
    """Move each change of speaker to the frame where the two speakers' models split best,
    then give each run of one speaker shorter than `short_run` frames to the speaker whose model
    explains its frames best.

    `labels` (-1 = silence) come from clustering mid-term windows a second long, so a change can
    be off by half a window. Each speaker gets a diagonal Gaussian over its frames' features
    (`feats[:, columns]`, standardized over the recording); where one speaker's run meets
    another's without a pause, the boundary moves (within `reach` frames and the two runs) to
    the split that maximizes the log-likelihood of the frames before under the first speaker
    plus the frames after under the second. Speakers with fewer than `min_frames` frames keep
    their boundaries. A short run (a reply of a word or two) was labelled by mid-term windows a
    second long, which reach into the turns around it; its own frames' likelihoods judge it
    alone. The models come from one pass of sums over the frames (a region), and only the
    frames near a change and those of short runs are scored (another).
    """
    columns = tuple(range(feats.shape[1])) if columns is None else columns
    k = int(labels.max()) + 1
    if k < 2:
        return labels
    m = label_moments(feats, labels, k, columns)
    total = m["n"].sum()
    mu = m["s"].sum(axis=0) / total
    sd = np.sqrt(np.maximum(m["q"].sum(axis=0) / total - mu * mu, 0.0))
    sd = np.where(sd > 0, sd, 1.0)
    counts = m["n"][:k]
    modelled = counts >= min_frames
    if np.count_nonzero(modelled) < 2:
        return labels
    n = np.maximum(counts, 1.0)[:, None]
    mean = m["s"][:k] / n
    var = np.maximum(m["q"][:k] / n - mean * mean, 0.0)
    means = np.where(modelled[:, None], (mean - mu) / sd, 0.0)
    var = np.where(modelled[:, None], var / (sd * sd) + 1e-3, 1.0)
    log_norm = -0.5 * np.log(2.0 * np.pi * var).sum(axis=1)
    models = _Models(feats, columns, mu, sd, means, var, np.where(modelled, log_norm, -np.inf))
    return _relabel_short_runs(models, _move_changes(models, labels, reach), short_run)


class _Models(NamedTuple):
    """`resegment`'s speaker models over the frames' standardized `columns` (an unmodelled
    speaker's `log_norm` is -inf)."""

    feats: np.ndarray
    columns: tuple[int, ...]
    mu: np.ndarray
    sd: np.ndarray
    means: np.ndarray
    var: np.ndarray
    log_norm: np.ndarray

    def loglik(self, frames: np.ndarray) -> np.ndarray:
        """(frames x speakers) log-likelihoods of these frames (the `frame_loglik` region)."""
        x = (self.feats[frames][:, list(self.columns)] - self.mu) / self.sd
        return np.asarray(frame_loglik(x, self.means, 1.0 / self.var, self.log_norm))


def _move_changes(models: _Models, labels: np.ndarray, reach: int) -> np.ndarray:
    """`resegment`'s first step: each change between two modelled speakers to its best split."""
    starts, _ = vad.run_starts(labels)
    ends = np.append(starts[1:], labels.size)
    first, second = labels[starts[:-1]], labels[starts[1:]]
    modelled = np.isfinite(models.log_norm)
    movable = np.flatnonzero((first >= 0) & (second >= 0))
    movable = movable[modelled[first[movable]] & modelled[second[movable]]]
    if movable.size == 0:
        return labels
    # Only the frames around a movable change are scored: (changes x 2 reach) frames.
    lo = np.maximum(starts[movable + 1] - reach, starts[movable])
    hi = np.minimum(starts[movable + 1] + reach, ends[movable + 1])
    spans = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    ll = models.loglik(np.concatenate(spans))
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


def _relabel_short_runs(models: _Models, labels: np.ndarray, short_run: int) -> np.ndarray:
    """`resegment`'s second step: each run of one speaker shorter than `short_run` frames goes
    to the modelled speaker with the highest summed frame log-likelihood."""
    run = vad.run_index(labels)
    lengths = np.bincount(run)
    starts = np.cumsum(lengths) - lengths
    short = (labels[starts] >= 0) & (lengths < short_run)
    if not short.any():
        return labels
    scored = np.flatnonzero(short[run])
    # Frames of one run are consecutive in `scored`: one sum per run.
    _, first, sizes = np.unique(run[scored], return_index=True, return_counts=True)
    best = np.add.reduceat(models.loglik(scored), first, axis=0).argmax(axis=1)
    out = labels.copy()
    out[scored] = np.repeat(best, sizes)
    return out
