"""Organ label maps of training volumes, for the ``semantic`` objective: find them, cache them on the
training cache's grid, and describe each organ.

A *rule* (config ``semantic_labels``, one dict per dataset) says which training images have a label map and
what its values are called::

    {"images": "(pt_[0-9]+)_ct[.]nii[.]gz",                     # regex, full match on the image file name
     "labels": "../shared/data/ct/openkbp/oar/\\1_oar.nii.gz",   # label-map path; \\1 .. are the regex groups
     "names": {1: "Brainstem", 2: "SpinalCord", ...},            # label value -> organ name
     "partial": ["SpinalCord", "Esophagus"]}                      # contoured over a varying length

An organ's bounding box is its frame for point-level correspondence between patients; organs whose box is no
anatomical frame, i.e. cut by the scan's field of view (found from the data) or contoured clinically over a length
that varies between patients (``partial``: the spinal cord and oesophagus of OpenKBP end wherever the planner
stopped), give negatives only. Organs are matched across volumes by name, compared without case or punctuation (``LeftParotid`` and
``left_parotid`` are one organ), so two datasets with different label values can share organs.

Only images that are in the training set get a label map: an image that matches the config's ``exclude``
globs is refused (the evaluation patients' masks never reach training), and so is a label map whose own
file name matches them.

A label map is resampled with nearest neighbour onto exactly the grid of its image's cached training volume
(same reorientation, 2 mm corner-aligned resampling and body crop, see :mod:`.data`) and stored beside it
as ``<cached stem>.labels-<key>.npy`` (uint8, or int16 above 255 labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

#: an organ whose label comes this close (voxels) to an edge of its cached volume is cut by the scan's field
#: of view: its bounding box is no anatomical frame, so it gives negatives but no point-level positives
EDGE_VOX = 2

#: voxel positions kept per organ to centre views on it
CENTRE_POINTS = 256


def organ_key(name: str) -> str:
    """The name organs are matched by across volumes: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@dataclass(frozen=True)
class LabelRule:
    """Where the label maps of a set of training images are and what their values mean (see the module doc).

    Attributes:
        images: regular expression, matched in full against a training image's file name.
        labels: label-map path template; ``\\1`` .. are the regex groups; relative to the run's base folder.
        names: label value -> organ name; values not listed are background.
        partial: names of organs contoured over a length that varies between patients (negatives only).
    """

    images: str
    labels: str
    names: dict
    partial: tuple = ()

    @staticmethod
    def from_dict(d: dict) -> LabelRule:
        """From a config entry; ``names`` may be a mapping or the path of a JSON file holding one."""
        missing = [k for k in ("images", "labels", "names") if k not in d]
        if missing:
            raise InputError(f"semantic_labels entry {d!r}: needs 'images' (regex), 'labels' (path template) and "
                             f"'names' (value: name); {', '.join(repr(k) for k in missing)} missing")
        try:  # (a bad one ended in "internal error: error: unterminated character set", after the preprocessing)
            re.compile(str(d["images"]))
        except re.error as e:
            raise InputError(f"semantic_labels entry {d!r}: 'images' is not a regular expression: {e}") from None
        try:
            names = d["names"]
            if isinstance(names, str):
                names = json.loads(Path(names).read_text(encoding="utf-8"))
            return LabelRule(str(d["images"]), str(d["labels"]), {int(k): str(v) for k, v in dict(names).items()},
                             tuple(str(n) for n in d.get("partial", ())))
        except (KeyError, TypeError, ValueError, OSError, AttributeError) as e:
            raise InputError(f"semantic_labels entry {d!r}: needs 'images' (regex), 'labels' (path template) and "
                             f"'names' (value: name): {e}") from e


def find_label_maps(images: list[Path], rules: list[dict], exclude: list[str],
                    base: Path | None = None) -> dict[Path, tuple[Path, LabelRule]]:
    """Label map and rule of each training image that has one: ``{image: (label_map, rule)}``.

    Raises:
        InputError: an image matches ``exclude`` (it must not be trained on, let alone with its labels).
    """
    from .data import exclusion

    base = base or Path.cwd()
    excluded = exclusion(exclude, base)  # (the images' own matching: a path as given, normalised or resolved)
    parsed = [LabelRule.from_dict(r) for r in rules]
    found: dict[Path, tuple[Path, LabelRule]] = {}
    missing: list[Path] = []  # label maps a rule names for an image, which are not there
    for image in images:
        if excluded(image) is not None:
            raise InputError(f"{image}: excluded from training (config 'exclude'); its label map may not be used")
        for rule in parsed:
            m = re.fullmatch(rule.images, image.name)
            if not m:
                continue
            lab = Path(m.expand(rule.labels))
            lab = lab if lab.is_absolute() else base / lab
            if excluded(lab) is not None:
                log.warning("label map %s matches 'exclude': not used", lab)
            elif lab.is_file():
                found[image] = (lab, rule)
            else:
                missing.append(lab)
            break
    if missing:  # (said, not skipped without a word: a wrong template or base folder drops every label map)
        log.warning("%d of the label maps semantic_labels names do not exist, and their images take no semantic term; "
                    "the first: %s (relative paths are from %s)", len(missing), missing[0], base)
    return found


def _label_cache_path(ct_npy: Path, label_path: Path) -> Path:
    """The cache file of ``label_path`` on ``ct_npy``'s grid, keyed by what holds its voxels (a ``.mhd``'s
    ``.raw`` too: a changed ``.raw`` kept its old cached map)."""
    from .data import content_stamps

    facts = [str(label_path.resolve()), content_stamps(label_path), ct_npy.name, "nearest", 1]
    key = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:12]
    return ct_npy.with_name(f"{ct_npy.stem}.labels-{key}.npy")


