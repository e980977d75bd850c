"""SAMEmbedding: find the same anatomical landmark in other images with SAM embeddings.

Thin Slicer glue: the module metadata, the parameter node, the module panel (whose body is
``SAMEmbeddingLib.widget.MatchWidget``), the Slicer logic (the console API, over ``SAMEmbeddingLib.logic.MatchLogic``)
and the self-test. All behaviour lives in ``SAMEmbeddingLib`` (testable on slicer-core) and in the ``samembed`` engine.

No third-party package is imported at file scope: torch comes through the PyTorch extension when first needed.
The one first-party import at file scope, ``SAMEmbeddingLib.parameters``, loads only samembed's options (numpy, no
torch) so that the parameter node's defaults are those of ``samembed.MatchOptions``.
"""

import logging
import os
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

# first-party and torch-free (samembed's options and numpy): the parameter node's defaults come from MatchOptions
from SAMEmbeddingLib.parameters import matchOptionsFromParameters, optionDefault

TORCH_REQUIREMENT = ">=2.0,<2.15"
"""torch versions the engine is tested with (installed through the PyTorch extension)."""
PYTHON_REQUIREMENTS = ["numpy>=1.22", "SimpleITK>=2.2", "xxhash>=3.0"]
"""Other packages matching needs. Slicer bundles numpy and SimpleITK; xxhash (the images' content hash, the cache
key) is installed once, with the user's consent, as torch is."""
LIBRARY_MODULES = ("parameters", "mrml_io", "worker", "engine_process", "logic", "controller", "widget")
"""SAMEmbeddingLib modules, in reload order (a module after those it imports)."""


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
#: an install is under way: Slicer's installers keep the GUI live (processEvents per line of pip's output), and a
#: second click, "Propagate all" or the heatmap box started a second install into the same site-packages (a review)
_installing = False


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
    if slicer.app.testingEnabled():
        raise RuntimeError(_("SAM Embedding needs torch{requirement}, which is not installed; tests do not install "
                             "packages: install PyTorch first (PyTorch Util module).").format(requirement=TORCH_REQUIREMENT))
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError(_("PyTorch was not installed, so landmarks cannot be matched."))
    if not _torchVersionAcceptable():
        raise RuntimeError(_("PyTorch {version} is loaded but SAM Embedding needs torch{requirement}; restart Slicer "
                             "to use the newly installed version.").format(version=torch.__version__,
                                                                           requirement=TORCH_REQUIREMENT))


def _ensurePackages(requirements: list[str], requester: str) -> None:
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
    if slicer.app.testingEnabled():  # no question and no download in a test run, as for torch
        raise RuntimeError(_("SAM Embedding needs these Python packages, which are not installed; tests do not install "
                             "packages: {packages}").format(packages=", ".join(missing)))
    try:
        from slicer import packaging as slicerPackaging  # (not `import slicer.packaging`: slicer stays the module's)

        pipEnsure = slicerPackaging.pip_ensure  # Slicer >= 5.12: asks and installs in its own way
    except (ImportError, AttributeError):
        pipEnsure = None
    if pipEnsure is not None:
        pipEnsure(missing, requester=requester)
        return
    if not slicer.util.confirmOkCancelDisplay(
            _("{requester} needs these Python packages: {packages}. Install them now?").format(
                requester=requester, packages=", ".join(missing))):
        raise RuntimeError(_("Required Python packages were not installed: {}").format(", ".join(missing)))
    slicer.util.pip_install(missing)


def ensureDependencies(requester: str = "SAM Embedding") -> None:
    """Make sure torch (through the PyTorch extension) and the engine's other packages are present."""
    global _dependenciesReady, _installing
    if _dependenciesReady:
        return
    if _installing:
        raise RuntimeError(_("The engine's packages are being installed; matching starts once that has finished."))
    _installing = True
    try:
        _ensureTorch()
        _ensurePackages(PYTHON_REQUIREMENTS, requester)
    finally:
        _installing = False
    _dependenciesReady = True


