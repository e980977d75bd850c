"""The ``distill`` objective: a network learns to give the embeddings of a trained one (its teacher).

The cold path's floor is the network (issue 13, ``benchmarks/results/cold_start.md``): with every width halved,
``sam-lite``'s maps run 2-3x faster (``benchmarks/results/cold_start_half.md``), but trained from scratch such a
network would need the CPU-hours the shipped model took, with no promise of the same matches. Distillation asks the
narrower network for the shipped model's own vectors instead: every voxel of both maps is a target, so each
iteration gives far more signal than SAM's sampled anchors.

On each of SAM's view pairs (same sampling and augmentation), the teacher (``distill_teacher``, a model name or
checkpoint, frozen, in eval mode) embeds the same local and global inputs; the loss is the mean over voxels of
``1 - cos(student, teacher)`` on the local map, plus ``distill_global_weight`` times the same on the global map.
Both networks must share the preprocessing, the maps' strides and the embedding sizes, so that the matcher can
use the student's vectors as it used the teacher's.

The matcher ranks candidates by cosine similarity, so a small gap can still reorder them. With
``distill_relational_weight`` > 0 a relational term is added on each map: for ``distill_anchors`` body voxels of
each view, the softmax over their similarities (temperature ``distill_tau``) with every voxel of the pair's other
view (the same scan), and of a view of the batch's next scan (another patient), is the student's distribution of
where the anchor matches; its KL divergence from the teacher's is the loss (:func:`relational_gap`).

Combine it with the other objectives, e.g. the teacher's own organ-mask term (``distill+semantic:0.2``,
``Resources/Models/sam-lite-ct-half-semantic.yaml``), which is what brought the half-width student close to the
teacher between patients. Start the student from the teacher's weights cut to its widths (``init_from``, see
:mod:`.slim`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..preprocess import PreprocessConfig
from .pairs import BODY_THRESHOLD

if TYPE_CHECKING:
    from .config import TrainConfig
    from .train import Trainer


@dataclass(frozen=True)
class DistillSettings:
    """Settings of the distill objective (config keys ``distill_*``).

    Attributes:
        teacher: the model whose embeddings are learned: a registered name (``default``) or a checkpoint path.
        global_weight: weight of the global maps' terms (the local maps' weigh 1).
        relational_weight: weight of the relational term (:func:`relational_gap`), per map, beside the cosine gap.
        tau: the relational term's temperature (on cosine similarities).
        anchors: the relational term's anchor voxels per view and map (on the body where the view shows it).
        global_frozen: the student's global branch does not learn (``freeze_global``): the global terms are left
            out (logged as 0).
    """

    teacher: str = "default"
    global_weight: float = 1.0
    relational_weight: float = 0.0
    tau: float = 0.05
    anchors: int = 256
    global_frozen: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DistillSettings:
        """The settings of a :class:`~samembed.training.config.TrainConfig`."""
        return cls(teacher=str(cfg.distill_teacher), global_weight=float(cfg.distill_global_weight),
                   relational_weight=float(cfg.distill_relational_weight), tau=float(cfg.distill_tau),
                   anchors=int(cfg.distill_anchors), global_frozen=bool(cfg.freeze_global))


def load_teacher(settings: DistillSettings, student: nn.Module, preprocess: PreprocessConfig | None) -> nn.Module:
    """The teacher network, float32, frozen, in eval mode.

    Raises:
        InputError: its preprocessing (spacing, fill, percentiles), strides or embedding sizes differ from the
            student's (the matcher could not use the student's vectors in place of the teacher's).
    """
    from ..models import load_model

    loaded = load_model(settings.teacher)
    net = loaded.net.float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    a, b = loaded.spec, student.spec
    for what, theirs, ours in (("strides", (tuple(a.local_stride), tuple(a.global_stride)),
                                (tuple(b.local_stride), tuple(b.global_stride))),
                               ("embedding sizes", (a.local_channels, a.global_channels),
                                (b.local_channels, b.global_channels))):
        if theirs != ours:
            raise InputError(f"distill_teacher '{settings.teacher}': its {what} (local, global) {theirs} differ from "
                             f"the student's {ours}; distillation needs the same maps")
    if preprocess is not None and loaded.preprocess != preprocess:
        raise InputError(f"distill_teacher '{settings.teacher}': it reads images with {loaded.preprocess.to_dict()}, "
                         f"the student with {preprocess.to_dict()}; set spacing_mm and fill to the teacher's")
    return net


def cosine_gap(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of ``1 - cos`` between two maps of unit vectors (N, C, *spatial): 0 when they agree."""
    return 1.0 - (student * teacher).sum(dim=1).mean()


