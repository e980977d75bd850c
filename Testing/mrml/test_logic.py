"""MatchLogic on a real MRML scene with real CT volumes and the real engine (seeded random weights).

Random weights match nothing anatomically, so accuracy is only asserted where it follows from geometry:
a point matched into its own volume, into a translated copy and into a copy stored with a flipped axis
(the same voxels reach the network, so the match must move exactly with the geometry). Anatomical
accuracy on an oblique copy runs only when a trained default model is registered.
"""

from __future__ import annotations

import csv
import logging
import threading
import time

import numpy as np
import pytest

from samembed import CheckpointError, InputError, MatchOptions, ModelNotAvailableError
from SAMEmbeddingLib.logic import (
    CONFIDENT_COLOR,
    HEATMAP_LEVEL_SAMPLES,
    UNCERTAIN_COLOR,
    MatchLogic,
    TargetResult,
    _matchRecords,
    heatmap_display_range,
)
from SAMEmbeddingLib.worker import Worker

from .mrml_helpers import (
    DATA,
    add_points,
    add_volume,
    control_points,
    ijk_to_ras,
    load_volume,
    require,
    require_trained_model,
    set_ijk_to_ras,
    slicer,
    threads_calling,
    voxels,
    with_torch_threads,
)

pytestmark = pytest.mark.needs_data

LOCAL_SPACING_MM = 4.0  # sam-lite: 2 mm input, local map at stride 2


def _ras(node, ijk) -> np.ndarray:
    return (ijk_to_ras(node) @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


@pytest.fixture
def two_landmarks(a_scene, a_small_ct):
    """Two landmarks inside the small CT (a vertebral-body-ish point and a soft-tissue point)."""
    return add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6))], ["L1", "L2"],
                      name="landmarks")


def _copy(a_scene, node, matrix, name):
    return add_volume(a_scene, voxels(node), matrix, name)


def _snapshot(volume, points):
    labels, pts = control_points(points)
    return (voxels(volume), ijk_to_ras(volume), volume.GetImageData().GetMTime(), labels, pts,
            points.GetNumberOfControlPoints(), [points.GetNthControlPointDescription(i) for i in range(points.GetNumberOfControlPoints())])


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def test_self_match_returns_the_clicked_point(a_logic, a_small_ct, two_landmarks):
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])

    labels, matched = control_points(outputs.pointLists[0])
    _, clicked = control_points(two_landmarks)
    assert labels == ["L1", "L2"]
    # sub-voxel peak on a 4 mm local grid: within half a local-voxel diagonal
    assert np.all(np.linalg.norm(matched - clicked, axis=1) <= LOCAL_SPACING_MM * np.sqrt(3) / 2), matched - clicked
    assert all(row.score > 0.95 for row in outputs.rows)


def test_matching_writes_one_point_list_per_target_with_the_source_labels(a_scene, a_logic, a_small_ct, two_landmarks):
    copy = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "copy CT")

    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, copy])

    assert [n.GetName() for n in outputs.pointLists] == ["small CT matches", "copy CT matches"]
    for node in outputs.pointLists:
        assert node.IsA("vtkMRMLMarkupsFiducialNode")
        assert [node.GetNthControlPointLabel(i) for i in range(2)] == ["L1", "L2"]
        for i in range(2):
            description = node.GetNthControlPointDescription(i)
            assert description.startswith("score ") and "confident" in description
            assert bool(node.GetNthControlPointSelected(i)) == ("not confident" not in description)
        display = node.GetDisplayNode()
        assert display.GetSelectedColor() == pytest.approx(CONFIDENT_COLOR)
        assert display.GetColor() == pytest.approx(UNCERTAIN_COLOR)
    assert len(outputs.rows) == 4
    assert outputs.cancelled is False


def test_a_translated_copy_returns_the_translated_point(a_scene, a_logic, a_small_ct, two_landmarks):
    shift = np.array([37.5, -12.0, 8.0])
    moved = ijk_to_ras(a_small_ct)
    moved[:3, 3] += shift
    copy = _copy(a_scene, a_small_ct, moved, "shifted CT")

    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, copy])

    _, in_self = control_points(outputs.pointLists[0])
    _, in_copy = control_points(outputs.pointLists[1])
    np.testing.assert_allclose(in_copy, in_self + shift, atol=1e-3)


def test_a_copy_stored_with_a_flipped_axis_returns_the_same_physical_point(a_scene, a_logic, a_small_ct, two_landmarks):
    # reverse the i axis of the voxel array and of the geometry: same image in space, det(IJK to RAS) < 0
    flipped = ijk_to_ras(a_small_ct) @ np.array([[-1.0, 0, 0, 127.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    copy = add_volume(a_scene, voxels(a_small_ct)[:, :, ::-1], flipped, "flipped CT")
    assert np.linalg.det(ijk_to_ras(copy)[:3, :3]) * np.linalg.det(ijk_to_ras(a_small_ct)[:3, :3]) < 0

    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, copy])

    _, in_self = control_points(outputs.pointLists[0])
    _, in_copy = control_points(outputs.pointLists[1])
    np.testing.assert_allclose(in_copy, in_self, atol=1e-3)


def test_an_oblique_volume_self_matches_in_its_own_frame(a_logic, an_oblique_ct, a_scene):
    points = add_points(a_scene, [_ras(an_oblique_ct, (64, 70, 10))], ["P"])

    outputs = a_logic.matchPoints(an_oblique_ct, points, [an_oblique_ct])

    _, matched = control_points(outputs.pointLists[0])
    assert np.linalg.norm(matched[0] - _ras(an_oblique_ct, (64, 70, 10))) <= LOCAL_SPACING_MM * np.sqrt(3) / 2


@pytest.mark.slow
def test_an_oblique_acquisition_returns_the_same_point_with_a_trained_model(a_scene, a_small_ct, an_oblique_acquisition,
                                                                            two_landmarks):
    """The same anatomy on a grid rotated by 20 degrees (the network's input resampled onto the LPS axes:
    samembed.preprocess.OBLIQUE_LIMIT_DEG): each landmark is found where it is, in RAS."""
    require_trained_model()
    logic = MatchLogic(a_scene, model="default", device="cpu")

    outputs = logic.matchPoints(a_small_ct, two_landmarks, [an_oblique_acquisition])

    _, matched = control_points(outputs.pointLists[0])
    _, clicked = control_points(two_landmarks)
    errors = np.linalg.norm(matched - clicked, axis=1)
    assert np.all(errors <= 2 * LOCAL_SPACING_MM), errors  # measured tolerance: two local voxels


def test_rematching_a_moved_point_updates_its_match_in_place(a_logic, a_small_ct, two_landmarks):
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    out = outputs.pointLists[0]
    first = control_points(out)[1][1].copy()

    two_landmarks.SetNthControlPointPositionWorld(1, *_ras(a_small_ct, (90, 40, 12)))
    again = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct], [1])

    assert again.pointLists[0].GetID() == out.GetID()
    labels, pts = control_points(out)
    assert labels == ["L1", "L2"]
    assert np.linalg.norm(pts[1] - first) > 10.0
    assert np.linalg.norm(pts[1] - _ras(a_small_ct, (90, 40, 12))) <= LOCAL_SPACING_MM * np.sqrt(3) / 2


def test_a_renamed_source_point_renames_its_matches(a_logic, a_small_ct, two_landmarks):
    a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    two_landmarks.SetNthControlPointLabel(0, "carina")

    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct], [0])

    assert control_points(outputs.pointLists[0])[0] == ["carina", "L2"]


def test_deleting_a_source_point_removes_its_matches(a_logic, a_small_ct, two_landmarks):
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    two_landmarks.RemoveNthControlPoint(0)

    removed = a_logic.removeMatchesOfDeletedPoints(two_landmarks)

    assert removed == 1
    assert control_points(outputs.pointLists[0])[0] == ["L2"]
    assert outputs.table.GetNumberOfRows() == 1


