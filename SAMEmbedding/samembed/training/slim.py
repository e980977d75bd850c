"""A narrower ``sam-lite`` started from a trained one: each layer keeps the trained network's most used channels.

A lighter network for the cold path (issue 13) is trained by distillation from the shipped model
(:mod:`.distill`). Starting it from random weights wastes most of a CPU budget relearning what the shipped model
already knows, so ``init_from`` with a narrower ``net_config`` starts it from the shipped model's weights cut down
to the new widths ("network slimming", Liu et al., ICCV 2017):

- a layer followed by batch norm keeps the output channels with the largest ``|gamma|`` (the scale of the channel's
  normalised activation, so the channels that carry the most signal);
- the FPN channels (1 x 1 lateral convolutions that are summed, no batch norm) keep the channels that the layer
  reading them weighs most (L2 norm of its weights over each input channel);
- every layer's input channels follow its producer's choice; the input image and the embedding outputs keep all
  their channels.

The result is a starting point, not a model: dropping channels changes every map, and the distillation recovers
the rest. Only ``sam-lite`` (3D) and ``sam-lite-2d`` are supported, whose layers this module names.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

#: (convolution, its batch norm or None, the channel group it reads, the channel group it writes), for SamLite;
#: the groups ``input_*`` and ``output_*`` are never cut
SAM_LITE_LAYERS: tuple[tuple[str, str | None, str, str], ...] = (
    ("l_stem.0", "l_stem.1", "input_local", "l0"),
    ("l_down1.0.0", "l_down1.0.1", "l0", "l1a"),
    ("l_down1.1.0", "l_down1.1.1", "l1a", "l1"),
    ("l_down2.0.0", "l_down2.0.1", "l1", "l2a"),
    ("l_down2.1.0", "l_down2.1.1", "l2a", "l2"),
    ("l_lat.0", None, "l0", "l_fpn"),
    ("l_lat.1", None, "l1", "l_fpn"),
    ("l_lat.2", None, "l2", "l_fpn"),
    ("l_out.0.0", "l_out.0.1", "l_fpn", "l_top"),
    ("l_out.1", None, "l_top", "output_local"),
    ("g_stem.0.0", "g_stem.0.1", "input_global", "g0a"),
    ("g_stem.1.0", "g_stem.1.1", "g0a", "g0"),
    ("g_down1.0.0", "g_down1.0.1", "g0", "g1a"),
    ("g_down1.1.0", "g_down1.1.1", "g1a", "g1"),
    ("g_down2.0.0", "g_down2.0.1", "g1", "g2a"),
    ("g_down2.1.0", "g_down2.1.1", "g2a", "g2"),
    ("g_down3.0.0", "g_down3.0.1", "g2", "g3a"),
    ("g_down3.1.0", "g_down3.1.1", "g3a", "g3b"),
    ("g_down3.2.0", "g_down3.2.1", "g3b", "g3"),
    ("g_lat.0", None, "g1", "g_fpn"),
    ("g_lat.1", None, "g2", "g_fpn"),
    ("g_lat.2", None, "g3", "g_fpn"),
    ("g_out.0.0", "g_out.0.1", "g_fpn", "g_top"),
    ("g_out.1", None, "g_top", "output_global"),
)
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _kept_channels(source: dict[str, torch.Tensor], group: str, size: int) -> torch.Tensor:
    """Indices (ascending) of the ``size`` channels of ``group`` that the slimmed network keeps."""
    producers = [(conv, bn) for conv, bn, _, out in SAM_LITE_LAYERS if out == group]
    if producers:
        have = int(source[f"{producers[0][0]}.weight"].shape[0])
    else:  # the network's input: made by no layer, read by one
        reader = next(conv for conv, _, src, _ in SAM_LITE_LAYERS if src == group)
        have = int(source[f"{reader}.weight"].shape[1])
    if group.startswith(("input_", "output_")) or size == have:
        if size != have:
            raise InputError(f"slimming keeps the {group.replace('_', ' ')} channels ({have}); the new network has {size}")
        return torch.arange(have)
    if size > have:
        raise InputError(f"slimming cannot widen channel group '{group}' from {have} to {size}")
    if len(producers) == 1 and producers[0][1] is not None:
        score = source[f"{producers[0][1]}.weight"].float().abs()
    else:  # summed FPN maps: what their readers weigh
        readers = [conv for conv, _, src, _ in SAM_LITE_LAYERS if src == group]
        score = sum(source[f"{r}.weight"].float().transpose(0, 1).reshape(have, -1).norm(dim=1) for r in readers)
    return torch.sort(torch.topk(score, size).indices).values


def slim_state_dict(source: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
    """Weights for ``target`` (a narrower ``SamLite``) cut from the trained ``source`` (see the module docstring).

    Raises:
        InputError: either network is not ``sam-lite`` / ``sam-lite-2d``, their dimensions differ, or ``target``
            is wider than ``source`` somewhere, or changes the input or embedding channels.
    """
    archs = {getattr(getattr(n, "spec", None), "arch", None) for n in (source, target)}
    if not archs <= {"sam-lite", "sam-lite-2d"} or len(archs) != 1:
        raise InputError(f"slimming needs two networks of one sam-lite architecture, not {sorted(map(str, archs))}")
    src = source.state_dict()
    want = target.state_dict()
    # a local branch of two levels has no 16 mm level: only the layers the new network has are cut
    layers = [layer for layer in SAM_LITE_LAYERS if f"{layer[0]}.weight" in want]
    sizes: dict[str, int] = {}
    for conv, _, group_in, group_out in layers:
        shape = want[f"{conv}.weight"].shape
        sizes.setdefault(group_out, int(shape[0]))
        sizes.setdefault(group_in, int(shape[1]))
    keep = {group: _kept_channels(src, group, sizes[group]) for group in sorted(sizes)}
    out: dict[str, torch.Tensor] = {}
    for conv, bn, group_in, group_out in layers:
        o, i = keep[group_out], keep[group_in]
        out[f"{conv}.weight"] = src[f"{conv}.weight"][o][:, i].clone()
        if f"{conv}.bias" in want:
            out[f"{conv}.bias"] = src[f"{conv}.bias"][o].clone()
        if bn is not None:
            for key in _BN_KEYS:
                out[f"{bn}.{key}"] = src[f"{bn}.{key}"][o].clone()
            out[f"{bn}.num_batches_tracked"] = src[f"{bn}.num_batches_tracked"].clone()
    missing = sorted(set(want) - set(out))
    if missing:
        raise InputError(f"slimming does not know these weights of the new network: {', '.join(missing[:5])}")
    return {k: v.to(want[k].dtype) for k, v in out.items()}
