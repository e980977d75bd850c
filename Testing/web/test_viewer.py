"""The viewer in a real browser: click a landmark on a real CT, see its match, drag it, the heatmap, export, the
results table, window/level, model and device, propagate and cancel; bad input (2D images among them).

One server (two 128^3 head-and-neck CTs from ../shared/data) serves the tests of this file in order; its first
match embeds both volumes (about a minute and a half on one CPU thread), the later steps reuse the embeddings.
It is started with ``--model sam-lite-ct`` (the name of the shipped CT model that ``default`` means for 3D
images), so that the page can switch to ``default`` and back (same weights: the embeddings on disk are reused).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ..conftest import data_file
from .conftest import REPO, WebServer

pytestmark = [pytest.mark.needs_data, pytest.mark.slow]

SOURCE = ("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
TARGET = ("ct", "openkbp", "ct", "pt_202_ct.nii.gz")
CLICK_OFFSET_PX = (10, -20)
"""Where the test clicks: this many pixels right of and above the source view's centre."""
MATCH_TIMEOUT_MS = 300_000
CONFIDENT_RGB = np.array([0.20, 0.85, 0.30]) * 255
UNCERTAIN_RGB = np.array([1.00, 0.45, 0.10]) * 255


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def a_server(cache_dir):
    source, target = data_file(*SOURCE), data_file(*TARGET)
    server = WebServer(str(source), str(target), "--data-root", str(source.parent), "--max-upload-mb", "1",
                       "--device", "cpu", "--cache-dir", str(cache_dir), "--model", "sam-lite-ct")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def a_page(a_server, a_browser):
    page = a_browser.new_page()
    page.goto(a_server.url)
    page.wait_for_selector("#status")
    page.wait_for_function("Array.from(document.querySelectorAll('img'))"
                           ".filter(i => i.getBoundingClientRect().width > 0).length >= 2", timeout=60_000)
    for view in _views(page):  # their first frames
        _settled(view)
    yield page
    page.close()


def _views(page):
    """The source and target slice views (the two streamed images, left to right)."""
    images = page.locator("img")
    order = sorted(range(images.count()), key=lambda i: images.nth(i).bounding_box()["x"])
    return [images.nth(i) for i in order][:2]


def _pixels(locator) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(locator.screenshot())).convert("RGB"), dtype=float)


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, text: str, timeout_ms: int = 20_000) -> str:
    """The status line as it read when it first held ``text`` (read in the same check: a later status, e.g. of a
    match still finishing, cannot take its place before the caller sees it)."""
    handle = page.wait_for_function(
        f"(() => {{ const t = document.querySelector('#status').innerText; return t.includes({json.dumps(text)}) ? t : null; }})()",
        timeout=timeout_ms)
    return handle.json_value()


def _wait_refusal(page, text: str, timeout_ms: int = 20_000) -> tuple[str, bool]:
    """Like :func:`_wait_status`, with whether the line was shown as an error, read in the same check (a later
    status, e.g. of volumes prepared in the background, replaces both the text and the flag)."""
    handle = page.wait_for_function(
        "(() => { const s = document.querySelector('#status'); const t = s.innerText; "
        f"return t.includes({json.dumps(text)}) ? [t, s.getAttribute('data-error')] : null; }})()",
        timeout=timeout_ms)
    line, error = handle.json_value()
    return line, error == "true"


def _wait_idle(page, timeout_ms: int = MATCH_TIMEOUT_MS) -> None:
    """Until no match runs (the Cancel button is hidden)."""
    page.wait_for_function("!document.querySelector('#cancel') || document.querySelector('#cancel').offsetParent === null",
                           timeout=timeout_ms)


def _ras(locator) -> np.ndarray:
    return np.array(json.loads(locator.get_attribute("data-ras")), dtype=float)


def _landmarks(page) -> dict[str, np.ndarray]:
    """The source landmarks shown in the page: label -> RAS."""
    return {lm.inner_text().strip(): _ras(lm) for lm in page.locator(".landmark").all()}


def _rows(page) -> list[tuple[str, str, np.ndarray]]:
    """The results table: (label, target, RAS) per row."""
    return [(r.locator("td").nth(0).inner_text().strip(), r.get_attribute("data-target"), _ras(r))
            for r in page.locator(".result-row").all()]


