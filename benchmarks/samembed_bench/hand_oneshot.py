"""The ``hand_oneshot`` benchmark: one labelled hand radiograph, its 37 landmarks carried to held-out hands.

Usage (from the repository root, with ../shared/data beside it; ``python benchmarks/hand_oneshot.py`` is the same)::

    # 1. the training images of the seeded split, as NIfTI with 0.2 mm pixels, into runs/ (git-ignored)
    python -m samembed_bench.hand_oneshot prepare
    # 2. train the 2D model (about 30 min on one CPU thread)
    samembed train --config Resources/Models/sam-lite-2d-hand.yaml
    # 3. evaluate SAM (one and several templates) against 2D elastix affine and affine + B-spline
    python -m samembed_bench.hand_oneshot run --model Resources/Models/sam-lite-2d-hand.pt --out benchmarks/results

Everything runs on one thread (torch and elastix) so the times compare (``--threads``).

Data: ``xray/hand_dha37`` under the shared data folder (133 left-hand radiographs of children, one per
subject, stored at half resolution as JPEG; ``landmarks_37.csv`` gives each landmark in original and in
stored pixels). Nothing here writes into the data folder.

Frames and units:

* **stored px** ``(x, y)``: column and row of the stored JPEG, continuous, pixel centre at integers.
* **original px**: the same point in the original-resolution scan, ``x_orig = x_px * orig_width / width``
  (likewise ``y``). All errors are reported in original pixels.
* **mm**: the files carry no spacing. Digital Hand Atlas scans are commonly treated as 0.1 mm per original
  pixel (unverified), so a stored pixel is taken as ``STORED_PX_MM = 0.2`` mm and an error of ``e`` original
  pixels as ``0.1 * e`` mm. Every report says so.
* **LPS mm**: the engine's frame. A JPEG read with ``spacing_mm=0.2`` has origin 0 and identity direction,
  so stored pixel ``(x, y)`` is the point ``(0.2 x, 0.2 y, 0)`` LPS mm.

The split is by image (= by subject), seeded: :func:`hand_split` puts ``n_train`` (default 100) images in the
training set (used for self-supervised training and as templates) and the rest are held-out targets.

Methods compared in one run (see :func:`run_benchmark`):

* ``sam``: one template (a seeded pick from the training images), :class:`samembed.Matcher` matching;
* ``sam-multi-best`` / ``sam-multi-median``: ``k`` templates; per landmark, the prediction with the best
  SAM score, or the coordinate-wise median of the ``k`` predictions (a robust average);
* ``elastix-affine`` / ``elastix-bspline``: 2D elastix registration (fixed = template, moving = target;
  affine, then affine + B-spline) and point transfer through the transform (:func:`transfer_points_elastix_2d`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samembed.errors import InputError
from samembed.options import MatchOptions

log = logging.getLogger(__name__)

#: the source checkout this package lives in (for the command line's default paths)
REPO = Path(__file__).resolve().parents[2]

DATASET = Path("xray") / "hand_dha37"
ORIG_PX_MM = 0.1  # assumed mm per original pixel (not given by the data set; see the module docstring)
STORED_PX_MM = 0.2  # assumed mm per stored pixel (stored images are half resolution)
N_LANDMARKS = 37
THRESHOLDS_MM = (2.0, 4.0, 10.0)


# ----------------------------------------------------------------------------------------------
# data set and split
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class HandCase:
    """One radiograph and its landmarks.

    Attributes:
        image_id: the data set's image id (file stem), e.g. ``"3143"``.
        path: the stored JPEG.
        landmarks_px: (37, 2) landmarks in stored pixels (x, y), landmark order 1..37.
        landmarks_orig_px: (37, 2) the same landmarks in original pixels.
        orig_per_stored: (2,) original pixels per stored pixel along x and y (about 2).
    """

    image_id: str
    path: Path
    landmarks_px: np.ndarray
    landmarks_orig_px: np.ndarray
    orig_per_stored: np.ndarray = field(default_factory=lambda: np.array([2.0, 2.0]))

    def points_lps_mm(self, spacing_mm: float = STORED_PX_MM) -> np.ndarray:
        """(37, 3) landmarks as LPS mm points of the stored image read with ``spacing_mm`` (z = 0)."""
        return px_to_lps_mm(self.landmarks_px, spacing_mm)

    def to_orig_px(self, points_px: np.ndarray) -> np.ndarray:
        """Stored-pixel points (N, 2) to original pixels (N, 2)."""
        return np.asarray(points_px, dtype=np.float64) * self.orig_per_stored


def default_data_root() -> Path:
    """``$SAMEMBED_DATA`` or ``../shared/data`` beside the repository root."""
    env = os.environ.get("SAMEMBED_DATA")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "data"


def px_to_lps_mm(points_px: np.ndarray, spacing_mm: float = STORED_PX_MM) -> np.ndarray:
    """Stored-pixel points (N, 2) to (N, 3) LPS mm points (z = 0) of an image with ``spacing_mm``, origin 0."""
    p = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    return np.hstack([p * spacing_mm, np.zeros((len(p), 1))])


def lps_mm_to_px(points_lps_mm: np.ndarray, spacing_mm: float = STORED_PX_MM) -> np.ndarray:
    """Inverse of :func:`px_to_lps_mm`: (N, 3) or (N, 2) LPS mm to (N, 2) stored pixels."""
    return np.asarray(points_lps_mm, dtype=np.float64).reshape(len(points_lps_mm), -1)[:, :2] / spacing_mm


def load_hand_dataset(root: str | os.PathLike | None = None) -> list[HandCase]:
    """Read ``images.csv`` and ``landmarks_37.csv`` of the hand data set, sorted by image id.

    Args:
        root: the shared data folder (default :func:`default_data_root`) or the ``hand_dha37`` folder itself.

    Raises:
        InputError: the folder or its tables are missing, or an image lacks some of its 37 landmarks.
    """
    root = Path(root) if root is not None else default_data_root()
    folder = root if (root / "landmarks_37.csv").is_file() else root / DATASET
    lm_csv, img_csv = folder / "landmarks_37.csv", folder / "images.csv"
    if not lm_csv.is_file() or not img_csv.is_file():
        raise InputError(f"{folder}: hand data set not found (need landmarks_37.csv and images.csv); set SAMEMBED_DATA")
    sizes = {}
    with img_csv.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            sizes[r["image"]] = (float(r["orig_width"]) / float(r["width"]), float(r["orig_height"]) / float(r["height"]))
    pts: dict[str, dict[int, tuple[float, float, float, float]]] = {}
    with lm_csv.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            pts.setdefault(r["image"], {})[int(r["landmark"])] = (
                float(r["x_px"]), float(r["y_px"]), float(r["x_orig_px"]), float(r["y_orig_px"]))
    cases = []
    for image_id in sorted(pts):
        lm = pts[image_id]
        if sorted(lm) != list(range(1, N_LANDMARKS + 1)):
            raise InputError(f"{lm_csv}: image {image_id} has landmarks {sorted(lm)}, expected 1..{N_LANDMARKS}")
        arr = np.array([lm[i] for i in range(1, N_LANDMARKS + 1)], dtype=np.float64)
        path = folder / "images" / f"{image_id}.jpg"
        if image_id not in sizes:
            raise InputError(f"{img_csv}: image {image_id} is missing")
        cases.append(HandCase(image_id, path, arr[:, :2], arr[:, 2:], np.array(sizes[image_id])))
    return cases


def hand_split(image_ids: list[str], n_train: int = 100, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split by image: ``(train_ids, heldout_ids)``, each sorted, disjoint, together all ids.

    >>> hand_split([str(i) for i in range(10)], n_train=7, seed=0)[1]
    ['0', '1', '8']
    """
    ids = sorted(set(image_ids))
    if not 0 < n_train < len(ids):
        raise InputError(f"n_train={n_train} must lie between 1 and {len(ids) - 1} ({len(ids)} images)")
    perm = np.random.default_rng(seed).permutation(len(ids))
    train = sorted(ids[i] for i in perm[:n_train])
    held = sorted(ids[i] for i in perm[n_train:])
    return train, held


