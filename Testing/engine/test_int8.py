"""The int8 local branch (``--precision int8``), with the global branch in int8 too (``int8-int8``, the CPU default
for a model whose calibration has the global branch's scales) or in bfloat16 (``int8-bf16``, where the CPU has native
bfloat16; the default there for a calibration without the global scales): they stay close to float32 on real CT, int8 tiles are as exact as float32's, the calibration is
tied to its weights, and the precision choice says what to do when a precision cannot run.

The whole-volume against on-demand equality of the int8 path is ``test_ondemand.py``'s (the default model runs int8
there); this file compares int8 with float32 and checks the calibration's life cycle.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from samembed import Matcher
from samembed.embedding import Embedder, resolve_precision
from samembed.errors import InputError
from samembed.io import read_image
from samembed.models import load_checkpoint, load_model, random_model
from samembed.quantize import qparams_path

from ..conftest import data_file, tile_with_context, two_level_default


@pytest.fixture(scope="module")
def ct():
    return read_image(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz"))


def _local_vectors(matcher: Matcher, image, lo, hi) -> torch.Tensor:
    maps = matcher.embed(image)
    maps.ensure(np.asarray(lo), np.asarray(hi))
    shape = maps.local_grid.shape_zyx
    box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    return maps.features[: maps.n_local].reshape(maps.n_local, *shape)[(slice(None), *box)].reshape(maps.n_local, -1)


@pytest.mark.needs_data
def test_the_shipped_model_runs_int8_on_the_cpu_close_to_float32(ct):
    """Local vectors of a head-and-neck CT's centre, int8 against float32: cosine similarity about 0.9996 (quantisation
    noise; the ship gate measures the matches); the global vectors are float32's, bit for bit."""
    i8 = Matcher("default", device="cpu", precision="int8")
    f32 = Matcher("default", device="cpu", precision="fp32")
    assert i8.embedder.precision == "int8" and f32.embedder.precision == "fp32"
    assert i8.embedder.key(ct) != f32.embedder.key(ct), "int8 and float32 maps must not share cache entries"
    shape = np.array(i8.embed(ct).local_grid.shape_zyx)
    lo, hi = shape // 2 - 8, shape // 2 + 7
    a, b = _local_vectors(i8, ct, lo, hi), _local_vectors(f32, ct, lo, hi)
    cos = (a * b).sum(0)  # unit vectors
    assert float(cos.mean()) > 0.999 and float(cos.min()) > 0.98, (float(cos.mean()), float(cos.min()))
    assert float(cos.min()) < 1.0 - 1e-6, "int8 gave float32's values: the int8 path did not run"
    assert torch.equal(i8.embed(ct).global_, f32.embed(ct).global_)


@pytest.mark.needs_data
def test_the_bfloat16_global_branch_stays_close_to_float32_where_the_cpu_has_it(ct):
    """Global vectors of a head-and-neck CT's body, bfloat16 against float32: cosine similarity at least 0.9995 (the
    ship gate measures the matches); the local vectors are int8's, bit for bit."""
    from samembed.networks.int8 import native_bf16

    if not native_bf16():
        pytest.skip("this CPU has no native bfloat16 (AVX-512 BF16 or AMX): int8-bf16 cannot run here")
    bf = Matcher("default", device="cpu", precision="int8-bf16")
    i8 = Matcher("default", device="cpu", precision="int8")
    assert bf.embedder.key(ct) != i8.embedder.key(ct), "the two precisions must not share cache entries"
    a, b = bf.embed(ct).global_, i8.embed(ct).global_
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    body = b.norm(dim=0) > 0  # the global map is computed over the body's box (zero beyond it)
    assert torch.equal(body, a.norm(dim=0) > 0)
    cos = (a * b).sum(0)[body]  # unit vectors
    assert float(cos.min()) > 0.9995, float(cos.min())
    assert float(cos.min()) < 1.0 - 1e-7, "bfloat16 gave float32's values: the bfloat16 path did not run"
    shape = np.array(bf.embed(ct).local_grid.shape_zyx)
    lo, hi = shape // 2 - 4, shape // 2 + 3
    assert torch.equal(_local_vectors(bf, ct, lo, hi), _local_vectors(i8, ct, lo, hi))


