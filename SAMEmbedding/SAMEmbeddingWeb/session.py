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
from samembed.nifti_complete import check_nifti_complete
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
MATCH_2D_HINT = ("match 2D images (radiographs) on the command line, which picks the 2D model for them: samembed "
                 "match SOURCE.png TARGET.png --spacing MM --points POINTS.csv --out OUT (--spacing: the pixel size, "
                 "which a PNG or JPEG does not carry)")
"""What to do with a 2D image this viewer of 3D volumes cannot take."""


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
        if self.placing:  # the match's new point list became the markups' active one (Slicer makes each new list
            self._place(self.points)  # so): the next click would land in it, shown nowhere (a review)
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
        return [n for n in mrml_io.nodes_by_class(self.scene, "vtkMRMLScalarVolumeNode")
                if n.GetAttribute(ROLE_ATTRIBUTE) is None]

    def load_volume(self, path: Path, name: str | None = None):
        """Load one image file or DICOM folder; the first loaded becomes the source, the next ones targets. The
        status line says what was loaded, or (as an error) why it cannot be matched.

        A volume whose dimension differs from the source's (a 2D image beside a 3D source) is not kept: it could
        never be matched, and as a target it would stop every match.

        Args:
            path: the file or folder.
            name: what to call it in messages (an upload's own name; default: the file name).

        Raises:
            samembed.InputError: the file is not an image this viewer can read (a 2D JPEG or PNG: what to do
                instead), or no image in it can be matched with the source.
        """
        name = name or Path(path).name
        try:  # a NIfTI cut short: Slicer's reader fills what is missing with zeros, without a word (a review)
            check_nifti_complete(path)
        except InputError as e:
            raise InputError(f"{name}: {str(e).removeprefix(f'{path}: ')}") from e
        try:
            nodes = list(self._load_volumes([str(path)]) or [])
        except Exception as e:  # noqa: BLE001 - any reader failure is the same message for the user
            raise InputError(_unreadable(path, name, e)) from e
        nodes = [n for n in nodes if n is not None and n.GetImageData() is not None]
        if not nodes:
            raise InputError(_unreadable(path, name))
        loaded, refused = [], []
        for node in nodes:
            problem = self._dimension_problem(node, name)
            if problem is not None:
                refused.append(problem)
                _remove_volume(self.scene, node)
                continue
            loaded.append(node)
            if self.parameters.sourceVolume is None:
                self.set_source(node)
            else:
                self.set_targets([*self.parameters.targetVolumes, node])
        self.changed = True
        if not loaded:
            raise InputError(" ".join(refused))
        self._status(f"Loaded {', '.join(n.GetName() for n in loaded)}" + (f"; {' '.join(refused)}" if refused else ""),
                     bool(refused))
        self._check_dimensions()  # the model may not fit the image: that message wins
        return loaded

    def _dimension_problem(self, node, name: str) -> str | None:
        """Why ``node`` is not loaded, or None.

        The viewer is for 3D volumes: a 2D image (one slice) is loaded only as the source of a session whose
        model is 2D (``sam-lite-2d-hand`` chosen first), or beside a 2D source; a 3D volume never beside a 2D
        source.
        """
        source = self.parameters.sourceVolume
        dim = mrml_io.volume_dimension(node)
        size = "x".join(str(n) for n in node.GetImageData().GetDimensions()[:dim])
        what = f"a 2D image ({size} pixels, one slice)" if dim == 2 else f"a 3D volume ({size} voxels)"
        if source is None or source is node or source.GetImageData() is None:
            if dim == 2 and _model_dimension(self.parameters.model) != 2:
                return (f"{name} is {what} and the model '{self.parameters.model}' matches 3D volumes here: it was "
                        f"not loaded; open 3D volumes (CT, MR), choose the model 'sam-lite-2d-hand' before opening "
                        f"2D images, or {MATCH_2D_HINT}.")
            return None
        source_dim = mrml_io.volume_dimension(source)
        if dim == source_dim:
            return None
        todo = (f"open 3D volumes here, or {MATCH_2D_HINT}" if dim == 2
                else "this session matches 2D images: start another 'samembed web' for 3D volumes")
        return f"{name} is {what} but the source '{source.GetName()}' is {source_dim}D: it was not loaded; {todo}."

    def set_source(self, node) -> None:
        self.parameters.sourceVolume = node
        self.parameters.targetVolumes = [t for t in self.parameters.targetVolumes if t is not node]
        self._keep_shown_target()  # (the source is no target to show)
        self._check_dimensions()
        self.controller.prepareVolumes()  # ahead of the first click, as the Slicer module does
        self.arrange_views(fit=True)
        self.changed = True

    def set_targets(self, nodes: list) -> None:
        source = self.parameters.sourceVolume
        self.parameters.targetVolumes = [n for n in nodes if n is not None and n is not source]
        self._keep_shown_target()
        self._check_dimensions()
        self.controller.prepareVolumes()  # ahead of the first click, as the Slicer module does
        self.arrange_views(fit=True)
        self.changed = True

    def _keep_shown_target(self) -> None:
        """The shown target (and the heatmap's) stays while it is a target; else the first target, or none."""
        if self.shown_target not in self.parameters.targetVolumes:
            self.shown_target = self.parameters.targetVolumes[0] if self.parameters.targetVolumes else None
        self.parameters.heatmapTarget = self.shown_target

    def show_target(self, node) -> None:
        if node in self.parameters.targetVolumes:
            self.shown_target = node
            self.parameters.heatmapTarget = node
            self.arrange_views(fit=True)
            self.changed = True

    def dimension_problem(self, model: str | None = None) -> str | None:
        """Why the chosen images cannot be matched with ``model`` (default: the chosen one) because of their
        dimension (a 2D target of a 3D source, a 3D model for a 2D image ...), or None."""
        p = self.parameters
        source = p.sourceVolume
        if source is None or source.GetImageData() is None:
            return None
        source_dim = mrml_io.volume_dimension(source)
        for target in p.targetVolumes:
            if target is not None and target.GetImageData() is not None and mrml_io.volume_dimension(target) != source_dim:
                return (f"target '{target.GetName()}' is {mrml_io.volume_dimension(target)}D but the source "
                        f"'{source.GetName()}' is {source_dim}D; choose targets of the same dimension")
        model = p.model if model is None else model
        model_dim = _model_dimension(model)
        if model_dim is not None and model_dim != source_dim:
            fits = ("'sam-lite-2d-hand' or 'default' (it follows the image)" if source_dim == 2
                    else "a 3D model ('default' follows the image)")
            return (f"the model '{model}' is for {model_dim}D images but the source '{source.GetName()}' is "
                    f"{source_dim}D; choose {fits}")
        return None

    def _check_dimensions(self) -> None:
        """Say at once (as an error) when the images' or the model's dimensions do not fit: matching would refuse."""
        problem = self.dimension_problem()
        if problem is not None:
            self._status(problem, True)

    @staticmethod
    def _one_slice_z(node) -> float | None:
        """The LPS z of a one-slice volume node's slice (a radiograph loaded as NIfTI), or None (none, or 3D)."""
        if node is None or node.GetImageData() is None or node.GetImageData().GetDimensions()[2] != 1:
            return None
        from SAMEmbeddingLib.mrml_io import image_from_volume_node

        image = image_from_volume_node(node)
        return image.plane_z_mm if image.ndim == 2 else None

    def load_landmarks(self, path: Path) -> int:
        """Add the points of a ``.mrk.json``, ``.fcsv`` or CSV (label,x,y,z LPS) file to the source landmarks (in
        one batch: the controller then matches them all). Returns how many were added."""
        from samembed.io import read_points

        points = read_points(path)
        lps = np.asarray(points.points_lps_mm, dtype=float)
        if points.dims < 3:  # x, y alone would put the points on the plane z = 0
            source = self.parameters.sourceVolume
            plane_z = self._one_slice_z(source)
            if plane_z is None:
                raise InputError(f"{Path(path).name}: its points have {points.dims} coordinates (label,x,y); the "
                                 "source is a 3D volume: give each point's z too (label,x,y,z in LPS mm)")
            lps[:, 2] = plane_z  # a one-slice radiograph's points: on its slice
        ras = lps * np.array([-1.0, -1.0, 1.0])
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
        """A match or "propagate all" is queued or running (preparing the volumes ahead does not count)."""
        return self.controller.matching

    @property
    def cancellable(self) -> bool:
        """Cancel has something to stop: "propagate all" (a click's match is not cancelled)."""
        return self.controller.cancellable

    def poll(self) -> None:
        """Deliver the worker's results into MRML (call from the server's event loop)."""
        if self.controller.busy:  # (also when work waits for the running work to end: the poll starts it)
            self.controller.poll()
            if not self.worker.busy:
                self.progress = None
                self.changed = True

    def set_model(self, model: str, device: str) -> None:
        """Use this model and device: a new model matches every matched landmark again (as "propagate all": with
        progress, cancellable); a new device is used from the next match on (the engine is rebuilt then).

        Raises:
            samembed.InputError: the device is not available here (CUDA), or the model does not fit the loaded
                images' dimension; the previous choice is kept, nothing matched is lost.
        """
        p = self.parameters
        model, device = str(model), str(device)
        if (model, device) == (p.model, p.device):
            return
        if device != p.device:
            _check_device(device)
        if model != p.model:
            problem = self.dimension_problem(model)
            if problem is not None:
                raise InputError(problem)
        new_model = model != p.model
        p.model, p.device = model, device
        self.changed = True
        # (a match under way counts: its landmark is matched again with the new model once it ends)
        matched = self.logic.resultRows(self.points) or self.controller.matching
        rematch = new_model and matched and self.controller.canMatch()[0]
        if rematch and (self.propagate_all() is not None or self.controller.waiting):
            when = " once the running work ends" if self.controller.waiting else ""
            self._status(f"Model '{model}' on '{device}': matching every landmark again{when}")
            return
        self._status(f"Model '{model}' on device '{device}': used from the next match")
        if new_model:  # the chosen volumes prepared for it, as the module prepares them (its status line follows)
            self.controller.prepareVolumes()

    def engine(self) -> str:
        """What the last match ran on: ``"model 'name' (model id on device)"``, or what the next one will use."""
        running = self.logic.engineDescription()
        if running is None:
            return f"next match: model '{self.parameters.model}' on '{self.parameters.device}'"
        return f"last match: model '{self.logic.model}' ({running})"

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

    def view_state(self) -> dict:
        """What the page shows about the views: the RAS point (mm) at each view's centre and the source's window
        and level (rounded, so that it changes only when the views do)."""
        out: dict = {}
        for key, view in (("source_centre", self.source_view), ("target_centre", self.target_view)):
            slice_node = view.get_view_node()
            out[key] = None if slice_node is None else [round(float(v), 2) for v in _view_centre_ras(slice_node)]
        source = self.parameters.sourceVolume
        display = source.GetDisplayNode() if source is not None else None
        out["window_level"] = None if display is None else [round(display.GetWindow(), 1), round(display.GetLevel(), 1)]
        return out

    @staticmethod
    def _centre(view, position_ras) -> None:
        slice_node = view.get_view_node()
        if slice_node is not None:
            slice_node.JumpSliceByCentering(*(float(v) for v in position_ras))

    # -- results -----------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """The results table: label, target, position (RAS mm), score (cosine), confident, round trip (mm)."""
        out = []
        for row in self.logic.resultRows(self.points):
            r, a, s = (float(v) for v in row.pointRAS)
            out.append({"label": row.label, "target": row.target, "targetID": row.targetID,
                        "position": f"R {r:.1f}, A {a:.1f}, S {s:.1f}", "ras": [r, a, s],
                        "score": None if not np.isfinite(row.score) else round(float(row.score), 4),
                        "confident": bool(row.confident),
                        "roundtrip": None if not np.isfinite(row.roundtripMm) else round(float(row.roundtripMm), 1)})
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


