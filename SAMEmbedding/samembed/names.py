"""File-name-safe ids of scans and labels, unique within one run: what names each output file of a run.

``samembed match`` names each target's ``.mrk.json`` and heatmaps after :func:`target_ids` (and each heatmap after its
point's :func:`label_ids`), and ``samembed
propagate`` each scan's files after :func:`scan_id` (see :mod:`samembed.propagate.manifest`). Torch-free.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

#: image suffixes stripped from a file name to make its id, longest first (``.nii.gz`` before ``.gz``-less ``.nii``)
IMAGE_NAME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
                       ".dcm")


def safe_id(text: str) -> str:
    """``text`` with every character other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip()).strip(".")
    return out or "scan"


def scan_id(path: str | os.PathLike) -> str:
    """A file-name-safe id from a path: its name without the image suffix (``pt_1_ct.nii.gz`` -> ``pt_1_ct``)."""
    name = Path(path).name
    low = name.lower()
    for s in IMAGE_NAME_SUFFIXES:
        if low.endswith(s):
            name = name[: -len(s)]
            break
    return safe_id(name)


def deduplicated(names: Sequence[str]) -> list[str]:
    """``names`` in order, each repeat given ``_2``, ``_3``, ... (skipping any name already taken), so that no two
    are equal, nor equal but for case (``CT``, ``ct``: one file on the case-insensitive disks of macOS and Windows):
    file names that will not overwrite one another."""
    taken: set[str] = set()
    out = []
    for base in names:
        name, k = base, 1
        while name.casefold() in taken:
            k += 1
            name = f"{base}_{k}"
        out.append(name)
        taken.add(name.casefold())
    return out


#: a label's part of a file name is cut to this many UTF-8 bytes: with the target's id and ``_heatmap.nii.gz`` it
#: must fit a file name (255 bytes on common file systems)
LABEL_ID_BYTES = 80


def label_ids(labels: Sequence[str]) -> dict[str, str]:
    """Each label's part of a file name (heatmaps): every character but letters, digits, ``-`` and ``_`` as ``_``,
    cut to :data:`LABEL_ID_BYTES`, unique among ``labels`` (labels that differ only there, ``A B`` and ``A_B``, or
    only after the cut, get ``_2``, ``_3``, ... in their order).

    >>> label_ids(["A B", "A_B", "x" * 200])["x" * 200] == "x" * 80
    True
    """
    distinct = list(dict.fromkeys(labels))
    names = ["".join(c if c.isalnum() or c in "-_" else "_" for c in label) or "point" for label in distinct]
    names = [name.encode()[:LABEL_ID_BYTES].decode(errors="ignore") for name in names]
    return dict(zip(distinct, deduplicated(names)))


def target_ids(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One file-name-safe id per path, unique within ``paths``, to name each target's output files.

    Each id is :func:`scan_id` of the path's file name. Where two paths share that (``a/ct.nii.gz`` and
    ``b/ct.nii.gz``, a common layout), every id is instead the path relative to the folder the paths share, its
    parts joined by ``__`` (``a__ct``, ``b__ct``). The same file given twice keeps its id once and gets ``_2``,
    ``_3``, ... after that, so no output overwrites another.
    """
    ids = [scan_id(p) for p in paths]
    if len(set(ids)) != len(ids):
        full = [Path(os.path.abspath(p)) for p in paths]
        ids = relative_ids(full, Path(os.path.commonpath([str(p.parent) for p in full])))
    return deduplicated(ids)


def short_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each path as briefly as it is told apart from the others: its file name, or, where two paths share one
    (``a/ct.nii.gz``, ``b/ct.nii.gz``), every path below the folder they all share (``a/ct.nii.gz``). A path given
    twice has one name."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len({os.path.abspath(p) for p in paths}):
        return names
    full = [Path(os.path.abspath(p)) for p in paths]
    try:
        root = Path(os.path.commonpath([str(p.parent) for p in full]))
    except ValueError:  # no folder in common (Windows: two drives)
        return [str(p) for p in full]
    return [str(p.relative_to(root)) for p in full]


def atlas_names(images: Sequence[str | os.PathLike], point_files: Sequence[str | os.PathLike]) -> list[str]:
    """Each atlas's name in the outputs (which atlases a fused match rejected): its image's :func:`short_paths` name,
    and where one image is an atlas more than once (two raters' landmarks), its point file's too
    (``atlas.nii.gz (rater2.csv)``)."""
    names = short_paths(images)
    if len(point_files) != len(images):
        return names
    out = list(names)
    for name in {n for n in names if names.count(n) > 1}:
        files = sorted({os.fspath(f) for f, n in zip(point_files, names) if n == name})  # told apart among these
        short = dict(zip(files, short_paths(files)))
        out = [f"{n} ({short[os.fspath(f)]})" if n == name else o for n, f, o in zip(names, point_files, out)]
    return out


def repeated_labels(labels: Sequence[str]) -> list[str]:
    """The labels that ``labels`` holds more than once, each once, in the order they first appear."""
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [label for label, n in seen.items() if n > 1]


def joined_names(names: Sequence[str]) -> str:
    """``names`` joined by ``|`` (a CSV cell, a ``key=value`` pair of a markups description); a ``%``, ``|`` or
    ``;`` in a name is written ``%25``, ``%7C``, ``%3B`` (as in a URL), so that the cell splits back into names and
    a description into its pairs."""
    return "|".join(n.replace("%", "%25").replace("|", "%7C").replace(";", "%3B") for n in names)


def relative_ids(paths: Sequence[Path], root: Path) -> list[str]:
    """Each path's id from its path below ``root``, the parts joined by ``__`` (``root/a/ct.nii.gz`` -> ``a__ct``):
    for files that share a name in different folders."""
    return [scan_id(safe_id(str(p.relative_to(root)).replace(os.sep, "__"))) for p in paths]
