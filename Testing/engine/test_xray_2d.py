"""2D radiographs end to end: reading, the CLI and the API on real hand radiographs, 2D training, the
``hand_oneshot`` split, metrics and 2D elastix baseline.

Hand pixels are taken as 0.2 mm (stored half-resolution JPEGs of scans assumed at 0.1 mm per pixel), so stored
pixel (x, y) is the LPS point (0.2 x, 0.2 y, 0) mm.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from samembed_bench import hand_oneshot as ho

from samembed import Matcher, MatchOptions
from samembed.cli import main
from samembed.errors import InputError
from samembed.image import Image
from samembed.io import read_image

from ..conftest import REPO, data_file

HAND_MODEL = REPO / "Resources" / "Models" / "sam-lite-2d-hand.pt"


@pytest.fixture(scope="module")
def hand_cases() -> dict:
    data_file("xray", "hand_dha37", "landmarks_37.csv")
    return {c.image_id: c for c in ho.load_hand_dataset(data_file())}


@pytest.fixture(scope="module")
def a_template_and_a_heldout_hand(hand_cases):
    train, held = ho.hand_split(list(hand_cases))
    return hand_cases[ho.pick_templates(train)[0]], hand_cases[held[0]]


@pytest.fixture(scope="module")
def a_hand_matcher():
    if not HAND_MODEL.is_file():
        pytest.skip(f"{HAND_MODEL} is missing (train it: see Resources/Models/sam-lite-2d-hand.yaml)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Matcher(HAND_MODEL, device="cpu", modality="xray")
    torch.set_num_threads(threads)  # the later tests of the process keep theirs


# ------------------------------------------------------------------------------------------ real hands
@pytest.mark.needs_data
def test_cli_matches_hand_landmarks_from_a_jpeg_template_into_a_jpeg_target(tmp_path, a_template_and_a_heldout_hand):
    if not HAND_MODEL.is_file():
        pytest.skip(f"{HAND_MODEL} is missing")
    template, target = a_template_and_a_heldout_hand
    pts = template.points_lps_mm()
    csv_in = tmp_path / "pts.csv"
    csv_in.write_text("label,x,y,z\n" + "".join(f"L{i + 1},{p[0]},{p[1]},{p[2]}\n" for i, p in enumerate(pts)))
    out = tmp_path / "out.csv"
    code = main(["match", str(template.path), str(target.path), "--points", str(csv_in), "--out", str(out),
                 "--spacing", "0.2", "--model", str(HAND_MODEL), "--modality", "xray", "--device", "cpu", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == [f"L{i + 1}" for i in range(37)]
    found = np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rows])
    assert np.all(found[:, 2] == 0.0)
    err_mm = ho.errors_orig_px(ho.lps_mm_to_px(found), target) * ho.ORIG_PX_MM
    assert np.median(err_mm) < 5.0, f"median error {np.median(err_mm):.1f} mm (assumed 0.1 mm per original pixel)"


@pytest.mark.needs_data
def test_api_self_match_of_a_hand_returns_each_landmark_within_one_local_voxel(a_hand_matcher, hand_cases):
    case = next(iter(hand_cases.values()))
    img = read_image(case.path, spacing_mm=0.2)
    res = a_hand_matcher.match(img, case.points_lps_mm(), [img])
    found = np.array([m.point_lps_mm for m in res.matches])
    voxel_mm = 2 * a_hand_matcher.model.preprocess.spacing_mm  # local stride 2
    err = np.linalg.norm(found - case.points_lps_mm(), axis=1)
    assert err.max() <= voxel_mm, f"max self-match error {err.max():.2f} mm > {voxel_mm} mm"
    assert np.median(err) < 0.25 * voxel_mm


@pytest.mark.needs_data
def test_a_2d_nifti_carries_its_own_spacing_and_matches_like_the_jpeg_with_spacing(tmp_path, a_hand_matcher, hand_cases):
    case = next(iter(hand_cases.values()))
    sitk_img = sitk.ReadImage(str(case.path))
    sitk_img.SetSpacing((0.2, 0.2))
    nii = tmp_path / "hand.nii.gz"
    sitk.WriteImage(sitk_img, str(nii))
    png = tmp_path / "hand.png"
    sitk.WriteImage(sitk.ReadImage(str(case.path)), str(png))
    from_nii = read_image(nii, spacing_mm=5.0)  # a file's own spacing wins over the option
    assert from_nii.ndim == 2 and from_nii.pixel_spacing_known and np.allclose(from_nii.grid.spacing_mm, 0.2)
    assert not read_image(png).pixel_spacing_known
    pts = case.points_lps_mm()[:5]
    a = a_hand_matcher.match(from_nii, pts, [from_nii])
    b = a_hand_matcher.match(read_image(png, spacing_mm=0.2), pts, [read_image(case.path, spacing_mm=0.2)])
    pa = np.array([m.point_lps_mm for m in a.matches])
    pb = np.array([m.point_lps_mm for m in b.matches])
    assert np.allclose(pa, pb, atol=0.5)  # png vs jpeg decode of the same pixels


@pytest.mark.parametrize("suffix", [".nii.gz", ".dcm"])
def test_a_single_slice_3d_file_is_read_as_a_2d_image_with_the_file_spacing(tmp_path, suffix, a_hand_matcher, hand_cases):
    """Radiographs often come as one-slice DICOM or NIfTI volumes; they go through the 2D model."""
    case = next(iter(hand_cases.values()))
    plane = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path)))
    vol = sitk.GetImageFromArray(plane[None].astype(np.uint16))
    vol.SetSpacing((0.2, 0.2, 3.0))
    vol.SetOrigin((0.0, 0.0, 40.0))
    path = tmp_path / f"hand{suffix}"
    sitk.WriteImage(vol, str(path))
    img = read_image(path)
    assert img.ndim == 2 and img.array.shape == plane.shape and img.pixel_spacing_known
    assert np.allclose(img.grid.spacing_mm, 0.2) and np.allclose(img.grid.origin_lps_mm, 0.0)
    pts = case.points_lps_mm()[:5]
    a = a_hand_matcher.match(path, pts, [path])
    found = np.array([m.point_lps_mm for m in a.matches])
    assert np.allclose(found[:, :2], pts[:, :2], atol=0.9)  # self-match within a local voxel
    # on the slice as its file gives it (test_radiograph_geometry.py; whether SimpleITK's DICOM writer keeps the z
    # depends on what else the process wrote before: 0 or 40 mm)
    assert np.all(found[:, 2] == img.plane_z_mm) and (suffix != ".nii.gz" or img.plane_z_mm == 40.0)


def test_a_grey_and_alpha_png_is_read_by_its_grey_channel(tmp_path, hand_cases):
    """ITK refuses a grey + alpha PNG (GIMP's, Pillow's "LA"): it was called unreadable or corrupt."""
    from PIL import Image as Picture

    case = next(iter(hand_cases.values()))
    with Picture.open(case.path) as picture:
        picture.convert("LA").save(tmp_path / "la.png")
    read = read_image(tmp_path / "la.png", spacing_mm=0.2)
    assert read.ndim == 2 and read.pixel_spacing_known
    np.testing.assert_array_equal(read.array, read_image(case.path).array)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InputError, match="broken.png: cannot read this image"):
        read_image(tmp_path / "broken.png")


def test_a_modality_the_model_was_not_trained_for_is_told(hand_cases, caplog):
    """``--modality ct`` on radiographs with the hand model mapped them as CT without a word: 2.7 -> 9.8 mm mean
    error on a hand pair (a review). CT and MRI for a CT model are not named (its MRI use)."""
    import logging

    case = next(iter(hand_cases.values()))
    image = read_image(case.path, spacing_mm=0.2)
    points = case.points_lps_mm()[:2]
    if not HAND_MODEL.is_file():
        pytest.skip(f"{HAND_MODEL} is missing")
    with caplog.at_level(logging.WARNING, logger="samembed.api"):
        res = Matcher(HAND_MODEL, device="cpu", modality="ct").match(image, points, [image],
                                                                     options=MatchOptions(polish=False))
    said = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert len(said) == 1 and "trained on radiographs, but intensities are mapped as CT's" in said[0]
    assert said[0] in res.notes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samembed.api"):
        Matcher(HAND_MODEL, device="cpu", modality="xray").match(image, points, [image], options=MatchOptions(polish=False))
    assert not [r for r in caplog.records if "was trained on" in r.getMessage()]


def test_a_colour_picture_of_floating_point_values_is_read_as_a_colour_picture(tmp_path, hand_cases):
    """A float RGB TIFF was refused as "several volumes in one (e.g. the phases of a 4D CT)"."""
    case = next(iter(hand_cases.values()))
    grey = sitk.Cast(sitk.ReadImage(str(case.path)), sitk.sitkFloat32)
    sitk.WriteImage(sitk.Compose(grey, grey, grey), str(tmp_path / "rgb.tif"))
    read = read_image(tmp_path / "rgb.tif", spacing_mm=0.2)
    assert read.ndim == 2
    np.testing.assert_allclose(read.array, sitk.GetArrayFromImage(grey))
    vectors = sitk.Compose(*[sitk.JoinSeries(grey)] * 3)  # three values per voxel of a volume: not colours
    sitk.WriteImage(vectors, str(tmp_path / "vectors.nrrd"))
    with pytest.raises(InputError, match="3 values per voxel .*not a colour image"):
        read_image(tmp_path / "vectors.nrrd")


def test_an_int8_precision_asked_of_the_default_models_says_what_the_radiograph_model_runs_in(caplog):
    """With ``--model default``, ``--precision int8-bf16`` is the CT model's: the radiograph model (no calibration)
    ran in float32 without a word (a review)."""
    import logging

    matcher = Matcher("default", device="cpu", precision="int8")
    with caplog.at_level(logging.INFO, logger="samembed.api"):
        embedder = matcher.embedder_for(2)
    assert embedder.precision == "fp32" and matcher.embedder.precision == "int8"
    assert "2D images: the model sam-lite-2d-hand runs in fp32 (int8, asked for, is the 3D model's)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="samembed.api"):
        Matcher("default", device="cpu").embedder_for(2)  # auto: nothing asked for, nothing to tell
    assert "asked for" not in caplog.text


def _write_radiograph_dicom(path, pixels: np.ndarray, sop_class: str, **spacing) -> None:
    """A one-frame DICOM radiograph of ``pixels`` (uint16) with the given spacing tags (pydicom's names)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "X", "1", "CR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for tag, value in spacing.items():
        setattr(ds, tag, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    assert pydicom.dcmread(str(path)).Rows == pixels.shape[0]


def test_a_dicom_radiograph_gets_its_pixel_spacing_from_its_tags_or_is_said_to_have_none(tmp_path, hand_cases):
    """GDCM reads a CR's or DX's Imager Pixel Spacing only: one with Pixel Spacing alone, and a secondary capture
    without either, were read at 1 mm per pixel as if known (no warning, --spacing ignored): 68 mm off on a hand."""
    case = next(iter(hand_cases.values()))
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path))).astype(np.uint16) * 16
    cr, dx, sc = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.7"
    # rows 0.3 mm apart, columns 0.2 mm: x is 0.2, y 0.3
    for name, sop, tag in (("cr.dcm", cr, "PixelSpacing"), ("dx.dcm", dx, "PixelSpacing"),
                           ("imager.dcm", cr, "ImagerPixelSpacing")):
        _write_radiograph_dicom(tmp_path / name, pixels, sop, **{tag: [0.3, 0.2]})
        img = read_image(tmp_path / name)
        assert img.ndim == 2 and img.pixel_spacing_known, name
        np.testing.assert_allclose(img.grid.spacing_mm, (0.2, 0.3), err_msg=name)
    _write_radiograph_dicom(tmp_path / "sc.dcm", pixels, sc)
    assert not read_image(tmp_path / "sc.dcm").pixel_spacing_known
    given = read_image(tmp_path / "sc.dcm", spacing_mm=0.2)
    assert given.pixel_spacing_known and np.allclose(given.grid.spacing_mm, 0.2)


