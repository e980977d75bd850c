#!/usr/bin/env python
"""Would an exact bound on the local similarity shrink the on-demand tiles? A measurement, outside the engine.

A windowed search takes each query's best SAM similarity ``s = (l + g) / 2`` over its ±50 mm window (issue 13's
cold path), where ``l`` is the local cosine (at most 1) and ``g`` the global one, which the whole-volume global map
gives everywhere without a local tile. A voxel whose bound ``(1 + g) / 2`` is below the window's best score ``S``
cannot be the match, so its local vector need not be computed: branch and bound, exact (the same match and score).
Before building it, this measures what it would save, on the cold-start pairs (LIDC-0001 against its warp, five
OpenKBP pairs), forward (the clicks into the target) and back (the truth into the source: the round trip's search):

- ``window``: the local tiles the engine computes today (the windows' allowed voxels);
- ``exact``: the voxels whose bound reaches ``S`` (known only after the search: the best any pruning can do);
- ``guess λ``: the voxels whose bound reaches ``min(S, (g* + λ) / 2)``, with ``g*`` the window's best global
  similarity, the best a one-pass scheme that guesses the local similarity at the match as ``λ`` can do; ``second``
  counts the windows whose guess was too high (``S`` below it: a second pass of tiles).

Every pruned set is grown by one voxel (the sub-voxel fit reads the match's neighbours) and its cost is counted as
the engine's tile planner (:func:`samembed.tiles.plan_tiles`) would cover it: input voxels, halos included
(32 input voxels per side for ``sam-lite``). Writes ``benchmarks/results/window_pruning.md``::

    OMP_NUM_THREADS=1 PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/window_pruning.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))

from samembed_bench.cases import read_cases  # noqa: E402
from samembed_bench.suites import build_suites  # noqa: E402

from samembed.io import write_text_atomic  # noqa: E402

#: the guessed local similarities at the match
LAMBDAS = (0.5, 0.6, 0.7, 0.8)
#: how far a voxel's stored local cosine may exceed 1 (float rounding), on the safe side
EPS = 1e-3


def tile_cost_mvox(mask_zyx: np.ndarray, spec, shape_zyx: tuple[int, ...]) -> float:
    """Input voxels (millions, halos included) of the tiles :func:`~samembed.tiles.plan_tiles` plans for the local
    voxels ``mask_zyx``; the whole (padded) input when it plans the whole volume."""
    from samembed.tiles import plan_tiles

    stride, step = spec.local_stride[-1], spec.tile_multiple[-1]
    halo = int(np.ceil(spec.tile_halo / step) * step)
    shape_in = tuple(stride * s for s in shape_zyx)
    if not mask_zyx.any():
        return 0.0
    plan = plan_tiles(mask_zyx, stride, step, halo, shape_in)
    if plan.whole:
        return float(np.prod(shape_in)) / 1e6
    return sum(float(np.prod([min(n, b + halo) - max(0, a - halo) for a, b, n in zip(start, stop, shape_in)]))
               for start, stop in plan.boxes_input) / 1e6


def pruned_costs(matcher, src_maps, points_lps_mm: np.ndarray, tgt_maps, prior: np.ndarray,
                 window_mm: float) -> dict:
    """The tile costs (see the module docstring) of matching ``points_lps_mm`` from ``src_maps`` into ``tgt_maps``
    (both embedded whole) within ±``window_mm`` of the ``prior``'s predictions."""
    import torch
    from scipy.ndimage import binary_dilation

    from samembed.affine import apply_affine
    from samembed.matcher import _window_boxes, nearest_voxel_lps, query_vectors

    allowed = tgt_maps.search_mask(True)
    q = query_vectors(src_maps, nearest_voxel_lps(src_maps, points_lps_mm))
    lo, hi, _ = _window_boxes(q, tgt_maps, allowed, window_mm, apply_affine(prior, points_lps_mm))
    shape = tgt_maps.local_grid.shape_zyx
    cl = tgt_maps.local_channels
    vvol = tgt_maps.vectors.reshape(*shape, cl)
    ok_all = allowed.reshape(shape)
    sets = {name: np.zeros(shape, dtype=bool) for name in ("window", "exact", *LAMBDAS)}
    second = dict.fromkeys(LAMBDAS, 0)
    for n in range(len(q)):
        box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo[n], hi[n]))
        size = tuple(s.stop - s.start for s in box)
        g = tgt_maps.global_similarity_box(q[n:n + 1, cl:], lo[n], hi[n]).reshape(size)
        local = (vvol[box].reshape(-1, cl).float() @ q[n, :cl].float()).reshape(size)
        ok = ok_all[box]
        best = float(((g + local) / 2).masked_fill(~ok, float("-inf")).max())
        g_star = float(g.masked_fill(~ok, float("-inf")).max())
        bound = (1 + EPS + g) / 2
        sets["window"][box] |= ok.numpy()
        sets["exact"][box] |= (ok & (bound >= best)).numpy()
        for lam in LAMBDAS:
            guess = (g_star + lam) / 2
            second[lam] += int(best < guess)
            sets[lam][box] |= (ok & (bound >= min(guess, best))).numpy()
    grow = np.ones((3,) * len(shape), dtype=bool)
    spec = matcher.embedder.tile_network.spec
    out = {"points": len(q), "window": tile_cost_mvox(sets["window"], spec, shape)}
    for name in ("exact", *LAMBDAS):
        out[name] = tile_cost_mvox(binary_dilation(sets[name], grow) & ok_all.numpy(), spec, shape)
    out["second"] = second
    del torch
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--suite-dir", default=str(REPO / "cache" / "suites"))
    p.add_argument("--openkbp-pairs", type=int, default=5)
    p.add_argument("--window-mm", type=float, default=50.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "window_pruning.md"))
    args = p.parse_args()
    import torch

    from samembed import Matcher
    from samembed.io import read_image

    torch.set_num_threads(1)
    paths = build_suites(args.suite_dir, ["lidc_synthetic", "openkbp_inter"])
    cases = read_cases(paths["lidc_synthetic"])[:1] + read_cases(paths["openkbp_inter"])[:args.openkbp_pairs]
    matcher = Matcher(args.model, device="cpu")
    rows = []
    for c in cases:
        src, tgt = matcher.embedder.embed(read_image(c.source)), matcher.embedder.embed(read_image(c.target))
        prior = matcher._prior(src, tgt)
        if prior is None:  # no trustworthy prior: the engine searches the whole target, no window to prune
            print(f"{c.suite}/{c.case_id}: no prior, skipped", flush=True)
            continue
        for way, maps, pts, other, affine in (
                ("forward", src, c.query_points_lps_mm, tgt, prior),
                ("back", tgt, c.truth_points_lps_mm, src, np.linalg.inv(prior))):
            r = pruned_costs(matcher, maps, np.asarray(pts, dtype=np.float64), other, affine, args.window_mm)
            rows.append({"case": f"{c.suite}/{c.case_id}", "way": way, **r})
            print(rows[-1], flush=True)
    lines = ["# Exact window pruning by a bound on the local similarity: what it would save", "",
             f"- date: {dt.datetime.now():%Y-%m-%d %H:%M}; model `{args.model}`; window ±{args.window_mm:g} mm",
             "- command: `OMP_NUM_THREADS=1 PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/window_pruning.py`",
             "- cost: input voxels (millions) of the local tiles, halos included; see the script's docstring", "",
             "| pair | way | points | window (today) | exact | " + " | ".join(f"guess λ={lam:g} (second passes)"
                                                                      for lam in LAMBDAS) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(LAMBDAS)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['way']} | {r['points']} | {r['window']:.2f} | {r['exact']:.2f} | "
                     + " | ".join(f"{r[lam]:.2f} ({r['second'][lam]})" for lam in LAMBDAS) + " |")
    total = {k: sum(r[k] for r in rows if not r["case"].startswith("lidc")) for k in ("window", "exact", *LAMBDAS)}
    lines += ["", f"OpenKBP pairs, summed: today {total['window']:.1f} M input voxels; exact pruning (the best case) "
              f"{total['exact']:.1f} M ({100 * (1 - total['exact'] / total['window']):.0f} % less); a one-pass guess "
              + ", ".join(f"λ={lam:g} {total[lam]:.1f} M ({100 * (1 - total[lam] / total['window']):.0f} % less)"
                          for lam in LAMBDAS) + " (the second passes' voxels counted in, as if covered in the same "
              "pass: their own tiles' halos would add to it).", ""]
    write_text_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
