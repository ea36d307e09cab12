"""Speaker diarization with Fisher Linear Semi-Discriminant analysis, its heavy steps on lampy.

wav ─► short-term features (38 per 50 ms frame; @lampy.elemwise over blocks of frames)
    ─► band VAD (threshold per recording) ─► mid-term mean/std of the level-free features
       (1 s windows every 0.1 s, prefix sums)
    ─► FLsD projection (scatter matrices as a @lampy.sum; scipy.linalg.eigh)
    ─► speaker count 1..8 by Ward merging of 0.3 s pieces, with a confidence, or "cannot tell"
    ─► k-means (k-means++, seeded restarts; each iteration a @lampy.sum)
    ─► HMM Viterbi smoothing ─► re-segmentation of speaker changes (frame likelihoods as a
       @lampy.elemwise) ─► turns, edges next to silence refined to the sample (@lampy.elemwise)
    ─► RTTM, table, PNG; DER and purities

python -m examples.fisher diarize FILE.wav [--speakers N] [--reference REF.rttm]
                                  [--executor inline|local|openlambda] [--out DIR]
                                  [--seed S] [--json]
python -m examples.fisher generate OUT.wav [--speakers N] [--seconds S] [--seed S]
python -m examples.fisher evaluate [--split tune|report] [--per-count N] [--known] [--peer PY]
"""

from typing import Any

__all__ = ["Params", "Result", "diarize"]


def __getattr__(name: str) -> Any:
    """The pipeline's names, imported on first use: a worker process that unpickles a region
    of `features` then imports numpy alone, not scipy and the rest of the pipeline (~0.6 s)."""
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
