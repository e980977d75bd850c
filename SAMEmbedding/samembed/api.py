"""The scripting API: ``Matcher(model, device).match(source, points_lps_mm, targets, options=MatchOptions())``.

>>> from samembed import Matcher, MatchOptions
>>> m = Matcher(model="default", device="auto")                       # doctest: +SKIP
>>> result = m.match("atlas.nii.gz", [[10.0, -40.0, 80.0]], ["patient.nii.gz"],
...                  options=MatchOptions(heatmap=True))               # doctest: +SKIP
>>> result.matches[0].point_lps_mm, result.matches[0].score          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .affine import apply_affine
from .consistency import consistent_matches, min_points
from .embedding import (
    Embedder,
    EmbeddingCache,
    EmbeddingMaps,
    concurrent_matching,
    matching_concurrently,
    resolve_device,
    tiles_cancelled_by,
)
from .errors import Cancelled, InputError, TargetError, of_the_target, refuse_mixed_dimensions
from .fusion import Atlas, FusionOptions, fuse_points, landmark_union
from .heatmap import Heatmaps
from .image import Image
from .intensity import polish_points
from .io import image_from_sitk, read_image, validate_image
from .jobs import FuseCall, MatchCall, TargetEvent, each_atlas, with_atlas_images
from .jobs import match_each as _match_each_in_threads
from .matcher import (
    allowed_at,
    box_mask,
    boxes_around,
    in_air,
    mask_from_image,
    match_points,
    scores_at,
    search_prior,
)
from .models import LoadedModel, default_model_for, load_model
from .options import MODALITIES, MatchOptions, ProgressFn
from .preprocess import CT_STORED_OFFSET
from .refine import refine_points
from .result import Match, MatchResult

log = logging.getLogger(__name__)

#: how often :meth:`Matcher.match_each` looks at the caller's cancel while it waits for its targets (s)
CANCEL_POLL_S = 0.05

DEFAULT_OPTIONS = MatchOptions()
DEFAULT_FUSION = FusionOptions()
ImageLike = "str | os.PathLike | Image | SimpleITK.Image"


def as_image(obj, name: str | None = None, spacing_mm: float | None = None, constant_ok: bool = False,
             warn_spacing: bool = True) -> Image:
    """Parse a path, :class:`Image`, ``SimpleITK.Image`` or numpy array into a validated :class:`Image`
    (``constant_ok``: a constant one is valid, as a mask; ``warn_spacing``: :func:`~samembed.io.read_image`'s)."""
    if isinstance(obj, Image):
        validate_image(obj, constant_ok)
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj, spacing_mm=spacing_mm, constant_ok=constant_ok, warn_spacing=warn_spacing)
    if isinstance(obj, np.ndarray):
        img = Image.from_array(obj, name=name or "<array>")
        log.warning("%s: a numpy array carries no geometry: 1 mm voxels at the origin are assumed, so the points and "
                    "matches are in voxel units, not mm (samembed.Image.from_array(array_zyx, spacing_mm=(x, y, z), "
                    "origin_lps_mm=...) or a SimpleITK image gives them)", img.name)
        validate_image(img, constant_ok)
        return img
    if type(obj).__name__ == "Image" and hasattr(obj, "GetSpacing"):
        img = image_from_sitk(obj, name or "<SimpleITK image>")
        validate_image(img, constant_ok)
        return img
    raise InputError(f"cannot use {type(obj).__name__} as an image; pass a path, samembed.Image, SimpleITK.Image or numpy array")


def _next_event(events: queue.SimpleQueue, waiting: Callable[[], None]):
    """The next item of :meth:`Matcher.match_each`'s events, calling ``waiting()`` every :data:`CANCEL_POLL_S`
    seconds until it comes."""
    while True:
        try:
            return events.get(timeout=CANCEL_POLL_S)
        except queue.Empty:
            waiting()


def _target_image(target) -> Image:
    """A target of :meth:`Matcher.match_each` as an Image: read, or given by the function it is."""
    return as_image(target() if callable(target) else target)


def _points_array(points, ndim: int, source: Image) -> np.ndarray:
    try:
        p = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as e:  # text, rows of unequal length, a mapping
        raise InputError(f"points must be numbers: an (N, 3) array of LPS mm coordinates ({e})") from None
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] not in (2, 3) or len(p) == 0:
        raise InputError(f"points must be an (N, 3) array of LPS mm coordinates, got shape {np.shape(points)}")
    if p.shape[1] < ndim:  # z = 0 would be a plane of the scan, silently: say so
        raise InputError(f"points have {p.shape[1]} coordinates (x, y), but {source.name} is a {ndim}D image; "
                         f"give ({len(p)}, {ndim}) LPS mm points")
    if p.shape[1] == 2:
        p = np.hstack([p, np.zeros((len(p), 1))])
    if not np.all(np.isfinite(p)):
        raise InputError("points contain NaN or infinite coordinates")
    if ndim == 2 and np.ptp(p[:, 2]) > 1e-3:
        # points of several planes on one 2D image: said, not dropped silently (one shared z is the image's own
        # plane, as Slicer gives a radiograph's slice position with every point, and is dropped without a word)
        log.warning("%s is a 2D image: the points' z is ignored, though they lie in different planes (z from %.1f "
                    "to %.1f mm)", source.name, float(p[:, 2].min()), float(p[:, 2].max()))
    return p


@contextlib.contextmanager
def _partial_when_stopped(result: MatchResult, place: list[int | None]):
    """A :class:`Cancelled` raised inside (by the source's embedding, a target's, or between targets) holds
    ``result``, the targets finished so far, as its ``partial`` (it was None when raised below); so does a
    :class:`TargetError`, with the place of its target among the targets, ``place[0]``, as its ``target_index``."""
    try:
        yield
    except (Cancelled, TargetError) as e:
        if e.partial is None:
            e.partial = result
        if isinstance(e, TargetError) and e.target_index is None:
            e.target_index = place[0]
        raise


