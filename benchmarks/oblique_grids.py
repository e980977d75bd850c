"""Oblique grids: the same target on its own axial grid and resampled onto rotated grids, matched with the engine's
input on the grid's own axes and on the LPS axes.

An oblique acquisition (an MR slab planned along an organ, a CT with gantry tilt) holds the anatomy where it is,
on voxel axes that are not the patient's. The networks learnt from axial scans; ``samembed.preprocess`` resamples
a grid more oblique than ``OBLIQUE_LIMIT_DEG`` onto the LPS axes for them. This benchmark resamples each case's
target onto grids rotated about z and tilted about x (linear, air outside; the anatomy stays where it was, so the
true points do not move) and matches the case's points into it twice: with the input on the grid's own axes (the
engine before, ``OBLIQUE_LIMIT_DEG`` set to 180 for the run) and on the LPS axes (the engine now). Cases: the first
``lidc_synthetic`` case (LIDC-0001 into a known warp of itself, 50 points) and the first 6 ``openkbp_inter`` cases
(organ centroids between patients). Errors in mm against the cases' true points; default model, CPU, default
options (``samembed match``'s).

Usage (from the repository root)::

    python benchmarks/oblique_grids.py --out benchmarks/results/oblique_grids.md
    python benchmarks/oblique_grids.py --slab-mm 60 --out benchmarks/results/oblique_grids_slab60.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: (rotation about z, tilt about x) of the target's grid, degrees; (0, 0) is the target as it is
ANGLES = ((0.0, 0.0), (10.0, 0.0), (20.0, 0.0), (10.0, 10.0), (30.0, 0.0))


def rotation(about_z_deg: float, about_x_deg: float) -> np.ndarray:
    """The direction of a grid rotated by ``about_z_deg`` about z, then tilted by ``about_x_deg`` about x."""
    a, t = np.radians(about_z_deg), np.radians(about_x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])
    return rz @ rx


def on_rotated_grid(img, direction: np.ndarray, slab_mm: float | None = None):
    """``img`` (SimpleITK) resampled (linear, air outside) onto a grid of its spacing with ``direction``, centred on
    its centre, 1.3 times its size along each axis (so that the rotated grid still holds it), or, with ``slab_mm``,
    only that thick along the grid's third axis (an oblique slab, as an MR acquisition planned along an organ)."""
    import SimpleITK as sitk

    size, spacing = np.array(img.GetSize()), np.array(img.GetSpacing())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint((size - 1) / 2))
    n = (size * 1.3).astype(int)
    if slab_mm is not None:
        n[2] = int(round(slab_mm / spacing[2]))
    origin = centre - direction @ ((n - 1) / 2 * spacing)
    return sitk.Resample(img, [int(v) for v in n], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         spacing.tolist(), direction.ravel().tolist(), -1024, img.GetPixelID())


