"""The engine's processes import torch without its Python meta kernels (samembed.torch_import): the kernels stay out
until something asks for them, every architecture still builds on the meta device, and the command's matches are
the same as with torch imported whole. Each case runs in a fresh interpreter: torch's import happens once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO, data_file, hand_model, hand_radiographs

ENGINE = str(REPO / "SAMEmbedding")
META = "torch._meta_registrations"


def _fresh(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter with the engine importable; the JSON it prints last."""
    run_env = {k: v for k, v in os.environ.items() if k != "SAMEMBED_FULL_TORCH_IMPORT"}
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ENGINE!r})\n{code}"], check=True,
                         capture_output=True, text=True, env={**run_env, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


#: a convolution on meta tensors: torch runs it through a Python meta kernel, which only the skipped module registers
META_CONV = """
def meta_conv_runs():
    x = torch.empty(1, 2, 8, 8, device="meta")
    try:
        torch.nn.functional.conv2d(x, torch.empty(3, 2, 3, 3, device="meta"))
        return True
    except NotImplementedError:
        return False
"""


def test_the_meta_kernels_stay_out_until_imported_then_they_work():
    r = _fresh(f"""
import json, os, sys
from samembed.torch_import import after_torch_import, before_torch_import, meta_kernels_skipped
own_realpath = os.path.realpath
skips = before_torch_import()
memoised = os.path.realpath is not own_realpath
import torch
after_torch_import()
{META_CONV}
state = {{"skips": skips, "skipped": meta_kernels_skipped(), "prims": "torch._prims" in sys.modules,
          "module": {META!r} in sys.modules, "conv": meta_conv_runs(),
          "realpath": [memoised, os.path.realpath is own_realpath]}}
import torch._meta_registrations
state.update(conv_after=meta_conv_runs(), skipped_after=meta_kernels_skipped(),
             real=hasattr(torch._meta_registrations, "meta_index_Tensor"))
print(json.dumps(state))
""")
    # torch's import left the module out, and with it torch._prims (the bulk of what it costs)
    assert r["skips"] and r["skipped"] and not r["prims"]
    assert not r["module"]  # no placeholder left in sys.modules: an import loads the real module
    assert r["conv"] is False  # the control: this meta kernel is the skipped module's
    assert r["conv_after"] is True and r["real"] is True and r["skipped_after"] is False
    # os.path.realpath resolved each folder once while torch loaded (samembed.realpaths), and is Python's own again
    assert r["realpath"] == [os.name == "posix", True]


#: what needs the meta kernels and imports them only through torch's own import: each must work in a process that
#: left them out (a whole import's order of imports; the other order ends in circular imports)
NEEDS_META_KERNELS = {
    "torch._decomp": "import torch._decomp.decompositions",
    "torch._refs": "import torch._refs",
    "torch._dynamo": "import torch._dynamo",
    "torch.compile": "assert torch.compile(lambda x: x * 2, backend='eager')(torch.ones(2)).tolist() == [2.0, 2.0]",
    "fake tensors": "from torch._subclasses.fake_tensor import FakeTensorMode\nwith FakeTensorMode():\n"
                    "    assert torch.empty(2, 3).sum(0).shape == (3,)",
    "torch.broadcast_shapes (reads the torch._refs attribute)":
        "assert torch.broadcast_shapes((2, 1), (1, 3)) == (2, 3)",
}


@pytest.mark.parametrize(("use", "when"), [
    *((use, "after the engine's import") for use in NEEDS_META_KERNELS),
    # between torch's import and after_torch_import (the engine's own modules loading), imports work too; torch's
    # attributes of the left-out modules are placed only by after_torch_import
    *((use, "during the engine's import") for use in NEEDS_META_KERNELS if "attribute" not in use)])
def test_what_needs_the_meta_kernels_loads_them_first_and_works(use, when):
    code = NEEDS_META_KERNELS[use]
    before, after = (code, "") if when == "during the engine's import" else ("", code)
    r = _fresh(f"""
import json, sys
from samembed.torch_import import after_torch_import, before_torch_import, meta_kernels_skipped
before_torch_import()
import torch
{before}
after_torch_import()
skipped = meta_kernels_skipped()
{after}
{META_CONV}
print(json.dumps({{"skipped_before_use": skipped, "conv": meta_conv_runs(), "skipped": meta_kernels_skipped(),
                  "hooks_left": sum(type(h).__name__ == "_MetaKernelsFirst" for h in sys.meta_path)}}))
""")
    assert r["skipped_before_use"] is (when == "after the engine's import")
    assert r == {**r, "conv": True, "skipped": False, "hooks_left": 0}


def test_asking_a_placeholder_for_anything_loads_the_real_module():
    # the meta kernels' placeholder while torch loads, and torch._refs's after: each gives the real module's values
    r = _fresh(f"""
import json, sys
from samembed.torch_import import after_torch_import, before_torch_import
before_torch_import()
import torch
found = torch._meta_registrations.meta_index_Tensor  # asked before after_torch_import takes the placeholder away
after_torch_import()
{META_CONV}
print(json.dumps({{"found": callable(found), "conv": meta_conv_runs(), "attribute_is_module":
                  torch._meta_registrations is sys.modules[{META!r}], "refs": type(torch._refs).__name__}}))
""")
    assert r == {"found": True, "conv": True, "attribute_is_module": True, "refs": "module"}


def test_the_modules_the_engine_imports_while_matching_leave_the_meta_kernels_out():
    r = _fresh("""
import json, sys
from samembed.torch_import import LIGHT_MODULES, after_torch_import, before_torch_import, meta_kernels_skipped
before_torch_import()
import torch
after_torch_import()
new = [m for m in LIGHT_MODULES if m not in sys.modules]
import importlib
for m in sorted(LIGHT_MODULES):
    importlib.import_module(m)
import torch.utils.data  # loaded by torch's own import: no new module, nothing loads
print(json.dumps({"new": new, "skipped": meta_kernels_skipped()}))
""")
    assert r["new"], "these modules were already loaded: the check below checks nothing"
    assert r["skipped"] is True


@pytest.mark.parametrize("case", ["full import asked for", "torch already imported"])
def test_torch_is_imported_whole_when_asked_or_when_it_already_is(case):
    env = {"SAMEMBED_FULL_TORCH_IMPORT": "1"} if case == "full import asked for" else {}
    first = "import torch\n" if case == "torch already imported" else ""
    r = _fresh(f"""
import json, sys
{first}from samembed.torch_import import after_torch_import, before_torch_import, meta_kernels_skipped
skips = before_torch_import()
import torch
after_torch_import()
{META_CONV}
print(json.dumps({{"skips": skips, "skipped": meta_kernels_skipped(), "conv": meta_conv_runs()}}))
""", **env)
    assert r == {"skips": False, "skipped": False, "conv": True}


def test_every_architecture_builds_on_the_meta_device_without_the_meta_kernels():
    # load_model builds the network on the meta device (no random initialisation), then assigns the checkpoint's
    # weights: that needs only C++ meta kernels, for every architecture, with or without the semantic head
    code = """
import json
from samembed.torch_import import after_torch_import, before_torch_import, meta_kernels_skipped
before_torch_import()
import torch
after_torch_import()
from samembed.networks import build_network
shapes = {}
for arch, config in (("sam-lite", None), ("sam-lite-2d", None), ("sam-official", {"semantic": False}),
                     ("sam-official", {"semantic": True})):
    with torch.device("meta"):
        net = build_network(arch, config)
    shapes[f"{arch} {config}"] = {k: [list(v.shape), str(v.dtype), v.device.type] for k, v in net.state_dict().items()}
print(json.dumps({"skipped": meta_kernels_skipped(), "shapes": shapes}))
"""
    lean, whole = _fresh(code), _fresh(code, SAMEMBED_FULL_TORCH_IMPORT="1")
    assert lean["skipped"] is True and whole["skipped"] is False
    assert lean["shapes"] == whole["shapes"] and len(lean["shapes"]) == 4
    assert all(len(s) > 10 for s in lean["shapes"].values())


def _points_inside(image: Path, csv_path: Path, fractions: list[tuple[float, ...]], spacing_mm: float | None = None
                   ) -> Path:
    """Write a points file (LPS mm) at ``fractions`` of ``image``'s extent along each axis (xyz), with ``spacing_mm``
    instead of the file's own spacing when given (as ``--spacing``)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    size = reader.GetSize()
    rows = ["label,x,y,z"]
    for n, frac in enumerate(fractions):
        index = [f * (s - 1) for f, s in zip(frac, size)]
        if spacing_mm is None:
            img = sitk.Image([1] * len(size), sitk.sitkUInt8)
            img.SetOrigin(reader.GetOrigin()), img.SetSpacing(reader.GetSpacing()), img.SetDirection(reader.GetDirection())
            xyz = list(img.TransformContinuousIndexToPhysicalPoint(index))
        else:
            xyz = [i * spacing_mm for i in index]
        rows.append(",".join([f"P{n}", *(f"{v:.2f}" for v in (xyz + [0.0] * 3)[:3])]))
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def _match(args: list[str], out: Path, **env: str) -> subprocess.CompletedProcess:
    """``samembed match ... --out out -v`` as the command runs (``samembed.cli:run``), one torch thread."""
    run_env = {k: v for k, v in os.environ.items() if k != "SAMEMBED_FULL_TORCH_IMPORT"}
    res = subprocess.run([sys.executable, "-m", "samembed.cli", "match", *args, "--out", str(out), "--device", "cpu",
                          "-v"], capture_output=True, text=True, env={**run_env, "OMP_NUM_THREADS": "1", **env})
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.needs_data
def test_the_command_matches_a_real_ct_pair_as_with_torch_imported_whole(tmp_path):
    """The shipped CT model (its int8 local branch where this CPU runs it): the same output file bytes."""
    src = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    tgt = data_file("ct", "openkbp", "ct", "pt_232_ct.nii.gz")
    pts = _points_inside(src, tmp_path / "points.csv", [(0.5, 0.5, 0.5), (0.4, 0.55, 0.6), (0.6, 0.45, 0.45)])
    lean = _match([str(src), str(tgt), "--points", str(pts), "--heatmap-dir", str(tmp_path / "lean_heatmaps")],
                  tmp_path / "lean.csv")
    whole = _match([str(src), str(tgt), "--points", str(pts), "--heatmap-dir", str(tmp_path / "whole_heatmaps")],
                   tmp_path / "whole.csv", SAMEMBED_FULL_TORCH_IMPORT="1")
    assert "torch loaded without its Python meta kernels" in lean.stderr, lean.stderr
    # and nothing the match did needed them: they were never loaded (else the import's saving would be lost)
    assert "torch's Python meta kernels: never loaded" in lean.stderr, lean.stderr
    assert "torch loaded without" not in whole.stderr and "torch loaded" in whole.stderr, whole.stderr
    assert (tmp_path / "lean.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    heatmaps = sorted(p.name for p in (tmp_path / "lean_heatmaps").iterdir())
    assert len(heatmaps) == 3 and heatmaps == sorted(p.name for p in (tmp_path / "whole_heatmaps").iterdir())
    for name in heatmaps:
        assert (tmp_path / "lean_heatmaps" / name).read_bytes() == (tmp_path / "whole_heatmaps" / name).read_bytes()


@pytest.mark.needs_data
def test_the_command_matches_real_radiographs_as_with_torch_imported_whole(tmp_path):
    """The shipped 2D hand model, template hand into another hand: the same output file bytes."""
    model, images = hand_model(), hand_radiographs(2)
    pts = _points_inside(images[0], tmp_path / "points.csv", [(0.5, 0.5), (0.4, 0.6)], spacing_mm=0.2)
    common = [str(images[0]), str(images[1]), "--points", str(pts), "--spacing", "0.2", "--model", str(model),
              "--modality", "xray"]
    lean = _match(common, tmp_path / "lean.csv")
    _match(common, tmp_path / "whole.csv", SAMEMBED_FULL_TORCH_IMPORT="1")
    assert "torch loaded without its Python meta kernels" in lean.stderr, lean.stderr
    assert (tmp_path / "lean.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_a_probe_for_a_torch_module_finds_what_exists_only():
    """Once torch is in without its meta kernels, the import hook answered ``importlib.util.find_spec`` for every
    ``torch.*`` name, with no origin: a module that does not exist was "found" (a review)."""
    got = _fresh("""
import importlib.util, json
from samembed import cli
cli.engine_process_settings()
from samembed.api import Matcher  # noqa: F401 (torch)
from samembed.torch_import import after_torch_import, meta_kernels_skipped
after_torch_import()
skipped = meta_kernels_skipped()
missing = importlib.util.find_spec("torch.no_such_module")
real = importlib.util.find_spec("torch.utils.tensorboard")
print(json.dumps({"skipped": skipped, "missing": None if missing is None else missing.name,
                  "origin": None if real is None else real.origin, "still_skipped": meta_kernels_skipped()}))
""")
    assert got["missing"] is None, got
    if got["skipped"]:  # (with the hook: the real module's file, and a probe loads nothing)
        assert got["origin"] and got["origin"].endswith("__init__.py") and got["still_skipped"], got
