"""I/O: every format keeps its geometry; point files round-trip in LPS and RAS; bad files fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samembed.errors import InputError
from samembed.image import Image, lps_to_ras
from samembed.io import PointList, read_image, read_points, write_image, write_points

from ..conftest import data_file


def an_oblique_image(shape_zyx=(12, 20, 24)) -> Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1500, size=shape_zyx).astype(np.int16)
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1, -1, 1])
    return Image.from_array(arr, spacing_mm=(0.8, 0.9, 2.5), origin_lps_mm=(-10.0, 20.0, 30.0), direction=rot, name="oblique")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_volume_formats_keep_voxels_and_geometry(tmp_path, suffix):
    img = an_oblique_image()
    path = write_image(img, tmp_path / f"vol{suffix}")
    back = read_image(path)
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.grid.spacing_mm, img.grid.spacing_mm, atol=1e-5)
    np.testing.assert_allclose(back.grid.origin_lps_mm, img.grid.origin_lps_mm, atol=1e-4)
    np.testing.assert_allclose(back.grid.direction, img.grid.direction, atol=1e-5)


def _write_dicom_series(folder, img, series_uid: str, prefix: str = "slice", description: str | None = None) -> None:
    """Each axial slice of ``img`` as a DICOM file of the series ``series_uid`` in ``folder``."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetSize()[2]):
        sl = img[:, :, k]
        tags = [("0020|000e", series_uid), ("0020|0013", str(k + 1)), ("0008|0060", "CT"),
                ("0020|0032", "\\".join(f"{v:.3f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k)))),
                ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", f"{img.GetSpacing()[2]:.1f}")]
        for tag, value in tags + ([("0008|103e", description)] if description else []):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(sl)


def _move_dicom_slice(path, position: str) -> None:
    """Rewrite the DICOM file ``path`` with another Image Position (Patient) (``"x\\y\\z"``), in the same series."""
    sl = sitk.ReadImage(str(path))
    sl.SetMetaData("0020|0032", position)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(sl)


def test_a_dicom_series_folder_reads_as_one_volume(tmp_path, caplog):
    img = sitk.GetImageFromArray(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8))
    img.SetSpacing((0.7, 0.7, 3.0))
    img.SetOrigin((5.0, -3.0, 100.0))
    _write_dicom_series(tmp_path, img, "1.2.826.0.1.3680043.2.1125.1.123456")
    back = read_image(tmp_path)
    assert back.array.shape == (4, 8, 8)
    np.testing.assert_allclose(back.grid.origin_lps_mm, (5.0, -3.0, 100.0), atol=1e-3)
    np.testing.assert_allclose(back.grid.spacing_mm[2], 3.0, atol=1e-3)
    assert "DICOM series" not in caplog.text  # one series: nothing to say


@pytest.mark.parametrize(("fault", "message"), [
    ("missing", r"not evenly spaced \(5 slices, steps from 3 to 6 mm; read as one volume, a slice would lie up to 1.5 mm"),
    ("repeated", r"not evenly spaced \(5 slices, steps from 0 to 6 mm; .* up to 3 mm"),
    ("tilt", r"step off their normal \(a gantry tilt of about 18 degrees; .* up to 4 mm from its place\)"),
    ("slight tilt", r"gantry tilt of about 0.5 degrees"),
])
def test_a_dicom_series_that_is_not_one_regular_volume_is_refused_with_what_to_do(tmp_path, fault, message):
    """ITK reads a series with a missing or repeated slice, or a tilted one, as a regular volume of the average
    spacing (a console warning at most): refused, naming the folder, the fault and what to do."""
    n = {"missing": 6, "slight tilt": 40}.get(fault, 5)
    img = sitk.GetImageFromArray(np.arange(n * 8 * 8, dtype=np.int16).reshape(n, 8, 8))
    img.SetSpacing((0.7, 0.7, 3.0))
    _write_dicom_series(tmp_path, img, "1.2.826.0.1.3680043.2.1125.1.77")
    if fault == "missing":
        (tmp_path / "slice003.dcm").unlink()
    elif fault == "repeated":  # slice 2 at slice 1's position
        _move_dicom_slice(tmp_path / "slice002.dcm", "0.000\\0.000\\3.000")
    else:  # every slice moved along y: by a third of the spacing per slice, or by 0.5 degrees' worth (0.026 mm)
        per = 1.0 if fault == "tilt" else 3.0 * np.tan(np.radians(0.5))
        for k in range(n):
            _move_dicom_slice(tmp_path / f"slice{k:03d}.dcm", f"0.000\\{k * per:.4f}\\{k * 3.0:.3f}")
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(tmp_path))) == 1  # one series, as written
    with pytest.raises(InputError, match=f"{tmp_path}: the DICOM series.*{message}"):
        read_image(tmp_path)


@pytest.mark.parametrize("decimals", [1, 2])
def test_a_dicom_series_whose_positions_are_rounded_in_its_files_reads_as_one_volume(tmp_path, decimals):
    """Slice positions written with one or two decimals (0.625 mm slices: steps of 0.6 and 0.7 mm, or 0.62 and
    0.63 mm) are one regular volume: read, with the series' average spacing."""
    n = 16
    img = sitk.GetImageFromArray(np.arange(n * 8 * 8, dtype=np.int16).reshape(n, 8, 8))
    img.SetSpacing((0.7, 0.7, 0.625))
    _write_dicom_series(tmp_path, img, "1.2.826.0.1.3680043.2.1125.1.78")
    for k in range(n):
        z = round(-100.0 + k * 0.625, decimals)
        _move_dicom_slice(tmp_path / f"slice{k:03d}.dcm", f"0.000\\0.000\\{z:.{decimals}f}")
    back = read_image(tmp_path)
    assert back.array.shape == (n, 8, 8)
    np.testing.assert_allclose(back.grid.spacing_mm[2], 0.625, atol=0.01)


@pytest.mark.parametrize("larger_uid", ["1.2.826.0.1.3680043.2.1125.1.1", "1.2.826.0.1.3680043.2.1125.1.9"])
def test_a_folder_of_several_dicom_series_reads_the_largest_and_names_them_all(tmp_path, caplog, larger_uid):
    """A study folder (a scout beside the volume): the series with the most files is read, whatever GDCM's order of
    the series, and the warning names every series with its files and description and says how to read another."""
    import logging

    scout = sitk.GetImageFromArray(np.full((2, 8, 8), 7, dtype=np.int16) + np.eye(8, dtype=np.int16))
    scout.SetSpacing((0.7, 0.7, 3.0))
    volume = sitk.GetImageFromArray(np.arange(6 * 8 * 8, dtype=np.int16).reshape(6, 8, 8))
    volume.SetSpacing((0.7, 0.7, 2.0))
    other_uid = "1.2.826.0.1.3680043.2.1125.1.5"
    _write_dicom_series(tmp_path, scout, other_uid, prefix="scout", description="SCOUT")
    _write_dicom_series(tmp_path, volume, larger_uid, prefix="ax", description="AX SOFT TISSUE")
    with caplog.at_level(logging.WARNING, logger="samembed.io"):
        back = read_image(tmp_path)
    np.testing.assert_array_equal(back.array, sitk.GetArrayFromImage(volume))
    assert "holds 2 DICOM series" in caplog.text
    assert f'{larger_uid} (6 files, "AX SOFT TISSUE")' in caplog.text and f'{other_uid} (2 files, "SCOUT")' in caplog.text
    assert f"Reading the one with the most files, {larger_uid}" in caplog.text and "folder of their own" in caplog.text


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_png_and_jpeg_read_as_2d_images(tmp_path, suffix):
    arr = (np.add.outer(np.arange(30), np.arange(40)) * 3 % 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"x{suffix}"))
    img = read_image(tmp_path / f"x{suffix}")
    assert img.ndim == 2 and img.array.shape == (30, 40)
    assert not img.pixel_spacing_known
    img2 = read_image(tmp_path / f"x{suffix}", spacing_mm=0.2)
    assert img2.pixel_spacing_known and np.allclose(img2.grid.spacing_mm, 0.2)


