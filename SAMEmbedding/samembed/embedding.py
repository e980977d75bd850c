"""The embedding engine: whole-volume embeddings, tiled with a halo when large, cached in memory and on disk.

``Embedder.embed(image)`` preprocesses the image, runs the network (CPU fp32; CUDA fp16 when present), and
returns :class:`EmbeddingMaps`: the local map as a ``features`` matrix ``(C_local, V)`` on the local grid, the
coarse global map, and their LPS grids. A voxel's global vector is the global map upsampled to the local grid
(trilinear, align_corners=False) and re-normalised, as in the official matcher; it is not stored per voxel (that
copy was half of every voxel's memory): the maps keep its length before normalising (``global_norm``, one number per
voxel), and a search interpolates the coarse map's products with its queries instead (:meth:`EmbeddingMaps.global_similarity_box`),
the same similarity to float rounding, since interpolation is linear. The local matrix is stored voxel-major
(``vectors``, (V, C_l): each voxel's vector in one run of memory), so a tile makes resident only its own voxels'
pages and a gather of voxels copies whole rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled, DeviceUnavailableError, InputError
from .image import Grid, Image
from .models import LoadedModel
from .networks.base import inference_copy
from .options import PRECISIONS, ProgressFn
from .preprocess import (
    axes_reoriented,
    body_mask_on_grid,
    detect_modality,
    obliquity_deg,
    onto_lps_axes,
    pad_to_multiple,
    preprocess,
    warn_offset_ct,
)
from .tiles import LOCAL_ENCODING, new_feature_rows

log = logging.getLogger(__name__)

#: the most voxels an image may span on the model's grid (2 GB of float32 input): a whole-body CT, 0.5 x 0.5 x 2 m,
#: is 62 million at 2 mm; more is a spacing read wrong
MAX_INPUT_VOXELS = 500_000_000


def resolve_device(device: str | torch.device = "auto", fallback: bool = False) -> torch.device:
    """``auto`` -> CUDA when present, else CPU. ``cuda`` without CUDA raises :class:`DeviceUnavailableError`,
    or, with ``fallback=True``, warns and returns the CPU."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            if fallback:
                import warnings

                warnings.warn("CUDA was requested but is not available; falling back to the CPU", stacklevel=2)
                return torch.device("cpu")
            raise DeviceUnavailableError("CUDA was requested (--device cuda) but no CUDA device is available; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceUnavailableError(f"unknown device '{device}'; use auto, cpu or cuda")


def resolve_precision(precision: str, model: LoadedModel, device: torch.device) -> str:
    """The arithmetic an embedder uses: "fp32" (float32 on the CPU, half precision on CUDA), "int8" (the local
    branch's convolutions in int8 on the CPU, :mod:`samembed.networks.int8`; needs the model's calibration,
    ``samembed quantize``), "int8-int8" (int8, and most of the global branch's convolutions in int8 too; needs a
    calibration that has the global branch's scales) or "int8-bf16" (int8, and the global branch in bfloat16; needs a
    CPU with native bfloat16, :func:`samembed.networks.int8.native_bf16`). "auto" is the fastest of these that this
    model and CPU allow: "int8-int8" when the calibration has the global scales (its global map took 0.15-0.16 s
    against bfloat16's 0.18 s and float32's 0.26 s on a CPU with AVX-512 BF16 and VNNI, about 2x faster than float32
    on AVX2), else "int8-bf16" where the CPU has native bfloat16, else "int8".

    Raises:
        InputError: an unknown name, or a precision that cannot run here (CUDA, no calibration, not a sam-lite model,
            no native bfloat16).
    """
    from .errors import InputError

    name = str(precision).lower()
    if name not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}'; use {', '.join(PRECISIONS)}")
    can = device.type == "cpu" and model.int8 is not None and model.spec.arch == "sam-lite"
    if name.startswith("int8") and not can:
        why = ("int8 runs on the CPU only: use --device cpu" if device.type != "cpu" else
               f"only 3D sam-lite models run in int8, and {model.model_id} is not one" if model.spec.arch != "sam-lite"
               else f"{model.model_id} has no int8 calibration beside its weights: run `samembed quantize --model ...`")
        raise InputError(f"precision {name}: {why}; or use --precision fp32 (or auto)")
    from .networks.int8 import has_global_scales, native_bf16

    if name == "int8-int8" and not has_global_scales(model.int8):
        raise InputError(f"precision int8-int8: the int8 calibration of {model.model_id} has no scales for the global "
                         "branch (made before they existed); run `samembed quantize --model ...` again, "
                         "or use --precision int8")
    if name == "int8-bf16" and not native_bf16():
        raise InputError("precision int8-bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX); "
                         "use --precision int8")
    if name == "auto":
        if not can:
            return "fp32"
        return "int8-int8" if has_global_scales(model.int8) else "int8-bf16" if native_bf16() else "int8"
    return name


#: one filler at a time, whatever the maps (a Slicer worker and the main thread may share maps), unless targets are
#: matched concurrently (:func:`concurrent_matching`): then each maps' own lock (``EmbeddingMaps._lock``) suffices
_FILL_LOCK = threading.RLock()
_CONCURRENT = {"jobs": 0, "threads": 1}  # the concurrent_matching() blocks open, torch's threads before them
_CONCURRENT_LOCK = threading.Lock()
#: the cancel event of the match running in this thread (:func:`tiles_cancelled_by`), checked before each tile
_TILE_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("samembed_tile_cancel",
                                                                                     default=None)


@contextlib.contextmanager
def tiles_cancelled_by(cancel: threading.Event | None):
    """A block (a match) in which every tile filled in this thread checks ``cancel`` first, as
    :meth:`EmbeddingMaps.ensure_all` does with its own: a set event stops the block at its next tile with
    :class:`Cancelled` (the tiles finished are kept), not only between targets."""
    token = _TILE_CANCEL.set(cancel)
    try:
        yield
    finally:
        _TILE_CANCEL.reset(token)


def matching_concurrently() -> bool:
    """Whether targets are being matched in several threads at once (:func:`concurrent_matching`)."""
    return _CONCURRENT["jobs"] > 0


@contextlib.contextmanager
def concurrent_matching(threads_per_job: int):
    """A block in which several threads match targets at once, each with ``threads_per_job`` of torch's threads (the
    ``samembed match`` command's ``--jobs``; torch's thread count is restored after). Maps that several threads read
    (the source's) stay consistent: each maps' tiles are filled under its own lock, so different maps fill at once,
    and a tile never writes over voxels that are already computed, which another thread may be reading
    (:meth:`TileComputer._tile` takes its own buffers instead of the in-place path there: a whole volume's tile over
    maps that already hold tiles then needs its tile-sized buffers, about 2 x 330 MB for an OpenKBP CT). Open it
    only while no tile is being filled (between targets). Blocks may overlap (two callers at once): the thread count
    of before the first is restored when the last ends (each restored its own, so the second's, one thread, stayed)."""
    with _CONCURRENT_LOCK:
        if _CONCURRENT["jobs"] == 0:
            _CONCURRENT["threads"] = torch.get_num_threads()
        _CONCURRENT["jobs"] += 1
        torch.set_num_threads(max(1, int(threads_per_job)))
    try:
        yield
    finally:
        with _CONCURRENT_LOCK:
            _CONCURRENT["jobs"] -= 1
            if _CONCURRENT["jobs"] == 0:
                torch.set_num_threads(_CONCURRENT["threads"])


#: part of every cache key: bumped when the engine's arithmetic changes (v2: batch norms folded into the
#: convolutions, channel norms summed channel by channel; v3: each layer of a tile computed only where the layers
#: after it need it; v4: the input resampled one axis at a time, which differs from SimpleITK's in the last bit of a
#: few voxels per million; v5: a volume's global map computed over the body's box, :func:`global_box`), so a map
#: never mixes tiles of two versions
NUMERICS = "5"
#: how far beyond the body a volume's global map is computed (mm; :func:`global_box`)
GLOBAL_MARGIN_MM = 32.0


