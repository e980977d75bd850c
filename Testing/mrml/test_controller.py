"""The point-list controller, driven by point events fired exactly as Slicer fires them, on real MRML.

Slicer (``vtkSlicerMarkupsWidget``, ``vtkMRMLMarkupsNode``) reports a placed point with ``PointPositionDefinedEvent``
and its index; a batch of points (undo, paste, ``StartModify``/``EndModify``) with one ``PointPositionDefinedEvent``
without call data; the end of a drag with ``PointEndInteractionEvent`` without call data while the node attribute
``Markups.MovingMarkupIndex`` names the point (empty: the whole list moved). Here MRML itself fires the first two
(``AddControlPoint`` and ``EndModify`` do); the drag's end is fired as the markups widget does.
"""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from SAMEmbeddingLib.controller import MOVING_INDEX_ATTRIBUTE, MatchController
from SAMEmbeddingLib.logic import MatchLogic
from SAMEmbeddingLib.parameters import OPTION_PARAMETERS, matchOptionsFromParameters, optionDefault
from SAMEmbeddingLib.worker import Worker

from .mrml_helpers import add_points, add_volume, control_points, ijk_to_ras, slicer, voxels, vtk

pytestmark = pytest.mark.needs_data


def _ras(node, ijk) -> np.ndarray:
    return (ijk_to_ras(node) @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


def _parameters(source, points, targets, **changes) -> SimpleNamespace:
    """What the module's parameter node holds (its fields and defaults)."""
    values = {parameter: optionDefault(option) for option, parameter in OPTION_PARAMETERS.items()}
    values.update(sourceVolume=source, sourcePoints=points, targetVolumes=list(targets), heatmapTarget=None,
                  model="random:sam-lite", device="cpu", jumpToMatch=True, heatmapOpacity=0.5, polish=False)
    values.update(changes)
    values.setdefault("parameterNode", object())  # the node a Slicer wrapper wraps (each call wraps it anew)
    return SimpleNamespace(**values)


class Harness:
    """A controller on a logic whose ``startMatch`` calls are recorded (point indices of each)."""

    def __init__(self, scene, matcher):
        self.logic = MatchLogic(scene, matcher=matcher)
        self.worker = Worker()
        self.calls, self.errors, self.status = [], [], []
        real = self.logic.startMatch

        def recording(worker, source, points, targets, pointIndices=None, options=None, **kwargs):
            self.calls.append(None if pointIndices is None else list(pointIndices))
            return real(worker, source, points, targets, pointIndices, options, **kwargs)

        self.logic.startMatch = recording
        # point changes put off as the module panel puts them off (a zero-time Qt timer there), here run at once
        self.controller = MatchController(self.logic, self.worker, onError=self.errors.append,
                                          onStatus=self.status.append, later=lambda match: match())

    def settle(self):
        assert self.worker.waitForIdle(timeout=120)
        calls, self.calls = self.calls, []
        return calls

    def settleAll(self):
        """As the widget's poll timer does: poll the controller until nothing runs or waits."""
        end = time.monotonic() + 120
        while self.controller.busy:
            assert time.monotonic() < end, "the controller stayed busy"
            self.controller.poll()
            time.sleep(0.02)
        calls, self.calls = self.calls, []
        return calls

    def blockWorker(self) -> threading.Event:
        """Running work that ends when the returned event is set (a long match of another click)."""
        release = threading.Event()
        self.worker.submit(lambda task: release.wait(120), name="running work")
        return release


@pytest.fixture
def harness(a_scene, a_matcher):
    h = Harness(a_scene, a_matcher)
    yield h
    h.controller.cleanup()
    h.worker.shutdown()


@pytest.fixture
def a_copy(a_scene, a_small_ct):
    return add_volume(a_scene, voxels(a_small_ct), ijk_to_ras(a_small_ct), "copy CT")


@pytest.fixture
def no_vtk_errors(capfd):
    """VTK prints an observer's exception instead of raising it: fail on any traceback it printed."""
    yield
    err = capfd.readouterr().err
    assert not re.search(r"Traceback|^\w*(Error|Exception)\b", err, re.MULTILINE), err


def _matched(logic, points, target):
    node = logic.outputPointList(points, target)
    return control_points(node) if node is not None else ([], np.zeros((0, 3)))


def test_a_placed_point_is_matched(a_scene, harness, a_small_ct, no_vtk_errors):
    points = slicer.vtkMRMLMarkupsFiducialNode()
    a_scene.AddNode(points)
    harness.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))

    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (64, 70, 10))), "L1")  # PointPositionDefined(0)

    assert harness.settle() == [[0]]
    assert _matched(harness.logic, points, a_small_ct)[0] == ["L1"]
    assert harness.controller.currentPointIndex == 0


