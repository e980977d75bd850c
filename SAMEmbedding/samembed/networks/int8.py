"""``sam-lite``'s local branch with int8 convolutions on the CPU (``--precision int8``, the CPU default when the model
has a calibration).

On a CPU with VNNI (AVX-512 or AVX) oneDNN's int8 3 x 3 x 3 convolutions run 3-4x faster than float32 ones, and the
local branch's convolutions are most of an embedding's time. Every 3 x 3 convolution of the local branch takes 8-bit
inputs and weights:

* the input: the mapped intensities (about -50..205) rounded to integers, 16 HU steps of CT (finer than CT noise);
* weights: per output channel, symmetric int8, from the folded float32 weights (batch norms carried);
* activations: one scale per map (uint8), from :func:`calibrate` on a sample of training CTs, stored beside the
  weights (``<weights stem>.int8.json``, made by ``samembed quantize``); a ReLU's output has zero point 0, the signed
  FPN sum that feeds the output convolution its calibrated range;
* the 1 x 1 lateral and output convolutions, the additions and the normalisation stay float32.

The global branch runs in one of three arithmetics (``global_precision``):

* float32 (precision ``int8``);
* int8 (precision ``int8-int8``, the CPU default when the calibration has the global branch's scales): the 3 x 3 convolutions at 8, 16 and 32 mm (:data:`GLOBAL_POINTS`, about 85 % of the branch's
  work) take 8-bit inputs of scales calibrated with the local ones (the same sample of training CTs, chest and
  abdomen among them) and run about 2x faster than float32 even without VNNI (AVX2, one core: the global map of a
  whole head-and-neck CT volume 0.32 -> 0.19 s with the float32 layers and the conversions); the stem's first convolution (one input channel), the 64 mm stage, the lateral and
  output convolutions stay float32. Global vectors of a head-and-neck CT's body: cosine similarity to float32's
  0.99996 on average. An earlier trial, every layer in int8 with scales from head-and-neck CTs only, moved some chest
  CT points' search prior by up to 3.7 mm and was not kept; this one passed the ship gate (model cards);
* bfloat16 (precision ``int8-bf16``, the default on a CPU with native bfloat16 dot products, AVX-512 BF16 or AMX,
  :func:`native_bf16`, for a calibration without the global scales; int8's global map was 15 % faster on an AMD EPYC
  with AVX-512 BF16 and VNNI): oneDNN's bfloat16 3 x 3 x 3 convolutions accumulate in float32 and run about 2x faster than
  float32 ones; the input is pooled in float32 first and the map returned in float32 (cosine similarity of the
  global vectors to float32's at least 0.9998 on a head-and-neck CT).

Each value depends only on its inputs' integers and the fixed scales, so a tile's values equal the whole volume's (the
engine's on-demand tiles stay exact). They differ from float32 by the quantisation (cosine similarity of the local
vectors about 0.9996); the ship gate measures the matches (see the model card).
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .lite import (
    CoreCrop,
    SamLite,
    _pointwise,
    _up2,
    _up_add,
    core_cropper,
    fpn_top_in_slabs,
    pooled_input,
    space_to_depth,
)

#: the maps held in 8 bits: the outputs of the local encoder's 3 x 3 convolutions but the last (whose output, like the
#: output convolution's, is float32) and the FPN sum that the output convolution reads
LOCAL_POINTS = ("c0", "d1", "c1", "d2", "p0")
#: :data:`LOCAL_POINTS` of a local branch of two levels (``widths`` of two values), whose last 3 x 3 convolution
#: makes ``c1``
LOCAL_POINTS_2 = ("c0", "d1", "p0")


def local_points(net: SamLite) -> tuple[str, ...]:
    """The local maps that :class:`SamLiteInt8` holds in 8 bits for ``net`` (by its local branch's depth)."""
    return LOCAL_POINTS_2 if net.local_levels == 2 else LOCAL_POINTS


#: the modules of :class:`SamLite`'s global branch (what :meth:`SamLite.forward_global_pooled` runs)
GLOBAL_MODULES = ("g_stem", "g_down1", "g_down2", "g_down3", "g_lat", "g_out")
#: the global maps held in 8 bits with ``global_precision="int8"``: the inputs of the global branch's 3 x 3
#: convolutions at 8, 16 and 32 mm (the stem's second convolution, both of the 16 mm stage's, both of the 32 mm
#: stage's; about 85 % of the branch's work); the stem's first convolution (one input channel), the 64 mm stage,
#: the lateral and output convolutions stay float32
GLOBAL_POINTS = ("g0", "g1", "gd1", "gc1", "gd2")
#: the fraction of a map's calibration values below its scale's top (the rest clip): a high percentile keeps the
#: resolution of the bulk of the values while a few outliers saturate
CALIBRATION_QUANTILE = 0.99999


class _QConv:
    """One int8 convolution (oneDNN's ``qconv_pointwise``): its float32 conv's weights quantised per output channel
    (symmetric, int8), an 8-bit input of a fixed scale and zero point, and a ReLU fused or not.

    Args:
        conv: the float32 convolution (batch norm folded).
        x_qp: the input's (scale, zero point).
        relu: apply a ReLU to the output.
    """

    def __init__(self, conv: nn.Module, x_qp: tuple[float, int], relu: bool) -> None:
        w = conv.weight.detach().float().contiguous()
        amax = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12)
        self.w_scale = (amax / 127.0).float()
        shape = (-1,) + (1,) * (w.dim() - 1)
        wq = torch.round(w / self.w_scale.reshape(shape)).clamp_(-127, 127).to(torch.int8)
        self.w_zp = torch.zeros(w.shape[0], dtype=torch.long)
        self.bias = None if conv.bias is None else conv.bias.detach().float()
        self.args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.x_qp = (float(x_qp[0]), int(x_qp[1]))
        self.packed = torch.ops.onednn.qconv_prepack(wq, self.w_scale, *self.x_qp, *self.args, None)
        self.relu = relu

    def __call__(self, xq: torch.Tensor, out_qp: tuple[float, int] | None) -> torch.Tensor:
        """The convolution of the uint8 map ``xq``: a uint8 map of scale and zero point ``out_qp``, or, with
        ``out_qp=None``, float32 values."""
        # oneDNN fuses no ReLU into a 3D int8 convolution; a uint8 output of zero point 0 saturates at 0, which is
        # the ReLU, and a float32 output takes it after
        scale, zp, dtype = (1.0, 0, torch.float32) if out_qp is None else (out_qp[0], out_qp[1], None)
        if self.relu and zp != 0:
            raise ValueError("an int8 ReLU output needs zero point 0; calibrate the model again")
        y = torch.ops.onednn.qconv_pointwise(xq, *self.x_qp, self.packed, self.w_scale, self.w_zp, self.bias,
                                             *self.args, float(scale), int(zp), dtype, "none", [], None)
        return y.relu_() if self.relu and out_qp is None else y


