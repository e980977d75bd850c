"""What the module panel does with points and settings, without Qt: :class:`MatchController`.

The controller observes the source point list as Slicer changes it and fires the matches the user expects; the
Qt widget only binds buttons and labels to it (so these tests cover what users do), and the web viewer can use it
too. It runs on slicer-core.

How Slicer reports point changes (read from Slicer's markups sources), and what the controller does:

* a point placed: ``PointPositionDefinedEvent`` with the point's index as call data -> that point is matched;
* points added, pasted or restored by undo inside ``StartModify``/``EndModify``: ``PointPositionDefinedEvent``
  once, with *no* call data, at ``EndModify`` -> every point whose position is new or changed is matched;
* a point dragged: ``PointEndInteractionEvent`` with no call data, the node attribute ``Markups.MovingMarkupIndex``
  naming the point (empty when the whole list was moved) -> that point (or every moved point) is matched again;
* a point deleted: ``PointRemovedEvent`` (index, or no call data when batched) -> its matches are removed.

The controller remembers the position each point was last matched at, so a click that does not move a point and
a scene restored with points and settings start no match.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import vtk

from samembed.options import ProgressFn

from . import mrml_io
from .parameters import matchOptionsFromParameters
from .worker import Task

log = logging.getLogger(__name__)

MOVING_INDEX_ATTRIBUTE = "Markups.MovingMarkupIndex"
"""Set by Slicer's markups widget on the point list while a point is dragged (empty: the whole list moved)."""