def test_a_point_change_is_matched_after_the_event_that_told_of_it_when_asked(a_scene, harness, a_small_ct,
                                                                              no_vtk_errors):
    """The module panel's controller matches a placed or dragged point after the view's event (``later``: a
    zero-time Qt timer), so that nothing a match may show (installing the engine's packages, an error) opens inside
    the interaction that placed the point. The point is found again by ID: one deleted meanwhile is not matched,
    and two events of one placement match it once."""
    put_off = []
    harness.controller._later = put_off.append
    points = slicer.vtkMRMLMarkupsFiducialNode()
    a_scene.AddNode(points)
    harness.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))

    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (40, 90, 6))), "L0")
    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (64, 70, 10))), "L1")
    points.InvokeEvent(points.PointEndInteractionEvent)  # (as a placement may end: L1 again, before its match)
    assert harness.settle() == [] and len(put_off) == 3  # nothing matched during the events
    points.RemoveNthControlPoint(0)  # L0 deleted before its turn: L1 is now index 0
    for match in put_off:
        match()
    assert harness.settle() == [[0]]
    assert _matched(harness.logic, points, a_small_ct)[0] == ["L1"]
    assert harness.errors == []


def test_points_added_in_a_batch_are_matched_together(a_scene, harness, a_small_ct, no_vtk_errors):
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    harness.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))

    wasModifying = points.StartModify()  # as undo or paste: one PointPositionDefinedEvent without call data
    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (40, 90, 6))), "L2")
    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (90, 40, 12))), "L3")
    points.EndModify(wasModifying)

    assert harness.settle() == [[1, 2]]  # L1 was there before: not matched again
    assert _matched(harness.logic, points, a_small_ct)[0] == ["L2", "L3"]


def test_dragging_one_point_rematches_it_and_the_whole_list_rematches_all(a_scene, harness, a_small_ct, no_vtk_errors):
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6))], ["L1", "L2"])
    harness.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))
    harness.controller.propagateAll()
    assert harness.settle() == [None]
    before = _matched(harness.logic, points, a_small_ct)[1]

    # drag L2: positions change while dragging, then the end of the interaction names the point
    points.SetNthControlPointPositionWorld(1, *_ras(a_small_ct, (90, 40, 12)))
    points.SetAttribute(MOVING_INDEX_ATTRIBUTE, "1")
    points.InvokeEvent(points.PointEndInteractionEvent)
    points.SetAttribute(MOVING_INDEX_ATTRIBUTE, "")
    assert harness.settle() == [[1]]
    after = _matched(harness.logic, points, a_small_ct)[1]
    np.testing.assert_allclose(after[0], before[0])
    assert np.linalg.norm(after[1] - _ras(a_small_ct, (90, 40, 12))) < 4.0

    # a click on a point that does not move it: nothing to match
    points.SetAttribute(MOVING_INDEX_ATTRIBUTE, "0")
    points.InvokeEvent(points.PointEndInteractionEvent)
    points.SetAttribute(MOVING_INDEX_ATTRIBUTE, "")
    assert harness.settle() == []

    # the whole list moved (translate handle): the attribute is empty, every point is matched again
    wasModifying = points.StartModify()
    for i in range(2):
        position = [0.0, 0.0, 0.0]
        points.GetNthControlPointPositionWorld(i, position)
        points.SetNthControlPointPositionWorld(i, position[0] + 4.0, position[1], position[2])
    points.EndModify(wasModifying)
    points.InvokeEvent(points.PointEndInteractionEvent)
    assert harness.settle() == [[0, 1]]
    assert harness.errors == []