def test_the_results_table_lists_label_target_ras_score_confident_and_round_trip(a_logic, a_small_ct, two_landmarks):
    """The table says why a match is not confident: how far its round trip landed from the click (mm), as the
    logic's rows and the points' descriptions hold it."""
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])

    table = outputs.table
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == ["label", "target", "R", "A", "S", "score", "confident", "roundtrip_mm"]
    rows = a_logic.resultRows(two_landmarks)
    assert table.GetNumberOfRows() == 2
    _, matched = control_points(outputs.pointLists[0])
    for r in range(2):
        assert table.GetCellText(r, 0) == f"L{r + 1}"
        assert table.GetCellText(r, 1) == "small CT"
        ras = [float(table.GetCellText(r, c)) for c in (2, 3, 4)]
        np.testing.assert_allclose(ras, matched[r], atol=1e-3)
        assert -1.0 <= float(table.GetCellText(r, 5)) <= 1.0
        assert table.GetCellText(r, 6) in ("0", "1")
        roundtrip = float(table.GetCellText(r, 7))
        assert roundtrip == pytest.approx(rows[r].roundtripMm, rel=1e-5) and np.isfinite(roundtrip)
        assert f"round trip {roundtrip:.1f} mm" in outputs.pointLists[0].GetNthControlPointDescription(r)


def test_inputs_are_unchanged_by_matching(a_scene, a_logic, a_small_ct, two_landmarks):
    target = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "target")
    before_source = _snapshot(a_small_ct, two_landmarks)
    before_target = voxels(target), ijk_to_ras(target), target.GetImageData().GetMTime()
    attributes = list(two_landmarks.GetAttributeNames() or [])

    a_logic.matchPoints(a_small_ct, two_landmarks, [target], options=MatchOptions(heatmap=True), heatmapPointIndex=0)

    after_source = _snapshot(a_small_ct, two_landmarks)
    np.testing.assert_array_equal(after_source[0], before_source[0])
    np.testing.assert_array_equal(after_source[1], before_source[1])
    assert after_source[2] == before_source[2]
    assert after_source[3] == before_source[3]
    np.testing.assert_array_equal(after_source[4], before_source[4])
    assert after_source[5:] == before_source[5:]
    np.testing.assert_array_equal(voxels(target), before_target[0])
    np.testing.assert_array_equal(ijk_to_ras(target), before_target[1])
    assert target.GetImageData().GetMTime() == before_target[2]
    assert list(two_landmarks.GetAttributeNames() or []) == attributes


# ----------------------------------------------------------------------------------------------
# heatmap, navigation
# ----------------------------------------------------------------------------------------------
def test_the_heatmap_has_the_target_geometry_and_a_heat_colour_table(a_scene, a_logic, a_small_ct, an_oblique_ct):
    points = add_points(a_scene, [_ras(an_oblique_ct, (64, 70, 10))], ["P"])

    heatmap = a_logic.computeHeatmap(an_oblique_ct, points, 0, an_oblique_ct)

    assert heatmap.GetImageData().GetDimensions() == an_oblique_ct.GetImageData().GetDimensions()
    np.testing.assert_array_equal(ijk_to_ras(heatmap), ijk_to_ras(an_oblique_ct))
    values = voxels(heatmap)
    assert values.dtype == np.float32 and values.min() >= -1.0 and values.max() <= 1.0 + 1e-5
    peak = np.unravel_index(np.argmax(values), values.shape)  # (k, j, i)
    assert np.linalg.norm(_ras(an_oblique_ct, peak[::-1]) - _ras(an_oblique_ct, (64, 70, 10))) <= 2 * LOCAL_SPACING_MM
    assert heatmap.GetName() == "P similarity in oblique CT"
    assert heatmap.GetDisplayNode().GetColorNodeID() in ("vtkMRMLColorTableNodeIron", "vtkMRMLPETProceduralColorNodePET-Heat")
    composite = a_scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == heatmap.GetID()
    assert composite.GetBackgroundVolumeID() == an_oblique_ct.GetID()

    a_logic.setHeatmapOpacity(0.3)
    assert composite.GetForegroundOpacity() == pytest.approx(0.3)
    a_logic.hideHeatmap()
    assert composite.GetForegroundVolumeID() is None


def test_the_heatmap_shows_its_top_tenth_and_a_large_one_is_levelled_from_a_sample(a_scene, a_logic, an_oblique_ct):
    """The heatmap is shown from the 90th percentile of its searched voxels' similarities (at least 0.001 below the
    top) to their maximum. A map on a large grid (a thin-slice CT's) takes that percentile from a strided sample,
    without a float64 copy of the map, close to the exact one; one where nothing was searched shows 0 to 1."""
    from samembed.io import read_image

    def exact(values: np.ndarray) -> tuple[float, float]:
        searched = values[values > -1.0].astype(np.float64)
        return min(np.percentile(searched, 90), searched.max() - 1e-3), searched.max()

    points = add_points(a_scene, [_ras(an_oblique_ct, (64, 70, 10))], ["P"])
    heatmap = a_logic.computeHeatmap(an_oblique_ct, points, 0, an_oblique_ct)
    values = voxels(heatmap)
    assert values.size <= HEATMAP_LEVEL_SAMPLES  # every voxel: the exact percentile
    display = heatmap.GetDisplayNode()
    assert (display.GetLowerThreshold(), display.GetWindowLevelMax()) == pytest.approx(exact(values), abs=1e-6)
    # a large map with a spread of values: LIDC-0001's 35 M voxels as values in [-1, 1), air unsearched (-1)
    ct = read_image(require(DATA / "ct" / "lidc" / "LIDC-IDRI-0001_ct.nii.gz")).array
    large = np.where(ct < -500, -1.0, np.clip(ct / 1500.0, -0.99, 0.99)).astype(np.float32)
    assert large.size > 8 * HEATMAP_LEVEL_SAMPLES
    low, top = heatmap_display_range(large)
    want = exact(large)
    assert top == want[1] and low == pytest.approx(want[0], abs=1e-3) and low < top - 0.1
    assert heatmap_display_range(np.full_like(values, -1.0)) == (0.0, 1.0)


def test_a_second_heatmap_in_the_same_target_reuses_its_node(a_scene, a_logic, a_small_ct, two_landmarks):
    first = a_logic.computeHeatmap(a_small_ct, two_landmarks, 0, a_small_ct)
    second = a_logic.computeHeatmap(a_small_ct, two_landmarks, 1, a_small_ct)

    assert first.GetID() == second.GetID()
    assert second.GetName() == "L2 similarity in small CT"
    assert a_scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 2


