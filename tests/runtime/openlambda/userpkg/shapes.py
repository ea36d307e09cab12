"""Classes the regions take as arguments and give back, from a module of their own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    width: int
    gain: float


@dataclass(frozen=True)
class Summary:
    count: int
    total: float

    def merge(self, other: Summary) -> Summary:
        return Summary(self.count + other.count, self.total + other.total)
