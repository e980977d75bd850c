"""Radiographs (2D images) in the geometry their files give: the same picture stored with its axes flipped or
swapped is the same image, matched to the same points (LPS mm), as 3D volumes are."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from samembed import Matcher
from samembed.image import Grid, Image
from samembed.io import read_image

from ..conftest import data_file, hand_model, hand_radiographs

SPACING_MM = 0.2


def stored_as(image: Image, how: str) -> Image:
    """``image`` with the same pixels at the same LPS positions, its array stored in another order, as other
    tools write 2D files: ``flipped`` (direction diag(-1, -1), what ITK reads from a 2D NIfTI that nibabel wrote
    with an identity RAS affine), ``mirrored`` (x only) or ``swapped`` (x along the array's rows)."""
    a, g = image.array, image.grid
    last = g.index_to_lps([np.array(g.size_ijk) - 1.0])[0]
    if how == "flipped":
        return Image(a[::-1, ::-1].copy(), Grid(a.shape, g.spacing_mm, last, np.diag([-1.0, -1.0])), how)
    if how == "mirrored":
        return Image(a[:, ::-1].copy(), Grid(a.shape, g.spacing_mm, (last[0], g.origin_lps_mm[1]),
                                             np.diag([-1.0, 1.0])), how)
    assert how == "swapped"
    return Image(a.T.copy(), Grid(a.T.shape, g.spacing_mm[::-1], g.origin_lps_mm, np.array([[0.0, 1.0], [1.0, 0.0]])),
                 how)


@pytest.fixture(scope="module")
def hands():
    model = hand_model()
    src, tgt = (read_image(p, spacing_mm=SPACING_MM) for p in hand_radiographs(2))
    return Matcher(str(model), device="cpu", spacing_mm=SPACING_MM), src, tgt


@pytest.mark.needs_data
@pytest.mark.parametrize("how", ["flipped", "mirrored", "swapped"])
def test_a_radiograph_stored_with_flipped_or_swapped_axes_gives_the_same_matches(hands, how):
    """Before, the network saw such a file's pixels in their stored order, a mirrored or turned hand: the matches
    were 23-70 mm off (from two audits), some of them flagged confident."""
    matcher, src, tgt = hands
    w, h = (np.array(src.grid.size_ijk) - 1) * SPACING_MM
    points = np.array([[0.3 * w, 0.4 * h], [0.5 * w, 0.6 * h], [0.7 * w, 0.3 * h]])
    moved = stored_as(tgt, how)
    for i, j in ((3, 5), (200, 17)):  # a pixel of the file as stored lies where the same pixel lay
        mi, mj = np.rint(moved.grid.lps_to_index(tgt.grid.index_to_lps([[i, j]]))[0]).astype(int)
        assert moved.array[mj, mi] == tgt.array[j, i]
    as_stored = matcher.match(src, points, [tgt]).matches
    other = matcher.match(src, points, [moved]).matches
    for a, b in zip(as_stored, other):
        np.testing.assert_allclose(b.point_lps_mm, a.point_lps_mm, atol=1e-3)
        assert b.confident == a.confident
    back = matcher.match(stored_as(src, how), points, [tgt]).matches  # the source stored so, too
    for a, b in zip(as_stored, back):
        np.testing.assert_allclose(b.point_lps_mm, a.point_lps_mm, atol=1e-3)


@pytest.mark.needs_data
@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_a_raster_with_a_print_resolution_is_read_at_1_mm_per_pixel_as_the_log_says(tmp_path, suffix):
    """SimpleITK reads a JPEG's or TIFF's DPI as its spacing (25.4 / 300 mm at 300 dpi); the engine said 1 mm per
    pixel was assumed but used that, and pixel points came back 601 pixels off (from an audit)."""
    from PIL import Image as PILImage

    path = tmp_path / f"hand{suffix}"
    PILImage.open(hand_radiographs(1)[0]).save(path, dpi=(300, 300))
    assert sitk.ReadImage(str(path)).GetSpacing()[0] == pytest.approx(25.4 / 300)  # what SimpleITK makes of it
    plain = read_image(path)
    np.testing.assert_array_equal(plain.grid.spacing_mm, [1.0, 1.0])
    assert not plain.pixel_spacing_known
    given = read_image(path, spacing_mm=SPACING_MM)
    np.testing.assert_array_equal(given.grid.spacing_mm, [SPACING_MM, SPACING_MM])
    assert given.pixel_spacing_known


@pytest.mark.needs_data
def test_matches_in_a_one_slice_volume_lie_on_its_slice(hands, tmp_path):
    """A radiograph stored as one axial slice at z = 37 mm (a NIfTI, or a DICOM): the command wrote its matches at
    z = 0, 37 mm off the target's plane in Slicer (from an audit). They take the slice's z, and x, y are those of
    the same picture as a 2D image."""
    import csv

    from samembed.cli import main

    matcher, src, tgt = hands
    files = []
    for image, name in ((src, "src.nii.gz"), (tgt, "tgt.nii.gz")):
        one = sitk.JoinSeries(image.to_sitk())  # (x, y, 1)
        one.SetOrigin((*image.grid.origin_lps_mm, 37.0))
        one.SetSpacing((*image.grid.spacing_mm, 1.0))
        sitk.WriteImage(one, str(tmp_path / name))
        files.append(tmp_path / name)
    w, h = (np.array(src.grid.size_ijk) - 1) * SPACING_MM
    points = np.array([[0.3 * w, 0.4 * h, 37.0], [0.5 * w, 0.6 * h, 37.0]])
    flat = matcher.match(src, points[:, :2], [tgt]).matches
    stacked = matcher.match(read_image(files[0]), points, [read_image(files[1])]).matches
    for a, b in zip(flat, stacked):
        assert b.point_lps_mm[2] == 37.0
        np.testing.assert_allclose(b.point_lps_mm[:2], a.point_lps_mm[:2], atol=1e-3)
    pts_csv, out = tmp_path / "p.csv", tmp_path / "out.csv"
    pts_csv.write_text("label,x,y,z\n" + "".join(f"P{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(points)))
    assert main(["match", *map(str, files), "--points", str(pts_csv), "--out", str(out), "--model",
                 str(hand_model()), "--device", "cpu", "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [float(r["z"]) for r in rows] == [37.0, 37.0], rows


@pytest.mark.needs_data
def test_a_jpeg_with_an_exif_orientation_tag_is_named_in_a_warning(tmp_path, caplog):
    """Viewers turn such a picture; ITK, Slicer and the engine use its pixels as stored, so points clicked in a
    viewer came back 259 pixels off without a word (from an audit). The engine says so."""
    import logging

    from PIL import Image as PILImage

    upright, tagged = tmp_path / "upright.jpg", tmp_path / "tagged.jpg"
    picture = PILImage.open(hand_radiographs(1)[0])
    picture.save(upright)
    exif = PILImage.Exif()
    exif[0x0112] = 6  # turn by 90 degrees to show it
    picture.transpose(PILImage.Transpose.ROTATE_90).save(tagged, exif=exif)
    with caplog.at_level(logging.WARNING, logger="samembed.io"):
        read_image(upright, spacing_mm=SPACING_MM)
        assert not [r for r in caplog.records if "EXIF" in r.getMessage()]
        read_image(tagged, spacing_mm=SPACING_MM)
    assert any(str(tagged) in r.getMessage() and "EXIF orientation tag (6)" in r.getMessage() for r in caplog.records)


@pytest.mark.needs_data
def test_a_point_in_the_last_pixel_column_matches_onto_itself(hands):
    """The local grid reaches beyond the image (to a multiple of the network's size); a point in the last pixel
    column was queried with the vector of a voxel out there, the fill value's, and even its self-match landed 30-312
    pixels away (from an audit). Without the polish, a self-match stays within a local voxel."""
    from samembed import MatchOptions

    matcher = hands[0]
    src = read_image(data_file("xray", "hand_dha37", "images", "3169.jpg"), spacing_mm=SPACING_MM)
    w, h = (np.array(src.grid.size_ijk) - 1) * SPACING_MM
    points = np.array([[x, y] for x in (w, w - SPACING_MM, 0.0) for y in (0.3 * h, 0.5 * h, 0.7 * h)])
    local = matcher.embed(src).local_grid  # this radiograph's last column is nearest to a voxel beyond it
    assert np.rint(local.lps_to_index(points[:1]))[0, 0] * local.spacing_mm[0] + local.origin_lps_mm[0] > w + 0.1
    found = matcher.match(src, points, [src], options=MatchOptions(polish=False)).points_lps_mm(0)[:, :2]
    voxel = float(np.linalg.norm(matcher.embed(src).local_grid.spacing_mm))
    errors = np.linalg.norm(found - points, axis=1)
    assert errors.max() <= voxel, np.round(errors, 1)


def _tiff_with_tags_after_pixels(path, pixels: np.ndarray, orientation: int) -> None:
    """An 8-bit greyscale TIFF whose tag block follows its pixels, as libtiff (and so ITK) writes them."""
    import struct

    h, w = pixels.shape
    tags = [(256, 3, w), (257, 3, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (274, 3, orientation),
            (277, 3, 1), (278, 3, h), (279, 4, h * w)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in tags) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8 + h * w) + np.ascontiguousarray(pixels, np.uint8).tobytes() + ifd)


@pytest.mark.needs_data
def test_the_exif_orientation_is_found_after_the_pixels_and_after_fill_bytes(tmp_path, caplog):
    """A reader of the file's first bytes alone missed the tag of a TIFF whose tag block follows 360 KB of pixels
    (libtiff's layout), and of a JPEG with fill bytes before its EXIF segment (a review)."""
    import logging

    from PIL import Image as PILImage

    picture = PILImage.open(hand_radiographs(1)[0]).convert("L")
    tiff = tmp_path / "tags_last.tif"
    _tiff_with_tags_after_pixels(tiff, np.asarray(picture)[:600, :600], 6)
    exif = PILImage.Exif()
    exif[0x0112] = 8
    picture.save(plain := tmp_path / "plain.jpg", exif=exif)
    data = plain.read_bytes()
    filled = tmp_path / "filled.jpg"
    filled.write_bytes(data[:2] + b"\xff\xff\xff" + data[2:])  # fill bytes before the first marker after SOI
    with caplog.at_level(logging.WARNING, logger="samembed.io"):
        for path in (tiff, filled):
            read_image(path, spacing_mm=SPACING_MM)
    said = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert any(str(tiff) in m and "tag (6)" in m for m in said), said
    assert any(str(filled) in m and "tag (8)" in m for m in said), said


@pytest.mark.needs_data
@pytest.mark.parametrize("grid", ["image", "model"])
def test_the_heatmaps_of_a_one_slice_target_lie_on_its_slice(tmp_path, grid):
    """A radiograph stored as a one-slice volume at z = 30 mm had 2D heatmaps, at z = 0: beside the target in a
    viewer, though its matches were at z = 30."""
    from samembed.cli import main

    source_path, target_path = hand_radiographs(2)
    pixels = sitk.ReadImage(str(target_path))
    volume = sitk.JoinSeries(pixels)
    volume.SetSpacing((SPACING_MM, SPACING_MM, 3.0))
    volume.SetOrigin((100.0, -50.0, 30.0))
    target = tmp_path / "target.nii.gz"
    sitk.WriteImage(volume, str(target))
    (tmp_path / "p.csv").write_text("label,x,y\nA,40,60\nB,80,90\n")
    out, heatmaps = tmp_path / "m.csv", tmp_path / "hm"
    assert main(["match", str(source_path), str(target), "--points", str(tmp_path / "p.csv"), "--spacing",
                 str(SPACING_MM), "--model", str(hand_model()), "--out", str(out), "--heatmap-dir", str(heatmaps),
                 "--heatmap-grid", grid, "-q"]) == 0
    written = sorted(heatmaps.iterdir())
    assert len(written) == 2
    for path in written:
        heatmap = sitk.ReadImage(str(path))
        assert heatmap.GetDimension() == 3 and heatmap.GetSize()[2] == 1
        assert heatmap.GetOrigin()[2] == pytest.approx(30.0)
        if grid == "image":
            assert heatmap.GetSize() == volume.GetSize()
            np.testing.assert_allclose(heatmap.GetOrigin(), volume.GetOrigin(), atol=1e-4)
    assert all(line.split(",")[4] == "30.0000" for line in out.read_text().splitlines()[1:])  # as the matches
