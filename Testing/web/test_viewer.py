"""The viewer in a real browser: click a landmark on a real CT, see its match, the heatmap, export; bad input.

One server (two 128^3 head-and-neck CTs from ../shared/data) serves the tests of this file in order; its first
match embeds both volumes (about a minute and a half on one CPU thread), the later steps reuse the embeddings.
"""

from __future__ import annotations

import json
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
                       "--device", "cpu", "--cache-dir", str(cache_dir))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def a_page(a_server, a_browser):
    page = a_browser.new_page()
    page.goto(a_server.url)
    page.wait_for_selector("#status")
    page.wait_for_function("document.querySelectorAll('img').length >= 2")
    time.sleep(2.0)  # the first frames of the slice views
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
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({json.dumps(text)})",
                           timeout=timeout_ms)
    return _status(page)


def test_a_click_in_the_source_view_places_a_landmark_whose_match_is_where_the_engine_puts_it(a_page, cache_dir):
    page = a_page
    page.locator("#place-switch").check()
    source_view, target_view = _views(page)
    box = source_view.bounding_box()
    x, y = box["x"] + box["width"] / 2 + CLICK_OFFSET_PX[0], box["y"] + box["height"] / 2 + CLICK_OFFSET_PX[1]
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    page.wait_for_selector(".landmark", timeout=20_000)
    page.wait_for_selector(".result-row", timeout=MATCH_TIMEOUT_MS)
    page.wait_for_function("!document.querySelector('#cancel') || document.querySelector('#cancel').offsetParent === null",
                           timeout=MATCH_TIMEOUT_MS)
    source_ras = np.array(json.loads(page.locator(".landmark").first.get_attribute("data-ras")))
    row = page.locator(".result-row").first
    match_ras = np.array(json.loads(row.get_attribute("data-ras")))
    assert row.get_attribute("data-target") == "pt_202_ct.nii.gz"

    # the engine's API, on the same files with the same (default) options, for the clicked point
    from samembed import Matcher, MatchOptions
    from samembed.io import read_image

    matcher = Matcher("default", device="cpu", cache_dir=cache_dir)
    source_lps = source_ras * np.array([-1.0, -1.0, 1.0])
    result = matcher.match(read_image(data_file(*SOURCE)), source_lps[None], [read_image(data_file(*TARGET))],
                           ["P"], options=MatchOptions())
    expected_ras = np.asarray(result.matches[0].point_ras_mm)
    assert np.allclose(match_ras, expected_ras, atol=0.5), (match_ras, expected_ras)
    confident = row.inner_text().strip().endswith("yes")
    assert confident == bool(result.matches[0].confident)

    # the target view shows the match in its colour (green confident, orange not)
    time.sleep(1.0)
    colour = CONFIDENT_RGB if confident else UNCERTAIN_RGB
    pixels = _pixels(_views(page)[1])
    near = np.linalg.norm(pixels - colour, axis=-1) < 40
    assert near.sum() > 20, f"no {'green' if confident else 'orange'} point in the target view"
    page.screenshot(path=str(REPO / "docs" / "web.png"))


def test_the_heatmap_switch_changes_the_target_view(a_page):
    page = a_page
    target_view = _views(page)[1]
    before = _pixels(target_view)
    page.locator("#heatmap-switch").check()
    page.wait_for_selector("#colour-bar", state="visible", timeout=MATCH_TIMEOUT_MS)
    time.sleep(1.5)
    after = _pixels(target_view)
    changed = (np.abs(after - before).sum(axis=-1) > 30).mean()
    assert changed > 0.01, f"only {changed:.2%} of the target view changed"
    page.locator("#heatmap-switch").uncheck()
    time.sleep(1.5)
    hidden = _pixels(target_view)
    assert (np.abs(hidden - before).sum(axis=-1) > 30).mean() < changed


def test_the_exported_markups_file_holds_the_match(a_page, tmp_path):
    page = a_page
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


def test_an_upload_that_is_not_an_image_is_refused_in_the_page_and_the_server_goes_on(a_page, a_server, tmp_path):
    page = a_page
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("this is not an image\n")
    page.locator("#upload-volume").set_input_files(str(bad))
    assert "not an image" in _wait_status(page, "not an image")
    assert page.locator("#status").get_attribute("data-error") == "true"
    with urllib.request.urlopen(a_server.url, timeout=10) as response:
        assert response.status == 200
    assert page.locator(".result-row").count() == 1  # nothing already matched is lost


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


def test_the_orientation_switch_changes_the_views(a_page):
    page = a_page
    source_view = _views(page)[0]
    before = _pixels(source_view)
    page.locator("#orientation-coronal").click()
    time.sleep(2.0)
    coronal = _pixels(_views(page)[0])
    assert coronal.shape != before.shape or (np.abs(coronal - before).sum(axis=-1) > 30).mean() > 0.05
    page.locator("#orientation-axial").click()
    time.sleep(2.0)


def test_a_landmark_file_adds_its_points_and_propagate_all_matches_every_landmark(a_page, tmp_path):
    from samembed.io import read_image

    page = a_page
    grid = read_image(data_file(*SOURCE)).grid
    points = grid.index_to_lps([[60, 66, 60], [70, 58, 64]])
    csv_file = tmp_path / "more.csv"
    csv_file.write_text("label,x,y,z\n" + "".join(f"F{i + 1},{p[0]},{p[1]},{p[2]}\n" for i, p in enumerate(points)))
    before = page.locator(".landmark").count()
    page.locator("#upload-landmarks").set_input_files(str(csv_file))
    page.wait_for_function(f"document.querySelectorAll('.landmark').length >= {before + 2}", timeout=30_000)
    page.locator("#propagate").click()
    page.wait_for_function(f"document.querySelectorAll('.result-row').length >= {before + 2}", timeout=MATCH_TIMEOUT_MS)
    page.wait_for_function("!document.querySelector('#cancel') || document.querySelector('#cancel').offsetParent === null",
                           timeout=MATCH_TIMEOUT_MS)
    labels = {r.get_attribute("data-label") or r.inner_text().split()[0] for r in page.locator(".result-row").all()}
    assert {"F1", "F2"} <= labels, labels

