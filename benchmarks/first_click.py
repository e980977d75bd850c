"""First-click benchmark: the Slicer module's logic, a source and 3 targets, from a click to the matches in MRML.

What a clinician waits for after opening four scans in Slicer and clicking the first landmark. Each measurement
runs in a fresh process (``python benchmarks/first_click.py child ...``) holding a real MRML scene (slicer-core)
with the four volumes read by Slicer's own reader (reading is not timed: Slicer had loaded them before the click).
The logic runs as the module panel runs it, with the engine in its own process (``MatchLogic(engine="process")``),
default model, CPU, no embedding cache on disk. Three ways, each in its own fresh process:

* ``cold``: the click arrives with nothing prepared: the engine process starts, imports torch, loads the model,
  receives the volumes, embeds what the search needs and matches (what every click cost before this benchmark);
* ``started``: the module was entered before the volumes were chosen, so its engine process is running with its
  model (``MatchLogic.startEngine``, as ``startEngineOn`` does when the module is entered); the click comes with
  nothing prepared for the volumes;
* ``prepared``: the module prepares the volumes when they are chosen (``MatchController`` calls
  ``MatchLogic.startPrepare``: engine start, preprocessing, global maps, affine priors, the source's local map, and
  the whole local maps of targets without a trustworthy prior); then the click. Both numbers are reported: the preparation runs while the user looks
  at the scans, the click is what the user waits for.

The click is the source patient's left-parotid centroid (``oar_centroids.csv``); its matches are compared with the
targets' own centroids (error, mm, for information: one point), and the three ways must give the same matches.

With ``--thin-slice`` the case is four chest CTs as they are reconstructed for reading today (:func:`thin_slice_case`:
0.27-0.35 GB of voxels each, 3-5 times the benchmark's chest CT), where handing the volumes to the engine process (one
copy each out of VTK into the file the engine process maps), not the network, is most of a click.

Usage (from the repository root; the environment of ``scripts/setup_env.sh``)::

    python benchmarks/first_click.py run --out benchmarks/results/first_click.md
    python benchmarks/first_click.py run --thin-slice --reps 2 --out benchmarks/results/first_click_thin_slice.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))
OPENKBP = DATA / "ct" / "openkbp"
#: (source, three targets): OpenKBP validation patients (different people; never used in training)
CASES = (("pt_215", ("pt_232", "pt_202", "pt_231")),
         ("pt_210", ("pt_202", "pt_239", "pt_236")),
         ("pt_239", ("pt_231", "pt_206", "pt_218")))
CLICK_ORGAN = "LeftParotid"
TARGET_S = 3.0
"""Issue 13's target for the first click with a source and 3 targets, seconds."""
#: the ``--thin-slice`` case: (name, file, slice spacing mm, origin shift LPS mm); the source first. LIDC-0001 at three
#: slice spacings on grids shifted by a few mm (the same anatomy where it was: its match is the click) and POPI's
#: breathing-phase-00 CT (another patient)
THIN_SLICE = (("lidc0001_0.5mm", ("ct", "lidc", "LIDC-IDRI-0001_ct.nii.gz"), 0.5, (0.0, 0.0, 0.0)),
              ("lidc0001_0.625mm", ("ct", "lidc", "LIDC-IDRI-0001_ct.nii.gz"), 0.625, (3.0, -4.0, 6.0)),
              ("lidc0001_0.6mm", ("ct", "lidc", "LIDC-IDRI-0001_ct.nii.gz"), 0.6, (-5.0, 2.0, -8.0)),
              ("popi00_0.5mm", ("ct", "popi", "popi_00_ct.nii.gz"), 0.5, (0.0, 0.0, 0.0)))


def thin_slice_case(work: Path) -> tuple[list[Path], list[float], list[bool]]:
    """The ``--thin-slice`` volumes (:data:`THIN_SLICE`, resampled along z with SimpleITK, linear, written once to
    ``work/thin/``), the click (LPS mm: the source's centre, inside the chest) and, per target, whether its match
    should be the click itself (the same patient)."""
    import numpy as np
    import SimpleITK as sitk
    from cold_ab import write_thin_slices

    folder = work / "thin"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_thin_slices(DATA.joinpath(*parts), folder / f"{name}.nii.gz", spacing_z, shift)
             for name, parts, spacing_z, shift in THIN_SLICE]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(paths[0]))
    reader.ReadImageInformation()
    centre = np.array([(n - 1) / 2.0 for n in reader.GetSize()]) * reader.GetSpacing()
    click = list(np.array(reader.GetOrigin()) + np.array(reader.GetDirection()).reshape(3, 3) @ centre)
    return paths, click, ["lidc" in name for name, *_ in THIN_SLICE[1:]]


