"""Build the landmark benchmark suites from the project's real data (``../shared/data``).

Three suites, each written as ``<out>/<suite>/cases.json`` plus any generated images under
``<out>/<suite>/images/`` (NIfTI; keep ``<out>`` out of git, e.g. ``cache/suites``):

``popi_synthetic``
    The POPI phase-00 CT warped by a thin-plate spline (TPS) through the real landmark motion
    00 -> 50 and 00 -> 20, plus a mild intensity perturbation. With ``phi`` the TPS map from target to
    source space (``phi(landmark_P) = landmark_00``), the target image is ``T(y) = S(phi(y))``. The 40
    real landmarks (point 41, an artifact marker, is excluded) are the queries; the truth of source
    landmark ``i`` is the point ``y`` with ``phi(y) = landmark_00_i``: ``landmark_P_i`` up to the
    discretisation of the field (8 mm grid, linear interpolation). The builder solves for ``y`` exactly;
    the correction is at most 0.4 mm (seed 0) and stored in the case's ``meta``.
``openkbp_inter``
    Seeded pairs of different OpenKBP validation patients; queries are the centroids of the organs
    contoured in both (each in its own CT's LPS frame). Origins are arbitrary, so anatomy is not aligned.
``lidc_synthetic``
    LIDC-IDRI-0001 under seeded random affine (rotations <= 10 degrees, scale +-8 %, translation <= 20 mm)
    plus smooth elastic deformations (a few mm) and a mild intensity perturbation. 50 points are chosen on
    structure (high gradient inside the body) in the TARGET; the source query is ``phi(target point)``,
    so the truth needs no inversion.

All randomness is seeded; rebuilding with the same seed gives the same cases and images.

>>> from samembed_bench.suites import build_suites
>>> build_suites("cache/suites", ["openkbp_inter"])  # doctest: +SKIP
{'openkbp_inter': PosixPath('cache/suites/openkbp_inter/cases.json')}
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from samembed.errors import InputError

from .cases import Case, read_cases, write_cases

log = logging.getLogger(__name__)

SUITE_NAMES = ("popi_synthetic", "openkbp_inter", "lidc_synthetic")
BUILDER_VERSION = 1
OPENKBP_STRUCTURES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
COMPACT_STRUCTURES = ("Brainstem", "RightParotid", "LeftParotid", "Mandible")
#: contoured over a length that varies with the field of view: no well-defined centroid (issue 14 reports them but
#: leaves them out of its targets)
TUBULAR_STRUCTURES = ("SpinalCord", "Esophagus")
#: how OpenKBP organ-centroid errors are reported: every structure, the compact organs, and issue 14's target set
#: (every structure but the tubular ones), each as (name, predicate on the structure name)
STRUCTURE_GROUPS = (("all", lambda s: True), ("compact organs", lambda s: s in COMPACT_STRUCTURES),
                    ("all but tubular", lambda s: s not in TUBULAR_STRUCTURES))
AIR_HU = -1024.0


# ----------------------------------------------------------------------------------------------
# data location
# ----------------------------------------------------------------------------------------------
def repo_root() -> Path:
    """The repository root (the folder holding ``SAMEmbedding/`` and ``benchmarks/``), from this file's location
    (``<repo>/benchmarks/samembed_bench/suites.py``; an editable install keeps it in the checkout)."""
    return Path(__file__).resolve().parents[2]


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``path`` if given, else ``$SAMEMBED_DATA``, else ``<repo root>/../shared/data``.

    The folder may be absent (a user's machine); call :func:`require_data` before reading.
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("SAMEMBED_DATA")
    if env:
        return Path(env).expanduser()
    return (repo_root().parent / "shared" / "data").resolve()


def require_data(root: Path, *relative: str) -> None:
    """Raise :class:`InputError` naming the missing file when ``root`` lacks any of ``relative``."""
    for rel in relative:
        if not (root / rel).exists():
            raise InputError(f"{root / rel}: benchmark data not found; give the shared data folder (--data, or "
                             "SAMEMBED_DATA; by default ../shared/data from the repository root)")


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def coarse_field_points(reference, spacing_mm: float, margin_mm: float):
    """A coarse grid covering ``reference`` (a SimpleITK image) plus a margin, with its LPS mm points.

    Returns:
        ``(geometry, points_lps_mm)``: a dict with ``size`` (i, j, k), ``spacing``, ``origin`` and
        ``direction`` of the coarse grid (same direction as the reference), and the (K, J, I, 3) array of
        its grid points in LPS mm (array order, k slowest).
    """
    d = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    size = np.asarray(reference.GetSize(), dtype=np.float64)
    extent = (size - 1.0) * np.asarray(reference.GetSpacing(), dtype=np.float64) + 2.0 * margin_mm
    n = np.ceil(extent / spacing_mm).astype(int) + 1
    origin = np.asarray(reference.GetOrigin(), dtype=np.float64) - d @ np.full(3, margin_mm)
    k, j, i = np.meshgrid(*(np.arange(v) for v in n[::-1]), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64) * spacing_mm
    points = ijk @ d.T + origin
    geometry = {"size": [int(v) for v in n], "spacing": [float(spacing_mm)] * 3, "origin": origin.tolist(),
                "direction": d.ravel().tolist()}
    return geometry, points


def displacement_transform(geometry: dict, displacement_kji3_mm: np.ndarray):
    """A ``SimpleITK.DisplacementFieldTransform`` from a (K, J, I, 3) LPS mm displacement array on ``geometry``.

    The transform maps a point ``y`` to ``y + d(y)`` with ``d`` linearly interpolated between grid points.
    """
    import SimpleITK as sitk

    field = sitk.GetImageFromArray(np.ascontiguousarray(displacement_kji3_mm, dtype=np.float64), isVector=True)
    field.SetSpacing(geometry["spacing"])
    field.SetOrigin(geometry["origin"])
    field.SetDirection(geometry["direction"])
    return sitk.DisplacementFieldTransform(field)


def transform_points(transform, points_lps_mm: np.ndarray) -> np.ndarray:
    """Apply a SimpleITK transform to (N, 3) LPS mm points."""
    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in np.asarray(points_lps_mm)])


def invert_points(transform, targets_lps_mm: np.ndarray, start_lps_mm: np.ndarray, iterations: int = 50,
                  tol_mm: float = 1e-4) -> np.ndarray:
    """Solve ``transform(y) = target`` for each point by fixed-point iteration from ``start`` (near-identity maps)."""
    y = np.array(start_lps_mm, dtype=np.float64, copy=True)
    for _ in range(iterations):
        r = transform_points(transform, y) - targets_lps_mm
        y -= r
        if np.max(np.abs(r)) < tol_mm:
            break
    return y


def perturb_intensity(array_hu: np.ndarray, rng: np.random.Generator, noise_hu: float = 20.0,
                      gamma_range: tuple[float, float] = (0.95, 1.05),
                      scale_range: tuple[float, float] = (0.97, 1.03)) -> tuple[np.ndarray, dict]:
    """A mild CT intensity perturbation: gamma and scale on ``(HU + 1024) / 4096``, plus Gaussian noise.

    Returns:
        ``(array_hu int16, parameters)``.
    """
    gamma = float(rng.uniform(*gamma_range))
    scale = float(rng.uniform(*scale_range))
    x = np.clip((array_hu.astype(np.float32) - AIR_HU) / 4096.0, 0.0, 1.0)
    out = np.power(x, gamma, dtype=np.float32) * (4096.0 * scale) + AIR_HU
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise_hu)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16), {"gamma": gamma, "scale": scale, "noise_hu": noise_hu}


def warp_image(source, transform, rng: np.random.Generator | None, default_hu: float = AIR_HU):
    """``T(y) = S(transform(y))`` on the source's grid (linear interpolation), then the intensity perturbation.

    Returns:
        ``(SimpleITK int16 image, perturbation parameters)``.
    """
    import SimpleITK as sitk

    warped = sitk.Resample(source, source, transform, sitk.sitkLinear, float(default_hu), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(warped)
    params: dict = {}
    if rng is not None:
        arr, params = perturb_intensity(arr, rng)
    out = sitk.GetImageFromArray(arr.astype(np.int16))
    out.CopyInformation(source)
    return out, params


def _write_image(image, path: Path) -> Path:
    import SimpleITK as sitk

    from samembed.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path


# ----------------------------------------------------------------------------------------------
# popi_synthetic
# ----------------------------------------------------------------------------------------------
def read_popi_landmarks(csv_path: Path) -> dict[str, np.ndarray]:
    """POPI landmarks per phase (``"00"`` .. ``"90"``): (40, 3) LPS mm, artifact point excluded, id order."""
    out: dict[str, list] = {}
    with Path(csv_path).open(newline="") as f:
        for row in csv.DictReader(f):
            if int(row["is_artifact_point"]) == 1:
                continue
            out.setdefault(row["phase"], []).append(
                (int(row["landmark_id"]), [float(row["x_lps_mm"]), float(row["y_lps_mm"]), float(row["z_lps_mm"])]))
    return {ph: np.array([p for _, p in sorted(v)]) for ph, v in out.items()}


def tps_transform(reference, target_points_lps_mm: np.ndarray, source_points_lps_mm: np.ndarray,
                  spacing_mm: float = 8.0, margin_mm: float = 16.0):
    """A displacement-field transform ``phi`` with ``phi(target_points) ~ source_points`` (thin-plate spline).

    The TPS (``scipy.interpolate.RBFInterpolator``, kernel ``thin_plate_spline``, affine part) is evaluated
    on a coarse grid (``spacing_mm``) over the reference image plus ``margin_mm`` and linearly interpolated.
    """
    from scipy.interpolate import RBFInterpolator

    geometry, grid_lps = coarse_field_points(reference, spacing_mm, margin_mm)
    rbf = RBFInterpolator(target_points_lps_mm, source_points_lps_mm - target_points_lps_mm,
                          kernel="thin_plate_spline", degree=1)
    disp = rbf(grid_lps.reshape(-1, 3)).reshape(grid_lps.shape)
    return displacement_transform(geometry, disp)


def build_popi_synthetic(out_dir: str | os.PathLike, data: str | os.PathLike | None = None, seed: int = 0,
                         phases: Sequence[str] = ("50", "20"), field_spacing_mm: float = 8.0) -> list[Case]:
    """Write the ``popi_synthetic`` images and cases (one case per phase) into ``out_dir``."""
    import SimpleITK as sitk

    root = data_root(data)
    require_data(root, "ct/popi/popi_00_ct.nii.gz", "ct/popi/landmarks/popi_landmarks_all_phases.csv")
    out_dir = Path(out_dir)
    source_path = root / "ct/popi/popi_00_ct.nii.gz"
    source = sitk.ReadImage(str(source_path))
    lms = read_popi_landmarks(root / "ct/popi/landmarks/popi_landmarks_all_phases.csv")
    l00 = lms["00"]
    labels = [f"L{n:02d}" for n in range(len(l00))]
    cases = []
    for n, phase in enumerate(phases):
        if phase not in lms:
            raise InputError(f"POPI has no phase '{phase}'; use one of {', '.join(sorted(lms))}")
        lp = lms[phase]
        phi = tps_transform(source, lp, l00, spacing_mm=field_spacing_mm)
        rng = np.random.default_rng([seed, 1, n])
        image, perturbation = warp_image(source, phi, rng)
        path = _write_image(image, out_dir / "images" / f"popi_00_warped_to_{phase}.nii.gz")
        truth = invert_points(phi, l00, lp)
        correction = float(np.max(np.linalg.norm(truth - lp, axis=1)))
        log.info("popi_synthetic 00->%s: TPS through %d landmarks, truth within %.3f mm of landmark_%s",
                 phase, len(lp), correction, phase)
        cases.append(Case("popi_synthetic", f"popi_00_to_{phase}", source_path, path, labels, l00, truth, meta={
            "description": f"POPI phase 00 warped by a TPS through the 00->{phase} landmark motion",
            "phase": phase, "field_spacing_mm": field_spacing_mm, "seed": seed, "intensity": perturbation,
            "max_truth_minus_landmark_mm": correction,
            "mean_landmark_motion_mm": float(np.mean(np.linalg.norm(lp - l00, axis=1)))}))
    return cases


# ----------------------------------------------------------------------------------------------
# openkbp_inter
# ----------------------------------------------------------------------------------------------
def read_openkbp_centroids(root: Path, split: str = "validation-pats") -> dict[str, dict[str, np.ndarray]]:
    """Centroids (LPS mm, each CT's own frame) per patient and structure, for one split."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with (root / "ct/openkbp/oar_centroids.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] != split:
                continue
            out.setdefault(row["patient"], {})[row["structure"]] = np.array(
                [float(row["x_mm"]), float(row["y_mm"]), float(row["z_mm"])])
    return out


def build_openkbp_inter(out_dir: str | os.PathLike, data: str | os.PathLike | None = None, seed: int = 0,
                        n_pairs: int = 36, min_common: int = 2) -> list[Case]:
    """Write the ``openkbp_inter`` cases: ``n_pairs`` seeded ordered pairs of different validation patients."""
    root = data_root(data)
    require_data(root, "ct/openkbp/patients.csv", "ct/openkbp/oar_centroids.csv")
    with (root / "ct/openkbp/patients.csv").open(newline="") as f:
        patients = sorted((r["patient"] for r in csv.DictReader(f) if r["split"] == "validation-pats"),
                          key=lambda p: int(p.split("_")[1]))
    centroids = read_openkbp_centroids(root)
    pairs = [(a, b) for i, a in enumerate(patients) for b in patients[i + 1:]
             if len(set(centroids.get(a, {})) & set(centroids.get(b, {}))) >= min_common
             and (root / f"ct/openkbp/ct/{a}_ct.nii.gz").is_file() and (root / f"ct/openkbp/ct/{b}_ct.nii.gz").is_file()]
    rng = np.random.default_rng([seed, 2])
    chosen = rng.choice(len(pairs), size=min(n_pairs, len(pairs)), replace=False)
    cases = []
    for idx in chosen:
        a, b = pairs[int(idx)]
        if rng.random() < 0.5:
            a, b = b, a
        common = [s for s in OPENKBP_STRUCTURES if s in centroids[a] and s in centroids[b]]
        cases.append(Case("openkbp_inter", f"{a}_to_{b}", root / f"ct/openkbp/ct/{a}_ct.nii.gz",
                          root / f"ct/openkbp/ct/{b}_ct.nii.gz", common,
                          np.array([centroids[a][s] for s in common]), np.array([centroids[b][s] for s in common]),
                          meta={"source_patient": a, "target_patient": b, "seed": seed}))
    return cases


# ----------------------------------------------------------------------------------------------
# lidc_synthetic
# ----------------------------------------------------------------------------------------------
def random_affine(rng: np.random.Generator, centre_lps_mm: np.ndarray, max_rotation_deg: float = 10.0,
                  max_scale: float = 0.08, max_translation_mm: float = 20.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """A random affine ``A(y) = c + M (y - c) + t`` about ``centre_lps_mm``.

    Returns:
        ``(M (3, 3), t (3,) mm, parameters)``: rotations about x, y, z (degrees, each <= max), per-axis
        scales within 1 +- max_scale, a translation of length <= max_translation_mm.
    """
    from scipy.spatial.transform import Rotation

    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scales = 1.0 + rng.uniform(-max_scale, max_scale, 3)
    direction = rng.normal(size=3)
    t = direction / np.linalg.norm(direction) * rng.uniform(0.0, max_translation_mm)
    m = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
    return m, t, {"rotation_xyz_deg": angles.tolist(), "scale_xyz": scales.tolist(), "translation_lps_mm": t.tolist(),
                  "centre_lps_mm": np.asarray(centre_lps_mm).tolist()}


def smooth_random_field(rng: np.random.Generator, shape_kji: tuple[int, ...], spacing_mm: float,
                        sigma_mm: float = 30.0, max_mm: float = 5.0) -> np.ndarray:
    """A smooth random (K, J, I, 3) displacement field (mm): Gaussian-smoothed noise scaled to a max length."""
    from scipy.ndimage import gaussian_filter

    noise = rng.standard_normal((*shape_kji, 3))
    field = np.stack([gaussian_filter(noise[..., c], sigma_mm / spacing_mm, mode="reflect") for c in range(3)], -1)
    field *= max_mm / max(float(np.max(np.linalg.norm(field, axis=-1))), 1e-9)
    return field


def body_mask(image_hu, threshold_hu: float = -500.0):
    """Binary body mask (numpy, array order) of a SimpleITK CT: largest component above threshold, holes filled per slice."""
    from scipy import ndimage

    arr = image_hu if isinstance(image_hu, np.ndarray) else __import__("SimpleITK").GetArrayFromImage(image_hu)
    fg = arr > threshold_hu
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = ndimage.sum(fg, lab, index=np.arange(1, n + 1))
    body = lab == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def structure_points(image, n_points: int, rng: np.random.Generator, *, spacing_mm: float = 2.0,
                     erode_mm: float = 10.0, border_mm: float = 15.0, top_fraction: float = 0.10,
                     accept: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Choose ``n_points`` well-spread LPS mm points on structure (high gradient, inside the body) in a CT.

    The image is resampled to ``spacing_mm``; candidates are voxels in the top ``top_fraction`` of gradient
    magnitude (Gaussian sigma 1.5 mm) inside the body mask eroded by ``erode_mm`` and at least ``border_mm``
    from the image edge, optionally filtered by ``accept(points_lps_mm) -> bool mask``; the points are then
    spread by farthest-point sampling from a seeded random start.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    size = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing()) / spacing_mm
    small = sitk.Resample(image, [int(v) for v in np.ceil(size)], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                          [spacing_mm] * 3, image.GetDirection(), AIR_HU, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(small)
    grad = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(small, 1.5))
    body = ndimage.binary_erosion(body_mask(arr), iterations=max(1, int(round(erode_mm / spacing_mm))))
    b = int(round(border_mm / spacing_mm))
    edge = np.zeros_like(body)
    edge[b:-b, b:-b, b:-b] = True
    inside = body & edge
    if not inside.any():
        raise InputError(f"{image}: no body voxels to choose benchmark points from")
    thr = np.quantile(grad[inside], 1.0 - top_fraction)
    kji = np.argwhere(inside & (grad >= thr))
    pts = np.array([small.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in p[::-1])) for p in kji])
    if accept is not None:
        pts = pts[accept(pts)]
    if len(pts) < n_points:
        raise InputError(f"only {len(pts)} candidate points on structure, {n_points} asked")
    pts = pts[rng.permutation(len(pts))[:20000]]
    chosen = [0]
    dist = np.linalg.norm(pts - pts[0], axis=1)
    for _ in range(n_points - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[nxt], axis=1))
    return pts[chosen]


