"""Several atlases (volume + point list pairs) fused into a target through the Slicer logic, in this process and
in the engine process: the outlier atlas is rejected and named, the inputs are untouched."""

from __future__ import annotations

import numpy as np
import pytest

from samembed import InputError, MatchOptions
from SAMEmbeddingLib.logic import MatchLogic

from .mrml_helpers import add_points, control_points, ijk_to_ras

pytestmark = pytest.mark.needs_data

FAST = MatchOptions(polish=False)


def _atlases(scene, ct):
    pts = np.array([(ijk_to_ras(ct) @ np.r_[ijk, 1.0])[:3] for ijk in ([64.0, 64, 10], [40, 80, 8], [90, 50, 12])])
    good = [add_points(scene, pts, ["A", "B", "C"], name=f"atlas {i}") for i in range(3)]
    wrong = add_points(scene, pts + [0.0, 40.0, 0.0], ["A", "B", "C"], name="wrong atlas")
    return pts, [(ct, p) for p in good] + [(ct, wrong)]


def _check(nodes, ct, pts, logic):
    assert len(nodes) == 1 and nodes[0].GetName() == f"{ct.GetName()} fused matches"
    labels, ras = control_points(nodes[0])
    assert labels == ["A", "B", "C"]
    plain = logic.getMatcher().match(logic.imageForVolume(ct), np.c_[-pts[:, :2], pts[:, 2]],
                                     [logic.imageForVolume(ct)], ["A", "B", "C"], FAST)
    np.testing.assert_allclose(ras, [m.point_ras_mm for m in plain.matches], atol=1e-6)
    for i in range(3):
        text = nodes[0].GetNthControlPointDescription(i)
        assert "3 of 4 atlases agree" in text and "wrong atlas" in text


def test_the_logic_fuses_atlases_and_rejects_the_outlier(a_scene, a_logic, a_small_ct):
    pts, atlases = _atlases(a_scene, a_small_ct)
    before = [control_points(p)[1].copy() for _, p in atlases]
    nodes = a_logic.matchAtlases(atlases, [a_small_ct], FAST)
    _check(nodes, a_small_ct, pts, a_logic)
    assert all(np.array_equal(b, control_points(p)[1]) for b, (_, p) in zip(before, atlases))  # inputs untouched
    again = a_logic.matchAtlases(atlases, [a_small_ct], FAST)  # the same node is updated
    assert again[0].GetID() == nodes[0].GetID() and control_points(again[0])[0] == ["A", "B", "C"]


def test_atlases_with_other_labels_fuse_each_over_its_own_and_the_log_names_them(a_scene, a_logic, a_small_ct, caplog):
    pts, atlases = _atlases(a_scene, a_small_ct)
    other = add_points(a_scene, pts, ["A", "B", "D"], name="odd atlas")
    with caplog.at_level("WARNING", logger="SAMEmbeddingLib.logic"):
        nodes = a_logic.matchAtlases([*atlases, (a_small_ct, other)], [a_small_ct], FAST)
    labels, _ = control_points(nodes[0])
    assert labels == ["A", "B", "C", "D"]
    assert "4 of 5 atlases agree" in nodes[0].GetNthControlPointDescription(0)
    assert "3 of 4 atlases agree" in nodes[0].GetNthControlPointDescription(2)  # C: the odd atlas lacks it
    assert "1 of 1 atlases agree" in nodes[0].GetNthControlPointDescription(3)
    said = [r.getMessage() for r in caplog.records if r.name == "SAMEmbeddingLib.logic"]
    assert any("odd atlas lacks 1 of the 4 landmarks that the atlases carry (C)" in m for m in said), said
    with pytest.raises(InputError, match="odd atlas.*landmark labels repeat \\('A'\\)"):
        a_logic.matchAtlases([*atlases, (a_small_ct, add_points(a_scene, pts, ["A", "B", "A"], name="odd atlas"))],
                             [a_small_ct], FAST)


def test_the_engine_process_fuses_the_same_way(a_scene, a_small_ct, caplog):
    logic = MatchLogic(a_scene, model="random:sam-lite", device="cpu", cacheBytes=1 << 30, engine="process")
    try:
        pts, atlases = _atlases(a_scene, a_small_ct)
        here = MatchLogic(a_scene, model="random:sam-lite", device="cpu")
        nodes = logic.matchAtlases(atlases, [a_small_ct], FAST)
        _check(nodes, a_small_ct, pts, here)
        # the engine process logs to its own stream: what it warns of is logged here too (it was not shown in Slicer)
        with caplog.at_level("WARNING", logger="SAMEmbeddingLib.logic"):
            logic.matchAtlases([*atlases, atlases[0]], [a_small_ct], FAST)
        assert any("atlas small CT / atlas 0 is given twice" in r.getMessage() for r in caplog.records), caplog.records
    finally:
        logic.close()


