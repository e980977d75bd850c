"""The semantic objective: targets by hand, the loss on real organ masks, only training patients' masks, and a
tiny ``sam+semantic`` run that checkpoints and resumes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samembed.errors import InputError
from samembed.training.config import load_config
from samembed.training.labels import find_label_maps, organ_key
from samembed.training.semantic import SemanticSettings, semantic_pair_loss, semantic_targets

from ..conftest import DATA, REPO, data_file

NAMES = {1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid", 5: "Esophagus", 6: "Larynx", 7: "Mandible"}
TRAIN_PATIENTS = ("pt_1", "pt_2", "pt_4")  # OpenKBP training split


def openkbp_rule() -> dict:
    root = data_file("ct", "openkbp")
    return {"images": r"(pt_[0-9]+)_ct[.]nii[.]gz", "labels": str(root / "oar") + r"/\1_oar.nii.gz", "names": NAMES,
            "partial": ["SpinalCord", "Esophagus"]}


def tiny_config(tmp_path: Path, cache: Path, **extra):
    root = data_file("ct", "openkbp", "ct")
    data = [str(root / f"{p}_ct.nii.gz") for p in TRAIN_PATIENTS]
    overrides = [f"data={json.dumps(data)}", f"cache_dir=\"{cache}\"", f"out_dir=\"{tmp_path / 'run'}\"",
                 "iterations=3", "checkpoint_every=2", "local_size=32", "global_size=24", "batch_volumes=2", "anchors=32",
                 "num_hard=64", "num_negatives=32", "global_candidates=32", 'objective="sam+semantic:0.5"', "threads=1",
                 "semantic_anchors=32", "semantic_candidates=64", "semantic_background=16",
                 f"semantic_labels={json.dumps([openkbp_rule()])}",
                 'net_config={"widths": [8, 16, 16], "global_widths": [8, 16, 16, 16], "fpn_channels": 8, '
                 '"local_channels": 16, "global_channels": 16}']
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A training cache of three OpenKBP training patients (CTs and label maps), shared by the tests here."""
    return tmp_path_factory.mktemp("semantic_cache")


@pytest.fixture(scope="module")
def trainer(cache, tmp_path_factory):
    """A Trainer with its data (and label maps) loaded."""
    from samembed.training.train import Trainer

    t = Trainer(tiny_config(tmp_path_factory.mktemp("semantic_run"), cache), progress=False)
    t.load_data()
    return t


# ------------------------------------------------------------------------------------------ by hand
def test_targets_positive_nearby_same_organ_ignore_the_rest_of_its_neighbourhood_and_negatives_elsewhere():
    ids_a = torch.tensor([3])
    pos_a = torch.zeros(1, 3)
    ids_b = torch.tensor([3, 3, 3, 4, 0])  # right parotid x3, left parotid, background
    pos_b = torch.tensor([[0.0, 0, 4], [0, 0, 10], [0, 0, 30], [0, 0, 1], [0, 0, 2]])
    positive, valid = semantic_targets(ids_a, pos_a, ids_b, pos_b, positive_mm=6.0, ignore_mm=16.0)
    assert positive.tolist() == [[True, False, False, False, False]]
    # 10 mm away in the same organ: neither positive nor negative; the other side's parotid is a negative
    # even at 1 mm (no left-right flips), and so is the background
    assert valid.tolist() == [[True, False, True, True, True]]


def test_the_nearest_same_organ_candidate_is_positive_when_none_is_within_the_radius_and_far_ones_give_none():
    pos_b = torch.tensor([[0.0, 0, 9], [0, 0, 12], [0, 0, 40]])
    positive, _ = semantic_targets(torch.tensor([1]), torch.zeros(1, 3), torch.tensor([1, 1, 1]), pos_b, 6.0, 16.0)
    assert positive.tolist() == [[True, False, False]]
    positive, _ = semantic_targets(torch.tensor([1]), torch.zeros(1, 3), torch.tensor([1]), pos_b[2:], 6.0, 16.0)
    assert not positive.any()  # no candidate near enough: the anchor is dropped from the loss


