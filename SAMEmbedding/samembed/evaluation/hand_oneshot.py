"""The ``hand_oneshot`` benchmark: one labelled hand radiograph, its 37 landmarks carried to held-out hands.

Data: ``xray/hand_dha37`` under the shared data folder (133 left-hand radiographs of children, one per
subject, stored at half resolution as JPEG; ``landmarks_37.csv`` gives each landmark in original and in
stored pixels). Nothing here writes into the data folder.

Frames and units:

* **stored px** ``(x, y)``: column and row of the stored JPEG, continuous, pixel centre at integers.
* **original px**: the same point in the original-resolution scan, ``x_orig = x_px * orig_width / width``
  (likewise ``y``). All errors are reported in original pixels.
* **mm**: the files carry no spacing. Digital Hand Atlas scans are commonly treated as 0.1 mm per original
  pixel (unverified), so a stored pixel is taken as ``STORED_PX_MM = 0.2`` mm and an error of ``e`` original
  pixels as ``0.1 * e`` mm. Every report says so.
* **LPS mm**: the engine's frame. A JPEG read with ``spacing_mm=0.2`` has origin 0 and identity direction,
  so stored pixel ``(x, y)`` is the point ``(0.2 x, 0.2 y, 0)`` LPS mm.

The split is by image (= by subject), seeded: :func:`hand_split` puts ``n_train`` (default 100) images in the
training set (used for self-supervised training and as templates) and the rest are held-out targets.

Methods compared in one run (see :func:`run_benchmark`):

* ``sam``: one template (a seeded pick from the training images), :class:`samembed.Matcher` matching;
* ``sam-multi-best`` / ``sam-multi-median``: ``k`` templates; per landmark, the prediction with the best
  SAM score, or the coordinate-wise median of the ``k`` predictions (a robust average);
* ``elastix-affine`` / ``elastix-bspline``: 2D elastix registration (fixed = template, moving = target;
  affine, then affine + B-spline) and point transfer through the transform (:func:`transfer_points_elastix_2d`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

DATASET = Path("xray") / "hand_dha37"
ORIG_PX_MM = 0.1  # assumed mm per original pixel (not given by the data set; see the module docstring)
STORED_PX_MM = 0.2  # assumed mm per stored pixel (stored images are half resolution)
N_LANDMARKS = 37
THRESHOLDS_MM = (2.0, 4.0, 10.0)


# ----------------------------------------------------------------------------------------------
# data set and split
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class HandCase:
    """One radiograph and its landmarks.

    Attributes:
        image_id: the data set's image id (file stem), e.g. ``"3143"``.
        path: the stored JPEG.
        landmarks_px: (37, 2) landmarks in stored pixels (x, y), landmark order 1..37.
        landmarks_orig_px: (37, 2) the same landmarks in original pixels.
        orig_per_stored: (2,) original pixels per stored pixel along x and y (about 2).
    """

    image_id: str
    path: Path
    landmarks_px: np.ndarray
    landmarks_orig_px: np.ndarray
    orig_per_stored: np.ndarray = field(default_factory=lambda: np.array([2.0, 2.0]))

    def points_lps_mm(self, spacing_mm: float = STORED_PX_MM) -> np.ndarray:
        """(37, 3) landmarks as LPS mm points of the stored image read with ``spacing_mm`` (z = 0)."""
        return px_to_lps_mm(self.landmarks_px, spacing_mm)

    def to_orig_px(self, points_px: np.ndarray) -> np.ndarray:
        """Stored-pixel points (N, 2) to original pixels (N, 2)."""
        return np.asarray(points_px, dtype=np.float64) * self.orig_per_stored


def default_data_root() -> Path:
    """``$SAMEMBED_DATA`` or ``../shared/data`` beside the repository root."""
    env = os.environ.get("SAMEMBED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def px_to_lps_mm(points_px: np.ndarray, spacing_mm: float = STORED_PX_MM) -> np.ndarray:
    """Stored-pixel points (N, 2) to (N, 3) LPS mm points (z = 0) of an image with ``spacing_mm``, origin 0."""
    p = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    return np.hstack([p * spacing_mm, np.zeros((len(p), 1))])


def lps_mm_to_px(points_lps_mm: np.ndarray, spacing_mm: float = STORED_PX_MM) -> np.ndarray:
    """Inverse of :func:`px_to_lps_mm`: (N, 3) or (N, 2) LPS mm to (N, 2) stored pixels."""
    return np.asarray(points_lps_mm, dtype=np.float64).reshape(len(points_lps_mm), -1)[:, :2] / spacing_mm


def load_hand_dataset(root: str | os.PathLike | None = None) -> list[HandCase]:
    """Read ``images.csv`` and ``landmarks_37.csv`` of the hand data set, sorted by image id.

    Args:
        root: the shared data folder (default :func:`default_data_root`) or the ``hand_dha37`` folder itself.

    Raises:
        InputError: the folder or its tables are missing, or an image lacks some of its 37 landmarks.
    """
    root = Path(root) if root is not None else default_data_root()
    folder = root if (root / "landmarks_37.csv").is_file() else root / DATASET
    lm_csv, img_csv = folder / "landmarks_37.csv", folder / "images.csv"
    if not lm_csv.is_file() or not img_csv.is_file():
        raise InputError(f"{folder}: hand data set not found (need landmarks_37.csv and images.csv); set SAMEMBED_DATA")
    sizes = {}
    with img_csv.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            sizes[r["image"]] = (float(r["orig_width"]) / float(r["width"]), float(r["orig_height"]) / float(r["height"]))
    pts: dict[str, dict[int, tuple[float, float, float, float]]] = {}
    with lm_csv.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            pts.setdefault(r["image"], {})[int(r["landmark"])] = (
                float(r["x_px"]), float(r["y_px"]), float(r["x_orig_px"]), float(r["y_orig_px"]))
    cases = []
    for image_id in sorted(pts):
        lm = pts[image_id]
        if sorted(lm) != list(range(1, N_LANDMARKS + 1)):
            raise InputError(f"{lm_csv}: image {image_id} has landmarks {sorted(lm)}, expected 1..{N_LANDMARKS}")
        arr = np.array([lm[i] for i in range(1, N_LANDMARKS + 1)], dtype=np.float64)
        path = folder / "images" / f"{image_id}.jpg"
        if image_id not in sizes:
            raise InputError(f"{img_csv}: image {image_id} is missing")
        cases.append(HandCase(image_id, path, arr[:, :2], arr[:, 2:], np.array(sizes[image_id])))
    return cases


def hand_split(image_ids: list[str], n_train: int = 100, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split by image: ``(train_ids, heldout_ids)``, each sorted, disjoint, together all ids.

    >>> hand_split([str(i) for i in range(10)], n_train=7, seed=0)[1]
    ['0', '5', '8']
    """
    ids = sorted(set(image_ids))
    if not 0 < n_train < len(ids):
        raise InputError(f"n_train={n_train} must lie between 1 and {len(ids) - 1} ({len(ids)} images)")
    perm = np.random.default_rng(seed).permutation(len(ids))
    train = sorted(ids[i] for i in perm[:n_train])
    held = sorted(ids[i] for i in perm[n_train:])
    return train, held


