"""The Qt widget of the SAMEmbedding module: binds the panel to a :class:`~SAMEmbeddingLib.controller.MatchController`.

This is the only file of ``SAMEmbeddingLib`` that uses ``qt``, ``slicer.app``, ``slicer.util`` and the global scene;
it runs only inside 3D Slicer. ``SAMEmbedding.SAMEmbeddingWidget`` (the module file) builds a :class:`MatchWidget`
in its ``setup`` and forwards ``enter``, ``exit`` and ``cleanup``.

The widget keeps no point bookkeeping: the controller observes the landmark list and fires the matches, decides
when the heatmap is computed, and finds a result row's target. The engine runs in a persistent child process
(``MatchLogic(engine="process")``), so Slicer stays responsive while a volume is embedded.
"""

from __future__ import annotations

import importlib.util
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
POLL_INTERVAL_MS = 50
#: the packages a preparation imports that Slicer does not bundle (the PyTorch extension installs torch, the module's
#: first match the rest, ``SAMEmbedding.PYTHON_REQUIREMENTS``): without one of them nothing is prepared ahead of a click
PREPARE_NEEDS = ("torch", "xxhash")


def moduleResourcePath(*parts: str) -> str:
    """A resource of this module, in the installed layout (beside the module file) or in the source tree (one up)."""
    moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (moduleDir, os.path.dirname(moduleDir)):
        candidate = os.path.join(base, "Resources", *parts)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(moduleDir, "Resources", *parts)


