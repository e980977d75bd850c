"""A narrower network learned from a trained one: slimming its weights, and the distill objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samembed.errors import InputError
from samembed.networks import build_network
from samembed.training.distill import DistillSettings, cosine_gap, load_teacher, relational_gap, teacher_maps
from samembed.training.slim import slim_state_dict

from .test_training import tiny_config

TINY = {"widths": [8, 16, 16], "global_widths": [8, 16, 16, 16], "fpn_channels": 8, "local_channels": 16,
        "global_channels": 16}
NARROW = {**TINY, "widths": [4, 8, 8], "global_widths": [4, 8, 8, 8], "fpn_channels": 4}


def _random_net(config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_network("sam-lite", config)
    with torch.no_grad():  # batch norms with distinct scales and statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(-2, 2)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.eval()


def _ct_like(shape=(1, 1, 32, 32, 32), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 200 - 50  # the preprocessed CT range, about -50..205


def test_slimming_to_the_same_widths_gives_the_shipped_network_itself():
    from samembed.models import load_model

    teacher = load_model("default").net.float().eval()
    copy = build_network("sam-lite", teacher.spec.config).eval()
    copy.load_state_dict(slim_state_dict(teacher, copy))
    x = _ct_like()
    with torch.no_grad():
        assert torch.equal(copy.forward_local(x), teacher.forward_local(x))
        pooled = F.avg_pool3d(x, 4)
        assert torch.equal(copy.forward_global_pooled(pooled), teacher.forward_global_pooled(pooled))


def test_a_light_local_branch_under_the_teachers_own_global_branch_keeps_the_global_maps_and_checkpoints(tmp_path):
    """``global_fpn_channels``: a network whose local branch is slimmed while its global branch keeps the teacher's
    widths (and FPN width) gets the teacher's global maps exactly from slimming, and its checkpoint rebuilds it."""
    from samembed.models import load_model, save_checkpoint

    teacher = load_model("default").net.float().eval()
    config = {**teacher.spec.config, "widths": [16, 32, 64], "fpn_channels": 16,
              "global_fpn_channels": teacher.spec.config["fpn_channels"]}
    light = build_network("sam-lite", config).eval()
    light.load_state_dict(slim_state_dict(teacher, light))
    assert light.l_out[1].weight.shape[1] == 16 and light.g_out[1].weight.shape[1] == 32
    x = _ct_like()
    with torch.no_grad():
        pooled = F.avg_pool3d(x, 4)
        assert torch.equal(light.forward_global_pooled(pooled), teacher.forward_global_pooled(pooled))
        assert light.forward_local(x).shape == teacher.forward_local(x).shape
    path = save_checkpoint(tmp_path / "light.pt", light, load_model("default").preprocess, name="light", half=False)
    again = load_model(str(path)).net
    assert again.spec.config["global_fpn_channels"] == 32 and again.g_lat[0].weight.shape[0] == 32
    # a network without it keeps the config it had (checkpoints of the networks before it are unchanged)
    assert "global_fpn_channels" not in build_network("sam-lite", {"fpn_channels": 16}).spec.config


def test_slimming_keeps_the_channels_with_the_largest_batch_norm_scale_and_what_the_fpn_reader_weighs_most():
    source = _random_net(TINY, 0)
    with torch.no_grad():
        source.l_stem[1].weight.copy_(torch.tensor([0.1, -3.0, 0.2, 2.5, 0.0, 1.5, -0.3, 4.0]))
        # the local FPN's reader: input channels 6, 1, 3, 0 weigh most
        w = source.l_out[0][0].weight
        w.mul_(0.01)
        for c, s in ((6, 5.0), (1, 4.0), (3, 3.0), (0, 2.0)):
            w[:, c] = s
    narrow = build_network("sam-lite", NARROW)
    state = slim_state_dict(source, narrow)
    stem = [1, 3, 5, 7]  # |gamma| 3.0, 2.5, 1.5, 4.0, in the source's order
    assert torch.equal(state["l_stem.0.weight"], source.l_stem[0].weight[stem])
    assert torch.equal(state["l_stem.1.running_var"], source.l_stem[1].running_var[stem])
    kept_d1 = torch.sort(torch.topk(source.l_down1[0][1].weight.abs(), 8).indices).values
    assert torch.equal(state["l_down1.0.0.weight"], source.l_down1[0][0].weight[kept_d1][:, stem])
    fpn = [0, 1, 3, 6]
    assert torch.equal(state["l_lat.0.weight"], source.l_lat[0].weight[fpn][:, stem])
    assert torch.equal(state["l_lat.0.bias"], source.l_lat[0].bias[fpn])
    # the embedding's own channels are all kept: the output layer only follows its input's choice
    assert state["l_out.1.weight"].shape == (16, 4, 1, 1, 1)
    narrow.load_state_dict(state)  # every weight of the narrower network, of its shape


