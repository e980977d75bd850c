"""The ``samembed`` command end to end, and its exit codes for every bad-input case."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from samembed.cli import main

from ..conftest import data_file, with_torch_threads


@pytest.fixture(scope="module")
def two_cts():
    return data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz"), data_file("ct", "openkbp", "ct", "pt_202_ct.nii.gz")


@pytest.fixture
def a_points_csv(tmp_path, two_cts):
    from samembed.io import read_image

    grid = read_image(two_cts[0]).grid
    pts = grid.index_to_lps([[64, 60, 70], [50, 70, 40]])
    path = tmp_path / "pts.csv"
    path.write_text("label,x,y,z\n" + "".join(f"{lab},{p[0]},{p[1]},{p[2]}\n" for lab, p in zip(["A", "B"], pts)))
    return path, pts


@pytest.mark.needs_data
def test_match_writes_a_csv_and_heatmaps(tmp_path, two_cts, a_points_csv, monkeypatch):
    """The source given as a target too (a scan matched to itself): its file is read once."""
    from samembed import api

    reads = []
    real_as_image = api.as_image

    def counted(image, *a, **k):  # files read (the engine calls it with images too)
        if isinstance(image, (str, os.PathLike)):
            reads.append(str(image))
        return real_as_image(image, *a, **k)

    monkeypatch.setattr(api, "as_image", counted)
    pts_path, _ = a_points_csv
    out = tmp_path / "matches.csv"
    code = main(["match", str(two_cts[0]), str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                 "--heatmap-dir", str(tmp_path / "hm"), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == ["A", "B", "A", "B"]
    assert list(rows[0]) == ["target", "label", "x", "y", "z", "score", "confident", "roundtrip_mm", "frame"]
    assert {r["frame"] for r in rows} == {"LPS"}
    assert all(-1 <= float(r["score"]) <= 1 for r in rows)
    # the decimals of propagate's matches.csv and of the Slicer module's export (samembed.io.csv_number)
    assert all(re.fullmatch(r"-?\d+\.\d{4}", r[k]) for r in rows for k in ("x", "y", "z", "score")), rows[0]
    # why a match is (not) confident: its round trip (mm), within the tolerance (two local voxels by default)
    trips = {c: [float(r["roundtrip_mm"]) for r in rows if r["confident"] == c] for c in ("true", "false")}
    assert all(t >= 0 for t in trips["true"] + trips["false"])
    assert max(trips["true"], default=0.0) <= min(trips["false"], default=np.inf), trips  # (rounded: may be equal)
    assert len(list((tmp_path / "hm").glob("*_heatmap.nii.gz"))) == 4
    assert sorted(reads) == sorted(map(str, two_cts)), "the command read a file twice"


@pytest.mark.needs_data
def test_the_heatmaps_are_written_after_the_engine_and_its_images_are_freed_and_as_they_were_before(
        tmp_path, two_cts, a_points_csv, monkeypatch):
    """Each heatmap is as large as its target, so the command frees the engine (its embeddings) and the images
    before it makes them: when the first one is written no embedding, engine or image of the match is alive. A
    heatmap rounded in place (the command's) is the same file as one rounded in a new array, and only the
    in-place call changes the array it is given."""
    import gc
    import inspect
    import threading

    from samembed import io
    from samembed.embedding import EmbeddingMaps
    from samembed.image import Image

    pts_path, _ = a_points_csv
    seen = []
    write = io.write_heatmap
    gc.collect()
    before = {id(o) for o in gc.get_objects() if type(o) is EmbeddingMaps or type(o).__name__ == "Matcher"}  # others'

    def holders(obj, ours: tuple) -> list[str]:
        """What refers to ``obj`` (frames by their function, dicts by their owners), but the scan's own lists
        ``ours``: the report of a failure."""
        me = inspect.currentframe()
        out = []
        for r in gc.get_referrers(obj):
            if any(r is o for o in ours) or r is me or (inspect.isframe(r) and r.f_code is spy.__code__):
                continue
            if inspect.isframe(r):
                out.append(f"frame {r.f_code.co_name} ({Path(r.f_code.co_filename).name}:{r.f_lineno})")
            elif isinstance(r, dict):
                owners = [type(x).__name__ for x in gc.get_referrers(r)
                          if not any(x is o for o in ours) and not inspect.isframe(x)]
                out.append(f"dict of {owners[:3]}")
            else:
                out.append(type(r).__name__)
        return out

    scanning = threading.Lock()

    def spy(image, path, in_place=False):
        # one writer thread at a time: a gc.collect() called while another thread collects returns at once, and a
        # scan's list then holds that collection's garbage alive, so that the other thread sees it too
        with scanning:
            gc.collect()
            objects = gc.get_objects()
            found = [o for o in objects  # (other heatmaps may be in flight)
                     if ((type(o) is EmbeddingMaps or type(o).__name__ == "Matcher") and id(o) not in before)  # type():
                     or (type(o) is Image and Path(o.name).name in {c.name for c in two_cts})]  # no proxy's __class__
            alive = [(getattr(o, "name", type(o).__name__), holders(o, (objects, found))) for o in found]
            del found, objects
        seen.append((alive, in_place))
        kept = image.array.copy()
        apart = tmp_path / "apart" / Path(path).name  # the same name: the compressed file may carry it
        apart.parent.mkdir(exist_ok=True)
        write(Image(kept.copy(), image.grid, image.name), apart)  # rounded in a new array: its input kept
        out = write(image, path, in_place=in_place)
        assert apart.read_bytes() == Path(path).read_bytes()
        assert in_place != np.array_equal(image.array, kept)  # only the in-place call rounded the given array
        return out

    monkeypatch.setattr(io, "write_heatmap", spy)
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(tmp_path / "m.csv"),
                 "--heatmap-dir", str(tmp_path / "hm"), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 0 and len(seen) == 2
    assert all(alive == [] and in_place for alive, in_place in seen), seen  # what is alive, and what holds it


@pytest.mark.needs_data
def test_with_several_targets_each_targets_heatmaps_are_written_as_it_finishes_and_then_let_go(
        tmp_path, two_cts, a_points_csv, monkeypatch, capsys):
    """An atlas into hundreds of targets: each target's dense maps (70 MB on the model's grid of a head CT) were
    held until every target was matched. Each target's heatmaps are now written before the next target is matched,
    and its result holds no map after; the files are the maps of a run with that target alone."""
    from samembed import api, io

    events = []
    write, match = io.write_heatmap, api.Matcher.match

    def writing(image, path, in_place=False):
        events.append(("write", Path(path).name))
        return write(image, path, in_place=in_place)

    def matching(self, *a, **k):
        events.append(("match", None))
        result = match(self, *a, **k)
        kept.append(result)
        return result

    kept = []
    monkeypatch.setattr(io, "write_heatmap", writing)
    monkeypatch.setattr(api.Matcher, "match", matching)
    pts_path, _ = a_points_csv
    common = ["--points", str(pts_path), "--model", "random:sam-lite", "--device", "cpu", "--jobs", "1",
              "--heatmap-grid", "model"]
    assert main(["match", str(two_cts[0]), str(two_cts[1]), str(two_cts[0]), *common, "--out", str(tmp_path / "m.csv"),
                 "--heatmap-dir", str(tmp_path / "hm")]) == 0
    assert f"and 4 heatmaps in {tmp_path / 'hm'} in " in capsys.readouterr().out  # (the closing line)
    assert [e for e, _ in events] == ["match", "write", "write", "match", "write", "write"], events
    assert all(len(r.heatmaps) == 0 for r in kept), "a result still holds its maps"
    assert main(["match", str(two_cts[0]), str(two_cts[1]), *common, "--out", str(tmp_path / "alone.csv"),
                 "--heatmap-dir", str(tmp_path / "alone")]) == 0
    for name in ("pt_202_ct_A_heatmap.nii.gz", "pt_202_ct_B_heatmap.nii.gz"):
        np.testing.assert_array_equal(io.read_image(tmp_path / "hm" / name).array,
                                      io.read_image(tmp_path / "alone" / name).array)


@pytest.mark.needs_data
def test_heatmaps_on_the_models_grid_are_the_full_size_ones_at_the_maps_own_resolution(tmp_path, two_cts, a_points_csv):
    """``--heatmap-grid model`` writes each map on the model's grid (its own voxels, in the target's physical space):
    put onto the target's voxels (each takes the model voxel its centre falls in) it is the ``--heatmap-grid image``
    file, bit for bit, and the matches are the same."""
    from samembed.heatmap import voxel_lookup
    from samembed.io import read_image

    pts_path, _ = a_points_csv
    files = {}
    for grid in ("image", "model"):
        out = tmp_path / f"{grid}.csv"
        assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                     "--heatmap-dir", str(tmp_path / grid), "--heatmap-grid", grid, "--model", "random:sam-lite",
                     "--device", "cpu", "--quiet"]) == 0
        files[grid] = sorted((tmp_path / grid).glob("*_heatmap.nii.gz"))
    assert (tmp_path / "image.csv").read_text() == (tmp_path / "model.csv").read_text()
    assert [f.name for f in files["image"]] == [f.name for f in files["model"]] and len(files["model"]) == 2
    target_grid = read_image(two_cts[1]).grid
    for big_file, small_file in zip(files["image"], files["model"]):
        big, small = read_image(big_file), read_image(small_file)
        assert big.grid.shape_zyx == target_grid.shape_zyx
        assert small.grid.shape_zyx != big.grid.shape_zyx  # the model's grid (this network's: 2 mm), not the CT's
        assert float(small.array.max()) > -1.0  # a map, not only the outside value
        lookup = voxel_lookup(small.grid, big.grid)
        np.testing.assert_array_equal(np.append(small.array.reshape(-1), np.float32(-1.0))[lookup], big.array)


@pytest.mark.needs_data
def test_the_closing_line_counts_the_matches_the_confident_ones_and_the_heatmaps(tmp_path, two_cts, a_points_csv,
                                                                                capsys):
    """The closing line named the table alone: heatmaps written, and matches not confident, went unsaid there."""
    pts_path, _ = a_points_csv
    out, maps = tmp_path / "m.csv", tmp_path / "maps"
    assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                 "--heatmap-dir", str(maps), "--model", "random:sam-lite", "--device", "cpu", "--no-polish"]) == 0
    confident = sum(r["confident"] == "true" for r in csv.DictReader(out.open()))
    assert f"wrote {out} (2 matches, {confident} confident) and 2 heatmaps in {maps} in " in capsys.readouterr().out


def test_many_large_heatmaps_on_the_targets_voxels_come_with_a_hint_of_the_models_grid():
    """50 heatmaps of a 512 x 512 x 133 chest CT (7 GB of float32 to compress, 49x the maps' own 4 mm values) get the
    hint; a few head-and-neck maps, or maps whose grid is as fine as the image's, do not."""
    from samembed.cli import heatmap_grid_hint

    hint = heatmap_grid_hint(50, 50 * 512 * 512 * 133, 50 * 92 * 92 * 84)
    assert hint is not None and "7.0 GB" in hint and "49x" in hint and "--heatmap-grid model" in hint
    assert heatmap_grid_hint(5, 5 * 128**3, 5 * 32 * 32 * 40) is None  # 42 MB
    assert heatmap_grid_hint(300, 300 * 128**3, 300 * 128 * 128 * 80) is None  # large, but the grids are alike


@pytest.mark.needs_data
def test_match_into_a_folder_writes_one_markups_file_per_target_in_ras(tmp_path, two_cts, a_points_csv, capsys):
    pts_path, pts = a_points_csv
    ras_csv = tmp_path / "ras.csv"
    ras_csv.write_text("label,x,y,z\n" + "".join(f"{lab},{-p[0]},{-p[1]},{p[2]}\n" for lab, p in zip(["A", "B"], pts)))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["match", str(two_cts[0]), str(two_cts[0]), "--points", str(ras_csv), "--out", str(out), "--ras",
                 "--model", "random:sam-lite"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pt_201_ct")]
    assert len(printed) == 2 and all(re.search(r"confident \(round trip \d+\.\d mm\)$", line) for line in printed), printed
    doc = json.loads((out / "pt_201_ct.mrk.json").read_text())
    assert doc["markups"][0]["coordinateSystem"] == "RAS"
    cps = doc["markups"][0]["controlPoints"]
    got_ras = np.array([c["position"] for c in cps])
    assert np.linalg.norm(got_ras - pts * [-1, -1, 1], axis=1).max() < 8.0  # self-match, in RAS
    assert "score=" in cps[0]["description"]
    assert re.search(r"; roundtrip_mm=\d+\.\d", cps[0]["description"]), cps[0]["description"]


@pytest.mark.needs_data
def test_targets_of_the_same_file_name_keep_their_own_output_files(tmp_path, two_cts, a_points_csv):
    """Scans laid out as ``<patient>/ct.nii.gz``: each target's ``.mrk.json`` and heatmaps are named by its folder,
    not written over one another; the same target given twice gets a second set of files."""
    pts_path, _ = a_points_csv
    targets = []
    for patient, ct in zip(("pa", "pb"), two_cts):
        (tmp_path / "scans" / patient).mkdir(parents=True)
        targets.append(tmp_path / "scans" / patient / "ct.nii.gz")
        targets[-1].symlink_to(ct)  # read in place
    out, hm = tmp_path / "out", tmp_path / "hm"
    out.mkdir()
    assert main(["match", str(two_cts[0]), *map(str, targets), str(targets[0]), "--points", str(pts_path),
                 "--out", str(out), "--heatmap-dir", str(hm), "--model", "random:sam-lite", "--device", "cpu",
                 "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["pa__ct.mrk.json", "pa__ct_2.mrk.json", "pb__ct.mrk.json"]
    assert sorted(p.name for p in hm.iterdir()) == sorted(f"{t}_{lab}_heatmap.nii.gz" for t in ("pa__ct", "pa__ct_2", "pb__ct")
                                                         for lab in ("A", "B"))
    first, second = (json.loads((out / f"pa__ct{s}.mrk.json").read_text()) for s in ("", "_2"))
    assert first == second  # the same target twice: the same matches
    assert json.loads((out / "pb__ct.mrk.json").read_text()) != first


@pytest.mark.needs_data
def test_outputs_that_would_land_on_an_input_are_refused_before_any_work(tmp_path, two_cts, capsys):
    """``--out`` naming the points file or an image, and ``--out FOLDER/`` where an atlas's ``.mrk.json`` lies beside
    its image (a glob of the folder's images includes the atlas): refused, every input byte kept."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for ct in two_cts:
        (data / ct.name).symlink_to(ct)  # read in place
    grid_pts = "label,x,y,z\nA,248.8,288.6,172.3\n"
    pts = data / "pt_201_ct.csv"
    pts.write_text(grid_pts)
    shutil.copy(pts, data / "atlas_points.csv")
    from samembed.io import PointList, write_points

    atlas_mrk = data / "pt_201_ct.mrk.json"
    write_points(PointList(["A"], [[248.8, 288.6, 172.3]]), atlas_mrk)
    before = {p.name: p.read_bytes() for p in data.iterdir() if not p.is_symlink()}
    images = [str(data / ct.name) for ct in two_cts]
    stat_before = [(os.stat(i).st_size, os.stat(i).st_mtime_ns) for i in images]
    rnd = ["--model", "random:sam-lite", "--device", "cpu", "--quiet"]
    for out, hit in ((pts, pts), (data / "pt_202_ct.nii.gz", data / "pt_202_ct.nii.gz")):
        assert main(["match", *images, "--points", str(pts), "--out", str(out), *rnd]) == 2
        err = capsys.readouterr().err
        assert f"would overwrite the input {hit}" in err and "choose another --out" in err, err
    assert main(["match", "--atlas", images[0], str(atlas_mrk), *images, "--out", f"{data}/", *rnd]) == 2
    assert f"would overwrite the input {atlas_mrk}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in data.iterdir() if not p.is_symlink()} == before
    assert [(os.stat(i).st_size, os.stat(i).st_mtime_ns) for i in images] == stat_before


@pytest.mark.needs_data
def test_the_csv_names_the_frame_of_its_rows_and_reads_back_in_it(tmp_path, two_cts, a_points_csv):
    """`--ras` writes x, y, z in RAS under the same header as LPS: the file did not say which (an audit). Each row
    now names its frame, and the file read back as points takes it, with or without --ras at reading."""
    from samembed.errors import InputError
    from samembed.io import read_points

    pts_path, _ = a_points_csv
    common = [str(two_cts[0]), str(two_cts[1]), "--model", "random:sam-lite", "--device", "cpu", "--quiet",
              "--no-polish"]
    lps, ras = tmp_path / "lps.csv", tmp_path / "ras.csv"
    assert main(["match", *common, "--points", str(pts_path), "--out", str(lps)]) == 0
    ras_points = tmp_path / "pts_ras.csv"
    got = read_points(pts_path)
    ras_points.write_text("label,x,y,z\n" + "".join(f"{lab},{-p[0]},{-p[1]},{p[2]}\n"
                                                     for lab, p in zip(got.labels, got.points_lps_mm)))
    assert main(["match", *common, "--points", str(ras_points), "--ras", "--out", str(ras)]) == 0
    assert {r["frame"] for r in csv.DictReader(ras.open())} == {"RAS"}
    back = read_points(ras)  # (no --ras: the file says RAS)
    np.testing.assert_allclose(back.points_lps_mm, read_points(lps).points_lps_mm, atol=2e-3)
    np.testing.assert_allclose(read_points(ras, ras=True).points_lps_mm, back.points_lps_mm)
    with pytest.raises(InputError, match="its frame column says LPS, but RAS coordinates were asked for"):
        read_points(lps, ras=True)
    # against the engine's own matches, not only each other (a frame mixed up in both files passed: a review)
    from samembed.api import Matcher
    from samembed.options import MatchOptions

    engine = Matcher("random:sam-lite", device="cpu").match(str(two_cts[0]), got.points_lps_mm, [str(two_cts[1])],
                                                            got.labels, MatchOptions(polish=False))
    lps_mm = np.array([m.point_lps_mm for m in engine.matches])
    table = lambda path: np.array([[float(r[a]) for a in "xyz"] for r in csv.DictReader(path.open())])  # noqa: E731
    np.testing.assert_allclose(table(lps), lps_mm, atol=1e-4)
    np.testing.assert_allclose(table(ras), lps_mm * [-1, -1, 1], atol=1e-4)


def _interrupt_the_second_match(monkeypatch) -> None:
    """Ctrl-C in the second call of ``Matcher.match`` (the command calls it once per target)."""
    from samembed.api import Matcher

    calls = []
    match = Matcher.match

    def interrupted_at_the_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return match(self, *a, **k)

    monkeypatch.setattr(Matcher, "match", interrupted_at_the_second)


@pytest.mark.needs_data
def test_a_picture_without_its_spacing_is_warned_of_when_it_is_matched_not_when_it_is_skipped(
        tmp_path, two_cts, a_points_csv, monkeypatch, caplog):
    """A PNG among CT targets is skipped (another dimension), and its missing pixel spacing, which no result uses,
    went unsaid there (it was warned of before the skip, from an audit); pictures that are matched are warned of
    once, as before."""
    import SimpleITK as sitk

    from samembed import io

    pts_path, _ = a_points_csv
    rng = np.random.default_rng(0)
    pictures = []
    for k in range(2):
        pictures.append(tmp_path / f"hand{k}.png")
        sitk.WriteImage(sitk.GetImageFromArray((rng.random((48, 40)) * 255).astype(np.uint8)), str(pictures[-1]))
    common = ["--device", "cpu", "--quiet"]
    monkeypatch.setattr(io, "_warned_no_spacing", False)
    with caplog.at_level(logging.WARNING, logger="samembed"):
        assert main(["match", str(two_cts[0]), str(two_cts[1]), str(pictures[0]), "--points", str(pts_path),
                     "--out", str(tmp_path / "o.csv"), "--model", "random:sam-lite", *common]) == 3
    assert f"target 2/2 skipped (the other targets go on): {pictures[0]}: a 2D target cannot" in caplog.text
    assert "carries no pixel spacing" not in caplog.text
    caplog.clear()
    points_2d = tmp_path / "p2.csv"
    points_2d.write_text("label,x,y\nA,20,24\n")
    with caplog.at_level(logging.WARNING, logger="samembed"):
        assert main(["match", *map(str, pictures), str(pictures[0]), "--points", str(points_2d),
                     "--out", str(tmp_path / "o2.csv"), "--model", "random:sam-lite-2d", *common]) == 0
    said = [r.getMessage() for r in caplog.records if "carries no pixel spacing" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{pictures[0]}: a PNG carries no pixel spacing"), said


@pytest.mark.needs_data
@pytest.mark.parametrize("out_kind", ["folder", "csv"])
def test_a_batch_skips_a_target_it_cannot_match_and_an_interrupt_keeps_the_targets_it_finished(
        tmp_path, two_cts, a_points_csv, out_kind, monkeypatch, capsys, caplog):
    """A target that cannot be matched (a crop of a few voxels) is named and skipped, and the targets after it are
    matched: the run exits 3 and writes the others' markups, CSV rows and heatmaps (it stopped at the bad one
    before). An interrupt stops the run; the targets finished before it are written."""
    import SimpleITK as sitk


    pts_path, _ = a_points_csv
    tiny = tmp_path / "tiny.nii.gz"
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (2, 3, 3)).astype(np.int16))
    img.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(img, str(tiny))
    out = tmp_path / "out" / ("" if out_kind == "folder" else "m.csv")
    out.parent.mkdir(exist_ok=True)
    args = ["match", str(two_cts[0]), str(two_cts[1]), str(tiny), str(two_cts[0]), "--points", str(pts_path),
            "--out", str(out) + ("/" if out_kind == "folder" else ""), "--heatmap-dir", str(tmp_path / "hm"),
            "--model", "random:sam-lite", "--device", "cpu", "--quiet", "--jobs", "1"]  # one at a time: see below

    def kept() -> list[str]:
        if out_kind == "folder":
            return sorted(p.name for p in (tmp_path / "out").iterdir())
        return sorted({r["target"] for r in csv.DictReader(out.open())})

    assert main(args) == 3
    assert (f"target 2/3 skipped (the other targets go on): {tiny}: 3 x 3 x 2 voxels (3 x 3 x 5 mm) is too small"
            in caplog.text)
    assert f"1 of 3 targets could not be matched (each is named above): {tiny}; {out} holds the others" in caplog.text
    caplog.clear()
    assert kept() == (["pt_201_ct.mrk.json", "pt_202_ct.mrk.json"] if out_kind == "folder"
                      else sorted(map(str, two_cts)))
    assert sorted(p.name for p in (tmp_path / "hm").iterdir()) == [
        "pt_201_ct_A_heatmap.nii.gz", "pt_201_ct_B_heatmap.nii.gz",
        "pt_202_ct_A_heatmap.nii.gz", "pt_202_ct_B_heatmap.nii.gz"]

    _interrupt_the_second_match(monkeypatch)
    for p in [*(tmp_path / "out").iterdir(), *(tmp_path / "hm").iterdir()]:
        p.unlink()
    args[3] = str(two_cts[0])  # no tiny target: the interrupt stops it
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err and "kept the matches of the 1 of 3" in caplog.text
    assert kept() == (["pt_202_ct.mrk.json"] if out_kind == "folder" else [str(two_cts[1])])


@pytest.mark.needs_data
def test_an_interrupt_after_a_skipped_target_keeps_the_finished_ones_under_their_own_names(
        tmp_path, two_cts, a_points_csv, monkeypatch, capsys, caplog):
    """A skipped target leaves a gap among the finished ones: an interrupt after it writes the finished targets'
    CSV rows and heatmaps under their own names, and says which were skipped. A first target that cannot be read
    does not hide the source's embedding from the progress lines (they showed it in the first turn only)."""

    pts_path, _ = a_points_csv
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"garbage")
    out = tmp_path / "m.csv"
    _interrupt_the_second_match(monkeypatch)
    assert main(["match", str(two_cts[0]), str(corrupt), str(two_cts[1]), str(two_cts[0]), "--points", str(pts_path),
                 "--out", str(out), "--heatmap-dir", str(tmp_path / "hm"), "--model", "random:sam-lite",
                 "--device", "cpu", "--jobs", "1"]) == 130
    err = capsys.readouterr().err
    assert "embedding source pt_201_ct.nii.gz" in err, err
    assert f"kept the matches of the 1 of 3 targets finished before this stopped, in {out} and {tmp_path / 'hm'}; " \
           f"1 skipped before: {corrupt}" in caplog.text
    assert {r["target"] for r in csv.DictReader(out.open())} == {str(two_cts[1])}
    assert sorted(p.name for p in (tmp_path / "hm").iterdir()) == ["pt_202_ct_A_heatmap.nii.gz",
                                                                   "pt_202_ct_B_heatmap.nii.gz"]


@pytest.mark.needs_data
def test_each_target_not_matched_again_is_forgotten_after_its_match(tmp_path, two_cts, a_points_csv, monkeypatch):
    """One atlas into many scans keeps bounded memory: the command drops each target's image and maps once it has
    matched it, unless it comes again later or holds the source (its path, or a copy: the same maps). The matches
    are those of separate runs."""
    from samembed.api import Matcher

    forgotten = []
    forget = Matcher.forget
    monkeypatch.setattr(Matcher, "forget", lambda self, image: (forgotten.append(image.name), forget(self, image)))
    pts_path, _ = a_points_csv
    src, tgt = map(str, two_cts)
    common = ["--points", str(pts_path), "--model", "random:sam-lite", "--device", "cpu", "--quiet"]
    copy = tmp_path / "copy_of_the_source.nii.gz"
    copy.write_bytes(Path(src).read_bytes())
    assert main(["match", src, tgt, src, str(copy), tgt, "--out", str(tmp_path / "m.csv"), *common]) == 0
    assert forgotten == [tgt]  # the target once its last match is done; the source never, nor its copy
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert main(["match", src, tgt, "--out", str(tmp_path / "one.csv"), *common]) == 0
    one = list(csv.DictReader((tmp_path / "one.csv").open()))
    assert [r for r in rows if r["target"] == tgt][:len(one)] == one


@pytest.mark.needs_data
@pytest.mark.parametrize("where", ["first", "later"])
def test_a_target_that_cannot_be_read_is_named_and_skipped_and_the_others_are_matched(
        tmp_path, two_cts, a_points_csv, capsys, caplog, where):
    """A target that cannot be read, the first (read while torch loads) or a later one (read when its turn comes,
    its prefetch meanwhile), is named and skipped at its turn; the other targets are matched and written, and the
    run exits 3 (it stopped there before, and lost the targets after it). When no target can be matched, the run
    exits 2 and writes nothing."""
    pts_path, _ = a_points_csv
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"garbage")
    out = tmp_path / "m.csv"
    targets = [str(corrupt), str(two_cts[1])] if where == "first" else [str(two_cts[1]), str(corrupt)]
    common = ["--points", str(pts_path), "--model", "random:sam-lite", "--device", "cpu", "--quiet"]
    assert main(["match", str(two_cts[0]), *targets, str(two_cts[0]), "--out", str(out), *common]) == 3
    k = targets.index(str(corrupt)) + 1
    assert f"target {k}/3 skipped (the other targets go on): {corrupt}" in caplog.text, caplog.text
    assert "cannot read this image" in caplog.text
    assert f"1 of 3 targets could not be matched (each is named above): {corrupt}; {out} holds the others" in caplog.text
    assert [r["target"] for r in csv.DictReader(out.open())] == [str(two_cts[1])] * 2 + [str(two_cts[0])] * 2
    assert corrupt.read_bytes() == b"garbage"

    caplog.clear()
    capsys.readouterr()
    none = tmp_path / "none.csv"
    assert main(["match", str(two_cts[0]), str(corrupt), str(corrupt), "--out", str(none), *common]) == 2
    assert "none of the 2 targets could be matched: each is named above" in capsys.readouterr().err
    assert caplog.text.count("cannot read this image") == 2 and not none.exists()


@pytest.mark.needs_data
@pytest.mark.parametrize("where", ["first", "later"])
def test_a_target_this_user_may_not_read_among_several_is_skipped_and_the_others_are_matched(
        tmp_path, two_cts, a_points_csv, monkeypatch, caplog, where):
    """A target without read permission among several stopped the run with exit 1 (the system's refusal) and lost
    the targets after it; it is now skipped and named like any target that cannot be read (exit 3). Alone, it is
    still the system's refusal, exit 1 (test_a_file_this_user_may_not_read_is_named_as_such_with_exit_1)."""
    pts_path, _ = a_points_csv
    locked = tmp_path / "locked.nii.gz"
    locked.write_bytes(Path(two_cts[1]).read_bytes())
    real_access = os.access  # (root may read anything: this user's refusal is what os.access says)
    monkeypatch.setattr(os, "access", lambda path, how, **k: False if (
        how & os.R_OK and Path(path) == locked) else real_access(path, how, **k))
    out = tmp_path / "m.csv"
    targets = [str(locked), str(two_cts[1])] if where == "first" else [str(two_cts[1]), str(locked)]
    assert main(["match", str(two_cts[0]), *targets, "--out", str(out), "--points", str(pts_path), "--model",
                 "random:sam-lite", "--device", "cpu", "--quiet", "--no-polish"]) == 3
    k = targets.index(str(locked)) + 1
    assert (f"target {k}/2 skipped (the other targets go on): {locked}: permission denied: this user may not read "
            "it; check its permissions") in caplog.text, caplog.text
    assert [r["target"] for r in csv.DictReader(out.open())] == [str(two_cts[1])] * 2
    if where == "first":  # none readable: exit 2, as for any targets of which none could be matched
        assert main(["match", str(two_cts[0]), str(locked), str(locked), "--out", str(tmp_path / "none.csv"),
                     "--points", str(pts_path), "--model", "random:sam-lite", "--device", "cpu", "--quiet"]) == 2
        assert not (tmp_path / "none.csv").exists()


@pytest.mark.needs_data
def test_a_run_that_finishes_says_that_an_earlier_runs_partial_file_is_still_there(tmp_path, two_cts, a_points_csv,
                                                                                   caplog):
    """An earlier run that stopped left ``m.partial.csv`` beside ``m.csv``: a later run that finishes says so, and
    keeps it (it may hold targets the later run did not have)."""
    pts_path, _ = a_points_csv
    out, partial = tmp_path / "m.csv", tmp_path / "m.partial.csv"
    partial.write_text("target,label,x,y,z,score,confident\nother,A,1,2,3,0.9,true\n")
    before = partial.read_bytes()
    with caplog.at_level(logging.INFO, logger="samembed"):
        assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                     "--model", "random:sam-lite", "--device", "cpu", "--quiet"]) == 0
    assert f"{partial}, left by an earlier run that stopped, is still there; this run's matches are in {out}" in caplog.text
    assert partial.read_bytes() == before and out.is_file()