def _until(condition, timeout_s: float, what: str):
    """Poll ``condition()`` until it returns something true (or an array); fail with ``what`` on timeout."""
    end = time.monotonic() + timeout_s
    while True:
        value = condition()
        if isinstance(value, np.ndarray) or (value is not None and bool(value)):
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


def _choose(page, select_id: str, item: str) -> None:
    """Pick ``item`` in a Vuetify select of the page, as a user does (open its menu, click the item)."""
    page.locator(f".v-select:has(#{select_id})").click()
    page.locator(".v-overlay--active .v-list-item", has_text=item).first.click()
    page.wait_for_selector(".v-overlay--active .v-list-item", state="detached", timeout=5_000)


def _shown(page, select_id: str) -> str:
    return page.locator(f".v-select:has(#{select_id}) .v-select__selection").first.inner_text().strip()


@functools.lru_cache(maxsize=1)
def _matcher(cache_dir: Path):
    from samembed import Matcher

    return Matcher("default", device="cpu", cache_dir=cache_dir)


def _engine_match(cache_dir: Path, source_ras: np.ndarray):
    """The engine API's match of one source point (RAS) in the target, same files and (default) options as the page."""
    from samembed import MatchOptions
    from samembed.io import read_image

    source_lps = np.asarray(source_ras, dtype=float) * np.array([-1.0, -1.0, 1.0])
    result = _matcher(cache_dir).match(read_image(data_file(*SOURCE)), source_lps[None],
                                       [read_image(data_file(*TARGET))], ["P"], options=MatchOptions())
    return result.matches[0]


def _click_point(page) -> tuple[float, float]:
    """Where the first test clicks (and its landmark stays until dragged): page pixels in the source view."""
    box = _views(page)[0].bounding_box()
    return box["x"] + box["width"] / 2 + CLICK_OFFSET_PX[0], box["y"] + box["height"] / 2 + CLICK_OFFSET_PX[1]


def _changed(before: np.ndarray, after: np.ndarray) -> float:
    """The fraction of a view's pixels that changed between two screenshots (0 when their sizes differ: 1)."""
    if before.shape != after.shape:
        return 1.0
    return float((np.abs(after - before).sum(axis=-1) > 30).mean())


def _settled(view, timeout_s: float = 20.0) -> np.ndarray:
    """A screenshot of ``view`` once two taken a quarter of a second apart agree (a view may stream more than one
    frame after a change)."""
    end = time.monotonic() + timeout_s
    last = _pixels(view)
    while True:
        time.sleep(0.25)
        now = _pixels(view)
        if np.array_equal(now, last):
            return now
        if time.monotonic() > end:
            raise AssertionError(f"the view still changed after {timeout_s:.0f} s")
        last = now


def _place_landmark(page) -> None:
    """Click a landmark into the source view (at :func:`_click_point`) and wait for its match."""
    page.locator("#place-switch").check()
    x, y = _click_point(page)
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    page.wait_for_selector(".landmark", timeout=20_000)
    page.wait_for_selector(".result-row", timeout=MATCH_TIMEOUT_MS)
    _wait_idle(page)


@pytest.fixture
def a_landmark(a_page):
    """The page with the first test's landmark and its match: placed here when a test runs without that test
    before it (``-k``, a rerun of one failed test), so that no test depends on the order of the file."""
    if a_page.locator(".result-row").count() == 0:
        _place_landmark(a_page)
    return a_page


def _add_landmark_file(page, tmp_path) -> None:
    """Upload two more landmarks (F1, F2) and match them all (Propagate all)."""
    from samembed.io import read_image

    grid = read_image(data_file(*SOURCE)).grid
    points = grid.index_to_lps([[60, 66, 60], [70, 58, 64]])
    csv_file = tmp_path / "more.csv"
    csv_file.write_text("label,x,y,z\n" + "".join(f"F{i + 1},{p[0]},{p[1]},{p[2]}\n" for i, p in enumerate(points)))
    before = page.locator(".landmark").count()
    page.locator("#upload-landmarks").set_input_files(str(csv_file))
    page.wait_for_function(f"document.querySelectorAll('.landmark').length >= {before + 2}", timeout=30_000)
    page.locator("#propagate").click()
    page.wait_for_function(f"document.querySelectorAll('.result-row').length >= {before + 2}", timeout=MATCH_TIMEOUT_MS)
    _wait_idle(page)