@pytest.mark.needs_data
def test_the_int8_global_branch_stays_close_to_float32_and_leaves_the_local_vectors_as_they_were(ct):
    """Global vectors of a head-and-neck CT's body (``int8-int8``) against float32's: cosine similarity 0.9999 on
    average and nowhere below 0.98 (quantisation noise; the ship gate measures the matches); the local vectors are
    int8's, bit for bit, and the two precisions keep separate cache entries."""
    g8 = Matcher("default", device="cpu", precision="int8-int8")
    i8 = Matcher("default", device="cpu", precision="int8")
    assert g8.embedder.precision == "int8-int8" and g8.embedder.net.global_precision == "int8"
    assert g8.embedder.key(ct) != i8.embedder.key(ct), "the two precisions must not share cache entries"
    a, b = g8.embed(ct).global_, i8.embed(ct).global_
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    body = b.norm(dim=0) > 0  # the global map is computed over the body's box (zero beyond it)
    assert torch.equal(body, a.norm(dim=0) > 0)
    cos = (a * b).sum(0)[body]  # unit vectors
    assert float(cos.mean()) > 0.9999 and float(cos.min()) > 0.98, (float(cos.mean()), float(cos.min()))
    assert float(cos.min()) < 1.0 - 1e-6, "int8 gave float32's values: the int8 global path did not run"
    shape = np.array(g8.embed(ct).local_grid.shape_zyx)
    lo, hi = shape // 2 - 4, shape // 2 + 3
    assert torch.equal(_local_vectors(g8, ct, lo, hi), _local_vectors(i8, ct, lo, hi))


_GLOBAL_MAP_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from samembed import Matcher
from samembed.io import read_image
from samembed.networks.int8 import int8_arithmetic
m = Matcher("default", device="cpu", precision="int8-int8")
ct = read_image(sys.argv[1])
np.save(sys.argv[2], m.embedder.embed(ct, on_demand=True).global_.numpy())
print(m.embedder.key(ct), int8_arithmetic())
"""


@pytest.mark.needs_data
def test_int8_maps_of_the_two_onednn_paths_are_kept_apart_in_the_cache(ct, tmp_path, monkeypatch):
    """oneDNN's int8 convolutions sum 8-bit products in 32-bit integers with VNNI and in saturating 16-bit pairs
    without it: the maps differ, so their cache keys must (a disk cache shared by machines of both kinds). The path
    without VNNI is forced with oneDNN's own cap, ONEDNN_MAX_CPU_ISA=AVX2; float32's key does not depend on it."""
    import os
    import subprocess
    import sys

    from samembed.networks import int8

    def run(cap: str | None) -> tuple[np.ndarray, str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        out = tmp_path / f"global_{cap}.npy"
        line = subprocess.run([sys.executable, "-c", _GLOBAL_MAP_SCRIPT, ct.name, str(out)], env=env, check=True,
                              capture_output=True, text=True).stdout.split()
        return np.load(out), line[-2], line[-1]

    if int8.int8_arithmetic() != "vnni":
        pytest.skip("this CPU has no VNNI (or oneDNN is capped below it): both runs would take the same int8 path")
    capped, capped_key, capped_path = run("AVX2")
    native, native_key, native_path = run(None)
    assert capped_path == "no-vnni"
    assert native_path == "vnni" and native_key != capped_key
    body = np.linalg.norm(native, axis=0) > 0
    assert not np.array_equal(native[:, body], capped[:, body]), "the two paths gave the same map: no need for two keys"
    f32 = Matcher("default", device="cpu", precision="fp32").embedder
    i8 = Matcher("default", device="cpu", precision="int8-int8").embedder
    assert i8.key(ct) == native_key
    keys = {}
    for path in ("vnni", "no-vnni"):
        monkeypatch.setattr(int8, "int8_arithmetic", lambda path=path: path)
        keys[path] = (f32.key(ct), i8.key(ct))
    assert keys["vnni"][0] == keys["no-vnni"][0] and keys["vnni"][1] != keys["no-vnni"][1]
    assert keys["vnni"][1] == native_key


@pytest.mark.parametrize(("features", "cap", "path"), [
    ({"avx512_vnni": True}, None, "vnni"),
    ({"avx512_vnni": True}, "AVX2", "no-vnni"),
    ({"avx512_vnni": True}, "avx512_core", "no-vnni"),  # AVX-512 before VNNI
    ({"avx512_vnni": True}, "AVX512_CORE_BF16", "vnni"),
    ({"avx512_vnni": True}, "AVX10_1_512", "vnni"),
    ({"avx512_vnni": True}, "AVX2_VNNI", "no-vnni"),  # only AVX-VNNI kernels allowed, and this CPU has none
    ({"avx_vnni": True}, None, "vnni"),  # AVX-VNNI without AVX-512
    ({"avx_vnni": True}, "AVX2_VNNI", "vnni"),
    ({"amx_int8": True}, "DEFAULT", "vnni"),
    ({"avx2": True}, None, "no-vnni"),
])
def test_the_int8_path_follows_the_cpu_and_onednns_cap(monkeypatch, features, cap, path):
    from samembed.networks import int8

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    int8.int8_arithmetic.cache_clear()
    try:
        assert int8.int8_arithmetic() == path
    finally:
        monkeypatch.undo()
        int8.int8_arithmetic.cache_clear()  # this process's own answer again


def test_the_int8_global_branch_needs_its_scales():
    from samembed.networks.base import inference_copy
    from samembed.networks.int8 import GLOBAL_POINTS, SamLiteInt8

    shipped = load_model("default")
    local_only = {k: v for k, v in shipped.int8.items() if k not in GLOBAL_POINTS}
    with pytest.raises(ValueError, match="lacks the maps.*calibrate the model again"):
        SamLiteInt8(inference_copy(shipped.net), local_only, global_precision="int8")
    with pytest.raises(ValueError, match="unknown global precision 'int4'"):
        SamLiteInt8(inference_copy(shipped.net), shipped.int8, global_precision="int4")
    assert SamLiteInt8(inference_copy(shipped.net), local_only).global_precision == "fp32"


@pytest.mark.needs_data
def test_an_int8_tile_equals_the_same_voxels_of_a_larger_tile(ct):
    """Integer arithmetic with fixed scales: a voxel's vector does not depend on the tile it was computed in."""
    m = Matcher("default", device="cpu")
    shape = np.array(m.embed(ct).local_grid.shape_zyx)
    lo, hi = shape // 2 - 4, shape // 2 + 3
    small = _local_vectors(m, ct, lo, hi)
    big = Matcher("default", device="cpu")  # a fresh map: the box below is computed as part of a larger tile
    inner = _local_vectors(big, ct, lo - 12, hi + 12).reshape(-1, *(hi - lo + 25))[:, 12:-12, 12:-12, 12:-12]
    assert float((small - inner.reshape(small.shape)).abs().max()) <= 1e-6