def test_a_deleted_point_loses_its_matches(a_scene, harness, a_small_ct, no_vtk_errors):
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6))], ["L1", "L2"])
    harness.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))
    harness.controller.propagateAll()
    harness.settle()

    points.RemoveNthControlPoint(0)

    assert _matched(harness.logic, points, a_small_ct)[0] == ["L2"]
    assert harness.settle() == []


def test_deleting_a_checked_target_leaves_matching_working_with_the_others(a_scene, harness, a_small_ct, a_copy,
                                                                          no_vtk_errors):
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    parameters = _parameters(a_small_ct, points, [a_copy, a_small_ct])
    harness.controller.setParameters(parameters)

    a_scene.RemoveNode(a_copy)  # the parameter node's list keeps a stale entry (or a None) until a checkbox changes
    parameters.targetVolumes.append(None)
    assert harness.controller.canMatch() == (True, "")
    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (40, 90, 6))), "L2")

    assert harness.settle() == [[1]]
    assert harness.errors == []
    assert _matched(harness.logic, points, a_small_ct)[0] == ["L2"]


def test_restoring_a_scene_with_the_heatmap_on_starts_no_match(a_scene, harness, a_small_ct, tmp_path, no_vtk_errors):
    saved = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6))], ["L1", "L2"])
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    storage.SetFileName(str(tmp_path / "landmarks.mrk.json"))
    assert storage.WriteData(saved)
    restored = slicer.vtkMRMLMarkupsFiducialNode()
    a_scene.AddNode(restored)
    assert storage.ReadData(restored)  # the scene is read first, then the module gets its parameter node

    parameters = _parameters(a_small_ct, restored, [a_small_ct], showHeatmap=True)
    harness.controller.setParameters(parameters)
    harness.controller.parametersModified()  # the parameter node reports its restored values

    assert harness.settle() == []
    assert not harness.worker.busy
    # switching the heatmap off and on by hand computes it for the last point
    parameters.showHeatmap = False
    harness.controller.parametersModified()
    parameters.showHeatmap = True
    harness.controller.parametersModified()
    assert harness.settle() == [[1]]
    heatmap = harness.logic.heatmapNode(a_small_ct)
    assert heatmap is not None and heatmap.GetHideFromEditors(), "selectors must not offer the heatmap volume"


def test_a_result_row_finds_its_target_by_id_when_names_repeat(a_scene, harness, a_small_ct, no_vtk_errors):
    first = add_volume(a_scene, voxels(a_small_ct), ijk_to_ras(a_small_ct), "CT")
    second = add_volume(a_scene, voxels(a_small_ct), ijk_to_ras(a_small_ct), "CT")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    harness.controller.setParameters(_parameters(a_small_ct, points, [first, second], jumpToMatch=False))
    harness.controller.propagateAll()
    harness.settle()

    assert harness.controller.selectResultRow(1) is second
    assert harness.controller.selectResultRow(0) is first
    assert harness.controller.currentPointIndex == 0


