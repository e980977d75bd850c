"""Propagation benchmark: scans per minute with 1 and 2 local Dask workers, the per-scan cost and where it goes.

Usage (from the repository root, with ../shared/data beside it)::

    OMP_NUM_THREADS=1 python benchmarks/propagate.py [--model default] [--scans 10] [--workers 1,2] \
        [--out benchmarks/results/propagate.md]

The atlas is OpenKBP pt_201 with its 7 organ centroids (``oar_centroids.csv``); the scans are the next OpenKBP
CTs (128^3, about 4 x 4 x 2.5 mm). Each worker count is one ``samembed.propagate.propagate`` run into a fresh
folder with a fresh embedding cache (so the atlas is embedded once per run, as in real use), default match
options, thumbnails and the report on. Reported per run:

- wall time of each phase (cluster start, atlas, scans, report) and scans per minute in the scan phase;
- mean per-scan task time split into reading, embedding, matching (search, polish, round trip) and thumbnails,
  from the records the workers return; the client's time writing each scan's files;
- worker efficiency: the summed task time over (workers x scan-phase wall time) -- what the scheduler, the
  transfer of results and idle waiting cost;
- peak resident memory per worker, and the bytes written per scan.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))
OPENKBP = DATA / "ct" / "openkbp"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_once(model: str, workers: int, atlas, scans, root: Path) -> dict:
    """One propagation run; its timings, throughput, memory and output sizes."""
    from samembed.options import MatchOptions
    from samembed.propagate import PropagateSettings, propagate
    from samembed.propagate.results import ResultStore

    out = root / f"w{workers}"
    settings = PropagateSettings(model=model, device="cpu", workers=workers, progress=False)
    t0 = time.time()
    summary = propagate(atlas, scans, out, MatchOptions(), settings)
    wall = time.time() - t0
    run = json.loads((out / "run.json").read_text())
    recs = [r for r in ResultStore(out).load().values() if r["status"] == "ok"]
    mean = {k: sum(r["timings"][k] for r in recs) / len(recs) for k in ("read_s", "embed_s", "match_s", "thumbnails_s", "total_s", "cpu_s")}
    ph = run["phases_s"]
    busy = sum(r["timings"]["total_s"] for r in recs)
    per_scan_out = (_folder_bytes(out / "scans") + _folder_bytes(out / "thumbs")) / max(len(recs), 1)
    return {
        "workers": workers, "scans": len(recs), "failed": summary.failed, "wall_s": wall,
        "start_s": ph["start"], "atlas_s": ph["prepare_atlas"], "scan_phase_s": ph["scans"], "report_s": ph.get("report", 0.0),
        "scans_per_min": 60.0 * len(recs) / ph["scans"], "mean": mean, "client_write_ms": 1000 * ph["client_writes"] / len(recs),
        "efficiency": busy / (workers * ph["scans"]), "peak_rss_gb": max(r["worker"].get("rss_bytes", 0) for r in recs) / 1e9,
        "out_kb_per_scan": per_scan_out / 1e3, "cache_mb": _folder_bytes(out / "cache") / 1e6,
        "report_mb": (out / "report.html").stat().st_size / 1e6, "model_id": run["model"]["id"],
        "versions": run["versions"]["workers"],
    }


def markdown(results: list[dict], args, n_scans: int, load_at_start: float | None = None) -> str:
    """The results as the markdown report (``load_at_start``: the 1-minute load average before the first run)."""
    one = {r["workers"]: r for r in results}
    lines = [
        (f"Propagation benchmark, CPU, {time.strftime('%Y-%m-%d')}; command: "
         f"`OMP_NUM_THREADS=1 python benchmarks/propagate.py --model {args.model} --scans {n_scans} --workers {args.workers}`"),
        "",
        (f"Machine: {os.cpu_count()} cores, 1-minute load average {'' if load_at_start is None else f'{load_at_start:.1f} at the start and '}"
         f"{os.getloadavg()[0]:.1f} at the end (the runs' own processes count in it); "
        f"python {platform.python_version()}, torch {results[0]['versions'].get('torch')}, dask "
        f"{results[0]['versions'].get('dask')}. Model `{results[0]['model_id']}`; atlas OpenKBP pt_201 with 7 organ "
        f"centroids; {n_scans} OpenKBP CTs (128^3, ~4 x 4 x 2.5 mm, embedded on the model's 2 mm grid); default "
        "match options (prior window, polish), thumbnails and report on. Local cluster: N worker processes, 1 thread each."),
        "",
        "| workers | scans | scans/min (scan phase) | cluster start s | atlas s | scan phase s | report s | total s | worker efficiency | peak RSS per worker GB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['workers']} | {r['scans']} | {r['scans_per_min']:.1f} | {r['start_s']:.1f} | {r['atlas_s']:.1f} | "
                     f"{r['scan_phase_s']:.1f} | {r['report_s']:.1f} | {r['wall_s']:.1f} | {100 * r['efficiency']:.0f} % | "
                     f"{r['peak_rss_gb']:.2f} |")
    lines += ["", "Where one scan's time goes (mean task time on a worker, seconds):", "",
              "| workers | read | embed | match (search + polish + round trip) | thumbnails | task total | task CPU | client writes ms/scan |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r["mean"]
        lines.append(f"| {r['workers']} | {m['read_s']:.2f} | {m['embed_s']:.2f} | {m['match_s']:.2f} | {m['thumbnails_s']:.2f} | "
                     f"{m['total_s']:.2f} | {m['cpu_s']:.2f} | {r['client_write_ms']:.0f} |")
    lines += ["", ("Task CPU is the worker process's CPU time per scan (one thread): unlike the wall times it hardly "
                   "depends on how many other jobs share the cores, so it is the per-scan cost to plan with.")]
    r0 = results[-1]
    lines += ["", (f"Output: {r0['out_kb_per_scan']:.0f} kB per scan (`.mrk.json`, record, 7 thumbnails); atlas embedding "
                   f"in the cache folder {r0['cache_mb']:.0f} MB; report {r0['report_mb']:.2f} MB for {r0['scans']} scans.")]
    if 1 in one and 2 in one:
        speedup = one[2]["scans_per_min"] / one[1]["scans_per_min"]
        lines += ["", f"Speed-up 1 -> 2 workers in the scan phase: {speedup:.2f} x (2 cores, each worker one thread)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--scans", type=int, default=10)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "propagate.md"))
    args = p.parse_args()
    if not (OPENKBP / "oar_centroids.csv").is_file():
        print(f"skipped: real data not available ({OPENKBP} is missing; set SAMEMBED_DATA)")
        return 0
    from samembed.propagate import Atlas, Scan

    load_at_start = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="propagate-bench-"))
    try:
        rows = [r for r in csv.DictReader((OPENKBP / "oar_centroids.csv").open()) if r["patient"] == "pt_201"]
        points = root / "atlas.csv"
        points.write_text("label,x,y,z\n" + "".join(f"{r['structure']},{r['x_mm']},{r['y_mm']},{r['z_mm']}\n" for r in rows))
        atlas = Atlas(str(OPENKBP / "ct" / "pt_201_ct.nii.gz"), str(points))
        paths = [OPENKBP / "ct" / f"pt_{n}_ct.nii.gz" for n in range(202, 260)]
        scans = [Scan(p.name.split(".")[0], str(p)) for p in paths if p.exists()][: args.scans]
        results = []
        for w in (int(v) for v in args.workers.split(",")):
            print(f"{w} worker(s), {len(scans)} scans ...", flush=True)
            r = run_once(args.model, w, atlas, scans, root)
            print(json.dumps({k: v for k, v in r.items() if k != "versions"}, default=float), flush=True)
            results.append(r)
        text = markdown(results, args, len(scans), load_at_start)
        Path(args.out).write_text(text)
        print(text)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
