#!/usr/bin/env python
"""Objective ablation: train every objective with the same CPU budget, then evaluate each on the landmark suites.

Every variant starts from the default CT training config (``Resources/Models/sam-lite-ct-v2.yaml``: same data,
network, sampling and 2 mm grid) and changes only the objective. Each run gets the same budget of *process CPU
time* (``time_clock: cpu``, one thread), so runs that share a machine still get equal compute; the learning-rate
schedule follows the same budget. Checkpoints go to ``runs/ablation/<variant>/`` (not committed); a variant whose
checkpoint exists is not retrained.

Evaluation is the ``sam`` method (``MatchOptions`` defaults, no refinement, no polish) of the landmark benchmark on every case of ``popi_synthetic``,
``openkbp_inter`` and ``lidc_synthetic``. The table goes to ``benchmarks/results/ablation.md``.

Usage (from the repository root, ../shared/data beside it)::

    python benchmarks/ablation.py --cpu-minutes 12 --jobs 2
    python benchmarks/ablation.py --variants sam,isimed --cpu-minutes 1 --suites popi_synthetic   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.metrics import summarise  # noqa: E402
from samembed_bench.runner import run_cases  # noqa: E402
from samembed_bench.suites import SUITE_NAMES, build_suites  # noqa: E402

from samembed.options import MatchOptions  # noqa: E402

log = logging.getLogger("ablation")

#: variant name -> (objective, extra settings). "pruner" is Adam's purposive pruner inside SAM's local loss.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "sam": ("sam", []),
    "isimed": ("isimed", []),
    "adam": ("adam", []),
    "sal": ("sal", []),
    "sam+isimed": ("sam+isimed:0.5", []),
    "sam+pruner": ("sam", ["pruner_threshold=0.8"]),
    "sam+sal": ("sam+sal:0.5", []),
}


RUNS = REPO / "runs" / "ablation"

#: the base match settings of the evaluation: the defaults (the ``sam`` method then turns refine and polish off)
EVAL_OPTIONS = MatchOptions()


def _run_dir(variant: str) -> Path:
    return RUNS / variant.replace("+", "_")


def _checkpoint(variant: str) -> Path:
    return _run_dir(variant) / "model.pt"


def train_command(variant: str, config: Path, cpu_minutes: float) -> list[str]:
    """The ``samembed train`` command line of one variant."""
    objective, extra = VARIANTS[variant]
    sets = [f"objective={objective}", "name=model", f"out_dir={_run_dir(variant)}", f"time_limit_min={cpu_minutes}",
            "time_clock=cpu", "schedule_by_time=true", "threads=1", "iterations=100000", "checkpoint_every=100000",
            *extra]
    return [sys.executable, "-m", "samembed.cli", "train", "--config", str(config), "--set", *sets]


def train_all(variants: list[str], config: Path, cpu_minutes: float, jobs: int) -> None:
    """Train the variants that have no checkpoint yet, ``jobs`` at a time, each on one thread."""
    todo = [v for v in variants if not _checkpoint(v).is_file()]
    running: list[tuple[str, subprocess.Popen, object]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO / "SAMEmbedding") + os.pathsep + env.get("PYTHONPATH", "")
    while todo or running:
        while todo and len(running) < jobs:
            v = todo.pop(0)
            _run_dir(v).mkdir(parents=True, exist_ok=True)
            fh = open(_run_dir(v) / "train.log", "w", encoding="utf-8")  # noqa: SIM115 - the training process writes it
            cmd = train_command(v, config, cpu_minutes)
            log.info("training %s: %s", v, " ".join(cmd))
            running.append((v, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT), fh))
        time.sleep(5)
        for item in list(running):
            v, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                running.remove(item)
                if proc.returncode != 0 or not _checkpoint(v).is_file():
                    log.error("training %s failed (exit %s); see %s", v, proc.returncode, _run_dir(v) / "train.log")
                else:
                    log.info("trained %s", v)


def training_stats(variant: str) -> dict:
    """Iterations, CPU minutes and wall minutes of a finished run (from its log)."""
    rows = (_run_dir(variant) / "train_log.csv").read_text(encoding="utf-8").strip().splitlines()
    head, last = rows[0].split(","), rows[-1].split(",")
    rec = dict(zip(head, last))
    first = dict(zip(head, rows[1].split(","))) if len(rows) > 1 else rec
    cpu = float(rec.get("cpu_seconds", "nan")) - float(first.get("cpu_seconds", "nan"))
    return {"iterations": int(rec["iteration"]), "wall_min": float(rec["seconds"]) / 60, "cpu_min": cpu / 60}


def evaluate(variants: list[str], suites: list[str], suite_dir: Path) -> dict:
    """Run the ``sam`` method of every variant on every suite; returns {variant: {suite: summary dict}}."""
    files = build_suites(suite_dir, suites)
    cases = [c for s in suites for c in read_cases(files[s])]
    out = {}
    for v in variants:
        if not _checkpoint(v).is_file():
            log.error("%s has no checkpoint; skipped", v)
            continue
        t0 = time.time()
        results = run_cases(cases, ["sam"], model=str(_checkpoint(v)), options=EVAL_OPTIONS)
        out[v] = {}
        for s in suites:
            rs = [r for r in results if r.suite == s]
            summ = summarise(np.concatenate([r.errors_mm for r in rs]), [r.seconds for r in rs])
            out[v][s] = summ.__dict__
        log.info("evaluated %s in %.0f s: %s", v, time.time() - t0,
                 ", ".join(f"{s} {out[v][s]['mean_mm']:.1f} mm" for s in suites))
    return out


def write_table(scores: dict, suites: list[str], cpu_minutes: float, path: Path, command: str) -> str:
    """Markdown table: per suite mean error, P90, % within 10 mm; plus the training iterations and time."""
    lines = [
        "# Objective ablation", "",
        f"- date: {dt.datetime.now():%Y-%m-%d %H:%M}",
        f"- budget: {cpu_minutes:g} min of process CPU time per objective, one thread, same data, network, "
        "sampling and 2 mm grid as the default CT model (`Resources/Models/sam-lite-ct-v2.yaml`)",
        "- evaluation: `sam` method (affine-prior window, no refinement, no polish), every case "
        "of each suite; errors in mm",
        f"- command: `{command}`", "",
    ]
    head = "| objective | iterations | CPU min | wall min |"
    rule = "|---|---:|---:|---:|"
    for s in suites:
        head += f" {s} mean | {s} P90 | {s} ≤10 mm |"
        rule += "---:|---:|---:|"
    lines += [head, rule]
    for v, per in scores.items():
        st = training_stats(v)
        row = f"| {v} (`{VARIANTS[v][0]}`{', ' + ', '.join(VARIANTS[v][1]) if VARIANTS[v][1] else ''}) | " \
              f"{st['iterations']} | {st['cpu_min']:.1f} | {st['wall_min']:.1f} |"
        for s in suites:
            m = per[s]
            row += f" {m['mean_mm']:.1f} | {m['p90_mm']:.1f} | {m['within_10mm_pct']:.0f} % |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(json.dumps(scores, indent=1), encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    global RUNS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--cpu-minutes", type=float, default=12.0, help="process CPU minutes per objective")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (each uses one thread)")
    p.add_argument("--config", default=str(REPO / "Resources" / "Models" / "sam-lite-ct-v2.yaml"))
    p.add_argument("--suites", default=",".join(SUITE_NAMES))
    p.add_argument("--suite-dir", default=str(REPO / "cache" / "suites"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ablation.md"))
    p.add_argument("--runs", default=str(RUNS), help="where the trained variants go (not committed)")
    p.add_argument("--skip-training", action="store_true", help="only evaluate existing checkpoints")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="write the table from scores saved by earlier (e.g. parallel) runs instead of evaluating")
    args = p.parse_args(argv)
    RUNS = Path(args.runs).resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    if not args.skip_training:
        train_all(variants, Path(args.config), args.cpu_minutes, args.jobs)
    import torch

    torch.set_num_threads(max(1, args.jobs))
    if args.from_json:
        scores = {}
        for f in args.from_json:
            scores.update(json.loads(Path(f).read_text(encoding="utf-8")))
        scores = {v: scores[v] for v in VARIANTS if v in scores}
        suites = [s for s in suites if all(s in per for per in scores.values())]
    else:
        scores = evaluate(variants, suites, Path(args.suite_dir))
    command = "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_table(scores, suites, args.cpu_minutes, Path(args.out), command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