@dataclass(eq=False)
class EmbeddingMaps:
    """Embeddings of one image; the local map may be computed only where searches need it (on demand).

    Attributes:
        global_: (C_g, *gshape) unit vectors on ``global_grid``, which spans the whole image; a volume's are
            computed over the body's box only (:func:`global_box`, for a network with a separate global branch) and
            are zero vectors beyond it.
        features: (C_l, V) local unit vectors per local voxel (float32 on CPU): the transposed view of the
            voxel-major buffer :attr:`vectors` (V, C_l) (stride 1 along the channels). On-demand maps hold the
            buffer for the whole grid, but only voxels in ``ready`` are filled (pages never written take no memory):
            call :meth:`ensure` / :meth:`ensure_flat` / :meth:`ensure_all` before reading others. Gather voxels
            through :attr:`vectors` (whole rows), not through columns of ``features``. A voxel's global vector is
            not stored here: :meth:`global_at`, :meth:`rows_at`, :meth:`global_similarity_box`.
        valid: (V,) voxel centre lies inside the source image.
        body: (V,) voxel lies in the body mask (all True when no mask applies).
        local_grid, global_grid: LPS geometry of the maps.
        image_grid: geometry of the original image.
        model_id, key: identity of the model and the cache key.
        n_local: channels of the local map (the rows of ``features``).
        ready: (V,) bool, voxels whose features (and ``global_norm``) are computed; None when all are.
        global_norm: (V,) float32 on the CPU: the length of each voxel's upsampled global vector before it is
            normalised (:func:`samembed.tiles.upsample_lengths_box`), computed when the voxel's local vector is; 1
            where not computed.
    """

    global_: torch.Tensor
    features: torch.Tensor
    valid: torch.Tensor
    body: torch.Tensor
    local_grid: Grid
    global_grid: Grid
    image_grid: Grid
    model_id: str
    key: str
    n_local: int
    image_name: str = ""
    ready: torch.Tensor | None = None
    global_norm: torch.Tensor | None = None  # set by the embedder (see the attributes above)
    tiles: object | None = field(default=None, repr=False)  # a TileComputer filling ``features`` on demand
    _compact: dict = field(default_factory=dict, repr=False)
    dirty: bool = field(default=False, repr=False)  # tiles computed since the last disk write
    #: (entry, body voxels whose local vectors it holds): the disk entry these maps were read from or written to
    #: last; None: neither. A tile outside the body makes the maps dirty but stores nothing: the entry is not rewritten
    stored_on_disk: tuple[Path, int] | None = field(default=None, repr=False)
    _fills: int = field(default=0, repr=False)  # fills run (``ready`` changes only in them or before any read)
    _touched: tuple | None = field(default=None, repr=False)  # (fills, touched fraction), see nbytes
    _coarse_rows: torch.Tensor | None = field(default=None, repr=False)  # the global map channels last, see global_at
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)  # held while tiles are filled

    @property
    def vectors(self) -> torch.Tensor:
        """(V, C_l) the local vectors voxel by voxel: each row one voxel's local vector (a view)."""
        return self.features.T

    @property
    def local(self) -> torch.Tensor:
        """(C_l, *shape) local unit vectors: a view of ``features`` (all voxels computed)."""
        self.ensure_all()
        return self.features.reshape(self.n_local, *self.local_grid.shape_zyx)

    @property
    def channels(self) -> int:
        """C_l + C_g: the length of a voxel's whole vector (:meth:`rows_at`), local then global."""
        return int(self.n_local + self.global_.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the computed features, the global map, masks and compact copies, and the network input
        (or image) kept to compute the rest (:attr:`TileComputer.nbytes`), bytes."""
        row_bytes = self.features.element_size() * self.features.shape[0]
        ready = self.ready  # read once: a fill in another thread may set it to None
        if ready is None:
            frac = 1.0
        else:  # the memory cache asks on every put, for every item: counted again only after a fill
            fills = self._fills
            if self._touched is None or self._touched[0] != fills:
                self._touched = (fills, _touched_fraction(ready, 4096 // row_bytes))
            frac = self._touched[1]
        tensors = [self.global_, self.valid, self.body, self.global_norm]
        tensors += [] if self._coarse_rows is None else [self._coarse_rows]
        tensors += [t for pair in tuple(self._compact.values()) for t in pair]
        feat = self.features.element_size() * self.features.nelement() * frac
        tiles = self.tiles  # (read once: a fill in another thread may drop it)
        held = 0 if tiles is None else tiles.nbytes
        return int(feat) + sum(t.element_size() * t.nelement() for t in tensors) + held

    # ----------------------------------------------------------------------------- on-demand filling
    @property
    def complete(self) -> bool:
        """Every voxel's features are computed."""
        return self.ready is None

    def ensure(self, lo_zyx: np.ndarray, hi_zyx: np.ndarray, need: torch.Tensor | None = None) -> None:
        """Compute the features of the inclusive local-grid boxes ``lo_zyx..hi_zyx`` ((N, d) or (d,) each).

        Args:
            need: (V,) bool; only these voxels of the boxes must be computed (e.g. the search mask). None: all.
        """
        with self._lock:  # (another thread may fill these maps, and set ``ready`` to None once all are computed)
            if self.ready is None:
                return
            shape = self.local_grid.shape_zyx
            lo = np.atleast_2d(np.asarray(lo_zyx, dtype=np.int64))
            hi = np.atleast_2d(np.asarray(hi_zyx, dtype=np.int64))
            missing = np.zeros(shape, dtype=bool)  # the boxes' voxels, then those of them to compute
            for a, b in zip(np.maximum(lo, 0).tolist(), np.minimum(hi, np.asarray(shape) - 1).tolist()):
                if any(x > y for x, y in zip(a, b)):  # wholly outside the grid (a negative end would wrap around)
                    continue
                missing[tuple(slice(x, y + 1) for x, y in zip(a, b))] = True
            missing &= ~self.ready.reshape(shape).numpy()
            if need is not None:
                missing &= need.reshape(shape).cpu().numpy()
            self._fill(missing)

    def ensure_flat(self, flat: np.ndarray | torch.Tensor) -> None:
        """Compute the features at flat local-grid voxel indices."""
        with self._lock:
            if self.ready is None:
                return
            flat = np.asarray(flat.cpu() if isinstance(flat, torch.Tensor) else flat, dtype=np.int64).reshape(-1)
            todo = flat[~self.ready.numpy()[flat]]
            if len(todo):
                missing = np.zeros(self.local_grid.shape_zyx, dtype=bool)
                missing.reshape(-1)[todo] = True
                self._fill(missing)

    def ensure_all(self, need: torch.Tensor | None = None, cancel: threading.Event | None = None) -> None:
        """Compute every voxel's features (only those in ``need`` (V,) bool when given).

        Args:
            cancel: checked between tiles; when set, raises :class:`Cancelled` (the tiles computed so far are kept).
        """
        with self._lock:
            if self.ready is None:
                return
            missing = ~self.ready.numpy() if need is None else (~self.ready & need.cpu()).numpy()
            self._fill(missing.reshape(self.local_grid.shape_zyx), cancel)

    def _fill(self, missing_zyx: np.ndarray, cancel: threading.Event | None = None) -> None:
        if not missing_zyx.any():
            return
        with self._lock, contextlib.nullcontext() if matching_concurrently() else _FILL_LOCK:
            if self.ready is None:
                return
            missing_zyx &= ~self.ready.reshape(missing_zyx.shape).numpy()
            if not missing_zyx.any():
                return
            if self.tiles is None:
                raise RuntimeError(f"{self.image_name}: features missing and no way to compute them; embed it again")
            try:
                self.tiles.fill(self, missing_zyx, cancel)
            finally:
                self.dirty = True  # also after a cancel: the tiles computed so far are kept and saved
                self._fills += 1
            if bool(self.ready.all()):
                self.ready = None
                self.tiles = None  # drop the network input once everything is computed

    def global_at(self, flat: torch.Tensor) -> torch.Tensor:
        """(C_g, M) float32 upsampled, normalised global vectors at flat local voxels (CPU; no local tile needed):
        the same values, bit for bit, whether the voxels' tiles are computed or not, and whichever way (whole planes
        or single voxels) they are upsampled, so nothing depends on which tiles earlier searches computed. Each is
        divided by its own length (:func:`~samembed.tiles.normalize_channels`), which equals the voxel's
        ``global_norm`` to float rounding (about 1e-7)."""
        from .tiles import coarse_rows, normalize_channels, upsample_at, upsample_box

        shape = self.local_grid.shape_zyx
        glob = self.global_.cpu()
        flat = flat.cpu().reshape(-1)
        out = torch.empty((glob.shape[0], len(flat)), dtype=torch.float32)
        if len(flat) == 0:
            return out
        plane = int(np.prod(shape[1:]))
        if len(flat) * 8 >= plane * (int(flat.max()) // plane - int(flat.min()) // plane + 1):
            # many voxels of few planes (a body's search copy): the planes upsampled a slab at a time (separable
            # passes instead of eight gathered corners per voxel) and the voxels picked
            z = flat // plane
            slab = max(1, (32 << 20) // max(1, plane * glob.shape[0] * 4))
            hi_plane = np.asarray(shape[1:]) - 1
            for z0 in range(int(z.min()), int(z.max()) + 1, slab):
                z1 = min(int(z.max()), z0 + slab - 1)
                sel = torch.nonzero((z >= z0) & (z <= z1)).reshape(-1)
                if len(sel) == 0:
                    continue
                up = upsample_box(glob, shape, np.array([z0, *[0] * len(hi_plane)]), np.array([z1, *hi_plane]))
                out[:, sel] = normalize_channels(up.reshape(up.shape[0], -1)[:, flat[sel] - z0 * plane])
            return out
        if self._coarse_rows is None:  # the map channels last, kept: a sub-voxel fit asks for a few voxels at a time
            self._coarse_rows = coarse_rows(glob)
        for i in range(0, len(flat), 1 << 15):  # a chunk's eight corners (8 x 32 k x C_g floats) at a time
            part = flat[i:i + (1 << 15)].numpy()
            zyx = np.stack(np.unravel_index(part, shape), 1)
            out[:, i:i + len(part)] = normalize_channels(upsample_at(glob, shape, zyx, rows=self._coarse_rows))
        return out

    def rows_at(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, C_l + C_g) float32 whole vectors (local, then the normalised global) of flat local voxels whose
        features are computed (:meth:`ensure_flat`), on the features' device: a query's vector, or a voxel's for a
        product with one."""
        loc = self.vectors[flat.to(self.features.device)].float()
        return torch.cat([loc, self.global_at(flat).T.to(loc.device)], 1)

    def global_similarity_box(self, queries_global: torch.Tensor, lo_zyx: np.ndarray, hi_zyx: np.ndarray) -> torch.Tensor:
        """(Q, U) float32 cosine similarity of global query vectors ``queries_global`` (Q, C_g) with the upsampled,
        normalised global vector of every voxel of the inclusive local-grid box ``lo_zyx..hi_zyx`` (U voxels, C
        order), whose features are computed (its ``global_norm``), on the CPU.

        Linear interpolation commutes with the products: the coarse map's products with the queries (Q x coarse
        voxels, a few MB) are upsampled to the box and divided by each voxel's ``global_norm``, instead of a product
        with C_g stored values per voxel. Equal to the product with :meth:`global_at`'s vectors to float rounding
        (about 1e-7)."""
        from .tiles import coarse_span, upsample_part

        lo, hi = np.asarray(lo_zyx, dtype=np.int64), np.asarray(hi_zyx, dtype=np.int64)
        shape = self.local_grid.shape_zyx
        glob = self.global_.cpu()
        gshape = tuple(glob.shape[1:])
        span = coarse_span(gshape, shape, lo, hi)  # the coarse voxels the box reads
        part = glob[(slice(None), *span)].float()
        coarse = (queries_global.cpu().float() @ part.reshape(part.shape[0], -1)).reshape(-1, *part.shape[1:])
        up = upsample_part(coarse, gshape, span, shape, lo, hi)
        norms = self.global_norm.view(shape)[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))]
        return up.div_(norms).reshape(len(coarse), -1)

    def compact_features(self, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat indices (M,), features (C, M))`` of the voxels in ``allowed`` (V,) bool.

        A query then costs a product with the searched voxels only (the body is often under half the grid).
        The copy for the most recent mask is kept (a second one for a second mask), so repeated queries with
        the default search mask reuse it. On-demand maps compute the allowed voxels first.
        """
        mask = allowed.to(torch.bool).cpu().numpy()
        key = _mask_key(mask)
        hit = self._compact.get(key)
        if hit is not None:
            return hit
        with self._lock:  # made once, whichever thread asks first (targets matched at once share a source)
            hit = self._compact.get(key)
            if hit is None:
                from .tiles import write_rows

                self.ensure_all(allowed)
                idx = torch.from_numpy(np.flatnonzero(mask)).to(self.features.device)
                rows = torch.empty((len(idx), self.channels), dtype=self.features.dtype, device=self.features.device)
                for i in range(0, len(idx), 1 << 14):  # whole local rows gathered, a block at a time
                    rows[i:i + (1 << 14), : self.n_local] = self.vectors[idx[i:i + (1 << 14)]]
                write_rows(rows[:, self.n_local:], [self.global_at(idx)])
                hit = (idx, rows.T)  # (C, M), a view of (M, C)
                kept = dict(list(self._compact.items())[-1:])  # the most recent other one, and this one
                kept[key] = hit
                self._compact = kept
        return hit

    @property
    def local_channels(self) -> int:
        return int(self.n_local)

    def search_mask(self, use_body: bool = True) -> torch.Tensor:
        """Voxels a match may land on: inside the image, and inside the body when ``use_body``.

        This is the one place of the rule "the body, else every valid voxel": an image in which no body was
        found (all voxels below the body threshold) is searched everywhere inside it.
        """
        if not use_body:
            return self.valid
        inside = self.valid & self.body
        return inside if bool(inside.any()) else self.valid


def _mask_key(mask: np.ndarray) -> tuple[int, int]:
    """A cheap identity of a (V,) bool search mask, for the copies kept per mask."""
    return int(mask.sum()), hash(np.packbits(mask).tobytes())


def _touched_fraction(ready: torch.Tensor, page_voxels: int) -> float:
    """Fraction of the feature buffer's 4 KB memory pages that hold a computed voxel (``page_voxels`` voxels'
    vectors to a page)."""
    page_voxels = max(1, int(page_voxels))
    n = len(ready)
    pad = (-n) % page_voxels
    flat = torch.cat([ready, torch.zeros(pad, dtype=torch.bool)]) if pad else ready
    return float(flat.reshape(-1, page_voxels).any(1).float().mean())


class EmbeddingCache:
    """LRU cache of :class:`EmbeddingMaps` bounded by total bytes (in memory)."""

    def __init__(self, max_bytes: int = 3 << 30) -> None:
        self.max_bytes = int(max_bytes)
        #: the most recent maps that always stay, even above the cap: a source and its target; one more per further
        #: target matched at once (:func:`samembed.jobs.cache_floor`), else one thread's put evicts the shared source
        self.min_kept = 2
        self._items: OrderedDict[str, EmbeddingMaps] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> EmbeddingMaps | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, maps: EmbeddingMaps) -> None:
        with self._lock:
            self._items[key] = maps
            self._items.move_to_end(key)
            # the most recent (a source and its target) always stay, even above the cap: evicting one of them
            # would recompute it on every match of the pair
            while len(self._items) > self.min_kept and self._held_bytes() > self.max_bytes:
                self._items.popitem(last=False)

    def discard(self, key: str) -> None:
        """Drop the maps under ``key``, if held."""
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held now (under the lock: read while a worker stores maps, the dict changed under the sum: a
        review)."""
        with self._lock:
            return self._held_bytes()

    def _held_bytes(self) -> int:
        """Bytes held now; the caller holds the lock."""
        return sum(m.nbytes for m in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file, False also where it cannot be told (a folder this user may not search: Python's
    ``Path.is_file`` raises then)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _grid_to_dict(g: Grid) -> dict:
    return {"shape_zyx": list(g.shape_zyx), "spacing_mm": g.spacing_mm.tolist(), "origin_lps_mm": g.origin_lps_mm.tolist(),
            "direction": g.direction.ravel().tolist()}


def _grid_from_dict(d: dict) -> Grid:
    return Grid(tuple(d["shape_zyx"]), d["spacing_mm"], d["origin_lps_mm"], np.array(d["direction"]))


@dataclass(frozen=True)
class PrepareSettings:
    """How an :class:`Embedder` makes the network input of an image (:func:`prepare_input`): the model's
    preprocessing, the modality asked for, the padding multiple (z, y, x) the network needs, the local map's stride
    (z, y, x; the grid of the body mask) and the prefetch process whose inputs to take first (None: none)."""

    preprocess: object  # samembed.preprocess.PreprocessConfig
    modality: str
    pad_multiple_zyx: tuple[int, ...]
    local_stride_zyx: tuple[int, ...]
    prefetch: object | None = None  # samembed.prefetch.Prefetch


def prepare_input(settings: PrepareSettings, image: Image) -> tuple[np.ndarray, Grid, str, np.ndarray | None]:
    """Padded network input (zyx float32), its grid, the modality used, and its body mask on the local grid when
    the prefetch process made it with the input (else None: the embedder makes it)."""
    pad = settings.pad_multiple_zyx
    prefetch = settings.prefetch
    prep = None if prefetch is None else prefetch.take(image.content_hash(), settings.preprocess, settings.modality, pad)
    if prep is None:
        prep = preprocess(image, settings.preprocess, settings.modality, pad)  # CT comes padded (no copy below)
    else:
        log.debug("%s: preprocessed ahead by the prefetch process", image.name)
    if onto_lps_axes(image.grid):
        off = ("pixel axes lie %.0f degrees off x and y: the network's input is resampled onto them (the networks "
               "learnt from radiographs stored along x and y)" if image.ndim == 2 else
               "voxel axes lie %.0f degrees off the patient's (LPS) axes: the network's input is resampled onto the "
               "LPS axes (the networks learnt from axial scans)")
        log.info("%s: its " + off, image.name, obliquity_deg(image.grid.direction))
    arr = pad_to_multiple(prep.array, pad, prep.fill_value)
    grid = Grid(arr.shape, prep.grid.spacing_mm, prep.grid.origin_lps_mm, prep.grid.direction)
    made = prep.body_stride_zyx is not None and tuple(prep.body_stride_zyx) == tuple(settings.local_stride_zyx)
    body = prep.body if made else None
    return arr, grid, prep.modality, body


def global_box(body: np.ndarray, local_stride_zyx: tuple[int, ...], global_stride_zyx: tuple[int, ...],
               margin_vox: int, shape_zyx: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The part of a network input that its global map is computed over: the box of the ``body`` mask (on the local
    grid, ``local_stride_zyx`` input voxels per voxel) grown by ``margin_vox`` input voxels per side, its ends on the
    global map's grid (multiples of ``global_stride_zyx``) and inside the input of shape ``shape_zyx``. Returns the
    input's slices (z, y, x), or None when the box is the whole input or the mask is empty.

    The global branch learned from views that are cubes of about 320 mm cut from scans, and the air of a wide field
    of view costs convolutions for nothing: about half of a head-and-neck CT's global input lies more than 32 mm from
    the body. The map over the box is close to the whole input's, not the same (mean cosine similarity of the body's
    vectors 0.97-0.99 with a 32 mm margin on head-and-neck CTs): the global branch reaches across the whole scan, so
    the field of view moves its vectors.
    """
    idx = np.argwhere(np.asarray(body))
    if len(idx) == 0:
        return None
    ls, gs, shape = np.asarray(local_stride_zyx), np.asarray(global_stride_zyx), np.asarray(shape_zyx)
    lo = np.maximum((idx.min(0) * ls - margin_vox) // gs * gs, 0)
    hi = np.minimum(-(-((idx.max(0) + 1) * ls + margin_vox) // gs) * gs, shape)
    if (lo == 0).all() and (hi == shape).all():
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _prepared_input(settings: PrepareSettings, image: Image) -> np.ndarray:
    """The padded network input alone (a :class:`TileComputer`'s ``prepare``)."""
    return prepare_input(settings, image)[0]


@dataclass(frozen=True)
class TileNetwork:
    """What a :class:`TileComputer` needs of its :class:`Embedder` to embed tiles: the network that embeds (batch
    norms folded, maybe int8), its spec, the device, half precision (CUDA) and the tile size cap (input voxels).

    The tile computer holds this, not the embedder: an embedder's cache holds the maps, the maps hold their tile
    computer, and a tile computer that held the embedder would close a reference cycle, so that a dropped matcher's
    maps (hundreds of MB to GBs) would stay in memory until Python's cyclic garbage collector happened to run."""

    net: torch.nn.Module
    spec: object  # samembed.networks.base.NetSpec
    device: torch.device
    half: bool
    max_tile_voxels: int


class TileComputer:
    """Fills the features of on-demand :class:`EmbeddingMaps` tile by tile from the network input.

    Each tile is an input box starting on a multiple of ``tile_multiple``, embedded with ``tile_halo`` input voxels
    of context per side (clipped at the volume's edge, as the whole-volume run pads there too), so its local map
    equals the whole-volume map; the lengths of the upsampled global vectors (``global_norm``) are computed on the
    tile's box only (:func:`samembed.tiles.upsample_lengths_box`, bit-identical to the whole-volume ones).

    Args:
        network: the :class:`TileNetwork` of the :class:`Embedder` that made the maps (:attr:`Embedder.tile_network`).
        prepare: returns the padded network input (zyx float32); called once, on the first tile needed (a map
            loaded from the disk cache needs no preprocessing until a search leaves its stored voxels). It must not
            hold the embedder either (see :class:`TileNetwork`).
    """

    #: input voxels run through the local branch by every tile of this process, halos included: what its
    #: on-demand embedding has cost (the Slicer module's engine process reports it, ``EngineProcess.inputVoxels``)
    process_input_voxels = 0

    def __init__(self, network: TileNetwork, prepare: Callable[[], np.ndarray], held_bytes: int = 0) -> None:
        self.network = network
        self._prepare: Callable[[], np.ndarray] | None = prepare
        self._held_bytes = int(held_bytes)  # what ``prepare`` holds until it is called (the input, or an image)
        self._x: torch.Tensor | None = None
        self.tiles_computed = 0
        self.input_voxels = 0  # input voxels run through the local branch, halos included

    @property
    def nbytes(self) -> int:
        """Memory this holds, bytes: the network input once prepared, else what ``prepare`` holds to make it (the
        ``held_bytes`` given). The embedding cache counts it with the maps (:attr:`EmbeddingMaps.nbytes`): a
        target's took 53 MB of a head CT beside its 33 MB of features, uncounted, so that memory rose to about
        3x the cache's limit."""
        x = self._x
        return self._held_bytes if x is None else x.element_size() * x.nelement()

    def input(self) -> torch.Tensor:
        """The network input (1, 1, *shape_zyx), prepared once; what prepared it is let go (an image kept to
        prepare it is freed, unless held elsewhere)."""
        if self._x is None:
            x = torch.from_numpy(np.ascontiguousarray(self._prepare()))[None, None].to(self.network.device)
            self._x = x.half() if self.network.half else x
            self._prepare = None
        return self._x

    def fill(self, maps: EmbeddingMaps, missing_zyx: np.ndarray, cancel: threading.Event | None = None) -> None:
        """Compute the tiles covering ``missing_zyx`` (local grid, bool) and write them into ``maps``; ``cancel``
        is checked before each tile (raises :class:`Cancelled`; every finished tile is kept)."""
        from .tiles import plan_tiles

        cancel = cancel if cancel is not None else _TILE_CANCEL.get()
        spec = self.network.spec
        x = self.input()
        step = spec.tile_multiple[-1]
        halo = int(np.ceil(spec.tile_halo / step) * step)
        plan = plan_tiles(missing_zyx, spec.local_stride[-1], step, halo, tuple(x.shape[2:]))
        boxes = [((0,) * (x.dim() - 2), tuple(x.shape[2:]))] if plan.whole else plan.boxes_input
        for start, stop in boxes:
            self._box(maps, start, stop, step, halo, missing_zyx, cancel)

    def _box(self, maps: EmbeddingMaps, start, stop, step: int, halo: int, missing_zyx: np.ndarray,
             cancel: threading.Event | None = None) -> None:
        """Embed the input box ``[start, stop)`` (slabs along z when it exceeds ``max_tile_voxels``)."""
        x = self.input()
        shape_in = tuple(x.shape[2:])
        area = int(np.prod([min(s, b + halo) - max(0, a - halo) for a, b, s in zip(start[1:], stop[1:], shape_in[1:])]))
        core = max(step, (self.network.max_tile_voxels // max(area, 1)) // step * step - 2 * halo)
        for z0 in range(start[0], stop[0], core):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{maps.image_name}: embedding cancelled")
            z1 = min(stop[0], z0 + core)
            self._tile(maps, (z0, *start[1:]), (z1, *stop[1:]), halo, missing_zyx)

    def _tile(self, maps: EmbeddingMaps, start, stop, halo: int, missing_zyx: np.ndarray) -> None:
        """Embed the input box ``[start, stop)`` and store the grid lines (along the last axis) of its local box that
        hold a ``missing_zyx`` voxel: a large tile asked for a sparse set (the body in a wide field of view, the
        corners of search windows) then makes only those lines' memory pages resident, and the lengths of its
        upsampled global vectors (``global_norm``) are computed and its local vectors normalised on those lines only.
        A tile of whole planes of which at least half the lines are wanted is computed in place instead
        (:meth:`_tile_in_place`)."""
        from .tiles import spans_whole_planes

        tn = self.network
        x = self.input()
        sl = tn.spec.local_stride[-1]
        a = [max(0, s - halo) for s in start]
        b = [min(n, e + halo) for e, n in zip(stop, x.shape[2:])]
        xin = x[(slice(None), slice(None), *(slice(p, q) for p, q in zip(a, b)))]
        ctx = (tuple(s - p for s, p in zip(start, a)), tuple(q - e for e, q in zip(stop, b)))
        shape = maps.local_grid.shape_zyx
        lo = np.array([s // sl for s in start])
        hi = lo + np.array([-(-(e - s) // sl) for s, e in zip(start, stop)]) - 1
        box = tuple(slice(int(p), int(q) + 1) for p, q in zip(lo, hi))
        lines = missing_zyx[box].any(-1)
        wanted = float(lines.mean())  # the share of the box's lines to store
        if (spans_whole_planes(box, shape) and wanted >= 0.5 and not tn.half and maps.features.dtype == torch.float32
                and maps.features.device.type == "cpu" and tn.device.type == "cpu"
                # (in place, the box's computed voxels are written over, then restored: not while another thread
                # may read them)
                and not (matching_concurrently() and bool(maps.ready.view(shape)[box].any()))):
            self._tile_in_place(maps, xin, ctx, lo, hi, box)
        else:
            self._tile_stored(maps, xin, ctx, lo, hi, lines, wanted)
        self.tiles_computed += 1
        n = int(np.prod([q - p for p, q in zip(a, b)]))
        self.input_voxels += n
        with _CONCURRENT_LOCK:  # (tiles of several maps may be filled at once: concurrent_matching)
            TileComputer.process_input_voxels += n

    def _tile_stored(self, maps: EmbeddingMaps, xin: torch.Tensor, ctx, lo: np.ndarray, hi: np.ndarray,
                     lines: np.ndarray, wanted: float) -> None:
        """:meth:`_tile` through the tile's own buffers: the whole box (every line wanted) or its wanted ``lines``
        gathered, then written into the voxels' feature rows (voxels computed before keep their values)."""
        from .tiles import upsample_lengths_box, upsample_lines, write_rows

        tn = self.network
        shape = maps.local_grid.shape_zyx
        with torch.inference_mode(), torch.autocast(tn.device.type, dtype=torch.float16, enabled=tn.half):
            loc = tn.net.forward_local_core(xin, *ctx)[0]
        nx = int(hi[-1] - lo[-1] + 1)
        with torch.inference_mode():  # the tile is an inference tensor: normalised in place in that mode
            # the local vectors are normalised along their rows on the way into the buffer (write_rows), as a
            # whole-plane tile normalises them there: a voxel's vector does not depend on the path that made it
            if lines.all():  # every line: the whole box
                held = np.nonzero(np.ones(lines.shape, dtype=bool))
                loc = loc.float()
                norms = upsample_lengths_box(maps.global_.cpu(), shape, lo, hi)
            else:  # the wanted lines only, gathered (a voxel's vector is the same either way, bit for bit)
                held = np.nonzero(lines)
                sel = tuple(torch.from_numpy(v) for v in held)
                if wanted <= 0.4:  # few lines: upsampled one by one (measured: faster below about 45 %)
                    norms = upsample_lines(maps.global_.cpu(), shape, lo, hi, held, lengths=True)
                else:
                    norms = upsample_lengths_box(maps.global_.cpu(), shape, lo, hi)[(*sel, slice(None))]
                loc = loc[(slice(None), *sel, slice(None))].float()
        # the flat voxel index of each stored value, in the parts' order (line by line, x fastest)
        line_zyx = (*(v + int(o) for v, o in zip(held, lo[:-1])), np.full(len(held[0]), lo[-1]))
        starts = np.ravel_multi_index(line_zyx, shape)  # each stored line's first voxel
        flat = torch.from_numpy((starts[:, None] + np.arange(nx)).reshape(-1))
        loc, norms = loc.reshape(loc.shape[0], -1), norms.reshape(-1)
        new = ~maps.ready[flat]
        if not bool(new.all()):  # voxels computed before keep their values: a result never changes within a session
            flat, loc, norms = flat[new], loc[:, new], norms[new]
        write_rows(maps.vectors, [loc], flat, unit=slice(0, maps.n_local))
        del loc
        maps.global_norm[flat] = norms
        maps.ready[flat] = True

    def _tile_in_place(self, maps: EmbeddingMaps, xin: torch.Tensor, ctx, lo: np.ndarray, hi: np.ndarray,
                       box: tuple[slice, ...]) -> None:
        """:meth:`_tile` for a box of whole planes (every line but the first axis's range: a whole volume, a slab)
        of which most lines are wanted: the network's output layer writes straight into the voxels' feature rows
        and they are normalised there; the lengths of the upsampled global vectors (``global_norm``) come from the
        coarse planes (:func:`~samembed.tiles.upsample_lengths_box`). No tile-sized temporaries and no copies of the
        tile (a whole OpenKBP volume holds 2 x 330 MB of them). Every line is stored: with at least half of them
        wanted, the unwanted ones hold no more memory than the temporaries they spare (a whole LIDC tile for 50
        points: 2/3 of the lines). The values are those of :meth:`_tile_stored`
        bit for bit (the local vectors normalised along their rows in both, :func:`~samembed.tiles.normalize_rows`)."""
        from .tiles import normalize_rows, upsample_lengths_box

        shape = maps.local_grid.shape_zyx
        plane = int(np.prod(shape[1:]))
        first, end = int(lo[0]) * plane, (int(hi[0]) + 1) * plane
        rows = maps.vectors[first:end]  # (voxels of the box, C_l), the box's rows
        norms = maps.global_norm[first:end]
        done = maps.ready.view(shape)[box].reshape(-1).to(rows.device)  # the box's voxels, in the rows' order
        keep = (rows[done], norms[done.cpu()]) if bool(done.any()) else None  # copies
        with torch.inference_mode():
            # (C_l, voxels) with unit stride along the channels: the output product writes the rows in place
            self.network.net.forward_local_core(xin, *ctx, out=rows.T)
            normalize_rows(rows)
            norms.copy_(upsample_lengths_box(maps.global_.cpu(), shape, lo, hi).reshape(-1))
        if keep is not None:  # voxels computed before keep their values: a result never changes within a session
            rows[done] = keep[0]
            norms[done.cpu()] = keep[1]
        maps.ready.view(shape)[box] = True


class Embedder:
    """Computes and caches embeddings of images for one model.

    Networks with a separate global branch (``sam-lite``) are embedded on demand: :meth:`embed` with
    ``on_demand=True`` computes the global map for the whole volume and leaves the local map to the tiles that
    searches ask for (:meth:`EmbeddingMaps.ensure`); without it, every voxel is computed (the same tiles, all of
    them). Other networks are always embedded whole.

    Args:
        model: the loaded model.
        device: a torch device (see :func:`resolve_device`).
        cache: in-memory LRU cache (shared between embedders is fine; keys include the model).
        cache_dir: optional folder for the on-disk cache (body voxels only, packed local vectors, checksummed).
        max_tile_voxels: input voxels above which the local branch is run in slabs with a halo.
        modality: "auto", "ct", "mri" or "xray".
        precision: the network's arithmetic (see :func:`resolve_precision`): "auto", "fp32", "int8", "int8-int8" or
            "int8-bf16".
    """

    def __init__(self, model: LoadedModel, device: torch.device | str = "cpu", cache: EmbeddingCache | None = None,
                 cache_dir: str | Path | None = None, max_tile_voxels: int = 24_000_000, modality: str = "auto",
                 precision: str = "auto") -> None:
        self.model = model
        self.device = resolve_device(device)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._cache_write_failed = False  # a write to cache_dir failed: it is only read from
        self._unreadable: set[Path] = set()  # entries this process may not read: never replaced by it
        self._replaced: set[Path] = set()  # entries this process found damaged or older: replaced, whatever they hold
        self.max_tile_voxels = int(max_tile_voxels)
        self.modality = modality
        self._detected: dict[str, str] = {}  # content hash -> detected modality (_key_modality), a few images
        self.model.net.to(self.device)
        #: the network that embeds: the model's, with batch norms folded into the convolutions
        self.net = inference_copy(self.model.net).to(self.device)
        self.half = self.device.type == "cuda"
        self.precision = resolve_precision(precision, model, self.device)
        #: inputs preprocessed ahead in another process (:mod:`samembed.prefetch`, set by ``samembed match``)
        self.prefetch = None
        #: the int8 calibration's own id: another calibration of the same weights gives other vectors
        self._calibration_id = "" if not model.int8 else hashlib.sha256(
            json.dumps(sorted(model.int8.items())).encode()).hexdigest()[:16]
        if self.precision.startswith("int8"):
            from .networks.int8 import SamLiteInt8

            glob = {"int8-bf16": "bf16", "int8-int8": "int8"}.get(self.precision, "fp32")
            self.net = SamLiteInt8(self.net, model.int8, global_precision=glob)

    def storing_in(self, cache_dir: str | Path | None) -> Embedder:
        """This embedder with another on-disk cache folder: the same network (no second copy of it), precision,
        settings and in-memory cache; e.g. a worker's embedder reading and writing a run's atlas folder."""
        import copy

        other = copy.copy(self)
        other.cache_dir = Path(cache_dir) if cache_dir else None
        other.prefetch = None
        return other

    @property
    def local_stride_zyx(self) -> tuple[int, ...]:
        """The local map's stride in input voxels, (z, y, x): the grid of the body mask."""
        return tuple(int(s) for s in reversed(self.model.spec.local_stride))

    @property
    def on_demand_capable(self) -> bool:
        """The network's local branch can be tiled exactly apart from its global branch."""
        net = self.net
        return bool(net.has_separate_global and net.spec.tiles_exact)

    @property
    def tile_network(self) -> TileNetwork:
        """What this embedder's on-demand maps embed their tiles with (see :class:`TileNetwork`)."""
        return TileNetwork(self.net, self.model.spec, self.device, self.half, self.max_tile_voxels)

    @property
    def prepare_settings(self) -> PrepareSettings:
        """How this embedder makes a network input from an image (see :func:`prepare_input`)."""
        return PrepareSettings(self.model.preprocess, self.modality, tuple(reversed(self.model.spec.pad_multiple)),
                               self.local_stride_zyx, self.prefetch)

    def key(self, image: Image) -> str:
        """Cache key: image content hash + model id + preprocessing + modality + how an entry stores the local vectors
        (:data:`~samembed.tiles.LOCAL_ENCODING`) + the arithmetic (precision; for int8
        whether oneDNN sums with VNNI, :func:`~samembed.networks.int8.int8_arithmetic`, and the calibration; on CUDA
        the float16 autocast) (and, for a grid more oblique than :data:`~samembed.preprocess.OBLIQUE_LIMIT_DEG`, that
        its input lies on the LPS axes, and for a 2D grid whose axes are flipped or permuted, that its input is
        oriented: such maps were made on the image's own axes before)."""
        prep = json.dumps(self.model.preprocess.to_dict(), sort_keys=True)
        if onto_lps_axes(image.grid):
            prep += "|lps-axes"
        elif image.grid.ndim == 2 and axes_reoriented(image.grid):
            prep += "|lps-2d"  # its input is flipped or permuted onto x and y: before, it kept the stored axes
        arithmetic = self.precision
        if self.precision.startswith("int8"):  # oneDNN's int8 path differs with and without VNNI (int8_arithmetic)
            from .networks.int8 import int8_arithmetic

            arithmetic += f"|{int8_arithmetic()}|{self._calibration_id}"
        if self.half:  # CUDA: the convolutions run in float16 (autocast), whatever the precision's name
            arithmetic += "|fp16-autocast"
        # the entry's format too: a version that stores another encoding (half-precision vectors before) keeps its own
        # entries in a shared folder, instead of each replacing the other's on every run
        h = hashlib.sha256(f"{image.content_hash()}|{self.model.model_id}|{prep}|{self._key_modality(image)}|{NUMERICS}|{arithmetic}|"
                           f"{LOCAL_ENCODING}".encode())
        h = h.hexdigest()
        return h[:32]

    def _key_modality(self, image: Image) -> str:
        """The modality in ``image``'s cache key: "auto" also where the modality asked for is the one "auto" finds
        (``--modality ct`` on a CT), whose maps are the same: one entry, not two, for the same scan."""
        if self.modality == "auto":
            return "auto"
        digest = image.content_hash()
        detected = self._detected.get(digest)
        if detected is None:
            if len(self._detected) > 64:
                self._detected.clear()
            detected = self._detected[digest] = detect_modality(image)
        return "auto" if detected == self.modality else self.modality

    def _remember_modality(self, image: Image, modality: str) -> None:
        if self.modality != "auto":  # (then _detected holds what auto would find: _key_modality)
            return
        digest = image.content_hash()
        if digest not in self._detected and len(self._detected) > 64:
            self._detected.clear()
        self._detected[digest] = modality

    def used_modality(self, image: Image) -> str | None:
        """The modality ``image``'s intensities were mapped as when this embedder computed its maps (found by
        ``auto``, or the one asked for); None when its maps came from a cache and it was not found out here."""
        if self.modality != "auto":
            return self.modality
        return self._detected.get(image.content_hash())

    def embed(self, image: Image, progress: ProgressFn | None = None, cancel: threading.Event | None = None,
              on_demand: bool = False) -> EmbeddingMaps:
        """Embeddings of ``image`` (from the memory cache, else the disk cache, else computed).

        Args:
            on_demand: compute the local map only where :meth:`EmbeddingMaps.ensure` asks for it (the caller
                ensures what it reads); False: every voxel is computed before returning.
        """
        key = self.key(image)
        maps = self.cache.get(key)
        if maps is None:
            if self.modality == "ct":  # (here, not in the prefetch process that may prepare it: its log is not shown)
                warn_offset_ct(image)
            maps = self._load_disk(key, image)
            if maps is None:
                maps = self._compute(image, key, progress, cancel, on_demand and self.on_demand_capable)
                # new to the disk cache: written at the next settle, also over an entry that was damaged, older or
                # another image's (a network embedded whole computes no tile that would say so)
                maps.dirty = True
            self.cache.put(key, maps)
        if not on_demand:
            if progress and not maps.complete:
                progress(0, 1, "embedding")
            maps.ensure_all()
            # the compact copy of the searched voxels' features is left to the first search over the whole grid
            # (a windowed search never reads it; it would hold up to a second copy of the body's features)
            self.settle(maps)
        return maps

    def holds(self, image: Image) -> bool:
        """Whether :meth:`embed` finds ``image``'s maps in the memory cache or an entry of them in the disk cache
        (then it computes no map of its own: at most the local tiles that searches ask for)."""
        key = self.key(image)
        path = self._disk_path(key)
        return self.cache.get(key) is not None or (path is not None and _is_file(path))

    def forget(self, image: Image) -> None:
        """Drop ``image``'s maps from the memory cache (the disk cache keeps what it holds): for a caller that knows it
        will not match the image again (the command, after a target other than the source)."""
        self.cache.discard(self.key(image))

    def embed_body(self, image: Image, progress: ProgressFn | None = None,
                   cancel: threading.Event | None = None) -> EmbeddingMaps:
        """Embeddings of ``image`` with the local map computed over its body only, written to the disk cache: what a
        cache entry holds (the global map and the body's local vectors). The air around the body, about nine tenths
        of a head-and-neck CT's grid, is never embedded; a later search computes any other voxel it reads on demand.
        (A network without a separate global branch embeds every voxel.)"""
        maps = self.embed(image, progress, cancel, on_demand=True)
        if progress and not maps.complete:
            progress(0, 1, "embedding the body")
        try:
            maps.ensure_all(maps.body, cancel)
        finally:
            self.settle(maps)  # also the tiles finished before a cancel
        return maps

    def settle(self, maps: EmbeddingMaps) -> None:
        """After tiles were computed: write them to the disk cache, and re-apply the memory cache's cap (the maps
        grew)."""
        self.save(maps)
        self.cache.put(maps.key, maps)

    # ------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, progress: ProgressFn | None, cancel: threading.Event | None):
        """Both maps of a network without a separate global branch, in slabs with a halo when large."""
        net = self.net
        spec = net.spec
        dtype = torch.float16 if self.half else torch.float32
        n_vox = int(np.prod(x.shape[2:]))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            if n_vox <= self.max_tile_voxels:
                local, glob = net(x)
                return local.to(dtype), glob.to(dtype)
            # slabs along z (array axis 0) with a halo
            mz = max(spec.tile_multiple[-1], spec.global_stride[-1])
            halo = int(np.ceil(spec.tile_halo / mz) * mz)
            per_slice = int(np.prod(x.shape[3:]))
            core = max(mz, (self.max_tile_voxels // per_slice) // mz * mz - 2 * halo)
            Z = x.shape[2]
            sl, sg = spec.local_stride[-1], spec.global_stride[-1]
            local_parts, glob_parts = [], []
            starts = list(range(0, Z, core))
            for n, z0 in enumerate(starts):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("embedding cancelled")
                z1 = min(Z, z0 + core)
                a, b = max(0, z0 - halo), min(Z, z1 + halo)
                loc, gl = net.forward_maps(x[:, :, a:b])
                local_parts.append(loc[:, :, (z0 - a) // sl: (z0 - a) // sl + (z1 - z0) // sl])
                glob_parts.append(gl[:, :, (z0 - a) // sg: (z0 - a) // sg + -(-(z1 - z0) // sg)])
                if progress:
                    progress(n + 1, len(starts), "embedding tiles")
            local = F.normalize(torch.cat(local_parts, 2), dim=1)
            glob = F.normalize(torch.cat(glob_parts, 2), dim=1)
            return local.to(dtype), glob.to(dtype)

    def _check_dim(self, image: Image) -> None:
        spec = self.model.spec
        if image.ndim != spec.ndim:
            from .errors import InputError
            from .models import models_for

            fits = models_for(image.ndim)
            hint = (f"choose a {image.ndim}D model: " + ", ".join(f"--model {n}" for n in fits) if fits
                    else f"no {image.ndim}D model is registered on this machine; train one with `samembed train`")
            raise InputError(f"{image.name}: a {image.ndim}D image cannot be embedded by the {spec.ndim}D model "
                             f"'{self.model.model_id}'; {hint}")
        # one cell of the global map along every axis: a smaller image holds nothing the network can place
        need_mm = max(spec.global_stride) * float(self.model.preprocess.spacing_mm)
        extent_mm = np.asarray(image.grid.size_ijk, dtype=float) * np.asarray(image.grid.spacing_mm, dtype=float)
        if (extent_mm < need_mm).any():
            from .errors import InputError

            size = " x ".join(str(int(v)) for v in image.grid.size_ijk)
            mm = " x ".join(f"{v:.4g}" for v in extent_mm)
            raise InputError(f"{image.name}: {size} voxels ({mm} mm) is too small for the model "
                             f"'{self.model.model_id}', which needs at least {need_mm:g} mm along each axis; "
                             "give the whole scan, not a crop of a few voxels")
        # the network's input, on the model's grid: a spacing off by a factor (a 128^3 CT read at 20 mm, 2.56 m
        # across) asked for 1280^3 voxels, and ended in "internal error: MemoryError" (a review)
        input_voxels = float(np.prod(extent_mm / float(self.model.preprocess.spacing_mm)))
        if input_voxels > MAX_INPUT_VOXELS:
            from .errors import InputError

            mm = " x ".join(f"{v:.4g}" for v in extent_mm)
            raise InputError(f"{image.name}: spans {mm} mm ({' x '.join(f'{v:g}' for v in image.grid.spacing_mm)} mm "
                             f"voxels), {input_voxels / 1e6:,.0f} million voxels at the model's "
                             f"{float(self.model.preprocess.spacing_mm):g} mm, beyond any scan "
                             f"({MAX_INPUT_VOXELS / 1e6:,.0f} million at most); check its voxel size (the file's "
                             "spacing header)")

    def _prepare(self, image: Image) -> tuple[np.ndarray, Grid, str, np.ndarray | None]:
        """:func:`prepare_input` with this embedder's :attr:`prepare_settings`."""
        return prepare_input(self.prepare_settings, image)

    def _compute(self, image: Image, key: str, progress, cancel, on_demand: bool) -> EmbeddingMaps:
        """Preprocess and embed the global map; a network without a separate global branch also gets its whole
        local map here, while sam-lite's local tiles are left to :meth:`EmbeddingMaps.ensure` (all of them at once
        when the caller did not ask for ``on_demand``)."""
        spec = self.model.spec
        self._check_dim(image)
        if progress:
            progress(0, 1, "preprocessing")
        arr, pad_grid, modality, body_made = self._prepare(image)
        self._remember_modality(image, modality)
        x = torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(self.device)
        if self.half:
            x = x.half()
        if cancel is not None and cancel.is_set():
            raise Cancelled("embedding cancelled")
        if progress:
            progress(0, 1, "embedding")
        local = None
        if self.on_demand_capable:
            lshape = tuple(-(-n // s) for n, s in zip(arr.shape, reversed(spec.local_stride)))
            local_grid = pad_grid.derived(spec.local_stride, lshape)
            body = self._body_on_local(arr, modality, local_grid, body_made, image.name)
            glob = self._global_map(x, body.reshape(lshape).numpy())
        else:
            local, glob = self._forward(x, progress, cancel)
            local, glob = local[0], glob[0]
            local_grid = pad_grid.derived(spec.local_stride, tuple(local.shape[1:]))
            body = self._body_on_local(arr, modality, local_grid, body_made, image.name)
        global_grid = pad_grid.derived(spec.global_stride, tuple(glob.shape[1:]))
        maps = self._assemble(glob, local_grid, global_grid, image, key, body)
        if local is not None:  # the whole map, computed with the global one
            from .tiles import upsample_lengths_box, write_rows

            shape = local_grid.shape_zyx
            write_rows(maps.vectors, [local.reshape(maps.n_local, -1)])
            del local
            ends = np.zeros(len(shape), int), np.asarray(shape) - 1
            maps.global_norm.copy_(upsample_lengths_box(glob.cpu(), shape, *ends).reshape(-1))
            maps.ready = None
        else:
            # (holds the input, not the embedder)
            maps.tiles = TileComputer(self.tile_network, lambda a=arr: a, held_bytes=arr.nbytes)
        return maps

    def _global_map(self, x: torch.Tensor, body_local: np.ndarray) -> torch.Tensor:
        """The unit global map of the network input ``x`` (1, 1, *zyx) on its whole global grid. A volume's is
        computed over the body's box only (:func:`global_box`: :data:`GLOBAL_MARGIN_MM` beyond ``body_local``, the
        body mask on the local grid) and holds zero vectors beyond it; a radiograph's, a small share of its cost, is
        computed whole."""
        spec = self.model.spec
        gstride = tuple(reversed(spec.global_stride))
        box = None
        if spec.ndim == 3:
            margin = int(np.ceil(GLOBAL_MARGIN_MM / float(self.model.preprocess.spacing_mm)))
            box = global_box(body_local, self.local_stride_zyx, gstride, margin, tuple(x.shape[2:]))
        if box is not None:
            log.debug("global map over the body's box: input voxels %s of %s (%.0f %%)",
                      " x ".join(f"{b.start}:{b.stop}" for b in box), " x ".join(str(n) for n in x.shape[2:]),
                      100.0 * np.prod([b.stop - b.start for b in box]) / np.prod(x.shape[2:]))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            if box is None:
                return F.normalize(self.net.forward_global(x), dim=1)[0]
            part = F.normalize(self.net.forward_global(x, box), dim=1)[0]
        gshape = tuple(-(-n // s) for n, s in zip(x.shape[2:], gstride))
        glob = part.new_zeros((part.shape[0], *gshape))
        glob[(slice(None), *(slice(b.start // s, b.start // s + n) for b, s, n in zip(box, gstride, part.shape[1:])))] = part
        return glob

    def _body_on_local(self, arr: np.ndarray, modality: str, local_grid: Grid, mask: np.ndarray | None = None,
                       name: str = "") -> torch.Tensor:
        """Body mask on the local grid, computed on the input ``arr`` subsampled by the local stride (cheap); ``mask``:
        that mask, made ahead with the input (by the prefetch process), used when its shape is the subsample's."""
        stride = self.local_stride_zyx
        if mask is not None and mask.shape == tuple(-(-n // s) for n, s in zip(arr.shape, stride)):
            log.debug("%s: body mask made ahead by the prefetch process", name)
        else:
            mask = body_mask_on_grid(arr, stride, modality)
        out = np.zeros(local_grid.shape_zyx, dtype=bool)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, mask.shape))
        out[sl] = mask[sl]
        return torch.from_numpy(out.reshape(-1))

    def _assemble(self, glob: torch.Tensor, local_grid: Grid, global_grid: Grid, image: Image, key: str,
                  body: torch.Tensor) -> EmbeddingMaps:
        """Maps with an empty feature buffer (no voxel ready): its pages take memory only once tiles fill them."""
        spec = self.model.spec
        feat_dtype = torch.float16 if self.half else torch.float32
        n_vox = int(np.prod(local_grid.shape_zyx))
        features = new_feature_rows(n_vox, spec.local_channels, feat_dtype, self.device).T
        # voxel centres inside the original image
        valid = torch.from_numpy(local_grid.centres_inside(image.grid, margin=0.5).reshape(-1)).to(features.device)
        return EmbeddingMaps(glob.float() if not self.half else glob, features, valid, body.to(features.device),
                             local_grid, global_grid, image.grid, self.model.model_id, key, spec.local_channels,
                             image.name, ready=torch.zeros(n_vox, dtype=torch.bool),
                             global_norm=torch.ones(n_vox, dtype=torch.float32))

    # ------------------------------------------------------------------------------------------ disk cache
    def _disk_path(self, key: str) -> Path | None:
        from .tiles import ENTRY_SUFFIX

        return self.cache_dir / f"{key}{ENTRY_SUFFIX}" if self.cache_dir else None

    def _load_disk(self, key: str, image: Image) -> EmbeddingMaps | None:
        """On-demand maps from a disk entry (its stored voxels ready, the rest computed when needed), or None
        when there is no entry or it is damaged (truncated, corrupt, another model: it is then recomputed)."""
        from .tiles import (
            DamagedEntry,
            OlderEntry,
            coarse_rows,
            mark_used,
            read_entry,
            unpacked_directions,
            upsample_at,
            write_rows,
        )

        path = self._disk_path(key)
        if path is None:
            return None
        try:
            if not path.is_file():
                return None
        except OSError as e:  # a cache folder this user may not search (another user's, mode 0700): left alone
            self._unreadable.add(path)
            log.warning("cannot look into the cache folder %s (%s): this run computes its maps without the cache; "
                        "give a --cache-dir of your own, or ask its owner for access", path.parent, e.strerror or e)
            return None
        try:
            meta, arrays = read_entry(path)
        except PermissionError as e:  # another user's entry in a shared folder, not readable by this one
            self._unreadable.add(path)
            log.warning("cannot read the cache entry %s (%s): this run computes its maps and leaves the entry as it "
                        "is", path, e.strerror or e)
            return None
        except OSError as e:  # removed meanwhile (another process's `cache clear`), a passing I/O error: made again
            log.warning("could not read the cache entry %s (%s); it will be recomputed", path, e.strerror or e)
            return None
        except OlderEntry as e:  # written by an older version under this key: recomputed (and rewritten if it can be)
            self._replaced.add(path)
            log.warning("recomputing the cache entry %s: %s", path, str(e).removeprefix(f"{path}: "))
            return None
        except DamagedEntry as e:
            self._replaced.add(path)
            log.warning("ignoring damaged cache entry %s (it will be recomputed): %s", path, e)
            return None
        try:
            glob16, body_bits, stored_bits, packed = arrays  # (another version's layout: damaged, below)
            if meta.get("key") != key or meta.get("model_id") != self.model.model_id:
                raise DamagedEntry(f"{path}: written for another image or model")
            local_grid, global_grid = _grid_from_dict(meta["local_grid"]), _grid_from_dict(meta["global_grid"])
            n_vox = int(np.prod(local_grid.shape_zyx))
            body = torch.from_numpy(np.unpackbits(body_bits, count=n_vox).astype(bool))
            stored = np.flatnonzero(np.unpackbits(stored_bits, count=n_vox))
            if len(packed) != len(stored):
                raise DamagedEntry(f"{path}: {len(packed)} local vectors for {len(stored)} stored voxels")
            glob = torch.from_numpy(glob16).float()
            maps = self._assemble(glob.to(self.device), local_grid, global_grid, image, key, body)
            if len(stored):
                maps._coarse_rows = coarse_rows(glob)  # made once for every chunk, and kept for global_at
                for i in range(0, len(stored), 1 << 15):  # a chunk's eight corners (8 x 32 k x C_g floats) at a time
                    part = stored[i:i + (1 << 15)]
                    zyx = np.stack(np.unravel_index(part, local_grid.shape_zyx), 1)
                    flat = torch.from_numpy(part)
                    maps.global_norm[flat] = upsample_at(glob, local_grid.shape_zyx, zyx, lengths=True,
                                                         rows=maps._coarse_rows)
                    ints = unpacked_directions(packed[i:i + len(part)], maps.n_local)  # (n, C_l) the stored integers
                    write_rows(maps.vectors, [ints.T], flat, unit=slice(None))  # normalised: the directions
                maps.ready[torch.from_numpy(stored)] = True
            maps.stored_on_disk = (path, len(stored))
            mark_used(path)  # (what `samembed cache clear --unused-days/--max-gb` keeps)
            maps.tiles = TileComputer(self.tile_network, functools.partial(_prepared_input, self.prepare_settings, image),
                                      held_bytes=image.array.nbytes)
            if bool(maps.ready.all()):
                maps.ready, maps.tiles = None, None
            return maps
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
            self._replaced.add(path)
            log.warning("ignoring damaged cache entry %s (it will be recomputed): %s", path, e)
            return None

    @property
    def disk_write_failed(self) -> bool:
        """Whether a write to the disk cache folder failed (it is only read from since; see ``Matcher.clear_cache``)."""
        return self._cache_write_failed

    def save(self, maps: EmbeddingMaps) -> None:
        """Write ``maps`` to the disk cache (when there is one and tiles were computed since the last write):
        the global map in half precision, the computed body voxels' local vectors as packed directions
        (:func:`~samembed.tiles.packed_directions`), and a checksum."""
        from .tiles import packed_directions, stored_voxels, write_entry

        path = self._disk_path(maps.key)
        if (path is None or self._cache_write_failed or path in self._unreadable
                or (not maps.dirty and _is_file(path))):
            return
        body = maps.body.cpu().numpy()
        # no tile is written meanwhile, and one save at a time (another thread may be filling or saving these maps)
        with maps._lock:
            stored = body if maps.ready is None else body & maps.ready.numpy()
            idx = torch.from_numpy(np.flatnonzero(stored))
            if maps.stored_on_disk == (path, len(idx)) and _is_file(path):
                # the entry already holds every body voxel computed (the new tiles lay outside the body, which
                # is not stored; computed voxels only ever grow): not written again (nor tried on a read-only cache)
                maps.dirty = False
                return
            held = None if path in self._replaced else stored_voxels(path, maps.key)
            if held is not None and held >= len(idx) and maps.stored_on_disk != (path, held):
                # another process wrote this entry meanwhile, with as many voxels or more (`samembed embed`'s whole
                # body beside a match's tiles): kept, not replaced by fewer (a review)
                log.debug("the cache entry %s, written meanwhile by another process, holds %d voxels, this one %d: "
                          "kept", path, held, len(idx))
                maps.dirty = False
                return
            try:
                packed = packed_directions(maps.vectors, idx)  # (stored, bytes per vector)
            except ValueError as e:  # NaN vectors (a broken model): this image's maps are not stored
                log.warning("not writing the cache entry %s of %s: %s", path, maps.image_name or "an image", e)
                return
            meta = {"local_grid": _grid_to_dict(maps.local_grid), "global_grid": _grid_to_dict(maps.global_grid),
                    "model_id": maps.model_id, "key": maps.key, "image": maps.image_name,
                    "local_encoding": LOCAL_ENCODING}
            try:
                write_entry(path, meta, [maps.global_.cpu().half().numpy(), np.packbits(body), np.packbits(stored),
                                         packed])
                maps.dirty = False
                maps.stored_on_disk = (path, len(idx))
            except (OSError, InputError) as e:  # a full or read-only cache folder costs speed later, not this match
                if isinstance(e, PermissionError) and path.exists() and os.access(path.parent, os.W_OK):
                    # this one entry may not be replaced (another user's, in a shared folder): left as it is, and
                    # the others are written (a refusal of one stopped every later write of the run: a review)
                    self._unreadable.add(path)
                    log.warning("could not replace the cache entry %s (%s): it is left as it is, and the other "
                                "entries are written", path, e.strerror or e)
                    return
                if not self._cache_write_failed:  # once: a shared read-only cache would warn for every image
                    log.warning("could not write the embedding cache entry %s (%s); the cache folder is only read "
                                "from now on in this run", path, e)
                self._cache_write_failed = True
