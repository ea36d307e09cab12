"""Lazy lampy arrays: numpy expressions built as a graph, fused into regions, run on demand."""

from lampy.lazy._array import LazyArray, array
from lampy.lazy._calls import declare
from lampy.lazy._cost import Explanation, calibrate
from lampy.lazy._io import Graph, load_graph, save_graph

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
