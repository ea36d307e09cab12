"""Speaker turns, RTTM files, and turning frame labels into turns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .vad import runs


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch of speech, in seconds."""

    start: float
    end: float
    speaker: str

    @property
    def duration(self) -> float:
        return self.end - self.start


class RttmError(ValueError):
    """An RTTM file that cannot be parsed."""


def read_rttm(path: str | Path, file_id: str | None = None) -> list[Turn]:
    """SPEAKER lines of an RTTM file as turns, sorted by start time.

    With `file_id`, only that recording's lines are kept, and a file whose lines are all for
    other recordings is refused: scoring against another recording's turns gives nonsense.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RttmError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RttmError(f"{path}: a directory, not an RTTM file") from None
    except UnicodeDecodeError:
        raise RttmError(f"{path}: not an RTTM file (not text)") from None
    turns, others = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] != "SPEAKER":
            continue
        if len(fields) < 8:
            raise RttmError(f"{path}:{number}: expected at least 8 fields, got {len(fields)}")
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError as exc:
            raise RttmError(f"{path}:{number}: bad start or duration: {exc}") from None
        if not (start >= 0 and duration >= 0):  # also refuses nan
            raise RttmError(f"{path}:{number}: negative start or duration")
        if file_id is not None and fields[1] != file_id:
            others.add(fields[1])
            continue
        turns.append(Turn(start, start + duration, fields[7]))
    if not turns and others:
        found = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
        raise RttmError(
            f"{path}: holds turns of {found}, none of {file_id} (the second field of each "
            f"SPEAKER line names its recording): give this recording's RTTM, or name the wav "
            f"file after the RTTM's recording"
        )
    return sorted(turns, key=lambda t: (t.start, t.end))


def format_rttm(turns: list[Turn], file_id: str) -> str:
    """RTTM text: `SPEAKER <file> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>` per turn."""
    return "".join(
        f"SPEAKER {file_id} 1 {t.start:.3f} {t.duration:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n"
        for t in turns
    )


def labels_to_turns(
    labels: np.ndarray, step: float, max_gap: float = 1.0, offset: float = 0.0
) -> list[Turn]:
    """Turns from per-frame labels (-1 = silence); same-speaker turns < `max_gap` apart merge.

    Frame i stands for [offset + i * step, offset + (i + 1) * step).
    """
    turns: list[Turn] = []
    for label in np.unique(labels[labels >= 0]):
        starts, ends = runs(labels == label)
        pairs = zip(starts, ends, strict=True)
        turns += [Turn(offset + s * step, offset + e * step, f"spk{label}") for s, e in pairs]
    turns.sort(key=lambda t: t.start)
    merged: list[Turn] = []
    for turn in turns:
        last = merged[-1] if merged else None
        if last and last.speaker == turn.speaker and turn.start - last.end < max_gap:
            merged[-1] = Turn(last.start, turn.end, last.speaker)
        else:
            merged.append(turn)
    return merged
