"""Point matching with SAM's similarity: sim(v) = (cos_local + cos_global) / 2, over every target voxel.

The score is a mean of two cosines, so it lies in [-1, 1]; real matches are high positive. All queries of
one target go through one matrix product ``(N, C) @ (C, V)``. The argmax is refined to sub-voxel precision
by a parabola through the peak and its neighbours along each axis, then mapped to LPS mm through the
target's local grid (oblique directions included).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .affine import apply_affine, ransac_affine
from .embedding import EmbeddingMaps
from .image import Image


@dataclass
class RawMatch:
    """Matches of N query points in one target: LPS mm points (N, 3 or 2), scores (N,), flat voxel indices (N,)."""

    points_lps_mm: np.ndarray
    scores: np.ndarray
    flat_index: np.ndarray
    similarity: torch.Tensor | None = None  # (N, V) when kept for heatmaps


def query_vectors(maps: EmbeddingMaps, points_lps_mm: np.ndarray, mode: str = "nearest") -> torch.Tensor:
    """Embedding vectors (N, C_l + C_g) at LPS mm points on the local grid.

    ``mode="nearest"`` takes the vector of the nearest local voxel (as the official code does; a point
    then matches itself exactly), ``"bilinear"`` interpolates the voxels' vectors linearly (as ``grid_sample`` with
    border padding would). Each half (local, global) is re-normalised, so the dot product with a voxel's whole
    vector (:meth:`~samembed.embedding.EmbeddingMaps.rows_at`) divided by 2 is the SAM similarity.
    """
    grid = maps.local_grid
    d = grid.ndim
    pts = np.asarray(points_lps_mm, dtype=np.float64)[:, :d]
    ijk = grid.lps_to_index(pts)
    size = np.asarray(grid.size_ijk, dtype=np.float64)
    cl = maps.local_channels
    if mode == "nearest":  # the nearest voxel's vector (what grid_sample returns), gathered without a volume pass
        near = np.clip(np.rint(ijk), 0, size - 1).astype(np.int64)[:, ::-1]
        flat = _ravel(torch.from_numpy(near.copy()), grid.shape_zyx)
        maps.ensure_flat(flat)  # on demand: the tiles holding these voxels
        q = maps.rows_at(flat)  # (N, C), normalised as before
    elif mode == "bilinear":  # the 2^d voxels around each point, weighted (border padding: clamped to the grid)
        at = np.clip(ijk, 0, size - 1)[:, ::-1]  # (N, d) zyx
        lo = np.floor(at).astype(np.int64)
        hi = np.minimum(lo + 1, size[::-1].astype(np.int64) - 1)
        frac = torch.from_numpy(at - lo).float()
        q = 0
        for bits in np.ndindex(*(2,) * d):
            corner = np.where(np.array(bits, dtype=bool), hi, lo)
            w = torch.ones(len(at))
            for a, b in enumerate(bits):
                w = w * (frac[:, a] if b else 1.0 - frac[:, a])
            flat = _ravel(torch.from_numpy(corner), grid.shape_zyx)
            maps.ensure_flat(flat)
            q = q + w[:, None].to(maps.features.device) * maps.rows_at(flat)
    else:
        raise ValueError(f"unknown mode '{mode}'; use nearest or bilinear")
    return torch.cat([F.normalize(q[:, :cl], dim=1), F.normalize(q[:, cl:], dim=1)], 1)


def similarity(queries: torch.Tensor, target: EmbeddingMaps, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """SAM similarity (N, V) of each query with every voxel of ``target``, in [-1, 1].

    Args:
        allowed: (V,) bool, e.g. the search mask: only these voxels are computed (on demand, only their tiles are
            embedded: a head-and-neck CT's body is about a tenth of its grid) and every other voxel is -inf.
            None: every voxel (the whole local map is embedded).
    """
    if allowed is None:
        allowed = torch.ones(target.features.shape[1], dtype=torch.bool)
    idx, feats = target.compact_features(allowed)  # the same copy (and products) as the search over the mask
    sim = torch.full((len(queries), target.features.shape[1]), float("-inf"), device=feats.device)
    sim[:, idx] = (queries.to(feats.dtype) @ feats).float() / 2.0
    return sim


def _subvoxel(value_at, flat: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Continuous (k, j, i) index of each peak, refined by a per-axis parabola (clamped to +-0.5 voxel).

    ``value_at(rows, flat_indices)`` returns the (masked, -inf outside the search) similarity of query
    ``rows[n]`` at voxel ``flat_indices[n]``.
    """
    N = len(flat)
    d = len(shape)
    idx = np.stack(np.unravel_index(flat.cpu().numpy(), shape), 1).astype(np.float64)  # (N, d) zyx
    rows = torch.arange(N)
    base = torch.from_numpy(idx.astype(np.int64))
    los, his = [], []
    for a in range(d):
        lo, hi = base.clone(), base.clone()
        lo[:, a] = (lo[:, a] - 1).clamp(min=0)
        hi[:, a] = (hi[:, a] + 1).clamp(max=shape[a] - 1)
        los.append(lo)
        his.append(hi)
    # the peak and its 2 d neighbours in one call (each value depends on its own query and voxel only)
    flats = [flat.cpu()] + [_ravel(v, shape) for pair in zip(los, his) for v in pair]
    values = value_at(rows.repeat(len(flats)), torch.cat(flats)).reshape(len(flats), N)
    s0 = values[0]
    for a in range(d):
        lo, hi = los[a], his[a]
        sm, sp = values[1 + 2 * a], values[2 + 2 * a]
        ok = torch.isfinite(sm) & torch.isfinite(sp) & (lo[:, a] != base[:, a]) & (hi[:, a] != base[:, a])
        den = sm - 2 * s0 + sp
        off = torch.where(ok & (den < 0), 0.5 * (sm - sp) / den.where(den != 0, torch.ones_like(den)), torch.zeros_like(den))
        idx[:, a] += off.clamp(-0.5, 0.5).cpu().numpy()
    return idx


def _ravel(zyx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Flat C-order index of (N, d) integer (k, j, i) indices."""
    flat = torch.zeros(len(zyx), dtype=torch.int64)
    for a, n in enumerate(shape):
        flat = flat * n + zyx[:, a]
    return flat


def _window_boxes(queries: torch.Tensor, target: EmbeddingMaps, allowed: torch.Tensor, window_mm: float,
                  window_centres_lps_mm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's search box on the local grid: +-``window_mm`` (along the grid axes) around its best *global*
    match among the allowed voxels, or around ``window_centres_lps_mm`` (N, d) when given.

    Returns ``(lo, hi, whole)``: inclusive (N, d) integer (k, j, i) corners, and (N,) bool marking the queries
    whose window holds no allowed voxel (outside the grid, or off the body); those search the whole grid. A window
    narrower than the grid holds at least the voxel nearest its centre along each axis: one that held no voxel
    centre searched the whole grid, the opposite of a tight window (an audit: ``--prior-window 1`` on a 4 mm grid).
    """
    grid = target.local_grid
    shape = grid.shape_zyx
    if window_centres_lps_mm is None:
        idx, feats = target.compact_features(allowed)
        cl = target.local_channels
        best = idx[(queries[:, cl:].to(feats.dtype) @ feats[cl:]).argmax(1)].cpu().numpy()
        centres = np.stack(np.unravel_index(best, shape), 1).astype(np.float64)
    else:
        centres = grid.lps_to_index(np.asarray(window_centres_lps_mm, dtype=np.float64)[:, : grid.ndim])[:, ::-1]
    radius = np.maximum(window_mm / grid.spacing_mm[::-1], 0.5)  # (voxels; half a voxel holds the nearest one)
    size = np.asarray(shape)
    lo = np.clip(np.ceil(centres - radius - 1e-9), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(centres + radius + 1e-9), 0, size - 1).astype(np.int64)
    inside_grid = np.all(hi >= lo, axis=1) & np.all(centres + radius >= 0, axis=1) & np.all(centres - radius <= size - 1, axis=1)
    holds = _boxes_hold(allowed.to(torch.bool).reshape(shape).cpu().numpy(), lo, hi)
    whole = ~(inside_grid & holds)
    lo[whole], hi[whole] = 0, size - 1
    return lo, hi, whole


#: windows beyond which :func:`_boxes_hold` sums a table of the grid instead of reading each window
TABLE_WINDOWS = 64


def _boxes_hold(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(N,) bool: the inclusive box ``lo[n]..hi[n]`` (integer corners inside the grid) holds a True voxel of
    ``mask``. A slice per box for a few boxes (a few windows read far less than a table of the grid would write);
    for more (a refinement's thousands of seeds), a summed-volume table of ``mask`` and 2^d corners per box."""
    if len(lo) <= TABLE_WINDOWS:
        return np.array([bool(mask[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo_n, hi_n))].any())
                         for lo_n, hi_n in zip(lo, hi)], dtype=bool)
    table = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.int64)
    inner = table[(slice(1, None),) * mask.ndim]
    inner[...] = mask
    for a in range(mask.ndim):
        np.cumsum(inner, axis=a, out=inner)
    total = np.zeros(len(lo), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=mask.ndim):  # inclusion-exclusion over the box's corners
        at = tuple(np.where(c, hi[:, a] + 1, lo[:, a]) for a, c in enumerate(corner))
        total += (-1) ** (mask.ndim - sum(corner)) * table[at]
    return total > 0


def box_masks(lo_zyx: np.ndarray, hi_zyx: np.ndarray, shape_zyx: tuple[int, ...]) -> torch.Tensor:
    """(N, V) bool: voxel ``v`` of a grid of ``shape_zyx`` lies in the inclusive box ``lo_zyx[n]..hi_zyx[n]`` ((N, d)
    integer (k, j, i) corners, as from :func:`_window_boxes`).

    Built axis by axis from (N, size) ranges and broadcast: no (V, d) voxel coordinates and no (N, V, d) comparisons
    (50 windows on LIDC-0001's local grid: 0.05 s against 0.86 s and 0.2 GB of temporaries), and no
    ``torch.unravel_index``, whose first call in a process imports sympy (0.3-0.6 s)."""
    lo = torch.from_numpy(np.asarray(lo_zyx, dtype=np.int64).reshape(-1, len(shape_zyx)))
    hi = torch.from_numpy(np.asarray(hi_zyx, dtype=np.int64).reshape(-1, len(shape_zyx)))
    n, d = lo.shape
    out = None
    for a, size in enumerate(shape_zyx):
        at = torch.arange(int(size))
        on_axis = (at[None] >= lo[:, a, None]) & (at[None] <= hi[:, a, None])  # (N, size)
        on_axis = on_axis.view(n, *(1,) * a, int(size), *(1,) * (d - a - 1))
        out = on_axis if out is None else out & on_axis
    return out.reshape(n, int(np.prod(shape_zyx)))


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maxima (N,), indices (N,))`` of each row of the 2D ``x``: what ``x.max(1)`` gives (the first maximum of a
    row, NaN counting as the largest value), found on the CPU by numpy's argmax, which is vectorised: 1.4 ms
    against torch's 5.8-6.7 ms for a 64 x 60 000 float32 block of the prior's products on the 2-core VM (a thin-slice
    chest CT's candidates), where torch's reduction keeps its index one value at a time. Other devices and dtypes
    take ``x.max(1)``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 2:
        return x.max(1)
    idx = torch.from_numpy(x.detach().numpy().argmax(1).astype(np.int64, copy=False))
    return x.gather(1, idx[:, None])[:, 0], idx


def box_max(values: torch.Tensor, lo_zyx: np.ndarray, hi_zyx: np.ndarray,
            shape_zyx: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maxima (N,), flat indices (N,))`` of each row of ``values`` (N, V), a map over a grid of ``shape_zyx``,
    within its inclusive box ``lo_zyx[n]..hi_zyx[n]`` (as :func:`box_masks`): what ``values.masked_fill(~box_masks(
    ...), -inf).max(1)`` gives, the first maximum in flat order, and index 0 for a box without a value above -inf,
    without the (N, V) masked copy and masks (50 windows on LIDC-0001's local grid: 142 MB and 36 MB)."""
    n = values.shape[0]
    vol = values.view(n, *shape_zyx)
    maxima = torch.empty(n, dtype=values.dtype, device=values.device)
    flat = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        a, b = np.asarray(lo_zyx[i], dtype=np.int64), np.asarray(hi_zyx[i], dtype=np.int64)
        sub = vol[i][tuple(slice(int(x), int(y) + 1) for x, y in zip(a, b))]
        m, k = sub.reshape(-1).max(0)  # C order within the box: its first maximum is the row's first in flat order
        maxima[i] = m
        if bool(m > float("-inf")):
            flat[i] = int(np.ravel_multi_index(tuple(np.unravel_index(int(k), tuple(sub.shape)) + a), shape_zyx))
    return maxima, flat


def in_boxes(flat: torch.Tensor, rows: torch.Tensor, lo_zyx: np.ndarray, hi_zyx: np.ndarray,
             shape_zyx: tuple[int, ...]) -> torch.Tensor:
    """(M,) bool on the CPU: flat voxel ``flat[m]`` of a grid of ``shape_zyx`` lies in the inclusive box of query
    ``rows[m]`` (``lo_zyx[rows[m]]..hi_zyx[rows[m]]``, as :func:`box_masks`): a windowed search's value outside its
    window is -inf."""
    zyx = np.stack(np.unravel_index(flat.cpu().numpy(), shape_zyx), 1)
    r = rows.cpu().numpy()
    return torch.from_numpy(((zyx >= lo_zyx[r]) & (zyx <= hi_zyx[r])).all(1))


def boxes_around(maps: EmbeddingMaps, points_lps_mm: np.ndarray, window_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (N, d) local-grid (k, j, i) corners of +-``window_mm`` boxes around LPS mm points (clipped to the
    grid), e.g. to embed on demand the tiles a windowed search around those points will read."""
    grid = maps.local_grid
    centres = grid.lps_to_index(np.asarray(points_lps_mm, dtype=np.float64)[:, : grid.ndim])[:, ::-1]
    radius = window_mm / grid.spacing_mm[::-1]
    size = np.asarray(grid.shape_zyx)
    lo = np.clip(np.ceil(centres - radius - 1e-9), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(centres + radius + 1e-9), 0, size - 1).astype(np.int64)
    return lo, hi


#: what searching one group of windows (:func:`_window_groups`) costs, in the time one value (a query's similarity at
#: a voxel) takes: a dozen calls per group, and per voxel of its union box the gathered features, the global part's
#: lengths, masks and maximum. Measured on the 2-core VM (a refinement's 3500 seeds per pass and a chest CT's 50
#: prior windows): about 2 ms per group, 100 ns per union voxel and 10 ns per value
GROUP_COST_VALUES = 200_000
VOXEL_COST_VALUES = 10
#: the most values (queries x union voxels) one group of windows holds: its similarities are in memory at once
MAX_GROUP_VALUES = 8_000_000


def _group_cost(queries: int, voxels: int) -> int:
    """What searching ``queries`` windows over one union box of ``voxels`` costs, in values (see
    :data:`GROUP_COST_VALUES`)."""
    return GROUP_COST_VALUES + voxels * (VOXEL_COST_VALUES + queries)


def _window_groups(lo: np.ndarray, hi: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """Consecutive ``rows`` in groups searched with one product over the union box (of the inclusive boxes
    ``lo..hi``) each. A query joins the group before it when searching them together costs no more than apart
    (:func:`_group_cost`) and the group holds at most :data:`MAX_GROUP_VALUES`: the 125 seeds of one refined point,
    whose windows overlap, share one group; far-apart windows (the organs of one head) stay apart."""
    groups: list[list[int]] = []
    ulo = uhi = ()
    voxels = 0  # the current group's union box's
    rows = [int(n) for n in rows]  # (Python integers: thousands of refinement seeds per pass)
    vols = np.prod(hi[rows] - lo[rows] + 1, axis=1).tolist() if rows else []
    for n, a, b, vol in zip(rows, lo[rows].tolist(), hi[rows].tolist(), vols):
        if groups:
            g = len(groups[-1])
            nlo, nhi = tuple(map(min, ulo, a)), tuple(map(max, uhi, b))
            union = math.prod(y - x + 1 for x, y in zip(nlo, nhi))
            if ((g + 1) * union <= MAX_GROUP_VALUES
                    and _group_cost(g + 1, union) <= _group_cost(g, voxels) + _group_cost(1, vol)):
                groups[-1].append(n)
                ulo, uhi, voxels = nlo, nhi, union
                continue
        groups.append([n])
        ulo, uhi, voxels = tuple(a), tuple(b), vol
    return [np.asarray(g, dtype=np.int64) for g in groups]


def _box_products(q: torch.Tensor, vvol: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """(g, U) float32 products of the queries ``q`` (g, C) with the voxel-major local feature volume ``vvol`` (*shape, C)
    over the voxels of ``box`` (slices, C order, steps of 1), one plane of the first axis at a time: each plane's
    rows are gathered into one reused buffer that stays in the cache (whole rows: no transposes), instead of
    gathering the whole box first (a window union of 5 organs is about 80 MB of features, whose gather took twice
    as long as this). A box of whole planes is a view of the volume's rows and needs no gathering. Each column
    equals one product over the gathered box to float rounding (the BLAS kernel's blocking depends on the matrix
    sizes)."""
    from .tiles import spans_whole_planes

    C = vvol.shape[-1]
    if spans_whole_planes(box, vvol.shape[:-1]):  # a view, no copy
        return (vvol[box[0]].reshape(-1, C) @ q.T.to(vvol.device)).T.float().to(q.device)
    plane = tuple(s.stop - s.start for s in box[1:])
    n_plane = int(np.prod(plane))
    out = torch.empty((len(q), box[0].stop - box[0].start, n_plane), dtype=torch.float32, device=q.device)
    buf = torch.empty((*plane, C), dtype=q.dtype, device=vvol.device)
    qt = q.T.to(vvol.device)
    for i, z in enumerate(range(box[0].start, box[0].stop)):
        buf.copy_(vvol[(z, *box[1:])])  # the plane's rows: runs of whole voxel vectors
        out[:, i] = (buf.view(n_plane, C) @ qt).T.float().to(q.device)
    return out.view(len(q), -1)


def _sparse_search(queries: torch.Tensor, target: EmbeddingMaps, allowed: torch.Tensor,
                   windows: tuple[np.ndarray, np.ndarray, np.ndarray] | None):
    """The argmax of :func:`match_queries` without the (N, V) similarity: over the compact copy of the
    allowed voxels' features, or, with ``windows`` (``lo, hi, whole`` of :func:`_window_boxes`, their local tiles
    computed), over each query's box of the feature volume only.

    Returns ``(scores (N,), flat indices (N,), value_at)`` where ``value_at(rows, flat)`` gives the searched
    similarity (-inf outside the search) for the sub-voxel fit.
    """
    shape = target.local_grid.shape_zyx
    full = target.features
    cl = target.local_channels
    q = queries.to(full.dtype)
    N = len(q)
    lo = hi = None
    if windows is not None:
        lo, hi, whole = windows
    if windows is None or whole.any():  # the whole grid: the compact copy of the allowed voxels is the cheaper way
        idx, feats = target.compact_features(allowed)
    if windows is None or whole.all():
        scores, j = row_max((q @ feats).float().div_(2.0))
        flat = idx[j].cpu()
    else:
        vvol = target.vectors.reshape(*shape, cl)
        avol = allowed.reshape(shape)
        scores = torch.empty(N)
        flat = torch.empty(N, dtype=torch.int64)
        for n in np.flatnonzero(whole):  # the whole grid: the compact copy is the cheaper way to search it
            s_all, j = row_max((q[n:n + 1] @ feats).float().div_(2.0))
            scores[n], flat[n] = s_all[0], idx[j[0]]
        for group in _window_groups(lo, hi, np.flatnonzero(~whole)):
            # the group's windows overlap (e.g. the refinement's seeds around one click): one copy of their
            # union's features and one product, each query then masked to its own window
            ulo, uhi = lo[group].min(0), hi[group].max(0)
            ushape = tuple(int(v) for v in uhi - ulo + 1)
            box = tuple(slice(int(a), int(b) + 1) for a, b in zip(ulo, uhi))
            qg = q[torch.from_numpy(group)]
            # local products with the stored vectors, global ones interpolated from the coarse map's (one value per
            # voxel instead of C_g)
            sim = _box_products(qg[:, :cl], vvol, box)
            sim.add_(target.global_similarity_box(qg[:, cl:], ulo, uhi).to(sim.device)).div_(2.0)  # (g, U)
            # the allowed voxels of the union, within each query's own window (its box within the union's)
            inside = avol[box].reshape(1, -1).to(sim.device) & box_masks(lo[group] - ulo, hi[group] - ulo, ushape).to(sim.device)
            best, k = row_max(sim.masked_fill_(~inside, float("-inf")))
            scores[torch.from_numpy(group)] = best.cpu()
            zyx = np.stack(np.unravel_index(k.cpu().numpy(), ushape), 1) + ulo
            flat[torch.from_numpy(group)] = torch.from_numpy(np.ravel_multi_index(tuple(zyx.T), shape))

    def value_at(rows, flat_idx):
        v = (q[rows].float() * target.rows_at(flat_idx)).sum(1) / 2.0
        v = v.masked_fill(~allowed[flat_idx.to(allowed.device)].to(v.device), float("-inf"))
        if lo is not None:  # outside the query's window
            v = v.masked_fill(~in_boxes(flat_idx, rows, lo, hi, shape).to(v.device), float("-inf"))
        return v.cpu()

    return scores, flat, value_at


def match_queries(queries: torch.Tensor, target: EmbeddingMaps, allowed: torch.Tensor | None = None,
                  keep_similarity: bool = False, window_mm: float | None = None,
                  window_centres_lps_mm: np.ndarray | None = None) -> RawMatch:
    """Best match of each query in ``target``.

    Args:
        queries: (N, C) from :func:`query_vectors`.
        allowed: (V,) bool of voxels a match may land on (default: inside the image and the body).
        keep_similarity: keep the (N, V) similarity for heatmaps: over the ``allowed`` voxels (the prior's window
            does not limit it), -inf elsewhere.
        window_mm: coarse-to-fine search: take the best joint similarity only within +-``window_mm`` of each
            query's best global match, or of ``window_centres_lps_mm`` (N, d) when given (e.g. predicted by
            :func:`affine_prior`). None: the official single joint argmax.
    """
    if allowed is None:
        allowed = target.search_mask(True)
    if not keep_similarity and not bool(allowed.any()):
        raise ValueError("no voxel to search in the target")
    grid = target.local_grid
    windows = _window_boxes(queries, target, allowed, window_mm, window_centres_lps_mm) if window_mm else None
    if not keep_similarity:
        if windows is not None:  # on demand: the local map of every query's window, in one pass (halos shared)
            lo, hi, whole = windows
            target.ensure(lo[~whole], hi[~whole], need=allowed)
        # only the searched voxels take part: a cached compact copy of their features, or each query's window;
        # (chunk, V) similarities at a time bound the memory (windows: their groups bound it, _window_groups, and a
        # query whose window is the whole grid is searched alone, unless every query's is)
        chunk = 64 if windows is None or windows[2].all() else max(len(queries), 1)
        parts = []
        for i in range(0, max(len(queries), 1), chunk):  # one (empty) chunk for no query, as for a few
            sel = slice(i, i + chunk)
            scores, flat, value_at = _sparse_search(queries[sel], target, allowed,
                                                    None if windows is None else tuple(w[sel] for w in windows))
            parts.append((scores, flat, _subvoxel(value_at, flat, grid.shape_zyx)))
        scores = torch.cat([p[0] for p in parts])
        flat = torch.cat([p[1] for p in parts])
        zyx = np.concatenate([p[2] for p in parts])
    else:
        sim = similarity(queries, target, allowed)  # -inf outside the search mask (a heatmap shows -1 there)
        if windows is None:
            scores, flat = row_max(sim)

            def value_at(rows, flat_idx):
                return sim[rows, flat_idx.to(sim.device)].cpu()
        else:  # the same boxes as the sparse search, each row's maximum within its own (no masked copy of sim)
            lo, hi, _ = windows
            scores, flat = box_max(sim, lo, hi, grid.shape_zyx)

            def value_at(rows, flat_idx):
                v = sim[rows, flat_idx.to(sim.device)].cpu()
                return v.masked_fill(~in_boxes(flat_idx, rows, lo, hi, grid.shape_zyx), float("-inf"))
        zyx = _subvoxel(value_at, flat, grid.shape_zyx)
    ijk = zyx[:, ::-1]
    pts = grid.index_to_lps(ijk)
    scores = scores.clamp(-1.0, 1.0)  # float rounding can exceed 1 by ~1e-7
    return RawMatch(pts, scores.cpu().numpy().astype(np.float64), flat.cpu().numpy(), sim if keep_similarity else None)


def nearest_voxel_lps(maps: EmbeddingMaps, points_lps_mm: np.ndarray) -> np.ndarray:
    """Centres (N, d) LPS mm of the local voxels nearest to ``points_lps_mm``, among those whose centres lie inside
    the image: the local grid extends beyond the image to a multiple of the network's size, and a voxel there holds
    the fill value's vector (a point in a radiograph's last pixel column, nearest to such a voxel, was matched
    30-312 pixels off, even onto itself)."""
    grid = maps.local_grid
    d = grid.ndim
    ijk = np.rint(grid.lps_to_index(np.asarray(points_lps_mm, dtype=np.float64)[:, :d]))
    lo, hi = np.zeros(d), np.asarray(grid.size_ijk, dtype=np.float64) - 1
    image = maps.image_grid
    if image is not None and image.ndim == d:  # the image's box (its voxels' outer corners) in local indices
        box = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in image.size_ijk], indexing="ij")).reshape(d, -1).T
        at = grid.lps_to_index(image.index_to_lps(box))
        first, last = np.ceil(at.min(0) - 1e-6), np.floor(at.max(0) + 1e-6)
        ok = first <= last  # (a box thinner than a local voxel keeps the whole grid's range on that axis)
        lo, hi = np.where(ok, np.maximum(lo, first), lo), np.where(ok, np.minimum(hi, last), hi)
    ijk = np.clip(ijk, lo, hi)
    return grid.index_to_lps(ijk)


def allowed_at(maps: EmbeddingMaps, allowed: torch.Tensor, points_lps_mm: np.ndarray) -> np.ndarray:
    """(N,) bool: the local voxel nearest to each LPS mm point is in ``allowed`` (False outside the grid)."""
    grid = maps.local_grid
    d = grid.ndim
    ijk = np.rint(grid.lps_to_index(np.asarray(points_lps_mm, dtype=np.float64)[:, :d])).astype(np.int64)
    inside = grid.contains_index(ijk, margin=0.0)
    out = np.zeros(len(ijk), dtype=bool)
    if inside.any():
        flat = _ravel(torch.from_numpy(ijk[inside][:, ::-1].copy()), grid.shape_zyx)
        out[inside] = allowed.cpu()[flat].numpy()
    return out


def in_air(maps: EmbeddingMaps, points_lps_mm: np.ndarray, reach_voxels: int = 1) -> np.ndarray:
    """(N,) bool: no body voxel (``maps.search_mask(True)``) lies within ``reach_voxels`` local voxels of each LPS mm
    point along every axis (4 mm on the default grid): a click in the air around the body (a point placed off the
    body, or given in the other frame). A point on the skin is not in air."""
    body = maps.search_mask(True)
    grid = maps.local_grid
    ijk = grid.lps_to_index(np.asarray(points_lps_mm, dtype=np.float64)[:, :grid.ndim])
    near = np.zeros(len(ijk), dtype=bool)
    steps = range(-reach_voxels, reach_voxels + 1)
    for offset in itertools.product(steps, repeat=grid.ndim):  # (i, j, k) voxel steps
        near |= allowed_at(maps, body, grid.index_to_lps(ijk + np.asarray(offset, dtype=np.float64)))
    return ~near


def match_points(source: EmbeddingMaps, points_lps_mm: np.ndarray, target: EmbeddingMaps,
                 allowed: torch.Tensor | None = None, keep_similarity: bool = False,
                 window_mm: float | None = None, prior: np.ndarray | None = None,
                 shift_mm: np.ndarray | None = None) -> RawMatch:
    """Match LPS mm points of ``source`` into ``target``.

    Each point is matched through its nearest local voxel; the match is then moved by the point's offset
    from that voxel centre (a locally rigid sub-voxel correction), so a point matched into its own image
    comes back to itself.

    Args:
        window_mm: search each point within +-``window_mm`` of its window centre (see :func:`match_queries`).
        prior: (d+1, d+1) affine: the window centres are the points mapped by it.
        shift_mm: (N, d): the window centres are the points moved by these offsets (one translation per point),
            instead of ``prior``.
    """
    d = source.local_grid.ndim
    pts = np.asarray(points_lps_mm, dtype=np.float64)[:, :d]
    centres = nearest_voxel_lps(source, pts)
    win_centres = apply_affine(prior, pts) if prior is not None else None
    if shift_mm is not None:
        win_centres = pts + np.asarray(shift_mm, dtype=np.float64)[:, :d]
    raw = match_queries(query_vectors(source, centres), target, allowed, keep_similarity, window_mm, win_centres)
    raw.points_lps_mm = raw.points_lps_mm + (pts - centres)
    return raw


#: a prior is trusted when at least this share of the global correspondences agrees on the affine ...
MIN_AFFINE_INLIERS = 0.2
#: ... or, failing that, on one translation (found even when few agree: one pair per hypothesis)
MIN_TRANSLATION_INLIERS = 0.05


#: source samples whose global products with the target's candidates are taken at a time (:func:`global_pairs`)
PRIOR_CHUNK = 64


def global_pairs(source: EmbeddingMaps, target: EmbeddingMaps, samples: int = 500,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` body voxels of the source (LPS mm, (M, d)) and their best matches in the target's body by the
    *global* embedding only (LPS mm, (M, d)); empty arrays when either body is too small."""
    rng = np.random.default_rng(seed)
    grid = source.local_grid
    d = grid.ndim
    cand = torch.nonzero(source.search_mask(True)).reshape(-1).cpu().numpy()
    if len(cand) < d + 2:
        return np.zeros((0, d)), np.zeros((0, d))
    pick = rng.choice(cand, size=min(samples, len(cand)), replace=False)
    idx = np.stack(np.unravel_index(pick, grid.shape_zyx), 1)[:, ::-1].astype(np.float64)
    src_pts = grid.index_to_lps(idx)
    q = F.normalize(source.global_at(torch.from_numpy(pick)).T.float(), dim=1)  # global vectors only (no local tile)
    # the global map is smooth at its own (coarser) resolution: every other local voxel along each axis is
    # enough as a candidate, which makes the search 2^d times cheaper
    tgrid = target.local_grid
    allowed = target.search_mask(True).cpu().reshape(tgrid.shape_zyx)
    # the allowed voxels at even indices on every axis, as flat indices of the whole grid (in increasing order)
    lattice = torch.nonzero(allowed[(slice(None, None, 2),) * d]) * 2
    cand_t = torch.from_numpy(np.ravel_multi_index(tuple(lattice.T.numpy()), tgrid.shape_zyx)).reshape(-1)
    if len(cand_t) == 0:
        return np.zeros((0, d)), np.zeros((0, d))
    feats = target.global_at(cand_t).to(target.features.device)  # computed from the coarse map
    q = q.to(feats.device)
    # each sample's best candidate, PRIOR_CHUNK samples at a time into one reused buffer: a chunk's products (a few
    # MB) instead of every sample's at once (50 MB for a head-and-neck CT's 25 k candidates, its pages faulted in per
    # target); a product's value does not depend on the other rows, so the argmax is the same
    buf = torch.empty((min(PRIOR_CHUNK, len(q)), feats.shape[1]), dtype=torch.float32, device=feats.device)
    j = []
    for i in range(0, len(q), PRIOR_CHUNK):
        chunk = q[i:i + PRIOR_CHUNK]
        j.append(row_max(torch.matmul(chunk, feats, out=buf[:len(chunk)]))[1].cpu())
    best = cand_t[torch.cat(j)].numpy()
    dst = tgrid.index_to_lps(np.stack(np.unravel_index(best, tgrid.shape_zyx), 1)[:, ::-1].astype(np.float64))
    return src_pts, dst