def test_jump_to_match_centres_the_slice_views_on_it(a_scene, a_logic, a_small_ct, two_landmarks):
    a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    match = a_logic.matchPosition(two_landmarks, 1, a_small_ct)

    a_logic.jumpToPoint(match)

    slice_node = a_scene.GetFirstNodeByClass("vtkMRMLSliceNode")
    centre = [slice_node.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
    np.testing.assert_allclose(centre, match, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# propagate all, cancel, worker
# ----------------------------------------------------------------------------------------------
def test_three_targets_are_matched_two_at_a_time_and_written_in_the_callers_thread(a_scene, a_logic, a_small_ct,
                                                                                     two_landmarks, monkeypatch, caplog):
    """With two torch threads the engine in this process matches the first target alone, then the other two at once
    (``Matcher.match_each``); every target's point list is still written in the caller's thread (MRML), in the
    targets' order in the outputs, and each translated copy's matches move exactly with its translation."""
    shifts = [np.zeros(3), np.array([37.5, -12.0, 8.0]), np.array([-20.0, 15.0, -6.0])]
    targets = [a_small_ct]
    for n, shift in enumerate(shifts[1:]):
        moved = ijk_to_ras(a_small_ct)
        moved[:3, 3] += shift
        targets.append(_copy(a_scene, a_small_ct, moved, f"shifted {n}"))
    progress = []
    writers = threads_calling(monkeypatch, a_logic, "applyTargetResult")
    caplog.set_level(logging.INFO, logger="samembed.jobs")
    outputs = with_torch_threads(2, lambda: a_logic.matchPoints(a_small_ct, two_landmarks, targets,
                                                                progress=lambda *a: progress.append(a)))

    assert writers == [threading.get_ident()] * 3
    assert "3 targets: the first alone, then 2 at a time" in caplog.text
    assert [n.GetName() for n in outputs.pointLists] == [f"{t.GetName()} matches" for t in targets]
    assert [r.target for r in outputs.rows] == [t.GetName() for t in targets for _ in range(2)]
    assert [p[0] for p in progress] == sorted(p[0] for p in progress) and progress[-1][0] == 3, progress
    _, in_self = control_points(outputs.pointLists[0])
    for node, shift in zip(outputs.pointLists[1:], shifts[1:]):
        np.testing.assert_allclose(control_points(node)[1], in_self + shift, atol=1e-3)


def test_propagate_all_with_a_cancel_keeps_the_finished_targets(a_scene, a_logic, a_small_ct, two_landmarks):
    targets = [a_small_ct] + [_copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), f"T{n}") for n in (2, 3)]
    cancel = threading.Event()
    seen = []

    def progress(done, total, message):
        seen.append((done, total))
        if done == 1:
            cancel.set()  # the user presses Cancel once the first target is done

    outputs = a_logic.propagateAll(a_small_ct, two_landmarks, targets, cancel=cancel, progress=progress)

    assert outputs.cancelled is True
    assert [n.GetName() for n in outputs.pointLists] == ["small CT matches"]
    assert control_points(outputs.pointLists[0])[0] == ["L1", "L2"]
    assert a_logic.outputPointList(two_landmarks, targets[1]) is None
    assert outputs.table.GetNumberOfRows() == 2
    assert (1, 3) in seen


def test_the_worker_runs_the_engine_and_touches_mrml_only_when_polled(a_scene, a_logic, a_small_ct, two_landmarks):
    worker = Worker()
    finished = []
    try:
        task = a_logic.startMatch(worker, a_small_ct, two_landmarks, [a_small_ct], onFinished=finished.append)
        while task.state in ("queued", "running"):
            threading.Event().wait(0.02)
        assert a_logic.outputPointList(two_landmarks, a_small_ct) is None, "MRML was written off the main thread"
        assert worker.waitForIdle(timeout=120)
    finally:
        worker.shutdown()
    assert len(finished) == 1 and not finished[0].cancelled
    assert control_points(finished[0].pointLists[0])[0] == ["L1", "L2"]


def test_cancelling_on_the_worker_keeps_the_finished_targets(a_scene, a_logic, a_small_ct, two_landmarks, monkeypatch):
    targets = [a_small_ct] + [_copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), f"W{n}") for n in (2, 3)]
    worker = Worker()
    finished, progress = [], []
    real = a_logic.getMatcher()
    holder = {}

    class CancelAfterFirstTarget:
        """Cancels from the worker thread once the first target is matched (no race with polling)."""

        def __getattr__(self, name):
            return getattr(real, name)

        def match(self, *args, **kwargs):
            result = real.match(*args, **kwargs)
            holder["task"].cancel()
            return result

        def match_each(self, *args, **kwargs):  # the engine's own, through this match
            return type(real).match_each(self, *args, **kwargs)

    monkeypatch.setattr(a_logic, "getMatcher", lambda: CancelAfterFirstTarget())
    try:

        def onProgress(done, total, message):
            progress.append(done)

        holder["task"] = a_logic.startMatch(worker, a_small_ct, two_landmarks, targets, onFinished=finished.append,
                                            onProgress=onProgress)
        assert worker.waitForIdle(timeout=120)
    finally:
        worker.shutdown()
    outputs = finished[0]
    assert outputs.cancelled
    assert 1 <= len(outputs.pointLists) < 3
    assert outputs.pointLists[0].GetName() == "small CT matches"


def test_a_worker_error_is_delivered_to_on_error(a_scene, a_small_ct, two_landmarks):
    logic = MatchLogic(a_scene, model="no-such-model")
    worker = Worker()
    errors = []
    try:
        logic.startMatch(worker, a_small_ct, two_landmarks, [a_small_ct], onError=errors.append)
        assert worker.waitForIdle(timeout=120)
    finally:
        worker.shutdown()
    assert len(errors) == 1 and isinstance(errors[0], InputError)
    assert "unknown model 'no-such-model'" in str(errors[0])


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad_inputs(scene, ct, points):
    outside = add_points(scene, [_ras(ct, (64, 70, 10)), _ras(ct, (64, 70, 40))], ["in", "far"], name="outside")
    empty = slicer.vtkMRMLMarkupsFiducialNode()
    empty.SetName("empty list")
    scene.AddNode(empty)
    slice2d = add_volume(scene, voxels(ct)[10:11], ijk_to_ras(ct), "radiograph")
    no_voxels = slicer.vtkMRMLScalarVolumeNode()
    no_voxels.SetName("unloaded")
    scene.AddNode(no_voxels)
    return {
        "no source volume": ((None, points, [ct]), "no source volume selected"),
        "no target volume": ((ct, points, []), "no target volume selected"),
        "a target without voxels": ((ct, points, [no_voxels]), "'unloaded' holds no voxels"),
        "no point list": ((ct, None, [ct]), "no source point list selected"),
        "no placed point": ((ct, empty, [ct]), "'empty list' has no placed points"),
        "a point outside the source": ((ct, outside, [ct]), r"point 'far' at R .* lies outside the source volume 'small CT'"),
        "a 2D target for a 3D source": ((ct, points, [slice2d]), "target 'radiograph' is 2D but source 'small CT' is 3D"),
    }


@pytest.mark.parametrize("case", ["no source volume", "no target volume", "a target without voxels", "no point list",
                                  "no placed point", "a point outside the source", "a 2D target for a 3D source"])
def test_bad_input_raises_a_clear_error_and_writes_nothing(a_scene, a_logic, a_small_ct, two_landmarks, case):
    args, message = _bad_inputs(a_scene, a_small_ct, two_landmarks)[case]
    nodes_before = a_scene.GetNumberOfNodes()

    ok, reason = a_logic.canMatch(*args)
    with pytest.raises(InputError, match=message):
        a_logic.matchPoints(*args)

    assert not ok and reason
    assert a_scene.GetNumberOfNodes() == nodes_before


@pytest.mark.parametrize(("model", "error", "message"), [
    ("no-such-model", InputError, "unknown model 'no-such-model'"),
    ("/nonexistent/weights.pt", CheckpointError, "checkpoint file not found"),
    ("sam-official", ModelNotAvailableError, "has no weights on this machine"),
])
def test_a_model_error_raises_a_clear_error_and_writes_nothing(a_scene, a_small_ct, two_landmarks, model, error, message):
    logic = MatchLogic(a_scene, model=model, device="cpu")
    nodes_before = a_scene.GetNumberOfNodes()

    with pytest.raises(error, match=message):
        logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])

    assert a_scene.GetNumberOfNodes() == nodes_before


def test_can_match_says_yes_to_good_input(a_logic, a_small_ct, two_landmarks):
    assert a_logic.canMatch(a_small_ct, two_landmarks, [a_small_ct]) == (True, "")


