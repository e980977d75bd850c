"""Cold-start benchmark: ``samembed match`` in a fresh process with no cache, against elastix, stage by stage.

Each measurement runs in its own child process (``python benchmarks/cold_start.py child ...``) so that imports,
model loading and every embedding are paid for, as a new user pays for them. The child runs the real command
line (``samembed.cli.main(["match", ...])``, then the command's own exit) with light wrappers around the engine's stage functions that record
each stage's *exclusive* wall time (a stage called inside another is not counted twice), and reports the peak RSS
(the process's ``VmHWM``, see :func:`peak_rss_gb`).

Usage (from the repository root, with ``SAMEmbedding`` and ``benchmarks`` on ``PYTHONPATH``)::

    python benchmarks/cold_start.py run --suites cache/suites --out benchmarks/results/cold_start.md
    python benchmarks/cold_start.py child SRC TGT --points P.csv --out O.csv --json stages.json [-- match flags]

Stages (seconds): imports (the engine and torch), model (loading the checkpoint), reading, preprocessing (with any
padding of a prefetched input), hashing (the images' content hashes, the cache keys), body
(body masks), global map, local map, assemble (the feature buffer, and the global map upsampled on the tiles: the
voxels' global lengths), prior (affine prior), search,
polish, scores, round trip (search back and polish back), writing, other (the remainder of the process wall time:
interpreter start, argument parsing, bookkeeping).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

T_START = time.perf_counter()
F_START = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # the page faults counted from the same moment

#: (module, attribute path, stage name); a stage called inside another is counted in the inner one only
STAGES = (
    ("samembed.api", "read_image", "reading"),
    ("samembed.prefetch", "Prefetch.take", "prefetch wait"),
    ("samembed.prefetch", "Prefetch.image", "prefetch wait"),
    ("samembed.api", "load_model", "model"),
    ("samembed.embedding", "preprocess", "preprocessing"),
    ("samembed.embedding", "pad_to_multiple", "preprocessing"),
    ("samembed.image", "Image.content_hash", "hashing"),
    ("samembed.embedding", "Embedder._body_on_local", "body"),
    ("samembed.networks.lite", "SamLite.forward_global", "global map"),
    ("samembed.networks.lite", "SamLite.forward_local", "local map"),
    ("samembed.networks.lite", "SamLite.forward_local_core", "local map"),
    ("samembed.networks.int8", "SamLiteInt8.forward_local_core", "local map"),
    ("samembed.networks.int8", "SamLiteInt8.forward_global", "global map"),
    ("samembed.embedding", "Embedder._assemble", "assemble"),
    ("samembed.tiles", "upsample_box", "assemble"),
    ("samembed.tiles", "upsample_at", "assemble"),
    ("samembed.tiles", "upsample_lengths_box", "assemble"),
    ("samembed.tiles", "upsample_lines", "assemble"),
    ("samembed.embedding", "Embedder.save", "writing"),
    ("samembed.api", "Matcher._prior", "prior"),
    ("samembed.api", "match_points", "search|round trip"),
    ("samembed.api", "polish_points", "polish|round trip"),
    ("samembed.api", "scores_at", "scores"),
    ("samembed.cli", "_write_match_outputs", "writing"),
)
ORDER = ("imports", "model", "reading", "prefetch wait", "preprocessing", "hashing", "body", "global map", "local map", "assemble", "prior",
         "search", "polish", "scores", "round trip", "writing", "other")


class StageClock:
    """Exclusive wall time per stage: a stack of running stages, each charged for its own time only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.faults: dict[str, int] = {}  # minor page faults (first touches of memory), exclusive as the seconds
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, child seconds, start faults, child faults]

    def wrap(self, fn, name: str):
        """``fn`` timed as stage ``name``; ``"a|b"`` alternates a, b, a, b... over the calls (search, then the
        round trip's search back, per target)."""
        names = name.split("|")

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            n = self.calls.get(name, 0)
            self.calls[name] = n + 1
            stage = names[n % len(names)]
            self._stack.append([stage, time.perf_counter(), 0.0, _minor_faults(), 0])
            try:
                return fn(*args, **kwargs)
            finally:
                st, t0, child, f0, child_f = self._stack.pop()
                dt, df = time.perf_counter() - t0, _minor_faults() - f0
                self.seconds[st] = self.seconds.get(st, 0.0) + dt - child
                self.faults[st] = self.faults.get(st, 0) + df - child_f
                if self._stack:
                    self._stack[-1][2] += dt
                    self._stack[-1][4] += df

        return timed

    def install(self) -> None:
        """Wrap every function of :data:`STAGES` that exists in this version of the engine."""
        import importlib

        for module, attr, name in STAGES:
            mod = importlib.import_module(module)
            owner, parts = mod, attr.split(".")
            for p in parts[:-1]:
                owner = getattr(owner, p, None)
            if owner is None or not hasattr(owner, parts[-1]):
                continue
            fn = getattr(owner, parts[-1])
            setattr(owner, parts[-1], self.wrap(fn, name))


