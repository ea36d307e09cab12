"""Lazy lampy arrays: numpy expressions built as a graph, fused into regions, run on demand."""

from lampy.lazy.array import LazyArray, array
from lampy.lazy.calls import declare
from lampy.lazy.cost import Explanation, calibrate
from lampy.lazy.io import Graph, load_graph, save_graph

__all__ = [
    "Explanation",
    "Graph",
    "LazyArray",
    "array",
    "calibrate",
    "declare",
    "load_graph",
    "save_graph",
]