def test_a_stopped_run_names_its_partial_file_beside_the_earlier_one():
    from samembed.cli import _partial_name

    assert [_partial_name(Path(p)).name for p in ("m.csv", "pt.mrk.json", "pt.MRK.JSON", "pt.fcsv", "plain")] == [
        "m.partial.csv", "pt.partial.mrk.json", "pt.partial.MRK.JSON", "pt.partial.fcsv", "plain.partial"]


@pytest.mark.needs_data
def test_an_interrupt_while_writing_stops_the_writing_and_keeps_what_was_written(tmp_path, two_cts, a_points_csv,
                                                                                 monkeypatch, capsys, caplog):
    """Ctrl-C while the outputs are written means stop: the writing is not started again (it used to be, all
    heatmaps included), and the CSV written before the interrupt stays."""
    from samembed import cli

    pts_path, _ = a_points_csv
    out = tmp_path / "m.csv"
    calls = []
    write = cli._write_match_outputs

    def interrupted_after_the_csv(args, done, out_, folder_out, heatmaps, fused=False, prefetch=None, wrote=None):
        calls.append(1)
        write(args, done, out_, folder_out, heatmaps, fused, prefetch, wrote)
        raise KeyboardInterrupt  # as the last heatmap is written

    monkeypatch.setattr(cli, "_write_match_outputs", interrupted_after_the_csv)
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                 "--heatmap-dir", str(tmp_path / "hm"), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert len(calls) == 1, "the writing was started again after the interrupt"
    assert "stopped while writing: the matches are in" in caplog.text
    assert len(list(csv.DictReader(out.open()))) == 2


