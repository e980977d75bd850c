"""The embedding engine: whole-volume embeddings, tiled with a halo when large, cached in memory and on disk.

``Embedder.embed(image)`` preprocesses the image, runs the network (CPU fp32; CUDA fp16 when present), and
returns :class:`EmbeddingMaps`: the local map, the global map, their LPS grids, and a ready
``features`` matrix ``(C_local + C_global, V)`` where the global map has been upsampled to the local grid
(trilinear, align_corners=False) and re-normalised, as in the official matcher. The matcher only needs
one matrix product per target.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled, DeviceUnavailableError
from .options import ProgressFn
from .image import Grid, Image
from .models import LoadedModel
from .preprocess import body_mask_array, preprocess

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class EmbeddingMaps:
    """Embeddings of one image.

    Attributes:
        local: (C_l, *shape) unit vectors on ``local_grid``.
        global_: (C_g, *gshape) unit vectors on ``global_grid``.
        features: (C_l + C_g, V) local and upsampled global vectors per local voxel (float32 on CPU).
        valid: (V,) voxel centre lies inside the source image.
        body: (V,) voxel lies in the body mask (all True when no mask applies).
        local_grid, global_grid: LPS geometry of the maps.
        image_grid: geometry of the original image.
        model_id, key: identity of the model and the cache key.
    """

    local: torch.Tensor
    global_: torch.Tensor
    features: torch.Tensor
    valid: torch.Tensor
    body: torch.Tensor
    local_grid: Grid
    global_grid: Grid
    image_grid: Grid
    model_id: str
    key: str
    image_name: str = ""
    _compact: dict = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors (and the compact copies of :meth:`compact_features`), bytes."""
        tensors = [self.local, self.global_, self.features, self.valid, self.body]
        tensors += [t for pair in self._compact.values() for t in pair]
        return sum(t.element_size() * t.nelement() for t in tensors)

    def compact_features(self, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat indices (M,), features (C, M))`` of the voxels in ``allowed`` (V,) bool.

        A query then costs a product with the searched voxels only (the body is often under half the grid).
        The copy for the most recent mask is kept (a second one for a second mask), so repeated queries with
        the default search mask reuse it.
        """
        mask = allowed.to(torch.bool).cpu().numpy()
        key = (int(mask.sum()), hash(np.packbits(mask).tobytes()))
        hit = self._compact.get(key)
        if hit is None:
            idx = torch.from_numpy(np.flatnonzero(mask)).to(self.features.device)
            hit = (idx, self.features[:, idx].contiguous())
            while len(self._compact) >= 2:
                self._compact.pop(next(iter(self._compact)))
            self._compact[key] = hit
        return hit

    @property
    def local_channels(self) -> int:
        return int(self.local.shape[0])

    def search_mask(self, use_body: bool = True) -> torch.Tensor:
        """Voxels a match may land on: inside the image, and inside the body when ``use_body``.

        This is the one place of the rule "the body, else every valid voxel": an image in which no body was
        found (all voxels below the body threshold) is searched everywhere inside it.
        """
        if not use_body:
            return self.valid
        inside = self.valid & self.body
        return inside if bool(inside.any()) else self.valid


class EmbeddingCache:
    """LRU cache of :class:`EmbeddingMaps` bounded by total bytes (in memory)."""

    def __init__(self, max_bytes: int = 3 << 30) -> None:
        self.max_bytes = int(max_bytes)
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
            # the two most recent (a source and its target) always stay, even above the cap: evicting one of
            # them would recompute it on every match of the pair
            while len(self._items) > 2 and self.nbytes > self.max_bytes:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(m.nbytes for m in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def _pad_to_multiple(arr: np.ndarray, multiple_zyx: tuple[int, ...], value: float) -> np.ndarray:
    pads = [(0, (-n) % m) for n, m in zip(arr.shape, multiple_zyx)]
    if not any(p[1] for p in pads):
        return arr
    return np.pad(arr, pads, mode="constant", constant_values=value)


def _grid_to_dict(g: Grid) -> dict:
    return {"shape_zyx": list(g.shape_zyx), "spacing_mm": g.spacing_mm.tolist(), "origin_lps_mm": g.origin_lps_mm.tolist(),
            "direction": g.direction.ravel().tolist()}


def _grid_from_dict(d: dict) -> Grid:
    return Grid(tuple(d["shape_zyx"]), d["spacing_mm"], d["origin_lps_mm"], np.array(d["direction"]))


class Embedder:
    """Computes and caches embeddings of images for one model.

    Args:
        model: the loaded model.
        device: a torch device (see :func:`resolve_device`).
        cache: in-memory LRU cache (shared between embedders is fine; keys include the model).
        cache_dir: optional folder for the on-disk cache.
        max_tile_voxels: input voxels above which the local branch is run in slabs with a halo.
        modality: "auto", "ct", "mri" or "xray".
    """

    def __init__(self, model: LoadedModel, device: torch.device | str = "cpu", cache: EmbeddingCache | None = None,
                 cache_dir: str | Path | None = None, max_tile_voxels: int = 24_000_000, modality: str = "auto") -> None:
        self.model = model
        self.device = resolve_device(device)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_tile_voxels = int(max_tile_voxels)
        self.modality = modality
        self.model.net.to(self.device)
        self.half = self.device.type == "cuda"

    def key(self, image: Image) -> str:
        """Cache key: image content hash + model id + preprocessing + modality."""
        prep = json.dumps(self.model.preprocess.to_dict(), sort_keys=True)
        import hashlib

        h = hashlib.sha256(f"{image.content_hash()}|{self.model.model_id}|{prep}|{self.modality}".encode()).hexdigest()
        return h[:32]

    def embed(self, image: Image, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> EmbeddingMaps:
        """Embeddings of ``image`` (from the cache when present)."""
        key = self.key(image)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        maps = self._load_disk(key, image)
        if maps is None:
            maps = self._compute(image, key, progress, cancel)
            self._save_disk(maps)
        # the searched voxels' features, copied once here so that the first query is as fast as the next
        maps.compact_features(maps.search_mask(True))
        self.cache.put(key, maps)
        return maps

    # ------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, progress: ProgressFn | None, cancel: threading.Event | None):
        net = self.model.net
        spec = net.spec
        dtype = torch.float16 if self.half else torch.float32
        n_vox = int(np.prod(x.shape[2:]))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            if n_vox <= self.max_tile_voxels:
                local, glob = net(x)
                return local.to(dtype), glob.to(dtype)
            # slabs along z (array axis 0) with a halo
            mz = spec.tile_multiple[-1]
            if not net.has_separate_global:
                mz = max(mz, spec.global_stride[-1])
            halo = int(np.ceil(spec.tile_halo / mz) * mz)
            per_slice = int(np.prod(x.shape[3:]))
            core = max(mz, (self.max_tile_voxels // per_slice) // mz * mz - 2 * halo)
            core = max(core, mz)
            Z = x.shape[2]
            sl, sg = spec.local_stride[-1], spec.global_stride[-1]
            local_parts, glob_parts = [], []
            starts = list(range(0, Z, core))
            for n, z0 in enumerate(starts):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("embedding cancelled")
                z1 = min(Z, z0 + core)
                a, b = max(0, z0 - halo), min(Z, z1 + halo)
                xin = x[:, :, a:b]
                if net.has_separate_global:
                    loc = net.forward_local(xin)
                    local_parts.append(loc[:, :, (z0 - a) // sl: (z0 - a) // sl + -(-(z1 - z0) // sl)])
                else:
                    loc, gl = net.forward_maps(xin)
                    local_parts.append(loc[:, :, (z0 - a) // sl: (z0 - a) // sl + (z1 - z0) // sl])
                    glob_parts.append(gl[:, :, (z0 - a) // sg: (z0 - a) // sg + -(-(z1 - z0) // sg)])
                if progress:
                    progress(n + 1, len(starts), "embedding tiles")
            local = F.normalize(torch.cat(local_parts, 2), dim=1)
            if net.has_separate_global:
                glob = F.normalize(net.forward_global(x), dim=1)
            else:
                glob = F.normalize(torch.cat(glob_parts, 2), dim=1)
            return local.to(dtype), glob.to(dtype)

    def _compute(self, image: Image, key: str, progress, cancel) -> EmbeddingMaps:
        spec = self.model.spec
        if image.ndim != spec.ndim:
            from .errors import InputError

            from .models import models_for

            fits = models_for(image.ndim)
            hint = (f"choose a {image.ndim}D model: " + ", ".join(f"--model {n}" for n in fits) if fits
                    else f"no {image.ndim}D model is registered on this machine; train one with `samembed train`")
            raise InputError(f"{image.name}: a {image.ndim}D image cannot be embedded by the {spec.ndim}D model "
                             f"'{self.model.model_id}'; {hint}")
        if progress:
            progress(0, 1, "preprocessing")
        prep = preprocess(image, self.model.preprocess, self.modality)
        multiple_zyx = tuple(reversed(spec.pad_multiple))
        arr = _pad_to_multiple(prep.array, multiple_zyx, prep.fill_value)
        x = torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(self.device)
        if self.half:
            x = x.half()
        if cancel is not None and cancel.is_set():
            raise Cancelled("embedding cancelled")
        if progress:
            progress(0, 1, "embedding")
        local, glob = self._forward(x, progress, cancel)
        local, glob = local[0], glob[0]
        pad_grid = Grid(arr.shape, prep.grid.spacing_mm, prep.grid.origin_lps_mm, prep.grid.direction)
        local_grid = pad_grid.derived(spec.local_stride, tuple(local.shape[1:]))
        global_grid = pad_grid.derived(spec.global_stride, tuple(glob.shape[1:]))
        body = self._body_on_local(arr, prep.modality, local_grid)
        return self._assemble(local, glob, local_grid, global_grid, image, key, body)

    def _body_on_local(self, arr: np.ndarray, modality: str, local_grid: Grid) -> torch.Tensor:
        """Body mask on the local grid, computed on the input subsampled by the local stride (cheap)."""
        stride = tuple(reversed(self.model.spec.local_stride))
        sub = arr[tuple(slice(0, None, s) for s in stride)]
        mask = body_mask_array(sub, modality)
        out = np.zeros(local_grid.shape_zyx, dtype=bool)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, mask.shape))
        out[sl] = mask[sl]
        return torch.from_numpy(out.reshape(-1))

    def _assemble(self, local, glob, local_grid: Grid, global_grid: Grid, image: Image, key: str, body: torch.Tensor) -> EmbeddingMaps:
        mode = "trilinear" if local.dim() == 4 else "bilinear"
        up = F.interpolate(glob[None].float(), size=tuple(local.shape[1:]), mode=mode, align_corners=False)[0]
        up = F.normalize(up, dim=0)
        feat_dtype = torch.float16 if self.half else torch.float32
        features = torch.cat([local.float(), up], 0).reshape(local.shape[0] + up.shape[0], -1).to(feat_dtype).contiguous()
        # voxel centres inside the original image
        idx = np.indices(local_grid.shape_zyx).reshape(local_grid.ndim, -1).T[:, ::-1]  # C order, columns (i, j, k)
        inside = image.grid.contains_index(image.grid.lps_to_index(local_grid.index_to_lps(idx)), margin=0.5)
        valid = torch.from_numpy(inside).to(features.device)
        return EmbeddingMaps(local, glob, features, valid, body.to(features.device), local_grid, global_grid, image.grid,
                             self.model.model_id, key, image.name)

    # ------------------------------------------------------------------------------------------
    def _disk_path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.pt" if self.cache_dir else None

    def _load_disk(self, key: str, image: Image) -> EmbeddingMaps | None:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(d["meta"])
            dtype = torch.float16 if self.half else torch.float32
            return self._assemble(d["local"].to(self.device, dtype), d["global"].to(self.device, dtype), _grid_from_dict(meta["local_grid"]),
                                  _grid_from_dict(meta["global_grid"]), image, key, d["body"])
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
            log.warning("ignoring damaged cache entry %s: %s", path, e)
            return None

    def _save_disk(self, maps: EmbeddingMaps) -> None:
        path = self._disk_path(maps.key)
        if path is None:
            return
        from .io import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"local_grid": _grid_to_dict(maps.local_grid), "global_grid": _grid_to_dict(maps.global_grid),
                "model_id": maps.model_id, "image": maps.image_name}
        with atomic_path(path) as tmp:
            torch.save({"local": maps.local.cpu().half(), "global": maps.global_.cpu().half(), "body": maps.body.cpu(),
                        "meta": json.dumps(meta)}, tmp)
