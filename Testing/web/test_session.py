"""The web viewer's session in this process (no browser): the real ``WebApp`` on real MRML (trame-slicer), driven
through its session as the page's controls drive it. The browser tier (test_viewer.py) checks the page itself."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from samembed import InputError

from ..conftest import data_file
from .conftest import WebServer

pytestmark = pytest.mark.needs_data


@pytest.fixture
def an_app():
    """The viewer with an OpenKBP source and target, the default model on the CPU, as ``samembed web A B`` starts."""
    pytest.importorskip("trame_slicer", reason="the web extra is not installed (trame-slicer)")
    from SAMEmbeddingWeb.app import WebApp, WebOptions

    images = [str(data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz")) for n in (201, 202)]
    app = WebApp(WebOptions(images=images, device="cpu"))
    yield app
    app.close()


def _idle(app, timeout: float = 300.0) -> None:
    """Poll as the server's event loop does, until the worker has nothing left (matches, preparations)."""
    end = time.monotonic() + timeout
    while app.session.controller.busy or app.session.worker.busy:
        assert time.monotonic() < end, "the session stayed busy"
        app.session.poll()
        time.sleep(0.02)
    app.session.poll()


def _click(app) -> None:
    """A click in the source view: a control point placed on the active list (as the markups widget places it)."""
    import slicer

    scene = app.session.scene
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    points = scene.GetNodeByID(selection.GetActivePlaceNodeID())
    bounds = [0.0] * 6
    app.session.parameters.sourceVolume.GetRASBounds(bounds)
    assert isinstance(points, slicer.vtkMRMLMarkupsFiducialNode)
    points.AddControlPoint(*[(bounds[2 * k] + bounds[2 * k + 1]) / 2 + 5.0 * points.GetNumberOfControlPoints()
                             for k in range(3)])


def test_every_click_while_placing_places_a_landmark_on_the_source(an_app):
    """The first match made its output point list the active one (Slicer activates each new list), so every later
    click went there, shown in no view (a review): only the first click placed a landmark."""
    s = an_app.session
    s.set_placing(True)
    for n in (1, 2, 3):
        _click(an_app)
        _idle(an_app)
        assert s.points.GetNumberOfControlPoints() == n
        assert len(s.rows()) == n


def test_another_model_prepares_the_chosen_volumes_for_it(an_app):
    """Choosing a model before the first click kept the volumes prepared for the old one, and said "Ready" (a
    review); they are prepared again for the model chosen."""
    s = an_app.session
    s.set_model("sam-lite-ct-fast", "cpu")
    _idle(an_app)
    assert s.controller._preparedFor[1:] == ("sam-lite-ct-fast", "cpu")
    assert s.logic.model == "sam-lite-ct-fast"
    assert s.status.startswith("Ready: volumes prepared"), s.status


def test_a_model_chosen_while_the_first_match_runs_matches_that_landmark_again(an_app):
    s = an_app.session
    s.set_placing(True)
    _click(an_app)
    assert s.busy
    s.set_model("sam-lite-ct-fast", "cpu")
    assert "matching every landmark again" in s.status, s.status
    _idle(an_app)
    assert s.engine().startswith("last match: model 'sam-lite-ct-fast'"), s.engine()
    assert len(s.rows()) == 1


