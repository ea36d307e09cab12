"""Saving, loading and drawing lazy graphs.

The JSON form lists nodes inputs-first: each has its operation, parameters, shape and dtype,
and its inputs as node indices or constants. Real source data up to `INLINE_ELEMENTS` elements is
written inline; larger arrays go to `.npy` files beside the JSON (named after it) and are
referenced by relative path, as are sources that were read from `.npy` files. A source that is a
remote reference (`lampy.remote`) is saved as its URL and rows, never read. A region node
keeps its function as "module:qualname", imported again on load, so the region must be defined
at the top level of an importable module; its other arguments must be plain JSON values.

Loading is safe on a file from anyone by default (`Trust`): only allow-listed numpy operations
on numbers from the file or its folder; importing regions, reading elsewhere and asking array
servers are each granted by the caller.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lampy._errors import GraphRefused, UnsupportedOperation, UsageError
from lampy.lazy._array import LazyArray
from lampy.lazy._graph import OPERATIONS, REDUCTIONS, UFUNCS, Node, allowed, schedule, walk
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


@dataclass(frozen=True)
class Trust:
    """What a graph file may make `load_graph` do beyond numpy arithmetic on its own data.

    By default a graph runs only allow-listed numpy operations (`UFUNCS`, `REDUCTIONS`) on
    numeric constants and data, inline or in `.npy` files in the graph's folder: loading an
    untrusted file then runs no code of its choosing and reads nothing else. Each exception is
    the caller's to grant: `regions` (a region node imports its module, which runs its code),
    `paths` (folders outside the graph's that `.npy` fields may read) and `urls` (prefixes of
    the array servers `remote` fields may ask, with this machine's signature); `trusted=True`
    grants all of them, for files you wrote yourself.
    """

    everything: bool = False
    regions: frozenset[str] = frozenset()
    paths: tuple[Path, ...] = ()
    urls: tuple[str, ...] = ()

    def region(self, where: str, name: str) -> None:
        module = name.partition(":")[0]
        if not (self.everything or name in self.regions or module in self.regions):
            raise GraphRefused(
                f"{where} calls region {name}, and loading it would import and run module "
                f"{module!r}: pass regions=[{name!r}] (or [{module!r}]) if you trust that "
                "module, or trusted=True if you wrote the file"
            )

    def npy(self, where: str, folder: Path, relative: object) -> str:
        if not isinstance(relative, str):
            raise GraphRefused(f"{where} has an npy field that is not a path: {relative!r}")
        path = (folder / relative).resolve()
        inside = [folder.resolve(), *(p.resolve() for p in self.paths)]
        if not (self.everything or any(path.is_relative_to(p) for p in inside)):
            raise GraphRefused(
                f"{where} reads {str(path)!r}, outside the graph's folder {str(folder)!r}: pass "
                f"paths=[{str(path.parent)!r}] if it may read there, or trusted=True"
            )
        return str(path)

    def url(self, where: str, url: object) -> str:
        if not isinstance(url, str):
            raise GraphRefused(f"{where} has a remote url that is not text: {url!r}")
        if not (self.everything or any(_under(url, prefix) for prefix in self.urls)):
            raise GraphRefused(
                f"{where} reads remote array {url!r}, a signed request to a server the file "
                "chose: pass urls=[its server's URL] if you trust that server, or trusted=True"
            )
        return url


def _under(url: str, prefix: str) -> bool:
    """Whether `url` is on the server of `prefix` (scheme, host and port alike), below its path.

    >>> _under("http://h:80/a/x.npy", "http://h:80/a"), _under("http://h:8080/x", "http://h:80")
    (True, False)
    """
    asked, allowed = urllib.parse.urlsplit(url), urllib.parse.urlsplit(prefix)
    folder = allowed.path.rstrip("/") + "/"
    return (asked.scheme, asked.netloc) == (allowed.scheme, allowed.netloc) and (
        allowed.path.strip("/") == "" or asked.path.startswith(folder)
    )


_KINDS = "biufcmM"  # dtypes an untrusted file may use: numbers, bools, times (no objects)
_DTYPE = re.compile(r"^[<>=|]?[A-Za-z]+[0-9]*(\[[0-9]*[A-Za-z]+\])?$")  # float64, <f8, M8[ns]


def _dtype(where: str, text: object, trust: Trust) -> np.dtype[Any]:
    if not isinstance(text, str) or (
        not trust.everything and (not _DTYPE.match(text) or np.dtype(text).kind not in _KINDS)
    ):
        raise GraphRefused(
            f"{where} has dtype {text!r}; an untrusted graph holds numbers only (dtype kinds "
            f"{_KINDS!r}): pass trusted=True if you wrote the file"
        )
    return np.dtype(text)


def _checked(where: str, record: Any, trust: Trust, count: int) -> dict[str, Any]:
    """The record of one node, its operation, names and values checked against `trust`."""
    if not isinstance(record, dict) or record.get("op") not in (*OPERATIONS, "region"):
        op = record.get("op") if isinstance(record, dict) else record
        raise GraphRefused(f"{where} has operation {op!r}; lazy graphs use {OPERATIONS}")
    op, params = record["op"], record.get("params", {})
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise GraphRefused(f"{where} has shape {shape!r}; a shape is a list of sizes")
    if not isinstance(params, dict) or not all(_is_plain(v) for v in params.values()):
        raise GraphRefused(f"{where} has parameters {params!r}; they are plain JSON values")
    if op == "ufunc":
        _named(where, UFUNCS, params.get("name"), "numpy ufunc")
    if op == "reduce":
        _named(where, REDUCTIONS, params.get("kind"), "reduction")
    if op == "region":
        trust.region(where, str(params.get("function")))
    for arg in record.get("args", []):
        if not isinstance(arg, dict):
            raise GraphRefused(f"{where} has argument {arg!r}; arguments are JSON objects")
        if "node" in arg and not (_is_int(arg["node"]) and 0 <= arg["node"] < count):
            raise GraphRefused(f"{where} uses node {arg['node']!r}, not an earlier node")
        if "node" not in arg:
            _const_allowed(where, arg, op, trust)
    return record


def _named(where: str, table: Mapping[str, Any], name: object, what: str) -> None:
    try:
        allowed(table, name, what)
    except UnsupportedOperation as why:
        raise GraphRefused(f"{where} calls {name!r}, refused: {why}") from None


def _const_allowed(where: str, arg: dict[str, Any], op: str, trust: Trust) -> None:
    """Numbers (and None) anywhere; text only as an argument of a region the caller allowed."""
    if "dtype" in arg:
        _dtype(where, arg["dtype"], trust)
        return
    kind = arg.get("type")
    if kind in ("bool", "int", "float", "complex", "None") or (kind == "str" and op == "region"):
        return
    raise GraphRefused(
        f"{where} has a constant of type {kind!r} ({_short(repr(arg.get('const')))}); "
        "an untrusted graph's constants are numbers"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_plain(value: object) -> bool:
    if isinstance(value, list):
        return all(_is_plain(v) and not isinstance(v, list) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def load_graph(
    path: str | os.PathLike[str],
    *,
    trusted: bool = False,
    regions: Iterable[str] = (),
    paths: Iterable[str | os.PathLike[str]] = (),
    urls: Iterable[str] = (),
) -> LazyArray:
    """The lazy array saved by `save_graph` (array data read back from inline or `.npy`).

    Safe on a file from anyone by default: see `Trust` for what a file may ask and which
    argument grants more (`regions`, `paths`, `urls`, or `trusted=True` for all). A file that
    asks for more raises `GraphRefused` naming the node, before anything is imported or read.
    """
    source = Path(path)
    trust = Trust(trusted, frozenset(regions), tuple(Path(p) for p in paths), tuple(urls))
    document = json.loads(source.read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UsageError(f"{str(source)!r} is not a lampy graph ({FORMAT}) file")
    if not isinstance(document.get("nodes"), list) or not document["nodes"]:
        raise UsageError(f"{str(source)!r} has no list of nodes")
    nodes: list[Node] = []
    for i, raw in enumerate(document["nodes"]):
        where = f"{source.name}: node {i}"
        record = _checked(where, raw, trust, len(nodes))
        dtype = _dtype(where, record["dtype"], trust)
        shape = tuple(record["shape"])
        if "remote" in record:
            url = trust.url(where, record["remote"]["url"])
            start, stop = record["remote"]["rows"]
            reference = remote(url, dtype)[start:stop]
            if reference.shape != shape:
                raise UsageError(
                    f"{url} rows {start}:{stop} now have shape "
                    f"{reference.shape}; the saved graph expects {shape}"
                )
            nodes.append(Node("source", (), {}, shape, dtype, data=reference))
            continue
        if "npy" in record:
            npy = trust.npy(where, source.parent, record["npy"])
            nodes.append(Node("source", (), {}, shape, dtype, path=npy))
            continue
        if record["op"] == "source":
            data = np.array(record.get("data"), dtype)
            if data.size != np.prod(shape, dtype=np.int64):  # empty rows save as []
                raise UsageError(f"{where} holds data of shape {data.shape}, not {shape}")
            data = data.reshape(shape)
            nodes.append(Node("source", (), {}, shape, dtype, data=data))
            continue
        args = tuple(nodes[a["node"]] if "node" in a else _load_const(a) for a in record["args"])
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in record["params"].items()}
        function = _import_region(str(params["function"])) if record["op"] == "region" else None
        nodes.append(Node(record["op"], args, params, shape, dtype, function=function))
    return LazyArray(nodes[-1])
