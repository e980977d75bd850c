#!/usr/bin/env python
"""Landmark-matching benchmark: SAMEmbedding vs image-centre alignment vs elastix, on three suites.

Builds the suites (``popi_synthetic``, ``openkbp_inter``, ``lidc_synthetic``) from ``../shared/data`` into
``cache/suites`` when missing, runs every method on every case and writes
``benchmarks/results/landmarks_<date>.md`` plus ``_points.csv``, ``_pairs.csv`` and one error-CDF PNG per suite.

Usage (from the repository root; the full run takes hours on a CPU, mostly elastix B-spline)::

    OMP_NUM_THREADS=1 python benchmarks/landmarks.py --model default
    python benchmarks/landmarks.py --model random:sam-lite --suites openkbp_inter --limit 2 --methods sam,centre

Data location: ``$SAMEMBED_DATA`` or ``../shared/data`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.runner import METHODS, environment_info, parse_methods, run_cases, write_report  # noqa: E402
from samembed_bench.suites import SUITE_NAMES, build_suites  # noqa: E402

from samembed.errors import InputError  # noqa: E402
from samembed.options import MatchOptions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="SAMEmbedding model name, checkpoint path or random:sam-lite")
    p.add_argument("--device", default="cpu")
    p.add_argument("--suites", default=",".join(SUITE_NAMES), help="comma-separated suite names")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--limit", type=int, default=None, help="at most N cases per suite")
    p.add_argument("--suite-dir", default=str(REPO / "cache" / "suites"), help="where suites are built (not committed)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    p.add_argument("--stem", default=None, help="output name stem (default landmarks_<date>)")
    p.add_argument("--data", default=None, help="shared data folder (default $SAMEMBED_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=None, help="torch and elastix threads (default: library defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="on-disk embedding cache for SAMEmbedding (not committed)")
    p.add_argument("--prior-window", type=float, default=None,
                   help="SAMEmbedding affine-prior window, mm (default: the MatchOptions default; 0: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    try:
        methods = parse_methods(args.methods)
        # the base settings of the sam* methods (each method then fixes refine and polish: runner.method_options)
        options = MatchOptions() if args.prior_window is None else MatchOptions(prior_window_mm=args.prior_window)
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        case_files = build_suites(args.suite_dir, suites, data=args.data, seed=args.seed)
        cases = []
        for suite in suites:
            got = read_cases(case_files[suite])
            cases += got[: args.limit] if args.limit else got
        results = run_cases(cases, methods, model=args.model, device=args.device, elastix_threads=args.threads,
                            cache_dir=args.cache_dir, options=options)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = args.stem or f"landmarks_{dt.date.today().isoformat()}"
    info = environment_info(args.model if any(m.startswith("sam") for m in methods) else None, args.threads)
    info["suites"] = ", ".join(f"{s} ({sum(c.suite == s for c in cases)} cases)" for s in suites)
    info["command"] = "python benchmarks/landmarks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = write_report(results, args.out, stem=stem, title="Landmark matching benchmark", info=info)
    print(report.read_text(encoding="utf-8"))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
