"""Carry an atlas's landmarks to many scans on Dask, resumable, with a review report.

>>> from samembed.propagate import Atlas, PropagateSettings, propagate          # doctest: +SKIP
>>> from samembed import MatchOptions                                           # doctest: +SKIP
>>> summary = propagate(Atlas("atlas.nii.gz", "atlas.mrk.json"), "scans.csv", "out/",
...                     options=MatchOptions(consistency=True),
...                     settings=PropagateSettings(model="default", workers=2))  # doctest: +SKIP
>>> summary.finished, summary.failed, summary.report                           # doctest: +SKIP

Modules: :mod:`.settings` (what to run and how), :mod:`.manifest` (the scans), :mod:`.task` (what a worker
does), :mod:`.results` (the output folder and resume), :mod:`.thumbnails`, :mod:`.report`, :mod:`.run` (the
Dask client side), :mod:`.cli` (``samembed propagate``). Importing this package loads neither Dask nor torch;
Dask is the optional extra ``samembed[dataset]``.
"""

from .manifest import Scan, read_scans
from .settings import Atlas, PropagateSettings


def __getattr__(name):  # lazy: `propagate` pulls in Dask only when used
    if name in ("propagate", "PropagateSummary", "MissingDependencyError"):
        from . import run

        return getattr(run, name)
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(name)


__all__ = ["Atlas", "MissingDependencyError", "PropagateSettings", "PropagateSummary", "Scan", "propagate",
           "read_scans", "write_report"]
