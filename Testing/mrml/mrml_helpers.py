"""Helpers for the MRML tier: paths to real data, volume and point-list builders on a real ``vtkMRMLScene``.

Volumes are read by Slicer's own reader (``vtkMRMLVolumeArchetypeStorageNode``), so their IJK-to-RAS
matrices are what Slicer would build. To keep the tests fast on a CPU, the CT is cropped in MRML to a
small block (about 125 x 125 x 40 mm) before matching. Tests that need ``../shared/data`` are marked
``needs_data`` and skip with a message when it is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "SAMEmbedding") not in sys.path:
    sys.path.insert(0, str(REPO / "SAMEmbedding"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

from ..conftest import with_torch_threads  # noqa: E402, F401 - the mrml tests' helper too

DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))
SMALL_CT = DATA / "ct" / "totalsegmentator" / "ts_dicom_example_ct.nii.gz"
OTHER_CT = DATA / "ct" / "lidc" / "LIDC-IDRI-0002_ct_2mm.nii.gz"


def require(path: Path) -> Path:
    """Skip the calling test unless ``path`` (in ../shared/data) exists."""
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing (set SAMEMBED_DATA or place ../shared/data beside the repo)")
    return path


def require_trained_model() -> None:
    """Fail (not skip) when models.json registers no 'default' model with a weights file: its weights are in this
    checkout, so a missing entry is a regression, which a skip hid (a review)."""
    from samembed import models

    assert any(m.get("name") == "default" and m.get("file") for m in models.registry().get("models", [])), \
        "Resources/Models/models.json registers no trained 'default' model with its weights file"


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def set_ijk_to_ras(node, matrix: np.ndarray) -> None:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    node.SetIJKToRASMatrix(m)


def voxels(node) -> np.ndarray:
    """Voxel array ``[k, j, i]`` (a copy)."""
    image_data = node.GetImageData()
    dims = image_data.GetDimensions()
    return numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


def add_volume(scene, array_zyx: np.ndarray, matrix: np.ndarray, name: str):
    """A new scalar volume node holding ``array_zyx`` with IJK-to-RAS ``matrix``."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array_zyx.shape[2], array_zyx.shape[1], array_zyx.shape[0])
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array_zyx).ravel(), deep=True))
    node.SetAndObserveImageData(image_data)
    set_ijk_to_ras(node, matrix)
    return node


def load_volume(scene, path: Path, name: str):
    """Read a file with Slicer's volume reader into a new scalar volume node."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(require(path)))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def crop(scene, node, start_ijk, size_ijk, name: str):
    """A new node holding a block of ``node``'s voxels, at the same physical place."""
    i0, j0, k0 = start_ijk
    ni, nj, nk = size_ijk
    block = voxels(node)[k0:k0 + nk, j0:j0 + nj, i0:i0 + ni]
    matrix = ijk_to_ras(node).copy()
    matrix[:3, 3] = (matrix @ np.array([i0, j0, k0, 1.0]))[:3]
    return add_volume(scene, block, matrix, name)


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(4)
    a, b = {"R": (1, 2), "A": (2, 0), "S": (0, 1)}[axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def add_points(scene, points_ras, labels=None, name="landmarks"):
    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    for n, p in enumerate(np.atleast_2d(points_ras)):
        node.AddControlPoint(vtk.vtkVector3d(*[float(v) for v in p]), labels[n] if labels else f"L{n + 1}")
    return node


def control_points(node) -> tuple[list[str], np.ndarray]:
    labels, pts = [], []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        labels.append(node.GetNthControlPointLabel(i))
        pts.append(p)
    return labels, np.array(pts).reshape(-1, 3)


def about_centre(node, transform: np.ndarray) -> np.ndarray:
    """``transform`` (4x4, RAS) re-centred on the middle of ``node``'s voxel grid."""
    dims = np.array(node.GetImageData().GetDimensions(), dtype=np.float64)
    centre = (ijk_to_ras(node) @ np.r_[(dims - 1) / 2.0, 1.0])[:3]
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = centre, -centre
    return shift @ transform @ back


def threads_calling(monkeypatch, owner, name: str) -> list[int]:
    """Replace ``owner.name`` with a wrapper that records the thread of each call; returns that (growing) list."""
    import threading

    threads: list[int] = []
    real = getattr(owner, name)

    def recorded(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return threads
