"""Sub-voxel polishing of matches with image intensities: coarse-to-fine patch matching by normalised cross-correlation.

SAM's maps sit on a coarse grid (4 mm for the shipped CT model), so a match is only as fine as that grid. When source
and target show the same structure (the same patient at another time, a warped copy, or two hands), the original
voxels can place the match much more finely. For each point ``p`` with a match ``c``:

1. a template is sampled from the source around ``p`` on a cube (square in 2D) lattice of ``step`` mm;
2. the target is sampled around ``c`` on the same lattice, mapped through the linear part ``L`` of the source -> target
   affine (identity when none is known), so a rotated or scaled target is compared in the source's frame;
3. the template's normalised cross-correlation (NCC) at every shift within +-``search`` mm is computed with one
   convolution, and ``c`` moves to the best shift;
4. this repeats for each level (coarse to fine); at the last level a parabola through the NCC peak and its two
   neighbours per axis gives the sub-step position.

A point keeps its original match when the final peak NCC is below ``min_ncc`` (no similar structure nearby) or the
template has no contrast. All positions are LPS mm; steps, patch and search half-sizes are mm.

>>> import numpy as np
>>> from samembed.image import Image
>>> rng = np.random.default_rng(0)
>>> from scipy.ndimage import gaussian_filter, shift as nd_shift
>>> vol = gaussian_filter(rng.standard_normal((40, 40, 40)), 2.0)
>>> moved = nd_shift(vol, (0.0, 0.0, 1.5), order=3)          # content moves +1.5 mm along x (i)
>>> src, tgt = Image.from_array(vol), Image.from_array(moved)
>>> p = np.array([[20.0, 20.0, 20.0]])
>>> out = polish_points(src, tgt, p, p, levels=((1.0, 6.0, 3.0),))
>>> bool(np.linalg.norm(out.points_lps_mm - p - [1.5, 0.0, 0.0]) < 0.25), bool(out.moved[0])
(True, True)
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image
from .options import DEFAULT_POLISH_LEVELS

#: default coarse-to-fine levels: (lattice step, template half-size, search half-size), all mm
DEFAULT_LEVELS = DEFAULT_POLISH_LEVELS  # declared with the other match settings in samembed.options


@dataclass
class Polished:
    """Result of :func:`polish_points`.

    Attributes:
        points_lps_mm: (N, d) polished matches (the input match where a point was not moved).
        ncc: (N,) peak normalised cross-correlation at the last level (NaN where no level ran).
        moved: (N,) bool, True where the intensity match replaced the input match.
    """

    points_lps_mm: np.ndarray
    ncc: np.ndarray
    moved: np.ndarray


@lru_cache(maxsize=32)
def _lattice_offsets(half: int, d: int) -> torch.Tensor:
    """(n, ..., n, d) float32 lattice coordinates (lattice axis 0 first in the last dim), array order slowest axis
    first (lattice axis d-1 ... 0)."""
    r = torch.arange(-half, half + 1, dtype=torch.float32)
    mesh = torch.meshgrid(*([r] * d), indexing="ij")  # mesh[a] varies along array axis a
    return torch.stack(mesh[::-1], dim=-1)  # last entry = array axis 0 = slowest = lattice axis d-1


#: results a :class:`LatticeSampler` keeps (:meth:`LatticeSampler.kept`): the polish's templates, one per level of a
#: set of clicks (three levels by default)
KEPT_SAMPLINGS = 8
#: the source's templates of a set of clicks are kept for the next target (``keep_templates``) when they take at most
#: this many bytes, float32 values and masks: about 2700 points at the default levels (196 kB each). Sampling them is
#: about a third of a polish's time (5000 points on a chest CT: 12.6 s a target, 8.5 s with them kept), but keeping
#: the templates of 5000 points held 1 GB; beyond this, each target samples them again, one batch at a time.
KEPT_TEMPLATE_BYTES = 512 << 20
T = TypeVar("T")


class LatticeSampler:
    """Samples one image (linear interpolation) on many small lattices at once.

    Each lattice's box of voxels is cut from the image and converted to float32 on its own, and a group of such
    boxes (at most ``crop_bytes`` of float32) is sampled with one ``grid_sample`` call. No float32 copy of the image
    is made: on a 512 x 512 x 133 CT, converting the chunks that 50 clicks' lattices reach into a volume-sized
    buffer touched 80-140 MB of fresh pages, 0.9 s of a polish on a VM that charges every first touch; the boxes
    take a few MB that the allocator hands out again.
    """

    def __init__(self, image: Image, crop_bytes: int = 32 << 20):
        self._image = weakref.ref(image)  # weak: the sampler cache (sampler_for) must not keep its image alive
        grid = image.grid
        self._index_per_mm = np.linalg.inv(grid.direction @ np.diag(grid.spacing_mm))
        self._size = np.asarray(grid.size_ijk)
        self._crop_bytes = int(crop_bytes)
        self._lock = threading.Lock()
        self._kept: OrderedDict[bytes, object] = OrderedDict()  # see kept()

    def kept(self, key: bytes, make: Callable[[], T]) -> T:
        """``make()``, kept under ``key`` for the next call with that key (the last :data:`KEPT_SAMPLINGS` keys),
        e.g. the polish's templates of one set of clicks, the same for every target of an atlas. What it returns is
        shared between the calls: read it, do not modify it."""
        with self._lock:
            hit = self._kept.get(key)
            if hit is not None:
                self._kept.move_to_end(key)
                return hit
        got = make()  # outside the lock: another thread may sample meanwhile
        with self._lock:
            self._kept[key] = got
            while len(self._kept) > KEPT_SAMPLINGS:
                self._kept.popitem(last=False)
        return got

    @property
    def image(self) -> Image:
        """The sampled image (held by the caller while it samples)."""
        image = self._image()
        if image is None:
            raise RuntimeError("the image of this sampler no longer exists")
        return image

    def sample(self, centres_lps_mm: np.ndarray, axes_lps_mm: np.ndarray, half: int,
               masks: bool = False) -> tuple[torch.Tensor, np.ndarray] | tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """Sample at ``centre + axes @ v`` for integer ``v`` in ``[-half, half]^d``, for every centre.

        Args:
            centres_lps_mm: (N, d) lattice centres.
            axes_lps_mm: (d, d); column ``a`` is the LPS step (mm) of lattice axis ``a`` (shared by all lattices).
            half: lattice half-size in steps.
            masks: also return which lattice points lie inside the image.

        Returns:
            ``(values, inside)``: float32 ``(N,) + (2 half + 1,) * d`` (slowest lattice axis first) and the (N,)
            fraction of each lattice's points inside the image (outside points take the nearest border value); with
            ``masks``, a third item: bool ``(N,) + (2 half + 1,) * d``, True inside the image, or None when every
            lattice lies wholly inside.
        """
        grid = self.image.grid
        array = self.image.array
        d = grid.ndim
        n = 2 * half + 1
        ijk0 = grid.lps_to_index(np.asarray(centres_lps_mm, dtype=np.float64)[:, :d])  # (N, d)
        M = self._index_per_mm @ np.asarray(axes_lps_mm, dtype=np.float64)
        reach = np.abs(M).sum(1) * half  # each lattice's extent from its centre along each index axis
        offsets = _lattice_offsets(half, d) @ torch.from_numpy(M.T.astype(np.float32))  # (n,)*d + (d,), index units
        # a lattice is convex: when its corners are inside the image, all of it is; count points only for the rest
        inside = np.ones(len(ijk0))
        corners = np.array(np.meshgrid(*([[-half, half]] * d), indexing="ij")).reshape(d, -1).T @ M.T  # (2^d, d)
        at_edge = ~grid.contains_index((ijk0[:, None] + corners).reshape(-1, d)).reshape(len(ijk0), -1).all(1)
        point_mask = None
        if at_edge.any():
            ijk = ijk0[at_edge][:, None] + offsets.reshape(-1, d).numpy()  # (E, n^d, d)
            held = grid.contains_index(ijk.reshape(-1, d)).reshape(len(ijk), -1)
            inside[at_edge] = held.mean(1)
            if masks:
                point_mask = torch.ones((len(ijk0),) + (n,) * d, dtype=torch.bool)
                point_mask[torch.from_numpy(at_edge)] = torch.from_numpy(held.reshape((-1,) + (n,) * d))
        # every lattice's box of voxels, one size for all: the voxels its linear interpolation reads, moved inwards
        # where it leaves the image, so that a box ends where the image ends and grid_sample's border padding gives
        # the nearest border voxel, as the whole image would
        box = np.minimum(np.ceil(2 * reach).astype(int) + 2, self._size)  # voxels per (i, j, k) axis
        start = np.clip(np.floor(ijk0 - reach).astype(int), 0, self._size - box)  # (N, d)
        centre = torch.from_numpy((ijk0 - start).astype(np.float32))  # each lattice's centre in its box, index units
        # lattices that reach past the first or last voxel centre (half a voxel still counts as inside the image)
        beyond = ((ijk0 - reach) < 0).any(1) | ((ijk0 + reach) > self._size - 1).any(1)
        group = max(1, self._crop_bytes // (4 * int(np.prod(box))))
        out = torch.empty((len(ijk0),) + (n,) * d)
        for b in range(0, len(ijk0), group):
            crops = torch.empty((min(group, len(ijk0) - b), 1) + tuple(box[::-1]), dtype=torch.float32)
            view = crops.numpy()
            for k, lo in enumerate(start[b:b + group]):
                view[k, 0] = array[tuple(slice(s, s + w) for s, w in zip(lo[::-1], box[::-1]))]
            out[b:b + group] = _interpolate(crops, centre[b:b + group], offsets, clamp=bool(beyond[b:b + group].any()))
        return (out, inside, point_mask) if masks else (out, inside)


def _interpolate(crops: torch.Tensor, centres: torch.Tensor, offsets: torch.Tensor, clamp: bool) -> torch.Tensor:
    """Linear interpolation of each box of ``crops`` at its own lattice: ``centres[b] + offsets``.

    ``crops`` is float32 ``(B, 1) + box`` (slowest axis first), ``centres`` (B, d) and ``offsets`` ``(n,) * d + (d,)``
    in the boxes' index units (i first); outside a box the nearest border voxel counts, as with ``grid_sample``'s
    border padding (``clamp`` says whether any lattice point may lie outside its box). Returns ``(B,) + (n,) * d``.

    In 3D the boxes are sampled as 2D images, their slices stacked: two bilinear samplings per point (at the slices
    below and above it), then a linear step between them. torch's 2D sampler is vectorised on the CPU and its 3D one
    is not (measured on 50 lattices of 29^3 points: 46 ms in 3D, 2 x 7.5 ms in 2D). The row coordinate is
    normalised over all the box's rows (depth x height) in float32, so it is exact to about 1e-4 of a row in an 82^3
    box: on random values of +-1000 the samples differed from float64 trilinear interpolation by up to 0.2 in a
    71 x 71 x 22 box and 1 in an 82^3 box (0.01 with the 3D sampler; a review's measurement), far below what moves
    an NCC peak (no match of the engine gate moved).
    """
    b, d = centres.shape
    size = crops.shape[2:][::-1]  # (i, j, k) extents
    lattice = offsets.shape[:-1]
    if d == 2:
        scale = torch.tensor([2.0 / max(s - 1, 1) for s in size])
        grid = (centres * scale - 1.0).view(b, 1, 1, 2) + offsets * scale
        return F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
    width, height, depth = size
    flat = offsets.reshape(-1, 3)

    def along(a: int, scale: float = 1.0, shift: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n^3) index coordinates along box axis ``a``, times ``scale`` plus ``shift`` (into ``out``)."""
        if clamp:
            v = (centres[:, a, None] + flat[:, a]).clamp_(0, size[a] - 1)
            return torch.mul(v, scale, out=v if out is None else out).add_(shift)
        return torch.add(centres[:, a, None] * scale + shift, flat[:, a] * scale, out=out)

    z = along(2)
    z0 = z.floor().clamp_(0, max(depth - 2, 0))  # the slice below (the last pair's lower one at the far end)
    fz = z.sub_(z0)  # 0 .. 1 from that slice to the next
    sx, sy = 2.0 / max(width - 1, 1), 2.0 / max(depth * height - 1, 1)  # align_corners: -1 .. 1 is first .. last
    grid = torch.empty(b, flat.shape[0], 2)
    along(0, sx, -1.0, out=grid[..., 0])
    gy = along(1, sy, -1.0, out=grid[..., 1]).add_(z0, alpha=height * sy)  # row j of slice k: row k * height + j
    stacked = crops.view(b, 1, depth * height, width)
    grid = grid.view(b, -1, lattice[-1], 2)
    below = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="border", align_corners=True)
    if depth == 1:
        return below.view((b,) + tuple(lattice))
    gy.add_(height * sy)
    above = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return below.lerp_(above, fz.view_as(below)).view((b,) + tuple(lattice))


