"""The one adapter between MRML nodes and the ``samembed`` engine.

Frames, as everywhere in this extension:

* MRML stores positions in RAS mm (x grows towards the patient's Right, y towards Anterior, z towards
  Superior); the engine works in LPS mm (ITK). The two differ by the sign of x and y, so
  ``ijk_to_lps = diag(-1, -1, 1, 1) @ ijk_to_ras``.
* ``array_zyx`` is the voxel array indexed ``[k, j, i]``; VTK stores ``i`` fastest, so the flat scalar
  array reshapes directly to ``(dims_k, dims_j, dims_i)``.
* Volumes and point lists under a *linear* parent transform are read in world coordinates: the volume's
  geometry becomes ``transform_to_world @ ijk_to_ras``, which may be oblique or flipped; the engine
  handles any orthonormal direction. Non-linear transforms are refused with a message saying to harden
  them.

Nothing here touches ``qt``, ``slicer.app`` or a global scene; only MRML node classes and VTK, so it runs
on ``slicer-core`` as well as inside 3D Slicer. Nothing here modifies an input node.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from samembed import Grid, Image, InputError
from samembed.image import single_slice_to_2d

log = logging.getLogger(__name__)

RAS_TO_LPS_44 = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Homogeneous matrix that flips RAS to LPS (and back: it is its own inverse)."""

_ORTHO_TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# matrices
# ----------------------------------------------------------------------------------------------
def nodes_by_class(scene, class_name: str) -> list:
    """The nodes of ``scene`` of class ``class_name`` (subclasses included), in scene order.

    ``vtkMRMLScene.GetNodesByClass`` returns a new collection that the caller must release (its own reference, on
    top of the one the Python wrapper takes): without it, every node it holds stays alive after it is removed from
    the scene, and after the scene is closed (as ``slicer.util.getNodesByClass`` releases it)."""
    collection = scene.GetNodesByClass(class_name)
    try:
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    finally:
        collection.UnRegister(None)


#: the volume classes the module's selectors offer (exactly these: not label maps, not DTI tensors)
SELECTABLE_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")


def first_selectable_volume(scene):
    """The first volume of ``scene`` that the module's volume selectors offer (a grey or colour image, not hidden
    from editors: not the module's own heatmaps), or None: ``GetFirstNodeByClass("vtkMRMLScalarVolumeNode")`` also
    gives label maps, which became the default source."""
    return next((n for n in nodes_by_class(scene, "vtkMRMLVolumeNode")
                 if n.GetClassName() in SELECTABLE_VOLUME_CLASSES and not n.GetHideFromEditors()), None)


def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """4x4 numpy array with the values of a ``vtkMatrix4x4``."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A new ``vtkMatrix4x4`` holding a 4x4 numpy array."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 RAS matrix from the node's local frame to world (identity when it has no parent transform).

    Raises:
        InputError: the node sits under a non-linear transform.
    """
    transform = node.GetParentTransformNode() if node is not None else None
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise InputError(f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'; "
                         "harden the transform (Data module, right-click, Harden transform) or remove it")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return array_from_vtk_matrix(matrix)


