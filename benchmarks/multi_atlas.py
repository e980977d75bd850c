"""Multi-atlas fusion on OpenKBP organ centroids between different patients (issue 14's fusion target).

For each target patient of the OpenKBP validation split, K other validation patients are the atlases (seeded
choice among those sharing the most contoured organs); every organ centroid present in the target and in all
K atlases is matched from each atlas alone and from all K fused (``Matcher.match_atlases``). Errors are the
distances (mm) to the target's own centroid. Compact organs (brainstem, parotids, mandible) are reported apart:
tubular structures cut by the field of view have no well-defined centroid.

    python benchmarks/multi_atlas.py --atlases 5 --targets 12 --out benchmarks/results

Writes ``multi_atlas.md`` (and ``multi_atlas.json``, ``multi_atlas_rows.csv``) to ``--out``. ``--report ROWS.csv``
writes the report again from a run's rows (no matching).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from samembed_bench.suites import STRUCTURE_GROUPS, data_root, read_openkbp_centroids

from samembed import Atlas, Matcher, MatchOptions


def summary(errors: list[float]) -> dict:
    e = np.asarray(errors, dtype=np.float64)
    if len(e) == 0:
        return {"n": 0}
    return {"n": int(len(e)), "mean": float(e.mean()), "median": float(np.median(e)), "p90": float(np.percentile(e, 90)),
            "within_10mm": float(np.mean(e <= 10.0))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlases", type=int, default=5, help="atlases per target (K)")
    ap.add_argument("--targets", type=int, default=12, help="target patients (the first N of a seeded order)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="the shared data folder (default ../shared/data)")
    ap.add_argument("--no-polish", action="store_true", help="match without the intensity polish")
    ap.add_argument("--refine", action="store_true", help="match with the local cycle-consistent refinement")
    ap.add_argument("--stem", default="multi_atlas", help="report file name stem")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report", metavar="ROWS_CSV", help="write the report again from a run's rows CSV (no matching)")
    args = ap.parse_args()
    if args.report:
        old = json.loads(Path(args.report.replace("_rows.csv", ".json")).read_text(encoding="utf-8"))
        with open(args.report, newline="", encoding="utf-8") as fh:
            write_report(list(csv.DictReader(fh)), old["command"], old["seconds"], Path(args.out), args.stem, False)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    root = data_root(args.data)
    cents = read_openkbp_centroids(root)
    patients = sorted(p for p in cents if (root / f"ct/openkbp/ct/{p}_ct.nii.gz").is_file())
    rng = np.random.default_rng([args.seed, 14])
    order = [patients[i] for i in rng.permutation(len(patients))]
    options = MatchOptions(polish=not args.no_polish, refine=args.refine)
    matcher = Matcher(args.model, device="cpu")
    rows, t0 = [], time.time()
    for target in order[: args.targets]:
        others = [p for p in patients if p != target]
        rng_t = np.random.default_rng([args.seed, int(target.split("_")[1])])
        others = sorted(others, key=lambda p: (-len(set(cents[p]) & set(cents[target])), rng_t.random()))
        chosen = others[: args.atlases]
        labels = [s for s in cents[target] if all(s in cents[a] for a in chosen)]
        if not labels:
            continue
        atlases = [Atlas(str(root / f"ct/openkbp/ct/{a}_ct.nii.gz"), np.array([cents[a][s] for s in labels]),
                         tuple(labels), a) for a in chosen]
        tgt = str(root / f"ct/openkbp/ct/{target}_ct.nii.gz")
        truth = {s: cents[target][s] for s in labels}
        for a in atlases:
            res = matcher.match(a.image, a.points_lps_mm, [tgt], list(labels), options)
            for m in res.matches:
                rows.append({"method": "one atlas", "target": target, "atlas": a.name, "structure": m.label,
                             "error_mm": float(np.linalg.norm(m.point_lps_mm - truth[m.label])),
                             "confident": m.confident})
        fused = matcher.match_atlases(atlases, [tgt], options)
        for m in fused.matches:
            rows.append({"method": f"{args.atlases} atlases fused", "target": target, "atlas": "+".join(chosen),
                         "structure": m.label, "error_mm": float(np.linalg.norm(m.point_lps_mm - truth[m.label])),
                         "confident": m.confident, "agreeing": m.agreeing, "spread_mm": m.spread_mm})
        print(f"{target}: {len(labels)} organs, fused errors "
              + ", ".join(f"{r['structure']} {r['error_mm']:.1f}" for r in rows[-len(labels):]), flush=True)
    seconds = time.time() - t0
    command = "python benchmarks/multi_atlas.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, True)) \
        + (" --no-polish" if args.no_polish else "") + (" --refine" if args.refine else "")
    write_report(rows, command, seconds, Path(args.out), args.stem, write_rows=True)
    return 0


def write_report(rows: list[dict], command: str, seconds: float, out: Path, stem: str, write_rows: bool) -> None:
    """The markdown and JSON reports (and the rows' CSV when ``write_rows``)."""
    out.mkdir(parents=True, exist_ok=True)
    methods = sorted({r["method"] for r in rows}, key=lambda m: m != "one atlas")
    report = {"command": command, "seconds": seconds, "results": {}}
    lines = ["# Multi-atlas fusion, OpenKBP organ centroids between different patients", "",
             f"Command: `{command}` ({seconds / 60:.1f} min; 2-core CPU shared with other jobs).", "",
             "`all but tubular` leaves out the spinal cord and the oesophagus, whose centroids depend on how far they "
             "were contoured (issue 14 reports them but leaves them out of its targets).", "",
             "| method | structures | n | mean mm | median mm | P90 mm | within 10 mm |", "|---|---|---:|---:|---:|---:|---:|"]
    for method in methods:
        for name, wanted in STRUCTURE_GROUPS:
            errs = [float(r["error_mm"]) for r in rows if r["method"] == method and wanted(r["structure"])]
            s = summary(errs)
            report["results"][f"{method} / {name}"] = s
            if s["n"]:
                lines.append(f"| {method} | {name} | {s['n']} | {s['mean']:.1f} | {s['median']:.1f} | {s['p90']:.1f} | "
                             f"{100 * s['within_10mm']:.0f} % |")
    lines += ["", "Per structure (mean mm): " + "; ".join(
        f"{method}: " + ", ".join(
            f"{st} {np.mean([float(r['error_mm']) for r in rows if r['method'] == method and r['structure'] == st]):.1f}"
            for st in sorted({r['structure'] for r in rows})) for method in methods), ""]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if write_rows:
        with (out / f"{stem}_rows.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
