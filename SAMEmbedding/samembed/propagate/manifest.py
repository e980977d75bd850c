"""The scans of a run: a manifest CSV or a folder, read into :class:`Scan` items with unique ids.

A manifest is a CSV with a ``path`` column (relative paths are relative to the CSV's folder) and an optional
``id`` column; without a header, the first column is the path. A folder is searched recursively for images
(``samembed.io.list_images``: NIfTI, NRRD, MHA, DICOM series folders, ...).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..names import IMAGE_NAME_SUFFIXES, relative_ids, safe_id, scan_id

__all__ = ["Scan", "read_scans", "safe_id", "scan_id"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scan:
    """One scan to carry the landmarks to: ``id`` names its output files, ``path`` is where it is read from."""

    id: str
    path: str


def read_scans(source: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = ()) -> list[Scan]:
    """The scans named by a manifest CSV or found in a folder, in order, each with a unique id.

    ``exclude``: folders whose images a folder search skips (the run's own output folder, when it lies inside the
    scans folder: its thumbnails are PNG images). The output folders of earlier runs found there (a ``run.json``
    beside ``scans/`` or ``thumbs/``) are skipped too, and said.

    Raises:
        InputError: the manifest or folder is missing or empty, a row has no path, or two scans have the same
            id (give an ``id`` column).
    """
    source = Path(source)
    if source.is_dir():
        from ..io import list_images

        skip = [Path(os.path.realpath(e)) for e in exclude]
        found = list_images(source)
        paths = [p for p in found if not any(Path(os.path.realpath(p)).is_relative_to(e) for e in skip)]
        if found and not paths:  # (said as "no images found in this folder", which holds them: a review)
            raise InputError(f"{source}: every image of this folder lies inside the output folder "
                             f"({', '.join(map(str, exclude))}), whose files are the run's own; move the scans out of "
                             "it, or choose another --out")
        runs = _run_folders(paths, source)
        if runs:
            left = {p for p in paths if any(r in p.parents for r in runs)}
            paths = [p for p in paths if p not in left]
            log.warning("%s: %d image(s) in the output folder(s) of earlier runs (%s) are not scans: left out",
                        source, len(left), ", ".join(str(r) for r in sorted(runs)[:3]) + (", ..." if len(runs) > 3 else ""))
        if not paths:
            raise InputError(f"{source}: no images found in this folder (NIfTI, NRRD, MHA, DICOM, ...); check --scans")
        ids = [scan_id(p) for p in paths]
        if len(set(ids)) != len(ids):  # same file name in several sub-folders: use the relative path
            ids = relative_ids(paths, source)
        return _unique([Scan(i, listed_path(p)) for i, p in zip(ids, paths)], source)
    if not source.is_file():
        raise InputError(f"{source}: scan manifest or folder not found; pass a CSV with a 'path' column or a folder")
    return _read_manifest(source)


def _run_folders(paths: list[Path], top: Path) -> set[Path]:
    """The folders between ``top`` and these images that are a propagate run's output folder (a ``run.json`` beside
    ``scans/`` or ``thumbs/``): their thumbnails (PNG) and other images are that run's outputs, not scans."""
    seen: dict[Path, bool] = {}
    found = set()
    for p in paths:
        for folder in p.parents:
            if folder == top or top not in folder.parents:
                break
            if folder not in seen:
                seen[folder] = (folder / "run.json").is_file() and ((folder / "scans").is_dir()
                                                                    or (folder / "thumbs").is_dir())
            if seen[folder]:
                found.add(folder)
    return found


