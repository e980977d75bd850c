"""Networks: the official SAM/SAMv2 layout key by key, checkpoint loading and its errors, sam-lite shapes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from samembed.errors import CheckpointError
from samembed.models import load_checkpoint, load_model, save_checkpoint
from samembed.networks import build_network
from samembed.preprocess import PreprocessConfig

from ..conftest import DATA, data_file, tile_with_context, two_level_default

#: the reference beside the shared data (``SAMEMBED_DATA/../reference``), else beside the repository
SPEC = next((p for p in (DATA.parent / "reference" / "sam_official_checkpoint.md",
                         Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "sam_official_checkpoint.md")
             if p.is_file()), DATA.parent / "reference" / "sam_official_checkpoint.md")


def spec_rows() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, 'both'|'SAMv2 only') rows of the reference table in section 1.3."""
    if not SPEC.is_file():
        pytest.skip(f"reference spec not available: {SPEC}")
    rows = []
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*\d+\s*\|\s*`([^`]+)`\s*\|\s*([^|]+)\|\s*[\d,]+\s*\|[^|]+\|\s*([^|]+?)\s*\|", line)
        if m:
            shape_txt = m.group(2).strip()
            shape = () if shape_txt.startswith("[]") else tuple(int(v) for v in shape_txt.strip("[] ").split(","))
            rows.append((m.group(1), shape, m.group(3)))
    return rows


def an_official_checkpoint(path: Path, semantic: bool) -> dict:
    """An mmcv-style checkpoint generated from the spec: every key and shape, random values, meta and optimizer."""
    rows = [r for r in spec_rows() if semantic or r[2] == "both"]
    g = torch.Generator().manual_seed(1)
    state = {}
    for key, shape, _ in rows:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    torch.save({"meta": {"mmdet_version": "2.20.0", "iter": 19999, "CLASSES": None},
                "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.02}]}}, path)
    return state


@pytest.mark.parametrize(("semantic", "entries", "params"), [(False, 138, 32_832_960), (True, 146, 33_333_184)])
def test_official_network_has_exactly_the_spec_keys_and_shapes(semantic, entries, params):
    rows = [r for r in spec_rows() if semantic or r[2] == "both"]
    assert len(rows) == entries
    net = build_network("sam-official", {"semantic": semantic})
    sd = net.state_dict()
    assert list(sd) == [k for k, _, _ in rows]  # same names, same order
    assert all(tuple(sd[k].shape) == shape for k, shape, _ in rows)
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize("semantic", [False, True])
def test_an_official_checkpoint_loads_without_mmcv(tmp_path, semantic):
    path = tmp_path / ("SAMv2_iter_20000.pth" if semantic else "SAM.pth")
    state = an_official_checkpoint(path, semantic)
    model = load_checkpoint(path)
    assert model.spec.arch == "sam-official"
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, state[k].to(v.dtype)), k
    x = torch.randn(1, 1, 16, 48, 40)
    with torch.no_grad():
        outs = model.net.forward_all(x)
    assert [tuple(o.shape) for o in outs[:2]] == [(1, 128, 8, 24, 20), (1, 128, 4, 3, 3)]
    assert len(outs) == (3 if semantic else 2)
    assert torch.allclose(outs[0].norm(dim=1), torch.ones(1), atol=1e-4)
    assert "official" not in model.info  # not one of the known SHA-256 values


@pytest.mark.parametrize(("shape", "fine", "coarse"), [((33, 97, 95), (16, 49, 48), (8, 7, 6)), ((7, 50, 21), (3, 25, 11), (2, 4, 2))])
def test_official_output_sizes_match_the_worked_examples(shape, fine, coarse):
    net = build_network("sam-official").eval()
    with torch.no_grad():
        loc, glob = net(torch.zeros(1, 1, *shape))
    assert tuple(loc.shape[2:]) == fine and tuple(glob.shape[2:]) == coarse


def test_a_checkpoint_of_another_architecture_lists_the_mismatches(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"encoder.conv1.weight": torch.zeros(8, 1, 3, 3, 3)}}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "foreign.pth" in msg and "missing keys" in msg and "unexpected keys" in msg
    # sam-lite weights without a samembed checkpoint's facts are said to be so, not listed as mismatches
    torch.save({"state_dict": build_network("sam-lite").state_dict()}, tmp_path / "lite_as_official.pth")
    with pytest.raises(CheckpointError, match="lite_as_official.pth: holds sam-lite weights alone"):
        load_checkpoint(tmp_path / "lite_as_official.pth")


def test_a_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "bad_shape.pth"
    state = an_official_checkpoint(path, False)
    state["neck.fpn_convs.0.conv.weight"] = torch.zeros(64, 128, 3, 3, 3)
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"neck.fpn_convs.0.conv.weight: checkpoint \[64, 128, 3, 3, 3\], expected \[128, 128, 3, 3, 3\]"):
        load_checkpoint(path)


def test_a_corrupt_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 definitely not a torch file")
    with pytest.raises(CheckpointError, match="corrupt.pt: cannot read checkpoint"):
        load_checkpoint(path)
    path.write_text("not a model at all\n")  # another kind of file: said so, without torch's unpickling advice
    with pytest.raises(CheckpointError, match=r"corrupt.pt: cannot read checkpoint: not a PyTorch file") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value)


class TrainingNotes:
    """An object of a class of its own, as training scripts pickle into checkpoints (only torch's full unpickler,
    which imports and runs code named in the file, reads it)."""


def test_a_checkpoint_of_python_objects_is_refused_without_running_them(tmp_path):
    """A pickle with objects beyond tensors needs torch's full unpickler, which runs code from the file: refused for
    a file that is not a known official release, with what to do instead, never loaded that way."""
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": {}, "extra": TrainingNotes()}, path)
    with pytest.raises(CheckpointError, match=r"objects.pt: cannot read checkpoint: it holds Python objects besides "
                                              r"tensors .* save its weights alone"):
        load_checkpoint(path)


def test_a_samembed_checkpoint_restores_architecture_and_preprocessing(tmp_path):
    net = build_network("sam-lite", {"fpn_channels": 16, "local_channels": 32})
    prep = PreprocessConfig(spacing_mm=3.0, fill="air")
    path = save_checkpoint(tmp_path / "mine.pt", net, prep, name="mine", half=True)
    model = load_model(str(path))
    assert model.preprocess == prep and model.spec.local_channels == 32 and model.model_id.startswith("mine@")
    # built without initialisation, every tensor is the checkpoint's (stored in half precision), as float32
    saved = net.state_dict()
    for k, v in model.net.state_dict().items():
        assert not v.is_meta and v.dtype == saved[k].dtype, k
        assert torch.equal(v, saved[k].half().to(v.dtype) if v.is_floating_point() else saved[k]), k
    with pytest.raises(CheckpointError, match="holds architecture 'sam-lite'"):
        load_checkpoint(path, arch="sam-official")


def test_sam_lite_maps_are_unit_vectors_on_the_documented_grids():
    net = build_network("sam-lite").eval()
    with torch.no_grad():
        loc, glob = net(torch.randn(1, 1, 32, 48, 64) * 50)
    assert tuple(loc.shape) == (1, 64, 16, 24, 32) and tuple(glob.shape) == (1, 64, 4, 6, 8)
    np.testing.assert_allclose(loc.norm(dim=1).numpy(), 1.0, atol=1e-5)
    net2d = build_network("sam-lite-2d").eval()
    with torch.no_grad():
        loc2, glob2 = net2d(torch.randn(1, 1, 64, 48))
    assert tuple(loc2.shape) == (1, 64, 32, 24) and tuple(glob2.shape) == (1, 64, 8, 6)


def test_the_inference_copy_folds_batch_norms_and_embeds_as_the_trained_network():
    from samembed.networks.base import inference_copy

    net = load_model("default").net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = inference_copy(net)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert n_bn > 0 and not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    # every convolution takes oneDNN, whatever PyTorch's routing would pick for its size
    from samembed.networks.lite import OneDnnConv3d

    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m) is OneDnnConv3d for m in convs)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 48, 56, 40) * 60
    with torch.inference_mode():
        for a, b in zip(net(x), fused(x)):
            assert float((a - b).abs().max()) <= 1e-5
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the trainable network was changed"


def test_adding_the_upsampled_coarser_level_in_place_is_adding_its_upsampled_crop_bit_for_bit():
    """The FPN's top level adds the coarser level without upsampling it (``add_upsampled_``): for every start and
    size of the finer part, odd or even, in 2D and 3D, channels-first or channels-last, the sums are those of adding
    the crop of ``F.interpolate(coarse, scale_factor=2)``, bit for bit."""
    from samembed.networks.lite import add_upsampled_

    g = torch.Generator().manual_seed(0)
    for trial in range(240):
        nd = 3 if trial % 3 else 2
        fmt = torch.channels_last_3d if nd == 3 else torch.channels_last
        sizes = [int(v) for v in torch.randint(1, 7, (nd,), generator=g)]
        coarse = torch.randn(1, 4, *sizes, generator=g)
        start = [int(torch.randint(0, 2 * c, (1,), generator=g)) for c in sizes]
        n = [int(torch.randint(1, 2 * c - s + 1, (1,), generator=g)) for c, s in zip(sizes, start)]
        fine = torch.randn(1, 4, *n, generator=g)
        if trial % 2:
            coarse = coarse.contiguous(memory_format=fmt)
        if trial % 4 == 1:
            fine = fine.contiguous(memory_format=fmt)
        up = torch.nn.functional.interpolate(coarse, scale_factor=2.0, mode="nearest")
        want = fine + up[(slice(None), slice(None), *(slice(s, s + k) for s, k in zip(start, n)))]
        got = fine.clone()
        assert add_upsampled_(got, coarse, tuple(start)) is got
        assert torch.equal(got, want), (sizes, start, n)


def test_a_local_branch_of_two_levels_has_half_the_halo_and_the_default_s_other_layers():
    net = two_level_default()
    assert net.spec.tile_halo == 16 and net.local_levels == 2 and net.spec.config["widths"] == [32, 64]
    assert not hasattr(net, "l_down2") and len(net.l_lat) == 2
    assert load_model("default").net.spec.tile_halo == 32
    with pytest.raises(ValueError, match="2 or 3 levels"):
        build_network("sam-lite", {"widths": [32]})
    # a checkpoint of it rebuilds the same network (the config holds the two widths)
    rebuilt = build_network("sam-lite", net.spec.config)
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 32, 32, 32) * 60
    with torch.inference_mode():
        assert torch.equal(rebuilt.eval().forward_local(x), net.forward_local(x))


def _core_test_net(model_name: str) -> torch.nn.Module:
    if model_name == "two-level":
        return two_level_default()
    if model_name == "two-level-2d":  # random weights: the crops do not depend on them
        torch.manual_seed(0)
        return build_network("sam-lite-2d", {"widths": [16, 32]}).eval()
    return load_model(model_name).net  # all ship with the repository


@pytest.mark.parametrize("model_name", ["default", "sam-lite-ct-fast", "sam-lite-2d-hand", "two-level", "two-level-2d"])
def test_the_core_of_a_tile_is_the_whole_map_there_and_the_output_layer_runs_on_the_core_only(model_name):
    """``forward_local_core`` crops each layer to what the next ones read; the core must equal the whole map's
    voxels, for tiles inside the volume and tiles clipped at its edges (less context on one side), with the
    network's own halo (32 input voxels, 16 for a local branch of two levels)."""
    from samembed.networks.base import inference_copy

    net = inference_copy(_core_test_net(model_name))
    nd = net.spec.ndim
    n = (88, 96, 80)[:nd] if nd == 3 else (200, 168)
    torch.manual_seed(0)
    x = torch.randn(1, 1, *n) * 60
    halo, stride = net.spec.tile_halo, net.spec.local_stride[0]
    cases = [((40,) * nd, (56,) * nd), ((0,) * nd, (16,) * nd), (tuple(s - 24 for s in n), n),
             ((8,) + (32,) * (nd - 1), (24,) + tuple(s - 8 for s in n[1:]))]
    out_sizes = []
    net.l_out[0].register_forward_hook(lambda m, i, o: out_sizes.append(tuple(o.shape[2:])))
    with torch.inference_mode():
        whole = net.forward_local(x)
        for start, stop in cases:
            core = net.forward_local_core(*tile_with_context(x, start, stop, halo))
            ref = whole[(slice(None), slice(None), *(slice(s // stride, e // stride) for s, e in zip(start, stop)))]
            assert core.shape == ref.shape, (start, stop)
            assert float((core - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (start, stop)
            # the output convolution ran on the core and one voxel around it, not on the tile with its halo
            ran = out_sizes[-1]
            assert all(r <= (e - s) // stride + 2 for r, s, e in zip(ran, start, stop)), (ran, start, stop)


@pytest.mark.needs_data
def test_the_global_input_of_a_box_is_the_pooled_box_bit_for_bit():
    """The global branch pools the whole input and cuts the body's box from the pooled map (no copy of a strided box):
    the values of pooling the box itself, bit for bit, on a real head-and-neck CT; a box off the pool's grid is
    refused."""
    from samembed.embedding import Embedder, global_box
    from samembed.io import read_image
    from samembed.networks.lite import GLOBAL_POOL, pooled_input
    from samembed.preprocess import body_mask_on_grid

    embedder = Embedder(load_model("default"), "cpu")
    arr = embedder._prepare(read_image(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")))[0]
    x = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    box = global_box(body_mask_on_grid(arr, (2, 2, 2), "ct"), (2, 2, 2), (8, 8, 8), 16, tuple(x.shape[2:]))
    assert box is not None and any(b.stop - b.start < n for b, n in zip(box, x.shape[2:])), "the body fills the input"
    want = torch.nn.functional.avg_pool3d(x[(slice(None), slice(None), *box)], GLOBAL_POOL)
    assert torch.equal(pooled_input(x, box), want)
    assert torch.equal(pooled_input(x), torch.nn.functional.avg_pool3d(x, GLOBAL_POOL))
    with pytest.raises(ValueError, match="multiples of 4"):
        pooled_input(x, (slice(2, 10), *box[1:]))
