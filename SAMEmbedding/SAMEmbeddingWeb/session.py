"""The web viewer's application logic: what the page's buttons do, on MRML, without trame or a browser.

:class:`MatchSession` drives the module's own :class:`~SAMEmbeddingLib.logic.MatchLogic` and
:class:`~SAMEmbeddingLib.controller.MatchController` (the same matching, the same point bookkeeping as the Slicer
panel), and arranges two slice views: the source view shows the source volume and its landmarks; the target view
shows the chosen target, its matches (green: confident, orange: not) and the heatmap.

The views are anything with trame-slicer's ``SliceView`` methods used here (``get_view_node_id``,
``set_background_volume_id``, ``set_foreground_volume_id``, ``set_foreground_opacity``, ``set_orientation``,
``fit_view_to_content``, ``get_view_node``). Engine work runs on the controller's worker thread;
:meth:`MatchSession.poll`, called from the server's event loop, writes its results into MRML.
"""

from __future__ import annotations

import io
import logging
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from samembed import InputError
from SAMEmbeddingLib import mrml_io
from SAMEmbeddingLib.controller import MatchController
from SAMEmbeddingLib.logic import ROLE_ATTRIBUTE, MatchLogic
from SAMEmbeddingLib.parameters import OPTION_PARAMETERS, optionDefault
from SAMEmbeddingLib.worker import Worker

log = logging.getLogger(__name__)

WINDOW_LEVEL_PRESETS: dict[str, tuple[float, float]] = {
    "soft tissue": (400.0, 40.0),
    "bone": (1800.0, 400.0),
    "lung": (1500.0, -600.0),
}
"""CT window/level presets, HU: (window, level)."""

EXPORT_FORMATS = (".mrk.json", ".fcsv", ".csv")
ORIENTATIONS = ("Axial", "Coronal", "Sagittal")


class WebParameters:
    """What the module's parameter node holds, as plain attributes (the controller reads these)."""

    def __init__(self) -> None:
        for option, parameter in OPTION_PARAMETERS.items():
            setattr(self, parameter, optionDefault(option))
        self.sourceVolume = None
        self.sourcePoints = None
        self.targetVolumes: list = []
        self.heatmapTarget = None
        self.model = "default"
        self.device = "auto"
        self.jumpToMatch = False  # the session centres each view itself (source and target frames differ)
        self.showHeatmap = False
        self.heatmapOpacity = 0.5


