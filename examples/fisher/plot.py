"""PNG timeline: the reference (when given) above what was found, and where they disagree.

Needs matplotlib. Colours follow the speakers: a found cluster takes the colour of the reference
speaker the scorer mapped it to, so a wrong speaker shows as a colour change, and the error row
marks every stretch scored as missed, false alarm or confusion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .rttm import Turn
from .scoring import GRID, activity
from .vad import runs

ERROR_COLOUR = "#d62728"  # tab10 red, kept out of the speakers' colours


def save_timeline(
    path: Path,
    hypothesis: list[Turn],
    reference: list[Turn] | None = None,
    mapping: dict[str, str] | None = None,
    title: str = "",
) -> str | None:
    """Draw the timeline into `path`; return a note instead when matplotlib is not installed.

    `mapping` (found speaker -> reference speaker, from the scorer) sets the colours and the
    legend; `title` goes on top (the file name and the DER, say).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "no PNG timeline: matplotlib is not installed (pip install matplotlib)"
    mapping = mapping or {}
    ref_names = sorted({t.speaker for t in reference or []})
    found_names = sorted({t.speaker for t in hypothesis})
    colours = _colours(ref_names, found_names, mapping)
    rows: list[tuple[str, list[tuple[float, float]], Any]] = []
    if reference is not None:
        for name in ref_names:
            spans = [(t.start, t.duration) for t in reference if t.speaker == name]
            rows.append(("reference", spans, colours[("ref", name)]))
    for name in found_names:
        spans = [(t.start, t.duration) for t in hypothesis if t.speaker == name]
        rows.append(("found", spans, colours[("found", name)]))
    errors = _error_spans(reference, hypothesis, mapping) if reference is not None else None
    labels = ["reference"] * (reference is not None) + ["found"]
    if errors is not None:
        labels.append("errors")
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.55 * len(labels)))
    y_of = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    for label, spans, colour in rows:
        ax.broken_barh(spans, (y_of[label] + 0.15, 0.7), color=colour)
    if errors is not None:
        ax.broken_barh(errors, (y_of["errors"] + 0.3, 0.4), color=ERROR_COLOUR)
    ax.set_yticks([y_of[label] + 0.5 for label in labels], labels)
    ax.set_ylim(0, len(labels))
    end = max([t.end for t in hypothesis + (reference or [])], default=1.0)
    ax.set_xlim(0, end + 0.5)
    ax.set_xlabel("time (s)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(
        handles=_legend(ref_names, found_names, mapping, colours, Patch, errors is not None),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize="small",
    )
    if title:
        ax.set_title(title, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _colours(
    ref_names: list[str], found_names: list[str], mapping: dict[str, str]
) -> dict[tuple[str, str], Any]:
    """A colour per reference speaker, shared by the cluster mapped to it; fresh ones otherwise."""
    import matplotlib

    palette = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]  # red
    colours: dict[tuple[str, str], Any] = {}
    for i, name in enumerate(ref_names):
        colours[("ref", name)] = palette[i % len(palette)]
    unmapped = [name for name in found_names if mapping.get(name) not in ref_names]
    for name in found_names:
        if name in unmapped:
            index = len(ref_names) + unmapped.index(name)
            colours[("found", name)] = palette[index % len(palette)]
        else:
            colours[("found", name)] = colours[("ref", mapping[name])]
    return colours


def _legend(
    ref_names: list[str],
    found_names: list[str],
    mapping: dict[str, str],
    colours: dict[tuple[str, str], Any],
    patch: Any,
    with_errors: bool,
) -> list[Any]:
    """One entry per colour: a reference speaker and the cluster found for it."""
    found_for = {ref: found for found, ref in mapping.items()}
    handles = []
    for name in ref_names:
        found = found_for.get(name)
        label = f"{name} = found {found}" if found else f"{name} (not found)"
        handles.append(patch(color=colours[("ref", name)], label=label))
    for name in found_names:
        if mapping.get(name) not in ref_names:
            suffix = " (no reference match)" if ref_names else ""
            handles.append(patch(color=colours[("found", name)], label=f"found {name}{suffix}"))
    if with_errors:
        handles.append(patch(color=ERROR_COLOUR, label="error: missed, false alarm, confused"))
    return handles


def _error_spans(
    reference: list[Turn], hypothesis: list[Turn], mapping: dict[str, str]
) -> list[tuple[float, float]]:
    """(start, duration) of the stretches the scorer counts as an error, on its time grid."""
    end = max([t.end for t in reference + hypothesis], default=0.0)
    n = round(end / GRID) + 1
    mapped = [Turn(t.start, t.end, mapping.get(t.speaker, f"?{t.speaker}")) for t in hypothesis]
    ref, ref_names = activity(reference, n)
    hyp, hyp_names = activity(mapped, n)
    wrong = np.zeros(n, dtype=bool)
    for name in set(ref_names) | set(hyp_names):
        in_ref = ref[:, ref_names.index(name)] if name in ref_names else np.zeros(n, bool)
        in_hyp = hyp[:, hyp_names.index(name)] if name in hyp_names else np.zeros(n, bool)
        wrong |= in_ref != in_hyp
    starts, ends = runs(wrong)
    return [(s * GRID, (e - s) * GRID) for s, e in zip(starts, ends, strict=True)]