def test_a_nifti_cut_short_is_refused_by_name_and_not_loaded(an_app, tmp_path):
    """Slicer's reader filled a cut-short .nii.gz with zeros without a word, and it was matched (a review)."""
    whole = data_file("ct", "openkbp", "ct", "pt_203_ct.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole[: len(whole) // 3])
    before = list(an_app.session.volumes())
    with pytest.raises(InputError, match=r"^upload.nii.gz: cannot read this image .* damaged or cut short"):
        an_app.session.load_volume(cut, "upload.nii.gz")
    assert an_app.session.volumes() == before


def test_the_target_chosen_as_source_is_no_longer_the_shown_target(an_app):
    s = an_app.session
    target = s.parameters.targetVolumes[0]
    s.set_source(target)
    assert s.parameters.targetVolumes == [] and s.shown_target is None and s.parameters.heatmapTarget is None


def _server_with_hang_up(disposition) -> WebServer:
    """``samembed web`` started with SIGHUP's ``disposition`` (a terminal's server: the default; under ``nohup``:
    ignored), which the process inherits from this one (the test runner may itself run under ``nohup``)."""
    previous = signal.signal(signal.SIGHUP, disposition)
    try:
        return WebServer(str(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")), "--device", "cpu")
    finally:
        signal.signal(signal.SIGHUP, previous)


def _own_folders(before: set[Path]) -> set[Path]:
    return {p for p in Path(tempfile.gettempdir()).glob("samembed-web-*") if p.is_dir()} - before


def test_a_hang_up_stops_the_server_through_its_clean_up_unless_it_runs_under_nohup(tmp_path):
    """SIGHUP (a closed terminal, a dropped SSH session) ended the server at once, leaving its uploads' folder, with
    any patient file uploaded, in the temporary folder (a review). It now stops as Ctrl-C stops it; a server started
    under ``nohup`` (SIGHUP ignored) is meant to outlive its terminal, and does."""
    before = {p for p in Path(tempfile.gettempdir()).glob("samembed-web-*") if p.is_dir()}
    server = _server_with_hang_up(signal.SIG_DFL)
    try:
        made = _own_folders(before)
        assert made, "the server made no folder of its own (the test looks for the wrong one)"
        os.kill(server.process.pid, signal.SIGHUP)
        server.process.wait(60)
        assert not [p for p in made if p.exists()], server.output()
    finally:
        server.stop()
    kept = _server_with_hang_up(signal.SIG_IGN)
    try:
        os.kill(kept.process.pid, signal.SIGHUP)
        time.sleep(2.0)
        assert kept.process.poll() is None, kept.output()
    finally:
        kept.stop()


def test_numbered_one_slice_radiographs_load_alone_and_take_label_x_y_landmarks(tmp_path):
    """Slicer's archetype reader took hand_3150.nii.gz with hand_3151.nii.gz beside it for a series: each one-slice
    radiograph loaded as the two stacked, or not at all (a review); a label,x,y landmark file was refused as needing a
    z, though the source is one slice."""
    pytest.importorskip("trame_slicer", reason="the web extra is not installed (trame-slicer)")
    import SimpleITK as sitk
    from SAMEmbeddingWeb.app import WebApp, WebOptions

    paths = []
    for n, name in enumerate(("3150.jpg", "3156.jpg")):
        picture = sitk.ReadImage(str(data_file("xray", "hand_dha37", "images", name)))
        picture = sitk.Resample(picture, [640, 860], sitk.Transform(), sitk.sitkLinear)  # the same size: one series
        volume = sitk.JoinSeries(picture)
        volume.SetSpacing((0.2, 0.2, 1.0))
        volume.SetOrigin((0.0, 0.0, 12.5))
        paths.append(tmp_path / f"hand_{3150 + n}.nii.gz")
        sitk.WriteImage(volume, str(paths[-1]))
    app = WebApp(WebOptions(images=[str(p) for p in paths], device="cpu", model="sam-lite-2d-hand"))
    try:
        s = app.session
        _idle(app)
        volumes = s.volumes()
        assert [v.GetImageData().GetDimensions() for v in volumes] == [(640, 860, 1)] * 2, s.status
        (tmp_path / "points.csv").write_text("label,x,y\nA,60,80\nB,70,100\n")
        assert s.load_landmarks(tmp_path / "points.csv") == 2
        position = [0.0, 0.0, 0.0]
        s.points.GetNthControlPointPosition(0, position)
        assert position == pytest.approx([-60.0, -80.0, 12.5])  # RAS, on the slice
    finally:
        app.close()


def test_cancel_is_offered_for_propagate_all_and_not_for_a_clicks_match(an_app):
    """Cancel showed while a click's landmark was matched, and did nothing (a review): it is offered while
    "propagate all" runs, which it stops."""
    s = an_app.session
    s.set_placing(True)
    _click(an_app)
    assert s.busy and not s.cancellable
    _idle(an_app)
    assert s.propagate_all() is not None or s.controller.waiting
    assert s.cancellable
    _idle(an_app)
    assert not s.cancellable
