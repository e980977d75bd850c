"""Training data: find volumes, preprocess them once into a cache folder, and load them back.

Each volume is read (any format the engine reads, DICOM series folders included), preprocessed with the
model's :class:`~samembed.preprocess.PreprocessConfig`, cropped to the body's bounding box (plus a margin)
and stored as float16 ``.npy`` with a small JSON sidecar. A corrupt or unreadable volume is reported and
skipped, never fatal.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import list_images, read_image, save_npy_atomic, write_text_atomic
from ..preprocess import PreprocessConfig, body_mask, preprocess

log = logging.getLogger(__name__)


def find_volumes(sources: list[str], exclude: list[str] | None = None, base: Path | None = None) -> list[Path]:
    """Expand folders (recursive), list files (one path per line) and image paths; drop ``exclude`` globs.

    Relative paths inside a list file are relative to the list file; other relative paths to ``base``.
    Glob patterns match the file name; patterns holding a "/" match the full path (as found, normalised or resolved;
    a relative pattern is relative to ``base`` too). A pattern that matches no file found is warned about.
    """
    base = base or Path.cwd()
    found: list[Path] = []
    for src in sources:
        p = Path(src)
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            found.extend(list_images(p))
        elif p.suffix.lower() in (".txt", ".lst", ".list"):
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    q = q if q.is_absolute() else p.parent / q
                    if not q.exists():  # (it stopped the run with a bare FileNotFoundError, after preprocessing)
                        raise InputError(f"{q}: training data path not found (line {n} of the list {p})")
                    found.append(q)
        elif p.exists():
            found.append(p)
        else:
            raise InputError(f"{p}: training data path not found")
    exclude = exclude or []
    used = set()
    excluded = exclusion(exclude, base)
    keep = []
    for f in found:
        pattern = excluded(f)
        if pattern is None:
            keep.append(f)
        else:
            used.add(pattern)
    unused = [pat for pat in exclude if pat not in used]
    if unused and found:
        log.warning("exclude: %s matched none of the %d files found (a file name, or a path with folders)",
                    ", ".join(repr(p) for p in unused), len(found))
    # one file named twice (a folder as an absolute and a relative path, a link, a list with ".."): trained on once
    # (twice, it weighed double, was a global negative of itself and a "patient pair" of the semantic objective)
    once: dict[str, Path] = {}
    for f in sorted(dict.fromkeys(keep)):
        once.setdefault(os.path.realpath(f), f)
    if len(once) < len(set(keep)):
        log.warning("%d training files are named more than once (by other paths or links); each is used once",
                    len(set(keep)) - len(once))
    return sorted(once.values())


def data_found(sources: list[str], exclude: list[str] | None, base: Path | None = None) -> str:
    """What each training data entry holds, for an error that found no volume: e.g. ``data/ct: no image files;
    data/mr: 12 files, all excluded ('*_seg_*')``."""
    base = base or Path.cwd()
    excluded = exclusion(exclude or [], base)
    told = []
    for src in sources:
        try:
            files = find_volumes([src], [], base)
        except InputError as e:
            told.append(str(e))
            continue
        if not files:
            told.append(f"{src}: no image files")
            continue
        patterns = sorted({p for p in map(excluded, files) if p is not None})
        told.append(f"{src}: {len(files)} file{'' if len(files) == 1 else 's'}, all excluded ("
                    + ", ".join(repr(p) for p in patterns) + ")")
    return "; ".join(told) if told else "no data entry given"


def exclusion(exclude: list[str], base: Path):
    """A function of a path that gives the first of the ``exclude`` patterns it matches, or None: a plain pattern
    against the file name; one with a folder against the path as given, normalised and resolved, as itself as given
    and, unless it starts with a wildcard, made absolute against ``base`` ("../shared/data/ct/x.nii.gz" excluded
    nothing: the path was /work/main/../shared/..., the pattern relative). The training images' and their label
    maps' exclusions (:mod:`.labels`) are the same."""
    forms_of = {pat: {pat} if "/" not in pat else {pat, os.path.normpath(pat)} | (
        set() if pat.startswith("*") else {os.path.normpath(os.path.join(base, pat)), str((base / pat).resolve())})
        for pat in exclude}

    def excluded(f: Path) -> str | None:
        paths = None
        for pat, forms in forms_of.items():
            if "/" in pat and paths is None:
                paths = {str(f), os.path.normpath(str(f)), str(f.resolve())}
            if any(fnmatch.fnmatch(name, q) for name in (paths if "/" in pat else (f.name,)) for q in forms):
                return pat
        return None

    return excluded


@dataclass
class CachedVolume:
    """One preprocessed training volume: ``array`` (float16 ``[k, j, i]``, mapped intensities) and facts;
    ``fill_value``: the mapped value inference pads it with (the preprocessing's fill), None in a cache entry written
    before it was stored."""

    name: str
    array: np.ndarray
    spacing_mm: float
    modality: str
    body_fraction: float
    fill_value: float | None = None


