"""All behaviour of the SAMEmbedding module, on MRML nodes, without a GUI.

:class:`MatchLogic` takes the scene in its constructor and never reaches for ``slicer.app``, ``qt`` or a
global scene, so it runs inside 3D Slicer and on ``slicer-core`` alike. A match goes in three steps:

1. :meth:`MatchLogic.prepareMatch` (main thread) validates the input and converts MRML volumes and points
   into engine objects (voxels copied, LPS geometry): a :class:`MatchJob`.
2. :meth:`MatchJob.run` (any thread) calls the engine's ``match_each``: the first target alone, then two at a time
   on a CPU of two threads or more, each target handed back in this thread as it is matched; it touches no MRML.
3. :meth:`MatchLogic.applyTargetResult` and :meth:`MatchLogic.finishJob` (main thread) write the output
   point lists, the heatmap volume and the results table.

:meth:`MatchLogic.matchPoints` does all three in the calling thread; :meth:`MatchLogic.startMatch` runs
step 2 on a :class:`~SAMEmbeddingLib.worker.Worker` and steps 3 when the worker is polled.

>>> logic = MatchLogic(slicer.mrmlScene)                                   # doctest: +SKIP
>>> outputs = logic.matchPoints(sourceVolume, sourcePointList, [targetVolume])   # doctest: +SKIP
>>> outputs.pointLists[0].GetName()                                        # doctest: +SKIP
'target matches'
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import logging
import math
import re
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import vtk

from samembed import Cancelled, Image, InputError, MatchOptions, TargetError
from samembed.io import DISTANCE_DECIMALS, POSITION_DECIMALS, SCORE_DECIMALS, csv_number
from samembed.jobs import FuseCall, MatchCall
from samembed.options import ProgressFn

from . import mrml_io

if TYPE_CHECKING:
    from .worker import Task, Worker

log = logging.getLogger(__name__)

#: threads that copy volumes out of VTK at once (:meth:`MatchLogic.imagesForVolumes`): the copies release the GIL;
#: on the 2-core VM two threads copied four 0.31 GB volumes into shared memory in 0.57-0.83 s, one in 1.13-1.39 s
COPY_THREADS = 2

ROLE_ATTRIBUTE = "SAMEmbedding.Role"
"""Node attribute naming what an output node is: ``matches``, ``heatmap`` or ``results``."""
MATCHES_ATTRIBUTE = "SAMEmbedding.Matches"
#: the name the module gave an output node ("<target> matches", "<list> SAM results"): while the node keeps it, it
#: follows the target's (or list's) name; a name the user gives it stays
GIVEN_NAME_ATTRIBUTE = "SAMEmbedding.GivenName"
#: on a results table: the (source point ID, target node ID) of each of its rows, as JSON, so that a clicked row
#: names the match it shows even after the point list was reordered or an output list deleted since it was built
ROW_KEYS_ATTRIBUTE = "SAMEmbedding.RowKeys"
"""Attribute of a ``matches`` point list holding the numbers of each match as data (saved with the scene):
JSON ``{source control point ID: {"pointID": output control point ID, "score": cosine in [-1, 1], "confident":
bool, "roundtripMm": mm, "rematched": bool, "polished": bool, "ncc": NCC in [-1, 1] or null}}``, and ``"notUpdated":
reason`` on a match that a later run was asked for and could not make, because the engine could not match the
target (:func:`_markNotUpdated`): the match is an earlier one, no longer counted as confident."""
LEGACY_POINT_MAP_ATTRIBUTE = "SAMEmbedding.PointMap"
"""Scenes saved before the numbers were stored: ``{source control point ID: output control point ID}`` only."""
SOURCE_REFERENCE = "SAMEmbeddingSourcePoints"
TARGET_REFERENCE = "SAMEmbeddingTargetVolume"

CONFIDENT_COLOR = (0.20, 0.85, 0.30)
"""Colour of a confident match (shown as the point list's *selected* colour)."""
UNCERTAIN_COLOR = (1.00, 0.45, 0.10)
"""Colour of a match whose round trip misses the source point (the *unselected* colour)."""
HEAT_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeIron", "vtkMRMLPETProceduralColorNodePET-Heat")
TABLE_COLUMNS = ("label", "target", "R", "A", "S", "score", "confident", "roundtrip_mm")
"""The results table's columns (and the CSV export's header)."""
TABLE_TITLES = {"label": "label", "target": "target", "R": "R (mm)", "A": "A (mm)", "S": "S (mm)", "score": "score",
                "confident": "confident", "roundtrip_mm": "round trip (mm)"}
"""The results table's column titles: its header in a table view."""


class MatcherProtocol(Protocol):
    """The engine seam: what :class:`MatchLogic` needs from a ``samembed.Matcher``."""

    def match(self, source, points_lps_mm, targets, labels=None, options: MatchOptions = ..., *, mask=None,
              progress: ProgressFn | None = None, cancel: threading.Event | None = None, target_names=None): ...

    def match_atlases(self, atlases, targets, options: MatchOptions = ..., *, progress: ProgressFn | None = None,
                      cancel: threading.Event | None = None, target_names=None): ...

    def match_each(self, source, targets, calls, on_target, *, jobs: int | None = None,
                   cancel: threading.Event | None = None, target_names=None) -> None: ...

    def prepare(self, source, targets, *, progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> dict: ...

    def clear_cache(self) -> None: ...

    @property
    def cache_bytes(self) -> int: ...


# ----------------------------------------------------------------------------------------------
# value objects
# ----------------------------------------------------------------------------------------------
@dataclass
class TargetSpec:
    """One target of a job: node ID and name at preparation time, and its engine image."""

    nodeID: str
    name: str
    image: Image


@dataclass
class TargetResult:
    """Matches of every job point in one target (engine ``Match`` objects, labels = source point IDs)."""

    nodeID: str
    name: str
    matches: list
    heatmaps: dict = field(default_factory=dict)  # source point ID -> samembed.Image on the target's grid


@dataclass
class JobOutcome:
    """What :meth:`MatchJob.run` returns: finished targets, whether it stopped on a cancel, and the targets skipped
    for a problem of their own (``(name, reason)``: too small for the model, nothing to search in the box, ...)."""

    results: list[TargetResult]
    cancelled: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: ``(node ID, reason)`` of every target the engine could not match, skipped or not (a lone target's, the last
    #: of several that all failed): their earlier matches of the job's points are marked as not updated
    unmatched: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class MatchRow:
    """One match as the results table shows it (RAS mm, score in [-1, 1])."""

    label: str
    target: str
    pointRAS: np.ndarray
    score: float
    confident: bool
    targetID: str = ""
    roundtripMm: float = math.nan
    pointID: str = ""
    """The source control point's ID."""


@dataclass
class MatchOutputs:
    """The nodes a match wrote.

    Attributes:
        pointLists: one ``"<target> matches"`` point list per finished target, in target order.
        table: the results table of the source point list.
        heatmaps: target node ID -> similarity volume node (only when a heatmap was asked for).
        rows: one :class:`MatchRow` per match of this call.
        cancelled: True when the call stopped on a cancel; the finished targets are kept.
        skipped: ``(target name, reason)`` of each target that could not be matched among several (its own problem,
            a ``samembed.TargetError``: too small for the model, nothing to search in the box, ...); the others
            are matched. Matches of the same points that an earlier run put in such a target are kept, marked as
            not updated (:func:`_markNotUpdated`).
    """

    pointLists: list = field(default_factory=list)
    table: Any = None
    heatmaps: dict = field(default_factory=dict)
    rows: list[MatchRow] = field(default_factory=list)
    cancelled: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class MatchJob:
    """Everything the engine needs for one match, detached from MRML (safe to run on a worker thread).

    Attributes:
        sourceVolumeID, sourcePointListID: the input nodes (looked up again when results are applied).
        pointIDs, labels: source control point IDs (the engine labels) and their display labels.
        pointsLPS: (N, 3) source points, world LPS mm.
        sourceImage: the source volume as an engine image.
        targets: one :class:`TargetSpec` per target volume.
        options: the engine's search settings (:class:`samembed.MatchOptions`); ``options.heatmap`` is applied
            to one point in one target only: ``heatmapPointID`` in ``heatmapTargetID``.
        heatmapPointID, heatmapTargetID: the point whose similarity map to compute, and in which target (both
            None when ``options.heatmap`` is off).
    """

    sourceVolumeID: str
    sourcePointListID: str
    pointIDs: list[str]
    labels: list[str]
    pointsLPS: np.ndarray
    sourceImage: Image
    targets: list[TargetSpec]
    options: MatchOptions = field(default_factory=MatchOptions)
    heatmapPointID: str | None = None
    heatmapTargetID: str | None = None
    #: the scene's generation when the job was made (:attr:`MatchLogic.sceneGeneration`): after the scene is closed,
    #: node IDs start again, so a late result must not be written into the next scene's nodes of the same IDs
    sceneGeneration: int = 0
    #: the engine's notes said so far (each once per job)
    told: set = field(default_factory=set, repr=False, compare=False)

    def run(self, matcher: MatcherProtocol, cancel: threading.Event | None = None, progress: ProgressFn | None = None,
            onTarget: Callable[[TargetResult], None] | None = None) -> JobOutcome:
        """Match every point into every target; touches no MRML. Several targets: the first alone (it embeds the
        source), then two at a time on a CPU where torch has two threads or more (``match_each`` of the engine, in
        this process or in the engine process; see the README's "The Slicer module's first click").

        Args:
            matcher: the engine (a ``samembed.Matcher`` or the engine process's proxy).
            cancel: no target starts after it, and the targets in flight stop at their next tile; the targets
                finished before it are kept (``Matcher.match_each``, ``EngineProcess.match_each``).
            progress: ``progress(done, total, phase)`` counted in targets, as each target starts and ends.
            onTarget: called with each finished :class:`TargetResult` as soon as it is ready, in this thread (two
                targets matched at once: in the order they finish).

        Returns:
            :class:`JobOutcome` with the finished targets in the targets' order, ``cancelled`` True when stopped
            early.

        Raises:
            samembed.SamEmbedError: the engine refused the input or the model (message says why). Among several
                targets, a target's own problem (``samembed.TargetError``) is logged and listed in
                ``JobOutcome.skipped`` instead, and the other targets are matched.
        """
        sendVolumes = getattr(matcher, "sendVolumes", None)
        if sendVolumes is None:
            return self._matchTargets(matcher, cancel, progress, onTarget)
        # the engine process: every volume now, the later targets preprocessed ahead
        try:
            sendVolumes([self.sourceImage, *(t.image for t in self.targets)], cancel=cancel)
        except Cancelled:  # the engine closed meanwhile (the module left, another model chosen)
            return JobOutcome([], cancelled=True)
        try:
            return self._matchTargets(matcher, cancel, progress, onTarget)
        finally:  # stopped between targets, the engine would hold what it read ahead for them
            release = getattr(matcher, "releaseVolumesAhead", None)
            try:
                if release is not None:
                    release()
            except Exception as e:  # noqa: BLE001 - the job's own outcome (or error) is what matters
                log.info("SAMEmbedding: the engine did not take the job's end: %s", e)

    def _matchTargets(self, matcher: MatcherProtocol, cancel: threading.Event | None, progress: ProgressFn | None,
                      onTarget: Callable[[TargetResult], None] | None) -> JobOutcome:
        """The targets through the engine's ``match_each`` (``samembed.Matcher.match_each``, or
        ``EngineProcess.match_each``): the first alone, then two at a time on a CPU where torch has two threads or
        more; each finished target is given to ``onTarget`` as it comes, the outcome's results are in the targets'
        order (:meth:`run`)."""
        outcome = JobOutcome([])
        total = len(self.targets)
        finished: dict[int, TargetResult] = {}
        inFlight = _InFlight([t.name for t in self.targets])
        unmatchedAt: list[int] = []  # the place of each unmatched target, as outcome.unmatched (and .skipped, but for
        # a lone target's, which is raised) list them

        def inOrder() -> JobOutcome:  # finished and skipped targets in the targets' order, whichever came first
            outcome.results = [finished[i] for i in sorted(finished)]
            order = sorted(range(len(unmatchedAt)), key=unmatchedAt.__getitem__)
            outcome.unmatched[:] = [outcome.unmatched[k] for k in order]
            if len(outcome.skipped) == len(order):
                outcome.skipped[:] = [outcome.skipped[k] for k in order]
            unmatchedAt.sort()
            return outcome

        def told(i: int, event) -> None:
            target = self.targets[i]
            if event is None:
                names = inFlight.started(i)
                if progress:
                    progress(len(finished) + len(outcome.skipped), total,
                             f"Matching {len(self.pointIDs)} point(s) in {names}")
                return
            inFlight.ended(i, event)
            if isinstance(event, TargetError):
                unmatchedAt.append(i)
                outcome.unmatched.append((target.nodeID, str(event)))
                try:
                    _skipTarget(outcome.skipped, target.name, event, total)
                except InputError as stop:  # a lone target's problem, or none matched: the job ends with it, and
                    # what it did (the finished targets, the ones to mark) goes with it
                    stop.jobOutcome = inOrder()
                    raise
                return
            result = self._targetResult(target, event)
            finished[i] = result
            if onTarget:
                onTarget(result)
            if progress:
                progress(len(finished) + len(outcome.skipped), total, f"Matched in {target.name}")

        try:
            matcher.match_each(self.sourceImage, [t.image for t in self.targets], [self._calls(t) for t in self.targets],
                               told, cancel=cancel, target_names=[t.name for t in self.targets])
        except Cancelled:
            outcome.cancelled = True
        return inOrder()

    def _calls(self, target: TargetSpec) -> list[MatchCall]:
        """The engine's matches for ``target``: every point, then, when the heatmap of one of several points is
        wanted there, that point alone for its map (the similarity map comes from the search itself: the later steps,
        refine, polish ..., do not change it)."""
        wantHeatmap = self.heatmapPointID is not None and target.nodeID == self.heatmapTargetID
        together = wantHeatmap and len(self.pointIDs) == 1
        calls = [MatchCall(self.pointsLPS, tuple(self.pointIDs), self.options.replace(heatmap=together))]
        if wantHeatmap and not together:
            k = self.pointIDs.index(self.heatmapPointID)
            calls.append(MatchCall(self.pointsLPS[k:k + 1], (self.heatmapPointID,),
                                   self.options.replace(heatmap=True, refine=False, consistency=False, polish=False)))
        return calls

    def _targetResult(self, target: TargetSpec, results: list) -> TargetResult:
        """A target's :class:`TargetResult` from the engine's results of its :meth:`_calls`."""
        res = results[0]
        for note in getattr(res, "notes", ()):  # (the engine process logs to its own file): in Slicer's log, once,
            for pointID, label in zip(self.pointIDs, self.labels):  # with the points' labels (the engine's are IDs)
                note = note.replace(repr(pointID), repr(label))
            if note not in self.told:
                self.told.add(note)
                log.warning("SAMEmbedding: %s", note)
        result = TargetResult(target.nodeID, target.name, list(res.matches))
        if self.heatmapPointID is not None and target.nodeID == self.heatmapTargetID:
            result.heatmaps[self.heatmapPointID] = results[-1].heatmaps[(0, self.heatmapPointID)]
        return result


# ----------------------------------------------------------------------------------------------
# the logic
# ----------------------------------------------------------------------------------------------
class MatchLogic:
    """Landmark matching on a MRML scene.

    Args:
        scene: the ``vtkMRMLScene`` whose nodes are read and written.
        matcher: the engine (a ``samembed.Matcher``); default: built on first use from ``model`` and ``device``.
        model: ``"default"``, a registered model name, a checkpoint path, or ``"random:sam-lite"`` (tests).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        cacheBytes: memory cap of the engine's embedding cache.
        cacheDir: a folder for the engine's on-disk embedding cache, shared with ``samembed match --cache-dir``
            (in this process or the engine process; default: none).
        engine: ``"here"``: the engine runs in this process (the console, tests); ``"process"``: in a persistent
            child process (:class:`~SAMEmbeddingLib.engine_process.EngineProcess`; what the module panel uses),
            started on first use and restarted after a crash.

    Inputs are never modified: volumes are read (voxels copied), the source point list only read.
    Bad input raises ``samembed.InputError`` (a ``ValueError``) whose message names the node and the fix.
    """

    def __init__(self, scene, matcher: MatcherProtocol | None = None, model: str = "default", device: str = "auto",
                 cacheBytes: int = 3 << 30, engine: str = "here", cacheDir: str | None = None) -> None:
        if engine not in ("here", "process"):
            raise InputError(f"engine must be 'here' or 'process', not {engine!r}")
        self.scene = scene
        self.engine = engine
        self._matcher = matcher
        self._matcherLock = threading.Lock()
        self._model = str(model)
        self._device = str(device)
        self.cacheBytes = int(cacheBytes)
        self.cacheDir = cacheDir
        self.heatmapOpacity = 0.5
        self._images: dict[str, tuple[tuple, Image]] = {}
        #: bumped when the scene starts to close (:meth:`sceneClosing`): jobs made before write nothing into the next
        #: scene (node IDs are reused)
        self.sceneGeneration = 0

    def sceneClosing(self) -> None:
        """The scene starts to close (the module observes it; main thread): the jobs made before write nothing more,
        since the next scene's nodes reuse their IDs, and the volumes copied for this scene go."""
        self.sceneGeneration += 1
        self._images.clear()

    def dropRemovedVolumes(self) -> None:
        """Forget the copies of volumes no longer in the scene (the module calls it when nodes are removed; with the
        engine process, files in shared memory of up to 0.35 GB each, which went only when another volume was
        copied)."""
        for nodeID in [i for i in self._images if self.scene.GetNodeByID(i) is None]:
            del self._images[nodeID]

    # -- model and engine --------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self._model

    @property
    def device(self) -> str:
        return self._device

    def setModel(self, model: str, device: str | None = None) -> None:
        """Choose the model (and device); the engine is rebuilt on next use when either changed."""
        device = self._device if device is None else str(device)
        if str(model) != self._model or device != self._device:
            with self._matcherLock:
                self._model, self._device = str(model), device
                self._closeEngine()
                self._matcher = None

    def useEngineProcess(self, enabled: bool = True) -> None:
        """Run the engine in a persistent child process (``enabled``) or in this process; see ``engine``."""
        engine = "process" if enabled else "here"
        if engine != self.engine:
            with self._matcherLock:
                self._closeEngine()
                self._matcher = None
                self.engine = engine

    def close(self) -> None:
        """Stop the engine process, if one runs (the engine is built again on next use)."""
        with self._matcherLock:
            self._closeEngine()
            self._matcher = None

    def _closeEngine(self) -> None:
        close = getattr(self._matcher, "close", None)
        if close is not None and self.engine == "process":
            close()

    def getMatcher(self) -> MatcherProtocol:
        """The engine, built on first use (loads the model; raises ``InputError`` subclasses for a bad one)."""
        with self._matcherLock:
            if self._matcher is None and self.engine == "process":
                from .engine_process import EngineProcess  # started on its first request

                self._matcher = EngineProcess(self._model, self._device, self.cacheBytes, cacheDir=self.cacheDir)
            if self._matcher is None:
                from samembed import Matcher  # imports torch: only after the dependency check

                started = time.time()
                self._matcher = Matcher(model=self._model, device=self._device, cache_bytes=self.cacheBytes,
                                        cache_dir=self.cacheDir)
                log.info("SAMEmbedding: model '%s' loaded on %s in %.1f s", self._model, self._device, time.time() - started)
            return self._matcher

    def engineDescription(self) -> str | None:
        """What the engine built last runs: ``"<model id> on <device>"`` (None before the first match, or after a
        model or device change until the next one)."""
        matcher = self._matcher
        if matcher is None:
            return None
        model = getattr(matcher, "model", None)
        modelID = getattr(model, "model_id", None) or self._model
        device = getattr(matcher, "device", None) or self._device
        return f"{modelID} on {device}"

    def startEngine(self, cancel: threading.Event | None = None) -> None:
        """Build the engine now and load its model: with ``engine="process"`` the child process starts (importing
        torch takes 1.5-2 s of a 2-core machine) while the user is still choosing volumes, so that neither the
        preparation nor a first click waits for it. Blocks until the engine is ready: call it on a worker."""
        matcher = self.getMatcher()
        warm = getattr(matcher, "warm_up", None)
        if warm is not None:
            warm(cancel=cancel)

    def startEngineOn(self, worker: Worker) -> Task:
        """:meth:`startEngine` on ``worker`` (what the module does when it is entered); returns its ``Task``. A match
        or preparation submitted later runs after it. A failure is logged only: nobody asked for anything yet, and
        the first match reports it (and starts the engine again)."""
        def failed(error: BaseException) -> None:
            log.warning("SAMEmbedding: the engine did not start ahead of use: %s", error)

        return worker.submit(lambda task: self.startEngine(task.cancelEvent), onError=failed, name="start the engine")

    def loadModel(self) -> str:
        """Build the engine now (to surface a model error early); return a short description of the model."""
        matcher = self.getMatcher()
        model = getattr(matcher, "model", None)
        return getattr(model, "model_id", self._model)

    def clearCache(self) -> None:
        """Forget every embedding and every converted volume."""
        self._images.clear()
        if self._matcher is not None:
            self._matcher.clear_cache()

    def cacheBytesInUse(self) -> int:
        """Memory held by cached embeddings and converted volumes, bytes."""
        embeddings = int(self._matcher.cache_bytes) if self._matcher is not None else 0
        return embeddings + sum(image.array.nbytes for _, image in self._images.values())

    # -- input ------------------------------------------------------------------------------
    def imageForVolume(self, volumeNode) -> Image:
        """Engine image of a volume, cached per node ID and image modification time (:meth:`imagesForVolumes`)."""
        return self.imagesForVolumes([volumeNode])[0]

    def imagesForVolumes(self, volumeNodes: Sequence) -> list[Image]:
        """Engine images of volumes, in order, each cached per node ID and image modification time, and named by
        its node's name of the moment.

        The volumes not cached are read from MRML on this thread (:func:`mrml_io.read_volume_voxels`), then their
        voxels are copied on up to :data:`COPY_THREADS` threads while this thread waits: the copies are memory work
        that releases the GIL, and nothing else touches the scene meanwhile. With the engine process, the voxels are
        copied into the files that the process reads (``EngineProcess.newVolumeFile``), not into memory and then
        into the file; each image is hashed as soon as it is copied (``EngineProcess.hashAhead``); and the process
        is started first if it is not running (``EngineProcess.startAhead``: it loads torch meanwhile).

        Raises:
            samembed.InputError: a node is not a volume with voxels, or its geometry cannot be matched (nothing is
                copied then).
            Any error of a copy (e.g. ``MemoryError``), the first in the volumes' order, once every copy has ended;
            the volumes copied are kept.
        """
        images: dict[str, Image] = {}
        todo: dict[str, tuple[tuple, mrml_io.VolumeVoxels]] = {}  # node ID -> (cache key, voxels read from MRML)
        for node in volumeNodes:
            mrml_io.check_volume_node(node)
            nodeID = node.GetID()
            if nodeID in images or nodeID in todo:
                continue
            key = mrml_io.volume_cache_key(node)
            cached = self._images.get(nodeID)
            if cached is not None and cached[0] == key:  # (the key leaves out the name: a renamed node is named
                images[nodeID] = cached[1].renamed(node.GetName())  # anew; the image kept holds its file, if any)
            else:
                todo[nodeID] = (key, mrml_io.read_volume_voxels(node))
        if todo:
            engine = self.getMatcher() if self.engine == "process" else None
            if hasattr(engine, "startAhead"):
                engine.startAhead()  # the engine process starts and loads torch while the volumes are copied
            newFile = getattr(engine, "newVolumeFile", None)
            hashAhead = getattr(engine, "hashAhead", None)

            def copy(voxels: mrml_io.VolumeVoxels, path: Path | None) -> Image:
                image = voxels.image(path)
                if hashAhead is not None:
                    hashAhead(image)  # while the other volumes are copied
                return image

            with concurrent.futures.ThreadPoolExecutor(max(1, min(COPY_THREADS, len(todo))),
                                                       thread_name_prefix="SAMEmbedding-copy") as pool:
                copies = {nodeID: pool.submit(copy, voxels, None if newFile is None else newFile())
                          for nodeID, (_, voxels) in todo.items()}
            failed: BaseException | None = None
            for nodeID, done in copies.items():
                try:
                    image = done.result()
                except BaseException as e:  # noqa: BLE001 - the first error in the volumes' order is raised below
                    failed = failed or e
                    continue
                self._images[nodeID] = (todo[nodeID][0], image)  # kept even when another volume failed: not copied again
                images[nodeID] = image
            self.dropRemovedVolumes()
            if failed is not None:
                raise failed
        return [images[node.GetID()] for node in volumeNodes]

    def canMatch(self, sourceVolume, sourcePointList, targetVolumes: Sequence,
                 pointIndices: Sequence[int] | None = None) -> tuple[bool, str]:
        """``(True, "")`` when :meth:`matchPoints` would accept these inputs (these points; None: every placed one),
        else ``(False, reason)``."""
        try:
            self._validate(sourceVolume, sourcePointList, self.liveTargets(targetVolumes), pointIndices)
        except InputError as e:
            return False, str(e)
        return True, ""

    def liveTargets(self, targetVolumes: Sequence | None) -> list:
        """The target volumes still in this scene, each once, in order (a deleted target leaves a None or a node
        outside the scene in a parameter node's list; the others are still matched)."""
        targets = []
        for node in targetVolumes or []:
            if node is None or self.scene.GetNodeByID(node.GetID()) is not node:
                continue
            if all(node.GetID() != t.GetID() for t in targets):
                targets.append(node)
        return targets

    @staticmethod
    def _validateVolumes(sourceVolume, targetVolumes: list) -> None:
        """The source and at least one target are volumes with voxels (``InputError`` says which is not)."""
        mrml_io.check_volume_node(sourceVolume, "source volume")
        if not targetVolumes:
            raise InputError("no target volume selected; check at least one target volume")
        for target in targetVolumes:
            mrml_io.check_volume_node(target, "target volume")

    def _validate(self, sourceVolume, sourcePointList, targetVolumes: list, pointIndices):
        self._validateVolumes(sourceVolume, targetVolumes)
        mrml_io.check_point_list(sourcePointList)
        if pointIndices is None:
            pointIndices = mrml_io.defined_point_indices(sourcePointList)
        if not pointIndices:
            raise InputError(f"point list '{sourcePointList.GetName()}' has no placed points; place a landmark on the source")
        ids, labels, pointsRAS = mrml_io.points_from_markups(sourcePointList, list(pointIndices))
        inside = mrml_io.ras_inside_volume(sourceVolume, pointsRAS)
        if not inside.all():
            i = int(np.argmin(inside))
            r, a, s = pointsRAS[i]
            raise InputError(f"point '{labels[i]}' at R {r:.1f}, A {a:.1f}, S {s:.1f} mm lies outside the source volume "
                             f"'{sourceVolume.GetName()}'; move it into the volume or choose the volume it was placed on")
        _checkSameDimension(sourceVolume, targetVolumes)
        return ids, labels, pointsRAS

    def prepareMatch(self, sourceVolume, sourcePointList, targetVolumes: Sequence, pointIndices: Sequence[int] | None = None,
                     options: MatchOptions | None = None, *, heatmapPointIndex: int | None = None,
                     heatmapTarget=None) -> MatchJob:
        """Validate the input and detach it from MRML (main thread). The arguments are those of :meth:`matchPoints`.

        Raises:
            samembed.InputError: what is wrong and how to fix it.
        """
        options = _checkOptions(options)
        targets = self.liveTargets(targetVolumes)
        ids, labels, pointsRAS = self._validate(sourceVolume, sourcePointList, targets,
                                                None if pointIndices is None else list(pointIndices))
        heatmapPointID = heatmapTargetID = None
        if options.heatmap:
            heatmapPointID = ids[-1] if heatmapPointIndex is None else sourcePointList.GetNthControlPointID(int(heatmapPointIndex))
            if heatmapPointID not in ids:
                raise InputError(f"heatmap point {heatmapPointIndex} is not among the points being matched")
            heatmapTarget = targets[0] if heatmapTarget is None else heatmapTarget
            if all(heatmapTarget.GetID() != t.GetID() for t in targets):
                raise InputError(f"heatmap target '{heatmapTarget.GetName()}' is not among the target volumes")
            heatmapTargetID = heatmapTarget.GetID()
        sourceImage, *targetImages = self.imagesForVolumes([sourceVolume, *targets])
        return MatchJob(
            sourceVolumeID=sourceVolume.GetID(), sourcePointListID=sourcePointList.GetID(), pointIDs=ids, labels=labels,
            pointsLPS=mrml_io.ras_to_lps(pointsRAS), sourceImage=sourceImage,
            targets=[TargetSpec(t.GetID(), t.GetName(), image) for t, image in zip(targets, targetImages)],
            options=options,
            heatmapPointID=heatmapPointID, heatmapTargetID=heatmapTargetID, sceneGeneration=self.sceneGeneration)

    # -- preparing: the first click's head start ---------------------------------------------
    def _imagesToPrepare(self, sourceVolume, targetVolumes: Sequence) -> tuple[Image, list[Image]]:
        """The source and the live targets as engine images (main thread); bad volumes raise ``InputError``."""
        targets = self.liveTargets(targetVolumes)
        self._validateVolumes(sourceVolume, targets)
        _checkSameDimension(sourceVolume, targets)
        source, *images = self.imagesForVolumes([sourceVolume, *targets])
        return source, images

    def prepareVolumes(self, sourceVolume, targetVolumes: Sequence, *, cancel: threading.Event | None = None,
                       progress: ProgressFn | None = None) -> dict[str, float]:
        """Do now what the first match of these volumes needs (``samembed.Matcher.prepare``: preprocessing, global
        maps, affine priors), so that the first click only searches. Writes no node.

        Returns:
            what ``samembed.Matcher.prepare`` returns: seconds per step (``embed_s``, ``prior_s``, ``whole_s``,
            ``total_s``), ``targets_without_prior``, and ``skipped``: ``(name, reason)`` of each target among
            several that cannot be matched (a click would skip it too; the others are prepared).
        """
        source, targets = self._imagesToPrepare(sourceVolume, targetVolumes)
        return self.getMatcher().prepare(source, targets, progress=progress, cancel=cancel)

    def startPrepare(self, worker: Worker, sourceVolume, targetVolumes: Sequence, *,
                     onFinished: Callable[[dict | None], None] | None = None,
                     onError: Callable[[BaseException], None] | None = None) -> Task:
        """:meth:`prepareVolumes` on ``worker``; returns its ``Task``. A match submitted later waits for it and
        starts at the search. ``onFinished(timings)`` gets None when the task was cancelled."""
        source, targets = self._imagesToPrepare(sourceVolume, targetVolumes)

        def work(task):
            try:
                return self.getMatcher().prepare(source, targets, progress=task.progress, cancel=task.cancelEvent)
            except Cancelled:
                return None

        return worker.submit(work, onDone=onFinished, onError=onError, name=f"prepare {1 + len(targets)} volume(s)")

    # -- the console API ---------------------------------------------------------------------
    def matchPoints(self, sourceVolume, sourcePointList, targetVolumes: Sequence, pointIndices: Sequence[int] | None = None,
                    options: MatchOptions | None = None, *, heatmapPointIndex: int | None = None, heatmapTarget=None,
                    cancel: threading.Event | None = None, progress: ProgressFn | None = None) -> MatchOutputs:
        """Match source landmarks into every target volume. Can be used without the GUI.

        For each target, a point list ``"<target> matches"`` gets one control point per source point, with the
        source point's label, a readable description (score, confidence, round trip) and its colour showing
        confidence (green: confident, orange: not). The numbers are stored as data: :meth:`resultRows` and the
        results table read them. Running again updates the same nodes.

        Args:
            sourceVolume: ``vtkMRMLScalarVolumeNode`` the landmarks were placed on.
            sourcePointList: ``vtkMRMLMarkupsFiducialNode`` holding the landmarks (RAS); it is only read.
            targetVolumes: volumes to find the landmarks in (the source itself is allowed).
            pointIndices: control point indices to match (default: every placed point: "propagate all").
            options: how the engine searches, checks and polishes (``samembed.MatchOptions``; default: its
                defaults). With ``options.heatmap`` the similarity map of one point in one target is computed and
                shown as the foreground layer of every slice view.
            heatmapPointIndex: the point of the heatmap (default: the last point matched).
            heatmapTarget: the target of the heatmap (default: the first target).
            cancel: set it (from another thread or ``progress``) to stop between targets; finished ones are kept.
            progress: ``progress(done, total, phase)``, counted in targets.

        Returns:
            :class:`MatchOutputs` (point lists, results table, heatmaps, rows, cancelled flag).

        Raises:
            samembed.InputError: bad input (no source, no target, a point outside the source, 2D vs 3D, a bad
                model or checkpoint, bad options); nothing is written then. A target that the engine cannot match
                among several (``samembed.TargetError``: too small for the model, nothing to search in the box) is
                skipped and named in ``outputs.skipped``; alone, it raises. Either way, its matches of these points
                from an earlier run are kept and marked as not updated (:func:`_markNotUpdated`).
        """
        started = time.time()
        job = self.prepareMatch(sourceVolume, sourcePointList, targetVolumes, pointIndices, options,
                                heatmapPointIndex=heatmapPointIndex, heatmapTarget=heatmapTarget)
        outputs = MatchOutputs()
        try:
            outcome = job.run(self.getMatcher(), cancel, progress,
                              onTarget=lambda r: self.applyTargetResult(job, r, outputs))
        except InputError as e:  # a lone target that could not be matched, or none of several: its earlier matches
            if getattr(e, "jobOutcome", None) is not None:  # are marked (and the table follows) before the error
                self.finishJob(job, e.jobOutcome, outputs)
            raise
        outputs = self.finishJob(job, outcome, outputs)
        log.info("SAMEmbedding: matched %d point(s) in %d of %d target(s) in %.1f s%s%s", len(job.pointIDs),
                 len(outcome.results), len(job.targets), time.time() - started, " (cancelled)" if outcome.cancelled else "",
                 f"; skipped: {', '.join(name for name, _ in outcome.skipped)}" if outcome.skipped else "")
        return outputs

    def matchAtlases(self, atlases: Sequence, targetVolumes: Sequence, options: MatchOptions | None = None, *,
                     cancel: threading.Event | None = None, progress: ProgressFn | None = None) -> list:
        """Fuse the landmarks of several atlases into every target (multi-atlas fusion). Can be used without the GUI.

        Each atlas is a ``(volume node, point list node)`` pair whose point labels name the landmarks (atlases may
        carry different ones: each is fused over the atlases that carry it; an atlas that lacks some, or one given
        twice, is named in a warning in Slicer's log). The engine matches every atlas and fuses each landmark's predictions per
        target (``samembed.Matcher.match_atlases``: a score-weighted geometric median after rejecting atlases that
        disagree). For each target a point list ``"<target> fused matches"`` gets one control point per landmark;
        its description says how many atlases agreed and their spread (mm), and the numbers are stored as data
        (:data:`MATCHES_ATTRIBUTE`, keyed by label). Inputs are only read; running again updates the same nodes.
        Several targets go as a click's do (``samembed.Matcher.match_each``): the first alone (it embeds the atlases),
        then two at a time on a CPU where torch has two threads or more, the progress counted in targets; a single
        target's progress names each atlas as it is matched. Without ``options``, the between-patients
        preset (``MatchOptions.preset("between-patients")``): atlases
        are other people's annotated scans.

        Returns:
            The fused point lists, one per target matched, in the targets' order. Among several targets, one the
            engine cannot match (a ``samembed.TargetError``: too small for the model, nothing to search) is named
            in a warning in Slicer's log and skipped, and the others are matched; each target's list is written as
            soon as it is matched, so a cancel or an error keeps the targets finished before it.

        Raises:
            samembed.InputError: bad input (as :meth:`matchPoints`), an atlas whose labels repeat (named), or
                heatmaps asked for (a heatmap belongs to one atlas's point); a lone target that cannot be matched,
                or none of several.
        """
        from samembed import Atlas

        options = _checkOptions(MatchOptions.preset("between-patients") if options is None else options)
        if options.heatmap:
            raise InputError("heatmaps are not available when several atlases are fused; match one atlas for them")
        if not atlases:
            raise InputError("no atlas given: pass (volume, point list) pairs")
        targets = self.liveTargets(targetVolumes)
        engineAtlases = []
        for volume, pointList in atlases:
            _, labels, pointsRAS = self._validate(volume, pointList, targets, None)
            engineAtlases.append(Atlas(self.imageForVolume(volume), mrml_io.ras_to_lps(pointsRAS), tuple(labels),
                                       f"{volume.GetName()} / {pointList.GetName()}"))
        first = atlases[0][1]
        matcher = self.getMatcher()
        images = [self.imageForVolume(target) for target in targets]
        nodes: dict[int, Any] = {}
        names = [target.GetName() for target in targets]
        skipped, told, inFlight = [], set(), _InFlight(names)
        # the landmarks of these atlases: an unmatched target's fused ones from an earlier run no longer answer them
        labels = list(dict.fromkeys(label for atlas in engineAtlases for label in atlas.labels))

        def onTarget(i: int, event) -> None:  # in this thread, as each target starts, is fused or is skipped
            target = targets[i]
            if event is None:
                running = inFlight.started(i)
                if progress:
                    progress(len(nodes) + len(skipped), len(targets),
                             f"Fusing {len(labels)} landmark(s) of {len(engineAtlases)} atlases in {running}")
                return
            inFlight.ended(i, event)
            if isinstance(event, TargetError):
                earlier = self.fusedPointList(first, target)
                if earlier is not None:  # (marked first: a lone target's error, or none matched, raises below)
                    _markNotUpdated(earlier, labels, str(event))
                _skipTarget(skipped, target.GetName(), event, len(targets))
                if progress:
                    progress(len(nodes) + len(skipped), len(targets), f"Skipped {target.GetName()}")
                return
            for note in event[0].notes:  # (the engine process logs to its own stream): in Slicer's log and console
                if note not in told:  # (the same for every target: said once)
                    told.add(note)
                    log.warning("SAMEmbedding: %s", note)
            nodes[i] = self._writeFused(first, target, event[0].matches)
            if progress:
                progress(len(nodes) + len(skipped), len(targets), f"Fused in {target.GetName()}")

        if len(targets) == 1:  # one call, whose progress says which atlas is being matched
            onTarget(0, None)
            try:
                result = matcher.match_atlases(engineAtlases, images, options, progress=progress, cancel=cancel,
                                               target_names=names)
            except TargetError as e:
                onTarget(0, e)  # (a lone target's problem: raised there)
                raise
            onTarget(0, [result])
        else:  # the first target alone (it embeds the atlases), then two at a time on a CPU where torch has two threads
            matcher.match_each(None, images, [[FuseCall(tuple(engineAtlases), options)]] * len(targets), onTarget,
                               cancel=cancel, target_names=names)
        return [nodes[i] for i in sorted(nodes)]

    def fusedPointList(self, firstPointList, targetVolume, create: bool = False):
        """The ``"<target> fused matches"`` point list of :meth:`matchAtlases` for the atlases whose first point
        list is ``firstPointList`` (created when asked; else None when there is none)."""
        return self._pointListOf("fused", "fused matches", firstPointList, targetVolume, create)

    def _writeFused(self, firstPointList, target, matches) -> Any:
        """The ``"<target> fused matches"`` point list of :meth:`matchAtlases`, written with ``matches`` (the
        engine's fused matches of that target)."""
        node = self.fusedPointList(firstPointList, target, create=True)
        wasModifying = node.StartModify()
        try:
            node.RemoveAllControlPoints()
            records = {}
            for m in matches:
                index = node.AddControlPointWorld(vtk.vtkVector3d(*np.asarray(m.point_ras_mm, dtype=np.float64)),
                                                  m.label)  # (world RAS: the list may be under a transform)
                node.SetNthControlPointDescription(
                    index, _describe(m) + f"; {m.agreeing} of {m.atlases} atlases agree (spread {m.spread_mm:.1f} mm)"
                    + (f"; rejected: {', '.join(m.rejected)}" if m.rejected else ""))
                node.SetNthControlPointSelected(index, bool(m.confident))
                records[m.label] = {**_record(node.GetNthControlPointID(index), m), "atlases": int(m.atlases),
                                    "agreeing": int(m.agreeing), "spreadMm": _finiteOrNone(m.spread_mm),
                                    "rejected": list(m.rejected)}
            _writeMatchRecords(node, records)
        finally:
            node.EndModify(wasModifying)
        return node

    def propagateAll(self, sourceVolume, sourcePointList, targetVolumes: Sequence, pointIndices: Sequence[int] | None = None,
                     options: MatchOptions | None = None, **kwargs) -> MatchOutputs:
        """Match every placed point of ``sourcePointList`` into every target: :meth:`matchPoints` with
        ``pointIndices=None`` (a given ``pointIndices`` must be None; the signature is shared)."""
        if pointIndices is not None:
            raise InputError("propagateAll matches every placed point; use matchPoints for a subset")
        return self.matchPoints(sourceVolume, sourcePointList, targetVolumes, None, options, **kwargs)

    def computeHeatmap(self, sourceVolume, sourcePointList, pointIndex: int, targetVolume,
                       options: MatchOptions | None = None, show: bool = True):
        """Similarity map of one source point in one target, as a scalar volume on the target's voxel grid.

        The point is matched too (its match is written as by :meth:`matchPoints`). ``show``: leave the map shown
        as the foreground layer of every slice view.
        """
        options = _checkOptions(options).replace(heatmap=True)
        outputs = self.matchPoints(sourceVolume, sourcePointList, [targetVolume], [pointIndex], options,
                                   heatmapPointIndex=pointIndex, heatmapTarget=targetVolume)
        if not show:
            self.hideHeatmap()
        return outputs.heatmaps[targetVolume.GetID()]

    def startMatch(self, worker, sourceVolume, sourcePointList, targetVolumes: Sequence,
                   pointIndices: Sequence[int] | None = None, options: MatchOptions | None = None, *,
                   heatmapPointIndex: int | None = None, heatmapTarget=None,
                   onFinished: Callable[[MatchOutputs], None] | None = None,
                   onError: Callable[[BaseException], None] | None = None, onProgress: ProgressFn | None = None):
        """Like :meth:`matchPoints`, with the engine work on ``worker``; returns its ``Task`` (``task.cancel()``).

        Input is validated here, so bad input raises at once. Each finished target is written when the worker
        is next polled; ``onFinished(outputs)`` follows the last one (also after a cancel).
        """
        job = self.prepareMatch(sourceVolume, sourcePointList, targetVolumes, pointIndices, options,
                                heatmapPointIndex=heatmapPointIndex, heatmapTarget=heatmapTarget)
        outputs = MatchOutputs()

        def work(task):
            matcher = self.getMatcher()
            return job.run(matcher, task.cancelEvent, task.progress,
                           onTarget=lambda r: task.callInMainThread(self.applyTargetResult, job, r, outputs))

        def done(outcome):
            result = self.finishJob(job, outcome if outcome is not None else JobOutcome([], True), outputs)
            if onFinished:
                onFinished(result)

        def failed(error: BaseException) -> None:  # the targets finished before the error are in MRML: the table
            # and heatmap follow them (and the targets it could not match are marked), then the error is told
            self.finishJob(job, getattr(error, "jobOutcome", None) or JobOutcome([], False), outputs)
            if onError:
                onError(error)

        return worker.submit(work, onDone=done, onError=failed, onProgress=onProgress,
                             name=f"match {len(job.pointIDs)} point(s)")

    # -- output -----------------------------------------------------------------------------
    def applyTargetResult(self, job: MatchJob, result: TargetResult, outputs: MatchOutputs | None = None):
        """Write one target's matches (and heatmap) into MRML; main thread. Returns the output point list."""
        if job.sceneGeneration != self.sceneGeneration:
            log.warning("SAMEmbedding: the scene was closed during matching; the results of %s are dropped", result.name)
            return None
        sourceList = self.scene.GetNodeByID(job.sourcePointListID)
        target = self.scene.GetNodeByID(result.nodeID)
        if sourceList is None or target is None:
            log.warning("SAMEmbedding: %s was removed during matching; its results are dropped", result.name)
            return None
        outNode = self.outputPointList(sourceList, target, create=True)
        records = _matchRecords(outNode)
        labelOf = dict(zip(job.pointIDs, job.labels))
        spec = next(t for t in job.targets if t.nodeID == result.nodeID)
        z2d = mrml_io.volume_ijk_to_ras(target)[2, 3] if spec.image.ndim == 2 else None  # a 2D match has z = 0
        wasModifying = outNode.StartModify()
        try:
            for match in result.matches:
                pointID = match.label
                if sourceList.GetNthControlPointIndexByID(pointID) < 0:
                    continue  # the source point was deleted meanwhile
                label = sourceList.GetNthControlPointLabel(sourceList.GetNthControlPointIndexByID(pointID))
                ras = np.array(match.point_ras_mm, dtype=np.float64)
                if z2d is not None:
                    ras[2] = z2d
                index = outNode.GetNthControlPointIndexByID(records.get(pointID, {}).get("pointID", ""))
                if index < 0:  # in world RAS, as the points already there are set: the list may be under a transform
                    index = outNode.AddControlPointWorld(vtk.vtkVector3d(*ras), label or labelOf.get(pointID, ""))
                else:
                    outNode.SetNthControlPointPositionWorld(index, *ras)
                records[pointID] = _record(outNode.GetNthControlPointID(index), match)
                outNode.SetNthControlPointDescription(index, _describe(match))
                outNode.SetNthControlPointSelected(index, bool(match.confident))
                if outputs is not None:
                    outputs.rows.append(MatchRow(label, target.GetName(), ras, float(match.score), bool(match.confident),
                                                 target.GetID(), float(match.roundtrip_mm), pointID))
            _relabel(outNode, records, sourceList)  # this job's and earlier jobs' (a source point renamed since)
            _writeMatchRecords(outNode, records)
        finally:
            outNode.EndModify(wasModifying)
        for pointID, image in result.heatmaps.items():
            index = sourceList.GetNthControlPointIndexByID(pointID)
            label = sourceList.GetNthControlPointLabel(index) if index >= 0 else labelOf.get(pointID, "")
            heatmap = self.heatmapNode(target, create=True)
            mrml_io.update_volume_node_from_image(heatmap, image, reference_node=target)
            heatmap.SetName(f"{label} similarity in {target.GetName()}")
            self._setUpHeatmapDisplay(heatmap, image)
            if outputs is not None:
                outputs.heatmaps[target.GetID()] = heatmap
        if outputs is not None and all(n.GetID() != outNode.GetID() for n in outputs.pointLists):
            outputs.pointLists.append(outNode)
        return outNode

    def finishJob(self, job: MatchJob, outcome: JobOutcome, outputs: MatchOutputs) -> MatchOutputs:
        """Update the results table and show the heatmap after a job (main thread)."""
        outputs.cancelled = bool(outcome.cancelled)
        outputs.skipped = list(outcome.skipped)
        if job.sceneGeneration != self.sceneGeneration:  # its scene was closed: nothing of it goes to the next one
            return outputs
        # in the targets' order, as finished targets that were matched at once may have come in another (stable sort:
        # each target's rows stay in the points' order)
        place = {t.nodeID: k for k, t in enumerate(job.targets)}
        outputs.rows.sort(key=lambda row: place.get(row.targetID, len(place)))
        outputs.pointLists.sort(key=lambda node: place.get(node.GetNodeReferenceID(TARGET_REFERENCE), len(place)))
        sourceList = self.scene.GetNodeByID(job.sourcePointListID)
        if sourceList is not None:
            # the matches of source points deleted while the module did not watch this list (another list selected)
            self.removeMatchesOfDeletedPoints(sourceList, updateTable=False)
            # an unmatched target's matches of these points from an earlier run no longer answer this run's clicks
            for nodeID, reason in outcome.unmatched:
                target = self.scene.GetNodeByID(nodeID)
                outNode = None if target is None else self.outputPointList(sourceList, target)
                if outNode is not None:
                    _markNotUpdated(outNode, job.pointIDs, reason)
            outputs.table = self.updateResultsTable(sourceList)
        if job.heatmapTargetID in outputs.heatmaps:
            target = self.scene.GetNodeByID(job.heatmapTargetID)
            if target is not None:
                self.showHeatmap(outputs.heatmaps[job.heatmapTargetID], target,
                                 sourceVolume=self.scene.GetNodeByID(job.sourceVolumeID))
        return outputs

    def outputPointList(self, sourcePointList, targetVolume, create: bool = False):
        """The ``"<target> matches"`` point list of a source list and target (created when asked)."""
        return self._pointListOf("matches", "matches", sourcePointList, targetVolume, create)

    def _pointListOf(self, role: str, nameEnd: str, sourcePointList, targetVolume, create: bool):
        """The output point list of ``role`` of a source list and target, named ``"<target> <nameEnd>"`` when it is
        created (``create``; its colours: confident and uncertain), else None when there is none."""
        refs = {SOURCE_REFERENCE: sourcePointList.GetID(), TARGET_REFERENCE: targetVolume.GetID()}
        node, created = self._findOrCreate("vtkMRMLMarkupsFiducialNode", role, refs, create,
                                           f"{targetVolume.GetName()} {nameEnd}")
        if not created:
            return node
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*CONFIDENT_COLOR)
            display.SetColor(*UNCERTAIN_COLOR)
        return node

    def outputPointLists(self, sourcePointList) -> list:
        """Every ``matches`` point list made from ``sourcePointList``."""
        return [n for n in self._nodesWithRole("vtkMRMLMarkupsFiducialNode", "matches")
                if n.GetNodeReferenceID(SOURCE_REFERENCE) == sourcePointList.GetID()]

    def removeMatchesOfDeletedPoints(self, sourcePointList, updateTable: bool = True) -> int:
        """Remove matches whose source control point no longer exists; return how many were removed (the results
        table is rebuilt then, unless ``updateTable`` is False)."""
        removed = 0
        for outNode in self.outputPointLists(sourcePointList):
            records = _matchRecords(outNode)
            gone = [p for p in records if sourcePointList.GetNthControlPointIndexByID(p) < 0]
            for pointID in gone:
                index = outNode.GetNthControlPointIndexByID(records.pop(pointID)["pointID"])
                if index >= 0:
                    outNode.RemoveNthControlPoint(index)
                    removed += 1
            if gone:
                _writeMatchRecords(outNode, records)
        if removed and updateTable:
            self.updateResultsTable(sourcePointList)
        return removed

    def resultRows(self, sourcePointList) -> list[MatchRow]:
        """Every match of ``sourcePointList``, in source point order then target order.

        Positions are read from the output point lists (the user may have moved a match by hand), the numbers from
        their :data:`MATCHES_ATTRIBUTE` data (NaN for a scene saved before they were stored).
        """
        rows = []
        outputs = [(n, _matchRecords(n)) for n in self.outputPointLists(sourcePointList)]
        for sourceIndex in range(sourcePointList.GetNumberOfControlPoints()):
            pointID = sourcePointList.GetNthControlPointID(sourceIndex)
            for outNode, records in outputs:
                record = records.get(pointID)
                index = outNode.GetNthControlPointIndexByID(record["pointID"]) if record else -1
                if index < 0:
                    continue
                target = outNode.GetNodeReference(TARGET_REFERENCE)
                position = [0.0, 0.0, 0.0]
                outNode.GetNthControlPointPositionWorld(index, position)
                confident = record.get("confident")
                confident = (bool(outNode.GetNthControlPointSelected(index)) if confident is None
                             else bool(confident) and not record.get("notUpdated"))
                rows.append(MatchRow(sourcePointList.GetNthControlPointLabel(sourceIndex),  # (renamed since: its own)
                                     target.GetName() if target else "",
                                     np.array(position), _float(record.get("score")), confident,
                                     target.GetID() if target else "", _float(record.get("roundtripMm")), pointID))
        return rows

    def resultRowKey(self, sourcePointList, row: int) -> tuple[str, str] | None:
        """``(source point ID, target node ID)`` of row ``row`` of the results table as it was built (what the view
        shows), or None when it has no such row; a table of a scene saved before the keys were stored: the row of
        :meth:`resultRows` now."""
        table = self.resultsTable(sourcePointList)
        text = table.GetAttribute(ROW_KEYS_ATTRIBUTE) if table is not None else None
        if text is not None:
            try:
                keys = json.loads(text)
            except ValueError:
                keys = None
            if isinstance(keys, list):
                return tuple(keys[row]) if 0 <= row < len(keys) else None
        rows = self.resultRows(sourcePointList)
        return (rows[row].pointID, rows[row].targetID) if 0 <= row < len(rows) else None

    def resultsTable(self, sourcePointList, create: bool = False):
        """The results table node of a source point list (created when asked)."""
        return self._findOrCreate("vtkMRMLTableNode", "results", {SOURCE_REFERENCE: sourcePointList.GetID()}, create,
                                  f"{sourcePointList.GetName()} SAM results")[0]

    def updateResultsTable(self, sourcePointList):
        """Rebuild the results table (label, target, R, A, S, score, confident, roundtrip_mm: how far the round
        trip landed from the click, mm, why a match is not confident; NaN for a scene saved before it was stored)
        from the output point lists."""
        tableNode = self.resultsTable(sourcePointList, create=True)
        table = vtk.vtkTable()
        columns = {}
        for name in TABLE_COLUMNS:
            column = vtk.vtkStringArray() if name in ("label", "target") else (
                vtk.vtkIntArray() if name == "confident" else vtk.vtkDoubleArray())
            column.SetName(name)
            table.AddColumn(column)
            columns[name] = column
        keys = []
        for row in self.resultRows(sourcePointList):
            keys.append([row.pointID, row.targetID])
            columns["label"].InsertNextValue(row.label)
            columns["target"].InsertNextValue(row.target)
            for axis, value in zip("RAS", row.pointRAS):
                columns[axis].InsertNextValue(float(value))
            columns["score"].InsertNextValue(row.score)
            columns["confident"].InsertNextValue(int(row.confident))
            columns["roundtrip_mm"].InsertNextValue(row.roundtripMm)
        wasModifying = tableNode.StartModify()
        try:
            tableNode.SetAndObserveTable(table)
            tableNode.SetAttribute(ROW_KEYS_ATTRIBUTE, json.dumps(keys))
            # the titles are the view's header: without it, a table view shows the column names as its first row,
            # so view row k would be data row k - 1 (the rows of resultRows, which a click selects)
            if hasattr(tableNode, "SetColumnTitle"):  # Slicer 5.6.1 and later (both came in one commit)
                tableNode.SetUseColumnTitleAsColumnHeader(True)
                for name, title in TABLE_TITLES.items():
                    tableNode.SetColumnTitle(name, title)
            else:  # (the titles' call, unguarded, failed every match's table on Slicer 5.4-5.6.0: a review)
                tableNode.SetUseColumnNameAsColumnHeader(True)
        finally:
            tableNode.EndModify(wasModifying)
        return tableNode

    # -- heatmap ----------------------------------------------------------------------------
    def heatmapNode(self, targetVolume, create: bool = False):
        """The similarity volume shown over ``targetVolume`` (one per target, reused; created when asked).

        It is hidden from editors, so the module's volume selectors (and other modules' node selectors) do not
        offer it as a source or target; it stays in the slice views' layers.
        """
        node, created = self._findOrCreate("vtkMRMLScalarVolumeNode", "heatmap", {TARGET_REFERENCE: targetVolume.GetID()},
                                           create, f"similarity in {targetVolume.GetName()}")
        if created:
            node.SetHideFromEditors(True)
        return node

    def _findOrCreate(self, className: str, role: str, references: dict, create: bool, name: str):
        """``(node, created)``: the output node of ``className`` with ``role`` whose node references equal
        ``references`` ({reference role: node ID}); a new one (role and references set) when none exists and
        ``create``, else ``(None, False)``."""
        for node in self._nodesWithRole(className, role):
            if all(node.GetNodeReferenceID(ref) == nodeID for ref, nodeID in references.items()):
                # a name the module gave follows its target's or list's name (renamed since); one the user chose stays
                if create and node.GetName() == node.GetAttribute(GIVEN_NAME_ATTRIBUTE) != name:
                    node.SetName(name)
                    node.SetAttribute(GIVEN_NAME_ATTRIBUTE, name)
                return node, False
        if not create:
            return None, False
        node = self.scene.AddNewNodeByClass(className, name)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(GIVEN_NAME_ATTRIBUTE, name)
        for ref, nodeID in references.items():
            node.SetNodeReferenceID(ref, nodeID)
        return node, True

    def heatColorNodeID(self) -> str:
        """Slicer's Iron colour table (or PET-Heat); a private Iron table when the scene has neither."""
        for nodeID in HEAT_COLOR_NODE_IDS:
            if self.scene.GetNodeByID(nodeID) is not None:
                return nodeID
        for node in self._nodesWithRole("vtkMRMLColorTableNode", "heat colours"):
            return node.GetID()
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "SAMEmbedding heat")
        node.SetTypeToIron()
        node.SetAttribute(ROLE_ATTRIBUTE, "heat colours")
        node.SetHideFromEditors(True)
        return node.GetID()

    def _setUpHeatmapDisplay(self, heatmap, image: Image) -> None:
        display = heatmap.GetDisplayNode()
        if display is None:
            display = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
            heatmap.SetAndObserveDisplayNodeID(display.GetID())
        display.SetAndObserveColorNodeID(self.heatColorNodeID())
        low, top = heatmap_display_range(image.array)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, top)
        display.SetApplyThreshold(True)  # below the 90th percentile: transparent over the target
        display.SetThreshold(low, max(top, 1.0))

    def showHeatmap(self, heatmapNode, targetVolume, opacity: float | None = None, sourceVolume=None) -> None:
        """Show the target as background and the heatmap as foreground in the slice views that do not show
        ``sourceVolume``; when every view shows it, in all but one (the Red view, else the first), which keeps the
        source for placing points. Without a source (or with one view), in every view. Each view's background
        before is put back by :meth:`hideHeatmap`.

        Every view showed the target before, and the user's next clicks, still placing source landmarks, landed
        on the target's anatomy (a review)."""
        if opacity is not None:
            self.heatmapOpacity = float(opacity)
        for composite in self._targetViews(sourceVolume):
            if composite.GetAttribute(BACKGROUND_BEFORE_ATTRIBUTE) is None:  # (a second heatmap keeps the first's)
                composite.SetAttribute(BACKGROUND_BEFORE_ATTRIBUTE, composite.GetBackgroundVolumeID() or "")
            composite.SetBackgroundVolumeID(targetVolume.GetID())
            composite.SetForegroundVolumeID(heatmapNode.GetID())
            composite.SetForegroundOpacity(self.heatmapOpacity)

    def _targetViews(self, sourceVolume) -> list:
        """The slice composite nodes a heatmap goes to (:meth:`showHeatmap`)."""
        composites = self._nodes("vtkMRMLSliceCompositeNode")
        if sourceVolume is None or len(composites) <= 1:
            return composites
        others = [c for c in composites if c.GetBackgroundVolumeID() != sourceVolume.GetID()]
        if others and len(others) < len(composites):
            return others
        kept = next((c for c in composites if c.GetLayoutName() == "Red"), composites[0])
        return [c for c in composites if c is not kept]

    def setHeatmapOpacity(self, opacity: float) -> None:
        """Change the foreground opacity wherever a heatmap is shown."""
        self.heatmapOpacity = float(opacity)
        heatmapIDs = {n.GetID() for n in self._nodesWithRole("vtkMRMLScalarVolumeNode", "heatmap")}
        for composite in self._nodes("vtkMRMLSliceCompositeNode"):
            if composite.GetForegroundVolumeID() in heatmapIDs:
                composite.SetForegroundOpacity(self.heatmapOpacity)

    def hideHeatmap(self) -> None:
        """Remove heatmaps from the foreground layer of every slice view."""
        heatmapIDs = {n.GetID() for n in self._nodesWithRole("vtkMRMLScalarVolumeNode", "heatmap")}
        for composite in self._nodes("vtkMRMLSliceCompositeNode"):
            if composite.GetForegroundVolumeID() in heatmapIDs:
                composite.SetForegroundVolumeID(None)
            before = composite.GetAttribute(BACKGROUND_BEFORE_ATTRIBUTE)
            if before is not None:  # the view's own background again (the source, where points are placed)
                composite.SetBackgroundVolumeID(before if before and self.scene.GetNodeByID(before) else None)
                composite.RemoveAttribute(BACKGROUND_BEFORE_ATTRIBUTE)

    # -- navigation and export ---------------------------------------------------------------
    def jumpToPoint(self, pointRAS, volume=None) -> None:
        """Centre the slice views on a world RAS point: those that show ``volume`` as background when it is given
        and some do (a match in a target moved the source's views too, elsewhere in another patient: a review),
        else every view."""
        r, a, s = (float(v) for v in pointRAS)
        sliceNodes = self._nodes("vtkMRMLSliceNode")
        if volume is not None:
            showing = {c.GetLayoutName() for c in self._nodes("vtkMRMLSliceCompositeNode")
                       if c.GetBackgroundVolumeID() == volume.GetID()}
            sliceNodes = [n for n in sliceNodes if n.GetLayoutName() in showing] or sliceNodes
        for sliceNode in sliceNodes:
            sliceNode.JumpSliceByCentering(r, a, s)

    def matchPosition(self, sourcePointList, pointIndex: int, targetVolume):
        """World RAS position of a source point's match in a target, or None when not matched yet."""
        outNode = self.outputPointList(sourcePointList, targetVolume)
        if outNode is None or not 0 <= pointIndex < sourcePointList.GetNumberOfControlPoints():
            return None
        record = _matchRecords(outNode).get(sourcePointList.GetNthControlPointID(pointIndex), {})
        index = outNode.GetNthControlPointIndexByID(record.get("pointID", ""))
        if index < 0:
            return None
        position = [0.0, 0.0, 0.0]
        outNode.GetNthControlPointPositionWorld(index, position)
        return np.array(position)

    def exportPaths(self, sourcePointList, path) -> list[Path]:
        """The files :meth:`exportResults` would write for ``path``: ``path`` itself, or with several targets and
        a markups suffix, one ``<stem>_<target><suffix>`` per target (not ``path``). [] when there is nothing to
        export or the suffix is unknown."""
        path = Path(path)
        outNodes = self.outputPointLists(sourcePointList) if sourcePointList is not None else []
        suffix = next((s for s in (".mrk.json", ".fcsv") if path.name.lower().endswith(s)), None)
        if not outNodes or (suffix is None and not path.name.lower().endswith(".csv")):
            return []
        if suffix is None or len(outNodes) == 1:
            return [path]
        from samembed.names import deduplicated

        stem = path.name[: -len(suffix)]
        targets = [outNode.GetNodeReference(TARGET_REFERENCE) for outNode in outNodes]
        # targets of the same name (or names that differ only in characters a file name cannot hold) keep their own
        # files: _2, _3, ...
        names = deduplicated([_safeName(t.GetName() if t else n.GetName()) for t, n in zip(targets, outNodes)])
        return [path.with_name(f"{stem}_{name}{suffix}") for name in names]

    def exportResults(self, sourcePointList, path, replace: bool = True) -> list[Path]:
        """Write the matches of ``sourcePointList`` to ``path`` (atomically).

        ``.csv``: the results table (label, target, R, A, S in RAS mm, score, confident), all targets in one file.
        ``.mrk.json`` / ``.fcsv``: Slicer markups files (LPS, as Slicer writes them); one file per target, named
        ``<stem>_<target><suffix>`` when there are several targets (``_2``, ``_3``, ... after a target name that
        another target's file already has).

        With ``replace=False``, files that exist already (:meth:`exportPaths`: with several targets, other names
        than the one chosen, which a save dialog asked about) are refused by name, and nothing is written.

        Returns:
            the files written.

        Raises:
            samembed.InputError: nothing to export, an unknown suffix, a folder that does not exist, or files that
                exist when ``replace`` is False.
        """
        from samembed.io import atomic_path, write_text_atomic

        path = Path(path)
        name = path.name.lower()
        outNodes = self.outputPointLists(sourcePointList) if sourcePointList is not None else []
        if not outNodes:
            raise InputError("there are no matches to export; match some landmarks first")
        destinations = self.exportPaths(sourcePointList, path)
        there = [d for d in destinations if d.exists()]
        if there and not replace:
            raise InputError(f"{', '.join(str(d) for d in there)}: exist already; the export would replace "
                             f"{'it' if len(there) == 1 else 'them'} (nothing was written)")
        if name.endswith(".csv"):
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(TABLE_COLUMNS)
            for row in self.resultRows(sourcePointList):
                writer.writerow([row.label, row.target, *(csv_number(v, POSITION_DECIMALS) for v in row.pointRAS),
                                 csv_number(row.score, SCORE_DECIMALS), int(row.confident),
                                 csv_number(row.roundtripMm, DISTANCE_DECIMALS)])
            return [write_text_atomic(path, buffer.getvalue())]
        from slicer import vtkMRMLMarkupsFiducialStorageNode, vtkMRMLMarkupsJsonStorageNode

        if name.endswith(".mrk.json"):
            storageClass = vtkMRMLMarkupsJsonStorageNode
        elif name.endswith(".fcsv"):
            storageClass = vtkMRMLMarkupsFiducialStorageNode
        else:
            raise InputError(f"{path}: unknown export format; use .mrk.json, .fcsv or .csv")
        written = []
        for outNode, destination in zip(outNodes, destinations):
            storage = storageClass()  # Slicer's own writer: LPS, labels and descriptions as Slicer saves them
            with atomic_path(destination) as tmp:
                storage.SetFileName(str(tmp))
                if not storage.WriteData(outNode):
                    raise InputError(f"{destination}: writing failed")
            written.append(destination)
        return written

    # -- helpers ----------------------------------------------------------------------------
    def _nodes(self, className: str) -> list:
        return mrml_io.nodes_by_class(self.scene, className)

    def _nodesWithRole(self, className: str, role: str) -> list:
        return [n for n in self._nodes(className) if n.GetAttribute(ROLE_ATTRIBUTE) == role]