def test_slimming_refuses_what_it_cannot_cut():
    source = _random_net(TINY, 0)
    with pytest.raises(InputError, match="cannot widen channel group 'l0' from 8 to 16"):
        slim_state_dict(source, build_network("sam-lite", {**TINY, "widths": [16, 16, 16]}))
    with pytest.raises(InputError, match="keeps the output local channels \\(16\\); the new network has 8"):
        slim_state_dict(source, build_network("sam-lite", {**NARROW, "local_channels": 8}))
    with pytest.raises(InputError, match="one sam-lite architecture"):
        slim_state_dict(source, build_network("sam-lite-2d", NARROW))


def test_the_distill_gap_is_zero_on_the_teachers_own_maps_and_training_on_it_closes_it():
    teacher = _random_net(TINY, 0)
    x = _ct_like((2, 1, 32, 32, 32))
    g = F.avg_pool3d(_ct_like((2, 1, 64, 64, 64), 1), 4)
    t_loc, t_glob = teacher_maps(teacher, x, g)
    assert cosine_gap(t_loc, t_loc).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_gap(t_loc, -t_loc).item() == pytest.approx(2.0, abs=1e-6)
    student = build_network("sam-lite", NARROW)
    student.load_state_dict(slim_state_dict(teacher, student))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)

    def gap() -> torch.Tensor:
        return (cosine_gap(F.normalize(student.forward_local(x), dim=1), t_loc)
                + cosine_gap(F.normalize(student.forward_global_pooled(g), dim=1), t_glob))

    first = gap().item()
    for _ in range(30):
        opt.zero_grad()
        loss = gap()
        loss.backward()
        opt.step()
    assert gap().item() < 0.5 * first


def test_the_relational_gap_is_zero_for_the_teachers_similarities_and_grows_when_the_ranking_changes():
    g = torch.Generator().manual_seed(0)
    anchors = F.normalize(torch.randn(8, 5, generator=g), dim=0)
    cands = F.normalize(torch.randn(8, 40, generator=g), dim=0)
    assert relational_gap(anchors, cands, anchors, cands, 0.05).item() == pytest.approx(0.0, abs=1e-5)
    # a rotation of both sets keeps every similarity: still no gap
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert relational_gap(q @ anchors, q @ cands, anchors, cands, 0.05).item() == pytest.approx(0.0, abs=1e-4)
    # the candidates shuffled: the anchors now prefer other candidates
    shuffled = cands[:, torch.randperm(40, generator=g)]
    assert relational_gap(anchors, shuffled, anchors, cands, 0.05).item() > 1.0


