"""The match figure (:mod:`samembed.figures`): each crop in its image's own slice plane, named so, and a truth drawn
only where it lies (a review: one 40 mm off the slice was drawn on it, and every slice was called axial)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samembed.figures import match_figure, slice_plane
from samembed.io import image_from_sitk, read_image

from ..conftest import data_file


def texts(fig) -> str:
    return " | ".join(t.get_text() for ax in fig.axes for t in (ax.title, *ax.texts))


def legend_labels(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


@pytest.mark.needs_data
def test_a_truth_off_the_slice_is_said_not_drawn_and_one_on_it_is_drawn():
    import matplotlib.pyplot as plt

    ct = read_image(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz"))
    point = ct.grid.index_to_lps(np.array([[64.0, 64.0, 60.0]]))[0]
    fig = match_figure(ct, point, ct, point, truth_lps_mm=point + [0.0, 0.0, 40.0])
    assert "truth" not in legend_labels(fig)
    assert "truth 40.0 mm from the match, +40.0 mm off this slice" in texts(fig)
    plt.close(fig)
    fig = match_figure(ct, point, ct, point, truth_lps_mm=point + [5.0, 0.0, 0.0])
    assert "truth" in legend_labels(fig) and "off this slice" not in texts(fig)
    assert "axial slice z = " in texts(fig)
    assert texts(fig).count("20 mm") == 2  # a scale bar in each panel
    plt.close(fig)


@pytest.mark.needs_data
def test_a_volume_stored_in_sagittal_slices_is_named_so():
    import matplotlib.pyplot as plt

    axial = sitk.ReadImage(str(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")))
    sagittal = sitk.PermuteAxes(axial, [1, 2, 0])  # its slices along x: the same voxels at the same places
    image = image_from_sitk(sagittal, "sagittal.nii.gz")
    assert slice_plane(image.grid.direction) == ("sagittal", 0)
    point = image.grid.index_to_lps(np.array([[60.0, 64.0, 64.0]]))[0]
    fig = match_figure(image, point, image, point)
    assert "sagittal slice x = " in texts(fig) and "axial" not in texts(fig)
    assert f"x = {point[0]:.1f} mm" in texts(fig)
    plt.close(fig)


def test_a_radiograph_is_drawn_as_it_is_and_a_heatmap_on_another_grid_is_resampled_on_the_crop():
    """``samembed match --figure-dir`` draws radiographs (a 2D image: it failed on the slice index) and heatmaps on
    the model's grid (``Heatmaps.on_model_grid``): the crop of such a map equals the crop of the same map made on the
    image's voxels (``heatmap_on_grid``), and a radiograph gets no patient orientation letters, nor CT's window."""
    from samembed.figures import _crop, _grey, _heatmap_crop
    from samembed.heatmap import heatmap_on_grid
    from samembed.image import Image

    rng = np.random.default_rng(0)
    picture = Image.from_array((rng.random((300, 200)) * 4000).astype(np.float32), spacing_mm=(0.2, 0.25),
                               name="hand.png")
    coarse = Image.from_array(rng.random((19, 13)).astype(np.float32) * 2 - 1, spacing_mm=(3.2, 4.0), name="map")
    coarse.grid.origin_lps_mm[:] = [1.5, 1.875]  # (the model grid's first centre, inside the first 16 pixels)
    point = np.array([20.0, 37.5, 0.0])
    crop, k, extent, grid = _crop(picture, point, half_mm=10.0)
    assert k is None and grid.shape_zyx == picture.array[crop].shape
    whole = heatmap_on_grid(coarse.array, coarse.grid, picture.grid).array
    np.testing.assert_array_equal(_heatmap_crop(coarse, picture, k, crop, grid), whole[crop])
    shown = _grey(picture.array[crop], ct=False)
    assert shown.min() >= np.percentile(picture.array[crop], 1) - 1e-3 and shown.max() > 600  # not CT's window

    import matplotlib.pyplot as plt

    fig = match_figure(picture, point, picture, point, coarse)
    assert "2D image" in texts(fig) and not {"L", "R", "A", "P", "S", "I"} & set(texts(fig).split(" | "))
    assert texts(fig).count("20 mm") + texts(fig).count("10 mm") == 2  # a scale bar in each panel
    plt.close(fig)


def test_matplotlib_gets_a_config_folder_of_its_own_where_home_cannot_be_written(tmp_path, monkeypatch):
    """With HOME not writable, matplotlib made a temporary config folder per process, removed by an exit hook that the
    command's ``os._exit`` skips: each run left one behind, and rebuilt its font cache with a warning (a review). A
    folder of this user's under the temporary folder is used instead, the same one every run."""
    import os
    import sys
    import tempfile

    from samembed import figures

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)  # (as before the command imports it)
    assert figures.matplotlib_config_dir() is None and "MPLCONFIGDIR" not in os.environ  # writable: nothing to do
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, how, **k: False if Path(path) == home else real_access(path, how, **k))
    first = figures.matplotlib_config_dir()
    assert first is not None and first.parent == tmp_path / "tmp" and os.environ["MPLCONFIGDIR"] == str(first)
    monkeypatch.delenv("MPLCONFIGDIR")
    assert figures.matplotlib_config_dir() == first and first.is_dir()  # the same folder the next run
