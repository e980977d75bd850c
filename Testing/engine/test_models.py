"""Loading models: the catalogue (``models.json``), checkpoint files and their int8 calibrations, refused by name
when they cannot be used as they are (a review of the model files)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from samembed.errors import CheckpointError, InputError
from samembed.models import load_checkpoint, load_model, save_checkpoint
from samembed.networks import build_network
from samembed.preprocess import PreprocessConfig
from samembed.quantize import qparams_path

from ..conftest import data_file

TINY = {"widths": [4, 8, 8], "global_widths": [4, 8, 8, 8], "fpn_channels": 4}


def tiny_checkpoint(path: Path, seed: int = 0, **extra) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(path, build_network("sam-lite", TINY), PreprocessConfig(fill="air"), name="tiny",
                           extra=extra or None)


def test_the_model_id_names_the_weights_that_were_loaded_when_the_file_is_replaced_meanwhile(tmp_path, monkeypatch):
    """The SHA-256 came from one read of the file and the weights from a second: a training run replacing it between
    the two gave the weights of one file the id (the embedding cache's key) of the other."""
    a, b = tiny_checkpoint(tmp_path / "a.pt", 0), tiny_checkpoint(tmp_path / "b.pt", 1)
    live = tmp_path / "live.pt"
    shutil.copy(a, live)
    real_load = torch.load

    def replaced_meanwhile(f, *args, **kwargs):
        os.replace(b, live)  # the run writes its next checkpoint now
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", replaced_meanwhile)
    loaded = load_checkpoint(live)
    monkeypatch.setattr(torch, "load", real_load)
    assert loaded.sha256 == load_checkpoint(a).sha256
    expected = load_checkpoint(a).net.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.net.state_dict().items())


def test_weights_that_are_not_finite_are_refused_naming_the_tensor(tmp_path):
    """A NaN weight gave NaN scores, and the matches were called confident."""
    torch.manual_seed(0)
    net = build_network("sam-lite", TINY)
    with torch.no_grad():
        net.l_stem[0].weight[0, 0, 0, 0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.pt", net, PreprocessConfig(fill="air"), name="nan")
    with pytest.raises(CheckpointError, match=r"nan.pt: weights that are not finite .* in l_stem\.0\.weight.*another"):
        load_model(str(path))


@pytest.mark.parametrize(("damage", "why"), [
    (lambda q: q["qparams"].update(c0=[0.0, 50]), "out of range for c0"),
    (lambda q: q["qparams"].update(c0=[float("nan"), 50]), "out of range for c0"),
    (lambda q: q["qparams"].update(c0=[-0.1, 50]), "out of range for c0"),
    (lambda q: q["qparams"].update(c0=[0.1, 300]), "out of range for c0"),
    (lambda q: q.update(qparams=list(q["qparams"].items())), "not a map name"),
    (lambda q: q["qparams"].pop("c1"), "no scales for the maps c1"),
])
def test_a_damaged_int8_calibration_is_not_used_and_says_why(tmp_path, caplog, damage, why):
    """A scale of 0, NaN or below 0 gave garbage vectors silently; a list of qparams, a missing map or a zero point
    above 255 stopped the match with an internal error."""
    from samembed.embedding import Embedder

    shipped = load_model("default")
    weights = tmp_path / "copy.pt"
    shutil.copy(shipped.info["file"], weights)
    calibration = json.loads(qparams_path(shipped.info["file"]).read_text())
    damage(calibration)
    qparams_path(weights).write_text(json.dumps(calibration))
    with caplog.at_level(logging.WARNING):
        model = load_checkpoint(weights)
    assert model.int8 is None and "unusable int8 calibration" in caplog.text and why in caplog.text
    assert Embedder(model, "cpu").precision == "fp32"


@pytest.mark.parametrize(("entry", "why"), [
    ({"file": "x.pt"}, "model entry 1 has no 'name'"),
    ("default", "model entry 1 is str, not an object"),
    ({"name": "mine", "aliases": None}, "'aliases' must be a list of names, not None"),
    ({"name": "mine", "aliases": "sam-lite-ct"}, "'aliases' must be a list of names, not 'sam-lite-ct'"),
    ({"name": "mine", "file": 3}, "'file' must be text"),
])
def test_a_malformed_catalogue_entry_is_named_with_its_file(tmp_path, monkeypatch, capsys, entry, why):
    """An entry without a name gave `internal error: KeyError`; a string entry a traceback from argparse; aliases as
    one string matched every substring of it."""
    from samembed.cli import main

    (tmp_path / "models.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("SAMEMBED_MODELS_DIR", str(tmp_path))
    with pytest.raises(InputError, match=why):
        load_model("sam-lite-ct")
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'models.json'}: {why[:20]}" in err or why in err
    assert "internal error" not in err


def test_a_models_folder_without_a_catalogue_is_named(tmp_path, monkeypatch):
    """``SAMEMBED_MODELS_DIR`` at a folder without models.json said "unknown model 'default': not in models.json
    (empty)", naming neither the folder nor the variable."""
    monkeypatch.setenv("SAMEMBED_MODELS_DIR", str(tmp_path / "nosuch"))
    with pytest.raises(InputError, match=r"SAMEMBED_MODELS_DIR=.*nosuch: no models.json in that folder.*unset it"):
        load_model("default")


@pytest.mark.parametrize(("change", "why"), [
    (lambda o: o.update(arch="sam-lite-3"), "unknown architecture 'sam-lite-3'"),
    (lambda o: o["net_config"].update(attention=True), "unexpected keyword argument 'attention'"),
    (lambda o: o["preprocess"].update(fill="median"), "fill 'median' is not one of zero, air"),
])
def test_a_checkpoint_of_another_samembed_version_is_named(tmp_path, change, why):
    """An unknown architecture said "choose one of" as if typed; an unknown network setting was an internal
    TypeError; an unknown fill was taken as "zero" without a word."""
    path = tiny_checkpoint(tmp_path / "later.pt")
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=f"later.pt: a checkpoint this samembed cannot build .*{why}.*another "
                                              "version of samembed"):
        load_model(str(path))


