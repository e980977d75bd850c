"""Multi-atlas fusion: robust to a gross outlier, identical to plain matching with one atlas, clear errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from samembed import Atlas, Matcher, MatchOptions
from samembed.cli import main
from samembed.errors import InputError
from samembed.fusion import FusionOptions, fuse_points, geometric_median

from ..conftest import data_file

FAST = MatchOptions(polish=False)


def test_the_geometric_median_ignores_one_far_point_and_the_weights_pull():
    p = np.array([[0.0, 0, 0], [2, 0, 0], [0, 2, 0], [2, 2, 0], [100, 100, 0]])
    m = geometric_median(p, np.ones(5))
    assert np.linalg.norm(m - [1, 1, 0]) < 1.5
    heavy = geometric_median(p[:4], np.array([10.0, 1, 1, 1]))
    assert np.linalg.norm(heavy) < np.linalg.norm(geometric_median(p[:4], np.ones(4)))


def test_a_gross_outlier_among_five_predictions_is_rejected_and_reported():
    rng = np.random.default_rng(0)
    agree = np.array([10.0, 20, 30]) + rng.normal(0, 1.5, (4, 3))
    p = np.vstack([agree, [[70.0, 20, 30]]])
    f = fuse_points(p, np.array([0.9, 0.8, 0.85, 0.9, 0.95]))
    assert f.agreeing.tolist() == [True, True, True, True, False]
    assert np.linalg.norm(f.point_lps_mm - agree.mean(0)) < 2.0 and f.spread_mm < 4.0
    with pytest.raises(InputError, match="outlier_mm must be a finite number > 0"):
        FusionOptions(outlier_mm=-1)


@pytest.fixture(scope="module")
def ct_and_points():
    from samembed.io import read_image

    ct = read_image(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz"))
    return ct, ct.grid.index_to_lps([[64, 60, 70], [50, 70, 40], [70, 55, 90]])


@pytest.fixture(scope="module")
def matcher():
    return Matcher("random:sam-lite", device="cpu")


@pytest.mark.needs_data
def test_with_a_gross_outlier_among_five_atlases_the_fused_point_stays_with_the_four(matcher, ct_and_points):
    ct, pts = ct_and_points
    labels = ("a", "b", "c")
    good = [Atlas(ct, pts, labels, f"atlas{i}.nii.gz") for i in range(4)]
    wrong = Atlas(ct, pts + [0.0, 60.0, 0.0], labels, "wrong.nii.gz")  # landmarks placed 60 mm off
    res = matcher.match_atlases([*good, wrong], [ct], FAST)
    plain = matcher.match(ct, pts, [ct], list(labels), FAST)
    for fused, single in zip(res.matches, plain.matches):
        assert fused.atlases == 5 and fused.agreeing == 4 and fused.rejected == ("wrong.nii.gz",)
        assert np.linalg.norm(fused.point_lps_mm - single.point_lps_mm) < 1e-6
        assert fused.spread_mm < 1e-6


@pytest.mark.needs_data
def test_one_atlas_gives_exactly_the_plain_match(matcher, ct_and_points):
    ct, pts = ct_and_points
    plain = matcher.match(ct, pts, [ct], ["a", "b", "c"], FAST)
    fused = matcher.match_atlases([Atlas(ct, pts, ("a", "b", "c"))], [ct], FAST)
    assert len(fused.matches) == len(plain.matches)
    for f, p in zip(fused.matches, plain.matches):
        assert np.array_equal(f.point_lps_mm, p.point_lps_mm)
        assert (f.label, f.score, f.confident, f.roundtrip_mm, f.atlases) == (p.label, p.score, p.confident, p.roundtrip_mm, 1)


@pytest.mark.needs_data
def test_mismatched_labels_between_atlases_name_the_atlas_file(tmp_path, ct_and_points, capsys):
    ct, pts = ct_and_points
    path = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    (tmp_path / "a.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("abc", pts)))
    (tmp_path / "b.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("abd", pts)))
    code = main(["match", "--atlas", str(path), str(tmp_path / "a.csv"), "--atlas", str(path), str(tmp_path / "b.csv"),
                 str(path), "--out", str(tmp_path / "o.csv"), "--model", "random:sam-lite", "--device", "cpu", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "missing ['c']" in err and "extra ['d']" in err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.needs_data
def test_the_cli_fuses_atlases_and_writes_agreement_and_spread(tmp_path, ct_and_points):
    ct, pts = ct_and_points
    path = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    for name, shift in (("a", 0.0), ("b", 0.0), ("c", 60.0)):
        q = pts + [0.0, shift, 0.0]
        (tmp_path / f"{name}.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("xyz", q)))
    (tmp_path / "atlases.csv").write_text("image,points\n" + "".join(f"{path},{name}.csv\n" for name in "abc"))
    out = tmp_path / "o.csv"
    code = main(["match", "--atlases", str(tmp_path / "atlases.csv"), str(path), "--out", str(out),
                 "--model", "random:sam-lite", "--device", "cpu", "-q", "--no-polish"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == ["x", "y", "z"]
    assert all(r["atlases"] == "3" and r["agreeing"] == "2" and float(r["spread_mm"]) < 0.01 for r in rows)
