"""Preprocessing: official intensity mapping, corner-aligned resampling, exact point mapping (oblique too)."""

from __future__ import annotations

import numpy as np
import pytest

from samembed.image import Grid, Image
from samembed.preprocess import PreprocessConfig, detect_modality, map_intensity, preprocess


def test_ct_mapping_follows_the_official_recipe():
    out = map_intensity(np.array([-2000.0, -1024.0, 0.0, 3071.0, 5000.0]), "ct")
    np.testing.assert_allclose(out, [-50.0, -50.0, 1024 * 255 / 4095 - 50, 205.0, 205.0], atol=1e-4)


def test_mri_mapping_uses_percentiles():
    a = np.linspace(0, 1000, 100001)
    out = map_intensity(a, "mri")
    assert out.min() == pytest.approx(-50.0, abs=0.1) and out.max() == pytest.approx(205.0, abs=0.5)


def test_modality_is_detected_from_the_value_range():
    ct = Image.from_array(np.r_[np.full(500, -1000), np.full(500, 40)].reshape(10, 10, 10).astype(np.int16))
    mr = Image.from_array(np.linspace(0, 800, 1000).reshape(10, 10, 10))
    xr = Image.from_array(np.linspace(0, 255, 100).reshape(10, 10))
    assert (detect_modality(ct), detect_modality(mr), detect_modality(xr)) == ("ct", "mri", "xray")


def test_the_modality_check_by_counting_gives_numpys_percentile_answer():
    """``detect_modality``'s percentile test decides by counting for integer voxels and computes the percentile only
    when the limit falls between the two order statistics: the answer of ``np.percentile(values, q) <= limit`` for
    every type, size (one value, ranks at the ends), percentile and limit, NaN in floats included, on 16000 cases
    drawn near the limit."""
    from samembed.preprocess import _percentile_at_most

    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(1000):
        size = int(rng.integers(1, 300))
        dtype = [np.int16, np.int32, np.uint8, np.uint16, np.float32, np.float64][trial % 6]
        signed = np.dtype(dtype).kind != "u"
        pool = np.array([-1000, -501, -500, -499, 0, 3] if signed else [0, 1, 2, 3, 200])
        values = (rng.choice(pool, size) if trial % 2 else rng.integers(*((-1100, 300) if signed else (0, 255)), size))
        values = values.astype(dtype)
        if np.dtype(dtype).kind == "f" and trial % 5 == 0:
            values[rng.integers(0, size)] = np.nan
        for q in (0.0, 0.5, 50.0, 100.0):
            for limit in (-500.0, -1000.0, 0.0, 2.0):
                assert _percentile_at_most(values, q, limit) == bool(np.percentile(values, q) <= limit), \
                    (dtype, size, q, limit)
                checked += 1
    assert checked == 16000


def test_resampling_is_corner_aligned_with_ceil_sizes():
    arr = np.random.default_rng(0).normal(size=(10, 33, 31)).astype(np.float32) * 100
    img = Image.from_array(arr, spacing_mm=(0.7, 0.7, 2.5), origin_lps_mm=(1.0, 2.0, 3.0))
    prep = preprocess(img, PreprocessConfig(spacing_mm=2.0), modality="mri")
    assert prep.array.shape == (13, 12, 11)  # ceil(10*2.5/2), ceil(33*.7/2), ceil(31*.7/2)
    np.testing.assert_allclose(prep.grid.origin_lps_mm, [1.0 + 0.65, 2.0 + 0.65, 3.0 - 0.25], atol=1e-5)
    # the first voxel's corner coincides with the input's first corner
    corner_in = img.grid.index_to_lps([[-0.5, -0.5, -0.5]])
    corner_out = prep.grid.index_to_lps([[-0.5, -0.5, -0.5]])
    np.testing.assert_allclose(corner_in, corner_out, atol=1e-5)


def test_an_oblique_flipped_image_maps_points_exactly_through_preprocessing():
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, -1, 0], [-np.sin(a), 0, np.cos(a)]])
    arr = np.zeros((20, 30, 40), np.float32)
    arr[12, 7, 31] = 1000.0  # a bright voxel
    img = Image.from_array(arr - 1000, spacing_mm=(1.0, 1.2, 2.0), origin_lps_mm=(-5, 7, 11), direction=rot)
    p_lps = img.grid.index_to_lps([[31, 7, 12]])[0]
    # air outside the image: the grid, 25 degrees oblique, is resampled onto the LPS axes, whose corners lie outside
    # it (with the official fill, 0 HU, they would be as bright as the spot)
    prep = preprocess(img, PreprocessConfig(spacing_mm=1.0, fill="air"), modality="ct")
    ijk = prep.grid.lps_to_index(p_lps[None])[0]
    peak = np.array(np.unravel_index(np.argmax(prep.array), prep.array.shape))[::-1]
    assert np.abs(ijk - peak).max() <= 1.0  # within one model voxel of the resampled bright spot
    # grid round trip is exact
    np.testing.assert_allclose(prep.grid.index_to_lps(prep.grid.lps_to_index(p_lps[None])), p_lps[None], atol=1e-9)