def _inside(image, points_lps_mm: np.ndarray, margin_mm: float) -> np.ndarray:
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    ijk = (points_lps_mm - np.asarray(image.GetOrigin())) @ d / np.asarray(image.GetSpacing())
    m = margin_mm / np.asarray(image.GetSpacing())
    return np.all((ijk >= m) & (ijk <= np.asarray(image.GetSize()) - 1 - m), axis=1)


def build_lidc_synthetic(out_dir: str | os.PathLike, data: str | os.PathLike | None = None, seed: int = 0,
                         n_cases: int = 3, n_points: int = 50, field_spacing_mm: float = 8.0,
                         elastic_max_mm: float = 5.0) -> list[Case]:
    """Write the ``lidc_synthetic`` images and cases: LIDC-IDRI-0001 under random affine + elastic warps."""
    import SimpleITK as sitk

    root = data_root(data)
    require_data(root, "ct/lidc/LIDC-IDRI-0001_ct.nii.gz")
    out_dir = Path(out_dir)
    source_path = root / "ct/lidc/LIDC-IDRI-0001_ct.nii.gz"
    source = sitk.ReadImage(str(source_path))
    seg_path = root / "ct/lidc/LIDC-IDRI-0001_seg_auto.nii.gz"
    seg = sitk.ReadImage(str(seg_path)) if seg_path.is_file() else None
    names = _lidc_label_names(root)
    size = np.asarray(source.GetSize(), dtype=np.float64)
    centre = np.asarray(source.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))
    cases = []
    for n in range(n_cases):
        rng = np.random.default_rng([seed, 3, n])
        m, t, affine = random_affine(rng, centre)
        geometry, grid = coarse_field_points(source, field_spacing_mm, margin_mm=2 * field_spacing_mm)
        elastic = smooth_random_field(rng, grid.shape[:3], field_spacing_mm, max_mm=float(rng.uniform(0.5, 1.0)) * elastic_max_mm)
        disp = (grid - centre) @ m.T + centre + t - grid + elastic
        phi = displacement_transform(geometry, disp)
        image, perturbation = warp_image(source, phi, rng)
        path = _write_image(image, out_dir / "images" / f"lidc_0001_warp{n}.nii.gz")
        src_mask = body_mask(source)

        def accept(points: np.ndarray, phi=phi, src_mask=src_mask) -> np.ndarray:
            q = transform_points(phi, points)
            ok = _inside(source, q, 15.0)
            idx = np.array([source.TransformPhysicalPointToIndex(tuple(p)) if o else (0, 0, 0) for p, o in zip(q, ok)])
            return ok & src_mask[idx[:, 2], idx[:, 1], idx[:, 0]]

        truth = structure_points(image, n_points, rng, accept=accept)
        query = transform_points(phi, truth)
        structures = _labels_at(seg, query, names) if seg is not None else ["" for _ in query]
        labels = [f"P{k + 1:02d}" for k in range(len(query))]
        log.info("lidc_synthetic warp %d: %d points, mean displacement %.1f mm", n, len(query),
                 float(np.mean(np.linalg.norm(query - truth, axis=1))))
        cases.append(Case("lidc_synthetic", f"lidc_0001_warp{n}", source_path, path, labels, query, truth, meta={
            "description": "LIDC-IDRI-0001 under a random affine + smooth elastic warp; target T(y) = S(phi(y))",
            "seed": seed, "affine": affine, "elastic_max_mm": float(np.max(np.linalg.norm(elastic, axis=-1))),
            "field_spacing_mm": field_spacing_mm, "intensity": perturbation, "structures_at_query": structures,
            "mean_displacement_mm": float(np.mean(np.linalg.norm(query - truth, axis=1)))}))
    return cases