def pick_templates(train_ids: list[str], k: int = 1, seed: int = 0) -> list[str]:
    """``k`` template ids drawn (seeded, without replacement) from the training ids; the first is the one-template pick."""
    ids = sorted(train_ids)
    if not 0 < k <= len(ids):
        raise InputError(f"cannot pick {k} templates from {len(ids)} training images")
    rng = np.random.default_rng(1000 + seed)
    return [ids[i] for i in rng.choice(len(ids), size=k, replace=False)]


def write_training_images(cases: list[HandCase], out_dir: str | os.PathLike, spacing_mm: float = STORED_PX_MM) -> list[Path]:
    """Write each case's image as NIfTI with pixel spacing ``spacing_mm`` (so ``samembed train`` sees real mm).

    These are derived copies for the git-ignored ``runs/`` folder, never for the repository. Existing files
    are kept. Returns the written (or present) paths.
    """
    import SimpleITK as sitk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in cases:
        dst = out / f"{c.image_id}.nii.gz"
        if not dst.is_file():
            img = sitk.ReadImage(str(c.path))
            if img.GetNumberOfComponentsPerPixel() > 1:
                img = sitk.VectorIndexSelectionCast(img, 0)
            img.SetSpacing((spacing_mm, spacing_mm))
            img.SetOrigin((0.0, 0.0))
            tmp = dst.with_name(f".{dst.name}.tmp.nii.gz")
            sitk.WriteImage(img, str(tmp), True)
            os.replace(tmp, dst)
        paths.append(dst)
    return paths