def volume_ijk_to_ras(node) -> np.ndarray:
    """4x4 matrix mapping the volume's voxel index (i, j, k) to world RAS mm (parent transform included)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return node_to_world(node) @ array_from_vtk_matrix(matrix)


def volume_ijk_to_lps(node) -> np.ndarray:
    """4x4 matrix mapping voxel index (i, j, k) to world LPS mm."""
    return RAS_TO_LPS_44 @ volume_ijk_to_ras(node)


# ----------------------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------------------
def _node_label(node) -> str:
    return f"'{node.GetName()}'" if node is not None else "(none)"


def check_volume_node(node, role: str = "volume") -> None:
    """Raise :class:`InputError` unless ``node`` is a scalar volume node that holds voxels."""
    if node is None:
        raise InputError(f"no {role} selected; select a volume")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} {_node_label(node)} is a {node.GetClassName()}, not a scalar volume")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f"{role} {_node_label(node)} holds no voxels; load the image again")
    if min(image_data.GetDimensions()) < 1 or image_data.GetNumberOfPoints() == 0:
        raise InputError(f"{role} {_node_label(node)} is empty")


def volume_dimension(node) -> int:
    """2 for a single-slice volume (a radiograph), else 3. Call :func:`check_volume_node` first."""
    return 2 if node.GetImageData().GetDimensions()[2] == 1 else 3


class VolumeVoxels:
    """A scalar volume node's voxels and geometry as read from MRML (:func:`read_volume_voxels`, on the thread that
    owns the scene), to be copied on any thread (:meth:`image`): ``flat`` views VTK's own memory, which the
    ``vtkImageData`` held here keeps alive, so the copy needs no MRML or VTK call."""

    def __init__(self, name: str, flat: np.ndarray, components: int, shape_zyx: tuple[int, ...], grid3: Grid,
                 image_data) -> None:
        self.name = name
        self.flat = flat
        self.components = components
        self.shape_zyx = shape_zyx
        self.grid3 = grid3
        self._image_data = image_data  # the owner of the memory that ``flat`` views

    @property
    def three_d(self) -> bool:
        return self.shape_zyx[0] > 1

    def image(self, voxels_file: Path | None = None) -> Image:
        """The engine image, its voxels copied (into ``voxels_file`` when given, see
        :func:`image_from_volume_node`). Safe on any thread while the volume is not modified."""
        array_zyx = self._copy(voxels_file if self.three_d else None)
        if self.three_d:
            return Image(array_zyx, self.grid3, self.name)
        return single_slice_to_2d(array_zyx, self.grid3, self.name, tol=_ORTHO_TOL)

    def _copy(self, voxels_file: Path | None) -> np.ndarray:
        if self.components == 1 and voxels_file is not None:
            mapped = _copy_to_file(self.flat.reshape(self.shape_zyx), Path(voxels_file))
            if mapped is not None:
                return mapped
        if self.components == 1:
            return np.array(self.flat, copy=True).reshape(self.shape_zyx)  # a copy: the worker never sees VTK memory
        # colour radiograph: mean of R, G, B
        return self.flat.reshape(*self.shape_zyx, self.components)[..., :3].astype(np.float32).mean(axis=-1)


def read_volume_voxels(node, name: str | None = None) -> VolumeVoxels:
    """What :func:`image_from_volume_node` reads from MRML and VTK (call it on the thread that owns the scene): the
    checks, the geometry and a view of the voxels; :meth:`VolumeVoxels.image` then copies them on any thread.

    Raises:
        InputError: as :func:`image_from_volume_node`.
    """
    check_volume_node(node)
    name = name or node.GetName()
    image_data = node.GetImageData()
    dims_ijk = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    n_comp = scalars.GetNumberOfComponents()
    if n_comp not in (1, 3, 4):
        raise InputError(f"volume {_node_label(node)} has {n_comp} components per voxel; use a scalar (grey) image")
    shape_zyx = (dims_ijk[2], dims_ijk[1], dims_ijk[0])
    grid3 = grid_from_ijk_to_lps(volume_ijk_to_lps(node), shape_zyx, name)
    if shape_zyx[0] == 1:  # a single slice must be axial: refused now, before any volume is copied
        single_slice_to_2d(np.broadcast_to(np.float32(0), shape_zyx), grid3, name, tol=_ORTHO_TOL)
    return VolumeVoxels(name, numpy_support.vtk_to_numpy(scalars), n_comp, shape_zyx, grid3, image_data)


def _mapped(path: Path, dtype: np.dtype, shape_zyx: tuple[int, ...], offset: int) -> np.ndarray:
    """The voxels of the ``.npy`` file ``path`` that :func:`_copy_to_file` wrote, mapped read-only, without parsing
    its header again: ``np.load`` parses it with ``ast.literal_eval``, which Python 3.11 cannot run in two threads at
    once (the volumes of a click are copied in parallel; CI saw "SystemError: AST constructor recursion depth
    mismatch", CPython gh-106905)."""
    return np.memmap(path, dtype=dtype, mode="r", shape=shape_zyx, offset=offset)


def _copy_to_file(voxels_zyx: np.ndarray, path: Path) -> np.ndarray | None:
    """The voxels copied into a new ``.npy`` file at ``path`` and mapped from it read-only (the copy the worker
    thread reads instead of VTK memory, already in the file that the engine process reads), or None when the file
    cannot be written (then nothing is left at ``path``) or where its disk space cannot be reserved first
    (``os.posix_fallocate``; not on macOS): a write through a mapping into a full disk ends the process (``SIGBUS``)
    instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):
        return None
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=voxels_zyx.dtype, shape=voxels_zyx.shape)
        offset = out.offset  # where the voxels start, after the .npy header
        try:
            with open(path, "r+b") as f:  # the file's blocks now: a full disk is an OSError here
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            out[...] = voxels_zyx
        finally:
            del out  # unmapped: the pages stay in the page cache, written back to the disk in the background
        return _mapped(path, voxels_zyx.dtype, voxels_zyx.shape, offset)
    except BaseException as e:  # nothing is left at path, whatever the error (in shared memory a file holds memory)
        with contextlib.suppress(OSError):
            path.unlink()
        if not isinstance(e, (OSError, ValueError)):  # e.g. out of memory: the caller's error
            raise
        log.warning("SAMEmbedding: voxels kept in memory, not in %s: %s", path, e)
        return None


def grid_from_ijk_to_lps(ijk_to_lps: np.ndarray, shape_zyx: tuple[int, ...], name: str = "volume") -> Grid:
    """Engine :class:`Grid` of a 3D voxel grid from its 4x4 index-to-LPS matrix.

    Raises:
        InputError: the matrix is sheared or singular (not spacing times an orthonormal direction).
    """
    linear = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(linear)):
        raise InputError(f"{name}: voxel spacing must be positive, got {spacing.tolist()}")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHO_TOL):
        raise InputError(f"{name}: the image axes are not orthogonal (sheared geometry, possibly from a parent "
                         "transform); harden or remove the transform")
    return Grid(shape_zyx, spacing, ijk_to_lps[:3, 3], direction)


def image_from_volume_node(node, name: str | None = None, voxels_file: Path | None = None) -> Image:
    """Engine image (voxels copied, LPS geometry) of a MRML scalar volume node.

    A single-slice volume becomes a 2D image when its slice is axial (i and j in the x-y plane), as a
    radiograph loaded into Slicer is; other single slices are refused.

    Args:
        node: a ``vtkMRMLScalarVolumeNode`` (or subclass). Under a linear transform, the world geometry is used.
        name: name used in engine messages (default: the node name).
        voxels_file: a new ``.npy`` file to copy a 3D grey volume's voxels into instead of memory; the image then
            reads them from a read-only mapping of the file (POSIX only: the mapping stays valid when the file is
            removed), for the engine process, which reads the file (``EngineProcess.newVolumeFile``): one copy of
            the voxels instead of two (on a 2-core VM, 0.35 GB of a thin-slice CT: the copy 0.5-0.6 s either way,
            then writing the file 0.7-0.9 s more). Memory when the file cannot be written.

    Raises:
        InputError: no node, no voxels, a non-scalar volume, a sheared or non-linear geometry.
    """
    return read_volume_voxels(node, name).image(voxels_file)


def volume_cache_key(node) -> tuple:
    """What identifies a volume's content for caching: node ID, image modification times, world geometry."""
    image_data = node.GetImageData()
    scalars = image_data.GetPointData().GetScalars() if image_data is not None else None
    return (
        node.GetID(),
        image_data.GetMTime() if image_data is not None else 0,
        scalars.GetMTime() if scalars is not None else 0,
        tuple(np.round(volume_ijk_to_ras(node).ravel(), 9)),
    )


def ras_inside_volume(node, points_ras_mm: np.ndarray, margin_voxels: float = 0.5) -> np.ndarray:
    """(N,) bool: world RAS points that fall inside the volume's voxel grid (extended by ``margin_voxels``)."""
    points = np.atleast_2d(np.asarray(points_ras_mm, dtype=np.float64))
    ras_to_ijk = np.linalg.inv(volume_ijk_to_ras(node))
    ijk = (np.c_[points, np.ones(len(points))] @ ras_to_ijk.T)[:, :3]
    dims = np.asarray(node.GetImageData().GetDimensions(), dtype=np.float64)
    if dims[2] == 1:  # a single slice: in-plane test only
        ijk[:, 2] = 0.0
    return np.all((ijk >= -margin_voxels) & (ijk <= dims - 1 + margin_voxels), axis=1)


def update_volume_node_from_image(node, image: Image, reference_node=None) -> None:
    """Write an engine image's voxels into ``node`` (float32 kept as is).

    The geometry is copied from ``reference_node`` when given (its IJK-to-RAS matrix and parent transform,
    for a map computed on that node's voxel grid), else derived from the image's LPS grid.

    Raises:
        InputError: the image's voxel grid differs from ``reference_node``'s.
    """
    array_zyx = np.ascontiguousarray(image.array)
    if array_zyx.ndim == 2:
        array_zyx = array_zyx[None]
    dims_ijk = (array_zyx.shape[2], array_zyx.shape[1], array_zyx.shape[0])
    if reference_node is not None and tuple(reference_node.GetImageData().GetDimensions()) != dims_ijk:
        raise InputError(f"map of size {dims_ijk} does not fit the voxel grid of '{reference_node.GetName()}' "
                         f"{tuple(reference_node.GetImageData().GetDimensions())}")
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*dims_ijk)
    vtk_array = numpy_support.numpy_to_vtk(array_zyx.ravel(), deep=True)
    vtk_array.SetName("ImageScalars")
    image_data.GetPointData().SetScalars(vtk_array)
    if reference_node is not None:
        matrix = vtk.vtkMatrix4x4()
        reference_node.GetIJKToRASMatrix(matrix)
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    else:
        grid = image.grid
        ijk_to_lps = np.eye(4)
        d = grid.ndim
        ijk_to_lps[:d, :d] = grid.direction @ np.diag(grid.spacing_mm)
        ijk_to_lps[:d, 3] = grid.origin_lps_mm
        if d == 2 and image.plane_z_mm is not None:  # a one-slice volume's image (its heatmaps): on its slice
            ijk_to_lps[2, 3] = image.plane_z_mm
        node.SetIJKToRASMatrix(vtk_matrix_from_array(RAS_TO_LPS_44 @ ijk_to_lps))
    node.SetAndObserveImageData(image_data)


