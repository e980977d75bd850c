"""SAMEmbedding: find the same anatomical landmark in other images with SAM embeddings.

Thin Slicer glue. All behaviour lives in ``SAMEmbeddingLib`` (``logic.MatchLogic``, usable from the Python console
and testable on slicer-core) and in the ``samembed`` engine. This file holds the module metadata, the parameter
node, a widget that forwards user actions, the Slicer logic that forwards to ``MatchLogic``, and the self-test.

No third-party package is imported at file scope: torch comes through the PyTorch extension when first needed,
and ``SAMEmbeddingLib`` / ``samembed`` are imported inside functions.
"""

import logging
import os
import traceback
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

TORCH_REQUIREMENT = ">=2.0,<2.15"
"""torch versions the engine is tested with (installed through the PyTorch extension)."""
PYTHON_REQUIREMENTS = ["numpy>=1.22", "SimpleITK>=2.2"]
"""Other packages matching needs; Slicer bundles both, so this is a check that rarely installs anything."""
SETTINGS_KEY = "SAMEmbedding"
IMPORT_CHECKPOINT_ITEM = "Import checkpoint from file..."


#
# SAMEmbedding
#


class SAMEmbedding(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAM Embedding")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # PyTorch is an extension dependency, checked when first needed
        self.parent.contributors = ["SAMEmbedding developers"]
        self.parent.helpText = _("""
Place a landmark on a source volume and find the same anatomical point in any number of target volumes, with
SAM (Self-supervised Anatomical eMbedding). Each match carries the source label, a similarity score and a
confidence flag (a round trip back to the source lands near the click). A heatmap shows where else the point is
similar. See the <a href="https://github.com/SAMEmbedding/SlicerSAMEmbedding#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
SAM: Yan et al., "SAM: Self-supervised Learning of Pixel-wise Anatomical Embeddings in Radiological Images",
IEEE TMI 2022. The engine is a re-implementation; the official SAM / SAMv2 checkpoints can be imported.
""")


def _moduleResourcePath(*parts: str) -> str:
    """A resource of this module, in the installed layout (next to this file) or in the source tree (one up)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (here, os.path.dirname(here)):
        candidate = os.path.join(base, "Resources", *parts)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(here, "Resources", *parts)


#
# Dependencies: ensured when first needed, never at import
#

_dependenciesReady = False


def _torchVersionAcceptable() -> bool:
    import importlib.metadata

    from packaging.specifiers import SpecifierSet

    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return SpecifierSet(TORCH_REQUIREMENT).contains(installed.split("+")[0], prereleases=True)


def _ensureTorch() -> None:
    if _torchVersionAcceptable():
        return
    try:
        import PyTorchUtils
    except ImportError as e:
        raise RuntimeError(_("SAM Embedding needs PyTorch. Install the 'PyTorch' extension with the Extensions "
                             "Manager, restart Slicer and try again.")) from e
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError(_("PyTorch was not installed, so landmarks cannot be matched."))
    if not _torchVersionAcceptable():
        raise RuntimeError(_("PyTorch {version} is loaded but SAM Embedding needs torch{requirement}; restart Slicer "
                             "to use the newly installed version.").format(version=torch.__version__,
                                                                           requirement=TORCH_REQUIREMENT))


def _ensurePackages(requirements: list[str], requester: str) -> None:
    try:
        import slicer.packaging

        pipEnsure = slicer.packaging.pip_ensure  # Slicer >= 5.12
    except (ImportError, AttributeError):
        pipEnsure = None
    if pipEnsure is not None:
        pipEnsure(requirements, requester=requester)
        return
    import importlib.metadata

    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            if not requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True):
                missing.append(text)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
    if not missing:
        return
    if not slicer.util.confirmOkCancelDisplay(
            _("{requester} needs these Python packages: {packages}. Install them now?").format(
                requester=requester, packages=", ".join(missing))):
        raise RuntimeError(_("Required Python packages were not installed: {}").format(", ".join(missing)))
    slicer.util.pip_install(missing)


def ensureDependencies(requester: str = "SAM Embedding") -> None:
    """Make sure torch (through the PyTorch extension) and the engine's other packages are present."""
    global _dependenciesReady
    if _dependenciesReady:
        return
    _ensureTorch()
    _ensurePackages(PYTHON_REQUIREMENTS, requester)
    _dependenciesReady = True


#
# SAMEmbeddingParameterNode
#


@parameterNodeWrapper
class SAMEmbeddingParameterNode:
    """The user's choices, saved with the scene.

    sourceVolume - the volume landmarks are placed on.
    sourcePoints - the landmark point list (only read).
    targetVolumes - volumes to find the landmarks in (wired by hand: no GUI connector takes a list of nodes).
    heatmapTarget - the target the heatmap is shown over.
    model - "default", a registered model name, a checkpoint path (wired by hand: the list is dynamic).
    device - auto, cpu or cuda.
    refine - cycle-consistent refinement of each match.
    consistency - re-search matches that disagree with the rest of the landmark set (propagate all).
    polish - sub-voxel polish of each match with the image intensities.
    jumpToMatch - centre the slice views on the newest match.
    showHeatmap - show the similarity map of the selected point.
    heatmapOpacity - foreground opacity of the heatmap.
    """

    sourceVolume: vtkMRMLScalarVolumeNode
    sourcePoints: vtkMRMLMarkupsFiducialNode
    targetVolumes: list[vtkMRMLScalarVolumeNode]
    heatmapTarget: vtkMRMLScalarVolumeNode
    model: str = "default"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    refine: bool = False
    consistency: bool = False
    polish: bool = True
    jumpToMatch: bool = True
    showHeatmap: bool = False
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# SAMEmbeddingWidget
#


class SAMEmbeddingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: forwards each action to the logic; engine work runs on one persistent worker thread."""

    def __init__(self, parent=None, logic=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self.worker = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPoints = None
        self._currentPointIndex = None
        self._propagateTask = None
        self._pollTimer = None
        self._updatingGui = False

    # -- life cycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_moduleResourcePath("UI", "SAMEmbedding.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        if self.logic is None:
            self.logic = SAMEmbeddingLogic()
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

    def onReload(self) -> None:
        """Reload the library modules too (Developer mode "Reload")."""
        import importlib

        import SAMEmbeddingLib.logic
        import SAMEmbeddingLib.mrml_io
        import SAMEmbeddingLib.worker

        for module in (SAMEmbeddingLib.mrml_io, SAMEmbeddingLib.worker, SAMEmbeddingLib.logic):
            importlib.reload(module)
        if self.worker is not None:
            self.worker.shutdown()
        ScriptedLoadableModuleWidget.onReload(self)

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
        if self.parent.isEntered:
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
                table = self.logic.resultsTable(p.sourcePoints) if p.sourcePoints else None
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
        self.ui.exportButton.enabled = bool(p and p.sourcePoints and self.logic.outputPointLists(p.sourcePoints))

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
        return [(vtkMRMLMarkupsFiducialNode.PointPositionDefinedEvent, self.onPointPlaced),
                (vtkMRMLMarkupsFiducialNode.PointEndInteractionEvent, self.onPointMoved),
                (vtkMRMLMarkupsFiducialNode.PointRemovedEvent, self.onPointRemoved)]

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointPlaced(self, caller, event, index) -> None:
        self._matchPoint(index)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointMoved(self, caller, event, index) -> None:
        self._matchPoint(index)

    def onPointRemoved(self, caller, event) -> None:
        self.logic.removeMatchesOfDeletedPoints(caller)
        self._checkCanApply()

    # -- model -------------------------------------------------------------------------------
    def _registeredModels(self) -> list:
        """Names in models.json (read as JSON: importing samembed.models would load torch)."""
        import json

        path = os.path.join(os.environ.get("SAMEMBED_MODELS_DIR") or _moduleResourcePath("Models"), "models.json")
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
        folder = os.environ.get("SAMEMBED_MODELS_DIR") or _moduleResourcePath("Models")
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    # -- matching ----------------------------------------------------------------------------
    def _prepareEngine(self) -> bool:
        """Dependencies and model settings before engine work; False (after telling why) when not possible."""
        try:
            ensureDependencies()
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
        self.logic.setHeatmapOpacity(p.heatmapOpacity)
        single = pointIndices is not None and len(pointIndices) == 1
        try:
            task = self.logic.startMatch(
                self.worker, p.sourceVolume, p.sourcePoints, list(p.targetVolumes), pointIndices,
                heatmapPointIndex=heatmapIndex, heatmapTarget=heatmapTarget, refine=p.refine,
                consistency=p.consistency, polish=p.polish,
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
            position = self.logic.matchPosition(p.sourcePoints, pointIndex, target)
            if position is not None:
                self.logic.jumpToPoint(position)

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
            self.logic.hideHeatmap()
            return
        p = self._parameterNode
        index = self._currentPointIndex
        if index is None and p and p.sourcePoints and p.sourcePoints.GetNumberOfControlPoints():
            index = p.sourcePoints.GetNumberOfControlPoints() - 1
        if index is not None:
            self._matchPoint(index)

    def onHeatmapOpacityChanged(self, value: float) -> None:
        self.logic.setHeatmapOpacity(value)

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
                position = self.logic.matchPosition(p.sourcePoints, index, target) if target else None
                if position is not None:
                    self.logic.jumpToPoint(position)
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


#
# SAMEmbeddingLogic
#


class SAMEmbeddingLogic(ScriptedLoadableModuleLogic):
    """Slicer logic: checks dependencies, then forwards to ``SAMEmbeddingLib.logic.MatchLogic``.

    Can be used without the GUI, from the Python console::

        logic = slicer.util.getModuleLogic("SAMEmbedding")
        outputs = logic.matchPoints(sourceVolume, sourcePointList, [targetVolume1, targetVolume2])

    Every public ``MatchLogic`` method is available here (``propagateAll``, ``computeHeatmap``, ``exportResults``,
    ``clearCache``, ``canMatch`` ...).
    """

    def __init__(self, scene=None, matcher=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from SAMEmbeddingLib.logic import MatchLogic

        self.core = MatchLogic(scene if scene is not None else slicer.mrmlScene, matcher=matcher)

    def getParameterNode(self):
        return SAMEmbeddingParameterNode(super().getParameterNode())

    def matchPoints(self, sourceVolume, sourcePointList, targetVolumes, pointIndices=None, **kwargs):
        """Match landmarks into every target volume; see ``MatchLogic.matchPoints``.

        :param sourceVolume: volume the landmarks were placed on.
        :param sourcePointList: point list with the landmarks (only read).
        :param targetVolumes: volumes to find the landmarks in.
        :param pointIndices: control points to match (default: all placed points).
        :returns: ``MatchOutputs`` with ``pointLists`` (one "<target> matches" list per target), ``table``,
            ``heatmaps``, ``rows`` and ``cancelled``.
        :raises ValueError: ``samembed.InputError`` for bad input or a bad model, with the fix in the message.
        """
        ensureDependencies()
        return self.core.matchPoints(sourceVolume, sourcePointList, targetVolumes, pointIndices, **kwargs)

    def propagateAll(self, sourceVolume, sourcePointList, targetVolumes, **kwargs):
        """Match every placed landmark into every target; see ``MatchLogic.propagateAll``."""
        ensureDependencies()
        return self.core.propagateAll(sourceVolume, sourcePointList, targetVolumes, **kwargs)

    def computeHeatmap(self, sourceVolume, sourcePointList, pointIndex, targetVolume, show=True):
        """Similarity map of one landmark in one target, as a volume; see ``MatchLogic.computeHeatmap``."""
        ensureDependencies()
        return self.core.computeHeatmap(sourceVolume, sourcePointList, pointIndex, targetVolume, show)

    def __getattr__(self, name):
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)


#
# SAMEmbeddingTest
#


class SAMEmbeddingTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: loads SampleData CTs and matches a few landmarks."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_matchLandmarksBetweenSampleCTs()
        self.setUp()
        self.test_badInputIsRefusedWithAMessage()

    def _model(self) -> str:
        import json

        try:
            with open(_moduleResourcePath("Models", "models.json"), encoding="utf-8") as f:
                models = json.load(f).get("models", [])
        except (OSError, ValueError):
            models = []
        trained = any(m.get("name") == "default" and m.get("file") for m in models)
        if not trained:
            logging.warning("SAMEmbeddingTest: no trained default model; matching with random weights")
        return "default" if trained else "random:sam-lite"

    def _pointsAt(self, volume, ijkList, name="landmarks"):
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        for n, ijk in enumerate(ijkList):
            ras = matrix.MultiplyPoint([*ijk, 1.0])[:3]
            points.AddControlPoint(vtk.vtkVector3d(*ras), f"L{n + 1}")
        return points

    def test_matchLandmarksBetweenSampleCTs(self):
        import numpy as np
        import SampleData

        self.delayDisplay("Loading sample CTs")
        source = SampleData.downloadSample("CTChest")
        target = SampleData.downloadSample("CTACardio")
        dims = source.GetImageData().GetDimensions()
        points = self._pointsAt(source, [(dims[0] // 2, dims[1] // 2, dims[2] // 2),
                                         (dims[0] // 3, dims[1] // 2, dims[2] // 2),
                                         (dims[0] // 2, dims[1] // 3, dims[2] // 3)])

        logic = SAMEmbeddingLogic()
        logic.setModel(self._model(), "auto")
        self.delayDisplay("Matching 3 landmarks into 2 targets")
        outputs = logic.matchPoints(source, points, [source, target], heatmapPointIndex=0, heatmapTarget=target)

        self.assertEqual([n.GetName() for n in outputs.pointLists], ["CTChest matches", "CTACardio matches"])
        selfMatches = outputs.pointLists[0]
        self.assertEqual(selfMatches.GetNumberOfControlPoints(), 3)
        for i in range(3):
            self.assertEqual(selfMatches.GetNthControlPointLabel(i), f"L{i + 1}")
            clicked, found = [0.0] * 3, [0.0] * 3
            points.GetNthControlPointPositionWorld(i, clicked)
            selfMatches.GetNthControlPointPositionWorld(i, found)
            self.assertLess(np.linalg.norm(np.subtract(clicked, found)), 8.0)
        heatmap = outputs.heatmaps[target.GetID()]
        self.assertEqual(heatmap.GetImageData().GetDimensions(), target.GetImageData().GetDimensions())
        self.assertEqual(outputs.table.GetNumberOfRows(), 6)
        self.delayDisplay("Test passed")

    def test_badInputIsRefusedWithAMessage(self):
        import SampleData

        source = SampleData.downloadSample("CTChest")
        points = self._pointsAt(source, [(-50, -50, -50)])
        logic = SAMEmbeddingLogic()
        ok, reason = logic.canMatch(source, points, [source])
        self.assertFalse(ok)
        self.assertIn("outside the source volume", reason)
        with self.assertRaises(ValueError):
            logic.matchPoints(source, points, [])
        self.delayDisplay("Test passed")