def click_argument(click_lps_mm) -> str:
    """The child's ``--click-lps`` argument for a click (LPS mm); with "=": x may be negative."""
    return f"--click-lps={','.join(f'{v:.4f}' for v in click_lps_mm)}"


def centroids() -> dict[tuple[str, str], list[float]]:
    """(patient, structure) -> centroid, LPS mm (OpenKBP ``oar_centroids.csv``)."""
    with (OPENKBP / "oar_centroids.csv").open() as f:
        return {(r["patient"], r["structure"]): [float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])]
                for r in csv.DictReader(f)}


def peak_rss_gb(pid: int | None) -> float:
    """Peak resident set size (GB) of process ``pid`` (the engine process; None: this process): its ``VmHWM``
    (:func:`cold_start.peak_rss_gb`)."""
    from cold_start import peak_rss_gb as peak

    return peak("self" if pid is None else pid)


def load_volume(scene, path: str | Path, name: str):
    """A scalar volume node named ``name`` in ``scene``, read from ``path`` by Slicer's own reader (slicer-core), as
    Slicer loads a scan before any click."""
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise SystemExit(f"Slicer could not read {storage.GetFileName()}")
    return node


def child(argv: list[str]) -> int:
    """One first click in this fresh process; writes ``{"prepare_s", "click_s", "points_ras", ...}`` as JSON."""
    p = argparse.ArgumentParser(prog="first_click.py child")
    p.add_argument("--mode", choices=("cold", "started", "prepared"), required=True)
    p.add_argument("--engine", choices=("process", "here"), default="process")
    p.add_argument("--model", default="default")
    p.add_argument("--json", required=True)
    p.add_argument("--click-lps", help="x,y,z: the click (LPS mm), with source and targets given as files")
    p.add_argument("source")
    p.add_argument("targets", nargs=3)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "SAMEmbedding"))
    import slicer  # slicer-core: the MRML scene and Slicer's volume reader

    scene = slicer.vtkMRMLScene()

    def load(patient: str):
        if args.click_lps:  # a volume file
            return load_volume(scene, patient, Path(patient).name.removesuffix(".nii.gz"))
        return load_volume(scene, OPENKBP / "ct" / f"{patient}_ct.nii.gz", patient)

    source, targets = load(args.source), [load(t) for t in args.targets]
    x, y, z = ([float(v) for v in args.click_lps.split(",")] if args.click_lps
               else centroids()[(args.source, CLICK_ORGAN)])
    click = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(click)
    click.AddControlPoint(-x, -y, z, CLICK_ORGAN)  # LPS -> RAS

    from SAMEmbeddingLib.logic import MatchLogic  # the module's logic (no torch here with engine="process")

    t0 = time.perf_counter()
    logic = MatchLogic(scene, model=args.model, device="cpu", engine=args.engine)
    prepare_s, prepare_steps = 0.0, {}
    if args.mode == "started":  # the module was entered before the volumes were chosen: its engine is running
        logic.startEngine()
        prepare_s = time.perf_counter() - t0
    if args.mode == "prepared":
        prepare_steps = logic.prepareVolumes(source, targets)
        prepare_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs = logic.matchPoints(source, click, targets)
    click_s = time.perf_counter() - t1
    rows = [{"target": r.target, "ras": [float(v) for v in r.pointRAS], "score": r.score, "confident": r.confident}
            for r in outputs.rows]
    engine_rss_gb = peak_rss_gb(getattr(logic.getMatcher(), "pid", None))
    logic.close()
    Path(args.json).write_text(json.dumps({"prepare_s": prepare_s, "prepare_steps": prepare_steps,
                                           "click_s": click_s, "rows": rows, "engine_peak_rss_gb": engine_rss_gb,
                                           "skipped": [list(s) for s in outputs.skipped]}, indent=1))
    return 0