def _minor_faults() -> int:
    """This process's minor page faults so far (its first touches of memory pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_gb(pid: int | str = "self") -> float:
    """Peak resident set size of process ``pid`` (default: this one), GB: the kernel's high-water mark of its memory
    (``VmHWM``), which starts afresh at ``exec``. Not ``getrusage``'s ``ru_maxrss``: that keeps the peak of the
    forked copy of the parent before ``exec``, so a child of a parent that had grown to 1.2 GB (building the suites)
    reported 1.23 GB for every cold pair. Where ``/proc`` cannot tell: ``ru_maxrss`` for this process, NaN for
    another (one that has ended, say)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    if pid != "self":
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child(argv: list[str]) -> NoReturn:
    """Run one ``samembed match`` with stage timing; write ``{"stages": {...}, "peak_rss_gb", "wall_s"}``."""
    p = argparse.ArgumentParser(prog="cold_start.py child")
    p.add_argument("--json", required=True, help="where to write the stage times")
    p.add_argument("--whole", action="store_true", help="embed every voxel (the engine before on-demand tiles)")
    p.add_argument("--no-prefetch", action="store_true", help="read and preprocess in the main process only")
    args, rest = p.parse_known_args(argv)
    import samembed.cli as cli  # torch-free

    cli.engine_process_settings()  # as the `samembed` command starts (samembed.cli.run)

    # as the command does before it imports torch: the first images are read and preprocessed in a second process
    # (samembed.prefetch) while the import runs; the command's own call then hands this one over
    match_args = cli.build_parser().parse_args(["match", *rest, "--quiet", "--device", "cpu"])
    prefetch = None if args.no_prefetch else cli._start_prefetch(match_args, match_args.images)
    cli._start_prefetch = lambda a, paths: prefetch
    t0, f0 = time.perf_counter(), _minor_faults()
    import torch  # noqa: F401 - the import cost is a stage of its own

    import samembed.api  # noqa: F401

    t_imports, f_imports = time.perf_counter() - t0, _minor_faults() - f0
    clock = StageClock()
    clock.install()
    if args.whole:
        from samembed.embedding import Embedder

        embed = Embedder.embed
        Embedder.embed = lambda self, image, progress=None, cancel=None, on_demand=False: embed(self, image, progress, cancel)
    # when each target's turn starts, and when writing starts, with the stage times so far: each target's own time
    # and stage times are the differences between consecutive marks
    marks: list[tuple[float, dict]] = []

    def mark() -> None:
        marks.append((time.perf_counter(), dict(clock.seconds)))

    from samembed.api import Matcher

    target = Matcher._target

    def _target(self, *a, **k):
        mark()
        return target(self, *a, **k)

    Matcher._target = _target
    write = cli._write_match_outputs

    def _write(*a, **k):
        mark()
        return write(*a, **k)

    cli._write_match_outputs = _write
    rc = cli.main(["match", *rest, "--quiet", "--device", "cpu"])
    wall = time.perf_counter() - T_START
    stages = {"imports": t_imports, **clock.seconds}
    stages["other"] = wall - sum(stages.values())
    faults = {"imports": f_imports, **clock.faults}
    faults["other"] = _minor_faults() - F_START - sum(faults.values())
    per_target = [tb - ta for (ta, _), (tb, _) in zip(marks[:-1], marks[1:])]
    # each target's exclusive stage times, from its start to the next target's (or writing's)
    per_target_stages = [{k: v - a.get(k, 0.0) for k, v in b.items() if v - a.get(k, 0.0) > 0}
                         for (_, a), (_, b) in zip(marks[:-1], marks[1:])]
    Path(args.json).write_text(json.dumps({"stages": stages, "stage_faults": faults, "peak_rss_gb": peak_rss_gb(),
                                           "wall_s": wall, "rc": rc,
                                           "per_target_s": per_target, "per_target_stages": per_target_stages},
                                          indent=1))
    cli.exit_now(rc)  # as the `samembed` command ends a match (samembed.cli.run)


def byte_compile(root: Path | None = None) -> None:
    """Byte-compile the engine and the Slicer module's library of checkout ``root`` (default: this one), as
    ``scripts/setup_env.sh`` does, before any process is timed: where ``PYTHONDONTWRITEBYTECODE`` is set (as on this
    VM), Python never rewrites a stale cache, so every measured process would compile each source changed since the
    set-up again (0.05-0.1 s), which no installed engine does."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "SAMEmbedding" / "samembed"),
                    str(root / "SAMEmbedding" / "SAMEmbeddingLib")], check=True, stdout=subprocess.DEVNULL)


def checkout_commit(root: Path | None = None) -> str:
    """The short commit of checkout ``root`` (default: this one), with "with uncommitted changes" when its tracked
    files differ from it: the engine a report measured."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    if subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], check=True,
                      capture_output=True, text=True).stdout.strip():
        head += " with uncommitted changes"
    return head


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere, often empty), for a report's
    machine line: this benchmark's numbers differ by 2x between the VMs it has run on."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU model unknown"