@pytest.mark.needs_data
def test_bad_output_places_are_refused_before_torch_loads(tmp_path, two_cts, a_points_csv):
    """An output that cannot be written is found before torch loads and before anything is computed: exit 2, one
    line naming the flag and the path (it used to be an 'internal error' after the whole match)."""
    pts_path, _ = a_points_csv
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    repeated = tmp_path / "repeated.csv"
    header, first = pts_path.read_text().splitlines(keepends=True)[:2]
    repeated.write_text(header + first * 2)  # two points labelled A
    cases = [(["--out", str(tmp_path / "m.csv"), "--heatmap-dir", str(tmp_path / "a_file")],
              f"--heatmap-dir {tmp_path / 'a_file'}: is a file, expected a folder"),
             (["--out", str(tmp_path / "a_file") + "/"], f"--out {tmp_path / 'a_file'}: is a file, expected a folder"),
             (["--out", str(tmp_path / "m.csv"), "--points", str(tmp_path / "a_folder")],
              f"{tmp_path / 'a_folder'}: is a folder, expected a point file"),
             (["--out", str(tmp_path / "m.csv")], "nosuch.nii.gz: file not found"),
             (["--out", str(tmp_path / "m.csv"), "--heatmap-grid", "model"],
              "--heatmap-grid model says how to write heatmaps; give --heatmap-dir DIR too"),
             (["--out", str(tmp_path / "m.csv"), "--heatmap-dir", str(tmp_path / "hm"), "--points", str(repeated)],
              f"{repeated}: the label 'A' is given to 2 points, and --heatmap-dir writes one heatmap per label")]
    code = ("import sys, samembed.cli as c; code = c.main(sys.argv[1:]); "
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr); sys.exit(code)")
    for extra, expected in cases:
        images = [str(two_cts[0]), str(tmp_path / "nosuch.nii.gz") if "nosuch" in expected else str(two_cts[1])]
        argv = ["match", *images, "--points", str(pts_path), *extra, "--model", "random:sam-lite", "--device", "cpu"]
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (expected, res.stderr)
        assert expected in res.stderr and "TORCH False" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "hm").exists() and not (tmp_path / "m.csv").exists()