def affine_prior(source: EmbeddingMaps, target: EmbeddingMaps, samples: int = 500, inlier_mm: float = 20.0,
                 iterations: int = 1000, seed: int = 0) -> tuple[np.ndarray, float]:
    """A robust source->target affine (LPS mm) from many global-embedding correspondences (as in SAME).

    ``samples`` body voxels of the source are matched into the target's body by their *global* embedding only
    (:func:`global_pairs`); RANSAC (minimal sets of d+1 pairs, ``inlier_mm`` threshold) then a least-squares fit on
    the inliers gives the affine. Returns the (d+1, d+1) matrix and the inlier fraction. Queries can then be
    searched in a window around their affine-predicted position, which removes gross mismatches between subjects.
    """
    return _affine_of(*global_pairs(source, target, samples, seed), source.local_grid.ndim, inlier_mm, iterations, seed)


def _affine_of(src_pts: np.ndarray, dst: np.ndarray, d: int, inlier_mm: float, iterations: int,
               seed: int) -> tuple[np.ndarray, float]:
    if len(src_pts) < d + 2:
        return np.eye(d + 1), 0.0
    try:
        M, inl = ransac_affine(src_pts, dst, inlier_mm, iterations=iterations, seed=seed)
    except ValueError:
        return np.eye(d + 1), 0.0
    if inl.sum() < d + 2 or not plausible_affine(M, d):
        return np.eye(d + 1), 0.0
    return M, float(inl.mean())


