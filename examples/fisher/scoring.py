"""Diarization error rate (with Hungarian speaker mapping) and cluster/speaker purity.

Both are computed on a fine time grid from activity matrices (grid points x speakers), which
handles overlapping speech and any number of speakers without special cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .rttm import Turn

GRID = 0.01


class ScoreError(ValueError):
    """A reference that cannot score anything: it holds no speech."""


@dataclass(frozen=True)
class Score:
    """DER and its parts as fractions of reference speech time, plus purities."""

    der: float
    missed: float
    false_alarm: float
    confusion: float
    der_collar: float
    cluster_purity: float
    speaker_purity: float
    mapping: dict[str, str]


def activity(turns: list[Turn], n: int, step: float = GRID) -> tuple[np.ndarray, list[str]]:
    """Boolean (grid points x speakers) activity and the speaker names."""
    names = sorted({t.speaker for t in turns})
    act = np.zeros((n, len(names)), dtype=bool)
    for t in turns:
        act[round(t.start / step) : round(t.end / step), names.index(t.speaker)] = True
    return act, names


def _der_parts(ref: np.ndarray, hyp: np.ndarray, mapped: np.ndarray) -> tuple[float, ...]:
    """(missed, false alarm, confusion, reference) grid counts for the kept grid points."""
    n_ref = ref.sum(axis=1)
    n_hyp = hyp.sum(axis=1)
    missed = np.maximum(n_ref - n_hyp, 0).sum()
    false_alarm = np.maximum(n_hyp - n_ref, 0).sum()
    confusion = (np.minimum(n_ref, n_hyp) - mapped).sum()
    return float(missed), float(false_alarm), float(confusion), float(n_ref.sum())


def score(reference: list[Turn], hypothesis: list[Turn], collar: float = 0.25) -> Score:
    """DER without collar and with `collar` s ignored around every reference boundary; purities.

    DER is (missed + false alarm + confusion) / reference speech: missed and confusion are at
    most the reference speech, false alarm is not bounded by it, so DER may pass 100% when the
    hypothesis holds more speech than the reference (see `implausible`). A reference without
    speech is refused: nothing could be divided by it.
    """
    end = max([t.end for t in reference + hypothesis], default=0.0)
    n = round(end / GRID) + 1
    ref, ref_names = activity(reference, n)
    hyp, hyp_names = activity(hypothesis, n)
    overlap = ref.T.astype(np.int64) @ hyp.astype(np.int64)
    rows, cols = linear_sum_assignment(-overlap) if overlap.size else ([], [])
    correct = np.zeros(n, dtype=np.int64)
    for r, c in zip(rows, cols, strict=True):
        correct += ref[:, r] & hyp[:, c]
    m, f, c, total = _der_parts(ref, hyp, correct)
    if total == 0:
        raise ScoreError("the reference holds no speaker turns: there is nothing to score against")
    keep = np.ones(n, dtype=bool)
    pad = round(collar / GRID)
    for t in reference:
        for edge in (round(t.start / GRID), round(t.end / GRID)):
            keep[max(edge - pad, 0) : edge + pad] = False
    mc, fc, cc, total_c = _der_parts(ref[keep], hyp[keep], correct[keep])
    single = (ref.sum(axis=1) == 1) & (hyp.sum(axis=1) == 1)
    table = ref[single].T.astype(np.int64) @ hyp[single].astype(np.int64)
    n_single = max(int(table.sum()), 1)
    return Score(
        der=(m + f + c) / total,
        missed=m / total,
        false_alarm=f / total,
        confusion=c / total,
        der_collar=(mc + fc + cc) / max(total_c, 1.0),
        cluster_purity=float(table.max(axis=0).sum()) / n_single if table.size else 0.0,
        speaker_purity=float(table.max(axis=1).sum()) / n_single if table.size else 0.0,
        mapping={hyp_names[c]: ref_names[r] for r, c in zip(rows, cols, strict=True)},
    )


def implausible(scored: Score) -> str | None:
    """Why a score suggests a wrong reference, or None: DER past 100% is all false alarm.

    Missed speech and confusion together never pass 100% of the reference's speech, so a DER
    above 100% means the hypothesis found more speech than the reference holds, as with the
    reference of another (shorter, sparser) recording.
    """
    if scored.der <= 1.0:
        return None
    return (
        f"DER {100 * scored.der:.1f}% is above 100%: the hypothesis holds "
        f"{100 * scored.false_alarm:.0f}% more speech than the reference; is the reference "
        "for this recording?"
    )
