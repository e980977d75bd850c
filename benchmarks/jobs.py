"""Targets matched at once (``samembed match --jobs``) against one at a time, on one atlas into many cold targets.

Each run is ``cold_start.py``'s child: one fresh ``samembed match`` process with no cache and the command's own
prefetch, from the OpenKBP atlas pt_215 (its organ centroids) into the first ``--targets`` other OpenKBP CTs. The
runs with ``--jobs 1`` and ``--jobs 2`` alternate, ``--reps`` times each, at ``--threads`` of torch's threads (2 by
default: this machine's cores, as a new user runs the command). The report gives each way's median process time,
the time per target (from the first target's start to the writing, over the targets; and over the targets after the
first, which embeds the source's tiles), the peak RSS, and whether the two ways wrote the same table byte for byte.
With ``--elastix K`` it also times elastix affine + B-spline (``cold_start.py elastix``) from the atlas into its
first K targets with the same threads, for the ratio per target.

Usage (from the repository root)::

    PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/jobs.py --out benchmarks/results/jobs_atlas.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATLAS = "pt_215"


def _openkbp() -> Path:
    from samembed_bench.suites import data_root

    folder = data_root() / "ct" / "openkbp" / "ct"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: this benchmark reads the OpenKBP CTs of ../shared/data")
    return folder


def atlas_and_targets(n_targets: int, work: Path) -> tuple[Path, list[Path], Path]:
    """The atlas's CT, the first ``n_targets`` other OpenKBP CTs (by name) and the atlas's organ centroids written to
    ``work/atlas_points.csv``."""
    from cold_start import _write_points
    from samembed_bench.suites import data_root, read_openkbp_centroids

    folder = _openkbp()
    cents = read_openkbp_centroids(data_root())[ATLAS]
    labels = sorted(cents)
    points = work / "atlas_points.csv"
    _write_points(points, labels, [cents[k] for k in labels])
    targets = sorted(p for p in folder.glob("pt_*_ct.nii.gz") if not p.name.startswith(f"{ATLAS}_"))[:n_targets]
    return folder / f"{ATLAS}_ct.nii.gz", targets, points


def one_run(jobs: int, atlas: Path, targets: list[Path], points: Path, out: Path) -> dict:
    """One cold ``samembed match --jobs jobs`` (torch's threads: ``OMP_NUM_THREADS``, which :func:`main` sets): process
    seconds, peak RSS (GB), the seconds per target from the first target's start to the writing (over all targets,
    and over those after the first) and the table written."""
    from cold_start import run_child

    r = run_child(str(atlas), [str(t) for t in targets], str(points), str(out), ["--jobs", str(jobs)])
    marks = r["per_target_s"]  # between consecutive target starts (in the order they started), then the writing
    return {"process_s": r["process_s"], "peak_rss_gb": r["peak_rss_gb"],
            "per_target_s": sum(marks) / len(targets), "later_s": sum(marks[1:]) / (len(targets) - 1),
            "table": out.read_bytes()}


def elastix_runs(atlas: Path, targets: list[Path], points: Path, work: Path, threads: int) -> list[float]:
    """elastix's registration seconds (imports and reading excluded) from the atlas into each of ``targets``."""
    env = {**os.environ, "SAMEMBED_ELASTIX_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    seconds = []
    for t in targets:
        js = work / f"elastix_{t.name}.json"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "cold_start.py"), "elastix", str(atlas), str(t),
                        "--points", str(points), "--json", str(js)], check=True, env=env)
        seconds.append(json.loads(js.read_text())["registration_s"])
    return seconds


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(runs: dict[int, list[dict]], n_targets: int, threads: int, elastix: list[float], started: str) -> str:
    """The markdown report of the runs (each way's runs) and elastix's registrations."""
    from cold_start import checkout_commit

    same = len({r["table"] for rs in runs.values() for r in rs}) == 1
    lines = [
        "# Targets matched at once: `samembed match --jobs`", "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores; engine `{checkout_commit()}`; started {started}, ended "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One atlas ({ATLAS}, its organ centroids) into "
        f"{n_targets} other OpenKBP CTs, each run a fresh `samembed match` process with no cache (the command's "
        f"prefetch process as usual), torch on {threads} thread(s), model `default`; the two ways alternate, "
        f"{len(runs[1])} runs each: the median, with the range of the runs. Command: "
        f"`PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/jobs.py --targets {n_targets} --threads {threads}`.",
        "",
        "`per target`: from the first target's start to the writing, over the targets; `after the first`: the same "
        "over the targets after the first (the first also embeds the source's tiles and runs alone).", "",
        "| --jobs | process s | per target s | after the first s | peak RSS GB |",
        "|---:|---:|---:|---:|---:|"]
    for jobs, rs in runs.items():
        lines.append(f"| {jobs} | {_cell([r['process_s'] for r in rs])} | {_cell([r['per_target_s'] for r in rs])} | "
                     f"{_cell([r['later_s'] for r in rs])} | {_cell([r['peak_rss_gb'] for r in rs])} |")
    one, two = (statistics.median([r["per_target_s"] for r in runs[j]]) for j in (1, 2))
    lines += ["", f"Two at once: **{one / two:.2f}x** per target (medians). The tables written: "
              f"{'the same, byte for byte, in every run' if same else 'NOT the same'}."]
    if elastix:
        e = statistics.mean(elastix)
        lines += ["", f"elastix affine + B-spline (`samembed_bench.registration` settings, {threads} thread(s), imports "
                      f"and reading excluded) from the atlas into its first {len(elastix)} targets: "
                      f"{', '.join(f'{s:.1f}' for s in elastix)} s, mean {e:.1f} s; so per target "
                      f"{e / one:.1f}x with `--jobs 1` and **{e / two:.1f}x** with `--jobs 2` "
                      f"({e / statistics.median([r['later_s'] for r in runs[2]]):.1f}x after the first)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, default=20, help="OpenKBP CTs the atlas is matched into")
    p.add_argument("--reps", type=int, default=3, help="runs of each way")
    p.add_argument("--threads", type=int, default=2, help="torch's threads (and elastix's)")
    p.add_argument("--elastix", type=int, default=2, metavar="K", help="elastix registrations to time (0: none)")
    p.add_argument("--work", default=str(REPO / "cache" / "jobs"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "jobs_atlas.md"))
    args = p.parse_args(argv)
    from cold_start import byte_compile

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every SAM child's torch threads (run_child passes it on)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    byte_compile()
    atlas, targets, points = atlas_and_targets(args.targets, work)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(args.reps):
        for jobs in (1, 2)[:: 1 if rep % 2 == 0 else -1]:
            r = one_run(jobs, atlas, targets, points, work / f"jobs{jobs}_{rep}.csv")
            runs[jobs].append(r)
            print(f"--jobs {jobs}: {r['process_s']:.1f} s, {r['per_target_s']:.2f} s per target, "
                  f"{r['peak_rss_gb']:.2f} GB", flush=True)
    elastix = elastix_runs(atlas, targets[:args.elastix], points, work, args.threads) if args.elastix else []
    Path(args.out).write_text(report(runs, len(targets), args.threads, elastix, started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