def test_a_distill_batch_with_the_relational_term_gives_its_parts_and_pairs_the_right_views(monkeypatch):
    from types import SimpleNamespace

    from samembed.training import distill

    teacher = _random_net(TINY, 0)

    def view(seed, size):
        return SimpleNamespace(image=_ct_like((1, size, size, size), seed), body_threshold=None)

    # two scans, two views each, ordered [A0, B0, A1, B1]
    views = [[(view(0, 32), view(1, 16)), (view(2, 32), view(3, 16))],
             [(view(4, 32), view(5, 16)), (view(6, 32), view(7, 16))]]
    lx = torch.stack([v[0].image for pair in views for v in pair])
    gx = torch.stack([v[1].image for pair in views for v in pair])
    t_loc, t_glob = teacher_maps(teacher, lx, gx)
    # the "student" gives the teacher's maps but for view B0 (index 1), whose vectors are others
    g = torch.Generator().manual_seed(1)
    loc, glob = t_loc.clone(), t_glob.clone()
    loc[1] = F.normalize(torch.randn(loc[1].shape, generator=g), dim=0)
    glob[1] = F.normalize(torch.randn(glob[1].shape, generator=g), dim=0)
    loc.requires_grad_(True)
    gaps = []
    real = distill.relational_gap

    def recorded(*args, **kwargs):
        gaps.append(real(*args, **kwargs).item())
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "relational_gap", recorded)
    trainer = SimpleNamespace(distill_teacher=lambda: teacher,
                              distill_settings=DistillSettings(relational_weight=0.5, anchors=16))
    loss, stats = distill.distill_objective(trainer, views, loc, glob, torch.Generator().manual_seed(0), None)
    # per map, each view's anchors against its scan's other view and the next scan's view of its rank:
    # (0,1) (0,2) (1,0) (1,3) (2,3) (2,0) (3,2) (3,1); only the four that involve view 1 differ from the teacher's
    for per_map in (gaps[:8], gaps[8:]):
        assert [v > 1e-4 for v in per_map] == [True, False, True, True, False, False, False, True]
    assert stats["relational_local"] > 0 and stats["relational_global"] > 0
    expected = (stats["distill_local"] + 0.5 * stats["relational_local"]
                + stats["distill_global"] + 0.5 * stats["relational_global"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["local"] == pytest.approx(stats["distill_local"] + 0.5 * stats["relational_local"], rel=1e-5)
    loss.backward()
    assert loc.grad[1].abs().sum() > 0


def test_a_teacher_whose_maps_differ_from_the_students_is_refused():
    student = build_network("sam-lite", NARROW)  # 16-channel embeddings; the shipped model gives 64
    with pytest.raises(InputError, match="distill_teacher 'default': its embedding sizes \\(local, global\\) "
                                         "\\(64, 64\\) differ from the student's \\(16, 16\\)"):
        load_teacher(DistillSettings("default"), student, None)


@pytest.mark.needs_data
def test_a_distill_run_starts_from_the_teachers_slimmed_weights_and_logs_its_gap(tmp_path):
    from samembed.models import load_model
    from samembed.training.train import Trainer

    teacher_pt = Trainer(tiny_config(tmp_path / "teacher", "sam"), progress=False).run()
    net_config = '{"widths": [4, 8, 8], "global_widths": [4, 8, 8, 8], "fpn_channels": 4, "local_channels": 16, "global_channels": 16}'
    cfg = tiny_config(tmp_path / "student", "distill", iterations=2, lr=0.0, init_from=f'"{teacher_pt}"',
                      distill_teacher=f'"{teacher_pt}"', net_config=net_config)
    student_pt = Trainer(cfg, progress=False).run()
    student = load_model(str(student_pt)).net
    expected = slim_state_dict(load_model(str(teacher_pt)).net.float(), build_network("sam-lite", NARROW))
    # lr 0: the parameters are the slimmed teacher's (batch norm statistics move in training mode)
    params = dict(student.named_parameters())
    assert all(torch.equal(params[k].float(), expected[k].half().float()) for k in params)
    rows = (tmp_path / "student" / "run" / "train_log.csv").read_text().splitlines()[1:]
    gaps = [float(r.split(",")[1]) for r in rows]
    assert len(gaps) == 2 and all(0.0 < v < 4.0 for v in gaps)


@pytest.mark.needs_data
def test_a_light_local_branch_learns_under_a_frozen_global_branch_taken_from_another_model(tmp_path):
    """``init_from`` gives the local branch, ``init_global_from`` the global one (a full-width branch, as the teacher
    has it), and ``freeze_global`` keeps that branch's weights and batch-norm statistics while the local one learns."""
    from samembed.models import load_model, save_checkpoint
    from samembed.training.config import load_config
    from samembed.training.train import Trainer

    teacher_pt = Trainer(tiny_config(tmp_path / "teacher", "sam"), progress=False).run()
    narrow = _random_net(NARROW, seed=3)
    narrow_pt = save_checkpoint(tmp_path / "narrow.pt", narrow, load_model(str(teacher_pt)).preprocess, name="narrow",
                                half=False)
    net_config = ('{"widths": [4, 8, 8], "global_widths": [8, 16, 16, 16], "fpn_channels": 4, '
                  '"global_fpn_channels": 8, "local_channels": 16, "global_channels": 16}')
    cfg = tiny_config(tmp_path / "student", "distill", iterations=2, lr=0.01, init_from=f'"{narrow_pt}"',
                      init_global_from=f'"{teacher_pt}"', freeze_global="true", distill_teacher=f'"{teacher_pt}"',
                      net_config=net_config, half_weights="false")
    student = load_model(str(Trainer(cfg, progress=False).run())).net.float()
    teacher = load_model(str(teacher_pt)).net.float()
    theirs, start, ours = teacher.state_dict(), narrow.state_dict(), student.state_dict()
    glob = [k for k in ours if k.startswith("g_")]
    assert glob and all(torch.equal(ours[k], theirs[k].half().float() if theirs[k].is_floating_point() else theirs[k])
                        for k in glob if not k.endswith("num_batches_tracked"))
    local = [k for k in ours if k.startswith("l_") and k.endswith(".weight")]
    assert any(not torch.equal(ours[k], start[k]) for k in local), "the local branch did not learn"
    rows = (tmp_path / "student" / "run" / "train_log.csv").read_text().splitlines()
    column = rows[0].split(",").index("distill_global")
    assert [float(r.split(",")[column]) for r in rows[1:]] == [0.0, 0.0]
    # a frozen branch needs starting weights
    with pytest.raises(InputError, match="freeze_global keeps the global branch's starting weights, but none are given"):
        load_config(None, ["freeze_global=true"])


def test_slimming_to_a_local_branch_of_two_levels_cuts_only_the_layers_it_has():
    """A two-level network (no local 16 mm level) slimmed from a three-level one: the same widths give the source's
    4 and 8 mm layers themselves; narrower ones are cut as for three levels."""
    source = _random_net(TINY, 0)
    same = build_network("sam-lite", {**TINY, "widths": TINY["widths"][:2]})
    state = slim_state_dict(source, same)
    assert set(state) == set(same.state_dict()) and not any(k.startswith(("l_down2.", "l_lat.2.")) for k in state)
    theirs = source.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in state.items())
    narrow = build_network("sam-lite", {**NARROW, "widths": NARROW["widths"][:2]})
    narrow.load_state_dict(slim_state_dict(source, narrow))
    assert narrow.l_stem[0].weight.shape[0] == 4 and narrow.spec.tile_halo == 16


@pytest.mark.needs_data
def test_a_local_branch_of_two_levels_starts_from_a_three_level_model_without_its_16_mm_level(tmp_path, caplog):
    """``init_from`` a three-level model into a two-level network: every layer but the 16 mm level's is the source's,
    and the log says what was left out; a source that lacks this network's weights is refused by name."""
    import logging

    from samembed.models import load_model, save_checkpoint
    from samembed.training.train import Trainer

    source = _random_net(TINY, 1)
    source_pt = save_checkpoint(tmp_path / "three.pt", source, load_model("default").preprocess, name="three",
                                half=False)
    two = {**TINY, "widths": TINY["widths"][:2]}
    cfg = tiny_config(tmp_path / "two", "sam", iterations=1, lr=0.0, init_from=f'"{source_pt}"',
                      net_config=str(two).replace("'", '"'), half_weights="false")
    with caplog.at_level(logging.INFO, logger="samembed"):
        trainer = Trainer(cfg, progress=False)
        student = load_model(str(trainer.run())).net
    assert student.local_levels == 2 and "its local 16 mm level is left out" in caplog.text
    theirs = source.state_dict()
    params = dict(student.named_parameters())
    assert params and all(torch.equal(p, theirs[k]) for k, p in params.items())  # lr 0: the source's own
    other = build_network("sam-lite", {**TINY, "widths": [8, 16]})  # two levels: no 16 mm level to start one from
    save_checkpoint(tmp_path / "other.pt", other, load_model("default").preprocess, name="other", half=False)
    with pytest.raises(InputError, match=r"other.pt: has no weights l_down2\.0\.0\.weight.*sam-lite"):
        trainer._init_weights(build_network("sam-lite", TINY), str(tmp_path / "other.pt"))
