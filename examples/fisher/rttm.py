"""Speaker turns, RTTM files, and turning frame labels into turns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .vad import run_starts


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

    Frame i stands for [offset + i * step, offset + (i + 1) * step). The runs and merges are
    found over all frames at once (an hour has thousands of turns): a run of one label starts
    a new turn unless the turn before it is the same speaker's and ends less than `max_gap`
    before it, the turns being in time order.
    """
    labels = np.asarray(labels)
    if not labels.size:
        return []
    starts, _ = run_starts(labels)
    ends = np.append(starts[1:], labels.size)
    speech = labels[starts] >= 0
    starts, ends, speaker = starts[speech], ends[speech], labels[starts[speech]]
    if not starts.size:
        return []
    begin, finish = offset + starts * step, offset + ends * step
    joins = (speaker[1:] == speaker[:-1]) & (begin[1:] - finish[:-1] < max_gap)
    first = np.flatnonzero(np.concatenate([[True], ~joins]))
    last = np.append(first[1:], starts.size) - 1
    return [
        Turn(a, b, f"spk{label}")
        for a, b, label in zip(
            begin[first].tolist(), finish[last].tolist(), speaker[first].tolist(), strict=True
        )
    ]
