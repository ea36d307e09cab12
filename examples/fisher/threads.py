"""One BLAS thread for the pipeline's matrix products in the calling process.

Every product of the pipeline is small: a batch of 256 frames' spectra by the mel filters,
the FLsD scatter matrices and a 72 x 72 eigenproblem, k-means over 8-dimensional vectors. A
second BLAS thread gains nothing there, and costs: OpenBLAS wakes its threads for each product
and leaves them busy-waiting for about 0.1 s after it, so on a machine whose cores run the
local pool's workers they take a core from the workers, or a product waits for a thread that
lost its core (docs/fisher.md: under load the FLsD stage of the hour took 0.2-0.8 s of the
caller's time with two BLAS threads, 0.06 s with one, and the whole hour inline 11.4 s against
2.9 s). The local pool's workers run one BLAS thread each already.

threadpoolctl (the fisher extra) sets the limit for every BLAS library loaded (numpy's and
scipy's OpenBLAS), for the whole process while the block runs: the pipeline is the only BLAS
user of the processes that run it (the CLI, the evaluation's workers). Where it is not
installed (a sandbox that has only numpy and scipy), the block runs as it would without
this: the limit changes the time, never the result.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from typing import Any


def one_blas_thread() -> AbstractContextManager[Any]:
    """A context in which BLAS runs on one thread; the previous counts come back after."""
    controller = _controller()
    if controller is None:
        return nullcontext()
    return controller.limit(limits=1, user_api="blas")  # type: ignore[no-any-return]


@functools.cache
def _controller() -> Any:
    """The BLAS libraries of this process, found once (after scipy is loaded: the pipeline
    imports it first, so its OpenBLAS is among them); None without threadpoolctl."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl.ThreadpoolController()
