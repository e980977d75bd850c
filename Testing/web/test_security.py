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
        # a page of another port of this host is "same site" to a browser, which sends it the cookie: its requests
        # (its websocket opened: a review) are refused by their Origin; the page's own go on
        token = first.url.split("?token=")[1]
        for origin, status in ((f"http://127.0.0.1:{second.port}", 403), (f"http://127.0.0.1:{first.port}", 200)):
            request = urllib.request.Request(f"{base}?token={token}", headers={"Origin": origin})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    code = response.status
            except urllib.error.HTTPError as e:
                code = e.code
            assert code == status, origin
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


def test_origins_are_compared_by_scheme_host_and_port():
    from SAMEmbeddingWeb.security import same_origin

    assert same_origin(None, ["127.0.0.1:8080"])  # no page made it: the token alone guards it
    assert same_origin("http://127.0.0.1:8080", ["127.0.0.1:8080"])
    assert not same_origin("http://127.0.0.1:47999", ["127.0.0.1:8080"])
    assert not same_origin("http://localhost:8080", ["127.0.0.1:8080"])
    assert same_origin("https://sam.example.org", ["127.0.0.1:8080", "sam.example.org"])  # a proxy's forwarded host
    assert same_origin("http://[::1]:8080", ["[::1]:8080"])
    assert not same_origin("null", ["127.0.0.1:8080"]) and not same_origin("http://a:x", ["a:1"])


def test_the_server_runs_until_stopped_unless_an_idle_timeout_is_asked_and_a_missing_image_is_said_at_once(capsys):
    """wslink stopped the server 300 s after its last page closed (or after its start, with none), losing every
    landmark without a word; a missing image on the command line was said only in the page (a review)."""
    from samembed.cli import build_parser, main

    assert build_parser().parse_args(["web"]).idle_timeout == 0.0
    server = WebServer("--idle-timeout", "2")
    try:
        server.process.wait(60)
        assert "stopped, no page connected for 2 s (--idle-timeout)" in server.output()
    finally:
        server.stop()
    assert main(["web", "no_such_scan.nii.gz"]) == 2
    assert "no_such_scan.nii.gz: file not found" in capsys.readouterr().err