def test_ctrl_c_while_the_arguments_are_read_says_interrupted_without_a_traceback():
    """``run`` read the arguments outside the command's own handling: a Ctrl-C in those first milliseconds printed a
    traceback (a review). Here the parser is interrupted as Ctrl-C would interrupt it."""
    code = ("import samembed.cli as c\n"
            "def interrupted():\n    raise KeyboardInterrupt\n"
            "c.build_parser = interrupted\nc.run()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip() == "interrupted", res.stderr


def test_embed_of_a_missing_image_makes_no_cache_folder(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nosuch.nii.gz"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "nosuch.nii.gz: file not found" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.needs_data
def test_a_cache_folder_that_cannot_be_made_is_refused_before_torch_loads(tmp_path, two_cts):
    (tmp_path / "a_file").write_text("x")
    code = ("import sys, samembed.cli as c; code = c.main(sys.argv[1:]); "
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr); sys.exit(code)")
    for cache, expected in [(tmp_path / "a_file", "is a file, expected a folder"),
                            (tmp_path / "a_file" / "c", "cannot create the folder")]:
        res = subprocess.run([sys.executable, "-c", code, "embed", str(two_cts[0]), "--cache-dir", str(cache),
                              "--model", "random:sam-lite", "--device", "cpu"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2, res.stderr
        assert f"--cache-dir {cache}: {expected}" in res.stderr and "TORCH False" in res.stderr, res.stderr
    assert "choose another --cache-dir" in res.stderr  # the folder that cannot be made says what to do


def test_the_prefetch_process_leaves_ctrl_c_to_the_engine():
    """Ctrl-C reaches the whole process group; the prefetch child ignores it (the engine stops it), so an early
    interrupt prints the engine's one line, not the child's traceback."""
    code = ("import os, signal, time\n"
            "from samembed import prefetch\n"
            "from samembed.registry import registered_preprocess\n"
            "p = prefetch.start_waiting(registered_preprocess('default'))\n"
            "if p is None:\n"
            "    print('UNAVAILABLE')\n"
            "else:\n"
            "    time.sleep(0.5)\n"
            "    os.kill(p._proc.pid, signal.SIGINT)\n"
            "    time.sleep(0.5)\n"
            "    print('ALIVE' if p._proc.is_alive() else f'EXIT {p._proc.exitcode}')\n"
            "    p.close()\n")
    from samembed import prefetch

    if not prefetch.can_fork_ahead():
        pytest.skip("no prefetch process on this machine (one core, or not Linux)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    # (where it can run, none is a regression: the skip hid it, a review)
    assert "UNAVAILABLE" not in res.stdout, "the prefetch process did not start on a machine that can run it"
    assert res.returncode == 0 and "ALIVE" in res.stdout, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr


def test_heatmap_names_stay_apart_where_a_target_id_and_a_label_run_together():
    from samembed.cli import _heatmap_names

    names = _heatmap_names(["case", "case_L"], ["L_R", "R"])
    assert names[(0, "L_R")] == "case_L_R_heatmap.nii.gz" and names[(1, "R")] == "case_L_R_2_heatmap.nii.gz"
    assert len(set(names.values())) == 4


def test_a_degenerate_affine_is_no_prior():
    from samembed.matcher import plausible_affine

    M = np.eye(4)
    assert plausible_affine(M, 3) and plausible_affine(np.diag([1.5, 0.75, 1.2, 1.0]), 3)
    assert plausible_affine(np.diag([0.4, 0.4, 0.4, 1.0]), 3)  # another size alike along every axis
    assert not plausible_affine(np.diag([2.0, 0.5, 1.5, 1.0]), 3)  # one axis stretched 4x against another
    flat = M.copy()
    flat[2, :3] = flat[1, :3]  # two rows alike: space folded flat
    assert not plausible_affine(flat, 3)
    assert not plausible_affine(np.diag([20.0, 20.0, 20.0, 1.0]), 3)  # 8000x the volume
    assert not plausible_affine(np.full((4, 4), np.nan), 3)
    assert plausible_affine(np.diag([0.6, 1.5, 1.0]), 2) and not plausible_affine(np.diag([0.5, 2.0, 1.0]), 2)


def test_target_ids_are_file_names_made_unique_by_their_folders():
    from samembed.names import target_ids

    assert target_ids(["/d/pt_1_ct.nii.gz", "/d/pt_2.nrrd", "/e/series"]) == ["pt_1_ct", "pt_2", "series"]
    assert target_ids(["/s/a/ct.nii.gz", "/s/b/ct.nii.gz", "/s/b/c/other.mha"]) == ["a__ct", "b__ct", "b__c__other"]
    assert target_ids(["/s/a/ct.nii.gz", "/s/a/ct.nii.gz", "/s/a/ct.nii.gz"]) == ["ct", "ct_2", "ct_3"]
    assert target_ids(["p.1.nii.gz", "p.2.nii.gz", "my scan (2).nii"]) == ["p.1", "p.2", "my_scan__2_"]


def test_a_mistyped_option_or_model_is_refused_with_the_closest_name_before_any_image_is_read(tmp_path, capsys):
    from samembed.errors import InputError
    from samembed.models import load_model

    missing = [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]  # never read: the mistake is found first
    with pytest.raises(SystemExit) as stop:
        main(["match", *missing, "--pionts", "p.csv", "--out", str(tmp_path / "o.csv")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --pionts p.csv (--pionts: did you mean --points?)" in err
    # under the command's usage, as argparse's other refusals of it (it was under samembed's own)
    assert err.startswith("usage: samembed match SOURCE TARGET...") and "samembed match: error:" in err, err
    with pytest.raises(SystemExit):
        main(["embed", *missing, "--cache-dri", str(tmp_path)])
    assert "did you mean --cache-dir?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["match", *missing, "--points", "p.csv", "--out", str(tmp_path / "o.csv"), "--model", "defualt"])
    err = capsys.readouterr().err
    assert "unknown model 'defualt' (did you mean 'default'?)" in err and "a.nii.gz" not in err
    with pytest.raises(SystemExit):
        main(["match", *missing, "--points", "p.csv", "--out", str(tmp_path / "o.csv"), "--model", "fsat"])
    err = capsys.readouterr().err
    assert "(did you mean 'fast'?)" in err  # an alias, listed with its model (it was not)
    assert "sam-lite-ct-fast (fast)" in err
    with pytest.raises(InputError, match=r"unknown model 'sam-lite-c' \(did you mean 'sam-lite-ct'\?\)"):
        load_model("sam-lite-c")  # the Python API says it too
    from samembed.cli import _model_name

    # a path, or a name only a cluster's workers know, is left to loading (which names a missing file)
    for fine in ("default", "fast", "random:sam-lite", str(tmp_path / "mine.pt"), "remote_model.ckpt"):
        assert _model_name(fine) == fine
    with pytest.raises(SystemExit):  # an option like none of the command's: no suggestion at all
        main(["match", *missing, "--gpu", "--points", "p.csv", "--out", str(tmp_path / "o.csv")])
    assert "unrecognized arguments: --gpu\n" in capsys.readouterr().err


def test_a_broken_model_registry_is_named_even_without_model(tmp_path, capsys, monkeypatch):
    """The --model check reads the registry while the arguments are parsed: its error was hidden behind argparse's
    "invalid _model_name value: 'default'" (a review)."""
    (tmp_path / "models.json").write_text("{")
    monkeypatch.setenv("SAMEMBED_MODELS_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["match", "a.nii.gz", "b.nii.gz", "--points", "p.csv", "--out", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert "models.json: the model registry is not valid JSON" in err and "invalid _model_name" not in err


def test_atlas_names_tell_atlases_apart_by_their_image_and_where_it_repeats_by_their_point_file():
    from samembed.names import atlas_names, joined_names

    assert atlas_names(["/a/x.nii.gz", "/a/y.nii.gz"], ["/s/p.csv", "/s/p.csv"]) == ["x.nii.gz", "y.nii.gz"]
    assert atlas_names(["/a/x.nii.gz", "/b/x.nii.gz"], ["/s/p.csv", "/s/q.csv"]) == ["a/x.nii.gz", "b/x.nii.gz"]
    # an image given twice keeps its short name, and so do the others (a review: every name became a path)
    assert atlas_names(["/a/x.nii.gz", "/a/x.nii.gz", "/t/y.nii.gz"], ["/s/p.csv", "/s/q.csv", "/s/p.csv"]) == [
        "x.nii.gz (p.csv)", "x.nii.gz (q.csv)", "y.nii.gz"]
    # one image, two raters' landmarks (a file given twice keeps one name: the duplicate is warned of)
    assert atlas_names(["/a/x.nii.gz"] * 3, ["/s/p.csv", "/s/p.csv", "/t/shifted.csv"]) == [
        "x.nii.gz (p.csv)", "x.nii.gz (p.csv)", "x.nii.gz (shifted.csv)"]
    assert atlas_names(["/a/x.nii.gz"] * 2, ["/s/p.csv", "/t/p.csv"]) == ["x.nii.gz (s/p.csv)", "x.nii.gz (t/p.csv)"]
    assert joined_names(["a|b", "c;d%", "e"]) == "a%7Cb|c%3Bd%25|e"


def test_label_ids_name_each_label_s_heatmap_once():
    from samembed.names import label_ids

    assert label_ids(["A B", "A_B", "A/B", "C1.5", "ok", "A B", ""]) == {
        "A B": "A_B", "A_B": "A_B_2", "A/B": "A_B_3", "C1.5": "C1_5", "ok": "ok", "": "point"}
    assert label_ids(["L1", "l1"]) == {"L1": "L1", "l1": "l1_2"}  # one file on a case-insensitive disk otherwise
    # a long label (250 characters failed at the heatmap's writing, "File name too long", after every match), also
    # of letters of several bytes, cut at a character's end; two that differ only after the cut stay apart
    long_a, long_b, greek = "a" * 250 + "1", "a" * 250 + "2", "λ" * 100
    ids = label_ids([long_a, long_b, greek])
    assert ids == {long_a: "a" * 80, long_b: "a" * 80 + "_2", greek: "λ" * 40}


@pytest.mark.needs_data
def test_embed_fills_the_disk_cache_with_the_body_as_a_whole_embedding_gives_it(tmp_path, two_cts):
    import torch

    from samembed import Matcher
    from samembed.io import read_image
    from samembed.tiles import read_entry, unpacked_directions

    assert main(["embed", str(two_cts[0]), "--cache-dir", str(tmp_path / "c"), "--model", "random:sam-lite", "--quiet"]) == 0
    entries = list((tmp_path / "c").glob("*.pt"))
    assert len(entries) == 1
    _, (_, body_bits, stored_bits, packed) = read_entry(entries[0])
    assert np.array_equal(stored_bits, body_bits), "the entry must hold every body voxel and no other"
    whole = Matcher("random:sam-lite", device="cpu").embed(read_image(two_cts[0]))  # every voxel, air included
    stored = np.flatnonzero(np.unpackbits(stored_bits, count=whole.valid.numel()))
    assert 0 < len(stored) == len(packed)
    ref = whole.vectors[torch.from_numpy(stored), : whole.n_local]
    back = unpacked_directions(packed, whole.n_local)  # the packed directions on disk, read back as unit vectors
    back /= torch.linalg.vector_norm(back, dim=1, keepdim=True)
    torch.testing.assert_close(back, ref, atol=1.2e-3, rtol=0)


def test_info_lists_models_and_device(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device:" in out and "default" in out
    from samembed.networks.int8 import native_bf16

    assert ("native bfloat16 (int8-bf16" in out) == native_bf16()
    default = next(line for line in out.splitlines() if line.strip().startswith("default "))
    assert "int8 on the CPU (calibrated, global branch too)" in default  # the shipped CT model has its calibration
    hand = next(line for line in out.splitlines() if line.strip().startswith("sam-lite-2d-hand "))
    assert "int8" not in hand
    fast = next(line for line in out.splitlines() if line.strip().startswith("sam-lite-ct-fast "))
    assert "(also --model fast)" in fast  # the alias the README uses (it was not listed)


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "samembed.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.needs_data
def test_the_command_ends_a_match_at_once_with_its_outputs_written_and_its_lines_flushed(tmp_path, two_cts, a_points_csv):
    """``samembed`` (``samembed.cli:run``) skips the interpreter's shutdown after a match (about 0.5 s with torch
    loaded): the exit code, the output file and the printed line must all be there, with stdout a pipe."""
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("samembed") == "samembed.cli:run", scripts.get("samembed")
    pts_path, _ = a_points_csv
    out = tmp_path / "m.csv"
    res = run_cli("match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                  "--model", "random:sam-lite", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    confident = sum(r["confident"] == "true" for r in rows)
    # how many matches, and how many are confident (3 of 5 not confident went unsaid in the closing line)
    assert f"wrote {out} (2 matches, {confident} confident) in " in res.stdout, res.stdout
    assert [r["label"] for r in rows] == ["A", "B"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "a temporary file was left behind"


@pytest.mark.needs_data
def test_bad_inputs_exit_with_2_and_a_message_naming_the_problem(tmp_path, two_cts, a_points_csv):
    pts_path, _ = a_points_csv
    src, tgt = map(str, two_cts)
    common = ["--model", "random:sam-lite", "--quiet"]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"garbage")
    outside = tmp_path / "outside.csv"
    outside.write_text("label,x,y,z\nfar,10000,0,0\n")
    bad_ckpt = tmp_path / "bad.pt"
    torch.save({"state_dict": {"foo": torch.zeros(2)}}, bad_ckpt)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    xray = tmp_path / "x.png"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)), str(xray))
    cases = {
        "file not found": ["match", str(tmp_path / "missing.nii.gz"), tgt, "--points", str(pts_path), "--out", str(tmp_path / "o.csv")],
        "cannot read this image": ["match", src, str(corrupt), "--points", str(pts_path), "--out", str(tmp_path / "o.csv")],
        f"{outside}: point 'far' at (10000.0, 0.0, 0.0) mm LPS lies outside {src} (1 of 1 points do); if the "
        "coordinates are RAS (Slicer's), add --ras": ["match", src, tgt, "--points", str(outside), "--out",
                                                      str(tmp_path / "o.csv")],
        # given --ras, the hint is the other way round (it advised --ras to a user who had given it: an audit)
        "the points were read as RAS (--ras): if the file holds LPS coordinates, leave out --ras": [
            "match", src, tgt, "--points", str(outside), "--ras", "--out", str(tmp_path / "o.csv")],
        "does not fit architecture": ["match", src, tgt, "--points", str(pts_path), "--out", str(tmp_path / "o.csv"), "--model", str(bad_ckpt)],
        "cannot be matched with the 3D source": ["match", src, str(xray), "--points", str(pts_path), "--out", str(tmp_path / "o.csv")],
        "point file not found": ["match", src, tgt, "--points", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.csv")],
    }
    if os.geteuid() != 0:  # root can write anywhere
        cases["not writable"] = ["match", src, tgt, "--points", str(pts_path), "--out", str(ro / "o.csv")]
    else:
        cases["does not exist"] = ["match", src, tgt, "--points", str(pts_path), "--out", str(tmp_path / "no" / "o.csv")]
    if not torch.cuda.is_available():
        cases["no CUDA device"] = ["match", src, tgt, "--points", str(pts_path), "--out", str(tmp_path / "o.csv"), "--device", "cuda"]
    for expected, args in cases.items():
        extra = ["--quiet"] if "--model" in args else common
        res = run_cli(*args, *extra)
        assert res.returncode == 2, f"{expected}: exit {res.returncode}\n{res.stderr}"
        assert expected in res.stderr and "Traceback" not in res.stderr, f"{expected}: {res.stderr}"
    assert not (tmp_path / "o.csv").exists()


def test_the_default_model_without_weights_says_what_to_do(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "models.json").write_text(json.dumps({"models": [{"name": "default", "architecture": "sam-lite", "file": None,
                                                                 "note": "not trained yet"}]}))
    monkeypatch.setenv("SAMEMBED_MODELS_DIR", str(models))
    from samembed.errors import ModelNotAvailableError
    from samembed.models import load_model

    with pytest.raises(ModelNotAvailableError, match="model 'default' has no weights on this machine .*--model PATH"):
        load_model("default")


def test_a_broken_model_registry_is_named_with_what_to_do(tmp_path, monkeypatch, capsys):
    """An invalid models.json (SAMEMBED_MODELS_DIR) gave 'internal error: JSONDecodeError', without the file."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "models.json").write_text('{"models": [')
    monkeypatch.setenv("SAMEMBED_MODELS_DIR", str(models))
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert f"{models / 'models.json'}: the model registry is not valid JSON" in err and "SAMEMBED_MODELS_DIR" in err
    assert "internal error" not in err


# ------------------------------------------------------------------------------------------ benchmark commands
#: run the CLI in a fresh interpreter where the benchmark package cannot be imported (as in a bare engine install)
WITHOUT_BENCH = ("import sys\nsys.modules['samembed_bench'] = None  # import samembed_bench now fails\n"
                 "from samembed.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def run_cli_without_bench(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", WITHOUT_BENCH, *args], capture_output=True, text=True, env=env)


def test_without_the_benchmark_package_its_commands_are_listed_and_say_how_to_install_it(tmp_path):
    res = run_cli_without_bench("--help")
    assert res.returncode == 0, res.stderr
    assert "evaluate" in res.stdout and "make-suites" in res.stdout
    for args in (["evaluate", str(tmp_path / "cases.json"), "--out", str(tmp_path / "out")],
                 ["make-suites", "--out", str(tmp_path / "suites")], ["evaluate"], ["evaluate", "--help"]):
        res = run_cli_without_bench(*args)
        assert res.returncode == 2, f"{args}: exit {res.returncode}\n{res.stderr}"
        assert f"'samembed {args[0]}' needs the benchmark package samembed_bench" in res.stderr, res.stderr
        assert "pip install -e benchmarks" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "suites").exists()


def test_with_the_benchmark_package_its_commands_are_the_real_ones():
    pytest.importorskip("samembed_bench", reason="the benchmark package is not installed (pip install -e benchmarks)")
    from samembed.cli import BENCH_COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(BENCH_COMMANDS) <= set(sub.choices)
    assert sub.choices["evaluate"].parse_args(["c.json", "--out", "o"]).methods.startswith("sam")
    assert sub.choices["make-suites"].parse_args(["--out", "o"]).func.__module__ == "samembed_bench.cli"


@pytest.mark.parametrize(("argv", "refine", "polish"), [
    (["s.nii", "t.nii", "--points", "p.csv"], False, True),  # one source: the same-patient defaults
    (["--atlas", "a.nii", "a.csv", "t.nii"], True, False),  # atlases are other people: between patients
    (["--atlases", "m.csv", "t.nii", "--polish"], True, True),  # a flag changes the preset it starts from
    (["s.nii", "t.nii", "--points", "p.csv", "--preset", "between-patients"], True, False),
    (["--atlas", "a.nii", "a.csv", "t.nii", "--preset", "same-patient"], False, True),
])
def test_the_preset_follows_the_kind_of_match_and_the_flags_change_it(argv, refine, polish):
    from samembed.cli import build_parser, match_command_options
    from samembed.options import MatchOptions

    args = build_parser().parse_args(["match", *argv, "--out", "o.csv"])
    options = match_command_options(args)
    assert (options.refine, options.polish) == (refine, polish)
    assert options.replace(refine=False, polish=True) == MatchOptions()  # nothing else differs from the defaults


@pytest.mark.parametrize(("extra", "refine", "polish"), [([], True, False), (["--preset", "same-patient"], False, True),
                                                         (["--no-refine"], False, False)])
def test_propagate_starts_from_the_between_patients_preset(extra, refine, polish):
    from samembed.cli import build_parser
    from samembed.propagate.cli import propagate_command_options

    args = build_parser().parse_args(["propagate", "--atlas", "a.nii", "a.csv", "--scans", "s.csv", "--out", "o",
                                      *extra])
    options = propagate_command_options(args)
    assert (options.refine, options.polish) == (refine, polish)


@pytest.mark.parametrize(("argv", "verbose", "quiet"), [
    (["match", "s.nii", "t.nii", "--points", "p.csv", "--out", "o.csv"], False, False),
    (["-v", "match", "s.nii", "t.nii", "--points", "p.csv", "--out", "o.csv"], True, False),
    (["match", "s.nii", "t.nii", "--points", "p.csv", "--out", "o.csv", "-v"], True, False),
    (["-q", "match", "s.nii", "t.nii", "--points", "p.csv", "--out", "o.csv"], False, True),
    (["match", "s.nii", "t.nii", "--points", "p.csv", "--out", "o.csv", "--quiet"], False, True),
    (["-v", "match", "s.nii", "t.nii", "--points", "p.csv", "--out", "o.csv", "-q"], True, True),
    (["embed", "a.nii", "--cache-dir", "c", "-v"], True, False),
    (["-q", "propagate", "--atlas", "a.nii", "a.csv", "--scans", "s.csv", "--out", "o"], False, True),
    (["train", "--config", "c.yaml", "-q"], False, True),
    (["quantize", "--config", "c.yaml", "-v"], True, False),
    (["cache", "info", "--cache-dir", "c", "-v"], True, False),
    (["info", "-v"], True, False),
    (["info", "-q"], False, True),
    (["cache", "clear", "--cache-dir", "c", "-q"], False, True),
    (["-v", "web", "-q"], True, True),
])
def test_verbose_and_quiet_go_before_the_command_or_after_it(argv, verbose, quiet):
    from samembed.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_the_benchmark_commands_take_verbose_and_quiet_after_them_too():
    from samembed.cli import _bench_cli, build_parser

    if _bench_cli() is None:
        pytest.skip("the benchmark package (samembed_bench) is not installed")
    args = build_parser().parse_args(["make-suites", "--out", "o", "-v", "-q"])
    assert (args.verbose, args.quiet) == (True, True)


class _Stream(io.StringIO):
    """A stderr stand-in that says whether it is a terminal."""

    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_progress_to_a_file_is_one_line_per_phase_and_to_a_terminal_a_bar(monkeypatch):
    from samembed import progress

    def show(terminal: bool, every_s: float) -> str:
        stream = _Stream(terminal)
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(progress, "PROGRESS_LINE_S", every_s)
        bar = progress.PhaseProgress(2, "reading")
        bar.phase("reading")  # the same phase again: no new line
        for k in range(1, 4):  # only the numbers move
            bar.update(0, 2, f"embedding tiles {k}/3")
        bar.update(1, 2, "matching 1/2")
        bar.close()
        return stream.getvalue()

    text = show(terminal=False, every_s=10.0)
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(" s  ", 1)[1] for line in lines] == ["reading", "embedding tiles 1/3", "matching 1/2"], text
    times = [float(line.split(" s  ", 1)[0]) for line in lines]
    assert times == sorted(times) and times[0] >= 0
    # with no interval between lines, a phase whose numbers move gets a line for each
    assert show(terminal=False, every_s=0.0).count("embedding tiles") == 3
    # on a terminal: one redrawn bar
    bar = show(terminal=True, every_s=10.0)
    assert "\r" in bar and "matching 1/2" in bar and " s  reading" not in bar


def test_a_count_to_a_file_is_a_line_now_and_then_and_at_the_end(monkeypatch):
    """``samembed train`` and ``propagate`` under nohup or in a batch job: lines, not a redrawn bar."""
    from samembed import progress

    def count(terminal: bool, every_s: float) -> str:
        stream = _Stream(terminal)
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(progress, "PROGRESS_LINE_S", every_s)
        bar = progress.CountProgress(5, "train", initial=1)
        for _ in range(4):
            bar.set_postfix(loss="0.412")
            bar.update(1)
        bar.close()
        return stream.getvalue()

    text = count(terminal=False, every_s=10.0)
    assert "\r" not in text
    lines = [line.split(" s  ", 1)[1] for line in text.splitlines()]
    assert len(lines) == 2, text  # the start and the end: nothing in between within 10 s
    assert lines[0].startswith("train 1/5 (20 %)") and lines[1].startswith("train 5/5 (100 %)"), text
    assert lines[1].endswith("it/s, loss=0.412"), text
    every = count(terminal=False, every_s=0.0).splitlines()
    assert len(every) == 6  # start, each of the 4 updates, the end
    # the time left at this run's rate, while there is some (a log of a long run said how fast, not how long)
    assert re.search(r"train 2/5 \(40 %\), \S+ it/s, \d+ s left, loss=0.412$", every[1]), every
    assert "left" not in every[-1]
    from samembed.progress import _duration

    assert [_duration(s) for s in (45, 720, 11100)] == ["45 s", "12 min", "3 h 05 min"]
    # the lines' clock from the command's start (propagate's scans come after its atlas: they restarted at 0.0 s)
    stream = _Stream(False)
    monkeypatch.setattr(sys, "stderr", stream)
    progress.CountProgress(3, "propagate", unit="scan", started_s=time.perf_counter() - 42.0).close()
    assert all(40.0 < float(line.split(" s  ", 1)[0]) < 60.0 for line in stream.getvalue().splitlines()), stream.getvalue()
    bar = count(terminal=True, every_s=10.0)
    assert "\r" in bar and "5/5" in bar and " s  train" not in bar


@pytest.mark.needs_data
def test_labels_with_commas_stay_one_column_and_one_target_can_go_to_a_markups_file(tmp_path, two_cts, capsys):
    from samembed.io import read_image, read_points

    pts = read_image(two_cts[0]).grid.index_to_lps([[64, 60, 70], [50, 70, 40]])
    labels = ["Parotid, left", 'the "7th" rib']
    src = tmp_path / "pts.csv"
    with src.open("w", newline="") as fh:
        csv.writer(fh).writerows([["label", "x", "y", "z"], *([lab, *map(str, p)] for lab, p in zip(labels, pts))])
    rnd = ["--model", "random:sam-lite", "--device", "cpu", "--quiet"]
    out_csv, out_mrk, out_fcsv = tmp_path / "m.csv", tmp_path / "m.mrk.json", tmp_path / "m.fcsv"
    for out in (out_csv, out_mrk, out_fcsv):
        assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(src), "--out", str(out), *rnd]) == 0
    rows = list(csv.reader(out_csv.open()))
    assert all(len(r) == 9 for r in rows) and [r[1] for r in rows[1:]] == labels
    found = np.array([[float(v) for v in r[2:5]] for r in rows[1:]])
    for out in (out_mrk, out_fcsv):  # the same matches, as Slicer markups
        back = read_points(out)
        assert back.labels == labels
        np.testing.assert_allclose(back.points_lps_mm, found, atol=1e-3)
        assert back.descriptions[0].startswith("score=")
    # several targets cannot share one markups file: refused before anything is computed, nothing written
    many = tmp_path / "many.v2.mrk.json"  # the suffix named is the whole .mrk.json
    assert main(["match", str(two_cts[0]), str(two_cts[1]), str(two_cts[0]), "--points", str(src), "--out", str(many),
                 *rnd]) == 2
    assert "a .mrk.json file holds the points of one target, and there are 2; give a folder" in capsys.readouterr().err
    assert not many.exists()


def _gone(pid: int) -> bool:
    """The process ``pid`` has ended (gone, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_until(done, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not after {timeout_s:.0f} s: {what}"
        time.sleep(0.05)


@pytest.mark.needs_data
def test_the_prefetch_process_ends_when_the_command_is_killed(tmp_path):
    """A command killed outright (SIGKILL, the kernel's OOM killer) cannot stop its prefetch process. The child held
    the parent's end of its results pipe too (inherited by the fork), so a send larger than the pipe's buffer (an
    input's body mask) waited for ever: an orphan of 0.4 GB per killed run. It now closes that end, and its next
    send fails and ends it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the prefetch process runs on Linux only")
    cts = [data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (201, 202, 203, 204)]
    code = ("import sys, time\n"
            "from samembed import prefetch\n"
            "from samembed.registry import registered_local_stride_zyx, registered_pad_multiple_zyx, "
            "registered_preprocess\n"
            "p = prefetch.start(sys.argv[1:], registered_preprocess('default'), 'auto', None, "
            "registered_pad_multiple_zyx('default'), registered_local_stride_zyx('default'))\n"
            "print('UNAVAILABLE' if p is None else p._proc.pid, flush=True)\n"
            "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, *map(str, cts)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline().strip()
        from samembed import prefetch

        if line == "UNAVAILABLE" and not prefetch.can_fork_ahead():
            pytest.skip("no prefetch process on this machine (one core)")
        assert line != "UNAVAILABLE", "the prefetch process did not start on a machine that can run it"
        child = int(line)
        time.sleep(0.3)  # killed while the child reads the first pair: its results are still to be sent
        parent.kill()
        parent.wait(timeout=30)
        _wait_until(lambda: _gone(child), 60, f"the prefetch process {child} still runs after its engine was killed")
    finally:
        parent.kill()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _stop_a_batch_with_sigterm(tmp_path, points_csv, jobs: str, when: str, children=lambda pid: []):
    """``samembed match`` of 8 OpenKBP CTs (a source and 7 targets) with ``--jobs jobs`` in a process of its own,
    stopped with SIGTERM once its progress lines match ``when`` (a regular expression); it must exit with 143 and
    no traceback. Returns the CTs, its stderr, the count of targets it says it kept, the targets of its CSV rows
    and ``children(pid)`` taken just before the signal."""
    ids = (201, 202, 203, 204, 206, 207, 208, 209)
    cts = [data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in ids]
    out, log_path = tmp_path / "out.csv", tmp_path / "stderr.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from samembed.cli import run; run()", "match", *map(str, cts),
                                 "--points", str(points_csv), "--out", str(out), "--device", "cpu", "--jobs", jobs],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_until(lambda: re.search(when, log_path.read_text()), 300, f"progress {when!r}")
        taken = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, log_path.read_text()
    finally:
        proc.kill()
    err = log_path.read_text()
    assert "terminated: stopped by SIGTERM" in err and "Traceback" not in err, err
    kept = int(re.search(r"kept the matches of the (\d+) of 7 targets", err).group(1))
    return cts, err, kept, [r.split(",")[0] for r in out.read_text().splitlines()[1:]], taken


@pytest.mark.needs_data
def test_sigterm_stops_a_batch_as_ctrl_c_does_keeping_the_finished_targets(tmp_path, a_points_csv):
    """``kill``, ``timeout`` and batch systems stop a command with SIGTERM, on which Python dies at once: nothing
    finished was written and the prefetch process was left behind. The command now stops as on Ctrl-C: it writes
    the matches of the targets it finished, stops its prefetch process and exits with 143."""
    psutil = pytest.importorskip("psutil")
    # the third target's turn: the second is kept (a finished target joins the kept ones before the next starts)
    cts, err, kept, rows, children = _stop_a_batch_with_sigterm(
        tmp_path, a_points_csv[0], "1", r"embedding target 3/", lambda pid: [
            c.pid for c in psutil.Process(pid).children(recursive=True)])
    assert 2 <= kept < 7, err
    assert len(rows) == 2 * kept and set(rows) == {str(c) for c in cts[1:1 + kept]}
    for pid in children:  # the prefetch process went with it
        _wait_until(lambda pid=pid: _gone(pid), 30, f"process {pid} of the command still runs")


@pytest.mark.needs_data
def test_targets_matched_two_at_a_time_give_what_one_at_a_time_gives_in_the_targets_order(tmp_path, a_points_csv,
                                                                                         caplog):
    """``--jobs 2``: after the first target, two targets are matched at once, each on its own thread. The table
    and the markups files are those of one target at a time, byte for byte, in the targets' order (whichever
    finished first), with the shipped model's windows and round trips (the source's tiles shared by both threads);
    a target that cannot be read is still named and skipped at its place, and a target that comes twice keeps its
    maps until its last turn."""
    ids = (201, 202, 203, 204, 206)
    cts = [str(data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz")) for n in ids]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"garbage")
    targets = [cts[1], cts[2], str(corrupt), cts[3], cts[1], cts[4]]
    common = ["--points", str(a_points_csv[0]), "--device", "cpu", "--quiet"]
    outputs, threads = {}, torch.get_num_threads()
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}.csv"
        assert main(["match", cts[0], *targets, "--out", str(out), "--jobs", jobs, *common]) == 3
        assert f"target 3/6 skipped (the other targets go on): {corrupt}" in caplog.text, caplog.text
        caplog.clear()
        folder = tmp_path / f"jobs{jobs}"
        assert main(["match", cts[0], *targets[:2], *targets[3:], "--out", f"{folder}/", "--jobs", jobs,
                     *common]) == 0
        outputs[jobs] = (out.read_bytes(), {p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    table = list(csv.DictReader(io.StringIO(outputs["1"][0].decode())))
    assert [r["target"] for r in table][::2] == [t for t in targets if t != str(corrupt)]
    assert outputs["2"] == outputs["1"]
    assert torch.get_num_threads() == threads, "torch's threads are given back after the targets matched at once"


@pytest.mark.needs_data
def test_an_interrupt_of_targets_matched_at_once_keeps_each_finished_target_whole(tmp_path, a_points_csv, monkeypatch,
                                                                                capsys, caplog):
    """Ctrl-C in one of two targets matched at once (they do overlap) stops the run (exit 130): no further target
    starts but the one its thread had taken, the one in flight beside it stops at its next tile or finishes, and
    the targets finished are written whole, in the targets' order, as a run of one target at a time writes them."""
    from samembed.api import Matcher

    ids = (201, 202, 203, 204, 206, 207)
    cts = [str(data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz")) for n in ids]
    common = ["--points", str(a_points_csv[0]), "--device", "cpu", "--quiet"]  # the shipped int8 model
    whole = tmp_path / "whole.csv"
    assert main(["match", *cts, "--out", str(whole), "--jobs", "1", *common]) == 0
    lock, calls, running, most = threading.Lock(), [], [0], [0]
    match = Matcher.match

    def interrupted_at_the_third(self, *a, **k):
        with lock:
            calls.append(1)
            n = len(calls)
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if n == 3:
                time.sleep(0.3)  # the second call's target is in flight meanwhile
                raise KeyboardInterrupt
            return match(self, *a, **k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Matcher, "match", interrupted_at_the_third)
    out = tmp_path / "stopped.csv"
    assert main(["match", *cts, "--out", str(out), "--jobs", "2", *common]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert most[0] == 2, "the targets after the first were matched two at a time"
    assert len(calls) <= 4, "no target started after the interrupt but the one the interrupted thread took"
    kept = int(re.search(r"kept the matches of the (\d+) of 5 targets", caplog.text).group(1))
    rows = list(csv.DictReader(out.open()))
    reference = [r for r in csv.DictReader(whole.open()) if r["target"] in {x["target"] for x in rows}]
    assert rows == reference and rows[0]["target"] == cts[1] and len(rows) == 2 * kept and 1 <= kept <= 3


@pytest.mark.needs_data
def test_atlases_fused_into_targets_matched_two_at_a_time_give_what_one_at_a_time_gives(tmp_path, a_points_csv):
    """Several atlases (``--atlas``) with ``--jobs 2``: every atlas's maps are shared by the two threads; the fused
    table is the one of one target at a time."""
    cts = [str(data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz")) for n in (201, 202, 203, 204)]
    atlases = ["--atlas", cts[0], str(a_points_csv[0]), "--atlas", cts[1], str(a_points_csv[0])]
    tables = []
    for jobs in ("1", "2"):
        out = tmp_path / f"fused{jobs}.csv"
        assert main(["match", *atlases, *cts[2:4], cts[0], "--out", str(out), "--jobs", jobs, "--device", "cpu",
                     "--quiet"]) == 0  # (the shipped int8 model: its tiles are the same in any box)
        tables.append(out.read_bytes())
    assert tables[0] == tables[1] and len(tables[0].splitlines()) == 1 + 2 * 3


@pytest.mark.needs_data
def test_a_first_target_that_cannot_be_read_leaves_the_source_to_the_next_one_alone(tmp_path, a_points_csv, caplog):
    """With ``--jobs 2`` the targets are matched one at a time until one is matched: it embeds the source, once.
    A first target that cannot be read let two threads embed the source at once."""
    from samembed.embedding import Embedder

    cts = [str(data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz")) for n in (201, 202, 203, 204)]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"garbage")
    computed = []
    compute = Embedder._compute

    def counted(self, image, *a, **k):
        computed.append(Path(image.name).name)
        return compute(self, image, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Embedder, "_compute", counted)
        assert main(["match", cts[0], str(corrupt), *cts[1:], "--points", str(a_points_csv[0]), "--out",
                     str(tmp_path / "m.csv"), "--model", "random:sam-lite", "--device", "cpu", "--quiet",
                     "--jobs", "2"]) == 3
    assert "target 1/4 skipped (the other targets go on)" in caplog.text
    assert sorted(computed) == sorted(Path(c).name for c in cts), computed


@pytest.mark.needs_data
def test_sigterm_stops_targets_matched_at_once_at_their_next_tile_keeping_the_finished_ones(tmp_path, a_points_csv):
    """SIGTERM while two targets are matched at once (``--jobs 2``): the command sets the targets' cancel, which
    stops those in flight at their next tile, starts no other, writes the targets finished, whole, and exits with
    143 without a traceback."""
    # a target after the first in flight (the progress lines of two targets interleave: any of its phases)
    cts, err, kept, rows, _ = _stop_a_batch_with_sigterm(tmp_path, a_points_csv[0], "2",
                                                         r"(embedding target|matching|polishing) [2-7]/7")
    assert 1 <= kept < 7 and len(rows) == 2 * kept, err
    assert {r: rows.count(r) for r in rows} == {str(c): 2 for c in cts[1:] if str(c) in rows}


def test_jobs_is_a_count_of_one_or_more_or_auto_and_auto_matches_two_at_once_on_a_cpu_of_two_threads(capsys):
    """``--jobs`` takes auto or a whole number >= 1 (else it is refused naming the flag); auto is 2 on a CPU where
    torch has two threads or more, for three targets or more (the first is matched alone), else 1."""
    from samembed.cli import build_parser
    from samembed.jobs import auto_jobs

    parse = build_parser().parse_args
    assert parse(["match", "a", "b", "--out", "o.csv"]).jobs == "auto"
    assert parse(["match", "a", "b", "--out", "o.csv", "--jobs", "3"]).jobs == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(SystemExit):
            parse(["match", "a", "b", "--out", "o.csv", "--jobs", bad])
        assert "--jobs" in capsys.readouterr().err
    assert auto_jobs(3, 2, "cpu") == 2 and auto_jobs(20, 8, "cpu") == 2
    assert auto_jobs(2, 2, "cpu") == 1 and auto_jobs(20, 1, "cpu") == 1 and auto_jobs(20, 2, "cuda") == 1
    # with heatmaps one at a time: their matches come from sums over every voxel, which differ in their last digits on
    # fewer threads (a review: 4 of 75 rows moved with --jobs 2); told otherwise, as told
    assert auto_jobs(20, 2, "cpu", heatmaps=True) == 1
    from types import SimpleNamespace

    from samembed.cli import _jobs

    cpu = SimpleNamespace(device=torch.device("cpu"))
    chosen = with_torch_threads(2, lambda: [
        _jobs(parse(["match", "a", "b", "c", "d", "--out", "o.csv", *extra]), 3, cpu)
        for extra in ([], ["--heatmap-dir", "h"], ["--heatmap-dir", "h", "--jobs", "2"])])
    assert chosen == [2, 1, 2]


def test_progress_over_targets_matched_at_once_never_moves_back():
    """Two targets in flight report their parts in turn: the bar stands at the targets finished plus the parts of
    those in flight, so it only moves forward, and ends at the count of targets."""
    from samembed.cli import _Turns

    seen = []

    class Bar:
        def update(self, done, total, phase=""):
            seen.append((done, total, phase))

    turns = _Turns(Bar(), 3)
    turns.update(0, 0.5, "matching 1/3")
    turns.finished(0)
    turns.update(1, 0.2, "embedding target 2/3")
    turns.update(2, 0.6, "matching 3/3")
    turns.update(1, 0.9, "polishing 2/3")
    turns.finished(2)
    turns.update(1, 1.0, "matched 2/3")
    turns.finished(1)
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and done[-1] == pytest.approx(3.0) and turns.unfinished == []
    assert seen[3] == (pytest.approx(2.5), 3, "polishing 2/3")


def test_sigterm_handling_is_the_commands_own_and_ends_with_it():
    """The command's SIGTERM handler is in place while it runs and the previous one is back after it; elsewhere
    than in the main thread nothing is changed."""
    from samembed.stopping import Terminated, stop_on_sigterm

    def terminated_in_the_block():
        with stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode: not reached

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="SIGTERM"):
        terminated_in_the_block()
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(stop_on_sigterm().__enter__() or signal.getsignal(
        signal.SIGTERM)))
    thread.start()
    thread.join()
    assert seen == [before]


def test_a_signal_the_parent_ignores_stays_ignored():
    """``trap '' TERM`` before a command, or a training started in the background by a script (SIGINT ignored): the
    command's handlers replaced the ignored signal, so it stopped the run anyway (a review)."""
    code = ("import os, signal, time\n"
            "from samembed.stopping import StopBetweenSteps, stop_on_sigterm\n"
            "with stop_on_sigterm():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
            "with StopBetweenSteps() as steps:\n"
            "    os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
            "print('requested', steps.requested)\n")

    def ignored():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=ignored)
    assert res.returncode == 0 and res.stdout.strip() == "requested None", (res.returncode, res.stdout, res.stderr)


@pytest.mark.needs_data
@pytest.mark.parametrize("name", ["scan.nii.gz", "o.txt", "matches"])
def test_an_out_name_of_no_format_written_is_refused_and_the_file_there_kept(tmp_path, two_cts, a_points_csv, capsys,
                                                                             name):
    """Any other --out name got CSV text: ``--out scan.nii.gz`` replaced an image with a table (an audit)."""
    pts_path, _ = a_points_csv
    there = tmp_path / name
    there.write_bytes(b"an image")
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(there),
                 "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--out {there}: the matches are written as a .csv table" in err and "nothing was written" in err, err
    assert there.read_bytes() == b"an image"


@pytest.mark.needs_data
def test_out_given_as_the_heatmap_folder_is_refused_before_any_work(tmp_path, two_cts, a_points_csv, capsys):
    """``--out X --heatmap-dir X`` computed every match, then could not write X (a folder by then): nothing saved."""
    pts_path, _ = a_points_csv
    same = tmp_path / "res"
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(same),
                 "--heatmap-dir", str(same), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "is also the --heatmap-dir folder" in err and str(same / "matches.csv") in err, err
    assert not same.exists()


@pytest.mark.needs_data
def test_out_in_the_heatmap_folder_this_run_makes_is_accepted(tmp_path, two_cts, a_points_csv, capsys, monkeypatch):
    """``--heatmap-dir run/ --out run/matches.csv`` was refused ("output folder run does not exist") because --out was
    checked before the run made its heatmap folder (a review). The checks now pass and the engine is reached."""
    import samembed.cli as cli
    from samembed.errors import InputError

    def engine_reached(args):
        raise InputError("the engine was reached")

    monkeypatch.setattr(cli, "_make_matcher", engine_reached)
    pts_path, _ = a_points_csv
    run = tmp_path / "run"
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(run / "m.csv"),
                 "--heatmap-dir", str(run), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "the engine was reached" in err, err
    assert run.is_dir()
    # an --out elsewhere that cannot be written still leaves no new heatmap folder behind
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out",
                 str(tmp_path / "missing" / "m.csv"), "--heatmap-dir", str(tmp_path / "hm"), "--model",
                 "random:sam-lite", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "missing does not exist" in err and not (tmp_path / "hm").exists(), err


@pytest.mark.needs_data
def test_heatmaps_with_fused_atlases_are_refused_before_torch_loads(tmp_path, two_cts, a_points_csv):
    """The engine refuses heatmaps of several fused atlases, but the command let torch load (1-2 s) and made the
    output folders first (a review)."""
    pts_path, _ = a_points_csv
    code = ("import sys, samembed.cli as c; code = c.main(sys.argv[1:]); "
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr); sys.exit(code)")
    argv = ["match", "--atlas", str(two_cts[0]), str(pts_path), "--atlas", str(two_cts[1]), str(pts_path),
            str(two_cts[1]), "--out", str(tmp_path / "m.csv"), "--heatmap-dir", str(tmp_path / "hm"), "--model",
            "random:sam-lite", "--device", "cpu"]
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "heatmaps are not available when 2 atlases are fused" in res.stderr, res.stderr
    assert "TORCH False" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "hm").exists()


@pytest.mark.needs_data
def test_an_out_link_is_checked_where_it_points_before_any_work(tmp_path, two_cts, a_points_csv, capsys,
                                                                monkeypatch):
    """A link into a missing folder passed the check of its own folder, and the run lost everything at its end
    (from a review): outputs are written through links, so the check follows them too."""
    import samembed.cli as cli

    def no_engine(args):
        raise AssertionError("the engine was loaded: the output was not checked first")

    monkeypatch.setattr(cli, "_make_matcher", no_engine)
    pts_path, _ = a_points_csv
    link = tmp_path / "latest.csv"
    link.symlink_to(tmp_path / "missing" / "m.csv")
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(link),
                 "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 2 and "missing does not exist" in capsys.readouterr().err


@pytest.mark.needs_data
def test_a_read_only_cache_folder_is_read_from_and_the_batch_goes_on_with_one_warning(tmp_path, two_cts, a_points_csv,
                                                                                       monkeypatch, caplog):
    """A shared cache that ``samembed embed`` filled and others may only read: a target not in it stopped the
    batch at its turn (the write's refusal was an InputError, which the cache's warning did not catch)."""
    import logging

    pts_path, _ = a_points_csv
    cache = tmp_path / "cache"
    assert main(["embed", str(two_cts[0]), "--cache-dir", str(cache), "--model", "random:sam-lite", "--device", "cpu",
                 "--quiet"]) == 0
    before = sorted(p.name for p in cache.iterdir())
    real_access = os.access
    # read-only for this user (root may write anywhere, so the folder's refusal is what os.access says)
    monkeypatch.setattr(os, "access", lambda path, how, **k: False if (how & os.W_OK and Path(path) == cache)
                        else real_access(path, how, **k))
    out = tmp_path / "m.csv"
    third = data_file("ct", "openkbp", "ct", "pt_203_ct.nii.gz")
    with caplog.at_level(logging.WARNING, logger="samembed"):
        code = main(["match", str(two_cts[0]), str(two_cts[1]), str(third), "--points", str(pts_path), "--out",
                     str(out), "--cache-dir", str(cache), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 0
    assert len(list(csv.DictReader(out.open()))) == 4  # 2 points in each of the 2 targets
    warnings = [r.getMessage() for r in caplog.records if "could not write the embedding cache" in r.getMessage()]
    assert len(warnings) == 1 and "not writable" in warnings[0], warnings
    assert sorted(p.name for p in cache.iterdir()) == before


def test_a_missing_target_or_points_file_is_named(tmp_path, capsys):
    """Both got one usage line that did not say which part was missing (an audit)."""
    assert main(["match", "s.nii.gz", "--points", "p.csv", "--out", str(tmp_path / "o.csv")]) == 2
    assert "only one image (s.nii.gz): the source; add the target(s) after it" in capsys.readouterr().err
    assert main(["match", "s.nii.gz", "t.nii.gz", "--out", str(tmp_path / "o.csv")]) == 2
    assert "no --points FILE: the source's points to match" in capsys.readouterr().err


@pytest.mark.needs_data
def test_repeated_or_missing_labels_of_one_source_are_warned_of(tmp_path, two_cts, a_points_csv, caplog):
    """Two rows of one label (or none) were matched without a word; only their order told them apart (an audit)."""
    pts_path, _ = a_points_csv
    rows = pts_path.read_text().splitlines()
    first = rows[1].split(",", 1)[1]
    points = tmp_path / "p.csv"
    points.write_text("\n".join([rows[0], f"A,{first}", f"A,{first}", f",{first}"]) + "\n")
    with caplog.at_level("WARNING", logger="samembed"):
        assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(points), "--out",
                     str(tmp_path / "o.csv"), "--model", "random:sam-lite", "--device", "cpu", "--quiet",
                     "--no-polish"]) == 0
    assert any(f"{points}: labels repeat (A); 1 point(s) have no label" in r.getMessage() for r in caplog.records)


@pytest.mark.needs_data
def test_an_earlier_out_that_cannot_be_replaced_keeps_the_matches_beside_it(tmp_path, two_cts, a_points_csv,
                                                                            monkeypatch, capsys):
    """An --out that may not be replaced (immutable, read-only): the error named the temporary file, gone by then,
    and the finished matches were lost (an audit)."""
    import errno

    pts_path, _ = a_points_csv
    out = tmp_path / "o.csv"
    (tmp_path / "kept.csv").write_text("OLD\n")
    out.symlink_to(tmp_path / "kept.csv")  # (written through: the move into place names the link's target)
    real_replace = os.replace

    def refuse(src, dst, **kw):
        if os.path.realpath(dst) == os.path.realpath(out):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.chdir(tmp_path)  # --out as a user types it: relative
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", "o.csv",
                 "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: o.csv: Operation not permitted; the matches are in o.partial.csv" in err, err
    partial = tmp_path / "o.partial.csv"
    assert out.read_text() == "OLD\n" and partial.read_text().startswith("target,label,")
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary file left

    # only the move into place of the earlier --out goes beside it: a full disk while the table is written is
    # reported as it is, and nothing is written beside it (where the disk is as full)
    partial.unlink()
    monkeypatch.setattr(os, "replace", real_replace)
    from samembed import io as sio

    write = sio.write_text_atomic

    def full(path, text, *a, **k):  # (the --out only: a write beside it would succeed)
        if Path(path).name == "o.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text, *a, **k)

    monkeypatch.setattr(sio, "write_text_atomic", full)
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", "o.csv",
                 "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "partial" not in err, err
    assert out.read_text() == "OLD\n" and not partial.exists()


def test_a_file_this_user_may_not_read_is_named_as_such_with_exit_1(tmp_path, two_cts, a_points_csv, monkeypatch,
                                                                     capsys):
    """An image or a point file without read permission was called missing, or corrupt, with exit 2 (bad input)."""
    pts_path, _ = a_points_csv
    real_access = os.access
    for locked, place in ((Path(two_cts[1]), "image"), (Path(pts_path), "points")):
        monkeypatch.setattr(os, "access", lambda path, how, locked=locked, **k: False if (
            how & os.R_OK and Path(path) == locked) else real_access(path, how, **k))
        code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out",
                     str(tmp_path / "o.csv"), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert code == 1, (place, err)
        assert f"{locked}: permission denied" in err and "check its permissions" in err, (place, err)


@pytest.mark.needs_data
def test_a_mask_of_ones_searches_everywhere_and_a_2d_mask_for_3d_targets_is_refused_naming_it(tmp_path, two_cts,
                                                                                            a_points_csv, capsys):
    """A 2D ``--mask`` for 3D targets ended in an internal error (a numpy broadcast); a mask of ones, in the
    target's space, was refused as an image with nothing to match (it is constant)."""
    import SimpleITK as sitk

    pts_path, _ = a_points_csv
    target = sitk.ReadImage(str(two_cts[1]))
    ones = sitk.Image(target.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(target)
    everywhere = tmp_path / "ones.nii.gz"
    sitk.WriteImage(ones, str(everywhere))
    common = ["--model", "random:sam-lite", "--device", "cpu", "--quiet", "--no-polish"]
    plain, masked = tmp_path / "plain.csv", tmp_path / "masked.csv"
    assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(plain),
                 "--no-body-mask", *common]) == 0
    assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(masked),
                 "--mask", str(everywhere), *common]) == 0, capsys.readouterr().err
    assert masked.read_text() == plain.read_text()  # the mask replaces the body restriction: no restriction at all

    mask = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((128, 128), np.uint8)), str(mask))
    code = main(["match", str(two_cts[0]), str(two_cts[1]), str(two_cts[1]), "--points", str(pts_path), "--out",
                 str(tmp_path / "o.csv"), "--mask", str(mask), *common])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err, err
    # a setting for every target: said once, before any target is embedded (not as each target's problem)
    assert f"{mask}: the search mask is 2D but the source {two_cts[0]} and its targets are 3D" in err, err
    assert err.count("the search mask is 2D") == 1 and "skipped" not in err


@pytest.mark.needs_data
def test_a_mask_restricts_the_search_of_fused_atlases_too(tmp_path, two_cts, a_points_csv, capsys):
    """``--mask`` with ``--atlas`` was dropped without a word (a review of the docs: every match landed outside
    the mask). Each atlas now searches within it, as one source does; a mask of the wrong dimension is refused
    once, before any target."""
    import SimpleITK as sitk

    from samembed.io import read_image

    pts_path, _ = a_points_csv
    target = sitk.ReadImage(str(two_cts[1]))
    corner = np.zeros(sitk.GetArrayViewFromImage(target).shape, np.uint8)
    corner[:30, :30, :30] = 1  # a corner cube of the target (z, y, x), far from the points
    mask_image = sitk.GetImageFromArray(corner)
    mask_image.CopyInformation(target)
    mask = tmp_path / "cube.nii.gz"
    sitk.WriteImage(mask_image, str(mask))
    out = tmp_path / "fused.csv"
    common = ["--model", "random:sam-lite", "--device", "cpu", "--quiet", "--no-polish"]
    assert main(["match", "--atlas", str(two_cts[0]), str(pts_path), "--atlas", str(two_cts[0]), str(pts_path),
                 str(two_cts[1]), "--out", str(out), "--mask", str(mask), *common]) == 0, capsys.readouterr().err
    grid = read_image(two_cts[1]).grid
    rows = list(csv.DictReader(out.open()))
    ijk = np.rint(grid.lps_to_index(np.array([[float(r[k]) for k in "xyz"] for r in rows]))).astype(int)
    assert len(rows) == 2 and all(corner[k, j, i] for i, j, k in ijk), ijk
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((128, 128), np.uint8)), str(flat))
    assert main(["match", "--atlas", str(two_cts[0]), str(pts_path), "--atlas", str(two_cts[0]), str(pts_path),
                 str(two_cts[1]), str(two_cts[1]), "--out", str(tmp_path / "o.csv"), "--mask", str(flat), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("the search mask is 2D but the atlases and their targets are 3D") == 1, err


@pytest.mark.parametrize("spacing", ["nan", "0", "-1", "inf", "x"])
def test_a_spacing_that_is_no_length_is_refused_naming_the_flag(spacing, capsys):
    from samembed.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["match", "a.png", "b.png", "--points", "p.csv", "--out", "o.csv",
                                   "--spacing", spacing])
    assert "--spacing" in capsys.readouterr().err


def test_an_atlas_manifest_as_spreadsheets_write_it_is_read_and_one_without_rows_says_so(tmp_path):
    """A manifest with a byte-order mark or ';' separators was refused as lacking the columns image,points."""
    from types import SimpleNamespace

    from samembed.cli import _atlas_pairs
    from samembed.errors import InputError

    def pairs(text: str):
        path = tmp_path / "atlases.csv"
        path.write_bytes(text.encode("utf-8"))
        return _atlas_pairs(SimpleNamespace(atlas=None, atlases=str(path)))

    want = [(str(tmp_path / "a1.nii.gz"), str(tmp_path / "a1.csv")), (str(tmp_path / "a 2.nii.gz"), str(tmp_path / "a2.csv"))]
    for text in ("image,points\na1.nii.gz,a1.csv\na 2.nii.gz,a2.csv\n",
                 "\ufeffimage,points\r\na1.nii.gz,a1.csv\r\na 2.nii.gz,a2.csv\r\n",
                 "Image; Points\na1.nii.gz; a1.csv\na 2.nii.gz;a2.csv\n",
                 "image\tpoints\na1.nii.gz\ta1.csv\na 2.nii.gz\ta2.csv\n"):
        assert pairs(text) == want, text
    with pytest.raises(InputError, match="names no atlas"):
        pairs("image,points\n")
    with pytest.raises(InputError, match="header names the columns image,points"):
        pairs("scan,landmarks\na1.nii.gz,a1.csv\n")


@pytest.mark.needs_data
def test_embed_says_which_images_it_could_not_store_and_fails(tmp_path, two_cts, monkeypatch, caplog):
    """``samembed embed`` exists to fill a cache folder: on a full disk it stored nothing and still exited 0 after a
    warning (from an audit). Each image is tried; those not stored are named, and the exit status is 1."""
    import logging

    import samembed.tiles as tiles

    cache = tmp_path / "cache"
    real_write = tiles.write_entry

    def full_for_the_second(path, header, arrays):  # the disk fills up after the first entry
        if list(cache.glob("*.samemb.pt")):
            raise OSError(28, "No space left on device", str(path))
        return real_write(path, header, arrays)

    monkeypatch.setattr(tiles, "write_entry", full_for_the_second)
    with caplog.at_level(logging.WARNING, logger="samembed"):
        code = main(["embed", *map(str, two_cts), "--cache-dir", str(cache), "--model", "random:sam-lite",
                     "--device", "cpu", "--quiet"])
    assert code == 1
    assert len(list(cache.glob("*.samemb.pt"))) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"1 of 2 images were not stored in {cache}" in m and str(two_cts[1]) in m for m in errors), errors


def test_embed_skips_an_image_it_cannot_read_among_several_and_embeds_the_others(tmp_path, two_cts, caplog):
    """``samembed embed`` over many scans stopped at the first it could not read (exit 2), and the scans after it
    were never embedded; as ``samembed match`` does with targets, it is now named and skipped, the others are
    embedded, and the exit status is 3 (2 when none could be, or when it was the only one)."""
    import logging

    cache = tmp_path / "cache"
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(Path(two_cts[0]).read_bytes()[:20000])  # a download cut short
    common = ["--cache-dir", str(cache), "--model", "random:sam-lite", "--device", "cpu", "--quiet"]
    with caplog.at_level(logging.ERROR, logger="samembed"):
        code = main(["embed", str(two_cts[0]), str(cut), str(two_cts[1]), *common])
    assert code == 3
    assert len(list(cache.glob("*.samemb.pt"))) == 2  # the images before and after it
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith(f"image 2/3 skipped (the others go on): {cut}: cannot read this image") for m in errors)
    assert f"1 of 3 images could not be embedded (each is named above): {cut}" in errors
    assert main(["embed", str(cut), *common]) == 2
    assert main(["embed", str(cut), str(cut), *common]) == 2


def test_a_cache_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    """``match --cache-dir FILE`` warned "[Errno 17] File exists" and exited 0 with nothing cached; ``cache info
    FILE`` called it missing (from an audit)."""
    afile = tmp_path / "cache"
    afile.write_text("notes")
    code = main(["match", "a.nii.gz", "b.nii.gz", "--points", "p.csv", "--out", str(tmp_path / "o.csv"),
                 "--cache-dir", str(afile), "--model", "random:sam-lite", "--quiet"])
    assert code == 2 and f"--cache-dir {afile}: is a file, expected a folder" in capsys.readouterr().err
    assert main(["cache", "info", str(afile)]) == 2
    assert f"{afile}: is a file, not a cache folder" in capsys.readouterr().err
    assert afile.read_text() == "notes" and not (tmp_path / "o.csv").exists()


@pytest.mark.needs_data
def test_an_interrupt_as_the_table_is_written_still_keeps_the_matches(tmp_path, two_cts, a_points_csv, monkeypatch,
                                                                      caplog):
    """A Ctrl-C at the very start of writing (as the prefetch process was stopped, before the table) lost a batch
    whose every target was matched: "the matches were not written" (a review). The table, milliseconds of work, is
    written then all the same; the heatmaps are not started again."""
    from samembed import cli

    pts_path, _ = a_points_csv
    out = tmp_path / "m.csv"
    table = cli._write_table
    calls = []

    def interrupted_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        table(*args)

    monkeypatch.setattr(cli, "_write_table", interrupted_once)
    code = main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                 "--heatmap-dir", str(tmp_path / "hm"), "--model", "random:sam-lite", "--device", "cpu", "--quiet"])
    assert code == 130
    assert f"stopped while writing: the matches are in {out}; not every heatmap was written" in caplog.text
    assert len(list(csv.DictReader(out.open()))) == 2
    assert not (tmp_path / "hm").exists() or not list((tmp_path / "hm").iterdir())


@pytest.mark.needs_data
def test_the_partial_file_of_a_run_that_stops_may_not_be_an_input(tmp_path, two_cts, a_points_csv, capsys):
    """With an earlier --out there, a run that stops writes what it finished to ``<out>.partial.csv``; when that is
    the points file (a match table read back as points), it was overwritten (a review). It is refused first."""
    pts_path, _ = a_points_csv
    out = tmp_path / "m.csv"
    out.write_text("an earlier run's table\n")
    points = tmp_path / "m.partial.csv"
    points.write_bytes(pts_path.read_bytes())
    assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(points), "--out", str(out),
                 "--model", "random:sam-lite", "--device", "cpu", "--quiet"]) == 2
    assert f"{points}: writing it would overwrite the input {points}" in capsys.readouterr().err
    assert points.read_bytes() == pts_path.read_bytes() and out.read_text() == "an earlier run's table\n"