def run(argv: list[str]) -> int:
    """Every case, cold and prepared, each in a fresh process; writes the markdown report."""
    import numpy as np

    p = argparse.ArgumentParser(prog="first_click.py run")
    p.add_argument("--out", default="benchmarks/results/first_click.md")
    p.add_argument("--work", default="cache/first_click")
    p.add_argument("--note", default="", help="a line about the machine's state (e.g. what else ran)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the engine (default 0: torch's own choice, every core, as in the module)")
    p.add_argument("--model", default="default", help="the module's model (a registered name, e.g. fast)")
    p.add_argument("--reps", type=int, default=3,
                   help="runs of each way per case, interleaved (this VM's speed drifts and a run now and then is "
                        "much slower): the run of median click time is reported, with the range of all")
    p.add_argument("--thin-slice", action="store_true",
                   help="instead of the OpenKBP cases, four thin-slice chest CTs (thin_slice_case)")
    args = p.parse_args(argv)
    needed = DATA / "ct" / "lidc" if args.thin_slice else OPENKBP / "oar_centroids.csv"
    if not needed.exists():
        raise SystemExit(f"real data not available: {needed} is missing (place ../shared/data beside the repo)")
    from cold_start import byte_compile, provenance

    made = provenance(REPO)
    byte_compile(REPO)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # each case: (source name, target names, the child's arguments, the expected match per target, RAS, or None)
    cases = []
    if args.thin_slice:
        paths, click, same = thin_slice_case(work)
        ras = np.array(click) * [-1, -1, 1]
        cases.append((paths[0].name.removesuffix(".nii.gz"), [t.name.removesuffix(".nii.gz") for t in paths[1:]],
                      [click_argument(click), *map(str, paths)],
                      [ras if s else None for s in same]))
    else:
        truth = centroids()
        cases += [(source, targets, [source, *targets],
                   [np.array(truth[(t, CLICK_ORGAN)]) * [-1, -1, 1] for t in targets]) for source, targets in CASES]
    load_start = os.getloadavg()
    results = []
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    modes = ("cold", "started", "prepared")
    for source, targets, child_args, want in cases:
        row = {"source": source, "targets": targets}
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.reps):
            for mode in modes:
                js = work / f"{source}_{mode}.json"
                subprocess.run([sys.executable, __file__, "child", "--mode", mode, "--model", args.model, "--json",
                                str(js), *child_args], check=True, env=env)
                runs[mode].append(json.loads(js.read_text()))
                if runs[mode][-1].get("skipped"):  # a click into fewer targets is not the case this measures
                    raise SystemExit(f"{source} -> {', '.join(targets)} {mode}: the click skipped "
                                     + "; ".join(f"{name} ({why})" for name, why in runs[mode][-1]["skipped"]))
                print(f"{source} -> {', '.join(targets)} {mode}: prepare {runs[mode][-1]['prepare_s']:.1f} s, "
                      f"click {runs[mode][-1]['click_s']:.1f} s", flush=True)
        from cold_start import median_run

        for mode in modes:  # the run of median click time, with every run's click and preparation times
            row[mode] = median_run(runs[mode], "click_s", "prepare_s")
        got = [_points_by_target(run["rows"], targets, f"{source} {m}") for m in modes for run in runs[m]]
        row["same"] = all(bool(np.allclose(got[0], g, atol=1e-3)) for g in got[1:])
        row["errors_mm"] = [None if w is None else float(np.linalg.norm(g - w)) for g, w in zip(got[0], want)]
        results.append(row)
    Path(args.out).write_text(report(results, load_start, os.getloadavg(), args.note, args.threads, args.reps,
                                     args.model, args.thin_slice, made))
    (work / "first_click.json").write_text(json.dumps({"results": results, "provenance": made}, indent=1))
    print(f"wrote {args.out}")
    return 0


def _points_by_target(rows: list[dict], targets: list[str], what: str):
    """(targets, 3) RAS mm: each target's matched point from a click's ``rows``, in the order of ``targets`` (rows
    are paired with their expected points by name, not by position)."""
    import numpy as np

    by_name = {r["target"]: r["ras"] for r in rows}
    missing = [t for t in targets if t not in by_name]
    if missing:
        raise SystemExit(f"{what}: no match for {', '.join(missing)} (the click's rows: {', '.join(by_name) or 'none'})")
    return np.array([by_name[t] for t in targets])


def _spread(run: dict, key: str = "click_s") -> str:
    """``run[key]`` with the range of all its runs, e.g. ``2.9 (2.8-7.1)`` (one run: the value alone)."""
    every = run.get(f"{key}_runs", [run[key]])
    return f"{run[key]:.1f}" + (f" ({min(every):.1f}-{max(every):.1f})" if len(every) > 1 else "")