def pick_templates(train_ids: list[str], k: int = 1, seed: int = 0) -> list[str]:
    """The first ``k`` ids of a seeded permutation of the training ids: the first is the one-template pick, whatever ``k``."""
    ids = sorted(train_ids)
    if not 0 < k <= len(ids):
        raise InputError(f"cannot pick {k} templates from {len(ids)} training images")
    perm = np.random.default_rng(1000 + seed).permutation(len(ids))
    return [ids[i] for i in perm[:k]]


def write_training_images(cases: list[HandCase], out_dir: str | os.PathLike, spacing_mm: float = STORED_PX_MM) -> list[Path]:
    """Write each case's image as NIfTI with pixel spacing ``spacing_mm`` (so ``samembed train`` sees real mm).

    These are derived copies for the git-ignored ``runs/`` folder, never for the repository. Existing files
    are kept. Returns the written (or present) paths.
    """
    import SimpleITK as sitk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in cases:
        dst = out / f"{c.image_id}.nii.gz"
        if not dst.is_file():
            img = sitk.ReadImage(str(c.path))
            if img.GetNumberOfComponentsPerPixel() > 1:
                img = sitk.VectorIndexSelectionCast(img, 0)
            img.SetSpacing((spacing_mm, spacing_mm))
            img.SetOrigin((0.0, 0.0))
            tmp = dst.with_name(f".{dst.name}.tmp.nii.gz")
            sitk.WriteImage(img, str(tmp), True)
            os.replace(tmp, dst)
        paths.append(dst)
    return paths


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def errors_orig_px(pred_px: np.ndarray, case: HandCase) -> np.ndarray:
    """Euclidean error per landmark (N,), original pixels, of stored-pixel predictions (N, 2) in ``case``."""
    pred = case.to_orig_px(np.asarray(pred_px, dtype=np.float64).reshape(-1, 2))
    return np.linalg.norm(pred - case.landmarks_orig_px[: len(pred)], axis=1)


