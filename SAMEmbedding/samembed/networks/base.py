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
