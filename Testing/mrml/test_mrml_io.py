"""MRML volumes and point lists become engine images and points with the right geometry (RAS <-> LPS).

The reference is independent of our adapter: Slicer's own reader and writer (``vtkMRMLVolumeArchetypeStorageNode``,
which converts between RAS and the file's LPS) and SimpleITK through ``samembed.io.read_image``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from samembed import InputError
from samembed.io import read_image
from SAMEmbeddingLib import mrml_io

from .mrml_helpers import (
    SMALL_CT,
    add_points,
    add_volume,
    ijk_to_ras,
    load_volume,
    rotation,
    set_ijk_to_ras,
    slicer,
    voxels,
    vtk,
)

pytestmark = pytest.mark.needs_data


def _write_with_slicer(node, path) -> None:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    assert storage.WriteData(node), f"Slicer could not write {path}"


def _ras_of_index(node, ijk: np.ndarray) -> np.ndarray:
    return (np.c_[ijk, np.ones(len(ijk))] @ ijk_to_ras(node).T)[:, :3]


def test_a_ct_read_by_slicer_converts_to_the_image_simpleitk_reads(a_scene):
    node = load_volume(a_scene, SMALL_CT, "ct")
    assert not np.allclose(ijk_to_ras(node), np.eye(4)), "the fixture should have a non-identity IJK to RAS"

    image = mrml_io.image_from_volume_node(node)
    reference = read_image(SMALL_CT)

    assert image.array.shape == reference.array.shape == (20, 512, 512)
    np.testing.assert_array_equal(image.array, reference.array)
    assert image.grid.same_as(reference.grid, tol=1e-5), (image.grid, reference.grid)


@pytest.mark.parametrize("kind", ["oblique", "flipped"])
def test_an_oblique_or_flipped_volume_converts_to_the_geometry_slicer_writes(a_scene, a_small_ct, tmp_path, kind):
    matrix = ijk_to_ras(a_small_ct)
    if kind == "oblique":
        matrix = rotation("S", 20.0) @ rotation("R", 10.0) @ rotation("A", -7.0) @ matrix
    else:  # i axis reversed: a negative determinant
        matrix = matrix @ np.diag([-1.0, 1.0, 1.0, 1.0])
    node = add_volume(a_scene, voxels(a_small_ct), matrix, kind)
    _write_with_slicer(node, tmp_path / f"{kind}.nrrd")

    image = mrml_io.image_from_volume_node(node)
    written = read_image(tmp_path / f"{kind}.nrrd")

    np.testing.assert_array_equal(image.array, written.array)
    assert image.grid.same_as(written.grid, tol=1e-4), (image.grid, written.grid)


def test_every_voxel_maps_to_the_ras_point_slicer_gives_it(an_oblique_ct):
    image = mrml_io.image_from_volume_node(an_oblique_ct)
    ijk = np.random.default_rng(0).uniform(0, 19, size=(50, 3))

    lps = image.grid.index_to_lps(ijk)

    np.testing.assert_allclose(mrml_io.lps_to_ras(lps), _ras_of_index(an_oblique_ct, ijk), atol=1e-6)


def test_a_volume_under_a_linear_transform_is_read_in_world_coordinates(a_scene, a_small_ct):
    transform = slicer.vtkMRMLLinearTransformNode()
    a_scene.AddNode(transform)
    to_parent = rotation("A", 30.0)
    to_parent[:3, 3] = [10.0, -20.0, 5.0]
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, to_parent[r, c])
    transform.SetMatrixTransformToParent(m)
    a_small_ct.SetAndObserveTransformNodeID(transform.GetID())

    image = mrml_io.image_from_volume_node(a_small_ct)

    ijk = np.array([[0.0, 0.0, 0.0], [127.0, 5.0, 19.0]])
    expected = (np.c_[_ras_of_index(a_small_ct, ijk), np.ones(2)] @ to_parent.T)[:, :3]
    np.testing.assert_allclose(mrml_io.lps_to_ras(image.grid.index_to_lps(ijk)), expected, atol=1e-6)


def test_a_volume_under_a_non_linear_transform_is_refused_with_a_fix(a_scene, a_small_ct):
    transform = slicer.vtkMRMLTransformNode()
    transform.SetName("warp")
    a_scene.AddNode(transform)
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in ([0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100], [50, 50, 50]):
        source.InsertNextPoint(*p)
        target.InsertNextPoint(p[0] + 3, p[1], p[2] + (5 if p == [50, 50, 50] else 0))
    tps = vtk.vtkThinPlateSplineTransform()
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    transform.SetAndObserveTransformToParent(tps)
    a_small_ct.SetAndObserveTransformNodeID(transform.GetID())

    with pytest.raises(InputError, match="non-linear transform 'warp'.*harden"):
        mrml_io.image_from_volume_node(a_small_ct)


def test_a_volume_copied_into_a_file_is_read_from_a_read_only_mapping_of_it(a_small_ct, tmp_path):
    """For the engine process the voxels go straight into the file it reads: the image maps the file read-only (no
    second copy in memory), and the mapping stays valid when the file is removed (the process removes what it read).
    A file that cannot be written leaves the voxels in memory and nothing on disk."""
    before_voxels, before_mtime = voxels(a_small_ct), a_small_ct.GetImageData().GetMTime()
    path = tmp_path / "volume.npy"
    image = mrml_io.image_from_volume_node(a_small_ct, voxels_file=path)
    assert isinstance(image.array, np.memmap) and Path(image.array.filename) == path
    assert not image.array.flags.writeable
    np.testing.assert_array_equal(np.load(path), before_voxels)
    hashed = image.content_hash()
    path.unlink()
    np.testing.assert_array_equal(image.array, before_voxels)
    assert mrml_io.image_from_volume_node(a_small_ct).content_hash() == hashed  # the same image as one in memory
    np.testing.assert_array_equal(voxels(a_small_ct), before_voxels)
    assert a_small_ct.GetImageData().GetMTime() == before_mtime

    nowhere = tmp_path / "no such folder" / "volume.npy"
    kept = mrml_io.image_from_volume_node(a_small_ct, voxels_file=nowhere)
    assert not isinstance(kept.array, np.memmap) and kept.content_hash() == hashed
    assert not nowhere.parent.exists()


def test_a_full_disk_leaves_the_voxels_in_memory_before_anything_is_written_through_a_mapping(a_small_ct, tmp_path,
                                                                                              monkeypatch):
    """The file's space is reserved before the voxels are copied into its mapping (a write through a mapping into a
    full disk would end Slicer with SIGBUS): a disk without the space, or a system that cannot reserve it (macOS),
    leaves the voxels in memory and no file."""
    import errno

    nbytes = voxels(a_small_ct).nbytes

    def full(fd, offset, length):  # the voxels (after the .npy header) not written yet
        assert not any(os.pread(fd, length, offset)[-nbytes:]), "voxels were written before the space was reserved"
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mrml_io.os, "posix_fallocate", full)
    path = tmp_path / "volume.npy"
    image = mrml_io.image_from_volume_node(a_small_ct, voxels_file=path)
    assert not isinstance(image.array, np.memmap) and not path.exists()
    np.testing.assert_array_equal(image.array, voxels(a_small_ct))
    monkeypatch.delattr(mrml_io.os, "posix_fallocate")
    image = mrml_io.image_from_volume_node(a_small_ct, voxels_file=path)
    assert not isinstance(image.array, np.memmap) and not path.exists()


def test_a_volume_file_goes_with_an_error_that_stops_its_copy(a_small_ct, tmp_path, monkeypatch):
    """An error other than a full disk while a volume is copied into its file (e.g. out of memory) is raised, and
    the file goes with it: in shared memory a file left behind would hold memory until the engine stops."""
    def no_memory(*args, **kwargs):
        raise MemoryError("no memory left")

    monkeypatch.setattr(mrml_io, "_mapped", no_memory)  # after the voxels are written, before they are mapped
    path = tmp_path / "volume.npy"
    with pytest.raises(MemoryError):
        mrml_io.image_from_volume_node(a_small_ct, voxels_file=path)
    assert not path.exists()


def test_a_volume_copied_to_its_file_is_mapped_without_parsing_python_source(a_small_ct, tmp_path, monkeypatch):
    """The volumes of a click are copied on several threads; ``np.load`` parsed each file's header with
    ``ast.literal_eval``, which Python 3.11 cannot run in two threads at once (CI failed with "SystemError: AST
    constructor recursion depth mismatch", CPython gh-106905). The copy is mapped as written instead."""
    import ast

    def no_parsing(*args, **kwargs):
        raise AssertionError("ast.literal_eval called while a volume was copied")

    monkeypatch.setattr(ast, "literal_eval", no_parsing)
    path = tmp_path / "volume.npy"
    image = mrml_io.image_from_volume_node(a_small_ct, voxels_file=path)
    monkeypatch.undo()
    assert isinstance(image.array, np.memmap) and Path(image.array.filename) == path
    np.testing.assert_array_equal(image.array, np.load(path))  # the same voxels as the file's own header says


def test_converting_a_volume_leaves_it_unchanged(a_small_ct):
    before_voxels, before_matrix = voxels(a_small_ct), ijk_to_ras(a_small_ct)
    before_mtime = a_small_ct.GetImageData().GetMTime()

    image = mrml_io.image_from_volume_node(a_small_ct)
    image.array[...] = 0  # the engine image owns a copy

    np.testing.assert_array_equal(voxels(a_small_ct), before_voxels)
    np.testing.assert_array_equal(ijk_to_ras(a_small_ct), before_matrix)
    assert a_small_ct.GetImageData().GetMTime() == before_mtime


def test_points_are_read_in_world_ras_with_their_ids_and_labels(a_scene, a_small_ct):
    points = add_points(a_scene, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], ["apex", "base"])

    ids, labels, ras = mrml_io.points_from_markups(points)

    assert labels == ["apex", "base"]
    assert ids == [points.GetNthControlPointID(0), points.GetNthControlPointID(1)]
    np.testing.assert_allclose(ras, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_allclose(mrml_io.ras_to_lps(ras), [[-1.0, -2.0, 3.0], [-4.0, -5.0, 6.0]])


def test_points_inside_and_outside_the_volume_are_told_apart(a_small_ct):
    inside = _ras_of_index(a_small_ct, np.array([[64.0, 64.0, 10.0], [0.0, 0.0, 0.0], [127.4, 127.4, 19.4]]))
    outside = _ras_of_index(a_small_ct, np.array([[-2.0, 64.0, 10.0], [64.0, 64.0, 25.0]]))

    assert mrml_io.ras_inside_volume(a_small_ct, inside).all()
    assert not mrml_io.ras_inside_volume(a_small_ct, outside).any()


def test_a_map_on_a_target_grid_gets_exactly_the_target_geometry(a_scene, an_oblique_ct):
    target_image = mrml_io.image_from_volume_node(an_oblique_ct)
    from samembed import Image

    heat = Image(np.random.default_rng(1).random(target_image.array.shape).astype(np.float32), target_image.grid, "heat")
    node = slicer.vtkMRMLScalarVolumeNode()
    a_scene.AddNode(node)

    mrml_io.update_volume_node_from_image(node, heat, reference_node=an_oblique_ct)

    assert node.GetImageData().GetDimensions() == an_oblique_ct.GetImageData().GetDimensions()
    np.testing.assert_array_equal(ijk_to_ras(node), ijk_to_ras(an_oblique_ct))
    np.testing.assert_array_equal(voxels(node), heat.array)


def test_a_map_of_the_wrong_size_is_refused(a_scene, a_small_ct):
    from samembed import Image

    node = slicer.vtkMRMLScalarVolumeNode()
    a_scene.AddNode(node)
    with pytest.raises(InputError, match="does not fit the voxel grid of 'small CT'"):
        mrml_io.update_volume_node_from_image(node, Image.from_array(np.zeros((3, 4, 5), np.float32)), a_small_ct)


def test_a_map_of_a_one_slice_volume_without_its_node_lies_on_its_slice(a_scene, a_small_ct):
    """A 2D image made from a one-slice volume at z (its heatmap on the model's grid) was put at z = 0."""
    from samembed import Image
    from samembed.image import Grid

    heat = Image(np.ones((4, 5), np.float32), Grid((4, 5), (2.0, 2.0), (10.0, 20.0), np.eye(2)), "heat",
                 plane_z_mm=30.0)
    node = slicer.vtkMRMLScalarVolumeNode()
    a_scene.AddNode(node)
    mrml_io.update_volume_node_from_image(node, heat)
    np.testing.assert_allclose(ijk_to_ras(node)[:3, 3], (-10.0, -20.0, 30.0))  # LPS (10, 20, 30) in RAS


def test_a_single_axial_slice_becomes_a_2d_image(a_scene, a_small_ct):
    matrix = ijk_to_ras(a_small_ct)
    node = add_volume(a_scene, voxels(a_small_ct)[10:11], matrix, "slice")

    image = mrml_io.image_from_volume_node(node)

    assert image.ndim == 2 and image.array.shape == (128, 128)
    np.testing.assert_allclose(image.grid.index_to_lps([[3.0, 4.0]]), mrml_io.ras_to_lps(_ras_of_index(node, np.array([[3.0, 4.0, 0.0]])))[:, :2])


def test_a_single_slice_that_is_not_axial_is_refused(a_scene, a_small_ct):
    matrix = rotation("R", 90.0) @ ijk_to_ras(a_small_ct)
    node = add_volume(a_scene, voxels(a_small_ct)[10:11], matrix, "coronal slice")

    with pytest.raises(InputError, match="axial"):
        mrml_io.image_from_volume_node(node)
    with pytest.raises(InputError, match="coronal slice: a single-slice image must lie in the axial"):
        mrml_io.read_volume_voxels(node)  # refused as it is read from MRML, before its voxels are copied


def test_a_sheared_geometry_is_refused(a_scene, a_small_ct):
    matrix = ijk_to_ras(a_small_ct)
    matrix[0, 1] = 0.5  # j axis leans into R
    node = add_volume(a_scene, voxels(a_small_ct), matrix, "sheared")

    with pytest.raises(InputError, match="not orthogonal"):
        mrml_io.image_from_volume_node(node)


def test_a_volume_without_voxels_is_refused(a_scene):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("empty")
    a_scene.AddNode(node)

    with pytest.raises(InputError, match="'empty' holds no voxels"):
        mrml_io.image_from_volume_node(node)
    with pytest.raises(InputError, match="no volume selected"):
        mrml_io.image_from_volume_node(None)


def test_the_cache_key_changes_when_voxels_or_geometry_change(a_small_ct):
    key = mrml_io.volume_cache_key(a_small_ct)
    assert mrml_io.volume_cache_key(a_small_ct) == key

    a_small_ct.GetImageData().Modified()
    key2 = mrml_io.volume_cache_key(a_small_ct)
    assert key2 != key

    matrix = ijk_to_ras(a_small_ct)
    matrix[0, 3] += 1.0
    set_ijk_to_ras(a_small_ct, matrix)
    assert mrml_io.volume_cache_key(a_small_ct) != key2


def test_the_default_source_is_a_volume_the_selectors_offer_not_a_label_map():
    """``GetFirstNodeByClass("vtkMRMLScalarVolumeNode")`` also gives label maps: a segmentation's label map loaded
    first became the default source, which the selector cannot even show (a review). Colour radiographs (vector
    volumes) are offered."""
    import slicer

    scene = slicer.vtkMRMLScene()
    assert mrml_io.first_selectable_volume(scene) is None
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "liver label map")
    assert mrml_io.first_selectable_volume(scene) is None and labels is not None
    heatmap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "similarity in CT")  # the module's own, hidden
    heatmap.SetHideFromEditors(True)
    assert mrml_io.first_selectable_volume(scene) is None
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "hand.png")
    grey = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    assert mrml_io.first_selectable_volume(scene) is colour
    scene.RemoveNode(colour)
    assert mrml_io.first_selectable_volume(scene) is grey


