#!/usr/bin/env python
"""Would a lighter inference runtime make the cold pair 10x faster than B-spline? (issue 13)

The cold ``samembed match`` pair's floor is torch's import plus the network (``cold_start.md``). This measures the
one runtime that could replace torch for the network, onnxruntime, against the engine's own torch path, on the
shipped model, one thread, on real OpenKBP CTs:

* each library's import in a fresh interpreter (``numpy``, ``torch``, ``onnxruntime``; alternated, the median);
* the global branch of whole volumes: the engine's (``--precision auto``: bfloat16 where the CPU has it), torch
  float32, and onnxruntime float32 (onnxruntime's CPU provider has no bfloat16 convolutions);
* the local branch on one ±50 mm window's tile (a 48-voxel core with the 32-voxel halo): the engine's int8
  ``forward_local_core`` (each layer cropped to what the next reads), torch float32's, and onnxruntime running
  the same cropped layers (traced into its graph) in float32 and as a static int8 (QDQ) model calibrated on that
  tile (timing only: its accuracy is not measured).

The engine is not changed by this: it only says what the swap would gain. It needs ``onnx`` and ``onnxruntime``,
which the project does not install (``pip install onnx onnxruntime``)::

    OMP_NUM_THREADS=1 PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/lighter_runtime.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMEmbedding"))
sys.path.insert(0, str(REPO / "benchmarks"))

PATIENTS = ("pt_215", "pt_232", "pt_202")
CORE = 48  # input voxels: the core of a ±50 mm search window's tile (SamLite.forward_local_core)
HALO = 32
TILE = CORE + 2 * HALO  # the tile's input voxels per axis


def import_seconds(modules: tuple[str, ...], reps: int) -> dict[str, list[float]]:
    """Per module, the wall seconds of ``python -c 'import module'`` minus a bare interpreter's right after, in
    ``reps`` rounds of fresh processes, the modules alternating within each round (the VM's speed drifts)."""
    out: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(reps):
        for module in modules:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
            t1 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            out[module].append((t1 - t0) - (time.perf_counter() - t1))
    return out


def best_of(reps: int, fn, *args) -> tuple[float, object]:
    """The fastest of ``reps`` timed calls ``fn(*args)`` after one warm-up, and the last result."""
    res = fn(*args)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fn(*args)
        ts.append(time.perf_counter() - t0)
    return min(ts), res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/lighter_runtime.md")
    p.add_argument("--import-reps", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError as e:
        sys.exit(f"lighter_runtime.py needs onnx and onnxruntime, which the project does not install ({e}); "
                 "run `pip install onnx onnxruntime` in a separate environment")
    import numpy as np
    import torch
    import torch.nn.functional as F
    from samembed_bench.suites import data_root, require_data

    from samembed.embedding import Embedder
    from samembed.io import read_image, write_text_atomic
    from samembed.models import load_model
    from samembed.networks import lite
    from samembed.networks.base import inference_copy
    from samembed.preprocess import pad_to_multiple, preprocess

    torch.set_num_threads(1)
    root = data_root()
    require_data(root)
    imports = import_seconds(("numpy", "torch", "onnxruntime"), args.import_reps)

    model = load_model("default")
    engine = Embedder(model, precision="auto")
    fp32 = inference_copy(model.net).eval().for_inference()
    plain = inference_copy(model.net).eval()  # for the exporter: plain convolutions, contiguous weights
    for m in plain.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.__class__ = torch.nn.Conv3d
    plain = plain.to(memory_format=torch.contiguous_format)

    class Feeds(CalibrationDataReader):
        """The calibration inputs of onnxruntime's static quantisation."""

        def __init__(self, feeds: list[dict]) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    class Branch(torch.nn.Module):
        def __init__(self, net, name):
            super().__init__()
            self.net, self.name = net, name

        def forward(self, x):
            if self.name == "forward_local_core":  # the tile's core, each layer cropped as in the engine
                return self.net.forward_local_core(x, (HALO,) * 3, (HALO,) * 3)
            return getattr(self.net, self.name)(x)

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    scratch = tempfile.TemporaryDirectory(prefix="lighter_runtime_")  # the ONNX files, removed at the end
    tmp = Path(scratch.name)
    rows_g, rows_l = [], []
    sessions: dict[str, object] = {}
    for pat in PATIENTS:
        img = read_image(root / "ct" / "openkbp" / "ct" / f"{pat}_ct.nii.gz")
        prep = preprocess(img, model.preprocess, "ct", (8, 8, 8))
        arr = pad_to_multiple(prep.array, (8, 8, 8), prep.fill_value)
        x = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        if not sessions:
            for name in ("forward_global", "forward_local_core"):
                path = tmp / f"{name}.onnx"
                # the global branch for any volume; the local one for the tile's shape (its crops are traced)
                dyn = {"x": {2: "z", 3: "y", 4: "x"}, "y": {2: "z", 3: "y", 4: "x"}} if name == "forward_global" else None
                # the engine's 1 x 1 convolutions are matrix products on channels-last maps; plain 1 x 1
                # convolutions (the same arithmetic) for the exporter
                pointwise, lite._pointwise = lite._pointwise, lambda conv, t, channels_first=False, out=None: conv(t)
                try:
                    torch.onnx.export(Branch(plain, name), (x[..., :TILE, :TILE, :TILE].contiguous(),), str(path),
                                      input_names=["x"], output_names=["y"], dynamic_axes=dyn, dynamo=False)
                finally:
                    lite._pointwise = pointwise
                sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            ref = fp32.forward_global(x)
            t_eng, g_eng = best_of(args.reps, engine.net.forward_global, x)
            t_f32, _ = best_of(args.reps, fp32.forward_global, x)
            t_ort, g_ort = best_of(args.reps, sessions["forward_global"].run, None, {"x": x.numpy()})
        cos_eng, cos_ort = (float(F.cosine_similarity(torch.as_tensor(a).float(), ref, dim=1).min())
                            for a in (g_eng, g_ort[0]))
        rows_g.append((pat, tuple(arr.shape), t_eng, cos_eng, t_f32, t_ort, cos_ort))

        # one tile at the volume's centre: a CORE-voxel core (a multiple of 8) with its full halo on every side
        lo = [max(0, (n - TILE) // 16 * 8) for n in arr.shape]
        tile = x[(..., *(slice(a, a + TILE) for a in lo))].contiguous()
        ctx = (HALO,) * 3
        with torch.inference_mode():
            t_int8, _ = best_of(args.reps, engine.net.forward_local_core, tile, ctx, ctx)
            t_lf32, _ = best_of(args.reps, fp32.forward_local_core, tile, ctx, ctx)
        feed = {"x": tile.numpy()}
        t_ol, _ = best_of(args.reps, sessions["forward_local_core"].run, None, feed)
        qpath = tmp / f"local_int8_{pat}.onnx"
        quantize_static(str(tmp / "forward_local_core.onnx"), str(qpath), Feeds([feed]), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        qs = ort.InferenceSession(str(qpath), so, providers=["CPUExecutionProvider"])
        t_oq, _ = best_of(args.reps, qs.run, None, feed)
        rows_l.append((pat, TILE, t_int8, t_lf32, t_ol, t_oq))

    med = {m: statistics.median(v) for m, v in imports.items()}
    saved = med["torch"] - med["onnxruntime"]  # onnxruntime imports numpy itself
    lost = statistics.mean(r[5] - r[2] for r in rows_g)
    slower_lo, slower_hi = min(r[5] / r[2] for r in rows_l), max(r[5] / r[2] for r in rows_l)
    lines = [
        "# A lighter runtime for the cold pair: onnxruntime against the engine's torch (issue 13)",
        "",
        f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=SAMEmbedding:benchmarks python benchmarks/lighter_runtime.py`; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, one thread, the shipped model; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Times are the fastest of {args.reps} runs after a "
        "warm-up; imports the median of fresh interpreters (a bare interpreter's start subtracted).",
        "",
        "**Imports** (s, each run): " + "; ".join(
            f"`{m}` {med[m]:.2f} ({', '.join(f'{v:.2f}' for v in vals)})" for m, vals in imports.items()),
        "",
        "**Global branch, whole volume** (the engine pools in float32 and runs the rest in bfloat16 where the CPU has "
        "it; min cosine of the global vectors to torch float32's):",
        "",
        "| CT | input zyx | engine s | min cos | torch float32 s | onnxruntime float32 s | min cos |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(f"| {p} | {'x'.join(map(str, s))} | {a:.3f} | {ca:.5f} | {b:.3f} | {c:.3f} | {cc:.5f} |"
          for p, s, a, ca, b, c, cc in rows_g),
        "",
        f"**Local branch, one tile** ({CORE}-voxel core, {HALO}-voxel halo; the engine and torch float32 run each "
        "layer only where the next reads it, and so does onnxruntime (the crops traced into its graph); its int8 "
        "model is calibrated on the tile itself, for timing):",
        "",
        "| CT | tile input voxels | engine int8 s | torch float32 s | onnxruntime float32 s | onnxruntime int8 (QDQ) s |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {p} | {s}³ | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} |" for p, s, a, b, c, d in rows_l),
        "",
        f"**What the swap would give a cold pair:** {saved:.2f} s less importing, {2 * lost:+.2f} s for the two "
        f"global maps in onnxruntime float32 instead of the engine's, and local tiles {slower_lo:.1f}-{slower_hi:.1f}x "
        "slower in onnxruntime int8 than in the engine's int8 (a cold pair's own stage times are in `cold_start.md`); "
        "and the rest of the cold path (tile stores, prior, search, polish, round trip), which is torch today, would "
        "need a second implementation without torch.",
        "",
    ]
    scratch.cleanup()
    write_text_atomic(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
