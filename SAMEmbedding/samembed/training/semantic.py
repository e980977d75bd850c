"""The ``semantic`` objective: positives across patients, from organ label maps.

SAM's positives come from two views of one scan, so what makes two *patients* correspond is learned only
indirectly. SAMv2/UAE adds a semantic branch trained with organ masks for this reason; here the masks give
cross-patient positives to the same two embeddings the matcher uses, with no extra head.

Each iteration draws ``semantic_pairs`` pairs of *different* labelled training volumes (A, B) that share an
organ whose bounding box is whole in both (not cut by the field of view), picks a point inside that organ in
A, maps it to the same relative position of the organ's bounding box in B, and cuts one view (local +
global, SAM's scales, rotation and intensity augmentation) around each, with SAM's centre jitter. The four
views go through the network in the same forward pass as SAM's batch.

Every voxel of A's local map inside a whole organ shared with B is an anchor (up to ``semantic_anchors``);
the candidates are voxels of B's local map inside any labelled organ (up to ``semantic_candidates``) and on
the body outside the organs (``semantic_background``). A candidate of the anchor's organ is placed in A's
frame by its relative position in the organ's bounding box (B's box scaled onto A's); it is a **positive**
when it lies within ``semantic_positive_mm`` of the anchor (or is the nearest one, if that is closer than
``semantic_ignore_mm``), **ignored** when it is of the same organ and closer than ``semantic_ignore_mm``,
and a **negative** otherwise, as are all voxels of other organs and of the background. Left and right organs
(the parotids) are different organs, so a flipped match is a negative. Anchors with no positive are dropped.

* local embedding: multi-positive InfoNCE (temperature ``tau``) with these point-level positives: the fine
  match between patients;
* global embedding (sampled at the same positions): organ-level positives (every voxel of the anchor's organ
  in B), weighted ``semantic_global_weight``: the coarse search lands on the right organ.

The loss runs A -> B and B -> A and is averaged over pairs. Volumes without a label map only take the other
terms (``sam+semantic``: plain SAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .labels import LabelledVolume
from .losses import multi_positive_info_nce
from .pairs import NOTHING_TO_LEARN, map_positions_mm, sample_at


@dataclass(frozen=True)
class SemanticSettings:
    """Settings of the semantic objective (config keys ``semantic_*``).

    Attributes:
        pairs: pairs of patients per iteration (two extra local + global views each).
        anchors: anchor voxels per direction and pair (A's local map, inside a shared whole organ).
        candidates: organ voxels of the other patient's local map.
        background: body voxels outside the organs of the other patient's local map (negatives).
        positive_mm: a same-organ candidate this close to the anchor (after the box scaling) is positive, mm.
        ignore_mm: a same-organ candidate closer than this that is not positive is ignored, mm.
        global_weight: weight of the organ-level term on the global embedding.
    """

    pairs: int = 1
    anchors: int = 128
    candidates: int = 512
    background: int = 128
    positive_mm: float = 6.0
    ignore_mm: float = 16.0
    global_weight: float = 0.5

    @staticmethod
    def from_config(cfg) -> SemanticSettings:
        """From a :class:`~samembed.training.config.TrainConfig`."""
        return SemanticSettings(int(cfg.semantic_pairs), int(cfg.semantic_anchors), int(cfg.semantic_candidates),
                                int(cfg.semantic_background), float(cfg.semantic_positive_mm),
                                float(cfg.semantic_ignore_mm), float(cfg.semantic_global_weight))


# ---------------------------------------------------------------------------------------------------
# targets and loss on plain tensors
# ---------------------------------------------------------------------------------------------------
def semantic_targets(ids_a: torch.Tensor, pos_a_mm: torch.Tensor, ids_b: torch.Tensor, pos_b_in_a_mm: torch.Tensor,
                     positive_mm: float, ignore_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and valid masks (N, M) of anchors (organ ids (N,), positions (N, d) mm in A) against candidates
    (organ ids (M,), 0 = background; positions (M, d) mm mapped into A's organ frames, any value where the
    organ is not in A). See the module doc for the rule."""
    same = (ids_a[:, None] == ids_b[None]) & (ids_a[:, None] > 0)
    dist = torch.cdist(pos_a_mm, torch.nan_to_num(pos_b_in_a_mm, nan=1e9)).masked_fill(~same, float("inf"))
    nearest = dist.min(1, keepdim=True).values
    positive = same & (dist <= nearest.clamp(min=positive_mm)) & (nearest < ignore_mm)
    valid = ~same | positive | (dist >= ignore_mm)
    return positive, valid


def semantic_pair_loss(loc_a: torch.Tensor, ids_a: torch.Tensor, pos_a_mm: torch.Tensor, loc_b: torch.Tensor,
                       ids_b: torch.Tensor, pos_b_in_a_mm: torch.Tensor, tau: float, positive_mm: float,
                       ignore_mm: float, glob_a: torch.Tensor | None = None,
                       glob_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-level multi-positive InfoNCE on local embeddings (N, C) vs (M, C), and organ-level InfoNCE on
    global embeddings (N, G) vs (M, G) when given (else zero); returns (local, global)."""
    positive, valid = semantic_targets(ids_a, pos_a_mm, ids_b, pos_b_in_a_mm, positive_mm, ignore_mm)
    l_loc = multi_positive_info_nce(loc_a, loc_b, positive, tau, valid)
    if glob_a is None:
        return l_loc, l_loc * 0
    organ = (ids_a[:, None] == ids_b[None]) & (ids_a[:, None] > 0)
    return l_loc, multi_positive_info_nce(glob_a, glob_b, organ, tau)


# ---------------------------------------------------------------------------------------------------
# pairs of patients
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SemanticDraw:
    """A drawn pair: training-volume indices ``a``, ``b`` (into ``Trainer.volumes``), the organ the views
    are centred on, and the two centres (mm, zyx, each volume's own frame)."""

    a: int
    b: int
    organ: str
    centre_a_mm: np.ndarray
    centre_b_mm: np.ndarray


class SemanticSampler:
    """Draws pairs of different labelled volumes and looks up organs at mm positions.

    Args:
        labelled: the label maps of the training volumes (at least two that share a whole organ).
    """

    def __init__(self, labelled: list[LabelledVolume]) -> None:
        self.volumes = {lv.index: lv for lv in labelled}
        keys = sorted({k for lv in labelled for k in lv.organs})
        self.organ_id = {k: n + 1 for n, k in enumerate(keys)}  # 0 = background
        self.luts = {}
        for lv in labelled:
            lut = np.zeros(max(lv.value_key, default=0) + 1 if lv.value_key else 1, dtype=np.int64)
            for v, k in lv.value_key.items():
                lut[v] = self.organ_id[k]
            self.luts[lv.index] = torch.from_numpy(lut)
        whole = {lv.index: {k for k, o in lv.organs.items() if not o.truncated} for lv in labelled}
        self.partners = {i: [j for j in whole if j != i and whole[i] & whole[j]] for i in whole}
        self.partners = {i: p for i, p in self.partners.items() if p}
        self.whole = whole
        if not self.partners:
            raise InputError("the semantic objective needs two labelled training volumes that share a whole organ; "
                             "check semantic_labels")

    def draw(self, rng: np.random.Generator) -> SemanticDraw:
        """A random pair (A uniform over volumes with a partner, B uniform over A's partners), a shared whole
        organ, a point inside it in A and the point at the same relative position of its box in B."""
        firsts = sorted(self.partners)
        a = firsts[int(rng.integers(len(firsts)))]
        b = self.partners[a][int(rng.integers(len(self.partners[a])))]
        shared = sorted(self.whole[a] & self.whole[b])
        organ = shared[int(rng.integers(len(shared)))]
        oa, ob = self.volumes[a].organs[organ], self.volumes[b].organs[organ]
        p = oa.points_mm[int(rng.integers(len(oa.points_mm)))]
        return SemanticDraw(a, b, organ, p, ob.lo_mm + (p - oa.lo_mm) / oa.extent_mm * ob.extent_mm)

    def organ_ids(self, index: int, points_mm: torch.Tensor) -> torch.Tensor:
        """Organ ids (N,) at mm points (N, d) of volume ``index`` (nearest voxel; 0 outside or background)."""
        lv = self.volumes[index]
        idx = torch.round(points_mm / lv.spacing_mm).long()
        shape = torch.tensor(lv.labels.shape)
        inside = ((idx >= 0) & (idx < shape)).all(1)
        vals = np.zeros(len(idx), dtype=np.int64)
        if inside.any():
            ii = idx[inside].numpy()
            vals[inside.numpy()] = np.asarray(lv.labels[tuple(ii.T)], dtype=np.int64)
        lut = self.luts[index]
        vals = np.where(vals < len(lut), vals, 0)
        return lut[torch.from_numpy(vals)]

    def whole_ids(self, a: int, b: int) -> torch.Tensor:
        """Ids of the organs whole in both volumes (the anchors' organs)."""
        return torch.tensor(sorted(self.organ_id[k] for k in self.whole[a] & self.whole[b]), dtype=torch.long)

    def to_frame(self, src: int, dst: int, points_mm: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Map points (N, d) of volume ``src`` with organ ids (N,) to volume ``dst``'s frame through the
        bounding box of their organ (NaN where the organ is background or not in ``dst``)."""
        out = torch.full_like(points_mm, float("nan"))
        names = {v: k for k, v in self.organ_id.items()}
        for oid in ids.unique().tolist():
            key = names.get(oid)
            if key is None or key not in self.volumes[dst].organs or key not in self.volumes[src].organs:
                continue
            s, d = self.volumes[src].organs[key], self.volumes[dst].organs[key]
            sel = ids == oid
            scale = torch.from_numpy(d.extent_mm / s.extent_mm).float()
            out[sel] = torch.from_numpy(d.lo_mm).float() + (points_mm[sel] - torch.from_numpy(s.lo_mm).float()) * scale
        return out


# ---------------------------------------------------------------------------------------------------
# the objective on a training batch
# ---------------------------------------------------------------------------------------------------
@dataclass
class SemanticBatch:
    """The semantic views of one iteration and their maps: ``draws[p]`` with ``views[p] = [(localA, globalA),
    (localB, globalB)]`` and maps stacked as [A0, B0, A1, B1, ...]."""

    draws: list
    views: list
    loc: torch.Tensor
    glob: torch.Tensor


def _subset(mask: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.nonzero(mask).reshape(-1)
    return idx[torch.randperm(len(idx), generator=gen)[:n]]


def _direction(sampler: SemanticSampler, s: SemanticSettings, tau: float, src, dst, gen: torch.Generator):
    """One direction of one pair: ``src``/``dst`` = (volume index, local view, global view, local map,
    global map). Returns (local, global) losses or None without anchors."""
    ia, la, ga, ma, gma = src
    ib, lb, gb, mb, gmb = dst
    pa = map_positions_mm(la, ma.shape[1:])
    pb = map_positions_mm(lb, mb.shape[1:])
    ids_a, ids_b = sampler.organ_ids(ia, pa), sampler.organ_ids(ib, pb)
    anchors = _subset(torch.isin(ids_a, sampler.whole_ids(ia, ib)), s.anchors, gen)
    if len(anchors) == 0:
        return None
    d = pb.shape[1]
    grid = lb.mm_to_norm(pb, ()).reshape(1, -1, *([1] * (d - 1)), d)
    body = F.grid_sample(lb.image.unsqueeze(0), grid, align_corners=False).reshape(-1) > lb.body_threshold
    cands = torch.cat([_subset(ids_b > 0, s.candidates, gen), _subset((ids_b == 0) & body, s.background, gen)])
    flat_a, flat_b = ma.reshape(ma.shape[0], -1).T, mb.reshape(mb.shape[0], -1).T
    glob_a = sample_at(gma, ga.mm_to_norm(pa[anchors], ())) if s.global_weight else None
    glob_b = sample_at(gmb, gb.mm_to_norm(pb[cands], ())) if s.global_weight else None
    return semantic_pair_loss(flat_a[anchors], ids_a[anchors], pa[anchors], flat_b[cands], ids_b[cands],
                              sampler.to_frame(ib, ia, pb[cands], ids_b[cands]), tau, s.positive_mm, s.ignore_mm,
                              glob_a, glob_b)


def semantic_objective(trainer, views, loc, glob, gen, rng):
    """The ``semantic`` term of a batch: reads ``trainer._semantic_batch`` (a :class:`SemanticBatch` built by
    the training loop); returns (loss, stats)."""
    batch: SemanticBatch | None = getattr(trainer, "_semantic_batch", None)
    s: SemanticSettings = trainer.semantic_settings
    l_terms, g_terms = [], []
    for p, ((la, ga), (lb, gb)) in enumerate(batch.views if batch else []):
        draw = batch.draws[p]
        a = (draw.a, la, ga, batch.loc[2 * p], batch.glob[2 * p])
        b = (draw.b, lb, gb, batch.loc[2 * p + 1], batch.glob[2 * p + 1])
        for src, dst in ((a, b), (b, a)):
            out = _direction(trainer.semantic_sampler, s, trainer.cfg.tau, src, dst, gen)
            if out is not None:
                l_terms.append(out[0])
                g_terms.append(out[1])
    if not l_terms:
        zero = loc.sum() * 0 + glob.sum() * 0
        return zero, {"semantic_local": 0.0, "semantic_global": 0.0, NOTHING_TO_LEARN: True}
    l_loc, l_glob = torch.stack(l_terms).mean(), torch.stack(g_terms).mean()
    return l_loc + s.global_weight * l_glob, {"semantic_local": float(l_loc.detach()),
                                              "semantic_global": float(l_glob.detach())}