def test_a_single_slice_that_is_not_axial_fails_with_a_clear_input_error(tmp_path):
    vol = sitk.GetImageFromArray(np.random.default_rng(0).random((1, 32, 24)).astype(np.float32))
    vol.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))  # the slice is coronal
    path = tmp_path / "coronal.nii.gz"
    sitk.WriteImage(vol, str(path))
    with pytest.raises(InputError, match=r"coronal.nii.gz: a single-slice image must lie in the axial \(x-y\) plane.*"
                                         r"Save its pixels as a PNG"):
        read_image(path)


def test_a_2d_source_with_a_3d_target_fails_with_a_clear_input_error():
    rng = np.random.default_rng(0)
    src = Image.from_array((rng.random((64, 48)) * 255).astype(np.uint8), spacing_mm=(0.2, 0.2), name="hand.png")
    tgt = Image.from_array((rng.random((8, 64, 48)) * 255).astype(np.uint8), name="volume.nii.gz")
    with pytest.raises(InputError, match=r"volume.nii.gz: a 3D target cannot be matched with the 2D source hand.png; "
                                         r"use images of the same dimension"):
        Matcher("random:sam-lite-2d", device="cpu").match(src, [[4.0, 4.0, 0.0]], [tgt], target_names=["volume.nii.gz"])


