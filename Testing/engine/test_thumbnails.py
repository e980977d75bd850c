"""The review thumbnails of ``samembed propagate``: what they show, on real CTs."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from samembed.io import read_image
from samembed.propagate.thumbnails import LETTER_RGB, OUTSIDE_RGB, PANEL_PX, is_ct, landmark_png, landmark_pngs

from ..conftest import data_file


@pytest.mark.needs_data
@pytest.mark.parametrize("scan", [("openkbp", "ct", "pt_202_ct.nii.gz"), ("lidc", "LIDC-IDRI-0001_ct.nii.gz")])
def test_thumbnails_read_the_voxels_as_they_are_and_show_the_point_in_two_planes(scan):
    """Each thumbnail is an axial and a coronal panel with the point marked in their middle, in the CT window. The
    voxels are interpolated where they lie, with no float copy of the volume: the pictures are those of the same
    scan converted to float32 first, byte for byte, also for a point near the edge (outside shown in blue)."""
    from matplotlib.image import imread

    image = read_image(data_file("ct", *scan))
    assert image.array.dtype == np.int16 and is_ct(image)
    grid = image.grid
    corner = grid.index_to_lps(np.array([[2.0, 2.0, 2.0]]))[0]  # panels that run off the volume
    centre = grid.index_to_lps(np.array([grid.shape_zyx[::-1]]) / 2.0)[0]
    points = [centre, centre + [20.0, -10.0, 5.0], corner]
    pngs = landmark_pngs(image, points)
    as_float = dataclasses.replace(image, array=image.array.astype(np.float32))
    assert pngs == [landmark_png(as_float, p) for p in points]
    rgb = imread(io.BytesIO(pngs[0]))
    assert rgb.shape[:2] == (PANEL_PX, 2 * PANEL_PX + 3)
    c = PANEL_PX // 2
    for x0 in (0, PANEL_PX + 3):  # the red cross-hair's arm in each panel, its centre left open
        arm = rgb[c, x0 + c + 5, :3]
        assert arm[0] > 0.9 and arm[1] < 0.3 and arm[2] < 0.3
    assert not np.array_equal(rgb[c, c, :3], rgb[c, c + 5, :3])
    # the patient directions at each panel's four edges (R, L and A, P; R, L and S, I), in yellow; nowhere else
    yellow = np.all(np.abs(rgb[:, :, :3] - LETTER_RGB) < 0.01, axis=2)
    for x0 in (0, PANEL_PX + 3):
        panel = yellow[:, x0:x0 + PANEL_PX]
        for edge in (panel[c - 4:c + 4, :8], panel[c - 4:c + 4, -8:], panel[:10, c - 4:c + 4], panel[-10:, c - 4:c + 4]):
            assert edge.sum() >= 10
        assert not panel[12:-12, 12:-12].any()
    a, co = yellow[:, :PANEL_PX], yellow[:, PANEL_PX + 3:]
    assert not np.array_equal(a[:10], co[:10]) and not np.array_equal(a[-10:], co[-10:])  # A/S, P/I
    assert np.array_equal(a[c - 4:c + 4], co[c - 4:c + 4])  # R and L in both
    # beyond the field of view: blue, not the black of air (a match outside the scan looked like one in air)
    edge = imread(io.BytesIO(pngs[2]))[:, :PANEL_PX, :3]
    blue = np.all(np.abs(edge - OUTSIDE_RGB) < 0.01, axis=2)
    assert blue[0, 0] and not blue[-1, -1] and 0.1 < blue.mean() < 0.9
    assert not np.all(np.abs(imread(io.BytesIO(pngs[0]))[:, :, :3] - OUTSIDE_RGB) < 0.01, axis=2).any()


@pytest.mark.needs_data
def test_a_radiographs_thumbnail_is_one_panel_without_patient_directions():
    """A 2D image's plane is not known (a hand, a lateral cephalogram): one panel, the point marked, no letters."""
    from matplotlib.image import imread

    folder = data_file("xray", "hand_dha37", "images")
    image = read_image(sorted(folder.iterdir())[0], spacing_mm=0.2)
    assert image.ndim == 2
    centre = image.grid.index_to_lps(np.array([image.grid.shape_zyx[::-1]]) / 2.0)[0]
    rgb = imread(io.BytesIO(landmark_png(image, centre)))[:, :, :3]
    assert rgb.shape[:2] == (PANEL_PX, PANEL_PX)
    assert not np.all(np.abs(rgb - LETTER_RGB) < 0.01, axis=2).any()
    assert rgb[PANEL_PX // 2, PANEL_PX // 2 + 5, 0] > 0.9