def _remove_volume(scene, node) -> None:
    """Take a volume and its display and storage nodes out of the scene."""
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None:
            scene.RemoveNode(helper)


def _view_centre_ras(slice_node) -> np.ndarray:
    """The RAS point (mm) at the centre of a slice view."""
    xy_to_ras = slice_node.GetXYToRAS()
    width, height, _ = slice_node.GetDimensions()
    centre = [width / 2.0, height / 2.0, 0.0, 1.0]
    return np.array([sum(xy_to_ras.GetElement(i, j) * centre[j] for j in range(4)) for i in range(3)])


def _check_device(device: str) -> None:
    """Raise ``InputError`` when ``device`` cannot run here (CUDA without a CUDA device)."""
    from samembed.embedding import resolve_device  # imports torch (the engine runs in this process anyway)

    try:
        resolve_device(device)
    except InputError as e:
        why = "PyTorch sees no CUDA device here" if device.startswith("cuda") else str(e)
        raise InputError(f"device '{device}' is not available on this server ({why}); choose 'cpu' or 'auto'") from e


FILE_KINDS = (((".jpg", ".jpeg"), "JPEG"), ((".png",), "PNG"), ((".tif", ".tiff"), "TIFF"), ((".bmp",), "BMP"),
              ((".nii", ".nii.gz"), "NIfTI"), ((".nrrd", ".nhdr"), "NRRD"), ((".mha", ".mhd"), "MetaImage"))


