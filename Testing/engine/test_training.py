"""Training: losses computed by hand, gradient directions, every objective runs, resume, determinism, DDP."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samembed.errors import InputError
from samembed.training.config import load_config
from samembed.training.losses import info_nce, mine_hard_negatives, multi_positive_info_nce
from samembed.training.objectives import (
    isimed_loss,
    kd_parts,
    parse_objective,
    pruned_info_nce,
    sal_alignment,
    variance_hinge,
)

from ..conftest import ctrl_c_as_in_a_terminal, data_file


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# ------------------------------------------------------------------------------- hand-computed cases
def test_info_nce_matches_a_hand_computation():
    a, p = unit([1, 0]), unit([1, 0])
    negs = unit([0, 1], [-1, 0]).unsqueeze(0)
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0) + math.exp(-1 / 0.5)))
    assert info_nce(a, p, negs, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_multi_positive_info_nce_matches_a_hand_computation():
    a = unit([1, 0])
    cands = unit([1, 0], [0.6, 0.8], [0, 1])
    pos = torch.tensor([[True, True, False]])
    s = torch.tensor([1.0, 0.6, 0.0]) / 0.5
    expected = -(torch.logsumexp(s[:2], 0) - torch.logsumexp(s, 0)).item()
    assert multi_positive_info_nce(a, cands, pos, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_hard_negative_mining_skips_the_ignore_radius_and_takes_the_most_similar():
    sim = torch.tensor([[0.99, 0.9, 0.1, 0.8, 0.2]])
    dist = torch.tensor([[0.0, 3.0, 50.0, 40.0, 60.0]])
    idx = mine_hard_negatives(sim, dist, ignore_radius_mm=5.0, num_hard=2, num_keep=2)
    assert sorted(idx[0].tolist()) == [3, 4]  # 0 and 1 are inside the radius; 3 (0.8) and 4 (0.2) hardest


def test_isimed_loss_is_zero_when_embedding_distances_equal_scaled_physical_distances():
    pos_a = torch.tensor([[0.0, 0.0, 0.0]])
    pos_b = torch.tensor([[0.0, 0.0, 50.0], [0.0, 0.0, 100.0]])
    ea = unit([1, 0])
    # distances 0.5 and 1.0 for a scale of 100 mm: chord lengths of angles 2*asin(d/2)
    eb = torch.stack([torch.tensor([math.cos(2 * math.asin(d / 2)), math.sin(2 * math.asin(d / 2))]) for d in (0.5, 1.0)])
    assert isimed_loss(ea, eb, pos_a, pos_b, 100.0).item() == pytest.approx(0.0, abs=1e-10)
    assert isimed_loss(ea, ea.expand(2, 2), pos_a, pos_b, 100.0).item() == pytest.approx((0.25 + 1.0) / 2, rel=1e-5)


def test_the_purposive_pruner_drops_bank_negatives_at_or_above_the_threshold():
    a, p = unit([1, 0]), unit([1, 0])
    bank = unit([1, 0.1], [0, 1])  # first is ~0.995 similar: a false negative
    pruned_loss, frac = pruned_info_nce(a, p, bank, 0.5, threshold=0.8)
    full_loss, _ = pruned_info_nce(a, p, bank, 0.5, threshold=None)
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    assert frac == pytest.approx(0.5) and pruned_loss.item() == pytest.approx(expected, rel=1e-6)
    assert full_loss.item() > pruned_loss.item()


def test_the_anatomy_decomposer_splits_into_equal_parts_on_alternating_axes():
    pts = torch.tensor([[z, y, 0.0] for z in range(4) for y in range(4)])
    parts = kd_parts(pts, 2)
    assert len(parts.unique()) == 4 and all((parts == p).sum() == 4 for p in parts.unique())
    assert parts[(pts[:, 0] < 2) & (pts[:, 1] < 2)].unique().numel() == 1


def test_sal_alignment_finds_a_shifted_copy_inside_the_window():
    f0 = F.normalize(torch.randn(8, 6, 6, generator=torch.Generator().manual_seed(0)), dim=0)
    f1 = torch.roll(f0, shifts=1, dims=2)  # shifted one pixel in x
    assert sal_alignment(f0, f1, window=1).item() < 0.2  # most pixels find their copy
    assert sal_alignment(f0, f1, window=0).item() > sal_alignment(f0, f1, window=1).item()


def test_the_variance_term_penalises_collapse_and_not_spread_features():
    collapsed = torch.ones(4, 100)
    spread = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert variance_hinge(collapsed).item() == pytest.approx(0.1 - math.sqrt(1e-6), abs=1e-6)
    assert variance_hinge(spread).item() == 0.0


# ------------------------------------------------------------------------------- gradient directions
def test_a_gradient_step_on_info_nce_pulls_the_anchor_toward_its_positive():
    a = torch.tensor([[1.0, 0.3]], requires_grad=True)
    p, negs = unit([0, 1]), unit([1, 0]).unsqueeze(0)
    before = (F.normalize(a, dim=1) * p).sum().item()
    info_nce(F.normalize(a, dim=1), p, negs, 0.5).backward()
    with torch.no_grad():
        a2 = a - 0.1 * a.grad
    assert (F.normalize(a2, dim=1) * p).sum().item() > before


def test_a_gradient_step_on_isimed_moves_embeddings_apart_when_points_are_far():
    ea = torch.tensor([[1.0, 0.0]], requires_grad=True)
    eb = unit([1, 0.05])
    isimed_loss(F.normalize(ea, dim=1), eb, torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 100.0]]), 100.0).backward()
    with torch.no_grad():
        ea2 = F.normalize(ea - 0.5 * ea.grad, dim=1)
    assert torch.dist(ea2, eb) > torch.dist(F.normalize(ea.detach(), dim=1), eb)


def test_objective_strings_are_parsed_and_checked():
    assert parse_objective("sam+isimed:0.5") == [("sam", 1.0), ("isimed", 0.5)]
    with pytest.raises(InputError, match="unknown objective 'simclr'"):
        parse_objective("sam+simclr")


# ------------------------------------------------------------------------------- runs on real data
def tiny_config(tmp_path: Path, objective: str, **extra):
    data_file("ct", "totalsegmentator", "ts_dicom_example_ct.nii.gz")
    root = data_file("ct", "totalsegmentator")
    overrides = [f"data=[\"{root}\"]", 'exclude=["*_seg_*"]', f"cache_dir=\"{tmp_path / 'cache'}\"",
                 f"out_dir=\"{tmp_path / 'run'}\"", "iterations=3", "checkpoint_every=2", "local_size=32", "global_size=24",
                 "batch_volumes=2", "anchors=32", "num_hard=64", "num_negatives=32", "global_candidates=32",
                 f"objective=\"{objective}\"", "threads=1", 'net_config={"widths": [8, 16, 16], "global_widths": [8, 16, 16, 16], "fpn_channels": 8, "local_channels": 16, "global_channels": 16}']
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.mark.needs_data
@pytest.mark.parametrize("objective", ["sam", "isimed", "adam", "sal", "sam+isimed:0.5", "sam+sal:0.5"])
def test_every_objective_trains_and_writes_a_usable_checkpoint(tmp_path, objective):
    from samembed.models import load_model
    from samembed.training.train import Trainer

    cfg = tiny_config(tmp_path, objective)
    final = Trainer(cfg, progress=False).run()
    model = load_model(str(final))
    assert model.model_id.startswith("sam-lite-ct@")
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    losses = [float(r.split(",")[1]) for r in log[1:]]  # nan: an iteration without a view pair on the body
    assert len(losses) == 3 and any(np.isfinite(losses)) and all(np.isfinite(v) or np.isnan(v) for v in losses)
    assert (tmp_path / "run" / "loss_curve.png").is_file()


@pytest.mark.needs_data
def test_a_new_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(tmp_path):
    from samembed.errors import InputError
    from samembed.training.train import Trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.csv").write_text("iteration,loss\n1,0.5\n")
    (run / "last.pt").write_bytes(b"an earlier run's checkpoint")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(InputError, match="already holds a training run .*train_log.csv, last.pt.*--resume"):
        Trainer(tiny_config(tmp_path, "sam"), progress=False).run()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # a finished run whose last.pt was cleaned away (it holds the optimiser's state): --resume auto started anew and
    # replaced its model and log without a word (a review)
    (run / "last.pt").unlink()
    (run / "sam-lite-ct.pt").write_bytes(b"the finished run's model")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(InputError, match="--resume auto finds no last.pt to continue from, and the folder holds a "
                                         r"training run \(train_log.csv, sam-lite-ct.pt\)"):
        Trainer(tiny_config(tmp_path, "sam"), progress=False).run(resume="auto")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.needs_data
def test_training_is_deterministic_and_resumes_where_it_stopped(tmp_path):
    from samembed.training.train import Trainer

    a = Trainer(tiny_config(tmp_path / "a", "sam"), progress=False)
    a.run()
    b = Trainer(tiny_config(tmp_path / "b", "sam"), progress=False)
    b.run()
    la = (tmp_path / "a" / "run" / "train_log.csv").read_text().splitlines()
    lb = (tmp_path / "b" / "run" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in la] == [r.split(",")[1] for r in lb]  # same losses
    # resume from the iteration-2 checkpoint: iteration 3 reproduces the uninterrupted run
    c = Trainer(tiny_config(tmp_path / "c", "sam"), progress=False)
    c.cfg.out_dir = str(tmp_path / "c" / "run")
    (tmp_path / "c" / "run").mkdir(parents=True)
    import shutil

    shutil.copy(tmp_path / "a" / "run" / "last.pt", tmp_path / "c" / "resume.pt")
    ck = torch.load(tmp_path / "c" / "resume.pt", weights_only=True)
    assert ck["iteration"] == 3
    c.cfg.iterations = 4
    c.run(resume=str(tmp_path / "c" / "resume.pt"))
    lc = (tmp_path / "c" / "run" / "train_log.csv").read_text().splitlines()
    assert lc[-1].split(",")[0] == "4"


@pytest.mark.needs_data
def test_a_corrupt_volume_is_skipped_not_fatal(tmp_path):
    from samembed.preprocess import PreprocessConfig
    from samembed.training.data import find_volumes, prepare_cache

    good = data_file("ct", "totalsegmentator", "ts_dicom_example_ct.nii.gz")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    files = prepare_cache(find_volumes([str(good), str(bad)]), tmp_path / "cache", PreprocessConfig(fill="air"))
    assert len(files) == 1
    # a cache entry cut short, or its sidecar damaged, is made again, not trusted (it failed later, unnamed)
    whole = files[0].read_bytes()
    for damage in (lambda: files[0].write_bytes(whole[:len(whole) // 2]),
                   lambda: files[0].with_suffix(".json").write_text("{not json")):
        damage()
        again = prepare_cache(find_volumes([str(good)]), tmp_path / "cache", PreprocessConfig(fill="air"))
        assert again == files and files[0].read_bytes() == whole


@pytest.mark.needs_data
@pytest.mark.slow
def test_distributed_training_with_two_cpu_processes(tmp_path):
    cfg = tiny_config(tmp_path, "sam")
    import yaml

    cfg_path = tmp_path / "ddp.yaml"
    d = cfg.to_dict()
    d["iterations"] = 2
    cfg_path.write_text(yaml.safe_dump(d))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "samembed.cli", "train", "--config", str(cfg_path), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "sam-lite-ct.pt").is_file()
    # each process's random states are in the resume checkpoint (every process restored the first one's, so after
    # a resume both drew the same samples)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert isinstance(ck["rng_numpy"], list) and len(ck["rng_numpy"]) == len(ck["rng_torch"]) == 2
    assert ck["rng_numpy"][0] != ck["rng_numpy"][1]
    # a resume by more processes than saved it: every process stops with the reason (one that stopped alone left
    # the others waiting)
    d["iterations"] = 3
    cfg_path.write_text(yaml.safe_dump(d))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                          "-m", "samembed.cli", "train", "--config", str(cfg_path), "--quiet", "--resume"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode != 0 and "saved by a run of 2 process(es); resume it with at most that many" in res.stderr


@pytest.mark.needs_data
def test_an_interrupted_run_resumed_with_auto_follows_the_uninterrupted_schedule(tmp_path, monkeypatch):
    from samembed.training.train import Trainer

    Trainer(tiny_config(tmp_path / "a", "sam", iterations=4, warmup=2, snapshot_every=2), progress=False).run()
    snaps = sorted(p.name for p in (tmp_path / "a" / "run" / "snapshots").iterdir())
    assert snaps == ["it_000002.pt", "it_000004.pt"]  # weights-only copies for the error-vs-training-time curve
    b_cfg = tiny_config(tmp_path / "b", "sam", iterations=4, warmup=2)
    real = Trainer.compute_loss

    def interrupted(self, *args):  # the session ends during iteration 3 (after the iteration-2 checkpoint)
        if self._iteration == 2:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(Trainer, "compute_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(b_cfg, progress=False).run(resume="auto")
    monkeypatch.setattr(Trainer, "compute_loss", real)
    Trainer(tiny_config(tmp_path / "b", "sam", iterations=4, warmup=2), progress=False).run(resume="auto")

    def rows(run):  # iteration, loss, learning rate
        lines = (tmp_path / run / "run" / "train_log.csv").read_text().splitlines()[1:]
        return [(r.split(",")[0], r.split(",")[1], r.split(",")[4]) for r in lines]

    assert rows("b") == rows("a")
    assert [r[0] for r in rows("b")] == ["1", "2", "3", "4"]
    cpu = [float(r.split(",")[6]) for r in (tmp_path / "b" / "run" / "train_log.csv").read_text().splitlines()[1:]]
    assert cpu == sorted(cpu)  # CPU time adds up across the two processes of the run


@pytest.mark.needs_data
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_training_after_the_iteration_with_its_checkpoint(tmp_path, monkeypatch, signum):
    """A stop during iteration 3 (the checkpoints come every 2) lets the iteration finish and saves it: nothing is
    lost, and --resume auto gives the uninterrupted run's iterations, losses and learning rates. Before, Ctrl-C
    lost iteration 3 (the run went on from the checkpoint of iteration 2) and SIGTERM killed the process."""
    from samembed.stopping import Terminated
    from samembed.training.train import Trainer

    Trainer(tiny_config(tmp_path / "a", "sam", iterations=4, warmup=2), progress=False).run()
    real = Trainer.compute_loss

    def signalled(self, *args):
        if self._iteration == 2:
            os.kill(os.getpid(), signum)  # noted now; the stop comes after the iteration
        return real(self, *args)

    monkeypatch.setattr(Trainer, "compute_loss", signalled)
    with ctrl_c_as_in_a_terminal():
        before = signal.getsignal(signum)
        with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
            Trainer(tiny_config(tmp_path / "b", "sam", iterations=4, warmup=2), progress=False).run(resume="auto")
        assert signal.getsignal(signum) is before  # the training's handlers are gone with it
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["iteration"] == 3
    monkeypatch.setattr(Trainer, "compute_loss", real)
    Trainer(tiny_config(tmp_path / "b", "sam", iterations=4, warmup=2), progress=False).run(resume="auto")

    def rows(run):  # iteration, loss, learning rate
        lines = (tmp_path / run / "run" / "train_log.csv").read_text().splitlines()[1:]
        return [(r.split(",")[0], r.split(",")[1], r.split(",")[4]) for r in lines]

    assert rows("b") == rows("a") and [r[0] for r in rows("b")] == ["1", "2", "3", "4"]


@pytest.mark.needs_data
def test_a_stop_during_the_last_iteration_lets_the_run_finish(tmp_path, monkeypatch):
    """The last iteration ends the run anyway: a signal during it does not stop it short of its final model."""
    from samembed.training.train import Trainer

    real = Trainer.compute_loss

    def signalled(self, *args):
        if self._iteration == 2:  # the third and last
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args)

    monkeypatch.setattr(Trainer, "compute_loss", signalled)
    with ctrl_c_as_in_a_terminal():
        final = Trainer(tiny_config(tmp_path, "sam"), progress=False).run()
    assert torch.load(final, weights_only=True)["iteration"] == 3


@pytest.mark.needs_data
def test_a_new_run_starts_from_init_from_weights_and_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    from samembed.models import load_model
    from samembed.training.train import Trainer

    a = Trainer(tiny_config(tmp_path / "a", "sam"), progress=False).run()
    # lr 0: the parameters stay where they started, so they equal the init_from checkpoint's (norm layers'
    # running statistics still move in training mode, so only parameters are compared)
    b = Trainer(tiny_config(tmp_path / "b", "sam", iterations=1, lr=0.0, init_from=f'"{a}"'), progress=False).run(resume="auto")
    wa, wb = dict(load_model(str(a)).net.named_parameters()), dict(load_model(str(b)).net.named_parameters())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = Trainer(tiny_config(tmp_path / "c", "sam", iterations=1, lr=0.0), progress=False).run(resume="auto")
    wc = dict(load_model(str(c)).net.named_parameters())
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        Trainer(tiny_config(tmp_path / "d", "sam"), progress=False).run(resume=str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------------------ bad settings, resumes
def test_a_config_s_settings_are_checked_by_type_and_range_naming_the_file(tmp_path):
    """From a helper's audit: ``exclude: pt_103_ct.nii.gz`` (one string) was read as its characters and excluded
    nothing (a held-out patient trained on); ``--set exclude=pt_103*`` excluded everything; a string lr, a zero
    batch or a fill of "banana" failed minutes later as internal errors, or not at all."""
    from samembed.errors import InputError
    from samembed.training.config import load_config

    def config(text: str, overrides=()):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return load_config(path, list(overrides))

    assert config("exclude: pt_103_ct.nii.gz\n").exclude == ["pt_103_ct.nii.gz"]
    # a key left empty (its entries commented out) is an empty list or mapping, as before the checks
    empty = config("exclude:\n#  - pt_1*\nnet_config:\nsemantic_labels:\n")
    assert (empty.exclude, empty.net_config, empty.semantic_labels) == ([], {}, [])
    assert config("", ["exclude=pt_103*"]).exclude == ["pt_103*"]
    assert config("data: /data/ct\nlr: 1e-3\n").data == ["/data/ct"]
    assert config("lr: 1e-3\n").lr == 0.001  # YAML reads 1e-3 as a string
    for text, message in (("lr: fast\n", "lr must be a number, not 'fast'"),
                          ("iterations: 2.5\n", "iterations must be a whole number"),
                          ("iterations: 0\n", "iterations must be at least 1, not 0"),
                          ("batch_volumes: -1\n", "batch_volumes must be at least 1"),
                          ("fill: banana\n", "fill must be one of zero, air, not 'banana'"),
                          ("warmup: -3\n", "warmup must be 0 or more"),
                          ("scale_range: [1.2, 0.8]\n", "scale_range must be two numbers 0 < low <= high"),
                          ("freeze_global: yes please\n", "freeze_global must be true or false"),
                          ("iteraions: 10\n", r"unknown settings iteraions \(did you mean iterations\?\)"),
                          ("lr: [1\n", "c.yaml: not a valid YAML file"),
                          ("hello\n", "c.yaml: a training config is a mapping of settings")):
        with pytest.raises(InputError, match=message):
            config(text)


@pytest.mark.needs_data
def test_a_resume_refuses_a_checkpoint_of_other_settings_final_weights_and_a_damaged_file(tmp_path):
    """A resume with another data, objective or lr went on silently (the run's weights then came from two
    recipes); final weights gave a KeyError, a truncated last.pt torch's words without the file."""
    from samembed.errors import InputError
    from samembed.training.train import Trainer

    final = Trainer(tiny_config(tmp_path, "sam", iterations=2), progress=False).run()
    last = tmp_path / "run" / "last.pt"
    with pytest.raises(InputError, match=r"was trained with other settings \(lr: 0.001 -> 0.01; objective: 'sam' -> "
                                         r"'sam\+isimed:0.5'\)"):
        Trainer(tiny_config(tmp_path, "sam+isimed:0.5", iterations=4, lr=0.01), progress=False).run(resume="auto")
    with pytest.raises(InputError, match="not a resume checkpoint"):
        Trainer(tiny_config(tmp_path, "sam", iterations=4), progress=False).run(resume=str(final))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(InputError, match=f"{damaged}: not a readable training checkpoint"):
        Trainer(tiny_config(tmp_path, "sam", iterations=4), progress=False).run(resume=str(damaged))
    # a checkpoint written before the settings were checked holds them as the file had them ("1e-3", a string
    # where a list is wanted): the same settings, so its run resumes
    from samembed.training.train import _same_setting

    assert _same_setting("1e-3", 0.001) and _same_setting("pt_1*", ["pt_1*"]) and not _same_setting("x", 1.0)
    assert _same_setting(None, []) and _same_setting(None, {}) and not _same_setting(None, ["x"])
    # how long it runs may change: 2 more iterations
    Trainer(tiny_config(tmp_path, "sam", iterations=4, checkpoint_every=1), progress=False).run(resume="auto")
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2", "3", "4"]