def installingDependencies() -> bool:
    """Whether :func:`ensureDependencies` is installing packages now (its installer keeps the GUI live)."""
    return _installing


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
    jumpToMatch - centre the slice views on the newest match.
    heatmapOpacity - foreground opacity of the heatmap.

    The other fields are the engine's match settings, one per ``samembed.MatchOptions`` field, named in
    ``SAMEmbeddingLib.parameters.OPTION_PARAMETERS`` and defaulting to ``MatchOptions()``'s values
    (``showHeatmap`` is ``heatmap``, ``searchBox`` an ROI for ``box_lps_mm``, ``polishLevels`` text);
    ``SAMEmbeddingLogic.matchOptions`` turns them into one ``MatchOptions``.
    """

    sourceVolume: vtkMRMLScalarVolumeNode
    sourcePoints: vtkMRMLMarkupsFiducialNode
    targetVolumes: list[vtkMRMLScalarVolumeNode]
    heatmapTarget: vtkMRMLScalarVolumeNode
    model: str = "default"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    jumpToMatch: bool = True
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    # samembed.MatchOptions, field by field (mm unless said otherwise)
    priorWindowMm: Annotated[float, WithinRange(0.0, 1000.0)] = optionDefault("prior_window_mm")
    globalWindowMm: Annotated[float, WithinRange(0.0, 1000.0)] = optionDefault("global_window_mm")
    searchBody: bool = optionDefault("search_body")
    searchBox: vtkMRMLMarkupsROINode
    refine: bool = optionDefault("refine")
    refineWindowMm: Annotated[float, WithinRange(0.0, 1000.0)] = optionDefault("refine_window_mm")
    consistency: bool = optionDefault("consistency")
    consistencyInlierMm: Annotated[float, WithinRange(0.0, 1000.0)] = optionDefault("consistency_inlier_mm")
    consistencyWindowMm: Annotated[float, WithinRange(0.0, 1000.0)] = optionDefault("consistency_window_mm")
    polish: bool = optionDefault("polish")
    polishMinNcc: Annotated[float, WithinRange(-1.0, 1.0)] = optionDefault("polish_min_ncc")
    polishLevels: str = optionDefault("polish_levels")
    roundtripToleranceMm: Annotated[float, WithinRange(0.0, 1000.0)] = optionDefault("roundtrip_tolerance_mm")
    showHeatmap: bool = optionDefault("heatmap")


#
# SAMEmbeddingWidget
#


class SAMEmbeddingWidget(ScriptedLoadableModuleWidget):
    """The module panel: builds ``SAMEmbeddingLib.widget.MatchWidget`` (the GUI body) and forwards to it."""

    def __init__(self, parent=None, logic=None) -> None:
        # set before the base __init__: without a parent it calls setup() at once, which needs them
        self.logic = logic
        self.body = None
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from SAMEmbeddingLib.widget import MatchWidget

        if self.logic is None:
            self.logic = SAMEmbeddingLogic()
        self.body = MatchWidget(self.layout, self.logic, isEntered=lambda: bool(self.parent.isEntered))

    def enter(self) -> None:
        if self.body is not None:  # (None once cleaned up)
            self.body.enter()

    def exit(self) -> None:
        if self.body is not None:
            self.body.exit()

    def cleanup(self) -> None:
        # once: "Reload" cleans up before the library modules reload (onReload), then Slicer's reload calls this again
        body, self.body = self.body, None
        if body is not None:
            body.cleanup()

    def onReload(self) -> None:
        """Reload the library modules too (Developer mode "Reload")."""
        import importlib

        self.cleanup()  # the engine process and the worker stop before the modules they run are reloaded
        for name in LIBRARY_MODULES:
            importlib.reload(importlib.import_module(f"SAMEmbeddingLib.{name}"))
        ScriptedLoadableModuleWidget.onReload(self)


#
# SAMEmbeddingLogic
#


class SAMEmbeddingLogic(ScriptedLoadableModuleLogic):
    """Slicer logic: checks dependencies, then hands the work to ``SAMEmbeddingLib.logic.MatchLogic`` (``self.core``).

    Can be used without the GUI, from the Python console::

        from samembed import MatchOptions
        logic = slicer.util.getModuleLogic("SAMEmbedding")
        outputs = logic.matchPoints(sourceVolume, sourcePointList, [targetVolume1, targetVolume2],
                                    options=MatchOptions(refine=True))
        for row in logic.resultRows(sourcePointList):
            print(row.label, row.target, row.pointRAS, row.score, row.confident)

    The methods below are the console API. Everything else (heatmap display, output nodes) is on ``logic.core``.

    Args:
        scene: the scene to work on (default: ``slicer.mrmlScene``).
        matcher: an engine to use instead of building one (tests).
    """

    def __init__(self, scene=None, matcher=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from SAMEmbeddingLib.logic import MatchLogic

        self.core = MatchLogic(scene if scene is not None else slicer.mrmlScene, matcher=matcher)

    def getParameterNode(self):
        return SAMEmbeddingParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies() -> None:
        """Install or check torch and the engine's packages (asks before installing); raises RuntimeError if missing."""
        ensureDependencies()

    @staticmethod
    def installingDependencies() -> bool:
        """Whether the engine's packages are being installed now (the GUI stays live meanwhile)."""
        return installingDependencies()

    @staticmethod
    def matchOptions(parameterNode=None):
        """The ``samembed.MatchOptions`` the module's parameter node describes (default: its saved settings).

        Raises:
            ValueError: a setting ``MatchOptions`` refuses (the message names it).
        """
        if parameterNode is None:
            parameterNode = SAMEmbeddingLogic().getParameterNode()
        return matchOptionsFromParameters(parameterNode)

    def setModel(self, model: str, device: "str | None" = None) -> None:  # (quoted: Python 3.9)
        """Choose the model ("default", a registered name or a checkpoint path) and device ("auto", "cpu", "cuda")."""
        self.core.setModel(model, device)

    def loadModel(self) -> str:
        """Load the model now (to surface a model error early); returns its description."""
        self.ensureDependencies()
        return self.core.loadModel()

    def canMatch(self, sourceVolume, sourcePointList, targetVolumes) -> tuple:
        """``(True, "")`` when :meth:`matchPoints` would accept these inputs, else ``(False, reason)``."""
        return self.core.canMatch(sourceVolume, sourcePointList, targetVolumes)

    def matchPoints(self, sourceVolume, sourcePointList, targetVolumes, pointIndices=None, options=None, **kwargs):
        """Match landmarks into every target volume; see ``MatchLogic.matchPoints``.

        :param sourceVolume: volume the landmarks were placed on.
        :param sourcePointList: point list with the landmarks (only read).
        :param targetVolumes: volumes to find the landmarks in.
        :param pointIndices: control points to match (default: all placed points).
        :param options: ``samembed.MatchOptions`` (default: its defaults); ``options.heatmap`` also computes and
            shows the similarity map of ``heatmapPointIndex`` in ``heatmapTarget`` (keywords).
        :returns: ``MatchOutputs`` with ``pointLists`` (one "<target> matches" list per target), ``table``,
            ``heatmaps``, ``rows``, ``cancelled`` and ``skipped`` (the ``(name, reason)`` of each target that could
            not be matched among several, e.g. too small for the model; the others are matched).
        :raises ValueError: ``samembed.InputError`` for bad input or a bad model, with the fix in the message.
        """
        self.core.prepareMatch(sourceVolume, sourcePointList, targetVolumes, pointIndices, options)  # input first
        self.ensureDependencies()
        return self.core.matchPoints(sourceVolume, sourcePointList, targetVolumes, pointIndices, options, **kwargs)

    def propagateAll(self, sourceVolume, sourcePointList, targetVolumes, pointIndices=None, options=None, **kwargs):
        """Match every placed landmark into every target; see ``MatchLogic.propagateAll``."""
        return self.matchPoints(sourceVolume, sourcePointList, targetVolumes, pointIndices, options, **kwargs)

    def computeHeatmap(self, sourceVolume, sourcePointList, pointIndex: int, targetVolume, options=None, show=True):
        """Similarity map of one landmark in one target, as a volume node; see ``MatchLogic.computeHeatmap``."""
        self.core.prepareMatch(sourceVolume, sourcePointList, [targetVolume], [pointIndex], options)
        self.ensureDependencies()
        return self.core.computeHeatmap(sourceVolume, sourcePointList, pointIndex, targetVolume, options, show)

    def resultRows(self, sourcePointList) -> list:
        """Every match of a landmark list: label, target, RAS mm, score, confidence (``MatchRow``)."""
        return self.core.resultRows(sourcePointList)

    def exportResults(self, sourcePointList, path, replace: bool = True) -> list:
        """Write the matches to ``.mrk.json``, ``.fcsv`` (one file per target) or ``.csv``; returns the files
        (``replace=False``: files there already are refused by name, nothing is written)."""
        return self.core.exportResults(sourcePointList, path, replace)

    def exportPaths(self, sourcePointList, path) -> list:
        """The files :meth:`exportResults` would write (one per target for markups, with several targets)."""
        return self.core.exportPaths(sourcePointList, path)

    def clearCache(self) -> None:
        """Forget every embedding and converted volume (they are recomputed when needed)."""
        self.core.clearCache()

    def cacheBytesInUse(self) -> int:
        """Memory held by cached embeddings and volumes, bytes."""
        return self.core.cacheBytesInUse()


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

        from samembed import MatchOptions

        logic = SAMEmbeddingLogic()
        logic.setModel(self._model(), "auto")
        self.delayDisplay("Matching 3 landmarks into 2 targets")
        outputs = logic.matchPoints(source, points, [source, target], options=MatchOptions(heatmap=True),
                                    heatmapPointIndex=0, heatmapTarget=target)

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
