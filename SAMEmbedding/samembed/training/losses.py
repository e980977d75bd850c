"""SAM's losses: local InfoNCE with combined-similarity hard negatives, and global InfoNCE.

Notation: ``a`` are anchor embeddings from view A (N, C), ``p`` their positives from view B (N, C),
all unit vectors; similarities are cosines; ``tau`` is the temperature (0.5 in SAM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean InfoNCE: -log(exp(a.p/tau) / (exp(a.p/tau) + sum_k exp(a.n_k/tau))).

    Args:
        anchor, positive: (N, C) unit vectors.
        negatives: (N, K, C) unit vectors, K negatives per anchor.
    """
    pos = (anchor * positive).sum(-1, keepdim=True)  # (N, 1)
    neg = torch.einsum("nc,nkc->nk", anchor, negatives)
    logits = torch.cat([pos, neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long))


def mine_hard_negatives(sim_combined: torch.Tensor, dist_mm: torch.Tensor, ignore_radius_mm: float, num_hard: int,
                        num_keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (N, num_keep) of hard negatives per anchor.

    Candidates closer than ``ignore_radius_mm`` to the anchor's true position are excluded; the
    ``num_hard`` most similar (by ``sim_combined``, (N, M)) are kept, then ``num_keep`` of them are drawn at
    random. With fewer than ``num_hard`` candidates outside the radius, excluded ones fill the rest and are drawn
    last: :func:`local_loss` leaves them out.
    """
    sim = sim_combined.masked_fill(dist_mm < ignore_radius_mm, float("-inf"))
    k = min(num_hard, sim.shape[1])
    top_sim, top = sim.topk(k, dim=1)  # (N, k)
    keep = min(num_keep, k)
    keys = torch.rand(top.shape, generator=generator).masked_fill(torch.isinf(top_sim), 2.0)
    order = keys.argsort(dim=1)[:, :keep]
    return top.gather(1, order)


def local_loss(a_loc: torch.Tensor, p_loc: torch.Tensor, a_glob: torch.Tensor, cand_loc: torch.Tensor,
               cand_glob: torch.Tensor, dist_mm: torch.Tensor, tau: float, ignore_radius_mm: float, num_hard: int,
               num_keep: int, generator: torch.Generator | None = None, pruner_threshold: float | None = None) -> torch.Tensor:
    """SAM local loss for one view pair.

    Args:
        a_loc, p_loc: (N, C) anchor and positive local embeddings.
        a_glob: (N, G) anchor global embeddings (for mining).
        cand_loc, cand_glob: (M, C), (M, G) embeddings of all candidate voxels of view B.
        dist_mm: (N, M) distance of each candidate to each anchor's true position.
        pruner_threshold: optional Adam-style purposive pruner: mined negatives whose local
            similarity to the anchor is at or above this are dropped (treated as probable positives).
    """
    with torch.no_grad():
        sim = (a_loc @ cand_loc.T + a_glob @ cand_glob.T) / 2
        idx = mine_hard_negatives(sim, dist_mm, ignore_radius_mm, num_hard, num_keep, generator)
    negs = cand_loc[idx]  # (N, K, C)
    pos = (a_loc * p_loc).sum(-1, keepdim=True)
    neg = torch.einsum("nc,nkc->nk", a_loc, negs)
    # a small view has fewer candidates outside the ignore radius than are mined: those inside it (the positive's own
    # voxel among them) are no negatives
    drop = dist_mm.gather(1, idx) < ignore_radius_mm
    if pruner_threshold is not None:
        drop |= neg.detach() >= pruner_threshold
    neg = neg.masked_fill(drop, float("-inf"))
    logits = torch.cat([pos, neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(a_loc), dtype=torch.long))


def multi_positive_info_nce(anchor: torch.Tensor, cands: torch.Tensor, positive_mask: torch.Tensor, tau: float,
                            valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log(sum_pos exp(s/tau) / sum_all exp(s/tau)), averaged over anchors that have a positive.

    Args:
        anchor: (N, C); cands: (M, C); positive_mask: (N, M) bool; valid_mask: (N, M) bool of
            candidates to use at all (others ignored).
    """
    logits = anchor @ cands.T / tau
    if valid_mask is not None:
        logits = logits.masked_fill(~valid_mask, float("-inf"))
    has_pos = positive_mask.any(1)
    if not has_pos.any():
        return anchor.sum() * 0.0
    logits, positive_mask = logits[has_pos], positive_mask[has_pos]
    pos = logits.masked_fill(~positive_mask, float("-inf")).logsumexp(1)
    return (logits.logsumexp(1) - pos).mean()
