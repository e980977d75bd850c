"""The engine's image type: a voxel array plus its physical geometry, in ITK's LPS frame.

Conventions used everywhere in :mod:`samembed`:

* ``array_zyx`` is a numpy array indexed ``[k, j, i]`` (``[j, i]`` for 2D), as SimpleITK's
  ``GetArrayFromImage`` returns it.
* ``ijk`` is a continuous voxel index with ``i`` fastest (the x column), in (i, j, k) order.
* ``spacing_mm``, ``origin_lps_mm`` and ``direction`` follow SimpleITK: physical point
  ``p_lps_mm = origin + direction @ (spacing * ijk)``.
* RAS (3D Slicer) is LPS with x and y negated; see :func:`lps_to_ras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(points_lps_mm: np.ndarray) -> np.ndarray:
    """Convert (N, 3) LPS mm points to RAS mm (x and y negated). 2D points (N, 2) are negated too."""
    points = np.asarray(points_lps_mm, dtype=np.float64)
    return points * LPS_TO_RAS[: points.shape[-1]]


ras_to_lps = lps_to_ras  # the flip is its own inverse


@dataclass(frozen=True)
class Grid:
    """Physical geometry of a regular voxel grid (no voxel data).

    Attributes:
        shape_zyx: array shape, slowest axis first (k, j, i) or (j, i) in 2D.
        spacing_mm: voxel size in (i, j, k) order, mm.
        origin_lps_mm: LPS position of voxel (0, 0, 0) centre, mm.
        direction: (d, d) direction cosines; column ``a`` is the LPS direction of index axis ``a``.
    """

    shape_zyx: tuple[int, ...]
    spacing_mm: np.ndarray
    origin_lps_mm: np.ndarray
    direction: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_zyx", tuple(int(s) for s in self.shape_zyx))
        object.__setattr__(self, "spacing_mm", np.asarray(self.spacing_mm, dtype=np.float64).copy())
        object.__setattr__(self, "origin_lps_mm", np.asarray(self.origin_lps_mm, dtype=np.float64).copy())
        object.__setattr__(
            self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim).copy()
        )

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.shape_zyx)

    @property
    def size_ijk(self) -> tuple[int, ...]:
        """Grid size in (i, j, k) order, as SimpleITK's ``GetSize``."""
        return tuple(reversed(self.shape_zyx))

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """Homogeneous (d+1, d+1) matrix mapping a continuous index (i, j, k) to LPS mm."""
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.direction @ np.diag(self.spacing_mm)
        m[:d, d] = self.origin_lps_mm
        return m

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map continuous indices (N, d) in (i, j, k) order to LPS mm points (N, d)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ (self.direction @ np.diag(self.spacing_mm)).T + self.origin_lps_mm

    def lps_to_index(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Map LPS mm points (N, d) to continuous indices (N, d) in (i, j, k) order."""
        points = np.atleast_2d(np.asarray(points_lps_mm, dtype=np.float64))
        inv = np.linalg.inv(self.direction @ np.diag(self.spacing_mm))
        return (points - self.origin_lps_mm) @ inv.T

    def contains_index(self, ijk: np.ndarray, margin: float = 0.5) -> np.ndarray:
        """True per row where a continuous index lies inside the grid, extended by ``margin`` voxels."""
        ijk = np.atleast_2d(ijk)
        upper = np.asarray(self.size_ijk, dtype=np.float64) - 1 + margin
        return np.all((ijk >= -margin) & (ijk <= upper), axis=1)

    def contains_lps(self, points_lps_mm: np.ndarray, margin: float = 0.5) -> np.ndarray:
        """True per point (N, d or more, LPS mm) that lies inside the grid, extended by ``margin`` voxels
        (:meth:`contains_index`); only the grid's own d coordinates are read (a 2D grid's points may carry a z)."""
        points = np.atleast_2d(np.asarray(points_lps_mm, dtype=np.float64))[:, : self.ndim]
        return self.contains_index(self.lps_to_index(points), margin)

    def centres_inside(self, other: Grid, margin: float = 0.5) -> np.ndarray:
        """(``shape_zyx``) bool: whether each voxel centre of this grid lies inside ``other``, extended by
        ``margin`` voxels of ``other`` (as :meth:`contains_index`).

        When each axis of this grid runs along one axis of ``other`` (the same directions up to permutations and
        flips, as after preprocessing), the test is separable: one line of voxels per axis is mapped, with the same
        arithmetic as mapping every voxel, and the result is the product of the per-axis tests. Other geometries
        map every voxel centre.
        """
        d = self.ndim
        to_lps = self.direction @ np.diag(self.spacing_mm)
        to_other = np.linalg.inv(other.direction @ np.diag(other.spacing_mm))
        if np.count_nonzero(to_lps) == d and np.count_nonzero(to_other) == d:
            upper = np.asarray(other.size_ijk, dtype=np.float64) - 1 + margin
            axis_in_other = np.argmax(np.abs(to_other @ to_lps), axis=0)  # other's axis along each of ours (ijk)
            out = np.ones(self.shape_zyx, dtype=bool)
            for a, n in enumerate(self.size_ijk):
                line = np.zeros((n, d))
                line[:, a] = np.arange(n)
                v = other.lps_to_index(self.index_to_lps(line))[:, axis_in_other[a]]
                shape = [1] * d
                shape[d - 1 - a] = n
                out &= ((v >= -margin) & (v <= upper[axis_in_other[a]])).reshape(shape)
            return out
        # every voxel centre, a few planes of the slowest axis at a time (each voxel as mapping all at once would map
        # it: the same functions, row by row): a grid along the LPS axes over an oblique image (samembed.preprocess)
        # holds millions of voxels, and all their indices and points at once were 0.6 GB of fresh memory
        out = np.empty(self.shape_zyx, dtype=bool)
        plane = int(np.prod(self.shape_zyx[1:], dtype=np.int64))
        step = max(1, (1 << 18) // max(1, plane))
        rest = np.indices(self.shape_zyx[1:]).reshape(d - 1, -1).T[:, ::-1]  # one plane's columns (i[, j])
        for first in range(0, self.shape_zyx[0], step):
            last = min(self.shape_zyx[0], first + step)
            slow = np.repeat(np.arange(first, last), plane)[:, None]
            idx = np.hstack([np.tile(rest, (last - first, 1)), slow])  # C order, columns (i, j, k)
            out[first:last] = other.contains_index(other.lps_to_index(self.index_to_lps(idx)), margin).reshape(
                (last - first, *self.shape_zyx[1:]))
        return out

    def derived(self, stride: tuple[int, ...], shape_zyx: tuple[int, ...]) -> Grid:
        """Geometry of a map computed from this grid with a per-axis ``stride`` (i, j, k order).

        Output voxel ``n`` covers input voxels ``stride*n .. stride*n + stride - 1`` and is centred at
        input index ``stride*n + (stride - 1)/2`` (the align_corners=False convention of the SAM code).
        """
        stride_arr = np.asarray(stride, dtype=np.float64)
        offset = (stride_arr - 1.0) / 2.0
        origin = self.origin_lps_mm + self.direction @ (self.spacing_mm * offset)
        return Grid(shape_zyx, self.spacing_mm * stride_arr, origin, self.direction)

    def same_as(self, other: Grid, tol: float = 1e-4) -> bool:
        """True when both grids describe the same voxels (shape, spacing, origin, direction)."""
        return (
            self.shape_zyx == other.shape_zyx
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol)
            and np.allclose(self.origin_lps_mm, other.origin_lps_mm, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


@dataclass(frozen=True, eq=False)
class Image:
    """A scalar image: voxel array (``array_zyx``) and its :class:`Grid`.

    Attributes:
        array: voxel values, shape ``grid.shape_zyx``.
        grid: physical geometry (LPS mm).
        name: a human-readable name used in messages (usually the file path).
        pixel_spacing_known: False when the file carried no spacing (e.g. PNG), so 1 mm was assumed.
        plane_z_mm: for a 2D image made from a one-slice volume (:func:`single_slice_to_2d`), the LPS z of that
            slice, which matches in it take (else None: z = 0).
    """

    array: np.ndarray
    grid: Grid
    name: str = "<array>"
    pixel_spacing_known: bool = True
    plane_z_mm: float | None = None
    _hash: list = field(default_factory=list, repr=False, compare=False)
    _validated: list = field(default_factory=list, repr=False, compare=False)  # memo of io.validate_image

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.grid.ndim

    def __repr__(self) -> str:  # its name and geometry, not its voxels (the dataclass's repr printed the array)
        spacing = " x ".join(f"{v:g}" for v in self.grid.spacing_mm)
        return f"Image({self.name!r}, {self.array.dtype}, shape_zyx={self.grid.shape_zyx}, spacing_xyz {spacing} mm)"

    def content_hash(self) -> str:
        """XXH3-128 (the ``xxhash`` package) over dtype, shape, the voxel bytes and the rounded geometry, 32 hex
        digits: the embedding cache key of this image (memory and disk).

        A non-cryptographic hash, as a cache key needs: accidental collisions are negligible at 128 bits, and whoever
        could forge one could write the cache's files anyway. 7-10x faster than SHA-256, which this was before, on one
        core of the 2-core VM: 0.3 GB of voxels (a thin-slice CT) 0.03 s against 0.31 s, LIDC-0001's 70 MB 7 against
        54 ms. Every image is hashed before its first match, and the Slicer module's first click on thin-slice
        volumes waited for SHA-256. Disk cache entries written under the SHA-256 keys are not found (the images
        are embedded again); they stay on disk until ``samembed cache clear``."""
        if not self._hash:
            import xxhash  # here: the Slicer module imports this module before it installs its packages

            h = xxhash.xxh3_128()
            arr = np.ascontiguousarray(self.array)
            h.update(str(arr.dtype).encode())
            h.update(str(arr.shape).encode())
            h.update(arr.reshape(-1).view(np.uint8))  # the voxel bytes in place (tobytes() would copy the volume)
            for v in (self.grid.spacing_mm, self.grid.origin_lps_mm, self.grid.direction):
                h.update(np.round(v, 6).tobytes())
            self._hash.append(h.hexdigest())
        return self._hash[0]

    def to_sitk(self):
        """This image as a ``SimpleITK.Image`` with its geometry (e.g. a heatmap to write or show)."""
        from .io import image_to_sitk

        return image_to_sitk(self)

    def renamed(self, name: str) -> Image:
        """This image under another name (for messages): the same voxels, not copied, with its hash and validation
        kept. Itself when the name is its own."""
        if name == self.name:
            return self
        return replace(self, name=name, _hash=self._hash, _validated=self._validated)

    @property
    def hashed(self) -> bool:
        """Whether :meth:`content_hash` has been computed (it is kept: the voxels must not change after it)."""
        return bool(self._hash)

    @staticmethod
    def from_array(
        array_zyx: np.ndarray,
        spacing_mm: tuple[float, ...] | None = None,
        origin_lps_mm: tuple[float, ...] | None = None,
        direction: np.ndarray | None = None,
        name: str = "<array>",
    ) -> Image:
        """Build an image from a numpy array and its LPS geometry.

        Args:
            array_zyx: the voxels, indexed ``[k, j, i]`` (z, y, x: numpy's order of a SimpleITK or NIfTI volume);
                copied, so that a later change to it never reaches the image (its content hash names its cache).
            spacing_mm: voxel size per axis in **x, y, z** order (i, j, k: SimpleITK's order, the reverse of the
                array's); None: 1 mm, so that positions are in voxel units.
            origin_lps_mm: the first voxel's centre, LPS mm, x, y, z; None: 0.
            direction: the d x d direction matrix, row-major as SimpleITK's ``GetDirection``: column ``a`` is the
                LPS direction of index axis ``a`` (:class:`Grid`); None: identity.
            name: used in messages.
        """
        arr = np.array(array_zyx, copy=True)
        if arr.ndim not in (2, 3):
            raise InputError(f"{name}: expected a 2D or 3D array, got shape {arr.shape}")
        d = arr.ndim
        spacing = np.ones(d) if spacing_mm is None else np.asarray(spacing_mm, dtype=np.float64)
        origin = np.zeros(d) if origin_lps_mm is None else np.asarray(origin_lps_mm, dtype=np.float64)
        direc = np.eye(d) if direction is None else np.asarray(direction, dtype=np.float64).reshape(d, d)
        if spacing.shape != (d,) or origin.shape != (d,):
            raise InputError(f"{name}: spacing and origin must have {d} values for a {d}D array")
        if np.any(spacing <= 0):
            raise InputError(f"{name}: spacing must be positive, got {spacing.tolist()}")
        return Image(arr, Grid(arr.shape, spacing, origin, direc), name, spacing_mm is not None)


def single_slice_to_2d(array_zyx: np.ndarray, grid: Grid, name: str = "<array>", spacing_known: bool = True,
                       tol: float = 1e-4) -> Image:
    """A 2D :class:`Image` from a 3D array with one slice (``shape_zyx[0] == 1``), as a radiograph stored as
    DICOM or NIfTI, or loaded into Slicer, usually is.

    The slice must be axial (i and j in the LPS x-y plane); the in-plane spacing, x-y origin and direction
    are kept, and the slice's z position is kept as :attr:`Image.plane_z_mm` (the z of the matches in it).

    Raises:
        InputError: the array has more than one slice, or the slice is not axial.
    """
    arr = np.asarray(array_zyx)
    if arr.ndim != 3 or arr.shape[0] != 1 or grid.ndim != 3:
        raise InputError(f"{name}: expected a single-slice 3D image, got shape {arr.shape}")
    d = grid.direction
    if not (np.allclose(d[2, :2], 0.0, atol=tol) and np.allclose(abs(d[2, 2]), 1.0, atol=tol)):
        raise InputError(f"{name}: a single-slice image must lie in the axial (x-y) plane to be matched as a 2D "
                         f"image; its direction is {np.round(d, 4).tolist()} (e.g. a coronal radiograph). Save its "
                         "pixels as a PNG (then give --spacing), or as a NIfTI or NRRD with an axial direction "
                         "(SimpleITK: image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))), and its points in that plane")
    grid2 = Grid(arr.shape[1:], grid.spacing_mm[:2], grid.origin_lps_mm[:2], d[:2, :2])
    return Image(arr[0], grid2, name, spacing_known, float(grid.origin_lps_mm[2]))


def one_slice_volume(image: Image) -> Image:
    """The one-slice volume a 2D image made from one (:func:`single_slice_to_2d`, ``plane_z_mm`` set) stands for: its
    pixels as one axial slice at that z (1 mm thick), its in-plane spacing, origin and direction kept; an image
    written so lies where its volume does in a viewer. The voxels are not copied."""
    if image.ndim != 2 or image.plane_z_mm is None:
        raise InputError(f"{image.name}: not a 2D image made from a one-slice volume")
    g = image.grid
    direction = np.eye(3)
    direction[:2, :2] = g.direction
    grid = Grid((1, *g.shape_zyx), (*g.spacing_mm, 1.0), (*g.origin_lps_mm, image.plane_z_mm), direction)
    return Image(image.array[None], grid, image.name, image.pixel_spacing_known)