def test_derived_grids_place_output_voxels_at_block_centres():
    g = Grid((8, 8, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    d = g.derived((2, 2, 2), (4, 4, 4))
    np.testing.assert_allclose(d.origin_lps_mm, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(d.spacing_mm, [4.0, 4.0, 4.0])


@pytest.mark.parametrize("direction", [np.diag([-1.0, -1.0, 1.0]),  # stored RAS, as many NIfTI files
                                       np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]),  # permuted and flipped
                                       None])  # oblique: every voxel is mapped
def test_the_voxels_inside_the_image_are_the_same_whether_mapped_per_axis_or_voxel_by_voxel(direction):
    if direction is None:
        a = np.deg2rad(25)
        direction = np.array([[np.cos(a), 0, np.sin(a)], [0, -1, 0], [-np.sin(a), 0, np.cos(a)]])
    img = Image.from_array(np.zeros((23, 30, 41), np.float32) - 1000, spacing_mm=(0.9, 1.3, 2.5),
                           origin_lps_mm=(-5, 7, 11), direction=direction)
    prep = preprocess(img, PreprocessConfig(spacing_mm=2.0), modality="ct")
    # the engine's local grid: stride 2, padded beyond the image so that some centres fall outside it
    local = prep.grid.derived((2, 2, 2), tuple(s // 2 + 3 for s in prep.array.shape))
    idx = np.indices(local.shape_zyx).reshape(3, -1).T[:, ::-1]
    dense = img.grid.contains_index(img.grid.lps_to_index(local.index_to_lps(idx)), margin=0.5)
    got = local.centres_inside(img.grid, margin=0.5)
    assert got.shape == local.shape_zyx
    assert 0 < dense.sum() < dense.size  # both inside and outside voxels are tested
    np.testing.assert_array_equal(got.reshape(-1), dense)


def scipy_body_mask(a: np.ndarray, threshold: float) -> np.ndarray:
    """The body mask as it was written with scipy.ndimage (the reference for the engine's scipy-free one)."""
    from scipy import ndimage

    from samembed.preprocess import BODY_PART_MIN_SHARE, BODY_PART_MIN_THICKNESS

    m = a > threshold
    lab, n = ndimage.label(m)
    if n > 1:  # the largest component, and the others as large and thick as a limb
        sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
        boxes = ndimage.find_objects(lab)
        thin = [min(s.stop - s.start for s in box) for box in boxes]
        big = int(np.argmax(sizes))
        keep = [k for k in range(n) if k == big or (sizes[k] >= BODY_PART_MIN_SHARE * sizes[big]
                                                    and thin[k] >= BODY_PART_MIN_THICKNESS * thin[big])]
        m = np.isin(lab, np.array(keep) + 1)
    m = ndimage.binary_closing(m, iterations=2)
    m = np.stack([ndimage.binary_fill_holes(s) for s in m]) if m.ndim == 3 else ndimage.binary_fill_holes(m)
    return ndimage.binary_dilation(m, iterations=2)


def test_the_body_mask_and_its_steps_equal_scipy_ndimage_on_real_scans(data_dir):
    """Face-connected components, closing, per-slice hole filling and dilation, without scipy, on a head-and-neck
    CT, a chest CT (lungs are holes) and a hand radiograph (2D), at the engine's body-mask grid (every 2nd voxel)."""
    from scipy import ndimage

    from samembed.io import read_image
    from samembed.preprocess import body_mask_array, dilate_faces, erode_faces, fill_holes_per_slice, label_faces

    from ..conftest import data_file

    hands = sorted((data_dir / "xray" / "hand_dha37" / "images").glob("*.jpg"))
    paths = [data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz"), data_file("ct", "lidc", "LIDC-IDRI-0001_ct.nii.gz")]
    for path in paths + hands[:1]:
        image = read_image(path)
        prep = preprocess(image, PreprocessConfig(spacing_mm=2.0 if image.ndim == 3 else 0.5))
        a = prep.array[(slice(None, None, 2),) * prep.array.ndim]
        threshold = (-500.0 + 1024.0) * 255.0 / 4095.0 - 50.0 if prep.modality == "ct" else float(np.percentile(a, 5.0))
        np.testing.assert_array_equal(body_mask_array(a, prep.modality), scipy_body_mask(a, threshold), err_msg=path.name)
        for above in (threshold, 100.0):  # the body; bone (many small parts and holes)
            m = a > above
            lab, n = label_faces(m)
            ref_lab, ref_n = ndimage.label(m)
            assert n == ref_n and np.array_equal(lab > 0, ref_lab > 0), path.name
            assert sorted(np.bincount(lab.ravel())[1:]) == sorted(np.bincount(ref_lab.ravel())[1:]), path.name
            np.testing.assert_array_equal(dilate_faces(m, 2), ndimage.binary_dilation(m, iterations=2))
            np.testing.assert_array_equal(erode_faces(m, 2), ndimage.binary_erosion(m, iterations=2))
            filled = np.stack([ndimage.binary_fill_holes(s) for s in m]) if m.ndim == 3 else ndimage.binary_fill_holes(m)
            assert (filled & ~m).any(), f"{path.name}: no hole to fill"
            np.testing.assert_array_equal(fill_holes_per_slice(m), filled, err_msg=path.name)


@pytest.mark.parametrize("fill", ["air", "zero"])
def test_a_ct_padded_by_its_resampling_equals_the_padded_resampled_ct(fill):
    """The engine pads CT inputs to the network's multiple in the resampling itself (no second copy): the added
    voxels lie beyond the image, so they take the fill value, exactly as padding after resampling gives them."""
    from samembed.preprocess import pad_to_multiple

    rng = np.random.default_rng(0)
    arr = rng.integers(-1100, 3200, size=(37, 41, 29)).astype(np.int16)  # beyond the clip range on both sides
    img = Image.from_array(arr, spacing_mm=(0.9, 1.3, 2.7), name="ct")
    cfg = PreprocessConfig(fill=fill)
    plain = preprocess(img, cfg, "ct")
    padded = preprocess(img, cfg, "ct", pad_multiple_zyx=(8, 8, 8))
    assert padded.array.shape == tuple(-(-n // 8) * 8 for n in plain.array.shape) != plain.array.shape
    np.testing.assert_array_equal(padded.array, pad_to_multiple(plain.array, (8, 8, 8), plain.fill_value))
    assert padded.grid.shape_zyx == padded.array.shape
    np.testing.assert_array_equal(padded.grid.origin_lps_mm, plain.grid.origin_lps_mm)
    mri = preprocess(img, cfg, "mri", pad_multiple_zyx=(8, 8, 8))  # percentiles of the image only: not padded
    assert mri.array.shape == plain.array.shape


def test_a_ct_is_mapped_in_its_resampled_array_with_the_values_of_a_new_array(monkeypatch):
    """CT intensities are mapped in the resampling's own output (no second volume-sized array): the values are
    those of SimpleITK's resampling mapped into a new array, bit for bit; the array is writable, and the input image
    is not modified."""
    import SimpleITK as sitk

    import samembed.preprocess as pp
    from samembed.io import image_to_sitk

    made, real = [], pp.resample_per_axis

    def resample(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pp, "resample_per_axis", resample)
    rng = np.random.default_rng(1)
    arr = rng.integers(-1500, 3500, size=(23, 31, 27)).astype(np.int16)  # beyond the clip range on both sides
    img = Image.from_array(arr, spacing_mm=(0.8, 1.1, 2.5), name="ct")
    before = img.array.copy()
    for fill in ("air", "zero"):
        prep = preprocess(img, PreprocessConfig(fill=fill), "ct", pad_multiple_zyx=(8, 8, 8))
        value = -1024.0 if fill == "air" else 0.0
        ref = sitk.GetArrayFromImage(pp.resample_to_spacing(image_to_sitk(img), 2.0, value, (8, 8, 8)))
        np.testing.assert_array_equal(prep.array, map_intensity(ref, "ct"))
        assert prep.array.dtype == np.float32 and prep.array.flags.writeable
        assert prep.array is made[-1][0], "mapped in a new array, not the resampled one"
        np.testing.assert_array_equal(img.array, before)


def _resampling_cases(data_dir):
    """(name, SimpleITK image oriented as preprocess orients it): real CTs at their own spacings (up- and
    downsampled to 2 mm), a radiograph, and small synthetic volumes of several pixel types with odd spacings, an
    oblique flipped direction, samples exactly on the far edge of z and y (at the origin 0 SimpleITK fills them, as
    the per-axis resampling does) and a single slice."""
    from samembed.io import image_to_sitk, read_image
    from samembed.preprocess import _orient_lps

    paths = [data_dir / "ct" / "openkbp" / "ct" / "pt_202_ct.nii.gz", data_dir / "ct" / "lidc" / "LIDC-IDRI-0001_ct.nii.gz",
             data_dir / "ct" / "popi" / "popi_00_ct.nii.gz", data_dir / "xray" / "hand_dha37" / "images" / "3187.jpg"]
    for path in paths:
        assert path.exists(), f"{path} is missing from the shared data"
        yield path.name, _orient_lps(image_to_sitk(read_image(path)))
    rng = np.random.default_rng(7)
    a, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    for shape, spacing, direction, dtype, high in (
            ((17, 29, 23), (0.7, 1.3, 3.1), np.eye(3), np.int16, 2500),
            ((9, 14, 11), (2.9, 0.45, 1.1), a @ np.diag([1.0, -1.0, 1.0]), np.int32, 2_000_000_000),
            ((9, 6, 5), (1.0, 1.0, 1.0), np.eye(3), np.uint16, 65535),  # odd sizes: samples exactly on the far edge
            ((1, 40, 37), (0.9, 0.9, 5.0), np.eye(3), np.float64, 1e6),
            ((3, 12, 10), (0.3, 0.35, 2.5), np.eye(3), np.uint8, 255)):
        arr = rng.integers(0 if np.dtype(dtype).kind == "u" else -1200, high, size=shape).astype(dtype)
        img = Image(arr, Grid(shape, spacing, (0.0, 0.0, 0.0), direction), "synthetic")
        yield f"synthetic {np.dtype(dtype).name} {shape} at {spacing}", _orient_lps(image_to_sitk(img))


def test_the_per_axis_resampling_gives_simpleitks_voxels_and_grid(data_dir):
    """The preprocessing's per-axis linear resampling against SimpleITK's ResampleImageFilter (the reference): the
    same grid, and the same float32 voxels, all but a few in a million bit for bit and those within 1e-6 relative
    (SimpleITK places each sample through physical space in double), the fill outside the image and in the padding
    included."""
    import SimpleITK as sitk

    from samembed.preprocess import resample_per_axis, resample_to_spacing

    for name, img in _resampling_cases(data_dir):
        d = img.GetDimension()
        small = img.GetNumberOfPixels() < 4_000_000  # the real CTs at the model spacing only (test time)
        for spacing, pad in ((2.0, (8,) * d), (1.3, None))[: 2 if small else 1]:
            ref_img = resample_to_spacing(img, spacing, -3.5, pad)
            ref = sitk.GetArrayFromImage(ref_img)
            out, grid = resample_per_axis(img, spacing, -3.5, pad)
            assert out.dtype == np.float32 and out.shape == ref.shape == grid.shape_zyx, name
            np.testing.assert_array_equal(grid.spacing_mm, ref_img.GetSpacing())
            np.testing.assert_array_equal(grid.origin_lps_mm, ref_img.GetOrigin())
            np.testing.assert_array_equal(grid.direction.ravel(), ref_img.GetDirection())
            differ = out != ref
            assert differ.sum() <= max(2, out.size // 100_000), f"{name} at {spacing} mm: {differ.sum()} voxels differ"
            np.testing.assert_allclose(out[differ], ref[differ], rtol=1e-6, atol=1e-6, err_msg=name)
            assert pad is None or (ref == -3.5).any(), f"{name}: no voxel outside the image to compare"


def test_downsampling_along_y_reads_only_the_rows_it_needs_in_blocks_of_any_size(monkeypatch):
    """Where y is downsampled, the per-axis resampling interpolates along x only the input rows that are some output
    row's neighbour; in one block or in blocks of a few rows (a large slice), the same voxels bit for bit, and
    SimpleITK's."""
    import SimpleITK as sitk

    import samembed.preprocess as pp
    from samembed.io import image_to_sitk

    rng = np.random.default_rng(11)
    arr = rng.integers(-1200, 2500, size=(13, 97, 41)).astype(np.int16)
    img = image_to_sitk(Image(arr, Grid(arr.shape, (0.6, 0.35, 1.7), (3.0, -9.5, 21.0), np.eye(3)), "thin"))
    whole, _ = pp.resample_per_axis(img, 2.0, -3.5)
    lower, upper, _, _ = pp._axis_samples(97, whole.shape[1], 2.0 / 0.35)
    _, _, read, _, _ = pp._rows_read(lower, upper, 0, whole.shape[1])
    assert not isinstance(read, slice) and len(read) < int(upper[-1]) - int(lower[0]) + 1, "no row left out"
    real_rows_read = pp._rows_read

    def every_row(lo, hi, a, b):  # every input row from the first to the last read, as before (a view)
        a, b, _, lower, upper = real_rows_read(lo, hi, a, b)
        first = int(lo[a])
        return a, b, slice(first, int(hi[b - 1]) + 1), lo[a:b] - first, hi[a:b] - first

    monkeypatch.setattr(pp, "_rows_read", every_row)
    all_rows, _ = pp.resample_per_axis(img, 2.0, -3.5)
    np.testing.assert_array_equal(whole, all_rows)  # the same arithmetic on the rows used: bit for bit
    monkeypatch.setattr(pp, "_rows_read", real_rows_read)
    monkeypatch.setattr(pp, "_BLOCK_ELEMENTS", 3 * whole.shape[2] * 6)  # blocks of 3 output rows
    blocked, _ = pp.resample_per_axis(img, 2.0, -3.5)
    np.testing.assert_array_equal(blocked, whole)
    ref = sitk.GetArrayFromImage(pp.resample_to_spacing(img, 2.0, -3.5))
    np.testing.assert_allclose(whole, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "spacing", "rounds_inside"), [
    ((7, 64, 64), (0.9765625, 0.9765625, 3.0), (-277.7, 13.3, 250.9)),  # the last slice
    ((40, 37), (3.0, 2.5), (5.5, -7.25))])  # a radiograph's last column
def test_a_sample_exactly_on_the_far_edge_is_filled_whatever_the_origin(shape, spacing, rounds_inside):
    """An output sample exactly on the image's far edge (3 mm spacing, an odd count, a 2 mm grid) is filled, for
    every origin. SimpleITK decides it by its double rounding (through physical space, and incrementally along each
    row): the last slice here is filled for most origins and interpolated for some, the radiograph's last column
    interpolated for all; every other voxel is SimpleITK's for every origin."""
    import SimpleITK as sitk

    from samembed.io import image_to_sitk
    from samembed.preprocess import resample_per_axis, resample_to_spacing

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 65535, size=shape).astype(np.uint16)
    d = len(shape)
    edge = (-1,) if d == 3 else (slice(None), -1)  # the sample on the edge: the last z slice, or the last x column
    rounded_inside = 0
    # origin 0, one where SimpleITK's rounding puts the edge sample inside, and random ones
    for origin in [(0.0,) * d, rounds_inside] + [tuple(rng.uniform(-300, 300, d)) for _ in range(30)]:
        img = image_to_sitk(Image(arr, Grid(shape, spacing, origin, np.eye(d)), "edge"))
        ref = sitk.GetArrayFromImage(resample_to_spacing(img, 2.0, -3.5))
        out, _ = resample_per_axis(img, 2.0, -3.5)
        assert (out[edge] == -3.5).all(), f"origin {origin}: the edge sample is not filled"
        inner = np.ones(out.shape, bool)
        inner[edge] = False
        np.testing.assert_allclose(out[inner], ref[inner], rtol=1e-6, err_msg=f"origin {origin}")
        rounded_inside += int((ref[edge] != -3.5).any())
    assert rounded_inside, "SimpleITK filled the edge sample for every origin: the case shows no difference to test"


def test_an_mri_and_a_radiograph_are_preprocessed_as_from_simpleitks_resampling():
    """The percentile mappings (MRI, radiographs) read the whole resampled image: ``preprocess`` gives what
    SimpleITK's resampling mapped the same way gives, so no fill or value moved by the per-axis resampling shifts
    them."""
    import SimpleITK as sitk

    from samembed.io import image_to_sitk
    from samembed.preprocess import _orient_lps, resample_to_spacing

    rng = np.random.default_rng(5)
    for modality, shape, spacing in (("mri", (23, 40, 33), (0.9, 1.1, 3.3)), ("xray", (70, 55), (0.7, 0.45))):
        arr = rng.gamma(2.0, 300.0, size=shape).astype(np.float32)
        img = Image(arr, Grid(shape, spacing, (-8.5, 3.0, 11.0)[: len(shape)], np.eye(len(shape))), modality)
        prep = preprocess(img, PreprocessConfig(fill="zero"), modality)
        ref = sitk.GetArrayFromImage(resample_to_spacing(_orient_lps(image_to_sitk(img)), 2.0, 0.0))
        np.testing.assert_allclose(prep.array, map_intensity(ref, modality), rtol=1e-6, atol=1e-5)


def test_per_axis_resampling_refuses_what_it_cannot_take():
    """A vector image is refused with a message that says what the resampling takes."""
    import SimpleITK as sitk

    from samembed.errors import InputError
    from samembed.preprocess import resample_per_axis

    rgb = sitk.Image([5, 6], sitk.sitkVectorUInt8, 3)
    with pytest.raises(InputError, match="scalar 2D or 3D images"):
        resample_per_axis(rgb, 2.0, 0.0)


def _directions():
    """Index-axis directions (columns) of the kinds scanners write: LPS, RAS, sagittal and coronal acquisitions
    (axes permuted and flipped), and two of them tilted by 7 and 20 degrees."""
    def tilt(deg: float, axis: int) -> np.ndarray:
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        r = np.eye(3)
        a, b = [k for k in range(3) if k != axis]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        return r
    sagittal = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    return [("LPS", np.eye(3)), ("RAS", np.diag([-1.0, -1.0, 1.0])), ("sagittal", sagittal), ("coronal", coronal),
            ("RAS tilted 7 degrees", tilt(7.0, 0) @ np.diag([-1.0, -1.0, 1.0])),
            ("sagittal tilted 20 degrees", tilt(20.0, 2) @ sagittal)]


@pytest.mark.parametrize(("name", "direction"), _directions())
def test_orienting_in_numpy_gives_simpleitks_dicomorient(name, direction):
    """``oriented_lps`` (a view of the voxels) against ``SimpleITK.DICOMOrient(..., "LPS")``: the same voxels, spacing
    and direction, the origin to double rounding; and the preprocessed input equals the one through SimpleITK."""
    import SimpleITK as sitk

    import samembed.preprocess as pp
    from samembed.io import image_to_sitk

    rng = np.random.default_rng(11)
    arr = rng.integers(-1100, 2000, size=(13, 21, 17)).astype(np.int16)
    img = Image(arr, Grid(arr.shape, (0.8, 1.3, 2.7), (-31.5, 12.25, 80.0), direction), name)
    view = pp.oriented_lps(img)
    ref = sitk.DICOMOrient(image_to_sitk(img), "LPS")
    assert view is not None
    np.testing.assert_array_equal(view.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_array_equal(view.grid.spacing_mm, ref.GetSpacing())
    np.testing.assert_allclose(view.grid.direction.ravel(), ref.GetDirection(), atol=1e-15)
    np.testing.assert_allclose(view.grid.origin_lps_mm, ref.GetOrigin(), rtol=0, atol=1e-9)
    if name in ("LPS", "RAS"):  # no permutation: a view of the image's own voxels
        assert np.shares_memory(view.array, arr)
    prep = preprocess(img, PreprocessConfig(fill="air"), "ct", pad_multiple_zyx=(8, 8, 8))
    if pp.obliquity_deg(direction) > pp.OBLIQUE_LIMIT_DEG:  # the network's input lies on the LPS axes instead
        out = sitk.GetArrayFromImage(pp.resample_onto_lps_axes(image_to_sitk(img), 2.0, -1024.0, (8, 8, 8)))
        np.testing.assert_array_equal(prep.array, map_intensity(out, "ct"))
        np.testing.assert_array_equal(prep.grid.direction, np.eye(3))
        return
    out, grid = pp.resample_per_axis(ref, 2.0, -1024.0, (8, 8, 8))
    np.testing.assert_array_equal(prep.array, map_intensity(out, "ct"))
    assert prep.grid.same_as(grid, tol=1e-9)


def test_a_grid_more_oblique_than_the_limit_is_resampled_onto_the_lps_axes():
    """45 degrees between two axes: ``oriented_lps`` declines (which LPS axis each follows is no question of
    permuting), and ``preprocess`` resamples the image onto a grid along the LPS axes that holds the whole image (its
    voxels' outer corners), the voxels outside it at the fill value; a point keeps its voxel."""
    import SimpleITK as sitk

    import samembed.preprocess as pp
    from samembed.io import image_to_sitk

    c = np.sqrt(0.5)
    direction = np.array([[c, -c, 0.0], [c, c, 0.0], [0.0, 0.0, 1.0]])
    arr = np.full((9, 21, 20), -1000, np.int16)
    arr[4, 15, 3] = 1500  # a bright voxel
    img = Image(arr, Grid(arr.shape, (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), direction), "oblique")
    assert pp.oriented_lps(img) is None
    plane = Image(arr[0], Grid(arr.shape[1:], (1.0, 1.5), (0.0, 0.0), direction[:2, :2]), "2d")
    assert pp.oriented_lps(plane) is None  # a 2D grid, likewise
    flat = preprocess(plane, PreprocessConfig(fill="air", spacing_mm=1.0), "ct").grid  # onto x and y, all of it
    np.testing.assert_array_equal(flat.direction, np.eye(2))
    edges = flat.lps_to_index(plane.grid.index_to_lps(np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in
                                                                               plane.grid.size_ijk])).reshape(2, -1).T))
    assert edges.min() >= -0.5 - 1e-6 and np.all(edges.max(0) <= np.array(flat.size_ijk) - 0.5 + 1e-6)
    assert pp.obliquity_deg(direction) == pytest.approx(45.0)
    prep = preprocess(img, PreprocessConfig(fill="air", spacing_mm=1.0), "ct")
    out = sitk.GetArrayFromImage(pp.resample_onto_lps_axes(image_to_sitk(img), 1.0, -1024.0))
    np.testing.assert_array_equal(prep.array, map_intensity(out, "ct"))
    np.testing.assert_array_equal(prep.grid.direction, np.eye(3))
    corners = img.grid.index_to_lps(np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in img.grid.size_ijk])).reshape(3, -1).T)
    inside = prep.grid.lps_to_index(corners)
    assert inside.min() >= -0.5 - 1e-6 and np.all(inside.max(0) <= np.array(prep.grid.size_ijk) - 0.5 + 1e-6)
    bright = prep.grid.lps_to_index(img.grid.index_to_lps([[3, 15, 4]]))[0]
    peak = np.array(np.unravel_index(np.argmax(prep.array), prep.array.shape))[::-1]
    assert np.abs(bright - peak).max() <= 1.0
    assert prep.array.min() == map_intensity(np.array([-1024.0], np.float32), "ct")[0]  # the corners outside: air