@pytest.mark.needs_data
def test_a_resume_after_a_kill_logs_each_iteration_once_and_keeps_the_adam_bank_and_the_clock(tmp_path):
    """A run killed between checkpoints left log rows after its last.pt: the resume logged those iterations
    twice. The adam objective's memory bank and the run's clock (schedule_by_time, time_limit_min) were not saved,
    so a resumed run drew other negatives and restarted its learning rate and its time budget."""
    from samembed.training.train import Trainer

    Trainer(tiny_config(tmp_path, "sam+adam:0.5", iterations=2), progress=False).run()
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["adam_bank"].shape[0] > 0 and ck["clock_seconds"] > 0
    log_csv = tmp_path / "run" / "train_log.csv"
    header, *rows = log_csv.read_text().splitlines()
    log_csv.write_text("\n".join([header, *rows, "3,9,9,9,0.001,1,1" + ",0" * (len(header.split(",")) - 7)]) + "\n")
    Trainer(tiny_config(tmp_path, "sam+adam:0.5", iterations=3), progress=False).run(resume="auto")
    iterations = [r.split(",")[0] for r in log_csv.read_text().splitlines()[1:]]
    assert iterations == ["1", "2", "3"] and "3,9,9,9" not in log_csv.read_text()

    # a run that met its time limit, scheduled by time: a resume restarted its learning rate at the full rate (and
    # the time budget with it); the clock is kept, so the resume finds the budget used up and runs nothing (it ran
    # one more iteration past the limit, and rewrote the final model: a review)
    timed = dict(iterations=1000, time_limit_min=0.005, schedule_by_time="true", warmup=1, checkpoint_every=1000)
    final = Trainer(tiny_config(tmp_path / "t", "sam", **timed), progress=False).run()
    timed_log = tmp_path / "t" / "run" / "train_log.csv"
    logged, written = timed_log.read_text(), final.read_bytes()
    assert Trainer(tiny_config(tmp_path / "t", "sam", **timed), progress=False).run(resume="auto") == final
    assert timed_log.read_text() == logged and final.read_bytes() == written