#: a slice composite node's attribute: its background before a heatmap took the view (put back when it goes)
BACKGROUND_BEFORE_ATTRIBUTE = "SAMEmbedding.BackgroundBeforeHeatmap"
#: heatmap voxels, at most, whose 90th percentile sets the display's lower end (:func:`heatmap_display_range`)
HEATMAP_LEVEL_SAMPLES = 4_000_000


def heatmap_display_range(similarity: np.ndarray) -> tuple[float, float]:
    """The shown range of a heatmap's similarities (cosines; -1 where nothing was searched): from their 90th
    percentile (below it the heatmap is transparent) to their maximum; ``(0, 1)`` when nothing was searched.

    The percentile is taken on at most :data:`HEATMAP_LEVEL_SAMPLES` voxels, every n-th along each axis, without a
    copy of the whole map. The exact percentile of a map on LIDC-0001's grid (35 M voxels) took 1.3 s of the main
    thread, on a 0.5 mm chest CT's (175 M voxels) 4.5 s and 2-3 GB of float64 copies; the sample's takes 0.02-0.05 s
    and was within 0.002 of it."""
    top = float(similarity.max()) if similarity.size else -1.0
    if top <= -1.0:
        return 0.0, 1.0
    step = max(1, math.ceil((similarity.size / HEATMAP_LEVEL_SAMPLES) ** (1 / max(similarity.ndim, 1))))
    sample = similarity[(slice(None, None, step),) * similarity.ndim]
    values = sample[sample > -1.0]
    if values.size == 0:  # the searched voxels all fall between the sampled ones: every voxel, then
        values = similarity[similarity > -1.0]
    low = float(np.percentile(values, 90))
    return min(low, top - 1e-3), top