#: the volume (area) ratio an affine between two scans of a body may have: anything outside folds space flat or
#: blows it up, and is no prior (e.g. a fit to the few voxels of a tiny image)
AFFINE_VOLUME_RATIO = (1e-3, 1e3)

#: how much more an affine between two scans of a body may stretch one direction than another (the ratio of the
#: largest to the smallest singular value of its linear part): at most 2.3 over the 31 pairs of the landmark
#: benchmark whose affine is trusted (28 OpenKBP pairs of two patients, 3 LIDC warps); a fit beyond this crushes an
#: axis, as RANSAC does for a target that holds a slab of the source (40 of its 112 slices: 0.29 along z, 3.7 against
#: the other axes), whose samples beyond the slab match its edges. A scale of the same size along every axis (another
#: body size, or another voxel size in a radiograph's metadata) is no anisotropy.
AFFINE_ANISOTROPY = 3.0


def plausible_affine(M: np.ndarray, d: int) -> bool:
    """``M`` ((d+1, d+1)) is finite, its linear part changes volumes by a ratio within :data:`AFFINE_VOLUME_RATIO`
    (so it is invertible, as a search window's inverse needs) and stretches no direction more than
    :data:`AFFINE_ANISOTROPY` times another."""
    if not np.isfinite(M).all():
        return False
    det = abs(float(np.linalg.det(M[:d, :d])))
    if not AFFINE_VOLUME_RATIO[0] <= det <= AFFINE_VOLUME_RATIO[1]:
        return False
    scales = np.linalg.svd(M[:d, :d], compute_uv=False)
    return bool(scales.max() <= AFFINE_ANISOTROPY * scales.min())


