"""Training objectives, selectable with ``--objective`` and combinable with weights (``sam+isimed:0.5``).

All objectives work on the same two-view batches (see :mod:`.sampling`) and the same two-branch network,
so every one of them yields dense local + global embedding maps that the matcher can use.

* ``sam`` - SAM: local InfoNCE with hard negatives mined by combined similarity, global InfoNCE
  (:meth:`samembed.training.train.Trainer.sam_loss`).
* ``isimed`` - ISImed: distances between embeddings regress true physical distances. *Choice:* the
  "crops" are points of the two views of one volume, embedded by the fully-convolutional global branch
  (the dense position head); for point i in view A and point j in view B,
  ``|| g_A(i) - g_B(j) ||`` (unit vectors, so 0..2) regresses ``min(|p_i - p_j| / isimed_scale_mm, 2)``.
  Pairs never cross volumes, because our volumes share no frame.
* ``adam`` - Adam/Eve adapted to 3D dense matching: an anatomy decomposer splits the overlap of the two
  views into ``2^n`` parts by median cuts along alternating axes (a k-d decomposition of anatomy), with a
  coarse-to-fine curriculum ``n = 1 .. adam_levels`` over training; each part's embedding (mean local
  embedding, normalised) is contrasted against its counterpart in the other view and a memory bank of
  earlier parts; the purposive pruner drops bank negatives whose similarity to the anchor is >= 0.8
  (``pruner_threshold``, default 0.8 for this objective). The pruner is also an option of SAM's local loss
  (set ``pruner_threshold``).
* ``sal`` - self-supervised alignment learning: the local features of two neighbouring slices of a view
  are aligned by best-match similarity inside a (2w+1)^2 window (w = ``sal_window``); a global positional
  loss makes ``1 - cos`` of the slices' mean global embeddings grow with their distance; alignment alone
  collapses to a constant feature, so a variance term (hinge on the per-channel standard deviation,
  weight ``sal_var_weight``) keeps features spread.
* ``semantic`` - positives across patients from organ label maps (``semantic_labels``): point-level on the
  local embedding, organ-level on the global one (:mod:`.semantic`). Volumes without a label map take only
  the other terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError
from .config import OBJECTIVE_HELP
from .distill import distill_objective
from .pairs import BODY_THRESHOLD, NOTHING_TO_LEARN, body_points, pair_points, sample_at
from .semantic import semantic_objective

OBJECTIVES = tuple(OBJECTIVE_HELP)


def parse_objective(text: str) -> list[tuple[str, float]]:
    """``"sam+isimed:0.5"`` -> ``[("sam", 1.0), ("isimed", 0.5)]``; unknown names raise InputError."""
    terms = []
    for part in str(text).split("+"):
        name, _, weight = part.strip().partition(":")
        if name not in OBJECTIVES:
            raise InputError(f"unknown objective '{name}'; choose from {', '.join(OBJECTIVES)} (combine with +, weight with :w)")
        try:
            value = float(weight) if weight else 1.0
        except ValueError as e:
            raise InputError(f"objective weight '{weight}' is not a number") from e
        if not math.isfinite(value) or value <= 0:  # (a negative weight trains the term backwards; NaN diverges)
            raise InputError(f"objective weight of {name} must be a finite number > 0, not {weight}")
        terms.append((name, value))
    return terms


# ---------------------------------------------------------------------------------------------------
# losses on plain tensors (unit-tested by hand)
# ---------------------------------------------------------------------------------------------------
def isimed_loss(emb_a: torch.Tensor, emb_b: torch.Tensor, pos_a_mm: torch.Tensor, pos_b_mm: torch.Tensor,
                scale_mm: float) -> torch.Tensor:
    """Mean squared error between embedding distances (N, M) and normalised physical distances (capped at 2)."""
    d_emb = torch.cdist(emb_a, emb_b)
    d_true = (torch.cdist(pos_a_mm, pos_b_mm) / scale_mm).clamp(max=2.0)
    return F.mse_loss(d_emb, d_true)


def pruned_info_nce(anchor: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, tau: float,
                    threshold: float | None, in_batch: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """InfoNCE of anchors (N, C) vs positives (N, C) and negatives: a memory bank (K, C) and, with ``in_batch``
    (N, C, the batch's positives), every other anchor's positive (each anchor's own is its positive, not a negative).

    The purposive pruner drops negatives whose similarity to the anchor is >= ``threshold``. Returns the
    loss and the fraction of negatives pruned.
    """
    pos = (anchor * positive).sum(-1, keepdim=True)
    neg = anchor @ bank.T if bank.numel() else anchor.new_zeros((len(anchor), 0))
    own = torch.zeros(neg.shape, dtype=torch.bool)
    if in_batch is not None:
        neg = torch.cat([neg, anchor @ in_batch.T], 1)
        own = torch.cat([own, torch.eye(len(anchor), len(in_batch), dtype=torch.bool)], 1)
    pruned = 0.0
    if threshold is not None and neg.numel():
        drop = (neg.detach() >= threshold) & ~own
        pruned = float(drop.sum()) / max(1, int((~own).sum()))
        own |= drop
    neg = neg.masked_fill(own, float("-inf"))
    logits = torch.cat([pos, neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long)), pruned


def kd_parts(points: torch.Tensor, levels: int) -> torch.Tensor:
    """Anatomy decomposer: part index (N,) of each point after ``levels`` median cuts on alternating axes
    (z, y, x, z, ...), i.e. ``2**levels`` parts of about equal size."""
    parts = torch.zeros(len(points), dtype=torch.long)
    d = points.shape[1]
    for lev in range(levels):
        axis = lev % d
        new = parts.clone()
        for p in parts.unique():
            sel = parts == p
            med = points[sel, axis].median()
            upper = sel & (points[:, axis] > med)
            new[sel] = p * 2
            new[upper] = p * 2 + 1
        parts = new
    return parts


def sal_alignment(f0: torch.Tensor, f1: torch.Tensor, window: int) -> torch.Tensor:
    """1 - mean best-match cosine of each pixel of slice ``f0`` (C, H, W) within a (2w+1)^2 window of ``f1``."""
    C, H, W = f0.shape
    k = 2 * window + 1
    pad = F.pad(f1[None], (window, window, window, window), mode="replicate")
    patches = F.unfold(pad, k).reshape(C, k * k, H * W)  # (C, k*k, HW)
    sims = (f0.reshape(C, 1, H * W) * patches).sum(0)  # (k*k, HW)
    return 1.0 - sims.max(0).values.mean()


def variance_hinge(features: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """VICReg-style variance term: mean over channels of relu(gamma - std) of (C, N) features."""
    std = torch.sqrt(features.var(dim=1) + 1e-6)
    return F.relu(gamma - std).mean()


# ---------------------------------------------------------------------------------------------------
# objectives on a training batch
# ---------------------------------------------------------------------------------------------------
def _isimed(trainer, views, loc, glob, gen, rng):

    cfg = trainer.cfg
    terms = []
    for b, ((la, ga), (_, gb)) in enumerate(views):
        # points on the body only: on air or on the fill beyond the scan, where the image is constant, a position
        # can only be read from the view's border (the crop-border shortcut)
        threshold = BODY_THRESHOLD if la.body_threshold is None else la.body_threshold
        pts = [body_points(gv, cfg.isimed_crops, threshold, gen) for gv in (ga, gb)]
        if min(len(p) for p in pts) < 2:
            continue
        ea = sample_at(glob[2 * b], ga.mm_to_norm(pts[0], ()))
        eb = sample_at(glob[2 * b + 1], gb.mm_to_norm(pts[1], ()))
        terms.append(isimed_loss(ea, eb, pts[0], pts[1], cfg.isimed_scale_mm))
    if not terms:
        return glob.sum() * 0, {"isimed": 0.0, NOTHING_TO_LEARN: True}
    loss = torch.stack(terms).mean()
    return loss, {"isimed": float(loss.detach())}


def _adam(trainer, views, loc, glob, gen, rng):

    cfg = trainer.cfg
    bank = getattr(trainer, "_adam_bank", torch.zeros((0, loc.shape[1])))
    # coarse-to-fine curriculum over the run (by iterations, or by the time budget when scheduled by time)
    progress = getattr(trainer, "_progress", getattr(trainer, "_iteration", 0) / max(1, cfg.iterations))
    level = 1 + min(cfg.adam_levels - 1, int(cfg.adam_levels * progress))
    thr = cfg.pruner_threshold if cfg.pruner_threshold is not None else 0.8
    anchors, positives = [], []
    for b in range(len(views)):
        pp = pair_points(trainer, views, loc, glob, b, gen, rng)
        if pp is None:
            continue
        P, a_loc, p_loc = pp[0], pp[1], pp[2]
        parts = kd_parts(P, level)
        for p in parts.unique():
            sel = parts == p
            if sel.sum() < 2:
                continue
            anchors.append(F.normalize(a_loc[sel].mean(0), dim=0))
            positives.append(F.normalize(p_loc[sel].mean(0), dim=0))
    if not anchors:
        return loc.sum() * 0, {"adam": 0.0, NOTHING_TO_LEARN: True}
    A, Pp = torch.stack(anchors), torch.stack(positives)
    # other parts of this batch are negatives too (from the first iteration, before the bank holds any)
    loss_ab, pruned = pruned_info_nce(A, Pp, bank, cfg.tau, thr, in_batch=Pp.detach())
    trainer._adam_bank = torch.cat([Pp.detach(), bank])[: cfg.adam_bank_size]
    return loss_ab, {"adam": float(loss_ab.detach()), "pruned": pruned, "adam_level": level}


def _sal(trainer, views, loc, glob, gen, rng):
    cfg = trainer.cfg
    terms, var_terms, pos_terms = [], [], []
    for b, ((_, ga), _) in enumerate(views):
        fmap = loc[2 * b]  # (C, Z, Y, X) unit vectors
        if fmap.dim() != 4 or fmap.shape[1] < 2:
            continue
        z = int(torch.randint(0, fmap.shape[1] - 1, (1,), generator=gen))
        terms.append(sal_alignment(fmap[:, z], fmap[:, z + 1], cfg.sal_window))
        var_terms.append(variance_hinge(fmap.reshape(fmap.shape[0], -1)))
        g = glob[2 * b]
        if g.shape[1] >= 2:
            z0, z1 = sorted(torch.randint(0, g.shape[1], (2,), generator=gen).tolist())
            if z1 > z0:
                s0 = F.normalize(g[:, z0].reshape(g.shape[0], -1).mean(1), dim=0)
                s1 = F.normalize(g[:, z1].reshape(g.shape[0], -1).mean(1), dim=0)
                dz_mm = float((z1 - z0) * ga.step_mm[0] * (ga.image.shape[1] / g.shape[1]))
                target = min(dz_mm / cfg.isimed_scale_mm, 1.0)
                pos_terms.append((1 - (s0 * s1).sum() - target) ** 2)
    if not terms:
        return loc.sum() * 0, {"sal": 0.0, NOTHING_TO_LEARN: True}
    align = torch.stack(terms).mean()
    var = torch.stack(var_terms).mean()
    pos = torch.stack(pos_terms).mean() if pos_terms else align * 0
    loss = align + cfg.sal_var_weight * var + pos
    return loss, {"sal_align": float(align.detach()), "sal_var": float(var.detach()), "sal_pos": float(pos.detach())}


def combined_loss(trainer, views, loc, glob, gen, rng):
    """Weighted sum of the configured objectives; returns (loss, stats). ``stats['local']``/``['global']``
    carry SAM's parts when SAM is used (for the CSV log)."""
    total, stats, empty = None, {}, []
    for name, weight in parse_objective(trainer.cfg.objective):
        if name == "sam":
            loss, s = trainer.sam_loss(views, loc, glob, gen, rng)
        elif name == "isimed":
            loss, s = _isimed(trainer, views, loc, glob, gen, rng)
        elif name == "adam":
            loss, s = _adam(trainer, views, loc, glob, gen, rng)
        elif name == "semantic":
            loss, s = semantic_objective(trainer, views, loc, glob, gen, rng)
        elif name == "distill":
            loss, s = distill_objective(trainer, views, loc, glob, gen, rng)
        else:
            loss, s = _sal(trainer, views, loc, glob, gen, rng)
        empty.append(bool(s.pop(NOTHING_TO_LEARN, False)))
        # the log's local / global columns: SAM's parts when SAM is used, else the first objective's that gives them
        stats.update(s if name == "sam" else {k: v for k, v in s.items() if k not in stats or k not in ("local", "global")})
        total = weight * loss if total is None else total + weight * loss
    stats.setdefault("local", float(total.detach()))
    stats.setdefault("global", 0.0)
    stats[NOTHING_TO_LEARN] = all(empty)  # no objective had a term: the trainer takes no step
    return total, stats