def _lidc_label_names(root: Path) -> dict[int, str]:
    path = root / "ct/lidc/LIDC-IDRI-0001_seg_auto_labels.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {int(r["id"]): r["structure"] for r in csv.DictReader(f)}


def _labels_at(seg, points_lps_mm: np.ndarray, names: dict[int, str]) -> list[str]:
    out = []
    for p in points_lps_mm:
        idx = seg.TransformPhysicalPointToIndex(tuple(float(v) for v in p))
        inside = all(0 <= i < s for i, s in zip(idx, seg.GetSize()))
        v = int(seg.GetPixel(idx)) if inside else 0
        out.append(names.get(v, str(v)) if v else "")
    return out


# ----------------------------------------------------------------------------------------------
# all suites
# ----------------------------------------------------------------------------------------------
BUILDERS: dict[str, Callable[..., list[Case]]] = {
    "popi_synthetic": build_popi_synthetic,
    "openkbp_inter": build_openkbp_inter,
    "lidc_synthetic": build_lidc_synthetic,
}


def suite_case_file(out_root: str | os.PathLike, suite: str) -> Path:
    """``<out_root>/<suite>/cases.json``."""
    return Path(out_root) / suite / "cases.json"


def _is_current(case_file: Path, seed: int, data: str | os.PathLike | None = None) -> bool:
    """Whether ``case_file`` was built by this builder version with ``seed`` from the data folder ``data`` (a suite
    of another data folder, as ``--data`` names it, is built again), and its images are all there."""
    info = case_file.parent / "suite.json"
    if not (case_file.is_file() and info.is_file()):
        return False
    try:
        meta = json.loads(info.read_text())
        cases = read_cases(case_file)
    except (InputError, json.JSONDecodeError):
        return False
    same_data = os.path.realpath(str(meta.get("data_root", ""))) == os.path.realpath(data_root(data))
    return (meta.get("builder_version") == BUILDER_VERSION and meta.get("seed") == seed and same_data
            and all(c.source.is_file() and c.target.is_file() for c in cases))


def build_suites(out_root: str | os.PathLike, suites: Sequence[str] = SUITE_NAMES, data: str | os.PathLike | None = None,
                 seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Build the named suites under ``out_root`` (skipping those already built with the same seed).

    Returns:
        ``{suite: case file path}``.

    Raises:
        InputError: an unknown suite name or missing data.
    """
    from samembed.io import write_text_atomic

    unknown = [s for s in suites if s not in BUILDERS]
    if unknown:
        raise InputError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITE_NAMES)}")
    out = {}
    for suite in suites:
        case_file = suite_case_file(out_root, suite)
        if not force and _is_current(case_file, seed, data):
            log.info("%s: up to date (%s)", suite, case_file)
            out[suite] = case_file
            continue
        log.info("%s: building into %s", suite, case_file.parent)
        cases = BUILDERS[suite](case_file.parent, data=data, seed=seed)
        write_cases(cases, case_file)
        write_text_atomic(case_file.parent / "suite.json", json.dumps(
            {"suite": suite, "builder_version": BUILDER_VERSION, "seed": seed, "n_cases": len(cases),
             "data_root": str(data_root(data))}, indent=1) + "\n")
        out[suite] = case_file
    return out
