"""Baseline point transfer for the landmark benchmark: image-centre alignment and elastix registration.

Direction matters. A registration with fixed image F and moving image M finds a transform
``T: F-space -> M-space`` (LPS mm) such that ``M(T(x)) ~ F(x)``; transformix therefore maps points
from the FIXED frame into the MOVING frame. To carry source points into the target we register with
``fixed = source`` and ``moving = target`` and evaluate ``T`` at the source points:
``target_points_lps_mm = T(source_points_lps_mm)``.

elastix settings (kept modest for CPU; see :func:`elastix_parameter_maps`):

* images are clipped to [-1024, 3071] HU and shifted by +1024 so intensities are non-negative (mutual
  information does not care; the optional centre-of-gravity initialiser needs positive mass); the fixed image is
  cropped to the bounding box of voxels above -500 HU plus 10 mm (the B-spline grid then covers the body,
  not the air); at least 5 % of the samples must map inside the moving image (elastix default 25 %);
* initialisation: ``AutomaticTransformInitialization`` by ``GeometricalCenter`` (origins of different
  subjects are arbitrary, so no initialisation would start hundreds of mm away);
* linear stages: a similarity transform, then an affine one; each Mattes mutual information, adaptive
  stochastic gradient descent, 4 resolutions of a down-sampling (recursive) pyramid, 250 iterations per
  resolution, 2048 random samples. On the first 12 openkbp_inter pairs (different fields of view) the
  mean centroid error of "affine only, centre-of-gravity start" was 36.6 mm, "affine, geometric-centre
  start" 27.4 mm and "similarity then affine, geometric-centre start" 24.7 mm (image-centre alignment 37.4);
* B-spline (after the affine, composed with it): Mattes MI, 3 resolutions, final control-point spacing
  max(10 mm, 4 source voxels) (grid schedule 4, 2, 1), 250 iterations per resolution, 4096 random samples. No bending-energy
  penalty by default: on a small synthetic volume it made the stage 7 times slower (``bending_weight`` adds it);
* ASGD step sizes come from the ``DisplacementDistribution`` estimate: elastix's default ("Original")
  measures Jacobians of every B-spline parameter and had not finished its first B-spline level after 20
  minutes on one OpenKBP pair (shared CPU);
* no result image is written (we only need the transform).

The ``threads`` argument (or ``$SAMEMBED_ELASTIX_THREADS``) caps elastix's threads so timings can be
compared with a single-threaded torch run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samembed.errors import InputError

log = logging.getLogger(__name__)

ELASTIX_MODES = ("affine", "bspline")
HU_CLIP = (-1024.0, 3071.0)


def _points(points_lps_mm) -> np.ndarray:
    p = np.asarray(points_lps_mm, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 3:
        raise InputError(f"points must be an (N, 3) array of LPS mm coordinates, got shape {np.shape(points_lps_mm)}")
    return p


def _read_sitk(path_or_image):
    import SimpleITK as sitk

    if isinstance(path_or_image, (str, os.PathLike)):
        path = Path(path_or_image)
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        return sitk.ReadImage(str(path))
    return path_or_image


def _read_header(path_or_image):
    """A SimpleITK image, or an ``ImageFileReader`` holding only the header of a file (both have the geometry getters)."""
    import SimpleITK as sitk

    if isinstance(path_or_image, (str, os.PathLike)):
        path = Path(path_or_image)
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader
    return path_or_image


def image_centre_lps_mm(image) -> np.ndarray:
    """Physical LPS mm position of the centre of an image's voxel grid (centre of geometry).

    Args:
        image: a ``SimpleITK.Image`` or an ``ImageFileReader`` after ``ReadImageInformation``.
    """
    size = np.asarray(image.GetSize(), dtype=np.float64)
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(len(size), len(size))
    return np.asarray(image.GetOrigin()) + d @ ((size - 1.0) / 2.0 * np.asarray(image.GetSpacing()))


def transfer_points_centre(source, target, points_lps_mm) -> tuple[np.ndarray, float]:
    """Carry points by aligning the centres of the two image grids (a translation, no rotation).

    Args:
        source: source image path or ``SimpleITK.Image``.
        target: target image path or ``SimpleITK.Image``.
        points_lps_mm: (N, 3) points in the source, LPS mm.

    Returns:
        ``(points_lps_mm, seconds)``: the (N, 3) points in the target frame (LPS mm) and the wall time.

    >>> import SimpleITK as sitk
    >>> a = sitk.Image(10, 10, 10, sitk.sitkInt16); b = sitk.Image(10, 10, 10, sitk.sitkInt16)
    >>> b.SetOrigin((5.0, 0.0, 0.0))
    >>> transfer_points_centre(a, b, [[1.0, 2.0, 3.0]])[0].tolist()
    [[6.0, 2.0, 3.0]]
    """
    t0 = time.perf_counter()
    pts = _points(points_lps_mm)
    src, tgt = _read_header(source), _read_header(target)
    moved = pts + (image_centre_lps_mm(tgt) - image_centre_lps_mm(src))
    return moved, time.perf_counter() - t0


def elastix_parameter_maps(mode: str, *, iterations: int = 250, resolutions: int | None = None,
                           samples: int | None = None, grid_spacing_mm: float = 10.0,
                           min_grid_voxels: float = 4.0, fixed_spacing_mm: Sequence[float] | None = None,
                           initialisation: str = "GeometricalCenter", similarity_stage: bool = True,
                           bending_weight: float = 0.0) -> list[dict]:
    """The elastix parameter maps used by :func:`transfer_points_elastix`, as plain dicts.

    Args:
        mode: ``"affine"`` (similarity then affine) or ``"bspline"`` (the same, then B-spline).
        iterations: maximum ASGD iterations per resolution and stage.
        resolutions: pyramid levels (default 4 for the affine, 3 for the B-spline stage).
        samples: random spatial samples per iteration (default 2048 affine, 4096 B-spline).
        grid_spacing_mm: final B-spline control-point spacing, mm, at least ``min_grid_voxels`` times the
            largest fixed-image voxel size (``fixed_spacing_mm``, mm, when given).
        min_grid_voxels: see ``grid_spacing_mm``. On a 5.4 mm OpenKBP CT under a known rigid motion a 10 mm
            grid left 1-3 mm errors at the organ centroids (0.3 mm after the affine stage); 25 mm left 0.5-1.4 mm.
        fixed_spacing_mm: the fixed (source) image's voxel size, mm.
        initialisation: ``"GeometricalCenter"``, ``"CenterOfGravity"`` or ``"none"`` (first stage only).
        similarity_stage: run a similarity (rotation, translation, isotropic scale) stage before the affine.
        bending_weight: weight of a bending-energy penalty in the B-spline stage (0: none; MI has weight 1).

    Returns:
        A list of elastix parameter maps (dict of str -> str or list of str), run in order.
    """
    if mode not in ELASTIX_MODES:
        raise InputError(f"unknown elastix mode '{mode}'; use one of {', '.join(ELASTIX_MODES)}")
    common = {
        "FixedImagePyramid": "FixedRecursiveImagePyramid",
        "MovingImagePyramid": "MovingRecursiveImagePyramid",
        "Interpolator": "LinearInterpolator",
        "ResampleInterpolator": "FinalLinearInterpolator",
        "ImageSampler": "RandomCoordinate",
        "NewSamplesEveryIteration": "true",
        "Optimizer": "AdaptiveStochasticGradientDescent",
        "AutomaticParameterEstimation": "true",
        # the "Original" step-size estimation measures Jacobians for every B-spline parameter and takes
        # tens of minutes on a 128^3 CT; the displacement-distribution estimate takes seconds
        "ASGDParameterEstimationMethod": "DisplacementDistribution",
        "NumberOfSamplesForExactGradient": "4096",
        "MaximumNumberOfSamplingAttempts": "8",
        "CheckNumberOfSamples": "true",
        "RequiredRatioOfValidSamples": "0.05",  # subjects with different fields of view overlap partly
        "MaximumNumberOfIterations": str(int(iterations)),
        "WriteResultImage": "false",
        "WriteIterationInfo": "false",
        "DefaultPixelValue": "0",
        "ErodeMask": "false",
        "HowToCombineTransforms": "Compose",
    }
    affine = dict(common)
    affine.update({
        "Registration": "MultiResolutionRegistration",
        "Transform": "AffineTransform",
        "Metric": "AdvancedMattesMutualInformation",
        "NumberOfHistogramBins": "32",
        "AutomaticScalesEstimation": "true",
        "NumberOfResolutions": str(resolutions or 4),
        "NumberOfSpatialSamples": str(samples or 2048),
    })
    linear = [affine]
    if similarity_stage:
        similarity = dict(affine)
        similarity["Transform"] = "SimilarityTransform"
        linear = [similarity, affine]
    if initialisation.lower() != "none":
        linear[0]["AutomaticTransformInitialization"] = "true"
        linear[0]["AutomaticTransformInitializationMethod"] = initialisation
    if mode == "affine":
        return linear
    n_res = resolutions or 3
    final_grid_mm = float(grid_spacing_mm)
    if fixed_spacing_mm is not None:
        final_grid_mm = max(final_grid_mm, min_grid_voxels * float(max(fixed_spacing_mm)))
    bspline = dict(common)
    bspline.update({
        "Registration": "MultiResolutionRegistration",
        "Transform": "BSplineTransform",
        "Metric": "AdvancedMattesMutualInformation",
        "NumberOfHistogramBins": "32",
        "NumberOfResolutions": str(n_res),
        "FinalGridSpacingInPhysicalUnits": f"{final_grid_mm:.3f}",
        "GridSpacingSchedule": [str(2.0 ** (n_res - 1 - r)) for r in range(n_res)],
        "NumberOfSpatialSamples": str(samples or 4096),
    })
    if bending_weight > 0:
        bspline.update({"Registration": "MultiMetricMultiResolutionRegistration",
                        "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
                        "Metric0Weight": "1.0", "Metric1Weight": f"{bending_weight:g}"})
    return [*linear, bspline]


def crop_to_body(image, threshold_hu: float = -500.0, margin_mm: float = 10.0):
    """Crop a SimpleITK CT to the bounding box of voxels above ``threshold_hu`` (plus a margin).

    Physical coordinates are unchanged (the origin moves with the crop). Cropping the fixed image keeps
    the B-spline control grid, which spans the fixed image, on the body instead of the surrounding air.
    """
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(image)
    fg = arr > threshold_hu
    if not fg.any():
        return image
    lo, hi = [], []
    for axis_zyx in range(arr.ndim):
        other = tuple(a for a in range(arr.ndim) if a != axis_zyx)
        idx = np.flatnonzero(fg.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    lo_ijk, hi_ijk = np.array(lo[::-1]), np.array(hi[::-1])
    m = np.ceil(margin_mm / np.asarray(image.GetSpacing())).astype(int)
    size = np.asarray(image.GetSize())
    lo_ijk = np.maximum(lo_ijk - m, 0)
    hi_ijk = np.minimum(hi_ijk + m, size - 1)
    return sitk.RegionOfInterest(image, [int(v) for v in hi_ijk - lo_ijk + 1], [int(v) for v in lo_ijk])


def _to_itk(image, itk):
    """A float32 ITK image with the geometry of a SimpleITK image, intensities clipped and made non-negative."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    arr = np.clip(arr, *HU_CLIP) - HU_CLIP[0]
    out = itk.image_from_array(np.ascontiguousarray(arr))
    out.SetSpacing([float(s) for s in image.GetSpacing()])
    out.SetOrigin([float(s) for s in image.GetOrigin()])
    d = image.GetDimension()
    out.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)))
    return out


