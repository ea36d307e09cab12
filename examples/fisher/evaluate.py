"""DER and speaker-count accuracy on the development set, per condition and per speaker count.

Every (conversation, condition, k-means seed) is one case; the cases run in parallel as one
`@lampy.elemwise` region over case numbers, each case diarized inline inside its worker. Audio is
rendered once into the dev-set cache (also in parallel) before any case is scored. k-means
depends on its seed, so each file is diarized with several seeds and tables give the mean.

Optionally the same files go through pyAudioAnalysis (its own venv; `make bench-peers` builds
bench/.peers/paa), given the true speaker count, as the method's reference implementation.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import lampy

from . import devset
from .pipeline import Params, diarize
from .rttm import Turn
from .scoring import score
from .synth import SynthError

FIELDS = ("der", "der_collar", "missed", "false_alarm", "confusion", "found", "confidence", "secs")
GROUPS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("1", (1,)),
    ("2", (2,)),
    ("3-4", (3, 4)),
    ("5-8", (5, 6, 7, 8)),
)
PAA_SCRIPT = """
import json, sys
import numpy as np
from pyAudioAnalysis import audioSegmentation as aS
labels = aS.speaker_diarization(sys.argv[1], int(sys.argv[2]), plot_res=False)
labels = labels[0] if isinstance(labels, tuple) else labels
print(json.dumps(np.asarray(labels).astype(int).tolist()))
"""


@dataclass(frozen=True)
class Case:
    """One file of the development set diarized with one k-means seed."""

    conversation: devset.Conversation
    condition: str
    kmeans_seed: int


@dataclass(frozen=True)
class Outcome:
    """A case and its measurements (FIELDS), as the report reads them."""

    case: Case
    values: dict[str, float]


@lampy.elemwise
def _render(
    index: np.ndarray, todo: list[devset.Conversation], conditions: tuple[str, ...]
) -> np.ndarray:
    """Render and cache the chunk's conversations in the conditions asked; returns their
    lengths."""
    seconds = np.empty(index.size)
    for row, i in enumerate(index):
        for condition in conditions:
            signal, rate, _ = devset.load(todo[i], condition)
        seconds[row] = signal.size / rate
    return seconds


@lampy.elemwise
def _score_cases(
    index: np.ndarray, cases: list[Case], known: bool, params: Params | None
) -> np.ndarray:
    """Diarize and score the chunk's cases (inline: the chunk already is one worker's share)."""
    rows = np.empty((index.size, len(FIELDS)))
    with lampy.using(executor="inline"):
        for row, i in enumerate(index):
            case = cases[i]
            signal, rate, reference = devset.load(case.conversation, case.condition)
            start = time.perf_counter()
            given = case.conversation.n_speakers if known else None
            result = diarize(signal, rate, given, case.kmeans_seed, params)
            s = score(reference, result.turns)
            rows[row] = (
                s.der,
                s.der_collar,
                s.missed,
                s.false_alarm,
                s.confusion,
                result.n_speakers if result.count.known else -1,
                result.count.confidence,
                time.perf_counter() - start,
            )
    return rows


@lampy.elemwise
def _score_peer(index: np.ndarray, cases: list[Case], python: str) -> np.ndarray:
    """pyAudioAnalysis on the chunk's cases, given the true count; DER on its 0.1 s grid (NaN
    where it fails)."""
    rows = np.full((index.size, len(FIELDS)), np.nan)
    for row, i in enumerate(index):
        case = cases[i]
        path, reference = devset.wav_path(case.conversation, case.condition)
        start = time.perf_counter()
        n = str(case.conversation.n_speakers)
        out = subprocess.run(
            [python, "-c", PAA_SCRIPT, str(path), n], capture_output=True, text=True
        )
        if out.returncode != 0:
            continue
        labels = json.loads(out.stdout.splitlines()[-1])
        step = 0.1  # pyAudioAnalysis labels one mid-term step of 0.1 s each
        hyp = [Turn(j * step, (j + 1) * step, f"c{label}") for j, label in enumerate(labels)]
        s = score(reference, hyp)
        found = len(set(labels))
        elapsed = time.perf_counter() - start
        rows[row] = (s.der, s.der_collar, s.missed, s.false_alarm, s.confusion, found, 0, elapsed)
    return rows


def cases(
    split: str, per_count: int, conditions: tuple[str, ...], kmeans_seeds: int, minutes: int = 0
) -> list[Case]:
    """Every (conversation, condition, seed) of a split, in a fixed order."""
    return [
        Case(c, condition, seed)
        for c in devset.conversations(split, per_count, minutes)
        for condition in conditions
        for seed in range(kmeans_seeds)
    ]


def run(
    todo: list[Case],
    known: bool = False,
    params: Params | None = None,
    peer_python: str | None = None,
) -> list[Outcome]:
    """Render what is missing, then score every case (or run the peer on it) in parallel."""
    conversations = sorted({c.conversation for c in todo}, key=lambda c: c.seed)
    conditions = tuple(c for c in devset.CONDITIONS if any(t.condition == c for t in todo))
    with lampy.using(chunks=len(conversations)):
        _render(np.arange(len(conversations)), conversations, conditions)
    with lampy.using(chunks=len(todo)):
        if peer_python:
            rows = _score_peer(np.arange(len(todo)), todo, peer_python)
        else:
            rows = _score_cases(np.arange(len(todo)), todo, known, params)
    return [
        Outcome(c, dict(zip(FIELDS, map(float, r), strict=True)))
        for c, r in zip(todo, rows, strict=True)
    ]


def _mean(values: list[float]) -> str:
    good = [v for v in values if np.isfinite(v)]
    return f"{100 * np.mean(good):6.1f}" if good else "     -"


def report(outcomes: list[Outcome], known: bool, title: str) -> str:
    """Markdown tables: DER % per condition and speaker-count group, count accuracy per group,
    and DER per single speaker count on clean audio."""
    conditions = [c for c in devset.CONDITIONS if any(o.case.condition == c for o in outcomes)]
    counts = sorted({o.case.conversation.n_speakers for o in outcomes})
    groups = [(name, ns) for name, ns in GROUPS if set(ns) & set(counts)]
    head = " | ".join(f"{name} spk" for name, _ in groups)
    lines = [
        f"### {title}",
        "",
        f"DER % (no collar), mean over files and k-means seeds; count "
        f"{'given' if known else 'found automatically'}",
        "",
    ]
    lines += [f"| condition | {head} | all |", "|---" * (len(groups) + 2) + "|"]
    for cond in conditions:
        mine = [o for o in outcomes if o.case.condition == cond]
        cells = [
            _mean([o.values["der"] for o in mine if o.case.conversation.n_speakers in ns])
            for _, ns in groups
        ]
        lines.append(f"| {cond} | {' | '.join(cells)} | {_mean([o.values['der'] for o in mine])} |")
    if not known:
        lines += ["", "Speaker count right, % of runs (cannot-tell counts as wrong)", ""]
        lines += [f"| condition | {head} | 1-4 spk |", "|---" * (len(groups) + 2) + "|"]
        for cond in conditions:
            mine = [o for o in outcomes if o.case.condition == cond]

            def right(ns: tuple[int, ...], mine: list[Outcome] = mine) -> str:
                hits = [
                    o.values["found"] == o.case.conversation.n_speakers
                    for o in mine
                    if o.case.conversation.n_speakers in ns
                ]
                return f"{100 * np.mean(hits):6.1f}" if hits else "     -"

            cells = [right(ns) for _, ns in groups]
            lines.append(f"| {cond} | {' | '.join(cells)} | {right((1, 2, 3, 4))} |")
    lines += ["", "Per speaker count, clean: DER % / count right % / mean confidence", ""]
    lines += ["| speakers | " + " | ".join(str(n) for n in counts) + " |"]
    lines += ["|---" * (len(counts) + 1) + "|"]
    clean = [o for o in outcomes if o.case.condition == "clean"]
    cells = []
    for n in counts:
        mine = [o for o in clean if o.case.conversation.n_speakers == n]
        der = _mean([o.values["der"] for o in mine]).strip()
        hits = np.mean([o.values["found"] == n for o in mine]) * 100 if mine else np.nan
        conf = np.mean([o.values["confidence"] for o in mine]) if mine else np.nan
        cells.append(f"{der} / {hits:.0f} / {conf:.2f}" if not known else der)
    lines.append("| clean | " + " | ".join(cells) + " |")
    secs = float(np.nansum([o.values["secs"] for o in outcomes]))
    failed = sum(not np.isfinite(o.values["der"]) for o in outcomes)
    lines += ["", f"{len(outcomes)} runs ({failed} failed), {secs:.0f} s of diarization in total."]
    return "\n".join(lines)


def evaluate(
    split: str = "tune",
    per_count: int = 5,
    conditions: tuple[str, ...] = devset.CONDITIONS,
    kmeans_seeds: int = 3,
    known: bool = False,
    peer_python: str | Path | None = None,
    minutes: int = 0,
) -> str:
    """Run a split of the development set (or its long conversations of `minutes` each) and
    return the printable report."""
    unknown = [c for c in conditions if c not in devset.CONDITIONS]
    bad = per_count < 1 or kmeans_seeds < 1 or minutes < 0
    if unknown or split not in devset.SPLITS or bad:
        raise SynthError(
            f"evaluate wants a split in {devset.SPLITS}, conditions from {devset.CONDITIONS}, "
            f"counts of at least 1 and minutes of at least 0; got split {split!r}, conditions "
            f"{conditions}, {per_count} per count, {kmeans_seeds} seeds, {minutes} minutes"
        )
    todo = cases(split, per_count, conditions, 1 if peer_python else kmeans_seeds, minutes)
    outcomes = run(todo, known, None, str(peer_python) if peer_python else None)
    who = "pyAudioAnalysis 0.3.14 (count given)" if peer_python else "lampy FLsD"
    length = f" of {minutes} minutes" if minutes else ""
    title = f"{who}, split {split}, {per_count} conversations{length} per speaker count"
    return report(outcomes, known or bool(peer_python), title)