def _well_inside(img, point_lps_mm, margin_voxels: float = 3.0) -> bool:
    """``point_lps_mm`` lies inside ``img``'s grid, ``margin_voxels`` from its faces (a point of a slab's case)."""
    index = np.array(img.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps_mm]))
    return bool(np.all(index > margin_voxels - 0.5) and np.all(index < np.array(img.GetSize()) - 0.5 - margin_voxels))


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "SAMEmbedding"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import SimpleITK as sitk
    from samembed_bench.cases import read_cases
    from samembed_bench.suites import build_suites

    import samembed.preprocess as pp
    from samembed import Matcher
    from samembed.io import image_from_sitk, read_image

    p = argparse.ArgumentParser(prog="oblique_grids.py")
    p.add_argument("--suites", default=str(REPO / "cache" / "suites"))
    p.add_argument("--openkbp-cases", type=int, default=6)
    p.add_argument("--slab-mm", type=float, default=None,
                   help="rotated grids only this thick (mm) along their third axis; the points inside them only")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "oblique_grids.md"))
    args = p.parse_args(argv)
    build_suites(args.suites, ["lidc_synthetic", "openkbp_inter"])
    suites = {"lidc_synthetic": read_cases(Path(args.suites) / "lidc_synthetic" / "cases.json")[:1],
              "openkbp_inter": read_cases(Path(args.suites) / "openkbp_inter" / "cases.json")[:args.openkbp_cases]}
    limit = pp.OBLIQUE_LIMIT_DEG
    matcher = Matcher("default", device="cpu")
    rows, plot = [], {}
    t0 = time.perf_counter()
    for suite, cases in suites.items():
        sources = {c.source: read_image(c.source) for c in cases}
        for about_z, about_x in ANGLES:
            modes = [("as it is", limit)] if (about_z, about_x) == (0.0, 0.0) else [("own axes", 180.0), ("LPS axes", limit)]
            for mode, mode_limit in modes:
                pp.OBLIQUE_LIMIT_DEG = mode_limit
                errors = []
                try:
                    for c in cases:
                        target = sitk.ReadImage(str(c.target))
                        if (about_z, about_x) != (0.0, 0.0) or args.slab_mm is not None:
                            target = on_rotated_grid(target, rotation(about_z, about_x), args.slab_mm)
                        truth, queries = np.asarray(c.truth_points_lps_mm), np.asarray(c.query_points_lps_mm)
                        inside = np.array([_well_inside(target, p) for p in truth])
                        if not inside.any():
                            continue
                        image = image_from_sitk(target, f"{Path(str(c.target)).name} rotated {about_z}/{about_x}")
                        result = matcher.match(sources[c.source], queries[inside], [image])
                        found = np.array([m.point_lps_mm for m in result.matches])
                        errors += np.linalg.norm(found - truth[inside], axis=1).tolist()
                finally:
                    pp.OBLIQUE_LIMIT_DEG = limit
                e = np.array(errors)
                rows.append(f"| {suite} | {about_z:g} / {about_x:g} | {mode} | {len(e)} | {e.mean():.2f} | "
                            f"{np.median(e):.2f} | {(e > 10).sum()} | {(e > 30).sum()} |")
                plot.setdefault(suite, []).append((f"{about_z:g}/{about_x:g}", mode, float(e.mean())))
                print(rows[-1], flush=True)
    out = Path(args.out)
    png = out.with_name(out.stem + ".png")
    _plot(plot, png)
    text = "\n".join([
        "# Oblique grids: the input on the grid's own axes against the LPS axes", "",
        "Default model, CPU, `samembed match`'s default options; "
        f"{time.perf_counter() - t0:.0f} s. Each case's target resampled (linear, air outside) onto a grid rotated "
        "about z, then tilted about x (degrees), its anatomy where it was: the true points do not move. `own axes`: "
        "the network's input on the grid's own axes (permuted and flipped onto LPS), as the engine did for every "
        f"grid before; `LPS axes`: resampled onto the LPS axes, as the engine does now for grids more oblique than "
        f"{limit:g} degrees (`samembed.preprocess.OBLIQUE_LIMIT_DEG`). Errors in mm against the true points."
        + (f" Every target grid, the unrotated one too, is a slab {args.slab_mm:g} mm thick along its third axis "
           "(`--slab-mm`), through the image's centre; the points of a case whose true position lies inside it "
           "(3 voxels from its faces) only." if args.slab_mm is not None else "")
        + f" Command: `python benchmarks/oblique_grids.py{f' --slab-mm {args.slab_mm:g}' if args.slab_mm else ''}`.", "",
        "| suite | rotation / tilt, degrees | network input | points | mean error | median error | > 10 mm | > 30 mm |",
        "|---|---|---|---:|---:|---:|---:|---:|", *rows, "", f"![Mean error per grid rotation]({png.name})", ""])
    out.write_text(text)
    print(f"wrote {out} and {png}")
    return 0


def _plot(plot: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plot), figsize=(5 * len(plot), 3.5))
    for ax, (suite, values) in zip(np.atleast_1d(axes), plot.items()):
        angles = list(dict.fromkeys(a for a, _, _ in values))
        for mode in ("own axes", "LPS axes"):
            pts = [(angles.index(a), v) for a, m, v in values if m == mode or (m == "as it is")]
            ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", label=f"input on the {mode}")
        ax.set_xticks(range(len(angles)), angles)
        ax.set_xlabel("grid rotation / tilt, degrees")
        ax.set_ylabel("mean error, mm")
        ax.set_title(suite)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