@pytest.mark.parametrize(("degrees", "onto_lps"), [(0.0, False), (3.0, False), (7.0, True), (20.0, True)])
def test_only_grids_more_oblique_than_the_limit_leave_their_axes(degrees, onto_lps):
    """A grid tilted by a few degrees keeps its own axes (permuted and flipped onto LPS: the exact per-axis
    resampling); beyond :data:`OBLIQUE_LIMIT_DEG` the input lies on the LPS axes, and the cache key says so."""
    import samembed.preprocess as pp

    t = np.radians(degrees)
    direction = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]]) @ np.diag([-1.0, -1.0, 1.0])
    assert pp.obliquity_deg(direction) == pytest.approx(degrees, abs=1e-6)
    arr = np.random.default_rng(3).integers(-1000, 1000, size=(10, 12, 14)).astype(np.int16)
    img = Image(arr, Grid(arr.shape, (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), direction), "tilted")
    prep = preprocess(img, PreprocessConfig(fill="air"), "ct")
    assert np.allclose(prep.grid.direction, np.eye(3)) == (onto_lps or degrees == 0.0)
    if not onto_lps:  # the image's own axes, flipped onto LPS
        np.testing.assert_allclose(np.abs(prep.grid.direction), np.abs(pp.oriented_lps(img).grid.direction))