# ----------------------------------------------------------------------------------------------
# point lists
# ----------------------------------------------------------------------------------------------
def check_point_list(node, role: str = "source point list") -> None:
    """Raise :class:`InputError` unless ``node`` is a markups node with at least one placed point."""
    if node is None:
        raise InputError(f"no {role} selected; place landmarks on the source volume first")
    if not node.IsA("vtkMRMLMarkupsNode"):
        raise InputError(f"{role} {_node_label(node)} is a {node.GetClassName()}, not a markups point list")
    if node.GetParentTransformNode() is not None:
        node_to_world(node)  # raises for a non-linear transform


def defined_point_indices(node) -> list[int]:
    """Indices of control points whose position is defined (placed, not still being placed or skipped)."""
    return [i for i in range(node.GetNumberOfControlPoints())
            if node.GetNthControlPointPositionStatus(i) == node.PositionDefined]


def points_from_markups(node, indices: list[int] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Control points of a markups node, in world RAS mm.

    Args:
        node: a markups node (point list).
        indices: control point indices to read (default: every defined point).

    Returns:
        ``(ids, labels, points_ras_mm)``: control point IDs and labels, and an (N, 3) array.

    Raises:
        InputError: an index is out of range or its point is not placed.
    """
    if indices is None:
        indices = defined_point_indices(node)
    ids, labels, points = [], [], []
    n = node.GetNumberOfControlPoints()
    for index in indices:
        if not 0 <= index < n:
            raise InputError(f"point list {_node_label(node)} has no control point {index} (it has {n})")
        if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            raise InputError(f"point '{node.GetNthControlPointLabel(index)}' of {_node_label(node)} is not placed yet")
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        ids.append(node.GetNthControlPointID(index))
        labels.append(node.GetNthControlPointLabel(index))
        points.append(position)
    return ids, labels, np.asarray(points, dtype=np.float64).reshape(-1, 3)


def ras_to_lps(points_ras_mm: np.ndarray) -> np.ndarray:
    """(N, 3) RAS mm to LPS mm (x and y negated)."""
    return np.asarray(points_ras_mm, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps  # the flip is its own inverse
