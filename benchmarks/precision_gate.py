#!/usr/bin/env python
"""A faster precision against float32, on every ship-gate case (issue 13).

Runs the shipped model with each suite's preset twice, ``Matcher(precision="fp32")`` and the candidate,
``precision="int8"`` (the int8 local branch, :mod:`samembed.networks.int8`), ``"int8-int8"`` (also most of the global
branch in int8; the CPU default for the shipped models) or ``"int8-bf16"`` (the global branch in bfloat16 instead; the
CPU default where the CPU has native bfloat16 and the calibration lacks the global scales), one thread, and writes the paired comparison
per suite and organ group, the largest per-point change and each run's time. Per-case results are cached in
``cache/precision_gate/`` (not committed; a stopped run resumes)::

    OMP_NUM_THREADS=1 python benchmarks/precision_gate.py --candidate int8 --out benchmarks/results/precision_int8.md
    OMP_NUM_THREADS=1 python benchmarks/precision_gate.py --candidate int8-int8
    OMP_NUM_THREADS=1 python benchmarks/precision_gate.py --candidate int8-bf16

The rule (issue 13): accuracy unchanged, the same errors within 0.1 mm mean per suite.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))
sys.path.insert(0, str(REPO / "benchmarks"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.gate import SUITE_PRESETS, compare, model_offsets  # noqa: E402
from samembed_bench.suites import STRUCTURE_GROUPS, build_suites  # noqa: E402

from samembed.io import write_text_atomic  # noqa: E402

TOLERANCE_MM = 0.1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="precision_gate.py")
    p.add_argument("--candidate", choices=["int8", "int8-int8", "int8-bf16"],
                   help="default: what --precision auto runs on this CPU with the shipped model (int8-int8 when "
                        "its calibration has the global scales, else int8-bf16 with native bfloat16)")
    p.add_argument("--out", help="default: benchmarks/results/precision_<candidate>.md")
    args = p.parse_args(argv)
    from samembed.embedding import resolve_precision
    from samembed.models import load_model
    from samembed.networks.int8 import native_bf16

    cand = args.candidate or resolve_precision("auto", load_model("default"), torch.device("cpu"))
    if cand == "fp32":
        p.error("the shipped model has no int8 calibration here: nothing to compare with float32")
    if cand == "int8-bf16" and not native_bf16():
        p.error("this CPU has no native bfloat16 (AVX-512 BF16 or AMX): int8-bf16 cannot run here; use --candidate int8")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"precision_{cand.replace('-', '_')}.md")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    files = build_suites(str(REPO / "cache" / "suites"), list(SUITE_PRESETS))
    cases = [c for s in SUITE_PRESETS for c in read_cases(files[s])]
    runs, seconds = {}, {}
    for precision in ("fp32", cand):
        folder = REPO / "cache" / "precision_gate"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        runs[precision] = model_offsets("default", cases, folder, precision=precision)[1]
        seconds[precision] = time.perf_counter() - t0
    rows = compare(cases, runs["fp32"], runs[cand])
    what = {"int8": "the int8 local branch", "int8-int8": "the int8 local branch with the global branch in int8",
            "int8-bf16": "the int8 local branch with the global branch in bfloat16"}[cand]
    lines = [f"# {what[0].upper() + what[1:]} against float32 on the ship-gate cases", "",
             "The shipped model (`default`), each suite's preset, one thread; `Matcher(precision=\"fp32\")` against "
             f"`precision=\"{cand}\"` ({what}; int8 needs the model's calibration, "
             "`Resources/Models/sam-lite-ct.int8.json`, bfloat16 a CPU with native bfloat16; `auto` picks the fastest "
             f"that runs). Command: `OMP_NUM_THREADS=1 python benchmarks/precision_gate.py --candidate {cand}`. "
             f"Rule (issue 13): the same errors within {TOLERANCE_MM} mm mean per suite.", "",
             f"| suite | points | fp32 mean mm | {cand} mean mm | paired difference mm (95 % interval) | within 10 mm fp32 / {cand} "
             "| largest per-point change mm (whole suite) | verdict |",
             "|---|---:|---:|---:|---|---|---:|---|"]
    ok_all = True
    for r in rows:
        suite_cases = [c for c in cases if c.suite == r["suite"]]
        a = np.concatenate([np.linalg.norm(runs["fp32"][c.key], axis=1) for c in suite_cases])
        b = np.concatenate([np.linalg.norm(runs[cand][c.key], axis=1) for c in suite_cases])
        whole_suite = r["group"] == STRUCTURE_GROUPS[0][0]  # the rule reads each suite's "all" row
        ok = abs(r["diff_mean"]) <= TOLERANCE_MM if whole_suite else None
        ok_all &= ok is not False
        lo, hi = r["diff_ci"]
        lines.append(f"| {r['suite']} ({r['group']}) | {r['points']} | {r['shipped_mean']:.3f} | {r['candidate_mean']:.3f} "
                     f"| {r['diff_mean']:+.3f} ({lo:+.3f} .. {hi:+.3f}) | {100 * r['shipped_within_10']:.0f} / "
                     f"{100 * r['candidate_within_10']:.0f} % | {f'{np.abs(a - b).max():.2f}' if whole_suite else ''} | "
                     f"{'' if ok is None else 'same within 0.1 mm' if ok else 'CHANGED'} |")
    lines += ["", f"Time for the {len(cases)} cases (one thread; a resumed run counts only the cases it computed): "
              f"fp32 {seconds['fp32']:.0f} s, {cand} {seconds[cand]:.0f} s. Each case also reads, resamples, "
              "fits the prior, polishes and (between patients) refines, so the network is a small part of it; "
              "`benchmarks/cold_start.py` times the stages.", "",
              f"Verdict: {'accuracy unchanged' if ok_all else 'accuracy CHANGED'} by the rule above."]
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
