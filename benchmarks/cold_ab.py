"""Two engines side by side on cold ``samembed match`` runs: this checkout against an earlier commit.

The VM's speed drifts by 30-50 % within an hour, so two runs of ``cold_start.py`` an hour apart cannot say what a
change gained. This script checks the earlier commit out beside the repository (``git worktree``, in
``cache/cold_ab/``, or ``--work``), then runs the cold-start child of each engine (``cold_start.py child``: a fresh process, no
cache, one torch thread unless ``--threads`` says more, the command's own prefetch) on the same pairs, alternating base and head, ``--reps``
times, and reports each engine's median process time per pair and their ratio. Both engines load the model of their
own checkout. Elastix is not run (``cold_start.py`` compares with it). With ``--atlas N`` it also times one atlas
into N cold targets in one process (``cold_start.py``'s atlas case), whose per-target time the pairs do not show;
with ``--many N`` the same source into N OpenKBP CTs, for the memory of a long run.
With ``--first-click`` it also times the Slicer module's first click (``first_click.py child``, its first case), from
cold and with the engine started, where preprocessing is waited for; ``--thin-slice-click`` the same on its four
thin-slice chest CTs; ``--no-pairs`` skips the pairs. With
``--heatmaps`` it also times the pairs with ``--heatmap-dir`` (a heatmap per point, written in the target's
geometry) and compares the two engines' heatmap files voxel by voxel. With ``--thin-slice`` it also times the LIDC pair
resampled to 0.5 mm slices (:func:`thin_slice_case`), whose reading outlasts torch's import.

Usage (from the repository root)::

    python benchmarks/cold_ab.py --base 4994e21 --atlas 5 --out benchmarks/results/cold_ab.md
    python benchmarks/cold_ab.py --base 4994e21 --no-pairs --first-click --reps 5 --out cache/cold_ab/click.md
    python benchmarks/cold_ab.py --base 2b21666 --no-pairs --heatmaps --out cache/cold_ab/heatmaps.md

Two models on this engine (``--base-model``: the base engine's model, here the same checkout)::

    python benchmarks/cold_ab.py --base HEAD --base-model default --model fast --no-pairs --atlas 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def _worktree(rev: str, folder: Path) -> Path:
    """A checkout of ``rev`` at ``folder`` (made once; reused while it holds that commit)."""
    want = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True, capture_output=True,
                          text=True).stdout.strip()
    if folder.exists():
        have = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if have == want:
            return folder
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], check=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), want], check=True,
                   capture_output=True)
    return folder


#: ``OMP_NUM_THREADS`` of the cold runs (``--threads``; numpy's BLAS reads it too unless the engine sets its own)
TORCH_THREADS = 1


def _cold(root: Path, source: str, target: str | list[str], points: str, out: Path,
          extra: tuple[str, ...] = ()) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (GB) and minor page faults (the process and its prefetch process: first touches of
    memory, a steadier measure than the time on a VM whose memory costs vary) of one cold match by the engine of
    checkout ``root``; ``extra``: further ``samembed match`` arguments (e.g. ``--heatmap-dir DIR``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(TORCH_THREADS), "PYTHONPATH": f"{root / 'SAMEmbedding'}{os.pathsep}{root / 'benchmarks'}"}
    from cold_start import cpu_use

    t0, use0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "cold_start.py"), "child", "--json",
                           str(out.with_suffix(".json")), source, *([target] if isinstance(target, str) else target), "--points", points,
                           "--out", str(out), *extra],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    faults = cpu_use(use0)["minor_faults"]
    if done.returncode != 0:
        raise SystemExit(f"cold run of {root} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, float(json.loads(out.with_suffix(".json").read_text())["peak_rss_gb"]), faults


def _atlas_run(root: Path, out: Path, source: str, targets: list[str], points: str, extra: tuple[str, ...] = (),
               first: int = 0) -> tuple[float, float, float]:
    """One atlas into ``targets`` in one cold ``samembed match`` (:func:`_cold`): wall seconds, peak RSS (GB) and the
    mean time per target from target ``first`` on (0: every target; 1: those after the first, which also embeds the
    source's tiles)."""
    import numpy as np

    seconds, rss, _ = _cold(root, source, targets, points, out, extra)
    marks = json.loads(out.with_suffix(".json").read_text())["per_target_s"][:len(targets)]
    return seconds, rss, float(np.mean(marks[first:]))


def _alternating(reps: int, base: Path, run_one: Callable[[str, Path], T]) -> dict[str, list[T]]:
    """``run_one(name, checkout)`` of the base and the head engine ``reps`` times each, alternating (base, head, head,
    base, ...): neither engine always runs first (the page cache, the VM's drift). Each engine's results in order."""
    out: dict[str, list[T]] = {"base": [], "head": []}
    for rep in range(reps):
        for name, root in (("base", base), ("head", REPO))[:: 1 if rep % 2 == 0 else -1]:
            out[name].append(run_one(name, root))
    return out


def median_range(values: list[float], digits: int = 2) -> str:
    """``median (min-max)`` of seconds, for a report's cells (also the other benchmarks' that time repeated runs)."""
    import statistics

    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _largest_move(a: Path, b: Path) -> float:
    """The largest distance (mm) between the same match in two output CSVs of ``samembed match``."""
    import numpy as np
    from cold_start import _read_found

    return float(np.linalg.norm(_read_found(a)[2] - _read_found(b)[2], axis=1).max())


def _heatmaps_differ(a: Path, b: Path) -> float:
    """The largest difference between the same heatmap in two ``--heatmap-dir`` folders (their files by name; inf
    when the folders hold different names or a heatmap's geometry differs)."""
    import numpy as np
    import SimpleITK as sitk

    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()) or not names:
        return float("inf")
    worst = 0.0
    for name in names:
        x, y = sitk.ReadImage(str(a / name)), sitk.ReadImage(str(b / name))
        if (x.GetSize(), x.GetSpacing(), x.GetOrigin(), x.GetDirection()) != (y.GetSize(), y.GetSpacing(), y.GetOrigin(), y.GetDirection()):
            return float("inf")
        worst = max(worst, float(np.abs(sitk.GetArrayViewFromImage(x) - sitk.GetArrayViewFromImage(y)).max()))
    return worst