def test_a_click_in_the_source_view_places_a_landmark_whose_match_is_where_the_engine_puts_it(a_page, cache_dir):
    page = a_page
    _place_landmark(page)
    source_ras = _ras(page.locator(".landmark").first)
    row = page.locator(".result-row").first
    match_ras = _ras(row)
    assert row.get_attribute("data-target") == "pt_202_ct.nii.gz"

    # the engine's API, on the same files with the same (default) options, for the clicked point
    expected = _engine_match(cache_dir, source_ras)
    expected_ras = np.asarray(expected.point_ras_mm)
    assert np.allclose(match_ras, expected_ras, atol=0.5), (match_ras, expected_ras)
    cells = row.locator("td")
    confident = cells.nth(4).inner_text().strip() == "yes"
    assert confident == bool(expected.confident)
    # and why: the round trip's distance from the click, mm
    assert float(cells.nth(5).inner_text()) == pytest.approx(expected.roundtrip_mm, abs=0.051)

    # the target view shows the match in its colour (green confident, orange not), once its frame arrives
    colour = CONFIDENT_RGB if confident else UNCERTAIN_RGB
    _until(lambda: (np.linalg.norm(_pixels(_views(page)[1]) - colour, axis=-1) < 40).sum() > 20, 20,
           f"a {'green' if confident else 'orange'} point in the target view")
    # the README's picture of the viewer, refreshed on request only (a test run leaves the checkout as it was)
    if os.environ.get("SAMEMBED_UPDATE_DOCS"):
        page.screenshot(path=str(REPO / "docs" / "web.png"))


def test_dragging_the_landmark_matches_it_again_where_the_engine_puts_its_new_position(a_landmark, cache_dir):
    page = a_landmark
    page.locator("#place-switch").uncheck()  # dragging, not placing
    (label, source_before), = _landmarks(page).items()
    (_, _, match_before), = _rows(page)
    x, y = _click_point(page)
    page.mouse.move(x + 3, y + 3)
    page.mouse.move(x, y)  # hovering picks the point: the view's cursor becomes a pointer
    page.wait_for_function("window.trame.state.get('Source_active_view_cursor') === 'pointer'", timeout=10_000)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x + 2.5 * step, y + 1.5 * step)
        time.sleep(0.05)
    page.mouse.up()

    source_after = _until(lambda: (lambda p: p if np.linalg.norm(p - source_before) > 5 else None)(
        _landmarks(page)[label]), 20, "the dragged landmark to move")
    _until(lambda: not np.allclose(_rows(page)[0][2], match_before, atol=1e-3), MATCH_TIMEOUT_MS / 1000,
           "the match to change")
    _wait_idle(page)
    assert page.locator(".landmark").count() == 1 and page.locator(".result-row").count() == 1  # moved, not added
    (_, target, match_after), = _rows(page)
    assert target == "pt_202_ct.nii.gz"
    expected = np.asarray(_engine_match(cache_dir, source_after).point_ras_mm)
    assert np.allclose(match_after, expected, atol=0.5), (match_after, expected)
    assert not np.allclose(match_after, match_before, atol=0.5)


def test_the_heatmap_switch_changes_the_target_view(a_landmark):
    page = a_landmark
    target_view = _views(page)[1]
    before = _pixels(target_view)
    page.locator("#heatmap-switch").check()
    page.wait_for_selector("#colour-bar", state="visible", timeout=MATCH_TIMEOUT_MS)
    # (polled: the view's new frame arrives when it arrives)
    changed = _until(lambda: (lambda c: c if c > 0.01 else None)(_changed(before, _pixels(target_view))), 20,
                     "the heatmap to change more than 1 % of the target view")
    page.locator("#heatmap-switch").uncheck()
    _until(lambda: _changed(before, _pixels(target_view)) < changed, 20, "the target view without the heatmap")


def test_the_exported_markups_file_holds_the_match(a_landmark, tmp_path):
    page = a_landmark
    match_ras = np.array(json.loads(page.locator(".result-row").first.get_attribute("data-ras")))
    with page.expect_download(timeout=20_000) as download:
        page.locator("#export").click()
    path = tmp_path / "export.mrk.json"
    download.value.save_as(path)
    markups = json.loads(path.read_text())["markups"][0]
    assert markups["coordinateSystem"] == "LPS"
    point = markups["controlPoints"][0]
    assert point["label"] == page.locator(".landmark").first.inner_text().strip()
    assert np.allclose(np.array(point["position"]) * np.array([-1.0, -1.0, 1.0]), match_ras, atol=1e-3)


