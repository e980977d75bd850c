"""A click into many targets through the Slicer module's logic: this engine against an earlier one, side by side.

What a clinician waits for after clicking a landmark with many scans chosen as targets, the module entered (its engine
process running with its model, ``MatchLogic.startEngine``), nothing prepared: from the click to every target's
matches in MRML. The source is ``first_click.py``'s first case's (pt_215, its left parotid and the next structure's
centroids: two points), the targets that case's three and then other OpenKBP patients by name. Each run is a fresh
process (``python benchmarks/click_targets.py child ...``) holding a real MRML scene (slicer-core) whose volumes
Slicer's own reader loaded (not timed), with the engine of the checkout it is given. The two engines alternate
(``cold_ab.py``'s order); both must give the same matches.

With ``--atlases K`` the job is multi-atlas fusion instead (``MatchLogic.matchAtlases``, its between-patients
default): the source and the next K - 1 OpenKBP patients that are not targets, each with every organ centroid of its
own, fused into the targets; timed from the call to every target's fused list in MRML.

Usage (from the repository root; the environment of ``scripts/setup_env.sh``)::

    python benchmarks/click_targets.py --base 0deba35 --targets 10 --reps 3 \\
        --out benchmarks/results/click_targets.md
    python benchmarks/click_targets.py --base 4a8c7ef --targets 6 --atlases 3 --reps 3 \\
        --out benchmarks/results/atlas_targets.md
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from cold_ab import _alternating, _worktree, median_range  # noqa: E402
from cold_start import checkout_commit  # noqa: E402
from first_click import CASES, CLICK_ORGAN, DATA, OPENKBP, load_volume  # noqa: E402

#: seconds between the engine's start (the module entered) and the click
PAUSE_S = 2.0


def targets_for(n: int, atlases: int = 0) -> tuple[str, list[str], list[str]]:
    """The source, ``n`` targets (``first_click.py``'s first case's, then other OpenKBP patients by name) and, for
    fusion, ``atlases`` atlases: the source, then the last patients by name that are not targets."""
    source, first = CASES[0]
    others = sorted(p.name.removesuffix("_ct.nii.gz") for p in (OPENKBP / "ct").glob("pt_*_ct.nii.gz"))
    more = [p for p in others if p != source and p not in first]
    targets = [*first, *more][:n]
    rest = [p for p in reversed(more) if p not in targets]
    return source, targets, ([source, *rest][:atlases] if atlases else [])


def _centroids(scene, patient: str, first: str | None = None, n: int | None = None):
    """A point list of ``patient``'s organ centroids (RAS), ``first`` first; all of them, or the first ``n``."""
    import slicer

    with (OPENKBP / "oar_centroids.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["patient"] == patient]
    if first is not None:
        rows = [next(r for r in rows if r["structure"] == first), *(r for r in rows if r["structure"] != first)]
    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(f"{patient} centroids")
    scene.AddNode(node)
    for r in rows[:n]:
        node.AddControlPoint(-float(r["x_mm"]), -float(r["y_mm"]), float(r["z_mm"]), r["structure"])  # LPS -> RAS
    return node


def child(argv: list[str]) -> int:
    """One click in this fresh process with the engine of ``--engine-root``; writes ``{"click_s", "digest", "rows"}``."""
    p = argparse.ArgumentParser(prog="click_targets.py child")
    p.add_argument("--engine-root", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--atlases", default="", help="comma-separated atlas patients: fuse them instead of a click")
    p.add_argument("source")
    p.add_argument("targets", nargs="+")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(args.engine_root) / "SAMEmbedding"))
    import numpy as np
    import slicer

    scene = slicer.vtkMRMLScene()

    def load(patient: str):
        return load_volume(scene, OPENKBP / "ct" / f"{patient}_ct.nii.gz", patient)

    source, targets = load(args.source), [load(t) for t in args.targets]
    atlases = [(load(a) if a != args.source else source, _centroids(scene, a)) for a in args.atlases.split(",") if a]
    click = _centroids(scene, args.source, CLICK_ORGAN, 2)

    from SAMEmbeddingLib.logic import MatchLogic

    logic = MatchLogic(scene, model="default", device="cpu", engine="process")
    logic.startEngine()
    time.sleep(PAUSE_S)
    t0 = time.perf_counter()
    if atlases:
        nodes = logic.matchAtlases(atlases, targets)
        click_s = time.perf_counter() - t0
        ras = np.round(np.array([node.GetNthControlPointPositionVector(i) for node in nodes
                                 for i in range(node.GetNumberOfControlPoints())], dtype=np.float64), 3)
    else:
        outputs = logic.matchPoints(source, click, targets)
        click_s = time.perf_counter() - t0
        ras = np.round(np.array([r.pointRAS for r in outputs.rows], dtype=np.float64), 3)
    logic.close()
    Path(args.json).write_text(json.dumps({"click_s": click_s, "rows": len(ras),
                                           "digest": hashlib.sha256(ras.tobytes()).hexdigest()}))
    return 0


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="click_targets.py")
    p.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--targets", type=int, default=10, help="targets of the click")
    p.add_argument("--atlases", type=int, default=0, help="fuse this many atlases into the targets instead of a click")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/click_targets.md")
    args = p.parse_args(argv)
    if not (OPENKBP / "oar_centroids.csv").exists():
        raise SystemExit(f"real data not available: {OPENKBP} is missing (place ../shared/data beside the repo)")
    source, targets, atlases = targets_for(args.targets, args.atlases)
    if len(atlases) < args.atlases:
        raise SystemExit(f"{args.atlases} atlases asked for, and only {len(atlases)} OpenKBP patients are left")
    work = REPO / "cache" / "click_targets"
    work.mkdir(parents=True, exist_ok=True)
    base = _worktree(args.base, REPO / "cache" / "cold_ab" / "base")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default threads, as in Slicer
    env["SAMEMBED_DATA"] = str(DATA)

    def one(name: str, root: Path) -> dict:
        js = work / f"{name}.json"
        subprocess.run([sys.executable, __file__, "child", "--engine-root", str(root), "--json", str(js),
                        "--atlases", ",".join(atlases), source, *targets], check=True, env=env, capture_output=True)
        out = json.loads(js.read_text())
        print(f"{name}: {out['click_s']:.2f} s", flush=True)
        return out

    load0 = os.getloadavg()[0]
    runs = _alternating(args.reps, base, one)
    times = {k: [r["click_s"] for r in v] for k, v in runs.items()}
    same = len({r["digest"] for v in runs.values() for r in v}) == 1
    b, h = statistics.median(times["base"]), statistics.median(times["head"])
    head = checkout_commit()
    job = (f"{len(atlases)} atlases fused into {len(targets)} targets" if atlases
           else f"A click into {len(targets)} targets")
    what = (f"Atlases {', '.join(atlases)}, each with all its organ centroids (`MatchLogic.matchAtlases`, its "
            f"between-patients default); targets {', '.join(targets)}." if atlases else
            f"Source {source} (two points: its {CLICK_ORGAN} and next structure's centroids); targets "
            f"{', '.join(targets)}.")
    text = "\n".join([
        f"# {job}, the module entered: `{args.base}` against `{head}`", "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, 1-minute load average {load0:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end. The Slicer module's logic with its engine process "
        "(`MatchLogic(engine=\"process\")`), model `default`, CPU, torch's default threads (every core, as in the "
        f"module), the engine started {PAUSE_S:.0f} s before the call, nothing prepared, no disk cache; every run a "
        f"fresh process; the engines alternate, {args.reps} runs each; median (range) seconds from the call to the "
        f"results in MRML. Command: `python benchmarks/click_targets.py --base {args.base} --targets {args.targets} "
        f"{f'--atlases {args.atlases} ' if atlases else ''}--reps {args.reps}`.", "",
        what, "",
        "| base s | head s | speed-up | same results |", "|---:|---:|---:|---|",
        f"| {median_range(times['base'])} | {median_range(times['head'])} | {b / h:.2f}x | {'yes' if same else 'no'} |",
        ""])
    Path(args.out).write_text(text)
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        raise SystemExit(child(sys.argv[2:]))
    raise SystemExit(run(sys.argv[1:]))