def cache_labels(ct_npy: Path, label_path: Path, config, modality: str = "auto",
                 pixel_spacing_mm: float | None = None) -> Path | None:
    """Resample ``label_path`` onto the grid of the cached training volume ``ct_npy`` (nearest neighbour) and
    store it beside it; return the ``.npy`` path (None, logged, when the map cannot be aligned).

    The cached volume's grid is rebuilt by preprocessing its source image again with ``config`` (a
    :class:`~samembed.preprocess.PreprocessConfig`), and its body crop is read from the cache sidecar
    (``crop_start``) or, for caches written before it was stored, found again the same way.
    """
    out = _label_cache_path(ct_npy, label_path)
    meta = json.loads(ct_npy.with_suffix(".json").read_text(encoding="utf-8"))
    shape = tuple(int(s) for s in meta["shape"])
    if out.is_file():
        try:  # a map cut short (written before these were atomic, or damaged since) is made again
            if np.load(out, mmap_mode="r").shape == shape:
                return out
        except (ValueError, OSError):
            pass
        log.warning("label cache %s is damaged: made again", out)
    import SimpleITK as sitk

    from ..io import RASTER_SUFFIXES, read_image, save_npy_atomic, set_sitk_geometry
    from ..preprocess import body_mask, preprocess
    from .data import body_crop
    try:
        source = read_image(meta["source"], spacing_mm=pixel_spacing_mm)
        prep = preprocess(source, config, modality)
        start = meta.get("crop_start") or [s.start for s in body_crop(body_mask(prep))]
        ref = set_sitk_geometry(sitk.Image([int(s) for s in prep.grid.size_ijk], sitk.sitkUInt8), prep.grid)
        lab = sitk.ReadImage(str(label_path))
        if label_path.name.lower().endswith(RASTER_SUFFIXES) and source.ndim == 2:
            # a picture has no spacing of its own (ITK: 1 mm): a map of its image's size lies on its image's
            # pixels (at pixel_spacing_mm it missed the organs by a factor of the spacing), any other is not used
            if tuple(lab.GetSize()) != tuple(source.grid.size_ijk):
                raise InputError(f"a picture of {list(lab.GetSize())} pixels, its image of "
                                 f"{list(source.grid.size_ijk)}: a label picture must have its image's pixels")
            lab = set_sitk_geometry(lab, source.grid)
        res = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
        arr = sitk.GetArrayFromImage(res)
    except Exception as e:  # noqa: BLE001 - a bad label map must never stop training
        log.warning("label map %s not used: %s", label_path, e)
        return None
    arr = arr[tuple(slice(a, a + n) for a, n in zip(start, shape))]
    if arr.shape != shape:
        log.warning("label map %s not used: cropped to %s, its volume is %s", label_path, arr.shape, shape)
        return None
    save_npy_atomic(out, arr.astype(np.uint8 if arr.max() < 256 else np.int16))
    return out


@dataclass(frozen=True, eq=False)
class Organ:
    """One organ of a labelled volume, in that cached volume's mm frame (``index * spacing``, zyx).

    Attributes:
        key: :func:`organ_key` of its name.
        lo_mm: (d,) low corner of its bounding box (voxel centres), mm.
        extent_mm: (d,) size of the box (high corner - low corner + one voxel), mm.
        truncated: its box is no anatomical frame: it reaches within :data:`EDGE_VOX` voxels of the volume's
            edge (cut by the field of view) or its rule lists it as ``partial``.
        points_mm: (K, d) up to :data:`CENTRE_POINTS` random positions inside it, mm.
    """

    key: str
    lo_mm: np.ndarray
    extent_mm: np.ndarray
    truncated: bool
    points_mm: np.ndarray


@dataclass(eq=False)
class LabelledVolume:
    """The label map of training volume ``index`` (an index into ``Trainer.volumes``).

    Attributes:
        labels: label values on the cached volume's grid (memory-mapped).
        spacing_mm: its voxel size, mm.
        organs: organ key -> :class:`Organ`.
        value_key: label value -> organ key.
    """

    index: int
    name: str
    labels: np.ndarray
    spacing_mm: float
    organs: dict
    value_key: dict


def load_labels(npy: Path, rule: LabelRule, index: int, spacing_mm: float, seed: int = 0) -> LabelledVolume:
    """Load a cached label map and describe its organs (bounding boxes, truncation, centre points)."""
    from scipy import ndimage

    arr = np.load(npy, mmap_mode="r")
    full = np.asarray(arr)
    values = [v for v in rule.names if v > 0]
    boxes = ndimage.find_objects(full.astype(np.int32, copy=False), max_label=max(values, default=0))
    rng = np.random.default_rng([seed, index])
    organs, value_key = {}, {}
    partial = {organ_key(n) for n in rule.partial}
    for v in values:
        sl = boxes[v - 1] if v - 1 < len(boxes) else None
        if sl is None:
            continue
        key = organ_key(rule.names[v])
        lo = np.array([s.start for s in sl])
        hi = np.array([s.stop - 1 for s in sl])
        truncated = bool((lo < EDGE_VOX).any() or (hi > np.array(full.shape) - 1 - EDGE_VOX).any() or key in partial)
        idx = np.argwhere(full[sl] == v) + lo
        idx = idx[rng.permutation(len(idx))[:CENTRE_POINTS]]
        organs[key] = Organ(key, lo * spacing_mm, (hi - lo + 1) * spacing_mm, truncated, idx * spacing_mm)
        value_key[v] = key
    return LabelledVolume(index, npy.name, arr, float(spacing_mm), organs, value_key)
