"""Shared pytest fixtures: where the real data lives, and small helpers.

Real-data tests read ``../shared/data`` (relative to the repository root) in place, or the folder named by
``SAMEMBED_DATA``; they are skipped with a clear message when it is absent.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMEMBED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("OMP_NUM_THREADS", "2")
# the tests measure the models this checkout ships (Resources/Models): a user's own catalogue (a documented setting)
# made the accuracy tests skip as "not registered", or fail against numbers measured on another model (a review)
os.environ.pop("SAMEMBED_MODELS_DIR", None)


def data_file(*parts: str) -> Path:
    """Path of a file under the shared data folder; skips the test when it is missing."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing (set SAMEMBED_DATA or place ../shared/data beside the repo)")
    return path


#: the shipped 2D model for radiographs
HAND_MODEL = REPO / "Resources" / "Models" / "sam-lite-2d-hand.pt"


def hand_model() -> Path:
    """:data:`HAND_MODEL`; skips the test when it is missing."""
    if not HAND_MODEL.is_file():
        pytest.skip(f"{HAND_MODEL} is missing (train it: see Resources/Models/sam-lite-2d-hand.yaml)")
    return HAND_MODEL


def hand_radiographs(n: int = 2) -> list[Path]:
    """The first ``n`` hand radiographs (.jpg, by name) of the shared data; skips the test when there are fewer."""
    folder = data_file("xray", "hand_dha37")
    images = sorted(folder.rglob("*.jpg"))[:n]
    if len(images) < n:
        pytest.skip(f"fewer than {n} hand radiographs (.jpg) under {folder}")
    return images


def two_level_default():
    """The default model's network without its local 16 mm level (``widths`` [32, 64], tile halo 16): the default's
    other layers' weights, its 16 mm level and that level's lateral convolution dropped (where a two-level model's
    training starts), in eval mode."""
    from samembed.models import load_model
    from samembed.networks import build_network

    default = load_model("default").net
    net = build_network("sam-lite", {**default.spec.config, "widths": default.spec.config["widths"][:2]})
    state = default.state_dict()
    net.load_state_dict({k: state[k] for k in net.state_dict()})
    return net.eval()


def tile_with_context(x, start, stop, halo: int):
    """The tile of a network input ``x`` (N, C, *spatial) that :meth:`forward_local_core` takes for the core of input
    voxels ``start .. stop`` (per spatial axis): the core with ``halo`` voxels of context per side, clipped at the
    volume's edges. Returns ``(tile, context_lo, context_hi)``, the context each side holds."""
    lo = [max(0, s - halo) for s in start]
    hi = [min(n, e + halo) for e, n in zip(stop, x.shape[2:])]
    tile = x[(slice(None), slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]
    return tile, tuple(s - a for s, a in zip(start, lo)), tuple(b - e for e, b in zip(stop, hi))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (skips when absent)."""
    if not DATA.is_dir():
        pytest.skip(f"real data not available: {DATA} is missing (set SAMEMBED_DATA or place ../shared/data beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


def with_torch_threads(n: int, call):
    """``call()`` with torch on ``n`` threads (the engine's jobs then match two targets at once), then as before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return call()
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """Every test leaves torch's thread count as it found it (a training run sets its own ``threads`` for the whole
    process: every later test of a worker ran on one thread)."""
    torch = sys.modules.get("torch")
    kept = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and kept is not None and torch.get_num_threads() != kept:
        torch.set_num_threads(kept)


@pytest.fixture(autouse=True)
def _locale_kept():
    """Every test leaves the process's locale as it found it. ITK's DICOM writer (GDCM) sets it to "C" and leaves
    it so, which makes Python's default text encoding ASCII for every later test of the process (a CLI test that
    decodes a progress bar's UTF-8 failed after the DICOM tests, depending on the order)."""
    import locale

    kept = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, kept)


@contextlib.contextmanager
def ctrl_c_as_in_a_terminal():
    """SIGINT raising ``KeyboardInterrupt`` while the block runs, as in a terminal: a test run started as a background
    job of a non-interactive shell has SIGINT ignored, and samembed leaves an ignored signal ignored."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