def test_points_with_a_z_on_a_2d_image_are_matched_in_its_plane_with_a_warning_that_z_is_ignored(caplog):
    """``label,x,y,z`` points with z = 500 on a radiograph were matched in its plane without a word."""
    import logging

    rng = np.random.default_rng(0)
    img = Image.from_array((rng.random((64, 48)) * 255).astype(np.uint8), spacing_mm=(0.2, 0.2), name="hand.png")
    matcher = Matcher("random:sam-lite-2d", device="cpu")
    with caplog.at_level(logging.WARNING, logger="samembed"):
        flat = matcher.match(img, [[4.0, 4.0, 0.0]], [img])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="samembed"):  # one plane (Slicer gives a radiograph's z): no word
        plane = matcher.match(img, [[4.0, 4.0, 7.5], [5.0, 5.0, 7.5]], [img])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="samembed"):
        off = matcher.match(img, [[4.0, 4.0, 500.0], [5.0, 5.0, 0.0]], [img])
    assert [r.getMessage() for r in caplog.records] == [
        "hand.png is a 2D image: the points' z is ignored, though they lie in different planes (z from 0.0 to 500.0 mm)"]
    np.testing.assert_allclose(off.matches[0].point_lps_mm, flat.matches[0].point_lps_mm)
    np.testing.assert_allclose(plane.matches[0].point_lps_mm, flat.matches[0].point_lps_mm)
    # a search box of 6 numbers (the command line's --box, Slicer's ROI) on a 2D image: its x and y
    boxed = matcher.match(img, [[4.0, 4.0, 0.0]], [img], options=MatchOptions(box_lps_mm=(0, 0, -1, 9.4, 12.6, 1)))
    assert boxed.matches[0].point_lps_mm[0] <= 9.4


