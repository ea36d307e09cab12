"""Speech edges refined to the sample: `vad.edge_crossings` and `pipeline.refine_edges`."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.fisher import features, vad
from examples.fisher.pipeline import Params, refine_edges
from examples.fisher.rttm import Turn

RATE = 16000


def _bursts(spans: list[tuple[float, float]], seconds: float = 4.0) -> np.ndarray:
    """Low noise with loud tone bursts over `spans` (seconds)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1e-3, round(seconds * RATE))
    t = np.arange(x.size) / RATE
    for a, b in spans:
        inside = (t >= a) & (t < b)
        x[inside] += 0.3 * np.sin(2 * np.pi * 220.0 * t[inside])
    return x.astype(np.float32)


def test_edge_crossings_find_the_burst_and_leave_silence_alone() -> None:
    x = _bursts([(1.0, 2.0)])
    centre = np.array([round(1.03 * RATE), round(1.96 * RATE), round(3.0 * RATE)])
    threshold = np.full(3, 1e-3)
    rising = np.array([True, False, True])
    limit = np.array([0, x.size, 0])
    out = vad.edge_crossings(centre, threshold, rising, limit, x, 800, 40, 16)
    assert abs(out[0] / RATE - 1.0) < 0.004  # moved 30 ms earlier, onto the onset
    assert abs(out[1] / RATE - 2.0) < 0.004  # moved 40 ms later, onto the offset
    assert out[2] == centre[2]  # nothing above the threshold near it: stays


def test_refine_edges_moves_edges_next_to_silence_only() -> None:
    x = _bursts([(0.5, 1.5), (1.5, 2.5), (3.0, 3.6)])
    feats, step = features.short_term_features(x, RATE)
    energy = feats[:, 1]
    speech = energy > 1e-4
    # Frame-level turns, each edge a frame or so off; spk0 hands over to spk1 at 1.5 s.
    turns = [Turn(0.47, 1.5, "spk0"), Turn(1.5, 2.53, "spk1"), Turn(3.02, 3.58, "spk0")]
    offset = (features.frame_geometry(RATE)[0] / RATE - step) / 2.0
    out = refine_edges(turns, x, RATE, energy, speech, speech, step, offset, Params())
    edges = [(t.start, t.end) for t in out]
    expected = [(0.5, 1.5), (1.5, 2.5), (3.0, 3.6)]
    assert np.allclose(edges, expected, atol=0.004)
    assert out[0].end == 1.5 and out[1].start == 1.5  # the change of speaker is not touched
    off = refine_edges(turns, x, RATE, energy, speech, speech, step, offset, Params(edge_reach=0))
    assert off == turns


def test_an_edge_does_not_cross_the_neighbouring_turn() -> None:
    # Two voices 30 ms apart: each edge next to that short pause may not pass the other turn's.
    x = _bursts([(0.5, 1.5), (1.53, 2.5)])
    feats, step = features.short_term_features(x, RATE)
    energy = feats[:, 1]
    speech = energy > 1e-4
    turns = [Turn(0.5, 1.49, "spk0"), Turn(1.55, 2.5, "spk1")]
    offset = (features.frame_geometry(RATE)[0] / RATE - step) / 2.0
    out = refine_edges(turns, x, RATE, energy, speech, speech, step, offset, Params())
    assert out[0].end <= out[1].start
    assert abs(out[0].end - 1.5) < 0.004 and abs(out[1].start - 1.53) < 0.004


def test_edge_crossings_do_not_depend_on_the_chunking(executor: str) -> None:
    import lampy

    x = _bursts([(0.2 + 0.3 * i, 0.35 + 0.3 * i) for i in range(12)])
    rng = np.random.default_rng(1)
    centre = np.round((np.arange(24) * 0.15 + 0.2 + rng.uniform(-0.03, 0.03, 24)) * RATE)
    centre = centre.astype(np.int64)
    threshold = np.full(24, 1e-3)
    rising = np.arange(24) % 2 == 0
    limit = np.where(rising, 0, x.size)
    with lampy.using(executor="inline"):
        want = vad.edge_crossings(centre, threshold, rising, limit, x, 800, 40, 16)
    with lampy.using(executor=executor, chunks=3):
        got = vad.edge_crossings(centre, threshold, rising, limit, x, 800, 40, 16)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, centre)


def _crossing_one_by_one(
    c: int, threshold: float, rising: bool, limit: int, x: np.ndarray, reach: int, half: int
) -> int:
    """`edge_crossings` for one edge, hop 1, from its own span's prefix sums: the reference."""
    if c - reach - half < 0 or c + reach + half >= x.size:
        return c  # the span runs off the signal: the edge stays
    span = x[c - reach - half : c + reach + half + 1].astype(np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(span * span)])
    width = 2 * half + 1
    points = [
        c + o
        for o in range(-reach, reach + 1)
        if (prefix[o + reach + width] - prefix[o + reach]) / width > threshold
        and (c + o >= limit if rising else c + o <= limit)
    ]
    if not points:
        return c
    return points[0] if rising else points[-1]


@settings(max_examples=60, deadline=None)
@given(
    seconds=st.floats(0.001, 0.2),
    edges=st.lists(
        st.tuples(st.floats(-0.1, 1.1), st.floats(1e-4, 0.2), st.booleans(), st.floats(-0.2, 0.2)),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**16),
)
def test_edge_crossings_match_each_edge_on_its_own(
    seconds: float, edges: list[tuple[float, float, bool, float]], seed: int
) -> None:
    """Anywhere in the signal, within reach of its ends or in one shorter than an edge's span."""
    x = np.random.default_rng(seed).normal(0.0, 0.1, max(1, round(seconds * RATE)))
    x = x.astype(np.float32)
    centre = np.array([round(at * x.size) for at, *_ in edges], dtype=np.int64)
    threshold = np.array([level for _, level, *_ in edges])
    rising = np.array([up for _, _, up, _ in edges])
    limit = centre + np.array([round(shift * x.size) for *_, shift in edges], dtype=np.int64)
    reach, half = 160, 40
    got = vad.edge_crossings(centre, threshold, rising, limit, x, reach, half, 1)
    want = [
        _crossing_one_by_one(int(c), float(t), bool(r), int(b), x, reach, half)
        for c, t, r, b in zip(centre, threshold, rising, limit, strict=True)
    ]
    np.testing.assert_array_equal(got, want)