def test_a_point_not_placed_in_a_slicer_fcsv_is_left_out_as_in_its_mrk_json(tmp_path, caplog):
    """A landmark template saved by Slicer with a point skipped: the ``.fcsv`` gives its status in a column its
    header does not name, and 0, 0, 0 as its position; it was read as a landmark at the origin (a review). Written
    here by Slicer's own storage nodes, both files give the placed points only, with the same warning."""
    import logging

    from samembed.io import read_points

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    for label, ras in (("A", (10.5, -20.25, 30.0)), ("B", (-4.0, 8.0, 12.5)), ("C", (1.0, 2.0, 3.0))):
        node.AddControlPoint(vtk.vtkVector3d(*ras), label)
    node.UnsetNthControlPointPosition(1)  # "skip" in Slicer's markups module: B not placed
    read = {}
    for suffix, storage in ((".fcsv", slicer.vtkMRMLMarkupsFiducialStorageNode),
                            (".mrk.json", slicer.vtkMRMLMarkupsJsonStorageNode)):
        writer = storage()
        scene.AddNode(writer)
        path = tmp_path / f"template{suffix}"
        writer.SetFileName(str(path))
        assert writer.WriteData(node)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="samembed"):
            read[suffix] = read_points(path)
        assert f"{path}: 1 control point(s) not placed, left out: B" in caplog.text
    for points in read.values():
        assert list(points.labels) == ["A", "C"]
        np.testing.assert_allclose(points.points_lps_mm, [[-10.5, 20.25, 30.0], [-1.0, -2.0, 3.0]], atol=1e-6)
