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