def summarise_errors(errors_px: np.ndarray, orig_px_mm: float = ORIG_PX_MM,
                     thresholds_mm: tuple[float, ...] = THRESHOLDS_MM) -> dict:
    """Mean, median, std and 90th percentile of errors in original pixels and in mm, and % within each threshold.

    Args:
        errors_px: errors in original pixels, any shape (flattened); NaN entries (failed predictions) count as
            misses for the thresholds and are left out of the averages; their number is ``failed``.
        orig_px_mm: mm per original pixel (assumed 0.1).

    >>> s = summarise_errors(np.array([10.0, 30.0, 50.0, 200.0]))
    >>> s["mean_px"], s["median_mm"], s["within_2mm_pct"], s["within_4mm_pct"], s["within_10mm_pct"]
    (72.5, 4.0, 25.0, 50.0, 75.0)
    """
    e = np.asarray(errors_px, dtype=np.float64).ravel()
    ok = np.isfinite(e)
    v = e[ok]
    out = {"n": int(e.size), "failed": int((~ok).sum())}
    if v.size == 0:
        return out
    for unit, scale in (("px", 1.0), ("mm", orig_px_mm)):
        out[f"mean_{unit}"] = round(float(v.mean() * scale), 4)
        out[f"median_{unit}"] = round(float(np.median(v) * scale), 4)
        out[f"std_{unit}"] = round(float(v.std() * scale), 4)
        out[f"p90_{unit}"] = round(float(np.percentile(v, 90) * scale), 4)
    for t in thresholds_mm:
        out[f"within_{t:g}mm_pct"] = round(float(100.0 * np.sum(v * orig_px_mm <= t) / e.size), 3)
    return out


def combine_templates(preds_px: np.ndarray, scores: np.ndarray, how: str) -> np.ndarray:
    """Per-landmark combination of ``k`` template predictions.

    Args:
        preds_px: (k, N, 2) predictions of N landmarks from k templates (any consistent frame).
        scores: (k, N) SAM scores in [-1, 1].
        how: ``"best"`` (the prediction with the highest score) or ``"median"`` (coordinate-wise median).

    Returns:
        (N, 2) combined predictions.

    >>> p = np.array([[[0.0, 0.0]], [[10.0, 0.0]], [[11.0, 1.0]]])
    >>> combine_templates(p, np.array([[0.9], [0.5], [0.4]]), "best").tolist()
    [[0.0, 0.0]]
    >>> combine_templates(p, np.array([[0.9], [0.5], [0.4]]), "median").tolist()
    [[10.0, 0.0]]
    """
    preds_px = np.asarray(preds_px, dtype=np.float64)
    if how == "best":
        best = np.argmax(np.asarray(scores), axis=0)
        return preds_px[best, np.arange(preds_px.shape[1])]
    if how == "median":
        return np.median(preds_px, axis=0)
    raise InputError(f"unknown template combination '{how}'; use best or median")


# ----------------------------------------------------------------------------------------------
# 2D elastix baseline
# ----------------------------------------------------------------------------------------------
def _sitk_to_itk_2d(image, itk):
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    out = itk.image_from_array(np.ascontiguousarray(arr))
    out.SetSpacing([float(s) for s in image.GetSpacing()])
    out.SetOrigin([float(s) for s in image.GetOrigin()])
    out.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), dtype=np.float64).reshape(2, 2)))
    return out


