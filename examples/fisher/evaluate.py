"""DER over freshly generated conversations and several k-means seeds (needs espeak-ng and sox).

k-means depends on its seed, so every conversation is diarized with several seeds and the report
gives the mean and spread, as ../shared/fisher.md asks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import read_wav
from .pipeline import diarize
from .scoring import score
from .synth import generate


@dataclass(frozen=True)
class Trial:
    """One conversation diarized with one k-means seed."""

    conversation_seed: int
    kmeans_seed: int
    speakers: int
    found_speakers: int
    der: float
    der_collar: float


def evaluate(
    n_speakers: int,
    conversations: int = 5,
    seconds: float = 90.0,
    kmeans_seeds: int = 3,
    first_seed: int = 100,
    known: bool = False,
) -> list[Trial]:
    """Generate `conversations` recordings (seeds first_seed, first_seed + 1, ...); score each."""
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(first_seed, first_seed + conversations):
            wav, rttm = Path(tmp) / f"c{seed}.wav", Path(tmp) / f"c{seed}.rttm"
            reference = generate(wav, rttm, n_speakers, seconds, seed)
            heard = len({t.speaker for t in reference})
            signal, rate = read_wav(wav)
            for kmeans_seed in range(kmeans_seeds):
                result = diarize(signal, rate, heard if known else None, kmeans_seed)
                s = score(reference, result.turns)
                trials.append(
                    Trial(seed, kmeans_seed, heard, result.n_speakers, s.der, s.der_collar)
                )
    return trials


def summary(trials: list[Trial], n_speakers: int) -> str:
    """A table per conversation and the overall mean, spread and worst DER."""
    lines = [f"{'conversation':>12} {'DER %':>15} {'collar DER %':>15}  speakers found"]
    for seed in sorted({t.conversation_seed for t in trials}):
        mine = [t for t in trials if t.conversation_seed == seed]
        der = np.array([t.der for t in mine]) * 100
        col = np.array([t.der_collar for t in mine]) * 100
        found = ",".join(str(t.found_speakers) for t in mine)
        lines.append(
            f"{seed:>12} {der.mean():8.2f} ± {der.std():4.2f} {col.mean():8.2f} ± {col.std():4.2f}"
            f"  {found}"
        )
    der = np.array([t.der for t in trials]) * 100
    right = np.mean([t.found_speakers == t.speakers for t in trials]) * 100
    lines.append(
        f"{n_speakers} speakers, {len(trials)} runs: DER mean {der.mean():.2f}%, "
        f"std {der.std():.2f}, max {der.max():.2f}%; speaker count right in {right:.0f}% of runs"
    )
    return "\n".join(lines)