_ITK_READY = False


def _itk():
    """Import itk and load the elastix wrappers once, so the first timed registration does not pay for it."""
    global _ITK_READY
    import itk

    if not _ITK_READY:
        itk.ParameterObject.New()
        _ = itk.ElastixRegistrationMethod[itk.Image[itk.F, 3], itk.Image[itk.F, 3]]
        itk.image_from_array(np.zeros((2, 2, 2), np.float32))
        _ITK_READY = True
    return itk


def _threads(threads: int | None) -> int | None:
    if threads is not None:
        return int(threads)
    env = os.environ.get("SAMEMBED_ELASTIX_THREADS")
    return int(env) if env else None


def register_elastix(source, target, mode: str = "bspline", *, threads: int | None = None, **map_options):
    """Register ``fixed = source`` to ``moving = target`` with elastix.

    Returns:
        A callable mapping (N, 3) source LPS mm points to (N, 3) target LPS mm points, and the
        registration wall time in seconds (image conversion included, file reading excluded).
    """
    itk = _itk()
    src, tgt = _read_sitk(source), _read_sitk(target)
    if src.GetDimension() != 3 or tgt.GetDimension() != 3:
        raise InputError("elastix baselines support 3D images only")
    t0 = time.perf_counter()
    # crop only the fixed image (it defines the sampled domain and the B-spline grid); a cropped moving
    # image made 3 of 12 OpenKBP pairs stop with "too many samples map outside moving image buffer"
    fixed, moving = _to_itk(crop_to_body(src), itk), _to_itk(tgt, itk)
    params = itk.ParameterObject.New()
    map_options.setdefault("fixed_spacing_mm", src.GetSpacing())
    for m in elastix_parameter_maps(mode, **map_options):
        params.AddParameterMap({k: (v if isinstance(v, list) else [v]) for k, v in m.items()})
    reg = itk.ElastixRegistrationMethod.New(fixed, moving)
    reg.SetParameterObject(params)
    reg.SetLogToConsole(False)
    reg.SetLogToFile(False)
    n = _threads(threads)
    if n:
        reg.SetNumberOfThreads(n)
    reg.Update()
    transform = reg.ConvertToItkTransform(reg.GetCombinationTransform())
    seconds = time.perf_counter() - t0

    def apply(points_lps_mm) -> np.ndarray:
        pts = _points(points_lps_mm)
        return np.array([list(transform.TransformPoint([float(v) for v in p])) for p in pts], dtype=np.float64)

    return apply, seconds


