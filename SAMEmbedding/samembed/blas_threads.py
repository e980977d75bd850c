"""numpy's BLAS threads in a process of the engine's own: one, the calling thread.

numpy's OpenBLAS starts a pool of worker threads when numpy is imported (one fewer than ``OPENBLAS_NUM_THREADS``
says, else ``GOTO_NUM_THREADS``, else ``OMP_NUM_THREADS``, else one per core; at most the cores the process may use:
the calling thread is the last one). A worker that has nothing to do spins on its core for about 2^28 cycles
(0.1 s at 2.6 GHz) before it sleeps: after its start, and after every call that woke it. The engine's own numpy BLAS
calls are small (affines, 3 x 3 geometry, a few thousand points); torch does the heavy arithmetic on threads of its
own. So on a 2-core machine the spinning worker only takes a core from torch, from the prefetch process, or from a
second target embedded at once. Measured with ``perf`` on a cold ``samembed match`` of two head-and-neck CTs (AMD
EPYC, 2 cores, ``OMP_NUM_THREADS=2``): 0.16 s of the process's 2.8 s of CPU time in OpenBLAS's idle loop, and
0.25 s less user time with :data:`ENV` = 1. Side by side (``benchmarks/cold_ab.py --threads 2 --reps 7 --atlas 5``,
``benchmarks/results/cold_ab_blas_threads.md``): one atlas into five targets 0.40 -> 0.36 s per target (1.10x), the
LIDC pair 1.07x, three head-and-neck pairs 0.99-1.06x; the same matches. With one torch thread OpenBLAS has no
worker anyway (it reads ``OMP_NUM_THREADS`` too), and the same comparison is 0.98-1.04x
(``cold_ab_blas_threads_control.md``).

The setting must be in the environment before numpy is first imported, so the engine applies it where it starts a
process: the ``samembed match`` and ``samembed embed`` commands (:func:`samembed.cli.run`, whose imports load no numpy
before it) and the Slicer module's engine process (in the environment it is started with). A value the user set
wins. Dask's nannies already give each worker process one BLAS thread. This module imports no numpy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import TypeVar

#: the environment variable OpenBLAS reads for its thread count (before ``OMP_NUM_THREADS``), once, when it loads
ENV = "OPENBLAS_NUM_THREADS"


Environ = TypeVar("Environ", bound=MutableMapping[str, str])


def says_how_many(environ: Environ) -> bool:
    """Whether ``environ`` gives numpy's BLAS a thread count (:data:`ENV` a whole number >= 1): OpenBLAS takes an
    empty value (a blank CI or container variable) or 0 as unset, and starts a thread per core."""
    value = environ.get(ENV, "").strip()
    return value.isdigit() and int(value) >= 1


def blas_environment(environ: Environ) -> Environ:
    """``environ`` with numpy's BLAS on one thread (:data:`ENV` = 1) unless it already says how many; for the
    environment of a process the engine starts. Returns ``environ``, changed in place."""
    if not says_how_many(environ):
        environ[ENV] = "1"
    return environ


def one_blas_thread() -> bool:
    """In a process of the engine's own, before numpy's first import: numpy's BLAS on the calling thread only (see
    the module docstring). Returns whether it applied: not when numpy is loaded already (its threads have started and
    keep their count) or :data:`ENV` says how many already."""
    if "numpy" in sys.modules or says_how_many(os.environ):
        return False
    blas_environment(os.environ)
    return True
