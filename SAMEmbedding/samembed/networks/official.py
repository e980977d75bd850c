"""``sam-official``: the official SAM / SAMv2 network (ResNet3d-18 + FPN3d heads) in plain PyTorch.

Parameter names and shapes reproduce the official mmcv checkpoints exactly (138 entries for
``SAM.pth``, 146 for ``SAMv2_iter_20000.pth``), as specified in
``shared/reference/sam_official_checkpoint.md`` sections 1-2, so those files load with
``load_state_dict(strict=True)`` and no mmcv.

Input: (N, 1, Z, Y, X) at 2 mm. Outputs: fine (local) map 128 x floor(Z/2) x ceil(Y/2) x ceil(X/2)
(4 mm), coarse (global) map 128 x ceil(floor(Z/2)/2) x ceil(Y/16) x ceil(X/16), and for SAMv2 a
semantic map on the fine grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import EmbeddingNet, NetSpec


class ConvModule(nn.Module):
    """mmcv ConvModule: ``conv`` (+ ``bn``) (+ ReLU), with mmcv's attribute names."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, norm=True, act=True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=not norm)
        self.bn = nn.BatchNorm3d(cout) if norm else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.act else x


class BasicBlock3d(nn.Module):
    """ResNet basic block; inflated blocks use 3x3x3 kernels, others 1x3x3."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], inflate: bool) -> None:
        super().__init__()
        k, p = ((3, 3, 3), (1, 1, 1)) if inflate else ((1, 3, 3), (0, 1, 1))
        self.conv1 = ConvModule(cin, cout, k, stride, p)
        self.conv2 = ConvModule(cout, cout, k, 1, p, act=False)
        self.downsample = ConvModule(cin, cout, 1, stride, 0, act=False) if (stride != (1, 1, 1) or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + identity, inplace=True)


class ResNet3d18(nn.Module):
    """The official backbone: stem 3x7x7, four stages, pool2 after layer1; returns (C2, C3, C4, C5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvModule(1, 64, (3, 7, 7), 1, (1, 3, 3))
        cfg = [(64, 64, (1, 2, 2), False), (64, 128, (1, 2, 2), False), (128, 256, (1, 2, 2), True), (256, 512, (2, 2, 2), True)]
        for i, (cin, cout, stride, inflate) in enumerate(cfg, start=1):
            layer = nn.Sequential(BasicBlock3d(cin, cout, stride, inflate), BasicBlock3d(cout, cout, (1, 1, 1), inflate))
            self.add_module(f"layer{i}", layer)
        self.pool2 = nn.MaxPool3d((2, 1, 1), (2, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.conv1(x)
        c2 = self.pool2(self.layer1(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


class _HeadConv(nn.Module):
    """ConvModule without norm or activation (bias=True): holds ``conv`` only."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN3d(nn.Module):
    """Official FPN3d head: 1x1x1 laterals, legacy-nearest top-down sum, one 3x3x3 output conv."""

    def __init__(self, in_channels: list[int], out_channels: int = 128) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList([_HeadConv(c, out_channels, 1) for c in in_channels])
        self.fpn_convs = nn.ModuleList([_HeadConv(out_channels, out_channels, 3)])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        return self.fpn_convs[0](lat[0])


class SamOfficial(EmbeddingNet):
    """Official SAM (``semantic=False``) or SAMv2 (``semantic=True``) network.

    :meth:`forward` returns (fine, coarse) normalised maps; :meth:`forward_all` also returns the
    semantic map of SAMv2.
    """

    def __init__(self, semantic: bool = False) -> None:
        super().__init__()
        self.backbone = ResNet3d18()
        self.neck = FPN3d([64, 128, 256])
        self.read_out_head = FPN3d([512])
        self.semantic_head = FPN3d([64, 128, 256]) if semantic else None
        self.spec = NetSpec(
            arch="sam-official",
            ndim=3,
            local_stride=(2, 2, 2),
            global_stride=(16, 16, 4),
            local_channels=128,
            global_channels=128,
            pad_multiple=(1, 1, 1),
            tile_multiple=(16, 16, 4),
            tile_halo=16,
            tiles_exact=False,
            config=dict(semantic=semantic),
        )

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised [fine, coarse] (SAM) or [fine, coarse, semantic] (SAMv2) maps."""
        c2, c3, c4, c5 = self.backbone(x)
        out = [self.neck([c2, c3, c4]), self.read_out_head([c5])]
        if self.semantic_head is not None:
            out.append(self.semantic_head([c2, c3, c4]))
        return [F.normalize(o, dim=1) for o in out]

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c2, c3, c4, c5 = self.backbone(x)
        return self.neck([c2, c3, c4]), self.read_out_head([c5])