# ------------------------------------------------------------------------------------------ split and metrics
def test_the_split_is_seeded_disjoint_and_complete():
    ids = [str(3000 + i) for i in range(133)]
    train, held = ho.hand_split(ids, n_train=100, seed=0)
    assert len(train) == 100 and len(held) == 33
    assert not set(train) & set(held) and set(train) | set(held) == set(ids)
    assert (train, held) == ho.hand_split(list(reversed(ids)), n_train=100, seed=0)
    assert held != ho.hand_split(ids, n_train=100, seed=1)[1]
    assert ho.pick_templates(train, 5)[0] == ho.pick_templates(train, 1)[0]
    assert set(ho.pick_templates(train, 5)) <= set(train)
    with pytest.raises(InputError):
        ho.hand_split(ids, n_train=133)


@pytest.mark.needs_data
def test_the_real_split_holds_out_33_hands_never_used_for_training(hand_cases):
    train, held = ho.hand_split(list(hand_cases))
    assert len(hand_cases) == 133 and len(train) == 100 and len(held) == 33
    assert ho.pick_templates(train, 5)[0] in train
    if HAND_MODEL.is_file():
        used = torch.load(HAND_MODEL, map_location="cpu", weights_only=True).get("training_volumes", [])
        stems = {name.split("-")[0] for name in used}
        assert stems and stems <= set(train), "the shipped model saw a held-out hand"


