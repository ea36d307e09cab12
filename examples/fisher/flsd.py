"""Fisher Linear Semi-Discriminant analysis (Giannakopoulos and Petridis, 2012).

Without speaker labels, vectors close in time are assumed to share a speaker: each block of
consecutive mid-term vectors is one pseudo-class. The projection maximizes the between-block
scatter against the within-block scatter. Both scatter matrices follow from per-class counts and
sums and one Gram matrix, which add up across chunks: a `@lampy.sum` region.
"""

from __future__ import annotations

import numpy as np

import lampy

from . import vad


def class_sums(x: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """The sum of the rows of `x` in each class: one bincount over (class, column) cells.

    `np.add.at(sums, classes, x)` gives the same sums in the same order but is 3x slower, and
    4x slower again in the local pool's workers, where the addresses of its small output and
    its input happened to alias (bench_core's workload (c)).
    """
    columns = x.shape[1]
    cells = (classes[:, None] * columns + np.arange(columns)).ravel()
    sums = np.bincount(cells, weights=x.ravel(), minlength=n_classes * columns)
    return sums.reshape(n_classes, columns)


@lampy.sum
def scatter_partials(x: np.ndarray, classes: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Per-class counts and sums and the Gram matrix X^T X of one chunk."""
    counts = np.bincount(classes, minlength=n_classes).astype(np.float64)
    return {"n": counts, "s": class_sums(x, classes, n_classes), "g": x.T @ x}


def scatter_matrices(x: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within-class and between-class scatter (S_w, S_b) of the rows of x."""
    n_classes = int(classes.max()) + 1
    p = scatter_partials(x, classes, n_classes)
    n, s = p["n"], p["s"]
    used = n > 0
    class_outer = (s[used].T / n[used]) @ s[used]
    total = s.sum(axis=0)
    within = p["g"] - class_outer
    between = class_outer - np.outer(total, total) / n.sum()
    return within, between


def flsd_projection(
    x: np.ndarray, classes: np.ndarray, dims: int, regularization: float = 1e-3
) -> np.ndarray:
    """Top generalized eigenvectors of S_b w = lambda S_w w, as columns (features x dims).

    S_w is regularized by `regularization` times its mean diagonal, so constant or collinear
    features do not make it singular. At most (classes - 1) directions carry information.
    """
    # Imported here: a worker that runs this module's region need not load scipy.
    import scipy.linalg

    within, between = scatter_matrices(x, classes)
    n_used = int(np.count_nonzero(np.bincount(classes)))
    dims = max(1, min(dims, n_used - 1, x.shape[1]))
    ridge = regularization * np.trace(within) / within.shape[0]
    within = within + ridge * np.eye(within.shape[0])
    _, vectors = scipy.linalg.eigh(between, within)
    return vectors[:, ::-1][:, :dims]


def standardize(x: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance per column (constant columns become zero)."""
    # x.std's own steps, each pass once and no squared copy (einsum sums each column's squares
    # row after row, as .sum(axis=0) does): the caller runs this over every mid-term vector.
    centred = x - x.mean(axis=0)
    std = np.sqrt(np.einsum("ij,ij->j", centred, centred) / x.shape[0])
    centred /= np.where(std > 0, std, 1.0)
    return centred


def time_blocks(times: np.ndarray, block: float) -> np.ndarray:
    """Pseudo-class of each vector: the index of its `block`-second slot, renumbered 0..C-1."""
    _, classes = np.unique(np.floor(times / block).astype(np.int64), return_inverse=True)
    return classes.astype(np.int64)


def run_blocks(times: np.ndarray, run: np.ndarray, block: float) -> np.ndarray:
    """Pseudo-classes that never straddle a pause: each run of speech (`run`, one id per vector,
    vectors in time order) cut into `block`-second slots from its own start, renumbered 0..C-1.

    A pause is where a conversation changes speaker, so a slot across one would put two voices
    in one class and teach FLsD to keep them together.
    """
    if run.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts, owner = vad.run_starts(run)
    slot = np.floor((times - times[starts][owner]) / block).astype(np.int64)
    _, classes = np.unique(owner * (slot.max(initial=0) + 1) + slot, return_inverse=True)
    return classes.astype(np.int64)
