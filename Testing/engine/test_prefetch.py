"""``samembed match`` reads and preprocesses its first images in a second process while torch loads
(:mod:`samembed.prefetch`): the inputs it hands over are the engine's own, a mismatch or a failure falls back to the
engine, and the command's output is the same with or without it."""

from __future__ import annotations

import csv
import dataclasses
import gc
import logging
import mmap
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from samembed import prefetch
from samembed.cli import main
from samembed.io import read_image
from samembed.preprocess import PreprocessConfig, body_mask_array, preprocess
from samembed.registry import registered_local_stride_zyx, registered_pad_multiple_zyx, registered_preprocess, registry

from ..conftest import data_file


def _returns(call, hang: str = "it waited for something that never comes"):
    """``call()``'s result, run on a thread: fails (a hang guard, not a speed limit) when it has not returned within
    30 s."""
    got = []
    worker = threading.Thread(target=lambda: got.append(call()), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and got, hang
    return got[0]



def _start(paths, config: dict, pad_multiple_zyx=None, body_stride_zyx=None, share_work=False,
           in_turn=False) -> prefetch.Prefetch:
    """A prefetch started here, where torch is already imported (the command starts it before); ``share_work`` and
    ``in_turn`` as the command's (else the engine waits for every image the child may read, as these tests ask at
    once, and the child reads every image first)."""
    return prefetch.Prefetch(prefetch.PrefetchRequest(tuple(str(x) for x in paths), config,
                                                      pad_multiple_zyx=pad_multiple_zyx, body_stride_zyx=body_stride_zyx,
                                                      in_turn=in_turn),
                             share_work=share_work)


@pytest.mark.needs_data
def test_a_prefetched_input_is_the_engines_own_and_is_handed_out_once():
    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    config = registered_preprocess("default")
    pad = registered_pad_multiple_zyx("default")
    assert config is not None, "models.json must declare the default model's preprocessing"
    assert pad is not None, "models.json must declare the default model's padding multiple"
    stride = registered_local_stride_zyx("default")
    p = _start([path], config, pad, stride)
    try:
        image = p.image(str(path))
        assert image is not None and image.content_hash() == read_image(path).content_hash()
        cfg = PreprocessConfig.from_dict(config)
        assert p.take(image.content_hash(), PreprocessConfig(spacing_mm=3.0), "auto", pad) is None  # other settings
        assert p.take(image.content_hash(), cfg, "auto", (16, 16, 16)) is None  # another padding multiple
        got = p.take(image.content_hash(), cfg, "auto", pad)
        ref = preprocess(read_image(path), cfg, "auto", pad)
        assert all(n % m == 0 for n, m in zip(got.array.shape, pad)), "CT comes padded to the network's multiple"
        assert np.array_equal(got.array, ref.array) and got.grid.shape_zyx == ref.grid.shape_zyx
        # the voxels came through the shared region, not the pipe (see the module docstring)
        assert isinstance(got.array.base, mmap.mmap) and isinstance(image.array.base, mmap.mmap)
        # its body mask, made as the engine makes it on the local grid, with the input
        assert got.body_stride_zyx == stride
        assert np.array_equal(got.body, body_mask_array(ref.array[::stride[0], ::stride[1], ::stride[2]], ref.modality))
        assert got.modality == ref.modality and got.fill_value == ref.fill_value
        assert p.take(image.content_hash(), cfg, "auto", pad) is None, "handed out twice"
    finally:
        p.close()


@pytest.mark.needs_data
def test_arrays_too_large_for_the_shared_region_go_through_the_pipe(monkeypatch):
    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    monkeypatch.setattr(prefetch, "ARENA_BYTES", 1 << 20)  # 1 MiB: neither the image nor its input fits
    config, pad = registered_preprocess("default"), registered_pad_multiple_zyx("default")
    p = _start([path], config, pad, registered_local_stride_zyx("default"))
    try:
        image = p.image(str(path))
        got = p.take(image.content_hash(), PreprocessConfig.from_dict(config), "auto", pad)
    finally:
        p.close()
    assert not isinstance(image.array.base, mmap.mmap) and not isinstance(got.array.base, mmap.mmap)
    assert got.body is not None, "the body mask travels with its input through the pipe too"
    ref = read_image(path)
    assert np.array_equal(image.array, ref.array)
    assert np.array_equal(got.array, preprocess(ref, PreprocessConfig.from_dict(config), "auto", pad).array)


def _wait_for(condition, seconds: float) -> None:
    """Until ``condition()`` holds, or ``seconds`` have passed (the caller's assertion then says what is missing)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _memory_files() -> int:
    """The hand-off's memory files this process maps now (``/proc/self/maps``)."""
    with open("/proc/self/maps") as f:
        return sum("samembed-prefetch" in line for line in f)


@pytest.mark.needs_data
@pytest.mark.parametrize("handoff", [True, False])
@pytest.mark.parametrize("arena_bytes", [None, 1 << 20])  # the default region; 1 MiB, where no image fits
def test_later_targets_are_handed_over_in_memory_of_their_own_or_else_while_they_fit_in_the_shared_region(
        monkeypatch, arena_bytes, handoff):
    """One atlas into several targets: the targets after the first are read and preprocessed ahead too. For the
    command, which takes them in turn, each array comes in memory of its own, which goes when the engine drops it,
    whatever room the shared region has; otherwise (a caller that takes every image first, or no memory files on
    this system), through the shared region only, and what does not fit there is left to the engine, which then
    need not wait for it."""
    if arena_bytes is not None:
        monkeypatch.setattr(prefetch, "ARENA_BYTES", arena_bytes)
    if not handoff:
        monkeypatch.setattr(prefetch._Handoff, "available", staticmethod(lambda: False))
    elif not prefetch._Handoff.available():
        pytest.skip("no memory files on this system (os.memfd_create, socket.send_fds)")
    paths = [data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz") for p in ("pt_215", "pt_232", "pt_202", "pt_231")]
    config, pad = registered_preprocess("default"), registered_pad_multiple_zyx("default")
    cfg = PreprocessConfig.from_dict(config)
    p = _start(paths, config, pad, registered_local_stride_zyx("default"), in_turn=handoff)
    mapped, held = _memory_files(), []
    try:
        for i, path in enumerate(paths):
            image = p.image(str(path))
            later = i >= prefetch.FIRST_IMAGES
            later_left = arena_bytes is not None and later and not handoff
            assert (image is None) == later_left, f"image {i}: prefetched {image is not None}"
            ref = read_image(path)
            got = p.take(ref.content_hash(), cfg, "auto", pad)
            if later_left:
                assert got is None  # the engine preprocesses it itself
                continue
            assert np.array_equal(image.array, ref.array)
            assert np.array_equal(got.array, preprocess(ref, cfg, "auto", pad).array)
            assert isinstance(got.array.base, mmap.mmap) == (arena_bytes is None or (later and handoff))
            if later and handoff:
                held += [image, got]
        # each later image and its input in a memory file of its own, gone with the arrays
        assert _memory_files() == mapped + len(held)
        del image, got
        held.clear()
        gc.collect()
        assert _memory_files() == mapped
    finally:
        p.close()


@pytest.mark.needs_data
def test_a_memory_file_that_cannot_be_made_leaves_that_target_to_the_engine_and_the_next_still_comes(monkeypatch):
    """No memory for one later target's array (``memfd_create`` fails): that target is left to the engine, which
    need not wait for it, and the targets after it are still handed over."""
    if not prefetch._Handoff.available():
        pytest.skip("no memory files on this system (os.memfd_create, socket.send_fds)")
    made = []
    memfd_create = os.memfd_create

    def first_fails(name, flags=0):  # runs in the forked child: its first memory file (image 2's array) fails
        made.append(name)
        if len(made) == 1:
            raise OSError(24, "Too many open files")
        return memfd_create(name, flags)

    monkeypatch.setattr(os, "memfd_create", first_fails)
    paths = [data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz") for p in ("pt_215", "pt_232", "pt_202", "pt_231")]
    config, pad = registered_preprocess("default"), registered_pad_multiple_zyx("default")
    cfg = PreprocessConfig.from_dict(config)
    p = _start(paths, config, pad, registered_local_stride_zyx("default"), in_turn=True)
    try:
        for i, path in enumerate(paths):
            image = p.image(str(path))
            ref = read_image(path)
            got = p.take(ref.content_hash(), cfg, "auto", pad)
            assert (image is None) == (i == 2) and (got is None) == (i == 2), f"image {i}"
            if i != 2:
                assert np.array_equal(got.array, preprocess(ref, cfg, "auto", pad).array)
    finally:
        p.close()


@pytest.mark.needs_data
def test_in_turn_the_child_reads_at_most_a_few_targets_beyond_the_one_the_engine_asked_for(caplog):
    """One atlas into many scans: the command's prefetch reads each later target while the engine matches the
    targets before it, at most ``AHEAD`` beyond the last one the engine asked for, so that no more than that many
    wait in memory; asking for the next lets it read one more."""
    if not prefetch._Handoff.available():
        pytest.skip("no memory files on this system (os.memfd_create, socket.send_fds)")
    names = ("pt_215", "pt_232", "pt_202", "pt_231", "pt_236", "pt_218", "pt_201")
    paths = [str(data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz")) for p in names]
    caplog.set_level(logging.DEBUG, logger="samembed.prefetch")

    def read_so_far() -> list[int]:
        return [paths.index(r.getMessage().split(" ")[2]) for r in caplog.records
                if r.getMessage().startswith("prefetch: image ")]

    def settle(expected: list[int]) -> None:  # wait for these images, then a while longer for any beyond them
        _wait_for(lambda: read_so_far() == expected, 60)
        time.sleep(1.0)
        assert read_so_far() == expected

    p = _start(paths, registered_preprocess("default"), registered_pad_multiple_zyx("default"),
               registered_local_stride_zyx("default"), in_turn=True)
    try:
        assert prefetch.AHEAD == 2
        settle([0, 1, 2, 3])  # while the engine loads: the first pair, and AHEAD beyond it
        p.image(paths[1])  # the engine's first target: no further
        settle([0, 1, 2, 3])
        p.image(paths[2])  # the next target's turn: one more
        settle([0, 1, 2, 3, 4])
        p.image(paths[4])  # image 4's turn: up to 6, the last
        settle([0, 1, 2, 3, 4, 5, 6])
    finally:
        p.close()


@pytest.mark.needs_data
@pytest.mark.parametrize("in_turn", [False, True])
def test_later_targets_are_read_and_preprocessed_in_turn_for_the_command_and_all_read_first_otherwise(caplog, in_turn):
    """The command takes each target after the first when its turn comes: its prefetch makes the first pair's
    inputs, then reads and preprocesses each later target in turn (made while the engine matches the targets before
    it). A caller that takes every image before it embeds one (the Slicer module's engine process) gets every image
    read first. The results are the same either way."""
    paths = [data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz") for p in ("pt_215", "pt_232", "pt_202", "pt_231")]
    config, pad = registered_preprocess("default"), registered_pad_multiple_zyx("default")
    cfg = PreprocessConfig.from_dict(config)
    refs = [read_image(path) for path in paths]
    index = {str(path): i for i, path in enumerate(paths)} | {r.content_hash(): i for i, r in enumerate(refs)}
    caplog.set_level(logging.DEBUG, logger="samembed.prefetch")
    p = _start(paths, config, pad, registered_local_stride_zyx("default"), in_turn=in_turn)
    try:
        for path, ref in zip(paths, refs):
            assert np.array_equal(p.image(str(path)).array, ref.array)
            assert np.array_equal(p.take(ref.content_hash(), cfg, "auto", pad).array, preprocess(ref, cfg, "auto", pad).array)
    finally:
        p.close()
    arrivals = [(kind, index[key]) for kind, key in
                (r.getMessage().split(" ")[1:] for r in caplog.records if r.getMessage().startswith("prefetch: "))]
    if in_turn:
        assert arrivals == [("image", 0), ("image", 1), ("input", 0), ("input", 1), ("image", 2), ("input", 2),
                            ("image", 3), ("input", 3)]
    else:
        assert arrivals == [*(("image", i) for i in range(4)), *(("input", i) for i in range(4))]


@pytest.mark.needs_data
def test_an_input_the_engine_pads_itself_gets_the_engines_own_body_mask(caplog):
    """Only CT comes padded from the resampling; the engine pads other modalities afterwards, and their body threshold
    (a percentile) sees the padding. A CT embedded as MRI (percentile mapping, percentile threshold): the maps made
    from the prefetched input and body mask equal the engine's own."""
    from samembed import Matcher

    path = data_file("ct", "openkbp", "ct", "pt_239_ct.nii.gz")
    request = prefetch.PrefetchRequest((str(path),), registered_preprocess("default"), "mri",
                                       pad_multiple_zyx=registered_pad_multiple_zyx("default"),
                                       body_stride_zyx=registered_local_stride_zyx("default"))
    p = prefetch.Prefetch(request)
    try:
        image = p.image(str(path))
        ahead = Matcher("default", device="cpu", modality="mri")
        ahead.embedder.prefetch = p
        with caplog.at_level(logging.DEBUG, logger="samembed.embedding"):
            a = ahead.embedder.embed(image, on_demand=True)
    finally:
        p.close()
    assert "preprocessed ahead by the prefetch process" in caplog.text
    assert "body mask made ahead by the prefetch process" in caplog.text
    b = Matcher("default", device="cpu", modality="mri").embedder.embed(read_image(path), on_demand=True)
    assert torch.equal(a.body, b.body) and torch.equal(a.global_, b.global_)


@pytest.mark.parametrize("name", [m["name"] for m in registry().get("models", []) if m.get("file")])
def test_the_registered_padding_multiple_local_stride_and_preprocessing_are_the_networks_own(name):
    """The command prefetches with ``models.json``'s multiple and preprocessing before the weights load; the engine
    pads to its network's (a mismatch would waste the prefetch: the engine would preprocess the image again). Every
    registered model with weights; its int8 calibration, where it has one, was made for these weights."""
    from samembed.api import load_model

    model = load_model(name)  # checks the file's SHA-256 against models.json
    spec = model.spec
    grids = registered_pad_multiple_zyx(name), registered_local_stride_zyx(name)
    # (the hand model's entry lacked them, so its radiographs were never prefetched by name, only by path)
    assert grids == (tuple(reversed(spec.pad_multiple)), tuple(reversed(spec.local_stride)))
    assert PreprocessConfig.from_dict(registered_preprocess(name)) == model.preprocess
    if spec.arch == "sam-lite":
        assert model.int8 is not None, f"{name}: no int8 calibration made for its weights beside them"


def test_a_checkpoints_own_facts_are_read_without_torch_and_equal_what_loading_it_gives(tmp_path):
    """A checkpoint path (``--model runs/mine/mine.pt``) is prefetched too: its preprocessing comes from its own
    header, read with no torch, and its architecture's multiple and stride are its network's."""
    from samembed.models import load_model, save_checkpoint
    from samembed.networks import build_network
    from samembed.registry import ARCH_GRIDS_XYZ, checkpoint_header, model_facts

    for arch, (pad_xyz, stride_xyz) in ARCH_GRIDS_XYZ.items():
        spec = build_network(arch, {}).spec
        assert (tuple(reversed(spec.pad_multiple)), tuple(reversed(spec.local_stride))) == (pad_xyz, stride_xyz)
    net = build_network("sam-lite", {"widths": [4, 8, 8], "global_widths": [4, 8, 8, 8], "fpn_channels": 4})
    path = save_checkpoint(tmp_path / "mine.pt", net, PreprocessConfig(spacing_mm=3.0, fill="zero"), name="mine",
                           extra={"rng_torch": torch.zeros(3, dtype=torch.uint8)})
    loaded = load_model(str(path))
    assert PreprocessConfig.from_dict(registered_preprocess(str(path))) == loaded.preprocess
    assert registered_pad_multiple_zyx(str(path)) == tuple(reversed(loaded.spec.pad_multiple))
    assert registered_local_stride_zyx(str(path)) == tuple(reversed(loaded.spec.local_stride))
    assert checkpoint_header(path)["net_config"] == loaded.spec.config
    # without torch, in a fresh interpreter
    code = ("import sys; from samembed.registry import registered_preprocess as r; "
            f"print(r({str(path)!r})['spacing_mm'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3.0", "False"]
    # anything else is not read: a state dict alone, another file, a pickle that would run code
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")

    class Runs:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"arch": "sam-lite", "preprocess": {"spacing_mm": 2.0}, "x": Runs()}, tmp_path / "evil.pt")
    for name in ("weights.pt", "notes.pt", "evil.pt", "missing.pt"):
        assert model_facts(str(tmp_path / name)) is None and registered_preprocess(str(tmp_path / name)) is None
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_header_that_is_odd_gives_no_facts_and_spoils_no_later_read(tmp_path, monkeypatch):
    """Whatever a file named like a checkpoint holds, the command only loses its prefetch (the model's loading then
    names the problem); nothing one file does reaches the next read."""
    import pickle
    import zipfile

    from samembed import registry
    from samembed.models import save_checkpoint
    from samembed.networks import build_network

    def archive(name: str, payload: bytes, compression=zipfile.ZIP_STORED) -> str:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", compression=compression) as z:
            z.writestr("archive/data.pkl", payload)
        return str(path)

    good = save_checkpoint(tmp_path / "good.pt", build_network("sam-lite", {"widths": [4, 8, 8],
                                                                            "global_widths": [4, 8, 8, 8],
                                                                            "fpn_channels": 4}),
                           PreprocessConfig(spacing_mm=3.0), name="good")
    odd = {
        "a list for the architecture": pickle.dumps({"arch": ["sam-lite"], "preprocess": {"spacing_mm": 2.0}}),
        "a torch object in the settings": (b"\x80\x02}q\x00(X\x04\x00\x00\x00archq\x01X\x08\x00\x00\x00sam-liteq\x02"
                                           b"X\n\x00\x00\x00preprocessq\x03}q\x04X\n\x00\x00\x00spacing_mmq\x05"
                                           b"ctorch\nfloat32\nq\x06su."),
        # GLOBAL torch X, then BUILD with a state that rewrites the class it got
        "a class rewritten": b"\x80\x02ctorch\nX\nN}X\x08\x00\x00\x00__init__K\x05s\x86b.",
        "not a pickle": b"garbage",
    }
    for what, payload in odd.items():
        assert registry.checkpoint_header(archive("odd.pt", payload)) is None, what
        assert registry.checkpoint_header(good)["name"] == "good", f"after {what}"
    monkeypatch.setattr(registry, "HEADER_PICKLE_LIMIT", 10)
    assert registry.checkpoint_header(good) is None  # a pickle over the limit is not read
    monkeypatch.undo()
    corrupt = tmp_path / "corrupt.pt"
    data = bytearray(good.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    corrupt.write_bytes(bytes(data))
    assert registry.model_facts(str(corrupt)) is None or registry.model_facts(str(corrupt))["preprocess"]
    assert registry.model_facts(str(tmp_path)) is None and registry.model_facts(str(tmp_path / ("x" * 300 + ".pt"))) is None


def test_an_unreadable_image_is_left_to_the_command_which_names_it(tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    p = _start([bad], registered_preprocess("default"))
    try:
        assert p.image(str(bad)) is None
    finally:
        p.close()
    pts = tmp_path / "p.csv"
    pts.write_text("label,x,y,z\na,0,0,0\n")
    assert main(["match", str(bad), str(bad), "--points", str(pts), "--out", str(tmp_path / "o.csv"), "-q"]) != 0
    assert "broken.nii.gz" in capsys.readouterr().err


@pytest.mark.needs_data
def test_the_command_with_two_atlases_and_four_targets_finishes_with_its_prefetch(tmp_path):
    """A fresh interpreter (the command prefetches): two atlases, whose second the prefetch never reads, into four
    targets, more than the child reads ahead. The engine embeds the second atlas itself, at once, instead of
    waiting for an input that never comes (before, it waited for ever). The fused matches are those made here
    without a prefetch."""
    cents = list(csv.DictReader(data_file("ct", "openkbp", "oar_centroids.csv").open()))
    atlases = ("pt_239", "pt_231")
    common = set.intersection(*({r["structure"] for r in cents if r["patient"] == a} for a in atlases))
    args = ["match"]
    for atlas in atlases:  # the same labels on both (fused per label)
        pts = tmp_path / f"{atlas}.csv"
        pts.write_text("label,x,y,z\n" + "".join(f"{r['structure']},{r['x_mm']},{r['y_mm']},{r['z_mm']}\n"
                                                 for r in cents if r["patient"] == atlas and r["structure"] in common))
        args += ["--atlas", str(data_file("ct", "openkbp", "ct", f"{atlas}_ct.nii.gz")), str(pts)]
    args += [str(data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz")) for p in ("pt_202", "pt_236", "pt_218", "pt_232")]
    args += ["--device", "cpu", "-q"]
    code = ("import sys; from samembed import cli, prefetch; assert prefetch.available(); "
            "sys.exit(cli.main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "fresh.csv")], check=True,
                   capture_output=True, text=True, timeout=120)
    assert main([*args, "--out", str(tmp_path / "here.csv")]) == 0
    assert (tmp_path / "fresh.csv").read_text() == (tmp_path / "here.csv").read_text()


@pytest.mark.needs_data
def test_the_command_with_its_prefetch_writes_what_it_writes_without(tmp_path):
    """A fresh interpreter (torch not yet imported: the command prefetches) against this process (torch imported:
    no prefetch), the same source, three targets and points. How many images the prefetch process reads depends on
    the machine's load: the command reads a target the child has not started itself (samembed.prefetch._Claims);
    the source, which the command asks for last, is always the child's, and every input it made came with its body
    mask."""
    src = data_file("ct", "openkbp", "ct", "pt_239_ct.nii.gz")
    tgt = data_file("ct", "openkbp", "ct", "pt_231_ct.nii.gz")
    more = [data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz") for p in ("pt_202", "pt_236")]  # read ahead too
    rows = [r for r in csv.DictReader(data_file("ct", "openkbp", "oar_centroids.csv").open()) if r["patient"] == "pt_239"]
    pts = tmp_path / "p.csv"
    pts.write_text("label,x,y,z\n" + "".join(f"{r['structure']},{r['x_mm']},{r['y_mm']},{r['z_mm']}\n" for r in rows[:3]))
    args = ["match", str(src), str(tgt), *map(str, more), "--points", str(pts), "--device", "cpu", "-q"]
    code = ("import sys; from samembed import cli, prefetch; assert prefetch.available(); "
            "sys.exit(cli.main(sys.argv[1:]))")
    fresh = subprocess.run([sys.executable, "-c", code, "-v", *args, "--out", str(tmp_path / "fresh.csv")],
                           check=True, capture_output=True, text=True)
    ahead = fresh.stderr.count("preprocessed ahead by the prefetch process")
    assert f"{src}: preprocessed ahead by the prefetch process" in fresh.stderr, fresh.stderr[-2000:]
    assert 1 <= ahead <= 4 and fresh.stderr.count("body mask made ahead by the prefetch process") == ahead, \
        fresh.stderr[-2000:]
    assert main([*args, "--out", str(tmp_path / "here.csv")]) == 0
    assert (tmp_path / "fresh.csv").read_text() == (tmp_path / "here.csv").read_text()


@pytest.mark.needs_data
def test_a_prefetch_started_before_its_images_are_known_reads_volume_files_as_the_engine_process_does(tmp_path):
    """The Slicer module's engine process forks its prefetch before torch loads and before it knows its first
    request's volumes (``start_waiting``), which come as ``.npy`` files with their geometry (``ArrayFile``). Until
    they are given, asking for one waits for nothing; then the image and the input are the engine's own, once each,
    and the file stays for the engine process (which removes it)."""
    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    ref = read_image(path)
    npy = tmp_path / "pt_215.npy"
    np.save(npy, ref.array)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    cfg = PreprocessConfig.from_dict(config)
    # here torch is imported, so start_waiting would refuse (prefetch.available): the same object, started directly
    p = prefetch.Prefetch(prefetch.PrefetchRequest((), config, pad_multiple_zyx=pad, body_stride_zyx=stride),
                          waiting=True)
    try:
        # asked before the images were given: nothing to wait for (a wait would be for ever: nobody gives them here)
        assert _returns(lambda: p.image(str(npy))) is None
        assert _returns(lambda: p.take(ref.content_hash(), cfg, "auto", pad)) is None
        p.give([prefetch.ArrayFile(str(npy), ref.grid, "pt_215", True, ref.content_hash(), shared=True)])
        # another image's input: known not to come (the given hashes), so not waited for
        assert _returns(lambda: p.take("0" * 64, cfg, "auto", pad)) is None
        with pytest.raises(RuntimeError, match="given its images"):
            p.give([str(path)])
        image = p.image(str(npy))
        assert image.name == "pt_215" and image.content_hash() == ref.content_hash()
        # it yields to the engine's threads where they share a core (its niceness is 10 above this process's)
        assert os.getpriority(os.PRIO_PROCESS, p._proc.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        assert np.array_equal(image.array, ref.array) and isinstance(image.array.base, mmap.mmap)
        got = p.take(ref.content_hash(), cfg, "auto", pad)
        assert np.array_equal(got.array, preprocess(ref, cfg, "auto", pad).array) and got.body_stride_zyx == stride
        assert p.take(ref.content_hash(), cfg, "auto", pad) is None, "handed out twice"
        assert (p.images_read, p.inputs_made) == (1, 1)
    finally:
        p.close()
    assert npy.exists(), "the prefetch removed the engine process's file"


def test_a_volume_file_read_with_its_senders_hash_is_not_hashed_again(tmp_path):
    """The engine process knows each volume file's hash (the parent's key, from the same voxels and geometry): the
    image read from it carries that hash instead of hashing the voxels again; without one it is hashed when asked."""
    from samembed import Image

    ref = Image.from_array(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), (1.0, 2.0, 3.0), name="block")
    npy = tmp_path / "block.npy"
    np.save(npy, ref.array)
    known = prefetch.ArrayFile(str(npy), ref.grid, "block", True, ref.content_hash()).read()
    assert known.hashed and known.content_hash() == ref.content_hash() and np.array_equal(known.array, ref.array)
    told = prefetch.ArrayFile(str(npy), ref.grid, "block", True, "f" * 64).read()
    assert told.content_hash() == "f" * 64, "the voxels were hashed again instead of taking the sender's hash"
    unknown = prefetch.ArrayFile(str(npy), ref.grid, "block", True).read()
    assert not unknown.hashed and unknown.content_hash() == ref.content_hash()


@pytest.mark.needs_data
@pytest.mark.parametrize("arena_bytes", [None, 1 << 20])  # the default region; 1 MiB, where nothing fits
@pytest.mark.parametrize("kind", ["mapped by its sender", "written with its hash", "without its hash"])
def test_a_volume_file_is_mapped_by_the_prefetch_and_by_the_engine(tmp_path, monkeypatch, arena_bytes, kind):
    """The prefetch maps a volume file instead of loading it. With its sender's hash, from a sender that maps the
    file too (the Slicer module's engine process, for a volume copied straight into its file), the engine maps the
    file too: no copy in either process, whatever the region's size, and the mapping outlives the file's removal
    (the engine process removes it once read). A file written only to be sent, or one without its sender's hash
    (which the prefetch then hashes), reaches the engine as the shared copy, or, where it does not fit, a plain
    array through the pipe, never a mapping (it would keep a removed file's disk space). The input is the engine's
    own either way."""
    hash_known, shared = kind != "without its hash", kind == "mapped by its sender"
    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    ref = read_image(path)
    npy = tmp_path / "pt_215.npy"
    np.save(npy, ref.array)
    mapped = prefetch.ArrayFile(str(npy), ref.grid, "pt_215", True).read(mapped=True)
    assert isinstance(mapped.array, np.memmap) and not mapped.array.flags.writeable
    if arena_bytes is not None:
        monkeypatch.setattr(prefetch, "ARENA_BYTES", arena_bytes)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = prefetch.Prefetch(prefetch.PrefetchRequest((), config, pad_multiple_zyx=pad, body_stride_zyx=stride),
                          waiting=True)
    try:
        p.give([prefetch.ArrayFile(str(npy), ref.grid, "pt_215", True, ref.content_hash() if hash_known else None,
                                   shared)])
        image = p.image(str(npy))
        got = p.take(ref.content_hash(), PreprocessConfig.from_dict(config), "auto", pad)
    finally:
        p.close()
    assert np.array_equal(image.array, ref.array) and image.content_hash() == ref.content_hash()
    if shared:
        assert isinstance(image.array, np.memmap) and not image.array.flags.writeable
    else:
        assert not isinstance(image.array, np.memmap)
        assert isinstance(image.array.base, mmap.mmap) == (arena_bytes is None)  # the shared copy, where it fits
    assert np.array_equal(got.array, preprocess(ref, PreprocessConfig.from_dict(config), "auto", pad).array)
    npy.unlink()  # as the engine process removes it once read: a mapping made before still reads
    assert np.array_equal(mapped.array, ref.array) and np.array_equal(image.array, ref.array)


@pytest.mark.needs_data
def test_a_volume_file_gone_before_the_engine_maps_it_is_left_to_the_engine_and_the_rest_still_comes(tmp_path,
                                                                                                    monkeypatch):
    """A volume file that the prefetch read but the engine cannot map any more (removed meanwhile): that image is
    not handed out (the engine reads it itself and reports what is wrong), and the prefetch goes on with the
    others."""
    ref = read_image(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz"))
    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    for f in files:
        np.save(f, ref.array)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = prefetch.Prefetch(prefetch.PrefetchRequest((), config, pad_multiple_zyx=pad, body_stride_zyx=stride),
                          waiting=True)
    read = prefetch.ArrayFile.read

    def gone_for_a(self, mapped=False):  # in this process only: the prefetch process was forked before
        if self.path == str(files[0]):
            raise FileNotFoundError(self.path)
        return read(self, mapped)

    monkeypatch.setattr(prefetch.ArrayFile, "read", gone_for_a)
    try:
        p.give([prefetch.ArrayFile(str(f), ref.grid, f.stem, True, ref.content_hash(), shared=True) for f in files])
        assert p.image(str(files[0])) is None
        second = p.image(str(files[1]))
    finally:
        p.close()
    assert second is not None and np.array_equal(second.array, ref.array)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_a_waiting_prefetch_ends_with_the_process_that_started_it(tmp_path):
    """An engine process that dies (killed, or its parent gone) before its first request must not leave its waiting
    prefetch behind."""
    code = ("import os; from samembed import prefetch; from samembed.registry import registered_preprocess; "
            "p = prefetch.start_waiting(registered_preprocess('default')); "
            "print(p._proc.pid if p is not None else 'none', flush=True); os._exit(0)")
    with open(tmp_path / "out.txt", "w") as f:  # a file, not a pipe: a prefetch left behind would hold a pipe open
        subprocess.run([sys.executable, "-c", code], check=True, stdout=f, timeout=120)
    out = (tmp_path / "out.txt").read_text().split()[0]
    if out == "none":
        pytest.skip("no prefetch on this machine (one core, or no fork)")
    pid, end = int(out), time.monotonic() + 10.0
    while _running(pid):
        assert time.monotonic() < end, f"the prefetch process {pid} outlived the process that started it"
        time.sleep(0.05)


def test_a_stop_signal_in_the_childs_first_moments_waits_for_its_own_handlers(tmp_path, monkeypatch, capfd):
    """The child ran the command's own SIGTERM handler (which raises) until it set its own, a few milliseconds after
    the fork: a Ctrl-C or SIGTERM of the process group then left a traceback, or a child that missed close()'s
    SIGTERM and outlived it (a review). Stop signals are now blocked across the fork: one that arrives before the
    child's handlers are set waits for them, and ends the child quietly. Here the child sends it to itself at that
    moment."""
    import signal

    from samembed.stopping import stop_on_sigterm

    parent = os.getpid()
    real_signal = signal.signal

    def first_moments(signum, handler):
        if os.getpid() != parent and signum == signal.SIGINT:  # the child, before it sets its first handler
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # (a signal that is not blocked is handled meanwhile, by the command's handler)
        return real_signal(signum, handler)

    monkeypatch.setattr(signal, "signal", first_moments)
    bad = tmp_path / "any.nii.gz"  # the child never gets to read it
    bad.write_bytes(b"not an image")
    with stop_on_sigterm():  # as the command runs
        p = _start([bad], registered_preprocess("default"))
    try:
        p._proc.join(10)
        assert p._proc.exitcode == -signal.SIGTERM, f"the child ended with {p._proc.exitcode}"
    finally:
        _returns(p.close, "close() waited for the child")
    assert "Traceback" not in capfd.readouterr().err


def test_close_kills_a_child_that_outlives_its_sigterm(tmp_path, monkeypatch, caplog):
    """A child that does not end on SIGTERM (held up, or its handler replaced) is killed, not left running."""
    import signal

    bad = tmp_path / "any.nii.gz"
    bad.write_bytes(b"not an image")
    p = _start([bad], registered_preprocess("default"))
    real_join = p._proc.join
    monkeypatch.setattr(p._proc, "terminate", lambda: None)  # the SIGTERM that does not end it
    monkeypatch.setattr(p._proc, "join", lambda timeout=None, join=real_join: join(min(timeout or 1, 0.2)))
    pid = p._proc.pid
    os.kill(pid, signal.SIGSTOP)  # alive, and staying so until killed
    try:
        with caplog.at_level(logging.WARNING, logger="samembed.prefetch"):
            _returns(p.close, "close() waited for the child")
        # killed by close(): reaped here (on a loaded machine the kill takes longer than close()'s short join, and
        # the test failed as if the child had been left running)
        real_join(30)
        alive = p._proc.is_alive()
    finally:
        if _running(pid):  # (never left stopped behind, whatever the outcome)
            os.kill(pid, signal.SIGKILL)
    assert not alive
    assert p._proc.exitcode == -signal.SIGKILL
    assert any("killing it" in r.getMessage() for r in caplog.records)


@pytest.mark.needs_data
def test_an_unreadable_first_target_is_read_once_by_the_command_and_named_once(tmp_path, monkeypatch, caplog):
    """The first target is read early, with the source; one that could not be read was read again at its turn (a
    damaged .nii.gz inflated again, the library's message printed again: a review). It is now reported at its turn
    from the first reading, and the other targets go on."""
    import samembed.api as api

    src = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    other = data_file("ct", "openkbp", "ct", "pt_202_ct.nii.gz")
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(other.read_bytes()[: other.stat().st_size // 2])  # a gzip stream cut short
    pts = tmp_path / "p.csv"
    pts.write_text("label,x,y,z\nL,248.77,288.62,172.25\n")
    reads = []
    as_image = api.as_image

    def counted(image, *a, **k):
        if str(image) == str(bad):
            reads.append(image)
        return as_image(image, *a, **k)

    monkeypatch.setattr(api, "as_image", counted)
    with caplog.at_level(logging.ERROR):
        code = main(["match", str(src), str(bad), str(other), "--points", str(pts), "--out", str(tmp_path / "o.csv"),
                     "-q", "--device", "cpu"])
    said = [r.getMessage() for r in caplog.records]
    assert code == 3, said  # some targets skipped
    assert len(reads) == 1, f"the damaged target was read {len(reads)} times by the command"
    skipped = [m for m in said if "skipped (the other targets go on)" in m]
    assert len(skipped) == 1 and "target 1/2" in skipped[0] and "cut.nii.gz" in skipped[0], said
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert [r["target"] for r in rows] == [str(other)]


def test_a_task_is_claimed_once_by_whoever_asks_first():
    import multiprocessing

    claims = prefetch._Claims(multiprocessing.get_context("fork"))
    assert claims.claim(0, prefetch.READ, prefetch.CHILD) and claims.claim(0, prefetch.READ, prefetch.CHILD)
    assert not claims.claim(0, prefetch.READ, prefetch.ENGINE), "the child started it: the engine waits for it"
    assert claims.claim(0, prefetch.PREPROCESS, prefetch.ENGINE), "each task of an image is claimed on its own"
    assert not claims.claim(0, prefetch.PREPROCESS, prefetch.CHILD)
    assert claims.claim(1, prefetch.READ, prefetch.ENGINE) and not claims.claim(1, prefetch.READ, prefetch.CHILD)
    beyond = prefetch.CLAIMED_IMAGES
    assert claims.claim(beyond, prefetch.READ, prefetch.CHILD) and not claims.claim(beyond, prefetch.READ, prefetch.ENGINE)


@pytest.mark.needs_data
def test_an_image_the_child_has_not_started_is_read_by_the_engine_and_left_by_the_child(tmp_path, monkeypatch):
    """The child reads the first two images at once (the source's reading is held here until the target's has
    begun: one after the other, it would never end) and the later ones after them. While it holds on the source, the
    engine asks for the third image: nobody has started it, so the engine reads it itself (``image`` gives None at
    once) and the child skips it. The source still comes from the child, read and preprocessed as the engine would;
    the third image's input is the engine's to make (``take`` gives None without waiting)."""
    import multiprocessing

    from samembed import io as samembed_io

    source, target, third = (data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (215, 232, 202))
    asked, target_started = (multiprocessing.get_context("fork").Event() for _ in range(2))
    read_log = tmp_path / "child_reads.txt"
    real_read = samembed_io.read_image

    def held_read(path, *a, **k):  # in the child (forked with this patch): note each read; hold the source's
        with read_log.open("a") as fh:
            fh.write(f"{path}\n")
        if str(path) == str(target):
            target_started.set()
        if str(path) == str(source):
            assert target_started.wait(20), "the child did not read the target while it read the source"
            assert asked.wait(60), "the engine never asked for the third image"
        return real_read(path, *a, **k)

    monkeypatch.setattr(samembed_io, "read_image", held_read)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = _start([source, target, third], config, pad, stride, share_work=True)
    try:
        _wait_for(lambda: target_started.is_set(), 20)  # the child reads the first two images at once
        assert target_started.is_set(), "the child did not start the target while it read the source"
        assert p.image(str(third)) is None, "the engine must read an image nobody has started"
        asked.set()
        image = p.image(str(source))
        assert image is not None and np.array_equal(image.array, real_read(source).array)
        assert np.array_equal(p.image(str(target)).array, real_read(target).array)
        cfg = PreprocessConfig.from_dict(config)
        got = p.take(image.content_hash(), cfg, "auto", pad)
        assert got is not None and np.array_equal(got.array, preprocess(real_read(source), cfg, "auto", pad).array)
        assert p.take(real_read(third).content_hash(), cfg, "auto", pad) is None
    finally:
        p.close()
    assert sorted(read_log.read_text().split()) == sorted([str(source), str(target)]), \
        "the child read the image the engine took"


@pytest.mark.needs_data
def test_a_scan_named_twice_among_the_first_images_is_read_once_by_the_child(tmp_path, monkeypatch):
    """A scan matched to itself (the same file as source and target): the child reads it once, and the word that it
    skips the second name comes after the image, so the engine, asking while the child still reads, gets the child's
    image instead of reading the file again (the skip used to come first, and settled the path with no image)."""
    import multiprocessing

    from samembed import io as samembed_io

    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    go = multiprocessing.get_context("fork").Event()
    read_log = tmp_path / "child_reads.txt"
    real_read = samembed_io.read_image

    def held_read(p, *a, **k):  # in the child: note the read, held until the engine has asked
        with read_log.open("a") as fh:
            fh.write(f"{p}\n")
        assert go.wait(20), "the test never let the child read"
        return real_read(p, *a, **k)

    monkeypatch.setattr(samembed_io, "read_image", held_read)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = _start([path, path], config, pad, stride, share_work=True, in_turn=True)
    try:
        _wait_for(read_log.exists, 20)  # the child is reading it
        release = threading.Timer(0.5, go.set)
        release.start()
        image = p.image(str(path))  # asked while the child still reads: waits for it
        assert image is not None, "the engine was told to read the scan the child was reading"
        assert np.array_equal(image.array, real_read(path).array)
        assert not p._images, "an image read by the child was left unused"
    finally:
        go.set()
        p.close()
    assert read_log.read_text().split() == [str(path)], "the child read the scan more than once"


def _within(seconds: float, call):
    """``call()``'s result, or a failure when it has not returned within ``seconds`` (a hang, not a slow test)."""
    out = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"
    return out[0]


@pytest.mark.needs_data
def test_in_turn_an_input_of_an_image_the_child_never_sent_or_already_handed_out_is_not_waited_for(tmp_path,
                                                                                                   monkeypatch, caplog):
    """One atlas into many scans: the engine reads a later target itself while the child holds on the source. That
    target's input is then the engine's: ``take`` gives None at once, although the child, which reads no more than
    AHEAD targets beyond the engine's, has not settled every image (waiting for that never ended). Neither is an
    input handed out once waited for again. The inputs the engine will not take (their maps came from the disk
    cache) go when it says so (``discard``), also one that comes later, and a later ``take`` of one does not wait."""
    import multiprocessing

    from samembed import io as samembed_io

    names = ("pt_215", "pt_232", "pt_202", "pt_231", "pt_236", "pt_218")
    paths = [data_file("ct", "openkbp", "ct", f"{n}_ct.nii.gz") for n in names]
    asked, reading = (multiprocessing.get_context("fork").Event() for _ in range(2))
    real_read = samembed_io.read_image

    def held_read(path, *a, **k):  # in the child: the source held until the engine has asked for a later target
        if str(path) == str(paths[0]):
            reading.set()
            assert asked.wait(60), "the engine never asked for the later target"
        return real_read(path, *a, **k)

    monkeypatch.setattr(samembed_io, "read_image", held_read)
    caplog.set_level(logging.DEBUG, logger="samembed.prefetch")
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    cfg = PreprocessConfig.from_dict(config)
    p = _start(paths, config, pad, stride, share_work=True, in_turn=True)
    try:
        # the child holds on the source (it reads no later image before the first two are sent): the engine reads
        # the second target itself; the child, then AHEAD beyond it, never settles the last image
        _wait_for(reading.is_set, 30)
        assert reading.is_set(), "the child never started on the source"
        assert p.image(str(paths[2])) is None, "the engine must read an image nobody has started"
        asked.set()
        source = p.image(str(paths[0]))
        assert _within(30, lambda: p.take(real_read(paths[2]).content_hash(), cfg, "auto", pad)) is None
        # the source's input made by the child (asked for earlier, the engine would make it itself: a race here)
        _wait_for(lambda: f"prefetch: input {source.content_hash()}" in caplog.text, 30)
        assert _within(30, lambda: p.take(source.content_hash(), cfg, "auto", pad)) is not None
        assert _within(30, lambda: p.take(source.content_hash(), cfg, "auto", pad)) is None  # handed out once
        # the child has sent the next target (else the engine would read it)
        _wait_for(lambda: f"prefetch: image {paths[3]}" in caplog.text, 30)
        third = p.image(str(paths[3]))
        assert third is not None and np.array_equal(third.array, real_read(paths[3]).array)
        p.discard(third.content_hash())  # its maps came from the disk cache: its input is never taken
        _wait_for(lambda: f"prefetch: input {third.content_hash()}" in caplog.text, 30)  # its input came (or before)
        assert f"prefetch: input {third.content_hash()}" in caplog.text
        assert third.content_hash() not in p._results, "a discarded input is still held"
        # a file of the same content later in the list, whose maps were forgotten with it, is preprocessed again
        assert _within(30, lambda: p.take(third.content_hash(), cfg, "auto", pad)) is None
    finally:
        p.close()


@pytest.mark.needs_data
def test_an_input_the_child_has_not_started_is_made_by_the_engine_while_the_child_still_reads(tmp_path, monkeypatch):
    """The child has read the source and holds on the target's reading; the engine asks for the source's input,
    which the child would make only after its reads: the engine makes it itself (``take`` gives None at once), and
    the child, which then makes the target's input, leaves the source's."""
    import multiprocessing

    from samembed import io as samembed_io
    from samembed import preprocess as samembed_preprocess

    source, target = (data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (215, 232))
    asked = multiprocessing.get_context("fork").Event()
    made_log = tmp_path / "child_inputs.txt"
    real_read, real_preprocess = samembed_io.read_image, samembed_preprocess.preprocess

    reading_target = tmp_path / "child_reads_the_target"

    def held_read(path, *a, **k):
        if str(path) == str(target):
            reading_target.touch()
            assert asked.wait(60), "the engine never asked for the source's input"
        return real_read(path, *a, **k)

    def noted_preprocess(image, *a, **k):
        with made_log.open("a") as fh:
            fh.write(f"{image.name}\n")
        return real_preprocess(image, *a, **k)

    monkeypatch.setattr(samembed_io, "read_image", held_read)
    monkeypatch.setattr(samembed_preprocess, "preprocess", noted_preprocess)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = _start([source, target], config, pad, stride, share_work=True)
    cfg = PreprocessConfig.from_dict(config)
    try:
        for _ in range(600):  # the child has read the source and started on the target
            if reading_target.exists():
                break
            time.sleep(0.05)
        image = p.image(str(source))
        assert p.take(image.content_hash(), cfg, "auto", pad) is None, "the engine must make an input nobody started"
        asked.set()
        other = p.image(str(target))
        assert other is not None
        got = p.take(other.content_hash(), cfg, "auto", pad)
        assert got is not None and np.array_equal(got.array, preprocess(real_read(target), cfg, "auto", pad).array)
    finally:
        p.close()
    assert made_log.read_text().split() == [str(target)], "the child made the input the engine took"


@pytest.mark.needs_data
def test_a_claims_lock_left_held_by_a_killed_process_is_waited_for_once_not_for_ever(monkeypatch):
    """The claims' lock is shared by both processes; a child killed while holding it (the OOM killer) used to leave
    the engine's ``ask`` waiting for ever, inside ``take``'s condition, which stalled the receiver too. The engine
    now waits ``LOCK_WAIT_S`` once, then never again, and gets its image."""
    monkeypatch.setattr(prefetch, "LOCK_WAIT_S", 1.0, raising=False)
    paths = [str(data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz")) for p in ("pt_215", "pt_232", "pt_202")]
    p = _start(paths, registered_preprocess("default"), registered_pad_multiple_zyx("default"),
               registered_local_stride_zyx("default"), in_turn=True)
    try:
        _wait_for(lambda: {str(x) for x in paths[:2]} <= p._settled, 60)  # the first pair is read
        taken_r, taken_w = os.pipe()
        holder = os.fork()
        if holder == 0:  # a process that takes the lock and is killed holding it
            p._claims._lock.acquire()
            os.write(taken_w, b"1")
            time.sleep(60)
            os._exit(0)
        os.close(taken_w)
        assert os.read(taken_r, 1) == b"1"  # it holds the lock now
        os.close(taken_r)
        os.kill(holder, 9)
        os.waitpid(holder, 0)
        assert _returns(lambda: p.image(paths[1]), "the engine waits for ever for a lock whose holder is gone") \
            is not None
        assert p._claims._broken  # it waited LOCK_WAIT_S once, then gave the lock up
        tries = []
        p._claims._lock.acquire = lambda *a, **k: tries.append(a) or False
        p.image(paths[0])
        assert tries == [], "the lock of a killed holder is waited for again"
    finally:
        p.close()


@pytest.mark.needs_data
def test_a_receiver_that_fails_says_so_and_stops_the_child(monkeypatch, caplog):
    """When the engine cannot take a result (here: mapping its array fails, as with every descriptor in use), it
    reads the rest itself; before, the failure was logged at debug level only and the child, whose pipe nobody read
    any more, stayed blocked on its next send, holding its memory, until the prefetch was closed."""
    paths = [str(data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz")) for p in ("pt_215", "pt_232", "pt_202")]

    def fails(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(prefetch, "_unpack", fails)
    p = _start(paths, registered_preprocess("default"), registered_pad_multiple_zyx("default"),
               registered_local_stride_zyx("default"), in_turn=True)
    try:
        _wait_for(lambda: not p._proc.is_alive(), 30)
        assert not p._proc.is_alive(), "the child still runs, its results unread"
        assert p.image(paths[0]) is None  # the engine reads it itself
        assert any(r.levelno == logging.WARNING and "Too many open files" in r.getMessage() for r in caplog.records)
    finally:
        p.close()


def _shadowed_pair(folder, image) -> tuple:
    """``image`` as ``scan.nii.gz`` with another ``scan.nii`` beside it, which ITK's reader would take instead: the
    reading goes through a link in a temporary folder of its own (``samembed.io._unshadowed``), with a warning."""
    from samembed.io import write_image

    gz = write_image(image, folder / "scan.nii.gz")
    write_image(dataclasses.replace(image, array=image.array[::-1].copy()), folder / "scan.nii")
    return gz


def _small_ct():
    from samembed.image import Image

    rng = np.random.default_rng(0)
    return Image.from_array(rng.integers(-1000, 1000, size=(40, 48, 56)).astype(np.int16), spacing_mm=(2.0, 2.0, 2.0))


def test_a_child_stopped_while_it_reads_through_a_link_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """The child reads a file that ITK cannot open by its own name through a link in a temporary folder; stopped
    by close()'s SIGTERM (or the OOM killer) in the middle, it ran no clean-up and left that folder, named by the
    patient's file, in /tmp (a review). Its temporary files are now in a folder the parent removes."""
    import tempfile

    import samembed.io as io

    data = tmp_path / "data"
    data.mkdir()
    scan = _shadowed_pair(data, _small_ct())
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    reading = temp / "reading"

    def held_up(path, sitk_path):  # inside the link's folder: stays until stopped
        part = temp / "reading.part"  # (whole when seen: the parent polls for it, and read it empty under load)
        part.write_text(str(sitk_path))
        os.replace(part, reading)
        time.sleep(60)

    monkeypatch.setattr(io, "read_nifti_gz", held_up)
    p = _start([scan], registered_preprocess("default"))
    try:
        end = time.monotonic() + 30
        while not reading.exists():
            assert time.monotonic() < end and p._proc.is_alive(), "the child did not start reading"
            time.sleep(0.01)
        link = reading.read_text()
        assert link.startswith(p._scratch) and os.path.lexists(link)
    finally:
        _returns(p.close, "close() waited for the child")
    assert p._proc.exitcode is not None and p._proc.exitcode < 0  # ended by a signal, as close() ends it
    assert sorted(x.name for x in temp.iterdir()) == ["reading"], "the child's temporary folder was left behind"


def test_a_warning_of_the_childs_reading_is_said_once_by_the_engine_and_not_for_a_read_that_failed(tmp_path, capfd):
    """The child warned on the command's stderr as it read; when its read failed, or the engine read the file
    itself, the engine's reading warned again (a review). The child's warnings now come with its image, and are
    said when the engine takes that image."""
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    good = _shadowed_pair(good_dir, _small_ct())
    bad = _shadowed_pair(bad_dir, _small_ct())
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF  # the gzip stream's CRC no longer matches: the child's read fails
    bad.write_bytes(bytes(data))
    stderr = logging.StreamHandler(sys.stderr)  # where the command's log goes (logging.basicConfig)
    logging.root.addHandler(stderr)
    try:
        p = _start([good, bad], registered_preprocess("default"))
        try:
            end = time.monotonic() + 30
            while {str(good), str(bad)} - p._settled:  # both read (or failed) by the child
                assert time.monotonic() < end, "the child did not read both"
                time.sleep(0.01)
            assert "lies beside it" not in capfd.readouterr().err, "the child said it on its own"
            assert p.image(str(bad)) is None
            assert "lies beside it" not in capfd.readouterr().err, "said for a read that failed"
            assert p.image(str(good)) is not None
            said = capfd.readouterr().err
        finally:
            _returns(p.close, "close() waited for the child")
    finally:
        logging.root.removeHandler(stderr)
    assert said.count("lies beside it") == 1 and str(good) in said, said


def test_no_shared_region_is_reserved_under_an_address_space_limit(monkeypatch):
    """The region reserved 1 GiB of address space before torch loaded, whatever ``ulimit -v`` allowed: under limits
    of 1.3-2.6 GB a run that fits without it failed (torch could not load, or allocate) (a review)."""
    import resource

    from samembed.prefetch import _arena_bytes

    assert _arena_bytes() > 0 or resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda which: (3 << 30, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert _arena_bytes() == 0


def test_a_memory_file_whose_descriptor_was_dropped_stops_the_handoff_instead_of_waiting_forever():
    """At its open-file limit the parent receives the message of an array without its descriptor (the kernel drops
    it): ``view`` went back to waiting, under the lock that the engine's own requests wait for (a review). It now
    fails, and the prefetch stops (the engine reads the rest itself)."""
    import threading

    from samembed.prefetch import _Handoff

    if not _Handoff.available():
        pytest.skip("memory files and descriptor passing are Linux's")
    h = _Handoff()
    try:
        h.child_end.send((0).to_bytes(8, "little"))  # array 0's datagram, its descriptor lost on the way
        failed: list[BaseException] = []

        def take():
            try:
                h.view(("memfd", "<f4", (2, 3), 0))
            except RuntimeError as e:
                failed.append(e)

        t = threading.Thread(target=take, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "view() still waits for a descriptor that will never come"
        assert failed and "came without its descriptor" in str(failed[0]) and "ulimit -n" in str(failed[0])
    finally:
        for end in (h.parent_end, h.child_end):
            end.close()
