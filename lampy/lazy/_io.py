"""Saving, loading and drawing lazy graphs.

The JSON form lists nodes inputs-first: each has its operation, parameters, shape and dtype,
and its inputs as node indices or constants. Real source data up to `INLINE_ELEMENTS` elements is
written inline; larger arrays go to `.npy` files beside the JSON (named after it) and are
referenced by relative path, as are sources that were read from `.npy` files. A source that is a
remote reference (`lampy.remote`) is saved as its URL and rows, never read. A region node
keeps its function as "module:qualname", imported again on load, so the region must be defined
at the top level of an importable module; its other arguments must be plain JSON values.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from lampy._errors import UnsupportedOperation, UsageError
from lampy.lazy._array import LazyArray
from lampy.lazy._graph import Node, schedule, walk
from lampy.regions._function import ParallelFunction
from lampy.runtime._job import read
from lampy.runtime.remote._reference import RemoteArray, remote

INLINE_ELEMENTS = 1024
FORMAT = "lampy-graph/1"


class Graph:
    """The graph behind a lazy array: its nodes, as JSON-ready data or as DOT text."""

    def __init__(self, root: Node) -> None:
        self.root = root
        self.nodes = walk(root)

    def to_dot(self) -> str:
        """Graphviz text: one box per node, and each region after fusion drawn as a cluster
        around the nodes it computes, so the picture shows what runs in one round trip."""
        index = {id(n): i for i, n in enumerate(self.nodes)}
        regions = [s for s in schedule(self.root) if s.is_region]
        clustered = {id(n) for s in regions for n in s.fused}
        kinds = [s.node.label() if s.kind == "region" else s.kind for s in regions]
        lines = ["digraph lampy {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
        for i, n in enumerate(self.nodes):
            if id(n) not in clustered:
                lines.append(f"  {self._box(i, n)}")
        for r, step in enumerate(regions):
            lines += [
                f"  subgraph cluster_{r} {{",
                f'    label="{kinds[r]} region: one round trip per chunk"; style=rounded;',
                *(f"    {self._box(index[id(n)], n)}" for n in step.fused),
                "  }",
            ]
        for i, n in enumerate(self.nodes):
            lines += [f"  n{index[id(a)]} -> n{i};" for a in n.inputs()]
        return "\n".join([*lines, "}"]) + "\n"

    @staticmethod
    def _box(i: int, n: Node) -> str:
        consts = [_short(repr(a)) for a in n.args if not isinstance(a, Node)]
        extra = f" {', '.join(consts)}" if consts else ""
        label = f"{n.label()}{extra}".replace("\\", "\\\\").replace('"', '\\"')
        return f'n{i} [label="{label}\\n{n.shape} {n.dtype}"];'

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


_PLAIN = {"bool": bool, "int": int, "float": float, "str": str}


def _short(text: str, limit: int = 24) -> str:
    """A constant as drawn in a box: long reprs are cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _const(value: Any) -> dict[str, Any]:
    if isinstance(value, np.generic):
        item = value.item()
        return {
            "const": [item.real, item.imag] if isinstance(item, complex) else item,
            "dtype": str(value.dtype),
        }
    if isinstance(value, complex):
        return {"const": [value.real, value.imag], "type": "complex"}
    if value is None:
        return {"const": None, "type": "None"}
    if type(value).__name__ not in _PLAIN:
        raise UnsupportedOperation(
            f"cannot save the constant {value!r} ({type(value).__name__}) in a graph file: "
            "region arguments that are not arrays must be None, bool, int, float, complex or str"
        )
    return {"const": value, "type": type(value).__name__}


def _load_const(data: dict[str, Any]) -> Any:
    if "dtype" in data:
        value = data["const"]
        dtype = np.dtype(data["dtype"])
        return dtype.type(complex(*value) if isinstance(value, list) else value)
    if data["type"] == "complex":
        return complex(*data["const"])
    if data["type"] == "None":
        return None
    return _PLAIN[data["type"]](data["const"])


def _function_name(node: Node) -> str:
    """The region's "module:qualname", checked to import back as the same region."""
    name = str(node.params["function"])
    try:
        same = _import_region(name) is node.function
    except UsageError:
        same = False
    if not same:
        raise UnsupportedOperation(
            f"cannot save a graph calling region {name.partition(':')[2]}: a saved graph refers "
            f"to regions by name ({name}), so define it at the top level of an importable module"
        )
    return name


def _import_region(name: str) -> ParallelFunction:
    module, _, qualname = name.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as why:
        raise UsageError(f"the graph calls region {name}, which does not import: {why}") from None
    if not isinstance(found, ParallelFunction):
        raise UsageError(f"the graph calls {name}, which is not a lampy region")
    return found


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
        if n.op == "region":
            record["params"] = {**n.params, "function": _function_name(n)}
        if n.op == "source" and isinstance(n.data, RemoteArray):
            record["remote"] = {"url": n.data.url, "rows": [n.data.start, n.data.stop]}
        elif n.op == "source" and n.path is not None:
            record["npy"] = os.path.relpath(os.path.abspath(n.path), target.parent.absolute())
        elif n.op == "source" and n.size <= INLINE_ELEMENTS and n.dtype.kind in "biuf":
            record["data"] = n.data.tolist() if isinstance(n.data, np.ndarray) else None
        elif n.op == "source" and n.data is not None:
            name = f"{target.stem}.{i}.npy"
            np.save(target.parent / name, read(n.data))
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
        if "remote" in record:
            start, stop = record["remote"]["rows"]
            reference = remote(record["remote"]["url"], dtype)[start:stop]
            if reference.shape != shape:
                raise UsageError(
                    f"{record['remote']['url']} rows {start}:{stop} now have shape "
                    f"{reference.shape}; the saved graph expects {shape}"
                )
            nodes.append(Node("source", (), {}, shape, dtype, data=reference))
            continue
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
        function = _import_region(str(params["function"])) if record["op"] == "region" else None
        nodes.append(Node(record["op"], args, params, shape, dtype, function=function))
    return LazyArray(nodes[-1])