class _InFlight:
    """The targets of a ``match_each`` job that have started and not ended, for its progress messages."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.running: list[int] = []

    def started(self, i: int) -> str:
        """Target ``i`` started: the names of the targets in flight ("A and B")."""
        self.running.append(i)
        return " and ".join(self.names[k] for k in self.running)

    def ended(self, i: int, event) -> None:
        """Target ``i`` ended with ``event`` (its results or its own problem); anything else the engine told is an
        error of the job, raised here."""
        self.running.remove(i)
        if isinstance(event, BaseException) and not isinstance(event, TargetError):
            raise event


def _skipTarget(skipped: list[tuple[str, str]], name: str, error: TargetError, total: int) -> None:
    """A target's own problem (``error``) among ``total`` targets: logged and added to ``skipped`` as ``(name,
    reason)``, so that the other targets go on. A lone target's is raised as it is, and when every target has been
    skipped an :class:`InputError` names them all (an error, not an empty result)."""
    if total == 1:
        raise error
    log.warning("SAMEmbedding: %s skipped (the other targets go on): %s", name, error)
    skipped.append((name, str(error)))
    if len(skipped) == total:
        raise InputError(f"none of the {total} targets could be matched: " + "; ".join(
            f"{n}: {reason}" for n, reason in skipped)) from error


def _checkSameDimension(sourceVolume, targetVolumes: Sequence) -> None:
    """Raise ``InputError`` naming the first target whose dimension (2D or 3D) differs from the source's."""
    sourceDim = mrml_io.volume_dimension(sourceVolume)
    for target in targetVolumes:
        targetDim = mrml_io.volume_dimension(target)
        if targetDim != sourceDim:
            raise InputError(f"target '{target.GetName()}' is {targetDim}D but source '{sourceVolume.GetName()}' is "
                             f"{sourceDim}D; match images of the same dimension")