def content_stamps(path: Path) -> list:
    """(name, size, mtime) of what holds ``path``'s voxels: the file; every file of a DICOM series folder; a
    detached header's data file too (``.mhd``'s ElementDataFile, ``.nhdr``'s data file). A changed series or
    ``.raw`` kept its old cached copy when only the header or the folder's path was looked at."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if path.is_file() and path.suffix.lower() in (".mhd", ".nhdr"):
        try:
            header = path.read_text(encoding="latin-1", errors="replace")
        except OSError:
            header = ""
        for line in header.splitlines():
            key, sep, value = line.partition("=" if path.suffix.lower() == ".mhd" else ":")
            if sep and key.strip().lower() in ("elementdatafile", "data file", "datafile"):
                data = path.parent / value.strip()
                if data.is_file():
                    files.append(data)
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _cache_key(path: Path, config: PreprocessConfig, modality: str, pixel_spacing_mm: float | None = None) -> str:
    facts = [str(path.resolve()), content_stamps(path), config.to_dict(), modality]
    if pixel_spacing_mm is not None:
        facts.append(float(pixel_spacing_mm))
    h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    return h.hexdigest()[:16]


def body_crop(mask: np.ndarray, margin_vox: int = 8) -> tuple[slice, ...]:
    """The slices that cut a preprocessed volume to its body's bounding box plus ``margin_vox`` voxels (what
    the training cache stores; label maps are cut with the same slices, see :mod:`.labels`)."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin_vox, 0)
    hi = np.minimum(idx.max(0) + margin_vox + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def prepare_cache(paths: list[Path], cache_dir: Path, config: PreprocessConfig, modality: str = "auto",
                  margin_vox: int = 8, progress=None, pixel_spacing_mm: float | None = None) -> list[Path]:
    """Preprocess ``paths`` into ``cache_dir`` (skipping those already there); return the ``.npy`` files.

    ``pixel_spacing_mm`` is the spacing assumed for 2D files that carry none (PNG/JPEG radiographs).

    Unreadable or corrupt volumes are logged and skipped.
    """
    return [npy for _, npy in prepare_cache_of(paths, cache_dir, config, modality, margin_vox, progress,
                                               pixel_spacing_mm)]


def prepare_cache_of(paths: list[Path], cache_dir: Path, config: PreprocessConfig, modality: str = "auto",
                     margin_vox: int = 8, progress=None,
                     pixel_spacing_mm: float | None = None) -> list[tuple[Path, Path]]:
    """:func:`prepare_cache`, each ``.npy`` with the path it was made from (the skipped ones left out: what a run
    trained on, for its checkpoint)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: list[tuple[Path, Path]] = []
    for n, path in enumerate(paths):
        if progress:
            progress(n, len(paths), path.name)
        try:
            key = _cache_key(path, config, modality, pixel_spacing_mm)
        except OSError as e:  # (gone or unreadable since it was found)
            log.warning("skipping %s: %s", path, e.strerror or e)
            continue
        stem = path.name.split(".")[0]
        npy = cache_dir / f"{stem}-{key}.npy"
        if npy.is_file() and npy.with_suffix(".json").is_file():
            try:  # its header and sidecar read, and its size what the header says: else made again, never trusted
                cached = load_cached(npy)
                if list(cached.array.shape) != json.loads(npy.with_suffix(".json").read_text("utf-8"))["shape"]:
                    raise ValueError("its shape is not its sidecar's")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("damaged training cache entry %s (%s): made again", npy, e)
            else:
                out.append((path, npy))
                continue
        try:
            image = read_image(path, spacing_mm=pixel_spacing_mm)
            prep = preprocess(image, config, modality)
        except InputError as e:
            log.warning("skipping %s: %s", path, e)
            continue
        except Exception as e:  # noqa: BLE001 - a bad volume must never stop training
            log.warning("skipping %s: unexpected error %s", path, e)
            continue
        mask = body_mask(prep)
        sl = body_crop(mask, margin_vox)
        arr = prep.array[sl].astype(np.float16)
        save_npy_atomic(npy, arr)  # then its sidecar: both present means both whole
        meta = {"source": str(path), "spacing_mm": config.spacing_mm, "modality": prep.modality,
                "shape": list(arr.shape), "body_fraction": float(mask[sl].mean()),
                "crop_start": [s.start for s in sl], "fill_value": float(prep.fill_value)}
        write_text_atomic(npy.with_suffix(".json"), json.dumps(meta))
        out.append((path, npy))
    return out


def load_cached(npy: Path) -> CachedVolume:
    """Load one cached volume (memory-mapped)."""
    meta = json.loads(npy.with_suffix(".json").read_text(encoding="utf-8"))
    arr = np.load(npy, mmap_mode="r")
    fill = meta.get("fill_value")
    return CachedVolume(npy.stem, arr, float(meta["spacing_mm"]), meta["modality"], float(meta["body_fraction"]),
                        None if fill is None else float(fill))
