"""Preprocessing, as in the official SAM recipe: reorient, resample to the model spacing, map intensities.

The output is the network input array (float32, ``[k, j, i]``) and its exact :class:`~samembed.image.Grid`,
so any LPS mm point maps to the network grid and back through that grid (oblique directions included).

Steps (official ``tools/utils.py::read_image``, re-expressed for SimpleITK, see
``shared/reference/sam_official_checkpoint.md`` section 3):

1. Reorient the voxel array to the closest LPS orientation (axis permutations and flips only).
2. Resample each axis to the model spacing ``t``: size ``ceil(n*s/t)``, corner-aligned (origin moved by
   ``(t - s)/2`` mm along each axis direction), linear interpolation, ``fill`` outside the image.
3. Intensity: CT clip to [-1024, 3071] HU, map to [0, 255], subtract 50; MRI and radiographs map the
   0.2-99.8 percentiles to [0, 255] and subtract 50.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from .errors import InputError
from .image import Grid, Image

log = logging.getLogger(__name__)

Modality = Literal["ct", "mri", "xray"]
CT_RANGE_HU = (-1024.0, 3071.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes network input.

    Attributes:
        spacing_mm: isotropic model spacing, mm.
        fill: value outside the image after resampling: "zero" (0 raw, the official choice) or "air"
            (-1024 HU for CT, the image minimum otherwise).
        percentiles: low/high percentiles for MRI and radiograph mapping.
    """

    spacing_mm: float = 2.0
    fill: str = "zero"
    percentiles: tuple[float, float] = (0.2, 99.8)

    def to_dict(self) -> dict:
        """JSON-friendly form, stored in checkpoints and cache keys."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, unknown values refused (``ValueError``: e.g. a fill
        of a later samembed version, which was silently taken as "zero")."""
        config = PreprocessConfig(
            spacing_mm=float(d.get("spacing_mm", 2.0)),
            fill=str(d.get("fill", "zero")),
            percentiles=tuple(float(v) for v in d.get("percentiles", (0.2, 99.8))),
        )
        if config.fill not in ("zero", "air"):
            raise ValueError(f"preprocessing fill '{config.fill}' is not one of zero, air")
        if not (math.isfinite(config.spacing_mm) and config.spacing_mm > 0):
            raise ValueError(f"preprocessing spacing_mm {config.spacing_mm} is not a positive number")
        low_high = config.percentiles
        if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1] <= 100:
            raise ValueError(f"preprocessing percentiles {list(low_high)} are not two of 0..100, low before high")
        return config


@dataclass(frozen=True, eq=False)
class Prepared:
    """Network input: ``array`` (float32, ``[k, j, i]``) on ``grid`` (model spacing), and the modality used.

    ``body``: the body mask (bool, zyx) of the network input (``array`` padded to the network's multiple), made ahead
    on its grid of stride ``body_stride_zyx`` (:func:`body_mask_array` of the padded input subsampled by it), or
    None (the engine makes it)."""

    array: np.ndarray
    grid: Grid
    modality: str
    fill_value: float = -50.0
    body: np.ndarray | None = None
    body_stride_zyx: tuple[int, ...] | None = None


def pad_to_multiple(arr: np.ndarray, multiple_zyx: tuple[int, ...], value: float) -> np.ndarray:
    """``arr`` padded at its far end with ``value`` to a multiple of ``multiple_zyx`` per axis (itself when it is)."""
    pads = [(0, (-n) % m) for n, m in zip(arr.shape, multiple_zyx)]
    if not any(p[1] for p in pads):
        return arr
    return np.pad(arr, pads, mode="constant", constant_values=value)


#: a 3D image is CT when this percentile of its values (every 16th slice or so) is at most :data:`CT_AIR_HU`
MODALITY_PERCENTILE = 0.5
#: air in Hounsfield units, with a margin: MRI and PET values are not that negative
CT_AIR_HU = -500.0


def detect_modality(image: Image) -> Modality:
    """Guess the modality: 2D images are radiographs; 3D images whose values reach below -500 are CT (air in HU):
    the :data:`MODALITY_PERCENTILE` percentile of about 16 of its slices at most :data:`CT_AIR_HU`."""
    if image.ndim == 2:
        return "xray"
    return "ct" if _percentile_at_most(_slices_sample(image.array), MODALITY_PERCENTILE, CT_AIR_HU) else "mri"


