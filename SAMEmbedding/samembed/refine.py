"""``--refine``: the fixed-point, cycle-consistent refinement of SAMv2 (UAE-S), adapted to continuous points.

For a click ``p`` in the source (reference section 4.4):

1. a seed grid of (2m+1)^d points around ``p`` on the source's local grid (m = 2: +-8 mm at 4 mm);
2. four alternating matches q -> k -> q -> k -> q (forward, backward, forward, backward);
3. keep pairs (Q, K) that are cycle-consistent (the last backward match lands within ``cycle_mm`` of the
   point it started from) and whose score exceeds ``min_score``;
4. fit a robust local affine Q -> K (Huber IRLS with a MAD scale, per target coordinate);
5. transfer the click: mean over kept pairs of ``K - A (Q - p)``.

When fewer than ``min_pairs`` pairs survive, the plain match is returned; so it is too when the transferred click
lands where a match may not (outside ``tgt_allowed``, or outside the target: an extrapolated affine whose true match
lies beyond the target's field of view).

With ``window_mm``, it is a *local* refinement: every forward match of a seed is searched within +-``window_mm``
of the plain match shifted by the seed's offset from the click, and every backward match within +-``window_mm``
of where it started, so each of the four passes costs a few small boxes instead of whole volumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .embedding import EmbeddingMaps
from .matcher import allowed_at, match_points


@dataclass
class Refined:
    """Refined matches: points (N, d) LPS mm, scores (N,), number of consistent pairs used per point."""

    points_lps_mm: np.ndarray
    scores: np.ndarray
    pairs_used: np.ndarray


def huber_irls(X: np.ndarray, y: np.ndarray, t: float = 1.345, iterations: int = 20) -> np.ndarray:
    """Robust linear regression y ~ X b with Huber's T norm (statsmodels RLM defaults), MAD scale."""
    b = np.linalg.lstsq(X, y, rcond=None)[0]
    for _ in range(iterations):
        r = y - X @ b
        scale = np.median(np.abs(r - np.median(r))) / 0.6745
        if scale < 1e-9:
            break
        u = np.abs(r / scale)
        w = np.where(u <= t, 1.0, t / np.maximum(u, 1e-12))
        sw = np.sqrt(w)
        b_new = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[0]
        if np.all(np.abs(b_new - b) <= 1e-8 + 1e-5 * np.abs(b)):  # np.allclose(b_new, b, atol=1e-8), faster
            b = b_new
            break
        b = b_new
    return b


def _seed_grid(source: EmbeddingMaps, p: np.ndarray, margin: int) -> np.ndarray:
    grid = source.local_grid
    d = grid.ndim
    c = grid.lps_to_index(p[None, :d])[0]
    r = np.arange(-margin, margin + 1)
    offs = np.stack(np.meshgrid(*([r] * d), indexing="ij"), -1).reshape(-1, d)
    idx = c + offs
    hi = np.asarray(grid.size_ijk) - 1
    idx = np.clip(idx, 0, hi)
    idx = np.unique(np.round(idx, 4), axis=0)
    return grid.index_to_lps(idx)


def refine_points(source: EmbeddingMaps, target: EmbeddingMaps, points_lps_mm: np.ndarray, plain: np.ndarray,
                  plain_scores: np.ndarray, margin: int = 2, cycle_mm: float | None = None, min_score: float = -1.0,
                  min_pairs: int = 4, src_allowed: torch.Tensor | None = None, tgt_allowed: torch.Tensor | None = None,
                  window_mm: float | None = None) -> Refined:
    """Refine matches of ``points_lps_mm`` (N, d) from ``source`` into ``target`` (see module docstring).

    Args:
        plain, plain_scores: the unrefined matches, used when refinement has too few pairs.
        cycle_mm: cycle-consistency radius (default: 1.5 x the source local voxel size).
        window_mm: half-size of the local search boxes (see the module docstring); None: whole volumes.
    """
    d = source.local_grid.ndim
    cycle = float(cycle_mm) if cycle_mm is not None else 1.5 * float(np.mean(source.local_grid.spacing_mm))
    out_pts = plain[:, :d].copy()
    out_scores = plain_scores.copy()
    used = np.zeros(len(points_lps_mm), dtype=int)
    pts = np.asarray(points_lps_mm, dtype=np.float64)[:, :d]
    if not len(pts):
        return Refined(out_pts, out_scores, used)
    # the four passes run for every point's seeds at once (each query is matched alone, so the result is the
    # same as point by point): on demand, each pass embeds the tiles of all its windows in one go, halos shared
    seeds = [_seed_grid(source, p, margin) for p in pts]
    owner = np.concatenate([np.full(len(q), n) for n, q in enumerate(seeds)])
    q0 = np.concatenate(seeds)
    fwd = bwd = None
    if window_mm:  # translations by the plain match's displacement, as window centres
        fwd = (plain[:, :d] - pts)[owner]
        bwd = -fwd
    k1 = match_points(source, q0, target, tgt_allowed, window_mm=window_mm, shift_mm=fwd)
    q1 = match_points(target, k1.points_lps_mm, source, src_allowed, window_mm=window_mm, shift_mm=bwd)
    k2 = match_points(source, q1.points_lps_mm, target, tgt_allowed, window_mm=window_mm, shift_mm=fwd)
    q2 = match_points(target, k2.points_lps_mm, source, src_allowed, window_mm=window_mm, shift_mm=bwd)
    for n, p in enumerate(pts):
        mine = owner == n
        Q, K, s = q2.points_lps_mm[mine], k2.points_lps_mm[mine], q2.scores[mine]
        consistent = np.linalg.norm(Q - q1.points_lps_mm[mine], axis=1) <= cycle
        keep = consistent & (s > min_score)
        if keep.sum() < min_pairs:
            continue
        Qk, Kk = Q[keep], K[keep]
        _, first = np.unique(np.round(Kk, 3), axis=0, return_index=True)
        Qu, Ku = Qk[np.sort(first)], Kk[np.sort(first)]
        if len(Qu) < d + 1:
            continue
        X = np.hstack([Qu, np.ones((len(Qu), 1))])
        A = np.stack([huber_irls(X, Ku[:, a]) for a in range(d)])  # (d, d+1)
        est = (Kk - (Qk - p) @ A[:, :d].T).mean(0)
        if not allowed_at(target, target.valid if tgt_allowed is None else tgt_allowed, est[None])[0]:
            continue  # (a point off the target's allowed voxels, whose score would be read at another point)
        out_pts[n] = est
        out_scores[n] = float(s[keep].mean())
        used[n] = int(keep.sum())
    return Refined(out_pts, out_scores, used)