@pytest.mark.needs_data
def test_a_local_branch_of_two_levels_runs_int8_close_to_float32(ct):
    """The network without its local 16 mm level: its calibration holds its own maps (c1, its encoder's last, stays
    float32), and its int8 tile is close to float32's on a real CT."""
    from samembed.networks.base import inference_copy
    from samembed.networks.int8 import GLOBAL_POINTS, LOCAL_POINTS_2, SamLiteInt8, calibrate

    net = two_level_default()
    x = torch.from_numpy(np.ascontiguousarray(Embedder(load_model("default"), "cpu")._prepare(ct)[0]))[None, None]
    qparams = calibrate(net, [x])
    assert set(qparams) == set(LOCAL_POINTS_2) | set(GLOBAL_POINTS)
    q8, f32 = SamLiteInt8(inference_copy(net), qparams), inference_copy(net)
    core = [(40, 88), (64, 112), (56, 104)]
    tile = x[(slice(None), slice(None), *(slice(a - 16, b + 16) for a, b in core))]
    ctx = ((16,) * 3, (16,) * 3)
    with torch.inference_mode():
        a = torch.nn.functional.normalize(q8.forward_local_core(tile, *ctx), dim=1)
        b = torch.nn.functional.normalize(f32.forward_local_core(tile, *ctx), dim=1)
    assert a.shape == b.shape == (1, 64, 24, 24, 24)
    cos = (a * b).sum(1)
    assert float(cos.mean()) > 0.999 and float(cos.min()) > 0.98, (float(cos.mean()), float(cos.min()))
    assert float(cos.min()) < 1.0 - 1e-6, "int8 gave float32's values: the int8 path did not run"
    with pytest.raises(ValueError, match=r"lacks the maps \['c0'\]"):
        SamLiteInt8(inference_copy(net), {k: v for k, v in qparams.items() if k != "c0"})


