"""The diarization pipeline: features, VAD, mid-term statistics, FLsD, k-means, smoothing, turns."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import cluster, features, flsd, vad
from .rttm import Turn, labels_to_turns


@dataclass(frozen=True)
class Params:
    """Tuning knobs, in seconds unless stated.

    Chosen with `python -m examples.fisher evaluate` on generated 2-4 speaker conversations
    (30-90 s): 2 s mid-term windows blur short turns; FLsD blocks of 1-2 s, a ridge of 1e-3
    or 10+ dimensions overfit short recordings and make k-means split speakers.
    """

    mid_window: float = 1.0  # mid-term statistics window ...
    mid_step: float = 0.1  # ... and hop
    min_voiced: float = 0.3  # share of a window that must be speech for it to be clustered
    flsd_block: float = 0.5  # length of a pseudo-class (vectors assumed to share a speaker)
    flsd_dims: int = 5  # FLsD directions kept
    flsd_ridge: float = 0.1  # S_w regularization, times its mean diagonal
    max_speakers: int = 4  # k tried up to this when the count is unknown
    restarts: int = 10  # seeded k-means++ restarts
    mean_turn: float = 4.0  # expected turn length: sets the HMM's switch probability
    max_gap: float = 1.0  # same-speaker turns closer than this merge


@dataclass
class Result:
    """Turns, per-frame labels (-1 = silence), chosen k, silhouettes and time per stage."""

    turns: list[Turn]
    frame_labels: np.ndarray
    frame_step: float
    n_speakers: int
    silhouettes: dict[int, float]
    timings: dict[str, float] = field(default_factory=dict)


class DiarizationError(ValueError):
    """The recording holds too little speech to diarize."""


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start


def diarize(
    signal: np.ndarray,
    rate: int,
    n_speakers: int | None = None,
    seed: int = 0,
    params: Params | None = None,
) -> Result:
    """Who spoke when: turns with anonymous labels spk0, spk1, ... in order of first appearance.

    With `n_speakers` None, k runs over 2..max_speakers and the best mean silhouette wins.
    Executor choice is the caller's: wrap the call in `lampy.using(executor=...)`.
    """
    p = params or Params()
    if n_speakers is not None and n_speakers < 1:
        raise DiarizationError(f"the number of speakers must be at least 1, got {n_speakers}")
    if signal.size < 2 * p.mid_window * rate:
        raise DiarizationError(
            f"{signal.size / rate:.2f} s of audio; need at least {2 * p.mid_window:.2f} s"
        )
    t: dict[str, float] = {}
    with _timed(t, "features"):
        feats, step = features.short_term_features(signal, rate)
    with _timed(t, "vad"):
        speech = vad.detect_speech(feats[:, 1], step)
    with _timed(t, "mid-term"):
        win, hop = round(p.mid_window / step), round(p.mid_step / step)
        mid, centres, count = features.mid_term_features(feats, speech, win, hop)
        keep = count >= p.min_voiced * win
        if np.count_nonzero(keep) < 10:
            raise DiarizationError(
                f"only {np.count_nonzero(keep)} mid-term windows hold speech; need at least 10"
            )
        x = flsd.standardize(mid[keep])
        kept = centres[keep]
    with _timed(t, "flsd"):
        classes = flsd.time_blocks(kept * step, p.flsd_block)
        y = x @ flsd.flsd_projection(x, classes, p.flsd_dims, p.flsd_ridge)
    with _timed(t, "cluster"):
        candidates = [n_speakers] if n_speakers else list(range(2, p.max_speakers + 1))
        fits = {k: cluster.kmeans(y, k, seed=seed, restarts=p.restarts) for k in candidates}
        sil = {}
        if len(candidates) > 1:
            # Judge k on speech segments (runs between pauses), each its windows' mean with
            # their majority label: averaging over a segment damps what was said, so the
            # silhouette sees voices rather than words.
            segment = vad.run_index(speech)[kept]
            sil = {k: cluster.segment_silhouette(y, fits[k][0], segment, k) for k in candidates}
        k = max(sil, key=lambda c: sil[c]) if sil else candidates[0]
        _, centroids, _ = fits[k]
    with _timed(t, "smooth"):
        stay = 1.0 - p.mid_step / p.mean_turn
        path = cluster.first_appearance(cluster.viterbi(y, centroids, stay))
        # Every speech frame takes the label of the nearest clustered window.
        nearest = np.searchsorted((kept[:-1] + kept[1:]) / 2.0, np.arange(speech.size))
        frame_labels = np.where(speech, path[nearest], -1)
        # A frame stands for the hop-long stretch around its window's centre.
        offset = (features.frame_geometry(rate)[0] / rate - step) / 2.0
        turns = labels_to_turns(frame_labels, step, p.max_gap, offset)
    return Result(turns, frame_labels, step, k, sil, t)
