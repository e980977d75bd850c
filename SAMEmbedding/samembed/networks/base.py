"""The interface every embedding network implements.

A network takes a batch ``(N, 1, *shape_zyx)`` of preprocessed images on the model grid and returns
``(local, global_)``: two maps, each L2-normalised over channels per voxel. Their geometry relative to
the input grid is described by :class:`NetSpec` (strides in input voxels, i, j, k order), so the
engine can place every output voxel in LPS mm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class NetSpec:
    """Geometry and size facts of a network, all in input (model-grid) voxels, (i, j, k) order.

    Attributes:
        arch: architecture name ("sam-lite", "sam-official", ...).
        ndim: 2 or 3 spatial dimensions.
        local_stride / global_stride: output stride of each map per axis.
        local_channels / global_channels: embedding sizes.
        pad_multiple: input sizes are padded up to a multiple of this per axis (1 = no padding).
        tile_multiple: tile starts are multiples of this; tile_halo: context kept around a tile.
        tiles_exact: True when tiling with ``tile_halo`` reproduces the untiled output exactly.
        config: the constructor arguments, so a checkpoint can rebuild the network.
    """

    arch: str
    ndim: int
    local_stride: tuple[int, ...]
    global_stride: tuple[int, ...]
    local_channels: int
    global_channels: int
    pad_multiple: tuple[int, ...]
    tile_multiple: tuple[int, ...]
    tile_halo: int
    tiles_exact: bool
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return asdict(self)


class EmbeddingNet(nn.Module):
    """Base class: subclasses set ``self.spec`` and implement :meth:`forward_maps`.

    :meth:`forward` returns L2-normalised ``(local, global_)``. Networks whose global map can be
    computed separately (``has_separate_global``) also implement :meth:`forward_local` and
    :meth:`forward_global`, which lets the engine tile only the local branch.
    """

    spec: NetSpec
    has_separate_global: bool = False

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return L2-normalised (local, global) maps for input ``x`` of shape (N, 1, *spatial)."""
        local, glob = self.forward_maps(x)
        return nn.functional.normalize(local, dim=1), nn.functional.normalize(glob, dim=1)

    def forward_local_core(self, x: torch.Tensor, context_lo: tuple[int, ...], context_hi: tuple[int, ...],
                           out: torch.Tensor | None = None) -> torch.Tensor:
        """Un-normalised local map of the core of an input tile (networks with ``has_separate_global``).

        ``x`` (N, C, *spatial) is a tile of the network input: its core, with ``context_lo`` / ``context_hi`` input
        voxels of context before / after it on each spatial axis (``tile_halo``, or less where the tile meets the
        volume's edge). Returns the local map of the core only, (N, C, *core / local_stride). This default runs
        :meth:`forward_local` on the whole tile and crops; a network may compute each layer only where the layers
        after it need it, with the same result.

        ``out``: for one image (N = 1), a (C, V) float32 matrix (unit stride along V, any stride between rows, e.g.
        rows of an embedding's feature buffer) that receives the map, V = the core's local voxels in C order; the
        result is then a view of it.
        """
        loc = self.forward_local(x)
        stride = self.spec.local_stride
        crop = tuple(slice(lo // s, lo // s + -(-(n - lo - hi) // s))
                     for lo, hi, n, s in zip(context_lo, context_hi, x.shape[2:], stride))
        loc = loc[(slice(None), slice(None), *crop)]
        if out is None:
            return loc
        out.copy_(loc.reshape(out.shape))
        return out.view(loc.shape)


def inference_copy(net: EmbeddingNet) -> EmbeddingNet:
    """A copy of ``net`` for embedding only: in eval mode, each convolution directly followed by a batch norm in an
    ``nn.Sequential`` carries the norm in its weights (``torch.nn.utils.fusion.fuse_conv_bn_weights``), and the norm
    becomes an identity. One pass over the data fewer per layer (about 8 % of the CPU time of ``sam-lite``); the
    output equals the original's to float rounding (about 1e-6). A network's ``for_inference()``, when it has one,
    then sets its inference layout (``sam-lite``: channels-last). The original (trainable) network is untouched.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_weights

    out = copy.deepcopy(net).eval()
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for module in out.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, convs) and isinstance(norm, norms) and norm.track_running_stats:
                # the copy's own convolution takes the folded weights (fuse_conv_bn_eval's, without copying it again)
                conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean,
                                                              norm.running_var, norm.eps, norm.weight, norm.bias)
                module[i + 1] = nn.Identity()
    return out.for_inference() if hasattr(out, "for_inference") else out  # after folding: the new weights too