def test_an_upload_that_is_not_an_image_is_refused_in_the_page_and_the_server_goes_on(a_landmark, a_server, tmp_path):
    page = a_landmark
    rows = page.locator(".result-row").count()
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("this is not an image\n")
    page.locator("#upload-volume").set_input_files(str(bad))
    text, error = _wait_refusal(page, "not an image")
    assert error, text
    with urllib.request.urlopen(a_server.url, timeout=10) as response:
        assert response.status == 200
    assert page.locator(".result-row").count() == rows  # nothing already matched is lost
    import glob
    import tempfile

    left = glob.glob(str(Path(tempfile.gettempdir()) / "samembed-web-*" / "*" / "notes.nii.gz"))
    assert not left, f"the refused upload stays on the server's disk: {left}"


def test_an_upload_over_the_size_limit_is_refused_with_a_message(a_page, tmp_path):
    page = a_page
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"\0" * 2_000_000)  # the server's limit is 1 MB
    page.locator("#upload-volume").set_input_files(str(big))
    assert "upload limit" in _wait_status(page, "upload limit")


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../../../etc/hostname"])
def test_a_path_outside_the_data_root_is_refused(a_page, path):
    page = a_page
    page.locator("#path-text").fill(path)
    page.locator("#open-path").click()
    assert "outside the data folders" in _wait_status(page, "outside the data folders")


def _choose_orientation(page, name: str) -> None:
    """Click the orientation button ``name`` as a user does, and again if the page has not taken it within a few
    seconds (a click on a button the page was re-rendering was lost once under a loaded CI machine); returns when the
    button is the active one."""
    button = page.locator(f"#orientation-{name}")
    for _ in range(4):
        button.click()
        try:
            _until(lambda: "v-btn--active" in (button.get_attribute("class") or ""), 5, f"the {name} button")
            return
        except AssertionError:
            continue
    raise AssertionError(f"the {name} orientation button never became active")


def _source_view_settled(page, differs_from, what: str):
    """The source view once it differs from ``differs_from`` by more than 5 % and two looks 0.5 s apart agree."""
    def look():
        now = _pixels(_views(page)[0])
        if _changed(differs_from, now) <= 0.05:
            return None
        time.sleep(0.5)
        again = _pixels(_views(page)[0])
        return again if _changed(now, again) < 0.01 else None

    return _until(look, 30, what)


def test_the_orientation_switch_changes_the_views(a_page):
    page = a_page
    before = _pixels(_views(page)[0])
    _choose_orientation(page, "coronal")
    coronal = _source_view_settled(page, before, "the coronal source view")
    _choose_orientation(page, "axial")
    _source_view_settled(page, coronal, "the axial source view again")


def test_the_window_level_presets_set_the_volumes_window_and_level_and_change_the_views(a_page):
    from SAMEmbeddingWeb.session import WINDOW_LEVEL_PRESETS

    page = a_page
    shots = {}
    previous = None
    for preset, (window, level) in WINDOW_LEVEL_PRESETS.items():
        page.locator(f"#wl-{preset.replace(' ', '-')}").click()
        page.wait_for_function(f"(wl => wl && wl[0] == {window} && wl[1] == {level})"
                               "(JSON.parse(document.querySelector('#window-level').dataset.wl))", timeout=10_000)
        if previous is not None:  # both views' new frames (polled; whether they differ enough is asserted below)
            _until(lambda previous=previous: all(_changed(a, _pixels(v)) > 0 for a, v in zip(previous, _views(page))),
                   20, f"the views under {preset}")
        shots[preset] = previous = [_settled(view) for view in _views(page)]
    names = list(shots)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for view, (before, after) in zip(("source", "target"), zip(shots[a], shots[b])):
                changed = (np.abs(after - before).sum(axis=-1) > 30).mean()
                assert changed > 0.02, f"{a} -> {b}: only {changed:.2%} of the {view} view changed"


