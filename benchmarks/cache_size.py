#!/usr/bin/env python
"""Disk-cache entry sizes of whole 128³ CTs (issue 13's target: one 128³ CT takes ≤ 40 MB on disk).

Runs ``samembed embed`` (every body voxel, as the command stores it: body voxels only, the local vectors as packed
directions, the global map in half precision) on the first
``--scans`` OpenKBP CTs of ``../shared/data`` into a temporary cache folder, reads each entry's size and stored
voxels from ``samembed cache info``'s summary, and writes a Markdown table and a histogram::

    OMP_NUM_THREADS=1 python benchmarks/cache_size.py --scans 40 --out benchmarks/results/cache_size.md

Without ``../shared/data`` it says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))

from samembed.tiles import DIRECTION_BITS, cache_info  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ct" / "openkbp" / "ct"
TARGET_MB = 40.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", type=int, default=40, help="how many OpenKBP CTs (by name), default 40")
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cache_size.md")
    args = p.parse_args(argv)
    scans = sorted(DATA.glob("pt_*_ct.nii.gz"))[: args.scans]
    if not scans:
        print(f"no OpenKBP CTs under {DATA}: place ../shared/data beside the repository", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="samembed-cache-size-") as folder:
        command = "import sys; from samembed.cli import run; sys.argv[0] = 'samembed'; run()"
        subprocess.run([sys.executable, "-c", command, "embed", "-q", "--model", args.model, "--cache-dir", folder,
                        *map(str, scans)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "SAMEmbedding"), "OMP_NUM_THREADS": "1"})
        details = cache_info(folder)["details"]
    unusable = [d for d in details if "damaged" in d or not d.get("stored_voxels")]
    if unusable:  # the command wrote them: a damaged or empty entry is a failure of this run, named
        for d in unusable:
            print(f"{d['file']}: {d.get('damaged') or 'no voxels stored'}", file=sys.stderr)
        return 1
    rows = sorted(((Path(d["image"]).name, d["bytes"] / 1e6, d["stored_voxels"], d["grid_zyx"]) for d in details),
                  key=lambda r: -r[1])
    mb = np.array([r[1] for r in rows])
    over = [r for r in rows if r[1] > TARGET_MB]
    lines = [
        "# Disk-cache entry sizes of whole OpenKBP CTs",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/cache_size.py --scans {args.scans}`; model `{args.model}`; "
        "`samembed embed` (every body voxel, as the command stores them: body voxels only, the local vectors as "
        f"{DIRECTION_BITS}-bit directions, the global map in half precision).",
        "",
        f"{len(rows)} CTs: median {np.median(mb):.1f} MB, range {mb.min():.1f}-{mb.max():.1f} MB; "
        f"{len(over)} of {len(rows)} above the issue's {TARGET_MB:.0f} MB. An entry takes about "
        f"{np.median([m * 1e6 / v for _, m, v, _ in rows]):.0f} bytes per stored (body) voxel of the local grid (its "
        "local vector, and its share of the global map), so its size follows the body's volume in the field of view, "
        "not the 128³ voxel count.",
        "",
        "| CT | MB | stored voxels | local grid (z, y, x) |",
        "|---|---:|---:|---|",
        *[f"| {n} | {m:.1f} | {v:,} | {'x'.join(map(str, g))} |" for n, m, v, g in rows],
        "",
        f"![Entry sizes]({args.out.stem}.png)",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(mb, bins=20, color="tab:blue")
    ax.axvline(TARGET_MB, color="tab:red", linestyle="--", label=f"target {TARGET_MB:.0f} MB")
    ax.set_xlabel("cache entry, MB")
    ax.set_ylabel("CTs")
    ax.set_title(f"Disk-cache entries of {len(rows)} whole OpenKBP CTs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