def test_a_colour_image_reads_as_grey_and_several_volumes_in_one_are_refused(tmp_path):
    """RGB(A) pixels (8 or 16 bit) are averaged to grey; a voxel of several other values (a multi-volume NRRD holds
    the phases of a 4D CT so, or a vector field) is refused with what to pass instead, never averaged."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (10, 12, 14, 3)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.nrrd"))
    np.testing.assert_allclose(read_image(tmp_path / "rgb.nrrd").array, rgb.astype(np.float32).mean(-1), rtol=1e-6)
    for comps, dtype in ((3, np.float32), (5, np.int16), (10, np.int16)):
        phases = rng.integers(-1000, 1000, (10, 12, 14, comps)).astype(dtype)
        path = tmp_path / f"phases{comps}.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(phases, isVector=True), str(path))
        with pytest.raises(InputError, match=rf"phases{comps}.nrrd: {comps} values per voxel .*not a colour image.*"
                                             r"pass one scalar volume"):
            read_image(path)


@pytest.mark.parametrize("name", ["pts.csv", "pts.fcsv", "pts.mrk.json"])
@pytest.mark.parametrize("ras", [False, True])
def test_point_files_round_trip_in_lps(tmp_path, name, ras):
    # labels with a comma, a quote or a non-ASCII letter stay one value (quoted in CSV and .fcsv, as Slicer writes)
    labels = ["a", "Parotid, left", 'the "7th" rib', "Übung"]
    pts = PointList(labels, np.array([[1.5, -2.25, 3.0], [-10.0, 20.0, -30.5], [0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
                    descriptions=["", "score=0.9; a, b", "", ""])
    write_points(pts, tmp_path / name, ras=ras)
    back = read_points(tmp_path / name, ras=ras)
    assert back.labels == labels
    np.testing.assert_allclose(back.points_lps_mm, pts.points_lps_mm, atol=1e-3)
    if not name.endswith(".csv"):
        assert back.descriptions[1] == "score=0.9; a, b"
    else:  # the header gives the frame: read back the same without ras (x,y,z held RAS in a RAS file before)
        assert (tmp_path / name).read_text().startswith("label,R,A,S\n" if ras else "label,x,y,z\n")
        np.testing.assert_allclose(read_points(tmp_path / name).points_lps_mm, pts.points_lps_mm, atol=1e-3)


def test_markups_json_honours_its_coordinate_system(tmp_path):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"label": "x", "position": [1.0, 2.0, 3.0]}]}]}
    (tmp_path / "p.mrk.json").write_text(json.dumps(doc))
    np.testing.assert_allclose(read_points(tmp_path / "p.mrk.json").points_lps_mm, [[-1.0, -2.0, 3.0]])


def test_csv_with_ras_flag_negates_x_and_y(tmp_path):
    (tmp_path / "p.csv").write_text("label,x,y,z\nq,1,2,3\n")
    np.testing.assert_allclose(read_points(tmp_path / "p.csv", ras=True).points_lps_mm, [[-1, -2, 3]])
    np.testing.assert_allclose(lps_to_ras(np.array([[1.0, 2.0, 3.0]])), [[-1, -2, 3]])


def test_a_missing_image_names_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.nii.gz: file not found"):
        read_image(tmp_path / "nope.nii.gz")


def test_a_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08 this is not a nifti file")
    with pytest.raises(InputError, match="bad.nii.gz: cannot read"):
        read_image(bad)
    bad.write_bytes(b"not gzip at all")  # (was called gzip data "damaged or cut short")
    with pytest.raises(InputError, match="bad.nii.gz: cannot read this image: it is named .nii.gz but is not "
                                         "gzip-compressed .*not a NIfTI image either"):
        read_image(bad)


def test_a_constant_image_is_rejected(tmp_path):
    path = write_image(Image.from_array(np.zeros((4, 5, 6), np.int16)), tmp_path / "zero.nii.gz")
    with pytest.raises(InputError, match="constant"):
        read_image(path)


@pytest.mark.parametrize("where", ["nowhere", "between samples", "last voxel", "a strided view"])
def test_a_large_image_is_constant_only_when_every_voxel_is(where):
    """The constant check looks at a sparse sample first; a volume that differs only between its samples, or only in
    its last voxel, or a non-contiguous view, is still read whole and accepted."""
    from samembed.io import VARIES_SAMPLES, validate_image

    arr = np.full((20, 64, 64), -1000, np.int16)
    if where == "between samples":
        arr.reshape(-1)[(arr.size // VARIES_SAMPLES) * 3 + 1] = 40
    elif where == "last voxel":
        arr.reshape(-1)[-1] = 40
    elif where == "a strided view":
        arr[1:, :, 2] = 40
        arr = arr[:, :, ::2]  # every voxel that differs is left in, but not contiguous
    image = Image.from_array(arr)
    if where == "nowhere":
        with pytest.raises(InputError, match="constant"):
            validate_image(image)
    else:
        validate_image(image)
        assert image._validated


def test_an_image_with_nans_is_rejected(tmp_path):
    arr = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    path = write_image(Image.from_array(arr), tmp_path / "nan.nrrd")  # NIfTI reading drops NaNs
    with pytest.raises(InputError, match="1 NaN"):
        read_image(path)


def test_an_unwritable_output_is_rejected_before_work(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_points(PointList(["a"], np.zeros((1, 3))), tmp_path / "no" / "such" / "dir" / "p.csv")


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import samembed.io as sio

    target = tmp_path / "out.csv"
    target.write_text("old content\n")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sio.Path, "write_text", boom)
    with pytest.raises(RuntimeError):
        sio.write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_point_file_with_a_bad_number_names_the_row(tmp_path):
    (tmp_path / "p.csv").write_text("label,x,y,z\nq,1,zz,3\n")
    with pytest.raises(InputError, match="line 2: .zz. is not a number"):
        read_points(tmp_path / "p.csv")


@pytest.mark.parametrize("text", ["label,x,y,z\nA,1,2,3\nB,1,5,2,5,3,5\n", "A,1,2,3\nB,1,5,2,5,3,5\n"],
                         ids=["header", "no-header"])
def test_a_row_with_more_values_than_columns_is_refused_as_decimal_commas_would_shift_it(tmp_path, text):
    """``B,1,5,2,5,3,5`` (decimal commas in a comma file) was read as x=1, y=5, z=2 without a word."""
    (tmp_path / "p.csv").write_text(text)
    line = text.count("\n")  # the last line
    with pytest.raises(InputError, match=rf"line {line} has 7 values, but line 1 has 4 columns; if a decimal comma"):
        read_points(tmp_path / "p.csv")
    (tmp_path / "q.csv").write_text(text.replace("1,5,2,5,3,5", "1,2,3,,"))  # empty cells a spreadsheet left: fine
    assert read_points(tmp_path / "q.csv").labels == ["A", "B"]


@pytest.mark.parametrize(("raw", "labels", "xyz"), [
    (b"\xef\xbb\xbflabel,x,y,z\nA,1,2,3\n", ["A"], [1, 2, 3]),  # a spreadsheet's "CSV UTF-8": byte-order mark
    (b"name,x,y,z\nLeftEye,1,2,3\n", ["LeftEye"], [1, 2, 3]),
    (b"x,y,z,id\n1,2,3,L7\n", ["L7"], [1, 2, 3]),
    (b"structure,x,y,z\nMandible,1,2,3\n", ["Mandible"], [1, 2, 3]),  # the one column besides x, y, z
    (b"label;x;y;z\nA;1,5;-2,25;3\n", ["A"], [1.5, -2.25, 3]),  # ";" with decimal commas
    (b"A;1.5;2;3\n", ["A"], [1.5, 2, 3]),
    (b"label\tx\ty\tz\nT\t1\t2\t3\n", ["T"], [1, 2, 3]),
    (b"id,landmark,x,y,z\n1,Mandible,1,2,3\n", ["Mandible"], [1, 2, 3]),  # a name before a number
    (b"Parotid;left;ant,1,2,3\n", ["Parotid;left;ant"], [1, 2, 3]),  # ";" inside a label of a comma file
    (b'label,x,y,z\n"a\nb",1,2,3\n', ["a\nb"], [1, 2, 3]),  # a quoted line break stays in its label
    (b"label,x,y,z\n# a comment\n#1 tumour,1,2,3\n", ["#1 tumour"], [1, 2, 3]),  # a label, not a comment
], ids=["bom", "name", "id-last", "one-other-column", "semicolon-decimal-comma", "semicolon-no-header", "tab",
        "landmark-before-id", "semicolon-in-label", "quoted-line-break", "hash-label"])
def test_point_files_as_spreadsheets_write_them_keep_their_labels_and_values(tmp_path, raw, labels, xyz):
    path = tmp_path / "p.csv"
    path.write_bytes(raw)
    points = read_points(path)
    assert points.labels == labels
    np.testing.assert_array_equal(points.points_lps_mm, [xyz])


@pytest.mark.parametrize("text", [
    "patient,structure,x,y,z\np1,Mandible,1,2,3\np1,Larynx,4,5,6\n",  # two other columns: which one?
    "x,y,z,score\n1,2,3,0.9\n4,5,6,0.9\n",  # numbers, not names
    ",x,y,z\n0,1,2,3\n1,4,5,6\n",  # a spreadsheet's unnamed row numbers
], ids=["two-columns", "scores", "row-numbers"])
def test_a_header_without_a_label_column_numbers_the_points_and_says_so(tmp_path, caplog, text):
    path = tmp_path / "p.csv"
    path.write_text(text)
    assert read_points(path).labels == ["P1", "P2"]
    assert f"{path}: no label column (label, name, landmark, id, or one other column of unique names)" in caplog.text


def test_control_points_not_placed_in_a_markups_file_are_left_out_and_named(tmp_path, caplog):
    """Slicer saves the points of a list that are not placed yet (a template's names) with a status other than
    "defined" and a meaningless position: they are not points to match."""
    cps = [{"label": "A", "position": [1.0, 2.0, 3.0], "positionStatus": "defined"},
           {"label": "B", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
           {"label": "C", "position": [4.0, 5.0, 6.0]},  # no status (older files): placed
           {"label": "D", "position": [7.0, 8.0, 9.0], "positionStatus": "preview"}]
    path = tmp_path / "p.mrk.json"
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": cps}]}))
    points = read_points(path)
    assert points.labels == ["A", "C"] and points.points_lps_mm.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert "2 control point(s) not placed, left out: B, D" in caplog.text
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "controlPoints": cps[1:2]}]}))
    with pytest.raises(InputError, match=r"p.mrk.json: no placed control points in file \(1 not placed\)"):
        read_points(path)
    # a placed point whose position is not 3 numbers is malformed, not "not placed"; a bad number names the control
    # point (it said "line 2" of a JSON file; an audit)
    for position, said in (([1.0, 2.0], r"its position is \[1.0, 2.0\], not 3 numbers"),
                           ([1.0, "zz", 3.0], "'zz' is not a number")):
        cps[0]["position"] = position
        path.write_text(json.dumps({"markups": [{"type": "Fiducial", "controlPoints": cps}]}))
        with pytest.raises(InputError, match=f"p.mrk.json: control point 1 \\(A\\) of markup 1: {said}"):
            read_points(path)


@pytest.mark.parametrize("name", ["pts.fcsv", "pts.mrk.json"])
def test_slicer_point_files_with_a_byte_order_mark_are_read(tmp_path, name):
    write_points(PointList(["a"], np.array([[1.0, 2.0, 3.0]])), tmp_path / name)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (tmp_path / name).read_bytes())
    back = read_points(tmp_path / name)
    assert back.labels == ["a"] and back.points_lps_mm.tolist() == [[1.0, 2.0, 3.0]]


def test_the_content_hash_is_the_documented_digest_and_follows_the_voxels():
    """The embedding caches (memory and disk) are keyed by it: XXH3-128 over dtype, shape, the voxel bytes and the
    rounded geometry. A disk entry written by an earlier version stays valid only while this digest does."""
    import xxhash

    img = an_oblique_image()
    h = xxhash.xxh3_128()
    for part in (str(img.array.dtype).encode(), str(img.array.shape).encode(), img.array.tobytes()):
        h.update(part)
    for v in (img.grid.spacing_mm, img.grid.origin_lps_mm, img.grid.direction):
        h.update(np.round(v, 6).tobytes())
    assert img.content_hash() == h.hexdigest() and len(img.content_hash()) == 32
    other = img.array.copy()
    other[3, 4, 5] += 1
    assert Image(other, img.grid, name="changed").content_hash() != img.content_hash()
    transposed = Image.from_array(np.asfortranarray(img.array), spacing_mm=(0.8, 0.9, 2.5), origin_lps_mm=(-10.0, 20.0, 30.0),
                                  direction=img.grid.direction)
    assert transposed.content_hash() == img.content_hash(), "the memory layout is not part of the content"


def test_a_read_image_holds_the_readers_voxels_without_a_copy_and_a_given_one_is_copied(tmp_path):
    """Reading takes the reader's own voxel buffer (no second volume-sized array): the values are
    ``GetArrayFromImage``'s, the array stays valid after everything else is freed, and it is the image's alone. A
    SimpleITK image given by the caller is copied: changing it later never reaches the engine's image."""
    import gc

    from samembed.io import image_from_sitk

    img = an_oblique_image((20, 30, 26))
    path = write_image(img, tmp_path / "vol.nrrd")  # a SimpleITK read (a .nii.gz is inflated by isal: below)
    back = read_image(path)
    gc.collect()
    churn = [np.full(1 << 16, 3.0) for _ in range(64)]  # reuse freed memory: a dangling buffer would show it
    del churn
    np.testing.assert_array_equal(back.array, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    assert back.array.flags.writeable and type(back.array.base).__name__ == "_SitkVoxels"  # the reader's buffer
    given = sitk.ReadImage(str(path))
    mine = image_from_sitk(given, "given")
    given[0, 0, 0] = 1234
    assert mine.array[0, 0, 0] == img.array[0, 0, 0] != 1234


def test_save_npy_atomic_leaves_no_cut_short_file(tmp_path, monkeypatch):
    """A write that fails midway (a full disk, a kill) leaves neither the name nor a temporary behind; a whole one
    loads back."""
    import numpy as np

    from samembed.io import save_npy_atomic

    path = tmp_path / "v.npy"
    arr = np.arange(1000, dtype=np.float16).reshape(10, 100)
    assert save_npy_atomic(path, arr) == path
    np.testing.assert_array_equal(np.load(path), arr)

    def cut_short(f, a):
        f.write(b"\x93NUMPY" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", cut_short)
    other = tmp_path / "w.npy"
    with pytest.raises(OSError, match="No space"):
        save_npy_atomic(other, arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy"]


def test_an_image_in_a_simpleitk_buffer_is_written_as_a_copy_of_it_would_be(tmp_path):
    """``new_sitk_buffer``: an image made in a SimpleITK image's own buffer writes the same file as the same voxels
    in a plain array, filled and written twice; a part of the buffer (another grid) is written as any array."""
    import numpy as np
    import SimpleITK as sitk

    from samembed.image import Grid, Image
    from samembed.io import new_sitk_buffer, write_image

    grid = Grid((4, 5, 6), [0.7, 0.8, 2.5], [10.0, -20.0, 30.0], np.eye(3)[[1, 0, 2]])
    img, voxels = new_sitk_buffer(grid)
    rng = np.random.default_rng(0)
    for n in range(2):
        values = rng.random((4, 5, 6), dtype=np.float32)
        voxels[...] = values
        write_image(Image(voxels, grid, "buf"), tmp_path / f"buf{n}.nii.gz")
        write_image(Image(values.copy(), grid, "plain"), tmp_path / f"plain{n}.nii.gz")
        a, b = sitk.ReadImage(str(tmp_path / f"buf{n}.nii.gz")), sitk.ReadImage(str(tmp_path / f"plain{n}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), values)
        assert (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == \
               (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    part = Grid((2, 5, 6), [0.7, 0.8, 2.5], [10.0, -20.0, 35.0], np.eye(3)[[1, 0, 2]])
    write_image(Image(voxels[2:], part, "part"), tmp_path / "part.nii.gz")
    c = sitk.ReadImage(str(tmp_path / "part.nii.gz"))
    assert c.GetSize() == (6, 5, 2) and c.GetOrigin() == (10.0, -20.0, 35.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(c), values[2:])


@pytest.mark.parametrize(("header", "ras_flag", "lps"), [
    ("label,L,P,S", False, [1, 2, 3]),  # the axes' letters give the frame: LPS
    ("label,R,A,S", False, [-1, -2, 3]),  # RAS (Slicer), with or without --ras
    ("label,R,A,S", True, [-1, -2, 3]),
    ("name;l;p;s", False, [1, 2, 3]),  # any case, any separator
    ("label,x,y,z", True, [-1, -2, 3]),  # x, y, z: the frame --ras says
], ids=["lps", "ras", "ras-and-flag", "lower-semicolon", "xyz-ras-flag"])
def test_a_header_naming_the_axes_gives_the_frame_of_the_coordinates(tmp_path, header, ras_flag, lps):
    path = tmp_path / "p.csv"
    sep = ";" if ";" in header else ","
    path.write_text(f"{header}\nA{sep}1{sep}2{sep}3\n")
    points = read_points(path, ras=ras_flag)
    assert points.labels == ["A"]
    np.testing.assert_array_equal(points.points_lps_mm, [lps])


def test_a_header_that_contradicts_ras_or_names_no_coordinates_is_refused_with_what_to_write(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("label,L,P,S\nA,1,2,3\n")
    with pytest.raises(InputError, match=r"p.csv: its header names L, P, S columns .* leave out --ras"):
        read_points(path, ras=True)
    path.write_text("label,X (mm),Y (mm),Z (mm)\nA,1,2,3\n")
    with pytest.raises(InputError, match=r"p.csv: line 1 looks like a header .* names no coordinate columns; name "
                                         r"them x,y,z"):
        read_points(path)


@pytest.mark.needs_data
@pytest.mark.parametrize("parts", [("lidc", "LIDC-IDRI-0001_ct.nii.gz"), ("openkbp", "ct", "pt_215_ct.nii.gz"),
                                   ("pancreas", "Pancreas-CT-CB_001_ct_2mm.nii.gz")])
def test_a_gzipped_nifti_inflated_by_isal_is_what_simpleitk_reads(parts):
    """The faster route for ``.nii.gz`` (samembed.nifti_gz): the same voxels, type and geometry as SimpleITK's own
    reading, bit for bit, on real CTs; the voxels are read-only (nothing may change an image after its hash)."""
    from samembed.io import image_from_sitk
    from samembed.nifti_gz import read_nifti_gz

    path = data_file("ct", *parts)
    assert read_nifti_gz(path) is not None, "this plain CT should take the isal route"
    fast, ref = read_image(path), image_from_sitk(sitk.ReadImage(str(path)), str(path))
    assert fast.array.dtype == ref.array.dtype and np.array_equal(fast.array, ref.array)
    assert fast.grid.shape_zyx == ref.grid.shape_zyx
    for field in ("spacing_mm", "origin_lps_mm", "direction"):
        np.testing.assert_array_equal(getattr(fast.grid, field), getattr(ref.grid, field))
    assert not fast.array.flags.writeable
    assert fast.content_hash() == ref.content_hash()


def _nifti_gz_with_header(tmp_path, name: str, **fields) -> tuple:
    """A real CT's crop written as .nii.gz, with header fields (``slope``, ``inter``, ``magic``) set afterwards."""
    import gzip
    import struct

    ct = sitk.ReadImage(str(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")))[40:80, 50:90, 30:50]
    path = tmp_path / name
    sitk.WriteImage(ct, str(path))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    if "slope" in fields:
        struct.pack_into("<2f", raw, 112, fields["slope"], fields.get("inter", 0.0))
    if "magic" in fields:
        raw[344:348] = fields["magic"]
    path.write_bytes(gzip.compress(bytes(raw)))
    return ct, path


@pytest.mark.needs_data
def test_a_nifti_the_isal_route_does_not_cover_is_read_by_simpleitk(tmp_path, monkeypatch):
    """Scaled intensities, a header that is not a single-file NIfTI-1 and a machine without isal go through
    SimpleITK (its values, scaled); a file cut short is an error naming it."""
    import sys

    from samembed.nifti_gz import read_nifti_gz

    ct, plain = _nifti_gz_with_header(tmp_path, "plain.nii.gz")
    assert read_nifti_gz(plain) is not None
    _, scaled = _nifti_gz_with_header(tmp_path, "scaled.nii.gz", slope=2.0, inter=-10.0)
    assert read_nifti_gz(scaled) is None
    np.testing.assert_allclose(read_image(scaled).array, sitk.GetArrayFromImage(ct) * 2.0 - 10.0)
    _, pair = _nifti_gz_with_header(tmp_path, "pair.nii.gz", magic=b"ni1\0")  # the header of a .hdr/.img pair
    assert read_nifti_gz(pair) is None
    cut = tmp_path / "cut.nii.gz"  # SimpleITK reads it without a word (zeros where the data ends); isal says so
    cut.write_bytes(plain.read_bytes()[: len(plain.read_bytes()) // 2])
    with pytest.raises(InputError, match="cut.nii.gz: cannot read this image.*gzip data is damaged or cut short"):
        read_image(cut)
    monkeypatch.setitem(sys.modules, "isal", None)  # isal not installed
    assert read_nifti_gz(plain) is None
    np.testing.assert_array_equal(read_image(plain).array, sitk.GetArrayFromImage(ct))


@pytest.mark.needs_data
@pytest.mark.parametrize("first", ["a value", "NaN", "inf"])
def test_nan_voxels_of_a_nifti_gz_are_read_as_simpleitk_reads_them_whichever_voxel_comes_first(tmp_path, caplog,
                                                                                               first):
    """A float CT crop with NaN (masked out) where the field of view ends, and an infinity: read as SimpleITK (and
    Slicer) reads it, 0 for each, with a warning that counts them. The isal route kept them when the first voxel had
    a value, and the image was then refused (SimpleITK's route, taken when the first voxel was NaN, read zeros)."""
    from samembed.io import image_from_sitk
    from samembed.nifti_gz import read_nifti_gz

    ct = sitk.ReadImage(str(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")))[40:80, 50:90, 30:50]
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[12:] = np.nan
    arr[5, 5, 5] = -np.inf
    if first != "a value":
        arr[0, 0, :5] = np.nan if first == "NaN" else np.inf
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    path = tmp_path / "masked.nii.gz"
    sitk.WriteImage(img, str(path))
    with caplog.at_level("WARNING", logger="samembed"):
        got = read_image(path)
    ref = image_from_sitk(sitk.ReadImage(str(path)), str(path))
    assert read_nifti_gz(path) is not None  # (the isal route)
    assert np.array_equal(got.array, ref.array) and np.isfinite(got.array).all()
    assert got.content_hash() == ref.content_hash()
    n = int((~np.isfinite(arr)).sum())
    assert f"{path}: {n} voxels are NaN or infinite (no value); they are read as 0, as ITK's NIfTI reader" in caplog.text
    # the same as an uncompressed .nii (SimpleITK's reading): read so too, and said (it was not)
    plain = tmp_path / "masked.nii"
    sitk.WriteImage(img, str(plain), False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="samembed"):
        assert np.array_equal(read_image(plain).array, ref.array)
    assert f"{plain}: {n} voxels are NaN or infinite (no value); they are read as 0" in caplog.text


@pytest.mark.needs_data
@pytest.mark.parametrize("isal_route", [True, False])
def test_a_nifti_gz_with_a_nii_of_the_same_name_beside_it_is_read_itself(tmp_path, monkeypatch, caplog, isal_route):
    """ITK's NIfTI reader, asked for ``A.nii.gz`` with an ``A.nii`` beside it, reads ``A.nii``'s voxels under
    ``A.nii.gz``'s header (ITK issue 2243). The engine reads the file it is given, by either route, says what it
    found, and leaves both files and the folder as they were."""
    import logging

    from samembed import io as samembed_io

    ct = sitk.ReadImage(str(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")))
    # different voxels (the first one too: else the isal route's check of it would not see the other file), sizes
    wanted, other = ct[40:80, 50:90, 30:50], ct[0:40, 0:40, 0:30] + 7
    wanted.SetSpacing((1.5, 1.5, 2.0))
    path = tmp_path / "A.nii.gz"
    sitk.WriteImage(wanted, str(path), True)
    sitk.WriteImage(other, str(tmp_path / "A.nii"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    if not isal_route:  # SimpleITK's own reading (a file the isal route does not take)
        monkeypatch.setattr(samembed_io, "read_nifti_gz", lambda *a, **k: None)
    with caplog.at_level(logging.WARNING, logger="samembed.io"):
        image = read_image(path)
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(wanted))
    np.testing.assert_array_equal(image.grid.spacing_mm, [1.5, 1.5, 2.0])
    assert image.name == str(path)
    assert "A.nii lies beside it" in caplog.text and "ITK's NIfTI reader" in caplog.text
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    assert samembed_io.shadowing_file(path) == tmp_path / "A.nii"
    assert samembed_io.shadowing_file(tmp_path / "A.nii") is None  # only a compressed file is shadowed
    (tmp_path / "A.nii").unlink()
    assert samembed_io.shadowing_file(path) is None


def _nifti_forms(tmp_path, ct, stem: str, form: str, cut_bytes: int = 0) -> list:
    """``ct`` written as ``form`` (``nii``, ``nii.gz`` or ``hdr``: a .hdr/.img pair), its voxels' file
    ``cut_bytes`` shorter (a ``.nii.gz``: gzip data that is whole, of a ``.nii`` cut short); the files written."""
    import gzip

    if form == "hdr":
        sitk.WriteImage(ct, str(tmp_path / f"{stem}.hdr"))
        data = tmp_path / f"{stem}.img"
        data.write_bytes(data.read_bytes()[: len(data.read_bytes()) - cut_bytes])
        return [tmp_path / f"{stem}.hdr", data]
    plain = tmp_path / f"{stem}.nii"
    sitk.WriteImage(ct, str(plain))
    raw = plain.read_bytes()[: len(plain.read_bytes()) - cut_bytes]
    if form == "nii":
        plain.write_bytes(raw)
        return [plain]
    plain.unlink()
    packed = tmp_path / f"{stem}.nii.gz"
    packed.write_bytes(gzip.compress(raw))
    return [packed]


@pytest.mark.needs_data
@pytest.mark.parametrize("form", ["nii", "nii.gz", "nii.gz without isal", "hdr"])
def test_a_nifti_cut_short_is_refused_and_a_whole_one_read(tmp_path, monkeypatch, form):
    """ITK's NIfTI reader fills the voxels missing from a file cut short with zeros and says nothing (checked here
    first, so the test shows what the engine adds); the engine refuses such a file by every route, naming it, and
    leaves it as it was. The whole file reads as SimpleITK reads it."""
    import sys

    ct = sitk.ReadImage(str(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")))[30:90, 40:100, 20:60]
    if form.endswith("without isal"):
        monkeypatch.setitem(sys.modules, "isal", None)  # isal not installed: Python's zlib counts the length
    kind = form.split()[0]
    whole = _nifti_forms(tmp_path, ct, "whole", kind)
    np.testing.assert_array_equal(read_image(whole[0]).array, sitk.GetArrayFromImage(ct))
    cut = _nifti_forms(tmp_path, ct, "cut", kind, cut_bytes=2 * (60 * 3 + 5))  # 3 rows and 5 voxels of int16
    silently = sitk.GetArrayFromImage(sitk.ReadImage(str(cut[0])))
    assert silently.shape == (40, 60, 60) and not silently[-1, -3:].any() and sitk.GetArrayFromImage(ct)[-1, -3:].any()
    before = {p: p.read_bytes() for p in cut}
    held = r" \(its voxels' file .*cut.img\)" if kind == "hdr" else ""
    with pytest.raises(InputError, match=rf"cut.{kind}: the file is cut short{held}: its header describes 288000 "
                                         r"bytes of voxels \(60 x 60 x 40 at 16 bits\) but it holds 287630 \(99.9 %\)"):
        read_image(cut[0])
    assert {p: p.read_bytes() for p in cut} == before


def test_the_layout_of_a_nifti_header_in_either_byte_order_and_version():
    """NIfTI-1 (and Analyze 7.5) and NIfTI-2 headers, little- and big-endian: where the voxels start and how many
    bytes they take; anything else is no layout (SimpleITK's reading then says what is wrong)."""
    import struct

    from samembed.nifti_complete import NiftiLayout, nifti_layout

    for order in "<>":
        one = bytearray(348)
        struct.pack_into(order + "i", one, 0, 348)
        struct.pack_into(order + "8h", one, 40, 4, 10, 11, 12, 2, 1, 1, 1)
        struct.pack_into(order + "2h", one, 70, 16, 32)  # float32
        struct.pack_into(order + "f", one, 108, 0.0)  # written as 0 by some tools: a single file's voxels at 352
        analyze = bytes(one)  # no magic: Analyze 7.5, a pair
        one[344:348] = b"n+1\0"
        assert nifti_layout(bytes(one), single_file=True) == NiftiLayout(352, 10 * 11 * 12 * 2 * 4, (10, 11, 12, 2), 32)
        assert nifti_layout(bytes(one), single_file=False) is None, "a single file's header is not a pair's"
        assert nifti_layout(analyze, single_file=False) == NiftiLayout(0, 10 * 11 * 12 * 2 * 4, (10, 11, 12, 2), 32)
        assert nifti_layout(analyze, single_file=True) is None, "a .nii without the single file's magic: not judged"
        pair = bytearray(one)
        pair[344:348] = b"ni1\0"
        assert nifti_layout(bytes(pair), single_file=False) == nifti_layout(analyze, single_file=False)
        assert nifti_layout(bytes(pair), single_file=True) is None
        struct.pack_into(order + "f", one, 108, 1024.0)
        assert nifti_layout(bytes(one), single_file=True).total_bytes == 1024 + 10 * 11 * 12 * 2 * 4
        two = bytearray(540)
        struct.pack_into(order + "i", two, 0, 540)
        two[4:12] = b"n+2\0\r\n\x1a\n"
        struct.pack_into(order + "2h", two, 12, 2, 8)  # uint8
        struct.pack_into(order + "8q", two, 16, 3, 300, 200, 100, 1, 1, 1, 1)
        struct.pack_into(order + "q", two, 168, 544)
        assert nifti_layout(bytes(two), single_file=True) == NiftiLayout(544, 300 * 200 * 100, (300, 200, 100), 8)
    assert nifti_layout(b"not a header" * 50, single_file=True) is None
    assert nifti_layout(bytes(one[:200]), single_file=True) is None  # too short to be a header
    struct.pack_into(">8h", one, 40, 3, 10, 0, 12, 1, 1, 1, 1)  # an axis of no voxels
    assert nifti_layout(bytes(one), single_file=True) is None


@pytest.mark.parametrize(("content", "message"), [
    ({"markups": [3]}, "markup 1 is not a Slicer markup"),
    ({"markups": [{"controlPoints": 5}]}, "markup 1 is not a Slicer markup"),
    ({"markups": [{"controlPoints": [{"position": [1, 2, 3]}, "x"]}]}, "control point 2 of markup 1 is not an object"),
], ids=["markup-a-number", "control-points-a-number", "control-point-a-string"])
def test_a_markups_file_of_the_wrong_shape_is_refused_naming_what_is_wrong(tmp_path, content, message):
    """These ended in an internal AttributeError that named neither the file nor the problem."""
    path = tmp_path / "p.mrk.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=f"{path.name}: {message}"):
        read_points(path)


def test_load_npy_reads_what_np_save_wrote_mapped_or_not_and_names_a_file_cut_short(tmp_path):
    """The engine process reads volume files on several threads; np.load's header parsing cannot run in two at
    once on Python 3.11 (CPython gh-106905), so load_npy serialises that parsing only. It must read what np.load
    reads."""
    from samembed.io import load_npy

    rng = np.random.default_rng(0)
    path = tmp_path / "v.npy"
    for dtype in (np.int16, np.uint8, np.float32):
        a = (rng.normal(size=(4, 6, 5)) * 50).astype(dtype)
        for arr in (a, np.asfortranarray(a), a[:, ::2]):
            np.save(path, arr)
            for mapped in (False, True):
                got = load_npy(path, mapped)
                assert got.dtype == arr.dtype and np.array_equal(got, arr) and isinstance(got, np.memmap) == mapped
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(InputError, match="cut short"):
        load_npy(path)


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan")])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_header_with_a_voxel_size_of_no_length_is_refused(tmp_path, value, suffix):
    """SimpleITK placed an image whose header gives pixdim 0 (or NaN) at 1 mm per voxel, and one below 0 mirrored,
    with only ITK's warning about the sform (an audit: a brainstem 165 mm off)."""
    import gzip
    import struct

    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    img.SetSpacing((3.0, 2.0, 1.5))
    plain = tmp_path / "ok.nii"
    sitk.WriteImage(img, str(plain))
    data = bytearray(plain.read_bytes())
    assert read_image(plain).grid.spacing_mm[0] == pytest.approx(3.0)
    struct.pack_into("<f", data, 76 + 4, value)  # pixdim[1]: x
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(gzip.compress(bytes(data)) if suffix.endswith(".gz") else bytes(data))
    with pytest.raises(InputError, match=f"{bad}: its header gives a voxel size of {value:g} mm along x"):
        read_image(bad)


def test_an_empty_file_or_a_plain_nifti_named_gz_is_told_for_what_it_is(tmp_path):
    """A 0-byte file was told to take "its own format's name", a 0-byte .nrrd got ITK's "Unable to determine ImageIO
    reader", and a plain NIfTI named .nii.gz was called not gzip-compressed with the same advice (an audit)."""
    for name in ("zero.nii.gz", "zero.nrrd", "zero.nii"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(InputError, match=f"{tmp_path / name}: the file is empty \\(0 bytes\\)"):
            read_image(tmp_path / name)
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(plain))
    misnamed = tmp_path / "plain.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    try:
        import isal  # noqa: F401 - the engine's own .nii.gz reader says it
    except ImportError:
        pytest.skip("isal not installed: SimpleITK reads the file")
    with pytest.raises(InputError, match="is named .nii.gz but is an uncompressed NIfTI file; name it .nii"):
        read_image(misnamed)
    text = tmp_path / "text.nii.gz"
    text.write_text("label,x,y,z\n")
    with pytest.raises(InputError, match="not a NIfTI image either"):
        read_image(text)


def test_a_4d_image_says_to_pass_one_frame(tmp_path):
    """The 4D error said only what was not supported (an audit)."""
    frame = sitk.GetImageFromArray(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5))
    path = tmp_path / "phases.nii"
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    with pytest.raises(InputError, match=r"4D images are not supported; .* pass one 3D volume \(the frame you want"):
        read_image(path)


def test_a_frame_column_gives_the_frame_of_x_y_z_and_must_be_one_frame(tmp_path):
    """`samembed match`'s CSV names each row's frame: read back as points, RAS rows are RAS without --ras; rows of
    two frames, or an unknown frame, are refused naming the file; an empty column leaves the frame to --ras."""
    path = tmp_path / "m.csv"
    path.write_text("target,label,x,y,z,frame\nt,A,1,2,3,RAS\n")
    np.testing.assert_array_equal(read_points(path).points_lps_mm, [[-1.0, -2.0, 3.0]])
    path.write_text("target,label,x,y,z,frame\nt,A,1,2,3,RAS\nt,B,1,2,3,LPS\n")
    with pytest.raises(InputError, match=r"m.csv: its frame column holds LPS, RAS; expected one of LPS or RAS"):
        read_points(path)
    path.write_text("target,label,x,y,z,frame\nt,A,1,2,3,\n")
    np.testing.assert_array_equal(read_points(path).points_lps_mm, [[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(read_points(path, ras=True).points_lps_mm, [[-1.0, -2.0, 3.0]])


def test_a_folder_without_dicom_series_names_its_image_files_and_itk_says_nothing(tmp_path, capfd):
    """A folder of other images given where a DICOM folder is read: ITK printed its own "No Series were found"
    warning lines (twice, with its build paths) before the error; the error now names the image files to pass."""
    write_image(an_oblique_image(), tmp_path / "scan.nii.gz")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"folder holds no DICOM series; it holds 1 image file\(s\) \(scan.nii.gz\): "
                                         "pass them themselves"):
        read_image(tmp_path)
    (tmp_path / "scan.nii.gz").unlink()
    with pytest.raises(InputError, match="folder holds no DICOM series; pass an image file or a DICOM folder"):
        read_image(tmp_path)
    assert "No Series" not in capfd.readouterr().err


def test_an_image_prints_its_name_and_geometry_not_its_voxels():
    image = Image.from_array(np.zeros((40, 50, 60), dtype=np.int16), spacing_mm=(0.7, 0.7, 2.5), name="ct.nii.gz")
    assert repr(image) == "Image('ct.nii.gz', int16, shape_zyx=(40, 50, 60), spacing_xyz 0.7 x 0.7 x 2.5 mm)"


NOT_UTF8 = __import__("os").fsdecode(b"scan \xe9t\xe9")  # Latin-1 bytes, as unzipped from a Windows archive


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_a_file_whose_name_is_not_utf8_is_read_and_its_name_written_as_its_own_bytes(tmp_path, suffix):
    """SimpleITK cannot be given such a name (the process ended in C++, SIGABRT): it is read through a link of a
    name it can take, and a point file that names it keeps its bytes."""
    img = an_oblique_image()
    path = tmp_path / f"{NOT_UTF8}{suffix}"
    write_image(img, tmp_path / f"plain{suffix}").rename(path)
    back = read_image(path)
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.grid.direction, img.grid.direction, atol=1e-5)
    assert back.name == str(path) and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    out = write_points(PointList([back.name], np.zeros((1, 3))), tmp_path / "points.csv")
    assert f"{path}".encode("utf-8", "surrogateescape") in out.read_bytes()


def test_a_dicom_folder_or_an_output_whose_name_is_not_utf8_is_refused_by_name(tmp_path):
    folder = tmp_path / NOT_UTF8
    folder.mkdir()
    (folder / "slice000.dcm").write_bytes(b"\0" * 132 + b"DICM")
    with pytest.raises(InputError, match=r"scan \\xe9t\\xe9: the name of this DICOM folder is not valid UTF-8"):
        read_image(folder)
    with pytest.raises(InputError, match=r"scan \\xe9t\\xe9.nii.gz: the name of the file to write is not valid UTF-8"):
        write_image(an_oblique_image(), tmp_path / f"{NOT_UTF8}.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_nifti_written_only_in_part_is_an_error_naming_it_and_takes_no_outputs_place(tmp_path, monkeypatch, suffix):
    """ITK's NIfTI writer reports a short write (a full disk) only on the console: the cut-short or empty file took
    the output's place and the command succeeded (a review). The written file's length is checked first."""
    import errno

    from samembed import io as samembed_io

    img = an_oblique_image()
    whole = write_image(img, tmp_path / f"whole{suffix}").read_bytes()
    samembed_io.check_nifti_written(tmp_path / f"whole{suffix}")  # complete: nothing to say
    for kept in (len(whole) // 2, 0):
        def short_write(image, path, compress, kept=kept):
            Path(path).write_bytes(whole[:kept])

        monkeypatch.setattr(sitk, "WriteImage", short_write)
        with pytest.raises(OSError, match="written only in part") as e:
            write_image(img, tmp_path / f"out{suffix}")
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / f"out{suffix}")
        assert "written only in part, or not at all; the disk may be full (free space in" in str(e.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"whole{suffix}"]


def test_a_write_without_room_names_its_file_and_a_name_that_fits_is_written_whatever_its_length(tmp_path):
    """"No space left on device" named no file (a review); and a name that the folder takes failed for its longer
    temporary name."""
    import errno

    from samembed.io import atomic_path, write_text_atomic

    with pytest.raises(OSError, match="No space left") as e, atomic_path(tmp_path / "m.csv"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path / "m.csv")
    assert e.value.strerror == f"No space left on device (free space in {tmp_path}, or write elsewhere)"
    long = tmp_path / ("w" * 250 + ".csv")
    assert write_text_atomic(long, "a\n").read_text() == "a\n"
    assert [p.name for p in tmp_path.iterdir()] == [long.name]


def test_an_unreadable_image_is_named_with_itks_reason_not_the_last_line_of_its_text(tmp_path):
    """The message took the last line of ITK's exception: a matrix row ("0 0 1") for a singular direction, and for a
    file cut short ITK's stale "No such file or directory" about a file that exists (a review)."""
    import SimpleITK as sitk

    from samembed.errors import InputError
    from samembed.io import read_image

    img = sitk.GetImageFromArray(np.arange(4096, dtype=np.float32).reshape(16, 16, 16))
    good = tmp_path / "good.mha"
    sitk.WriteImage(img, str(good))
    head, sep, data = good.read_bytes().partition(b"ElementDataFile = LOCAL\n")
    singular = tmp_path / "singular.mha"
    singular.write_bytes(head.replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 1 0 0 0 0 1")
                         + sep + data)
    cut = tmp_path / "cut.mha"
    cut.write_bytes(good.read_bytes()[: len(head) + len(sep) + len(data) // 2])
    with pytest.raises(InputError) as e:
        read_image(singular)
    assert f"{singular}: cannot read this image" in str(e.value) and "determinant is 0" in str(e.value), e.value
    with pytest.raises(InputError) as e:
        read_image(cut)
    assert f"{cut}: cannot read this image" in str(e.value) and "cannot be read" in str(e.value), e.value
    assert "No such file" not in str(e.value)


def _nifti_with(tmp_path: Path, name: str, image, gz: bool, **fields) -> Path:
    """``image`` written as NIfTI by SimpleITK, then header ``fields`` (vox_offset, scl_slope, scl_inter: float32 at
    bytes 108, 112, 116) set as another tool might have written them, and ``trailing`` bytes appended after it."""
    import gzip
    import struct

    plain = tmp_path / f"{name}.nii"
    sitk.WriteImage(image, str(plain), False)
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    for field, at in (("vox_offset", 108), ("scl_slope", 112), ("scl_inter", 116)):
        if field in fields:
            struct.pack_into("<f", raw, at, fields[field])
    path = tmp_path / (f"{name}.nii.gz" if gz else f"{name}.nii")
    path.write_bytes((gzip.compress(bytes(raw)) if gz else bytes(raw)) + fields.get("trailing", b""))
    return path


@pytest.mark.needs_data
@pytest.mark.parametrize("gz", [True, False], ids=["nii.gz", "nii"])
def test_nifti_headers_the_engine_reads_as_simpleitk_does_or_refuses_by_name(tmp_path, gz, caplog):
    """A review: a vox_offset of NaN or infinity stopped the engine's own reading with a bare ValueError, and one inside
    the header was read shifted or refused as cut short; a float file with scl_slope 0 and an intercept (ITK: slope
    1, the intercept added) was read without the intercept; a .nii.gz with bytes appended was called damaged."""
    ct = sitk.ReadImage(str(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")))[30:70, 30:62, 40:60]
    for offset in (float("nan"), float("inf"), 0.0, 348.0):
        path = _nifti_with(tmp_path, f"offset_{offset:g}", ct, gz, vox_offset=offset)
        with pytest.raises(InputError, match=f"{path.name}: its header's vox_offset, where the voxels start, is "
                                             f"{offset:g}, not a byte after the 352 bytes"):
            read_image(path)
    floats = sitk.Cast(ct, sitk.sitkFloat32)
    path = _nifti_with(tmp_path, "slope0", floats, gz, scl_slope=0.0, scl_inter=1e-5)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert (expected != sitk.GetArrayFromImage(floats)).any()  # ITK adds the intercept
    np.testing.assert_array_equal(read_image(path).array, expected)
    if gz:
        path = _nifti_with(tmp_path, "appended", ct, gz, trailing=b"GARBAGE!")
        with caplog.at_level("WARNING", logger="samembed.nifti_gz"):
            np.testing.assert_array_equal(read_image(path).array, sitk.GetArrayFromImage(ct))
        assert "8 bytes that are not gzip data follow" in caplog.text


def test_a_point_file_separated_by_spaces_is_read_and_an_image_given_as_points_is_named(tmp_path):
    """A new user's ``label x y z`` file with spaces was refused as "looks like a header but names no coordinate
    columns" (it named them); an image given as --points said "'utf-8' codec can't decode byte 0x8b"."""
    spaced = tmp_path / "points.txt"
    spaced.write_text("label x y z\nA 247.18 265.42 211.78\n  B   10\t20   30\n")
    points = read_points(spaced)
    assert points.labels == ["A", "B"] and points.dims == 3
    np.testing.assert_allclose(points.points_lps_mm, [[247.18, 265.42, 211.78], [10, 20, 30]])
    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(image))
    with pytest.raises(InputError, match=r"ct.nii.gz: not a text file \(an image\?\)"):
        read_points(image)


def test_a_missing_image_of_a_close_name_is_suggested(tmp_path, capsys):
    """A mistyped flag got "did you mean"; a mistyped image (pt_2_ct.nii for pt_2_ct.nii.gz) did not."""
    from samembed.cli import main

    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(tmp_path / "pt_2_ct.nii.gz"))
    with pytest.raises(InputError, match=r"pt_2_ct.nii: file not found \(did you mean .*pt_2_ct.nii.gz\?\)"):
        read_image(tmp_path / "pt_2_ct.nii")
    (tmp_path / "p.csv").write_text("A,1,2,3\n")
    assert main(["match", str(tmp_path / "pt_2_ct.nii"), str(tmp_path / "pt_2_ct.nii.gz"), "--points",
                 str(tmp_path / "p.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "(did you mean" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"elsewhere.nii.gz: file not found$"):
        read_image(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(InputError, match=r"p.cvs: point file not found \(did you mean .*p.csv\?\)"):
        read_points(tmp_path / "p.cvs")


def test_an_output_onto_a_pipe_or_a_device_is_refused_and_left_as_it_is(tmp_path):
    """The rename of an atomic write put a regular file in a pipe's place (its reader waited forever), and, as root,
    in a device's (``--out`` a link to ``/dev/null``) (a review)."""
    import os
    import stat

    from samembed.io import check_writable, write_text_atomic

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    link = tmp_path / "null.csv"
    link.symlink_to("/dev/null")
    for out in (fifo, link):
        with pytest.raises(InputError, match="is not a regular file"):
            check_writable(out)
        with pytest.raises(InputError, match="is not a regular file"):
            write_text_atomic(out, "label,x,y,z\n")
    assert stat.S_ISFIFO(fifo.stat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["fifo.csv", "null.csv"]


def test_a_read_only_earlier_output_is_not_replaced(tmp_path, monkeypatch):
    """A read-only earlier result was replaced by the rename of an atomic write (in a writable folder the rename
    never fails), where the shell's ``>`` refuses; refused before anything is computed (``check_writable``) and at
    the write, naming it as a failed rename would (a review). Root may write it, so this user is made a non-root one
    for the file: ``os.access`` says no, as it would."""
    import errno
    import os

    from samembed import io as sio

    out = tmp_path / "m.csv"
    out.write_text("OLD\n")
    out.chmod(0o444)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, how, **k: False if (how & os.W_OK and Path(path) == out)
                        else real_access(path, how, **k))
    with pytest.raises(InputError, match="m.csv: the file is read-only"):
        sio.check_writable(out)
    with pytest.raises(PermissionError) as refused:
        sio.write_text_atomic(out, "NEW\n")
    assert refused.value.errno == errno.EACCES and refused.value.filename2 == str(out)
    assert out.read_text() == "OLD\n" and [p.name for p in tmp_path.iterdir()] == ["m.csv"]  # no temporary left
    other = tmp_path / "n.csv"  # a writable file is replaced, as before
    other.write_text("OLD\n")
    sio.write_text_atomic(other, "NEW\n")
    assert other.read_text() == "NEW\n"


def test_a_folder_s_hidden_files_are_not_taken_for_images(tmp_path):
    """A killed write's temporary file (``.x.nii.gz.k3j2.tmp.nii.gz``) was taken for a scan by ``propagate --scans``
    and ``train``'s data folders (a review); so were macOS's ``._x.nii.gz`` and a ``.git`` folder's images."""
    from samembed.io import list_images

    root = tmp_path / ".hidden_root"  # (the folder given may itself be hidden)
    for name in ("a.nii.gz", ".a.nii.gz.k3j2.tmp.nii.gz", "._b.nii.gz", ".git/c.nii.gz", "sub/d.nrrd",
                 "series/1.dcm", ".series/2.dcm"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == ["a.nii.gz", "series", "sub/d.nrrd"]


@pytest.mark.parametrize("blank", ["   ", ",,,", " , , , ", ";;;"])
def test_a_blank_row_of_a_point_table_is_no_point(tmp_path, blank):
    """A spreadsheet's empty ``,,,`` row, or a last line of spaces, was refused ("line 3 has 1 columns", "'' is not a
    number") (a review)."""
    path = tmp_path / "p.csv"
    sep = ";" if blank == ";;;" else ","
    path.write_text(f"label{sep}x{sep}y{sep}z\nA{sep}1{sep}2{sep}3\n{blank}\nB{sep}4{sep}5{sep}6\n{blank}\n")
    points = read_points(path)
    assert list(points.labels) == ["A", "B"]
    np.testing.assert_allclose(points.points_lps_mm, [[1, 2, 3], [4, 5, 6]])
    path.write_text("label,x,y,z\nA,1,2,3\nB,,,\n")  # a label without its coordinates is still named
    with pytest.raises(InputError, match="line 3"):
        read_points(path)


def test_a_direction_whose_axes_are_not_unit_vectors_is_folded_into_the_spacing(tmp_path):
    """An MHA whose TransformMatrix scales its axes (2 x I, 5 mm voxels: 10 mm apart) was resampled by its spacing
    alone, at half the anatomy's scale (204 mm of error, where the same grid as NRRD gave 0.15 mm: a review). The
    lengths go into the spacing: the same positions, unit axes."""
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((5.0, 5.0, 2.5))
    img.SetDirection((0.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.5))  # a rotation, its axes scaled by 2, 2 and 0.5
    img.SetOrigin((1.0, 2.0, 3.0))
    path = tmp_path / "scaled.mha"
    sitk.WriteImage(img, str(path))
    got = read_image(path)
    np.testing.assert_allclose(got.grid.spacing_mm, [10.0, 10.0, 1.25])
    np.testing.assert_allclose(np.linalg.norm(got.grid.direction, axis=0), 1.0)
    ijk = np.array([[0, 0, 0], [5, 4, 3], [2.5, 1, 0.5]], dtype=float)
    expected = [img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk]  # ITK's own positions
    np.testing.assert_allclose(got.grid.index_to_lps(ijk), expected, atol=1e-9)