@pytest.mark.needs_data
def test_real_cts_oriented_in_numpy_give_the_input_through_simpleitk(data_dir):
    """Two shared CTs (their grids along the LPS axes, as SimpleITK reads them) preprocessed with numpy orientation
    equal the input through SimpleITK's DICOMOrient, voxel for voxel."""
    import SimpleITK as sitk

    import samembed.preprocess as pp
    from samembed.io import image_to_sitk, read_image

    for path in (data_dir / "ct" / "openkbp" / "ct" / "pt_202_ct.nii.gz", data_dir / "ct" / "popi" / "popi_00_ct.nii.gz"):
        img = read_image(path)
        assert pp.oriented_lps(img) is not None, f"{path.name}: expected an axis-aligned grid"
        prep = preprocess(img, PreprocessConfig(fill="air"), "ct", pad_multiple_zyx=(8, 8, 8))
        out, grid = pp.resample_per_axis(sitk.DICOMOrient(image_to_sitk(img), "LPS"), 2.0, -1024.0, (8, 8, 8))
        np.testing.assert_array_equal(prep.array, map_intensity(out, "ct"), err_msg=path.name)
        assert prep.grid.same_as(grid, tol=1e-9), path.name


def test_which_centres_lie_inside_an_oblique_grid_is_the_same_plane_by_plane_as_all_at_once():
    """``Grid.centres_inside`` of a grid along the LPS axes over an oblique one (the oblique route's validity mask)
    maps a few planes at a time; each voxel's answer is the mapping of every voxel at once, over several blocks of
    planes and grids of random orientations."""
    rng = np.random.default_rng(5)
    for _ in range(4):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        other = Grid(tuple(int(v) for v in rng.integers(20, 60, 3)), rng.uniform(0.7, 3.0, 3), rng.uniform(-40, 40, 3), q)
        spacing = rng.uniform(1.0, 2.0, 3)
        centre = other.index_to_lps((np.array(other.size_ijk) - 1) / 2)[0]
        # 90 x 80 x 70 voxels around the other's centre (2^18 voxels are fewer than 8 planes: several blocks)
        mine = Grid((70, 80, 90), spacing, centre - spacing * np.array([90, 80, 70]) / 2, np.eye(3))
        idx = np.indices(mine.shape_zyx).reshape(3, -1).T[:, ::-1]
        every = other.contains_index(other.lps_to_index(mine.index_to_lps(idx)), 0.5).reshape(mine.shape_zyx)
        got = mine.centres_inside(other, margin=0.5)
        assert 0 < every.sum() < every.size
        np.testing.assert_array_equal(got, every)


