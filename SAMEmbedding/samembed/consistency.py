"""Geometric consistency between a point set and its matches: a robust affine and a re-search of the outliers.

A landmark set moves between two subjects roughly as an affine map does. SAM matches each point on its own, so a
few points can land on a similar-looking structure far away (a neighbouring finger, the other parotid). The
consistency step fits a robust affine, source -> target, to the matches themselves (RANSAC over minimal sets of
d + 1 pairs, then least squares on the inliers) and searches every point that lies farther than ``inlier_mm``
from its affine prediction again, inside a +-``window_mm`` box around that prediction. All distances are mm in
LPS; the affine is a homogeneous (d + 1, d + 1) matrix acting on LPS mm points.

It needs enough points to tell inliers from outliers: with fewer than ``2 (d + 1)`` points it does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .affine import ransac_affine
from .embedding import EmbeddingMaps
from .matcher import match_points


@dataclass
class ConsistentMatch:
    """Result of :func:`consistent_matches`.

    Attributes:
        points_lps_mm: (N, d) matches after re-searching the outliers.
        scores: (N,) similarity of each final match, in [-1, 1].
        rematched: (N,) bool, True where the point was searched again.
        affine: the (d + 1, d + 1) source -> target affine (LPS mm) fitted to the matches.
    """

    points_lps_mm: np.ndarray
    scores: np.ndarray
    rematched: np.ndarray
    affine: np.ndarray
    flat: bool = False  # the points lie in one plane (3D) or on one line (2D): no affine to check them by


#: points whose RMS distance from their best-fitting plane (3D) or line (2D) is below this are flat, mm
FLAT_MM = 0.5


def is_flat(points_lps_mm: np.ndarray) -> bool:
    """Whether (N, d) points lie in one plane (3D; e.g. all clicked on one axial slice) or on one line (2D), within
    :data:`FLAT_MM`: an affine of them is then undetermined across that plane or line."""
    p = np.asarray(points_lps_mm, dtype=np.float64)
    thinnest = np.linalg.svd(p - p.mean(0), compute_uv=False)[-1] if len(p) >= p.shape[1] else 0.0
    return bool(thinnest / np.sqrt(len(p)) < FLAT_MM)


def min_points(d: int) -> int:
    """The fewest points the check needs in ``d`` dimensions (its robust affine's fit and a margin): 8 in 3D, 6 in
    2D; with fewer the matches are returned as they are."""
    return 2 * (d + 1)


def consistent_matches(source: EmbeddingMaps, points_lps_mm: np.ndarray, target: EmbeddingMaps,
                       found_lps_mm: np.ndarray, scores: np.ndarray, allowed: torch.Tensor | None = None, *,
                       inlier_mm: float = 15.0, window_mm: float = 20.0, seed: int = 0) -> ConsistentMatch:
    """Re-search the matches that disagree with a robust affine of all matches (see the module docstring).

    Args:
        source, target: embedding maps of the two images.
        points_lps_mm: (N, >= d) source points; found_lps_mm: (N, >= d) their matches; scores: (N,).
        allowed: (V,) bool target voxels a match may land on (as for :func:`~.matcher.match_points`).
        inlier_mm: distance from the affine prediction above which a match is searched again, mm.
        window_mm: half-size of the box around the affine prediction searched again, mm.

    Returns:
        :class:`ConsistentMatch`; unchanged matches when there are fewer than ``2 (d + 1)`` points, or when they
        are flat (:func:`is_flat`: ``flat`` says so).
    """
    d = source.local_grid.ndim
    pts = np.asarray(points_lps_mm, dtype=np.float64)[:, :d]
    found = np.asarray(found_lps_mm, dtype=np.float64)[:, :d].copy()
    sc = np.asarray(scores, dtype=np.float64).copy()
    if len(pts) < min_points(d):
        return ConsistentMatch(found, sc, np.zeros(len(pts), dtype=bool), np.eye(d + 1))
    if is_flat(pts):  # every minimal set is degenerate: RANSAC would take every match for an inlier
        return ConsistentMatch(found, sc, np.zeros(len(pts), dtype=bool), np.eye(d + 1), flat=True)
    M, inliers = ransac_affine(pts, found, inlier_mm, seed=seed)
    redo = np.flatnonzero(~inliers)
    if len(redo):
        raw = match_points(source, pts[redo], target, allowed, window_mm=window_mm, prior=M)
        found[redo], sc[redo] = raw.points_lps_mm, raw.scores
    return ConsistentMatch(found, sc, ~inliers, M)