def transfer_points_elastix(source_image_path, target_image_path, points_lps_mm, mode: str = "affine", *,
                            threads: int | None = None, **map_options) -> tuple[np.ndarray, float]:
    """Carry source points into the target with an elastix registration (affine, or affine + B-spline).

    Args:
        source_image_path: the image the points are in (path or ``SimpleITK.Image``); elastix's FIXED image.
        target_image_path: the image to find them in (path or ``SimpleITK.Image``); elastix's MOVING image.
        points_lps_mm: (N, 3) source points, LPS mm.
        mode: ``"affine"`` or ``"bspline"`` (affine followed by a B-spline stage).
        threads: elastix threads (default ``$SAMEMBED_ELASTIX_THREADS`` or ITK's default).
        map_options: forwarded to :func:`elastix_parameter_maps` (iterations, resolutions, samples,
            grid_spacing_mm, initialisation).

    Returns:
        ``(points_lps_mm, seconds)``: (N, 3) points in the target frame, LPS mm, and the registration plus
        transfer wall time (file reading excluded).

    Raises:
        InputError: bad points, a missing file, or an unknown mode.

    >>> moved, seconds = transfer_points_elastix("src.nii.gz", "tgt.nii.gz", [[0.0, 0.0, 0.0]])  # doctest: +SKIP
    """
    pts = _points(points_lps_mm)
    apply, seconds = register_elastix(source_image_path, target_image_path, mode, threads=threads, **map_options)
    t0 = time.perf_counter()
    moved = apply(pts)
    return moved, seconds + time.perf_counter() - t0