def test_choosing_the_volumes_prepares_them_once_and_the_click_after_it_matches_the_same(a_scene, a_small_ct,
                                                                                        no_vtk_errors):
    from samembed import Matcher

    moved = ijk_to_ras(a_small_ct)
    moved[:3, 3] += [30.0, 0.0, 0.0]
    target = add_volume(a_scene, voxels(a_small_ct), moved, "shifted CT")

    h = Harness(a_scene, None)  # the logic builds its own engine for the parameters' model: an empty cache
    points = slicer.vtkMRMLMarkupsFiducialNode()
    a_scene.AddNode(points)
    parameters = _parameters(a_small_ct, points, [])
    h.controller.setParameters(parameters)
    h.controller.parametersModified()  # no target yet: nothing to prepare
    assert h.controller.prepareTask is None

    parameters.targetVolumes = [target]  # the user checks a target
    h.controller.parametersModified()
    task = h.controller.prepareTask
    assert task is not None and h.status[-1].startswith("Preparing 2 volume(s)")
    # preparing keeps the worker busy (polling goes on) but is no user's job: "propagate all" stays enabled
    assert h.controller.busy and not h.controller.matching
    assert h.settle() == [] and task.state == "done" and h.errors == []
    assert h.status[-1].startswith("Ready: volumes prepared")
    matcher = h.logic.getMatcher()
    for node in (a_small_ct, target):
        image = h.logic.imageForVolume(node)
        assert matcher.cache.get(matcher.embedder.key(image)) is not None, f"{node.GetName()} was not prepared"
    h.controller.parametersModified()  # the same choice again: nothing new to prepare
    assert h.controller.prepareTask is task

    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (64, 70, 10))), "L1")  # the first click
    assert h.controller.matching
    assert h.settle() == [[0]]
    assert not h.controller.matching and not h.controller.busy
    prepared = _matched(h.logic, points, target)[1]
    cold = MatchLogic(a_scene, matcher=Matcher(model="random:sam-lite", device="cpu")).matchPoints(
        a_small_ct, points, [target], options=matchOptionsFromParameters(parameters))
    np.testing.assert_allclose(prepared, control_points(cold.pointLists[0])[1], atol=1e-4)
    h.controller.cleanup()
    h.worker.shutdown()


def test_turning_the_heatmap_on_with_a_bad_setting_reports_it_instead_of_raising_into_vtk(a_scene, harness,
                                                                                           a_small_ct, no_vtk_errors):
    """The heatmap switch runs from the parameter node's observer: a setting the engine refuses raised an
    InputError traceback into VTK, with no status line or message. It is now reported, as after a click."""
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    parameters = _parameters(a_small_ct, points, [a_small_ct], polishLevels="2 7 oops")
    harness.controller.setParameters(parameters)
    harness.controller.parametersModified()
    harness.settle()
    parameters.showHeatmap = True
    harness.controller.parametersModified()
    assert harness.settle() == []
    assert len(harness.errors) == 1 and "polish" in str(harness.errors[0]).lower(), harness.errors


def test_the_view_centres_on_the_matched_point_even_when_an_earlier_one_was_deleted_meanwhile(
        a_scene, harness, a_small_ct, no_vtk_errors, monkeypatch):
    """After a one-point match the views centre on its match. The point was remembered by its index: a point
    deleted before it during the match moved it, and the views went elsewhere (or nowhere). It is remembered by ID."""
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6))], ["L1", "L2"])
    harness.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))
    harness.controller.propagateAll()
    harness.settle()
    centred = []
    monkeypatch.setattr(harness.logic, "jumpToPoint", lambda position, volume=None: centred.append(position))
    harness.controller.matchPoints([1])  # L2, on the worker
    points.RemoveNthControlPoint(0)  # L1 goes meanwhile: L2 is now index 0
    harness.settle()
    expected = harness.logic.matchPosition(points, 0, a_small_ct)
    assert expected is not None and len(centred) == 1 and np.allclose(centred[0], expected)


def test_another_model_chosen_while_work_runs_is_switched_to_after_it_not_on_the_main_thread(
        a_scene, harness, a_small_ct, no_vtk_errors, monkeypatch):
    """Switching engines closes the running one, which waits for the request under way: a click, or clearing the
    cache, with another model chosen during a match froze Slicer's main thread for that request (0.4-1 s) and ended
    the running match as cancelled. Now they wait for the work to end, on the poll timer, and then run."""
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    parameters = _parameters(a_small_ct, points, [a_small_ct])
    h = harness
    h.controller.setParameters(parameters)
    h.controller.matchPoints([0])
    assert h.settleAll() == [[0]]
    events = []
    setModel, clearCache = h.logic.setModel, h.logic.clearCache
    monkeypatch.setattr(h.logic, "setModel", lambda model, device=None: (
        events.append(("switch", str(model), str(device), h.worker.busy)), setModel(model, device)))
    monkeypatch.setattr(h.logic, "clearCache", lambda: (events.append(("clear", h.worker.busy)), clearCache()))

    release = h.blockWorker()
    parameters.device = "auto"  # the user chooses another engine during the work
    h.controller.parametersModified()
    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (40, 90, 6))), "L2")  # and clicks
    h.controller.clearCache()  # and clears the cache
    assert events == [] and h.calls == []  # nothing touched the engine on this thread
    assert h.controller.busy and h.controller.matching
    assert any("Waiting for the running work to end" in line for line in h.status), h.status
    release.set()

    assert h.settleAll() == [[1]]
    assert events == [("clear", False), ("switch", "random:sam-lite", "auto", False)]
    assert h.logic.device == "auto" and h.errors == []
    assert _matched(h.logic, points, a_small_ct)[0] == ["L1", "L2"]
    assert not h.controller.matching