def test_a_landmark_file_adds_its_points_and_propagate_all_matches_every_landmark(a_page, tmp_path):
    page = a_page
    _add_landmark_file(page, tmp_path)
    labels = {r.get_attribute("data-label") or r.inner_text().split()[0] for r in page.locator(".result-row").all()}
    assert {"F1", "F2"} <= labels, labels



def test_a_landmark_file_of_x_y_only_is_refused_with_a_message_and_adds_nothing(a_page, tmp_path):
    """Every volume of the viewer is 3D: a ``label,x,y`` file would put its points on the plane z = 0."""
    page = a_page
    xy = tmp_path / "flat.csv"
    xy.write_text("label,x,y\nQ1,250,250\n")
    before = page.locator(".landmark").count()
    page.locator("#upload-landmarks").set_input_files(str(xy))
    text, error = _wait_refusal(page, "its points have 2 coordinates")
    assert "give each point's z too" in text and error, text
    assert page.locator(".landmark").count() == before


def test_a_click_on_a_result_row_centres_the_views_on_that_match_and_its_landmark(a_landmark, tmp_path):
    page = a_landmark
    if len(_rows(page)) < 3:  # run without the landmark file's test before it
        _add_landmark_file(page, tmp_path)
    rows, landmarks = _rows(page), _landmarks(page)
    assert len(rows) >= 3
    # two rows far apart, clicked in turn: each click must bring the views to its own points
    first = min(range(len(rows)), key=lambda i: rows[i][2][2])
    second = max(range(len(rows)), key=lambda i: np.linalg.norm(rows[i][2] - rows[first][2]))
    assert np.linalg.norm(rows[second][2] - rows[first][2]) > 5
    for index in (first, second, first):
        label, _, match_ras = rows[index]
        page.locator(".result-row").nth(index).click()
        _until(lambda match_ras=match_ras, source_ras=landmarks[label]:
               np.allclose(_ras(page.locator("#target-centre")), match_ras, atol=0.6)
               and np.allclose(_ras(page.locator("#source-centre")), source_ras, atol=0.6), 10,
               f"the views to centre on {label} at {landmarks[label]} and its match at {match_ras}")
    view = _views(page)[1]  # and the view shows it: the match's colour at the target view's centre

    def drawn() -> bool:
        pixels = _pixels(view)
        h, w = pixels.shape[:2]
        centre = pixels[h // 2 - 8:h // 2 + 9, w // 2 - 8:w // 2 + 9]
        return ((np.linalg.norm(centre - CONFIDENT_RGB, axis=-1) < 40)
                | (np.linalg.norm(centre - UNCERTAIN_RGB, axis=-1) < 40)).sum() > 5

    _until(drawn, 20, "a match point drawn at the target view's centre")


def test_the_model_and_device_choices_do_what_they_say(a_page):
    import torch

    page = a_page
    rows_before = _rows(page)
    assert _shown(page, "model-select") == "sam-lite-ct" and _shown(page, "device-select") == "cpu"

    # a 2D model for 3D volumes: refused with what to do; the choice goes back, nothing matched is lost
    _choose(page, "model-select", "sam-lite-2d-hand")
    text, error = _wait_refusal(page, "for 2D images")
    assert "choose a 3D model" in text and error, text
    _until(lambda: _shown(page, "model-select") == "sam-lite-ct", 5, "the model choice to go back")
    assert len(_rows(page)) == len(rows_before)

    # CUDA where there is none: refused the same way
    if not torch.cuda.is_available():
        _choose(page, "device-select", "cuda")
        assert "choose 'cpu' or 'auto'" in _wait_status(page, "not available on this server")
        _until(lambda: _shown(page, "device-select") == "cpu", 5, "the device choice to go back")

    # a path instead of a name, set by the page's own script: the server read it as a checkpoint, anywhere on its
    # disk (a review); only the models the page offers are taken
    page.evaluate("window.trame.state.set('model', '/etc/hostname')")
    text, error = _wait_refusal(page, "not one this server offers")
    assert error, text
    _until(lambda: _shown(page, "model-select") == "sam-lite-ct", 5, "the model choice to go back")

    # another device: kept, and used from the next match on
    _choose(page, "device-select", "auto")
    assert "used from the next match" in _wait_status(page, "Model 'sam-lite-ct' on device 'auto'")
    assert _shown(page, "device-select") == "auto"

    # another model: every landmark is matched again with it (on the chosen device), the table keeps its rows
    _choose(page, "model-select", "default")
    _wait_status(page, "match(es)", timeout_ms=MATCH_TIMEOUT_MS)
    _wait_idle(page)
    engine = page.locator("#engine").inner_text()
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert "model 'default'" in engine and f"on {expected_device}" in engine, engine
    assert _shown(page, "model-select") == "default" and _shown(page, "device-select") == "auto"
    rows_after = _rows(page)
    assert [(label, target) for label, target, _ in rows_after] == [(label, target) for label, target, _ in rows_before]
    for (_, _, before), (_, _, after) in zip(rows_before, rows_after):
        assert np.allclose(before, after, atol=0.5)  # the same weights under another name


def test_propagate_all_shows_its_progress_and_cancel_keeps_the_finished_targets(a_landmark, a_server):
    page = a_landmark
    landmarks = _landmarks(page)
    more = ["pt_203_ct.nii.gz", "pt_204_ct.nii.gz", "pt_206_ct.nii.gz"]
    for name in more:
        data_file(*SOURCE[:-1], name)
        page.locator("#path-text").fill(name)
        page.locator("#open-path").click()
        _wait_status(page, f"Loaded {name}")
    page.locator("#propagate").click()
    # the progress bar shows the targets done (one of four after the first, already embedded target)
    page.wait_for_function("document.querySelector('#progress').offsetParent !== null && "
                           "Number(document.querySelector('#progress').getAttribute('aria-valuenow')) >= 25",
                           timeout=MATCH_TIMEOUT_MS)
    assert "pt_20" in page.locator("#progress-text").inner_text()
    page.locator("#cancel").click()
    _wait_status(page, "cancelled: finished targets kept", timeout_ms=MATCH_TIMEOUT_MS)
    _wait_idle(page)

    rows = _rows(page)
    by_target: dict[str, set] = {}
    for label, target, _ in rows:
        by_target.setdefault(target, set()).add(label)
    assert by_target.get(TARGET[-1]) == set(landmarks), by_target  # the finished target keeps every landmark
    assert any(name not in by_target for name in more), f"nothing was cancelled: {sorted(by_target)}"
    for name, labels in by_target.items():
        assert labels == set(landmarks), (name, labels)  # a target is matched whole or not at all
    with urllib.request.urlopen(a_server.url, timeout=10) as response:
        assert response.status == 200
    axial_centre = _ras(page.locator("#source-centre"))
    page.locator("#orientation-coronal").click()  # and the page still talks to the server both ways
    _until(lambda: not np.allclose(_ras(page.locator("#source-centre")), axial_centre, atol=0.5), 10,
           "the coronal view's centre")
    coronal_centre = _ras(page.locator("#source-centre"))
    page.locator("#orientation-axial").click()
    _until(lambda: not np.allclose(_ras(page.locator("#source-centre")), coronal_centre, atol=0.5), 10,
           "the axial view again")


def _one_slice_nifti(path: Path) -> Path:
    import SimpleITK as sitk

    volume = sitk.ReadImage(str(data_file(*SOURCE)))
    z = volume.GetSize()[2] // 2
    sitk.WriteImage(volume[:, :, z:z + 1], str(path))
    return path


@pytest.mark.parametrize("kind", ["one-slice NIfTI", "JPEG radiograph"])
def test_a_2d_image_beside_3d_volumes_gets_a_message_saying_what_to_do(a_page, a_server, tmp_path, kind):
    page = a_page
    rows_before, volumes_before = _rows(page), page.evaluate("window.trame.state.get('volumes').length")
    if kind == "JPEG radiograph":
        upload = tmp_path / "hand.jpg"
        shutil.copy(data_file("xray", "hand_dha37", "images", "3143.jpg"), upload)
    else:
        upload = _one_slice_nifti(tmp_path / "slice.nii.gz")
    page.locator("#upload-volume").set_input_files(str(upload))
    text, error = _wait_refusal(page, f"{upload.name} is a 2D image", timeout_ms=30_000)
    assert "samembed match SOURCE.png TARGET.png --spacing MM" in text and error, text
    # not loaded: no new volume, no new target; nothing matched is lost; the server goes on
    assert page.evaluate("window.trame.state.get('volumes').length") == volumes_before
    assert len(_rows(page)) == len(rows_before)
    with urllib.request.urlopen(a_server.url, timeout=10) as response:
        assert response.status == 200
