"""Fixtures for the MRML tier: a real ``vtkMRMLScene`` (slicer-core), real CT volumes, a shared engine.

Volumes are read by Slicer's own reader (``vtkMRMLVolumeArchetypeStorageNode``), so their IJK-to-RAS
matrices are what Slicer would build. To keep the tests fast on a CPU, the CT is cropped in MRML to a
small block (about 125 x 125 x 40 mm) before matching. Tests that need ``../shared/data`` are marked
``needs_data`` and skip with a message when it is absent.
"""

from __future__ import annotations

import pytest

from .mrml_helpers import SMALL_CT, about_centre, add_volume, crop, ijk_to_ras, load_volume, rotation, slicer, voxels


@pytest.fixture
def a_scene():
    """An empty MRML scene with Slicer's default colour tables and one slice view (composite + slice node)."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    scene.AddNode(slicer.vtkMRMLSliceCompositeNode())
    slice_node = slicer.vtkMRMLSliceNode()
    slice_node.SetLayoutName("Red")
    slice_node.SetOrientationToAxial()
    scene.AddNode(slice_node)
    yield scene
    colors.SetMRMLScene(None)
    scene.Clear(1)


@pytest.fixture(scope="session")
def a_matcher():
    """One engine with seeded random weights, shared by the session (embeddings stay cached)."""
    from samembed import Matcher

    return Matcher(model="random:sam-lite", device="cpu", cache_bytes=1 << 30)


@pytest.fixture
def a_logic(a_scene, a_matcher):
    from SAMEmbeddingLib.logic import MatchLogic

    return MatchLogic(a_scene, matcher=a_matcher)


@pytest.fixture
def a_small_ct(a_scene):
    """A 128 x 128 x 20 voxel block of a real abdominal CT (0.98 x 0.98 x 2 mm), IJK-to-RAS with flipped R and A."""
    full = load_volume(a_scene, SMALL_CT, "full CT")
    node = crop(a_scene, full, (192, 160, 0), (128, 128, 20), "small CT")
    a_scene.RemoveNode(full)
    return node


@pytest.fixture
def an_oblique_ct(a_scene, a_small_ct):
    """The small CT's voxels, its geometry rotated 20 degrees about S and 10 about R around its centre."""
    transform = about_centre(a_small_ct, rotation("S", 20.0) @ rotation("R", 10.0))
    return add_volume(a_scene, voxels(a_small_ct), transform @ ijk_to_ras(a_small_ct), "oblique CT")


@pytest.fixture
def an_oblique_acquisition(a_scene, a_small_ct):
    """The anatomy of the small CT where it is, on a grid of its size and spacing rotated by 20 degrees about S
    around its centre, sampled from the whole CT it was cut from (linear, air outside): as a scanner writes an
    acquisition planned obliquely in the axial plane. (The CT holds 20 slices: a grid also tilted out of its plane
    would reach beyond them, into air no body has.)"""
    import numpy as np
    import SimpleITK as sitk

    from samembed.io import image_to_sitk
    from SAMEmbeddingLib import mrml_io

    matrix = about_centre(a_small_ct, rotation("S", 20.0)) @ ijk_to_ras(a_small_ct)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    full = load_volume(a_scene, SMALL_CT, "full CT")
    source = image_to_sitk(mrml_io.image_from_volume_node(full))
    a_scene.RemoveNode(full)
    size = [int(n) for n in a_small_ct.GetImageData().GetDimensions()]
    grid = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, lps[:3, 3].tolist(), spacing.tolist(),
                         (lps[:3, :3] / spacing).ravel().tolist(), -1024.0, source.GetPixelID())
    return add_volume(a_scene, sitk.GetArrayFromImage(grid), matrix, "oblique acquisition")