@pytest.mark.needs_data
def test_a_heatmap_folder_with_other_heatmaps_and_labels_that_share_a_file_name_are_told(tmp_path, two_cts,
                                                                                          a_points_csv, caplog):
    """An earlier run's heatmaps of other points lay beside this run's without a word, and labels that come out as
    the same file name were numbered silently (a review). Both are said before any work."""
    pts_path, pts = a_points_csv
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("label,x,y,z\n" + "".join(f"{lab},{p[0]},{p[1]},{p[2]}\n" for lab, p in zip(["a/b", "a_b"], pts)))
    heatmaps = tmp_path / "hm"
    heatmaps.mkdir()
    (heatmaps / "pt_202_ct_C_heatmap.nii.gz").write_bytes(b"an earlier run's")
    with caplog.at_level(logging.WARNING):
        assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(labelled), "--out",
                     str(tmp_path / "m.csv"), "--heatmap-dir", str(heatmaps), "--model", "random:sam-lite", "--device",
                     "cpu", "--quiet"]) == 0
    assert (f"{heatmaps} holds 1 heatmap(s) that this run does not write (of an earlier run's points or targets, "
            "e.g. pt_202_ct_C_heatmap.nii.gz)") in caplog.text
    assert "labels that would share a heatmap file name are told apart by a number: 'a_b' as 'a_b_2'" in caplog.text
    assert sorted(p.name for p in heatmaps.iterdir()) == ["pt_202_ct_C_heatmap.nii.gz", "pt_202_ct_a_b_2_heatmap.nii.gz",
                                                          "pt_202_ct_a_b_heatmap.nii.gz"]