class MatchSession:
    """One viewer: loaded volumes, the source landmarks, their matches, two slice views.

    Args:
        scene: the ``vtkMRMLScene`` (trame-slicer's ``SlicerApp.scene``).
        load_volumes: ``load_volumes(paths) -> [volume nodes]`` (trame-slicer's ``IOManager.load_volumes``:
            NIfTI, NRRD, MHA, a DICOM folder).
        place: ``place(pointList)`` starts persistent markups placement on it; ``stop_placing()`` ends it.
        source_view, target_view: the two slice views.
        logic, worker: injected for tests; default: ``MatchLogic(scene)`` (engine in this process, on the worker).
        on_status: ``on_status(text, error)``: a line for the page.
    """

    def __init__(self, scene, load_volumes: Callable, place: Callable, stop_placing: Callable, source_view, target_view,
                 *, logic: MatchLogic | None = None, worker: Worker | None = None, cache_dir: str | None = None,
                 on_status: Callable[[str, bool], None] | None = None,
                 on_progress: Callable[[float, float, str], None] | None = None) -> None:
        self.scene = scene
        self._load_volumes = load_volumes
        self._place = place
        self._stop_placing = stop_placing
        self.source_view = source_view
        self.target_view = target_view
        self.logic = logic or MatchLogic(scene, cacheDir=cache_dir)
        self.worker = worker or Worker("SAMEmbeddingWebWorker")
        self.parameters = WebParameters()
        self.shown_target = None
        self.placing = False
        self.progress: tuple[float, float, str] | None = None
        self.status = ""
        self.status_is_error = False
        self.changed = True
        """True when something the page shows changed since the last :meth:`take_changes`."""
        self._on_status = on_status
        self._on_progress = on_progress
        self.controller = MatchController(self.logic, self.worker, onStatus=self._status, onProgress=self._progress,
                                          onFinished=self._finished, onError=self._error)
        points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SAM landmarks")
        points.CreateDefaultDisplayNodes()
        self.parameters.sourcePoints = points
        self.controller.setParameters(self.parameters)

    # -- status ------------------------------------------------------------------------------
    def _status(self, text: str, error: bool = False) -> None:
        self.status, self.status_is_error, self.changed = text, error, True
        if self._on_status is not None:
            self._on_status(text, error)

    def _progress(self, done: float, total: float, phase: str) -> None:
        self.progress = (done, total, phase)
        self.changed = True
        if self._on_progress is not None:
            self._on_progress(done, total, phase)

    def _error(self, error: BaseException) -> None:
        self.progress = None
        self._status(f"Matching failed: {error}", True)

    def _finished(self, outputs) -> None:
        self.progress = None
        self.arrange_views()
        index = self.controller.currentPointIndex
        if index is not None and self.shown_target is not None:
            position = self.logic.matchPosition(self.points, index, self.shown_target)
            if position is not None:
                self._centre(self.target_view, position)
        self.changed = True

    def take_changes(self) -> bool:
        changed, self.changed = self.changed, False
        return changed

    # -- inputs ------------------------------------------------------------------------------
    @property
    def points(self):
        return self.parameters.sourcePoints

    def volumes(self) -> list:
        """The loaded image volumes (not the heatmaps), in loading order."""
        collection = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return [n for n in nodes if n.GetAttribute(ROLE_ATTRIBUTE) is None]

    def load_volume(self, path: Path):
        """Load one image file or DICOM folder; the first loaded becomes the source, the next ones targets.

        Raises:
            samembed.InputError: the file is not an image Slicer can read.
        """
        try:
            nodes = list(self._load_volumes([str(path)]) or [])
        except Exception as e:  # noqa: BLE001 - any reader failure is the same message for the user
            raise InputError(f"{Path(path).name}: not an image this viewer can read (NIfTI, NRRD, MHA, DICOM): {e}") from e
        nodes = [n for n in nodes if n is not None and n.GetImageData() is not None]
        if not nodes:
            raise InputError(f"{Path(path).name}: not an image this viewer can read (NIfTI, NRRD, MHA or a DICOM folder)")
        for node in nodes:
            if self.parameters.sourceVolume is None:
                self.set_source(node)
            else:
                self.set_targets([*self.parameters.targetVolumes, node])
        self.changed = True
        return nodes

    def set_source(self, node) -> None:
        self.parameters.sourceVolume = node
        self.parameters.targetVolumes = [t for t in self.parameters.targetVolumes if t is not node]
        self._check_dimensions()
        self.arrange_views(fit=True)
        self.changed = True

    def set_targets(self, nodes: list) -> None:
        source = self.parameters.sourceVolume
        self.parameters.targetVolumes = [n for n in nodes if n is not None and n is not source]
        if self.shown_target not in self.parameters.targetVolumes:
            self.shown_target = self.parameters.targetVolumes[0] if self.parameters.targetVolumes else None
        self.parameters.heatmapTarget = self.shown_target
        self._check_dimensions()
        self.arrange_views(fit=True)
        self.changed = True

    def show_target(self, node) -> None:
        if node in self.parameters.targetVolumes:
            self.shown_target = node
            self.parameters.heatmapTarget = node
            self.arrange_views(fit=True)
            self.changed = True

    def _check_dimensions(self) -> None:
        """Say at once when a 2D image meets a 3D one, or the model's dimension (matching would refuse it)."""
        ok, reason = self.controller.canMatch()
        if not ok and "dimension" in reason:
            self._status(reason, True)
        model_dim = _model_dimension(self.parameters.model)
        source = self.parameters.sourceVolume
        if source is not None and model_dim is not None and mrml_io.volume_dimension(source) != model_dim:
            self._status(f"'{source.GetName()}' is a {mrml_io.volume_dimension(source)}D image but the model "
                         f"'{self.parameters.model}' is {model_dim}D; choose a {mrml_io.volume_dimension(source)}D model "
                         "or a 3D volume", True)

    def load_landmarks(self, path: Path) -> int:
        """Add the points of a ``.mrk.json``, ``.fcsv`` or CSV (label,x,y,z LPS) file to the source landmarks (in
        one batch: the controller then matches them all). Returns how many were added."""
        from samembed.io import read_points

        points = read_points(path)
        ras = np.asarray(points.points_lps_mm, dtype=float) * np.array([-1.0, -1.0, 1.0])
        node = self.points
        was = node.StartModify()
        try:
            for label, position in zip(points.labels, ras):
                node.AddControlPoint(*position, label)
        finally:
            node.EndModify(was)
        self.changed = True
        return len(points.labels)

    # -- placing and matching ----------------------------------------------------------------
    def set_placing(self, enabled: bool) -> None:
        """Start (persistent) or stop placing landmarks on the source with a click."""
        if enabled:
            ok, reason = self.controller.canMatch()
            if self.parameters.sourceVolume is None:
                self._status("load a source volume first", True)
                return
            self._place(self.points)
        else:
            self._stop_placing()
        self.placing = bool(enabled)
        self.changed = True

    def propagate_all(self):
        """Match every landmark into every target (progress and cancel)."""
        try:
            task = self.controller.propagateAll()
        except InputError as e:
            self._status(str(e), True)
            return None
        if task is not None:
            self.progress = (0, len(self.controller.targets()), "starting")
        return task

    def cancel(self) -> None:
        self.controller.cancel()

    @property
    def busy(self) -> bool:
        return self.controller.busy

    def poll(self) -> None:
        """Deliver the worker's results into MRML (call from the server's event loop)."""
        if self.worker.busy:
            self.controller.poll()
            if not self.worker.busy:
                self.progress = None
                self.changed = True

    def set_model(self, model: str, device: str) -> None:
        """Use this model and device from the next match on (the engine is rebuilt then)."""
        self.parameters.model, self.parameters.device = str(model), str(device)
        self._check_dimensions()
        self.changed = True

    # -- heatmap -----------------------------------------------------------------------------
    def set_heatmap(self, show: bool) -> None:
        """Show (computing it for the current landmark) or hide the similarity map over the target view."""
        self.parameters.showHeatmap = bool(show)
        self.controller.parametersModified()
        self.arrange_views()
        self.changed = True

    def set_heatmap_opacity(self, opacity: float) -> None:
        self.parameters.heatmapOpacity = float(opacity)
        self.logic.setHeatmapOpacity(float(opacity))
        self.arrange_views()

    def heatmap_range(self) -> tuple[float, float] | None:
        """The shown heatmap's colour range (cosine similarity), for the colour bar."""
        node = self._shown_heatmap()
        display = node.GetDisplayNode() if node is not None else None
        if display is None:
            return None
        return float(display.GetWindowLevelMin()), float(display.GetWindowLevelMax())

    def _shown_heatmap(self):
        if not self.parameters.showHeatmap or self.shown_target is None:
            return None
        node = self.logic.heatmapNode(self.shown_target)
        return node if node is not None and node.GetImageData() is not None else None

    # -- views -------------------------------------------------------------------------------
    def arrange_views(self, fit: bool = False) -> None:
        """Source view: the source and its landmarks; target view: the shown target, its matches, the heatmap.

        (The logic shows a heatmap in every slice view, as the Slicer module does; here it belongs to the
        target view only.)
        """
        p = self.parameters
        self.source_view.set_background_volume_id(p.sourceVolume.GetID() if p.sourceVolume else None)
        self.source_view.set_foreground_volume_id(None)
        self.target_view.set_background_volume_id(self.shown_target.GetID() if self.shown_target else None)
        heatmap = self._shown_heatmap()
        self.target_view.set_foreground_volume_id(heatmap.GetID() if heatmap is not None else None)
        self.target_view.set_foreground_opacity(p.heatmapOpacity)
        _show_only_in(self.points, [self.source_view])
        for out in self.logic.outputPointLists(self.points):
            target = out.GetNodeReference("SAMEmbeddingTargetVolume")
            shown = target is not None and target is self.shown_target
            _show_only_in(out, [self.target_view] if shown else [])
            display = out.GetDisplayNode()
            if display is not None:
                display.SetVisibility(shown)
                display.SetHandlesInteractive(False)
        if fit:
            for view in (self.source_view, self.target_view):
                view.fit_view_to_content()

    def set_orientation(self, orientation: str) -> None:
        if orientation not in ORIENTATIONS:
            raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, not {orientation!r}")
        for view in (self.source_view, self.target_view):
            view.set_orientation(orientation)
            view.fit_view_to_content()

    def apply_window_level(self, preset: str) -> None:
        """Apply a CT window/level preset to the source and every target."""
        if preset not in WINDOW_LEVEL_PRESETS:
            raise InputError(f"unknown window/level preset {preset!r}; known: {', '.join(WINDOW_LEVEL_PRESETS)}")
        window, level = WINDOW_LEVEL_PRESETS[preset]
        for node in [self.parameters.sourceVolume, *self.parameters.targetVolumes]:
            display = node.GetDisplayNode() if node is not None else None
            if display is not None:
                display.AutoWindowLevelOff()
                display.SetWindowLevel(window, level)

    @staticmethod
    def _centre(view, position_ras) -> None:
        slice_node = view.get_view_node()
        if slice_node is not None:
            slice_node.JumpSliceByCentering(*(float(v) for v in position_ras))

    # -- results -----------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """The results table: label, target, position (RAS mm), score (cosine), confident."""
        out = []
        for row in self.logic.resultRows(self.points):
            r, a, s = (float(v) for v in row.pointRAS)
            out.append({"label": row.label, "target": row.target, "targetID": row.targetID,
                        "position": f"R {r:.1f}, A {a:.1f}, S {s:.1f}", "ras": [r, a, s],
                        "score": None if not np.isfinite(row.score) else round(float(row.score), 4),
                        "confident": bool(row.confident)})
        return out

    def landmarks(self) -> list[dict]:
        """The source landmarks: label and RAS position."""
        node, out = self.points, []
        for i in mrml_io.defined_point_indices(node):
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, position)
            out.append({"label": node.GetNthControlPointLabel(i), "ras": [float(v) for v in position]})
        return out

    def select_row(self, row: int) -> None:
        """Centre the target view on the row's match (showing its target) and the source view on its landmark."""
        target = self.controller.selectResultRow(int(row))
        if target is None:
            return
        self.show_target(target)
        index = self.controller.currentPointIndex
        position = self.logic.matchPosition(self.points, index, target)
        if position is not None:
            self._centre(self.target_view, position)
        source_position = [0.0, 0.0, 0.0]
        self.points.GetNthControlPointPositionWorld(index, source_position)
        self._centre(self.source_view, source_position)
        if self.parameters.showHeatmap:
            self.controller.matchPoints([index])
        self.changed = True

    def export(self, fmt: str) -> tuple[str, bytes]:
        """The matches as a file for download: ``(file name, content)``; several ``.mrk.json``/``.fcsv`` files
        (one per target) come zipped.

        Raises:
            samembed.InputError: nothing matched yet, or an unknown format.
        """
        if fmt not in EXPORT_FORMATS:
            raise InputError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
        with tempfile.TemporaryDirectory(prefix="samembed-export-") as folder:
            written = self.logic.exportResults(self.points, Path(folder) / f"SAM matches{fmt}")
            if len(written) == 1:
                return written[0].name, written[0].read_bytes()
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in written:
                    archive.write(path, path.name)
            return "SAM matches.zip", buffer.getvalue()

    def close(self) -> None:
        self.controller.cleanup()
        self.worker.shutdown()
        self.logic.close()


def _show_only_in(node, views) -> None:
    display = node.GetDisplayNode() if node is not None else None
    if display is not None:
        display.SetViewNodeIDs([v.get_view_node_id() for v in views] or ["none"])


def _model_dimension(model: str) -> int | None:
    """The image dimension of a registered model (None: ``default``, which follows the image, or a checkpoint)."""
    if model == "default":
        return None
    from samembed.registry import registry  # torch-free: reads models.json

    for entry in registry().get("models", []):
        if model == entry.get("name") or model in entry.get("aliases", []):
            return int(entry["dim"]) if entry.get("dim") else None
    return None