# ----------------------------------------------------------------------------------------------
# export, cache
# ----------------------------------------------------------------------------------------------
def test_export_writes_mrk_json_fcsv_and_csv_that_read_back(a_scene, a_logic, a_small_ct, two_landmarks, tmp_path):
    copy = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "copy")
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, copy])
    _, matched = control_points(outputs.pointLists[0])

    json_files = a_logic.exportResults(two_landmarks, tmp_path / "matches.mrk.json")
    fcsv_files = a_logic.exportResults(two_landmarks, tmp_path / "matches.fcsv")
    (csv_file,) = a_logic.exportResults(two_landmarks, tmp_path / "matches.csv")

    assert [p.name for p in json_files] == ["matches_small_CT.mrk.json", "matches_copy.mrk.json"]
    assert [p.name for p in fcsv_files] == ["matches_small_CT.fcsv", "matches_copy.fcsv"]
    for path, storage_class in ((json_files[0], slicer.vtkMRMLMarkupsJsonStorageNode),
                                (fcsv_files[0], slicer.vtkMRMLMarkupsFiducialStorageNode)):
        back = slicer.vtkMRMLMarkupsFiducialNode()
        a_scene.AddNode(back)
        storage = storage_class()
        storage.SetFileName(str(path))
        assert storage.ReadData(back)
        labels, pts = control_points(back)
        assert labels == ["L1", "L2"]
        np.testing.assert_allclose(pts, matched, atol=1e-3)
    rows = list(csv.DictReader(csv_file.open()))
    assert list(rows[0]) == ["label", "target", "R", "A", "S", "score", "confident", "roundtrip_mm"]
    assert all(float(r["roundtrip_mm"]) >= 0 for r in rows)
    assert [(r["label"], r["target"]) for r in rows] == [("L1", "small CT"), ("L1", "copy"), ("L2", "small CT"), ("L2", "copy")]
    assert [float(rows[0][a]) for a in "RAS"] == pytest.approx(matched[0], abs=1e-3)
    assert not list(tmp_path.glob(".*tmp*")), "a temporary file was left behind"
    # a scene saved before the round trip was stored: its cell is left empty (not "nan")
    import json

    from SAMEmbeddingLib.logic import MATCHES_ATTRIBUTE

    for node in a_logic.outputPointLists(two_landmarks):
        records = json.loads(node.GetAttribute(MATCHES_ATTRIBUTE))
        node.SetAttribute(MATCHES_ATTRIBUTE, json.dumps({k: {f: v for f, v in r.items() if f != "roundtripMm"}
                                                         for k, r in records.items()}))
    (older,) = a_logic.exportResults(two_landmarks, tmp_path / "older.csv")
    assert [r["roundtrip_mm"] for r in csv.DictReader(older.open())] == [""] * 4


def test_export_keeps_a_file_per_target_when_targets_share_a_name(a_scene, a_logic, a_small_ct, two_landmarks, tmp_path):
    """Two target volumes of one name (Slicer allows it): each gets its own markups file, none written over."""
    twin = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "small CT")  # the source's own name
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, twin])
    files = a_logic.exportResults(two_landmarks, tmp_path / "matches.mrk.json")
    assert [p.name for p in files] == ["matches_small_CT.mrk.json", "matches_small_CT_2.mrk.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    for path, out in zip(files, outputs.pointLists):
        back = slicer.vtkMRMLMarkupsFiducialNode()
        a_scene.AddNode(back)
        storage = slicer.vtkMRMLMarkupsJsonStorageNode()
        storage.SetFileName(str(path))
        assert storage.ReadData(back)
        np.testing.assert_allclose(control_points(back)[1], control_points(out)[1], atol=1e-3)


def test_an_export_of_several_targets_names_its_files_first_and_may_refuse_to_replace_them(
        a_scene, a_logic, a_small_ct, two_landmarks, tmp_path):
    """With several targets the markups go to one file per target, not to the name a save dialog asked about: a
    later export replaced an earlier one's files without a question (a review). The module asks first, by the names
    :meth:`exportPaths` gives; ``replace=False`` refuses them by name and writes nothing."""
    twin = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "other CT")
    a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, twin])
    chosen = tmp_path / "study.mrk.json"
    planned = a_logic.exportPaths(two_landmarks, chosen)
    assert [p.name for p in planned] == ["study_small_CT.mrk.json", "study_other_CT.mrk.json"]
    assert a_logic.exportResults(two_landmarks, chosen) == planned and not chosen.exists()
    before = {p: p.read_bytes() for p in planned}
    with pytest.raises(InputError, match="study_small_CT.mrk.json, .*study_other_CT.mrk.json: exist already"):
        a_logic.exportResults(two_landmarks, chosen, replace=False)
    assert {p: p.read_bytes() for p in planned} == before
    assert a_logic.exportPaths(two_landmarks, tmp_path / "one.csv") == [tmp_path / "one.csv"]


def test_export_with_nothing_matched_or_an_unknown_suffix_is_refused(a_logic, a_small_ct, two_landmarks, tmp_path):
    with pytest.raises(InputError, match="no matches to export"):
        a_logic.exportResults(two_landmarks, tmp_path / "m.csv")
    a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    with pytest.raises(InputError, match="unknown export format"):
        a_logic.exportResults(two_landmarks, tmp_path / "m.xlsx")
    with pytest.raises(InputError, match="does not exist"):
        a_logic.exportResults(two_landmarks, tmp_path / "missing" / "m.csv")


def test_volumes_are_converted_once_per_node_and_modification_time(a_logic, a_small_ct):
    first = a_logic.imageForVolume(a_small_ct)
    assert a_logic.imageForVolume(a_small_ct) is first

    matrix = ijk_to_ras(a_small_ct)
    matrix[2, 3] += 2.0
    set_ijk_to_ras(a_small_ct, matrix)
    moved = a_logic.imageForVolume(a_small_ct)
    assert moved is not first
    a_small_ct.GetImageData().Modified()
    assert a_logic.imageForVolume(a_small_ct) is not moved


def test_several_volumes_are_read_from_mrml_here_and_copied_on_threads(a_logic, a_scene, a_small_ct, an_oblique_ct,
                                                                       monkeypatch):
    """The volumes of a match are read from MRML on the calling thread (the scene's) and their voxels copied on
    the logic's copy threads, each volume once; the images are those of a plain conversion, in the order asked,
    and the next call takes them from the cache without a copy."""
    from SAMEmbeddingLib import mrml_io
    from SAMEmbeddingLib.logic import COPY_THREADS

    third = add_volume(a_scene, voxels(a_small_ct)[::-1].copy(), ijk_to_ras(a_small_ct), "third")
    reads, copies = [], []
    read, copy = mrml_io.read_volume_voxels, mrml_io.VolumeVoxels.image

    def recordRead(node, *args, **kwargs):
        reads.append((node.GetID(), threading.current_thread()))
        return read(node, *args, **kwargs)

    def recordCopy(self, *args, **kwargs):
        copies.append((self.name, threading.current_thread()))
        time.sleep(0.2)  # long enough that the copies overlap when they run on two threads
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(mrml_io, "read_volume_voxels", recordRead)
    monkeypatch.setattr(mrml_io.VolumeVoxels, "image", recordCopy)
    nodes = [a_small_ct, an_oblique_ct, a_small_ct, third]
    images = a_logic.imagesForVolumes(nodes)

    assert [r[0] for r in reads] == [a_small_ct.GetID(), an_oblique_ct.GetID(), third.GetID()], "each volume read once"
    assert {r[1] for r in reads} == {threading.main_thread()}
    assert sorted(c[0] for c in copies) == sorted(["small CT", "oblique CT", "third"])
    copiers = {c[1] for c in copies}
    assert threading.main_thread() not in copiers and len(copiers) == min(COPY_THREADS, 3) == 2
    assert images[0] is images[2]
    for node, image in zip(nodes, images):
        plain = mrml_io.image_from_volume_node(node)
        np.testing.assert_array_equal(image.array, plain.array)
        assert image.grid.same_as(plain.grid, tol=1e-9) and image.name == plain.name

    copies.clear()
    assert all(a is b for a, b in zip(a_logic.imagesForVolumes(nodes[::-1]), images[::-1]))
    assert not copies, "cached volumes are not copied again"


