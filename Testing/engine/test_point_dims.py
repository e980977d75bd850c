"""Points with fewer coordinates than the image has axes are refused with an error that names the point file, never
put on the plane z = 0 and matched there; x, y points still serve a 2D image."""

from __future__ import annotations

import numpy as np
import pytest

from samembed.cli import main
from samembed.errors import InputError
from samembed.io import PointList, check_point_dims, read_points

from ..conftest import data_file, hand_model, hand_radiographs


@pytest.mark.parametrize(("text", "dims"), [
    ("label,x,y\nA,1,2\n", 2), ("label,x,y,z\nA,1,2,3\n", 3), ("A,1,2\n", 2), ("A,1,2,3\n", 3),
    ("x,y,label\n1,2,A\n", 2)], ids=["xy", "xyz", "xy-no-header", "xyz-no-header", "xy-other-order"])
def test_a_csv_point_list_knows_how_many_coordinates_its_file_gave(tmp_path, text, dims):
    path = tmp_path / "p.csv"
    path.write_text(text)
    points = read_points(path)
    assert points.dims == dims and points.points_lps_mm.shape == (1, 3)
    check_point_dims(points, path, 2, "radiograph.png")  # x, y is enough for a 2D image
    if dims == 2:
        # (the message also says how a line of x,y,z alone was read: a new user's file of "248.8,288.6,172.2")
        with pytest.raises(InputError, match=rf"{path}: its points have 2 coordinates \(label,x,y\), but ct.nii.gz is "
                                             r"a 3D image; give each point's z too .*a line of x,y,z alone is read as "
                                             r"label,x,y: put a label before the coordinates"):
            check_point_dims(points, path, 3, "ct.nii.gz")
    else:
        check_point_dims(points, path, 3, "ct.nii.gz")


def test_x_y_z_lines_without_labels_of_points_on_one_plane_are_not_read_as_label_x_y(tmp_path):
    """For a 2D image, "104.7,210.3,0" lines were read as label 104.7 at (210.3, 0): every point on the image's top
    edge, matched there without a word (a review); numbered labels of points on a radiograph still read."""
    plane = tmp_path / "xyz.csv"
    plane.write_text("104.7,210.3,0\n116.7,190.1,0\n98.2,150.0,0\n")
    with pytest.raises(InputError, match=rf"{plane}: its lines look like x,y,z without labels .*put a label before"):
        read_points(plane)
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("1,104.7,210.3\n2,116.7,190.1\n3,98.2,150.0\n")
    assert read_points(numbered).labels == ["1", "2", "3"]
    one = tmp_path / "one.csv"  # one line: nothing tells the two apart; read as label,x,y
    one.write_text("7,104.7,210.3\n")
    assert read_points(one).labels == ["7"]


@pytest.mark.needs_data
def test_the_command_refuses_an_xy_point_file_for_a_ct_and_writes_nothing(tmp_path, capsys):
    ct = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    xy = tmp_path / "xy.csv"
    xy.write_text("label,x,y\nA,250,250\n")  # a plane z = 0 point that lies inside this CT
    out = tmp_path / "out.csv"
    code = main(["match", str(ct), str(ct), "--points", str(xy), "--out", str(out), "--model", "random:sam-lite",
                 "--device", "cpu", "--quiet"])
    assert code == 2
    assert f"{xy}: its points have 2 coordinates (label,x,y), but {ct} is a 3D image" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.needs_data
def test_the_command_refuses_an_xy_atlas_point_file_for_a_ct(tmp_path, capsys):
    ct = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    xyz, xy = tmp_path / "xyz.csv", tmp_path / "xy.csv"
    xyz.write_text("label,x,y,z\nA,250,250,150\n")
    xy.write_text("label,x,y\nA,250,250\n")
    code = main(["match", "--atlas", str(ct), str(xyz), "--atlas", str(ct), str(xy), str(ct), "--out",
                 str(tmp_path / "out.csv"), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 2
    assert f"{xy}: its points have 2 coordinates (label,x,y)" in capsys.readouterr().err


@pytest.mark.needs_data
def test_the_api_refuses_xy_points_for_a_ct_and_takes_them_for_a_radiograph():
    from samembed import Matcher

    ct = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    m = Matcher("random:sam-lite", device="cpu")
    with pytest.raises(InputError, match=r"points have 2 coordinates \(x, y\), but .*pt_215_ct.nii.gz is a 3D image; "
                                         r"give \(1, 3\) LPS mm points"):
        m.match(ct, np.array([[250.0, 250.0]]), [ct])
    images = hand_radiographs(1)
    hand = Matcher(str(hand_model()), device="cpu", spacing_mm=0.2)
    res = hand.match(images[0], np.array([[40.0, 60.0]]), images)
    assert len(res.matches) == 1 and res.matches[0].point_lps_mm[2] == 0.0


def test_a_radiograph_point_outside_says_it_may_be_in_pixels(tmp_path):
    """A 2D point list given in pixels (with --spacing 0.2 mm) fell outside the image, and the only hint was --ras."""
    from samembed.image import Image
    from samembed.io import check_points_inside

    image = Image.from_array(np.zeros((100, 80), dtype=np.uint8), spacing_mm=(0.2, 0.2), name="hand.png")
    path = tmp_path / "p.csv"
    path.write_text("label,x,y\nA,70,90\n")  # pixel (70, 90): 14 x 18 mm, but given as 70 x 90 mm
    with pytest.raises(InputError, match=r"add --ras; if they are pixel indices, give them in mm instead \(index x "
                                         r"the pixel spacing, 0.2 x 0.2 mm, from the image's origin\)"):
        check_points_inside(read_points(path), path, image, False)


def test_a_markups_file_outside_the_image_is_not_told_to_add_or_leave_out_ras(tmp_path):
    """A .fcsv or .mrk.json gives its own frame, which --ras does not change: the hint told to add --ras (and, with
    it, that the points were read as RAS, when the file said LPS) (a review)."""
    from samembed.image import Image
    from samembed.io import check_points_inside, write_points

    image = Image.from_array(np.zeros((20, 20, 20), dtype=np.int16), spacing_mm=(1.0, 1.0, 1.0), name="ct.nii.gz")
    for name in ("p.fcsv", "p.mrk.json"):
        path = write_points(PointList(["A"], np.array([[5.0, 5.0, 500.0]])), tmp_path / name)
        for ras in (False, True):
            with pytest.raises(InputError, match="lies outside ct.nii.gz") as said:
                check_points_inside(read_points(path, ras=ras), path, image, ras)
            assert "gives its own coordinate system" in str(said.value) and "add --ras" not in str(said.value)
            assert "read as RAS" not in str(said.value)
