"""Benchmark suite ``hand_oneshot``: one labelled hand radiograph, 37 landmarks carried to every held-out hand.

Usage (from the repository root, with ../shared/data beside it)::

    # 1. the training images of the seeded split, as NIfTI with 0.2 mm pixels, into runs/ (git-ignored)
    python benchmarks/hand_oneshot.py prepare
    # 2. train the 2D model (about 30 min on one CPU thread)
    samembed train --config Resources/Models/sam-lite-2d-hand.yaml
    # 3. evaluate SAM (one and several templates) against 2D elastix affine and affine + B-spline
    python benchmarks/hand_oneshot.py run --model Resources/Models/sam-lite-2d-hand.pt --out benchmarks/results

Errors are in pixels of the original resolution and in mm ASSUMING 0.1 mm per original pixel (the data set
gives no spacing). Everything runs on one thread (torch and elastix) so the times compare. See
``samembed.evaluation.hand_oneshot`` for the frames, the split and the methods.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="hand_oneshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shared data folder (default $SAMEMBED_DATA or ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="split and template seed")
    p.add_argument("--n-train", type=int, default=100, help="training images in the split (rest held out)")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="write the training images as NIfTI with pixel spacing into runs/")
    pr.add_argument("--out", default=str(REPO / "runs" / "hand_dha37" / "train-0.2mm"))
    r = sub.add_parser("run", help="run the benchmark")
    r.add_argument("--model", default=str(REPO / "Resources" / "Models" / "sam-lite-2d-hand.pt"))
    r.add_argument("--templates", type=int, default=5, help="templates of the multi-template variant")
    r.add_argument("--no-elastix", action="store_true", help="skip the elastix baselines")
    r.add_argument("--elastix-iterations", type=int, default=250, help="iterations per pyramid level and stage")
    r.add_argument("--grid-mm", type=float, default=10.0, help="final B-spline control-point spacing, mm")
    r.add_argument("--refine", action="store_true", help="also run SAM with cycle-consistent refinement")
    r.add_argument("--consistency", type=float, nargs=2, default=[15.0, 20.0], metavar=("INLIER_MM", "WINDOW_MM"),
                   help="the *-consistent methods: robust affine of SAM's matches, outliers re-searched in a window")
    r.add_argument("--polish", action="store_true", help="also run the SAM methods with the intensity polish")
    r.add_argument("--no-consistency", action="store_true", help="skip the *-consistent methods")
    r.add_argument("--elastix-cache", default=str(REPO / "runs" / "hand_dha37" / "elastix-cache"),
                   help="reuse elastix results stored here (they do not depend on the SAM model); '' to disable")
    r.add_argument("--max-targets", type=int, help="evaluate only the first N held-out images (quick check)")
    r.add_argument("--threads", type=int, default=1, help="torch and elastix threads")
    r.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    r.add_argument("--stem", default="hand_oneshot", help="output file stem")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(getattr(args, "threads", 1)))

    from samembed.errors import SamEmbedError
    from samembed.evaluation import hand_oneshot as ho

    try:
        cases = ho.load_hand_dataset(args.data)
        if args.command == "prepare":
            train, held = ho.hand_split([c.image_id for c in cases], args.n_train, args.seed)
            keep = set(train)
            paths = ho.write_training_images([c for c in cases if c.image_id in keep], args.out)
            print(f"{len(paths)} training images ({len(held)} held out, never written) in {args.out}")
            return 0
        import torch

        torch.set_num_threads(args.threads)
        report = ho.run_benchmark(args.model, data_root=args.data, n_train=args.n_train, seed=args.seed,
                                  templates=args.templates, elastix=not args.no_elastix,
                                  elastix_iterations=args.elastix_iterations, elastix_threads=args.threads,
                                  grid_spacing_mm=args.grid_mm, refine=args.refine,
                                  consistency=None if args.no_consistency else tuple(args.consistency),
                                  polish=args.polish, max_targets=args.max_targets,
                                  elastix_cache=args.elastix_cache or None,
                                  out_dir=args.out, stem=args.stem)
    except SamEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(ho.markdown_table(report["methods"]))
    print(f"(template {report['one_template']}; {len(report['split']['targets_evaluated'])} targets; "
          f"{report['wall_seconds']:.0f} s; written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