def _recordCopies(monkeypatch, fail: str | None = None) -> list[str]:
    """The names of the volumes whose voxels are copied from now on (``VolumeVoxels.image``); the copy of the volume
    named ``fail`` raises ``MemoryError`` instead."""
    from SAMEmbeddingLib import mrml_io

    copies: list[str] = []
    copy = mrml_io.VolumeVoxels.image

    def record(self, *args, **kwargs):
        if self.name == fail:
            raise MemoryError("no memory left")
        copies.append(self.name)
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(mrml_io.VolumeVoxels, "image", record)
    return copies


def test_a_bad_volume_among_several_copies_none(a_logic, a_scene, a_small_ct, monkeypatch):
    """A volume without voxels among several is refused (its name in the message) before any volume is copied."""
    empty = slicer.vtkMRMLScalarVolumeNode()
    empty.SetName("empty volume")
    a_scene.AddNode(empty)
    copies = _recordCopies(monkeypatch)
    with pytest.raises(InputError, match="'empty volume' holds no voxels"):
        a_logic.imagesForVolumes([a_small_ct, empty])
    assert not copies
    assert a_logic.imagesForVolumes([a_small_ct])[0].array.shape == (20, 128, 128)


def test_volumes_copied_before_another_volumes_copy_failed_are_kept(a_logic, a_scene, a_small_ct, an_oblique_ct,
                                                                    monkeypatch):
    """A copy that fails (here: out of memory) among several is the caller's error once every copy has ended; the
    volumes that were copied are kept, so the next try copies only the one that failed."""
    third = add_volume(a_scene, voxels(a_small_ct)[::-1].copy(), ijk_to_ras(a_small_ct), "third")
    copied = _recordCopies(monkeypatch, fail="oblique CT")
    with pytest.raises(MemoryError):
        a_logic.imagesForVolumes([a_small_ct, an_oblique_ct, third])
    assert sorted(copied) == ["small CT", "third"]
    monkeypatch.undo()
    copied = _recordCopies(monkeypatch)
    images = a_logic.imagesForVolumes([a_small_ct, an_oblique_ct, third])
    assert copied == ["oblique CT"] and [image.name for image in images] == ["small CT", "oblique CT", "third"]


def test_a_single_slice_that_is_not_axial_among_several_volumes_copies_none(a_logic, a_scene, a_small_ct, monkeypatch):
    """A coronal single slice among a click's volumes is refused, by name, before any volume is copied."""
    from .mrml_helpers import rotation

    coronal = add_volume(a_scene, voxels(a_small_ct)[10:11], rotation("R", 90.0) @ ijk_to_ras(a_small_ct), "coronal")
    copies = _recordCopies(monkeypatch)
    with pytest.raises(InputError, match="coronal: a single-slice image must lie in the axial"):
        a_logic.imagesForVolumes([a_small_ct, coronal])
    assert not copies


def test_clear_cache_empties_embeddings_and_volumes(a_logic, a_small_ct, two_landmarks):
    a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    assert a_logic.cacheBytesInUse() > 0

    a_logic.clearCache()

    assert a_logic.cacheBytesInUse() == 0


# ----------------------------------------------------------------------------------------------
# 2D: radiographs are single-slice volumes in Slicer
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a_2d_matcher():
    from samembed import Matcher

    return Matcher(model="random:sam-lite-2d", device="cpu", cache_bytes=1 << 28)


def _radiograph(scene, name, origin_ras):
    from samembed.io import read_image

    from .mrml_helpers import DATA, require

    image = read_image(require(DATA / "xray" / "hand_dha37" / "images" / "3143.jpg"))
    block = image.array[300:492, 200:392].astype(np.int16)[None]  # 192 x 192 pixels, 1 mm assumed
    matrix = np.diag([-1.0, -1.0, 1.0, 1.0])  # how Slicer places an LPS-identity 2D image in RAS
    matrix[:3, 3] = origin_ras
    return add_volume(scene, block, matrix, name)


def test_a_radiograph_matches_in_2d_and_its_match_lies_on_the_target_slice(a_scene, a_2d_matcher):
    logic = MatchLogic(a_scene, matcher=a_2d_matcher)
    source = _radiograph(a_scene, "hand", [10.0, 20.0, 0.0])
    shifted = _radiograph(a_scene, "hand shifted", [-15.0, 32.0, 7.5])
    points = add_points(a_scene, [_ras(source, (96, 80, 0)), _ras(source, (60, 130, 0))], ["MCP", "tip"])

    outputs = logic.matchPoints(source, points, [source, shifted])

    _, in_self = control_points(outputs.pointLists[0])
    _, in_shifted = control_points(outputs.pointLists[1])
    _, clicked = control_points(points)
    assert np.all(np.linalg.norm(in_self - clicked, axis=1) <= 2.0 * np.sqrt(2) / 2 + 1e-6)  # 2 mm local grid
    np.testing.assert_allclose(in_shifted, in_self + np.array([-25.0, 12.0, 7.5]), atol=1e-3)


def test_the_consistency_check_and_the_polish_reach_the_engine_and_mark_the_matches(a_scene):
    """37 hand landmarks from a template radiograph into another hand, with the trained 2D model: the logic's
    matches equal the engine's ``match(consistency=True)`` and the re-searched ones say so."""
    import SimpleITK as sitk
    from samembed_bench import hand_oneshot as ho

    from samembed import Matcher

    from .mrml_helpers import DATA, REPO, require

    model = REPO / "Resources" / "Models" / "sam-lite-2d-hand.pt"
    if not model.is_file():
        pytest.skip(f"{model} is missing")
    require(DATA / "xray" / "hand_dha37" / "landmarks_37.csv")
    cases = {c.image_id: c for c in ho.load_hand_dataset(DATA / "xray" / "hand_dha37")}
    train, held = ho.hand_split(list(cases))
    template, target = cases[ho.pick_templates(train)[0]], cases[held[1]]
    matcher = Matcher(model=model, device="cpu", modality="xray")
    nodes = []
    for case in (template, target):  # 0.2 mm pixels, LPS-identity placement, as Slicer loads a NIfTI of it
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path))).astype(np.int16)[None]
        nodes.append(add_volume(a_scene, arr, np.diag([-0.2, -0.2, 1.0, 1.0]), f"hand {case.image_id}"))
    pts_lps = template.points_lps_mm()
    points = add_points(a_scene, pts_lps * [-1, -1, 1], [f"L{i + 1}" for i in range(len(pts_lps))])
    logic = MatchLogic(a_scene, matcher=matcher)

    outputs = logic.matchPoints(nodes[0], points, [nodes[1]], options=MatchOptions(consistency=True))

    engine = matcher.match(ho._read_stored(template), pts_lps, [ho._read_stored(target)],
                           options=MatchOptions(consistency=True))
    _, got_ras = control_points(outputs.pointLists[0])
    want_ras = np.array([m.point_lps_mm for m in engine.matches]) * [-1, -1, 1]
    np.testing.assert_allclose(got_ras[:, :2], want_ras[:, :2], atol=1e-3)
    redo = [m.rematched for m in engine.matches]
    assert any(redo), "this pair needs at least one re-searched match to test the description"
    descriptions = [outputs.pointLists[0].GetNthControlPointDescription(i) for i in range(len(redo))]
    assert all(("re-searched" in d) == r for d, r in zip(descriptions, redo))
    # the intensity polish is on by default in both; its moves are marked, and polish=False reaches the engine
    polished = [m.polished for m in engine.matches]
    assert any(polished)
    assert all(("polished by intensity" in d) == p for d, p in zip(descriptions, polished))
    outputs = logic.matchPoints(nodes[0], points, [nodes[1]], options=MatchOptions(consistency=True, polish=False))
    engine = matcher.match(ho._read_stored(template), pts_lps, [ho._read_stored(target)],
                           options=MatchOptions(consistency=True, polish=False))
    _, got_ras = control_points(outputs.pointLists[0])
    np.testing.assert_allclose(got_ras[:, :2], (np.array([m.point_lps_mm for m in engine.matches]) * [-1, -1, 1])[:, :2],
                               atol=1e-3)
    assert not any("polished" in outputs.pointLists[0].GetNthControlPointDescription(i) for i in range(len(redo)))


