"""Error against training time: evaluate the snapshots of a training run on the dev suite (issue 14).

Every ``snapshots/it_NNNNNN.pt`` of a run folder (written every ``snapshot_every`` iterations by
``samembed train``), and optionally the shipped model as the starting point, is matched on the first ``--pairs``
cases of ``openkbp_inter`` (organ centroids between different patients) with the engine's defaults. The result
is a table and a plot of the mean error (all structures and compact organs) against cumulative CPU-hours of
training, so the next decision (train longer, change the objective) is taken from a curve.

    python benchmarks/training_curve.py runs/sam-lite-ct-v3 --start Resources/Models/sam-lite-ct.pt --start-cpu-hours 1.25

Results are appended to ``RUN/curve.json`` (a snapshot already evaluated is not evaluated again) and drawn to
``RUN/curve.png``; ``--compare OTHER_RUN ...`` draws other runs' curves on the same axes; ``--out DIR`` also copies
both files there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from samembed_bench.suites import COMPACT_STRUCTURES, build_openkbp_inter

from samembed import Matcher, MatchOptions


def evaluate(model: str, cases, options: MatchOptions) -> dict:
    """Mean / median error (mm) and share within 10 mm on the cases, all structures and compact organs."""
    matcher = Matcher(model, device="cpu")
    errs, compact = [], []
    for case in cases:
        res = matcher.match(str(case.source), case.query_points_lps_mm, [str(case.target)], list(case.labels), options)
        for m, truth in zip(res.matches, case.truth_points_lps_mm):
            e = float(np.linalg.norm(m.point_lps_mm - truth))
            errs.append(e)
            if m.label in COMPACT_STRUCTURES:
                compact.append(e)
        matcher.clear_cache()
    e, c = np.array(errs), np.array(compact)
    return {"mean_mm": float(e.mean()), "median_mm": float(np.median(e)), "within_10mm": float(np.mean(e <= 10)),
            "compact_mean_mm": float(c.mean()) if len(c) else float("nan"), "points": int(len(e))}


def plot(curve: list[dict], png: Path, others: dict[str, list[dict]] | None = None, name: str = "") -> None:
    """Error against CPU-hours: this run's curve, and ``others`` (run name -> curve) drawn dashed beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n, (run, rows) in enumerate([(name, curve), *sorted((others or {}).items())]):
        pts = sorted(rows, key=lambda r: r["cpu_hours"])
        h = [r["cpu_hours"] for r in pts]
        tag, style = (f"{run}: " if others else ""), ("-" if n == 0 else "--")
        ax.plot(h, [r["mean_mm"] for r in pts], "o" + style, color=f"C{2 * n}", label=f"{tag}all structures, mean")
        ax.plot(h, [r["compact_mean_mm"] for r in pts], "s" + style, color=f"C{2 * n + 1}",
                label=f"{tag}compact organs, mean")
    ax.axhline(10.0, color="grey", ls="--", lw=1, label="target: compact organs <= 10 mm (one atlas)")
    ax.set_xlabel("training, CPU-hours (cumulative, 1 thread)")
    ax.set_ylabel("error, mm (openkbp_inter dev pairs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="training run folder (with snapshots/)")
    ap.add_argument("--start", help="the model the run started from (e.g. the shipped default), plotted first")
    ap.add_argument("--start-cpu-hours", type=float, default=0.0, help="CPU-hours of training behind --start")
    ap.add_argument("--pairs", type=int, default=12, help="openkbp_inter cases used (the first N of the suite)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", help="the shared data folder (default ../shared/data)")
    ap.add_argument("--out", help="also copy curve.json and curve.png here")
    ap.add_argument("--compare", nargs="*", default=[], metavar="RUN",
                    help="other run folders whose curve.json is drawn beside this run's (same axes, dashed)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        cases = build_openkbp_inter(tmp, args.data)[: args.pairs]
    options = MatchOptions()
    curve_file = run / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    done = {r["model"] for r in curve}
    todo = []
    if args.start and args.start not in done:
        todo.append((args.start, 0, args.start_cpu_hours))
    for snap in sorted((run / "snapshots").glob("it_*.pt")):
        if str(snap) not in done:
            ck = torch.load(snap, map_location="cpu", weights_only=True)
            hours = args.start_cpu_hours + float(ck.get("cpu_seconds_total", 0.0)) / 3600
            todo.append((str(snap), int(ck.get("iteration") or 0), hours))
    for model, iteration, hours in todo:
        row = {"model": model, "iteration": iteration, "cpu_hours": hours, **evaluate(model, cases, options)}
        curve.append(row)
        curve_file.write_text(json.dumps(curve, indent=2) + "\n", encoding="utf-8")
        print(f"{Path(model).name}: {hours:.2f} CPU-h, mean {row['mean_mm']:.1f} mm, compact {row['compact_mean_mm']:.1f} mm, "
              f"within 10 mm {100 * row['within_10mm']:.0f} %", flush=True)
    others = {Path(o).name: json.loads((Path(o) / "curve.json").read_text()) for o in args.compare
              if (Path(o) / "curve.json").is_file()}
    plot(curve, run / "curve.png", others, run.name)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name in ("curve.json", "curve.png"):
            shutil.copy(run / name, Path(args.out) / f"training_{run.name}_{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
