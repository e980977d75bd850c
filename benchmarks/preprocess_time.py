"""Preprocessing time: ``samembed.preprocess.preprocess`` (resampling to the model's spacing, intensity mapping) of
real images, the median of several runs in one process, on one core.

Usage (from the repository root, with ../shared/data beside it)::

    PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/preprocess_time.py [--reps 5] [--out FILE]

Images: a chest CT in 0.5 mm slices (LIDC-0001 resampled along z, written once by ``first_click.thin_slice_case``
into ``cache/first_click/thin``), LIDC-0001 itself (2.5 mm slices) and a head-and-neck CT of OpenKBP (4 x 4 x 2.5 mm,
upsampled to 2 mm). To compare two engines, run it with each checkout's ``SAMEmbedding`` on ``PYTHONPATH``, one
after the other (this VM's speed drifts: alternate them and look at the spread). The cold path preprocesses every
image, in the prefetch process while torch loads (``samembed.prefetch``), or in the engine itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))


def cases(work: Path) -> list[tuple[str, Path]]:
    """(name, path) of the images timed; the thin-slice CT is written into ``work`` when missing."""
    from first_click import thin_slice_case

    thin = thin_slice_case(work)[0][0]
    return [("LIDC-0001 in 0.5 mm slices", thin), ("LIDC-0001", DATA / "ct" / "lidc" / "LIDC-IDRI-0001_ct.nii.gz"),
            ("OpenKBP pt_215", DATA / "ct" / "openkbp" / "ct" / "pt_215_ct.nii.gz")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--work", default=str(REPO / "cache" / "first_click"))
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: the shared data folder {DATA} is missing (set SAMEMBED_DATA)")
        return 0
    from cold_ab import median_range

    import samembed
    from samembed.io import read_image
    from samembed.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig()
    lines = [f"Preprocessing (`samembed.preprocess.preprocess`, the default model's settings), engine at "
             f"`{Path(samembed.__file__).parent}`, median (range) of {args.reps} runs, one process:", "",
             "| image | voxels (z, y, x) | spacing mm (x, y, z) | model grid | seconds |", "|---|---|---|---|---:|"]
    for name, path in cases(Path(args.work)):
        image = read_image(path)
        times, prepared = [], None
        for _ in range(args.reps):
            t0 = time.perf_counter()
            prepared = preprocess(image, config)
            times.append(time.perf_counter() - t0)
        spacing = ", ".join(f"{v:g}" for v in image.grid.spacing_mm)
        lines.append(f"| {name} | {tuple(image.array.shape)} | {spacing} | {tuple(prepared.array.shape)} | "
                     f"{median_range(times, 3)} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
