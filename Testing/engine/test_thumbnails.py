"""The review thumbnails of ``samembed propagate``: what they show, on real CTs."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from samembed.io import read_image
from samembed.propagate.thumbnails import OUTSIDE_RGB, PANEL_PX, is_ct, landmark_png, landmark_pngs

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
    # beyond the field of view: blue, not the black of air (a match outside the scan looked like one in air)
    edge = imread(io.BytesIO(pngs[2]))[:, :PANEL_PX, :3]
    blue = np.all(np.abs(edge - OUTSIDE_RGB) < 0.01, axis=2)
    assert blue[0, 0] and not blue[-1, -1] and 0.1 < blue.mean() < 0.9
    assert not np.all(np.abs(imread(io.BytesIO(pngs[0]))[:, :, :3] - OUTSIDE_RGB) < 0.01, axis=2).any()
