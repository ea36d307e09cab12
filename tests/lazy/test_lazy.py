"""Lazy arrays: graphs evaluated on every executor equal numpy; fusion; errors; graph files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lampy
import lampy.lazy as lazy
from lampy._errors import ShapeError, UnsupportedOperation, UsageError
from lampy.lazy._graph import schedule
from lampy.regions import _runner as runner_module
from lampy.regions._runner import RegionRunner
from lampy.testing import assert_same

RNG = np.random.default_rng(0)
N, M = 7, 3
DATA = {
    "a": RNG.uniform(-2, 2, (N, M)),
    "b": RNG.uniform(-2, 2, (N, M)),
    "row": RNG.uniform(-2, 2, M),
    "col": RNG.uniform(-2, 2, (N, 1)),
}

Expr = Callable[[dict[str, Any]], Any]

UNARY: list[Callable[[Any], Any]] = [
    lambda x: -x,
    np.abs,
    lambda x: np.sqrt(np.abs(x)),
    lambda x: x * 0.5,
]
BINARY: list[Callable[[Any, Any], Any]] = [
    lambda x, y: x + y,
    lambda x, y: x - y,
    lambda x, y: x * y,
    np.maximum,
    np.minimum,
    lambda x, y: np.where(x > y, x, y - 1.0),
]


def _leaf(name: str) -> Expr:
    return lambda env: env[name]


def _unary(f: Callable[[Any], Any], e: Expr) -> Expr:
    return lambda env: f(e(env))


def _binary(f: Callable[[Any, Any], Any], x: Expr, y: Expr) -> Expr:
    return lambda env: f(x(env), y(env))


expressions = st.recursive(
    st.sampled_from(sorted(DATA)).map(_leaf),
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(UNARY), inner).map(lambda t: _unary(*t)),
        st.tuples(st.sampled_from(BINARY), inner, inner).map(lambda t: _binary(*t)),
    ),
    max_leaves=6,
)


def both(expr: Expr) -> tuple[Any, Any]:
    """The expression on lazy arrays and on numpy arrays."""
    return expr({k: lazy.array(v) for k, v in DATA.items()}), expr(DATA)


@settings(max_examples=20)
@given(expr=expressions, chunks=st.integers(1, 4))
def test_random_elementwise_trees_equal_numpy(executor: str, expr: Expr, chunks: int) -> None:
    result, expected = both(expr)
    assert (result.shape, result.dtype) == (np.shape(expected), np.asarray(expected).dtype)
    assert_same(result.run(chunks=chunks), expected)


@settings(max_examples=15)
@given(
    expr=expressions,
    kind=st.sampled_from(["sum", "mean", "min", "max"]),
    axis=st.sampled_from([None, 0, 1, -1]),
)
def test_random_reductions_equal_numpy(executor: str, expr: Expr, kind: str, axis: Any) -> None:
    result, expected = both(expr)
    if result.ndim == 1 and axis not in (None, 0, -1):
        axis = 0
    got = getattr(np, kind)(result, axis=axis).run(chunks=3)
    assert_same(got, getattr(np, kind)(expected, axis=axis), exact=kind in ("min", "max"))


def test_seeds_example_fuses_into_one_region(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[RegionRunner] = []
    original = RegionRunner.run

    def counting(self: RegionRunner, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RegionRunner, "run", counting)
    a, b, d = (lazy.array(DATA[k]) for k in ("a", "b", "row"))
    c = np.exp(a + b + d) * 2 - np.sqrt(np.abs(a))
    steps = schedule(c.node)
    assert [s.kind for s in steps if s.is_region] == ["elemwise"]
    (region,) = [s for s in steps if s.is_region]
    assert region.split == (True, True, False)  # the row vector is shared, not split
    assert_same(c.run(executor="inline", chunks=3), np.asarray(c.run(executor="inline")))
    assert len(calls) == 2  # one region call per run, however long the chain
    assert calls[0] is calls[1]  # the same step's runner both times: its plans are kept


def test_reduction_fuses_its_elementwise_input() -> None:
    a = lazy.array(DATA["a"])
    steps = schedule(np.sum(np.exp(a) * 2, axis=0).node)
    assert [s.kind for s in steps] == ["source", "reduce"]
    assert [n.label() for n in steps[1].fused] == ["exp", "multiply", "sum(axis=0)"]


def test_matmul_dot_transpose_slices_concatenate_reshape(executor: str) -> None:
    a, b, row = (lazy.array(DATA[k]) for k in ("a", "b", "row"))
    x, y = DATA["a"], DATA["b"]
    w = RNG.uniform(-1, 1, (M, 4))
    cases = [
        (a @ w, x @ w),
        ((a + 1) @ row, (x + 1) @ DATA["row"]),
        (np.dot(a.T[0], b), np.dot(x.T[0], y)),
        (a[2:6] * 2, x[2:6] * 2),
        (a[-1], x[-1]),
        (a[::-2, :], x[::-2, :]),
        (np.concatenate([a, b * 3]), np.concatenate([x, y * 3])),
        (a.reshape(N, 1, M).sum(axis=2), x.reshape(N, 1, M).sum(axis=2)),
        (np.reshape(a, (N, -1)), x),
        (np.transpose(a, (1, 0)).max(axis=0), x.T.max(axis=0)),
        (np.where(a > 0, a, b), np.where(x > 0, x, y)),
    ]
    for got, expected in cases:
        assert_same(got.run(chunks=2), expected, exact=False)


def test_integer_and_bool_dtypes_follow_numpy(executor: str) -> None:
    ints = np.arange(20, dtype=np.int32).reshape(10, 2)
    a = lazy.array(ints)
    for got, expected in [
        (a + 1, ints + 1),
        (a / 2, ints / 2),
        (a > 3, ints > 3),
        ((a > 3).sum(), (ints > 3).sum()),
        (a.sum(axis=0), ints.sum(axis=0)),
        (a.mean(), ints.mean()),
        (np.mean(a, axis=0), ints.mean(axis=0)),
    ]:
        assert got.dtype == np.asarray(expected).dtype
        assert_same(got.run(chunks=3), expected)


def test_array_from_list_ndarray_and_npy(tmp_path: Path) -> None:
    assert lazy.array([[1, 2], [3, 4]]).shape == (2, 2)
    np.save(tmp_path / "x.npy", DATA["a"])
    x = lazy.array(tmp_path / "x.npy")
    assert (x.shape, x.dtype, x.ndim) == ((N, M), np.dtype("float64"), 2)
    assert_same(np.asarray(x * 2), DATA["a"] * 2)
    assert repr(x).startswith("lampy.LazyArray(shape=(7, 3)")


def _unsupported() -> list[tuple[Callable[[], Any], str, type[Exception]]]:
    a, b = lazy.array(DATA["a"]), lazy.array(DATA["b"])
    return [
        (lambda: a + lazy.array(np.ones((4, 3))), r"broadcast.*\(7, 3\) and \(4, 3\)", ShapeError),
        (lambda: np.where(a > 0, a, np.ones(5)), r"broadcast.*\(7, 3\).*\(5,\)", ShapeError),
        (lambda: a @ np.ones((4, 2)), r"shapes \(7, 3\) and \(4, 2\) do not match", ShapeError),
        (lambda: a @ np.ones((2, 3, 3)), "right operand of 1 or 2 dims", UnsupportedOperation),
        (lambda: np.add.reduce(a), r"np.add.reduce is not supported", UnsupportedOperation),
        (lambda: np.add(a, b, out=np.empty((N, M))), r"with \['out'\]", UnsupportedOperation),
        (lambda: np.divmod(a, 2), "np.divmod is not supported", UnsupportedOperation),
        (
            lambda: np.cumsum(a),
            r"np.cumsum is not supported.*supported: sum, mean",
            UnsupportedOperation,
        ),
        (lambda: np.sort(a), "np.sort is not supported", UnsupportedOperation),
        (lambda: np.sum(a, axis=(0, 1)), "one int", UnsupportedOperation),
        (lambda: np.sum(a, axis=2), "out of bounds", ShapeError),
        (
            lambda: np.sum(a, keepdims=True),
            r"takes only \[\]; got \['keepdims'\]",
            UnsupportedOperation,
        ),
        (lambda: np.concatenate([a, b], axis=1), "axis 0 only", UnsupportedOperation),
        (lambda: np.concatenate([a, lazy.array(DATA["row"])]), "equal trailing shapes", ShapeError),
        (lambda: a.reshape(M, N), "must keep the leading axis", UnsupportedOperation),
        (lambda: a.reshape(N, 2), "cannot reshape", ShapeError),
        (lambda: a[:, 0], "leading axis only", UnsupportedOperation),
        (lambda: a[[0, 1]], "integer and slice", UnsupportedOperation),
        (lambda: a[7], "out of bounds", UsageError),
        (lambda: np.where(a > 0), "all three", UnsupportedOperation),
        (lambda: np.bitwise_and(a, 1), "bitwise_and cannot take", UnsupportedOperation),
        (lambda: a.T.transpose(0, 0), "not a permutation", ShapeError),
        (lambda: lazy.array(a[0:0]).max(), "empty axis", ShapeError),
        (lambda: lazy.array([[1], [2, 3]]), "object array", UnsupportedOperation),
        (lambda: lazy.array("data.csv"), "reads .npy files", UsageError),
        (lambda: bool(a), "truth value", UnsupportedOperation),
        (lambda: list(a), "iterating", UnsupportedOperation),
    ]


@pytest.mark.parametrize("case", range(len(_unsupported())))
def test_unsupported_and_shape_errors_raise_at_build(case: int) -> None:
    build, message, kind = _unsupported()[case]
    with pytest.raises(kind, match=message) as raised:
        build()
    # numpy users catch ValueError for shapes and TypeError for what a type cannot do
    assert isinstance(raised.value, UsageError)
    if kind is ShapeError:
        assert isinstance(raised.value, ValueError)
    if kind is UnsupportedOperation:
        assert isinstance(raised.value, TypeError)


def test_graph_json_round_trip(tmp_path: Path, executor: str) -> None:
    big = RNG.uniform(-1, 1, (600, 3))  # over the inline limit: saved beside the JSON
    np.save(tmp_path / "in.npy", big)
    a, small, f = lazy.array(big), lazy.array(DATA["row"]), lazy.array(tmp_path / "in.npy")
    expr = (np.maximum(a[::2] * np.float32(2), 0.5) - small).sum(axis=0) + f.T.mean(axis=1)
    expr = np.concatenate([expr.reshape(3, 1), lazy.array([[1.0]])])
    path = lazy.save_graph(expr, tmp_path / "g.json")
    document = json.loads(path.read_text())
    assert [n["op"] for n in document["nodes"]][-1] == "concatenate"
    assert sum("npy" in n for n in document["nodes"]) == 2
    loaded = lazy.load_graph(path)
    assert (loaded.shape, loaded.dtype) == (expr.shape, expr.dtype)
    assert_same(loaded.run(chunks=2), expr.run(executor="inline"), exact=False)


def test_dot_text_and_render_without_graphviz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = lazy.array(DATA["a"])
    dot = (np.exp(a) + 1).graph().to_dot()
    assert dot.startswith("digraph lampy {") and "exp" in dot and "n1 -> n2" in dot
    assert dot.count("subgraph cluster_") == 1 and "elemwise region" in dot
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="graphviz"):
        (a + 1).graph().render(tmp_path / "g.svg")


def test_render_draws_svg_with_graphviz(tmp_path: Path) -> None:
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed: apt-get install -y graphviz")
    a, b, d = (lazy.array(DATA[k]) for k in ("a", "b", "row"))
    path = (a + b + d).graph().render(tmp_path / "g.svg")
    svg = path.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert svg.count('class="node"') == 5 and svg.count('class="edge"') == 4


def test_explain_shows_regions_chunks_bytes_and_times() -> None:
    a, b = lazy.array(DATA["a"]), lazy.array(DATA["b"])
    plan = (np.exp(a + b) * 2).sum(axis=0).explain(executor="local", chunks=2)
    text = str(plan)
    assert "1 region(s) after fusion" in text
    assert "reduce   add -> exp -> multiply -> sum(axis=0)" in text
    busy = min(2, plan.workers["local"])
    assert "on local: ~" in text and "on inline: ~" in text and f"{busy} busy at once" in text
    assert "pre-warm" not in text  # neither executor can pre-warm


def test_calibrate_caches_constants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lampy.lazy import _cost as cost

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = lazy.calibrate(elements=1 << 12, repeats=1)
    assert set(measured) == set(cost.DEFAULTS)
    assert cost.constants() == measured


def test_a_lazy_reduction_stops_probing_once_its_executor_is_warm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The graph keeps its steps' runners across runs, so once the pool is warm the auto plan
    is kept and later runs time no probe (as a decorated function's repeated calls do)."""
    probes: list[int] = []
    original = runner_module._timed

    def timed(job: Any, chunk: int) -> Any:
        probes.append(chunk)
        return original(job, chunk)

    monkeypatch.setattr(runner_module, "_timed", timed)
    x = lazy.array(np.random.default_rng(5).standard_normal((200_000, 4)))
    total = np.exp(x).sum(axis=0)
    with lampy.using(executor="local"):
        for _ in range(3):
            before = len(probes)
            assert_same(total.run(), np.exp(np.asarray(x.run())).sum(axis=0), exact=False)
    assert probes and len(probes) - before == 0, probes
