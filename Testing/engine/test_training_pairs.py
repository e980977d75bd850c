"""What the training objectives train on: where their points are, which candidates are negatives (a review).

Geometry is checked on a linear ramp, on which linear interpolation is exact, so a position error shows as a value
error; the losses against hand computations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samembed.training import objectives
from samembed.training.config import TrainConfig
from samembed.training.losses import local_loss, mine_hard_negatives
from samembed.training.objectives import pruned_info_nce
from samembed.training.pairs import NOTHING_TO_LEARN, map_positions_mm
from samembed.training.sampling import sample_view

RAMP = torch.tensor([1.0, 0.5, 0.25])  # value per mm along z, y, x


def ramp_volume(shape=(96, 100, 104), spacing_mm=2.0) -> torch.Tensor:
    """A volume whose voxel at index k (zyx, at k * spacing mm) holds RAMP . (k * spacing)."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"), -1)
    return (idx * spacing_mm * RAMP).sum(-1)


@pytest.mark.parametrize("rotation_deg", [0.0, 8.0])
def test_both_views_show_the_volume_at_the_positions_the_trainer_gives_them(rotation_deg):
    """The global view was cut from the 4 x 4 x 4 average as if its voxel k sat at 4k input voxels; its centre is at
    4k + 1.5, so the global view showed the volume 3 mm (per axis, at 2 mm) from where the objectives placed it."""
    from samembed.training.train import Trainer

    sp = 2.0
    vol = ramp_volume(spacing_mm=sp)
    cfg = TrainConfig(rotation_deg=rotation_deg, noise_std=0.0, blur_p=0.0, contrast=0.0, gamma=0.0,
                      local_size=48, global_size=40, spacing_mm=sp, centre_jitter_mm=10, global_jitter_mm=10)
    trainer = Trainer(cfg, progress=False)
    rng = np.random.default_rng(0)
    extent = torch.tensor(vol.shape, dtype=torch.float32) * sp
    worst = {"local": 0.0, "global": 0.0}
    for _ in range(5):
        for local, glob in trainer._views(rng, vol.half(), sp, threshold=-1e9):
            for name, view in (("local", local), ("global", glob)):
                pos = map_positions_mm(view, tuple(view.image.shape[1:]))  # every view voxel
                inside = ((pos >= 16) & (pos <= extent - 18)).all(1)  # away from the volume's edges (pooled: 8 mm)
                error = (view.image.reshape(-1)[inside] - (pos[inside] * RAMP).sum(-1)).abs().max()
                worst[name] = max(worst[name], float(error))
    assert worst["local"] < 0.05 and worst["global"] < 0.05, worst  # 5.25 (3 mm per axis) before


def test_isimed_draws_its_points_on_the_body_inside_each_view_even_rotated(monkeypatch):
    """The points were uniform over the view's own axis-aligned box taken as volume mm: with a rotated view some lay
    outside it (their vectors read at the border), and most lay on air or on the fill beyond the scan."""
    sp = 2.0
    shape = (80, 80, 80)
    vol = torch.zeros(shape)
    vol[30:50, 25:55, 20:60] = 100.0  # the body: z 60-98, y 50-108, x 40-118 mm
    pooled = F.avg_pool3d(vol[None, None], 4, ceil_mode=True)
    views = []
    for centre in ([80.0, 80.0, 80.0], [70.0, 90.0, 70.0]):
        local = sample_view(vol[None, None], np.array(centre), 16, sp, sp, 0.0, 15.0)
        local.body_threshold = 50.0
        glob = sample_view(pooled, np.array(centre), 16, 4 * sp, 4 * sp, 0.0, 15.0, first_voxel_mm=1.5 * sp)
        views.append((local, glob))
    seen = []
    monkeypatch.setattr(objectives, "isimed_loss", lambda ea, eb, pa, pb, scale: seen.append((pa, pb)) or ea.sum() * 0)
    trainer = SimpleNamespace(cfg=SimpleNamespace(isimed_crops=32, isimed_scale_mm=100.0))
    glob_maps = torch.randn(2, 8, 8, 8, 8)
    loss, stats = objectives._isimed(trainer, [views], None, glob_maps, torch.Generator().manual_seed(0), None)
    assert seen and not stats.get(NOTHING_TO_LEARN)
    pa, pb = seen[0]
    for points, v in ((pa, views[0][1]), (pb, views[1][1])):
        assert len(points) >= 16
        # inside the (rotated) view
        idx = (v.to_view(points) - v.start_mm) / v.step_mm
        assert ((idx >= 0) & (idx <= 15)).all()
        # on the body (its blurred edge aside: the global view is a 4 x 4 x 4 average)
        lo, hi = torch.tensor([60.0, 50.0, 40.0]) - 8, torch.tensor([98.0, 108.0, 118.0]) + 8
        assert ((points >= lo) & (points <= hi)).all()
    # a view pair on air only: nothing to learn, said so (no step is taken on it)
    air = [(sample_view(torch.zeros(1, 1, 8, 8, 8), np.array([8.0, 8.0, 8.0]), 8, sp, sp, 0.0), v[1]) for v in views]
    for a, g in air:
        a.body_threshold, g.image = 50.0, torch.zeros_like(g.image)
    _, stats = objectives._isimed(trainer, [air], None, glob_maps, torch.Generator().manual_seed(0), None)
    assert stats[NOTHING_TO_LEARN]


