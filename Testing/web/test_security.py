"""Security of the web viewer: data-root confinement (symlinks, ``..``), upload limits, the access token."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from samembed import InputError

from .conftest import WebServer


@pytest.fixture
def a_data_root(tmp_path):
    from SAMEmbeddingWeb.security import DataRoot

    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "ct.nii.gz").write_bytes(b"x")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, inside / "link.nii.gz")
    return DataRoot([inside]), inside


def test_a_data_root_resolves_a_file_inside_it(a_data_root):
    root, inside = a_data_root
    assert root.resolve(inside / "ct.nii.gz") == (inside / "ct.nii.gz").resolve()
    assert root.resolve("ct.nii.gz") == (inside / "ct.nii.gz").resolve()


@pytest.mark.parametrize("name", ["../secret.txt", "link.nii.gz", "/etc/passwd"])
def test_a_data_root_refuses_a_path_that_leaves_it(a_data_root, name):
    root, _ = a_data_root
    with pytest.raises(InputError, match="outside the data folders"):
        root.resolve(name)


def test_an_upload_folder_refuses_a_file_over_its_limit_and_is_removed_at_cleanup():
    from SAMEmbeddingWeb.security import UploadFolder

    uploads = UploadFolder(max_bytes=10)
    assert oct(uploads.path.stat().st_mode & 0o777) == "0o700"
    with pytest.raises(InputError, match="upload limit"):
        uploads.save("big.nrrd", b"x" * 11)
    saved = uploads.save("../../evil name.nrrd", b"x")
    assert saved.parent.parent == uploads.path and saved.name == "evil_name.nrrd"
    refused = uploads.save("not an image.nrrd", b"x")
    uploads.discard(refused)  # a file the page could not load goes at once, the others stay
    assert not refused.parent.exists() and saved.is_file()
    uploads.cleanup()
    assert not uploads.path.exists()


def test_a_server_off_loopback_answers_403_without_its_token():
    server = WebServer("--host", "0.0.0.0")
    try:
        assert "?token=" in server.url
        base = f"http://127.0.0.1:{server.port}/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base, timeout=10)
        assert refused.value.code == 403
        with pytest.raises(urllib.error.HTTPError) as wrong:
            urllib.request.urlopen(base + "?token=wrong", timeout=10)
        assert wrong.value.code == 403
        token = server.url.split("?token=")[1]
        with urllib.request.urlopen(f"{base}?token={token}", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()


def test_a_server_on_loopback_needs_its_token_too_and_keeps_its_own_cookie():
    """On loopback, without a token, any local program, and any web page open in the browser, could open the page's
    websocket and read the session (its paths, landmarks and matches). The cookie's name is the server's own: two
    servers on one host (cookies are per host, not per port) keep theirs."""
    import http.cookiejar

    first, second = WebServer(), WebServer()
    try:
        base = f"http://127.0.0.1:{first.port}/"
        assert first.url.startswith(base + "?token=")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base, timeout=10)
        assert refused.value.code == 403
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        for server in (first, second):
            with browser.open(server.url, timeout=10) as response:  # the printed URL sets the server's cookie
                assert response.status == 200
        assert len({c.name for c in jar}) == 2
        with pytest.raises(urllib.error.HTTPError) as odd:  # a token that is not ASCII: refused, not an error
            urllib.request.urlopen(base + "?token=%C3%A9", timeout=10)
        assert odd.value.code == 403
        for server in (first, second):  # each then answers without the token in the URL, by its own cookie
            with browser.open(f"http://127.0.0.1:{server.port}/", timeout=10) as response:
                assert response.status == 200
    finally:
        first.stop()
        second.stop()


def test_a_websocket_message_over_the_limit_is_refused_before_its_memory_is_set_aside():
    """wslink let an authenticated client declare messages of up to 4 GB and set the whole size aside at the first
    chunk; the server's own limit now caps that, so an oversized upload is refused at its first chunk."""
    pytest.importorskip("wslink")
    import struct

    from SAMEmbeddingWeb.security import limit_websocket_messages
    from wslink.chunking import HEADER_LENGTH, UnChunker

    limit_websocket_messages(2 << 20)
    unchunker = UnChunker()
    unchunker.set_max_message_size(4 * 1024**3)  # what wslink asks after the client's hello
    assert unchunker.max_message_size == 2 << 20
    header = struct.pack("<III", 1, 0, 3 << 20)  # (id, offset, total size): a message that says it is 3 MB
    assert len(header) == HEADER_LENGTH
    with pytest.raises(ValueError, match="exceeds"):
        unchunker.process_chunk(header + b"x" * 16)
    assert not unchunker.pending_messages
