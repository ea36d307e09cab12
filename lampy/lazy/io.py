"""Saving, loading and drawing lazy graphs.

The JSON form lists nodes inputs-first: each has its operation, parameters, shape and dtype,
and its inputs as node indices or constants. Real source data up to `INLINE_ELEMENTS` elements is
written inline; larger arrays go to `.npy` files beside the JSON (named after it) and are
referenced by relative path, as are sources that were read from `.npy` files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from lampy.errors import UsageError
from lampy.lazy.array import LazyArray
from lampy.lazy.graph import Node, walk

INLINE_ELEMENTS = 1024
FORMAT = "lampy-graph/1"


class Graph:
    """The graph behind a lazy array: its nodes, as JSON-ready data or as DOT text."""

    def __init__(self, root: Node) -> None:
        self.root = root
        self.nodes = walk(root)

    def to_dot(self) -> str:
        index = {id(n): i for i, n in enumerate(self.nodes)}
        lines = ["digraph lampy {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
        for i, n in enumerate(self.nodes):
            consts = [repr(a) for a in n.args if not isinstance(a, Node)]
            extra = f" {', '.join(consts)}" if consts else ""
            label = f"{n.label()}{extra}\\n{n.shape} {n.dtype}"
            lines.append(f'  n{i} [label="{label}"];')
            lines += [f"  n{index[id(a)]} -> n{i};" for a in n.inputs()]
        return "\n".join([*lines, "}"]) + "\n"

    def render(self, path: str | os.PathLike[str]) -> Path:
        """Draw to SVG or PNG (by the path's suffix) with graphviz's `dot`."""
        target = Path(path)
        dot = shutil.which("dot")
        if dot is None:
            raise UsageError(
                "rendering needs graphviz's `dot` on PATH (apt-get install graphviz); "
                "graph().to_dot() gives the text without it"
            )
        fmt = target.suffix.lstrip(".") or "svg"
        subprocess.run(
            [dot, f"-T{fmt}", "-o", str(target)], input=self.to_dot(), text=True, check=True
        )
        return target


def _const(value: Any) -> dict[str, Any]:
    if isinstance(value, np.generic):
        return {"const": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, complex):
        return {"const": [value.real, value.imag], "type": "complex"}
    return {"const": value, "type": type(value).__name__}


def _load_const(data: dict[str, Any]) -> Any:
    if "dtype" in data:
        value = data["const"]
        dtype = np.dtype(data["dtype"])
        return dtype.type(complex(*value) if isinstance(value, list) else value)
    if data["type"] == "complex":
        return complex(*data["const"])
    return {"bool": bool, "int": int, "float": float}[data["type"]](data["const"])


def save_graph(lazy: LazyArray, path: str | os.PathLike[str]) -> Path:
    """Write the graph of `lazy` as JSON; big source arrays go to `.npy` files beside it."""
    target = Path(path)
    nodes = walk(lazy.node)
    index = {id(n): i for i, n in enumerate(nodes)}
    records = []
    for i, n in enumerate(nodes):
        record: dict[str, Any] = {
            "op": n.op,
            "params": n.params,
            "shape": n.shape,
            "dtype": str(n.dtype),
            "args": [{"node": index[id(a)]} if isinstance(a, Node) else _const(a) for a in n.args],
        }
        if n.op == "source" and n.path is not None:
            record["npy"] = os.path.relpath(os.path.abspath(n.path), target.parent.absolute())
        elif n.op == "source" and n.size <= INLINE_ELEMENTS and n.dtype.kind in "biuf":
            record["data"] = n.data.tolist() if n.data is not None else None
        elif n.op == "source" and n.data is not None:
            name = f"{target.stem}.{i}.npy"
            np.save(target.parent / name, n.data)
            record["npy"] = name
        records.append(record)
    target.write_text(json.dumps({"format": FORMAT, "nodes": records}, indent=1) + "\n")
    return target


def load_graph(path: str | os.PathLike[str]) -> LazyArray:
    """The lazy array saved by `save_graph` (array data read back from inline or `.npy`)."""
    source = Path(path)
    document = json.loads(source.read_text())
    if document.get("format") != FORMAT:
        raise UsageError(f"{str(source)!r} is not a lampy graph ({FORMAT}) file")
    nodes: list[Node] = []
    for record in document["nodes"]:
        dtype = np.dtype(record["dtype"])
        shape = tuple(record["shape"])
        if "npy" in record:
            npy = str(source.parent / record["npy"])
            nodes.append(Node("source", (), {}, shape, dtype, path=npy))
            continue
        if record["op"] == "source":
            data = np.array(record["data"], dtype).reshape(shape)
            nodes.append(Node("source", (), {}, shape, dtype, data=data))
            continue
        args = tuple(nodes[a["node"]] if "node" in a else _load_const(a) for a in record["args"])
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in record["params"].items()}
        nodes.append(Node(record["op"], args, params, shape, dtype))
    return LazyArray(nodes[-1])
