#!/usr/bin/env python
"""Ship gate for a new default CT model: a candidate against the shipped model on every case of the dev suites.

Issue 14 ships a new default only when it beats the current one on the dev suites and loses on none. This
benchmark runs both models with the settings a user gets for each suite and writes one side-by-side report:

- ``openkbp_inter`` (organ centroids between different patients) with the ``between-patients`` preset; judged on
  the compact organs (brainstem, parotids, mandible) and on all structures;
- ``popi_synthetic`` and ``lidc_synthetic`` (same patient, warped) with the ``same-patient`` preset.

Verdict, written into the report:

- *beats*: on ``openkbp_inter`` both the compact-organ mean and the all-structures mean are lower;
- *loses on none*: on every suite the candidate's mean is at most the shipped mean + max(0.1 mm, 5 %).

The paired difference (candidate - shipped, per point) is given with a 95 % bootstrap interval (whole cases drawn:
the points of a pair share its offset), so a win that is
within noise shows as such. Results per (model, suite, case) are cached in ``--cache`` (a model id carries its
weights' hash), so the shipped model's side is computed once.

    OMP_NUM_THREADS=1 python benchmarks/model_gate.py runs/sam-lite-ct-v3-semantic/snapshots/it_001000.pt

A default *setting* is gated the same way: ``--set KEY=VALUE`` changes a match option for the candidate only,
on top of each suite's preset (``python benchmarks/model_gate.py default --set prior_window_mm=30``).

An *engine* change is gated with ``--base-engine REV``: the candidate model matched by the engine of commit ``REV``
(checked out beside the repository with ``git worktree``, in ``cache/gate_base/``, and run there in a process of its
own) against the same model matched by this checkout's engine. Its verdict is issue 13's: every suite's mean error
within 0.1 mm of the base engine's (``python benchmarks/model_gate.py default --base-engine 72a40e4``).

The hand radiographs are matched by the separate 2D model, which a CT candidate does not change.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.gate import (  # noqa: E402
    SUITE_PRESETS,
    compare,
    engine_id,
    engine_verdict,
    model_offsets,
    options_tag,
    verdict,
)
from samembed_bench.suites import build_suites  # noqa: E402

from samembed.errors import InputError  # noqa: E402
from samembed.io import write_text_atomic  # noqa: E402


def base_engine_offsets(rev: str, model: str, model_id: str, args: argparse.Namespace) -> tuple[str, dict]:
    """The offsets of ``model`` (whose id, with its arithmetic, is ``model_id``) matched by the engine of commit
    ``rev`` (see the module docstring): the commit's ``model_gate.py`` runs in a checkout of it, in a process of its
    own, writing the shared ``--cache``; returns ``(the model id with the commit, offsets per case key)``."""
    import json
    import os
    import subprocess

    import numpy as np
    from cold_ab import _worktree

    folder = _worktree(rev, REPO / "cache" / "gate_base")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(folder / d) for d in ("SAMEmbedding", "benchmarks"))}
    cmd = [sys.executable, str(folder / "benchmarks" / "model_gate.py"), model, "--shipped", model, "--suites",
           args.suites, "--threads", str(args.threads), "--suite-dir", args.suite_dir, "--cache", args.cache,
           "--out", str(REPO / "cache" / "gate_base_reports"), *(["--data", args.data] if args.data else []),
           *(["--limit", str(args.limit)] if args.limit else [])]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    # the base engine's "auto" arithmetic may be another than this one's (an engine change that adds one): its
    # results then carry its own id, the model's id without this engine's arithmetic suffix
    base_engine = engine_id(folder / "SAMEmbedding" / "samembed")
    for mid in dict.fromkeys([model_id, model_id.split("__", 1)[0]]):
        path = Path(args.cache) / f"{mid.replace('/', '_')}__engine-{base_engine}.json"
        if path.is_file():
            break
    else:
        raise InputError(f"the engine of {rev} wrote no results for {model_id} into {args.cache} (another model "
                         "file or arithmetic there?)")
    done = json.loads(path.read_text(encoding="utf-8"))
    return f"{mid} (engine of {rev})", {k.rsplit("/", 1)[0]: np.asarray(v) for k, v in done.items()}


def report(rows: list[dict], ok: bool, reasons: list[str], models: tuple[str, str], command: str,
           engine_gate: bool = False) -> str:
    """The markdown report; ``engine_gate``: of ``--base-engine`` (one model under two engines)."""
    title = (f"Engine gate: `{models[1]}` against `{models[0]}`" if engine_gate
             else f"Model gate: `{models[1]}` against the shipped `{models[0]}`")
    lines = [f"# {title}", "",
             f"- date: {dt.datetime.now():%Y-%m-%d %H:%M}", f"- command: `{command}`",
             "- settings per suite: " + ", ".join(f"{s} `{SUITE_PRESETS[s]}`" for s in dict.fromkeys(r["suite"] for r in rows)),
             f"- verdict: **{'ship' if ok else 'do not ship'}**", *[f"  - {r}" for r in reasons], "",
             "| suite | structures | points | shipped mean mm | candidate mean mm | shipped median | candidate median "
             "| shipped ≤ 10 mm | candidate ≤ 10 mm | paired diff mm (95 % CI) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, hi = r["diff_ci"]
        lines.append(f"| {r['suite']} | {r['group']} | {r['points']} | {r['shipped_mean']:.2f} | "
                     f"{r['candidate_mean']:.2f} | {r['shipped_median']:.2f} | {r['candidate_median']:.2f} | "
                     f"{100 * r['shipped_within_10']:.0f} % | {100 * r['candidate_within_10']:.0f} % | "
                     f"{r['diff_mean']:+.2f} ({lo:+.2f} .. {hi:+.2f}) |")
    lines += ["", "Mean absolute offset from the truth along each axis, mm (L-R / A-P / S-I), shipped → candidate:", ""]
    lines += [f"- {r['suite']}, {r['group']}: " + ", ".join(
        f"{axis} {s:.1f} → {c:.1f}" for axis, s, c in zip(("L-R", "A-P", "S-I"), r["shipped_axes"], r["candidate_axes"]))
        for r in rows]
    return "\n".join(lines) + "\n"


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as match-option overrides (VALUE as JSON when it parses, else as text), checked
    against :class:`samembed.MatchOptions`."""
    import json

    from samembed import MatchOptions

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. prior_window_mm=30")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    MatchOptions().replace(**out)  # unknown names and bad values fail here, before any case runs
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidate", help="candidate checkpoint (.pt) or model name")
    ap.add_argument("--shipped", default="default", help="the model to beat (default: the shipped default)")
    ap.add_argument("--suites", default=",".join(SUITE_PRESETS), help="comma-separated dev suites")
    ap.add_argument("--limit", type=int, default=None, help="at most N cases per suite (a quick look, not a gate)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", help="the shared data folder (default ../shared/data)")
    ap.add_argument("--suite-dir", default=str(REPO / "cache" / "suites"))
    ap.add_argument("--cache", default=str(REPO / "cache" / "gate"), help="per-model results (not committed)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--stem", default=None, help="report name (default: gate_<candidate name>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a match option changed for the candidate only (repeatable), e.g. prior_window_mm=30")
    ap.add_argument("--base-engine", metavar="REV", help="gate this checkout's engine against commit REV's, both "
                    "matching the candidate model (see the module docstring)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(args.threads)
    try:
        overrides = parse_overrides(args.set)
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        unknown = [s for s in suites if s not in SUITE_PRESETS]
        if unknown:
            raise InputError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITE_PRESETS)}")
        files = build_suites(args.suite_dir, suites, data=args.data)
        cases = [c for s in suites for c in read_cases(files[s])[: args.limit]]
        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        if args.base_engine and overrides:
            raise InputError("--base-engine gates the engine with each suite's preset; leave out --set")
        cand_id, cand = model_offsets(args.candidate, cases, cache, overrides)
        base_id, base = (base_engine_offsets(args.base_engine, args.candidate, cand_id, args) if args.base_engine
                         else model_offsets(args.shipped, cases, cache))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = compare(cases, base, cand)
    ok, reasons = engine_verdict(rows) if args.base_engine else verdict(rows)
    if args.base_engine:
        cand_id += " (this engine)"
    command = "python benchmarks/model_gate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, ok, reasons, (base_id, cand_id), command, engine_gate=bool(args.base_engine))
    if args.limit:
        text = text.replace("- verdict:", f"- only the first {args.limit} cases per suite: not a gate\n- verdict:")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_text_atomic(out / f"{args.stem or f'gate_{Path(args.candidate).stem}{options_tag(overrides)}'}.md", text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
