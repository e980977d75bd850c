"""``sam-lite``: a small CPU-friendly SAM network with separate local and global branches.

Design for the CPU (2 cores):

* **Local branch** (fine structure). The 2 mm input is folded into channels (space-to-depth, factor 2,
  lossless), so no convolution runs at full resolution. A three-level encoder (4, 8, 16 mm) and an FPN
  top-down path give a ``local_channels`` map at 4 mm (stride 2). Its receptive field is about 60
  input voxels, so the engine can tile it with a 32-voxel halo and get the untiled result exactly. A
  two-level encoder (4, 8 mm; ``widths`` of two values) needs a 16-voxel halo (:data:`LOCAL_HALO`).
* **Global branch** (coarse body position). The input is average-pooled to 8 mm, and a four-level
  encoder (8 to 64 mm) with dilated convolutions sees most of the body; an FPN path returns a
  ``global_channels`` map at 16 mm (stride 8). It runs on the whole volume (cheap at 8 mm).

The same code builds a 2D network (``ndim=2``) for radiographs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import EmbeddingNet, NetSpec


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _bn(ndim: int):
    return nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d


class ConvBNReLU(nn.Sequential):
    """k x k (x k) convolution, batch norm, ReLU."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(
            _conv(ndim)(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            _bn(ndim)(cout),
            nn.ReLU(inplace=True),
        )


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Fold ``factor``-sized blocks of the spatial axes into channels (2D or 3D; sizes must divide)."""
    if x.dim() == 4:
        return F.pixel_unshuffle(x, factor)
    n, c, d, h, w = x.shape
    f = factor
    x = x.reshape(n, c, d // f, f, h // f, f, w // f, f)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(n, c * f**3, d // f, h // f, w // f)


#: the global branch's input is the network input average-pooled by this factor per axis (2 mm -> 8 mm)
GLOBAL_POOL = 4


def pooled_input(x: torch.Tensor, box: tuple[slice, ...] | None = None) -> torch.Tensor:
    """The global branch's input: ``x`` (N, C, *spatial) average-pooled by :data:`GLOBAL_POOL`, over its part ``box``
    (spatial slices whose ends are multiples of the pool) when given.

    The whole input is pooled and the pooled map cut to the box: each pooled voxel is the mean of its own window,
    which lies inside the box, so the values are those of pooling the box, bit for bit (tested), without the
    copy that pooling a strided part of ``x`` makes first (33-50 MB for a head-and-neck CT's body box, fresh memory
    in a process that has not yet freed that much)."""
    pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
    pooled = pool(x, GLOBAL_POOL)
    if box is None:
        return pooled
    if any(b.start % GLOBAL_POOL or b.stop % GLOBAL_POOL for b in box):
        raise ValueError(f"the box's ends must be multiples of {GLOBAL_POOL}, not {box}")
    return pooled[(slice(None), slice(None), *(slice(b.start // GLOBAL_POOL, b.stop // GLOBAL_POOL) for b in box))]


#: the local branch's tile halo (input voxels of context per side that reproduce the untiled map), by its number of
#: levels: three (4, 8, 16 mm) need 32, two (4, 8 mm) 16 (:meth:`SamLite.forward_local_core`'s crops)
LOCAL_HALO = {3: 32, 2: 16}

#: the weight names of a three-level local branch's 16 mm level (its encoder stage and its lateral convolution): what a
#: local branch of two levels leaves out, so a two-level network can start from a three-level one's other layers
LOCAL_16MM_WEIGHTS = ("l_down2.", "l_lat.2.")

#: float32 bytes of one slab of the FPN's top (4 mm) level (:func:`fpn_top_in_slabs`): a few MB, reused from slab to
#: slab
FPN_SLAB_BYTES = 4 << 20


def fpn_top_in_slabs(lateral: Callable[[torch.Tensor], torch.Tensor], c0: torch.Tensor, p1: torch.Tensor,
                     crop: CoreCrop, channels: int, dtype: torch.dtype,
                     finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     c0_context: int = 28) -> torch.Tensor:
    """The FPN's top (4 mm) level of a volume's tile, ``finish(lateral(crop(c0)) + crop(_up2(p1)))`` with the crops
    of :meth:`SamLite.forward_local_core`, made a few planes of the first axis at a time (:data:`FPN_SLAB_BYTES` of
    float32 per slab) into one channels-last map of ``channels`` and ``dtype``: ``c0`` is the stem map (with
    ``c0_context`` input voxels of context per side, at most), ``p1`` the 8 mm level, ``lateral`` the lateral 1 x 1
    convolution (with its input's dequantisation in int8) and ``finish`` what follows the sum (int8: its
    quantisation; none: the float32 sum).

    Made whole, the lateral map, the upsampled coarser level and their sum (with int8, also the dequantised stem map
    and the sum's scaled copy) are float32 maps the size of the local map (a chest CT's 32 channels: 91 MB each),
    above the size that the allocator reuses (:mod:`samembed.allocator`): fresh memory that the system faults in and
    zeroes every time. Slabs of a few MB are reused. Every step is per voxel (the 1 x 1 convolution a product per
    voxel), and the coarser level is added where it lies without being upsampled (:func:`add_upsampled_`: the same
    sums), so the map is the whole level's, bit for bit (tested)."""
    c0c = crop(c0, 2, c0_context, 2)
    up = crop.slices(tuple(2 * s for s in p1.shape[2:]), 2, 4, 2)  # the kept part of the upsampled 8 mm level
    planes = max(1, FPN_SLAB_BYTES // (4 * channels * int(np.prod(c0c.shape[3:]))))
    out = torch.empty((c0c.shape[0], channels, *c0c.shape[2:]), dtype=dtype, device=c0c.device,
                      memory_format=torch.channels_last_3d)
    for a in range(0, c0c.shape[2], planes):
        b = min(c0c.shape[2], a + planes)
        level = lateral(c0c[:, :, a:b])
        add_upsampled_(level, p1, (up[0].start + a, *(s.start for s in up[1:])))
        out[:, :, a:b] = level if finish is None else finish(level)
    return out


def add_upsampled_(fine: torch.Tensor, coarse: torch.Tensor, start: tuple[int, ...]) -> torch.Tensor:
    """``fine += crop(_up2(coarse))`` in place, without the upsampled map: ``fine`` (N, C, *spatial) is the part of
    the twice finer grid that starts at voxel ``start`` (fine voxels, per spatial axis), and each of its voxels gains
    the value of the coarse voxel it lies in (nearest-neighbour upsampling by 2, as ``F.interpolate``). Done as one
    strided addition per parity of the fine voxels along each axis (4 in 2D, 8 in 3D): the same sums, bit for bit,
    as adding the upsampled crop (tested), without writing and reading an upsampled map the size of ``fine``."""
    for parity in itertools.product((0, 1), repeat=fine.dim() - 2):
        dst, src = [slice(None)] * 2, [slice(None)] * 2
        for n, s, p in zip(fine.shape[2:], start, parity):
            # fine voxels p, p + 2, ... lie in consecutive coarse voxels, from the one that holds fine voxel p
            dst.append(slice(p, n, 2))
            src.append(slice((s + p) // 2, (s + p) // 2 + len(range(p, n, 2))))
        if all(d.start < n for d, n in zip(dst[2:], fine.shape[2:])):
            fine[tuple(dst)].add_(coarse[tuple(src)])
    return fine


def _up_add(coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    return fine + F.interpolate(coarse, size=fine.shape[2:], mode="nearest")


def _up2(t: torch.Tensor) -> torch.Tensor:
    return F.interpolate(t, scale_factor=2.0, mode="nearest")


class CoreCrop:
    """The crop of :meth:`SamLite.forward_local_core` for a tile with ``context_lo`` / ``context_hi`` input voxels of
    context per side: ``crop(t, unit, have, keep)`` cuts a map ``t`` that holds min(context, ``have``) input voxels
    of context per side, ``unit`` input voxels per map voxel, down to min(context, ``keep``); :meth:`slices` gives
    the kept range of each spatial axis without cutting."""

    def __init__(self, context_lo: tuple[int, ...], context_hi: tuple[int, ...]) -> None:
        self.ctx = (tuple(int(v) for v in context_lo), tuple(int(v) for v in context_hi))

    def slices(self, shape: tuple[int, ...], unit: int, have: int, keep: int) -> tuple[slice, ...]:
        """The kept range of each axis of a map of spatial ``shape``."""
        out = []
        for ax, size in enumerate(shape):
            drop = [(min(c[ax], have) - min(c[ax], keep)) // unit for c in self.ctx]
            out.append(slice(drop[0], size - drop[1]))
        return tuple(out)

    def __call__(self, t: torch.Tensor, unit: int, have: int, keep: int) -> torch.Tensor:
        return t[(slice(None), slice(None), *self.slices(tuple(t.shape[2:]), unit, have, keep))]


def core_cropper(context_lo: tuple[int, ...], context_hi: tuple[int, ...]) -> CoreCrop:
    """The crop of :meth:`SamLite.forward_local_core` for a tile's context (see :class:`CoreCrop`)."""
    return CoreCrop(context_lo, context_hi)


def _onednn_applies(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not (torch.is_grad_enabled() and x.requires_grad))


class _OneDnnRoute:
    """Mixin for ``nn.Conv2d`` / ``nn.Conv3d``: always run oneDNN on a float32 (or bfloat16) CPU input, for inference.

    PyTorch sends a single image to its slow native kernel when batch x channels x the first two spatial sizes is at
    most 20480 (a 32-channel map of 20 x 32 x ... voxels, the global branch's 16 mm level of a head-and-neck CT),
    and 1 x 1 kernels when it runs one thread; those run 5-10x slower than in oneDNN. Same result to float rounding.
    Other inputs (CUDA, half precision, autograd) take the convolution's own path.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _onednn_applies(x) and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


class OneDnnConv3d(_OneDnnRoute, nn.Conv3d):
    """``nn.Conv3d`` routed to oneDNN (see :class:`_OneDnnRoute`)."""


class OneDnnConv2d(_OneDnnRoute, nn.Conv2d):
    """``nn.Conv2d`` routed to oneDNN (see :class:`_OneDnnRoute`)."""


def _pointwise(conv: nn.Module, t: torch.Tensor, channels_first: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """A 1 x 1 (x 1) convolution as one matrix product over the channels.

    On a channels-last map this reads the voxels' channel vectors in place (the CPU's convolution path is slow for
    1 x 1 kernels in that layout). ``channels_first``: the result is laid out (N, C, *spatial), contiguous, or, for
    one image, written into ``out``, a (C, voxels) matrix (e.g. the transposed view of an embedding's voxel-major
    feature rows, see :meth:`EmbeddingNet.forward_local_core`).
    """
    w = conv.weight.reshape(conv.weight.shape[0], -1)
    if channels_first and t.shape[0] == 1:
        flat = t.movedim(1, -1).reshape(-1, t.shape[1])  # (voxels, C_in)
        # out=None: a new matrix; else the same product written in place (e.g. an embedding's feature rows)
        y = torch.mm(w, flat.T, out=out) if conv.bias is None else torch.addmm(conv.bias[:, None], w, flat.T, out=out)
        return y.view(1, w.shape[0], *t.shape[2:])
    if out is not None:
        raise ValueError("_pointwise: out= needs channels_first and one image")
    y = F.linear(t.movedim(1, -1), w, conv.bias).movedim(-1, 1)
    return y.contiguous() if channels_first else y


class SamLite(EmbeddingNet):
    """Small two-branch SAM network; see the module docstring.

    Args:
        ndim: 3 for volumes, 2 for radiographs.
        widths: local encoder channels at 4, 8 and 16 mm; two values (4 and 8 mm) build a local branch without its
            16 mm level, whose receptive field is half as wide (tile halo 16 input voxels instead of 32), so
            on-demand tiles need half the context (see :data:`LOCAL_HALO`).
        global_widths: global encoder channels at 8, 16, 32 and 64 mm.
        fpn_channels: channels of the local FPN path, and of the global one unless ``global_fpn_channels`` is given.
        local_channels / global_channels: embedding sizes.
        global_fpn_channels: channels of the global FPN path (None: ``fpn_channels``); a network whose branches
            differ in width (a light local branch under a full global one) sets it.
        input_scale: the preprocessed input (about -50..205) is multiplied by this first.
    """

    has_separate_global = True

    def __init__(
        self,
        ndim: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        global_widths: tuple[int, int, int, int] = (32, 64, 128, 128),
        fpn_channels: int = 32,
        local_channels: int = 64,
        global_channels: int = 64,
        input_scale: float = 0.02,
        global_fpn_channels: int | None = None,
    ) -> None:
        super().__init__()
        conv = _conv(ndim)
        if len(widths) not in LOCAL_HALO:
            raise ValueError(f"sam-lite's local branch has 2 or 3 levels (widths), not {list(widths)}")
        self.local_levels = len(widths)
        self.input_scale = float(input_scale)
        self.ndim = ndim
        # local branch
        w0, w1 = widths[:2]
        self.l_stem = ConvBNReLU(ndim, 2**ndim, w0)
        self.l_down1 = nn.Sequential(ConvBNReLU(ndim, w0, w1, stride=2), ConvBNReLU(ndim, w1, w1))
        if self.local_levels == 3:
            w2 = widths[2]
            self.l_down2 = nn.Sequential(ConvBNReLU(ndim, w1, w2, stride=2), ConvBNReLU(ndim, w2, w2))
        self.l_lat = nn.ModuleList([conv(c, fpn_channels, 1) for c in widths])
        self.l_out = nn.Sequential(ConvBNReLU(ndim, fpn_channels, fpn_channels), conv(fpn_channels, local_channels, 1))
        # global branch
        g0, g1, g2, g3 = global_widths
        gf = fpn_channels if global_fpn_channels is None else int(global_fpn_channels)
        self.g_stem = nn.Sequential(ConvBNReLU(ndim, 1, g0), ConvBNReLU(ndim, g0, g0))
        self.g_down1 = nn.Sequential(ConvBNReLU(ndim, g0, g1, stride=2), ConvBNReLU(ndim, g1, g1))
        self.g_down2 = nn.Sequential(ConvBNReLU(ndim, g1, g2, stride=2), ConvBNReLU(ndim, g2, g2, dilation=2))
        self.g_down3 = nn.Sequential(
            ConvBNReLU(ndim, g2, g3, stride=2), ConvBNReLU(ndim, g3, g3, dilation=2), ConvBNReLU(ndim, g3, g3, dilation=2)
        )
        self.g_lat = nn.ModuleList([conv(c, gf, 1) for c in (g1, g2, g3)])
        self.g_out = nn.Sequential(ConvBNReLU(ndim, gf, gf), conv(gf, global_channels, 1))
        self.spec = NetSpec(
            arch="sam-lite" if ndim == 3 else "sam-lite-2d",
            ndim=ndim,
            local_stride=(2,) * ndim,
            global_stride=(8,) * ndim,
            local_channels=local_channels,
            global_channels=global_channels,
            pad_multiple=(8,) * ndim,
            tile_multiple=(8,) * ndim,
            tile_halo=LOCAL_HALO[self.local_levels],
            tiles_exact=True,
            config=dict(
                ndim=ndim, widths=list(widths), global_widths=list(global_widths), fpn_channels=fpn_channels,
                local_channels=local_channels, global_channels=global_channels, input_scale=input_scale,
            ),
        )
        if global_fpn_channels is not None:  # only then: the configs of the networks before it stay as they were
            self.spec.config["global_fpn_channels"] = gf

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised local map (stride 2) for input ``x``; spatial sizes must be multiples of 8."""
        x = space_to_depth(x * self.input_scale, 2)
        c0 = self.l_stem(x)
        c1 = self.l_down1(c0)
        p1 = self.l_lat[1](c1)
        if self.local_levels == 3:
            p1 = _up_add(self.l_lat[2](self.l_down2(c1)), p1)
        p0 = _up_add(p1, self.l_lat[0](c0))
        return self.l_out(p0)

    def forward_local_core(self, x: torch.Tensor, context_lo: tuple[int, ...], context_hi: tuple[int, ...],
                           out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward_local` of the core of a tile only, each layer computed only where the layers after it
        need it (see :meth:`EmbeddingNet.forward_local_core` for the arguments; ``out`` receives the output layer's
        product directly).

        A tile's context (up to ``tile_halo`` input voxels per side: 32 with three levels, 16 with two) is what the
        encoder's deepest path needs; the decoder needs far less. Each map is cropped to the context its consumers
        read, in input voxels beyond the core (:meth:`_encoder_core`), and the lateral maps to 4 / 2 for the
        top-down path, so the output convolution runs on the core plus one 4 mm voxel instead of the whole tile.
        Each kept value is computed from the same inputs as in :meth:`forward_local`, so the core is the same (up
        to float rounding); crops keep every map on its stride's grid. The core must start and end on multiples of
        8 input voxels, and each side's context must be the full ``tile_halo`` or more, or less only where the tile
        reaches the volume's edge, whose zero padding is the whole-volume run's own. For a ±50 mm window's tile (a
        48³ core) the layers of three levels do about half the work of the whole tile.
        """
        crop = core_cropper(context_lo, context_hi)
        c0, p1, c0_context = self._encoder_core(x, crop)
        if c0.dim() == 5 and c0.device.type == "cpu" and not torch.is_grad_enabled():
            p0 = fpn_top_in_slabs(functools.partial(_pointwise, self.l_lat[0]), c0, p1, crop,
                                  self.l_lat[0].weight.shape[0], p1.dtype, c0_context=c0_context)
        else:  # a radiograph's maps are small; on a GPU the whole level at once
            p0 = _pointwise(self.l_lat[0], crop(c0, 2, c0_context, 2)) + crop(_up2(p1), 2, 4, 2)
        del c0, p1
        top = self.l_out[0](p0)
        del p0
        return _pointwise(self.l_out[1], crop(top, 2, 2, 0), channels_first=True, out=out)

    def _encoder_core(self, x: torch.Tensor, crop: CoreCrop) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The local encoder on a tile for :meth:`forward_local_core`: the stem map ``c0`` (4 mm) with the context
        it holds (input voxels per side, returned third) and the FPN's 8 mm level ``p1`` with 4."""
        # context kept per map (input voxels); each map is exact up to a few voxels inside its crop, and every
        # crop keeps a multiple of the next stride-2 convolution's step, so the maps stay on the whole map's grid
        big = 1 << 30
        if self.local_levels == 2:
            c0 = self.l_stem(space_to_depth(crop(x, 1, big, 16) * self.input_scale, 2))  # 4 mm, 16 (exact from 14)
            d1 = self.l_down1[0](c0)  # 8 mm, 16 (exact from 12)
            c1 = self.l_down1[1](crop(d1, 4, 16, 8))  # 8 (exact from 4)
            del d1
            return c0, _pointwise(self.l_lat[1], crop(c1, 4, 8, 4)), 16
        c0 = self.l_stem(space_to_depth(crop(x, 1, big, 28) * self.input_scale, 2))  # 4 mm, 28 (exact from 26)
        d1 = self.l_down1[0](c0)  # 8 mm, 28 (exact from 24)
        c1 = self.l_down1[1](crop(d1, 4, 28, 24))  # 24 (exact from 20)
        d2 = self.l_down2[0](c1)  # 16 mm, 24 (exact from 16)
        c2 = self.l_down2[1](crop(d2, 8, 24, 16))  # 16 (exact from 8)
        del d1, d2  # each map is dropped once read: the output layer runs with the fewest maps alive
        p2 = _pointwise(self.l_lat[2], crop(c2, 8, 16, 8))
        del c2
        p1 = _pointwise(self.l_lat[1], crop(c1, 4, 24, 4)) + crop(_up2(p2), 4, 8, 4)
        return c0, p1, 28

    def for_inference(self) -> SamLite:
        """Set up for embedding (in place; returns self): every convolution becomes a :class:`OneDnnConv3d` (or 2D),
        and the weights are laid out channels-last, the faster layout for oneDNN's 3 x 3 convolutions on the CPU
        (about 2x for the local encoder). :meth:`forward_local_core` does its 1 x 1 convolutions as matrix products,
        which suit that layout, and returns a channels-first map."""
        for module in self.modules():
            # the subclasses only route the forward call: the module itself (weights, settings) stays as it is
            if type(module) is nn.Conv3d:
                module.__class__ = OneDnnConv3d
            elif type(module) is nn.Conv2d:
                module.__class__ = OneDnnConv2d
        fmt = torch.channels_last_3d if self.ndim == 3 else torch.channels_last
        return self.to(memory_format=fmt)

    def forward_global(self, x: torch.Tensor, box: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Un-normalised global map (stride 8) for input ``x``, or for its part ``box`` (spatial slices); spatial
        sizes (and the box's ends) must be multiples of 8 (:func:`pooled_input`)."""
        return self.forward_global_pooled(pooled_input(x, box))

    def forward_global_pooled(self, x_pooled: torch.Tensor) -> torch.Tensor:
        """Global map (stride 2 of its input) from an input already average-pooled by 4 (8 mm)."""
        g = self.g_stem(x_pooled * self.input_scale)
        g1 = self.g_down1(g)
        g2 = self.g_down2(g1)
        g3 = self.g_down3(g2)
        p3 = self.g_lat[2](g3)
        p2 = _up_add(p3, self.g_lat[1](g2))
        p1 = _up_add(p2, self.g_lat[0](g1))
        return self.g_out(p1)

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_local(x), self.forward_global(x)
