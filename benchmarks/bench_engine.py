"""Engine benchmark: embedding time and peak memory, per-query latency, cost growth with volume size.

Usage (from the repository root, with ../shared/data beside it)::

    python benchmarks/bench_engine.py [--models default,sam-official] [--threads 2] [--out benchmarks/results/engine.md]

Cost growth: LIDC-0001 cropped to 0.5 and 0.75 of its extent per axis and padded with air to 1.25 (same voxel
size), so the model grid grows with the volume.

Each measurement runs in a fresh subprocess so that peak RSS is that of one embedding. ``sam-official``
uses random weights (the architecture's cost does not depend on the weights). Prints a markdown table and
writes it to ``--out``. Targets for sam-lite on 2 cores: embed <= 5 s, peak RSS <= 4 GB, <= 50 ms per query
per target with a warm cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from samembed.api import Matcher, as_image
from samembed.options import MatchOptions
from samembed.io import image_from_sitk, image_to_sitk
import SimpleITK as sitk
model, path, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.perf_counter()
img = as_image(path)
if scale != 1.0:
    # the physical extent changes by `scale` per axis at the same voxel size: a central crop (< 1) or air
    # padding around the volume (> 1), so the model grid, and the cost, grow with the scale
    s = image_to_sitk(img)
    n0 = np.array(s.GetSize())
    size = [max(1, int(round(n * scale))) for n in n0]
    shift = np.array(s.GetDirection()).reshape(3, 3) @ (np.array(s.GetSpacing()) * (n0 - np.array(size)) / 2.0)
    s = sitk.Resample(s, size, sitk.Transform(), sitk.sitkLinear, tuple(np.array(s.GetOrigin()) + shift), s.GetSpacing(),
                      s.GetDirection(), -1024, s.GetPixelID())
    img = image_from_sitk(s, path)
t_read = time.perf_counter() - t0
m = Matcher(model, device="cpu")
options = MatchOptions()  # the default settings, as `samembed match` uses them
t1 = time.perf_counter()
maps = m.embed(img)
t_embed = time.perf_counter() - t1
out = {"read_s": t_read, "embed_s": t_embed, "input_shape": list(img.array.shape), "local_shape": list(maps.local.shape[1:]),
       "cache_mb": maps.nbytes / 1e6}
# warm-cache query latency (source = target = this image)
rng = np.random.default_rng(0)
idx = np.argwhere(maps.search_mask(True).reshape(maps.local_grid.shape_zyx).numpy())
for n in (1, 10, 100):
    pick = idx[rng.choice(len(idx), n)][:, ::-1]
    pts = maps.local_grid.index_to_lps(pick.astype(float))
    m.match(img, pts, [img], options=options)  # warm-up
    t2 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        m.match(img, pts, [img], options=options)
    out[f"query_{n}_ms"] = (time.perf_counter() - t2) / reps * 1000
# VmHWM starts afresh at exec (ru_maxrss would keep the forked parent's peak)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
out["peak_rss_gb"] = (hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024**2
print("RESULT " + json.dumps(out))
"""


def run_case(model: str, path: Path, scale: float, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-c", CHILD, model, str(path), str(scale), str(threads)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark child failed for {model} {path}:\n{res.stderr[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default,random:sam-official")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine.md"))
    args = ap.parse_args()
    lidc = DATA / "ct" / "lidc" / "LIDC-IDRI-0001_ct.nii.gz"
    popi = DATA / "ct" / "popi" / "popi_00_ct.nii.gz"
    if not lidc.is_file() or not popi.is_file():
        print(f"skipped: real data not found under {DATA} (set SAMEMBED_DATA)")
        return 0
    rows = []
    for model in args.models.split(","):
        for name, path, scale in (("LIDC-0001 512x512x133", lidc, 1.0), ("POPI 482x360x141", popi, 1.0),
                                  ("LIDC-0001 central crop, extent x0.5 per axis", lidc, 0.5),
                                  ("LIDC-0001 central crop, extent x0.75 per axis", lidc, 0.75),
                                  ("LIDC-0001 air-padded, extent x1.25 per axis", lidc, 1.25)):
            t = time.perf_counter()
            r = run_case(model, path, scale, args.threads)
            r.update(model=model, case=name, wall_s=time.perf_counter() - t)
            rows.append(r)
            print(json.dumps(r), flush=True)
    lines = [f"Engine benchmark, CPU, {args.threads} threads ({time.strftime('%Y-%m-%d')}); command: "
             f"`python benchmarks/bench_engine.py --models {args.models} --threads {args.threads}`", "",
             "| model | volume | input voxels (z,y,x) | local grid (z,y,x) | embed s | peak RSS GB | cache MB | 1 query ms | 10 queries ms/query | 100 queries ms/query |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['case']} | {r['input_shape']} | {r['local_shape']} | {r['embed_s']:.2f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['cache_mb']:.0f} | {r['query_1_ms']:.0f} | {r['query_10_ms'] / 10:.1f} | {r['query_100_ms'] / 100:.1f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
