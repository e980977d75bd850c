"""The Qt widget of the SAMEmbedding module: forwards each user action to the logic.

This is the only file of ``SAMEmbeddingLib`` that uses ``qt``, ``slicer.app`` and the global scene; it runs only
inside 3D Slicer. ``SAMEmbedding.SAMEmbeddingWidget`` (the module file) builds a :class:`MatchWidget` in its
``setup`` and forwards ``enter``, ``exit`` and ``cleanup``.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

SETTINGS_KEY = "SAMEmbedding"
IMPORT_CHECKPOINT_ITEM = "Import checkpoint from file..."


def moduleResourcePath(*parts: str) -> str:
    """A resource of this module, in the installed layout (beside the module file) or in the source tree (one up)."""
    moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (moduleDir, os.path.dirname(moduleDir)):
        candidate = os.path.join(base, "Resources", *parts)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(moduleDir, "Resources", *parts)


class MatchWidget(VTKObservationMixin):
    """The GUI body: forwards each action to the logic; engine work runs on one persistent worker.

    Args:
        layout: the module panel's layout, which receives the widgets of ``SAMEmbedding.ui``.
        logic: the module's ``SAMEmbeddingLogic``.
        isEntered: True while the module is shown (a closed scene is re-initialised only then).
    """

    def __init__(self, layout, logic, isEntered: Callable[[], bool]) -> None:
        VTKObservationMixin.__init__(self)
        self.layout = layout
        self.logic = logic
        self._isEntered = isEntered
        self.worker = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPoints = None
        self._currentPointIndex = None
        self._propagateTask = None
        self._pollTimer = None
        self._updatingGui = False

    # -- life cycle ---------------------------------------------------------------------------
        self._setup()

    def _setup(self) -> None:
        uiWidget = slicer.util.loadUI(moduleResourcePath("UI", "SAMEmbedding.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        from SAMEmbeddingLib.worker import Worker

        self.worker = Worker()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(50)
        self._pollTimer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.placeButton.connect("toggled(bool)", self.onPlaceToggled)
        self.ui.targetVolumesSelector.connect("checkedNodesChanged()", self.onTargetsChecked)
        self.ui.modelComboBox.connect("activated(int)", self.onModelActivated)
        self.ui.modelFolderButton.connect("clicked()", self.onOpenModelFolder)
        self.ui.propagateButton.connect("clicked()", self.onPropagateAll)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.clearCacheButton.connect("clicked()", self.onClearCache)
        self.ui.showHeatmapCheckBox.connect("toggled(bool)", self.onShowHeatmapToggled)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onHeatmapOpacityChanged)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)

        self._fillModelComboBox()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.worker is not None:
            self.worker.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self.ui.placeButton.checked = False

    def onSceneStartClose(self, caller, event) -> None:
        if self.worker is not None:
            self.worker.cancelAll()
        self._observePoints(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self._isEntered():
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.sourceVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.sourceVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._updatingGui:
            return
        self._updatingGui = True
        try:
            p = self._parameterNode
            self._observePoints(p.sourcePoints if p else None)
            if p:
                checked = {n.GetID() for n in p.targetVolumes if n}
                for i in range(self.ui.targetVolumesSelector.nodeCount()):
                    node = self.ui.targetVolumesSelector.nodeFromIndex(i)
                    state = qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked
                    if self.ui.targetVolumesSelector.checkState(node) != state:
                        self.ui.targetVolumesSelector.setCheckState(node, state)
                self._selectModelInComboBox(p.model)
                table = self.logic.core.resultsTable(p.sourcePoints) if p.sourcePoints else None
                self.ui.resultsTableView.setMRMLTableNode(table)
            self._checkCanApply()
        finally:
            self._updatingGui = False

    def _checkCanApply(self) -> None:
        p = self._parameterNode
        busy = self.worker is not None and self.worker.busy
        if p is None:
            ok, reason = False, _("No parameter node")
        else:
            ok, reason = self.logic.canMatch(p.sourceVolume, p.sourcePoints, list(p.targetVolumes))
        self.ui.propagateButton.enabled = ok and not busy
        self.ui.propagateButton.toolTip = _("Match every landmark into every target.") if ok else reason
        self.ui.placeButton.enabled = p is not None and p.sourceVolume is not None
        self.ui.exportButton.enabled = bool(p and p.sourcePoints and self.logic.core.outputPointLists(p.sourcePoints))

    # -- inputs ------------------------------------------------------------------------------
    def onTargetsChecked(self) -> None:
        if self._updatingGui or not self._parameterNode:
            return
        nodes = list(self.ui.targetVolumesSelector.checkedNodes())
        self._updatingGui = True
        try:
            self._parameterNode.targetVolumes = nodes
            if nodes and (self._parameterNode.heatmapTarget is None
                          or self._parameterNode.heatmapTarget.GetID() not in {n.GetID() for n in nodes}):
                self._parameterNode.heatmapTarget = nodes[0]
        finally:
            self._updatingGui = False
        self._checkCanApply()

    def onPlaceToggled(self, checked: bool) -> None:
        """Put the landmark list in place mode on the source volume (creating the list if needed)."""
        p = self._parameterNode
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if not checked:
            interaction.SwitchToViewTransformMode()
            return
        if p.sourcePoints is None:
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SAM landmarks")
            points.CreateDefaultDisplayNodes()
            p.sourcePoints = points
        if p.sourceVolume is not None:
            slicer.util.setSliceViewerLayers(background=p.sourceVolume, foreground=None)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(p.sourcePoints.GetID())
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def _observePoints(self, points) -> None:
        if points is self._observedPoints:
            return
        if self._observedPoints is not None:
            for event, method in self._pointEvents():
                self.removeObserver(self._observedPoints, event, method)
        self._observedPoints = points
        self._currentPointIndex = None
        if points is not None:
            for event, method in self._pointEvents():
                self.addObserver(points, event, method)

    def _pointEvents(self):
        return [(slicer.vtkMRMLMarkupsFiducialNode.PointPositionDefinedEvent, self.onPointPlaced),
                (slicer.vtkMRMLMarkupsFiducialNode.PointEndInteractionEvent, self.onPointMoved),
                (slicer.vtkMRMLMarkupsFiducialNode.PointRemovedEvent, self.onPointRemoved)]

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointPlaced(self, caller, event, index) -> None:
        self._matchPoint(index)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointMoved(self, caller, event, index) -> None:
        self._matchPoint(index)

    def onPointRemoved(self, caller, event) -> None:
        self.logic.core.removeMatchesOfDeletedPoints(caller)
        self._checkCanApply()

    # -- model -------------------------------------------------------------------------------
    def _registeredModels(self) -> list:
        """Names in models.json (read as JSON: importing samembed.models would load torch)."""
        import json

        path = os.path.join(os.environ.get("SAMEMBED_MODELS_DIR") or moduleResourcePath("Models"), "models.json")
        try:
            with open(path, encoding="utf-8") as f:
                return [m for m in json.load(f).get("models", []) if m.get("name")]
        except (OSError, ValueError):
            return []

    def _fillModelComboBox(self) -> None:
        combo = self.ui.modelComboBox
        combo.clear()
        for entry in self._registeredModels():
            combo.addItem(entry["name"], entry["name"])
            tip = entry.get("note") or entry.get("training_data") or ""
            combo.setItemData(combo.count - 1, tip, qt.Qt.ToolTipRole)
        if combo.findData("default") < 0:
            combo.insertItem(0, "default", "default")
        for path in self._importedCheckpoints():
            combo.addItem(os.path.basename(path), path)
            combo.setItemData(combo.count - 1, path, qt.Qt.ToolTipRole)
        combo.addItem(_(IMPORT_CHECKPOINT_ITEM), IMPORT_CHECKPOINT_ITEM)

    def _importedCheckpoints(self) -> list:
        value = qt.QSettings().value(f"{SETTINGS_KEY}/importedCheckpoints") or []
        paths = [value] if isinstance(value, str) else list(value)
        return [p for p in paths if os.path.isfile(p)]

    def _selectModelInComboBox(self, model: str) -> None:
        index = self.ui.modelComboBox.findData(model)
        if index < 0 and model and os.path.isfile(model):
            self.ui.modelComboBox.insertItem(self.ui.modelComboBox.count - 1, os.path.basename(model), model)
            index = self.ui.modelComboBox.findData(model)
        if index >= 0:
            self.ui.modelComboBox.currentIndex = index

    def onModelActivated(self, index: int) -> None:
        model = self.ui.modelComboBox.itemData(index)
        if model == IMPORT_CHECKPOINT_ITEM:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Import a SAM checkpoint"), "",
                _("Checkpoints (*.pt *.pth);;All files (*)"))
            if not path:
                self._selectModelInComboBox(self._parameterNode.model)
                return
            paths = [p for p in self._importedCheckpoints() if p != path] + [path]
            qt.QSettings().setValue(f"{SETTINGS_KEY}/importedCheckpoints", paths)
            self._fillModelComboBox()
            model = path
        self._parameterNode.model = model
        self._selectModelInComboBox(model)

    def onOpenModelFolder(self) -> None:
        folder = os.environ.get("SAMEMBED_MODELS_DIR") or moduleResourcePath("Models")
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    # -- matching ----------------------------------------------------------------------------
    def _prepareEngine(self) -> bool:
        """Dependencies and model settings before engine work; False (after telling why) when not possible."""
        try:
            self.logic.ensureDependencies()
        except Exception as e:  # noqa: BLE001 - shown to the user
            slicer.util.errorDisplay(str(e))
            return False
        self.logic.setModel(self._parameterNode.model, self._parameterNode.device)
        return True

    def _matchPoint(self, index: int) -> None:
        """Match one placed or moved landmark into every target (in the background)."""
        p = self._parameterNode
        self._currentPointIndex = index
        ok, reason = self.logic.canMatch(p.sourceVolume, p.sourcePoints, list(p.targetVolumes))
        if not ok:
            self.ui.statusLabel.text = reason
            return
        self._startMatch([index], progressBar=False)

    def onPropagateAll(self) -> None:
        self._startMatch(None, progressBar=True)

    def _startMatch(self, pointIndices, progressBar: bool) -> None:
        p = self._parameterNode
        if not self._prepareEngine():
            return
        heatmapIndex = None
        if p.showHeatmap and self._currentPointIndex is not None and (pointIndices is None or self._currentPointIndex in pointIndices):
            heatmapIndex = self._currentPointIndex
        heatmapTarget = self._heatmapTarget()
        self.logic.core.setHeatmapOpacity(p.heatmapOpacity)
        single = pointIndices is not None and len(pointIndices) == 1
        try:
            options = self.logic.matchOptions(p).replace(heatmap=heatmapIndex is not None)
            task = self.logic.startMatch(
                self.worker, p.sourceVolume, p.sourcePoints, list(p.targetVolumes), pointIndices, options,
                heatmapPointIndex=heatmapIndex, heatmapTarget=heatmapTarget,
                onFinished=lambda outputs: self._onMatchFinished(outputs, pointIndices[0] if single else None),
                onError=self._onMatchError, onProgress=self._onProgress)
        except ValueError as e:  # samembed.InputError: bad input, said plainly
            slicer.util.errorDisplay(str(e))
            return
        if progressBar:
            self._propagateTask = task
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self.ui.cancelButton.visible = True
        self.ui.statusLabel.text = _("Matching...")
        self._pollTimer.start()
        self._checkCanApply()

    def _heatmapTarget(self):
        """The chosen heatmap target when it is one of the checked targets, else None (the logic uses the first)."""
        p = self._parameterNode
        chosen = p.heatmapTarget
        if chosen is not None and chosen.GetID() in {n.GetID() for n in p.targetVolumes if n}:
            return chosen
        return None

    def _poll(self) -> None:
        self.worker.poll()
        if not self.worker.busy:
            self._pollTimer.stop()
            self._setIdle()

    def _setIdle(self) -> None:
        self._propagateTask = None
        self.ui.progressBar.visible = False
        self.ui.cancelButton.visible = False
        self._updateCacheLabel()
        self._checkCanApply()

    def _onProgress(self, done, total, message) -> None:
        self.ui.statusLabel.text = message
        if total:
            self.ui.progressBar.value = int(100 * done / total)

    def _onMatchFinished(self, outputs, pointIndex) -> None:
        p = self._parameterNode
        if outputs.table is not None:
            self.ui.resultsTableView.setMRMLTableNode(outputs.table)
        confident = sum(row.confident for row in outputs.rows)
        self.ui.statusLabel.text = _("{n} match(es), {c} confident{cancelled}").format(
            n=len(outputs.rows), c=confident, cancelled=_(" (cancelled: finished targets kept)") if outputs.cancelled else "")
        if p is not None and p.jumpToMatch and pointIndex is not None and p.targetVolumes:
            target = self._heatmapTarget() or p.targetVolumes[0]
            position = self.logic.core.matchPosition(p.sourcePoints, pointIndex, target)
            if position is not None:
                self.logic.core.jumpToPoint(position)

    def _onMatchError(self, error) -> None:
        self.ui.statusLabel.text = _("Matching failed")
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        slicer.util.errorDisplay(_("Matching failed: {}").format(error), detailedText=details)

    def onCancel(self) -> None:
        if self._propagateTask is not None:
            self._propagateTask.cancel()
            self.ui.statusLabel.text = _("Cancelling after the current target...")

    # -- heatmap, results, cache -------------------------------------------------------------
    def onShowHeatmapToggled(self, checked: bool) -> None:
        if not checked:
            self.logic.core.hideHeatmap()
            return
        p = self._parameterNode
        index = self._currentPointIndex
        if index is None and p and p.sourcePoints and p.sourcePoints.GetNumberOfControlPoints():
            index = p.sourcePoints.GetNumberOfControlPoints() - 1
        if index is not None:
            self._matchPoint(index)

    def onHeatmapOpacityChanged(self, value: float) -> None:
        self.logic.core.setHeatmapOpacity(value)

    def onResultClicked(self, modelIndex) -> None:
        table = self.ui.resultsTableView.mrmlTableNode()
        p = self._parameterNode
        if table is None or p is None or p.sourcePoints is None:
            return
        label = table.GetCellText(modelIndex.row(), 0)
        target = slicer.mrmlScene.GetFirstNodeByName(table.GetCellText(modelIndex.row(), 1))
        for index in range(p.sourcePoints.GetNumberOfControlPoints()):
            if p.sourcePoints.GetNthControlPointLabel(index) == label:
                self._currentPointIndex = index
                position = self.logic.core.matchPosition(p.sourcePoints, index, target) if target else None
                if position is not None:
                    self.logic.core.jumpToPoint(position)
                return

    def onExport(self) -> None:
        p = self._parameterNode
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export matches"), f"{p.sourcePoints.GetName()} matches.mrk.json",
            _("Slicer markups (*.mrk.json);;Legacy fiducials (*.fcsv);;Table (*.csv)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.exportResults(p.sourcePoints, path)
            self.ui.statusLabel.text = _("Wrote {}").format(", ".join(str(w) for w in written))

    def onClearCache(self) -> None:
        self.logic.clearCache()
        self._updateCacheLabel()

    def _updateCacheLabel(self) -> None:
        self.ui.cacheSizeLabel.text = _("Cache: {:.0f} MB in use").format(self.logic.cacheBytesInUse() / 1e6)
