"""Fixtures for the browser tier: the ``samembed web`` server in a child process and headless Chromium.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``scripts/setup_env.sh`` when running as root), driven
by Playwright with ``executable_path`` (no ``playwright install``). Each fixture skips with a message when what it
needs is missing: Chromium, Playwright, or the ``web`` extra (trame-slicer).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SAMEMBED_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
URL_LINE = re.compile(r"SAMEmbedding web: (\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _needs_web_extra() -> None:
    try:
        import trame_slicer  # noqa: F401
    except ImportError:
        pytest.skip("the web extra is not installed (trame-slicer); run scripts/setup_env.sh or pip install -e '.[web]'")


class WebServer:
    """``samembed web`` in a child process; ``url`` is the URL it printed."""

    def __init__(self, *args: str, timeout: float = 90.0) -> None:
        _needs_web_extra()
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join([str(REPO / "SAMEmbedding"), os.environ.get("PYTHONPATH", "")]))
        self.log = tempfile.NamedTemporaryFile("w+", prefix="samembed-web-", suffix=".log", delete=False)  # noqa: SIM115 - the server writes it while it runs
        self.process = subprocess.Popen([sys.executable, "-m", "samembed.cli", "web", *args, "--port", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        end = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < end and self.url is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"samembed web exited with {self.process.returncode}:\n{self.output()}")
            match = URL_LINE.search(self.output())
            self.url = match.group(1) if match else None
            time.sleep(0.3)
        if self.url is None:
            self.stop()
            raise RuntimeError(f"samembed web printed no URL within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        Path(self.log.name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def a_browser():
    """Headless Debian Chromium with a fresh profile (Playwright persistent context)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (as root: apt-get install -y chromium chromium-driver; "
                    "scripts/setup_env.sh does this)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (it comes with the web extra)")
    profile = tempfile.mkdtemp(prefix="samembed-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, accept_downloads=True,
            viewport={"width": 1400, "height": 900})
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)