def _slices_sample(array: np.ndarray) -> np.ndarray:
    """About 16 of a volume's slices, evenly spread (a view): what its intensities are judged by."""
    return array[:: max(1, array.shape[0] // 16)]


#: what a CT stored without its rescale (``HU + 1024``, as many scanners store it) reads for a value in HU
CT_STORED_OFFSET = 1024
#: bone that a CT's 99.9th percentile reaches (HU): :func:`looks_like_offset_ct`
OFFSET_BONE_HU = 700


def looks_like_offset_ct(image: Image) -> bool:
    """Whether the 3D ``image``, said to be a CT, looks stored without its rescale slope and intercept (``HU + 1024``,
    as scanners store it): integer voxels, none negative, and its 99.9th percentile at least 1724 (bone above 700
    HU, shifted: 759-1298 HU in the CTs of ``../shared``), which a CT in HU cropped inside the body (none negative
    either) hardly reaches. Mapped as HU, such a scan is 1024 HU too bright: 118 mm of mean error in a review."""
    a = image.array
    if image.ndim != 3 or a.dtype.kind not in "iu":
        return False
    sample = _slices_sample(a)
    return bool(sample.min() >= 0) and not _percentile_at_most(sample, 99.9, OFFSET_BONE_HU + CT_STORED_OFFSET)


#: images warned of as offset CT (``--modality ct`` on values stored without their rescale), by name: once each
_WARNED_OFFSET: set[str] = set()


def warn_offset_ct(image: Image) -> None:
    """A warning (once per image) that ``image``, given as CT, looks stored as ``HU + 1024`` without its rescale
    (:func:`looks_like_offset_ct`): mapped as HU, every match is wrong; what to do."""
    if image.name in _WARNED_OFFSET or not looks_like_offset_ct(image):
        return
    _WARNED_OFFSET.add(image.name)
    log.warning("%s: given as CT (--modality ct), but no voxel is below 0 and its bone reads %d or more: it looks like "
                "a CT stored as HU + %d without its rescale slope and intercept, whose values mapped as HU make every "
                "match wrong; subtract %d (or set the file's rescale intercept to -%d) and match again", image.name,
                OFFSET_BONE_HU + CT_STORED_OFFSET, CT_STORED_OFFSET, CT_STORED_OFFSET, CT_STORED_OFFSET)


def _percentile_at_most(values: np.ndarray, q: float, limit: float) -> bool:
    """``np.percentile(values, q) <= limit`` (numpy's default, linear interpolation between the two order statistics
    around ``q``), for integer voxels decided by counting the values at most ``limit`` instead of sorting: when both
    order statistics lie on the same side of ``limit`` the interpolated value does too (numpy's interpolation of two
    integers stays between them, exactly), so the count decides; only when ``limit`` falls between them is the
    percentile computed. The same answer always; a few ms instead of 35-40 ms for the 2 M voxels of a chest CT's 16
    slices (every image of a cold match is checked, in the prefetch process that the match waits for). Other types
    (floats, which may hold NaN) take ``np.percentile``."""
    n = values.size
    if n == 0 or values.dtype.kind not in "iub":
        return bool(np.percentile(values, q) <= limit)
    k = int(np.floor(q / 100.0 * (n - 1)))  # the lower order statistic's rank (0-based); the upper one is k + 1
    at_most = int(np.count_nonzero(values <= limit))
    if at_most >= min(k + 2, n):  # both order statistics at most the limit
        return True
    if at_most <= k:  # the lower one, and so the interpolated value, above it
        return False
    return bool(np.percentile(values, q) <= limit)


def _orient_lps(img):
    import SimpleITK as sitk

    if img.GetDimension() != 3:
        return img
    return sitk.DICOMOrient(img, "LPS")


#: a grid is oriented in numpy (:func:`oriented_lps`) when every index axis runs along one LPS axis with a
#: direction cosine above this; no two axes can then claim the same LPS axis. More oblique grids go to SimpleITK.
AXIS_ALIGNED_COSINE = 0.9


def oriented_lps(image: Image) -> Image | None:
    """``image`` in the closest LPS orientation, as ``SimpleITK.DICOMOrient(..., "LPS")`` gives a 3D image (axis
    permutations and flips: the same voxels, spacing and direction, the origin to double rounding), as a view of its
    voxels. A 2D image likewise: its index axes then run along +x and +y, as a PNG's do, whatever order and sense
    its file stores them in (a 2D NIfTI that nibabel wrote with an identity RAS affine has direction diag(-1, -1)).

    Reorienting through SimpleITK copies the volume twice (into a SimpleITK image, then the reoriented one): for a
    512 x 512 x 133 CT, 0.1 s and 140 MB of fresh pages per image, paid while the engine waits for its inputs. An
    axis permutation is copied once into C order (the per-axis resampling then reads whole rows); flips stay views.

    Returns None for a grid too oblique to say which LPS axis an index axis follows (:data:`AXIS_ALIGNED_COSINE`):
    :func:`preprocess` then orients it with SimpleITK.
    """
    g = image.grid
    d = g.ndim
    order = _lps_axis_order(g.direction) if d in (2, 3) and image.array.ndim == d else None
    if order is None:
        return None
    perm, sign = order
    D = g.direction
    size = np.asarray(g.size_ijk)
    first = np.zeros(d)  # the input index of the voxel that comes first
    first[perm] = np.where(sign < 0, size[perm] - 1, 0)
    origin = g.index_to_lps(first)[0]
    arr = image.array
    last = d - 1
    if perm.tolist() != list(range(d)):  # array axis last - a holds index axis a
        arr = np.ascontiguousarray(np.transpose(arr, [last - int(perm[last - k]) for k in range(d)]))
    flips = tuple(last - j for j in range(d) if sign[j] < 0)
    if flips:
        arr = np.flip(arr, axis=flips)
    grid = Grid(arr.shape, g.spacing_mm[perm], origin, D[:, perm] * sign)
    return Image(arr, grid, image.name, image.pixel_spacing_known)


def _lps_axis_order(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """How :func:`oriented_lps` reorders a grid of ``direction`` (d x d, columns the index axes): ``(perm, sign)``,
    ``perm[j]`` the index axis that runs along LPS axis j and ``sign[j]`` -1 where it runs against it (flipped); None
    when the grid is too oblique to say (:data:`AXIS_ALIGNED_COSINE`)."""
    D = np.asarray(direction, dtype=np.float64)
    d = len(D)
    along = np.argmax(np.abs(D), axis=0)  # the LPS axis each index axis (column) runs along
    if sorted(along.tolist()) != list(range(d)) or np.abs(D[along, np.arange(d)]).min() <= AXIS_ALIGNED_COSINE:
        return None
    perm = np.argsort(along)
    return perm, np.sign(D[np.arange(d), perm])


def axes_reoriented(grid: Grid) -> bool:
    """Whether :func:`oriented_lps` permutes or flips ``grid``'s axes (a grid it keeps as it is, or declines, is
    not)."""
    order = _lps_axis_order(grid.direction)
    return order is not None and (order[0].tolist() != list(range(grid.ndim)) or bool((order[1] < 0).any()))


def _resampled_geometry(size_xyz, spacing_xyz, origin_lps_mm, direction, spacing_mm: float,
                        pad_multiple_xyz: tuple[int, ...] | None):
    """The output grid of :func:`resample_to_spacing` for an input grid (size, spacing and origin in (i, j, k)
    order, the (d, d) direction): (size xyz, spacing xyz mm, origin LPS mm)."""
    size = np.asarray(size_xyz)
    old_sp = np.asarray(spacing_xyz, dtype=np.float64)
    d = len(size)
    new_sp = np.full(d, float(spacing_mm))
    new_size = [int(np.ceil(n * s / t - 1e-6)) if n > 1 else 1 for n, s, t in zip(size, old_sp, new_sp)]
    new_size = _padded(new_size, pad_multiple_xyz)
    new_sp = np.where(size > 1, new_sp, old_sp)
    direction = np.asarray(direction, dtype=np.float64).reshape(d, d)
    shift = (new_sp - old_sp) / 2.0
    origin = np.asarray(origin_lps_mm, dtype=np.float64) + direction @ shift
    return new_size, new_sp, origin


def _sitk_geometry(img) -> tuple:
    """(size xyz, spacing xyz, origin, direction) of a SimpleITK image, as :func:`_resampled_geometry` takes them."""
    d = img.GetDimension()
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), np.array(img.GetDirection()).reshape(d, d)


#: a 3D grid whose index axes stray further than this (degrees) from the LPS axes nearest to them is resampled onto
#: the LPS axes for the network (:func:`resample_onto_lps_axes`); a nearer one keeps its axes (permuted and flipped
#: onto LPS, :func:`oriented_lps`). The networks learnt from axial scans: with the target on a grid rotated by 20
#: (30) degrees about z, the anatomy where it was, LIDC-0001's 50 points in its warp had a mean error of 3.0 (12.9) mm
#: with the input on the grid's own axes and 1.6 (0.8) mm on the LPS axes, 0.8 mm unrotated; OpenKBP organs between
#: patients 18.1 (19.1) and 14.6 (15.6) mm, 15.4 mm unrotated (``benchmarks/results/oblique_grids.md``)
OBLIQUE_LIMIT_DEG = 5.0


def obliquity_deg(direction: np.ndarray) -> float:
    """The largest angle, in degrees, between an index axis of a grid (a column of ``direction``) and the LPS axis
    nearest to it: 0 for axial, sagittal and coronal grids however their axes are permuted and flipped."""
    cosines = np.abs(np.asarray(direction, dtype=np.float64)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def onto_lps_axes(grid: Grid) -> bool:
    """Whether :func:`preprocess` puts the input of an image on ``grid`` onto the LPS axes: a grid more oblique
    than :data:`OBLIQUE_LIMIT_DEG` (a 2D one too: the 2D networks learnt from radiographs as they are stored, along
    x and y)."""
    return grid.ndim in (2, 3) and obliquity_deg(grid.direction) > OBLIQUE_LIMIT_DEG


def resample_onto_lps_axes(img, spacing_mm: float, fill_value: float,
                           pad_multiple_xyz: tuple[int, ...] | None = None):
    """Resample a SimpleITK image (2D or 3D) of any orientation onto a grid along the LPS axes (direction identity) at
    isotropic ``spacing_mm`` (linear, float32), with SimpleITK: the grid's first corner is the least LPS corner of the
    box around the image's voxels (their outer corners), its size the box's, extended at its far end to a multiple
    of ``pad_multiple_xyz`` when given; voxels outside the image take ``fill_value``. For grids more oblique than
    :data:`OBLIQUE_LIMIT_DEG`."""
    import itertools

    size = np.asarray(img.GetSize())
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                        for corner in itertools.product(*[(-0.5, n - 0.5) for n in size])])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    new_size = [max(1, int(np.ceil(v / spacing_mm - 1e-6))) for v in hi - lo]
    d = img.GetDimension()
    return _linear_resample(img, _padded(new_size, pad_multiple_xyz), (float(spacing_mm),) * d,
                            lo + spacing_mm / 2.0, np.eye(d).ravel(), fill_value)


def _padded(size_xyz, pad_multiple_xyz: tuple[int, ...] | None) -> list[int]:
    """``size_xyz`` extended to a multiple of ``pad_multiple_xyz`` (unchanged when None)."""
    if pad_multiple_xyz is None:
        return [int(n) for n in size_xyz]
    return [int(n) + (-int(n)) % int(m) for n, m in zip(size_xyz, pad_multiple_xyz)]


def _linear_resample(img, size_xyz, spacing_xyz, origin_lps_mm, direction, fill_value: float):
    """``img`` (SimpleITK) resampled onto the given grid with SimpleITK: linear, float32, ``fill_value`` outside
    the image."""
    import SimpleITK as sitk

    res = sitk.ResampleImageFilter()
    res.SetOutputSpacing(tuple(float(v) for v in spacing_xyz))
    res.SetSize([int(v) for v in size_xyz])
    res.SetOutputOrigin(tuple(float(v) for v in origin_lps_mm))
    res.SetOutputDirection(tuple(float(v) for v in direction))
    res.SetInterpolator(sitk.sitkLinear)
    res.SetDefaultPixelValue(float(fill_value))
    res.SetOutputPixelType(sitk.sitkFloat32)
    return res.Execute(img)


def resample_to_spacing(img, spacing_mm: float, fill_value: float, pad_multiple_xyz: tuple[int, ...] | None = None):
    """Resample a SimpleITK image to isotropic ``spacing_mm`` on a corner-aligned grid (linear), with SimpleITK.

    ``pad_multiple_xyz``: the output grid extends (at its far end) to a multiple of these sizes; the voxels added lie
    outside the image and take ``fill_value``, as any voxel beyond the image does. :func:`preprocess` uses it for 2D
    images and computes the same voxels per axis for 3D ones (:func:`resample_per_axis`), tested against it.
    """
    new_size, new_sp, origin = _resampled_geometry(*_sitk_geometry(img), spacing_mm, pad_multiple_xyz)
    return _linear_resample(img, new_size, new_sp, origin, img.GetDirection(), fill_value)


#: a sample within this many voxels of the image's edge (its continuous index at -0.5 or n - 0.5) lies on it
EDGE_TOLERANCE_VOXELS = 1e-6


def _axis_samples(n_in: int, n_out: int, ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each of ``n_out`` corner-aligned output samples falls on an axis of ``n_in`` input voxels, ``ratio`` =
    output / input spacing: (lower neighbour, upper neighbour, weight of the upper one, inside the image).

    As SimpleITK's linear interpolator: neighbours are clamped to the image, and a sample is inside when its
    continuous index lies in [-0.5, n_in - 0.5). A sample exactly on the far edge (``n_in - 0.5``, within
    :data:`EDGE_TOLERANCE_VOXELS`; e.g. 3 mm slices, an odd count, a 2 mm grid) is outside, always. SimpleITK
    decides it by its double rounding (it reaches each sample through physical space, and along x incrementally along
    each row), so it fills it for some origins and interpolates the edge voxel for others.
    """
    c = (np.arange(n_out, dtype=np.float64) + 0.5) * ratio - 0.5
    f = np.floor(c)
    lower = np.clip(f, 0, n_in - 1).astype(np.intp)
    upper = np.clip(f + 1, 0, n_in - 1).astype(np.intp)
    tol = EDGE_TOLERANCE_VOXELS
    return lower, upper, c - f, (c >= -0.5 - tol) & (c < n_in - 0.5 - tol)


#: output elements per block of rows interpolated at once (float64: 8 MB), so that a large radiograph or slice
#: needs no temporaries of its own size
_BLOCK_ELEMENTS = 1 << 20


def _rows_read(lower: np.ndarray, upper: np.ndarray, a: int,
               b: int) -> tuple[int, int, slice | np.ndarray, np.ndarray, np.ndarray]:
    """Output rows ``a..b-1`` of a per-axis resampling, whose neighbours along y are the input rows ``lower`` and
    ``upper`` (:func:`_axis_samples`): ``(a, b, the input rows they read, and each output row's lower and upper
    neighbour among those)``. Where y is downsampled, some input rows between the first and the last are nobody's
    neighbour (a 0.7 mm slice onto 2 mm reads 360 of its 512 rows), and are left out: each row's interpolation
    along x is then done only for rows that are used, the same values (about 1.5x faster for thin-slice CTs).
    Otherwise the rows read are a slice (a view, no copy)."""
    lo, hi = lower[a:b], upper[a:b]
    first, last = int(lo[0]), int(hi[-1])
    used = np.unique(np.concatenate([lo, hi]))
    if len(used) == last - first + 1:  # every row in between is used: a view
        return a, b, slice(first, last + 1), lo - first, hi - first
    return a, b, used, np.searchsorted(used, lo), np.searchsorted(used, hi)


def resample_per_axis(img, spacing_mm: float, fill_value: float,
                      pad_multiple_xyz: tuple[int, ...] | None = None) -> tuple[np.ndarray, Grid]:
    """:func:`resample_to_spacing`'s voxels (float32, zyx) and grid, computed one axis at a time.

    The output grid shares the input's direction, so each output axis samples one input axis: trilinear interpolation
    is then a linear interpolation along x, then y, then z, in float64 as SimpleITK's interpolator computes it. The
    values are SimpleITK's to the last bit but for a few voxels per million, which differ in the last bit of their
    float32 (SimpleITK reaches each sample's position through physical space, in double), and but for samples exactly
    on the image's far edge, which take the fill value here, and the fill value or the edge voxel's there, by the
    rounding of the image's origin (see :func:`_axis_samples`). It takes 0.06-0.12 s for an OpenKBP CT at 2 mm, where SimpleITK's
    resampling takes 0.25-0.5 s on one thread: the cold path preprocesses every image, and a second process does it
    while the engine imports torch. Memory: the output, two interpolated input slices (3D) and blocks of rows of at
    most 8 MB. ``img``: a scalar 2D or 3D SimpleITK image, or a samembed :class:`Image` (its array read in place,
    whatever its strides, e.g. the view of :func:`oriented_lps`).
    """
    if isinstance(img, Image):  # its array in place, any strides (e.g. the flipped view of oriented_lps)
        g = img.grid
        d, components = g.ndim, 1 if img.array.ndim == g.ndim else -1
        geometry = (g.size_ijk, g.spacing_mm, g.origin_lps_mm, g.direction)
        voxels = img.array
    else:
        import SimpleITK as sitk

        d, components = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
        geometry = _sitk_geometry(img)
        voxels = sitk.GetArrayViewFromImage(img) if components == 1 else None  # zyx, the image's own memory (only read)
    if components != 1 or d not in (2, 3):
        raise InputError(f"per-axis resampling takes scalar 2D or 3D images, not {d}D with "
                         f"{'several' if components < 0 else components} components")
    new_size, new_sp, origin = _resampled_geometry(*geometry, spacing_mm, pad_multiple_xyz)
    if d == 2:
        voxels = voxels[None]
    ratios = [float(t) / float(s) for t, s in zip(new_sp, geometry[1])]
    size_zyx = [int(n) for n in reversed(new_size)]
    if d == 2:
        size_zyx, ratios = [1, *size_zyx], [*ratios, 1.0]
    (z0, z1, wz, in_z), (y0, y1, wy, in_y), (x0, x1, wx, in_x) = (
        _axis_samples(n, m, r) for n, m, r in zip(voxels.shape, size_zyx, reversed(ratios)))
    # output rows per block, so that a block's rows of input (more of them where y is downsampled) stay within it
    rows = max(1, int(_BLOCK_ELEMENTS // (size_zyx[2] * max(1.0, ratios[1]))))
    blocks = [_rows_read(y0, y1, a, min(size_zyx[1], a + rows)) for a in range(0, size_zyx[1], rows)]

    def interpolate_slice(k: int, into: np.ndarray) -> np.ndarray:
        """Input slice ``k`` interpolated along x, then y, into ``into`` (output rows x columns), block by block."""
        s = voxels[k]
        for a, b, read, lower, upper in blocks:
            part = s[read]  # the input rows this block reads (only those: a row's values along x need no other)
            lo = part[:, x0].astype(np.float64)
            along_x = part[:, x1].astype(np.float64)
            along_x -= lo
            along_x *= wx
            along_x += lo
            lo = along_x[lower]
            hi = along_x[upper]
            hi -= lo
            hi *= wy[a:b, None]
            hi += lo
            into[a:b] = hi
        return into

    out = np.empty(size_zyx, np.float32)
    if size_zyx[0] == 1 and voxels.shape[0] == 1 and in_z[0]:  # 2D, or one slice onto one: no blend along z
        interpolate_slice(0, out[0])
    else:
        planes: dict[int, np.ndarray] = {}  # the last two input slices interpolated in x and y (float64)

        def plane(k: int) -> np.ndarray:
            if k not in planes:
                if len(planes) == 2:
                    del planes[next(iter(planes))]
                planes[k] = interpolate_slice(k, np.empty(size_zyx[1:], np.float64))
            return planes[k]

        blend = np.empty(size_zyx[1:], np.float64)
        for k in range(size_zyx[0]):
            if not in_z[k]:
                out[k] = fill_value
                continue
            lo = plane(int(z0[k]))
            np.subtract(plane(int(z1[k])), lo, out=blend)
            blend *= wz[k]
            blend += lo  # along z
            out[k] = blend
    out[:, ~in_y, :] = fill_value
    out[:, :, ~in_x] = fill_value
    if d == 2:
        out = out[0]
    grid = Grid(tuple(size_zyx[-d:]), tuple(float(v) for v in new_sp), tuple(float(v) for v in origin), geometry[3])
    return out, grid


#: a float image whose robust range (0.2-99.8th percentiles) is below this many units is mapped by its own values,
#: not the official recipe's whole units (:func:`map_intensity`)
FLOAT_RANGE_KEPT = 100.0


def map_intensity(array: np.ndarray, modality: str, percentiles: tuple[float, float] = (0.2, 99.8),
                  in_place: bool = False) -> np.ndarray:
    """Official intensity mapping to about [-50, 205] (float32; see the module docstring): a new array, ``array``
    only read, or, with ``in_place``, for CT, ``array`` itself (float32, writable) mapped in place, the same values."""
    a = array.astype(np.float32, copy=False)
    if modality == "ct":
        lo, hi = CT_RANGE_HU
        # (clip(a) - lo) * (255 / (hi - lo)) - 50, in float32, in one buffer: the same values as the expression
        out = np.clip(a, lo, hi, out=a if in_place and a is array else None)
        out -= np.float32(lo)
        out *= np.float32(255.0 / (hi - lo))
        out -= np.float32(50.0)
        return out
    p_lo, p_hi = np.percentile(a, percentiles)
    # the official recipe's whole units (and a top of at least 1) for MRI; a float image of a small range (values in
    # [0, 1], an attenuation map in 1/mm, [-1, 1]) keeps its own: truncated, it was squeezed into a few of the 255
    # mapped units, or into none (a review: 15 -> 24-68 mm between patients)
    official = modality == "mri" and (array.dtype.kind in "iub" or float(p_hi) - float(p_lo) >= FLOAT_RANGE_KEPT)
    p_hi = max(float(p_hi), 1.0) if official else float(p_hi)
    lo_i, hi_i = (int(p_lo), int(p_hi)) if official else (float(p_lo), float(p_hi))
    if hi_i <= lo_i:
        hi_i = lo_i + 1
    out = (np.clip(a, p_lo, p_hi) - lo_i) * (255.0 / (hi_i - lo_i)) - 50.0
    return out.astype(np.float32, copy=False)


def preprocess(image: Image, config: PreprocessConfig, modality: str = "auto",
               pad_multiple_zyx: tuple[int, ...] | None = None) -> Prepared:
    """Turn an :class:`Image` into network input at the model spacing.

    Args:
        image: the input image (not modified).
        config: model spacing and fill policy.
        modality: "auto", "ct", "mri" or "xray".
        pad_multiple_zyx: for CT, the array comes padded (at its far end, with the fill value) to a multiple of
            these sizes, by the resampling itself (no second copy of the volume); other modalities, whose mapping
            depends on the whole image's percentiles, come unpadded.

    The input keeps the image's axes, permuted and flipped onto LPS, unless they are more oblique than
    :data:`OBLIQUE_LIMIT_DEG`: then it lies on the LPS axes (:func:`resample_onto_lps_axes`).
    """
    from .io import image_to_sitk, sitk_voxels

    mod = detect_modality(image) if modality == "auto" else modality
    if mod not in ("ct", "mri", "xray"):
        raise InputError(f"{image.name}: unknown modality '{modality}'; use auto, ct, mri or xray")
    lps_axes = onto_lps_axes(image.grid)
    view = None if lps_axes else oriented_lps(image)  # grids along the LPS axes: reoriented without a copy
    if view is not None and image.ndim == 2:
        img = image_to_sitk(view)  # radiographs are resampled by SimpleITK (below)
    else:
        img = view if view is not None else image_to_sitk(image) if lps_axes else _orient_lps(image_to_sitk(image))
    if config.fill == "air":
        fill = CT_RANGE_HU[0] if mod == "ct" else float(image.array.min())
    else:
        fill = 0.0
    spacing = config.spacing_mm  # (a picture without a spacing: its pixels taken as 1 mm, --spacing sets the real one)
    pad = tuple(reversed(pad_multiple_zyx)) if pad_multiple_zyx is not None and mod == "ct" else None
    if lps_axes or image.ndim == 2:
        # an oblique grid: onto the LPS axes (OBLIQUE_LIMIT_DEG); radiographs: SimpleITK (on its threads) is faster,
        # 0.05 s against 0.1 s
        res = (resample_onto_lps_axes if lps_axes else resample_to_spacing)(img, spacing, fill, pad)
        d = res.GetDimension()
        grid = Grid(tuple(reversed(res.GetSize())), res.GetSpacing(), res.GetOrigin(),
                    np.array(res.GetDirection()).reshape(d, d))
        voxels = sitk_voxels(res)  # SimpleITK's own buffer, no copy
    else:
        voxels, grid = resample_per_axis(img, spacing, fill, pad)
    fill_mapped = float(map_intensity(np.array([fill], dtype=np.float32), mod, (0.0, 100.0))[0]) if mod == "ct" else -50.0
    # CT is mapped in the resampled array itself (a volume-sized array less to make: on a VM whose fresh memory
    # costs about 10 us per 4 KB page, 0.05-0.1 s of a 40 MB input); the other mappings write a new array
    out = map_intensity(voxels, mod, config.percentiles, in_place=True)
    return Prepared(out, grid, mod, fill_mapped)


def body_mask(prepared: Prepared, threshold_mapped: float | None = None) -> np.ndarray:
    """Boolean mask (same shape as ``prepared.array``) of the body: above air, closed, its largest component and
    others as large and thick as a limb (not the table), holes filled per axial slice (lungs stay inside), dilated by
    2 voxels.

    For CT the threshold is -500 HU; for other modalities the 5th percentile of the mapped image.
    """
    return body_mask_array(prepared.array, prepared.modality, threshold_mapped)


def body_mask_on_grid(a: np.ndarray, stride_zyx: tuple[int, ...], modality: str) -> np.ndarray:
    """:func:`body_mask_array` of the network input ``a`` subsampled by ``stride_zyx`` (the local map's grid): how the
    engine makes its body mask, and the prefetch process ahead of it."""
    return body_mask_array(a[tuple(slice(0, None, s) for s in stride_zyx)], modality)


#: a part of the body not joined to the largest one (the other leg below the pelvis, an arm beside the trunk, a hand
#: beside the head) is body too when it holds at least this share of the largest part's voxels ...
BODY_PART_MIN_SHARE = 0.05
#: ... and its bounding box is at least this share of the largest part's along its thinnest axis. The scanner's table
#: and its pads are left out: at most 2.6 % of the body in 17 real CTs of ../shared, and a voxel or a few thick (4-24
#: mm against the body's 64-308 mm), where a limb is as thick as a few of its bones. The body masks of all 209 CTs and
#: the first 40 radiographs of ../shared are the same as with the largest part alone.
BODY_PART_MIN_THICKNESS = 0.2


def _body_parts(lab: np.ndarray, n: int) -> np.ndarray:
    """(n + 1,) bool: the components of ``lab`` (labels 1..n) that are body: the largest, and the others that
    :data:`BODY_PART_MIN_SHARE` and :data:`BODY_PART_MIN_THICKNESS` admit."""
    sizes = np.bincount(lab.reshape(-1), minlength=n + 1)
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    keep = sizes >= BODY_PART_MIN_SHARE * sizes[largest]
    keep[0] = False
    if keep.sum() > 1:  # (rare: bounding boxes only then)
        def thinnest(label: int) -> int:
            where = np.nonzero(lab == label)
            return int(min(w.max() - w.min() + 1 for w in where))

        least = BODY_PART_MIN_THICKNESS * thinnest(largest)
        for label in np.flatnonzero(keep):
            if label != largest and thinnest(int(label)) < least:
                keep[label] = False
    return keep


def body_mask_array(a: np.ndarray, modality: str, threshold_mapped: float | None = None) -> np.ndarray:
    """:func:`body_mask` on a bare array of mapped intensities (any grid, 2D or 3D).

    The same mask as ``scipy.ndimage``'s ``label`` (the largest component, and others as large and thick as a limb:
    :func:`_body_parts`), ``binary_closing(iterations=2)``, per-slice ``binary_fill_holes`` and
    ``binary_dilation(iterations=2)`` with their default (face) structures, without importing scipy (about 0.4 s of
    a cold process): components come from SimpleITK, which reads the images anyway, and the morphology is a few
    shifted boolean operations.
    """
    if threshold_mapped is None:
        if modality == "ct":
            threshold_mapped = (-500.0 - CT_RANGE_HU[0]) * 255.0 / (CT_RANGE_HU[1] - CT_RANGE_HU[0]) - 50.0
        else:
            threshold_mapped = float(np.percentile(a, 5.0))
    m = a > threshold_mapped
    if not m.any():
        return np.ones_like(m)
    lab, n = label_faces(m)
    if n > 1:
        m = _body_parts(lab, n)[lab]
    m = erode_faces(dilate_faces(m, 2), 2)  # closing
    m = fill_holes_per_slice(m)  # lungs and bowel gas are holes in each axial slice, not in 3D
    return dilate_faces(m, 2)


def label_faces(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean array, voxels joined through faces (``scipy.ndimage.label``'s default):
    ``(labels, count)``, labels 1..count (uint32), 0 outside the mask."""
    import SimpleITK as sitk

    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8)), False)
    lab = sitk.GetArrayFromImage(cc)
    return lab, int(lab.max(initial=0))