def _section(intro: str, header: str, rows: list[str]) -> str:
    """A section of the report: a paragraph, then a table of ``rows`` under ``header`` (first column left-aligned,
    the numbers right-aligned)."""
    columns = header.count("|") - 1
    return "\n".join(["", intro, "", header, "|---|" + "---:|" * (columns - 1), *rows, ""])


def _click(root: Path, mode: str, out: Path, thin: tuple[list[Path], list[float]] | None = None,
           pause_s: float = 0.0) -> tuple[float, list[list[float]]]:
    """Seconds and matched points (RAS mm) of one first click through the Slicer module's logic by the engine of
    checkout ``root`` (``first_click.py child --mode MODE``, its first case: a source and 3 targets; torch's default
    threads, as in the module), or, with ``thin`` (``(volume files, click LPS mm)`` of
    :func:`first_click.thin_slice_case`), its thin-slice case; after ``pause_s`` seconds of nothing."""
    from first_click import CASES, DATA, click_argument

    source, targets = CASES[0]
    volumes = [source, *targets] if thin is None else [click_argument(thin[1]), *map(str, thin[0])]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=f"{root / 'SAMEmbedding'}{os.pathsep}{root / 'benchmarks'}", SAMEMBED_DATA=str(DATA))
    time.sleep(pause_s)
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "first_click.py"), "child", "--mode", mode,
                           "--json", str(out), *volumes], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"first click by {root} failed:\n{done.stderr[-2000:]}")
    d = json.loads(out.read_text())
    return d["click_s"], [r["ras"] for r in d["rows"]]


#: the slice spacing of the ``--thin-slice`` pair (mm): chest CT as it is reconstructed for reading today
THIN_SLICE_MM = 0.5


