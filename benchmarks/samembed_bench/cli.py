"""``samembed evaluate`` and ``samembed make-suites``: sub-commands the engine's ``samembed`` command adds through
:func:`add_parsers` when this package is installed (also ``python -m samembed_bench.cli``).

Examples::

    samembed make-suites --out cache/suites
    samembed evaluate cache/suites/*/cases.json --methods sam,sam-polish,sam-refine,centre,elastix-affine,elastix-bspline \\
        --model default --out results/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from samembed.cli import BENCH_COMMANDS, at_least_one
from samembed.errors import InputError

from .methods import METHODS

log = logging.getLogger(__name__)


def _cmd_make_suites(args: argparse.Namespace) -> int:
    from .suites import build_suites

    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    try:
        written = build_suites(args.out, suites, data=args.data, seed=args.seed, force=args.force)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for suite, path in written.items():
        print(f"{suite}: {path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Run the methods on the cases and write the report. The output folder is made and checked before any case
    runs; a run stopped by Ctrl-C or SIGTERM reports the pairs it finished (then exits 130 or 143); a run whose
    every pair failed exits 2 after its report (which lists the failures), one where some failed exits 3."""
    from samembed.io import output_folder

    from .cases import read_cases
    from .runner import environment_info, model_training_facts, parse_methods, run_cases, write_report

    results: list = []
    try:
        methods = parse_methods(args.methods)
        cases = []
        for path in args.cases:
            got = read_cases(path)
            cases += got[: args.limit] if args.limit else got
        if not cases:
            raise InputError("the case files hold no cases")
        seen: dict[tuple[str, str], int] = {}
        for c in cases:  # a case listed twice counted twice in every statistic (an audit)
            seen[(c.suite, c.case_id)] = seen.get((c.suite, c.case_id), 0) + 1
        twice = [f"{s}/{c}" for (s, c), k in seen.items() if k > 1]
        if twice:
            raise InputError(f"case {', '.join(twice[:5])} is listed more than once in {', '.join(map(str, args.cases))}; "
                             "each (suite, case_id) must be unique")
        if args.elastix_threads is not None and args.elastix_threads < 1:
            raise InputError(f"--elastix-threads must be >= 1, got {args.elastix_threads}")
        if not args.stem or Path(args.stem).name != args.stem or args.stem in (".", ".."):
            # a/b failed after every case had run (no folder a), and ../x wrote beside --out (an audit)
            name = Path(args.stem).name
            raise InputError(f"--stem {args.stem!r}: give a file name stem without folders (the files go to --out "
                             f"{args.out}), e.g. --stem {name if name not in ('', '.', '..') else 'landmarks'}")
        output_folder("--out", Path(args.out))  # before any case runs: a run of hours is not lost at its end
        model_id = args.model if any(m.startswith("sam") for m in methods) else None
        info = environment_info(model_id, args.elastix_threads) | {"cases": ", ".join(map(str, args.cases))}
        if model_id:  # which file, and whether any case's image was in its training data
            facts, trained = model_training_facts(model_id, [im for c in cases for im in (c.source, c.target)])
            if facts:
                info["model"] = f"{model_id} ({facts})"
            if trained:
                names = ", ".join(Path(t).name for t in trained[:4]) + (", ..." if len(trained) > 4 else "")
                info["trained on"] = (f"{len(trained)} of the evaluated images were in the model's training data "
                                      f"({names}): their errors say less about scans it never saw")
                print(f"warning: {info['trained on']}", file=sys.stderr)
        try:
            run_cases(cases, methods, model=args.model, device=args.device, elastix_threads=args.elastix_threads,
                      results=results)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (samembed.stopping.Terminated): report what finished
            if results:
                # beside an earlier run's report of the same stem, not over it (its tables carry no mark of a
                # stopped run: a review)
                earlier = Path(args.out) / f"{args.stem}.md"
                stem = f"{args.stem}.partial" if earlier.exists() else args.stem
                report = write_report(results, args.out, stem=stem,
                                      info=info | {"stopped": f"after {len(results)} of {len(cases) * len(methods)} "
                                                              "(case, method) pairs"})
                print(f"stopped: wrote the {len(results)} finished pair(s) to {report}"
                      + (f" (the earlier report {earlier} and its tables are left as they were)"
                         if stem != args.stem else ""), file=sys.stderr)
            raise
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = write_report(results, args.out, stem=args.stem, info=info)
    print(report.read_text(encoding="utf-8"))
    print(f"wrote {report}")
    if all(r.error for r in results):
        print(f"error: every pair failed, the first with: {results[0].error} (the report lists them)", file=sys.stderr)
        return 2
    failed = [r for r in results if r.error]
    if failed:  # as samembed propagate: a script or CI must notice
        print(f"error: {len(failed)} of {len(results)} pairs failed, the first with: {failed[0].error} (the report "
              "lists them)", file=sys.stderr)
        return 3
    return 0


def add_parsers(subparsers) -> None:
    """Add ``evaluate`` and ``make-suites`` to an ``argparse`` sub-parser collection.

    Each sets ``func(args) -> int`` (0 ok, 2 bad input).

    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_parsers(p.add_subparsers(dest="command"))
    >>> p.parse_args(["make-suites", "--out", "x"]).suites
    'popi_synthetic,openkbp_inter,lidc_synthetic'
    """
    e = subparsers.add_parser("evaluate", help=BENCH_COMMANDS["evaluate"],
                              description="Run point-transfer methods on benchmark case files (JSON or CSV) and write a "
                                          "markdown table, per-point CSV and error-CDF PNGs per suite.")
    e.add_argument("cases", nargs="+", help="case files (.json or .csv)")
    e.add_argument("--methods", default="sam,sam-polish,sam-refine,centre,elastix-affine,elastix-bspline",
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    e.add_argument("--model", default="default", help="SAMEmbedding model name, checkpoint path or random:sam-lite")
    e.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--stem", default="landmarks", help="output file name stem (default: landmarks)")
    e.add_argument("--limit", type=at_least_one, default=None, metavar="N", help="use at most N cases per case file")
    e.add_argument("--elastix-threads", type=at_least_one, default=None, help="elastix threads (default: ITK's)")
    e.set_defaults(func=_cmd_evaluate)

    m = subparsers.add_parser("make-suites", help=BENCH_COMMANDS["make-suites"],
                              description="Write benchmark images and case files (deterministic, seeded).")
    m.add_argument("--out", required=True, help="output folder, e.g. cache/suites (not committed)")
    m.add_argument("--suites", default="popi_synthetic,openkbp_inter,lidc_synthetic", help="comma-separated suite names")
    m.add_argument("--data", default=None, help="shared data folder (default: $SAMEMBED_DATA or ../shared/data)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--force", action="store_true", help="rebuild even if up to date")
    m.set_defaults(func=_cmd_make_suites)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m samembed_bench.cli``): the same commands as ``samembed evaluate`` / ``make-suites``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="samembed")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