def _frames_let_go(method):
    """``method`` (a public matching call), whose :class:`TargetError` or :class:`Cancelled` keeps no embedding
    alive: the finished frames of its traceback (and of the errors it was raised from) are cleared, so that the
    maps and images in their variables go once the cache lets them go. A script that kept each failed target's
    error over hundreds of scans kept each one's maps too (90 MB of a head CT's, after ``clear_cache()``). The
    traceback still shows where it was raised, without the variables."""
    import traceback

    @functools.wraps(method)
    def calling(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (TargetError, Cancelled) as e:
            seen: set[int] = set()
            err: BaseException | None = e
            while err is not None and id(err) not in seen:  # (this frame, still running, is left as it is)
                seen.add(id(err))
                traceback.clear_frames(err.__traceback__)
                err = err.__cause__ or err.__context__
            raise

    return calling


def _same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (False when either is not a file)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def _to_embed_beside(embedder: Embedder, source: Image, target: Image) -> bool:
    """Whether ``target``'s maps are to be made beside ``source``'s: it is not the source (the same voxels) and not
    held already (:meth:`~samembed.embedding.Embedder.holds`)."""
    return target is not source and embedder.key(target) != embedder.key(source) and not embedder.holds(target)


@dataclass
class _Inputs:
    """A validated ``match`` call: the source image, its points (N, 3) LPS mm and their labels."""

    source: Image
    points_lps_mm: np.ndarray
    labels: list[str]
    targets: list
    names: list[str | None]
    mask: Image | None


@dataclass
class _Region:
    """Where a target is searched: the allowed local voxels (V,) and how (window around the affine prior)."""

    allowed: torch.Tensor
    prior: np.ndarray | None  # source -> target affine, (d+1, d+1), or None when untrustworthy
    window_mm: float | None  # half-size of each point's search window (None: the whole region)
    search_prior: np.ndarray | None  # the prior the window is centred on (None: around the best global match)
    note: str | None = None  # what the result's notes say about the search (no prior found)


#: how far beyond each click's search window the source is embedded with it, mm. The round trip searches the source
#: within the window around each match's inverse-prior image, which lies about as far from the click as the match
#: from its prior prediction (a few mm within a patient, 5-20 mm between patients). Voxels a first pass leaves out
#: cost a second pass, whose every box pays a full halo (32 input voxels of context per side) for a thin slab.
#: Only the cost depends on it with the CPU's int8 local branch (the default: a voxel's vector is the same, bit for
#: bit, whichever tile computed it; in float32, tiles of other extents agree to about 1e-7, as on-demand and whole
#: maps do): over 9 real CT pairs 91.8 -> 81.5 M input voxels through the local branch, one atlas into 5 targets
#: 38.6 -> 29.9 M, the same matches.
ROUND_TRIP_MARGIN_MM = 10.0


#: the median correlation of a target's polished matches below which they look like another patient's
#: (:meth:`Matcher._polish_note`): the same patient gave 0.99, different patients 0.58-0.87
SAME_PATIENT_NCC = 0.9


class Matcher:
    """Find points of a source image in target images with SAM embeddings.

    The Matcher holds what is expensive to build (the model, the device, the embedding cache and the affine
    priors fitted per image pair); every search setting is a :class:`~samembed.options.MatchOptions` value
    passed per call, so one Matcher serves calls with different settings.

    Args:
        model: a model name from ``models.json`` (``"default"``), a checkpoint path, ``"random:sam-lite"``,
            or a :class:`~samembed.models.LoadedModel`.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
        cache_bytes: memory cap of the embedding cache.
        cache_dir: optional on-disk embedding cache folder.
        modality: ``"auto"``, ``"ct"``, ``"mri"`` or ``"xray"``.
        max_tile_voxels: inputs larger than this (model-grid voxels) are embedded in slabs with a halo.
        cuda_fallback: with ``device="cuda"`` and no CUDA, warn and use the CPU instead of raising.
        spacing_mm: pixel spacing (mm) assumed for 2D image files that carry none (PNG/JPEG) given as paths.
        precision: the network's arithmetic: ``"auto"`` (on the CPU, int8 local convolutions when the model has an
            int8 calibration, and an int8 global branch when the calibration has its scales, else a bfloat16 one where
            the CPU has native bfloat16; float32 without a calibration), ``"fp32"``, ``"int8"``, ``"int8-int8"``
            or ``"int8-bf16"`` (see :func:`samembed.embedding.resolve_precision`). With ``model="default"``, the
            radiograph model that 2D images get runs as its own calibration allows ("auto"; it has none: float32),
            or in float32 when ``"fp32"`` was asked for: an int8 precision asked for is the CT model's.
    """

    def __init__(self, model: str | os.PathLike | LoadedModel = "default", device: str = "auto",
                 cache_bytes: int = 3 << 30, cache_dir: str | os.PathLike | None = None, modality: str = "auto",
                 max_tile_voxels: int = 24_000_000, cuda_fallback: bool = False,
                 spacing_mm: float | None = None, precision: str = "auto") -> None:
        # the settings first (a model takes a second to load)
        if str(modality).lower() not in MODALITIES:
            raise InputError(f"modality must be auto, ct, mri or xray, not {modality!r}")
        modality = str(modality).lower()
        if (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, numbers.Real) or cache_bytes < 0
                or cache_bytes != int(cache_bytes)):
            raise InputError(f"cache_bytes must be a whole number of bytes >= 0 (e.g. 2 << 30 for 2 GiB), "
                             f"not {cache_bytes!r}")
        cache_bytes = int(cache_bytes)  # (numpy's integers, 2e9)
        if (isinstance(max_tile_voxels, bool) or not isinstance(max_tile_voxels, numbers.Real)
                or not 1 <= max_tile_voxels < math.inf or max_tile_voxels != int(max_tile_voxels)):
            raise InputError(f"max_tile_voxels must be a whole number of voxels >= 1 (e.g. 24_000_000), "
                             f"not {max_tile_voxels!r}")
        max_tile_voxels = int(max_tile_voxels)
        if spacing_mm is not None:
            if isinstance(spacing_mm, bool) or not isinstance(spacing_mm, numbers.Real) or not 0 < spacing_mm < math.inf:
                raise InputError(f"spacing_mm must be a pixel size in mm greater than 0, not {spacing_mm!r}")
            spacing_mm = float(spacing_mm)
        self.device = resolve_device(device, fallback=cuda_fallback)
        self.model = load_model(model)
        self.cache = EmbeddingCache(cache_bytes)
        self.embedder = Embedder(self.model, self.device, self.cache, cache_dir, max_tile_voxels, modality, precision)
        self._precision_asked = str(precision).lower()  # (auto resolves per model: only one asked for is told)
        self.spacing_mm = spacing_mm
        self._priors: dict = {}
        self._priors_lock = threading.Lock()
        self._warned: set[str] = set()  # (_warn_once)
        # "default" means the registered default of each image dimension (models.json `default_for_dim`)
        self._per_dim = str(model) == "default"
        self._embedders = {self.model.net.spec.ndim: self.embedder}

    def embedder_for(self, ndim: int) -> Embedder:
        """The embedder for ``ndim``-D images: the Matcher's model, or with ``model="default"`` the registered
        default model of that dimension (loaded on first use; it shares the embedding cache)."""
        if ndim not in self._embedders and self._per_dim:
            name = default_model_for(ndim)
            if name is not None:
                e = self.embedder
                model = load_model(name)
                # float32 carries over; otherwise each model runs as its own calibration allows ("auto"), so asking
                # for int8 with the CT model does not refuse the radiograph model, which has no calibration
                precision = e.precision if e.precision == "fp32" else "auto"
                self._embedders[ndim] = Embedder(model, self.device, self.cache, e.cache_dir, e.max_tile_voxels,
                                                 e.modality, precision)
                if self._precision_asked.startswith("int8") and self._embedders[ndim].precision != e.precision:
                    log.info("%dD images: the model %s runs in %s (%s, asked for, is the %dD model's)", ndim,
                             name, self._embedders[ndim].precision, e.precision, e.model.spec.ndim)
        return self._embedders.get(ndim, self.embedder)

    def embed(self, image: ImageLike, progress: ProgressFn | None = None,
              cancel: threading.Event | None = None) -> EmbeddingMaps:
        """The whole embedding of one image (a path, :class:`Image`, ``SimpleITK.Image`` or array), computed once and
        kept in the matcher's cache.

        Returns:
            :class:`~samembed.embedding.EmbeddingMaps`: the global map (on the model's 16 mm grid for CT) and the
            local vectors (4 mm grid), unit length, with their grids in LPS mm (``local_grid``, ``global_grid``).
            They are the cache's own tensors, shared with later matches: read them, or ``.clone()`` a tensor
            before changing it (a change in place changes what later matches of this image find).
        """
        img = as_image(image, spacing_mm=self.spacing_mm)
        return self.embedder_for(img.ndim).embed(img, progress, cancel)

    def prepare(self, source, targets: Sequence, *, progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> dict[str, Any]:
        """Do now what every match of ``source`` into ``targets`` needs first, so that the first click is fast.

        Each image is read, preprocessed and given its global map and body mask, and the affine prior of each
        source/target pair is fitted. The source's local map is computed for its whole body: every click reads it
        around the clicked point and every round trip searches it. A target's local map stays on demand (a click
        computes only the tiles its search window needs), except where no trustworthy prior was found: every
        search in that target then covers its whole body, so its local map is computed here, whatever the click.
        All of it is cached: a later :meth:`match` of these images starts at the search. Calling it again costs
        nothing. A GUI calls it when the user chooses the volumes, before the first click.

        Args:
            source: the image points will be clicked in (path, Image, SimpleITK image or array).
            targets: the images they will be matched into.
            progress: ``progress(done, total, phase)`` counted in images.
            cancel: when set, stops between images and raises :class:`Cancelled`.

        Returns:
            seconds spent per step: ``embed_s`` (reading, preprocessing, global maps), ``prior_s``, ``whole_s``
            (the source's local map, and the targets' without a trustworthy prior), ``total_s``;
            ``targets_without_prior``, how many targets had no trustworthy affine prior; and ``skipped``, the
            ``(name, reason)`` of each target among several that cannot be matched (too small for the model,
            another dimension than the source, unreadable: :class:`TargetError`), which a match would skip too: the
            source and the other targets are prepared all the same.

        Raises:
            InputError: the source cannot be embedded, or a lone target cannot (as :meth:`match` raises).
        """
        t0 = time.time()
        if not isinstance(targets, (list, tuple)):
            targets = [targets]
        n = 1 + len(targets)
        maps: list[EmbeddingMaps] = []
        skipped: list[tuple[str, str]] = []

        def step(i: int, label: str) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"preparing cancelled after {i} of {n} images")
            if progress:
                progress(i, n, f"preparing {Path(label).name}")

        src = as_image(source, "source", self.spacing_mm)
        step(0, src.name)
        maps.append(self.embedder_for(src.ndim).embed(src, cancel=cancel, on_demand=True))
        for i, target in enumerate(targets, start=1):
            name = (target.name if isinstance(target, Image)
                    else str(target) if isinstance(target, (str, os.PathLike)) else f"target{i - 1}")
            step(i, name)
            try:
                with of_the_target():  # its own problem: with other targets, skipped as a match skips it
                    image = as_image(target, f"target{i - 1}", self.spacing_mm)
                    name = image.name
                    _check_same_dimension(src, image, image.name)
                    maps.append(self.embedder_for(image.ndim).embed(image, cancel=cancel, on_demand=True))
            except TargetError as e:
                if len(targets) == 1:
                    raise
                log.warning("preparing: %s is skipped: %s", name, e)
                skipped.append((name, str(e)))
        t1 = time.time()
        whole = [maps[0]] + [tmaps for tmaps in maps[1:] if self._prior(maps[0], tmaps) is None]
        t2 = time.time()
        embedder = self.embedder_for(src.ndim)
        for k, m in enumerate(whole):  # read by any click: the source, and targets searched over their whole body
            if cancel is not None and cancel.is_set():
                raise Cancelled("preparing cancelled")
            if progress:
                why = "the source" if k == 0 else "no reliable affine prior"
                progress(n - 1, n, f"embedding {Path(m.image_name).name} whole ({why})")
            searched = m.search_mask(True)
            try:
                m.ensure_all(searched, cancel=cancel)
            finally:
                embedder.settle(m)  # also the tiles finished before a cancel
            m.compact_features(searched)  # the searches' copy, made once here
        if progress:
            progress(n, n, "prepared")
        return {"embed_s": t1 - t0, "prior_s": t2 - t1, "whole_s": time.time() - t2, "total_s": time.time() - t0,
                "targets_without_prior": float(len(whole) - 1), "skipped": skipped}

    @_frames_let_go
    def match(self, source, points_lps_mm, targets: Sequence, labels: Sequence[str] | None = None,
              options: MatchOptions = DEFAULT_OPTIONS, *, mask=None, progress: ProgressFn | None = None,
              cancel: threading.Event | None = None, target_names: Sequence[str] | None = None) -> MatchResult:
        """Match source points into every target.

        Args:
            source: the image the points are in (path, Image, SimpleITK image or array).
            points_lps_mm: (N, 3) LPS mm points (use :func:`samembed.image.ras_to_lps` for Slicer RAS).
            targets: images to search.
            labels: one label per point (default P1, P2, ...); they must be unique when ``options.heatmap`` is
                set, because heatmaps are keyed by ``(target_index, label)``.
            options: how to search, check and polish (:class:`~samembed.options.MatchOptions`; its fields
                document each step: the affine-prior window, ``refine``, ``consistency``, ``polish``, the body
                restriction, a search box, heatmaps).
            mask: restrict the search to non-zero voxels of this image (in the targets' space), or None. A mask
                or ``options.box_lps_mm`` replaces the default restriction to the body.
            progress: ``progress(done, total, phase)`` counted in targets, with the phase named: "embedding
                source", "embedding target k/N", "matching k/N", "checking consistency k/N", "refining k/N",
                "polishing k/N", "matching back k/N" (the round trip), "matched k/N".
            cancel: when set, stops at the next target or local tile and raises :class:`Cancelled` with the partial
                result (the targets finished).

        Returns:
            :class:`MatchResult`.
        """
        if not isinstance(options, MatchOptions):
            raise InputError(f"options must be a samembed.MatchOptions, not {type(options).__name__}")
        t0 = time.time()
        inputs = self._inputs(source, points_lps_mm, targets, labels, options, mask, target_names)
        embedder = self.embedder_for(inputs.source.ndim)
        n_targets = len(inputs.targets)
        if progress:
            progress(0, n_targets, f"embedding source {Path(inputs.source.name).name}")
        result = MatchResult([], [])
        place: list[int | None] = [None]  # the target being matched
        # a Cancelled or a target's TargetError from anywhere inside holds the finished targets; a cancel stops at
        # the next target or local tile
        with _partial_when_stopped(result, place), tiles_cancelled_by(cancel):
            # local tiles as searches need them; the first target's maps beside the source's when both are new
            t_inputs = time.time() - t0
            src_maps, first, source_s = self._embed_source(embedder, inputs, cancel)
            result.timings["source_embed_s"] = t_inputs + source_s  # (a target made beside it: timed on its own)
            result.notes.extend(self._points_in_air(src_maps, inputs))
            for ti, target in enumerate(inputs.targets):
                place[0] = ti
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled after {ti} of {len(inputs.targets)} targets", partial=result)
                t1 = time.time()
                with of_the_target():  # (a problem of this target's image, not of the source or the settings)
                    tmaps = None
                    if ti == 0 and first is not None:  # made beside the source (its error raised here)
                        tgt, name, tmaps, t_beside = first.result()
                    else:
                        tgt, name = self._target(inputs, ti, target)
                    if progress:
                        progress(ti, n_targets, f"embedding target {ti + 1}/{n_targets} {Path(name).name}")
                    if tmaps is None:
                        tmaps = embedder.embed(tgt, cancel=cancel, on_demand=True)
                        t_embed = time.time() - t1
                    else:  # embedded beside the source, before this target's clock started
                        t_embed, t1 = t_beside, time.time() - t_beside
                    region = self._search_region(src_maps, tmaps, options, inputs.mask, name)
                    for note in (region.note, self._modality_note(embedder, inputs.source, tgt, name)):
                        if note:
                            result.notes.append(note)
                def phase(step: str, ti: int = ti) -> None:
                    if progress:
                        progress(ti, n_targets, f"{step} {ti + 1}/{n_targets}")

                matches, heatmaps = self._match_target(inputs, src_maps, tgt, tmaps, region, options, ti, name, phase)
                note = self._polish_note(matches, options)
                if note and note not in result.notes:
                    result.notes.append(note)
                result.matches.extend(matches)
                result.heatmaps.update(heatmaps)
                result.targets.append(name)
                result.timings[f"target{ti}_embed_s"] = t_embed
                result.timings[f"target{ti}_match_s"] = time.time() - t1 - t_embed
                if progress:
                    progress(ti + 1, n_targets, f"matched {ti + 1}/{n_targets} {Path(name).name}")
        result.timings["total_s"] = time.time() - t0
        return result

    @_frames_let_go
    def match_each(self, source, targets: Sequence, calls: Sequence[Sequence[MatchCall | FuseCall]],
                   on_target: Callable[[int, TargetEvent], None], *, jobs: int | None = None,
                   cancel: threading.Event | None = None, target_names: Sequence[str] | None = None) -> None:
        """Match ``source`` (or atlases) into every target with that target's ``calls``, the first target alone (it
        embeds the source, or the atlases), then ``jobs`` at a time (None: :func:`samembed.jobs.auto_jobs`, two on a
        CPU where torch has two threads or more): :func:`samembed.jobs.match_each`. Each target gets the matches it
        gets alone. What the Slicer module does for a click into several targets, and for atlases fused into
        several.

        Args:
            source: the image the points are in (as for :meth:`match`); None when every call is a
                :class:`samembed.jobs.FuseCall`.
            targets: the images to search (as for :meth:`match`), or functions that give one: each read when its
                turn comes.
            calls: per target, the matches to make there: :class:`samembed.jobs.MatchCall` (as :meth:`match`), or
                :class:`samembed.jobs.FuseCall` (as :meth:`match_atlases`; each atlas is read once, here).
            on_target: ``on_target(i, event)`` as target ``i`` starts (None), is matched (its results, one per call)
                or is skipped for a problem of its own (a :class:`TargetError`), called in this thread. What it raises
                stops the job and is raised. Each result is of that one target: its matches' ``target_index`` is 0,
                and its heatmaps' keys are ``(0, label)``; ``i`` is the target's place in ``targets``.
            cancel: set it to stop (from any thread, or in ``on_target``): no further target starts, the targets in
                flight stop at their next tile (seen within :data:`CANCEL_POLL_S`) or, needing none, finish and are
                told; :class:`Cancelled` is raised when a target was left undone.
            target_names: the targets' names in messages.

        Raises:
            Cancelled, or the first error that is not a target's own problem; the targets told as matched before it
            are the caller's.
        """
        if source is None and any(isinstance(c, MatchCall) for cs in calls for c in cs):
            raise InputError("match_each() needs the source image for its MatchCall (None only when every call is "
                             "a FuseCall)")
        source = None if source is None else as_image(source)
        calls = self._atlases_read(calls)
        stop = threading.Event()  # the job's own: set by the caller's cancel (passed on below) or a failed on_target
        events: queue.SimpleQueue = queue.SimpleQueue()
        failed: list[BaseException] = []
        abandoned = threading.Event()  # the caller stopped listening (its on_target raised, or an interrupt)

        def tell(i: int, event: TargetEvent) -> None:  # in the matching thread: told, then on once the caller has it
            answered = threading.Event()
            events.put((i, event, answered))
            while not answered.wait(CANCEL_POLL_S):
                if abandoned.is_set():
                    return

        ended = threading.Event()  # set when run() is over: waited for instead of joining (see below)

        def run() -> None:
            try:
                _match_each_in_threads(self, source, [functools.partial(_target_image, t) for t in targets], calls,
                                       tell, jobs=jobs, cancel=stop, target_names=target_names)
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread, below
                failed.append(e)
            finally:
                events.put(None)
                ended.set()

        def cancelled() -> None:  # the caller's cancel, passed on to the targets
            if cancel is not None and cancel.is_set():
                stop.set()

        cancelled()  # (already set: no target starts)
        worker = threading.Thread(target=run, name="samembed-match-each", daemon=True)
        worker.start()
        try:
            while (told := _next_event(events, cancelled)) is not None:
                i, event, answered = told
                try:
                    on_target(i, event)
                finally:  # a cancel set by on_target (the user's, or after a target) is seen before the next starts
                    try:
                        cancelled()
                    finally:
                        answered.set()
        except BaseException:
            stop.set()  # the targets in flight stop at their next tile, and nothing touches the caller's results
            abandoned.set()  # after this returns: no thread waits for an answer, and none is left running, waited
            while not ended.is_set():  # for through further interrupts (by an event: a join that a signal interrupts
                with contextlib.suppress(BaseException):  # takes the thread for ended in Python 3.11, bpo-45274)
                    ended.wait(CANCEL_POLL_S)
            raise
        worker.join()
        if failed:
            raise failed[0]

    def _atlases_read(self, calls: Sequence[Sequence[MatchCall | FuseCall]]) -> list[list[MatchCall | FuseCall]]:
        """``calls`` with the atlases of each :class:`~samembed.jobs.FuseCall` read (each image once, whichever calls
        share it): a path would be read again for every target."""
        read: dict[object, Image] = {}

        def image_of(a: Atlas) -> Image:
            if isinstance(a.image, Image):
                return a.image
            key = Path(a.image).resolve() if isinstance(a.image, (str, os.PathLike)) else id(a.image)
            if key not in read:
                read[key] = as_image(a.image, a.display_name, self.spacing_mm)
            return read[key]

        return with_atlas_images(calls, image_of)

    @_frames_let_go
    def match_atlases(self, atlases: Sequence[Atlas], targets: Sequence, options: MatchOptions = DEFAULT_OPTIONS, *,
                      fusion: FusionOptions = DEFAULT_FUSION, mask=None, progress: ProgressFn | None = None,
                      cancel: threading.Event | None = None, target_names: Sequence[str] | None = None) -> MatchResult:
        """Match the landmarks of several atlases into every target and fuse them per landmark and target.

        Each atlas is matched like :meth:`match`; the predictions of one landmark are fused robustly
        (:func:`samembed.fusion.fuse_points`: score-weighted geometric median after rejecting the atlases that
        disagree). Every fused :class:`Match` says how many atlases agreed, their spread (mm) and which were
        rejected. With one atlas the result is exactly :meth:`match`'s.

        Atlases may carry different landmarks: each is fused over the atlases that carry it (its ``atlases`` count),
        in the order the atlases first name them; an atlas that lacks some is named in a warning (logged once per
        matcher, and in the result's ``notes``). ``mask`` restricts every atlas's search as in :meth:`match`.

        Raises:
            InputError: no atlas, an atlas whose labels repeat (the message names the atlas file), or
                heatmaps asked for with several atlases (a heatmap belongs to one atlas's point).
        """
        atlases = list(atlases)
        if not atlases:
            raise InputError("no atlas given: pass at least one (image, points, labels)")
        for a in atlases:
            if not isinstance(a, Atlas):
                what = ("samembed.propagate.Atlas, an atlas's files for propagate()"
                        if type(a).__module__.startswith("samembed.propagate") else type(a).__name__)
                raise InputError(f"match_atlases() takes samembed.Atlas(image, points_lps_mm, labels), not {what}")
        shown = [a.display_name for a in atlases]
        # atlases of one name (in-memory images without one: "atlas") told apart by their place in the list
        atlases = [dataclasses.replace(a, name=f"{n} {i + 1}")
                   if shown.count(n) > 1 and not a.name and not isinstance(a.image, (str, os.PathLike)) else a
                   for i, (a, n) in enumerate(zip(atlases, shown))]
        ref = atlases[0]
        labels, notes = landmark_union([(a.display_name, a.labels) for a in atlases])
        seen = set()
        for a in atlases:  # the same atlas twice would count twice in every fusion
            image = (str(Path(a.image).resolve()) if isinstance(a.image, (str, os.PathLike))
                     else a.image.content_hash() if isinstance(a.image, Image) else id(a.image))
            key = (image, np.asarray(a.points_lps_mm, dtype=np.float64).tobytes(), a.labels)
            if key in seen:
                notes.append(f"atlas {a.display_name} is given twice: its predictions count twice in every fusion")
            seen.add(key)
        for note in notes:
            self._warn_once(note)
        if len(atlases) == 1:
            return self.match(ref.image, ref.points_lps_mm, targets, list(ref.labels), options, mask=mask,
                              progress=progress, cancel=cancel, target_names=target_names)
        if options.heatmap:
            raise InputError("heatmaps are not available when several atlases are fused; match one atlas for them")
        # each atlas read once (a path was read again for every target), and all of one dimension: else each target
        # would be matched by some atlases, then refused by another as if the target were at fault
        images = [as_image(a.image, a.display_name, self.spacing_mm) for a in atlases]
        refuse_mixed_dimensions([(a.display_name, im.ndim) for a, im in zip(atlases, images)], "targets")
        if mask is not None and not isinstance(mask, (Image, np.ndarray)):  # read once, not per atlas and target
            mask = as_image(mask, "mask", self.spacing_mm, constant_ok=True)
        if isinstance(mask, Image) and mask.grid.ndim != images[0].ndim:  # (before any target, as match says it)
            raise InputError(f"{mask.name}: the search mask is {mask.grid.ndim}D but the atlases and their targets "
                             f"are {images[0].ndim}D; give a mask in the targets' space")
        if not isinstance(targets, (list, tuple)):
            targets = [targets]
        if target_names is not None and len(target_names) != len(targets):  # (before any work, as match says it)
            raise InputError(f"{len(target_names)} target names for {len(targets)} targets")
        t0 = time.time()
        result = MatchResult([], [], timings={}, notes=notes)
        for ti, target in enumerate(targets):  # targets outside: each is embedded once, the atlases stay cached
            t_target = time.time()
            names = None if target_names is None else [target_names[ti]]

            def one(ai: int, stop, target=target, names=names) -> MatchResult:
                a = atlases[ai]
                return self.match(images[ai], a.points_lps_mm, [target], list(a.labels), options, mask=mask,
                                  cancel=stop, target_names=names)

            def told(phase: str, ti: int = ti) -> None:
                if progress:
                    progress(ti, len(targets), f"{phase} into target {ti + 1}/{len(targets)}")

            try:
                per_atlas = each_atlas(len(atlases), one, told, self.device.type, self.cache, cancel)
            except Cancelled:  # (its partial result is one atlas's, unfused): the fused targets so far
                raise Cancelled(f"cancelled after {ti} of {len(targets)} targets", partial=result) from None
            except TargetError as e:  # (the same): this target's place among the targets, and the fused ones
                e.target_index, e.partial = ti, result
                raise
            name = per_atlas[0].targets[0]
            result.targets.append(name)
            result.matches.extend(self._fused(atlases, per_atlas, labels, fusion, ti, name))
            # what the atlases' matches said (a point in air, no prior, another modality), each once: the Slicer
            # module shows the notes only (its engine process logs elsewhere)
            result.notes.extend(n for n in dict.fromkeys(n for r in per_atlas for n in r.notes) if n not in result.notes)
            result.timings[f"target{ti}_s"] = time.time() - t_target
            if progress:
                progress(ti + 1, len(targets), f"fused {ti + 1}/{len(targets)} {Path(name).name}")
        result.timings["total_s"] = time.time() - t0
        return result

    @staticmethod
    def _fused(atlases: list[Atlas], per_atlas: list[MatchResult], labels: list[str], fusion: FusionOptions, ti: int,
               name: str) -> list[Match]:
        """One fused :class:`Match` per landmark of target ``ti`` from the matches of it by the atlases that carry
        it. It is confident when most of those agree, two at least, and one of those was; its round trip is their
        median."""
        fused = []
        by_atlas = [{m.label: m for m in r.matches} for r in per_atlas]
        for label in labels:
            carry = [(a, found[label]) for a, found in zip(atlases, by_atlas) if label in found]
            ms = [m for _, m in carry]
            f = fuse_points(np.array([m.point_lps_mm for m in ms]), np.array([m.score for m in ms]), fusion)
            agree = [m for m, ok in zip(ms, f.agreeing) if ok]
            # without a consensus (none agree: not confident), the point and its details are the best-scoring atlas's
            told = agree or [max(ms, key=lambda m: m.score)]
            ncc = [m.ncc for m in told if np.isfinite(m.ncc)]
            fused.append(Match(
                label, name, ti, f.point_lps_mm, f.score,
                # (a landmark only one of several atlases carries: no other confirms it, whatever its round trip)
                confident=2 * len(agree) > len(ms) and len(agree) >= 2 and any(m.confident for m in agree),
                roundtrip_mm=float(np.median([m.roundtrip_mm for m in told])),
                rematched=any(m.rematched for m in told), polished=any(m.polished for m in told),
                ncc=float(max(ncc)) if ncc else float("nan"), atlases=len(ms), agreeing=len(agree),
                spread_mm=f.spread_mm, rejected=tuple(a.display_name for (a, _), ok in zip(carry, f.agreeing) if not ok),
                per_atlas=tuple((a.display_name, tuple(float(v) for v in m.point_lps_mm), float(m.score), bool(ok))
                                for (a, m), ok in zip(carry, f.agreeing))))
        return fused

    # ------------------------------------------------------------------------------------ the stages
    def _inputs(self, source, points_lps_mm, targets, labels, options: MatchOptions, mask,
                target_names) -> _Inputs:
        """Stage 1: read and check the source, its points and labels, the targets' list and the mask."""
        src = as_image(source, "source", self.spacing_mm)
        if not isinstance(targets, (list, tuple)):
            targets = [targets]
        if len(targets) == 0:
            raise InputError("no target images given")
        if target_names is not None and len(target_names) != len(targets):
            raise InputError(f"{len(target_names)} target names for {len(targets)} targets")
        # (a setting, the same for every target; 6 numbers on 2D images: their x and y are used)
        if options.box_lps_mm is not None and len(options.box_lps_mm) < 2 * src.ndim:
            raise InputError(f"box_lps_mm has {len(options.box_lps_mm)} numbers but the source {src.name} is "
                             f"{src.ndim}D, and so are its targets: give {2 * src.ndim} (two corners)")
        pts = _points_array(points_lps_mm, src.ndim, src)
        if isinstance(labels, str):  # one label (it was split into its letters)
            labels = [labels]
        labels = [str(v) for v in labels] if labels is not None else [f"P{i + 1}" for i in range(len(pts))]
        if len(labels) != len(pts):
            raise InputError(f"{len(labels)} labels for {len(pts)} points")
        if options.heatmap and len(set(labels)) != len(labels):
            raise InputError("point labels must be unique when heatmaps are requested (heatmaps are keyed by label)")
        outside = ~src.grid.contains_lps(pts)
        if outside.any():
            i = int(np.argmax(outside))
            raise InputError(
                f"{src.name}: point '{labels[i]}' at ({', '.join(f'{v:.1f}' for v in pts[i])}) mm LPS lies outside the image; "
                "if the coordinates are RAS (Slicer's), convert them with samembed.ras_to_lps (--ras on the "
                "command line)")
        # a bare array is a mask on each target's own grid (given its shape): as an image of its own, it sat at the
        # origin with 1 mm voxels, and only a corner of the target was searched, without a word
        mask_img = (mask if isinstance(mask, (Image, np.ndarray)) or mask is None
                    else as_image(mask, "mask", self.spacing_mm, constant_ok=True))  # (a mask of ones: everywhere)
        if isinstance(mask_img, Image) and mask_img.grid.ndim != src.ndim:  # (the targets': the source's dimension)
            raise InputError(f"{mask_img.name}: the search mask is {mask_img.grid.ndim}D but the source {src.name} and "
                             f"its targets are {src.ndim}D; give a mask in the targets' space")
        names = list(target_names) if target_names is not None else [None] * len(targets)
        return _Inputs(src, pts, labels, list(targets), names, mask_img)

    def _embed_source(self, embedder: Embedder, inputs: _Inputs,
                      cancel: threading.Event | None) -> tuple[EmbeddingMaps, Future | None, float]:
        """The source's maps (on demand: the global map; local tiles as searches need them), and, when
        :meth:`_beside_source` allows, the first target read and embedded meanwhile, in a thread of its own, each
        with half of torch's threads: the preprocessing, body mask and global map of two images at once instead of
        one after the other. A first match of one point from Python 1.08-1.39x faster on two threads in four runs
        (e.g. two CTs in 0.5 mm slices 1.02 -> 0.77 s, LIDC-0001 and its warp 0.77 -> 0.63 s, a head-and-neck pair
        0.96 -> 0.76 s; ``benchmarks/first_match_python.py``), the same matches.

        Returns ``(source maps, the first target's (image, name, maps or None, seconds reading and embedding it) to
        come or None, seconds until the source's maps were made)``. The target's maps are None when it turns out to
        be the source itself or held already (it is then embedded after, as before); its error, if any, is raised
        when its turn comes. A source's error waits for the target's thread to end."""
        t0 = time.time()
        target = self._beside_source(embedder, inputs)
        if target is None:
            return embedder.embed(inputs.source, cancel=cancel, on_demand=True), None, time.time() - t0

        def first() -> tuple[Image, str, EmbeddingMaps | None, float]:
            t1 = time.time()
            if isinstance(target, tuple):  # an image in memory, checked by _beside_source
                tgt, name = target
            else:  # a file, read and checked here
                tgt, name = self._target(inputs, 0, target)
                if not _to_embed_beside(embedder, inputs.source, tgt):
                    return tgt, name, None, 0.0  # the source's own maps, or held: after the source, as before
            return tgt, name, embedder.embed(tgt, cancel=cancel, on_demand=True), time.time() - t1

        outcome: Future = Future()

        def run() -> None:  # the target's maps, or its error, for its turn (Future.result raises it there)
            try:
                outcome.set_result(first())
            except BaseException as e:  # noqa: BLE001 - raised again by outcome.result(), in the caller's thread
                outcome.set_exception(e)

        with concurrent_matching(max(1, torch.get_num_threads() // 2)):
            helper = threading.Thread(target=run, name="samembed-first-target", daemon=True)
            helper.start()
            try:
                src_maps = embedder.embed(inputs.source, cancel=cancel, on_demand=True)
                source_s = time.time() - t0
            finally:
                helper.join()  # (torch's threads are restored only once both are done)
        return src_maps, outcome, source_s

    def _beside_source(self, embedder: Embedder, inputs: _Inputs):
        """What :meth:`_embed_source` embeds beside the source: the first target (as given, for a file, else as
        ``(image, name)``), or None. Only when the source is new (in neither cache; a disk entry counts, even one that
        will not load), on a CPU where torch has two threads or more, with nothing else matching in this process
        (:func:`~samembed.embedding.matching_concurrently`), no prefetch process preprocessing the images
        (:mod:`samembed.prefetch`: the ``samembed match`` command and the Slicer module's first request on Linux),
        a network that embeds on demand (its global map alone: the same values on any number of threads), and a
        first target that is neither the source (the same object or file, or the same voxels) nor held already."""
        if (embedder.device.type != "cpu" or torch.get_num_threads() < 2 or matching_concurrently()
                or embedder.prefetch is not None or not embedder.on_demand_capable or not inputs.targets
                or embedder.holds(inputs.source)):
            return None
        target = inputs.targets[0]
        if isinstance(target, (str, os.PathLike)):  # read in the target's thread (then checked as below)
            return None if _same_file(target, inputs.source.name) else target
        try:  # an image in memory: taken here (its errors are raised in its turn, as the target's own)
            tgt, name = self._target(inputs, 0, target)
            return (tgt, name) if _to_embed_beside(embedder, inputs.source, tgt) else None
        except Exception:  # noqa: BLE001 - the same error again in its turn, where it is the target's
            return None

    def _target(self, inputs: _Inputs, ti: int, target) -> tuple[Image, str]:
        """The ``ti``-th target as an image, and its name (given name, else its path, else the image's name)."""
        given = inputs.names[ti]
        tgt = as_image(target, given or f"target{ti}", self.spacing_mm)
        name = given or (str(target) if isinstance(target, (str, os.PathLike)) else tgt.name)
        _check_same_dimension(inputs.source, tgt, name)
        return tgt, name

    def _search_region(self, src_maps: EmbeddingMaps, tmaps: EmbeddingMaps, options: MatchOptions,
                       mask: Image | None, name: str) -> _Region:
        """Stage 2: the voxels a match may land on, and the search window (around the affine prior).

        The maps may be on demand (global map only): the prior needs only global vectors, and each search then
        computes the local tiles it reads: the query windows around the prior's predictions, or, without a
        trustworthy prior (or with ``prior_window_mm=0``), every allowed voxel (the whole-volume fallback).
        """
        explicit = mask is not None or options.box_lps_mm is not None  # replaces the default body restriction
        allowed = tmaps.search_mask(options.search_body and not explicit)
        if isinstance(mask, np.ndarray):
            if tuple(mask.shape) != tuple(tmaps.image_grid.shape_zyx):
                raise InputError(f"the mask array has shape {tuple(mask.shape)} but the target {name} has "
                                 f"{tuple(tmaps.image_grid.shape_zyx)} voxels (z, y, x); give a mask of the target's "
                                 "shape, or an image with its own geometry (samembed.Image, SimpleITK)")
            mask = Image(np.asarray(mask), tmaps.image_grid, "mask")
        if mask is not None:  # (of the source's dimension, the targets': _inputs)
            allowed = allowed & mask_from_image(tmaps, mask)
        if options.box_lps_mm is not None:  # (enough numbers for the source's dimension, the targets': _inputs)
            allowed = allowed & box_mask(tmaps, options.window_box)
        if not bool(allowed.any()):
            given = [f"the search mask {mask.name}" if mask is not None else "",
                     "the box (--box, box_lps_mm)" if options.box_lps_mm is not None else ""]
            raise InputError(f"{name}: {' with '.join(g for g in given if g) or 'the search mask/box'} leaves no voxel "
                             "to search (does it lie on this target, in its geometry?)")
        # the window goes around the affine prior's prediction, else (no prior) around the best global match. With
        # prior_window_mm=0 the search is SAM's single argmax over the whole target, but the polish still starts from
        # the prior's prediction too and keeps the start that correlates best: within a patient that rescues the
        # argmax's jumps to look-alikes (LIDC's warp, no window: 0.74 mm mean with it, 10.1 mm without, as f7a160f
        # measured before it was reverted; cold_start_session39.md)
        prior = self._prior(src_maps, tmaps) if options.prior_window_mm or options.polish else None
        if prior is not None and options.prior_window_mm:
            return _Region(allowed, prior, options.prior_window_mm, prior)
        note = None
        if options.prior_window_mm:  # asked for, and none found: said (it was a debug line only)
            note = (f"no trustworthy prior from {Path(src_maps.image_name).name} into {Path(name).name}: too few of the "
                    "global matches agree on an affine or a translation, so its points were searched over the whole "
                    "body (slower, and a match may land on a look-alike far away: its round trip tells)")
            self._warn_once(note, logging.INFO)
        return _Region(allowed, prior, options.global_window_mm or None, None, note)

    def _match_target(self, inputs: _Inputs, src_maps: EmbeddingMaps, tgt: Image, tmaps: EmbeddingMaps,
                      region: _Region, options: MatchOptions, ti: int, name: str,
                      phase: Callable[[str], None]) -> tuple[list[Match], dict]:
        """Stage 3: search, then the optional consistency, refinement and polish steps, then the round trip."""
        phase("matching")
        pts, d = inputs.points_lps_mm, inputs.source.ndim
        src_allowed = src_maps.search_mask(options.search_body)
        if region.search_prior is not None and not src_maps.complete:
            # the round trip searches the source around each match's inverse-prior image, which is near the click
            # when the match is right: embedding those tiles with the clicks' own, in one pass, saves halos
            src_maps.ensure(*boxes_around(src_maps, pts, region.window_mm + ROUND_TRIP_MARGIN_MM), need=src_allowed)
        raw = match_points(src_maps, pts, tmaps, region.allowed, keep_similarity=options.heatmap,
                           window_mm=region.window_mm, prior=region.search_prior)
        found, scores = raw.points_lps_mm, raw.scores
        n = len(pts)
        rematched = np.zeros(n, dtype=bool)
        if options.consistency and n < min_points(d):
            self._warn_once(f"the consistency check (consistency, --consistency) needs at least {min_points(d)} points "
                            f"in {d}D to fit its affine, and {n} are given: it is skipped")
        elif options.consistency:
            phase("checking consistency")  # (these steps took minutes for hundreds of points under one "matching")
            con = consistent_matches(src_maps, pts, tmaps, found, scores, region.allowed,
                                     inlier_mm=options.consistency_inlier_mm, window_mm=options.consistency_window_mm)
            found, scores, rematched = con.points_lps_mm, con.scores, con.rematched
            if con.flat:
                self._warn_once(f"the consistency check (consistency, --consistency) fits an affine to the points, "
                                f"and these {n} lie in one {'plane' if d == 3 else 'line'} (all on one slice?), "
                                "which fixes none: it is skipped; add points off it to check them")
        if options.refine:
            phase("refining")
            ref = refine_points(src_maps, tmaps, pts, found, scores, src_allowed=src_allowed, tgt_allowed=region.allowed,
                                window_mm=options.refine_window_mm or None)
            found, scores = ref.points_lps_mm, ref.scores
        polished, ncc = np.zeros(n, dtype=bool), np.full(n, np.nan)
        if options.polish:
            phase("polishing")
            prior = region.prior
            pol = polish_points(inputs.source, tgt, pts, found, None if prior is None else prior[:d, :d],
                                levels=options.polish_levels, min_ncc=options.polish_min_ncc,
                                alternatives=[] if prior is None else [apply_affine(prior, pts[:, :d])],
                                keep_templates=True)  # the clicks' templates serve the next target too
            # a polished point must stay where the search was allowed (body, mask, box); else it keeps its match
            keep = pol.moved & allowed_at(tmaps, region.allowed, pol.points_lps_mm)
            found = np.where(keep[:, None], pol.points_lps_mm, found[:, :d])
            polished, ncc = keep, np.where(keep, pol.ncc, np.nan)  # the correlation where the match is reported
        scores = scores_at(src_maps, pts, tmaps, found)  # the similarity where each match ended (= its heatmap)
        # the round trip matches back the same way: with the prior, inside the inverse affine's window
        phase("matching back")
        back = match_points(tmaps, found, src_maps, src_allowed, window_mm=region.window_mm,
                            prior=None if region.search_prior is None else np.linalg.inv(region.search_prior))
        back_pts = back.points_lps_mm[:, :d]
        if options.polish and polished.any():
            # a polished match is judged by a polished round trip: the confidence comes from the final point,
            # not from SAM's coarser grid (else exact polished matches are flagged for a 4 mm grid step)
            inv = None if region.prior is None else np.linalg.inv(region.prior)
            sel = np.flatnonzero(polished)
            pol_back = polish_points(tgt, inputs.source, found[sel, :d], back_pts[sel],
                                     None if inv is None else inv[:d, :d], levels=options.polish_levels,
                                     min_ncc=options.polish_min_ncc,
                                     alternatives=[] if inv is None else [apply_affine(inv, found[sel, :d])])
            back_pts = back_pts.copy()
            back_pts[sel] = np.where(pol_back.moved[:, None], pol_back.points_lps_mm[:, :d], back_pts[sel])
        rt = np.linalg.norm(back_pts - pts[:, :d], axis=1)
        tol = options.roundtrip_tolerance_mm or 2.0 * float(np.mean(src_maps.local_grid.spacing_mm))
        embedder = self.embedder_for(d)
        for maps in (src_maps, tmaps):  # the tiles computed for this target, for later calls and processes
            embedder.settle(maps)
        return self._outputs(inputs, raw, tmaps, found, scores, rt, tol, rematched, polished, ncc, ti, name,
                             tgt.plane_z_mm)

    @staticmethod
    def _outputs(inputs: _Inputs, raw, tmaps: EmbeddingMaps, found, scores, rt, tol, rematched, polished, ncc,
                 ti: int, name: str, plane_z_mm: float | None = None) -> tuple[list[Match], Heatmaps]:
        """Stage 4: one :class:`Match` per point (3D LPS mm; in a 2D target made from a one-slice volume, at that
        slice's z, ``plane_z_mm``, else 0), and the heatmaps when they were kept (each point's similarities on the
        model's grid; the image in the target's geometry is made when read)."""
        d = inputs.source.ndim
        matches, heatmaps = [], Heatmaps()
        for n, lab in enumerate(inputs.labels):
            p3 = np.zeros(3)
            p3[:d] = found[n, :d]
            if d == 2 and plane_z_mm is not None:
                p3[2] = plane_z_mm
            matches.append(Match(lab, name, ti, p3, float(scores[n]), bool(rt[n] <= tol), float(rt[n]),
                                 bool(rematched[n]), bool(polished[n]), float(ncc[n])))
        if raw.similarity is not None:
            heatmaps.add(ti, list(inputs.labels), raw.similarity.float().cpu().numpy(), tmaps.local_grid,
                         tmaps.image_grid, [f"{lab} in {Path(name).name}" for lab in inputs.labels], plane_z_mm)
        return matches, heatmaps

    def _prior(self, src_maps: EmbeddingMaps, tmaps: EmbeddingMaps) -> np.ndarray | None:
        """The source -> target affine prior (cached per pair), or None when too few voxels agree on one."""
        key = (src_maps.key, tmaps.key)
        with self._priors_lock:  # (targets matched at once: samembed match --jobs)
            if key in self._priors:
                return self._priors[key]
        M, kind, inliers = search_prior(src_maps, tmaps)
        log.debug("%s prior %s -> %s: %.0f %% inliers", kind, src_maps.image_name, tmaps.image_name, 100 * inliers)
        with self._priors_lock:
            self._priors[key] = M
            while len(self._priors) > 256:
                self._priors.pop(next(iter(self._priors)))
        return M

    def clear_cache(self) -> None:
        """Drop every in-memory embedding (and the affine priors fitted between them), and give the memory they held
        back to the system (:func:`samembed.allocator.release_free_memory`; else the process kept much of it). A
        disk cache folder that could not be written (full, read-only) is tried again from now on."""
        from .allocator import release_free_memory

        self.cache.clear()
        self.clear_priors()
        for embedder in {id(e): e for e in (self.embedder, *self._embedders.values())}.values():
            embedder._cache_write_failed = False
        release_free_memory()

    def forget(self, image: Image) -> None:
        """Drop the in-memory embeddings of ``image``: for a caller that will not match it again, e.g. each target of
        one atlas into many scans, whose maps would otherwise hold the cache's room (up to ``cache_bytes``) until
        they are evicted. The disk cache keeps what it holds."""
        for embedder in {id(e): e for e in (self.embedder, *self._embedders.values())}.values():
            embedder.forget(image)

    def already_said(self, messages: Iterable[str]) -> None:
        """Take these warnings about the inputs as said: for a caller that said them itself, once, where the
        matcher's own would be repeated (each worker of ``samembed propagate``, whose command names the atlases
        that lack landmarks at its start). The matcher does not log them again."""
        self._warned.update(messages)

    def _points_in_air(self, src_maps: EmbeddingMaps, inputs: _Inputs) -> list[str]:
        """Say which points lie outside the source's body as the engine finds it (:func:`~samembed.matcher.in_air`):
        they are matched all the same, but SAM matches anatomy, so such a match means little (a click beside the
        body, points in the other frame that still fall inside the image). Logged once per matcher; returned as the
        result's note every time (the Slicer module shows notes: its engine process logs to a file of its own)."""
        if inputs.source.ndim != 3:  # (a radiograph's body is not masked)
            return []
        air = np.flatnonzero(in_air(src_maps, inputs.points_lps_mm))
        if not len(air):
            return []
        named = ", ".join(repr(inputs.labels[i]) for i in air[:3]) + (", ..." if len(air) > 3 else "")
        note = (f"{len(air)} of {len(inputs.labels)} points lie outside the body of {inputs.source.name} as the engine "
                f"finds it ({named}): air there, or a part not joined to the body; SAM matches anatomy, so such a "
                "match means little: check where the points lie, and in which frame (LPS or RAS) they were given")
        self._warn_once(note)
        return [note]

    def _modality_note(self, embedder: Embedder, source: Image, target: Image, name: str) -> str | None:
        """With ``modality="auto"``, a warning (once) when the source and a target were found to be of different
        modalities: e.g. a CT cropped inside the body, with no air to tell it by, is taken for MRI, and its intensities
        are mapped otherwise than the whole CT's (every score lower). None when they agree or are not known."""
        if embedder.modality != "auto":
            return self._trained_modality_note(embedder)
        if source.ndim != 3:
            return None
        found = embedder.used_modality(source), embedder.used_modality(target)
        if None in found or found[0] == found[1]:
            return None
        words = {"ct": "CT (values reach air's HU)", "mri": "MRI (no value as low as air's HU)"}
        # (an image of integers none below 0, taken for MRI, may be a CT stored without its rescale: then --modality
        # ct maps its stored values as HU, and made the matches worse, 118 mm in a review)
        unsigned = [Path(img.name).name for img, mod in ((source, found[0]), (target, found[1]))
                    if mod == "mri" and img.array.dtype.kind in "iu" and int(img.array.min()) >= 0]
        note = (f"the source {Path(source.name).name} was taken for {words.get(found[0], found[0])} and the target "
                f"{Path(name).name} for {words.get(found[1], found[1])}, so their intensities are mapped differently "
                "and every score is lower; if both are of one modality, say which (--modality ct or mri; "
                "Matcher(modality=...))"
                + (f"; but if {unsigned[0]} is a CT whose values start at 0 because it was stored as HU + "
                   f"{CT_STORED_OFFSET} without its rescale slope and intercept, subtract {CT_STORED_OFFSET} first "
                   "(--modality ct would map the stored values as HU)" if unsigned else ""))
        self._warn_once(note)
        return note

    def _polish_note(self, matches: list[Match], options: MatchOptions) -> str | None:
        """A note (INFO, once) when the polish found little likeness of the local intensities (the median correlation
        of the polished matches of a target below :data:`SAME_PATIENT_NCC`): scans of different patients, where the
        polish, made for the same patient, can move a match off its similarity peak, as a new user matching two
        patients with the defaults found (the heatmap's peak 19 mm from the truth, the polished match 27 mm). Same
        patient: 0.99 on each LIDC warp; different patients: 0.58-0.87 on eight OpenKBP pairs. None otherwise."""
        ncc = [m.ncc for m in matches if m.polished and np.isfinite(m.ncc)]
        if not options.polish or len(ncc) < 3 or float(np.median(ncc)) >= SAME_PATIENT_NCC:
            return None
        note = ("the polish found little likeness of the local intensities (a correlation below "
                f"{SAME_PATIENT_NCC:g} at most matches): these look like scans of different patients, for which the "
                "polish, made for the same patient, can move a match off its similarity peak; try the between-patients "
                "preset (--preset between-patients; MatchOptions.preset(\"between-patients\"))")
        self._warn_once(note, logging.INFO)
        return note

    def _trained_modality_note(self, embedder: Embedder) -> str | None:
        """A warning (once) when the modality asked for maps intensities as the model never saw them: radiograph
        mapping for a model trained on CT or MRI, or CT/MRI mapping for one trained on radiographs (the hand model
        with ``--modality ct``: 2.7 -> 9.8 mm mean error). CT mapping for MRI, and the reverse, are not named: the CT
        models serve MRI so. None when the model's training modality is not known, or fits."""
        model = embedder.model
        trained = (model.info.get("registry") or {}).get("modality") or (model.info.get("train_config") or {}).get(
            "modality")
        if trained not in ("ct", "mri", "xray") or (trained == "xray") == (embedder.modality == "xray"):
            return None
        seen = "radiographs" if trained == "xray" else f"{trained.upper()} images"
        asked = "a radiograph's" if embedder.modality == "xray" else f"{embedder.modality.upper()}'s"
        note = (f"the model {model.model_id} was trained on {seen}, but intensities are mapped as {asked} "
                "(--modality): matches may be much worse; leave the modality to auto unless the model is for it")
        self._warn_once(note)
        return note

    def _warn_once(self, message: str, level: int = logging.WARNING) -> None:
        """Log a warning about the inputs once per matcher: a command matches its atlases into one target at a
        time, and would say the same for every target. ``level``: ``logging.INFO`` for a note about the search (the
        command shows it, ``--quiet`` does not)."""
        if message not in self._warned:
            self._warned.add(message)
            log.log(level, "%s", message)

    def clear_priors(self) -> None:
        """Forget the affine priors fitted per source/target pair (e.g. to time a match from scratch)."""
        self._priors.clear()

    @property
    def cache_bytes(self) -> int:
        """Bytes of embeddings held in memory."""
        return self.cache.nbytes


def _check_same_dimension(source: Image, target: Image, name: str) -> None:
    """Raise :class:`InputError` naming ``name`` when ``target`` is 2D and ``source`` 3D, or the reverse."""
    if target.ndim != source.ndim:
        raise InputError(f"{name}: a {target.ndim}D target cannot be matched with the {source.ndim}D source "
                         f"{source.name}; use images of the same dimension")


def default_device() -> torch.device:
    """The device ``auto`` resolves to on this machine."""
    return resolve_device("auto")
