"""A decorated region called with lazy arguments becomes a node of the graph."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lampy
import lampy.lazy as lazy
from lampy._errors import (
    ResultError,
    SplitLengthError,
    UnsplittableError,
    UnsupportedOperation,
    UsageError,
)
from lampy.lazy._graph import schedule
from lampy.regions._runner import RegionRunner
from lampy.testing import assert_same
from tests.lazy.test_lazy import Expr, both, expressions

RNG = np.random.default_rng(2)
X = RNG.uniform(-1, 1, (9, 4))
Y = RNG.uniform(-1, 1, (9, 4))
W = RNG.uniform(-1, 1, (4, 3))


@lampy.elemwise(shared=("w",))
def project(x: np.ndarray, w: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return np.tanh(x @ w) * scale


@lampy.sum
def gram(x: np.ndarray) -> np.ndarray:
    return x.T @ x


def _mean_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"s": a["s"] + b["s"], "n": a["n"] + b["n"]}


@lampy.reduce(_mean_combine, finalize=lambda p: (p["s"] / p["n"]).astype(np.float32))
def column_mean(x: np.ndarray) -> dict[str, Any]:
    return {"s": x.sum(axis=0), "n": len(x)}


@lampy.elemwise
def positives(x: np.ndarray) -> np.ndarray:
    return x[x[:, 0] > 0]  # fewer rows than it got: its shape depends on the values


@lampy.elemwise
def affine(x: np.ndarray, k: float) -> np.ndarray:
    return x * k + 1


@lampy.sum
def column_sums(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=0)


@lampy.elemwise(executor="inline")
def where_it_runs(x: np.ndarray) -> np.ndarray:
    return np.full(len(x), os.getpid())


@lampy.elemwise
def halve(x: np.ndarray) -> np.ndarray:
    return x[::2]  # not one result row per input row


@lampy.elemwise
def pair(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x, x


@lampy.elemwise
def picky(x: np.ndarray) -> np.ndarray:
    if not (x < 1).all():
        raise ValueError("values must be below 1")
    return x


@lampy.elemwise
def cast(x: np.ndarray, to: str) -> np.ndarray:
    return x.astype(to) if x.max() < 2 else x  # the dtype depends on the values


def test_region_call_returns_a_lazy_node_and_runs_as_that_region(executor: str) -> None:
    a, b = lazy.array(X), lazy.array(Y)
    result = project(np.exp(a) + b, W, scale=2.0) - 1
    assert isinstance(result, lazy.LazyArray)
    assert (result.shape, result.dtype) == ((9, 3), np.dtype("float64"))
    assert_same(result.run(chunks=3), np.tanh((np.exp(X) + Y) @ W) * 2.0 - 1)


@settings(max_examples=10)
@given(expr=expressions, k=st.floats(-3, 3), chunks=st.integers(1, 4))
def test_regions_over_random_trees_equal_numpy(
    executor: str, expr: Expr, k: float, chunks: int
) -> None:
    lazy_value, value = both(expr)
    got = column_sums(affine(lazy_value, k) * 2)
    assert_same(affine(lazy_value, k).run(chunks=chunks), value * k + 1)
    assert_same(got.run(chunks=chunks), ((value * k + 1) * 2).sum(axis=0), exact=False)


def test_the_chain_feeding_a_region_runs_in_its_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[RegionRunner] = []
    original = RegionRunner.run

    def counting(self: RegionRunner, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return original(self, *args, **kwargs)

    a, b = lazy.array(X), lazy.array(Y)
    node = project(np.exp(a) + b, lampy.shared(W))
    steps = [s for s in schedule(node.node) if s.is_region]
    assert [(s.kind, [n.label() for n in s.fused]) for s in steps] == [
        ("region", ["exp", "add", "elemwise project"])
    ]
    monkeypatch.setattr(RegionRunner, "run", counting)
    assert_same(node.run(executor="inline", chunks=2), np.tanh((np.exp(X) + Y) @ W))
    assert len(calls) == 1  # one region call: the fused chain rides along


def test_reductions_as_nodes_infer_their_result(executor: str) -> None:
    a = lazy.array(X)
    total = gram(a * 2)
    assert (total.shape, total.dtype) == ((4, 4), np.dtype("float64"))
    assert_same(total.run(chunks=3), (X * 2).T @ (X * 2), exact=False)
    mean = column_mean(a)
    assert (mean.shape, mean.dtype) == ((4,), np.dtype("float32"))
    assert_same((mean + 1).run(chunks=2), X.mean(axis=0).astype(np.float32) + 1, exact=False)


def test_a_decorated_ufunc_takes_lazy_arguments_too(executor: str) -> None:
    exp = lampy.elemwise(np.exp)  # no inspectable signature
    assert_same(exp(lazy.array(X) * 2).run(chunks=2), np.exp(X * 2))


def test_region_options_win_over_run_options() -> None:
    node = where_it_runs(lazy.array(X))
    assert set(node.run(executor="local", chunks=3).tolist()) == {os.getpid()}
    worker_pids = lampy.elemwise(where_it_runs.region.function)(lazy.array(X))
    assert os.getpid() not in set(worker_pids.run(executor="local", chunks=3).tolist())


def test_bad_lazy_region_calls_fail_when_written() -> None:
    a = lazy.array(X)
    with pytest.raises(SplitLengthError, match="x has 9 rows, w has 4 rows"):
        lampy.elemwise(project.region.function)(a, lazy.array(W))
    with pytest.raises(UnsplittableError, match=r"0-d lazy array.*lampy.shared\(w\)"):
        lampy.elemwise(project.region.function)(a, a.sum())
    with pytest.raises(UnsupportedOperation, match=r"shape \(1, 4\) for 2 stand-in row"):
        halve(a)
    with pytest.raises(UnsupportedOperation, match="returned tuple"):
        pair(a)
    with pytest.raises(UnsupportedOperation, match="it raised ValueError: values must be below"):
        picky(a + 5)
    with pytest.raises(TypeError, match="unexpected keyword argument .bad."):
        project(a, W, scale=1, bad=2)
    partial = lampy.sum(allow_partial=0.9)(gram.region.function)
    with pytest.raises(UnsupportedOperation, match="allow_partial"):
        partial(a)


def test_a_result_unlike_the_inferred_one_fails_the_run() -> None:
    node = cast(lazy.array(X * 10), "float32")  # stand-ins are ones: inferred float32
    assert node.dtype == np.dtype("float32")
    with pytest.raises(ResultError, match=r"returned \(9, 4\) float64.*inferred from stand-ins as"):
        node.run(executor="inline")
    kept = positives(lazy.array(X))  # all ones pass its filter: inferred as every row
    assert kept.shape == (9, 4)
    with pytest.raises(ResultError, match=r"returned \d rows for its 9 input rows"):
        kept.run(executor="inline")  # the region itself refuses a row count unlike its input


def test_region_nodes_save_by_name_and_load(tmp_path: Path) -> None:
    expr = project(lazy.array(X) + 1, W, scale=0.5).sum(axis=0)
    loaded = lazy.load_graph(lazy.save_graph(expr, tmp_path / "g.json"), trusted=True)
    assert_same(loaded.run(executor="inline"), expr.run(executor="inline"))

    @lampy.elemwise
    def local(x: np.ndarray) -> np.ndarray:
        return x

    with pytest.raises(UnsupportedOperation, match="top level of an importable module"):
        lazy.save_graph(local(lazy.array(X)), tmp_path / "h.json")
    with pytest.raises(UnsupportedOperation, match="cannot save the constant"):
        lazy.save_graph(project(lazy.array(X), W, scale=[1.0]), tmp_path / "i.json")


def test_explain_shows_the_region_with_its_stand_in_timing() -> None:
    plan = project(lazy.array(X) * 2, W).explain(executor="local", chunks=3)
    text = str(plan)
    assert "region   multiply -> elemwise project" in text
    assert "time from stand-ins" in text
    assert plan.prewarm("local") == min(3, plan.workers["local"]) > 0


def test_a_declared_result_skips_the_stand_ins(executor: str, tmp_path: Path) -> None:
    lazy_picky = lazy.declare(picky, (None, 4), np.float64)  # picky refuses the ones
    node = lazy_picky(lazy.array(X) * 0.5)
    assert (node.shape, node.dtype) == ((9, 4), np.dtype("float64"))
    assert "declared result: no time estimate" in str(node.explain(executor="inline"))
    assert_same(node.run(chunks=2), X * 0.5)
    loaded = lazy.load_graph(lazy.save_graph(node, tmp_path / "g.json"), trusted=True)
    assert_same(loaded.run(chunks=2), X * 0.5)
    total = lazy.declare(gram, (4, 4), "float64")(X)  # numpy arguments too become a node
    assert_same(total.run(chunks=3), X.T @ X, exact=False)


def test_bad_declarations_and_results_unlike_them_fail() -> None:
    with pytest.raises(ResultError, match=r"returned \(9, 4\) float64.*declared as \(9, 4\) int8"):
        lazy.declare(picky, (None, 4), np.int8)(lazy.array(X * 0.5)).run(executor="inline")
    with pytest.raises(UsageError, match="None stands for the split rows"):
        lazy.declare(gram, (None, 4), "float64")(lazy.array(X))
    with pytest.raises(UsageError, match=r"ints >= 0 and None for the rows; got \(-1, 2\)"):
        lazy.declare(picky, (-1, 2), "float64")
    with pytest.raises(UsageError, match="takes a lampy region"):
        lazy.declare(np.exp, (None,), "float64")  # type: ignore[arg-type]


def test_constants_are_drawn_escaped_and_cut(tmp_path: Path) -> None:
    odd = lazy.declare(cast, (None, 4), "float64")(lazy.array(X), 'a "quoted" ' + "x" * 40)
    dot = odd.graph().to_dot()
    assert 'cast \'a \\"quoted\\" xxxxxxxxx...\\n' in dot
    if shutil.which("dot") is not None:  # graphviz would refuse an unescaped quote
        assert "<svg" in odd.graph().render(tmp_path / "odd.svg").read_text()
