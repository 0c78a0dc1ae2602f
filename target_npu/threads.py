"""One thread count for every compute library a run uses: torch, BLAS/OpenMP and the TVM runtime.

``set_threads(n)`` sets them together and returns the count used. It never imports torch or TVM
(importing either costs seconds); it configures the ones already imported and sets the environment
variables that the others read when they load:

- torch (only if ``torch`` is in ``sys.modules``): ``torch.set_num_threads(n)`` (intra-op threads).
- BLAS and OpenMP already loaded (numpy's OpenBLAS, torch's libgomp, MKL): ``threadpoolctl``'s
  ``threadpool_limits(n)``; libraries loaded later read ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``
  and ``MKL_NUM_THREADS``.
- TVM runtime thread pool: ``TVM_NUM_THREADS`` (read when the pool starts; it caps later
  configurations) and, if ``tvm`` is imported, ``runtime.config_threadpool``. A count above the
  one the pool started with is capped by TVM to that one.

``DEFAULT_THREADS`` (used for ``n=None``) comes from a measurement, ``benchmarks/threads.py``; see
its docstring there.
"""
from __future__ import annotations

import os
import sys

__all__ = ["DEFAULT_THREADS", "ENV_VARS", "check_threads", "set_threads"]

# Measured with benchmarks/threads.py on the project's 2-core machine (ResNet-20 W4A4, batch 16, images/s
# at 1 / 2 threads): simulator 27.65 / 1.45, deploy mode 94.21 / 2.11, `tvmc run` 47.24 / 26.79; every
# engine ran faster at 1 thread, as the earlier ResNet-18 measurement did (one image: 259 ms at 1
# thread, 8,136 ms at 2). The work is many small GEMMs, where extra BLAS threads spin against the
# machine's other processes. Details: docs/accuracy.md, "Threads".
DEFAULT_THREADS = 1

#: Environment variables read by the BLAS, OpenMP and TVM runtimes when they start.
ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS")

# TVM's runtime::threading::ThreadGroup::AffinityMode kBig: all cores of a homogeneous CPU.
_TVM_AFFINITY_BIG = 1


def check_threads(n: object) -> int | None:
    """Return ``n`` if it is None or a positive int, else raise ValueError with a one-line reason."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"threads must be a positive integer or None, got {n!r}")
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    return n


def set_threads(n: int | None = None) -> int:
    """Set torch, BLAS/OpenMP and TVM runtime threads to ``n`` (None: ``DEFAULT_THREADS``).

    Returns the count set. Raises ValueError for anything but None or an int >= 1.
    """
    count = check_threads(n)
    count = DEFAULT_THREADS if count is None else count
    for var in ENV_VARS:
        os.environ[var] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the environment variables above still reach libraries loaded later
        pass
    else:
        threadpool_limits(limits=count)
    tvm = sys.modules.get("tvm")
    if tvm is not None and hasattr(tvm, "get_global_func"):
        configure = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
        if configure is not None:
            configure(_TVM_AFFINITY_BIG, count)
    return count
