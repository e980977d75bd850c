#!/usr/bin/env python
"""Every dev suite against training time: the ship gate's numbers for each snapshot of a run (issue 13's lighter network).

``training_curve.py`` follows the between-patient error only. A distilled network (``objective: distill``) must keep
the same-patient accuracy too, so this runs each ``snapshots/it_NNNNNN.pt`` of a run folder through the gate's own
cases and presets (``samembed_bench.gate``: ``openkbp_inter`` between patients, ``popi_synthetic`` and
``lidc_synthetic`` same patient) and compares it with the shipped model. Each snapshot is first calibrated for int8
(``samembed quantize --config CONFIG``, the shipped model's procedure, its images excluded with ``--exclude``), so it
is measured in the arithmetic it would ship with. Results are cached per model as the gate caches them
(``cache/gate``), so a snapshot already gated (``model_gate.py``) is not matched again.

Writes ``<stem>.md`` (a row per snapshot: each suite's mean, and the gate's verdict), ``<stem>.json`` and
``<stem>.png`` (each suite's mean error against CPU-hours of training, the shipped model's level and the gate's
limits drawn across)::

    OMP_NUM_THREADS=1 python benchmarks/gate_curve.py runs/sam-lite-ct-half --config Resources/Models/sam-lite-ct-half.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.gate import SUITE_PRESETS, TOLERANCE_MM, TOLERANCE_REL, compare, model_offsets, verdict  # noqa: E402
from samembed_bench.suites import build_suites  # noqa: E402

from samembed.io import write_text_atomic  # noqa: E402
from samembed.quantize import qparams_path  # noqa: E402
from samembed.registry import checkpoint_header  # noqa: E402

#: the rows of :func:`samembed_bench.gate.compare` drawn and tabulated: (suite, structure group, short name)
SERIES = (("openkbp_inter", "compact organs", "openkbp compact"), ("openkbp_inter", "all", "openkbp all"),
          ("popi_synthetic", "all", "popi"), ("lidc_synthetic", "all", "lidc"))


def calibrate(snapshot: Path, config: str, exclude: list[str]) -> None:
    """Write the snapshot's int8 calibration beside it (``samembed quantize``), unless it is there."""
    if qparams_path(snapshot).is_file():
        return
    subprocess.run([sys.executable, "-m", "samembed.cli", "quantize", "--config", config, "--model", str(snapshot),
                    "--exclude", *exclude, "--quiet"], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO / "SAMEmbedding")})


def point(rows: list[dict], snapshot: Path | None, hours_before: float = 0.0) -> dict:
    """One curve point: the candidate's mean per series, CPU-hours (``hours_before`` plus the snapshot's own, from
    its header) and iteration."""
    means = {name: next(r["candidate_mean"] for r in rows if (r["suite"], r["group"]) == (s, g)) for s, g, name in SERIES}
    header = (checkpoint_header(snapshot) if snapshot is not None else None) or {}
    ok, reasons = verdict(rows)
    return {"snapshot": str(snapshot) if snapshot else None, "iteration": header.get("iteration"),
            "cpu_hours": hours_before + float(header.get("cpu_seconds_total", 0.0)) / 3600, "means": means, "ship": ok,
            "reasons": reasons}