def test_errors_are_in_original_pixels_and_mm_on_a_hand_computed_case():
    case = ho.HandCase("x", REPO, landmarks_px=np.array([[10.0, 10.0], [20.0, 20.0]]),
                       landmarks_orig_px=np.array([[20.0, 21.0], [40.0, 42.0]]), orig_per_stored=np.array([2.0, 2.1]))
    pred_px = np.array([[13.0, 10.0], [20.0, 40.0]])  # 3 stored px right (6 orig px); 20 stored px down (42 orig px)
    err = ho.errors_orig_px(pred_px, case)
    assert np.allclose(err, [6.0, 42.0])
    s = ho.summarise_errors(np.array([6.0, 42.0, np.nan]))
    assert s["n"] == 3 and s["failed"] == 1
    assert s["mean_px"] == 24.0 and s["mean_mm"] == 2.4 and s["median_mm"] == 2.4
    assert s["within_2mm_pct"] == pytest.approx(100 / 3, abs=1e-3)  # 0.6 mm of 3 (the failure is a miss)
    assert s["within_10mm_pct"] == pytest.approx(200 / 3, abs=1e-3)
    assert np.allclose(ho.px_to_lps_mm(np.array([[10.0, 5.0]])), [[2.0, 1.0, 0.0]])
    assert np.allclose(ho.lps_mm_to_px(np.array([[2.0, 1.0, 0.0]])), [[10.0, 5.0]])


def test_multi_template_combination_takes_the_best_score_or_the_median():
    preds = np.array([[[0.0, 0.0], [5.0, 5.0]], [[1.0, 0.0], [50.0, 5.0]], [[2.0, 0.0], [6.0, 5.0]]])
    scores = np.array([[0.2, 0.9], [0.8, 0.1], [0.5, 0.5]])
    assert np.allclose(ho.combine_templates(preds, scores, "best"), [[1.0, 0.0], [5.0, 5.0]])
    assert np.allclose(ho.combine_templates(preds, scores, "median"), [[1.0, 0.0], [6.0, 5.0]])


@pytest.mark.slow  # importing itk-elastix alone takes about 20 s of CPU
def test_2d_elastix_transfer_recovers_a_known_shift():
    pytest.importorskip("itk")
    yy, xx = np.mgrid[0:96, 0:80].astype(np.float32)
    blob = lambda cy, cx: np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0)  # noqa: E731
    fixed_arr = 100 * blob(40, 30) + 60 * blob(60, 55) + 5
    moving_arr = 100 * blob(44, 33) + 60 * blob(64, 58) + 5  # everything moved by (+3, +4) px = (0.6, 0.8) mm
    fixed, moving = sitk.GetImageFromArray(fixed_arr), sitk.GetImageFromArray(moving_arr)
    for im in (fixed, moving):
        im.SetSpacing((0.2, 0.2))
    pts = ho.px_to_lps_mm(np.array([[30.0, 40.0], [55.0, 60.0]]))
    moved, seconds = ho.transfer_points_elastix_2d(fixed, moving, pts, "affine", iterations=100)
    assert moved.shape == (2, 3) and seconds > 0
    assert np.allclose(moved[:, :2] - pts[:, :2], [[0.6, 0.8], [0.6, 0.8]], atol=0.15)
    with pytest.raises(InputError):
        ho.transfer_points_elastix_2d(sitk.Image(4, 4, 4, sitk.sitkFloat32), moving, pts)