@pytest.mark.needs_data
def test_a_diverged_run_stops_naming_the_iteration_and_writes_no_weights(tmp_path):
    from samembed.errors import InputError
    from samembed.training.train import Trainer

    with pytest.raises(InputError, match=r"(the loss is nan at|the weights are not finite after) iteration \d+: "
                                         r"training diverged \(lower lr"):
        Trainer(tiny_config(tmp_path, "sam", iterations=30, lr=1e6, warmup=1), progress=False).run()
    assert not (tmp_path / "run" / "sam-lite-ct.pt").exists()


@pytest.mark.needs_data
def test_an_iteration_without_a_view_pair_on_the_body_takes_no_step_and_logs_no_loss(tmp_path, monkeypatch, caplog):
    """A batch whose view pairs did not overlap on the body gave a zero loss: the log said 0 (a perfect loss) and
    AdamW still stepped (weight decay, old momentum)."""
    from samembed.training import train

    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    real = train.pair_points
    calls = []

    def every_other(*args, **kwargs):  # the first iteration's pairs have no overlap, the second's do
        calls.append(1)
        return None if len(calls) <= 2 else real(*args, **kwargs)

    monkeypatch.setattr(train, "pair_points", every_other)
    with caplog.at_level("WARNING", logger="samembed.training.train"):
        train.Trainer(tiny_config(tmp_path, "sam", iterations=2), progress=False).run()
    rows = [r.split(",") for r in (tmp_path / "run" / "train_log.csv").read_text().splitlines()[1:]]
    assert rows[0][1:4] == ["nan", "nan", "nan"] and np.isfinite(float(rows[1][1]))
    assert len(steps) == 1  # the second iteration only
    assert "iteration 1 drew no view pair that overlaps on the body: no step taken" in caplog.text
    assert "1 of the 2 iterations of this run drew no view pair" in caplog.text
    assert (tmp_path / "run" / "loss_curve.png").is_file()