def provenance(root: Path | None = None) -> dict[str, str]:
    """What a report must say of the run that measured it: the engine's commit (:func:`checkout_commit`), the UTC
    time the run started, and the CPU model (:func:`cpu_model`)."""
    from datetime import datetime, timezone

    return {"commit": checkout_commit(root), "utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model()}


def provenance_line(p: dict[str, str] | None) -> str:
    """A report's line for :func:`provenance` (a run's JSON from before it was recorded: says so)."""
    if not p:
        return "Engine commit, date and CPU model: not recorded by this run."
    return f"Engine `{p['commit']}`, run started {p['utc']}, CPU: {p['cpu']}."


def median_words(n: int) -> str:
    """How :func:`median_run` picks the reported run of ``n``, for a report's text."""
    return "the median run" if n % 2 else f"the slower of the middle two of {n} runs"


def run_child(source: str, targets: list[str], points_csv: str, out_csv: str, extra: list[str] = ()) -> dict:
    """One cold ``samembed match`` in a fresh process; its stage times, peak RSS and the process wall time."""
    js = Path(out_csv).with_suffix(".stages.json")
    cmd = [sys.executable, __file__, "child", "--json", str(js), *extra, source, *targets, "--points", points_csv,
           "--out", out_csv]
    t0, use0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    out = json.loads(js.read_text())
    out["process_s"] = time.perf_counter() - t0
    out.update(cpu_use(use0))
    return out


def median_run(runs: list[dict], key: str = "process_s", *also: str) -> dict:
    """The run of median ``runs[i][key]`` (default: process time, :func:`run_child`'s runs), with every run's value of
    ``key`` and of each of ``also`` added as ``<name>_runs``. With an even number of runs there is no median run: the
    slower of the middle two is reported (:func:`median_words` says so in a report), never the faster."""
    r = sorted(runs, key=lambda x: x[key])[len(runs) // 2]
    for name in (key, *also):
        r[f"{name}_runs"] = [x[name] for x in runs]
    return r


def cpu_use(before: resource.struct_rusage) -> dict:
    """CPU seconds (user, system) and page faults (minor: first touches of memory) of the child processes waited for
    since ``before`` (a ``getrusage(RUSAGE_CHILDREN)``), their own children included (SAM's prefetch process)."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt}


def elastix_child(argv: list[str]) -> NoReturn:
    """One cold elastix affine + B-spline registration and point transfer (a fresh process: imports, reading)."""
    p = argparse.ArgumentParser(prog="cold_start.py elastix")
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--points", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    import numpy as np
    from samembed_bench.registration import _itk, transfer_points_elastix

    t0 = time.perf_counter()
    _itk()
    t_imports = time.perf_counter() - T_START
    pts = np.loadtxt(args.points, delimiter=",", skiprows=1, usecols=(1, 2, 3), ndmin=2)
    moved, reg_s = transfer_points_elastix(args.source, args.target, pts, mode="bspline")
    wall = time.perf_counter() - T_START
    Path(args.json).write_text(json.dumps({"registration_s": reg_s, "imports_s": t_imports, "wall_s": wall,
                                           "reading_s": wall - t_imports - reg_s, "peak_rss_gb": peak_rss_gb(),
                                           "points_lps_mm": moved.tolist()}, indent=1))
    del t0
    from samembed.cli import exit_now

    exit_now(0)  # the same exit as the SAM child's: neither side pays for its interpreter's shutdown (ITK's: ~1.5 s)


def _write_points(path: Path, labels, points) -> None:
    lines = ["label,x,y,z"] + [f"{lab},{p[0]:.4f},{p[1]:.4f},{p[2]:.4f}" for lab, p in zip(labels, points)]
    path.write_text("\n".join(lines) + "\n")


def _read_found(path: Path) -> tuple[list[str], list[str], object]:
    import csv

    import numpy as np

    rows = list(csv.DictReader(path.open()))
    return ([r["target"] for r in rows], [r["label"] for r in rows],
            np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rows]))


def cold_cases(suites: str, openkbp_pairs: int) -> list:
    """The benchmark's pairs: the first ``lidc_synthetic`` case and the first ``openkbp_pairs`` ``openkbp_inter``
    ones (the suites are built under ``suites`` when missing)."""
    from samembed_bench.cases import read_cases
    from samembed_bench.suites import build_suites

    build_suites(suites, ["lidc_synthetic", "openkbp_inter"])
    cases = read_cases(Path(suites) / "lidc_synthetic" / "cases.json")[:1]
    return cases + read_cases(Path(suites) / "openkbp_inter" / "cases.json")[:openkbp_pairs]


def case_points(work: Path, case) -> tuple[str, Path]:
    """A case's tag and its query points written to ``work/<tag>_points.csv`` (the ``--points`` file)."""
    tag = f"{case.suite}_{case.case_id}"
    path = work / f"{tag}_points.csv"
    _write_points(path, case.labels, case.query_points_lps_mm)
    return tag, path


def atlas_case(suites: str, kbp: list, n_targets: int, work: Path) -> tuple[str, list, Path, dict]:
    """One atlas into many: the source patient of the first OpenKBP case ``kbp[0]``, ``n_targets`` distinct other
    patients (that case's target first) as cold targets, and the source's organ centroids written to
    ``work/atlas_points.csv``. Returns ``(source patient, target cases, points file, every patient's centroids)``."""
    from samembed_bench.cases import read_cases
    from samembed_bench.suites import data_root, read_openkbp_centroids

    cents = read_openkbp_centroids(data_root())
    src_pat = kbp[0].meta["source_patient"]
    targets = []
    for c in kbp + read_cases(Path(suites) / "openkbp_inter" / "cases.json"):  # distinct other patients
        if len(targets) == n_targets:
            break
        if c.meta["target_patient"] != src_pat and all(c.meta["target_patient"] != t.meta["target_patient"] for t in targets):
            targets.append(c)
    labels = sorted(cents[src_pat])
    pts_csv = work / "atlas_points.csv"
    _write_points(pts_csv, labels, [cents[src_pat][s] for s in labels])
    return src_pat, targets, pts_csv, cents


def require_benchmark_data(*relative: str) -> None:
    """Exit with one line naming the first missing file of the shared data (``relative`` to it), before anything
    is built or run: the benchmarks read ``../shared/data`` (or ``$SAMEMBED_DATA``) in place."""
    from samembed_bench.suites import data_root

    root = data_root()
    for rel in relative:
        if not (root / rel).exists():
            raise SystemExit(f"real data not available: {root / rel} is missing; place the shared data folder at "
                             f"../shared/data beside the repository, or set SAMEMBED_DATA to it")


#: the shared data files every run of this benchmark reads (the suites' sources)
NEEDED_DATA = ("ct/lidc/LIDC-IDRI-0001_ct.nii.gz", "ct/openkbp/patients.csv", "ct/openkbp/oar_centroids.csv")


def run(argv: list[str]) -> int:
    """The side-by-side benchmark; writes the markdown report."""
    import numpy as np

    p = argparse.ArgumentParser(prog="cold_start.py run")
    p.add_argument("--suites", default="cache/suites", help="suite folder (built when missing)")
    p.add_argument("--work", default="cache/cold_start", help="scratch folder for points, outputs, stage files")
    p.add_argument("--out", default="benchmarks/results/cold_start.md")
    p.add_argument("--openkbp-pairs", type=int, default=5)
    p.add_argument("--no-elastix", action="store_true")
    p.add_argument("--reps", type=int, default=3, help="cold runs of the default (on-demand) path per pair; the median "
                   "run is reported (with an even count, the slower of the middle two)")
    p.add_argument("--model", default="default", help="SAM's model (`samembed match --model`: a registered name or a "
                   "checkpoint; `--precision auto` runs its local branch in int8 only with a calibration beside it)")
    args = p.parse_args(argv)
    require_benchmark_data(*NEEDED_DATA)
    model = [] if args.model == "default" else ["--model", args.model]
    made = provenance()
    byte_compile()
    load_at_start = os.getloadavg()[0]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = cold_cases(args.suites, args.openkbp_pairs)
    rows = []
    for case in cases:
        tag, pts_csv = case_points(work, case)
        row = {"case": tag, "suite": case.suite, "n": len(case.labels)}
        # the default path `--reps` times (this VM's speed drifts between runs): the median run is reported, with
        # the range of all; once each: the whole-volume path, and the command's other paths, heatmaps of every point
        # (over the search mask) and the fallback without a prior window (every body voxel of both images embedded
        # and searched)
        for mode, extra in (("ondemand", []), ("whole", ["--whole"]),
                            ("heatmaps", ["--heatmap-dir", str(work / f"{tag}_heatmaps")]),
                            ("heatmaps_model", ["--heatmap-dir", str(work / f"{tag}_heatmaps_model"),
                                                "--heatmap-grid", "model"]),
                            ("fallback", ["--prior-window", "0"])):
            out = work / f"{tag}_{mode}.csv"
            r = median_run([run_child(str(case.source), [str(case.target)], str(pts_csv), str(out), [*model, *extra])
                            for _ in range(args.reps if mode == "ondemand" else 1)])
            _, _, found = _read_found(out)
            row[mode] = r
            row[f"{mode}_err"] = float(np.mean(np.linalg.norm(found - case.truth_points_lps_mm, axis=1)))
            print(f"{tag} {mode}: {r['process_s']:.1f} s, {r['peak_rss_gb']:.2f} GB, error {row[f'{mode}_err']:.2f} mm",
                  flush=True)
        if not args.no_elastix:
            js = work / f"{tag}_elastix.json"
            t0, use0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, __file__, "elastix", str(case.source), str(case.target), "--points",
                            str(pts_csv), "--json", str(js)], check=True)
            e = json.loads(js.read_text())
            e["process_s"] = time.perf_counter() - t0
            e.update(cpu_use(use0))
            row["elastix"] = e
            row["elastix_err"] = float(np.mean(np.linalg.norm(np.array(e["points_lps_mm"]) - case.truth_points_lps_mm, axis=1)))
            print(f"{tag} elastix: {e['process_s']:.1f} s, {e['peak_rss_gb']:.2f} GB, error {row['elastix_err']:.2f} mm",
                  flush=True)
        rows.append(row)
    # one atlas into many: the first OpenKBP case's source into the five targets, one process, each target cold
    kbp = [c for c in cases if c.suite == "openkbp_inter"]
    atlas = None
    if kbp:
        src_pat, targets, pts_csv, cents = atlas_case(args.suites, kbp, args.openkbp_pairs, work)
        out = work / "atlas_ondemand.csv"
        runs = [run_child(str(kbp[0].source), [str(c.target) for c in targets], str(pts_csv), str(out), model)
                for _ in range(args.reps)]
        r = median_run(runs)
        r["per_target_mean_runs"] = [float(np.mean(x["per_target_s"][:len(targets)])) for x in runs]
        tnames, tlabels, found = _read_found(out)
        errs = []
        for t, lab, f in zip(tnames, tlabels, found):
            pat = next(c.meta["target_patient"] for c in targets if str(c.target) == t)
            if lab in cents[pat]:
                errs.append(float(np.linalg.norm(f - cents[pat][lab])))
        atlas = {"source": src_pat, "targets": [c.meta["target_patient"] for c in targets], "run": r,
                 "mean_err": float(np.mean(errs)), "n_points": len(errs)}
        print(f"atlas: {r['process_s']:.1f} s, per target {r['per_target_s']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    threads = run_threads()
    (work / "cold_start.json").write_text(json.dumps({"rows": rows, "atlas": atlas, "load_at_start": load_at_start,
                                                      "model": args.model, "threads": threads, "provenance": made},
                                                     indent=1, default=str))
    Path(args.out).write_text(report(rows, atlas, load_at_start, plot=_plot_path(args.out).name, model=args.model,
                                     threads=threads, made=made))
    print(f"wrote {args.out} and {plot_stages(rows, _plot_path(args.out), threads)}")
    return 0


#: the stages that are the network's own convolutions
NETWORK_STAGES = ("global map", "local map")


def floor_s(run: dict) -> float:
    """What a cold run's process would take with nothing but its start and exit, the ``imports`` stage (torch's
    import, with the engine's own modules: about 0.01 s of it) and the network's convolutions on the tiles this
    engine's schedule computes (seconds): a floor for this pipeline with this network and torch (checkpoint loading,
    0.04 s, left out too)."""
    st = run["stages"]
    start_exit = run["process_s"] - run["wall_s"] if "process_s" in run and "wall_s" in run else 0.0
    return start_exit + st.get("imports", 0.0) + sum(st.get(k, 0.0) for k in NETWORK_STAGES)


def _fmt_stages(run: dict) -> str:
    """A run's stage times, and its process's start and exit (process wall time minus the child's own)."""
    stages = dict(run["stages"])
    if "process_s" in run and "wall_s" in run:
        stages["start and exit"] = run["process_s"] - run["wall_s"]
    return ", ".join(f"{k} {stages[k]:.2f}" for k in (*ORDER, "start and exit") if k in stages and stages[k] >= 0.005)


#: the threads of a run that sets none (and of a run before they were recorded): one each
ONE_THREAD_EACH = {"torch": "1", "elastix": "1"}


def run_threads() -> dict[str, str]:
    """The threads of this run's processes: torch's (``OMP_NUM_THREADS``, 1 unless set: :func:`run_child`) and
    elastix's (``SAMEMBED_ELASTIX_THREADS``, 1 unless set: :func:`main`). Set both to the core count to measure the
    tools as a new user runs them (each with its default threads)."""
    return {"torch": os.environ.get("OMP_NUM_THREADS", ONE_THREAD_EACH["torch"]),
            "elastix": os.environ.get("SAMEMBED_ELASTIX_THREADS", ONE_THREAD_EACH["elastix"])}


def plot_stages(rows: list[dict], path: Path, threads: dict[str, str] | None = None) -> Path:
    """A bar per process, split by stage (seconds): each pair's cold SAM run (its median run's exclusive stage
    times, and the process's start and exit) above elastix's process (its imports and reading, then the
    registration). Written to ``path`` (PNG); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"torch import": ("imports",), "model": ("model",),
              "reading and preprocessing": ("reading", "prefetch wait", "preprocessing", "hashing", "body"),
              "global maps": ("global map",), "local tiles": ("local map", "assemble"),
              "prior, search, polish, round trip": ("prior", "search", "polish", "scores", "round trip"),
              "writing, bookkeeping, start and exit": ("writing", "other", "start and exit"),
              "elastix: imports and reading": (), "elastix: registration": ()}
    colours = dict(zip(groups, plt.get_cmap("tab10").colors))
    labels, bars = [], []
    for r in rows:
        if not r.get("ondemand"):
            continue
        run = r["ondemand"]
        st = dict(run["stages"])
        st["start and exit"] = max(0.0, run.get("process_s", run["wall_s"]) - run["wall_s"])
        name = r["case"].replace("openkbp_inter_", "").replace("lidc_synthetic_", "")
        labels.append(f"{name}\nSAM ({r['n']} points)")
        bars.append({g: sum(max(0.0, st.get(k, 0.0)) for k in ks) for g, ks in groups.items() if ks})
        if r.get("elastix"):
            e = r["elastix"]
            labels.append("elastix")
            bars.append({"elastix: imports and reading": e["process_s"] - e["registration_s"],
                         "elastix: registration": e["registration_s"]})
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.6))
    y = list(range(len(bars)))[::-1]
    for g in groups:
        left = [sum(b.get(h, 0.0) for h in list(groups)[:list(groups).index(g)]) for b in bars]
        ax.barh(y, [b.get(g, 0.0) for b in bars], left=left, color=colours[g], label=g, height=0.7)
    ax.set_yticks(y, labels, fontsize=7)
    threads = threads or ONE_THREAD_EACH
    each = (f"{threads['torch']} thread(s) each" if threads["torch"] == threads["elastix"]
            else f"torch {threads['torch']}, elastix {threads['elastix']} thread(s)")
    ax.set_xlabel(f"wall seconds, fresh process, no cache ({each})")
    ax.set_title("Cold samembed match against elastix affine + B-spline, by stage")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: what each precision runs in (``samembed.embedding.resolve_precision``), for the report's machine line
PRECISION_WORDS = {
    "int8-int8": "its int8 local branch, and its global branch's 3 x 3 convolutions at 8-32 mm in int8 too",
    "int8-bf16": "its int8 local branch, and its global branch in bfloat16",
    "int8": "its int8 local branch, and its global branch in float32",
    "fp32": "float32",
}


def precision_note(model: str) -> str:
    """What ``--precision auto`` runs for ``model`` on this CPU, and the CPU's own instructions (torch's capability,
    native bfloat16, VNNI): the network's speed depends on them, so a report names them."""
    import torch

    from samembed.embedding import resolve_precision
    from samembed.models import load_model
    from samembed.networks.int8 import int8_arithmetic, native_bf16

    try:
        precision = resolve_precision("auto", load_model(model), torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - the report says so rather than failing after the runs
        return f"`--precision auto` (not resolved here: {e})"
    vnni = "with VNNI" if int8_arithmetic() == "vnni" else "without VNNI"  # the int8 path the engine takes
    bf16 = "native bfloat16" if native_bf16() else "no native bfloat16"
    return (f"`--precision auto` = `{precision}`: {PRECISION_WORDS.get(precision, precision)}; this CPU: "
            f"{torch.backends.cpu.get_cpu_capability()}, {vnni}, {bf16}")


def _plot_path(report_md: str | Path) -> Path:
    """The stage plot beside a report: ``cold_start.md`` -> ``cold_start_stages.png``."""
    report_md = Path(report_md)
    return report_md.with_name(report_md.stem + "_stages.png")


def report(rows: list[dict], atlas: dict | None, load_at_start: float | None = None, plot: str | None = None,
           model: str = "default", threads: dict[str, str] | None = None, made: dict[str, str] | None = None) -> str:
    """The markdown report: per pair, on-demand and whole-volume SAM against elastix, stage times, RSS, ratios;
    ``plot`` names the stage plot beside it (:func:`plot_stages`); ``model`` is SAM's (``--model``); ``threads``
    the run's (:func:`run_threads`; one each for a run before they were recorded); ``made``: its
    :func:`provenance`."""
    threads = threads or ONE_THREAD_EACH
    env_prefix = "".join(f"{var}={threads[key]} " for var, key in (("OMP_NUM_THREADS", "torch"),
                                                                   ("SAMEMBED_ELASTIX_THREADS", "elastix"))
                         if threads[key] != ONE_THREAD_EACH[key])
    import platform

    import numpy as np

    load = os.getloadavg()
    start = f"{load_at_start:.1f} at the start, " if load_at_start is not None else ""
    itk_s = [r["elastix"]["imports_s"] for r in rows if r.get("elastix")]
    itk = f"{min(itk_s):.0f}-{max(itk_s):.0f} s" if itk_s else "a long time"
    reps = {len(r["ondemand"].get("process_s_runs", [0])) for r in rows}
    reported = "median" if all(n % 2 for n in reps) else " / ".join(sorted({median_words(n) for n in reps}))
    lines = [
        "# Cold start: `samembed match` (fresh process, no cache) against elastix affine + B-spline",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores (1-minute load average {start}{load[0]:.1f} at the "
        "end; the run's own processes count in it). Every number is wall time; on a shared VM absolute times vary "
        "from run to run, so the ratios, measured side by side, are the meaningful numbers. SAM: torch, OMP_NUM_THREADS="
        f"{threads['torch']}, model `{model}` ({'sam-lite-ct, ' if model == 'default' else ''}{precision_note(model)}), and, as `samembed match` does, a second process that reads and preprocesses the source "
        "and the first target while torch loads (`samembed.prefetch`, one ITK thread). elastix: "
        f"{threads['elastix']} thread(s), `samembed_bench.registration` settings "
        "(similarity + affine, then B-spline). ITK's own filters (reading, SAM's resampling) use ITK's default "
        f"threads on both sides. Command: `{env_prefix}python benchmarks/cold_start.py run"
        f"{'' if model == 'default' else f' --model {model}'}`. {provenance_line(made)}",
        "",
        "`process s` is the fresh process's wall time (interpreter start, imports, reading, everything); "
        "`whole` is the same engine forced to embed every voxel (the cold path before on-demand tiles); "
        "elastix `registration s` excludes its imports and file reading, `process s` includes them: importing "
        f"ITK's Python wrapping with elastix took {itk} in this run, so the registration-only ratio is the one to "
        "read for a user who runs elastix's own executable (whose start is not measured here).",
        "",
        f"| pair | points | SAM on-demand process s ({reported}, and the range of its runs) | peak RSS GB | SAM whole process s | peak RSS GB | elastix process s "
        "(registration s) | peak RSS GB | ratio elastix/SAM (process) | ratio elastix registration / SAM process | "
        "mean error SAM on-demand / whole / elastix mm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        od, wh, el = r["ondemand"], r["whole"], r.get("elastix")
        el_s = f"{el['process_s']:.1f} ({el['registration_s']:.1f})" if el else "-"
        ratio = f"{el['process_s'] / od['process_s']:.1f}x" if el else "-"
        reg_ratio = f"{el['registration_s'] / od['process_s']:.1f}x" if el else "-"
        runs = od.get("process_s_runs", [od["process_s"]])
        od_s = f"{od['process_s']:.1f}" + (f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else "")
        lines.append(f"| {r['case']} | {r['n']} | {od_s} | {od['peak_rss_gb']:.2f} | {wh['process_s']:.1f} | "
                     f"{wh['peak_rss_gb']:.2f} | {el_s} | {el['peak_rss_gb']:.2f} | {ratio} | {reg_ratio} | "
                     f"{r['ondemand_err']:.2f} / {r['whole_err']:.2f} / {r.get('elastix_err', float('nan')):.2f} |"
                     if el else
                     f"| {r['case']} | {r['n']} | {od_s} | {od['peak_rss_gb']:.2f} | {wh['process_s']:.1f} | "
                     f"{wh['peak_rss_gb']:.2f} | - | - | - | - | {r['ondemand_err']:.2f} / {r['whole_err']:.2f} / - |")
    if any(r.get("elastix") for r in rows):
        lines += ["", "What torch's import and the network alone take of each cold pair: `floor s` = the process's start "
                  "and exit, the imports (torch's, with the engine's own modules: about 0.01 s of it), and the global "
                  "and local maps (the network's own convolutions on the tiles this engine computes, in their stage "
                  "times above), the time this pipeline with this network and torch would take if everything else "
                  "(model loading, reading, preprocessing, storing tiles, the prior, search, polish, round trip, "
                  "writing) took none; `ratio ceiling` = elastix's process time over it, the most such an engine "
                  "could reach:", "",
                  "| pair | SAM process s | floor s (start and exit + torch import + global map + local map) | "
                  "floor share of the process | ratio now (process) | ratio ceiling (process) | ratio ceiling "
                  "(registration only) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            od, el = r["ondemand"], r.get("elastix")
            if not el:
                continue
            f = floor_s(od)
            lines.append(f"| {r['case']} | {od['process_s']:.2f} | {f:.2f} | {f / od['process_s']:.0%} | "
                         f"{el['process_s'] / od['process_s']:.1f}x | {el['process_s'] / f:.1f}x | "
                         f"{el['registration_s'] / f:.1f}x |")
    if all("heatmaps" in r and "fallback" in r for r in rows):
        lines += ["", "The command's other paths, one fresh process each (no cache): `--heatmap-dir` (a heatmap per point, "
                  "over the target's search mask; the searches as the default path's), in the target's geometry and "
                  "on the model's grid (`--heatmap-grid model`: the same maps at their own resolution), and "
                  "`--prior-window 0` (no window: every body voxel of both images embedded and searched, as when no "
                  "prior can be trusted):",
                  "", "| pair | heatmaps process s | peak RSS GB | CPU user + sys s | heatmaps on the model grid process "
                  "s | peak RSS GB | no window process s | peak RSS GB | CPU user + sys s | mean error no window mm |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            h, f, hm = r["heatmaps"], r["fallback"], r.get("heatmaps_model")
            cpu = [f"{x['user_s']:.1f} + {x['sys_s']:.1f}" if "sys_s" in x else "-" for x in (h, f)]
            small = f"{hm['process_s']:.1f} | {hm['peak_rss_gb']:.2f}" if hm else "- | -"  # not in runs before it
            lines.append(f"| {r['case']} | {h['process_s']:.1f} | {h['peak_rss_gb']:.2f} | {cpu[0]} | {small} | "
                         f"{f['process_s']:.1f} | {f['peak_rss_gb']:.2f} | {cpu[1]} | {r['fallback_err']:.2f} |")
    if plot:
        lines += ["", f"![Each process's wall time by stage: cold SAM above elastix, per pair]({plot})"]
    lines += ["", "Stage times of the on-demand runs (exclusive seconds; `other` = argument parsing and bookkeeping "
              "inside the process; `start and exit` = the interpreter's start before the child's clock and the "
              "process's exit after it, as the `samembed` command exits):", ""]
    for r in rows:
        lines.append(f"- {r['case']}: {_fmt_stages(r['ondemand'])}")
    lines += ["", "Stage times of the whole-volume runs:", ""]
    for r in rows:
        lines.append(f"- {r['case']}: {_fmt_stages(r['whole'])}")
    if all("sys_s" in r["ondemand"] for r in rows):
        lines += ["", "CPU time of each process, its children included (user s + system s), and its minor page faults "
                  "(first touches of a 4 KB page, each made and zeroed by the kernel: system time). This VM hands "
                  "memory that has been free for about two seconds back to its host, and touching such a page again "
                  "costs about 10 us (measured in a fresh process: its first GB 1.0-3.5 s, a GB freed and touched "
                  "again within a second 0.05-0.15 s), so system time grows with the memory a run touches and with "
                  "how recently the VM used it; it is most of the drift between runs:", ""]
        for r in rows:
            cells = [f"{name} {x['user_s']:.1f} + {x['sys_s']:.1f} s, {x['minor_faults'] / 1e3:.0f} k faults"
                     for name, x in (("on-demand", r["ondemand"]), ("whole", r["whole"]), ("elastix", r.get("elastix")))
                     if x and "sys_s" in x]
            lines.append(f"- {r['case']}: {'; '.join(cells)}")
    for suite in sorted({r["suite"] for r in rows}):
        sub = [r for r in rows if r["suite"] == suite]
        d = np.mean([r["ondemand_err"] for r in sub]) - np.mean([r["whole_err"] for r in sub])
        lines.append(f"\nAccuracy, {suite}: mean error on-demand minus whole-volume = {d:+.3f} mm.")
    if atlas:
        r = atlas["run"]
        per = r["per_target_s"][:-1] if len(r["per_target_s"]) > len(atlas["targets"]) else r["per_target_s"]
        el = [x["elastix"]["registration_s"] for x in rows if x["suite"] == "openkbp_inter" and x.get("elastix")]
        # with two or more of torch's threads the command matches the targets after the first two at a time (its
        # --jobs auto, samembed.jobs): the marks are then the targets' starts, whose intervals average to the time
        # per target, and the stage clocks of two threads overlap
        from samembed.jobs import auto_jobs

        at_once = auto_jobs(len(atlas["targets"]), int(threads["torch"]), "cpu") > 1
        lines += ["", "## One atlas into many", "",
                  f"Source {atlas['source']} (all its organ centroids) into {len(atlas['targets'])} OpenKBP targets "
                  f"({', '.join(atlas['targets'])}) in one fresh process: {r['process_s']:.1f} s in all, "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB; time per target after the first target started (each target "
                  f"cold, the source's tiles reused): {', '.join(f'{x:.1f}' for x in per)} s, mean {np.mean(per):.1f} s; "
                  f"mean centroid error {atlas['mean_err']:.1f} mm over {atlas['n_points']} points."
                  + (" The targets after the first were matched two at a time (`--jobs auto` on two threads): the "
                     "times are the intervals between the targets' starts, and their mean is the time per target."
                     if at_once else "")
                  + (f" {median_words(len(r['process_s_runs'])).capitalize()} (by process time); the mean per target "
                     f"of each run: {', '.join(f'{x:.2f}' for x in r['per_target_mean_runs'])} s."
                     if len(r.get("process_s_runs", [])) > 1 else "")]
        if el:
            lines.append(f"elastix B-spline registration per OpenKBP pair (imports and reading excluded): mean "
                         f"{np.mean(el):.1f} s, so **{np.mean(el) / np.mean(per):.1f}x** per target.")
        # the targets after the first: the source's local tiles (its clicks' and round trips' boxes) are made in the
        # first one's turn (its global map before it)
        net = [] if at_once else [sum(t.get(k, 0.0) for k in NETWORK_STAGES) for t in r.get("per_target_stages", [])[1:]]
        later = per[1:len(net) + 1]
        if net and later and np.mean(net) > 0:
            ratios = (f": now {np.mean(el) / np.mean(later):.1f}x per target over these targets (mean "
                      f"{np.mean(later):.2f} s), and at most **{np.mean(el) / np.mean(net):.1f}x**") if el else ""
            lines.append(f"The network alone (the target's global map and the local maps its searches need: "
                         f"{' + '.join(NETWORK_STAGES)}) took {', '.join(f'{x:.2f}' for x in net)} s of the targets "
                         f"after the first (mean {np.mean(net):.2f} s){ratios} for an engine with this network and "
                         f"tile schedule even if everything else took no time.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("SAMEMBED_ELASTIX_THREADS", "1")  # elastix's threads, as the run measured and the report says
    if argv and argv[0] == "child":
        return child(argv[1:])
    if argv and argv[0] == "elastix":
        return elastix_child(argv[1:])
    if argv and argv[0] == "run":
        return run(argv[1:])
    if argv and argv[0] == "report":  # render the report again from a run's JSON
        p = argparse.ArgumentParser(prog="cold_start.py report")
        p.add_argument("json", help="the run's cold_start.json (in its --work folder)")
        p.add_argument("--out", default="benchmarks/results/cold_start.md")
        args = p.parse_args(argv[1:])
        data = json.loads(Path(args.json).read_text())
        Path(args.out).write_text(report(data["rows"], data.get("atlas"), data.get("load_at_start"),
                                         plot=_plot_path(args.out).name, model=data.get("model", "default"),
                                         threads=data.get("threads"), made=data.get("provenance")))
        print(f"wrote {args.out} and {plot_stages(data['rows'], _plot_path(args.out), data.get('threads'))}")
        return 0
    raise SystemExit("usage: cold_start.py run [--out MD] | report JSON [--out MD] | child ... | elastix ...")


if __name__ == "__main__":
    sys.exit(main())
