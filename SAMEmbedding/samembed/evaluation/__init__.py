"""Landmark-matching benchmark: case files, suite builders, baseline methods, runner and metrics.

Modules: :mod:`.cases` (case-file format), :mod:`.suites` (build suites from ``../shared/data``),
:mod:`.registration` (image-centre and elastix point transfer), :mod:`.runner` (run methods, write the
report), :mod:`.metrics` (errors, tables, CDF plots), :mod:`.cli` (``evaluate`` and ``make-suites``).
Nothing here is imported by ``import samembed``.
"""
