"""The demo's download path, against a local HTTP server on 127.0.0.1, and its offline message."""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import socket
import threading

import numpy as np
import pytest

from ..conftest import REPO


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("samembed_demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def a_served_nrrd(tmp_path):
    """A small real NRRD served under its SHA-256, as the Slicer testing-data release serves its files."""
    import SimpleITK as sitk

    served = tmp_path / "served"
    served.mkdir()
    img = sitk.GetImageFromArray((np.arange(4 * 5 * 6).reshape(4, 5, 6) - 60).astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(tmp_path / "small.nrrd"))
    data = (tmp_path / "small.nrrd").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (served / sha).write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sha, data
    server.shutdown()
    server.server_close()


def test_samples_download_into_a_folder_that_does_not_exist_yet_and_are_checked(demo, a_served_nrrd, tmp_path):
    url, sha, data = a_served_nrrd
    out = tmp_path / "demo_output" / "samples"
    paths = demo.download_samples(out, {"Small.nrrd": sha}, base_url=url)
    assert paths == [out / "Small.nrrd"] and paths[0].read_bytes() == data
    import SimpleITK as sitk

    assert sitk.ReadImage(str(paths[0])).GetSize() == (6, 5, 4)
    # a second call reuses the file (no server needed)
    assert demo.download_samples(out, {"Small.nrrd": sha}, base_url="http://127.0.0.1:9") == paths


def test_a_missing_or_tampered_download_is_refused_and_nothing_is_kept(demo, a_served_nrrd, tmp_path):
    url, sha, data = a_served_nrrd
    with pytest.raises(demo.DemoError, match="cannot download the demo CT X.nrrd"):
        demo.download_samples(tmp_path / "s", {"X.nrrd": "0" * 64}, base_url=url)  # the server has no such file
    claimed = "1" * 64  # the server holds bytes under this name that do not hash to it
    (tmp_path / "served" / claimed).write_bytes(data + b"tampered")
    with pytest.raises(demo.DemoError, match="does not match .*refused and deleted"):
        demo.download_samples(tmp_path / "u", {"Y.nrrd": claimed}, base_url=url)
    assert list((tmp_path / "s").iterdir()) == [] and list((tmp_path / "u").iterdir()) == []


def test_without_network_the_demo_says_what_to_do(demo, tmp_path):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(demo.DemoError) as e:
        demo.download_samples(tmp_path / "samples", {"CTChest.nrrd": "a" * 64}, base_url=f"http://127.0.0.1:{port}",
                              timeout_s=5)
    text = str(e.value)
    assert "cannot download the demo CT CTChest.nrrd" in text and "SAMEMBED_DATA" in text and "by hand" in text
    assert list((tmp_path / "samples").iterdir()) == []