def search_prior(source: EmbeddingMaps, target: EmbeddingMaps, inlier_mm: float = 20.0, iterations: int = 1000,
                 seed: int = 0) -> tuple[np.ndarray | None, str, float]:
    """The prior a search window is centred on: ``(matrix or None, kind, inlier fraction)``.

    The affine of :func:`affine_prior` when at least :data:`MIN_AFFINE_INLIERS` of the global correspondences agree
    on it (kind ``"affine"``). Otherwise RANSAC's minimal sets of d + 1 pairs rarely hold only inliers, so the
    translation that most pairs agree on is tried (:func:`translation_consensus`, kind ``"translation"``; e.g. a
    head-only scan against one of the head and chest, where 6 % of the pairs agree); when fewer than
    :data:`MIN_TRANSLATION_INLIERS` agree on it either, there is no prior (None, ``"none"``) and searches cover the
    whole body.
    """
    d = source.local_grid.ndim
    src_pts, dst = global_pairs(source, target, seed=seed)
    M, frac = _affine_of(src_pts, dst, d, inlier_mm, iterations, seed)
    if frac >= MIN_AFFINE_INLIERS:
        return M, "affine", frac
    if len(src_pts) >= d + 2:
        T, tfrac = translation_consensus(src_pts, dst, inlier_mm)
        if tfrac >= MIN_TRANSLATION_INLIERS:
            return T, "translation", tfrac
    return None, "none", frac


