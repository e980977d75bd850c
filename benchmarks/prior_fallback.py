#!/usr/bin/env python
"""The search prior's translation fallback, measured on every ``openkbp_inter`` case (issue 14).

When fewer than 20 % of the global-embedding correspondences agree on an affine, the engine used to search the whole
body; now it first tries the translation most pairs agree on (``samembed.matcher.search_prior``). This runs the
shipped model with the gate's ``between-patients`` settings twice, without the fallback (``MIN_TRANSLATION_INLIERS``
set above 1) and with it, and prints the paired comparison and every case that changed. Per-case results are cached
in ``cache/prior_fallback/`` (not committed)::

    OMP_NUM_THREADS=1 python benchmarks/prior_fallback.py
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))
sys.path.insert(0, str(REPO / "benchmarks"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.gate import compare, model_offsets  # noqa: E402
from samembed_bench.suites import build_suites  # noqa: E402

from samembed import matcher  # noqa: E402


def main() -> int:
    # no options: the parser answers --help (without it, `--help` started the whole run)
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    files = build_suites(str(REPO / "cache" / "suites"), ["openkbp_inter"])
    cases = read_cases(files["openkbp_inter"])
    runs = {}
    default = matcher.MIN_TRANSLATION_INLIERS
    for name, value in (("without", 2.0), ("with", default)):
        matcher.MIN_TRANSLATION_INLIERS = value
        folder = REPO / "cache" / "prior_fallback" / name
        folder.mkdir(parents=True, exist_ok=True)
        runs[name] = model_offsets("default", cases, folder)[1]
    matcher.MIN_TRANSLATION_INLIERS = default
    for r in compare(cases, runs["without"], runs["with"]):
        lo, hi = r["diff_ci"]
        print(f"{r['group']}: {r['shipped_mean']:.2f} -> {r['candidate_mean']:.2f} mm, within 10 mm "
              f"{100 * r['shipped_within_10']:.0f} -> {100 * r['candidate_within_10']:.0f} %, "
              f"paired diff {r['diff_mean']:+.2f} ({lo:+.2f} .. {hi:+.2f})")
    for c in cases:
        a, b = (np.linalg.norm(runs[k][c.key], axis=1) for k in ("without", "with"))
        if np.abs(a - b).max() > 0.01:
            print(f"{c.case_id} {list(c.labels)}: {np.round(a, 1)} -> {np.round(b, 1)} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