# ------------------------------------------------------------------------------------------ 2D training
def test_a_rotated_training_view_samples_the_volume_where_its_positions_say():
    import torch.nn.functional as F

    from samembed.training.pairs import inside_view, map_positions_mm
    from samembed.training.sampling import sample_view

    yy, xx = np.mgrid[0:120, 0:100]
    vol = torch.tensor(np.sin(yy / 7.0) + np.cos(xx / 5.0) + 0.01 * yy, dtype=torch.float32)[None, None]
    view = sample_view(vol, np.array([30.0, 25.0]), 24, 0.7, 0.5, 0.0, angle_deg=12.0)
    pos = map_positions_mm(view, (24, 24))
    shape = torch.tensor(vol.shape[2:], dtype=torch.float32)
    direct = F.grid_sample(vol, ((pos / 0.5 + 0.5) / shape * 2 - 1).flip(-1).reshape(1, 24, 24, 2), align_corners=False)
    assert torch.allclose(direct[0, 0], view.image[0], atol=1e-5)
    assert inside_view(view, pos, -0.01).all() and not inside_view(view, pos + 100.0).any()
    back = F.grid_sample(view.image[None], view.mm_to_norm(pos[:5], ()).reshape(1, -1, 1, 2), align_corners=False)
    assert torch.allclose(back.reshape(-1), view.image[0].reshape(-1)[:5], atol=1e-4)