_SAMPLERS: weakref.WeakKeyDictionary[Image, LatticeSampler] = weakref.WeakKeyDictionary()
_SAMPLERS_LOCK = threading.Lock()


def sampler_for(image: Image) -> LatticeSampler:
    """The :class:`LatticeSampler` of ``image``, kept while the image lives: later polishes of the same clicks
    (the next targets of one atlas) reuse the source's templates that it keeps (:meth:`LatticeSampler.kept`), and
    they go with the image."""
    with _SAMPLERS_LOCK:
        sampler = _SAMPLERS.get(image)
        if sampler is None:
            sampler = _SAMPLERS[image] = LatticeSampler(image)
        return sampler


def sample_lattice(image: Image, centre_lps_mm: np.ndarray, axes_lps_mm: np.ndarray, half: int) -> tuple[torch.Tensor, float]:
    """Sample ``image`` (linear interpolation) at ``centre + axes @ v`` for integer ``v`` in ``[-half, half]^d``.

    One lattice of :meth:`LatticeSampler.sample`: ``centre_lps_mm`` is (d,), ``axes_lps_mm`` (d, d) with column
    ``a`` the LPS step (mm) of lattice axis ``a``. Returns the ``(2 half + 1,) * d`` values and the fraction of
    lattice points inside the image.
    """
    values, inside = LatticeSampler(image).sample(np.asarray(centre_lps_mm, dtype=np.float64)[None], axes_lps_mm, half)
    return values[0], float(inside[0])


