"""The ``distill`` objective: a network learns to give the embeddings of a trained one (its teacher).

The cold path's floor is the network (issue 13, ``benchmarks/results/cold_start.md``): a narrower network runs
3-4x faster, but trained from scratch it would need the CPU-hours the shipped model took, with no promise of
the same matches. Distillation asks the narrower network for the shipped model's own vectors instead: every
voxel of both maps is a target, so each iteration gives far more signal than SAM's sampled anchors.

On each of SAM's view pairs (same sampling and augmentation), the teacher (``distill_teacher``, a model name or
checkpoint, frozen, in eval mode) embeds the same local and global inputs; the loss is the mean over voxels of
``1 - cos(student, teacher)`` on the local map, plus ``distill_global_weight`` times the same on the global map.
Both networks must share the preprocessing, the maps' strides and the embedding sizes, so that the matcher can
use the student's vectors as it used the teacher's.

Combine with SAM's own terms (``distill+sam:0.1``) to keep the contrastive objective in view. Start the student
from the teacher's weights cut to its widths (``init_from``, see :mod:`.slim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class DistillSettings:
    """Settings of the distill objective (config keys ``distill_*``).

    Attributes:
        teacher: the model whose embeddings are learned: a registered name (``default``) or a checkpoint path.
        global_weight: weight of the global map's term (the local map's weighs 1).
    """

    teacher: str = "default"
    global_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> DistillSettings:
        """The settings of a :class:`~samembed.training.config.TrainConfig`."""
        return cls(teacher=str(cfg.distill_teacher), global_weight=float(cfg.distill_global_weight))


def load_teacher(settings: DistillSettings, student: nn.Module, preprocess) -> nn.Module:
    """The teacher network, float32, frozen, in eval mode.

    Raises:
        InputError: its preprocessing, strides or embedding sizes differ from the student's (the matcher could not
            use the student's vectors in place of the teacher's).
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
    if preprocess is not None and (loaded.preprocess.spacing_mm, loaded.preprocess.fill) != (preprocess.spacing_mm, preprocess.fill):
        raise InputError(f"distill_teacher '{settings.teacher}': it reads images at {loaded.preprocess.spacing_mm} mm "
                         f"with fill '{loaded.preprocess.fill}', the student at {preprocess.spacing_mm} mm with fill "
                         f"'{preprocess.fill}'; set spacing_mm and fill to the teacher's")
    return net


def cosine_gap(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of ``1 - cos`` between two maps of unit vectors (N, C, *spatial): 0 when they agree."""
    return 1.0 - (student * teacher).sum(dim=1).mean()


def teacher_maps(teacher: nn.Module, local_x: torch.Tensor, global_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's unit-vector local and global maps of a batch (as :class:`~samembed.training.train.TwoBranch`)."""
    with torch.no_grad():
        return (F.normalize(teacher.forward_local(local_x), dim=1),
                F.normalize(teacher.forward_global_pooled(global_x), dim=1))


def distill_objective(trainer, views, loc, glob, gen, rng):
    """The loss on one batch: ``views`` as SAM's, ``loc`` / ``glob`` the student's maps of them ([A0, B0, A1, ...])."""
    teacher = trainer.distill_teacher()
    device = next(teacher.parameters()).device
    lx = torch.stack([v[0].image for pair in views for v in pair]).to(device)
    gx = torch.stack([v[1].image for pair in views for v in pair]).to(device)
    t_loc, t_glob = teacher_maps(teacher, lx, gx)
    if t_loc.shape != loc.shape or t_glob.shape != glob.shape:
        raise InputError(f"distill: the teacher's maps {tuple(t_loc.shape)} / {tuple(t_glob.shape)} differ from the "
                         f"student's {tuple(loc.shape)} / {tuple(glob.shape)}")
    weight = trainer.distill_settings.global_weight
    l_loc = cosine_gap(loc, t_loc.to(loc.device))
    l_glob = cosine_gap(glob, t_glob.to(glob.device))
    loss = l_loc + weight * l_glob
    return loss, {"distill_local": float(l_loc.detach()), "distill_global": float(l_glob.detach()),
                  "local": float(l_loc.detach()), "global": float(l_glob.detach())}
