"""Speaker diarization with Fisher Linear Semi-Discriminant analysis, its heavy steps on lampy."""

from .pipeline import Params, Result, diarize

__all__ = ["Params", "Result", "diarize"]
