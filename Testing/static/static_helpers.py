"""Paths and small parsers shared by the static checks (no Slicer, no torch needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SAMEmbedding"
MODULE_FILE = MODULE_DIR / "SAMEmbedding.py"
UI_FILE = REPO / "Resources" / "UI" / "SAMEmbedding.ui"
if str(MODULE_DIR) not in sys.path:  # SAMEmbeddingLib.parameters (torch-free) names the parameter node's fields
    sys.path.insert(0, str(MODULE_DIR))


def _cmake_tokens(text: str):
    """Tokens of CMake code: ``(``, ``)``, quoted strings (quotes removed) and bare words; comments dropped."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "()":
            yield c, False
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            yield text[i + 1:j], True
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in '()"#':
                j += 1
            yield text[i:j], False
            i = j


def cmake_sets(path: Path) -> dict[str, list[str]]:
    """``set(NAME value ...)`` commands of a CMake file: name -> list of values (quotes removed)."""
    tokens = list(_cmake_tokens(path.read_text(encoding="utf-8")))
    out = {}
    for k in range(len(tokens) - 2):
        if tokens[k] == ("set", False) and tokens[k + 1] == ("(", False):
            name, values, m = tokens[k + 2][0], [], k + 3
            while tokens[m] != (")", False):
                values.append(tokens[m][0])
                m += 1
            out[name] = values
    return out


def project_files(*roots: str) -> set[str]:
    """Files under ``roots`` (repo-relative, POSIX) that belong to the project.

    In a git checkout: the tracked files, i.e. what a fresh clone (CI, a release build) holds; a new file counts
    once it is added. Elsewhere (an unpacked source archive): every file under the folders, skipping caches.
    """
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--", *roots],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
        return {p for p in listed if p and (REPO / p).is_file()}
    except (OSError, subprocess.CalledProcessError):
        found = set()
        for root in roots:
            for path in (REPO / root).rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    found.add(path.relative_to(REPO).as_posix())
        return found