def test_adams_negatives_are_the_other_parts_positives_never_an_anchors_own():
    """The first iteration (an empty bank) had no negatives at all, so a loss of 0 and no gradient; later ones
    counted each part's own positive among its negatives (kept unless its cosine reached the pruner's 0.8)."""
    tau = 0.5
    anchors = torch.eye(3)[:2]  # two parts, each matching its positive exactly
    positives = anchors.clone()
    loss, _ = pruned_info_nce(anchors, positives, torch.zeros((0, 3)), tau, 0.8, in_batch=positives)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0)))  # one negative: the other's positive
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    # a positive at cosine 0.6 (under the pruner's threshold) is still not its own negative, with a bank
    positive = F.normalize(torch.tensor([[0.6, 0.8, 0.0]]), dim=1)
    bank = torch.tensor([[0.0, 0.0, 1.0]])
    loss, pruned = pruned_info_nce(torch.eye(3)[:1], positive, bank, tau, 0.8, in_batch=positive)
    expected = -math.log(math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(0)))
    assert loss.item() == pytest.approx(expected, rel=1e-6) and pruned == 0.0

    # the objective passes its batch so
    seen = {}

    def spy(anchor, positive, bank, tau, threshold, in_batch=None):
        seen.update(bank=len(bank), in_batch=None if in_batch is None else len(in_batch))
        return anchor.sum() * 0, 0.0

    points = torch.tensor([[float(z), float(y), 0.0] for z in range(4) for y in range(4)])
    emb = F.normalize(torch.randn(len(points), 3, generator=torch.Generator().manual_seed(0)), dim=1)
    trainer = SimpleNamespace(cfg=SimpleNamespace(adam_levels=3, pruner_threshold=None, tau=tau, adam_bank_size=64,
                                                  iterations=10), _iteration=0)
    original = objectives.pruned_info_nce, objectives.pair_points
    try:
        objectives.pruned_info_nce = spy
        objectives.pair_points = lambda *a: (points, emb, emb)
        objectives._adam(trainer, [None], torch.zeros(1, 3), None, None, None)
    finally:
        objectives.pruned_info_nce, objectives.pair_points = original
    assert seen == {"bank": 0, "in_batch": 2}  # level 1: two parts, both in the batch


def test_hard_negatives_inside_the_ignore_radius_are_never_negatives():
    """A view with fewer candidates outside ``local_ignore_mm`` than ``num_hard`` (a 2D view of local_size 32 has
    256): topk still handed back candidates inside the radius, the positive's own voxel among them."""
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(10, dtype=torch.float32)[:, None] * torch.tensor([[3.0, 0.0]])  # 3 mm apart
    anchor_at = positions[[0]]
    dist = torch.cdist(anchor_at, positions)  # 0, 3, 6, 9, ... mm: 3 candidates inside 8 mm
    idx = mine_hard_negatives(torch.rand(1, 10, generator=g), dist, 8.0, 10, 7, g)
    assert sorted(idx[0].tolist()) == list(range(3, 10))  # the 7 outside the radius are drawn first

    emb = torch.eye(10)  # each candidate its own direction: the anchor's and the positive's is candidate 0
    a = emb[[0]]
    loss = local_loss(a, a, a, emb, emb, dist, 0.5, 8.0, num_hard=10, num_keep=10, generator=g)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 7 * math.exp(0)))  # the 7 outside, nothing inside
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    pruned = local_loss(a, a, a, emb, emb, dist, 0.5, 8.0, num_hard=10, num_keep=10, generator=g, pruner_threshold=0.8)
    assert pruned.item() == pytest.approx(expected, rel=1e-6)