@pytest.mark.needs_data
def test_a_run_that_stops_says_which_earlier_heatmaps_its_own_replaced(tmp_path, two_cts, a_points_csv, monkeypatch,
                                                                       caplog):
    """A stopped run said it kept an earlier run's table as it was, while its heatmaps had replaced that run's of
    the same names (a review): it says so now."""
    pts_path, _ = a_points_csv
    out, heatmaps = tmp_path / "m.csv", tmp_path / "hm"
    args = ["match", str(two_cts[0]), str(two_cts[1]), str(two_cts[0]), "--points", str(pts_path), "--out", str(out),
            "--heatmap-dir", str(heatmaps), "--model", "random:sam-lite", "--device", "cpu", "--jobs", "1", "--quiet"]
    assert main(args) == 0  # the earlier run
    _interrupt_the_second_match(monkeypatch)
    assert main(args) == 130
    assert (f"kept the matches of the 1 of 2 targets finished before this stopped, in {tmp_path / 'm.partial.csv'} "
            f"and {heatmaps} ({out}, of an earlier run, is left as it was); the heatmaps written replaced 2 of an "
            "earlier run's of the same names") in caplog.text, caplog.text


def test_embed_help_says_its_cache_folder_is_required(capsys):
    """``samembed embed --help`` showed ``--cache-dir`` as optional; without it the command refuses to run."""
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "embedding cache folder to fill (required)" in " ".join(capsys.readouterr().out.split())