def test_int8_tiles_of_a_local_branch_of_two_levels_are_the_whole_volumes_values():
    """Integer arithmetic with fixed scales and the two-level crops: each tile's core (16 input voxels of context,
    less at the volume's edges) equals the same voxels of the whole volume run as one tile, bit for bit."""
    from samembed.networks.base import inference_copy
    from samembed.networks.int8 import SamLiteInt8, calibrate

    net = two_level_default()
    g = torch.Generator().manual_seed(0)
    n = (72, 80, 64)
    x = torch.rand((1, 1, *n), generator=g) * 200 - 50  # the preprocessed CT range, about -50..205
    q8 = SamLiteInt8(inference_copy(net), calibrate(net, [x]))
    with torch.inference_mode():
        whole = q8.forward_local_core(x, (0,) * 3, (0,) * 3)
        for start, stop in (((24, 32, 24), (48, 56, 40)), ((0, 0, 0), (16, 24, 16)), ((48, 56, 40), n)):
            core = q8.forward_local_core(*tile_with_context(x, start, stop, q8.spec.tile_halo))
            ref = whole[(slice(None), slice(None), *(slice(s // 2, e // 2) for s, e in zip(start, stop)))]
            assert core.shape == ref.shape and float((core - ref).abs().max()) <= 1e-6, (start, stop)


def _tile_input(ct, precision: str, core: list[tuple[int, int]]):
    """The default model's network in ``precision`` and one tile of ``ct``'s network input: the input voxels ``core``
    ((start, stop) per axis, zyx) with 32 voxels of context per side (less at the volume's edge), and that context."""
    m = Matcher("default", device="cpu", precision=precision)
    x = torch.from_numpy(np.ascontiguousarray(m.embedder._prepare(ct)[0]))[None, None]
    xin, *ctx = tile_with_context(x, [a for a, _ in core], [b for _, b in core], 32)
    return m.embedder.net, xin, tuple(ctx)


@pytest.mark.needs_data
@pytest.mark.parametrize("z_core", [(0, 48), (48, 96)])  # at the volume's first plane (zero padding); inside it
def test_the_int8_output_block_in_slabs_writes_the_whole_blocks_values_into_the_feature_rows(ct, z_core):
    """A whole-plane tile writes its output straight into the voxel-major feature rows, its last two layers a few
    planes at a time (the 3 x 3 x 3 output map is never held whole): the values are the whole map's, bit for bit."""
    net, xin, ctx = _tile_input(ct, "int8", [z_core, (64, 112), (64, 112)])
    with torch.inference_mode():
        want = net.forward_local_core(xin, *ctx)[0]  # the whole output block at once
        rows = torch.full((want[0].numel(), want.shape[0] + 5), float("nan"))  # voxel-major, other channels beside
        net.forward_local_core(xin, *ctx, out=rows[:, : want.shape[0]].T)
    assert torch.equal(rows[:, : want.shape[0]].T.reshape(want.shape), want)
    assert bool(rows[:, want.shape[0]:].isnan().all()), "the slabs wrote outside their channels"


@pytest.mark.needs_data
@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("z_core", [(0, 48), (40, 88)])  # at the volume's first plane; inside, on an odd 4 mm plane
def test_the_top_fpn_level_in_slabs_is_the_whole_levels_bit_for_bit(ct, z_core, precision, monkeypatch):
    """The 4 mm FPN level is made a few planes at a time (no volume-sized float32 temporaries), in int8 and in
    float32: slabs of one plane, of three, and one slab of the whole level give the same local vectors, bit for
    bit."""
    from samembed.networks import lite

    net, xin, ctx = _tile_input(ct, precision, [z_core, (64, 112), (56, 104)])
    # one plane of the level's float32 map: 26 x 26 voxels here (the 24 of the core and one of context per side)
    plane_bytes = 4 * getattr(net, "net", net).l_lat[0].weight.shape[0] * 26 * 26  # the int8 form wraps the network
    outs = {}
    for planes in (1, 3, 10_000):
        monkeypatch.setattr(lite, "FPN_SLAB_BYTES", planes * plane_bytes)
        with torch.inference_mode():
            outs[planes] = net.forward_local_core(xin, *ctx)
    assert torch.equal(outs[1], outs[10_000]) and torch.equal(outs[3], outs[10_000])
    assert bool(torch.isfinite(outs[1]).all()) and float(outs[1].abs().amax()) > 0


def test_precision_choices_say_what_to_do_when_int8_cannot_run():
    model = random_model("sam-lite")  # no calibration
    cpu = torch.device("cpu")
    assert resolve_precision("auto", model, cpu) == "fp32"
    with pytest.raises(InputError, match="samembed quantize"):
        resolve_precision("int8", model, cpu)
    with pytest.raises(InputError, match="CPU only"):
        resolve_precision("int8", load_model("default"), torch.device("cuda"))
    with pytest.raises(InputError, match="unknown precision 'int4'"):
        Matcher(model, device="cpu", precision="int4")
    with pytest.raises(InputError, match="samembed quantize"):
        resolve_precision("int8-bf16", model, cpu)


@pytest.mark.parametrize("native", [False, True], ids=["no-bf16", "bf16"])
def test_auto_is_int8_int8_with_the_global_scales_and_int8_bf16_says_what_to_use(monkeypatch, native):
    """auto takes the int8 global branch wherever the calibration has its scales (faster than bfloat16 on a CPU with
    AVX-512 BF16 and VNNI); bfloat16 only for a calibration without them, on a CPU that has it."""
    import dataclasses

    from samembed.networks import int8

    monkeypatch.setattr(int8, "native_bf16", lambda: native)
    model, cpu = load_model("default"), torch.device("cpu")
    assert resolve_precision("auto", model, cpu) == "int8-int8"
    if native:
        assert resolve_precision("int8-bf16", model, cpu) == "int8-bf16"
    else:
        with pytest.raises(InputError, match="no native bfloat16.*--precision int8"):
            resolve_precision("int8-bf16", model, cpu)
    # a calibration made before the global branch's scales existed: auto keeps the global branch in float32 (or
    # bfloat16 where the CPU has it), and asking for int8-int8 says how to get them
    older = dataclasses.replace(model, int8={k: v for k, v in model.int8.items() if k not in int8.GLOBAL_POINTS})
    assert resolve_precision("auto", older, cpu) == ("int8-bf16" if native else "int8")
    assert resolve_precision("int8", older, cpu) == "int8"
    with pytest.raises(InputError, match="no scales for the global branch.*samembed quantize.*--precision int8"):
        resolve_precision("int8-int8", older, cpu)
    with pytest.raises(InputError, match="samembed quantize"):
        resolve_precision("int8-int8", random_model("sam-lite"), cpu)


def test_a_calibration_made_for_other_weights_is_ignored_with_a_warning(tmp_path, caplog):
    shipped = load_model("default")
    weights = tmp_path / "copy.pt"
    shutil.copy(shipped.info["file"], weights)
    shutil.copy(qparams_path(shipped.info["file"]), qparams_path(weights))
    assert load_checkpoint(weights).int8 == shipped.int8  # the same weights: the calibration applies
    other = json.loads(qparams_path(weights).read_text())
    other["meta"]["sha256"] = "0" * 64
    qparams_path(weights).write_text(json.dumps(other))
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(weights).int8 is None
    assert "made for other weights" in caplog.text and "samembed quantize" in caplog.text
    qparams_path(weights).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(weights).int8 is None
    assert "unusable int8 calibration" in caplog.text
    assert Embedder(load_checkpoint(weights), "cpu").precision == "fp32"


@pytest.mark.needs_data
def test_samembed_quantize_calibrates_a_checkpoint_that_then_runs_int8(tmp_path, capsys):
    """The command a model card names: a sample of the config's images, the scales beside the weights, and the
    engine picking them up (int8 by default on the CPU, a match that runs)."""
    from samembed.cli import main
    from samembed.models import save_checkpoint
    from samembed.preprocess import PreprocessConfig

    images = [data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (100, 101, 215)]
    weights = save_checkpoint(tmp_path / "tiny.pt", random_model("sam-lite").net, PreprocessConfig(fill="air"),
                              name="tiny")
    config = tmp_path / "train.yaml"
    config.write_text(f"data: [{images[0]}, {images[1]}, {images[2]}]\nexclude: ['pt_215_ct.nii.gz']\n")
    assert main(["quantize", "--config", str(config), "--model", str(weights), "--images", "5", "-q"]) == 0
    written = json.loads(qparams_path(weights).read_text())
    meta = written["meta"]
    assert meta["images"] == ["pt_100_ct.nii.gz", "pt_101_ct.nii.gz"], "the excluded image was used"
    from samembed.networks.int8 import GLOBAL_POINTS, LOCAL_POINTS

    assert set(written["qparams"]) == set(LOCAL_POINTS) | set(GLOBAL_POINTS)
    assert meta["sha256"] == load_checkpoint(weights).sha256
    m = Matcher(str(weights), device="cpu")
    assert m.embedder.precision == "int8-int8"
    ct = read_image(images[2])
    centre = ct.grid.index_to_lps(np.array([[64.0, 64.0, 64.0]]))
    assert np.isfinite(m.match(ct, centre, [ct]).matches[0].point_lps_mm).all()
    assert main(["quantize", "--config", str(tmp_path / "missing.yaml"), "--model", str(weights), "-q"]) != 0
    assert "missing.yaml: config file not found" in capsys.readouterr().err
    # --out on the weights themselves (or on any checkpoint name) is refused: they stay as they were
    kept = weights.read_bytes()
    for out in (weights, tmp_path / "other.pt"):
        assert main(["quantize", "--config", str(config), "--model", str(weights), "--out", str(out), "-q"]) == 2
        assert "names the model's weights" in capsys.readouterr().err
    assert weights.read_bytes() == kept and not (tmp_path / "other.pt").exists()
    # an --exclude that leaves no image says so (it said to run from the repository root); a config of another
    # architecture than the model's is named (a CT model on a 2D config failed deep in the padding)
    assert main(["quantize", "--config", str(config), "--model", str(weights), "--exclude", "pt_*", "-q"]) == 2
    assert "is excluded" in capsys.readouterr().err
    config_2d = tmp_path / "hand.yaml"
    config_2d.write_text(f"arch: sam-lite-2d\ndata: [{images[0]}]\n")
    assert main(["quantize", "--config", str(config_2d), "--model", str(weights), "-q"]) == 2
    assert "trains sam-lite-2d models, but --model" in capsys.readouterr().err


@pytest.mark.needs_data
def test_another_calibration_of_the_same_weights_or_the_gpu_autocast_gets_its_own_cache_entries(ct):
    """The key named the precision but not the calibration: `samembed quantize` run again with other settings (other
    scales for the same weights) was served the previous calibration's maps from the disk cache, 1.8 mm off in an
    audit. CUDA's float16 autocast likewise shared float32's key."""
    import dataclasses

    model = load_model("default")
    assert model.int8, "the shipped model has a calibration"
    other = dataclasses.replace(model, int8={k: (s * 1.01, z) for k, s_z in model.int8.items() for s, z in [s_z]})
    i8 = Embedder(model, "cpu", precision="int8")
    assert Embedder(model, "cpu", precision="int8").key(ct) == i8.key(ct)
    assert Embedder(other, "cpu", precision="int8").key(ct) != i8.key(ct)
    f32 = Embedder(model, "cpu", precision="fp32")
    autocast = Embedder(model, "cpu", precision="fp32")
    autocast.half = True  # as on a CUDA device
    assert autocast.key(ct) != f32.key(ct)


def test_a_precision_that_cannot_run_says_why_in_a_sentence():
    """\"precision int8: X is not a 3D sam-lite model, or use --precision fp32\" did not read (an audit)."""
    import torch

    from samembed.embedding import resolve_precision
    from samembed.models import random_model

    with pytest.raises(InputError, match=r"^precision int8: only 3D sam-lite models run in int8, and "
                                         r"random-sam-lite-2d-0 is not one; or use --precision fp32 \(or auto\)$"):
        resolve_precision("int8", random_model("sam-lite-2d"), torch.device("cpu"))
    with pytest.raises(InputError, match=r"has no int8 calibration beside its weights: run `samembed quantize"):
        resolve_precision("int8", random_model("sam-lite"), torch.device("cpu"))