# ----------------------------------------------------------------------------------------------
# scores as data
# ----------------------------------------------------------------------------------------------
def test_scores_and_confidence_are_stored_as_data_not_read_back_from_the_description(a_logic, a_small_ct, two_landmarks):
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    out = outputs.pointLists[0]
    for i in range(out.GetNumberOfControlPoints()):
        out.SetNthControlPointDescription(i, "edited by the user")

    rows = a_logic.resultRows(two_landmarks)

    assert [r.score for r in rows] == pytest.approx([r.score for r in outputs.rows])
    assert [r.confident for r in rows] == [r.confident for r in outputs.rows]
    assert all(r.targetID == a_small_ct.GetID() and r.roundtripMm >= 0 for r in rows)


# ----------------------------------------------------------------------------------------------
# the first click from cold
# ----------------------------------------------------------------------------------------------
FIRST_CLICK_SOURCE, FIRST_CLICK_TARGETS = "pt_215", ("pt_232", "pt_202", "pt_231")
"""Four OpenKBP head-and-neck CTs of different patients: a source and three targets."""


def _first_click(logic, source, click, targets, prepare: bool) -> tuple[float, float, object]:
    """(seconds to prepare, seconds from the click to the matches, outputs) with ``logic``'s engine cold."""
    prepare_s = 0.0
    if prepare:
        started = time.perf_counter()
        logic.prepareVolumes(source, targets)
        prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    outputs = logic.matchPoints(source, click, targets)
    return prepare_s, time.perf_counter() - started, outputs


@pytest.mark.slow
def test_first_click_into_three_targets_from_cold_is_measured_and_preparing_ahead_changes_no_match(a_scene, capsys):
    """The first click of a session, a source and 3 targets, default model, nothing cached: its time is measured
    (printed; the <= 3 s target is checked by benchmarks/first_click.py, not here), cold and after the volumes
    were prepared ahead (what the module does when they are chosen). Preparing ahead must not change a match."""
    require_trained_model()
    ct = DATA / "ct" / "openkbp" / "ct"
    source = load_volume(a_scene, ct / f"{FIRST_CLICK_SOURCE}_ct.nii.gz", FIRST_CLICK_SOURCE)
    targets = [load_volume(a_scene, ct / f"{p}_ct.nii.gz", p) for p in FIRST_CLICK_TARGETS]
    rows = csv.DictReader(require(DATA / "ct" / "openkbp" / "oar_centroids.csv").open())
    parotid = next(r for r in rows if r["patient"] == FIRST_CLICK_SOURCE and r["structure"] == "LeftParotid")
    click = add_points(a_scene, [[-float(parotid["x_mm"]), -float(parotid["y_mm"]), float(parotid["z_mm"])]],
                       ["LeftParotid"], name="click")

    _, cold_s, cold = _first_click(MatchLogic(a_scene, model="default", device="cpu"), source, click, targets, False)
    prepare_s, warm_s, warm = _first_click(MatchLogic(a_scene, model="default", device="cpu"), source, click, targets,
                                           True)

    assert len(cold.rows) == len(warm.rows) == 3
    for a, b in zip(cold.rows, warm.rows):
        assert a.targetID == b.targetID
        np.testing.assert_allclose(a.pointRAS, b.pointRAS, atol=1e-4)
        assert a.score == pytest.approx(b.score, abs=1e-5) and a.confident == b.confident
    with capsys.disabled():
        print(f"\n[first click, 1 landmark into 3 OpenKBP targets, default model, CPU, in this test process (no engine "
              f"process, no prefetch; the module's own path is timed by benchmarks/first_click.py)] cold {cold_s:.1f} s; "
              f"prepared ahead {prepare_s:.1f} s, then the click {warm_s:.1f} s")


def test_a_job_running_while_the_scene_closes_writes_nothing_into_the_next_scene(a_scene, a_logic, a_small_ct,
                                                                                   two_landmarks):
    """The next scene's nodes reuse the closed scene's IDs: a job that finished after the close wrote its matches
    and results table into them. The module tells the logic when the scene starts to close; a job made before then
    writes nothing, and the volumes copied for the closed scene go."""
    worker = Worker()
    finished = []
    try:
        job = a_logic.prepareMatch(a_small_ct, two_landmarks, [a_small_ct])
        a_logic.startMatch(worker, a_small_ct, two_landmarks, [a_small_ct], onFinished=finished.append)
        source_id, points_id = a_small_ct.GetID(), two_landmarks.GetID()
        a_logic.sceneClosing()  # (the module's StartCloseEvent observer)
        assert not a_logic._images
        a_scene.Clear(0)
        new_volumes = [add_volume(a_scene, np.zeros((4, 8, 8), np.int16), np.eye(4), f"next scene's volume {n}")
                       for n in range(3)]
        new_points = add_points(a_scene, [[1.0, 1.0, 1.0]], ["N1"], name="next scene's points")
        assert source_id in [v.GetID() for v in new_volumes] and new_points.GetID() == points_id  # IDs are reused
        assert worker.waitForIdle(timeout=120)
        assert a_logic.applyTargetResult(job, TargetResult(source_id, "late", [])) is None
    finally:
        worker.shutdown()
    assert finished and not finished[0].pointLists
    assert a_logic.outputPointLists(new_points) == [] and a_logic.resultsTable(new_points) is None


def test_the_copy_of_a_removed_volume_goes_when_the_module_is_told(a_scene, a_logic, a_small_ct):
    """A removed volume's copy stayed until another volume was copied (with the engine process, a file in shared
    memory of up to 0.35 GB)."""
    other = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "other")
    a_logic.imagesForVolumes([a_small_ct, other])
    a_scene.RemoveNode(other)
    a_logic.dropRemovedVolumes()  # (the module's NodeRemovedEvent observer)
    assert list(a_logic._images) == [a_small_ct.GetID()]