class MatchController:
    """Keeps one source point list matched into the checked targets, on a worker.

    Args:
        logic: a :class:`~SAMEmbeddingLib.logic.MatchLogic`.
        worker: a :class:`~SAMEmbeddingLib.worker.Worker` (with ``logic.engine == "process"`` its thread only waits
            for the engine process).
        prepareEngine: called before engine work (e.g. to check dependencies, asking the user to install them, and
            to tell the user why not); False stops. After a False, placed and moved points are not matched and it is
            not called for them (a user who declined PyTorch's install was asked again at every point), until an
            explicit request (:meth:`propagateAll`, :meth:`matchPoints`) calls it again.
        onStatus: ``onStatus(text)``: a line for the user (what is happening, why nothing can be matched).
        onProgress: ``progress(done, total, phase)`` of "propagate all" (counted in targets).
        onFinished: ``onFinished(outputs)`` after each match, on the polling thread.
        onError: ``onError(exception)`` when a match failed (bad model, dead engine process ...).
        prepareAhead: when the source and targets are chosen (and whenever they change), prepare them on the
            worker (:meth:`prepareVolumes`), so that the first click only searches.
        engineReady: whether the engine can run without asking the user anything (e.g. its packages are
            installed); preparing ahead waits for it, a click still goes through ``prepareEngine``.

    The parameters (:meth:`setParameters`) are the module's parameter node or any object with its fields.
    """

    def __init__(self, logic, worker, *, prepareEngine: Callable[[], bool] | None = None,
                 onStatus: Callable[[str], None] | None = None, onProgress: ProgressFn | None = None,
                 onFinished: Callable | None = None, onError: Callable[[BaseException], None] | None = None,
                 prepareAhead: bool = True, engineReady: Callable[[], bool] | None = None,
                 later: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.logic = logic
        self.worker = worker
        self.parameters = None
        self.pointList = None
        self._currentPointID: str | None = None  # (currentPointIndex)
        self._parametersGeneration = 0
        """Counts the parameters handed over (a new scene): a job of earlier ones tells nothing when it ends."""
        self.propagateTask = None
        self._prepareEngine = prepareEngine or (lambda: True)
        self._engineRefused = False
        """The last ``prepareEngine`` said False: point changes are not matched until an explicit request."""
        self._onStatus = onStatus or (lambda text: None)
        self._onProgress = onProgress
        self._onFinished = onFinished
        self._onError = onError
        self._observations: list[tuple[object, int]] = []
        self._matchedAt: dict[str, tuple[float, float, float]] = {}
        self._showHeatmap = False
        self.prepareAhead = prepareAhead
        self._engineReady = engineReady or (lambda: True)
        self._later = later
        """Runs a point change's match after the event that told of it (the module panel: a zero-time Qt timer), so
        that nothing the match may show (the dependency question, an error dialog) opens inside the view's
        interaction that placed or dragged the point; None: at once."""
        self.prepareTask = None
        """The latest "prepare volumes" task (None: none started)."""
        self._preparedFor: tuple | None = None
        self._generation = 0
        """Counts preparations started: a finished one that is not the latest is ignored."""
        self._deferredPoints: list[str] | None = None
        """IDs of the points (of :attr:`pointList`) whose match waits for the running work to end (another model or
        device was chosen meanwhile; switching engines on this thread would wait for that work). None: no match
        waits. Another point list drops them: IDs start at "1" in every list."""
        self._deferredAll = False
        """A "propagate all" waits for the same reason."""
        self._deferredClear = False
        """Clearing the cache waits for the running work to end (it would wait for the engine here)."""
        self._deferredPrepare = False
        """Preparing ahead was put off by a model or device change during running work: done when it ends."""

    @property
    def currentPointIndex(self) -> int | None:
        """The point last placed, moved or chosen in the results: the heatmap's point (None: none, or deleted). It
        is kept by its ID: deleting a point before it moves its index (it named the next point)."""
        if self._currentPointID is None or self.pointList is None:
            return None
        index = self.pointList.GetNthControlPointIndexByID(self._currentPointID)
        return index if index >= 0 else None

    @currentPointIndex.setter
    def currentPointIndex(self, index: int | None) -> None:
        points = self.pointList
        valid = index is not None and points is not None and 0 <= index < points.GetNumberOfControlPoints()
        self._currentPointID = points.GetNthControlPointID(index) if valid else None

    # -- settings ----------------------------------------------------------------------------
    def setParameters(self, parameters) -> None:
        """Use these parameters (a restored or new scene); starts no match. The same parameters again (the module
        entered again) change nothing: what is pending, running or waiting goes on. The same means the same parameter
        node: Slicer's ``getParameterNode()`` gives a new wrapper of it on every call (``parameterNode``)."""
        same = parameters is not None and self.parameters is not None and (
            getattr(parameters, "parameterNode", parameters) is getattr(self.parameters, "parameterNode", self.parameters))
        if same:
            self.parameters = parameters  # (the newest wrapper: the one the widget's GUI is connected to)
            self.parametersModified()  # (whatever changed while the module was left)
            return
        self._parametersGeneration += 1
        self.forgetPrepared()
        self._dropDeferred()
        self.parameters = parameters
        self._showHeatmap = bool(parameters.showHeatmap) if parameters is not None else False
        self.setPointList(parameters.sourcePoints if parameters is not None else None)

    def parametersModified(self) -> None:
        """React to changed parameters: a new point list is observed; switching the heatmap on computes it for the
        current point, switching it off hides it."""
        p = self.parameters
        if p is None:
            return
        if p.sourcePoints is not self.pointList:
            self.setPointList(p.sourcePoints)
        if self.prepareAhead:
            self.prepareVolumes()
        show = bool(p.showHeatmap)
        if show == self._showHeatmap:
            return
        self._showHeatmap = show
        if not show:
            self.logic.hideHeatmap()
            return
        index = self.currentPointIndex
        if index is None and self.pointList is not None:
            defined = mrml_io.defined_point_indices(self.pointList)
            index = defined[-1] if defined else None
        if index is not None:
            self.currentPointIndex = index
            # at once, whether or not the point moved (not put off: no view interaction is under way here)
            self._matchChanged([index])  # (an observer: an error is told, not raised into VTK)

    def targets(self) -> list:
        """The checked target volumes that still exist."""
        p = self.parameters
        return self.logic.liveTargets(list(p.targetVolumes) if p is not None else [])

    def heatmapTarget(self):
        """The chosen heatmap target when it is checked, else the first checked target (None: no target)."""
        targets = self.targets()
        chosen = self.parameters.heatmapTarget if self.parameters is not None else None
        if chosen is not None and any(chosen.GetID() == t.GetID() for t in targets):
            return chosen
        return targets[0] if targets else None

    def canMatch(self, pointIndices: list[int] | None = None) -> tuple[bool, str]:
        """``(True, "")`` when these points (None: all, as "propagate all") can be matched, else
        ``(False, reason)``."""
        p = self.parameters
        if p is None:
            return False, "no parameter node"
        return self.logic.canMatch(p.sourceVolume, p.sourcePoints, self.targets(), pointIndices)

    # -- preparing ahead of the first click -----------------------------------------------------
    def _preparationKey(self) -> tuple | None:
        """What a preparation is for: the source, the live targets (node ID and content modification time of
        each), the model and the device; None when there is nothing to prepare."""
        p = self.parameters
        if p is None or p.sourceVolume is None:
            return None
        targets = self.targets()
        if not targets:
            return None
        volumes = tuple(mrml_io.volume_cache_key(node) for node in [p.sourceVolume, *targets])
        return volumes, str(p.model), str(p.device)

    def forgetPrepared(self) -> None:
        """Forget what was prepared (the engine's cache was cleared, or the scene changed): the next change of
        the chosen volumes, or :meth:`prepareVolumes`, prepares them again."""
        self._cancelPreparation()
        self._generation += 1  # whatever the cancelled task reports is ignored
        self.prepareTask = None
        self._preparedFor = None

    def prepareVolumes(self) -> Task | None:
        """Prepare the chosen source and targets on the worker (``MatchLogic.startPrepare``: preprocessing, global
        maps, affine priors, the source's local map, and the whole local map of targets without a trustworthy
        prior), once per choice of volumes, model and device. A click during it waits for it and then only
        searches. Returns the worker's task, or None when there is nothing new to prepare, the engine cannot run
        without asking the user, a model change would have to wait for running work, or the input is not ready
        (the status line says why, and so will a click). A preparation under way for volumes no longer chosen (no
        source, no target) is cancelled."""
        quiet = self._othersPending()  # another job's status line stays until it ends
        try:
            key = self._preparationKey()  # (a volume under a non-linear transform has no key: the status says so)
        except Exception as e:  # noqa: BLE001 - a parameter observer must not raise; the user is told
            self.forgetPrepared()
            self._notPreparing(e, quiet)
            return None
        if key is None:  # nothing to prepare for any more: what runs is wasted work
            if self.prepareTask is not None and self.prepareTask.state in ("queued", "running") and not quiet:
                self._onStatus("Preparing stopped: choose a source volume and at least one target")
            self.forgetPrepared()
            return None
        if key == self._preparedFor or not self._engineReady():
            return None
        if self._switchMustWait():
            self._deferredPrepare = True  # switching engines now would wait for the running work on this thread
            self._cancelPreparation()  # it prepares for the engine being replaced
            return None
        p = self.parameters
        self._cancelPreparation()  # the volumes it prepares were replaced
        try:
            self.logic.setModel(p.model, p.device)
            self._generation += 1
            generation = self._generation
            task = self.logic.startPrepare(
                self.worker, p.sourceVolume, self.targets(),
                onFinished=lambda timings: self._prepared(generation, timings),
                onError=lambda error: self._prepareFailed(generation, error))
        except Exception as e:  # noqa: BLE001 - a parameter observer must not raise; the user is told
            # the preparation cancelled above is not the choice's any more: the same choice, chosen again,
            # is prepared again (its task would report to a generation that has passed)
            self.prepareTask, self._preparedFor = None, None
            self._notPreparing(e, quiet)
            return None
        self._preparedFor = key
        self.prepareTask = task
        if not quiet:
            self._onStatus(f"Preparing {len(key[0])} volume(s) for matching...")
        return task

    def _notPreparing(self, error: BaseException, quiet: bool) -> None:
        log.info("SAMEmbedding: not preparing the volumes: %s", error)
        if not quiet:
            self._onStatus(f"Cannot prepare the volumes yet: {error}")

    def _switchMustWait(self) -> bool:
        """Whether the chosen model or device differs from the engine's while the worker has work: switching
        engines closes the running one, which waits for the request under way (0.4-1 s of a frozen main thread,
        and the running job ended as cancelled), so the switch waits for the work to end (:meth:`poll`)."""
        p = self.parameters
        return (p is not None and self.worker.busy
                and (str(p.model), str(p.device)) != (self.logic.model, self.logic.device))

    def _cancelPreparation(self) -> None:
        if self.prepareTask is not None:
            self.prepareTask.cancel()

    def _othersPending(self) -> bool:
        return any(t is not self.prepareTask for t in self.worker.pendingTasks)

    def _prepared(self, generation: int, timings: dict | None) -> None:
        if generation != self._generation:
            return  # replaced by a newer preparation
        if timings is None:  # cancelled (scene closed, cache cleared): not prepared after all
            self._preparedFor = None
        elif not self._othersPending():
            skipped = "".join(f" ({name} cannot be matched: {why})" for name, why in timings.get("skipped", ()))
            self._onStatus(f"Ready: volumes prepared in {timings['total_s']:.1f} s{skipped}; place a landmark on "
                           "the source")

    def _prepareFailed(self, generation: int, error: BaseException) -> None:
        if generation != self._generation:
            return  # replaced by a newer preparation
        self._preparedFor = None  # a later change (or a click) tries again, and says what is wrong
        log.warning("SAMEmbedding: preparing the volumes failed: %s", error)
        if not self._othersPending():
            self._onStatus(f"Could not prepare the volumes: {error}")

    # -- the point list ----------------------------------------------------------------------
    def setPointList(self, pointList) -> None:
        """Observe ``pointList`` (None: none); its current points count as matched where they are."""
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        if pointList is not self.pointList:
            self._deferredPoints = None  # the clicks of the list before: its IDs would name this list's points
        self.pointList = pointList
        self.currentPointIndex = None
        self._matchedAt = {}
        if pointList is None:
            return
        for event, handler in ((pointList.PointPositionDefinedEvent, self.onPointPositionDefined),
                               (pointList.PointEndInteractionEvent, self.onPointEndInteraction),
                               (pointList.PointRemovedEvent, self.onPointRemoved)):
            self._observations.append((pointList, pointList.AddObserver(event, handler)))
        self._matchedAt = self._positions(mrml_io.defined_point_indices(pointList))

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointPositionDefined(self, caller, event, callData=None) -> None:
        """A point was placed (call data: its index), or points were added in a batch (no call data)."""
        if callData is not None and 0 <= int(callData) < caller.GetNumberOfControlPoints():
            indices = [int(callData)]
        else:
            indices = self._changedPoints(mrml_io.defined_point_indices(caller))
        self._pointsChanged(indices)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointEndInteraction(self, caller, event, callData=None) -> None:
        """A drag ended (never with call data): the moved point is named by ``Markups.MovingMarkupIndex``; when
        that is empty the whole list moved."""
        text = caller.GetAttribute(MOVING_INDEX_ATTRIBUTE) or ""
        defined = mrml_io.defined_point_indices(caller)
        try:
            candidates = [int(text)] if int(text) in defined else defined
        except ValueError:
            candidates = defined
        self._pointsChanged(self._changedPoints(candidates))

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointRemoved(self, caller, event, callData=None) -> None:
        """Points were deleted (one with its index, or several in a batch without): their matches go too."""
        present = {caller.GetNthControlPointID(i) for i in range(caller.GetNumberOfControlPoints())}
        self._matchedAt = {k: v for k, v in self._matchedAt.items() if k in present}
        self.logic.removeMatchesOfDeletedPoints(caller)

    def _positions(self, indices: list[int]) -> dict[str, tuple[float, float, float]]:
        out = {}
        for index in indices:
            position = [0.0, 0.0, 0.0]
            self.pointList.GetNthControlPointPositionWorld(index, position)
            out[self.pointList.GetNthControlPointID(index)] = tuple(position)
        return out

    def _changedPoints(self, indices: list[int]) -> list[int]:
        """Those of ``indices`` whose position differs from where they were last matched (or new ones)."""
        now = self._positions(indices)
        changed = []
        for index in indices:
            pointID = self.pointList.GetNthControlPointID(index)
            before = self._matchedAt.get(pointID)
            if before is None or not np.allclose(before, now[pointID], atol=1e-6):
                changed.append(index)
        return changed

    def _pointsChanged(self, indices: list[int]) -> None:
        if not indices:
            return
        if self._later is not None:  # after the event: the points by ID (one may be deleted meanwhile)
            pointList = self.pointList
            pointIDs = [pointList.GetNthControlPointID(i) for i in indices]

            def match() -> None:
                if self.pointList is not pointList:  # another list was chosen meanwhile
                    return
                now = [pointList.GetNthControlPointIndexByID(p) for p in pointIDs]
                # (changed still: two events of one placement, both put off, match it once)
                self._matchChanged(self._changedPoints([i for i in now if i >= 0]))

            self._later(match)
            return
        self._matchChanged(indices)

    def _matchChanged(self, indices: list[int]) -> None:
        if not indices:
            return
        self.currentPointIndex = indices[-1]
        try:
            self.matchPoints(indices, automatic=True)
        except Exception as e:  # noqa: BLE001 - an observer must not raise into VTK; the user is told
            log.exception("SAMEmbedding: matching after a point change failed")
            self._report(e)

    # -- matching ----------------------------------------------------------------------------
    def matchPoints(self, pointIndices: list[int] | None, *, automatic: bool = False) -> object | None:
        """Match these points (None: all) into every live target on the worker; returns the task, or None when
        the input is not ready (the reason goes to ``onStatus``).

        ``automatic``: the call follows a point placed or moved, not a request of the user's: when the engine could
        not be prepared before (``prepareEngine`` said False: its packages were declined or failed to install), it
        is not prepared again, and the status says how to try again."""
        p = self.parameters
        if pointIndices is not None and p is not None and p.sourcePoints is not None:
            defined = set(mrml_io.defined_point_indices(p.sourcePoints))
            pointIndices = [i for i in pointIndices if i in defined]
            if not pointIndices:
                return None
        # the points to match only: one placed outside the source (a stray click, a file in the other frame)
        # refused every later click's match (a review of the web viewer, which shares this controller)
        ok, reason = self.canMatch(pointIndices)
        if not ok:
            self._onStatus(reason)
            return None
        if automatic and self._engineRefused:
            self._onStatus("Points are not matched: the engine's packages (PyTorch) are not installed. Press "
                           "'Propagate all' to install them, or to see why not.")
            return None
        if not self._prepareEngine():
            self._engineRefused = True
            return None
        self._engineRefused = False
        if self._switchMustWait():
            self._defer(pointIndices)
            return None
        self.logic.setModel(p.model, p.device)
        heatmapIndex = None
        if p.showHeatmap and self.currentPointIndex is not None and (
                pointIndices is None or self.currentPointIndex in pointIndices):
            heatmapIndex = self.currentPointIndex
        options = matchOptionsFromParameters(p).replace(heatmap=heatmapIndex is not None)
        self.logic.setHeatmapOpacity(p.heatmapOpacity)
        # the point to centre on afterwards, by ID: a point deleted meanwhile moves the indices after it
        single = (p.sourcePoints.GetNthControlPointID(pointIndices[0])
                  if pointIndices is not None and len(pointIndices) == 1 else None)
        generation = self._parametersGeneration
        task = self.logic.startMatch(
            self.worker, p.sourceVolume, p.sourcePoints, self.targets(), pointIndices, options,
            heatmapPointIndex=heatmapIndex, heatmapTarget=self.heatmapTarget() if heatmapIndex is not None else None,
            onFinished=lambda outputs, g=generation: self._current(g) and self._finished(outputs, single),
            onError=lambda error, g=generation: self._current(g) and self._report(error),
            onProgress=self._onProgress if pointIndices is None else None)
        indices = pointIndices if pointIndices is not None else mrml_io.defined_point_indices(p.sourcePoints)
        self._matchedAt.update(self._positions(indices))
        self._onStatus("Matching...")
        return task

    def propagateAll(self) -> object | None:
        """Match every placed point into every target (cancellable with :meth:`cancel`)."""
        self.propagateTask = self.matchPoints(None)
        return self.propagateTask

    def cancel(self) -> None:
        """Stop "propagate all" (finished targets are kept), running or waiting for a model switch (a click that
        waits is kept, as a click queued behind it is)."""
        if self.propagateTask is not None or self._deferredAll:
            if self.propagateTask is not None:
                self.propagateTask.cancel()
            self._deferredAll = False
            self._onStatus("Cancelling...")

    def clearCache(self) -> None:
        """Forget every embedding and converted volume (``MatchLogic.clearCache``) and what was prepared. While
        the worker has work this waits for it to end (:meth:`poll`): the engine would make this thread wait."""
        if self.worker.busy:
            self._deferredClear = True
            self._cancelPreparation()  # what it prepares is about to be forgotten
            self._onStatus("The cache is cleared when the running work ends")
            return
        self.logic.clearCache()
        self.forgetPrepared()

    @property
    def busy(self) -> bool:
        """The worker has work or undelivered results, or work waits for it (keep polling while this holds)."""
        return self.worker.busy or self.waiting

    @property
    def cancellable(self) -> bool:
        """Whether :meth:`cancel` has something to stop: "propagate all", running or waiting (a click's match of
        one point is not cancelled: a Cancel button shown for it did nothing, a review of the web viewer)."""
        task = self.propagateTask
        return self._deferredAll or (task is not None and not task.finished.is_set())

    @property
    def matching(self) -> bool:
        """A match or "propagate all" is queued, running, or waiting for running work to end (for a model
        switch). Preparing ahead does not count: a user's job started during it is queued behind it (and then
        only searches), so buttons stay enabled."""
        return self._othersPending() or self._deferredAll or self._deferredPoints is not None

    def poll(self) -> None:
        """Deliver the worker's results, and once the worker is idle start what waited for it: clearing the
        cache, then a model or device switch with the matches and preparation asked for meanwhile (call from
        the main thread's timer)."""
        self.worker.poll()
        if self.worker.busy:
            return
        self.propagateTask = None
        if self.waiting:
            self._runDeferred()

    # -- work that waits for the running work to end -------------------------------------------------
    @property
    def waiting(self) -> bool:
        """Work waits for the running work to end (a model or device switch, clearing the cache); :meth:`poll`
        starts it then."""
        return self._deferredClear or self._deferredAll or self._deferredPoints is not None or self._deferredPrepare

    def _defer(self, pointIndices: list[int] | None) -> None:
        """Match these points (None: all) once the running work ends, with the model and device chosen then."""
        if pointIndices is None:
            self._deferredAll = True
        else:
            waiting = self._deferredPoints or []
            ids = [self.pointList.GetNthControlPointID(i) for i in pointIndices]
            self._deferredPoints = waiting + [i for i in dict.fromkeys(ids) if i not in waiting]
        self._cancelPreparation()  # it prepares for the engine being replaced
        p = self.parameters
        self._onStatus(f"Waiting for the running work to end before switching to model '{p.model}' on {p.device}")

    def _dropDeferred(self) -> None:
        self._deferredClear = self._deferredAll = self._deferredPrepare = False
        self._deferredPoints = None

    def _runDeferred(self) -> None:
        """Start the work that waited for the worker (now idle), in the order it was asked for."""
        clear, everything, ids, prepare = (self._deferredClear, self._deferredAll, self._deferredPoints,
                                           self._deferredPrepare)
        self._dropDeferred()
        try:
            if clear:
                self.logic.clearCache()
                self.forgetPrepared()
            if everything:
                self.propagateAll()
            elif ids is not None and self.pointList is not None:
                indices = [self.pointList.GetNthControlPointIndexByID(i) for i in ids]
                indices = [i for i in indices if i >= 0]  # deleted meanwhile: nothing to match
                if indices:
                    self.currentPointIndex = indices[-1]
                    self.matchPoints(indices)
            if prepare and self.prepareAhead and not clear:
                self.prepareVolumes()
        except Exception as e:  # noqa: BLE001 - called from the poll timer: the user is told, nothing raises into Qt
            log.exception("SAMEmbedding: work that waited for the running work failed")
            self._report(e)

    def _current(self, generation: int) -> bool:
        """Whether a job started under parameters ``generation`` is of the current ones: the job of a closed scene
        (its point IDs name other points in the next one) moves no view and sets no status when it ends."""
        if generation == self._parametersGeneration:
            return True
        log.info("SAMEmbedding: a job of an earlier scene (or parameters) ended; nothing of it is shown")
        return False

    def _finished(self, outputs, pointID: str | None) -> None:
        confident = sum(row.confident for row in outputs.rows)
        note = " (cancelled: finished targets kept)" if outputs.cancelled else ""
        skipped = getattr(outputs, "skipped", [])
        if skipped:
            note += "; skipped: " + "; ".join(f"{name} ({reason})" for name, reason in skipped)
        self._onStatus(f"{len(outputs.rows)} match(es), {confident} confident{note}")
        p = self.parameters
        pointIndex = None
        if pointID is not None and p is not None and p.sourcePoints is not None:
            pointIndex = p.sourcePoints.GetNthControlPointIndexByID(pointID)
            pointIndex = pointIndex if pointIndex >= 0 else None  # deleted meanwhile: nothing to centre on
        if p is not None and p.jumpToMatch and pointIndex is not None and p.sourcePoints is not None:
            target = self.heatmapTarget()
            position = self.logic.matchPosition(p.sourcePoints, pointIndex, target) if target else None
            if position is not None:
                self.logic.jumpToPoint(position, target)
        if self._onFinished is not None:
            self._onFinished(outputs)

    def _report(self, error: BaseException) -> None:
        self._onStatus(f"Matching failed: {error}")
        if self._onError is not None:
            self._onError(error)

    # -- results -----------------------------------------------------------------------------
    def selectResultRow(self, row: int):
        """Make the source point of results-table row ``row`` current and centre the views on its match.

        The row's target is found by node ID (names may repeat). Returns the target node, or None.
        """
        p = self.parameters
        if p is None or p.sourcePoints is None:
            return None
        key = self.logic.resultRowKey(p.sourcePoints, row)  # the row as the table shows it (built after a job)
        if key is None:
            return None
        pointID, targetID = key
        target = self.logic.scene.GetNodeByID(targetID)
        index = p.sourcePoints.GetNthControlPointIndexByID(pointID)
        if target is None or index < 0:
            return None
        self.currentPointIndex = index
        position = self.logic.matchPosition(p.sourcePoints, index, target)
        if position is not None:
            self.logic.jumpToPoint(position, target)
        return target

    def cleanup(self) -> None:
        """Stop observing and cancel pending work."""
        self.forgetPrepared()
        self._dropDeferred()
        self.setPointList(None)
        self.worker.cancelAll()