def _unreadable(path, name: str, error: Exception | None = None) -> str:
    """Why this file cannot be opened, and what to do: a 2D image SimpleITK reads (JPEG, PNG ...) is named so."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = list(reader.GetSize())
    except Exception:  # noqa: BLE001 - not an image SimpleITK knows either
        size = None
    lower = str(name).lower()
    kind = next((k for ends, k in FILE_KINDS if lower.endswith(ends)), Path(name).suffix.lstrip(".").upper() or "image")
    if size is not None and (len(size) == 2 or size[2:] == [1]):
        return (f"{name} is a 2D image ({kind}, {size[0]}x{size[1]} pixels); this viewer matches 3D volumes (NIfTI, "
                f"NRRD, MHA, DICOM) and cannot open it: {MATCH_2D_HINT}")
    if size is not None:
        return (f"{name}: this viewer cannot read {kind} files; convert it to NIfTI or NRRD "
                f"(e.g. SimpleITK.WriteImage(SimpleITK.ReadImage(path), 'image.nii.gz')) and open that")
    detail = f": {error}" if error is not None and str(error) else ""
    return f"{name}: not an image this viewer can read (NIfTI, NRRD, MHA or a DICOM folder){detail}"


def _model_dimension(model: str) -> int | None:
    """The image dimension of a registered model (None: ``default``, which follows the image, or a checkpoint)."""
    if model == "default":
        return None
    from samembed.registry import registry  # torch-free: reads models.json

    for entry in registry().get("models", []):
        if model == entry.get("name") or model in entry.get("aliases", []):
            return int(entry["dim"]) if entry.get("dim") else None
    return None