@pytest.mark.needs_data
def test_what_is_wrong_besides_the_data_and_a_folder_in_use_are_found_before_the_data_are_prepared(tmp_path):
    import fcntl

    from samembed.errors import InputError
    from samembed.training.train import Trainer

    (tmp_path / "file").write_text("x")
    for extra, message in (({"out_dir": f'"{tmp_path / "file"}"'}, "out_dir .*: is a file, expected a folder"),
                           ({"cache_dir": f'"{tmp_path / "file"}"'}, "cache_dir .*: is a file, expected a folder"),
                           ({"net_config": '{"widths": [8]}'}, "does not fit arch sam-lite"),
                           # a distill teacher missing, or of other embedding sizes, failed at iteration 1, after the
                           # data were prepared, and left a log that refused the folder (a training review)
                           ({"objective": '"sam+distill"', "distill_teacher": f'"{tmp_path / "none.pt"}"'},
                            "none.pt"),
                           ({"objective": '"sam+distill"'}, "embedding sizes .* differ from the student's")):
        objective = extra.pop("objective", '"sam"').strip('"')
        with pytest.raises(InputError, match=message):
            Trainer(tiny_config(tmp_path, objective, **extra), progress=False).run()
        assert not (tmp_path / "cache").exists()  # nothing prepared
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+b") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another training run is using this folder"):
            Trainer(tiny_config(tmp_path, "sam"), progress=False).run(resume="auto")
    assert not (run / "train_log.csv").exists()


