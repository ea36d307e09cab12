"""PNG timeline of the hypothesis (above) and the reference (below); needs matplotlib."""

from __future__ import annotations

from pathlib import Path

from .rttm import Turn


def save_timeline(path: Path, hypothesis: list[Turn], reference: list[Turn] | None) -> str | None:
    """Draw the timeline; return a note instead when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG timeline: matplotlib is not installed (pip install matplotlib)"
    rows = [("hypothesis", hypothesis)] + ([("reference", reference)] if reference else [])
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(rows)))
    colours = plt.get_cmap("tab10")
    for y, (_, turns) in enumerate(reversed(rows)):
        names = sorted({t.speaker for t in turns})
        for t in turns:
            ax.broken_barh(
                [(t.start, t.duration)], (y + 0.1, 0.8), color=colours(names.index(t.speaker) % 10)
            )
    ax.set_yticks([y + 0.5 for y in range(len(rows))], [name for name, _ in reversed(rows)])
    ax.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