def _checkOptions(options: MatchOptions | None) -> MatchOptions:
    if options is None:
        return MatchOptions()
    if not isinstance(options, MatchOptions):
        raise InputError(f"options must be a samembed.MatchOptions, not {type(options).__name__}; "
                         "build one with MatchOptions(polish=False, ...)")
    return options


def _matchRecords(outNode) -> dict[str, dict]:
    """The :data:`MATCHES_ATTRIBUTE` data of an output point list (legacy point maps give IDs only)."""
    text = outNode.GetAttribute(MATCHES_ATTRIBUTE)
    try:
        if text:
            return {str(k): dict(v) for k, v in json.loads(text).items()}
        legacy = outNode.GetAttribute(LEGACY_POINT_MAP_ATTRIBUTE)
        return {str(k): {"pointID": str(v)} for k, v in json.loads(legacy).items()} if legacy else {}
    except (TypeError, ValueError, AttributeError):
        log.warning("SAMEmbedding: unreadable match data on '%s'; it is rebuilt on the next match", outNode.GetName())
        return {}


def _relabel(outNode, records: dict[str, dict], sourceList) -> None:
    """Give each recorded match its source point's label of the moment (a point renamed since it was matched kept its
    old label in the matches list and the table until it was matched again: a review)."""
    for pointID, record in records.items():
        sourceIndex = sourceList.GetNthControlPointIndexByID(pointID)
        index = outNode.GetNthControlPointIndexByID(record.get("pointID", ""))
        if sourceIndex >= 0 and index >= 0:
            label = sourceList.GetNthControlPointLabel(sourceIndex)
            if outNode.GetNthControlPointLabel(index) != label:
                outNode.SetNthControlPointLabel(index, label)