def test_a_body_of_two_parts_keeps_both_and_leaves_the_table_out(data_dir):
    """Only the largest part above air was body: in a scan of two legs, or of an arm beside the trunk, the other
    part could not be searched, and its points were matched into the kept part (468 mm off, a review). A part as
    large and thick as a limb is body now; the scanner's table (a few mm thick) is not."""
    from samembed.io import read_image
    from samembed.preprocess import body_mask_array

    from ..conftest import data_file

    image = read_image(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz"))
    prep = preprocess(image, PreprocessConfig(spacing_mm=2.0))
    a = prep.array[::2, ::2, ::2]
    air = float(a.min())
    gap = np.full(a.shape[:2] + (6,), air, dtype=a.dtype)
    two = np.concatenate([a, gap, a[:, :, ::-1]], axis=2)  # the same head twice, side by side, 6 voxels of air between
    mask = body_mask_array(two, "ct")
    width = a.shape[2]
    left, right = mask[:, :, :width], mask[:, :, width + 6:]
    assert left.sum() > 0 and np.array_equal(left, right[:, :, ::-1])
    # a table: a slab 1 voxel thick under the body, as long and wide as it: left out
    body = body_mask_array(a, "ct")
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    table = np.concatenate([a, np.full((a.shape[0], 3, a.shape[2]), air, dtype=a.dtype)], axis=1)
    table[:, rows.max() + 2, :] = a.max()
    with_table = body_mask_array(table, "ct")
    assert np.array_equal(with_table[:, : a.shape[1]], body) and not with_table[:, rows.max() + 2].any()


@pytest.mark.needs_data
def test_a_ct_stored_without_its_rescale_is_told_and_not_steered_to_modality_ct(caplog):
    """A CT stored as HU + 1024 (uint16, no rescale in its header) is taken for MRI, and the note said to give
    --modality ct, which maps the stored values as HU: 118 mm of mean error (a review). Given as CT it is now warned
    of; taken for MRI, the note says to subtract 1024 first. A CT in HU cropped inside the body (none below 0 either)
    is not called offset."""
    import logging

    from samembed import Matcher
    from samembed.io import read_image
    from samembed.options import MatchOptions
    from samembed.preprocess import looks_like_offset_ct

    from ..conftest import data_file

    ct = read_image(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz"))
    stored = Image((ct.array.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16), ct.grid, "stored.nii.gz")
    crop = Image(ct.array.clip(0, None), ct.grid, "crop.nii.gz")  # in HU, none below 0 (as a crop inside the body)
    assert looks_like_offset_ct(stored) and not looks_like_offset_ct(ct) and not looks_like_offset_ct(crop)
    point = ct.grid.index_to_lps(np.array([[64.0, 64.0, 60.0]]))
    with caplog.at_level(logging.WARNING, logger="samembed"):
        Matcher("random:sam-lite", device="cpu", modality="ct").match(ct, point, [stored],
                                                                      options=MatchOptions(polish=False))
    said = [r.getMessage() for r in caplog.records if "stored as HU + 1024" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("stored.nii.gz: given as CT (--modality ct)") and "subtract 1024" \
        in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samembed"):
        res = Matcher("random:sam-lite", device="cpu").match(ct, point, [stored], options=MatchOptions(polish=False))
    note = next(n for n in res.notes if "taken for" in n)
    assert "if stored.nii.gz is a CT whose values start at 0 because it was stored as HU + 1024" in note, note
    assert "subtract 1024 first" in note


def test_a_float_image_of_a_small_range_keeps_its_contrast():
    """The official recipe's whole units, applied to any image not found to be CT, squeezed a float image of a small
    range (an attenuation map in 1/mm: [-50, -30] of the [-50, 205] mapped; 1e-6 units: constant) (a review:
    between patients 15 -> 24-68 mm). Such an image keeps its own range; a range of 100 or more is mapped as before."""
    from samembed.preprocess import map_intensity

    rng = np.random.default_rng(0)
    mu = (rng.random((20, 30, 30)) * 0.06).astype(np.float32)  # 0-0.06 /mm
    for scaled in (mu, mu * 1e-6, mu * 30 - 1):
        out = map_intensity(scaled, "mri")
        lo, hi = np.percentile(out, [1, 99])
        assert lo < -40 and hi > 195, (float(lo), float(hi))
    big = (rng.random((20, 30, 30)) * 1500).astype(np.float32)  # an MRI's units: the official recipe, as before
    p_lo, p_hi = np.percentile(big, (0.2, 99.8))
    expected = (np.clip(big, p_lo, p_hi) - int(p_lo)) * (255.0 / (int(p_hi) - int(p_lo))) - 50.0
    np.testing.assert_array_equal(map_intensity(big, "mri"), expected.astype(np.float32))
