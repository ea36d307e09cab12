"""PNG timeline of the hypothesis (above) and the reference (below); needs matplotlib."""

from __future__ import annotations

from pathlib import Path

from .rttm import Turn


def save_timeline(
    path: Path,
    hypothesis: list[Turn],
    reference: list[Turn] | None = None,
    mapping: dict[str, str] | None = None,
) -> str | None:
    """Draw the timeline; return a note instead when matplotlib is not installed.

    With a `mapping` (hypothesis speaker -> reference speaker, from the scorer) a cluster takes
    the colour of the speaker it was mapped to, so errors stand out as colour changes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG timeline: matplotlib is not installed (pip install matplotlib)"
    ref_names = sorted({t.speaker for t in reference or []})
    hyp_names = sorted({t.speaker for t in hypothesis})
    mapping = mapping or {}
    unmapped = [name for name in hyp_names if name not in mapping]

    def colour_index(turn: Turn, is_reference: bool) -> int:
        if is_reference:
            return ref_names.index(turn.speaker)
        if turn.speaker in mapping:
            return ref_names.index(mapping[turn.speaker])
        return len(ref_names) + unmapped.index(turn.speaker)

    rows = [("hypothesis", hypothesis, False)]
    if reference is not None:
        rows.append(("reference", reference, True))
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(rows)))
    colours = plt.get_cmap("tab10")
    for y, (_, turns, is_reference) in enumerate(reversed(rows)):
        for t in turns:
            colour = colours(colour_index(t, is_reference) % 10)
            ax.broken_barh([(t.start, t.duration)], (y + 0.1, 0.8), color=colour)
    ax.set_yticks([y + 0.5 for y in range(len(rows))], [name for name, _, _ in reversed(rows)])
    ax.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
