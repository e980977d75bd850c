"""Heatmaps: a point's similarity map on the model's grid, put onto the target image's own voxel grid.

A heatmap in the target's geometry is as large as the target (a 512 x 512 x 133 chest CT: 140 MB of float32), so a
match keeps only each point's similarities on the model's grid (4 mm: about 5 MB for that CT) and
:class:`Heatmaps` makes the full-size image when it is read, through a lookup of the model voxel under each image
voxel made once per target. Writing the heatmaps of 50 points then holds one of them at a time, not 50 (that CT's
50 heatmaps took a peak RSS of 9.1 GB when they were all made first).

The map can also be read on its own grid, the model's (:meth:`Heatmaps.on_model_grid`, ``samembed match
--heatmap-grid model``): the same values, one per model voxel, in the same physical space, so a viewer overlays it
on the target as it would the full-size image; the chest CT's 50 maps are then 50 x 2.7 MB of float32 to write
instead of 50 x 140 MB.

Torch-free (numpy, SimpleITK, :mod:`samembed.image`): a :class:`~samembed.result.MatchResult` with heatmaps pickles
to, and is read in, a process that never loads torch (Slicer's main process).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from .image import Grid, Image


def voxel_lookup(model_grid: Grid, image_grid: Grid) -> np.ndarray:
    """For each voxel of ``image_grid`` (its shape, int32), the flat index of the ``model_grid`` voxel its centre falls
    in (nearest neighbour, SimpleITK's resampling), or the model grid's voxel count V where it falls outside.

    Made once per target: a heatmap is then ``values[lookup]`` (with a V-th value of -1), one gather instead of a
    resampling per point."""
    import SimpleITK as sitk

    from .io import image_to_sitk

    n = int(np.prod(model_grid.shape_zyx))
    flat = np.arange(n, dtype=np.int32).reshape(model_grid.shape_zyx)
    src = image_to_sitk(Image(flat, model_grid, "voxel index"))
    g = image_grid
    out = sitk.Resample(src, [int(s) for s in g.size_ijk], sitk.Transform(), sitk.sitkNearestNeighbor,
                        [float(v) for v in g.origin_lps_mm], [float(v) for v in g.spacing_mm],
                        [float(v) for v in g.direction.ravel()], float(n), sitk.sitkInt32)
    from .io import sitk_voxels

    return sitk_voxels(out)  # its own buffer: no copy (GetArrayFromImage made one, the size of the target)


def heatmap_from_lookup(values: np.ndarray, lookup: np.ndarray, image_grid: Grid, name: str = "heatmap",
                        out: np.ndarray | None = None) -> Image:
    """One similarity map ``values`` (V,) on the model grid, on ``image_grid`` through its :func:`voxel_lookup`.

    Each image voxel gets the value of the model voxel its centre falls in (nearest neighbour: the map keeps its true
    peak values, and its value at a match equals the match's score). Image voxels outside the model grid, and model
    voxels whose similarity was not computed (-inf or NaN: outside the search mask), get -1. Float32, in [-1, 1].

    ``out``: a float32 array of ``lookup``'s shape to write the map into (e.g. a reused file buffer), instead of a
    new one.
    """
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    table = np.empty(len(v) + 1, dtype=np.float32)
    table[:-1] = heatmap_values(v)
    table[-1] = -1.0  # outside the model grid
    if out is None:
        out = np.empty(lookup.shape, dtype=np.float32)
    if not (out.flags.c_contiguous and lookup.flags.c_contiguous):
        return Image(np.take(table, lookup, out=out), image_grid, name)
    # in slabs: one np.take over the whole grid made the int32 lookup an intp copy and buffered ``out`` (its bounds
    # checked), 1.2 GB of temporaries for a 400 MB map (a review: a 0.5 mm chest CT's one heatmap, 7.3 GB); the
    # indices are in the table by construction (``mode="clip"`` buffers nothing), the same values
    flat_in, flat_out = lookup.reshape(-1), out.reshape(-1)
    for i in range(0, flat_in.size, TAKE_SLAB):
        np.take(table, flat_in[i:i + TAKE_SLAB], out=flat_out[i:i + TAKE_SLAB], mode="clip")
    return Image(out, image_grid, name)


#: voxels of a heatmap made at a time (:func:`heatmap_from_lookup`): 32 MB of indices
TAKE_SLAB = 1 << 22


def heatmap_values(values: np.ndarray) -> np.ndarray:
    """A heatmap's value of each similarity in ``values``: float32 in [-1, 1], -1 where it was not computed (-inf or
    NaN: outside the search mask). The one rule for both grids (:func:`heatmap_from_lookup`,
    :meth:`Heatmaps.on_model_grid`)."""
    v = np.asarray(values, dtype=np.float32)
    return np.clip(np.where(np.isfinite(v), v, np.float32(-1.0)), -1.0, 1.0)


def heatmap_on_grid(values_zyx: np.ndarray, model_grid: Grid, image_grid: Grid, name: str = "heatmap") -> Image:
    """One similarity map ``values_zyx`` (the shape of ``model_grid``) on ``image_grid``'s voxels
    (:func:`heatmap_from_lookup` through a new :func:`voxel_lookup`)."""
    return heatmap_from_lookup(values_zyx, voxel_lookup(model_grid, image_grid), image_grid, name)


@dataclass(frozen=True)
class _Rows:
    """The similarity rows (N, V) of one target's points on its model grid, and that target's geometry."""

    rows: np.ndarray
    model_grid: Grid
    image_grid: Grid
    plane_z_mm: float | None = None  # a 2D target made from a one-slice volume: that slice's z


class Heatmaps(Mapping):
    """``(target_index, label) -> Image`` in the target's geometry (:func:`heatmap_on_grid`), made when read.

    Holds each point's similarities on the model's grid, and the voxel lookup of the target read last (one int32 per
    voxel of its image); every read makes the full-size image again, so keep it when reading it twice.
    ``dict(heatmaps)`` makes all of them at once.
    """

    def __init__(self) -> None:
        self._where: dict[tuple[int, str], tuple[_Rows, int, str]] = {}
        self._lookup: tuple[_Rows, np.ndarray] | None = None  # the last target's voxel_lookup (the size of its image)

    def __getstate__(self) -> dict:
        return {"_where": self._where, "_lookup": None}  # the lookup is made again where it is needed

    def add(self, target_index: int, labels: list[str], rows: np.ndarray, model_grid: Grid, image_grid: Grid,
            names: list[str], plane_z_mm: float | None = None) -> None:
        """The heatmaps of one target: point ``n`` (``labels[n]``, image name ``names[n]``) has the similarities
        ``rows[n]`` (V,) on ``model_grid`` (-inf where not computed); ``plane_z_mm``: the target's
        (:attr:`samembed.image.Image.plane_z_mm`), which its heatmaps carry (written at that z)."""
        held = _Rows(np.asarray(rows, dtype=np.float32), model_grid, image_grid, plane_z_mm)
        for n, (label, name) in enumerate(zip(labels, names)):
            self._where[(int(target_index), label)] = (held, n, name)

    def update(self, other: Heatmaps) -> None:
        """Add the heatmaps of ``other`` (another target's)."""
        self._where.update(other._where)

    def __getitem__(self, key: tuple[int, str]) -> Image:
        return self.make(key)

    def _entry(self, key: tuple[int, str]) -> tuple:
        """Where heatmap ``key`` is held; a ``KeyError`` that says which keys there are."""
        if key not in self._where:
            if not self._where:
                raise KeyError("no heatmaps in this result: match with options=MatchOptions(heatmap=True)")
            raise KeyError(f"no heatmap {key!r}: the keys are (target index, label), e.g. {next(iter(self._where))!r}")
        return self._where[key]

    def image_grid(self, key: tuple[int, str]) -> Grid:
        """The voxel grid of the heatmap ``key``: its target's."""
        return self._entry(key)[0].image_grid

    def model_grid(self, key: tuple[int, str]) -> Grid:
        """The model's grid of the heatmap ``key``: the voxels its similarities were computed on (the local map's;
        4 mm for the CT models), in its target's physical space."""
        return self._entry(key)[0].model_grid

    def on_model_grid(self, key: tuple[int, str]) -> Image:
        """The heatmap ``key`` on its own grid (:meth:`model_grid`) instead of its target's: one value per model
        voxel, the value :meth:`make` gives every target voxel whose centre falls in it (-1 where not computed), in
        the same physical space. A viewer (Slicer, ITK-SNAP) overlays it on the target as it does the full-size
        image. A new float32 array of the model grid's shape (zyx)."""
        held, n, name = self._entry(key)
        return Image(heatmap_values(held.rows[n]).reshape(held.model_grid.shape_zyx), held.model_grid, name,
                     plane_z_mm=held.plane_z_mm)

    def make(self, key: tuple[int, str], out: np.ndarray | None = None) -> Image:
        """The heatmap ``key`` as an image, made now; ``out``: a float32 array of its grid's shape (zyx) to make it
        in (see :func:`heatmap_from_lookup`)."""
        held, n, name = self._entry(key)
        if self._lookup is None or self._lookup[0] is not held:  # one target's lookup at a time (read in order)
            self._lookup = (held, voxel_lookup(held.model_grid, held.image_grid))
        made = heatmap_from_lookup(held.rows[n], self._lookup[1], held.image_grid, name, out)
        return made if held.plane_z_mm is None else replace(made, plane_z_mm=held.plane_z_mm)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"Heatmaps({len(self)} made when read: {list(self._where)[:4]}{' ...' if len(self) > 4 else ''})"