def plot(points: list[dict], shipped: dict, png: Path, title: str) -> None:
    """Each series' mean error against CPU-hours, with the shipped model's level and the gate's limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    h = [p["cpu_hours"] for p in points]
    panels = ((axes[0], ("openkbp compact", "openkbp all"), "openkbp_inter (between patients)"),
              (axes[1], ("popi",), "popi_synthetic (same patient)"), (axes[2], ("lidc",), "lidc_synthetic (same patient)"))
    for ax, names, label in panels:
        for n, name in enumerate(names):
            ax.plot(h, [p["means"][name] for p in points], "o-", color=f"C{n}", label=f"candidate, {name}")
            ax.axhline(shipped[name], color=f"C{n}", ls=":", lw=1.2, label=f"shipped, {name}")
        if len(names) == 1:  # the gate's limit on a same-patient suite
            limit = shipped[names[0]] + max(TOLERANCE_MM, TOLERANCE_REL * shipped[names[0]])
            ax.axhline(limit, color="red", ls="--", lw=1, label=f"gate limit {limit:.2f} mm")
            ax.set_ylim(0, max(3 * limit, min(max(p["means"][names[0]] for p in points) * 1.05, 10 * limit)))
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training, CPU-hours (1 thread)")
        ax.set_ylabel("mean error, mm")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def report(points: list[dict], shipped: dict, run: str, command: str) -> str:
    """The markdown table."""
    lines = [f"# Gate curve: the snapshots of `{run}` on every dev case, against the shipped model", "",
             f"Command: `{command}`. Each snapshot calibrated for int8 first (`samembed quantize`), matched with each "
             "suite's preset as `benchmarks/model_gate.py` does; mean error in mm; `ship` is the gate's verdict "
             "(lower between patients, within max(0.1 mm, 5 %) on each same-patient suite).", "",
             "| snapshot | iteration | CPU-hours | openkbp compact | openkbp all | popi | lidc | ship |",
             "|---|---:|---:|---:|---:|---:|---:|---|",
             "| shipped model | | | " + " | ".join(f"{shipped[n]:.2f}" for _, _, n in SERIES) + " | |"]
    for p in points:
        lines.append(f"| `{Path(p['snapshot']).name}` | {p['iteration']} | {p['cpu_hours']:.2f} | "
                     + " | ".join(f"{p['means'][n]:.2f}" for _, _, n in SERIES) + f" | {'yes' if p['ship'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="training run folder (with snapshots/)")
    ap.add_argument("--config", required=True, help="the run's training config (its data, for the int8 calibration)")
    ap.add_argument("--exclude", nargs="*", default=["LIDC-IDRI-0001*"],
                    help="calibration images to leave out (default: the lidc_synthetic cases' image)")
    ap.add_argument("--cpu-hours-before", type=float, default=0.0,
                    help="CPU-hours of training before the run (a run started from another run's snapshot)")
    ap.add_argument("--shipped", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--suite-dir", default=str(REPO / "cache" / "suites"))
    ap.add_argument("--cache", default=str(REPO / "cache" / "gate"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--stem", default=None, help="report name (default: gate_curve_<run folder name>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    snapshots = sorted((run / "snapshots").glob("it_*.pt"))
    if not snapshots:
        print(f"error: {run / 'snapshots'}: no snapshots (set snapshot_every in the training config)", file=sys.stderr)
        return 2
    files = build_suites(args.suite_dir, list(SUITE_PRESETS))
    cases = [c for s in SUITE_PRESETS for c in read_cases(files[s])]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    _, base = model_offsets(args.shipped, cases, cache)
    shipped = {name: next(r["shipped_mean"] for r in compare(cases, base, base) if (r["suite"], r["group"]) == (s, g))
               for s, g, name in SERIES}
    points = []
    for snap in snapshots:
        calibrate(snap, args.config, args.exclude)
        _, cand = model_offsets(str(snap), cases, cache)
        points.append(point(compare(cases, base, cand), snap, args.cpu_hours_before))
        print(f"{snap.name}: " + ", ".join(f"{k} {v:.2f} mm" for k, v in points[-1]["means"].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"gate_curve_{run.name}"
    command = "python benchmarks/gate_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_text_atomic(out / f"{stem}.json", json.dumps({"shipped": shipped, "points": points}, indent=1))
    plot(points, shipped, out / f"{stem}.png", f"{run.name}: every dev suite against training time")
    path = write_text_atomic(out / f"{stem}.md", report(points, shipped, str(run), command) + f"\n![curve]({stem}.png)\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