def relational_gap(student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor, teacher_b: torch.Tensor,
                   tau: float) -> torch.Tensor:
    """How differently the student ranks candidates for its anchors than the teacher: for each anchor (a column of
    the ``*_a`` (C, M) unit vectors), the softmax over its cosine similarities / ``tau`` with every candidate (the
    columns of ``*_b``, (C, N)) is the distribution the matcher's search picks from; the result is the mean over
    anchors of KL(teacher || student). 0 when the student's similarities equal the teacher's."""
    log_s = F.log_softmax(student_a.T @ student_b / tau, dim=1)
    log_t = F.log_softmax(teacher_a.T @ teacher_b / tau, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def _anchor_columns(body: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """Up to ``count`` random voxel indices of a flattened map, on the body (``body``: bool per voxel) when at least
    ``count`` voxels are."""
    where = torch.nonzero(body.reshape(-1)).reshape(-1) if int(body.sum()) >= count else torch.arange(body.numel())
    return where[torch.randperm(len(where), generator=gen)[:count]]


def _relational(student: torch.Tensor, teacher: torch.Tensor, body: torch.Tensor, settings: DistillSettings,
                gen: torch.Generator) -> torch.Tensor:
    """:func:`relational_gap` over the view pairs of a batch of maps ([A0, B0, A1, ...], (2P, C, *spatial)): the
    anchors of each view against every voxel of the other view of its pair (the same scan) and, with more than one
    pair, of the next pair's view of the same rank (another scan: how the teacher relates two patients)."""
    terms = []
    n = student.shape[0]
    for a in range(n):
        partners = [a + 1 if a % 2 == 0 else a - 1] + ([(a + 2) % n] if n > 2 else [])
        idx = _anchor_columns(body[a], settings.anchors, gen)
        s_a, t_a = student[a].flatten(1)[:, idx], teacher[a].flatten(1)[:, idx]
        for b in partners:
            terms.append(relational_gap(s_a, student[b].flatten(1), t_a, teacher[b].flatten(1), settings.tau))
    return torch.stack(terms).mean()


def _body(images: torch.Tensor, map_shape: tuple[int, ...], views) -> torch.Tensor:
    """Bool per map voxel: the view's mean intensity over the voxel's input block is above the body threshold of its
    volume (``views``: the local views, which carry it; CT's when they do not)."""
    pool = F.adaptive_avg_pool3d if images.dim() == 5 else F.adaptive_avg_pool2d
    pooled = pool(images, map_shape)[:, 0]
    thresholds = torch.tensor([BODY_THRESHOLD if getattr(v, "body_threshold", None) is None else v.body_threshold
                               for v in views], dtype=pooled.dtype)
    return pooled > thresholds.reshape(-1, *([1] * (pooled.dim() - 1)))


def teacher_maps(teacher: nn.Module, local_x: torch.Tensor, global_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's unit-vector local and global maps of a batch (as :class:`~samembed.training.train.TwoBranch`)."""
    with torch.no_grad():
        return (F.normalize(teacher.forward_local(local_x), dim=1),
                F.normalize(teacher.forward_global_pooled(global_x), dim=1))


def distill_objective(trainer: Trainer, views: list, loc: torch.Tensor, glob: torch.Tensor, gen: torch.Generator,
                      rng: np.random.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss on one batch: ``views`` as SAM's, ``loc`` / ``glob`` the student's unit-vector maps of them
    ([A0, B0, A1, ...]); with the loss, its parts (``distill_*``, ``relational_*``) and ``local`` / ``global`` (each
    map's total) for the log."""
    teacher = trainer.distill_teacher()
    device = next(teacher.parameters()).device
    lx = torch.stack([v[0].image for pair in views for v in pair]).to(device)
    gx = torch.stack([v[1].image for pair in views for v in pair]).to(device)
    t_loc, t_glob = teacher_maps(teacher, lx, gx)
    if t_loc.shape != loc.shape or t_glob.shape != glob.shape:
        raise InputError(f"distill: the teacher's maps {tuple(t_loc.shape)} / {tuple(t_glob.shape)} differ from the "
                         f"student's {tuple(loc.shape)} / {tuple(glob.shape)}")
    settings = trainer.distill_settings
    t_loc, t_glob = t_loc.to(loc.device), t_glob.to(glob.device)
    frozen = settings.global_frozen  # a frozen global branch learns nothing from its terms
    l_loc = cosine_gap(loc, t_loc)
    l_glob = torch.zeros((), device=glob.device) if frozen else cosine_gap(glob, t_glob)
    stats = {"distill_local": float(l_loc.detach()), "distill_global": float(l_glob.detach())}
    if settings.relational_weight:
        local_views = [v[0] for pair in views for v in pair]
        r_loc = _relational(loc, t_loc, _body(lx.cpu(), tuple(loc.shape[2:]), local_views).to(loc.device), settings, gen)
        r_glob = torch.zeros((), device=glob.device) if frozen else _relational(
            glob, t_glob, _body(gx.cpu(), tuple(glob.shape[2:]), local_views).to(glob.device), settings, gen)
        l_loc = l_loc + settings.relational_weight * r_loc
        l_glob = l_glob + settings.relational_weight * r_glob
        stats.update(relational_local=float(r_loc.detach()), relational_global=float(r_glob.detach()))
    loss = l_loc + settings.global_weight * l_glob
    return loss, {**stats, "local": float(l_loc.detach()), "global": float(l_glob.detach())}
