"""``samembed propagate``: the command-line glue around :func:`samembed.propagate.run.propagate`.

``add_parser(sub)`` is called from ``samembed.cli.build_parser``; it imports neither Dask nor torch, so
``samembed --help`` stays fast. Dask is imported when the command runs (with a clear message if missing).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import EXIT_SOME_FAILED


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``propagate`` sub-command to ``samembed``'s sub-parsers."""
    from ..cli import _add_common, _add_match_options

    p = sub.add_parser(
        "propagate", help="carry an atlas's landmarks to many scans on Dask (resumable, with a review report)",
        description="Match the landmarks of an annotated atlas into every scan of a manifest or folder, on a local "
                    "Dask cluster or an existing one. Writes OUT/scans/<id>.mrk.json, OUT/matches.csv, "
                    "OUT/failures.csv, OUT/run.json and OUT/report.html.",
        epilog="The atlas's embedding is stored in --cache-dir (default OUT/cache), which every worker reads. Exit "
               "status: 0 when every scan was matched; 3 when some scans failed (each in OUT/failures.csv, the first "
               "ones printed); 2 for bad input or when no scan could be matched; 1 when the system refused a read or a "
               "write, or on an internal error; 130 when interrupted; 143 when stopped by SIGTERM.")
    p.add_argument("--atlas", nargs=2, action="append", required=True, metavar=("IMAGE", "POINTS"),
                   help="an atlas image and its landmarks (CSV label,x,y,z LPS mm, .fcsv or .mrk.json); repeat it for "
                        "several atlases: each landmark is then fused per scan (agreeing atlases and spread in the output)")
    p.add_argument("--scans", required=True, metavar="MANIFEST.csv|FOLDER",
                   help="a CSV with a 'path' column (optional 'id'; relative paths are relative to the CSV) or a folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=2, metavar="N",
                       help="local worker processes, one thread each (default: 2)")
    where.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                       help="join this Dask scheduler instead (tls:// uses Dask's distributed.comm.tls settings)")
    p.add_argument("--resume", action="store_true", help="continue a run in OUT: skip scans finished with the same settings from the same file")
    p.add_argument("--ras", action="store_true", help="CSV atlas points are RAS (Slicer); .mrk.json outputs in RAS")
    p.add_argument("--memory-limit", default="auto", metavar="SIZE", help="per local worker, e.g. 6GB (default: auto)")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    p.add_argument("--no-thumbnails", dest="thumbnails", action="store_false", help="no landmark thumbnails")
    p.add_argument("--report-thumbnails", type=int, default=3000, metavar="N",
                   help="embed at most N landmark thumbnails in the report, least confident first (default: 3000)")
    _add_match_options(p, "between-patients: atlases are other people's scans")
    _add_common(p)
    p.set_defaults(func=run_command)
    return p


def propagate_command_options(args):
    """The options of ``samembed propagate``: the between-patients preset (atlases are other people's annotated
    scans), then ``--preset`` and the flags given."""
    from ..cli import match_options_from_args

    return match_options_from_args(args, "between-patients")


def run_command(args) -> int:
    """Run ``samembed propagate`` from parsed arguments; returns the exit code."""
    from .run import propagate, require_dask
    from .settings import Atlas, PropagateSettings

    require_dask()
    if not getattr(args, "verbose", False):  # Dask's own INFO lines would drown the progress bar
        for name in ("distributed", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)
    options = propagate_command_options(args)
    atlases = [Atlas(image, points, ras=args.ras) for image, points in args.atlas]
    settings = PropagateSettings(
        model=args.model, device=args.device, precision=args.precision, modality=args.modality, spacing_mm=args.spacing,
        workers=args.workers, scheduler=args.scheduler, memory_limit=args.memory_limit, cache_dir=args.cache_dir,
        resume=args.resume, ras=args.ras, report=args.report, thumbnails=args.thumbnails,
        report_thumbnails=args.report_thumbnails, progress=not args.quiet)
    echo = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    summary = propagate(atlases, args.scans, args.out, options, settings, echo=echo)
    if not args.quiet and summary.report:
        print(f"report: {summary.report}")
    if summary.failed and not (summary.finished or summary.skipped):  # (as samembed match when no target matched)
        print(f"error: no scan could be matched; the reasons are in {summary.out_dir / 'failures.csv'}",
              file=sys.stderr)
        return 2
    return 0 if summary.failed == 0 else EXIT_SOME_FAILED