def _box_sum(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum of ``x`` over every window of ``shape`` on its trailing axes ('valid'), one axis at a time: each window's
    values summed directly (an axis of windows as a strided view), so no difference of large running sums loses
    precision, and the work shrinks with each axis (a search of a few shifts leaves a few windows per axis)."""
    first = x.ndim - len(shape)
    for a, k in enumerate(shape, start=first):
        x = x.unfold(a, k, 1).sum(-1)
    return x


def _box_mean(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``x`` over every window of ``shape`` on its trailing axes ('valid'): :func:`_box_sum` over the
    window's size."""
    return _box_sum(x, shape) / float(np.prod(shape))


def ncc_maps(blocks: torch.Tensor, templates: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised cross-correlation of each template at every shift that keeps it inside its block ('valid').

    ``blocks`` is (N, B1, .., Bd) and ``templates`` (N, T1, .., Td), d = 2 or 3, float; the result is
    (N, B1 - T1 + 1, ..), values in [-1, 1]. A flat template or window gives 0.
    """
    n, d = templates.shape[0], templates.ndim - 1
    conv = F.conv3d if d == 3 else F.conv2d
    axes = tuple(range(1, d + 1))
    t = templates - templates.mean(dim=axes, keepdim=True)
    t_std = t.pow(2).mean(dim=axes, keepdim=True).sqrt()
    shape = tuple(templates.shape[1:])
    wide = blocks.double()  # window variances as E[x^2] - E[x]^2 need the precision
    mean = _box_mean(wide, shape)
    b_std = (_box_mean(wide * wide, shape) - mean * mean).clamp_min(0).sqrt().float()
    cross = conv(blocks.float()[None], t[:, None], groups=n)[0] / float(np.prod(shape))
    return cross / (t_std * b_std + eps)


def masked_ncc_maps(blocks: torch.Tensor, block_masks: torch.Tensor, templates: torch.Tensor,
                    template_masks: torch.Tensor, min_overlap: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """:func:`ncc_maps` over the voxels that lie inside both images only: at each shift, the template's voxels inside
    the source (``template_masks``) whose block voxel lies inside the target (``block_masks``). A block
    that reaches beyond its image's edge holds the edge voxel repeated there (the sampler's border padding), and
    plain NCC scored those repeats as content: started at the true point of a target whose field of view ends there,
    the polish moved 6-9 mm off it and called the result confident. A shift where fewer than ``min_overlap`` of the
    template's voxels take part gives -1 (not a candidate). With masks of ones this is :func:`ncc_maps`.
    """
    n, d = templates.shape[0], templates.ndim - 1
    conv = F.conv3d if d == 3 else F.conv2d

    def corr(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # sum over each template window, every shift
        return conv(x[None], k[:, None], groups=n)[0]

    axes = tuple(range(1, d + 1))
    bm, w = block_masks.float(), template_masks.float()

    def centred(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # less its mean inside, zero outside: the sums
        mean = (x * m).sum(axes, keepdim=True) / m.sum(axes, keepdim=True).clamp_min(1.0)  # stay small in float32
        return (x.float() - mean) * m

    # float32 convolutions (oneDNN's; float64 ones have no fast kernel: 0.9 s for 7 blocks, against 4 ms), each sum
    # then in float64 for the differences below. Where every template lies wholly inside the source (a block at the
    # target's edge, the usual case), a sum with the template's mask is a plain window sum, and where every block
    # lies inside the target, a sum with the block's mask is the template's own sum: 3 convolutions instead of 6.
    b, t = centred(blocks.float(), bm), centred(templates.float(), w)
    shape = tuple(templates.shape[1:])
    whole_templates, whole_blocks = bool(w.all()), bool(bm.all())

    def window_sums(x: torch.Tensor) -> torch.Tensor:  # a sum with a template mask of ones
        return _box_sum(x.double(), shape)

    def own_sums(x: torch.Tensor) -> torch.Tensor:  # a sum with a block mask of ones, the same at every shift
        return x.double().sum(axes, keepdim=True)

    sum_tb = corr(b, t).double()
    if whole_templates:
        sum_b, sum_bb = window_sums(b), window_sums(b * b)
    else:
        sum_b, sum_bb = corr(b, w).double(), corr(b * b, w).double()
    if whole_blocks:
        count, sum_t, sum_tt = own_sums(w).expand_as(sum_tb), own_sums(t), own_sums(t * t)
    else:
        count = window_sums(bm) if whole_templates else corr(bm, w).double()
        sum_t, sum_tt = corr(bm, t).double(), corr(bm, t * t).double()
    safe = count.clamp_min(1.0)
    cross = sum_tb - sum_t * sum_b / safe
    var = (sum_tt - sum_t * sum_t / safe).clamp_min(0) * (sum_bb - sum_b * sum_b / safe).clamp_min(0)
    ncc = cross / (var.sqrt() + eps * safe)
    full = w.flatten(1).sum(1).view((n,) + (1,) * d)
    return torch.where(count >= min_overlap * full, ncc, torch.full_like(ncc, -1.0)).float()


def ncc_map(block: torch.Tensor, template: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`ncc_maps` for one d-dimensional ``block`` and ``template``."""
    return ncc_maps(block[None], template[None], eps)[0]


def _peak_offsets(ncc: torch.Tensor, subvoxel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) lattice offsets of each NCC map's peak from the map centre (lattice axis order 0..d-1) and the (N,)
    peak values; with ``subvoxel`` a parabola through the peak and its two neighbours per axis refines it."""
    maps = ncc.numpy()
    if np.isnan(maps).any():  # (a window whose variance overflowed: no likeness there, not the peak that argmax
        maps = np.where(np.isnan(maps), -np.inf, maps)  # takes a NaN for; a point was moved 7.4 mm by one: a review)
    n, shape = maps.shape[0], maps.shape[1:]
    flat = maps.reshape(n, -1)
    arg = flat.argmax(1)
    peak = flat[np.arange(n), arg]
    none = ~np.isfinite(peak)  # a map of NaN alone: no peak (NaN: the caller keeps the point where it was)
    if none.any():
        peak = np.where(none, np.nan, peak)
    idx = np.stack(np.unravel_index(arg, shape), axis=1)  # (N, d), array order: slowest first
    off = idx - (np.array(shape) - 1) / 2.0
    if subvoxel:
        rows = np.arange(n)
        for a in range(len(shape)):
            lo, hi = idx.copy(), idx.copy()
            lo[:, a] = np.maximum(lo[:, a] - 1, 0)
            hi[:, a] = np.minimum(hi[:, a] + 1, shape[a] - 1)
            fm, fp = maps[(rows, *lo.T)], maps[(rows, *hi.T)]
            with np.errstate(invalid="ignore"):  # (-inf neighbours: no step, below)
                denom = fm - 2 * peak + fp
                ok = (idx[:, a] > 0) & (idx[:, a] < shape[a] - 1) & (denom < 0) & np.isfinite(denom)
                step = np.clip(0.5 * (fm - fp) / np.where(ok, denom, -1.0), -0.5, 0.5)
            off[:, a] += np.where(ok, step, 0.0)
    off[none] = 0.0
    return off[:, ::-1], peak  # lattice axis order (0 = fastest)


def _search(blocks: torch.Tensor, block_masks: torch.Tensor | None, kept: torch.Tensor, templates: torch.Tensor,
            template_masks: torch.Tensor | None, peak: np.ndarray, run: np.ndarray, subvoxel: bool) -> np.ndarray:
    """One level of the polish for the points ``run``: each template's NCC over its block (over the voxels inside
    both images where either reaches beyond its image), its peak written to ``peak[run]``; returns the (n, d)
    offsets of the peaks in lattice steps. ``block_masks`` holds every sampled block's mask (``kept`` selects
    ``run``'s), ``template_masks`` only ``run``'s."""
    ncc = ncc_maps(blocks, templates)
    if block_masks is not None or template_masks is not None:
        bm = torch.ones_like(blocks, dtype=torch.bool) if block_masks is None else block_masks[kept]
        tm = torch.ones_like(templates, dtype=torch.bool) if template_masks is None else template_masks
        both = torch.nonzero(~(bm.flatten(1).all(1) & tm.flatten(1).all(1)))[:, 0]
        if len(both):
            ncc[both] = masked_ncc_maps(blocks[both], bm[both], templates[both], tm[both])
    off, peak[run] = _peak_offsets(ncc, subvoxel=subvoxel)
    return off


def polish_points(source: Image, target: Image, points_lps_mm: np.ndarray, matches_lps_mm: np.ndarray,
                  linear: np.ndarray | None = None, levels: tuple[tuple[float, float, float], ...] = DEFAULT_LEVELS,
                  min_ncc: float = 0.5, min_inside: float = 0.5,
                  alternatives: Sequence[np.ndarray] = (), batch: int = 128, keep_templates: bool = False) -> Polished:
    """Move each match to the best intensity match of its source point nearby (see the module docstring).

    Args:
        source, target: the images (any voxel grids, LPS mm).
        points_lps_mm: (N, d) points in the source.
        matches_lps_mm: (N, d) their matches in the target (e.g. from SAM), the start of the search.
        linear: (d, d) linear part of a source -> target affine (mm -> mm), or None for the identity.
        levels: ``(step_mm, template_half_mm, search_half_mm)`` per level, coarse to fine.
        min_ncc: below this final peak NCC the point keeps its input match.
        min_inside: skip a start whose template or search block lies less than this fraction inside its image.
        alternatives: further (N, d) start positions (e.g. an affine's prediction); every start is searched and
            the one with the highest final NCC wins. A start within half the first level's search radius of an
            earlier start, or that meets one after the first level, is not searched again.
        batch: points processed together, each through every start and level (memory grows with it).
        keep_templates: keep the source's templates at ``points_lps_mm`` for the next polish of the same points in
            another target (one atlas into many); they do not depend on the target. Only while all of them take
            at most :data:`KEPT_TEMPLATE_BYTES`; else each polish samples them again.

    Returns:
        :class:`Polished`.
    """
    d = source.ndim
    L = np.eye(d) if linear is None else np.asarray(linear, dtype=np.float64)[:d, :d]
    pts = np.asarray(points_lps_mm, dtype=np.float64)[:, :d]
    start = np.asarray(matches_lps_mm, dtype=np.float64)[:, :d]
    starts = [start] + [np.asarray(alt, dtype=np.float64)[:, :d] for alt in alternatives]
    n_pts = len(pts)
    if n_pts == 0:
        return Polished(start.copy(), np.full(0, np.nan), np.zeros(0, dtype=bool))
    best = start.copy()
    best_peak = np.full(n_pts, -np.inf)
    src_sampler, tgt_sampler = sampler_for(source), sampler_for(target)
    shapes = [(max(1, int(round(patch_mm / step))), max(1, int(round(search_mm / step))), step)
              for step, patch_mm, search_mm in levels]  # (template half, search half, step) per level
    # the source's templates of all points are kept for the next target only while they take little memory (the
    # float32 values and their masks); else each target samples them again, batch by batch
    keep = keep_templates and n_pts * sum((2 * h + 1) ** d * 5 for h, _, _ in shapes) <= KEPT_TEMPLATE_BYTES

    def sampled(rows: slice, h: int, step: float) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """The source's templates at ``pts[rows]``: (values, usable, which voxels lie inside the source or None:
        all), in groups of ``batch`` points."""
        parts, usable, masks = [], [], []
        for b in range(rows.start, rows.stop, batch):
            t, inside, mask = src_sampler.sample(pts[b:min(b + batch, rows.stop)], np.eye(d) * step, h, masks=True)
            spread = t.flatten(1).std(1).numpy()
            flat = spread <= 1e-6 * (1 + t.flatten(1).abs().amax(1).numpy())
            parts.append(t)
            usable.append((inside >= min_inside) & ~flat)
            masks.append(mask)
        ok = np.concatenate(usable)
        ok.setflags(write=False)  # may be kept and shared (keep_templates): read only
        if all(m is None for m in masks):  # every template wholly inside the source
            return torch.cat(parts), ok, None
        return torch.cat(parts), ok, torch.cat([torch.ones_like(t, dtype=torch.bool) if m is None else m
                                                for t, m in zip(parts, masks)])

    def templates_at(li: int, rows: slice) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """The templates of level ``li`` at ``pts[rows]`` (one batch)."""
        h, _, step = shapes[li]
        if not keep:
            return sampled(rows, h, step)
        # the source's templates do not depend on the target: all points' are sampled once per set of clicks
        key = b"".join([np.ascontiguousarray(pts).tobytes(), str((pts.shape, step, h, min_inside)).encode()])
        t, ok, masks = src_sampler.kept(key, lambda: sampled(slice(0, n_pts), h, step))
        return t[rows], ok[rows], None if masks is None else masks[rows]

    for b0 in range(0, n_pts, batch):
        # one batch of points at a time, each through every start and level: only this batch's templates are held
        rows = slice(b0, min(b0 + batch, n_pts))
        templates = [templates_at(li, rows) for li in range(len(levels))]
        seen: list[np.ndarray] = []  # per start: where it stood after the first level (NaN where it did not run)
        for si, st in enumerate(starts):
            c = st[rows].copy()
            peak = np.full(len(c), np.nan)
            # a start within half the first search radius of an earlier one is covered by that one's search
            active = np.ones(len(c), dtype=bool)
            for other in starts[:si]:
                active &= np.linalg.norm(st[rows] - other[rows], axis=1) >= 0.5 * levels[0][2]
            for li, (h, s, step) in enumerate(shapes):
                batch_templates, usable, template_masks = templates[li]
                axes_tgt = L @ (np.eye(d) * step)
                idx = np.flatnonzero(active)
                if len(idx):
                    blocks, in_tgt, block_masks = tgt_sampler.sample(c[idx], axes_tgt, h + s, masks=True)
                    ok = usable[idx] & (in_tgt >= min_inside)
                    active[idx[~ok]] = False
                    peak[idx[~ok]] = np.nan
                    if ok.any():
                        run, kept = idx[ok], torch.from_numpy(ok)
                        c[run] += _search(blocks[kept], block_masks, kept, batch_templates[run],
                                          None if template_masks is None else template_masks[run],
                                          peak, run, li == len(levels) - 1) @ axes_tgt.T
                if li == 0:  # starts that meet after the coarse level would give the same result
                    for earlier in seen:
                        met = active & (np.linalg.norm(c - earlier, axis=1) < 0.5 * step)
                        active[met] = False
                        peak[met] = np.nan
                    seen.append(np.where(active[:, None], c, np.nan))
            mine = best[rows], best_peak[rows]  # views into this batch's rows
            better = np.isfinite(peak) & (peak > mine[1])
            mine[0][better] = c[better]
            mine[1][better] = peak[better]
    ran = np.isfinite(best_peak)
    moved = ran & (best_peak >= min_ncc)
    out = start.copy()
    out[moved] = best[moved]
    return Polished(out, np.where(ran, best_peak, np.nan), moved)
