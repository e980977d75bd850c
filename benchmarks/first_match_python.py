"""The first match of a new pair from Python (the Slicer console, a script): ``Matcher.match`` on images already
read, in one process, with the first target embedded beside the source (the engine's way on a CPU of two threads or
more) against one after the other (the way before, forced here by having the engine believe the source cached).

Usage (from the repository root, with ../shared/data beside it)::

    PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/first_match_python.py [--reps 5] [--out FILE]

Each run is a new ``Matcher`` (empty caches) matching one point (the source's centre, as a click) into one target;
the two ways alternate. Reported: the median (range) of the whole call and of its embedding (the source's and the
first target's, ``MatchResult.timings``: their sum one after the other, the longer of the two at once), and whether
every run's matches were the same, bit for bit. torch's own
thread count (every core) unless ``OMP_NUM_THREADS`` says otherwise; with one thread both ways are the same.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))
WAYS = ("one after the other", "at once")


def cases(work: Path) -> list[tuple[str, Path, Path]]:
    """(name, source, target): two CTs in 0.5 mm slices (written once by ``first_click.thin_slice_case``), LIDC-0001
    and its warp (the cold-start suite's), a head-and-neck pair of OpenKBP."""
    from first_click import thin_slice_case

    thin = thin_slice_case(work)[0]
    kbp = DATA / "ct" / "openkbp" / "ct"
    return [("two CTs in 0.5 mm slices", thin[0], thin[1]),
            ("LIDC-0001 and its warp", DATA / "ct" / "lidc" / "LIDC-IDRI-0001_ct.nii.gz",
             REPO / "cache" / "suites" / "lidc_synthetic" / "images" / "lidc_0001_warp0.nii.gz"),
            ("OpenKBP pt_215 -> pt_232", kbp / "pt_215_ct.nii.gz", kbp / "pt_232_ct.nii.gz")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--work", default=str(REPO / "cache" / "first_click"))
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: the shared data folder {DATA} is missing (set SAMEMBED_DATA)")
        return 0
    import numpy as np
    import torch
    from cold_ab import median_range

    from samembed import Matcher
    from samembed.io import read_image

    lines = [f"The first match of a new pair from Python (`Matcher.match`, one point, images already read), torch on "
             f"{torch.get_num_threads()} threads, the two ways alternating, {args.reps} runs each: median (range) "
             "seconds. Command: `python benchmarks/first_match_python.py`.", "",
             "| pair | call, one after the other | call, at once | speed-up | embedding, one after the other | "
             "embedding, at once | same matches |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, source_path, target_path in cases(Path(args.work)):
        if not target_path.is_file():
            print(f"{name}: skipped, {target_path} is missing (benchmarks/cold_start.py builds the suites)")
            continue
        source, target = read_image(source_path), read_image(target_path)
        g = source.grid
        click = g.index_to_lps(((np.asarray(g.size_ijk) - 1) / 2.0)[None])
        calls: dict[str, list[float]] = {w: [] for w in WAYS}
        embeds: dict[str, list[float]] = {w: [] for w in WAYS}
        found = []
        for _ in range(args.reps):
            for way in WAYS:
                matcher = Matcher("default", device="cpu")
                if way == WAYS[0]:
                    matcher.embedder.holds = lambda image: True  # the source "cached": embedded alone
                t0 = time.perf_counter()
                result = matcher.match(source, click, [target])
                calls[way].append(time.perf_counter() - t0)
                source_s, target_s = result.timings["source_embed_s"], result.timings["target0_embed_s"]
                # the embedding's wall time: at once, the two overlap (each timed on its own)
                embeds[way].append(source_s + target_s if way == WAYS[0] else max(source_s, target_s))
                found.append(np.array([[*m.point_lps_mm, m.score] for m in result.matches]))
        same = all(np.array_equal(found[0], f) for f in found)
        cell = functools.partial(median_range, digits=3)
        speed = statistics.median(calls[WAYS[0]]) / statistics.median(calls[WAYS[1]])
        lines.append(f"| {name} | {cell(calls[WAYS[0]])} | {cell(calls[WAYS[1]])} | {speed:.2f}x | "
                     f"{cell(embeds[WAYS[0]])} | {cell(embeds[WAYS[1]])} | {'yes' if same else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