def test_main_called_from_a_script_leaves_its_logging_as_it_found_it(tmp_path):
    """``samembed.cli.main()`` called logging.basicConfig: a script's root logger kept the command's handler and
    level (INFO) after it, and printed its own records in the command's format. Its lines still go to stderr."""
    script = ("import logging, sys\n"
              "from samembed.cli import main\n"
              "code = main(['match', 'missing.nii.gz', 'missing2.nii.gz', '--points', 'p.csv', '--out', 'o.csv'])\n"
              "root = logging.getLogger()\n"
              "print(code, len(root.handlers), root.level)\n")
    engine = Path(__file__).resolve().parents[2] / "SAMEmbedding"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(engine)})
    assert done.stdout.split() == ["2", "0", str(logging.WARNING)], done.stdout + done.stderr
    assert "p.csv: point file not found" in done.stderr


@pytest.mark.needs_data
def test_embed_stopped_says_what_it_stored_even_quietly(tmp_path, two_cts, monkeypatch, caplog):
    """An interrupted ``samembed embed`` kept its finished entries but said only "interrupted", and nothing with
    --quiet (a review)."""
    import logging

    import samembed.api as api

    cache = tmp_path / "cache"
    real_read = api.as_image

    def stop_at_the_second(path, *a, **k):  # Ctrl-C while the second image is read
        if str(path) == str(two_cts[1]):
            raise KeyboardInterrupt
        return real_read(path, *a, **k)

    monkeypatch.setattr(api, "as_image", stop_at_the_second)
    with caplog.at_level(logging.WARNING, logger="samembed"):
        assert main(["embed", *map(str, two_cts), "--cache-dir", str(cache), "--model", "random:sam-lite", "--device",
                     "cpu", "--quiet"]) == 130
    assert len(list(cache.glob("*.samemb.pt"))) == 1
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"stopped after 1 of 2 images: their embeddings are in {cache}; the same command again embeds the rest " \
           "(those are found there)" in said, said