def _quant(x: torch.Tensor, qp: tuple[float, int]) -> torch.Tensor:
    """A float32 map as uint8 of scale and zero point ``qp`` (round half to even, saturated), channels-last."""
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    q = torch.div(x, qp[0]).round_()
    if qp[1]:
        q += qp[1]
    return q.clamp_(0, 255).to(torch.uint8).contiguous(memory_format=fmt)


def _deq(q: torch.Tensor, qp: tuple[float, int]) -> torch.Tensor:
    """A uint8 map's float32 values (computed in the one new float32 map)."""
    f = q.to(torch.float32, copy=True)
    return (f.sub_(qp[1]) if qp[1] else f).mul_(qp[0])


class SamLiteInt8(nn.Module):
    """Inference-only int8 form of a folded :class:`SamLite` (see the module docstring).

    Args:
        net: the float32 network, batch norms folded (:func:`samembed.networks.base.inference_copy`); the wrapper's
            own: with ``global_precision="bf16"`` its global branch is converted to bfloat16 in place.
        qparams: map name -> (scale, zero point), from :func:`calibrate`.
        global_precision: the global branch's arithmetic: "fp32", "bf16" or "int8" (see the module docstring;
            "int8" needs the scales of :data:`GLOBAL_POINTS` in ``qparams``).
    """

    has_separate_global = True

    def __init__(self, net: SamLite, qparams: dict[str, tuple[float, int]], global_precision: str = "fp32") -> None:
        super().__init__()
        if global_precision not in ("fp32", "bf16", "int8"):
            raise ValueError(f"unknown global precision '{global_precision}'; use fp32, bf16 or int8")
        needed = local_points(net) + (GLOBAL_POINTS if global_precision == "int8" else ())
        missing = [k for k in needed if k not in qparams]
        if missing:
            raise ValueError(f"int8 calibration lacks the maps {missing}; calibrate the model again")
        self.net = net
        self.spec = net.spec
        self.input_scale = net.input_scale
        self.qp = {k: (float(v[0]), int(v[1])) for k, v in qparams.items()}
        #: the input (about -50..205) as integers 0..255: ``x * input_scale`` = (u - 50) * input_scale
        self.x_qp = (float(net.input_scale), 50)
        n, qp = net, self.qp
        self.q_local = {
            "c0": _QConv(n.l_stem[0], self.x_qp, True),
            "d1": _QConv(n.l_down1[0][0], qp["c0"], True), "c1": _QConv(n.l_down1[1][0], qp["d1"], True),
            "top": _QConv(n.l_out[0][0], qp["p0"], True),
        }
        if n.local_levels == 3:
            self.q_local["d2"] = _QConv(n.l_down2[0][0], qp["c1"], True)
            self.q_local["c2"] = _QConv(n.l_down2[1][0], qp["d2"], True)
        #: the output block's 3 x 3 convolution without padding along the first axis, for slabs that carry their
        #: own neighbouring planes (:meth:`_output_in_slabs`); volumes only
        self.q_top_slab = None
        if n.l_out[0][0].weight.dim() == 5:
            conv = copy.copy(n.l_out[0][0])
            conv.padding = (0, *conv.padding[1:])
            self.q_top_slab = _QConv(conv, qp["p0"], True)
        #: the global branch's arithmetic; in bfloat16 its modules of ``net`` (this wrapper's own copy) are converted
        #: in place
        self.global_precision = global_precision
        if global_precision == "bf16":
            for name in GLOBAL_MODULES:
                getattr(net, name).to(torch.bfloat16)
        #: the global branch's int8 convolutions (``global_precision="int8"``), each named by the map it reads
        self.q_global = {}
        if global_precision == "int8":
            self.q_global = {
                "g0": _QConv(n.g_stem[1][0], qp["g0"], True),
                "g1": _QConv(n.g_down1[0][0], qp["g1"], True), "gd1": _QConv(n.g_down1[1][0], qp["gd1"], True),
                "gc1": _QConv(n.g_down2[0][0], qp["gc1"], True), "gd2": _QConv(n.g_down2[1][0], qp["gd2"], True),
            }

    def forward_local_core(self, x: torch.Tensor, context_lo: tuple[int, ...], context_hi: tuple[int, ...],
                           out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`SamLite.forward_local_core` with int8 convolutions (same crops, same arguments)."""
        n, qp = self.net, self.qp
        crop = core_cropper(context_lo, context_hi)
        c0, p1, c0_context = self._encoder_core(x, crop)
        if c0.dim() == 5:  # the 4 mm level a few planes at a time, quantised for the output block
            p0q = fpn_top_in_slabs(lambda t: _pointwise(n.l_lat[0], _deq(t, qp["c0"])), c0, p1, crop,
                                   n.l_lat[0].weight.shape[0], torch.uint8, lambda level: _quant(level, qp["p0"]),
                                   c0_context=c0_context)
        else:  # a radiograph's maps are small
            p0q = _quant(_pointwise(n.l_lat[0], _deq(crop(c0, 2, c0_context, 2), qp["c0"])) + crop(_up2(p1), 2, 4, 2),
                         qp["p0"])
        del c0, p1
        if out is not None and self.q_top_slab is not None:
            return self._output_in_slabs(p0q, crop, out)
        top = self.q_local["top"](p0q, None)
        del p0q
        return _pointwise(n.l_out[1], crop(top, 2, 2, 0), channels_first=True, out=out)

    def _encoder_core(self, x: torch.Tensor, crop: CoreCrop) -> tuple[torch.Tensor, torch.Tensor, int]:
        """:meth:`SamLite._encoder_core` with int8 convolutions (the same crops): the uint8 stem map, its context
        (input voxels per side) and the float32 8 mm FPN level."""
        n, q, qp = self.net, self.q_local, self.qp
        big = 1 << 30
        if n.local_levels == 2:
            xq = _quant(crop(x, 1, big, 16), (1.0, 50))  # the intensities rounded to integers: 16 HU steps of CT
            c0 = q["c0"](space_to_depth(xq, 2).contiguous(memory_format=torch.channels_last_3d), qp["c0"])  # 4 mm
            del xq
            d1 = q["d1"](c0, qp["d1"])
            c1 = q["c1"](crop(d1, 4, 16, 8), None)  # the encoder's last map, float32
            del d1
            return c0, _pointwise(n.l_lat[1], crop(c1, 4, 8, 4)), 16
        xq = _quant(crop(x, 1, big, 28), (1.0, 50))
        c0 = q["c0"](space_to_depth(xq, 2).contiguous(memory_format=torch.channels_last_3d), qp["c0"])  # 4 mm
        del xq  # each map is dropped once read: the output layer runs with the fewest maps alive
        d1 = q["d1"](c0, qp["d1"])
        c1 = q["c1"](crop(d1, 4, 28, 24), qp["c1"])
        del d1
        d2 = q["d2"](c1, qp["d2"])
        c2 = q["c2"](crop(d2, 8, 24, 16), None)
        del d2
        p2 = _pointwise(n.l_lat[2], crop(c2, 8, 16, 8))
        del c2
        p1 = _pointwise(n.l_lat[1], _deq(crop(c1, 4, 24, 4), qp["c1"])) + crop(_up2(p2), 4, 8, 4)
        return c0, p1, 28

    def _output_in_slabs(self, p0q: torch.Tensor, crop: CoreCrop, out: torch.Tensor, planes: int = 8) -> torch.Tensor:
        """The output block (3 x 3 x 3 convolution, then the 1 x 1 one) written into ``out`` ``planes`` planes of
        the first axis at a time, each slab's convolution fed its neighbouring planes (or the zero point at the map's
        ends, as the whole map's padding): the 3 x 3 x 3 output map (float32, the size of the local map) is never
        held whole while ``out``, an embedding's feature rows, becomes resident. The integer convolution of a slab
        is the whole map's on those planes, so the values are the same, bit for bit (tested)."""
        n = self.net
        # what crop(top, 2, 2, 0) of forward_local_core keeps of the output block's map (p0q's shape)
        keep_z, *keep_yx = crop.slices(tuple(p0q.shape[2:]), 2, 2, 0)
        nz, z_lo, z_hi = p0q.shape[2], keep_z.start, keep_z.stop
        per = int(np.prod([s.stop - s.start for s in keep_yx]))
        zp = self.qp["p0"][1]
        for a in range(z_lo, z_hi, planes):
            b = min(z_hi, a + planes)
            src = p0q[:, :, max(0, a - 1):min(nz, b + 1)]
            pad = (int(a == 0), int(b == nz))  # the whole map's zero padding (the zero point) at its ends
            if any(pad):
                src = torch.nn.functional.pad(src, (0, 0, 0, 0, *pad), value=zp)
            top = self.q_top_slab(src.contiguous(memory_format=torch.channels_last_3d), None)  # (1, C, b - a, Y, X)
            _pointwise(n.l_out[1], top[(slice(None), slice(None), slice(None), *keep_yx)], channels_first=True,
                       out=out[:, (a - z_lo) * per:(b - z_lo) * per])
        return out.view(1, out.shape[0], z_hi - z_lo, *(s.stop - s.start for s in keep_yx))

    def forward_global(self, x: torch.Tensor, box: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The global map, float32, of ``x`` or of its part ``box`` (:meth:`SamLite.forward_global`): from the float32
        network, from its bfloat16 copy on the input pooled in float32, or with the int8 convolutions of
        :data:`GLOBAL_POINTS` (see the module docstring)."""
        if self.global_precision == "fp32":
            return self.net.forward_global(x, box)
        pooled = pooled_input(x.float(), box)
        if self.global_precision == "bf16":
            return self.net.forward_global_pooled(pooled.to(torch.bfloat16)).float()
        return self._forward_global_int8(pooled)

    def _forward_global_int8(self, x_pooled: torch.Tensor) -> torch.Tensor:
        """:meth:`SamLite.forward_global_pooled` with the 3 x 3 convolutions at 8, 16 and 32 mm in int8: the stem's
        first convolution in float32, its output quantised; each int8 convolution's uint8 output feeds the next; the
        16 mm map is read back as float32 by its lateral convolution, and the 32 mm stage's last convolution returns
        float32 for the 64 mm stage and its lateral convolution."""
        n, q, qp = self.net, self.q_global, self.qp
        g0 = _quant(n.g_stem[0](x_pooled * n.input_scale), qp["g0"])
        g1 = q["g0"](g0, qp["g1"])
        del g0
        d1 = q["g1"](g1, qp["gd1"])
        del g1
        c1 = q["gd1"](d1, qp["gc1"])  # the 16 mm map
        del d1
        d2 = q["gc1"](c1, qp["gd2"])
        g2 = q["gd2"](d2, None)  # the 32 mm map, float32
        del d2
        p3 = n.g_lat[2](n.g_down3(g2))
        p2 = _up_add(p3, n.g_lat[1](g2))
        del g2, p3
        p1 = _up_add(p2, n.g_lat[0](_deq(c1, qp["gc1"]).contiguous(memory_format=torch.channels_last_3d)))
        return n.g_out(p1)


def has_global_scales(qparams: dict | None) -> bool:
    """An int8 calibration (map name -> (scale, zero point), or None) has the global branch's scales
    (:data:`GLOBAL_POINTS`), which ``global_precision="int8"`` (precision "int8-int8") needs."""
    return qparams is not None and all(k in qparams for k in GLOBAL_POINTS)


@functools.cache
def native_bf16() -> bool:
    """This CPU computes bfloat16 dot products natively (AVX-512 BF16 or AMX, read from ``/proc/cpuinfo`` on Linux;
    False elsewhere), so oneDNN's bfloat16 convolutions are faster than float32 ones, not emulated."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) and torch.backends.mkldnn.is_available()


#: oneDNN's ISA caps (``ONEDNN_MAX_CPU_ISA``) that allow its AVX-512 VNNI (or AMX) int8 kernels, by prefix; the
#: AVX2 VNNI caps (``AVX2_VNNI``, ``AVX2_VNNI_2``) allow AVX-VNNI only
_CAPS_WITH_AVX512_VNNI = ("ALL", "DEFAULT", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16",
                          "AVX512_CORE_AMX", "AVX10")


@functools.cache
def int8_arithmetic() -> str:
    """Which of oneDNN's int8 convolution paths this process takes, as part of an int8 map's cache key.

    With VNNI (AVX-512 VNNI, AVX-VNNI) or AMX, the 8-bit products are summed in 32-bit integers ("vnni"); without
    it (AVX2, AVX-512 before VNNI), pairs of products are first summed in saturating 16-bit integers (``vpmaddubsw``,
    "no-vnni"), so the two paths give different maps for the same input: 31 % of a head-and-neck CT's values differ,
    by up to 0.056 (both engines' ``default`` model, the same calibration, ``ONEDNN_MAX_CPU_ISA=AVX2`` against an AMD
    EPYC with VNNI). Kept apart in the cache, a disk cache shared by machines of both kinds (a cluster's workers, a
    network folder) never serves one's tiles to the other, nor joins their tiles in one map. The CPU's features come
    from torch (``torch.cpu.get_capabilities``, on every platform); oneDNN's own cap, ``ONEDNN_MAX_CPU_ISA`` (read
    once per process, as oneDNN reads it), is honoured."""
    import os

    caps = torch.cpu.get_capabilities()
    avx512_vnni = bool(caps.get("avx512_vnni") or caps.get("amx_int8"))
    avx_vnni = bool(caps.get("avx_vnni"))
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    if cap.startswith(_CAPS_WITH_AVX512_VNNI):
        vnni = avx512_vnni or avx_vnni
    elif cap.startswith("AVX2_VNNI"):
        vnni = avx_vnni
    else:  # SSE41, AVX, AVX2, AVX512_CORE: no VNNI kernel
        vnni = False
    return "vnni" if vnni else "no-vnni"


# ------------------------------------------------------------------------------------------------ calibration
def _float_maps(net: SamLite, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every map :class:`SamLiteInt8` quantises (the global ones for volumes), from the float32 network on a whole
    input (1, 1, *shape)."""
    n = net
    m: dict[str, torch.Tensor] = {}
    m["c0"] = c0 = n.l_stem(space_to_depth(x * n.input_scale, 2))
    m["d1"] = d1 = n.l_down1[0](c0)
    c1 = n.l_down1[1](d1)
    p1 = n.l_lat[1](c1)
    if n.local_levels == 3:
        m["c1"] = c1
        m["d2"] = d2 = n.l_down2[0](c1)
        p1 = _up_add(n.l_lat[2](n.l_down2[1](d2)), p1)
    m["p0"] = _up_add(p1, n.l_lat[0](c0))
    if x.dim() == 5:  # the global branch's int8 maps (GLOBAL_POINTS), on the input pooled as forward_global pools it
        m["g0"] = g0 = n.g_stem[0](pooled_input(x) * n.input_scale)
        m["g1"] = g1 = n.g_stem[1](g0)
        m["gd1"] = d1 = n.g_down1[0](g1)
        m["gc1"] = c1 = n.g_down1[1](d1)
        m["gd2"] = n.g_down2[0](c1)
    return m


def calibrate(net: SamLite, inputs: Iterable[torch.Tensor], quantile: float = CALIBRATION_QUANTILE,
              max_samples: int = 2_000_000) -> dict[str, tuple[float, int]]:
    """Activation scales for :class:`SamLiteInt8`: each map's range over ``inputs`` (network inputs, (1, 1, *shape),
    sizes multiples of 8) at ``quantile`` (a random sample of up to ``max_samples`` values per map and input).

    Returns map name -> (scale, zero point) of uint8 values: a non-negative map (a ReLU's output) spans
    [0, its top], a signed one [its bottom, its top]."""
    # the local maps' samples come from a stream of their own, as before the global maps were calibrated too, so
    # their scales stay what they were
    gens = {"local": torch.Generator().manual_seed(0), "global": torch.Generator().manual_seed(1)}
    lows: dict[str, list[float]] = {}
    highs: dict[str, list[float]] = {}
    with torch.inference_mode():
        for x in inputs:
            for name, t in _float_maps(net, x).items():
                v = t.reshape(-1)
                if v.numel() > max_samples:
                    gen = gens["global" if name in GLOBAL_POINTS else "local"]
                    v = v[torch.randint(v.numel(), (max_samples,), generator=gen)]
                v = v.float()
                lows.setdefault(name, []).append(float(torch.quantile(v, 1.0 - quantile)))
                highs.setdefault(name, []).append(float(torch.quantile(v, quantile)))
    out: dict[str, tuple[float, int]] = {}
    for name in lows:
        lo, hi = min(0.0, float(np.median(lows[name]))), max(1e-6, float(np.median(highs[name])))
        scale = (hi - lo) / 255.0
        out[name] = (scale, int(round(-lo / scale)))
    return out


def save_qparams(path: str | Path, qparams: dict[str, tuple[float, int]], meta: dict) -> None:
    """Write the calibration next to a model (JSON: ``qparams`` and ``meta``, e.g. the calibration images); the
    engine reads it with :func:`samembed.models.read_int8_calibration`. Written atomically."""
    from ..io import write_text_atomic

    write_text_atomic(path, json.dumps({"qparams": {k: list(v) for k, v in qparams.items()}, "meta": meta}, indent=1))