def test_settings_come_from_the_config():
    cfg = load_config(None, ["semantic_pairs=2", "semantic_positive_mm=5"])
    s = SemanticSettings.from_config(cfg)
    assert (s.pairs, s.positive_mm, s.ignore_mm) == (2, 5.0, 16.0)
    assert organ_key("LeftParotid") == organ_key("left_parotid") != organ_key("RightParotid")


# ------------------------------------------------------------------------------------------ real masks
def semantic_v3_config():
    """The shipped sam+semantic training config, with the shared data folder wherever it is."""
    if not (REPO / "Resources" / "Models" / "sam-lite-ct-v3-semantic.yaml").is_file():
        pytest.fail("Resources/Models/sam-lite-ct-v3-semantic.yaml is missing")
    data_file("ct", "openkbp", "oar")
    cfg = load_config(REPO / "Resources" / "Models" / "sam-lite-ct-v3-semantic.yaml")
    fix = lambda s: str(s).replace("../shared/data", str(DATA))  # noqa: E731
    cfg.data = [fix(d) for d in cfg.data]
    cfg.semantic_labels = [dict(r, labels=fix(r["labels"])) for r in cfg.semantic_labels]
    return cfg


@pytest.mark.needs_data
def test_the_semantic_config_uses_only_training_patients_masks_and_refuses_excluded_ones():
    from samembed.training.data import find_volumes

    cfg = semantic_v3_config()
    with (DATA / "ct" / "openkbp" / "patients.csv").open(encoding="utf-8") as fh:
        split = {r["patient"]: r["split"] for r in csv.DictReader(fh)}
    validation = {p for p, s in split.items() if s != "train-pats"}
    assert len(validation) == 33 and all((DATA / "ct" / "openkbp" / "oar" / f"{p}_oar.nii.gz").is_file() for p in validation)
    paths = find_volumes(cfg.data, cfg.exclude, REPO)
    maps = find_label_maps(paths, cfg.semantic_labels, cfg.exclude, REPO)
    patients = {img.name.replace("_ct.nii.gz", "") for img in maps}
    assert patients == {p for p, s in split.items() if s == "train-pats"}  # all 170 training patients, nothing else
    assert not {lab.name.replace("_oar.nii.gz", "") for lab, _ in maps.values()} & validation
    # asked directly for an excluded patient's image, the lookup refuses instead of using its mask
    held_out = DATA / "ct" / "openkbp" / "ct" / "pt_201_ct.nii.gz"
    with pytest.raises(InputError, match="excluded from training"):
        find_label_maps([held_out], cfg.semantic_labels, cfg.exclude, REPO)
    # a label map whose own name matches 'exclude' is skipped
    train_ct = DATA / "ct" / "openkbp" / "ct" / "pt_1_ct.nii.gz"
    assert find_label_maps([train_ct], cfg.semantic_labels, cfg.exclude + ["pt_1_oar.nii.gz"], REPO) == {}


@pytest.mark.needs_data
def test_label_maps_are_cached_on_the_training_grid_and_name_the_right_tissue(trainer):
    sampler = trainer.semantic_sampler
    assert len(sampler.volumes) == 3
    assert {Path(s).name.split("_ct")[0] for s in trainer.labelled_sources} == set(TRAIN_PATIENTS)
    for lv in sampler.volumes.values():
        vol = trainer.volumes[lv.index][1].float().numpy()
        lab = np.asarray(lv.labels)
        assert lab.shape == vol.shape
        bone, soft = vol[lab == 7].mean(), vol[(lab == 3) | (lab == 4)].mean()
        assert bone > soft + 20  # the mandible is bone, the parotids soft tissue: the masks sit on the anatomy
        assert lv.organs["spinalcord"].truncated and not lv.organs["brainstem"].truncated
        right, left = lv.organs["rightparotid"], lv.organs["leftparotid"]
        assert left.lo_mm[2] + left.extent_mm[2] / 2 > right.lo_mm[2] + right.extent_mm[2] / 2  # LPS: x grows to the left


