"""Where the model catalogue lives and what it says (``Resources/Models/models.json``); imports no torch."""

from __future__ import annotations

import json
import os
from pathlib import Path


def models_dir() -> Path:
    """Folder holding ``models.json``: ``$SAMEMBED_MODELS_DIR`` or the extension's ``Resources/Models``."""
    env = os.environ.get("SAMEMBED_MODELS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent / "Resources" / "Models", here.parent / "Resources" / "Models"):
        if (cand / "models.json").is_file():
            return cand
    return here.parent.parent / "Resources" / "Models"


def registry() -> dict:
    """The parsed ``models.json`` (``{"models": [...]}``); empty when absent."""
    path = models_dir() / "models.json"
    if not path.is_file():
        return {"models": []}
    return json.loads(path.read_text(encoding="utf-8"))


def find_entry(name: str) -> dict | None:
    """The ``models.json`` entry called ``name`` (its name or an alias), or None."""
    for m in registry().get("models", []):
        if m.get("name") == name or name in m.get("aliases", []):
            return m
    return None


def registered_preprocess(name: str) -> dict | None:
    """The preprocessing settings a registered model declares in ``models.json`` (``preprocess``), known without
    loading its weights (the engine checks them against the weights' own); None when not declared."""
    entry = find_entry(str(name))
    return None if entry is None else entry.get("preprocess")


def _registered_zyx(name: str, key_xyz: str) -> tuple[int, ...] | None:
    """A per-axis entry ``key_xyz`` of a registered model (x, y, z in ``models.json``) as (z, y, x), or None."""
    entry = find_entry(str(name))
    value = None if entry is None else entry.get(key_xyz)
    return None if value is None else tuple(int(m) for m in reversed(value))


def registered_pad_multiple_zyx(name: str) -> tuple[int, ...] | None:
    """The input size multiple (z, y, x) a registered model's network pads to, as ``models.json`` declares it
    (``pad_multiple_xyz``, the network spec's ``pad_multiple``), known without importing torch; None when not
    declared. A prefetched input made with another multiple is not used (:meth:`samembed.prefetch.Prefetch.take`)."""
    return _registered_zyx(name, "pad_multiple_xyz")


def registered_local_stride_zyx(name: str) -> tuple[int, ...] | None:
    """The local map's stride (z, y, x) in input voxels of a registered model, as ``models.json`` declares it
    (``local_stride_xyz``, the network spec's ``local_stride``), known without importing torch; None when not
    declared. The body mask lives on that grid (the prefetch process makes it there, :mod:`samembed.prefetch`)."""
    return _registered_zyx(name, "local_stride_xyz")
