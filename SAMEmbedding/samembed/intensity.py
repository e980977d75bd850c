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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image

#: default coarse-to-fine levels: (lattice step, template half-size, search half-size), all mm
DEFAULT_LEVELS: tuple[tuple[float, float, float], ...] = ((2.0, 16.0, 8.0), (1.0, 10.0, 2.0), (0.5, 6.0, 1.0))


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


def sample_lattice(image: Image, centre_lps_mm: np.ndarray, axes_lps_mm: np.ndarray, half: int) -> tuple[torch.Tensor, float]:
    """Sample ``image`` (linear interpolation) at ``centre + axes @ v`` for integer ``v`` in ``[-half, half]^d``.

    Args:
        centre_lps_mm: (d,) lattice centre.
        axes_lps_mm: (d, d); column ``a`` is the LPS step (mm) of lattice axis ``a``.
        half: lattice half-size in steps.

    Returns:
        ``(values, inside)``: a float32 tensor of shape ``(2 half + 1,) * d`` (slowest lattice axis first) and the
        fraction of lattice points inside the image (outside points take the nearest border value).
    """
    grid = image.grid
    d = grid.ndim
    offsets = _lattice_offsets(half, d)
    # lattice -> continuous index (i, j, k): ijk = ijk0 + M v
    ijk0 = grid.lps_to_index(np.asarray(centre_lps_mm, dtype=np.float64)[None, :d])[0]
    M = np.linalg.inv(grid.direction @ np.diag(grid.spacing_mm)) @ np.asarray(axes_lps_mm, dtype=np.float64)
    reach = np.abs(M).sum(1) * half  # the lattice's extent from its centre along each index axis
    size = np.asarray(grid.size_ijk)
    lo = np.clip(np.floor(ijk0 - reach).astype(int) - 1, 0, size - 1)
    hi = np.clip(np.ceil(ijk0 + reach).astype(int) + 1, 0, size - 1)
    crop = image.array[tuple(slice(lo[a], hi[a] + 1) for a in reversed(range(d)))]
    vol = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    ijk = torch.from_numpy(ijk0.astype(np.float32)) + offsets @ torch.from_numpy(M.T.astype(np.float32))
    upper = torch.from_numpy((size - 0.5).astype(np.float32))
    inside = float(((ijk >= -0.5) & (ijk <= upper)).all(-1).float().mean())
    lo_t = torch.from_numpy(lo.astype(np.float32))
    scale = torch.from_numpy((2.0 / np.maximum(hi - lo, 1)).astype(np.float32))
    g = ((ijk - lo_t) * scale - 1.0)[None]  # (i, j, k) order, as grid_sample's (x, y, z)
    out = F.grid_sample(vol, g, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, 0], inside


