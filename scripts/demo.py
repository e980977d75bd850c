"""SAMEmbedding demo: match landmarks from one CT into another, print errors and timings, draw a heatmap.

With ``../shared/data`` (or ``$SAMEMBED_DATA``): the 40 POPI landmarks of the breathing CT phase 00 are matched
into a copy of that CT deformed by the real 00 -> 50 landmark motion (a thin-plate spline), so every match has
an exact ground truth. Without it: two public 3D Slicer sample CTs are downloaded (SHA-256 checked) and a few
points are matched between them (no ground truth, so no errors are printed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))
SLICER_SAMPLES = {  # 3D Slicer SampleData (SlicerTestingData release assets addressed by their SHA-256)
    "CTChest.nrrd": "4507b664690840abb6cb9af2d919377ffc4ef75b167cb6fd0f747befdb12e38e",
    "CTACardio.nrrd": "3b0d4eb1a7d8ebb0c5a89cc0504640f76a030b4e869e33ff34c564c3d3b88ad2",
}


def popi_pair(out_dir: Path):
    """POPI phase 00 CT, its deformed copy (00 -> 50 motion), the 40 source landmarks and their true targets."""
    from samembed_bench.suites import build_popi_synthetic

    case = build_popi_synthetic(out_dir, DATA, seed=0, phases=("50",))[0]
    return case.source, case.target, case.labels, case.query_points_lps_mm, case.truth_points_lps_mm


def download_samples(out_dir: Path) -> list[Path]:
    """Download the two Slicer sample CTs (once), verifying their SHA-256."""
    paths = []
    for name, sha in SLICER_SAMPLES.items():
        path = out_dir / name
        if not path.is_file():
            url = f"https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/{sha}"
            print(f"downloading {name} from {url}")
            tmp = path.with_suffix(".part")
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 - fixed https URL
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if digest != sha:
                tmp.unlink()
                raise SystemExit(f"{name}: SHA-256 {digest} does not match {sha}; download refused")
            tmp.rename(path)
        paths.append(path)
    return paths


def heatmap_png(target, heatmap, point_lps_mm, truth_lps_mm, path: Path, title: str) -> None:
    """Axial slice of the target through the match, with the similarity heatmap on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(round(target.grid.lps_to_index(point_lps_mm[None])[0][2]))
    k = int(np.clip(k, 0, target.array.shape[0] - 1))
    sp = target.grid.spacing_mm
    extent = (0, target.array.shape[2] * sp[0], target.array.shape[1] * sp[1], 0)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(np.clip(target.array[k], -1000, 400), cmap="gray", extent=extent)
    hm = ax.imshow(np.ma.masked_less(heatmap.array[k], 0.3), cmap="inferno", alpha=0.55, vmin=0.3, vmax=1.0, extent=extent)
    for p, style, lab in ((point_lps_mm, "c+", "match"), (truth_lps_mm, "gx", "truth")):
        if p is not None:
            ijk = target.grid.lps_to_index(p[None])[0]
            ax.plot(ijk[0] * sp[0], ijk[1] * sp[1], style, ms=14, mew=2, label=lab)
    ax.legend(loc="lower right")
    ax.set_title(title)
    ax.set_xlabel("mm")
    fig.colorbar(hm, ax=ax, label="SAM similarity (mean cosine, -1..1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model name, checkpoint path or random:sam-lite")
    ap.add_argument("--out", default=str(REPO / "demo_output"))
    ap.add_argument("--refine", action="store_true")
    ap.add_argument("--polish", action=argparse.BooleanOptionalAction, default=None,
                    help="sub-voxel intensity polish of each match (default: samembed.MatchOptions' default, on)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from samembed import Matcher, MatchOptions
    from samembed.errors import SamEmbedError
    from samembed.io import read_image

    t0 = time.perf_counter()
    if (DATA / "ct" / "popi" / "popi_00_ct.nii.gz").is_file():
        source_path, target_path, labels, pts, truth = popi_pair(out / "popi_pair")
        print(f"POPI phase 00 -> deformed copy (real 00->50 breathing motion): {len(pts)} landmarks")
    else:
        print(f"{DATA} not found: using two public 3D Slicer sample CTs instead")
        source_path, target_path = download_samples(out / "samples")
        src = read_image(source_path)
        centre = src.grid.index_to_lps([[(n - 1) / 2 for n in src.grid.size_ijk]])[0]
        pts = centre + np.array([[0, 0, 0], [40, 0, 0], [-40, 0, 0], [0, 40, 0], [0, 0, 40]], dtype=float)
        labels, truth = [f"P{i + 1}" for i in range(len(pts))], None
    t_prep = time.perf_counter() - t0
    try:
        matcher = Matcher(args.model, device="auto")
        options = MatchOptions(refine=args.refine)
        if args.polish is not None:
            options = options.replace(polish=args.polish)
        source, target = read_image(source_path), read_image(target_path)
        t1 = time.perf_counter()
        res = matcher.match(source, pts, [target], labels, options)
        t_first = time.perf_counter() - t1
        t2 = time.perf_counter()
        res = matcher.match(source, pts, [target], labels, options)
        t_warm = time.perf_counter() - t2
        hm = matcher.match(source, pts[:1], [target], labels[:1], options.replace(heatmap=True)).heatmaps[(0, labels[0])]
    except SamEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'label':>6} {'matched x, y, z (mm LPS)':>30} {'score':>6} {'conf':>5}" + ("  error mm" if truth is not None else ""))
    errors = []
    for n, m in enumerate(res.matches):
        line = f"{m.label:>6} {m.point_lps_mm[0]:9.1f} {m.point_lps_mm[1]:9.1f} {m.point_lps_mm[2]:9.1f}  {m.score:6.3f} {'yes' if m.confident else 'no':>5}"
        if truth is not None:
            errors.append(float(np.linalg.norm(m.point_lps_mm - truth[n])))
            line += f"  {errors[-1]:8.1f}"
        print(line)
    if errors:
        e = np.array(errors)
        disp = np.linalg.norm(truth - pts, axis=1)
        print(f"\nerror mm: mean {e.mean():.1f}, median {np.median(e):.1f}, P90 {np.percentile(e, 90):.1f}, "
              f"within 5 mm {100 * np.mean(e <= 5):.0f}%, within 10 mm {100 * np.mean(e <= 10):.0f}% "
              f"(true motion: mean {disp.mean():.1f} mm)")
    print(f"polished by intensity: {sum(m.polished for m in res.matches)} of {len(res.matches)} matches"
          + ("" if options.polish else " (--no-polish)"))
    print(f"timings: data {t_prep:.1f} s, first match incl. embedding {t_first:.1f} s, "
          f"warm match of {len(pts)} points {t_warm * 1000:.0f} ms ({matcher.model.model_id}, {matcher.device})")
    png = out / f"heatmap_{labels[0]}.png"
    heatmap_png(target, hm, res.matches[0].point_lps_mm, None if truth is None else truth[0], png,
                f"{labels[0]}: similarity in the target (score {res.matches[0].score:.2f})")
    print(f"heatmap: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