def test_a_waiting_propagate_all_can_be_cancelled_and_a_waiting_click_skips_a_deleted_point(
        a_scene, harness, a_small_ct, no_vtk_errors):
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6))], ["L1", "L2"])
    parameters = _parameters(a_small_ct, points, [a_small_ct])
    h = harness
    h.controller.setParameters(parameters)
    h.controller.matchPoints([0])
    assert h.settleAll() == [[0]]

    release = h.blockWorker()
    parameters.device = "auto"
    h.controller.matchPoints([0, 1])  # a click on both, then L1 is deleted while they wait
    assert h.controller.propagateAll() is None and h.controller.matching  # waits for the work
    h.controller.cancel()  # stops the waiting "propagate all", not the waiting click
    assert h.status[-1] == "Cancelling..."
    points.RemoveNthControlPoint(0)
    release.set()
    assert h.settleAll() == [[0]]  # L2 only (now index 0); the cancelled "propagate all" never ran
    assert h.errors == []


def test_a_click_waiting_for_a_model_switch_is_not_replayed_on_another_point_list(a_scene, harness, a_small_ct,
                                                                                 no_vtk_errors):
    """Point IDs start at "1" in every list: a waiting click, remembered by ID, was matched on the point of that
    ID in the list chosen meanwhile (from a helper's review)."""
    first = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["A1"])
    other = add_points(a_scene, [_ras(a_small_ct, (40, 90, 6))], ["B1"])
    parameters = _parameters(a_small_ct, first, [a_small_ct])
    h = harness
    release = _another_device_chosen_during_work(h, parameters)
    h.controller.matchPoints([0])  # A1 waits for the work
    parameters.sourcePoints = other  # the user picks another list meanwhile
    h.controller.parametersModified()
    release.set()
    assert h.settleAll() == []  # B1 was not clicked: nothing to match
    assert _matched(h.logic, other, a_small_ct)[0] == []


def _another_device_chosen_during_work(h: Harness, parameters) -> threading.Event:
    """``parameters`` in use, work running (ends when the returned event is set), and another device chosen
    meanwhile: a click now waits for the work to end before the engine is switched."""
    h.controller.setParameters(parameters)
    release = h.blockWorker()
    parameters.device = "auto"
    return release


def _prepared(logic, node) -> bool:
    """Whether ``node``'s volume has embeddings in the engine's memory cache (it was prepared or matched)."""
    matcher = logic.getMatcher()
    return matcher.cache.get(matcher.embedder.key(logic.imageForVolume(node))) is not None


def test_a_target_that_cannot_be_matched_is_skipped_by_preparing_and_the_others_are_prepared(a_scene, a_small_ct):
    """As a click skips a target the model cannot embed among several, preparing does: the source and the other
    targets are prepared (before, the first such target ended the preparation), and the status names it."""
    from .mrml_helpers import crop

    good = _shifted(a_scene, a_small_ct, 30.0, "good target")
    tiny = crop(a_scene, a_small_ct, (0, 0, 0), (4, 4, 4), "tiny CT")
    h = Harness(a_scene, None)
    h.controller.setParameters(_parameters(a_small_ct, None, [tiny, good]))
    h.controller.parametersModified()
    assert h.settle() == [] and h.controller.prepareTask.state == "done" and h.errors == []
    assert _prepared(h.logic, a_small_ct) and _prepared(h.logic, good)
    assert re.match(r"Ready: volumes prepared in .* s \(tiny CT cannot be matched: tiny CT: 4 x 4 x 4 voxels .* is too "
                    r"small for the model", h.status[-1]), h.status[-1]
    h.controller.cleanup()
    h.worker.shutdown()


