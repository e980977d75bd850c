"""Several atlases (volume + point list pairs) fused into a target through the Slicer logic, in this process and
in the engine process: the outlier atlas is rejected and named, the inputs are untouched."""

from __future__ import annotations

import numpy as np
import pytest

from samembed import InputError, MatchOptions
from SAMEmbeddingLib.logic import MatchLogic

from .mrml_helpers import add_points, control_points, ijk_to_ras, threads_calling, with_torch_threads

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
    progress = []
    # (torch on one thread: the atlases one at a time)
    nodes = with_torch_threads(1, lambda: a_logic.matchAtlases(atlases, [a_small_ct], FAST,
                                                               progress=lambda *a: progress.append(a)))
    # a single target: the progress names each atlas as it is matched
    assert [p[2] for p in progress if p[2].startswith("atlas ")] == [f"atlas {k}/4 into target 1/1" for k in (1, 2, 3, 4)]
    assert progress[-1][:2] == (1, 1), progress
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
    progress = []
    with caplog.at_level("WARNING", logger="SAMEmbeddingLib.logic"):
        nodes = a_logic.matchAtlases([*atlases, (a_small_ct, other)], [a_small_ct, tiny, copy], FAST,
                                     progress=lambda *a: progress.append(a))
    assert [n.GetName() for n in nodes] == ["small CT fused matches", "copy fused matches"]
    assert progress[-1][:2] == (3, 3) and any(p[2] == "Skipped tiny" for p in progress), progress
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


def _three_targets(scene, ct):
    """``ct`` and two translated copies of it, with their translations (LPS = RAS with x, y negated; mm)."""
    from .mrml_helpers import add_volume, voxels

    shifts = [np.zeros(3), np.array([37.5, -12.0, 8.0]), np.array([-20.0, 15.0, -6.0])]
    targets = [ct]
    for n, shift in enumerate(shifts[1:]):
        moved = ijk_to_ras(ct)
        moved[:3, 3] += shift
        targets.append(add_volume(scene, voxels(ct), moved, f"shifted {n}"))
    return targets, shifts


def test_atlases_are_fused_into_targets_two_at_a_time_and_written_in_the_callers_thread(a_scene, a_logic, a_small_ct,
                                                                                      monkeypatch, caplog):
    """With two torch threads the engine in this process fuses the atlases into the first target alone, then into
    the other two at once (``Matcher.match_each``); every fused list is written in the caller's thread (MRML), the
    lists come back in the targets' order, the progress counts targets, and each translated copy's fused landmarks
    move exactly with its translation."""
    import logging
    import threading

    _, atlases = _atlases(a_scene, a_small_ct)
    targets, shifts = _three_targets(a_scene, a_small_ct)
    progress = []
    writers = threads_calling(monkeypatch, a_logic, "_writeFused")
    caplog.set_level(logging.INFO, logger="samembed.jobs")
    nodes = with_torch_threads(2, lambda: a_logic.matchAtlases(atlases, targets, FAST,
                                                               progress=lambda *a: progress.append(a)))

    assert writers == [threading.get_ident()] * 3
    assert "3 targets: the first alone, then 2 at a time" in caplog.text
    assert [n.GetName() for n in nodes] == [f"{t.GetName()} fused matches" for t in targets]
    assert [p[0] for p in progress] == sorted(p[0] for p in progress) and progress[-1][:2] == (3, 3), progress
    assert any("Fusing 3 landmark(s) of 4 atlases in shifted 0 and shifted 1" in p[2] for p in progress), progress
    labels, in_self = control_points(nodes[0])
    for node, shift in zip(nodes[1:], shifts[1:]):
        assert control_points(node)[0] == labels
        np.testing.assert_allclose(control_points(node)[1], in_self + shift, atol=1e-3)
        assert "3 of 4 atlases agree" in node.GetNthControlPointDescription(0)


def test_a_cancel_after_the_first_fused_target_keeps_it_and_starts_no_other(a_scene, a_logic, a_small_ct):
    """The user cancels once the first target's landmarks are fused: its list stays, no further target is fused,
    and the call says it was cancelled."""
    import threading

    from samembed import Cancelled

    _, atlases = _atlases(a_scene, a_small_ct)
    targets, _ = _three_targets(a_scene, a_small_ct)
    cancel = threading.Event()

    def progress(done, total, phase):
        if phase.startswith("Fused in"):
            cancel.set()

    with pytest.raises(Cancelled):
        a_logic.matchAtlases(atlases, targets, FAST, cancel=cancel, progress=progress)
    assert a_logic.fusedPointList(atlases[0][1], targets[0]) is not None
    assert [a_logic.fusedPointList(atlases[0][1], t) for t in targets[1:]] == [None, None]


def _shifted(scene, ct, shift, name):
    from .mrml_helpers import add_volume, voxels

    moved = ijk_to_ras(ct)
    moved[:3, 3] += shift
    return add_volume(scene, voxels(ct), moved, name)


def test_the_engine_process_fuses_into_targets_two_at_a_time_as_here(a_scene, a_small_ct, monkeypatch):
    """With two torch threads in the engine process, three atlases on volumes of their own are fused into the first
    of six targets alone, then into the others two at once (its log says so); the fused lists equal those of the
    engine in this process. The nine volumes are more than the engine keeps (``maxImages``, 8): the atlases go
    first, so fusing them into six new targets sends those six alone, not the atlases again."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the child's threads (CI's test workers have one each; torch takes
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # MKL's count, which a Dask nanny may have left at 1 here)
    pts, atlases = _atlases(a_scene, a_small_ct)
    moves = [np.array([4.0 * k, -3.0 * k, 2.0 * k]) for k in range(1, 3)]
    atlases = [atlases[0], *((_shifted(a_scene, a_small_ct, m, f"atlas volume {k}"),
                              add_points(a_scene, pts + m, ["A", "B", "C"], name=f"moved atlas {k}"))
                             for k, m in enumerate(moves))]
    targets = [_shifted(a_scene, a_small_ct, np.array([-5.0 * k, 6.0, 1.5 * k]), f"target {k}") for k in range(6)]
    more = [_shifted(a_scene, a_small_ct, np.array([7.0, -2.0 * k, -1.0]), f"more {k}") for k in range(6)]
    logic = MatchLogic(a_scene, model="random:sam-lite", device="cpu", cacheBytes=1 << 30, engine="process")
    try:
        nodes = logic.matchAtlases(atlases, targets, FAST)
        in_process = [control_points(n) for n in nodes]  # (the same nodes are written below)
        engine = logic.getMatcher()
        log = engine._logTail(40)
        assert engine.imagesSent == 9 and engine.maxImages == 8
        logic.matchAtlases(atlases, more, FAST)
        assert engine.imagesSent == 9 + 6, "the atlases were sent again"
    finally:
        logic.close()
    assert "6 targets: the first alone, then 2 at a time" in log, log
    here = MatchLogic(a_scene, model="random:sam-lite", device="cpu").matchAtlases(atlases, targets, FAST)
    assert [n.GetName() for n in here] == [f"{t.GetName()} fused matches" for t in targets]
    for (labels, ras), node in zip(in_process, here, strict=True):
        assert labels == control_points(node)[0]
        np.testing.assert_allclose(ras, control_points(node)[1], atol=1e-4)
