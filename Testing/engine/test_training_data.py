"""The training data pipeline: which files a run trains on, their label maps, their cache (a review)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from samembed.errors import InputError
from samembed.preprocess import PreprocessConfig
from samembed.training.data import find_volumes, load_cached, prepare_cache, prepare_cache_of
from samembed.training.labels import LabelRule, cache_labels, find_label_maps

from ..conftest import data_file


@pytest.mark.needs_data
def test_a_file_named_twice_is_trained_on_once_and_a_missing_list_entry_is_named(tmp_path, caplog):
    """A folder given as an absolute and a relative path (or a link, or a list with "..") gave every file twice:
    double weight, a global negative of itself, a semantic "patient pair" with itself. A list naming a missing file
    stopped the run after preprocessing with a bare FileNotFoundError."""
    folder = data_file("ct", "totalsegmentator")
    (tmp_path / "link").symlink_to(folder)
    with caplog.at_level(logging.WARNING, logger="samembed.training.data"):
        twice = find_volumes([str(folder), str(tmp_path / "link")], ["*_seg_*"], tmp_path)
    once = find_volumes([str(folder)], ["*_seg_*"], tmp_path)
    assert len(twice) == len(once) > 0 and "named more than once" in caplog.text
    listing = tmp_path / "list.txt"
    listing.write_text(f"{once[0]}\n# a comment\nmissing_ct.nii.gz\n")
    with pytest.raises(InputError, match=r"missing_ct.nii.gz: training data path not found \(line 3 of the list"):
        find_volumes([str(listing)], [], tmp_path)


@pytest.mark.needs_data
def test_the_cache_keeps_the_fill_inference_pads_with_and_skipped_files_are_not_sources(tmp_path):
    """Training views were filled with the volume's minimum (about air) also where inference pads with 0 (fill
    zero); a checkpoint's training_sources listed the files that were skipped."""
    ct = data_file("ct", "totalsegmentator", "ts_example_ct_3mm.nii.gz")
    broken = tmp_path / "broken_ct.nii.gz"
    broken.write_bytes(ct.read_bytes()[:2000])
    config = PreprocessConfig(spacing_mm=4.0, fill="zero")
    pairs = prepare_cache_of([ct, broken], tmp_path / "cache", config, "ct")
    assert [src for src, _ in pairs] == [ct]
    from samembed.io import read_image
    from samembed.preprocess import preprocess

    assert load_cached(pairs[0][1]).fill_value == pytest.approx(preprocess(read_image(ct), config, "ct").fill_value)
    assert prepare_cache([ct], tmp_path / "cache", config, "ct") == [pairs[0][1]]  # (the same entry)


@pytest.mark.needs_data
def test_a_label_maps_cache_follows_its_raw_file_and_an_exclude_by_path_holds(tmp_path):
    """A label map stored as .mhd + .raw kept its cached copy after its .raw changed (parotids swapped, say); an
    exclude naming a label map by its absolute or relative path did not keep it out."""
    ct = data_file("ct", "openkbp", "ct", "pt_1_ct.nii.gz")
    labels = sitk.ReadImage(str(data_file("ct", "openkbp", "oar", "pt_1_oar.nii.gz")))
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(ct, folder / "pt_1_ct.nii.gz")
    sitk.WriteImage(labels, str(folder / "pt_1_oar.mhd"), False)
    config = PreprocessConfig(spacing_mm=4.0, fill="air")
    [npy] = prepare_cache([folder / "pt_1_ct.nii.gz"], tmp_path / "cache", config, "ct")
    first = np.load(cache_labels(npy, folder / "pt_1_oar.mhd", config, "ct"))
    arr = sitk.GetArrayFromImage(labels)
    swapped = np.where(arr == 3, 4, np.where(arr == 4, 3, arr)).astype(arr.dtype)
    raw = folder / "pt_1_oar.raw"
    raw.write_bytes(swapped.tobytes())  # the same size, the header untouched
    second = np.load(cache_labels(npy, folder / "pt_1_oar.mhd", config, "ct"))
    assert (first == 3).sum() > 0 and np.array_equal(second == 4, first == 3)

    rule = {"images": r"(pt_\d+)_ct\.nii\.gz", "labels": str(folder / r"\1_oar.mhd"), "names": {1: "Brainstem"}}
    for pattern in (str(folder / "pt_1_oar.mhd"), "data/pt_1_oar.mhd", "pt_1_oar.mhd"):
        assert find_label_maps([folder / "pt_1_ct.nii.gz"], [rule], [pattern], tmp_path) == {}, pattern
    assert LabelRule.from_dict(rule).labels.endswith("_oar.mhd")


@pytest.mark.needs_data
def test_a_label_picture_of_a_radiograph_lies_on_its_pixels_at_any_pixel_spacing(tmp_path):
    """A PNG label map was read at 1 mm per pixel while its radiograph was at --spacing (0.2 mm): at the model's
    0.6 mm it held no organ at all, and was used."""
    image = data_file("xray", "hand_dha37", "images", "3143.jpg")
    picture = sitk.ReadImage(str(image))
    marks = np.zeros(sitk.GetArrayFromImage(picture).shape[:2], np.uint8)
    marks[400:440, 300:340] = 1  # a 40 x 40 pixel square, rows 400-439, columns 300-339
    sitk.WriteImage(sitk.GetImageFromArray(marks), str(tmp_path / "hand_label.png"))
    config = PreprocessConfig(spacing_mm=0.6, fill="air")
    [npy] = prepare_cache([image], tmp_path / "cache", config, "xray", pixel_spacing_mm=0.2)
    cached = np.load(cache_labels(npy, tmp_path / "hand_label.png", config, "xray", pixel_spacing_mm=0.2))
    start = json.loads(npy.with_suffix(".json").read_text())["crop_start"]
    found = np.argwhere(cached == 1)
    assert len(found) == pytest.approx(40 * 40 * (0.2 / 0.6) ** 2, rel=0.3)
    centre_mm = (found.mean(0) + start) * 0.6 + 0.3  # its pixels' centres, mm from the image's first pixel's edge
    np.testing.assert_allclose(centre_mm, np.array([420.0, 320.0]) * 0.2, atol=0.6)
    small = np.zeros((50, 50), np.uint8)  # a picture of other pixels than its image's: not used
    sitk.WriteImage(sitk.GetImageFromArray(small), str(tmp_path / "small.png"))
    assert cache_labels(npy, tmp_path / "small.png", config, "xray", pixel_spacing_mm=0.2) is None
