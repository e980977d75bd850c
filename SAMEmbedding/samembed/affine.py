"""Affine maps between point sets, in mm: least-squares fit, application and a robust (RANSAC) fit.

A (d + 1, d + 1) homogeneous matrix ``M`` maps a point ``p`` (d values, LPS mm) to ``M[:d, :d] @ p + M[:d, d]``.
"""

from __future__ import annotations

import functools

import numpy as np


def fit_affine(src_mm: np.ndarray, dst_mm: np.ndarray) -> np.ndarray:
    """Least-squares affine (d + 1, d + 1) with ``dst ~ M[:d, :d] @ src + M[:d, d]``; src, dst (N, d), N >= d + 1.

    >>> src = np.array([[0, 0], [1, 0], [0, 1]], dtype=float)
    >>> (fit_affine(src, src * 3 + [1, 2]).round(6) + 0.0).tolist()
    [[3.0, 0.0, 1.0], [0.0, 3.0, 2.0], [0.0, 0.0, 1.0]]
    """
    src_mm, dst_mm = np.asarray(src_mm, dtype=np.float64), np.asarray(dst_mm, dtype=np.float64)
    d = src_mm.shape[1]
    X = np.hstack([src_mm, np.ones((len(src_mm), 1))])
    M = np.eye(d + 1)
    M[:d] = np.linalg.lstsq(X, dst_mm, rcond=None)[0].T
    return M


def apply_affine(matrix: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Apply a homogeneous (d + 1, d + 1) affine to (N, >= d) points; returns (N, d)."""
    d = matrix.shape[0] - 1
    p = np.asarray(points_mm, dtype=np.float64)[:, :d]
    return p @ matrix[:d, :d].T + matrix[:d, d]


def minimal_sets(n: int, k: int, iterations: int, seed: int | None = 0) -> np.ndarray:
    """RANSAC's ``iterations`` minimal sets: (iterations, k) indices, ``k`` distinct ones below ``n`` per set, drawn
    with ``numpy.random.default_rng(seed)``. Drawing them one by one takes about 15 ms for 1000 sets, and an atlas's
    prior into every target draws the same ones (same number of pairs, same seed): for an integer seed they are drawn
    once per process and shared, read-only.

    >>> sets = minimal_sets(10, 3, 1000)
    >>> sets.shape, sets.flags.writeable, minimal_sets(10, 3, 1000) is sets
    ((1000, 3), False, True)
    """
    if seed is None or not isinstance(seed, (int, np.integer)):
        return _draw_sets(n, k, iterations, seed)
    return _kept_sets(int(n), int(k), int(iterations), int(seed))


def _draw_sets(n: int, k: int, iterations: int, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(n, k, replace=False) for _ in range(iterations)]).reshape(iterations, k)


@functools.lru_cache(maxsize=8)
def _kept_sets(n: int, k: int, iterations: int, seed: int) -> np.ndarray:
    sets = _draw_sets(n, k, iterations, seed)
    sets.setflags(write=False)
    return sets


def _residuals(X: np.ndarray, A: np.ndarray, dst_mm: np.ndarray) -> np.ndarray:
    """(I, N) distances, mm, between each of the I affines ``A`` (I, d+1, d) applied to the N points ``X`` (N, d+1,
    homogeneous) and ``dst_mm`` (N, d): ``np.linalg.norm(X @ A - dst, axis=2)``, the same values (bit for bit with
    numpy's OpenBLAS here; to rounding with another BLAS, whose products may sum in another order), computed one
    coordinate at a time as (N, I) matrix products (a norm over a last axis of 2 or 3 values is slow in numpy: 12 of
    26 ms for 1000 hypotheses of 500 pairs, against 7 ms for all of this)."""
    sq = None
    for c in range(A.shape[2]):
        e = X @ A[:, :, c].T  # (N, I): coordinate c of every point under every affine
        e -= dst_mm[:, c:c + 1]
        e *= e
        sq = e if sq is None else np.add(sq, e, out=sq)
    return np.ascontiguousarray(np.sqrt(sq, out=sq).T)


def ransac_affine(src_mm: np.ndarray, dst_mm: np.ndarray, inlier_mm: float, iterations: int = 500,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Robust affine from point pairs: seeded RANSAC over minimal sets of d + 1 pairs (most inliers, ties broken
    by the smaller truncated error), then a least-squares refit on the inliers.

    Args:
        src_mm, dst_mm: (N, d) corresponding points, mm.
        inlier_mm: a pair is an inlier when the affine maps ``src`` within this distance of ``dst``.

    Returns:
        ``(M (d + 1, d + 1), inliers (N,) bool)``. With fewer than d + 1 consistent pairs, the least-squares
        affine of all pairs and all-True.

    >>> src = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 5]], dtype=float)
    >>> dst = src * 2 + 1; dst[4] = [40, 40]
    >>> M, ok = ransac_affine(src, dst, 1.0)
    >>> (np.round(M[:2], 6) + 0.0).tolist(), ok.tolist()
    ([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]], [True, True, True, True, False])
    """
    src_mm, dst_mm = np.asarray(src_mm, dtype=np.float64), np.asarray(dst_mm, dtype=np.float64)
    n, d = src_mm.shape
    if n < d + 1:
        raise ValueError(f"an affine in {d}D needs at least {d + 1} point pairs, got {n}")
    X = np.hstack([src_mm, np.ones((n, 1))])
    sets = minimal_sets(n, d + 1, iterations, seed)
    sets = sets[np.abs(np.linalg.det(X[sets])) >= 1e-9]  # degenerate minimal sets fit no affine
    best = np.zeros(n, dtype=bool)
    if len(sets):
        # all hypotheses at once: (I, d+1, d) affines, (I, N) errors
        A = np.linalg.solve(X[sets], dst_mm[sets])
        err = _residuals(X, A, dst_mm)
        ok = err < inlier_mm
        count, total = ok.sum(1), np.minimum(err, inlier_mm).sum(1)
        # most inliers, then the smallest truncated error, then the first drawn
        best = ok[np.lexsort((np.arange(len(sets)), total, -count))[0]]
    if best.sum() < d + 1:
        return fit_affine(src_mm, dst_mm), np.ones(n, dtype=bool)
    M = fit_affine(src_mm[best], dst_mm[best])
    return M, np.linalg.norm(apply_affine(M, src_mm) - dst_mm, axis=1) < inlier_mm
