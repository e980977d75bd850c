"""The scripting API: ``Matcher(model, device).match(source, points_lps_mm, targets)``.

>>> from samembed import Matcher
>>> m = Matcher(model="default", device="auto")                       # doctest: +SKIP
>>> result = m.match("atlas.nii.gz", [[10.0, -40.0, 80.0]], ["patient.nii.gz"], heatmap=True)  # doctest: +SKIP
>>> result.matches[0].point_lps_mm, result.matches[0].score          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .affine import apply_affine
from .consistency import consistent_matches
from .defaults import DEFAULT_POLISH, DEFAULT_PRIOR_WINDOW_MM, DEFAULT_REFINE_WINDOW_MM
from .embedding import EmbeddingCache, EmbeddingMaps, Embedder, resolve_device
from .errors import Cancelled, InputError
from .image import Image, lps_to_ras
from .intensity import DEFAULT_LEVELS, polish_points
from .io import image_from_sitk, read_image, validate_image
from .matcher import affine_prior, allowed_at, box_mask, heatmap_image, mask_from_image, match_points
from .models import LoadedModel, load_model
from .refine import refine_points

log = logging.getLogger(__name__)
ImageLike = "str | os.PathLike | Image | SimpleITK.Image"


@dataclass
class Match:
    """One matched point.

    Attributes:
        label: the source point's label.
        target: the target's name (file path or given name); ``target_index`` its position in the list.
        point_lps_mm: matched position, LPS mm (3 values; z = 0 for 2D).
        score: SAM similarity at the match, mean of local and global cosine, in [-1, 1].
        confident: the round trip target -> source (searched the same way: with the prior window, inside the
            inverse affine's window) lands within ``roundtrip_tolerance_mm`` of the click.
        roundtrip_mm: that round-trip distance, mm.
        rematched: the consistency step searched this point again (it disagreed with the other matches).
        polished: the intensity polish (``match(polish=True)``) moved this match; ``ncc`` is the normalised
            cross-correlation of its source and target patches there (NaN when the polish did not run).
    """

    label: str
    target: str
    target_index: int
    point_lps_mm: np.ndarray
    score: float
    confident: bool
    roundtrip_mm: float
    rematched: bool = False
    polished: bool = False
    ncc: float = float("nan")

    @property
    def point_ras_mm(self) -> np.ndarray:
        """Matched position in RAS mm (Slicer)."""
        return lps_to_ras(self.point_lps_mm)


@dataclass
class MatchResult:
    """All matches of a ``Matcher.match`` call, plus heatmaps when asked for and timings (seconds)."""

    matches: list[Match]
    targets: list[str]
    heatmaps: dict = field(default_factory=dict)  # (target_index, label) -> Image in the target's geometry
    timings: dict = field(default_factory=dict)

    def for_target(self, index: int) -> list[Match]:
        """Matches in target ``index``, in source point order."""
        return [m for m in self.matches if m.target_index == index]

    def rows(self, ras: bool = False) -> list[dict]:
        """One dict per match with target, label, x, y, z (LPS, or RAS if ``ras``), score, confident."""
        out = []
        for m in self.matches:
            p = m.point_ras_mm if ras else m.point_lps_mm
            out.append({"target": m.target, "label": m.label, "x": float(p[0]), "y": float(p[1]), "z": float(p[2]),
                        "score": m.score, "confident": m.confident})
        return out


def as_image(obj, name: str | None = None, spacing_mm: float | None = None) -> Image:
    """Parse a path, :class:`Image`, ``SimpleITK.Image`` or numpy array into a validated :class:`Image`."""
    if isinstance(obj, Image):
        validate_image(obj)
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj, spacing_mm=spacing_mm)
    if isinstance(obj, np.ndarray):
        img = Image.from_array(obj, name=name or "<array>")
        validate_image(img)
        return img
    if type(obj).__name__ == "Image" and hasattr(obj, "GetSpacing"):
        img = image_from_sitk(obj, name or "<SimpleITK image>")
        validate_image(img)
        return img
    raise InputError(f"cannot use {type(obj).__name__} as an image; pass a path, samembed.Image, SimpleITK.Image or numpy array")


def _points_array(points, ndim: int, source: Image) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] not in (2, 3) or len(p) == 0:
        raise InputError(f"points must be an (N, 3) array of LPS mm coordinates, got shape {np.shape(points)}")
    if p.shape[1] == 2:
        p = np.hstack([p, np.zeros((len(p), 1))])
    if not np.all(np.isfinite(p)):
        raise InputError("points contain NaN or infinite coordinates")
    return p


class Matcher:
    """Find points of a source image in target images with SAM embeddings.

    Args:
        model: a model name from ``models.json`` (``"default"``), a checkpoint path, ``"random:sam-lite"``,
            or a :class:`~samembed.models.LoadedModel`.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
        cache_bytes: memory cap of the embedding cache.
        cache_dir: optional on-disk embedding cache folder.
        modality: ``"auto"``, ``"ct"``, ``"mri"`` or ``"xray"``.
        search_body: restrict matches to the target's body mask (default True).
        roundtrip_tolerance_mm: the confidence flag's radius (default: 2 local voxels).
        max_tile_voxels: inputs larger than this (model-grid voxels) are embedded in slabs with a halo.
        cuda_fallback: with ``device="cuda"`` and no CUDA, warn and use the CPU instead of raising.
        global_window_mm: coarse-to-fine search: take the joint argmax only within +- this many mm of the best
            global match (None: the official single joint argmax over the whole target).
        prior_window_mm: search each point only within +- this many mm of where a robust affine, fitted to
            global-embedding matches of many body voxels (:func:`~samembed.matcher.affine_prior`, as in SAME),
            puts it; the affine is fitted once per source/target pair, and the whole target is searched when
            fewer than 20 % of the voxels agree on one. None: no prior (SAM's single argmax over the target).
        refine_window_mm: ``match(refine=True)`` searches each seed within +- this many mm of where the plain
            match puts it (a local refinement); None: whole volumes (slow).
        polish_min_ncc, polish_levels: settings of ``match(polish=True)`` (see :func:`samembed.intensity.polish_points`).
        spacing_mm: pixel spacing (mm) assumed for 2D image files that carry none (PNG/JPEG) given as paths.
        consistency_inlier_mm, consistency_window_mm: settings of ``match(consistency=True)`` (see
            :mod:`samembed.consistency`): matches farther than ``consistency_inlier_mm`` from the robust affine
            of all matches are searched again within +- ``consistency_window_mm`` of the affine's prediction.
    """

    def __init__(self, model: str | os.PathLike | LoadedModel = "default", device: str = "auto",
                 cache_bytes: int = 3 << 30, cache_dir: str | os.PathLike | None = None, modality: str = "auto",
                 search_body: bool = True, roundtrip_tolerance_mm: float | None = None,
                 max_tile_voxels: int = 24_000_000, cuda_fallback: bool = False,
                 global_window_mm: float | None = None, spacing_mm: float | None = None,
                 consistency_inlier_mm: float = 15.0, consistency_window_mm: float = 20.0,
                 prior_window_mm: float | None = DEFAULT_PRIOR_WINDOW_MM,
                 refine_window_mm: float | None = DEFAULT_REFINE_WINDOW_MM, polish_min_ncc: float = 0.5,
                 polish_levels: tuple[tuple[float, float, float], ...] = DEFAULT_LEVELS) -> None:
        self.device = resolve_device(device, fallback=cuda_fallback)
        self.model = load_model(model)
        self.cache = EmbeddingCache(cache_bytes)
        self.embedder = Embedder(self.model, self.device, self.cache, cache_dir, max_tile_voxels, modality)
        self.search_body = search_body
        self.roundtrip_tolerance_mm = roundtrip_tolerance_mm
        self.global_window_mm = global_window_mm
        self.spacing_mm = spacing_mm
        self.prior_window_mm = prior_window_mm
        self.refine_window_mm = refine_window_mm
        self._priors: dict = {}
        self.consistency_inlier_mm = consistency_inlier_mm
        self.consistency_window_mm = consistency_window_mm
        self.polish_min_ncc = polish_min_ncc
        self.polish_levels = polish_levels

    def embed(self, image, progress: Callable | None = None, cancel: threading.Event | None = None) -> EmbeddingMaps:
        """Embeddings of one image (cached)."""
        return self.embedder.embed(as_image(image, spacing_mm=self.spacing_mm), progress, cancel)

    def match(self, source, points_lps_mm, targets: Sequence, labels: Sequence[str] | None = None, *,
              heatmap: bool = False, refine: bool = False, consistency: bool = False, polish: bool = DEFAULT_POLISH,
              mask=None, box_lps_mm=None,
              progress: Callable[[int, int, str], None] | None = None, cancel: threading.Event | None = None,
              target_names: Sequence[str] | None = None) -> MatchResult:
        """Match source points into every target.

        Args:
            source: the image the points are in (path, Image, SimpleITK image or array).
            points_lps_mm: (N, 3) LPS mm points (use :func:`samembed.image.ras_to_lps` for Slicer RAS).
            targets: images to search.
            labels: one label per point (default P1, P2, ...); they must be unique when ``heatmap`` is set,
                because heatmaps are keyed by ``(target_index, label)``.
            heatmap: also return each point's similarity map resampled to each target's voxel grid.
            refine: cycle-consistent fixed-point refinement (slower, usually more accurate).
            consistency: re-search the matches that disagree with a robust affine fitted to all matches of the
                target (needs at least 2 (d + 1) points; see :mod:`samembed.consistency`). Cheap; it removes
                gross mismatches when many landmarks are matched at once, e.g. a radiograph's landmark set.
            polish: sub-voxel intensity refinement, last (see :mod:`samembed.intensity`): each match moves to the
                best normalised cross-correlation of the source point's neighbourhood nearby, searched from the
                match and from the affine prior's prediction; a match stays where it is when no patch nearby
                correlates at least ``polish_min_ncc`` or when the polished point would leave the searched region
                (body, ``mask``, ``box_lps_mm``). Uses the original voxels, so it is finer than the maps'
                grid; it helps most when source and target show the same structures (the same patient, a similar
                radiograph), and cannot help across modalities.
            mask: restrict the search to non-zero voxels of this image (in the targets' space), or None.
            box_lps_mm: restrict the search to an LPS box [[x0, y0, z0], [x1, y1, z1]] mm, or None.
                A mask or box replaces the default restriction to the body.
            progress: called as ``progress(done, total, message)`` before embedding each target
                ("embedding <name>") and after matching it ("<name>").
            cancel: when set, stops between targets and raises :class:`Cancelled` with the partial result.

        Returns:
            :class:`MatchResult`.
        """
        t0 = time.time()
        src = as_image(source, "source", self.spacing_mm)
        if not isinstance(targets, (list, tuple)):
            targets = [targets]
        if len(targets) == 0:
            raise InputError("no target images given")
        pts = _points_array(points_lps_mm, src.ndim, src)
        labels = list(labels) if labels is not None else [f"P{i + 1}" for i in range(len(pts))]
        if len(labels) != len(pts):
            raise InputError(f"{len(labels)} labels for {len(pts)} points")
        if heatmap and len(set(labels)) != len(labels):
            raise InputError("point labels must be unique when heatmaps are requested (heatmaps are keyed by label)")
        d = src.ndim
        ijk = src.grid.lps_to_index(pts[:, :d])
        outside = ~src.grid.contains_index(ijk, margin=0.5)
        if outside.any():
            i = int(np.argmax(outside))
            raise InputError(
                f"{src.name}: point '{labels[i]}' at ({', '.join(f'{v:.1f}' for v in pts[i])}) mm LPS lies outside the image; "
                "if the coordinates are RAS, pass --ras (or convert with ras_to_lps)")
        mask_img = as_image(mask, "mask") if mask is not None and not isinstance(mask, Image) else mask
        src_maps = self.embedder.embed(src, cancel=cancel)
        result = MatchResult([], [], timings={"source_embed_s": time.time() - t0})
        src_allowed = src_maps.search_mask(self.search_body)
        for ti, target in enumerate(targets):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after {ti} of {len(targets)} targets", partial=result)
            t1 = time.time()
            tgt = as_image(target, target_names[ti] if target_names else f"target{ti}", self.spacing_mm)
            name = target_names[ti] if target_names else (str(target) if isinstance(target, (str, os.PathLike)) else tgt.name)
            if tgt.ndim != src.ndim:
                raise InputError(f"{name}: a {tgt.ndim}D target cannot be matched with the {src.ndim}D source {src.name}; "
                                 "use images of the same dimension")
            if progress:
                progress(ti, len(targets), f"embedding {name}")
            tmaps = self.embedder.embed(tgt, cancel=cancel)
            t_embed = time.time() - t1
            # an explicit mask or box replaces the default body restriction
            explicit = mask_img is not None or box_lps_mm is not None
            allowed = tmaps.search_mask(self.search_body and not explicit)
            if not bool(allowed.any()):
                allowed = tmaps.valid
            if mask_img is not None:
                allowed = allowed & mask_from_image(tmaps, mask_img)
            if box_lps_mm is not None:
                allowed = allowed & box_mask(tmaps, box_lps_mm)
            if not bool(allowed.any()):
                raise InputError(f"{name}: the search mask/box leaves no voxel to search")
            # the window goes around the affine prior's prediction, else (no prior) around the best global match
            prior = self._prior(src_maps, tmaps) if self.prior_window_mm or polish else None
            window_mm = self.prior_window_mm if prior is not None and self.prior_window_mm else self.global_window_mm
            search_prior = prior if self.prior_window_mm else None
            raw = match_points(src_maps, pts, tmaps, allowed, keep_similarity=heatmap, window_mm=window_mm,
                               prior=search_prior)
            found, scores = raw.points_lps_mm, raw.scores
            rematched = np.zeros(len(pts), dtype=bool)
            if consistency:
                con = consistent_matches(src_maps, pts, tmaps, found, scores, allowed,
                                         inlier_mm=self.consistency_inlier_mm, window_mm=self.consistency_window_mm)
                found, scores, rematched = con.points_lps_mm, con.scores, con.rematched
            if refine:
                ref = refine_points(src_maps, tmaps, pts, found, scores, src_allowed=src_allowed, tgt_allowed=allowed,
                                    window_mm=self.refine_window_mm)
                found, scores = ref.points_lps_mm, ref.scores
            polished, ncc = np.zeros(len(pts), dtype=bool), np.full(len(pts), np.nan)
            if polish:
                pol = polish_points(src, tgt, pts, found, None if prior is None else prior[:d, :d],
                                    levels=self.polish_levels, min_ncc=self.polish_min_ncc,
                                    alternatives=[] if prior is None else [apply_affine(prior, pts[:, :d])])
                # a polished point must stay where the search was allowed (body, mask, box); else it keeps its match
                keep = pol.moved & allowed_at(tmaps, allowed, pol.points_lps_mm)
                found = np.where(keep[:, None], pol.points_lps_mm, found[:, :d])
                polished, ncc = keep, pol.ncc
            # the round trip matches back the same way: with the prior, inside the inverse affine's window
            back = match_points(tmaps, found, src_maps, src_allowed, window_mm=window_mm,
                                prior=None if search_prior is None else np.linalg.inv(search_prior))
            rt = np.linalg.norm(back.points_lps_mm[:, :d] - pts[:, :d], axis=1)
            tol = self.roundtrip_tolerance_mm or 2.0 * float(np.mean(src_maps.local_grid.spacing_mm))
            for n, lab in enumerate(labels):
                p3 = np.zeros(3)
                p3[:d] = found[n, :d]
                result.matches.append(Match(lab, name, ti, p3, float(scores[n]), bool(rt[n] <= tol), float(rt[n]),
                                            bool(rematched[n]), bool(polished[n]), float(ncc[n])))
                if heatmap:
                    result.heatmaps[(ti, lab)] = heatmap_image(raw.similarity[n], tmaps, f"{lab} in {Path(name).name}")
            result.targets.append(name)
            result.timings[f"target{ti}_embed_s"] = t_embed
            result.timings[f"target{ti}_match_s"] = time.time() - t1 - t_embed
            if progress:
                progress(ti + 1, len(targets), name)
        result.timings["total_s"] = time.time() - t0
        return result

    def _prior(self, src_maps: EmbeddingMaps, tmaps: EmbeddingMaps) -> np.ndarray | None:
        """The source -> target affine prior (cached per pair), or None when too few voxels agree on one."""
        key = (src_maps.key, tmaps.key)
        if key not in self._priors:
            M, inliers = affine_prior(src_maps, tmaps)
            log.info("affine prior %s -> %s: %.0f %% inliers", src_maps.image_name, tmaps.image_name, 100 * inliers)
            self._priors[key] = M if inliers >= 0.2 else None
            while len(self._priors) > 256:
                self._priors.pop(next(iter(self._priors)))
        return self._priors[key]

    def clear_cache(self) -> None:
        """Drop every in-memory embedding (and the affine priors fitted between them)."""
        self.cache.clear()
        self.clear_priors()

    def clear_priors(self) -> None:
        """Forget the affine priors fitted per source/target pair (e.g. to time a match from scratch)."""
        self._priors.clear()

    @property
    def cache_bytes(self) -> int:
        """Bytes of embeddings held in memory."""
        return self.cache.nbytes


def default_device() -> torch.device:
    """The device ``auto`` resolves to on this machine."""
    return resolve_device("auto")
