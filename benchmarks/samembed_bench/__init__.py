"""``samembed_bench``: the benchmarks of the SAMEmbedding engine, kept out of the engine and the Slicer extension.

Landmark benchmark: :mod:`.cases` (case-file format), :mod:`.suites` (build suites from ``../shared/data``),
:mod:`.registration` (image-centre and elastix point transfer), :mod:`.runner` (run methods, write the report),
:mod:`.metrics` (errors, tables, CDF plots), :mod:`.cli` (the ``samembed evaluate`` and ``samembed make-suites``
sub-commands). Hand radiographs: :mod:`.hand_oneshot` (``python -m samembed_bench.hand_oneshot``).

Install it beside the engine from a source checkout with ``pip install -e benchmarks`` (``scripts/setup_env.sh``
does). It depends on :mod:`samembed`; the engine never imports it (its CLI loads :mod:`.cli` only when present).
"""