def translation_consensus(src_lps_mm: np.ndarray, dst_lps_mm: np.ndarray, inlier_mm: float) -> tuple[np.ndarray, float]:
    """The translation most correspondence pairs agree on (each pair's own translation tried as a hypothesis;
    inliers within ``inlier_mm``), refined as the mean over its inliers: ``(d+1, d+1)`` matrix, inlier fraction."""
    t = np.asarray(dst_lps_mm, dtype=np.float64) - np.asarray(src_lps_mm, dtype=np.float64)
    d = t.shape[1]
    close = np.linalg.norm(t[:, None] - t[None], axis=2) <= inlier_mm
    best = int(close.sum(1).argmax())
    inl = close[best]
    inl = np.linalg.norm(t - t[inl].mean(0), axis=1) <= inlier_mm  # once more around the inliers' mean
    M = np.eye(d + 1)
    M[:d, d] = t[inl].mean(0)
    return M, float(inl.mean())


def box_mask(maps: EmbeddingMaps, box_lps_mm: np.ndarray) -> torch.Tensor:
    """(V,) bool: voxels whose LPS centre lies in the axis-aligned box ``[[x0, y0, z0], [x1, y1, z1]]`` (mm)."""
    box = np.asarray(box_lps_mm, dtype=np.float64).reshape(2, -1)
    lo, hi = box.min(0), box.max(0)
    grid = maps.local_grid
    idx = np.indices(grid.shape_zyx).reshape(grid.ndim, -1).T[:, ::-1]
    pts = grid.index_to_lps(idx)
    inside = np.all((pts >= lo[: grid.ndim]) & (pts <= hi[: grid.ndim]), axis=1)
    return torch.from_numpy(inside).to(maps.valid.device)


