"""Anchor points shared by two views, and the embeddings there: what every objective trains on.

Used by the training loop (:mod:`.train`) and the objectives (:mod:`.objectives`); it imports neither, so
the two do not import each other.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BODY_THRESHOLD = (-500.0 + 1024.0) * 255.0 / 4095.0 - 50.0  # -500 HU after CT mapping


def sample_at(fmap: torch.Tensor, norm_xyz: torch.Tensor) -> torch.Tensor:
    """Trilinear (bilinear in 2D) samples of ``fmap`` (C, *spatial) at normalised points (N, d) -> (N, C)."""
    d = fmap.dim() - 1
    grid = norm_xyz.reshape(1, -1, *([1] * (d - 1)), d)
    out = F.grid_sample(fmap.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(out.reshape(fmap.shape[0], -1).T, dim=1)


#: the stats key an objective sets (True) when a batch gave it no term at all (no view pair overlapping on the body):
#: its loss is a zero joined to the maps, and a step on it would learn nothing but weight decay and old momentum
NOTHING_TO_LEARN = "nothing_to_learn"


def map_positions_mm(view, out_shape: tuple[int, ...]) -> torch.Tensor:
    """mm positions (M, d) of every voxel of an output map of ``out_shape`` computed from ``view``."""
    in_shape = view.image.shape[1:]
    axes = []
    for a, (n, m) in enumerate(zip(in_shape, out_shape)):
        st = n / m
        axes.append(view.start_mm[a] + view.step_mm[a] * (st * torch.arange(m, dtype=torch.float32) + (st - 1) / 2))
    mesh = torch.meshgrid(*axes, indexing="ij")
    return view.to_world(torch.stack(mesh, -1).reshape(-1, len(in_shape)))  # rotated views (2D augmentation)


def inside_view(view, points_mm: torch.Tensor, margin_vox: float = 1.0) -> torch.Tensor:
    """Bool per point: inside the view's extent shrunk by ``margin_vox`` view voxels."""
    n = torch.tensor(view.image.shape[1:], dtype=torch.float32)
    idx = (view.to_view(points_mm) - view.start_mm) / view.step_mm
    return ((idx >= margin_vox) & (idx <= n - 1 - margin_vox)).all(1)


def intensity_at(view, points_mm: torch.Tensor) -> torch.Tensor:
    """The view's image (linear interpolation, 0 outside) at mm points (N, d) -> (N,)."""
    d = points_mm.shape[1]
    grid = view.mm_to_norm(points_mm, ()).reshape(1, -1, *([1] * (d - 1)), d)
    return F.grid_sample(view.image.unsqueeze(0), grid, align_corners=False).reshape(-1)


def body_points(view, count: int, threshold: float, gen: torch.Generator, tries: int = 8) -> torch.Tensor:
    """Up to ``count`` random mm positions (N, d) inside ``view`` (rotated views too) where its image is above
    ``threshold``: from ``tries * count`` uniform draws, so a view mostly of air gives fewer."""
    lo = view.start_mm
    hi = lo + view.step_mm * (torch.tensor(view.image.shape[1:], dtype=torch.float32) - 1)
    cand = view.to_world(lo + (hi - lo) * torch.rand((tries * count, len(lo)), generator=gen))
    return cand[intensity_at(view, cand) > threshold][:count]


def pair_points(trainer, views, loc, glob, b: int, gen: torch.Generator, rng: np.random.Generator):
    """Anchor points of view pair ``b``: positions P (N, d) mm on the body inside both local views, and the
    local and global embeddings there in view A and view B: ``(P, a_loc, p_loc, a_glob, p_glob)``; None
    when the views do not overlap enough (fewer than 8 points)."""
    cfg = trainer.cfg
    (la, ga), (lb, gb) = views[b]
    ma, mb = loc[2 * b], loc[2 * b + 1]
    gma, gmb = glob[2 * b], glob[2 * b + 1]
    pos_a = map_positions_mm(la, ma.shape[1:])
    jitter = torch.from_numpy(rng.uniform(-0.5, 0.5, pos_a.shape).astype(np.float32)) * la.step_mm
    cand = pos_a + jitter
    ok = inside_view(lb, cand)
    if ok.any():  # keep anchors on the body: intensity of view A at the point
        ok &= intensity_at(la, cand) > (BODY_THRESHOLD if la.body_threshold is None else la.body_threshold)
    idx = torch.nonzero(ok).reshape(-1)
    if len(idx) < 8:
        return None
    idx = idx[torch.randperm(len(idx), generator=gen)[: cfg.anchors]]
    P = cand[idx]
    return (P, sample_at(ma, la.mm_to_norm(P, ())), sample_at(mb, lb.mm_to_norm(P, ())),
            sample_at(gma, ga.mm_to_norm(P, ())), sample_at(gmb, gb.mm_to_norm(P, ())))