def test_an_engine_error_after_finished_targets_still_updates_their_results_table(a_scene, a_logic, a_small_ct,
                                                                                   two_landmarks, monkeypatch):
    """The targets finished before an engine error are in MRML; their results table now follows them (before, an
    error skipped it, and the table was missing or stale)."""
    targets = [a_small_ct, _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "second")]
    real = a_logic.getMatcher()
    calls = []

    class FailsOnTheSecondTarget:
        def __getattr__(self, name):
            return getattr(real, name)

        def match(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("the engine failed")
            return real.match(*args, **kwargs)

        def match_each(self, *args, **kwargs):  # the engine's own, through this match
            return type(real).match_each(self, *args, **kwargs)

    monkeypatch.setattr(a_logic, "getMatcher", lambda: FailsOnTheSecondTarget())
    worker = Worker()
    errors = []
    try:
        a_logic.startMatch(worker, a_small_ct, two_landmarks, targets, onError=errors.append)
        assert worker.waitForIdle(timeout=120)
    finally:
        worker.shutdown()
    assert [str(e) for e in errors] == ["the engine failed"]
    table = a_logic.resultsTable(two_landmarks)
    assert table is not None and table.GetNumberOfRows() == 2  # the first target's two matches


class _SkipsTarget:
    """The engine, except that it cannot match the target named ``name`` (a ``samembed.TargetError``, as a box that
    holds nothing of it gives)."""

    def __init__(self, real, name: str) -> None:
        self.real, self.name = real, name

    def __getattr__(self, attr):
        return getattr(self.real, attr)

    def match(self, *args, target_names=None, **kwargs):
        from samembed import TargetError

        if target_names == [self.name]:
            raise TargetError(f"{self.name}: nothing to search in the box")
        return self.real.match(*args, target_names=target_names, **kwargs)

    def match_atlases(self, *args, target_names=None, **kwargs):
        from samembed import TargetError

        if target_names == [self.name]:
            raise TargetError(f"{self.name}: nothing to search in the box")
        return self.real.match_atlases(*args, target_names=target_names, **kwargs)

    def match_each(self, *args, **kwargs):  # the engine's own, through this match
        return type(self.real).match_each(self, *args, **kwargs)


def test_earlier_matches_in_a_target_skipped_later_are_kept_and_marked_as_not_updated(a_scene, a_logic, a_small_ct,
                                                                                      two_landmarks, monkeypatch):
    """A target skipped by a later run (its own problem) kept the matches an earlier run had put there, unmarked: the
    results table showed them as that run's confident matches. They are kept (positions, numbers), and marked: not
    confident in the table and the export, the uncertain colour, a description that says why. The next match
    replaces them as usual."""
    later = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "later")
    first = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, later])
    assert all(r.confident for r in first.rows if r.target == "later")  # a copy: confident matches
    before = control_points(first.pointLists[1])[1]
    real = a_logic.getMatcher()
    monkeypatch.setattr(a_logic, "getMatcher", lambda: _SkipsTarget(real, "later"))
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, later])
    assert [name for name, _ in outputs.skipped] == ["later"]
    outNode = a_logic.outputPointList(two_landmarks, later)
    np.testing.assert_array_equal(control_points(outNode)[1], before)  # kept where they were
    records = _matchRecords(outNode)
    assert {r["notUpdated"] for r in records.values()} == {"later: nothing to search in the box"}
    for i in range(outNode.GetNumberOfControlPoints()):
        assert not outNode.GetNthControlPointSelected(i)
        assert outNode.GetNthControlPointDescription(i).startswith(
            "not updated: the last match could not match this target (later: nothing to search in the box); the "
            "earlier match: score ")
    rows = a_logic.resultRows(two_landmarks)
    assert [r.confident for r in rows if r.target == "later"] == [False, False]
    assert all(r.confident for r in rows if r.target != "later")
    table = a_logic.resultsTable(two_landmarks).GetTable()
    column = [table.GetValueByName(i, "confident").ToInt() for i in range(table.GetNumberOfRows())
              if table.GetValueByName(i, "target").ToString() == "later"]
    assert column == [0, 0]
    # matched again: a match as any other; skipped in a run of one point: only that point's match is marked
    monkeypatch.setattr(a_logic, "getMatcher", lambda: real)
    a_logic.matchPoints(a_small_ct, two_landmarks, [later])
    records = _matchRecords(outNode)
    assert not any("notUpdated" in r for r in records.values())
    assert all(outNode.GetNthControlPointSelected(i) for i in range(outNode.GetNumberOfControlPoints()))
    monkeypatch.setattr(a_logic, "getMatcher", lambda: _SkipsTarget(real, "later"))
    a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, later], pointIndices=[0])
    records = _matchRecords(outNode)
    assert ["notUpdated" in records[two_landmarks.GetNthControlPointID(i)] for i in range(2)] == [True, False]
    # the target alone (its error is raised), by the point matching and by its worker job: marked all the same
    monkeypatch.setattr(a_logic, "getMatcher", lambda: real)
    a_logic.matchPoints(a_small_ct, two_landmarks, [later])
    monkeypatch.setattr(a_logic, "getMatcher", lambda: _SkipsTarget(real, "later"))
    from samembed import TargetError

    with pytest.raises(TargetError, match="nothing to search in the box"):
        a_logic.matchPoints(a_small_ct, two_landmarks, [later], pointIndices=[1])
    records = _matchRecords(outNode)
    assert ["notUpdated" in records[two_landmarks.GetNthControlPointID(i)] for i in range(2)] == [False, True]
    assert [r.confident for r in a_logic.resultRows(two_landmarks) if r.target == "later"] == [True, False]
    worker, errors = Worker(), []
    try:
        a_logic.startMatch(worker, a_small_ct, two_landmarks, [later], pointIndices=[0], onError=errors.append)
        assert worker.waitForIdle(timeout=120)
    finally:
        worker.shutdown()
    assert len(errors) == 1 and isinstance(errors[0], TargetError)
    assert all("notUpdated" in r for r in _matchRecords(outNode).values())


def test_a_target_the_engine_cannot_match_among_several_is_skipped_and_named(a_scene, a_logic, a_small_ct,
                                                                            two_landmarks, caplog):
    """A target with a problem of its own (here too small for the model) stopped the job with an error, and the
    targets after it were not matched; it is now skipped and named (``outputs.skipped``, the log, the controller's
    status line), and the others are matched. Alone, it still raises. The engine process sends the same error
    class back (it pickles)."""
    import pickle

    from samembed import TargetError

    tiny = add_volume(a_scene, voxels(a_small_ct)[:2, :3, :3].copy(), ijk_to_ras(a_small_ct), "tiny")
    later = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "later")
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct, tiny, later])
    assert [n.GetName() for n in outputs.pointLists] == ["small CT matches", "later matches"]
    assert [name for name, _ in outputs.skipped] == ["tiny"] and "too small" in outputs.skipped[0][1]
    assert "tiny skipped (the other targets go on)" in caplog.text
    with pytest.raises(TargetError, match="too small"):
        a_logic.matchPoints(a_small_ct, two_landmarks, [tiny])
    # every target skipped: an error, not an empty result told as matched (as `samembed match` says it)
    tiny2 = add_volume(a_scene, voxels(a_small_ct)[:2, :3, :3].copy(), ijk_to_ras(a_small_ct), "tiny 2")
    with pytest.raises(InputError, match=r"none of the 2 targets could be matched: tiny: .*too small.*; tiny 2: "):
        a_logic.matchPoints(a_small_ct, two_landmarks, [tiny, tiny2])
    assert type(pickle.loads(pickle.dumps(TargetError("x")))) is TargetError

    from SAMEmbeddingLib.controller import MatchController

    said = []
    controller = MatchController.__new__(MatchController)  # only its status line is looked at
    controller._onStatus, controller._onFinished, controller.parameters = said.append, None, None
    controller._finished(outputs, None)
    assert said == [f"{len(outputs.rows)} match(es), {sum(r.confident for r in outputs.rows)} confident; skipped: "
                    f"tiny ({outputs.skipped[0][1]})"]


def test_looking_up_the_output_nodes_keeps_no_node_alive(a_scene, a_logic, a_small_ct, two_landmarks):
    """``vtkMRMLScene.GetNodesByClass`` returns a collection the caller must release: the logic's node lookups (the
    module panel's every update, every heatmap slider tick) did not, so every node of the class stayed alive after
    it was removed or its scene closed: each volume's voxels, in a long Slicer session."""
    extra = add_volume(a_scene, voxels(a_small_ct), ijk_to_ras(a_small_ct), "extra")
    a_logic.matchPoints(a_small_ct, two_landmarks, [extra])
    outNode = a_logic.outputPointList(two_landmarks, extra)
    counts = (extra.GetReferenceCount(), outNode.GetReferenceCount())
    for _ in range(3):
        a_logic.outputPointLists(two_landmarks)
        a_logic.resultsTable(two_landmarks)
        a_logic.heatmapNode(extra)
        a_logic._nodes("vtkMRMLScalarVolumeNode")
    assert (extra.GetReferenceCount(), outNode.GetReferenceCount()) == counts


