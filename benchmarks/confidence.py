"""How far the ``confident`` flag can be trusted: its precision and recall against the error, per suite.

Every case of the landmark suites (``popi_synthetic``, ``openkbp_inter``, ``lidc_synthetic``; built into
``cache/suites`` when missing) is matched with the engine's defaults. A match is *wrong* when its error exceeds
``--wrong-mm`` (10 mm). Reported per suite and overall:

- precision: of the matches flagged confident, the share that are right;
- recall: of the right matches, the share flagged confident;
- wrong caught: of the wrong matches, the share flagged *not* confident.

    python benchmarks/confidence.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from samembed_bench.cases import read_cases
from samembed_bench.suites import SUITE_NAMES, build_suites

from samembed import Matcher, MatchOptions


def rates(rows: list[dict], wrong_mm: float) -> dict:
    err = np.array([r["error_mm"] for r in rows])
    conf = np.array([r["confident"] for r in rows], dtype=bool)
    right = err <= wrong_mm

    def share(a, b):
        return float(np.sum(a & b) / np.sum(b)) if np.sum(b) else float("nan")

    return {"points": int(len(err)), "mean_error_mm": float(err.mean()), "median_error_mm": float(np.median(err)),
            "confident": int(conf.sum()), "right": int(right.sum()),
            "precision": share(right, conf), "recall": share(conf, right), "wrong_caught": share(~conf, ~right)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--suites", default=",".join(SUITE_NAMES))
    ap.add_argument("--cases-dir", default="cache/suites")
    ap.add_argument("--wrong-mm", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    suites = [s for s in args.suites.split(",") if s]
    files = build_suites(args.cases_dir, suites)
    matcher = Matcher(args.model, device="cpu")
    options = MatchOptions()
    rows, t0 = [], time.time()
    for suite in suites:
        for case in read_cases(files[suite]):
            res = matcher.match(str(case.source), case.query_points_lps_mm, [str(case.target)], list(case.labels), options)
            for m, truth in zip(res.matches, case.truth_points_lps_mm):
                rows.append({"suite": suite, "case": case.case_id, "error_mm": float(np.linalg.norm(m.point_lps_mm - truth)),
                             "confident": bool(m.confident), "roundtrip_mm": float(m.roundtrip_mm)})
            matcher.clear_cache()
        print(f"{suite}: {rates([r for r in rows if r['suite'] == suite], args.wrong_mm)}", flush=True)
    report = {"command": f"python benchmarks/confidence.py --model {args.model} --suites {args.suites} --wrong-mm {args.wrong_mm:g}",
              "minutes": (time.time() - t0) / 60, "wrong_mm": args.wrong_mm,
              "suites": {s: rates([r for r in rows if r["suite"] == s], args.wrong_mm) for s in suites},
              "all": rates(rows, args.wrong_mm)}
    lines = [f"# Confidence flag against the error (a match is wrong above {args.wrong_mm:g} mm)", "",
             f"Command: `{report['command']}` ({report['minutes']:.1f} min, 2-core CPU shared with other jobs); engine "
             "defaults (prior window, polish, polished round trip).", "",
             "| suite | points | mean / median error mm | confident | right | precision | recall | wrong caught |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in [*report["suites"].items(), ("all", report["all"])]:
        lines.append(f"| {name} | {r['points']} | {r['mean_error_mm']:.1f} / {r['median_error_mm']:.1f} | "
                     f"{r['confident']} | {r['right']} | {100 * r['precision']:.0f} % | "
                     f"{100 * r['recall']:.0f} % | {100 * r['wrong_caught']:.0f} % |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "confidence.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "confidence.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
