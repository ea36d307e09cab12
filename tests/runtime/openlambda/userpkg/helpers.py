"""Helpers of the regions, in a sibling module (one cached with lru_cache)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def taper(width: int) -> np.ndarray:
    """A normalised Hann window: cached, as a real helper computing a constant would be."""
    window = np.hanning(width + 2)[1:-1]
    return window / window.sum()


def scale(x: np.ndarray, gain: float) -> np.ndarray:
    return x * gain