def write_thin_slices(image: str | Path, out: Path, spacing_z_mm: float,
                      shift_lps_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Path:
    """``image`` resampled along z to ``spacing_z_mm`` slices (SimpleITK, linear, -1024 outside, its pixel type) on
    its grid shifted by ``shift_lps_mm`` (the anatomy stays where it was), written to ``out`` once (atomically)."""
    import SimpleITK as sitk

    if not out.exists():
        img = sitk.ReadImage(str(image))
        spacing = (*img.GetSpacing()[:2], spacing_z_mm)
        size = (*img.GetSize()[:2], int(round(img.GetSize()[2] * img.GetSpacing()[2] / spacing_z_mm)))
        origin = [o + s for o, s in zip(img.GetOrigin(), shift_lps_mm)]
        thin = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, img.GetDirection(),
                             -1024, img.GetPixelID())
        part = out.with_suffix(".part.nii.gz")
        sitk.WriteImage(thin, str(part), True)
        part.replace(out)
    return out


def thin_slice_case(case, work: Path):
    """The LIDC case ``case`` (LIDC-0001 against its known warp, both 2.5 mm slices) with both images resampled along
    z to :data:`THIN_SLICE_MM` slices (linear; 512 x 512 x 665 voxels, 0.35 GB of int16 each, 0.17 GB as .nii.gz),
    written once to ``work/thin/``; the same points. Where the pair's reading, not the network, is most of a cold
    match (the prefetch process reads both images while torch loads)."""
    import dataclasses

    folder = work / "thin"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_thin_slices(image, folder / Path(str(image)).name.replace(".nii.gz", f"_{THIN_SLICE_MM}mm.nii.gz"),
                               THIN_SLICE_MM) for image in (case.source, case.target)]
    return dataclasses.replace(case, case_id=f"{case.case_id}_thin_{THIN_SLICE_MM}mm", source=paths[0], target=paths[1])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "SAMEmbedding"))
    import numpy as np
    from cold_start import case_points, cold_cases

    p = argparse.ArgumentParser(prog="cold_ab.py")
    p.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the cold runs (the issue's cold_start.py runs set 2)")
    p.add_argument("--openkbp-pairs", type=int, default=3)
    p.add_argument("--suites", default=str(REPO / "cache" / "suites"))
    p.add_argument("--atlas", type=int, default=0, metavar="N",
                   help="also one atlas into N cold targets in one process (cold_start.py's atlas case): the mean "
                        "time per target of each engine")
    p.add_argument("--many", type=int, default=0, metavar="N",
                   help="also one atlas (the --atlas case's source and points) into N OpenKBP CTs (every other "
                        "patient in the shared data, by name) in one process: the time per target and the peak RSS "
                        "over a long run")
    p.add_argument("--no-pairs", action="store_true", help="skip the cold pairs (e.g. for --first-click alone)")
    p.add_argument("--thin-slice", action="store_true",
                   help=f"also the LIDC pair resampled to {THIN_SLICE_MM} mm slices (thin_slice_case)")
    p.add_argument("--first-click", action="store_true",
                   help="also the Slicer module's first click (first_click.py's first case, a source and 3 targets), "
                        "from cold and with the engine started, each engine --reps times")
    p.add_argument("--thin-slice-click", action="store_true",
                   help="also the Slicer module's first click on first_click.py's thin-slice case (four chest CTs, "
                        "0.27-0.35 GB of voxels each), from cold and with the engine started, each engine --reps times")
    p.add_argument("--pause", type=float, default=0.0, metavar="S",
                   help="seconds of nothing before each first click (this VM hands memory that has been free for a "
                        "few seconds back to its host, and touching it again then costs more: a clinician's click "
                        "comes long after the last one)")
    p.add_argument("--heatmaps", action="store_true",
                   help="also the pairs with --heatmap-dir (a heatmap per point in the target's geometry), each engine "
                        "--reps times; the two engines' heatmap files compared voxel by voxel")
    p.add_argument("--model", default=None, help="the model of every run (`samembed match --model`; default: the "
                                                   "default model)")
    p.add_argument("--base-model", default=None,
                   help="the base engine's model instead of --model: two models compared, each with its engine "
                        "(`--base HEAD --base-model default --model M`: M against the default on this engine)")
    p.add_argument("--preset", default=None, help="the settings of every cold run (`samembed match --preset`, e.g. "
                                                    "between-patients, which refines; default: the defaults)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cold_ab.md"))
    p.add_argument("--work", default=str(REPO / "cache" / "cold_ab"),
                   help="scratch folder: the base engine's checkout (a git worktree, in base/) and every run's points, "
                        "outputs and stage files")
    args = p.parse_args(argv)
    global TORCH_THREADS
    TORCH_THREADS = args.threads
    head_model = ("--model", args.model) if args.model else ()  # samembed match's arguments of every cold run
    preset = ("--preset", args.preset) if args.preset else ()
    #: each engine's model (and settings) arguments
    models = {"base": (("--model", args.base_model) if args.base_model else head_model) + preset,
              "head": head_model + preset}
    from cold_start import NEEDED_DATA, byte_compile, checkout_commit, cpu_model, require_benchmark_data

    require_benchmark_data(*NEEDED_DATA)  # before a worktree is made or anything compiled
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = _worktree(args.base, work / "base")
    base_commit = checkout_commit(base)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for root in (REPO, base):  # neither engine compiles its sources in the timed processes
        byte_compile(root)
    head = checkout_commit(REPO)
    rows = []
    pairs = [] if args.no_pairs else cold_cases(args.suites, args.openkbp_pairs)
    if args.thin_slice:
        pairs.append(thin_slice_case(cold_cases(args.suites, 0)[0], work))
    for case in pairs:
        tag, pts = case_points(work, case)
        runs = _alternating(args.reps, base, lambda name, root, c=case, p=pts, t=tag: _cold(
            root, str(c.source), str(c.target), str(p), work / f"{t}_{name}.csv", models[name]))
        times = {k: [r[0] for r in v] for k, v in runs.items()}
        rss = {k: [r[1] for r in v] for k, v in runs.items()}
        faults = {k: [r[2] for r in v] for k, v in runs.items()}
        moved = _largest_move(work / f"{tag}_base.csv", work / f"{tag}_head.csv")
        b, h = statistics.median(times["base"]), statistics.median(times["head"])
        rows.append(f"| {tag} | {len(case.labels)} | {median_range(times['base'])} | {median_range(times['head'])} | "
                    f"{b / h:.2f}x | "
                    f"{statistics.median(rss['base']):.2f} / {statistics.median(rss['head']):.2f} | "
                    f"{statistics.median(faults['base']) / 1e3:.0f} / {statistics.median(faults['head']) / 1e3:.0f} | {moved:.2f} |")
        print(rows[-1], flush=True)
    heatmap_rows = []
    for case in cold_cases(args.suites, args.openkbp_pairs) if args.heatmaps else []:
        tag, pts = case_points(work, case)

        def heatmap_run(name: str, root: Path, c=case, p=pts, t=tag) -> tuple[float, float, int]:
            folder = work / f"{t}_{name}_heatmaps"
            shutil.rmtree(folder, ignore_errors=True)
            return _cold(root, str(c.source), str(c.target), str(p), work / f"{t}_{name}_heatmaps.csv",
                         ("--heatmap-dir", str(folder), *models[name]))

        runs = _alternating(args.reps, base, heatmap_run)
        times = {k: [r[0] for r in v] for k, v in runs.items()}
        rss = {k: [r[1] for r in v] for k, v in runs.items()}
        moved = _largest_move(work / f"{tag}_base_heatmaps.csv", work / f"{tag}_head_heatmaps.csv")
        differ = _heatmaps_differ(work / f"{tag}_base_heatmaps", work / f"{tag}_head_heatmaps")
        b, h = statistics.median(times["base"]), statistics.median(times["head"])
        heatmap_rows.append(f"| {tag} | {len(case.labels)} | {median_range(times['base'])} | {median_range(times['head'])} | "
                            f"{b / h:.2f}x | {statistics.median(rss['base']):.2f} / {statistics.median(rss['head']):.2f} | "
                            f"{moved:.2f} | {differ:.2g} |")
        print(heatmap_rows[-1], flush=True)
    atlas_rows = []
    if args.atlas:
        from cold_start import atlas_case

        kbp = [c for c in cold_cases(args.suites, 1) if c.suite == "openkbp_inter"]
        src_pat, targets, pts, _ = atlas_case(args.suites, kbp, args.atlas, work)

        runs = _alternating(args.reps, base, lambda name, root: _atlas_run(
            root, work / f"atlas_{name}.csv", str(kbp[0].source), [str(c.target) for c in targets], str(pts), models[name]))
        times = {k: [r[0] for r in v] for k, v in runs.items()}
        per = {k: [r[2] for r in v] for k, v in runs.items()}
        moved = _largest_move(work / "atlas_base.csv", work / "atlas_head.csv")
        b, h = statistics.median(per["base"]), statistics.median(per["head"])
        atlas_rows.append(f"| {src_pat} into {', '.join(c.meta['target_patient'] for c in targets)} | "
                          f"{statistics.median(times['base']):.2f} / {statistics.median(times['head']):.2f} | "
                          f"{median_range(per['base'])} | {median_range(per['head'])} | {b / h:.2f}x | {moved:.2f} |")
        print(atlas_rows[-1], flush=True)
    many_rows = []
    if args.many:
        from cold_start import atlas_case
        from samembed_bench.suites import data_root

        kbp = [c for c in cold_cases(args.suites, 1) if c.suite == "openkbp_inter"]
        src_pat, _, pts, _ = atlas_case(args.suites, kbp, 1, work)
        scans = sorted(p for p in (data_root() / "ct" / "openkbp" / "ct").glob("pt_*_ct.nii.gz")
                       if p.name != f"{src_pat}_ct.nii.gz")[:args.many]

        runs = _alternating(args.reps, base, lambda name, root: _atlas_run(
            root, work / f"many_{name}.csv", str(kbp[0].source), [str(s) for s in scans], str(pts), models[name], first=1))
        times, rss, per = ({k: [r[i] for r in v] for k, v in runs.items()} for i in range(3))
        moved = _largest_move(work / "many_base.csv", work / "many_head.csv")
        many_rows.append(f"| {src_pat} into {len(scans)} OpenKBP CTs ({scans[0].name[:6]} to {scans[-1].name[:6]}) | "
                         f"{median_range(times['base'])} / {median_range(times['head'])} | "
                         f"{median_range(per['base'])} / {median_range(per['head'])} | "
                         f"{median_range(rss['base'])} / {median_range(rss['head'])} | {moved:.2f} |")
        print(many_rows[-1], flush=True)
    click_rows = []
    clicks = [("", None)] if args.first_click else []
    if args.thin_slice_click:
        from first_click import thin_slice_case as thin_click_case

        paths, click, _ = thin_click_case(REPO / "cache" / "first_click")
        clicks.append(("thin-slice CTs: ", (paths, click)))
    for label, thin in clicks:
        for mode in ("cold", "started"):
            runs = _alternating(args.reps, base, lambda name, root, m=mode, t=thin: _click(
                root, m, work / f"click_{m}_{name}.json", t, args.pause))
            times = {k: [r[0] for r in v] for k, v in runs.items()}
            first = np.array(runs["base"][0][1])
            moved = max(float(np.linalg.norm(np.array(r[1]) - first, axis=1).max()) for v in runs.values() for r in v)
            b, h = statistics.median(times["base"]), statistics.median(times["head"])
            way = 'a click that starts the engine' if mode == 'cold' else 'the engine started, nothing prepared'
            click_rows.append(f"| {label}{way} | {median_range(times['base'])} | {median_range(times['head'])} | "
                              f"{b / h:.2f}x | {moved:.2f} |")
            print(click_rows[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join([
        f"# Cold `samembed match`: `{base_commit}` against `{head}`, side by side", "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores ({cpu_model()}), 1-minute load average {load:.1f} "
        f"at the end; run started {started}; `--base {args.base}` is `{base_commit}`. "
        + (f"Models: base `{args.base_model}`, head `{args.model or 'default'}` (the first click: the default). "
           if args.base_model else f"Model: `{args.model or 'default'}` (the first click: the default). ")
        + "Each run is a fresh process with no cache (`cold_start.py child`, "
        + f"OMP_NUM_THREADS={TORCH_THREADS}, the command's prefetch); "
        f"the two engines alternate (base, head, head, base, ...), {args.reps} runs each per pair; median (range) wall seconds. Command: "
        f"`python benchmarks/cold_ab.py --base {args.base} --reps {args.reps}"
        + (f" --threads {args.threads}" if args.threads != 1 else "")
        + (f" --openkbp-pairs {args.openkbp_pairs}" if args.openkbp_pairs != 3 else "")
        + (f" --atlas {args.atlas}" if args.atlas else "") + (f" --many {args.many}" if args.many else "")
        + (" --no-pairs" if args.no_pairs else "")
        + (" --thin-slice" if args.thin_slice else "")
        + (" --first-click" if args.first_click else "") + (" --thin-slice-click" if args.thin_slice_click else "")
        + (f" --pause {args.pause:g}" if args.pause else "") + (" --heatmaps" if args.heatmaps else "")
        + (f" --model {args.model}" if args.model else "")
        + (f" --base-model {args.base_model}" if args.base_model else "")
        + (f" --preset {args.preset}" if args.preset else "") + "`.", "",
        *(["| pair | points | base s | head s | speed-up | peak RSS GB, base / head | minor page faults k, base / head | "
           "largest move of a match, base to head, mm |",
           "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""] if rows else [])])
    if heatmap_rows:
        text += _section("The same pairs with `--heatmap-dir` (a heatmap per point, over the target's search mask, "
                         "written in the target's geometry), each engine alternating as above:",
                         "| pair | points | base s | head s | speed-up | peak RSS GB, base / head | "
                         "largest move of a match, base to head, mm | largest heatmap difference, base to head |",
                         heatmap_rows)
    if atlas_rows:
        text += _section("One atlas into many, one fresh process per run (each target cold, the source's tiles "
                         "reused); the mean time per target of each run, median (range) over the runs:",
                         "| atlas into targets | process s, base / head | base s per target | head s per target | "
                         "speed-up | largest move of a match, base to head, mm |", atlas_rows)
    if many_rows:
        text += _section("One atlas into many scans in one fresh process per run (each target cold): the process, the "
                         "mean time per target after the first, and the process's peak RSS (its prefetch process "
                         "not counted), median (range) over the runs:",
                         "| atlas into targets | process s, base / head | s per target, base / head | "
                         "peak RSS GB, base / head | largest move of a match, base to head, mm |", many_rows)
    if click_rows:
        from first_click import CASES

        source, targets = CASES[0]
        cases = ([f"{source} into {', '.join(targets)}"] if args.first_click else []) + (
            ["`thin-slice CTs`: its `--thin-slice` case (four chest CTs, LIDC-0001 at 0.5, 0.625 and 0.6 mm slices and "
             "POPI at 0.5 mm, 0.27-0.35 GB of voxels each)"] if args.thin_slice_click else [])
        pause = f", each after {args.pause:g} s of nothing" if args.pause else ""
        text += _section(f"The Slicer module's first click (`first_click.py child`: {' and '.join(cases)}; the module's "
                         "logic with its engine process, torch's default threads), each engine "
                         f"alternating as above{pause}; median (range) seconds from the click to the matches in MRML:",
                         "| way | base s | head s | speed-up | largest move of a match over all runs, mm |", click_rows)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