class MatchWidget(VTKObservationMixin):
    """The GUI body: binds the panel's widgets to the parameter node and to a ``MatchController``.

    Args:
        layout: the module panel's layout, which receives the widgets of ``SAMEmbedding.ui``.
        logic: the module's ``SAMEmbeddingLogic`` (its ``core`` is switched to the engine process).
        isEntered: True while the module is shown (a closed scene is re-initialised only then).
    """

    def __init__(self, layout, logic, isEntered: Callable[[], bool]) -> None:
        from SAMEmbeddingLib.controller import MatchController
        from SAMEmbeddingLib.worker import Worker

        VTKObservationMixin.__init__(self)
        self.layout = layout
        self.logic = logic
        self._isEntered = isEntered
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False

        uiWidget = slicer.util.loadUI(moduleResourcePath("UI", "SAMEmbedding.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic.core.useEngineProcess()
        self.worker = Worker()
        self.controller = MatchController(self.logic.core, self.worker, prepareEngine=self._prepareEngine,
                                          onStatus=self._setStatus, onProgress=self._onProgress,
                                          onFinished=self._onMatchFinished, onError=self._onMatchError,
                                          engineReady=self._readyToPrepare,
                                          later=lambda match: qt.QTimer.singleShot(0, match))
        self._polling = False  # (_poll is running: not entered again from a message box's event loop)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        place = self.ui.placeWidget
        place.buttonsVisible = False
        place.placeButton().show()
        place.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.targetVolumesSelector.connect("checkedNodesChanged()", self.onTargetsChecked)
        self.ui.modelComboBox.connect("activated(int)", self.onModelActivated)
        self.ui.modelFolderButton.connect("clicked()", self.onOpenModelFolder)
        self.ui.propagateButton.connect("clicked()", self.onPropagateAll)
        self.ui.cancelButton.connect("clicked()", self.controller.cancel)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.clearCacheButton.connect("clicked()", self.onClearCache)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.logic.core.setHeatmapOpacity)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)
        # showHeatmap is bound by the parameter node only: the controller reacts to its change (not to a restore)

        self._fillModelComboBox()
        self.initializeParameterNode()

    # -- life cycle ---------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:  # (a reloaded module's widgets stayed bound)
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObservers()
        self._pollTimer.stop()
        self.controller.cleanup()
        # the engine first: a job starting it (its child importing torch) stops at once, where the worker's join
        # waited its whole 5 s for it (a review)
        self.logic.core.close()
        self.worker.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self._readyToPrepare():  # its packages are installed: start the engine while the user chooses volumes
            self.logic.core.startEngineOn(self.worker)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self.ui.placeWidget.setPlaceModeEnabled(False)

    def onSceneStartClose(self, caller, event) -> None:
        self.controller.cleanup()
        self.logic.core.sceneClosing()  # a job still running writes nothing into the next scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        # a scene being loaded is cleared first, in the same batch as its import (vtkMRMLScene::Connect): its own
        # parameter node and landmarks come with the import (a "SAM landmarks" list made now stayed behind in it)
        scene = slicer.mrmlScene
        if self._isEntered() and not (scene.IsBatchProcessing() or scene.IsImporting()):
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        if self._isEntered():
            self.initializeParameterNode()

    def onNodeRemoved(self, caller, event) -> None:
        """A deleted target leaves the parameter node's list (no selector signal says so); a deleted volume's copy
        goes."""
        self.logic.core.dropRemovedVolumes()
        p = self._parameterNode
        if p is None or self._updatingGui:
            return
        live = self.logic.core.liveTargets(list(p.targetVolumes))
        if len(live) != len(list(p.targetVolumes)):
            p.targetVolumes = live

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.sourceVolume:
            from SAMEmbeddingLib.mrml_io import first_selectable_volume

            firstVolume = first_selectable_volume(slicer.mrmlScene)
            if firstVolume:
                p.sourceVolume = firstVolume
        if not p.sourcePoints:
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", _("SAM landmarks"))
            points.CreateDefaultDisplayNodes()
            p.sourcePoints = points

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:  # (exit() disconnected it already)
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self.controller.setParameters(inputParameterNode)  # a restored scene starts no match
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            # connectGui sets each node selector's types from its parameter's (vtkMRMLScalarVolumeNode, shown
            # without subclasses): colour radiographs (vector volumes), which the engine reads, could be checked as
            # targets but never chosen as the source or the heatmap's target
            from SAMEmbeddingLib.mrml_io import SELECTABLE_VOLUME_CLASSES

            for selector, chosen in ((self.ui.sourceVolumeSelector, self._parameterNode.sourceVolume),
                                     (self.ui.heatmapTargetSelector, self._parameterNode.heatmapTarget)):
                selector.nodeTypes = list(SELECTABLE_VOLUME_CLASSES)
                # a vector volume chosen before was not among the types when connectGui showed it: the selector
                # showed None while matching used it (a review)
                if chosen is not None and selector.currentNode() is not chosen:
                    selector.setCurrentNode(chosen)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._updateGui()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._updatingGui:
            return
        self.controller.parametersModified()
        self._updateGui()

    def _updateGui(self) -> None:
        self._updatingGui = True
        try:
            p = self._parameterNode
            if p:
                checked = {n.GetID() for n in self.controller.targets()}
                for i in range(self.ui.targetVolumesSelector.nodeCount()):
                    node = self.ui.targetVolumesSelector.nodeFromIndex(i)
                    state = qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked
                    if self.ui.targetVolumesSelector.checkState(node) != state:
                        self.ui.targetVolumesSelector.setCheckState(node, state)
                self._selectModelInComboBox(p.model)
                self.ui.placeWidget.setCurrentNode(p.sourcePoints)
                table = self.logic.core.resultsTable(p.sourcePoints) if p.sourcePoints else None
                self.ui.resultsTableView.setMRMLTableNode(table)
            self._checkCanApply()
        finally:
            self._updatingGui = False

    def _checkCanApply(self) -> None:
        p = self._parameterNode
        ok, reason = self.controller.canMatch()
        self.ui.propagateButton.enabled = ok and not self.controller.matching
        self.ui.propagateButton.toolTip = _("Match every landmark into every target.") if ok else reason
        self.ui.placeWidget.enabled = bool(p and p.sourceVolume and p.sourcePoints)
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
        self.controller.parametersModified()  # the observer skipped it (GUI update): prepare the chosen volumes
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
        """Dependencies before engine work; False (after telling why) when they are missing."""
        if self.logic.installingDependencies():  # a click while they are installed: said, not a second install
            self._setStatus(_("Installing the engine's packages; matching starts once that has finished."))
            return False
        try:
            self.logic.ensureDependencies()
        except Exception as e:  # noqa: BLE001 - shown to the user
            # (said once: the controller asks no more at placed points, until "Propagate all")
            slicer.util.errorDisplay(str(e) + "\n\n" + _("Placed points are not matched until then; "
                                                          "'Propagate all' asks again."))
            return False
        self._pollTimer.start()
        return True

    def _readyToPrepare(self) -> bool:
        """Whether volumes may be prepared ahead of a click: the engine's packages are installed (no question to
        ask). When they are, the poll timer is started, as for a match: it delivers the preparation's result."""
        if any(importlib.util.find_spec(name) is None for name in PREPARE_NEEDS):
            return False
        self._pollTimer.start()
        return True

    def onPropagateAll(self) -> None:
        try:
            task = self.controller.propagateAll()
        except ValueError as e:  # samembed.InputError: bad input or settings, said plainly
            slicer.util.errorDisplay(str(e))
            return
        if task is not None or self.controller.matching:  # (matching: it waits for the running work to end)
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self.ui.cancelButton.visible = True
        self._checkCanApply()

    def _poll(self) -> None:
        # a message box of a callback (an error, skipped targets) runs an event loop of its own, in which this timer
        # fires again: a second poll then delivered later callbacks, and their boxes stacked up under the first
        if self._polling:
            return
        self._polling = True
        try:
            self._pollOnce()
        finally:
            self._polling = False

    def _pollOnce(self) -> None:
        self.controller.poll()
        if not self.controller.matching:  # preparing ahead may go on: the user's buttons are back
            self.ui.progressBar.visible = False
            self.ui.cancelButton.visible = False
            self._checkCanApply()
        if not self.controller.busy:
            self._pollTimer.stop()
            self._updateCacheLabel()

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _onProgress(self, done: float, total: float, phase: str) -> None:
        self.ui.statusLabel.text = phase
        if total:
            self.ui.progressBar.value = int(100 * done / total)

    def _onMatchFinished(self, outputs) -> None:
        if outputs.table is not None:
            self.ui.resultsTableView.setMRMLTableNode(outputs.table)
        if outputs.skipped:  # the other targets were matched: told, not an error
            slicer.util.warningDisplay(
                _("{} target(s) could not be matched and were skipped; the others were matched. Earlier matches of "
                  "these points in a skipped target are kept, marked as not updated.").format(
                    len(outputs.skipped)),
                detailedText="\n".join(f"{name}: {reason}" for name, reason in outputs.skipped))

    def _onMatchError(self, error) -> None:
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        from samembed.errors import is_out_of_memory, out_of_memory_advice

        if is_out_of_memory(error):  # (torch's own words gave no advice)
            slicer.util.errorDisplay(_("Matching failed: {}").format(out_of_memory_advice(error)), detailedText=details)
            return
        slicer.util.errorDisplay(_("Matching failed: {}").format(error), detailedText=details)

    # -- results, cache ----------------------------------------------------------------------
    def onResultClicked(self, modelIndex) -> None:
        # the view's index is of its sort proxy: the table's own row is that of the source model (the table node
        # shows its column titles as the header, so the model's rows are the table's, see updateResultsTable)
        proxy = self.ui.resultsTableView.sortFilterProxyModel()
        self.controller.selectResultRow(proxy.mapToSource(modelIndex).row() if proxy is not None else modelIndex.row())

    def onExport(self) -> None:
        p = self._parameterNode
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export matches"), f"{p.sourcePoints.GetName()} matches.mrk.json",
            _("Slicer markups (*.mrk.json);;Legacy fiducials (*.fcsv);;Table (*.csv)"))
        if not path:
            return
        # with several targets the files are named per target: the dialog asked about the chosen name only
        others = [w for w in self.logic.core.exportPaths(p.sourcePoints, path) if w.exists() and str(w) != path]
        if others and not slicer.util.confirmOkCancelDisplay(
                _("These files exist and will be replaced:") + "\n" + "\n".join(str(w) for w in others)):
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.exportResults(p.sourcePoints, path)
            self.ui.statusLabel.text = _("Wrote {}").format(", ".join(str(w) for w in written))

    def onClearCache(self) -> None:
        self.controller.clearCache()  # waits for running work on the poll timer, not on this thread
        if self.controller.busy:
            self._pollTimer.start()
        self._updateCacheLabel()

    def _updateCacheLabel(self) -> None:
        self.ui.cacheSizeLabel.text = _("Cache: {:.0f} MB in use").format(self.logic.cacheBytesInUse() / 1e6)
