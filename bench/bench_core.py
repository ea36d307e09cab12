"""Core regions: numpy alone against lampy inline and local (issue targets in extra_info).

- compute-heavy elemwise: per row block, rfft then a small matmul; local should be >= 1.8x
  faster than numpy alone on 2 cores.
- memory-bound elemwise: a + b on 256 MB arrays with chunks="auto"; lampy must decide not to
  fan out and stay within 1.05x of numpy (speed-up >= 0.95).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import lampy

RNG = np.random.default_rng(0)
FRAMES = RNG.standard_normal((16_384, 1024))  # 128 MiB of float64 rows
BASIS = RNG.standard_normal((513, 64))
A = RNG.standard_normal(32 * 1024 * 1024)  # 256 MiB each
B = RNG.standard_normal(32 * 1024 * 1024)


def spectral_features(frames: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """A compute-heavy row-wise step: magnitude spectra projected on a small basis."""
    spectra = np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1))
    return np.log1p(spectra) @ basis


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def run(benchmark: Any, group: str, system: str, fn: Any, *args: Any, **info: Any) -> Any:
    benchmark.group = group
    benchmark.extra_info.update(system=system, **info)
    return benchmark.pedantic(fn, args=args, rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("system", ["numpy", "inline", "local", "local-8"])
def test_compute_heavy(benchmark: Any, system: str) -> None:
    """local-8 is the local pool with chunks=8: what fan-out gives when "auto" is not asked."""
    expected = spectral_features(FRAMES[:64], BASIS)
    if system == "numpy":
        result = run(
            benchmark,
            "compute-heavy elemwise",
            "numpy alone",
            spectral_features,
            FRAMES,
            BASIS,
            baseline=True,
        )
    else:
        executor, _, chunks = system.partition("-")
        f = lampy.elemwise(executor=executor, shared=("basis",), chunks=int(chunks or 0) or None)(
            spectral_features
        )
        name = f"lampy {executor}" + (f", chunks={chunks}" if chunks else ', chunks="auto"')
        target = {"local": 1.8}.get(executor)
        result = run(
            benchmark,
            "compute-heavy elemwise",
            name,
            f,
            FRAMES,
            BASIS,
            **({"target": target} if target else {}),
        )
        benchmark.extra_info["plan"] = str(f.explain(FRAMES, BASIS))
    np.testing.assert_allclose(result[:64], expected)


@pytest.mark.parametrize("system", ["numpy", "local"])
def test_memory_bound(benchmark: Any, system: str) -> None:
    if system == "numpy":
        run(benchmark, "memory-bound a + b (256 MB)", "numpy alone", add, A, B, baseline=True)
    else:
        f = lampy.elemwise(executor="local")(add)
        run(
            benchmark,
            "memory-bound a + b (256 MB)",
            'lampy local, chunks="auto"',
            f,
            A,
            B,
            target=0.95,
            note="must not fan out",
        )
        plan = f.explain(A, B)
        benchmark.extra_info["plan"] = str(plan)
        assert not plan.fan_out, plan
