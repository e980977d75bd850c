#!/usr/bin/env python
"""Compare two runs of the landmark benchmark point by point: per suite, both mean errors, how many predictions
moved and by how much, and the largest change of a score.

For A/B checks in which only one thing differs between the runs: two engines, or a cold run against one that read
its embeddings from a warm cache folder::

    OMP_NUM_THREADS=1 python benchmarks/landmarks.py --threads 1 --methods sam-polish --stem cold --out /tmp/ab
    OMP_NUM_THREADS=1 python benchmarks/landmarks.py --threads 1 --methods sam-polish --cache-dir /tmp/c --stem fill --out /tmp/ab
    OMP_NUM_THREADS=1 python benchmarks/landmarks.py --threads 1 --methods sam-polish --cache-dir /tmp/c --stem warm --out /tmp/ab
    python benchmarks/compare_points.py /tmp/ab/cold_points.csv /tmp/ab/warm_points.csv

Prints a Markdown table (errors and moves in mm). Exits 2 when the runs do not hold the same points.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

#: a prediction that moved by more than this counts as moved, mm
MOVED_MM = 0.01


def read_points(path: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """The rows of a ``*_points.csv`` by (suite, case, method, label)."""
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["suite"], r["case_id"], r["method"], r["label"]): r for r in csv.DictReader(f)}


def compare(a: dict, b: dict) -> list[dict]:
    """Per suite and method: points, mean error of ``a`` and ``b`` (mm), points moved more than :data:`MOVED_MM`
    and more than 1 mm, the largest move (mm) and the largest change of a score. A point predicted in one run only
    (NaN in the other) counts as moved by an infinite distance; the mean errors are over the points both runs
    predicted (``points`` counts every point, ``predicted`` those)."""
    by_suite = defaultdict(list)
    for key, ra in a.items():
        rb = b[key]
        move = math.dist([float(ra[f"pred_{c}_lps_mm"]) for c in "xyz"], [float(rb[f"pred_{c}_lps_mm"]) for c in "xyz"])
        ea, eb = float(ra["error_mm"]), float(rb["error_mm"])
        if math.isnan(move):
            move = 0.0 if math.isnan(ea) and math.isnan(eb) else math.inf
        by_suite[(key[0], key[2])].append((ea, eb, move, abs(float(ra["score"]) - float(rb["score"]))))
    rows = []
    for (suite, method), every in by_suite.items():
        pts = [p for p in every if not (math.isnan(p[0]) or math.isnan(p[1]))]
        n = len(pts) or math.nan  # no point predicted in both: NaN means
        changes = [p[3] for p in pts if not math.isnan(p[3])]
        rows.append({"suite": suite, "method": method, "points": len(every), "predicted": len(pts),
                     "mean_a": sum(p[0] for p in pts) / n,
                     "mean_b": sum(p[1] for p in pts) / n, "moved": sum(p[2] > MOVED_MM for p in every),
                     "moved_1mm": sum(p[2] > 1.0 for p in every), "largest_move": max(p[2] for p in every),
                     "largest_score_change": max(changes, default=0.0)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="the first run's _points.csv")
    p.add_argument("b", type=Path, help="the second run's _points.csv")
    args = p.parse_args(argv)
    a, b = read_points(args.a), read_points(args.b)
    if a.keys() != b.keys():
        print(f"error: {args.a} and {args.b} hold different points ({len(a.keys() ^ b.keys())} in one only)",
              file=sys.stderr)
        return 2
    print(f"| suite | method | points (both predicted) | mean error, {args.a.name} | mean error, {args.b.name} "
          f"| difference | moved > {MOVED_MM} mm | moved > 1 mm | largest move | largest score change |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in compare(a, b):
        print(f"| {r['suite']} | {r['method']} | {r['points']} ({r['predicted']}) | {r['mean_a']:.3f} mm "
              f"| {r['mean_b']:.3f} mm "
              f"| {r['mean_b'] - r['mean_a']:+.4f} mm | {r['moved']} | {r['moved_1mm']} | {r['largest_move']:.3f} mm "
              f"| {r['largest_score_change']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