def _box_mean(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``x`` over every window of ``shape`` ('valid'), by cumulative sums (one pass per axis)."""
    for a, k in enumerate(shape):
        c = torch.cumsum(F.pad(x.movedim(a, -1), (1, 0)), dim=-1)
        x = (c[..., k:] - c[..., :-k]).movedim(-1, a)
    return x / float(np.prod(shape))


def ncc_map(block: torch.Tensor, template: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised cross-correlation of ``template`` at every shift that keeps it inside ``block`` ('valid').

    Both are d-dimensional (2 or 3) float tensors; the result has shape ``block.shape - template.shape + 1``,
    values in [-1, 1]. A flat template or window gives 0.
    """
    conv = F.conv3d if template.ndim == 3 else F.conv2d
    t = template - template.mean()
    t_std = t.pow(2).mean().sqrt()
    block = block.double()  # window variances by cumulative sums need the precision
    mean = _box_mean(block, tuple(template.shape))
    b_std = (_box_mean(block * block, tuple(template.shape)) - mean * mean).clamp_min(0).sqrt().float()
    cross = conv(block.float()[None, None], t[None, None])[0, 0] / template.numel()
    return cross / (t_std * b_std + eps)


def _peak_offset(ncc: torch.Tensor, subvoxel: bool) -> tuple[np.ndarray, float]:
    """(d,) lattice offset of the NCC peak from the map centre (lattice axis order 0..d-1) and the peak value."""
    d = ncc.ndim
    flat = int(torch.argmax(ncc))
    idx = np.array(np.unravel_index(flat, tuple(ncc.shape)))  # array order: slowest first
    peak = float(ncc.reshape(-1)[flat])
    centre = (np.array(ncc.shape) - 1) / 2.0
    off = idx - centre
    if subvoxel:
        for a in range(d):
            if 0 < idx[a] < ncc.shape[a] - 1:
                lo, hi = idx.copy(), idx.copy()
                lo[a] -= 1
                hi[a] += 1
                f0, fm, fp = peak, float(ncc[tuple(lo)]), float(ncc[tuple(hi)])
                denom = fm - 2 * f0 + fp
                if denom < 0:
                    off[a] += float(np.clip(0.5 * (fm - fp) / denom, -0.5, 0.5))
    return off[::-1], peak  # lattice axis order (0 = fastest)


def polish_points(source: Image, target: Image, points_lps_mm: np.ndarray, matches_lps_mm: np.ndarray,
                  linear: np.ndarray | None = None, levels: tuple[tuple[float, float, float], ...] = DEFAULT_LEVELS,
                  min_ncc: float = 0.5, min_inside: float = 0.5,
                  alternatives: Sequence[np.ndarray] = ()) -> Polished:
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

    Returns:
        :class:`Polished`.
    """
    d = source.ndim
    L = np.eye(d) if linear is None else np.asarray(linear, dtype=np.float64)[:d, :d]
    pts = np.asarray(points_lps_mm, dtype=np.float64)[:, :d]
    start = np.asarray(matches_lps_mm, dtype=np.float64)[:, :d]
    starts = [start] + [np.asarray(alt, dtype=np.float64)[:, :d] for alt in alternatives]
    out = start.copy()
    ncc_out = np.full(len(pts), np.nan)
    moved = np.zeros(len(pts), dtype=bool)
    for n in range(len(pts)):
        templates: dict[int, torch.Tensor | None] = {}

        def template_at(li: int, h: int, step: float) -> torch.Tensor | None:
            if li not in templates:
                t, inside = sample_lattice(source, pts[n], np.eye(d) * step, h)
                flat = float(t.std()) <= 1e-6 * (1 + float(t.abs().max()))
                templates[li] = None if inside < min_inside or flat else t
            return templates[li]

        best_c, best_peak = None, -np.inf
        seen: list[np.ndarray] = []
        first_search_mm = levels[0][2]
        for si, st in enumerate(starts):
            c, peak = st[n].copy(), np.nan
            # a start within half the first search radius of an earlier one is covered by that one's search
            if any(np.linalg.norm(c - o[n]) < 0.5 * first_search_mm for o in starts[:si]):
                continue
            for li, (step, patch_mm, search_mm) in enumerate(levels):
                h = max(1, int(round(patch_mm / step)))
                s = max(1, int(round(search_mm / step)))
                template = template_at(li, h, step)
                axes_tgt = L @ (np.eye(d) * step)
                block, in_tgt = sample_lattice(target, c, axes_tgt, h + s)
                if template is None or in_tgt < min_inside:
                    peak = np.nan
                    break
                off, peak = _peak_offset(ncc_map(block, template), subvoxel=li == len(levels) - 1)
                c = c + axes_tgt @ off
                if li == 0:  # starts that meet after the coarse level would give the same result
                    if any(np.linalg.norm(c - o) < 0.5 * step for o in seen):
                        peak = np.nan
                        break
                    seen.append(c.copy())
            if np.isfinite(peak) and peak > best_peak:
                best_c, best_peak = c, peak
        if best_c is not None:
            ncc_out[n] = best_peak
            if best_peak >= min_ncc:
                out[n] = best_c
                moved[n] = True
    return Polished(out, ncc_out, moved)