def test_the_results_table_shows_its_column_titles_as_the_header(a_logic, a_small_ct, two_landmarks):
    """Without it, a table view shows the column names as its first row: a clicked row k was the match of row
    k - 1 (the header row jumped to the first match, the last row to none)."""
    a_logic.matchPoints(a_small_ct, two_landmarks, [a_small_ct])
    table = a_logic.resultsTable(two_landmarks)
    assert table.GetUseColumnTitleAsColumnHeader()
    assert [table.GetColumnTitle(n) for n in ("label", "R", "roundtrip_mm")] == ["label", "R (mm)", "round trip (mm)"]
    assert table.GetNumberOfRows() == len(a_logic.resultRows(two_landmarks)) == 2



def test_a_landmark_outside_the_body_is_said_in_slicers_log_by_its_label(a_scene, a_logic, a_small_ct, caplog):
    """The engine's note about a point beside the body went to its own log only (the module's engine process): the
    module says it in Slicer's log, once per match, naming the landmark by its label (the engine knows its ID)."""
    block = voxels(a_small_ct).copy()  # (a block inside an abdomen): air in one corner of every slice, as beside
    block[:, :48, :48] = -1000  # a body at the edge of the field of view
    source = add_volume(a_scene, block, ijk_to_ras(a_small_ct), "edge")
    inside = (ijk_to_ras(a_small_ct) @ np.r_[np.array(block.shape[::-1]) / 2.0, 1.0])[:3]
    corner = (ijk_to_ras(a_small_ct) @ np.r_[12.0, 12.0, block.shape[0] / 2.0, 1.0])[:3]
    points = add_points(a_scene, [inside, corner], ["carina", "beside"], name="clicks")
    copy = _copy(a_scene, a_small_ct, ijk_to_ras(a_small_ct), "copy")
    with caplog.at_level("WARNING", logger="SAMEmbeddingLib.logic"):
        a_logic.matchPoints(source, points, [a_small_ct, copy], options=MatchOptions(polish=False))
    said = [r.getMessage() for r in caplog.records
            if r.name == "SAMEmbeddingLib.logic" and "outside the body" in r.getMessage()]
    assert len(said) == 1 and "('beside')" in said[0] and "carina" not in said[0], said


def _shifted_target(scene, node, name: str = "target"):
    moved = ijk_to_ras(node)
    moved[:3, 3] += [30.0, 0.0, 0.0]
    return _copy(scene, node, moved, name)


def test_a_match_added_to_a_matches_list_under_a_transform_lands_where_the_engine_put_it(a_scene, a_logic,
                                                                                        a_small_ct, two_landmarks):
    """A user may put the matches list under the target's registration transform; a new match was then added in
    the list's own frame (a world position taken for a local one: 50 mm off here), while the earlier ones were set
    in the world frame (a review)."""
    import vtk

    target = _shifted_target(a_scene, a_small_ct)
    out = a_logic.matchPoints(a_small_ct, two_landmarks, [target], [0]).pointLists[0]
    transform = slicer.vtkMRMLLinearTransformNode()
    a_scene.AddNode(transform)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 50.0)
    transform.SetMatrixTransformToParent(shift)
    out.SetAndObserveTransformNodeID(transform.GetID())
    engine = a_logic.matchPoints(a_small_ct, two_landmarks, [target], [1]).rows[0]
    listed = next(r for r in a_logic.resultRows(two_landmarks) if r.label == "L2")
    np.testing.assert_allclose(listed.pointRAS, engine.pointRAS, atol=1e-3)


def test_the_matches_of_a_source_point_deleted_unwatched_go_with_the_next_run(a_scene, a_logic, a_small_ct,
                                                                             two_landmarks):
    """A point deleted while the module watched another list kept its matches through a full re-run: the matches
    list (and its export) held it, the table did not (a review)."""
    target = _shifted_target(a_scene, a_small_ct)
    out = a_logic.matchPoints(a_small_ct, two_landmarks, [target]).pointLists[0]
    two_landmarks.RemoveNthControlPoint(1)
    a_logic.matchPoints(a_small_ct, two_landmarks, [target])
    assert control_points(out)[0] == ["L1"]
    assert [r.label for r in a_logic.resultRows(two_landmarks)] == ["L1"]


def test_a_renamed_source_point_is_named_so_by_its_match_before_it_is_matched_again(a_scene, a_logic, a_small_ct,
                                                                                   two_landmarks):
    """The table and the matches list kept a renamed point's old label until that point itself was matched again
    (a review)."""
    target = _shifted_target(a_scene, a_small_ct)
    out = a_logic.matchPoints(a_small_ct, two_landmarks, [target]).pointLists[0]
    two_landmarks.SetNthControlPointLabel(1, "Femur")
    a_logic.matchPoints(a_small_ct, two_landmarks, [target], [0])  # only the other point (moved, say)
    assert control_points(out)[0] == ["L1", "Femur"]
    assert [r.label for r in a_logic.resultRows(two_landmarks)] == ["L1", "Femur"]


def test_a_matches_list_named_by_the_module_follows_its_targets_name_and_one_named_by_the_user_stays(
        a_scene, a_logic, a_small_ct, two_landmarks):
    """Two targets named alike, one renamed: both lists stayed "CT matches", the user could not tell them apart
    (a review)."""
    first, second = _shifted_target(a_scene, a_small_ct, "CT"), _shifted_target(a_scene, a_small_ct, "CT")
    outputs = a_logic.matchPoints(a_small_ct, two_landmarks, [first, second], [0])
    first_list, second_list = outputs.pointLists
    first.SetName("CT of May")
    a_logic.matchPoints(a_small_ct, two_landmarks, [first, second], [0])
    assert (first_list.GetName(), second_list.GetName()) == ("CT of May matches", "CT matches")
    first_list.SetName("my matches")
    first.SetName("CT of June")
    a_logic.matchPoints(a_small_ct, two_landmarks, [first, second], [0])
    assert first_list.GetName() == "my matches"


def test_a_heatmap_leaves_the_source_in_one_view_and_its_views_get_their_background_back(a_scene, a_logic,
                                                                                         a_small_ct, two_landmarks):
    """The heatmap put the target in every slice view, and the user's next clicks, still placing source landmarks,
    landed on the target's anatomy; jumping to a match moved the source's views too (a review of the module). With
    three views showing the source, Red keeps it; hiding the heatmap puts each view's background back."""
    target = a_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    target.SetAndObserveImageData(a_small_ct.GetImageData())
    first = a_scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    composites = [first]
    for name in ("Red", "Yellow", "Green"):  # (the fixture's first view has no name: named here)
        c = first if name == "Red" else a_scene.AddNode(slicer.vtkMRMLSliceCompositeNode())
        c.SetLayoutName(name)
        c.SetBackgroundVolumeID(a_small_ct.GetID())
        composites += [] if c is first else [c]
        if name != "Red":
            node = slicer.vtkMRMLSliceNode()
            node.SetLayoutName(name)
            a_scene.AddNode(node)
    heatmap = a_logic.computeHeatmap(a_small_ct, two_landmarks, 0, target)
    a_logic.showHeatmap(heatmap, target, sourceVolume=a_small_ct)
    assert [c.GetBackgroundVolumeID() for c in composites] == [a_small_ct.GetID(), target.GetID(), target.GetID()]
    assert [c.GetForegroundVolumeID() for c in composites] == [None, heatmap.GetID(), heatmap.GetID()]
    a_logic.showHeatmap(heatmap, target, sourceVolume=a_small_ct)  # a second click: the same views
    assert [c.GetBackgroundVolumeID() for c in composites] == [a_small_ct.GetID(), target.GetID(), target.GetID()]
    red = a_scene.GetFirstNodeByClass("vtkMRMLSliceNode")
    before = [red.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
    a_logic.jumpToPoint((5.0, 6.0, 7.0), target)  # the target's views only
    assert [red.GetSliceToRAS().GetElement(r, 3) for r in range(3)] == before
    a_logic.hideHeatmap()
    assert [c.GetBackgroundVolumeID() for c in composites] == [a_small_ct.GetID()] * 3
    assert all(c.GetForegroundVolumeID() is None for c in composites)