def test_2d_training_runs_on_a_folder_of_radiographs_with_xray_augmentations(tmp_path):
    from samembed.models import load_checkpoint
    from samembed.training.config import TrainConfig
    from samembed.training.train import Trainer

    rng = np.random.default_rng(0)
    folder = tmp_path / "xrays"
    folder.mkdir()
    yy, xx = np.mgrid[0:160, 0:128]
    for n in range(3):
        arr = 40 + 120 * (((xx // (16 + n)) + (yy // 20)) % 2) + rng.normal(0, 5, xx.shape)
        img = sitk.GetImageFromArray(np.clip(arr, 0, 255).astype(np.uint8))
        if n < 2:  # PNGs carry no spacing: pixel_spacing_mm gives it
            sitk.WriteImage(img, str(folder / f"xr{n}.png"))
        else:
            img.SetSpacing((0.5, 0.5))
            sitk.WriteImage(img, str(folder / f"xr{n}.nii.gz"))
    cfg = TrainConfig(name="tiny-2d", arch="sam-lite-2d", data=[str(folder)], cache_dir=str(tmp_path / "cache"),
                      modality="xray", spacing_mm=1.0, iterations=2, batch_volumes=2, local_size=32, global_size=24,
                      scale_range=(0.8, 1.25), rotation_deg=15.0, contrast=0.2, gamma=0.3, centre_jitter_mm=8.0,
                      global_jitter_mm=16.0, local_ignore_mm=2.0, global_positive_mm=6.0, anchors=32, num_hard=32,
                      num_negatives=32, global_candidates=32, threads=1, out_dir=str(tmp_path / "run"), checkpoint_every=10,
                      pixel_spacing_mm=0.5)
    trainer = Trainer(cfg, progress=False)
    trainer.load_data()
    # every image, PNG or NIfTI, is 160 x 128 pixels of 0.5 mm: about 80 x 64 voxels on the 1 mm grid
    assert len(trainer.volumes) == 3
    for name, vol, _spacing, threshold in trainer.volumes:
        assert vol.shape[0] <= 80 + 2 * 8 and vol.shape[1] <= 64 + 2 * 8, (name, vol.shape)
        # radiographs have no physical intensity scale: the body threshold is the volume's own 5th percentile
        assert threshold == pytest.approx(float(np.percentile(vol.float().numpy(), 5.0)), abs=0.5)
    final = trainer.run()
    model = load_checkpoint(final)
    assert model.spec.ndim == 2 and model.preprocess.spacing_mm == 1.0
    rows = list(csv.DictReader((tmp_path / "run" / "train_log.csv").open()))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)


def test_a_png_mask_is_read_with_the_matcher_s_spacing_and_the_missing_spacing_is_said_once(tmp_path, caplog,
                                                                                           monkeypatch):
    """A PNG mask was read at 1 mm per pixel whatever Matcher(spacing_mm=...) said (the search then found no voxel),
    and the warning of a missing spacing came once per image (100 targets, 100 warnings)."""
    import logging

    import SimpleITK as sitk

    from samembed import io

    rng = np.random.default_rng(0)
    png, mask = tmp_path / "hand.png", tmp_path / "mask.png"
    sitk.WriteImage(sitk.GetImageFromArray((rng.random((64, 48)) * 255).astype(np.uint8)), str(png))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((64, 48), np.uint8)), str(mask))
    matcher = Matcher("random:sam-lite-2d", device="cpu", spacing_mm=0.2)
    res = matcher.match(str(png), [[4.0, 4.0, 0.0]], [str(png)], mask=str(mask))
    assert np.isfinite(res.matches[0].point_lps_mm).all()
    monkeypatch.setattr(io, "_warned_no_spacing", False)
    with caplog.at_level(logging.WARNING, logger="samembed"):
        for _ in range(3):
            io.read_image(png)
    said = [r.getMessage() for r in caplog.records if "carries no pixel spacing" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("(said once: the same holds for every such picture read after it)")


@pytest.mark.needs_data
def test_a_refined_match_stays_on_the_target_when_the_true_match_lies_beyond_its_edge(a_hand_matcher):
    """``--refine`` transfers a click by a local affine fitted to its seeds' matches; near the edge of a target
    cropped through the hand, that extrapolation reported points outside the target (57 px beyond its last column)
    with a score read at another point (a review). Such a refinement now keeps the plain match."""
    from samembed.io import image_from_sitk

    im = sitk.ReadImage(str(data_file("xray", "hand_dha37", "images", "3143.jpg")))
    im = sitk.VectorIndexSelectionCast(im, 0) if im.GetNumberOfComponentsPerPixel() > 1 else im
    im = sitk.Cast(im, sitk.sitkFloat32)
    im.SetSpacing((0.2, 0.2))
    ref = sitk.Image([660, 960], sitk.sitkFloat32)
    ref.SetSpacing((0.2, 0.2))
    ref.SetOrigin((0.13, 0.27))  # the same hand, shifted by a fraction of a pixel and cut off at column 660
    src = image_from_sitk(im, "source")
    tgt = image_from_sitk(sitk.Resample(im, ref, sitk.Transform(), sitk.sitkLinear, 0.0), "cropped")
    clicks = src.grid.index_to_lps(np.array([[674.0, 500.0], [650.0, 500.0], [674.0, 300.0]]))
    res = a_hand_matcher.match(src, clicks, [tgt], options=MatchOptions(refine=True, polish=False))
    found = np.array([m.point_lps_mm[:2] for m in res.matches])
    assert tgt.grid.contains_lps(found).all(), np.round(tgt.grid.lps_to_index(found), 1)


@pytest.mark.needs_data
def test_a_match_the_polish_did_not_move_reports_no_correlation(a_hand_matcher):
    """``Match.ncc`` is the correlation where the match is reported: a match the polish ran on but left where it
    was (its peak below ``polish_min_ncc``, or off the allowed voxels) carried the correlation of the position thrown
    away, so tables showed ``polished=false`` beside ``ncc=0.988`` (a review)."""
    im = read_image(data_file("xray", "hand_dha37", "images", "3143.jpg"))
    noisy = Image(im.array + np.random.default_rng(0).normal(0.0, 8.0, im.array.shape).astype(im.array.dtype),
                  im.grid, "noisy")  # a correlation below 1 everywhere
    clicks = im.grid.index_to_lps(np.array([[300.0, 500.0], [400.0, 700.0]]))
    kept = a_hand_matcher.match(im, clicks, [noisy], options=MatchOptions(polish_min_ncc=1.0)).matches
    assert not any(m.polished for m in kept) and all(np.isnan(m.ncc) for m in kept), [(m.polished, m.ncc) for m in kept]
    moved = a_hand_matcher.match(im, clicks, [noisy], options=MatchOptions(polish_min_ncc=0.5)).matches
    assert all(m.polished == np.isfinite(m.ncc) for m in moved) and any(m.polished for m in moved)