def test_a_run_folder_or_weights_without_their_facts_are_described_as_what_they_are(tmp_path):
    """A training run's folder was "checkpoint file not found"; a bare state_dict of sam-lite was read as an official
    SAM file, with 138 missing and 112 unexpected keys."""
    run = tmp_path / "myrun"
    run.mkdir()
    tiny_checkpoint(run / "last.pt")
    with pytest.raises(CheckpointError, match=r"myrun: is a folder; give a checkpoint file in it \(last.pt"):
        load_model(str(run))
    torch.save(build_network("sam-lite", TINY).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="weights.pt: holds sam-lite weights alone, without the architecture"):
        load_model(str(tmp_path / "weights.pt"))


@pytest.mark.needs_data
def test_quantize_checks_its_output_before_it_calibrates(tmp_path, capsys, monkeypatch):
    """An --out in a missing folder was said after the calibration (minutes with the default 12 CTs)."""
    from samembed import quantize
    from samembed.cli import main

    calibrated = []
    monkeypatch.setattr(quantize, "calibrate_model", lambda *a, **k: calibrated.append(1))
    image = data_file("ct", "openkbp", "ct", "pt_100_ct.nii.gz")
    config = tmp_path / "train.yaml"
    config.write_text(f"data: [{image}]\n")
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "nofolder" / "x.json"
    assert main(["quantize", "--config", str(config), "--model", str(weights), "--out", str(out), "-q"]) == 2
    assert "output folder" in capsys.readouterr().err and not calibrated


@pytest.mark.needs_data
def test_quantize_refuses_an_out_that_is_one_of_its_inputs_or_no_json(tmp_path, capsys, monkeypatch):
    """``--out`` naming the config, or a calibration image, replaced that input by the calibration (a review)."""
    import shutil

    from samembed import quantize
    from samembed.cli import main

    calibrated = []
    monkeypatch.setattr(quantize, "calibrate_model", lambda *a, **k: calibrated.append(1))
    image = tmp_path / "data" / "pt_100_ct.nii.gz"
    image.parent.mkdir()
    shutil.copy(data_file("ct", "openkbp", "ct", "pt_100_ct.nii.gz"), image)
    config = tmp_path / "train.json"  # (a JSON config: the suffix alone does not keep it safe)
    config.write_text(f'{{"data": ["{image}"]}}\n')
    before = config.read_bytes(), image.read_bytes()
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    for out, said in ((image, "give a name ending in .json"), (config, f"would overwrite the input {config}")):
        assert main(["quantize", "--config", str(config), "--model", str(weights), "--out", str(out), "-q"]) == 2
        assert said in capsys.readouterr().err
    assert (config.read_bytes(), image.read_bytes()) == before and not calibrated
    assert main(["quantize", "--config", str(config), "--model", str(weights), "--out", str(tmp_path / "q.json"),
                 "-q"]) == 0 and calibrated == [1]
