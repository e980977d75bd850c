"""SAMEmbedding demo: match landmarks from one CT into another, print errors and timings, draw a heatmap.

With ``../shared/data`` (or ``$SAMEMBED_DATA``): the 40 POPI landmarks of the breathing CT phase 00 are matched
into a copy of that CT deformed by the real 00 -> 50 landmark motion (a thin-plate spline), so every match has
an exact ground truth. Without it: two public 3D Slicer sample CTs are downloaded (SHA-256 checked) and a few
points are matched between them (no ground truth, so no errors are printed).
"""

from __future__ import annotations

import argparse
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


#: where the samples come from; SAMEMBED_SAMPLES_URL points elsewhere (a mirror, or a test server)
SAMPLES_URL = os.environ.get("SAMEMBED_SAMPLES_URL", "https://github.com/Slicer/SlicerTestingData/releases/download/SHA256")


class DemoError(Exception):
    """A problem the demo explains in one message (no traceback)."""


def download_samples(out_dir: Path, samples: dict[str, str] | None = None, base_url: str | None = None,
                     timeout_s: float = 30.0) -> list[Path]:
    """Download the sample CTs into ``out_dir`` (created; once), verifying each file's SHA-256.

    Raises:
        DemoError: the network cannot be reached (the message says how to run the demo without it), or a
            download does not match its checksum (nothing is kept).
    """
    samples = SLICER_SAMPLES if samples is None else samples
    base_url = (base_url or SAMPLES_URL).rstrip("/")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sha in samples.items():
        path = out_dir / name
        if not path.is_file():
            url = f"{base_url}/{sha}"
            print(f"downloading {name} from {url}")
            tmp = path.with_name(path.name + ".part")
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp, tmp.open("wb") as fh:  # noqa: S310
                    while chunk := resp.read(1 << 20):
                        fh.write(chunk)
            except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
                tmp.unlink(missing_ok=True)
                raise DemoError(
                    f"cannot download the demo CT {name} from {url} ({getattr(e, 'reason', e)}).\n"
                    f"The demo needs either the shared data folder ({DATA}; set SAMEMBED_DATA to use another place) "
                    f"or a network connection to fetch two public 3D Slicer sample CTs. Without either, put the "
                    f"files by hand into {out_dir} (SHA-256 {', '.join(samples.values())}).") from None
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if digest != sha:
                tmp.unlink()
                raise DemoError(f"{name}: the download's SHA-256 {digest} does not match {sha}; it was refused and deleted")
            tmp.replace(path)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model name, checkpoint path or random:sam-lite")
    ap.add_argument("--out", default=str(REPO / "demo_output"),
                    help="folder for the demo's pair of scans, its matches and its picture (default: demo_output)")
    ap.add_argument("--refine", action="store_true", help="the cycle-consistent refinement of each match (slower)")
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
        try:
            source_path, target_path = download_samples(out / "samples")
        except DemoError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
    from samembed.figures import save_match_figure

    png = out / f"heatmap_{labels[0]}.png"
    first = res.matches[0]
    save_match_figure(png, source, pts[0], target, first.point_lps_mm, hm, truth_lps_mm=None if truth is None else truth[0],
                      title=f"{labels[0]}: score {first.score:.2f} ({'confident' if first.confident else 'NOT confident'})"
                      + ("" if truth is None else
                         f", {np.linalg.norm(first.point_lps_mm - truth[0]):.1f} mm from the true position"))
    print(f"heatmap: {png}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: a line, as the samembed command says it, not a traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