def elastix_maps_2d(mode: str, iterations: int = 250, grid_spacing_mm: float = 10.0) -> list[dict]:
    """elastix parameter maps for 2D radiographs: affine, or affine then B-spline.

    Mattes mutual information, adaptive stochastic gradient descent, random samples, recursive pyramids
    (4 levels affine, 3 levels B-spline with control points every ``grid_spacing_mm`` mm at the finest level and a
    bending-energy penalty), ``iterations`` per level, initialised by the images' geometric centres.
    """
    if mode not in ("affine", "bspline"):
        raise InputError(f"unknown elastix mode '{mode}'; use affine or bspline")
    common = {
        "FixedInternalImagePixelType": "float", "MovingInternalImagePixelType": "float",
        "FixedImageDimension": "2", "MovingImageDimension": "2",
        "FixedImagePyramid": "FixedRecursiveImagePyramid", "MovingImagePyramid": "MovingRecursiveImagePyramid",
        "Interpolator": "LinearInterpolator", "ResampleInterpolator": "FinalLinearInterpolator",
        "ImageSampler": "RandomCoordinate", "NewSamplesEveryIteration": "true",
        "Optimizer": "AdaptiveStochasticGradientDescent", "AutomaticParameterEstimation": "true",
        "MaximumNumberOfIterations": str(int(iterations)), "WriteResultImage": "false",
        "WriteIterationInfo": "false", "DefaultPixelValue": "0", "HowToCombineTransforms": "Compose",
        "NumberOfHistogramBins": "32",
    }
    affine = dict(common, Registration="MultiResolutionRegistration", Transform="AffineTransform",
                  Metric="AdvancedMattesMutualInformation", AutomaticScalesEstimation="true",
                  AutomaticTransformInitialization="true", AutomaticTransformInitializationMethod="GeometricalCenter",
                  NumberOfResolutions="4", NumberOfSpatialSamples="2048")
    if mode == "affine":
        return [affine]
    bspline = dict(common, Registration="MultiMetricMultiResolutionRegistration", Transform="BSplineTransform",
                   Metric=["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
                   Metric0Weight="1.0", Metric1Weight="1.0", NumberOfResolutions="3",
                   FinalGridSpacingInPhysicalUnits=f"{grid_spacing_mm:.3f}", GridSpacingSchedule=["4.0", "2.0", "1.0"],
                   NumberOfSpatialSamples="4096")
    return [affine, bspline]


def transfer_points_elastix_2d(template, target, points_lps_mm: np.ndarray, mode: str = "bspline", *,
                               threads: int = 1, iterations: int = 250, grid_spacing_mm: float = 10.0) -> tuple[np.ndarray, float]:
    """Carry template points into a target radiograph with 2D elastix (fixed = template, moving = target).

    elastix finds ``T: fixed -> moving`` with ``target(T(x)) ~ template(x)``, so ``T`` evaluated at the
    template's points gives their positions in the target.

    Args:
        template: the 2D ``SimpleITK.Image`` the points are in (spacing, origin and direction are used).
        target: the 2D ``SimpleITK.Image`` to find them in.
        points_lps_mm: (N, 3) or (N, 2) template points, LPS mm (z ignored).
        mode: ``"affine"`` or ``"bspline"`` (affine followed by B-spline).
        threads: elastix threads (1 to compare with single-threaded SAM).

    Returns:
        ``((N, 3) target points in LPS mm with z = 0, wall seconds of registration and transfer)``.

    Raises:
        InputError: a non-2D image or an unknown mode.
    """
    import itk

    if template.GetDimension() != 2 or target.GetDimension() != 2:
        raise InputError("transfer_points_elastix_2d needs 2D images (SimpleITK images of dimension 2)")
    pts = np.asarray(points_lps_mm, dtype=np.float64).reshape(len(points_lps_mm), -1)[:, :2]
    t0 = time.perf_counter()
    fixed, moving = _sitk_to_itk_2d(template, itk), _sitk_to_itk_2d(target, itk)
    params = itk.ParameterObject.New()
    for m in elastix_maps_2d(mode, iterations, grid_spacing_mm):
        params.AddParameterMap({k: (v if isinstance(v, list) else [v]) for k, v in m.items()})
    reg = itk.ElastixRegistrationMethod.New(fixed, moving)
    reg.SetParameterObject(params)
    reg.SetLogToConsole(False)
    reg.SetLogToFile(False)
    reg.SetNumberOfThreads(int(threads))
    reg.Update()
    transform = reg.ConvertToItkTransform(reg.GetCombinationTransform())
    moved = np.array([list(transform.TransformPoint([float(v) for v in p])) for p in pts], dtype=np.float64)
    seconds = time.perf_counter() - t0
    return np.hstack([moved, np.zeros((len(moved), 1))]), seconds


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """Predictions of one method on every target.

    Attributes:
        name: method name (``sam``, ``sam-multi-best``, ``elastix-bspline`` ...).
        pred_px: target id -> (37, 2) predictions in stored pixels.
        scores: target id -> (37,) SAM scores (NaN for registration).
        seconds: target id -> wall time spent on that target, s (1 thread).
    """

    name: str
    pred_px: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def _read_stored(case: HandCase):
    from samembed.io import read_image

    return read_image(case.path, spacing_mm=STORED_PX_MM)


CONSISTENCY_DEFAULT = (15.0, 20.0)  # (inlier_mm, window_mm), chosen on 20 training images only (see the model card)


def sam_options(variant: str, *, refine: bool = False,
                consistency: tuple[float, float] | None = CONSISTENCY_DEFAULT) -> MatchOptions:
    """The one :class:`~samembed.options.MatchOptions` value a SAM variant of :func:`run_sam` matches with.

    Args:
        variant: ``"plain"``, ``"consistent"``, ``"plain-polish"`` or ``"consistent-polish"``.
        refine: the cycle-consistent refinement (the ``-refine`` methods).
        consistency: ``(inlier_mm, window_mm)`` of the consistency step (used by the ``consistent`` variants).

    >>> o = sam_options("consistent-polish")
    >>> o.consistency, o.polish, o.refine, o.consistency_inlier_mm
    (True, True, False, 15.0)
    """
    if variant not in ("plain", "consistent", "plain-polish", "consistent-polish"):
        raise InputError(f"unknown SAM variant {variant!r}; choose plain, consistent, plain-polish or consistent-polish")
    inlier_mm, window_mm = consistency or CONSISTENCY_DEFAULT
    return MatchOptions(refine=refine, consistency=variant.startswith("consistent"), polish=variant.endswith("-polish"),
                        consistency_inlier_mm=inlier_mm, consistency_window_mm=window_mm)


def run_sam(cases: dict, template_ids: list[str], target_ids: list[str], model, *, refine: bool = False,
            consistency: tuple[float, float] | None = CONSISTENCY_DEFAULT, polish: bool = False, device: str = "cpu",
            progress=None) -> tuple[list[MethodResult], dict]:
    """Match every template's 37 landmarks into every target with SAM.

    Args:
        cases: image id -> :class:`HandCase`.
        template_ids: the templates; the first gives the one-template results.
        target_ids: held-out targets.
        model: model name, checkpoint path or :class:`~samembed.models.LoadedModel`.
        refine: use the cycle-consistent refinement (``MatchOptions(refine=True)``).
        consistency: ``(inlier_mm, window_mm)`` of ``MatchOptions(consistency=True)``, giving extra
            ``*-consistent`` methods; None to skip.
        polish: also run every variant with ``MatchOptions(polish=True)`` (``*-polish`` methods).
        Each variant matches with one :func:`sam_options` value.
        progress: optional ``progress(done, total, message)``.

    Returns:
        ``(methods, timing facts)``. Methods: ``sam`` (one template, plain SAM), ``sam-consistent``, and for
        several templates ``sam-multi<k>-best`` / ``-median`` (plain and consistent). Per-target seconds are the
        target's embedding plus its matching (and re-matching) from each template used; template embeddings are
        reported separately in the timing facts.
    """
    from samembed.api import Matcher

    matcher = Matcher(model=model, device=device, modality="xray")
    labels = [f"L{i}" for i in range(1, N_LANDMARKS + 1)]
    targets = [_read_stored(cases[t]) for t in target_ids]
    k, nt = len(template_ids), len(target_ids)
    base = ["plain"] + (["consistent"] if consistency else [])
    variants = base + ([f"{v}-polish" for v in base] if polish else [])
    preds = {v: np.zeros((k, nt, N_LANDMARKS, 2)) for v in variants}
    scores = {v: np.zeros((k, nt, N_LANDMARKS)) for v in variants}
    secs = {v: np.zeros((k, nt)) for v in variants}
    embed_s = np.zeros(nt)
    template_embed_s, rematched = [], 0
    for ti, tid in enumerate(template_ids):
        case = cases[tid]
        tmpl = _read_stored(case)
        pts = case.points_lps_mm()
        for v in variants:  # embeddings are cached after the first variant; priors are fitted again for each
            matcher.clear_priors()
            res = matcher.match(tmpl, pts, targets, labels, sam_options(v, refine=refine, consistency=consistency),
                                target_names=list(target_ids))
            if v == "plain":
                template_embed_s.append(float(res.timings["source_embed_s"]))
            for n in range(nt):
                ms = res.for_target(n)
                if ti == 0 and v == "plain":
                    embed_s[n] = res.timings[f"target{n}_embed_s"]
                preds[v][ti, n] = lps_mm_to_px(np.array([m.point_lps_mm for m in ms]))
                scores[v][ti, n] = [m.score for m in ms]
                secs[v][ti, n] = res.timings[f"target{n}_match_s"]
                if v == "consistent":
                    rematched += sum(m.rematched for m in ms)
        if progress:
            progress(ti + 1, k, f"template {tid}")
        log.info("SAM: template %s matched into %d targets", tid, nt)
    suffix = "-refine" if refine else ""
    out = []
    for v in variants:
        tag = suffix + ("-consistent" if v.startswith("consistent") else "") + ("-polish" if v.endswith("-polish") else "")
        one = MethodResult(f"sam{tag}")
        for n, t in enumerate(target_ids):
            one.pred_px[t], one.scores[t] = preds[v][0, n], scores[v][0, n]
            one.seconds[t] = float(embed_s[n] + secs[v][0, n])
        out.append(one)
    if k > 1:
        for v in variants:
            tag = suffix + ("-consistent" if v.startswith("consistent") else "") + ("-polish" if v.endswith("-polish") else "")
            for how in ("best", "median"):
                r = MethodResult(f"sam-multi{k}-{how}{tag}")
                for n, t in enumerate(target_ids):
                    r.pred_px[t] = combine_templates(preds[v][:, n], scores[v][:, n], how)
                    r.scores[t] = scores[v][:, n].max(0) if how == "best" else np.median(scores[v][:, n], 0)
                    r.seconds[t] = float(embed_s[n] + secs[v][:, n].sum())
                out.append(r)
    facts = {"template_embed_s": template_embed_s, "target_embed_s_mean": float(embed_s.mean()),
             "match_s_mean_per_template": float(secs["plain"].mean()), "model_id": matcher.model.model_id,
             "model_spacing_mm": matcher.model.preprocess.spacing_mm,
             "consistency": None if not consistency else {"inlier_mm": consistency[0], "window_mm": consistency[1],
                                                          "rematched_points": rematched,
                                                          "of_points": k * nt * N_LANDMARKS}}
    return out, facts


def run_elastix(cases: dict, template_id: str, target_ids: list[str], modes: tuple[str, ...] = ("affine", "bspline"), *,
                threads: int = 1, iterations: int = 250, grid_spacing_mm: float = 10.0, cache_dir: str | os.PathLike | None = None,
                progress=None) -> list[MethodResult]:
    """2D elastix baselines from one template into every target (see :func:`transfer_points_elastix_2d`).

    A registration that raises is recorded as NaN predictions (counted as failures), never fatal. With
    ``cache_dir``, each (template, target, mode, settings) result and its measured time are stored there as JSON
    and reused (the baseline does not depend on the SAM model).
    """
    import SimpleITK as sitk

    def read(case: HandCase):
        img = sitk.ReadImage(str(case.path))
        if img.GetNumberOfComponentsPerPixel() > 1:
            img = sitk.VectorIndexSelectionCast(img, 0)
        img.SetSpacing((STORED_PX_MM, STORED_PX_MM))
        return img

    tmpl = cases[template_id]
    fixed = read(tmpl)
    out = []
    for mode in modes:
        r = MethodResult(f"elastix-{mode}")
        for n, t in enumerate(target_ids):
            key = Path(cache_dir) / f"{template_id}_{t}_{mode}_it{iterations}_grid{grid_spacing_mm:g}_th{threads}.json" if cache_dir else None
            if key is not None and key.is_file():
                d = json.loads(key.read_text(encoding="utf-8"))
                r.pred_px[t], r.seconds[t] = np.array(d["pred_px"], dtype=np.float64), float(d["seconds"])
                r.scores[t] = np.full(N_LANDMARKS, np.nan)
                continue
            try:
                p, s = transfer_points_elastix_2d(fixed, read(cases[t]), tmpl.points_lps_mm(), mode, threads=threads,
                                                  iterations=iterations, grid_spacing_mm=grid_spacing_mm)
                r.pred_px[t] = lps_mm_to_px(p)
            except Exception as e:  # noqa: BLE001 - a failed registration is a result, not a crash
                log.warning("elastix %s failed on %s: %s", mode, t, e)
                r.pred_px[t], s = np.full((N_LANDMARKS, 2), np.nan), float("nan")
            r.scores[t] = np.full(N_LANDMARKS, np.nan)
            r.seconds[t] = float(s)
            if key is not None and np.isfinite(s):
                from samembed.io import write_text_atomic

                key.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(key, json.dumps({"pred_px": r.pred_px[t].tolist(), "seconds": s}))
            if progress:
                progress(n + 1, len(target_ids), f"elastix-{mode} {t}")
        log.info("elastix %s: %d targets", mode, len(target_ids))
        out.append(r)
    return out


def evaluate(results: list[MethodResult], cases: dict) -> tuple[dict, list[dict]]:
    """Summaries per method (see :func:`summarise_errors`, plus seconds per image) and one row per prediction."""
    summary, rows = {}, []
    for r in results:
        errs = []
        for t, pred in r.pred_px.items():
            e = errors_orig_px(pred, cases[t])
            errs.append(e)
            for i in range(N_LANDMARKS):
                rows.append({"method": r.name, "target": t, "landmark": i + 1, "x_px": float(pred[i, 0]),
                             "y_px": float(pred[i, 1]), "error_orig_px": float(e[i]), "error_mm": float(e[i] * ORIG_PX_MM),
                             "score": float(r.scores[t][i])})
        s = summarise_errors(np.array(errs))
        secs = np.array(list(r.seconds.values()), dtype=np.float64)
        s["seconds_per_image"] = round(float(np.nanmean(secs)), 3) if np.isfinite(secs).any() else None
        s["targets"] = len(r.pred_px)
        per_lm = np.nanmean(np.array(errs), axis=0) * ORIG_PX_MM
        s["per_landmark_mean_mm"] = [round(float(v), 3) for v in per_lm]
        summary[r.name] = s
    return summary, rows


def markdown_table(summary: dict) -> str:
    """The summary as a Markdown table (errors in original pixels and in mm at an assumed 0.1 mm/pixel)."""
    head = ("| method | mean px | median px | mean mm | median mm | <= 2 mm % | <= 4 mm % | <= 10 mm % | s / image |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]

    def cell(s: dict, key: str, digits: int) -> str:  # "–" where nothing was found (every target failed)
        return "–" if s.get(key) is None else f"{s[key]:.{digits}f}"

    for name, s in summary.items():
        sec = s.get("seconds_per_image")
        failed = f" ({s['failed']} failed)" if s.get("failed") else ""
        lines.append(f"| {name}{failed} | {cell(s, 'mean_px', 1)} | {cell(s, 'median_px', 1)} | {cell(s, 'mean_mm', 2)} | "
                     f"{cell(s, 'median_mm', 2)} | {cell(s, 'within_2mm_pct', 1)} | {cell(s, 'within_4mm_pct', 1)} | "
                     f"{cell(s, 'within_10mm_pct', 1)} | {'n/a' if sec is None else f'{sec:.2f}'} |")
    return "\n".join(lines)


def run_benchmark(model, *, data_root: str | os.PathLike | None = None, n_train: int = 100, seed: int = 0,
                  templates: int = 5, elastix: bool = True, elastix_iterations: int = 250, elastix_threads: int = 1,
                  grid_spacing_mm: float = 10.0, refine: bool = False,
                  consistency: tuple[float, float] | None = CONSISTENCY_DEFAULT, polish: bool = False,
                  max_targets: int | None = None,
                  elastix_cache: str | os.PathLike | None = None,
                  out_dir: str | os.PathLike | None = None, stem: str = "hand_oneshot", progress=None) -> dict:
    """Run the whole ``hand_oneshot`` suite and (optionally) write its results.

    Args:
        model: SAM model (name, checkpoint path or loaded model).
        data_root: the shared data folder (default :func:`default_data_root`).
        n_train, seed: the split (:func:`hand_split`) and template pick (:func:`pick_templates`).
        templates: templates of the multi-template variant (1 = one-template only).
        elastix: also run the 2D elastix affine and affine + B-spline baselines (same template).
        refine: also run SAM with ``refine=True``.
        consistency: ``(inlier_mm, window_mm)`` for the ``*-consistent`` methods (``MatchOptions(consistency=True)``), or None.
        polish: also run the SAM methods with the intensity polish (``*-polish``).
        max_targets: evaluate only the first targets (for quick checks).
        elastix_cache: folder to store and reuse elastix results (see :func:`run_elastix`).
        out_dir: write ``<stem>.json``, ``<stem>.md``, ``<stem>_points.csv`` there.

    Returns:
        The report dict (also the JSON file's content).
    """
    t_start = time.time()
    all_cases = load_hand_dataset(data_root)
    cases = {c.image_id: c for c in all_cases}
    train, held = hand_split(list(cases), n_train, seed)
    targets = held[:max_targets] if max_targets else held
    tmpl = pick_templates(train, max(1, templates), seed)
    results, facts = run_sam(cases, tmpl, targets, model, consistency=consistency, polish=polish, progress=progress)
    if refine:
        results += run_sam(cases, tmpl[:1], targets, model, refine=True, consistency=None, progress=progress)[0]
    if elastix:
        results += run_elastix(cases, tmpl[0], targets, threads=elastix_threads, iterations=elastix_iterations,
                               grid_spacing_mm=grid_spacing_mm, cache_dir=elastix_cache, progress=progress)
    summary, rows = evaluate(results, cases)
    import torch

    report = {
        "suite": "hand_oneshot",
        "units": ("errors in original pixels (stored images are half resolution; predictions are scaled by each image's "
                  f"original/stored size ratio) and in mm ASSUMING {ORIG_PX_MM} mm per original pixel (not given by the data)"),
        "data": str(DATASET),
        "split": {"seed": seed, "n_train": len(train), "n_heldout": len(held), "heldout": held, "targets_evaluated": targets},
        "templates": tmpl,
        "one_template": tmpl[0],
        "sam": facts,
        "elastix": {"iterations_per_level": elastix_iterations, "bspline_grid_mm": grid_spacing_mm,
                    "threads": elastix_threads, "metric": "Mattes MI (+ bending energy for B-spline)",
                    "init": "geometrical centre"} if elastix else None,
        "torch_threads": torch.get_num_threads(),
        "methods": summary,
        "wall_seconds": round(time.time() - t_start, 1),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from samembed.io import write_text_atomic

        write_text_atomic(out / f"{stem}.json", json.dumps(report, indent=1))
        md = [f"# hand_oneshot: one-template landmark matching on {len(targets)} held-out hand radiographs", "",
              f"Template {tmpl[0]} (multi-template: {', '.join(tmpl)}); 37 landmarks per image; {report['units']}.",
              f"SAM model {facts['model_id']} at {facts['model_spacing_mm']} mm; torch threads {report['torch_threads']}; "
              f"elastix threads {elastix_threads}. Time per image: SAM = target embedding + matching (template embedding "
              f"{np.mean(facts['template_embed_s']):.2f} s once per template); elastix = registration + point transfer.", "",
              "`*-consistent`: a robust (RANSAC) affine fitted to SAM's own 37 matches; matches farther than "
              f"{(consistency or (0, 0))[0]:g} mm from it are searched again by SAM within +-{(consistency or (0, 0))[1]:g} mm of "
              "the affine's prediction. `multi<k>-best`: per landmark the template with the highest SAM score; "
              "`-median`: coordinate-wise median of the k predictions.", "",
              markdown_table(summary), ""]
        write_text_atomic(out / f"{stem}.md", "\n".join(md))
        keys = list(rows[0]) if rows else []
        lines = [",".join(keys)] + [",".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) for r in rows]
        write_text_atomic(out / f"{stem}_points.csv", "\n".join(lines) + "\n")
    return report


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``hand_oneshot`` command line (``prepare`` and ``run``); default paths are in the source checkout."""
    p = argparse.ArgumentParser(prog="hand_oneshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shared data folder (default $SAMEMBED_DATA or ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="split and template seed")
    p.add_argument("--n-train", type=int, default=100, help="training images in the split (rest held out)")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="write the training images as NIfTI with pixel spacing into runs/")
    pr.add_argument("--out", default=str(REPO / "runs" / "hand_dha37" / "train-0.2mm"))
    r = sub.add_parser("run", help="run the benchmark")
    r.add_argument("--model", default=str(REPO / "Resources" / "Models" / "sam-lite-2d-hand.pt"))
    r.add_argument("--templates", type=int, default=5, help="templates of the multi-template variant")
    r.add_argument("--no-elastix", action="store_true", help="skip the elastix baselines")
    r.add_argument("--elastix-iterations", type=int, default=250, help="iterations per pyramid level and stage")
    r.add_argument("--grid-mm", type=float, default=10.0, help="final B-spline control-point spacing, mm")
    r.add_argument("--refine", action="store_true", help="also run SAM with cycle-consistent refinement")
    r.add_argument("--consistency", type=float, nargs=2, default=list(CONSISTENCY_DEFAULT), metavar=("INLIER_MM", "WINDOW_MM"),
                   help="the *-consistent methods: robust affine of SAM's matches, outliers re-searched in a window")
    r.add_argument("--polish", action="store_true", help="also run the SAM methods with the intensity polish")
    r.add_argument("--no-consistency", action="store_true", help="skip the *-consistent methods")
    r.add_argument("--elastix-cache", default=str(REPO / "runs" / "hand_dha37" / "elastix-cache"),
                   help="reuse elastix results stored here (they do not depend on the SAM model); '' to disable")
    r.add_argument("--max-targets", type=int, help="evaluate only the first N held-out images (quick check)")
    r.add_argument("--threads", type=int, default=1, help="torch and elastix threads")
    r.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    r.add_argument("--stem", default="hand_oneshot", help="output file stem")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad input, e.g. the data set is missing)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(getattr(args, "threads", 1)))

    from samembed.errors import SamEmbedError

    try:
        cases = load_hand_dataset(args.data)
        if args.command == "prepare":
            train, held = hand_split([c.image_id for c in cases], args.n_train, args.seed)
            keep = set(train)
            paths = write_training_images([c for c in cases if c.image_id in keep], args.out)
            print(f"{len(paths)} training images ({len(held)} held out, never written) in {args.out}")
            return 0
        import torch

        torch.set_num_threads(args.threads)
        report = run_benchmark(args.model, data_root=args.data, n_train=args.n_train, seed=args.seed,
                               templates=args.templates, elastix=not args.no_elastix,
                               elastix_iterations=args.elastix_iterations, elastix_threads=args.threads,
                               grid_spacing_mm=args.grid_mm, refine=args.refine,
                               consistency=None if args.no_consistency else tuple(args.consistency),
                               polish=args.polish, max_targets=args.max_targets,
                               elastix_cache=args.elastix_cache or None,
                               out_dir=args.out, stem=args.stem)
    except SamEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(report["methods"]))
    print(f"(template {report['one_template']}; {len(report['split']['targets_evaluated'])} targets; "
          f"{report['wall_seconds']:.0f} s; written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
