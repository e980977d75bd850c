"""``--base-path``: the viewer behind a reverse proxy, in a real browser.

A small aiohttp reverse proxy in the test forwards ``/sam/...`` to the server, as nginx or Traefik would: once
passing the path on as it is (``proxy_pass http://server;``), once stripping the prefix
(``proxy_pass http://server/;``). Either way the page loads through the proxy, its websocket connects (the
server's state arrives) and an action makes the round trip (a volume opened by path is loaded and shown).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import numpy as np
import pytest

from ..conftest import data_file
from .conftest import WebServer

pytestmark = [pytest.mark.needs_data, pytest.mark.slow]

PREFIX = "/sam"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "content-encoding", "host"}


class ReverseProxy:
    """``http://127.0.0.1:<port>/sam/...`` -> ``upstream`` (HTTP and websockets), in a thread of its own.

    Args:
        upstream: ``http://host:port`` of the server.
        strip: forward ``/sam/x`` as ``/x`` (True) or as ``/sam/x`` (False).
    """

    def __init__(self, upstream: str, strip: bool) -> None:
        self.upstream, self.strip = upstream.rstrip("/"), strip
        self.loop = asyncio.new_event_loop()
        self.requests: list[str] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("the test's reverse proxy did not start")

    def _run(self, ready: threading.Event) -> None:
        from aiohttp import ClientSession, web

        asyncio.set_event_loop(self.loop)

        async def start():
            self.session = ClientSession(auto_decompress=False)
            app = web.Application()
            app.router.add_route("*", PREFIX + "{tail:.*}", self._forward)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        self.loop.run_until_complete(start())
        ready.set()
        self.loop.run_forever()

    def _upstream_path(self, request) -> str:
        path = request.raw_path
        return (path[len(PREFIX):] or "/") if self.strip else path

    async def _forward(self, request):
        from aiohttp import WSMsgType, web

        path = self._upstream_path(request)
        self.requests.append(path)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws_headers = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket")}
            async with self.session.ws_connect(self.upstream.replace("http", "ws", 1) + path, headers=ws_headers,
                                               max_msg_size=0) as upstream:
                client = web.WebSocketResponse(max_msg_size=0)
                await client.prepare(request)

                async def pump(source, sink):
                    async for message in source:
                        if message.type == WSMsgType.TEXT:
                            await sink.send_str(message.data)
                        elif message.type == WSMsgType.BINARY:
                            await sink.send_bytes(message.data)
                        else:
                            break
                    await sink.close()

                await asyncio.gather(pump(client, upstream), pump(upstream, client), return_exceptions=True)
                return client
        async with self.session.request(request.method, self.upstream + path, headers=headers,
                                        data=await request.read(), allow_redirects=False) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=answer.status, body=body, headers=kept)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}/"

    def stop(self) -> None:
        async def stop():
            await self.session.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def a_prefixed_server():
    folder = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz").parent
    server = WebServer("--base-path", f"{PREFIX}/", "--data-root", str(folder), "--device", "cpu")
    yield server
    server.stop()


def test_the_printed_url_carries_the_base_path_and_the_server_answers_there(a_prefixed_server):
    assert a_prefixed_server.url.startswith(f"http://127.0.0.1:{a_prefixed_server.port}{PREFIX}/?token=")
    with urllib.request.urlopen(a_prefixed_server.url, timeout=10) as response:  # -> /sam/index.html
        assert response.status == 200 and response.url.split("?")[0].endswith(f"{PREFIX}/index.html")
        assert b'<div id="app">' in response.read()


@pytest.mark.parametrize(("strip", "volume"), [(False, "pt_201_ct.nii.gz"), (True, "pt_202_ct.nii.gz")],
                         ids=["proxy passes /sam/ on", "proxy strips /sam/"])
def test_the_page_works_through_a_reverse_proxy_under_the_base_path(a_prefixed_server, a_browser, strip, volume):
    proxy = ReverseProxy(f"http://127.0.0.1:{a_prefixed_server.port}", strip=strip)
    page = a_browser.new_page()
    try:
        page.goto(proxy.url + "?token=" + a_prefixed_server.url.split("?token=")[1])
        page.wait_for_selector("#status", timeout=60_000)  # the page is built from the server's state
        assert page.url.startswith(proxy.url)
        websockets = [p for p in proxy.requests if p.endswith("/ws")]
        assert websockets == [f"{'' if strip else PREFIX}/ws"], proxy.requests
        page.locator("#path-text").fill(volume)
        page.locator("#open-path").click()
        page.wait_for_function(f"document.querySelector('#status').innerText.includes('Loaded {volume}')",
                               timeout=30_000)
        page.wait_for_function("document.querySelectorAll('img').length >= 2", timeout=30_000)
        from io import BytesIO

        from PIL import Image

        images = page.locator("img")

        def contrast() -> float:  # the slice views' frames, streamed over the websocket: polled until they come
            return max(float(np.asarray(Image.open(BytesIO(images.nth(i).screenshot())).convert("L"), dtype=float).std())
                       for i in range(images.count()))

        end = time.monotonic() + 30
        while contrast() <= 10 and time.monotonic() < end:
            time.sleep(0.25)
        assert contrast() > 10, "no slice view shows the volume"
    finally:
        page.close()
        proxy.stop()
