"""`load_graph` on a file from anyone: numpy arithmetic on numbers only, unless the caller says.

Each refused case raises `GraphRefused` (a `UsageError`, also a `PermissionError`) naming the
node and what it asked for, before anything is imported, read or requested.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lampy
from lampy import GraphRefused
from tests.lazy.test_calls import W, X, project


class _Payload:
    """Unpickles to a call of os.mkdir: visible proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def write(path: Path, nodes: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"format": "lampy-graph/1", "nodes": nodes}))
    return path


def const(value: Any) -> dict[str, Any]:
    return {"const": value, "type": type(value).__name__ if value is not None else "None"}


def node(op: str, params: dict[str, Any], args: list[Any], shape: list[int] = []) -> Any:  # noqa: B006
    return {"op": op, "params": params, "shape": shape, "dtype": "float64", "args": args}


def test_the_savetxt_then_load_attack_is_refused(tmp_path: Path) -> None:
    """The issue's attack: np.savetxt writes a pickle byte by byte, np.load(allow_pickle=True)
    runs it. Before the allow-list, loading and running this graph created `marker`."""
    marker, dropped = tmp_path / "pwned", str(tmp_path / "payload.pkl")
    payload = list(pickle.dumps(_Payload(marker), protocol=0))  # text: savetxt writes it
    source = {"op": "source", "params": {}, "shape": [1, len(payload)], "dtype": "uint8"}
    nodes = [
        {**source, "args": [], "data": [payload]},
        node(
            "ufunc", {"name": "savetxt"}, [const(dropped), {"node": 0}, *map(const, ["%c", "", ""])]
        ),
        node("ufunc", {"name": "load"}, [const(dropped), const(None), const(True), {"node": 1}]),
    ]
    path = write(tmp_path / "evil.json", nodes)
    with pytest.raises(GraphRefused, match=r"evil.json: node 1 calls 'savetxt', refused") as e:
        lampy.load_graph(path).run(executor="inline")
    assert isinstance(e.value, lampy.UsageError) and isinstance(e.value, PermissionError)
    assert not marker.exists() and not os.path.exists(dropped)


def test_each_operation_and_constant_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    data = {"op": "source", "params": {}, "shape": [2], "dtype": "float64", "args": []}
    first = {**data, "data": [1.0, 2.0]}
    cases = {
        "calls 'system', refused": node("ufunc", {"name": "system"}, [{"node": 0}], [2]),
        "calls '__import__', refused": node("reduce", {"kind": "__import__", "axis": None}, []),
        "operation 'eval'": node("eval", {}, []),
        "constant of type 'str'": node("ufunc", {"name": "add"}, [{"node": 0}, const("x")], [2]),
        "uses node 5, not an earlier node": node("ufunc", {"name": "exp"}, [{"node": 5}], [2]),
        "parameters": node("ufunc", {"name": {"nested": 1}}, [{"node": 0}], [2]),
        "dtype 'O'": {**first, "dtype": "O"},
        "dtype \"\\[\\('a', 'O'\\)\\]\"": {**first, "dtype": "[('a', 'O')]"},
        "shape 'x'": {**first, "shape": "x"},
    }
    for expected, bad in cases.items():
        path = write(tmp_path / "bad.json", [first, bad])
        with pytest.raises(GraphRefused, match=rf"bad.json: node 1 .*{expected}"):
            lampy.load_graph(path)
    short = write(tmp_path / "short.json", [{**first, "shape": [1000, 1000]}])
    with pytest.raises(lampy.UsageError, match=r"node 0 holds data of shape \(2,\), not"):
        lampy.load_graph(short)


def test_a_region_node_imports_its_module_only_when_allowed(tmp_path: Path) -> None:
    expr = project(lampy.array(X) + 1, W, scale=0.5).sum(axis=0)
    saved = lampy.save_graph(expr, tmp_path / "g.json")
    name = f"{project.__module__}:project"
    with pytest.raises(GraphRefused, match=rf"node \d calls region {name}.*regions=\['{name}'\]"):
        lampy.load_graph(saved)
    want = expr.run(executor="inline")
    for grant in ({"regions": [name]}, {"regions": [project.__module__]}, {"trusted": True}):
        assert np.array_equal(lampy.load_graph(saved, **grant).run(executor="inline"), want)
    text = saved.read_text().replace(name, "lampy_never_imported:f")
    with pytest.raises(GraphRefused, match="would import and run module 'lampy_never_imported'"):
        lampy.load_graph(write(tmp_path / "h.json", json.loads(text)["nodes"]))
    assert "lampy_never_imported" not in sys.modules


def test_npy_fields_read_only_the_graphs_folder_unless_allowed(tmp_path: Path) -> None:
    inside, outside = tmp_path / "graph", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    big = np.linspace(0, 1, 2000)
    np.save(outside / "big.npy", big)
    saved = lampy.save_graph(np.exp(lampy.array(outside / "big.npy")), inside / "g.json")
    with pytest.raises(GraphRefused, match=r"g.json: node 0 reads .*big.npy', outside"):
        lampy.load_graph(saved)
    for grant in ({"paths": [outside]}, {"trusted": True}):
        assert np.array_equal(lampy.load_graph(saved, **grant).run(executor="inline"), np.exp(big))
    nodes = json.loads(saved.read_text())["nodes"]
    nodes[0]["npy"] = "/etc/passwd"
    with pytest.raises(GraphRefused, match="reads '/etc/passwd', outside"):
        lampy.load_graph(write(inside / "abs.json", nodes))
    os.symlink(outside / "big.npy", inside / "link.npy")  # a link out counts as outside
    nodes[0]["npy"] = "link.npy"
    with pytest.raises(GraphRefused, match="big.npy', outside"):
        lampy.load_graph(write(inside / "link.json", nodes))


def test_remote_fields_ask_no_server_unless_allowed(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/a.npy"  # nothing listens: asking it fails, refusing does not ask
    source = {"op": "source", "params": {}, "shape": [3], "dtype": "float64", "args": []}
    path = write(tmp_path / "r.json", [{**source, "remote": {"url": url, "rows": [0, 3]}}])
    with pytest.raises(GraphRefused, match=r"r.json: node 0 reads remote array .*urls="):
        lampy.load_graph(path)
    with pytest.raises(lampy.RemoteArrayError):  # allowed: the server is asked (and is away)
        lampy.load_graph(path, urls=["http://127.0.0.1:9/"])