def test_a_target_that_cannot_be_matched_is_skipped_and_the_others_are_fused(a_scene, a_logic, a_small_ct, caplog):
    """The atlases were fused into every target in one engine call, so a target of its own problem (here too small
    for the model) stopped all of them; it is now named and skipped, and the others get their lists, with each
    warning about the atlases said once. None of several matched is an error, as a lone target's is."""
    from .mrml_helpers import add_volume, voxels

    pts, atlases = _atlases(a_scene, a_small_ct)
    other = add_points(a_scene, pts, ["A", "B", "D"], name="odd atlas")
    tiny = add_volume(a_scene, voxels(a_small_ct)[:2, :3, :3].copy(), ijk_to_ras(a_small_ct), "tiny")
    copy = add_volume(a_scene, voxels(a_small_ct), ijk_to_ras(a_small_ct), "copy")
    with caplog.at_level("WARNING", logger="SAMEmbeddingLib.logic"):
        nodes = a_logic.matchAtlases([*atlases, (a_small_ct, other)], [a_small_ct, tiny, copy], FAST)
    assert [n.GetName() for n in nodes] == ["small CT fused matches", "copy fused matches"]
    np.testing.assert_allclose(control_points(nodes[1])[1], control_points(nodes[0])[1], atol=1e-6)
    said = [r.getMessage() for r in caplog.records if r.name == "SAMEmbeddingLib.logic"]
    assert any("tiny skipped (the other targets go on)" in m and "too small" in m for m in said), said
    assert sum("odd atlas lacks" in m for m in said) == 1, said
    tiny2 = add_volume(a_scene, voxels(a_small_ct)[:2, :3, :3].copy(), ijk_to_ras(a_small_ct), "tiny 2")
    with pytest.raises(InputError, match="none of the 2 targets could be matched: tiny: .*too small.*; tiny 2: "):
        a_logic.matchAtlases(atlases, [tiny, tiny2], FAST)


def test_fused_landmarks_in_a_target_skipped_later_are_kept_and_marked_as_not_updated(a_scene, a_logic, a_small_ct,
                                                                                      monkeypatch):
    """A target skipped by a later fusion kept the earlier fused list unmarked; its landmarks are now kept and marked
    (uncertain colour, the reason in the description, ``notUpdated`` in their data)."""
    from SAMEmbeddingLib.logic import _matchRecords

    from .mrml_helpers import add_volume, voxels
    from .test_logic import _SkipsTarget

    _, atlases = _atlases(a_scene, a_small_ct)
    copy = add_volume(a_scene, voxels(a_small_ct), ijk_to_ras(a_small_ct), "copy")
    nodes = a_logic.matchAtlases(atlases, [a_small_ct, copy], FAST)
    before = control_points(nodes[1])[1]
    real = a_logic.getMatcher()
    monkeypatch.setattr(a_logic, "getMatcher", lambda: _SkipsTarget(real, "copy"))
    again = a_logic.matchAtlases(atlases, [a_small_ct, copy], FAST)
    assert [n.GetName() for n in again] == ["small CT fused matches"]
    np.testing.assert_array_equal(control_points(nodes[1])[1], before)
    records = _matchRecords(nodes[1])
    assert records and all(r["notUpdated"] == "copy: nothing to search in the box" for r in records.values())
    for i in range(nodes[1].GetNumberOfControlPoints()):
        assert not nodes[1].GetNthControlPointSelected(i)
        assert "atlases agreed" in nodes[1].GetNthControlPointDescription(i)
    assert not any("notUpdated" in r for r in _matchRecords(nodes[0]).values())
    # the target alone: its error is raised, and its earlier landmarks are marked all the same
    monkeypatch.setattr(a_logic, "getMatcher", lambda: real)
    nodes = a_logic.matchAtlases(atlases, [copy], FAST)
    assert not any("notUpdated" in r for r in _matchRecords(nodes[0]).values())
    monkeypatch.setattr(a_logic, "getMatcher", lambda: _SkipsTarget(real, "copy"))
    from samembed import TargetError

    with pytest.raises(TargetError, match="nothing to search in the box"):
        a_logic.matchAtlases(atlases, [copy], FAST)
    assert all("notUpdated" in r for r in _matchRecords(nodes[0]).values())
