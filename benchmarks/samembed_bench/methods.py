"""The benchmark's method names: SAMEmbedding's settings and the baselines. No numpy: the ``samembed`` command
builds its ``evaluate`` parser from these before an engine command sets numpy's BLAS threads
(:mod:`samembed.blas_threads`)."""

from __future__ import annotations

#: each SAMEmbedding method as the :class:`~samembed.options.MatchOptions` settings it fixes
#: (see :func:`samembed_bench.runner.method_options`)
SAM_METHOD_SETTINGS: dict[str, dict[str, bool]] = {
    "sam": {"refine": False, "polish": False},
    "sam-refine": {"refine": True, "polish": False},
    "sam-polish": {"refine": False, "polish": True},
    "sam-refine-polish": {"refine": True, "polish": True},
}
SAM_METHODS = tuple(SAM_METHOD_SETTINGS)
METHODS = (*SAM_METHODS, "centre", "elastix-affine", "elastix-bspline")