def test_training_images_none_of_which_can_be_read_are_an_input_error(tmp_path):
    from samembed.errors import InputError
    from samembed.training.config import load_config
    from samembed.training.train import Trainer

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.nii.gz").write_bytes(b"not an image")
    cfg = load_config(None, [f'data=["{tmp_path / "data"}"]', f'cache_dir="{tmp_path / "cache"}"',
                             f'out_dir="{tmp_path / "run"}"', "iterations=2", "threads=1"])
    with pytest.raises(InputError, match="none of the 1 training images found could be read"):
        Trainer(cfg, progress=False).run()


@pytest.mark.needs_data
def test_a_training_leaves_torchs_threads_determinism_and_random_state_as_they_were(tmp_path):
    """``Trainer.run()`` set torch's thread count, deterministic mode and seed for the rest of the caller's process
    (a notebook that trains, then works on: a review)."""
    from samembed.training.train import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    trainer = Trainer(tiny_config(tmp_path, "sam"), progress=False)  # (threads=1 in its config)
    state = torch.random.get_rng_state()
    try:
        trainer.run()
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.set_num_threads(threads)


def test_training_inputs_a_review_found_wrong_are_refused_or_read_as_meant(tmp_path, caplog):
    """From a review of the training command: a changed DICOM series or .raw kept its old cached copy; an exclude
    path of folders, or a list as the shell leaves it ([*_seg_*]), excluded nothing (label maps trained on); --set
    given twice dropped the first; negative loss weights, an infinite lr, objective weights of -1 or nan, a list of
    numbers and a name with a folder were taken (the last failed after the whole run)."""
    from samembed.cli import build_parser
    from samembed.errors import InputError
    from samembed.preprocess import PreprocessConfig
    from samembed.training.config import load_config
    from samembed.training.data import _cache_key, find_volumes
    from samembed.training.objectives import parse_objective

    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"a" * 10)
    header = tmp_path / "vol.mhd"
    header.write_text("NDims = 3\nElementDataFile = vol.raw\n")
    (tmp_path / "vol.raw").write_bytes(b"b" * 10)
    keys = [_cache_key(p, PreprocessConfig(), "auto") for p in (series, header)]
    import os
    import time

    later = time.time() + 5
    (series / "1.dcm").write_bytes(b"c" * 11)
    (tmp_path / "vol.raw").write_bytes(b"d" * 12)
    os.utime(series / "1.dcm", (later, later))
    assert [_cache_key(p, PreprocessConfig(), "auto") for p in (series, header)] != keys
    assert all(a != b for a, b in zip(keys, [_cache_key(p, PreprocessConfig(), "auto") for p in (series, header)]))

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a_ct.nii.gz", "a_seg_total.nii.gz", "b_ct.nii.gz"):
        (data / name).write_bytes(b"")
    work = tmp_path / "work"
    work.mkdir()
    found = find_volumes(["../data"], ["../data/b_ct.nii.gz", "*_seg_*"], base=work)
    assert [p.name for p in found] == ["a_ct.nii.gz"]
    with caplog.at_level("WARNING", logger="samembed.training.data"):
        find_volumes(["../data"], ["*_nothing_*"], base=work)
    assert any("'*_nothing_*' matched none of the 3 files found" in r.getMessage() for r in caplog.records)

    assert load_config(None, ["exclude=[*_seg_*, 'pt_1*']"]).exclude == ["*_seg_*", "pt_1*"]
    args = build_parser().parse_args(["train", "--set", "lr=5e-4", "seed=7", "--set", "batch_volumes=8"])
    assert args.set == ["lr=5e-4", "seed=7", "batch_volumes=8"]
    for override, message in (("global_weight=-1", "global_weight must be 0 or more"),
                              ("lr=Infinity", "lr must be a finite number"),
                              ("exclude=[1, 2]", "exclude must be a list of texts"),
                              ("name=sub/model", "name must be a plain file name")):
        with pytest.raises(InputError, match=message):
            load_config(None, [override])
    for objective in ("sam:-1", "sam:nan", "sam+isimed:inf", "sam:0"):
        with pytest.raises(InputError, match="must be a finite number > 0"):
            parse_objective(objective)