@pytest.mark.needs_data
def test_figure_dir_draws_each_match_with_its_heatmap_and_is_refused_where_it_cannot(tmp_path, two_cts, a_points_csv,
                                                                                     monkeypatch, capsys):
    """``--figure-dir``: a picture per matched point and target from the command line (a new user's review: there
    was none); each drawn as its target finished, with the point's heatmap when --heatmap-dir is given; named as the
    heatmaps are; refused with fused atlases and with repeated labels, before anything is computed."""
    from samembed import figures

    drawn = []
    real = figures.save_match_figure

    def spy(path, source, point, target, match, heatmap=None, **kw):
        drawn.append((Path(path).name, Path(source.name).name, Path(target.name).name, heatmap is not None,
                      np.asarray(point, dtype=float), np.asarray(match, dtype=float)))
        return real(path, source, point, target, match, heatmap, **kw)

    monkeypatch.setattr(figures, "save_match_figure", spy)
    pts_path, _ = a_points_csv
    common = ["--model", "random:sam-lite", "--device", "cpu"]
    out, figs = tmp_path / "m.csv", tmp_path / "figs"
    assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out", str(out),
                 "--figure-dir", str(figs), "--heatmap-dir", str(tmp_path / "hm"), "--heatmap-grid", "model",
                 *common]) == 0
    assert f"and 2 figures in {figs}" in capsys.readouterr().out
    target_id = Path(two_cts[1]).name.split(".")[0]
    assert sorted(p.name for p in figs.iterdir()) == [f"{target_id}_A.png", f"{target_id}_B.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in figs.iterdir())
    rows = list(csv.DictReader(out.open()))
    source_points = list(csv.DictReader(pts_path.open()))
    for (name, source, target, with_map, point, match), row, given in zip(drawn, rows, source_points):
        assert name == f"{target_id}_{row['label']}.png" and with_map
        assert (source, target) == (Path(two_cts[0]).name, Path(two_cts[1]).name)
        np.testing.assert_allclose(match, [float(row[a]) for a in "xyz"], atol=1e-3)  # the match drawn is the row's
        np.testing.assert_allclose(point, [float(given[a]) for a in "xyz"])  # beside its own source point
    # refused before anything is computed: fused atlases, a label given twice
    doubled = tmp_path / "twice.csv"
    first = pts_path.read_text().splitlines()[1].split(",", 1)[1]
    doubled.write_text(f"label,x,y,z\nA,{first}\nA,{first}\n")
    for args, said in ((["--atlas", str(two_cts[0]), str(pts_path), "--atlas", str(two_cts[1]), str(pts_path),
                         str(two_cts[1])], "atlases are fused; match one atlas for them"),
                       ([str(two_cts[0]), str(two_cts[1]), "--points", str(doubled)],
                        "--figure-dir writes one figure per label")):
        drawn.clear()
        assert main(["match", *args, "--out", str(tmp_path / "n.csv"), "--figure-dir", str(tmp_path / "f2"),
                     *common]) == 2
        assert said in capsys.readouterr().err and not drawn and not (tmp_path / "f2").exists()


@pytest.mark.needs_data
def test_a_run_out_of_memory_says_so_and_what_to_do(tmp_path, two_cts, a_points_csv, monkeypatch, capsys):
    """Out of memory was "internal error: RuntimeError: ... can't allocate memory", or, where a library could not be
    mapped under a memory limit, an ImportError that read as a broken install (a review)."""
    import samembed.api as api

    pts_path, _ = a_points_csv
    for error in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 8589934592 bytes"),
                  ImportError("libtorch_cpu.so: failed to map segment from shared object")):
        def fail(*a, error=error, **k):
            raise error

        monkeypatch.setattr(api, "as_image", fail)
        assert main(["match", str(two_cts[0]), str(two_cts[1]), "--points", str(pts_path), "--out",
                     str(tmp_path / "o.csv"), "--model", "random:sam-lite", "--device", "cpu", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: out of memory ({type(error).__name__}") and "--jobs 1" in err, err
        assert "internal error" not in err


def test_samembed_info_shows_the_spacing_the_model_file_holds_where_the_registry_says_another(tmp_path, capsys,
                                                                                           monkeypatch):
    """A models.json entry whose spacing disagreed with its checkpoint was shown by ``samembed info``, while matching
    used the file's (a training review). The shipped entries agree with their files; a disagreeing one is told."""
    import json
    import shutil

    from samembed.models import models_dir
    from samembed.registry import checkpoint_header, registry

    for m in registry()["models"]:  # the shipped registry and its files agree
        if m.get("file") and (models_dir() / m["file"]).is_file():
            header = checkpoint_header(models_dir() / m["file"])
            assert header["preprocess"]["spacing_mm"] == m["spacing_mm"] == m["preprocess"]["spacing_mm"], m["name"]
            assert header["arch"] == m["architecture"], m["name"]
    shipped = next(m for m in registry()["models"] if m["name"] == "sam-lite-ct-fast")
    shutil.copy(models_dir() / shipped["file"], tmp_path / shipped["file"])
    (tmp_path / "models.json").write_text(json.dumps({"schema_version": 1, "models": [
        {**shipped, "spacing_mm": 4.0, "default_for_dim": 3}]}))
    monkeypatch.setenv("SAMEMBED_MODELS_DIR", str(tmp_path))
    assert main(["info"]) == 0
    assert "2.0 mm (models.json says 4.0: the file's is used)" in capsys.readouterr().out