def _face_step(m: np.ndarray, erode: bool) -> np.ndarray:
    """One step of a face-structure dilation (or erosion, where the outside of the array counts as False, as
    scipy's ``border_value=0``)."""
    combine = np.logical_and if erode else np.logical_or
    out = m.copy()
    for ax in range(m.ndim):
        lo, hi, first, last = ([slice(None)] * m.ndim for _ in range(4))
        lo[ax], hi[ax], first[ax], last[ax] = slice(0, -1), slice(1, None), 0, -1
        combine(out[tuple(hi)], m[tuple(lo)], out=out[tuple(hi)])  # the neighbour before
        combine(out[tuple(lo)], m[tuple(hi)], out=out[tuple(lo)])  # the neighbour after
        if erode:
            out[tuple(first)] = False
            out[tuple(last)] = False
    return out


def dilate_faces(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=...)`` with the face (cross) structure."""
    m = np.asarray(mask, dtype=bool)
    for _ in range(iterations):
        m = _face_step(m, erode=False)
    return m


def erode_faces(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, iterations=...)`` with the face (cross) structure, outside = False."""
    m = np.asarray(mask, dtype=bool)
    for _ in range(iterations):
        m = _face_step(m, erode=True)
    return m


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of each slice along the first axis (the whole mask in 2D): background
    regions (joined through faces within the slice) that do not reach the slice's border become foreground.

    The slices' backgrounds are labelled in one pass, with an empty plane between consecutive slices so that no
    region joins two slices; this equals filling slice by slice.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 2:
        return fill_holes_per_slice(m[None])[0]
    bg = np.zeros((2 * m.shape[0] - 1, *m.shape[1:]), dtype=bool)
    bg[0::2] = ~m
    lab, n = label_faces(bg)
    lab = lab[0::2]
    if n == 0:
        return m.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[edge] = True
    outside[0] = True  # label 0 is the foreground itself
    return m | ~outside[lab]