def _read_manifest(path: Path) -> list[Scan]:
    if path.name.lower().endswith(IMAGE_NAME_SUFFIXES):
        raise InputError(f"{path}: an image, where --scans takes a manifest CSV (a 'path' column) or a folder of "
                         "images; put the image in a folder, or list it in a CSV")
    try:
        text = path.read_text(encoding="utf-8-sig")  # (Excel's "CSV UTF-8" starts with a BOM)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: the scan manifest is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                         "UTF-8 (CSV)") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read the scan manifest: {e}") from e
    lines = text.splitlines()
    delimiter = _delimiter(lines)
    rows, comments = [], []
    for r in csv.reader(lines, delimiter=delimiter):
        if not any(c.strip() for c in r):
            continue
        (comments if r[0].lstrip().startswith("#") else rows).append(r)
    if comments:  # (a first column of ids may start with "#" too: said, not dropped without a word)
        log.warning("%s: %d row(s) starting with '#' are comments, left out (the first: %s)", path, len(comments),
                    delimiter.join(comments[0]))
    if not rows:
        raise InputError(f"{path}: the scan manifest lists no scans")
    header = [h.strip().lower() for h in rows[0]]
    if "path" in header:
        ip, iid = header.index("path"), (header.index("id") if "id" in header else None)
        body = rows[1:]
    else:
        ip, iid, body = 0, None, rows
        def exists(cell: str) -> bool:
            where = Path(cell.strip()).expanduser()
            return (where if where.is_absolute() else path.parent / where).exists()

        first = rows[0][0].strip()
        # a first row that names no file where a later row does, and reads as a column name (not a path): a header
        if (not exists(first) and "/" not in first and "\\" not in first and "." not in first
                and any(r and exists(r[0]) for r in rows[1:])):
            # a header of other names ("file,id"): it was taken as a scan, which then failed as "file not found"
            raise InputError(f"{path}: no 'path' column: the first row ({', '.join(c.strip() for c in rows[0])}) "
                             "looks like a header; name the column of image paths 'path' (and ids 'id'), or list "
                             "one path per row without a header")
    scans = []
    for n, r in enumerate(body, start=2 if "path" in header else 1):
        if len(r) <= ip or not r[ip].strip():
            raise InputError(f"{path}: row {n} has no path")
        p = Path(r[ip].strip()).expanduser()
        p = p if p.is_absolute() else path.parent / p
        given = r[iid].strip() if iid is not None and len(r) > iid else ""
        scans.append(Scan(safe_id(given) if given else scan_id(p), listed_path(p)))
    if not scans:
        raise InputError(f"{path}: the scan manifest lists no scans")
    return _unique(scans, path)


def _delimiter(lines: list[str]) -> str:
    """The manifest's delimiter: ``;`` or a tab where its first row names a ``path`` column that way (spreadsheets
    write ``;`` where the comma is the decimal separator, as ``samembed match --atlases`` reads them), else ``,``."""
    from ..io import row_delimiter

    first = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
    return row_delimiter(first, lambda fields, _: "path" in {c.strip().lower() for c in fields}) or ","


def listed_path(path: str | os.PathLike) -> str:
    """A scan's path as the outputs name it: absolute, its folder resolved (``..`` after a folder that is a link goes
    where the system goes, not where the text would), the file itself not, so that a scan listed through a symbolic
    link (a folder of links into an archive) keeps the name it was listed by."""
    path = os.path.expanduser(os.fspath(path))
    if len(path) > 1:
        path = path.rstrip("/" + os.sep)  # (a DICOM folder given as "series/")
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(folder or "."), name)


def same_scan_path(recorded: str | None, path: str) -> bool:
    """Whether a record's path names the scan at ``path``: the same text, or the same file once links are followed
    (the records of versions before 2026-12-06 hold the path with every link followed)."""
    if recorded is None:
        return False
    return recorded == path or os.path.realpath(recorded) == os.path.realpath(path)


def _unique(scans: list[Scan], where: Path) -> list[Scan]:
    seen: dict[str, str] = {}
    for s in scans:
        if s.id in seen:
            if seen[s.id] == s.path:
                raise InputError(f"{where}: {s.path} is listed twice; list each scan once")
            raise InputError(f"{where}: scans {seen[s.id]} and {s.path} would share the id '{s.id}'; "
                             "give the manifest an 'id' column with unique names")
        seen[s.id] = s.path
    return scans


def file_stamp(path: str) -> dict | None:
    """A scan file's size (bytes) and modification time (ns), by which ``--resume`` sees a file written again since
    it was matched (:meth:`~samembed.propagate.results.ResultStore.plan`); None when it cannot be read (a folder,
    a DICOM series: its files' own stamps are not followed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns} if os.path.isfile(path) else None