def _writeMatchRecords(outNode, records: dict[str, dict]) -> None:
    outNode.SetAttribute(MATCHES_ATTRIBUTE, json.dumps(records, allow_nan=False))
    if outNode.GetAttribute(LEGACY_POINT_MAP_ATTRIBUTE) is not None:
        outNode.RemoveAttribute(LEGACY_POINT_MAP_ATTRIBUTE)


def _finiteOrNone(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _float(value) -> float:
    return math.nan if value is None else float(value)


def _record(outPointID: str, match) -> dict:
    """The stored numbers of one match (see :data:`MATCHES_ATTRIBUTE`)."""
    return {"pointID": outPointID, "score": _finiteOrNone(match.score), "confident": bool(match.confident),
            "roundtripMm": _finiteOrNone(match.roundtrip_mm), "rematched": bool(getattr(match, "rematched", False)),
            "polished": bool(getattr(match, "polished", False)), "ncc": _finiteOrNone(getattr(match, "ncc", math.nan))}


def _markNotUpdated(outNode, keys: Sequence[str], reason: str) -> int:
    """Mark the matches of ``keys`` (source control point IDs; labels in a fused list) in ``outNode`` as not updated:
    a run asked for them and the engine could not match the target (``reason``). Each keeps its position and numbers (a match the user
    moved by hand is not lost); its record gets ``"notUpdated": reason``, so the results table and the export no
    longer count it as confident, it takes the uncertain colour, and its description says so. The next match of the
    point in that target replaces it as usual. Returns how many were marked."""
    records = _matchRecords(outNode)
    marked = 0
    wasModifying = outNode.StartModify()
    try:
        for key in keys:
            record = records.get(key)
            index = outNode.GetNthControlPointIndexByID(record["pointID"]) if record else -1
            if index < 0:
                continue
            record["notUpdated"] = reason
            outNode.SetNthControlPointSelected(index, False)
            earlier = _describe(types.SimpleNamespace(
                score=_float(record.get("score")), confident=bool(record.get("confident")),
                roundtrip_mm=_float(record.get("roundtripMm")), rematched=bool(record.get("rematched")),
                polished=bool(record.get("polished")), ncc=_float(record.get("ncc")))) if "score" in record else ""
            if earlier and "atlases" in record:  # a fused landmark
                earlier += (f"; {record.get('agreeing')} of {record['atlases']} atlases agreed (spread "
                            f"{_float(record.get('spreadMm')):.1f} mm)")
            outNode.SetNthControlPointDescription(
                index, f"not updated: the last match could not match this target ({reason})"
                + (f"; the earlier match: {earlier}" if earlier else ""))
            marked += 1
        if marked:
            _writeMatchRecords(outNode, records)
    finally:
        outNode.EndModify(wasModifying)
    if marked:
        log.warning("SAMEmbedding: %d earlier match(es) in '%s' kept, marked as not updated", marked, outNode.GetName())
    return marked


def _describe(match) -> str:
    verdict = "confident" if match.confident else "not confident"
    text = f"score {match.score:.3f}, {verdict} (round trip {match.roundtrip_mm:.1f} mm)"
    if getattr(match, "rematched", False):
        text += "; re-searched by the consistency check"
    if getattr(match, "polished", False):
        text += f"; polished by intensity (NCC {match.ncc:.2f})"
    return text


def _safeName(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "target"