def report(results: list[dict], load_start, load_end, note: str, threads: int, reps: int = 1,
           model: str = "default", thin_slice: bool = False, made: dict[str, str] | None = None) -> str:
    """The markdown report; ``made``: the run's ``cold_start.provenance``."""
    import numpy as np
    from cold_start import median_words, provenance_line

    cold = [r["cold"]["click_s"] for r in results]
    started = [r["started"]["click_s"] for r in results if "started" in r]

    def worst(mode: str) -> float:  # the slowest click of every run of ``mode``
        return max((max(r[mode].get("click_s_runs", [r[mode]["click_s"]])) for r in results if mode in r), default=0.0)

    cold_worst, started_worst, prepared_worst = worst("cold"), worst("started"), worst("prepared")
    warm = [r["prepared"]["click_s"] for r in results]
    prep = [r["prepared"]["prepare_s"] for r in results]
    lines = [
        "# First click: a source and 3 targets, through the Slicer module's logic",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, load average {load_start[0]:.1f} at the start and "
        f"{load_end[0]:.1f} at the end. {provenance_line(made)} {note}".rstrip(),
        f"Engine: `MatchLogic(engine=\"process\")` as in the module panel, model `{model}`, CPU, "
        + (f"{threads} torch thread(s)" if threads else "torch's default threads (every core, as in the module)")
        + ", no disk cache; every run in a fresh process"
        + (f", each way {reps} times per case, interleaved: {median_words(reps)} by click time, with the range of "
           "all in brackets" if reps > 1 else "")
        + ". Command: `python benchmarks/first_click.py run" + (f" --threads {threads}" if threads else "")
        + (f" --reps {reps}" if reps != 3 else "") + (" --thin-slice" if thin_slice else "") + "`.",
        "",
        "`cold`: from the click to the matches in MRML with nothing prepared (engine process start, imports, model, "
        "volumes, embedding, search). `engine started`: the module was entered before the volumes were chosen, so its "
        "engine process is running with its model (`MatchLogic.startEngine`, `start s`), and the click comes as soon "
        "as the volumes are chosen, nothing prepared for them. `prepared`: the module prepared the volumes when they "
        "were chosen (`prepare s`, while the user looks at the scans); `click s` is then what the user waits for. "
        f"Target: the first click <= {TARGET_S:.0f} s.",
        "",
        "| source -> targets | cold click s | engine started: start s, click s | prepare s (embed / prior / whole) | "
        "targets without prior | prepared click s | engine peak RSS GB (cold / prepared) | same matches | "
        + ("click error mm (the same patient's click; - for another patient) |" if thin_slice
         else f"click error mm ({CLICK_ORGAN} centroid) |"),
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        st = r["prepared"]["prepare_steps"]
        steps = " / ".join(f"{st.get(k, 0.0):.1f}" for k in ("embed_s", "prior_s", "whole_s"))
        rss = " / ".join(f"{r[m]['engine_peak_rss_gb']:.2f}" for m in ("cold", "prepared"))
        st_s = (f"{r['started']['prepare_s']:.1f}, **{_spread(r['started'])}**" if "started" in r else "-")
        lines.append(f"| {r['source']} -> {', '.join(r['targets'])} | {_spread(r['cold'])} | {st_s} | "
                     f"{_spread(r['prepared'], 'prepare_s')} ({steps}) | {st.get('targets_without_prior', 0):.0f} | "
                     f"{_spread(r['prepared'])} | {rss} | "
                     f"{'yes' if r['same'] else '**no**'} | {', '.join('-' if e is None else f'{e:.1f}' for e in r['errors_mm'])} |")
    met = prepared_worst <= TARGET_S
    lines += [
        "",
        f"Mean: cold click {np.mean(cold):.1f} s; prepared {np.mean(prep):.1f} s ahead, then the click "
        f"{np.mean(warm):.1f} s (worst run {prepared_worst:.1f} s). Target <= {TARGET_S:.0f} s: "
        + ("**met** after preparing ahead" if met else f"**missed** (worst prepared click {prepared_worst:.1f} s)")
        + (f"; a cold click (nothing prepared, the engine process started by the click) {np.mean(cold):.1f} s "
           f"(worst run {cold_worst:.1f} s: target " + ("met" if cold_worst <= TARGET_S else "missed") + ")")
        + (f"; with the engine started (the module entered) and nothing prepared, {np.mean(started):.1f} s "
           f"(worst run {started_worst:.1f} s: target " + ("met" if started_worst <= TARGET_S else "missed") + ")."
           if started else "."),
        "",
        "The `whole` part of preparing is the source's local map over its body (every click reads it and every "
        "round trip searches it) and the whole-body local map of each target without a trustworthy search prior "
        "(neither an affine on which 20 % of the global correspondences agree nor a translation on which 5 % "
        "agree: every search there covers the whole body, whatever the click). A click made while the volumes are "
        "still being prepared waits for the rest of the preparation.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2:]))
    raise SystemExit("usage: first_click.py run [--out MD] [--note TEXT] | child ...")