def _shifted(scene, node, dx: float, name: str):
    moved = ijk_to_ras(node)
    moved[:3, 3] += [dx, 0.0, 0.0]
    return add_volume(scene, voxels(node), moved, name)


def _preparing(scene, source):
    """A controller whose parameters choose ``source`` and a shifted copy of it (returned third), on the parameters'
    engine already (preparing is not put off for an engine switch)."""
    good = _shifted(scene, source, 30.0, "good target")
    h = Harness(scene, None)
    parameters = _parameters(source, None, [good])
    h.controller.setParameters(parameters)
    h.logic.setModel("random:sam-lite", "cpu")
    return h, parameters, good


def test_a_choice_that_cannot_be_prepared_and_then_the_choice_before_it_prepares_that_again(a_scene, a_small_ct):
    """A preparation queued behind another job, then replaced by a choice that cannot be prepared (a one-slice
    volume beside a 3D source), is cancelled; choosing what it was for again prepares it (before, the controller
    still took it for prepared, and the first click was cold)."""
    h, parameters, good = _preparing(a_scene, a_small_ct)
    one_slice = add_volume(a_scene, voxels(a_small_ct)[:1], ijk_to_ras(a_small_ct), "one slice")
    release = h.blockWorker()
    h.controller.parametersModified()
    queued = h.controller.prepareTask
    parameters.targetVolumes = [good, one_slice]
    h.controller.parametersModified()
    assert queued.cancelled and h.controller.prepareTask is None  # (the status line is the running job's)
    parameters.targetVolumes = [good]
    h.controller.parametersModified()
    again = h.controller.prepareTask
    assert again is not None and again is not queued
    release.set()
    h.settleAll()
    assert again.state == "done" and _prepared(h.logic, good)
    h.controller.cleanup()
    h.worker.shutdown()


def test_a_target_under_a_non_linear_transform_is_told_in_the_status_not_raised(a_scene, a_small_ct):
    """The parameter observer never raises (Slicer's Qt slot and VTK observer would swallow the rest of it): a
    checked volume under a grid transform is named in the status line, and later parameter changes still apply."""
    warped = _shifted(a_scene, a_small_ct, 30.0, "warped target")
    transform = slicer.vtkMRMLGridTransformNode()
    transform.SetName("registration warp")
    a_scene.AddNode(transform)
    grid = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.SetSpacing(50, 50, 20)
    field.SetOrigin(-150, -150, -50)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(0.0)
    grid.SetDisplacementGridData(field)
    transform.SetAndObserveTransformFromParent(grid)
    warped.SetAndObserveTransformNodeID(transform.GetID())
    h = Harness(a_scene, None)
    parameters = _parameters(a_small_ct, None, [warped], showHeatmap=False)
    h.controller.setParameters(parameters)
    h.controller.parametersModified()
    assert h.controller.prepareTask is None
    assert h.status[-1] == ("Cannot prepare the volumes yet: 'warped target' is under the non-linear transform "
                            "'registration warp'; harden the transform (Data module, right-click, Harden transform) "
                            "or remove it")
    parameters.showHeatmap = True
    h.controller.parametersModified()
    assert h.controller._showHeatmap
    h.controller.cleanup()
    h.worker.shutdown()


def test_unchecking_every_target_stops_the_preparation_under_way(a_scene, a_small_ct):
    h, parameters, _ = _preparing(a_scene, a_small_ct)
    release = h.blockWorker()
    h.controller.parametersModified()
    queued = h.controller.prepareTask
    parameters.targetVolumes = []
    h.controller.parametersModified()
    assert queued.cancelled and h.controller.prepareTask is None
    release.set()
    h.settleAll()
    assert queued.state == "cancelled" and not any(line.startswith("Ready") for line in h.status), h.status
    h.controller.cleanup()
    h.worker.shutdown()