def organ_embeddings(sampler, index: int, points: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A made-up embedding that agrees across patients: the organ, and Fourier features of the relative
    position inside the organ's bounding box."""
    names = {v: k for k, v in sampler.organ_id.items()}
    rel = torch.zeros_like(points)
    for oid in ids.unique().tolist():
        o = sampler.volumes[index].organs[names[oid]]
        sel = ids == oid
        rel[sel] = (points[sel] - torch.from_numpy(o.lo_mm).float()) / torch.from_numpy(o.extent_mm).float()
    freqs = torch.tensor([1.0, 2.0, 4.0]) * math.pi
    four = torch.cat([torch.sin(rel[:, :, None] * freqs), torch.cos(rel[:, :, None] * freqs)], 2).reshape(len(rel), -1)
    return F.normalize(torch.cat([3 * F.one_hot(ids, len(sampler.organ_id) + 1).float(), four], 1), dim=1)


@pytest.mark.needs_data
def test_the_loss_is_lower_for_embeddings_that_agree_across_patients_than_for_shuffled_or_flipped_ones(trainer):
    sampler = trainer.semantic_sampler
    a, b = sorted(sampler.volumes)[:2]
    gen = torch.Generator().manual_seed(0)

    def organ_voxels(index, whole_only):
        lv = sampler.volumes[index]
        pts = torch.cat([torch.from_numpy(o.points_mm).float() for o in lv.organs.values()])
        ids = sampler.organ_ids(index, pts)
        keep = torch.isin(ids, sampler.whole_ids(a, b)) if whole_only else ids > 0
        pts, ids = pts[keep], ids[keep]
        pick = torch.randperm(len(ids), generator=gen)[:400]
        return pts[pick], ids[pick]

    pa, ia = organ_voxels(a, True)
    pb, ib = organ_voxels(b, False)
    ea, eb = organ_embeddings(sampler, a, pa, ia), organ_embeddings(sampler, b, pb, ib)
    in_a = sampler.to_frame(b, a, pb, ib)

    def loss(cands):
        local, glob = semantic_pair_loss(ea, ia, pa, cands, ib, in_a, 0.5, 6.0, 16.0, ea, cands)
        return float(local), float(glob)

    agree = loss(eb)
    shuffled = loss(eb[torch.randperm(len(eb), generator=gen)])
    swap = {sampler.organ_id["leftparotid"]: sampler.organ_id["rightparotid"],
            sampler.organ_id["rightparotid"]: sampler.organ_id["leftparotid"]}
    flipped = loss(organ_embeddings(sampler, b, pb, ib.clone().apply_(lambda v: swap.get(v, v))))
    assert agree[0] < shuffled[0] - 1.0 and agree[1] < shuffled[1] - 0.5  # (tau 0.5 bounds the gap)
    assert agree[0] < flipped[0] and agree[1] < flipped[1]  # a left-right flip costs


@pytest.mark.needs_data
def test_a_tiny_sam_semantic_run_trains_checkpoints_and_resumes_on_the_uninterrupted_course(tmp_path, cache, monkeypatch):
    from samembed.models import load_model
    from samembed.training.train import Trainer

    final = Trainer(tiny_config(tmp_path / "a", cache, iterations=4), progress=False).run()
    assert load_model(str(final)).model_id.startswith("sam-lite-ct@")
    real = Trainer.compute_loss

    def interrupted(self, *args):  # the session ends during iteration 3 (after the iteration-2 checkpoint)
        if self._iteration == 2:
            raise KeyboardInterrupt
        assert self._semantic_batch is not None and len(self._semantic_batch.views) == 1
        return real(self, *args)

    monkeypatch.setattr(Trainer, "compute_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp_path / "b", cache, iterations=4), progress=False).run(resume="auto")
    monkeypatch.setattr(Trainer, "compute_loss", real)
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["iteration"] == 2
    Trainer(tiny_config(tmp_path / "b", cache, iterations=4), progress=False).run(resume="auto")

    def rows(run):  # iteration, loss
        lines = (tmp_path / run / "run" / "train_log.csv").read_text().splitlines()[1:]
        return [(r.split(",")[0], r.split(",")[1]) for r in lines]

    assert [r[0] for r in rows("b")] == ["1", "2", "3", "4"]
    assert rows("b") == rows("a")  # the semantic pairs drawn after the resume are the same ones
    assert all(np.isfinite(float(r[1])) for r in rows("a"))
    with (tmp_path / "a" / "run" / "train_log.csv").open(encoding="utf-8") as fh:
        log = list(csv.DictReader(fh))
    assert all(float(r["semantic_local"]) > 0 and float(r["semantic_global"]) > 0 for r in log)  # its own columns


@pytest.mark.needs_data
def test_the_semantic_objective_without_label_rules_is_an_input_error(tmp_path, cache):
    from samembed.training.train import Trainer

    with pytest.raises(InputError, match="semantic_labels"):
        Trainer(tiny_config(tmp_path, cache, semantic_labels="[]"), progress=False).load_data()


@pytest.mark.needs_data
def test_a_label_map_cut_short_in_the_cache_is_made_again_not_reused(trainer, cache, caplog):
    """A cached label map that a killed run (or a full disk) left cut short is made again, to the same values, where
    ``np.load`` of it failed in every later run; the maps are written atomically, so no new one is left so."""
    from samembed.training.labels import cache_labels

    maps = sorted(cache.rglob("*.labels-*.npy"))
    assert maps, "the trainer cached no label map"
    path = maps[0]
    whole = np.load(path)
    ct_npy = path.with_name(path.name.split(".labels-")[0] + ".npy")
    source = Path(json.loads(ct_npy.with_suffix(".json").read_text())["source"])
    ((_, (label_path, _)),) = find_label_maps([source], trainer.cfg.semantic_labels, trainer.cfg.exclude, REPO).items()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        again = cache_labels(ct_npy, label_path, trainer.prep, trainer.cfg.modality, trainer.cfg.pixel_spacing_mm)
    assert again == path and "is damaged: made again" in caplog.text
    np.testing.assert_array_equal(np.load(path), whole)


def test_label_maps_are_found_for_a_cache_written_by_a_run_that_named_the_images_differently(trainer, tmp_path, cache):
    from samembed.training.train import Trainer

    root = data_file("ct", "openkbp", "ct")
    other = [str(root / ".." / "ct" / f"{p}_ct.nii.gz") for p in TRAIN_PATIENTS]  # same files, another spelling
    t = Trainer(tiny_config(tmp_path, cache, data=json.dumps(other)), progress=False)
    t.load_data()
    assert len(t.semantic_sampler.volumes) == 3


def test_label_maps_that_a_rule_names_but_do_not_exist_are_said(tmp_path, caplog):
    """A wrong template or base folder dropped every label map without a word (then only 'needs two labelled
    training volumes')."""
    import logging

    images = [tmp_path / "pt_1_ct.nii.gz", tmp_path / "pt_2_ct.nii.gz"]
    rule = {"images": "(pt_[0-9]+)_ct[.]nii[.]gz", "labels": "oar/\\1_oar.nii.gz", "names": {1: "Brainstem"}}
    with caplog.at_level(logging.WARNING, logger="samembed"):
        assert find_label_maps(images, [rule], [], tmp_path) == {}
    assert "2 of the label maps semantic_labels names do not exist" in caplog.text
    assert str(tmp_path / "oar" / "pt_1_oar.nii.gz") in caplog.text
