"""Multi-atlas fusion: robust to a gross outlier, identical to plain matching with one atlas, clear errors."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from samembed import Atlas, Matcher, MatchOptions
from samembed.cli import main
from samembed.errors import InputError
from samembed.fusion import FusionOptions, fuse_points, geometric_median, landmark_union

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
        # each atlas's own prediction, and whether it agreed
        assert [(name, ok) for name, _, _, ok in fused.per_atlas] == [
            *((f"atlas{i}.nii.gz", True) for i in range(4)), ("wrong.nii.gz", False)]
        assert np.allclose(fused.per_atlas[0][1], single.point_lps_mm)
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


def test_a_fused_landmark_of_one_atlas_says_so_in_its_markups_description():
    """The .mrk.json description of a fused landmark that one atlas carries had no atlas counts at all, though the
    CSV and the terminal gave them."""
    from samembed.result import markups_description

    one = {"score": 0.5, "confident": False, "roundtrip_mm": 3.0, "rematched": False, "polished": False,
           "ncc": float("nan"), "atlases": 1, "agreeing": 1, "spread_mm": 0.0}
    assert "atlases=1; agreeing=1; spread_mm=0.0" in markups_description(one, fused=True)
    assert "atlases" not in markups_description(one)  # a single atlas's match (not fused): nothing to count


@pytest.mark.needs_data
def test_atlases_with_other_landmarks_fuse_each_over_the_atlases_that_carry_it(matcher, ct_and_points, caplog):
    """Atlases may carry different landmarks (a structure outside one atlas's field of view): every atlas had to
    carry the same labels. Each landmark is fused over its own atlases, the rejected ones named among those."""
    ct, pts = ct_and_points
    only_a = Atlas(ct, pts[:1], ("a",), "s.nii.gz")
    full = [Atlas(ct, pts, ("a", "b", "c"), f"{k}.nii.gz") for k in "xy"]
    wrong = Atlas(ct, np.vstack([pts[1:] + [0.0, 60.0, 0.0], pts[:1]]), ("b", "c", "d"), "w.nii.gz")  # 60 mm off
    with caplog.at_level("WARNING", logger="samembed.api"):
        res = matcher.match_atlases([only_a, *full, wrong], [ct], FAST)
        matcher.match_atlases([only_a, *full, wrong], [ct], FAST)  # said once per matcher
    plain = {m.label: m for m in matcher.match(ct, np.vstack([pts, pts[:1]]), [ct], ["a", "b", "c", "d"], FAST).matches}
    got = {m.label: m for m in res.matches}
    assert [m.label for m in res.matches] == ["a", "b", "c", "d"]  # in the order the atlases first name them
    assert (got["a"].atlases, got["a"].agreeing, got["a"].rejected) == (3, 3, ())
    for lab in "bc":  # the wrong atlas is the one rejected (not the one at its place in the list of all atlases)
        assert (got[lab].atlases, got[lab].agreeing, got[lab].rejected) == (3, 2, ("w.nii.gz",))
    assert (got["d"].atlases, got["d"].agreeing) == (1, 1)  # carried by the wrong atlas only: its match,
    assert not got["d"].confident  # unconfirmed by any other (a review: "1 of 1 agree", confident)
    assert got["a"].confident == any(m.confident for m in (plain["a"],))  # three agree: as its round trip says
    for lab in "abcd":
        assert np.linalg.norm(got[lab].point_lps_mm - plain[lab].point_lps_mm) < 1e-6
    said = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(said) == 4, said  # s lacks b, c, d; x and y lack d; w lacks a (once each, over two calls)
    assert any(m.startswith("s.nii.gz lacks 3 of the 4 landmarks that the atlases carry (b, c, d)") for m in said)
    assert any(m.startswith("w.nii.gz lacks 1 of the 4 landmarks that the atlases carry (a)") for m in said)

    # a caller that said them itself (each worker of `samembed propagate`, whose command said them at its start)
    caplog.clear()
    other = Matcher(model="random:sam-lite", device="cpu")
    other.already_said(landmark_union([(a.display_name, a.labels) for a in [only_a, *full, wrong]])[1])
    with caplog.at_level("WARNING", logger="samembed.api"):
        other.match_atlases([only_a, *full, wrong], [ct], FAST)
    assert not [r for r in caplog.records if "lacks" in r.getMessage()]


@pytest.mark.needs_data
def test_the_cli_fuses_atlases_with_other_landmarks_and_names_an_atlas_whose_labels_repeat(tmp_path, ct_and_points,
                                                                                           capsys, caplog):
    ct, pts = ct_and_points
    path = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    (tmp_path / "a.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("abc", pts)))
    (tmp_path / "b.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("abd", pts)))
    argv = ["match", "--atlas", str(path), str(tmp_path / "a.csv"), "--atlas", str(path), str(tmp_path / "b.csv"),
            str(path), str(path), "--out", str(tmp_path / "o.csv"), "--model", "random:sam-lite", "--device", "cpu",
            "-q", "--no-polish"]
    with caplog.at_level("WARNING", logger="samembed.api"):
        assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(said) == 2, said  # once for each atlas, not per target
    assert f"{path} ({tmp_path / 'b.csv'}) lacks 1 of the 4 landmarks that the atlases carry (c)" in said[1]
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert [(r["label"], r["atlases"]) for r in rows] == [("a", "2"), ("b", "2"), ("c", "1"), ("d", "1")] * 2
    (tmp_path / "b.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("aba", pts)))
    argv[argv.index("--out") + 1] = str(tmp_path / "o2.csv")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path} ({tmp_path / 'b.csv'}): landmark labels repeat ('a')" in err
    assert not (tmp_path / "o2.csv").exists()
    # an atlas point without a label: the unlabelled points of two atlases were fused as one landmark ""
    (tmp_path / "b.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip(["a", "b", ""], pts)))
    assert main(argv) == 2
    assert f"{path} ({tmp_path / 'b.csv'}): 1 point(s) have no label" in capsys.readouterr().err


@pytest.mark.needs_data
def test_the_cli_fuses_atlases_and_writes_agreement_and_spread(tmp_path, ct_and_points, capsys):
    ct, pts = ct_and_points
    path = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    for name, shift in (("a", 0.0), ("b", 0.0), ("c", 60.0)):
        q = pts + [0.0, shift, 0.0]
        (tmp_path / f"{name}.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("xyz", q)))
    (tmp_path / "atlases.csv").write_text("image,points\n" + "".join(f"{path},{name}.csv\n" for name in "abc"))
    out = tmp_path / "o.csv"
    code = main(["match", "--atlases", str(tmp_path / "atlases.csv"), str(path), "--out", str(out),
                 "--model", "random:sam-lite", "--device", "cpu", "--no-polish"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == ["x", "y", "z"]
    assert all(r["atlases"] == "3" and r["agreeing"] == "2" and float(r["spread_mm"]) < 0.01 for r in rows)
    # the terminal says why a fused match is confident or not: how many atlases agree (its round trip, a median of
    # the agreeing atlases', read as "confident (round trip 24.7 mm)" beside "NOT confident (round trip 4.0 mm)")
    lines = [line for line in capsys.readouterr().out.splitlines() if "\tscore " in line]
    assert len(lines) == 3 and all(re.search(r"\t(NOT )?confident \(2 of 3 atlases agree, spread 0\.0 mm\)$", line)
                                   for line in lines), lines


@pytest.mark.parametrize("groups", [1, 2])
def test_atlases_with_no_consensus_are_said_to_disagree(groups):
    """Two atlases 60 mm apart (or two groups of two): every prediction lies beyond the limit of the first median.
    They were all reported as agreeing ("2/2"), and the fused point, one of the two, could be confident (an
    audit: a right parotid 107 mm off, "2 of 2 atlases agree"). None agree now; the point is the best-scoring's."""
    near, far = np.array([10.0, 20.0, 30.0]), np.array([70.0, 20.0, 30.0])
    points = np.array([near, far] * groups) + np.arange(2 * groups)[:, None] * 0.1
    scores = np.array([0.6, 0.8] * groups)
    f = fuse_points(points, scores)
    assert not f.agreeing.any()
    np.testing.assert_allclose(f.point_lps_mm, points[1])
    assert f.score == 0.8 and f.spread_mm > 25


def test_two_atlases_agree_only_within_the_limit_of_each_other_and_then_meet_in_between():
    """Two atlases 26 mm apart each lay within 15 mm of their midpoint: both were said to agree, and the fused point
    was the better-scoring one's, confident (a review: a rater's 26 mm error adopted). Two predictions now agree
    when each is within the limit of the fused point, and two that agree are averaged (weighted by score)."""
    apart = fuse_points(np.array([[0.0, 0, 0], [26.0, 0, 0]]), np.array([0.76, 0.78]))
    assert not apart.agreeing.any()
    np.testing.assert_allclose(apart.point_lps_mm, [26.0, 0, 0])  # the best-scoring's, agreed with by none
    near = fuse_points(np.array([[0.0, 0, 0], [10.0, 0, 0]]), np.array([0.5, 0.7]))
    assert near.agreeing.all()
    np.testing.assert_allclose(near.point_lps_mm, [10.0 * 0.7 / 1.2, 0, 0])
    assert near.spread_mm == pytest.approx(np.sqrt((5.0 ** 2 * 2 + (10 * 0.7 / 1.2 - 5) ** 2 * 2) / 2), rel=1e-9)
    # three: the far one is dropped, the two left meet in between
    three = fuse_points(np.array([[0.0, 0, 0], [2.0, 0, 0], [26.0, 0, 0]]), np.full(3, 0.8))
    assert three.agreeing.tolist() == [True, True, False]
    np.testing.assert_allclose(three.point_lps_mm, [1.0, 0, 0])


@pytest.mark.needs_data
def test_two_atlases_that_disagree_give_an_unconfident_match_that_says_so(matcher, ct_and_points):
    ct, pts = ct_and_points
    res = matcher.match_atlases([Atlas(ct, pts, ("a", "b", "c"), "here.nii.gz"),
                                 Atlas(ct, pts + [0.0, 60.0, 0.0], ("a", "b", "c"), "off.nii.gz")], [ct], FAST)
    for m in res.matches:
        assert m.atlases == 2 and m.agreeing == 0 and not m.confident
        assert set(m.rejected) == {"here.nii.gz", "off.nii.gz"}


@pytest.mark.needs_data
def test_atlases_with_integer_labels_are_fused(matcher, ct_and_points):
    """``match`` takes labels of any kind as text; ``match_atlases`` looked the matches up by the atlas's own
    integers and ended in a bare StopIteration after all the matching (an audit)."""
    ct, pts = ct_and_points
    res = matcher.match_atlases([Atlas(ct, pts, (1, 2, 3), "a.nii.gz"), Atlas(ct, pts, (1, 2, 3), "b.nii.gz")],
                                [ct], FAST)
    assert [m.label for m in res.matches] == ["1", "2", "3"] and all(m.agreeing == 2 for m in res.matches)


@pytest.mark.needs_data
def test_a_cancel_during_an_atlas_keeps_the_targets_already_fused(matcher, ct_and_points):
    """The cancel came while an atlas was matched into the second target: its own empty, unfused result was the
    partial one, and the first target's fused matches were lost (an audit)."""
    import threading

    from samembed import Cancelled

    ct, pts = ct_and_points
    atlases = [Atlas(ct, pts, ("a", "b", "c"), f"atlas{i}.nii.gz") for i in range(2)]
    cancel = threading.Event()

    def progress(done, total, phase):
        if phase.startswith("atlas 2/2 into target 2/2"):
            cancel.set()  # while the second atlas is matched into the second target

    with pytest.raises(Cancelled) as stopped:
        matcher.match_atlases(atlases, [ct, ct], FAST, progress=progress, cancel=cancel)
    partial = stopped.value.partial
    assert len(partial.targets) == 1 and len(partial.matches) == 3 and all(m.atlases == 2 for m in partial.matches)
    assert "after 1 of 2 targets" in str(stopped.value)


@pytest.mark.needs_data
def test_atlases_one_per_folder_are_told_apart_where_they_are_rejected(tmp_path, ct_and_points):
    """Atlases laid out as ``pat_a/ct.nii.gz``, ``pat_b/ct.nii.gz``: the outputs named a rejected atlas by its file
    name alone, the same for all (an audit). They are named by their folder too."""
    import json

    ct, pts = ct_and_points
    path = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    rows = []
    for name, shift in (("pat_a", 0.0), ("pat_b", 60.0), ("pat_c", 0.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ct.nii.gz").symlink_to(path)
        q = pts + [0.0, shift, 0.0]
        (tmp_path / name / "points.csv").write_text(
            "label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("xyz", q)))
        rows.append(f"{name}/ct.nii.gz,{name}/points.csv\n")
    (tmp_path / "atlases.csv").write_text("image,points\n" + "".join(rows))
    out = tmp_path / "fused.mrk.json"
    assert main(["match", "--atlases", str(tmp_path / "atlases.csv"), str(path), "--out", str(out),
                 "--model", "random:sam-lite", "--device", "cpu", "-q", "--no-polish"]) == 0
    points = json.loads(out.read_text())["markups"][0]["controlPoints"]
    assert all("rejected=pat_b/ct.nii.gz" in p["description"] for p in points), [p["description"] for p in points]
    table = tmp_path / "fused.csv"  # the CSV says it too (it had no such column)
    assert main(["match", "--atlases", str(tmp_path / "atlases.csv"), str(path), "--out", str(table),
                 "--model", "random:sam-lite", "--device", "cpu", "-q", "--no-polish"]) == 0
    assert [r["rejected"] for r in csv.DictReader(table.open())] == ["pat_b/ct.nii.gz"] * 3


@pytest.mark.needs_data
def test_one_image_annotated_by_several_raters_names_the_rejected_rater(tmp_path, ct_and_points):
    """One image is an atlas three times, with three raters' landmarks: the rejected atlas was named by the image
    alone, which all three share. It is named by its point file too."""
    ct, pts = ct_and_points
    path = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    args = []
    for name, shift in (("rater_a", 0.0), ("rater_b", 60.0), ("rater_c", 0.0)):
        q = pts + [0.0, shift, 0.0]
        (tmp_path / f"{name}.csv").write_text("label,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in zip("xyz", q)))
        args += ["--atlas", str(path), str(tmp_path / f"{name}.csv")]
    table = tmp_path / "fused.csv"
    assert main(["match", *args, str(path), "--out", str(table), "--model", "random:sam-lite", "--device", "cpu", "-q",
                 "--no-polish"]) == 0
    assert [r["rejected"] for r in csv.DictReader(table.open())] == ["pt_201_ct.nii.gz (rater_b.csv)"] * 3


@pytest.mark.needs_data
def test_an_atlas_given_twice_is_named_in_a_warning(matcher, ct_and_points, caplog):
    """It counts twice in every fusion (an audit: [A, A, B] moved a parotid 106 mm against [A, B]), without a
    word before."""
    import logging

    ct, pts = ct_and_points
    a = Atlas(ct, pts, ("a", "b", "c"), "a.nii.gz")
    with caplog.at_level(logging.WARNING, logger="samembed.api"):
        matcher.match_atlases([a, Atlas(ct, pts + [0.0, 5.0, 0.0], ("a", "b", "c"), "b.nii.gz")], [ct], FAST)
        assert not [r for r in caplog.records if "given twice" in r.getMessage()]
        matcher.match_atlases([a, a], [ct], FAST)
    assert any("atlas a.nii.gz is given twice" in r.getMessage() for r in caplog.records)


@pytest.mark.needs_data
def test_an_atlas_read_twice_is_named_in_a_warning_and_odd_names_stay_apart(tmp_path, ct_and_points, caplog):
    """The duplicate check compared image objects, so the same file read twice (the command reads ``a.nii.gz`` and
    ``./a.nii.gz`` apart) was not seen; names holding ``|`` or ``;`` made the rejected list unsplittable (a
    review)."""
    import logging

    from samembed.cli import _rejected
    from samembed.io import read_image
    from samembed.result import Match

    ct, pts = ct_and_points
    again = read_image(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz"))
    assert again is not ct
    with caplog.at_level(logging.WARNING, logger="samembed.api"):
        Matcher("random:sam-lite", device="cpu").match_atlases(
            [Atlas(ct, pts, ("a", "b", "c"), "one"), Atlas(again, pts, ("a", "b", "c"), "two")], [ct], FAST)
    assert any("atlas two is given twice" in r.getMessage() for r in caplog.records)
    m = Match("a", "t", 0, np.zeros(3), 0.5, False, 1.0, rejected=("x|y/ct.nii.gz", "d; rejected=z"))
    names = {"x|y/ct.nii.gz": "x|y/ct.nii.gz", "d; rejected=z": "d; rejected=z"}
    assert _rejected(m, names) == "x%7Cy/ct.nii.gz|d%3B rejected=z"


@pytest.mark.needs_data
def test_atlases_of_two_dimensions_are_refused_before_any_target(matcher, ct_and_points, monkeypatch):
    """A radiograph among CT atlases: refused at once, naming each atlas's dimension (each target was matched by the
    CT atlases first, then refused by the radiograph's turn as if the target were at fault, and skipped)."""
    from samembed import TargetError

    ct, pts = ct_and_points
    xray = data_file("xray", "hand_dha37", "images", "3143.jpg")
    calls = []
    match = Matcher.match
    monkeypatch.setattr(Matcher, "match", lambda self, *a, **k: (calls.append(1), match(self, *a, **k))[1])
    atlases = [Atlas(ct, pts, ("a", "b", "c"), "ct.nii.gz"), Atlas(str(xray), [[10.0, 10.0]], ("a",))]
    with pytest.raises(InputError, match=rf"the atlases are not all of one dimension: ct.nii.gz \(3D\), {xray} \(2D\)") as err:
        matcher.match_atlases(atlases, [ct, ct], FAST)
    assert not isinstance(err.value, TargetError) and not calls


@pytest.mark.needs_data
def test_atlas_matches_keep_their_notes_their_names_apart_and_refuse_a_wrong_count_of_target_names(
        matcher, ct_and_points, monkeypatch):
    """``match_atlases`` dropped the notes of its atlases' matches (a point in air: the Slicer module shows notes
    only), named every in-memory atlas "atlas", and with 1 name for 2 targets matched the first, then raised a bare
    IndexError (a review)."""
    from samembed.image import Image

    ct, pts = ct_and_points
    corner = ct.grid.index_to_lps([[2.0, 2.0, 60.0]])  # air beside the head
    first = Atlas(Image(ct.array, ct.grid, ""), np.vstack([pts, corner]), ("a", "b", "c", "air"))
    second = Atlas(Image(ct.array, ct.grid, ""), np.vstack([pts, corner]), ("a", "b", "c", "air"))
    res = matcher.match_atlases([first, second], [ct], FAST)
    assert any("lie outside the body" in n and "'air'" in n for n in res.notes), res.notes
    named = {m.label: m for m in res.matches}["a"]
    assert sorted(name for name, *_ in named.per_atlas) == ["atlas 1", "atlas 2"], named.per_atlas
    assert "target0_s" in res.timings and all(v >= 0 for v in res.timings.values()), res.timings
    calls = []
    monkeypatch.setattr(Matcher, "match", lambda self, *a, **k: calls.append(1))
    with pytest.raises(InputError, match="1 target names for 2 targets"):
        matcher.match_atlases([first, second], [ct, ct], FAST, target_names=["one"])
    assert not calls


def test_far_atlases_do_not_agree_because_other_outliers_widen_the_limit():
    """The limit of ``outlier_mads`` MADs took the outliers' own deviations: among 3 atlases at 0, 60 and 200 mm the
    two 60 mm apart agreed, and 2 atlases at 90 and 120 mm joined 2 that agree within 1 mm (a review)."""
    three = fuse_points(np.array([[0.0, 0, 0], [60, 0, 0], [0, 200, 0]]), np.ones(3))
    assert not three.agreeing.any(), three
    four = fuse_points(np.array([[0.0, 0, 0], [1, 0, 0], [0, 90, 0], [120, 0, 0]]), np.ones(4))
    assert four.agreeing.tolist() == [True, True, False, False] and four.spread_mm < 1.0, four


def test_small_api_inputs_are_taken_or_refused_as_the_rest_of_the_api_takes_them():
    """From a review of the scripting API: ``Atlas(image, points, None)`` raised TypeError (``match`` takes labels
    None), ``FusionOptions(outlier_mm=np.float32(10))`` was refused (MatchOptions takes numpy numbers),
    ``Matcher(max_tile_voxels="big")`` raised a bare ValueError, and a heatmap key not in a result raised a bare
    KeyError from ``on_model_grid``, ``image_grid`` and ``model_grid``."""
    from samembed.heatmap import Heatmaps

    assert Atlas("a.nii.gz", [[0.0, 0, 0], [1, 1, 1]], None).labels == ("P1", "P2")
    assert FusionOptions(outlier_mm=np.float32(10)).outlier_mm == 10.0
    with pytest.raises(InputError, match="max_tile_voxels must be a whole number"):
        Matcher("random:sam-lite", device="cpu", max_tile_voxels="big")
    for read in (Heatmaps().on_model_grid, Heatmaps().image_grid, Heatmaps().model_grid, Heatmaps().make):
        with pytest.raises(KeyError, match="no heatmaps in this result"):
            read((5, "L2"))


def test_a_fused_landmark_is_confident_when_most_atlases_agree_two_at_least_and_one_of_them_was():
    """The fused rule, on hand-made matches (every fusion test used self-matching atlases, always confident, and
    none had 2 of 4 agreeing, so dropping either half of the rule passed them all: a review)."""
    from types import SimpleNamespace

    from samembed.result import Match

    def fused(*matches):  # (point, confident) of each atlas that carries landmark "L"
        atlases = [SimpleNamespace(display_name=f"atlas{n}") for n in range(len(matches))]
        per_atlas = [SimpleNamespace(matches=[Match("L", "t", 0, np.array(p, dtype=float), 0.9, c, 1.0 if c else 30.0)])
                     for p, c in matches]
        (m,) = Matcher._fused(atlases, per_atlas, ["L"], FusionOptions(), 0, "t")
        return m.agreeing, m.confident

    here, near, far, farther = (0, 0, 0), (2, 0, 0), (60, 0, 0), (0, 80, 0)
    assert fused((here, True), (near, False), (far, False)) == (2, True)  # 2 of 3 agree, one was confident
    assert fused((here, False), (near, False), (far, False)) == (2, False)  # ... none of them was
    assert fused((here, True), (near, True), (far, False), (farther, False)) == (2, False)  # 2 of 4: no majority
    assert fused((here, True), (near, False), ((1, 1, 0), False), (far, True)) == (3, True)  # 3 of 4
    assert fused((here, True),) == (1, False)  # one atlas alone: nothing confirms it