def test_unchecking_every_target_while_the_volumes_are_prepared_says_the_preparation_stopped(a_scene, a_small_ct):
    h, parameters, _ = _preparing(a_scene, a_small_ct)
    matcher = h.logic.getMatcher()
    started, release = threading.Event(), threading.Event()
    prepare = matcher.prepare

    def held_up(*args, **kwargs):  # a long preparation (thin-slice CTs take seconds)
        started.set()
        release.wait(60)
        return prepare(*args, **kwargs)

    matcher.prepare = held_up
    h.controller.parametersModified()
    assert started.wait(30)
    parameters.targetVolumes = []
    h.controller.parametersModified()
    assert h.status[-1] == "Preparing stopped: choose a source volume and at least one target"
    release.set()
    h.settleAll()
    assert h.status[-1] == "Preparing stopped: choose a source volume and at least one target", h.status
    h.controller.cleanup()
    h.worker.shutdown()


def test_entering_the_module_again_keeps_a_click_waiting_for_a_model_switch(a_scene, harness, a_small_ct,
                                                                            no_vtk_errors):
    """Each visit of the module hands the controller its parameter node again: that dropped a click waiting for a
    model switch (never matched, the status frozen on "Waiting for the running work to end") and cancelled a
    preparation under way without starting it again (a review)."""
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    parameters = _parameters(a_small_ct, points, [a_small_ct])
    h = harness
    release = _another_device_chosen_during_work(h, parameters)
    h.controller.parametersModified()
    h.controller.matchPoints([0])  # waits for the work
    # the module left and entered again: Slicer's getParameterNode() wraps the same node in a new wrapper
    h.controller.setParameters(SimpleNamespace(**vars(parameters)))
    release.set()
    assert h.settleAll() == [[0]]
    assert _matched(h.logic, points, a_small_ct)[0] == ["L1"] and h.errors == []
    assert not any("Waiting" in line for line in h.status[-1:]), h.status


def test_a_clicked_result_row_and_the_heatmaps_point_follow_the_points_not_their_places(a_scene, harness,
                                                                                         a_small_ct, a_copy,
                                                                                         no_vtk_errors):
    """A row was looked up in the results as they are now, not as the table shows them: after moving a landmark up
    in the Markups module, or deleting a "<target> matches" list, a click chose another point; and the heatmap's
    point was kept by its index, so deleting an earlier point made it the next one (a review)."""
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6)),
                                  _ras(a_small_ct, (50, 60, 8))], ["L1", "L2", "L3"])
    h = harness
    h.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct, a_copy], jumpToMatch=False))
    h.controller.propagateAll()
    h.settle()
    table = h.logic.resultsTable(points).GetTable()
    shown = [(table.GetValueByName(r, "label").ToString(), table.GetValueByName(r, "target").ToString())
             for r in range(table.GetNumberOfRows())]
    points.SwapControlPoints(0, 1)  # L2 moved up in the Markups module
    assert h.controller.selectResultRow(0) is a_small_ct
    assert points.GetNthControlPointLabel(h.controller.currentPointIndex) == shown[0][0] == "L1"
    a_scene.RemoveNode(h.logic.outputPointList(points, a_small_ct))  # a matches list deleted
    target = h.controller.selectResultRow(3)
    assert (points.GetNthControlPointLabel(h.controller.currentPointIndex), target.GetName()) == shown[3]
    # the heatmap's point: L3, also once a point before it is deleted
    h.controller.currentPointIndex = points.GetNthControlPointIndexByID(points.GetNthControlPointID(2))
    assert points.GetNthControlPointLabel(h.controller.currentPointIndex) == "L3"
    points.RemoveNthControlPoint(0)
    assert points.GetNthControlPointLabel(h.controller.currentPointIndex) == "L3"
    points.RemoveNthControlPoint(points.GetNthControlPointIndexByID(points.GetNthControlPointID(1)))  # L3 itself
    assert h.controller.currentPointIndex is None


