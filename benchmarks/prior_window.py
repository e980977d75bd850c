#!/usr/bin/env python
"""Search-window comparison on ``openkbp_inter``: the plain argmax over the target, a window around the best
global match, and windows around the affine prior's prediction (30, 50, 80 mm).

This is the run that made the 50 mm affine-prior window the Matcher's default. 50 mm was taken as the middle
of the three sizes, not the best one (30 mm was 0.8-1.0 mm better here); ``popi_synthetic``, ``lidc_synthetic`` and
``hand_oneshot`` were not looked at for the choice. Output: one line per pair with running means, then the
mean, median and per-structure means per variant (``benchmarks/results/prior_window_openkbp.log``).

Usage (from the repository root; embeddings are cached on disk so reruns are fast)::

    OMP_NUM_THREADS=1 python benchmarks/prior_window.py [--model default] [--cache-dir runs/emb_cache_default]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.suites import build_suites  # noqa: E402

from samembed import Matcher, MatchOptions  # noqa: E402
from samembed.io import read_image  # noqa: E402

#: variant -> its match settings (the rest: MatchOptions defaults); prior_window_mm=0 searches without the prior
VARIANTS: dict[str, MatchOptions] = {
    "plain": MatchOptions(prior_window_mm=0.0),
    "gw40": MatchOptions(prior_window_mm=0.0, global_window_mm=40.0),
    "prior30": MatchOptions(prior_window_mm=30.0),
    "prior50": MatchOptions(prior_window_mm=50.0),
    "prior80": MatchOptions(prior_window_mm=80.0),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--cache-dir", default=str(REPO / "runs" / "emb_cache_default"))
    p.add_argument("--suite-dir", default=str(REPO / "cache" / "suites"))
    args = p.parse_args()
    torch.set_num_threads(1)
    cases = read_cases(build_suites(args.suite_dir, ["openkbp_inter"])["openkbp_inter"])
    matcher = Matcher(args.model, device="cpu", cache_dir=args.cache_dir, cache_bytes=6 << 30)  # one embedding per image
    errors = {k: [] for k in VARIANTS}
    labels: list[str] = []
    for c in cases:
        src, tgt = read_image(c.source), read_image(c.target)
        for name, options in VARIANTS.items():
            r = matcher.match(src, c.query_points_lps_mm, [tgt], labels=c.labels, options=options)
            pred = np.array([x.point_lps_mm for x in r.matches])
            errors[name] += list(np.linalg.norm(pred - c.truth_points_lps_mm, axis=1))
        labels += list(c.labels)
        print(c.case_id, {k: round(float(np.mean(v)), 1) for k, v in errors.items()}, flush=True)
    labels_arr = np.array(labels)
    for name, v in errors.items():
        v = np.array(v)
        per = {lab: round(float(v[labels_arr == lab].mean()), 1) for lab in sorted(set(labels))}
        print(f"{name} mean {v.mean():.1f} median {np.median(v):.1f} {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