def mask_from_image(maps: EmbeddingMaps, mask: Image) -> torch.Tensor:
    """(V,) bool: voxels whose LPS centre falls on a non-zero voxel of ``mask`` (nearest neighbour)."""
    grid = maps.local_grid
    idx = np.indices(grid.shape_zyx).reshape(grid.ndim, -1).T[:, ::-1]
    m_idx = np.rint(mask.grid.lps_to_index(grid.index_to_lps(idx))).astype(np.int64)
    inside = mask.grid.contains_index(m_idx, margin=0.0)
    out = np.zeros(len(idx), dtype=bool)
    sel = m_idx[inside][:, ::-1]
    out[inside] = mask.array[tuple(sel.T)] != 0
    return torch.from_numpy(out).to(maps.valid.device)


def scores_at(source: EmbeddingMaps, points_lps_mm: np.ndarray, target: EmbeddingMaps,
              found_lps_mm: np.ndarray) -> np.ndarray:
    """SAM similarity (N,) of each source point with the target where its match ended: at the local voxel that
    the match's *image* voxel falls in, which is exactly the value :func:`heatmap_image` shows there.

    So a reported score and the heatmap agree at the match, whatever moved it (sub-voxel fit, polish).
    """
    d = source.local_grid.ndim
    q = query_vectors(source, nearest_voxel_lps(source, np.asarray(points_lps_mm, dtype=np.float64)[:, :d]))
    img_grid = target.image_grid
    ijk = np.rint(img_grid.lps_to_index(np.asarray(found_lps_mm, dtype=np.float64)[:, :d]))
    ijk = np.clip(ijk, 0, np.asarray(img_grid.size_ijk) - 1)
    # ITK's nearest-neighbour rule (round half up), as the heatmap's resampling uses it
    loc = np.floor(target.local_grid.lps_to_index(img_grid.index_to_lps(ijk)) + 0.5).astype(np.int64)
    loc = np.clip(loc, 0, np.asarray(target.local_grid.size_ijk) - 1)
    flat = _ravel(torch.from_numpy(loc[:, ::-1].copy()), target.local_grid.shape_zyx)
    target.ensure_flat(flat)
    feats = target.rows_at(flat)
    return ((q.float() * feats).sum(1) / 2.0).clamp(-1.0, 1.0).cpu().numpy().astype(np.float64)


def heatmap_image(sim_row: torch.Tensor, target: EmbeddingMaps, name: str = "heatmap") -> Image:
    """Put one similarity row (V,) of the local grid onto the target image's voxel grid
    (:func:`samembed.heatmap.heatmap_on_grid`: nearest neighbour, so the map keeps its true peak values and its value
    at a match equals the match's score, see :func:`scores_at`; -1 outside the local grid and where the similarity
    was not computed, -inf or NaN: outside the search mask). The result has exactly the target image's geometry."""
    from .heatmap import heatmap_on_grid

    return heatmap_on_grid(sim_row.float().cpu().numpy(), target.local_grid, target.image_grid, name)