@pytest.mark.needs_data
def test_a_step_to_non_finite_weights_stops_the_run_before_they_are_saved(tmp_path, monkeypatch):
    """The loss was checked before each step only: a step to non-finite weights (lr=Infinity, taken then) was saved
    in last.pt, which the error then offered as the run's last state (a review). Here the second step overflows (an
    iteration without a view pair on the body takes none: the iteration is counted apart)."""
    from samembed.errors import InputError
    from samembed.training.train import Trainer

    step = torch.optim.AdamW.step
    steps = []

    def overflowing(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    with pytest.raises(InputError, match=r"weights are not finite after iteration \d") as raised:
        Trainer(tiny_config(tmp_path, "sam", checkpoint_every=1), progress=False).run()
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()[1:]
    stepped = [r for r in rows if r.split(",")[1] != "nan"]
    assert len(stepped) == 1 and f"after iteration {len(rows) + 1}" in str(raised.value)  # after the second step, not logged
    last = tmp_path / "run" / "last.pt"
    if last.exists():
        state = torch.load(last, weights_only=True)
        weights = state.get("model") or state.get("state_dict") or {}
        assert all(torch.isfinite(v).all() for v in weights.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.needs_data
def test_a_refused_resume_or_a_missing_init_from_is_said_before_the_data_are_prepared(tmp_path):
    """``_check_before_data`` promised that what can be wrong besides the data is found first, but a resume of
    other settings and a missing ``init_from`` were refused only after every image was preprocessed (minutes on the
    real set; a review). The final model now names its training files too, not only their cache stems."""
    from samembed.errors import InputError
    from samembed.training.train import Trainer

    final = Trainer(tiny_config(tmp_path / "a", "sam"), progress=False).run()
    sources = torch.load(final, weights_only=True)["training_sources"]
    assert sources and all(Path(s).is_file() for s in sources), sources
    cache = tmp_path / "fresh_cache"
    other = tiny_config(tmp_path / "a", "sam", lr=0.5, cache_dir=f'"{cache}"')
    with pytest.raises(InputError, match="was trained with other settings"):
        Trainer(other, progress=False).run(resume="auto")
    assert not cache.exists() or not any(cache.iterdir())
    missing = tiny_config(tmp_path / "b", "sam", init_from='"no/such.pt"', cache_dir=f'"{cache}"')
    with pytest.raises(InputError, match="init_from: no/such.pt: no such checkpoint file or registered model"):
        Trainer(missing, progress=False).run()
    assert not cache.exists() or not any(cache.iterdir())


def test_a_loss_curve_of_iterations_without_a_step_says_so(tmp_path, monkeypatch):
    """Every iteration logged nan (no view pair on the body, in a short run): the curve was empty, with matplotlib's
    warning of a legend without lines."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from samembed.training import train as training

    log_csv = tmp_path / "train_log.csv"
    log_csv.write_text("iteration,loss,local,global\n1,nan,nan,nan\n2,nan,nan,nan\n")
    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **k):
        drawn.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training.plot_loss_curve(log_csv, tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert drawn == ["no step in 2 iteration(s): each logged nan\n(its views met nowhere on the body)"]


@pytest.mark.needs_data
def test_resumes_a_review_found_wrong_are_refused_or_left_alone(tmp_path, caplog):
    """A training review: a finished run resumed again rewrote its final model (its wall time 0); a checkpoint past
    ``iterations`` was accepted (``train 13/10``); another folder's checkpoint resumed into a folder holding a run
    mixed the two runs' logs and checkpoints; a changed ``iterations`` moved the learning rate without a word; and a
    run that failed at its first iteration left a log of its header alone, which refused every later run there."""
    import shutil

    from samembed.errors import InputError
    from samembed.training.train import Trainer

    cfg = tiny_config(tmp_path, "sam")
    run = tmp_path / "run"
    final = Trainer(cfg, progress=False).run()
    written = final.read_bytes()
    with caplog.at_level("WARNING", logger="samembed.training.train"):
        assert Trainer(cfg, progress=False).run(resume="auto") == final
    assert final.read_bytes() == written and "the run is finished (all its 3 iterations are done)" in caplog.text
    with pytest.raises(InputError, match=r"at iteration 3, past iterations 2; give --iterations 3 or more"):
        Trainer(tiny_config(tmp_path, "sam", iterations=2), progress=False).run(resume="auto")
    # another run's folder: refused, nothing changed
    other = tmp_path / "other"
    other.mkdir()
    (other / "train_log.csv").write_text("iteration,loss\n1,0.5\n")
    with pytest.raises(InputError, match="another folder's checkpoint"):
        Trainer(tiny_config(tmp_path, "sam", out_dir=f'"{other}"', iterations=5), progress=False).run(
            resume=str(run / "last.pt"))
    assert (other / "train_log.csv").read_text() == "iteration,loss\n1,0.5\n"
    # a log of its header alone is no run: continued there, with the schedule's change said
    (other / "train_log.csv").write_text("iteration,loss,local,global,lr,seconds,cpu_seconds\n")
    shutil.copy(run / "last.pt", tmp_path / "from.pt")
    caplog.clear()
    with caplog.at_level("WARNING", logger="samembed.training.train"):
        Trainer(tiny_config(tmp_path, "sam", out_dir=f'"{other}"', iterations=5), progress=False).run(
            resume=str(tmp_path / "from.pt"))
    assert re.search(r"iterations 3 -> 5: the learning rate's cosine schedule .* goes from \S+ to \S+ at iteration 4",
                     caplog.text), caplog.text
    assert (other / "train_log.csv").read_text().splitlines()[-1].split(",")[0] == "5"


@pytest.mark.needs_data
def test_a_run_in_which_no_iteration_took_a_step_is_refused_and_writes_no_model(tmp_path, monkeypatch):
    """Views too small for any pair to overlap on the body: every iteration took no step, and the run wrote its
    starting weights as the trained model and exited 0 (a review)."""
    from samembed.errors import InputError
    from samembed.training import train

    monkeypatch.setattr(train, "pair_points", lambda *a, **k: None)
    cfg = tiny_config(tmp_path, "sam", iterations=3)
    with pytest.raises(InputError, match=r"none of the 3 iterations drew a view pair .* \(local_size 32, "):
        train.Trainer(cfg, progress=False).run()
    assert not (tmp_path / "run" / f"{cfg.name}.pt").exists()


@pytest.mark.needs_data
def test_non_finite_batch_norm_statistics_stop_the_run_before_they_are_saved(tmp_path, monkeypatch):
    """Only the parameters were checked: a diverged run's batch norms' running variance (buffers) went to last.pt as
    inf, which the error offered as the run's last state (a review)."""
    from samembed.errors import InputError
    from samembed.training.train import Trainer

    forward = torch.nn.modules.batchnorm._BatchNorm.forward
    calls = []

    def overflowing(self, x):
        calls.append(1)
        if self.training and len(calls) > 40:  # in a later iteration (before the forward: autograd keeps its input)
            self.running_var.fill_(float("inf"))
        return forward(self, x)

    monkeypatch.setattr(torch.nn.modules.batchnorm._BatchNorm, "forward", overflowing)
    with pytest.raises(InputError, match=r"weights are not finite after iteration \d.*init_from"):
        Trainer(tiny_config(tmp_path, "sam", checkpoint_every=1, iterations=6), progress=False).run()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_hang_up_stops_between_steps_where_it_would_end_the_process():
    """A closed terminal or a dropped SSH session (SIGHUP) ended a training run at once, losing the iterations since
    its checkpoint (a review); it is now noted as Ctrl-C is. Under nohup (ignored) it is left alone."""
    import os

    from samembed.stopping import StopBetweenSteps

    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with StopBetweenSteps() as stopping:
            os.kill(os.getpid(), signal.SIGHUP)
            assert stopping.requested == signal.SIGHUP
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with StopBetweenSteps():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.needs_data
def test_a_run_writes_a_training_record_of_its_chunks_data_licences_and_settings(tmp_path, monkeypatch):
    """No record of how a model was trained was written (a training review): its card had to be written by hand,
    and the data's licences, which a model trained on them must state, were nowhere. ``NAME.md`` now says it, over
    every chunk of a resumed run."""
    from samembed.training import record
    from samembed.training.train import Trainer

    monkeypatch.setattr(record.sys, "argv", ["/usr/bin/samembed", "train", "--config", "tiny.yaml"])
    Trainer(tiny_config(tmp_path, "sam", iterations=2), progress=False).run()
    monkeypatch.setattr(record.sys, "argv", ["/usr/bin/samembed", "train", "--resume", "auto", "--iterations", "4"])
    final = Trainer(tiny_config(tmp_path, "sam", iterations=4), progress=False).run(resume="auto")
    text = final.with_suffix(".md").read_text()
    import hashlib

    assert f"SHA-256 `{hashlib.sha256(final.read_bytes()).hexdigest()}`" in text
    assert "**Iterations:** 4 of the 4 planned, in 2 chunks" in text
    assert "| `samembed train --config tiny.yaml` | 1-2 |" in text
    assert "| `samembed train --resume auto --iterations 4` | 3-4 |" in text
    licence = record.source_licence(data_file("ct", "totalsegmentator").parent / "totalsegmentator")
    assert licence and "Apache-2.0" in licence and f"| 3 | {licence} |" in text
    assert "objective: sam\n" in text and "iterations: 4\n" in text  # the settings
    assert torch.load(final, weights_only=True)["chunks"][0]["last_iteration"] == 2
    assert record.source_licence(tmp_path) is None  # a folder without a SOURCE.md states none


def test_config_mistakes_a_review_found_late_or_silent_are_named_before_the_data(tmp_path):
    """A key given twice took the last value without a word; a semantic_labels rule whose regex does not compile
    ended in "internal error", and one without names failed, both after every volume was preprocessed; no volume
    found named neither folder (a training review)."""
    from samembed.errors import InputError
    from samembed.training.config import load_config
    from samembed.training.data import data_found

    with pytest.raises(InputError, match=r"lr 1e\+38 is beyond any rate that trains"):  # (an internal error)
        load_config(None, ["lr=1e38"])
    twice = tmp_path / "twice.yaml"
    twice.write_text("lr: 0.001\niterations: 5\nlr: 0.01\n")
    with pytest.raises(InputError, match=r"twice.yaml: not a valid YAML file: 'lr' is given twice"):
        load_config(twice)
    for rule, what in (('{images: "(ts_[a-z+_ct", labels: x, names: {1: a}}', "'images' is not a regular expression"),
                       ('{images: "ts_.*", labels: x}', "'names' missing")):
        bad = tmp_path / "rule.yaml"
        bad.write_text(f"semantic_labels:\n  - {rule}\n")
        with pytest.raises(InputError, match=re.escape(what)):
            load_config(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "a_seg_1.nii.gz").write_bytes(b"")
    assert data_found([str(empty), str(tmp_path / "some")], ["*_seg_*"]) == (
        f"{empty}: no image files; {tmp_path / 'some'}: 1 file, all excluded ('*_seg_*')")


@pytest.mark.needs_data
def test_a_resume_over_other_training_files_says_so(tmp_path, caplog):
    """A volume added to the data folder between a stop and its resume went into the run without a word (a
    review): the draws then differ from an uninterrupted run's, and the final model listed files the first
    iterations never saw."""
    from samembed.training.train import Trainer

    folder = tmp_path / "data"
    folder.mkdir()
    root = data_file("ct", "totalsegmentator")
    for name in ("ts_dicom_example_ct.nii.gz", "ts_example_ct_3mm.nii.gz"):
        (folder / name).symlink_to(root / name)
    Trainer(tiny_config(tmp_path, "sam", data=f'["{folder}"]', iterations=2), progress=False).run()
    (folder / "ts_aorta_report_ct_cropped.nii.gz").symlink_to(root / "ts_aorta_report_ct_cropped.nii.gz")
    with caplog.at_level("WARNING", logger="samembed.training.train"):
        Trainer(tiny_config(tmp_path, "sam", data=f'["{folder}"]', iterations=3), progress=False).run(resume="auto")
    assert ("the training files differ from the checkpoint's (1 added, e.g. ts_aorta_report_ct_cropped.nii.gz): "
            "the run goes on with the 3 found now") in caplog.text


@pytest.mark.needs_data
def test_a_killed_writes_leftovers_go_and_a_refused_run_leaves_no_folder(tmp_path):
    """A kill -9 during a save left its hidden temporary checkpoint in the run folder for ever; a run refused before
    it wrote anything left a folder holding its lock file alone (a training review)."""
    from samembed.errors import InputError
    from samembed.training.train import Trainer

    run = tmp_path / "run"
    Trainer(tiny_config(tmp_path, "sam", iterations=2, snapshot_every=1), progress=False).run()
    left = [run / ".last.pt.k3j2ab.tmp.pt", run / "snapshots" / ".it_000010.pt.x1y2z3.tmp.pt"]
    for f in left:  # as a run killed while saving leaves them
        f.write_bytes(b"partial")
    (run / "notes.tmp").write_text("mine")  # not a write of the run's: stays
    Trainer(tiny_config(tmp_path, "sam", iterations=3, snapshot_every=1), progress=False).run(resume="auto")
    assert not any(f.exists() for f in left) and (run / "notes.tmp").exists()
    fresh = tmp_path / "fresh"
    with pytest.raises(InputError, match="init_from"):
        Trainer(tiny_config(tmp_path, "sam", out_dir=f'"{fresh}"', init_from=f'"{tmp_path / "none.pt"}"'),
                progress=False).run()
    assert not fresh.exists()
