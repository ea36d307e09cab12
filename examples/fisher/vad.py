"""Energy-based voice-activity detection, so silence is neither clustered nor counted as speech."""

from __future__ import annotations

import numpy as np


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of True in a boolean vector."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def run_index(mask: np.ndarray) -> np.ndarray:
    """For each element, the index of the run (of equal values) it belongs to."""
    return np.cumsum(np.concatenate([[0], mask[1:] != mask[:-1]]))


def fill_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
    """Set runs of False no longer than `max_gap` that lie between two runs of True."""
    out = mask.copy()
    starts, ends = runs(~mask)
    for s, e in zip(starts, ends, strict=True):
        if s > 0 and e < mask.size and e - s <= max_gap:
            out[s:e] = True
    return out


def drop_short(mask: np.ndarray, min_run: int) -> np.ndarray:
    """Clear runs of True shorter than `min_run`."""
    out = mask.copy()
    starts, ends = runs(mask)
    for s, e in zip(starts, ends, strict=True):
        if e - s < min_run:
            out[s:e] = False
    return out


def detect_speech(
    energy: np.ndarray,
    step: float,
    margin_db: float = 12.0,
    min_gap: float = 0.25,
    min_speech: float = 0.1,
) -> np.ndarray:
    """Boolean speech mask per frame from the frame energies.

    The threshold sits `margin_db` above the noise floor (the 5th percentile of log energy) but
    never above the midpoint between floor and the 95th percentile, so a recording with little
    silence still keeps its quiet speech. Pauses shorter than `min_gap` s are bridged and blips
    shorter than `min_speech` s dropped.
    """
    db = 10.0 * np.log10(energy + 1e-12)
    floor, loud = np.percentile(db, [5.0, 95.0])
    threshold = min(floor + margin_db, (floor + loud) / 2.0)
    mask = db > threshold
    mask = fill_gaps(mask, round(min_gap / step))
    return drop_short(mask, round(min_speech / step))