def test_a_job_of_earlier_parameters_moves_no_view_and_sets_no_status_when_it_ends(a_scene, harness, a_small_ct,
                                                                                   no_vtk_errors, monkeypatch):
    """A click's job still running when the scene was closed and another opened: its end centred the views on the
    new scene's point of the same ID (IDs restart at "1") and set the new scene's status (a review)."""
    old = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (50, 60, 8))], ["old1", "old2"])
    h = harness
    h.controller.setParameters(_parameters(a_small_ct, old, [a_small_ct]))
    h.controller.matchPoints([0])
    h.settleAll()
    jumps = []
    monkeypatch.setattr(h.logic, "jumpToPoint", lambda position, volume=None: jumps.append(position))
    release = h.blockWorker()
    h.controller.matchPoints([1])  # runs after the work
    new = add_points(a_scene, [_ras(a_small_ct, (40, 90, 6)), _ras(a_small_ct, (60, 66, 9))], ["new1", "new2"])
    h.logic.matchPoints(a_small_ct, new, [a_small_ct])  # the new scene's own matches
    h.controller.setParameters(_parameters(a_small_ct, new, [a_small_ct]))  # another scene's parameters
    said = len(h.status)
    release.set()
    h.settleAll()
    assert jumps == [] and not any("match(es)" in line for line in h.status[said:]), (jumps, h.status[said:])


def test_a_declined_engine_install_is_not_asked_again_at_every_point_but_at_propagate_all(a_scene, a_matcher,
                                                                                         a_small_ct, no_vtk_errors):
    """The module's ``prepareEngine`` asks to install PyTorch: a user who declined it was asked again at every point
    placed. After a refusal point changes say why they are not matched; "Propagate all" asks again."""
    logic, worker, status, asked = MatchLogic(a_scene, matcher=a_matcher), Worker(), [], []
    answer = {"installed": False}

    def prepareEngine() -> bool:
        asked.append(True)
        return answer["installed"]

    controller = MatchController(logic, worker, prepareEngine=prepareEngine, onStatus=status.append,
                                 later=lambda match: match())
    try:
        points = slicer.vtkMRMLMarkupsFiducialNode()
        a_scene.AddNode(points)
        controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))
        points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (64, 70, 10))), "L1")
        assert len(asked) == 1  # the first point asks
        points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (60, 66, 10))), "L2")
        points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (58, 62, 10))), "L3")
        assert len(asked) == 1  # ... the next ones do not
        assert "not installed" in status[-1] and "Propagate all" in status[-1]
        assert controller.propagateAll() is None and len(asked) == 2  # an explicit request asks again
        answer["installed"] = True
        assert controller.propagateAll() is not None and len(asked) == 3
        assert worker.waitForIdle(timeout=120)
        points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (56, 60, 10))), "L4")
        assert len(asked) == 4  # installed now: points are matched again (and checked, as before)
        assert worker.waitForIdle(timeout=120)
        controller.poll()
        assert _matched(logic, points, a_small_ct)[0] == ["L1", "L2", "L3", "L4"]
    finally:
        controller.cleanup()
        worker.shutdown()


def test_a_point_outside_the_source_does_not_stop_the_next_points_from_being_matched(a_scene, harness, a_small_ct,
                                                                                    no_vtk_errors):
    """One point placed outside the source (a click beside the image, a file in the other frame) refused the match of
    every later point: each click's check looked at every point of the list (a review of the web viewer). It is
    said at its own click, and "propagate all" still names it."""
    points = slicer.vtkMRMLMarkupsFiducialNode()
    a_scene.AddNode(points)
    harness.controller.setParameters(_parameters(a_small_ct, points, [a_small_ct]))
    points.AddControlPoint(vtk.vtkVector3d(9999.0, 9999.0, 9999.0), "OUT")
    assert harness.settle() == [] and "lies outside the source volume" in harness.status[-1]
    points.AddControlPoint(vtk.vtkVector3d(*_ras(a_small_ct, (64, 70, 10))), "L1")
    assert harness.settle() == [[1]]
    assert _matched(harness.logic, points, a_small_ct)[0] == ["L1"]
    assert harness.controller.propagateAll() is None and "point 'OUT'" in harness.status[-1]
