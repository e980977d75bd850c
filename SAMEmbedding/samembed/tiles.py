"""On-demand local embedding: which tiles of the local map a search needs, the global map's upsampling on any box
or voxel set, and the disk format of a (partly) embedded image.

The local branch of a network with a separate global branch (``sam-lite``) has a bounded receptive field, so its
map on a box of the input, computed with ``NetSpec.tile_halo`` input voxels of context on each side (clipped at the
volume's edge, where the whole-volume run pads with zeros too) and starting on a multiple of ``tile_multiple``
input voxels, equals the whole-volume map there. The engine therefore embeds the global map for the whole volume
(coarse and cheap) and the local map only in the boxes that the searches touch, block by block.

Units: boxes are inclusive ``(k, j, i)`` = ``zyx`` index corners on the local grid unless named ``input``; the
input grid is the network's (model spacing, padded to ``pad_multiple``). The disk-cache helpers import no torch, so
``samembed cache info`` stays quick.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: the first bytes of a disk cache entry, and its format version
MAGIC = b"SAMEMB2\n"
#: entries end in ``.pt`` as the older torch-pickled entries did (``samembed cache`` and tools that glob ``*.pt`` find
#: both); an older entry fails the magic check and is recomputed in the new format
ENTRY_SUFFIX = ".samemb.pt"
#: the name of an entry of the older, torch-pickled format: its 32-hex-digit key and ``.pt``
OLDER_ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.pt")
#: the name of an entry: its 32-hex-digit key (:meth:`samembed.embedding.Embedder.key`) and :data:`ENTRY_SUFFIX`
ENTRY_NAME = re.compile(r"[0-9a-f]{32}" + re.escape(ENTRY_SUFFIX))
#: bits per component of a cache entry's local vectors (:func:`packed_directions`)
DIRECTION_BITS = 10
#: how an entry stores each voxel's local vector (:func:`packed_directions`); part of every key, so that the entries
#: of the half-precision vectors before are never read (:func:`samembed.embedding.Embedder.key`)
LOCAL_ENCODING = f"{DIRECTION_BITS}-bit directions"
#: what the pickle of an entry of the older, torch-saved format holds (its ``meta`` JSON: the grids and the model),
#: which no other file named by 32 hex digits and ``.pt`` is taken to hold (:func:`_older_entry`)
_OLDER_ENTRY_WORDS = (b"meta", b"local_grid", b"global_grid", b"model_id")
#: the largest pickle of an older entry read to recognise it (the tensors are other members of its zip)
_OLDER_ENTRY_PICKLE_MAX = 1 << 20


# ---------------------------------------------------------------------------------------------- upsampling
def _linear_taps(n_in: int, n_out: int, dst: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's ``align_corners=False`` linear interpolation taps for output indices ``dst`` along one axis:
    ``(i0, i1, w0, w1)`` with ``out[dst] = w0 * in[i0] + w1 * in[i1]`` (float32 weights, as ``F.interpolate``)."""
    import torch

    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (dst.astype(np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(w0), torch.from_numpy(w1)


def spans_whole_planes(box: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    """Whether ``box`` (slices of steps of 1, C order) covers every axis but the first whole: its voxels are then
    one contiguous run of whole planes, a view of a C-order volume (no gathering)."""
    return all(s.start == 0 and s.stop == n for s, n in zip(box[1:], shape[1:]))


def _lerp_along(t: torch.Tensor, dim: int, taps) -> torch.Tensor:
    """``t`` linearly resampled along ``dim`` with :func:`_linear_taps`' ``(i0, i1, w0, w1)``: the one operation
    order (gather, weight, gather, weight, add) every upsampling here shares, so their values agree bit for bit."""
    i0, i1, w0, w1 = taps
    shape = [1] * t.dim()
    shape[dim] = -1
    return t.index_select(dim, i0).mul_(w0.reshape(shape)).add_(t.index_select(dim, i1).mul_(w1.reshape(shape)))


def _reduce_corners(corners: dict[tuple[int, ...], torch.Tensor], taps, stop: int = 0):
    """Weight and sum gathered corners (``{bits: (M, ...)}``, one bit per axis of ``taps``, each tensor its own copy)
    into the interpolated values (M, ...): the last axis first, as the box code does, with its products and sum
    (:func:`_lerp_along`'s order), in place on the copies. With ``stop=1`` the first axis is left: the two
    ``{(0,): .., (1,): ..}`` values it would combine (for :func:`_lerp_lengths`)."""
    for a in reversed(range(stop, len(taps))):
        _, _, w0, w1 = taps[a]
        w0, w1 = w0[:, None], w1[:, None]
        corners = {bits[:-1]: v.mul_(w0).add_(corners[(*bits[:-1], 1)].mul_(w1))
                   for bits, v in corners.items() if bits[-1] == 0}
    return corners[()] if stop == 0 else corners


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position dot products of two channel-major maps (C, ...): summed channel by channel, as
    :func:`channel_norms` sums squares."""
    out = a[0] * b[0]
    for c in range(1, a.shape[0]):
        out.addcmul_(a[c], b[c])
    return out


def _lerp_lengths(sq_a: torch.Tensor, dot_ab: torch.Tensor, sq_b: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor,
                  eps: float = 1e-12) -> torch.Tensor:
    """The length of ``w0 a + w1 b`` (at least ``eps``) from ``|a|^2``, ``a.b`` and ``|b|^2``: the last (first-axis)
    step of an upsampling, without the upsampled vectors. Every path (box, lines, single voxels) ends here with the
    same operations, so a voxel's length does not depend on the path."""
    out = sq_a * (w0 * w0)
    out.add_(dot_ab * (w0 * w1 * 2.0))
    out.add_(sq_b * (w1 * w1))
    return out.clamp_min_(0.0).sqrt_().clamp_min_(eps)


def _pair_lengths(a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`_lerp_lengths` of two channel-major maps (C, ...) of values along the first axis's two coarse planes."""
    return _lerp_lengths(_channel_dot(a, a), _channel_dot(a, b), _channel_dot(b, b), w0, w1, eps)


def _upsample_trailing(glob: torch.Tensor, out_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
    """The first step of :func:`upsample_box`: every axis but the first, the last axis first (while the map is
    still coarse): (C, g0, *box[1:]) float32."""
    out = glob.float()
    for a in reversed(range(1, len(out_shape))):
        out = _lerp_along(out, 1 + a, _linear_taps(glob.shape[1 + a], out_shape[a], np.arange(lo[a], hi[a] + 1)))
    return out


def upsample_box(glob: torch.Tensor, out_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The global map ``glob`` (C, *gshape) linearly upsampled to ``out_shape`` (align_corners=False), on the
    inclusive box ``lo..hi`` of the output only: (C, *box), float32, not normalised; written into ``out`` (C, *box)
    when given (e.g. a view of an embedding's feature rows).

    Separable, the last axis first (while the map is still coarse) and the first axis last (whose selection copies
    whole contiguous planes), so every output voxel is computed by the same operations whatever box it is in: a
    box equals the same voxels of the whole map bit for bit, and :func:`upsample_at` and :func:`upsample_lines`
    too. It agrees with ``F.interpolate(..., mode="trilinear", align_corners=False)`` to float rounding (about
    1e-6).
    """
    import torch

    # the first axis, whose output is the full box: plane by plane, with the same products and sum as above, so
    # that only one plane's temporary exists at a time (the box is written once instead of through two copies);
    # each coarse plane the box reaches is upsampled along the other axes when first needed, so the temporaries
    # are a few planes, which stay in the cache
    i0, i1, w0, w1 = _linear_taps(glob.shape[1], out_shape[0], np.arange(lo[0], hi[0] + 1))
    coarse: dict[int, torch.Tensor] = {}

    def plane_of(k: int, behind: int) -> torch.Tensor:
        if k not in coarse:
            for old in [j for j in coarse if j < behind]:  # the output planes still to come do not read these
                del coarse[old]
            coarse[k] = _upsample_trailing(glob[:, k:k + 1], out_shape, lo, hi)[:, 0]
        return coarse[k]

    for z in range(len(i0)):
        a, b = plane_of(int(i0[z]), int(i0[z])), plane_of(int(i1[z]), int(i0[z]))
        if out is None:
            out = torch.empty((a.shape[0], len(i0), *a.shape[1:]), dtype=a.dtype, device=a.device)
        plane = torch.mul(a, w0[z], out=out[:, z])
        plane.add_(b * w1[z])
    return out


def upsample_lengths_box(glob: torch.Tensor, out_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray,
                         eps: float = 1e-12) -> torch.Tensor:
    """The length (at least ``eps``) of every vector of :func:`upsample_box` on the inclusive box ``lo..hi``: (*box)
    float32, without the upsampled vectors (C values per voxel). The last step, along the first axis, mixes two
    coarse planes ``a``, ``b`` (upsampled along the other axes); ``|w0 a + w1 b|^2 = w0^2 |a|^2 + 2 w0 w1 a.b +
    w1^2 |b|^2``, so the planes' squares and dot products (once per coarse plane or pair of planes) give every output
    plane's lengths. About 4 times cheaper than the upsampling (0.05 s against 0.22 s for a whole LIDC grid of 84 x
    92 x 92 voxels, 64 channels); equal to the lengths of its vectors to float rounding (about 1e-7 for a map of
    unit vectors), and bit for bit to ``upsample_lines(..., lengths=True)`` and ``upsample_at(..., lengths=True)``."""
    import torch

    i0, i1, w0, w1 = _linear_taps(glob.shape[1], out_shape[0], np.arange(lo[0], hi[0] + 1))
    planes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # coarse plane -> (upsampled plane, its squares)
    dots: dict[tuple[int, int], torch.Tensor] = {}
    out = None
    for z in range(len(i0)):
        ka, kb = int(i0[z]), int(i1[z])
        for old in [k for k in planes if k < ka]:  # the output planes still to come do not read these
            del planes[old]
        for old in [k for k in dots if k[0] < ka]:
            del dots[old]
        for k in (ka, kb):
            if k not in planes:
                t = _upsample_trailing(glob[:, k:k + 1], out_shape, lo, hi)[:, 0]
                planes[k] = (t, _channel_dot(t, t))
        if (ka, kb) not in dots:
            dots[(ka, kb)] = _channel_dot(planes[ka][0], planes[kb][0])
        plane = _lerp_lengths(planes[ka][1], dots[(ka, kb)], planes[kb][1], w0[z], w1[z], eps)
        if out is None:
            out = torch.empty((len(i0), *plane.shape), dtype=plane.dtype)
        out[z] = plane
    return out


def coarse_span(gshape: tuple[int, ...], out_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    """The coarse voxels (slices of a map of spatial shape ``gshape``) that :func:`upsample_box` reads for the
    inclusive output box ``lo..hi`` of ``out_shape``: a map cut to them upsamples that box the same
    (:func:`upsample_part`)."""
    spans = []
    for a in range(len(out_shape)):
        i0, i1, _, _ = _linear_taps(gshape[a], out_shape[a], np.array([lo[a], hi[a]]))
        spans.append(slice(int(i0[0]), int(i1[1]) + 1))
    return tuple(spans)


def upsample_part(part: torch.Tensor, gshape: tuple[int, ...], span: tuple[slice, ...], out_shape: tuple[int, ...],
                  lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
    """:func:`upsample_box` of a map of spatial shape ``gshape`` given only its part ``part`` (C, *span) over the
    coarse voxels ``span`` that the box reads (:func:`coarse_span`): (C, *box) float32, bit for bit the same values.

    One whole-tensor pass per axis (the last first), without :func:`upsample_box`'s plane-by-plane loop: for maps
    of few channels (a few queries' products with the global map, over a search window) the loop's per-plane calls
    cost more than the arithmetic."""
    out = part.float()
    for a in reversed(range(len(out_shape))):
        i0, i1, w0, w1 = _linear_taps(gshape[a], out_shape[a], np.arange(lo[a], hi[a] + 1))
        out = _lerp_along(out, 1 + a, (i0 - span[a].start, i1 - span[a].start, w0, w1))
    return out


def upsample_lines(glob: torch.Tensor, out_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray,
                   lines: tuple[np.ndarray, ...], lengths: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """:func:`upsample_box` on some grid lines of the box only: ``lines`` holds, per axis but the last, the
    box-relative index of each line (L,) (``np.nonzero`` of a (box[:-1]) mask); returns (C, L, box[-1]) float32,
    bit for bit the same lines of :func:`upsample_box`. A tile asked for a sparse set of voxels (the body in a
    wide field of view, the corners of search windows) then upsamples only the lines it stores.

    The last axis is upsampled over the box on the coarse map, as in :func:`upsample_box`; the other axes are then
    reduced line by line from the 2^(d-1) coarse lines around each, last axis first, with the same products and
    sums as the box's passes. With ``lengths`` it returns the vectors' lengths instead, (L, box[-1]), as
    :func:`upsample_lengths_box` gives them."""
    d = len(out_shape)
    taps = [_linear_taps(glob.shape[1 + a], out_shape[a], np.asarray(lines[a], dtype=np.int64) + int(lo[a]))
            for a in range(d - 1)]
    # the coarse lines the box reaches (the taps then index into that part)
    first = [int(t[0].min()) if len(t[0]) else 0 for t in taps]
    last = [int(t[1].max()) + 1 if len(t[1]) else 1 for t in taps]
    taps = [(i0 - f, i1 - f, w0, w1) for (i0, i1, w0, w1), f in zip(taps, first)]
    g = glob.float()[(slice(None), *(slice(f, e) for f, e in zip(first, last)))]
    rows = _lerp_along(g, d, _linear_taps(glob.shape[d], out_shape[-1], np.arange(lo[-1], hi[-1] + 1)))  # (C, .., X)
    corners = {bits: rows[(slice(None), *(taps[a][bits[a]] for a in range(d - 1)))]  # (C, L, X) each
               for bits in np.ndindex(*(2,) * (d - 1))}
    if not lengths:
        return _reduce_corners(corners, taps)
    ends = _reduce_corners(corners, taps, stop=1)  # the two coarse planes' values of each line
    return _pair_lengths(ends[(0,)], ends[(1,)], taps[0][2][:, None], taps[0][3][:, None], eps)


def coarse_rows(glob: torch.Tensor) -> torch.Tensor:
    """The map ``glob`` (C, *gshape) channels last, (coarse voxels, C) float32 contiguous: what :func:`upsample_at`
    gathers whole vectors from (a caller that upsamples at voxels many times keeps it)."""
    return glob.float().movedim(0, -1).reshape(-1, glob.shape[0]).contiguous()


def upsample_at(glob: torch.Tensor, out_shape: tuple[int, ...], zyx: np.ndarray, lengths: bool = False,
                eps: float = 1e-12, rows: torch.Tensor | None = None):
    """:func:`upsample_box` at single output voxels ``zyx`` (M, d): (C, M) float32, not normalised, with the
    same arithmetic (same operations in the same order), so the values are identical. With ``lengths``: the
    vectors' lengths (M,) instead, as :func:`upsample_lengths_box` gives them, bit for bit. ``rows``:
    :func:`coarse_rows` of ``glob``, when the caller keeps it (else made here: a copy of the whole map)."""

    d = len(out_shape)
    # channels last: each corner gathers whole channel vectors (contiguous rows) instead of one value per channel
    rows = coarse_rows(glob) if rows is None else rows  # (coarse voxels, C)
    taps = [_linear_taps(glob.shape[1 + a], out_shape[a], zyx[:, a]) for a in range(d)]
    corners: dict[tuple[int, ...], torch.Tensor] = {}
    for bits in np.ndindex(*(2,) * d):
        flat = taps[0][bits[0]]
        for a in range(1, d):
            flat = flat * glob.shape[1 + a] + taps[a][bits[a]]
        corners[bits] = rows.index_select(0, flat)  # (M, C)
    if not lengths:
        return _reduce_corners(corners, taps).T.contiguous()
    ends = _reduce_corners(corners, taps, stop=1)  # (M, C) each, made channel-major as the box's planes
    return _pair_lengths(ends[(0,)].T.contiguous(), ends[(1,)].T.contiguous(), taps[0][2], taps[0][3], eps)


def channel_norms(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The length of each vector of the channel-major ``x`` (C, ...), at least ``eps``: (...) float, the divisor of
    :func:`normalize_channels`. Summed channel by channel (one contiguous pass each), several times faster on the
    CPU than ``norm(dim=0)``, whose reduction runs across the channels' strides."""
    return _channel_dot(x, x).sqrt_().clamp_min_(eps)


def normalize_channels(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=0)`` in place (equal to float rounding, about 1e-7), without a second full-size copy:
    ``x`` divided by its :func:`channel_norms`."""
    return x.div_(channel_norms(x, eps).unsqueeze(0))


# ------------------------------------------------------------------------------- voxel-major feature rows
#: voxels per block when channel-major maps are moved into voxel-major rows (or back): a block of 128 channels of
#: 2048 voxels (1 MB of float32) stays in the cache while it is transposed
ROW_BLOCK = 2048


def new_feature_rows(n_voxels: int, channels: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised voxel-major feature buffer (V, C): each voxel's C values are contiguous.

    A tile stored into it makes resident only its own voxels' pages. In a channel-major (C, V) buffer every
    channel row is a separate V-long run, so one grid line of a tile touches a 4 KB page in each of the C rows
    (measured on a head-and-neck CT's search windows: 3.2x the page faults, and the stores took 0.84 s of a 2.4 s
    cold match, against 0.2 s)."""
    import torch

    return torch.empty((int(n_voxels), int(channels)), dtype=dtype, device=device)


def write_rows(dst: torch.Tensor, parts: list[torch.Tensor], flat: torch.Tensor | None = None,
               block: int = ROW_BLOCK, unit: slice | None = None) -> None:
    """Write channel-major values into voxel-major rows: the ``parts`` (C_k, n), side by side along the channels,
    go to the rows ``flat`` (n,) of ``dst`` (V, sum C_k), or with ``flat=None`` to ``dst`` (n, sum C_k) in order.

    Block by block, so that each block's transpose stays in the cache: one ``copy_`` of a (C, n) map into (n, C)
    rows walks the destination at a stride of C values once per channel (2.5 s for 64 channels of 1.5 M voxels,
    against 0.07 s in blocks). Values are copied, not computed: the rows equal the parts bit for bit (converted to
    ``dst``'s dtype), but for the channels ``unit``, when given, which are scaled to unit length per row on the
    way (:func:`normalize_rows`: the same values as normalising the rows where they land).

    On the CPU the rows go to ``flat`` through numpy's indexed assignment, which copies whole rows: 1.5x torch's
    ``index_copy_`` for 240 k rows of 64 float32 values on the 2-core VM, the same bytes. ``flat`` holds distinct
    voxel indices, each in ``0 .. V-1`` (numpy would take a negative one from the end, where ``index_copy_`` refused
    it)."""
    import torch

    n = parts[0].shape[1]
    by_numpy = dst.device.type == "cpu" and dst.dtype in (torch.float32, torch.float16, torch.float64)
    for i in range(0, n, block):
        blk = [p[:, i:i + block].T for p in parts]
        rows = torch.cat(blk, 1) if len(blk) > 1 else blk[0]
        if unit is not None:  # in the parts' precision, before any conversion
            rows = rows.contiguous()
            normalize_rows(rows[:, unit])
        rows = rows.to(dst.device, dst.dtype)
        if flat is None:
            dst[i:i + block].copy_(rows)
        elif by_numpy:
            dst.detach().numpy()[flat[i:i + block].cpu().numpy()] = rows.detach().numpy()
        else:
            dst.index_copy_(0, flat[i:i + block].to(dst.device), rows)


#: whether this machine stores integers most significant byte first (entries are little-endian everywhere)
_BIG_ENDIAN = sys.byteorder == "big"


def _packing(bits: int, channels: int) -> tuple[int, int, int]:
    """(components per group, bytes per group, groups per vector) of :func:`packed_directions`: a group is the fewest
    components whose bits fill whole bytes (4 components in 5 bytes at 10 bits), packed into one 64-bit word; a
    vector's last group is filled with zeros when its channels do not fill it (a zero does not change a direction)."""
    group = 8 // math.gcd(bits, 8) if bits > 0 else 0
    if not 2 <= bits <= 16 or group * bits > 64:
        raise ValueError(f"cannot pack components of {bits} bits (2 to 16 whose groups fit 64 bits: 10, 12, 16, ...)")
    return group, group * bits // 8, -(-channels // group)


def packed_directions(rows: torch.Tensor, index: torch.Tensor | None = None, bits: int = DIRECTION_BITS,
                      block: int = ROW_BLOCK) -> np.ndarray:
    """(n, bytes) uint8: the directions of the voxel-major ``rows`` (n, C), or of its rows ``index`` (n,), as a cache
    entry stores a local unit vector. Each row is scaled so that its largest component is ±(2^(bits-1) - 1),
    rounded, and packed little-endian (on any machine), ``bits`` bits per component in groups of whole bytes
    (:func:`_packing`: 80 bytes for 64 channels at 10 bits, against 128 in float16). Read back
    (:func:`unpacked_directions`, then normalised), a component is within the largest one's 1/(2^bits - 2) of the
    vector's, before normalising. Block by block: no full-size temporaries (0.13-0.15 s for 358 k vectors of 64 on
    one thread).

    Raises:
        ValueError: a vector holds NaN or an infinity (it has no direction to store).
    """
    import torch

    channels = rows.shape[1]
    group, nbytes, groups = _packing(bits, channels)
    top, n = (1 << (bits - 1)) - 1, rows.shape[0] if index is None else len(index)
    out = torch.empty((n, groups * nbytes), dtype=torch.uint8)
    shifts = torch.arange(group, dtype=torch.int64) * bits
    for i in range(0, n, block):
        blk = (rows[i:i + block] if index is None else rows[index[i:i + block].to(rows.device)]).float().cpu()
        peak = blk.abs().amax(dim=1, keepdim=True)  # NaN or an infinity where a component is one
        if not bool(torch.isfinite(peak).all()):
            raise ValueError("local vectors holding NaN or an infinity have no direction to store")
        peak.clamp_min_(1e-30)
        ints = torch.full((len(blk), groups * group), top, dtype=torch.int64)  # (the fill: zeros, offset)
        ints[:, :channels] = (blk * (top / peak)).round_().clamp_(-top, top).to(torch.int64).add_(top)  # 0 .. 2 top
        words = (ints.view(len(ints), groups, group) << shifts).sum(dim=2)  # (n, groups), low bytes used
        if _BIG_ENDIAN:  # each word's bytes stored least significant first on any machine
            words = torch.from_numpy(words.numpy().byteswap())
        out[i:i + block] = words.view(torch.uint8).view(len(ints), groups, 8)[..., :nbytes].reshape(len(ints), -1)
    return out.numpy()


def unpacked_directions(packed: np.ndarray, channels: int, bits: int = DIRECTION_BITS) -> torch.Tensor:
    """(n, ``channels``) float32: the integer components that :func:`packed_directions` packed into ``packed``
    (n, bytes); normalise each row for the direction stored (:func:`write_rows` with ``unit`` does)."""
    import torch

    group, nbytes, groups = _packing(bits, channels)
    top, n = (1 << (bits - 1)) - 1, len(packed)
    words = np.zeros((n, groups, 8), np.uint8)
    words[..., :nbytes] = np.asarray(packed).reshape(n, groups, nbytes)
    native = torch.from_numpy(words.view("<i8").astype(np.int64))  # (n, groups, 1) (a copy even where no swap is due)
    shifts = torch.arange(group, dtype=torch.int64) * bits
    ints = (native >> shifts) & ((1 << bits) - 1)  # (n, groups, group)
    return ints.view(n, groups * group)[:, :channels].float().sub_(top)


def normalize_rows(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Voxel-major ``rows`` (n, C) scaled in place to unit length: :func:`normalize_channels` for rows, equal to it
    to float rounding (at most 1 ulp, 1.2e-7; the sum of squares is reduced along each row, not channel by
    channel). A row's values do not depend on the other rows. 0.03 s for 650 k rows of 64, against 0.2 s through
    channel-major copies."""
    import torch

    return rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(eps))


# ---------------------------------------------------------------------------------------------- tile planning
@dataclass(frozen=True)
class TilePlan:
    """Input-grid boxes ``[start, stop)`` (zyx, multiples of the tile step or the volume's end) to embed."""

    boxes_input: list[tuple[tuple[int, ...], tuple[int, ...]]]
    whole: bool  # cheaper to embed the whole volume than the boxes with their halos


def _blocks_holding(mask: np.ndarray, block: int) -> np.ndarray:
    """(ceil(n / block) per axis) bool: the blocks of ``block`` voxels per axis that hold a True voxel of ``mask``.

    Reduced over the bounding box of the True voxels only (a few windows of a head-and-neck grid: about 1 ms instead
    of 11 ms over the whole grid); the same blocks as reducing the whole padded grid."""
    nb = tuple(-(-s // block) for s in mask.shape)
    out = np.zeros(nb, dtype=bool)
    lo, hi = [], []
    sub = mask
    for a in range(mask.ndim):  # each axis's range of True voxels, within the ranges found so far
        along = np.flatnonzero(sub.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        if not len(along):
            return out
        lo.append(int(along[0]) // block * block)
        hi.append(min(-(-(int(along[-1]) + 1) // block) * block, mask.shape[a]))
        sub = sub[(slice(None),) * a + (slice(lo[a], hi[a]),)]
    cnt = [-(-(b - a) // block) for a, b in zip(lo, hi)]
    pad = [(0, n * block - (b - a)) for n, a, b in zip(cnt, lo, hi)]
    part = np.pad(sub, pad).reshape(*sum(((n, block) for n in cnt), ())).any(axis=tuple(range(1, 2 * len(cnt), 2)))
    out[tuple(slice(a // block, a // block + n) for a, n in zip(lo, cnt))] = part
    return out


def plan_tiles(missing_zyx: np.ndarray, local_stride: int, step_input: int, halo_input: int,
               input_shape: tuple[int, ...], whole_fraction: float = 0.6) -> TilePlan:
    """Cover the missing local voxels with few input boxes of least total cost (input voxels, halos included).

    The missing voxels are grouped into blocks of ``step_input`` input voxels. One box around all of them is split
    in two, along the axis and at the gap that lowers the summed cost most, and each part again, while a split
    pays: a cluster of searches in one region shares one box (and its halo), distant ones get their own.

    Args:
        missing_zyx: (local grid shape) bool, local voxels to compute.
        local_stride: input voxels per local voxel (same on every axis).
        step_input: tile starts are multiples of this (input voxels).
        halo_input: context embedded around each box (input voxels).
        input_shape: the padded input's shape (zyx).
        whole_fraction: embed the whole volume when the boxes with their halos cover more than this fraction of it.
    """
    # any covering costs at least the missing voxels' own input voxels: past the threshold, the plan is the whole
    # volume whatever the split (the same decision as below, without the search; ensure_all on a body mask)
    if float(np.count_nonzero(missing_zyx)) * local_stride ** missing_zyx.ndim > whole_fraction * float(np.prod(input_shape)):
        return TilePlan([], True)
    block = max(1, step_input // local_stride)  # local voxels per block along each axis
    blocks = _blocks_holding(missing_zyx, block)
    if not blocks.any():
        return TilePlan([], False)
    shape = np.asarray(input_shape)

    def box_of(lo_b: np.ndarray, hi_b: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
        start = tuple(int(v * step_input) for v in lo_b)
        stop = tuple(int(min((v + 1) * step_input, s)) for v, s in zip(hi_b, input_shape))
        return start, stop

    def costs(lo_b: np.ndarray, hi_b: np.ndarray) -> np.ndarray:
        """Input voxels, halos included, of the boxes over blocks ``lo_b..hi_b`` ((K, d) each)."""
        start, stop = lo_b * step_input, np.minimum((hi_b + 1) * step_input, shape)
        return np.prod(np.minimum(shape, stop + halo_input) - np.maximum(0, start - halo_input), axis=-1)

    def best_split(pts: np.ndarray) -> tuple[int, tuple[int, int] | None]:
        """The least summed cost of splitting ``pts`` in two at a gap along one axis (``pts[:, a] <= t`` left), and
        that split (None when no split beats one box). Ties go to the lower axis, then the lower ``t``."""
        best, split = int(costs(pts.min(0), pts.max(0))), None
        for a in range(pts.shape[1]):
            p = pts[np.argsort(pts[:, a], kind="stable")]
            last = np.flatnonzero(np.diff(p[:, a]) > 0)  # the last point of each value of axis a but the highest
            if not len(last):
                continue
            left = costs(np.minimum.accumulate(p, 0)[last], np.maximum.accumulate(p, 0)[last])
            right = costs(np.minimum.accumulate(p[::-1], 0)[::-1][last + 1], np.maximum.accumulate(p[::-1], 0)[::-1][last + 1])
            c = left + right
            k = int(np.argmin(c))
            if c[k] < best:
                best, split = int(c[k]), (a, int(p[last[k], a]))
        return best, split

    boxes, total = [], 0
    todo = [np.argwhere(blocks)]
    while todo:
        pts = todo.pop()
        best, split = best_split(pts)
        if split is None:
            boxes.append(box_of(pts.min(0), pts.max(0)))
            total += best
        else:
            left = pts[:, split[0]] <= split[1]
            todo += [pts[left], pts[~left]]
    return TilePlan(boxes, total > whole_fraction * float(np.prod(input_shape)))


# ---------------------------------------------------------------------------------------------- disk entries
def write_entry(path: Path, header: dict, arrays: list[np.ndarray]) -> int:
    """Write a cache entry: magic, header length, JSON header, payload.

    The payload is the raw bytes of ``arrays`` in order. The header holds the payload's size and a SHA-256 of the
    header's other fields and the payload together (:func:`_digest`): the grids that place every vector are in the
    header, so a damaged header is detected as a damaged payload is. Returns the bytes written.
    """
    from .io import atomic_path

    payload = [np.ascontiguousarray(a).tobytes() for a in arrays]
    header = {**header, "payload_bytes": sum(len(p) for p in payload),
              "arrays": [[str(a.dtype), list(a.shape)] for a in arrays], "checksum_covers": CHECKSUM_COVERS}
    header["sha256"] = _digest(header, payload)
    head = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(head)) + head)
        for p in payload:
            f.write(p)
    return len(MAGIC) + 8 + len(head) + header["payload_bytes"]


#: what an entry's checksum covers (its header says so; entries written before the header was covered are
#: recomputed)
CHECKSUM_COVERS = "header and payload"


def _digest(header: dict, payload) -> str:
    """SHA-256 of ``header`` (its fields but ``sha256``, as sorted JSON) and the ``payload`` (bytes, or a list of
    them)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for p in payload if isinstance(payload, list) else [payload]:
        h.update(p)
    return h.hexdigest()


class DamagedEntry(ValueError):
    """A cache entry that is truncated, corrupt or of another format (it is recomputed, never trusted)."""


class OlderEntry(DamagedEntry):
    """An intact cache entry written by another samembed version in a format this one does not read (it is
    recomputed, never trusted)."""


def read_entry(path: Path) -> tuple[dict, list[np.ndarray]]:
    """Read and verify a cache entry written by :func:`write_entry`. The file is read once, header and payload
    together: another process may replace it meanwhile (atomically), and a header and payload of two versions would
    not agree.

    Raises:
        DamagedEntry: wrong magic, truncated file, size or SHA-256 mismatch; :class:`OlderEntry`: an entry of an
            older version.
    """
    data = path.read_bytes()
    header, start = _parse_header(path, data[:len(MAGIC) + 8], lambda n: data[len(MAGIC) + 8:len(MAGIC) + 8 + n])
    _check_payload_size(path, header, len(data) - start)
    if header.get("checksum_covers") != CHECKSUM_COVERS:
        raise OlderEntry(f"{path}: an entry of an older version (its checksum did not cover its header)")
    if header.get("local_encoding") != LOCAL_ENCODING:  # (checked before the checksum: no need to hash it)
        raise OlderEntry(f"{path}: {_other_encoding(header)}")
    payload = memoryview(data)[start:]
    if _digest(header, payload) != header.get("sha256"):
        raise DamagedEntry(f"{path}: checksum mismatch (corrupt)")
    arrays, off = [], 0
    for dtype, shape in header["arrays"]:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        arrays.append(np.frombuffer(payload[off: off + nbytes], dtype=dtype).reshape(shape).copy())
        off += nbytes
    return header, arrays


#: a header longer than this is not a cache entry's (the real ones take about 1 KB)
MAX_HEADER_BYTES = 1 << 20


def read_entry_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a cache entry written by :func:`write_entry` and the payload's offset in the file (bytes),
    without reading or verifying the payload (:func:`read_entry` verifies it before an entry is used).

    Raises:
        DamagedEntry: not an entry of this format, or its header is cut short or unreadable.
    """
    with open(path, "rb") as f:
        return _parse_header(path, f.read(len(MAGIC) + 8), f.read)


def stored_voxels(path: Path, key: str) -> int | None:
    """How many local voxels the entry at ``path`` stores, from its header alone, when it is an entry of this
    version for ``key``; None when there is none, or it is not one (damaged, another version's or key's,
    unreadable)."""
    try:
        header, _ = read_entry_header(path)
        if header.get("key") != key or header.get("local_encoding") != LOCAL_ENCODING:
            return None
        return _stored_count(header["arrays"])
    except (OSError, DamagedEntry, KeyError, IndexError, TypeError, ValueError):
        return None


def _stored_count(arrays: list) -> int | None:
    """The local voxels an entry stores, from its header's ``arrays`` (the packed vectors', fourth, shape: rows x
    bytes); None for another layout."""
    return int(arrays[3][1][0]) if len(arrays) > 3 and len(arrays[3][1]) == 2 else None


def _parse_header(path: Path, lead: bytes, read: Callable[[int], bytes]) -> tuple[dict, int]:
    """:func:`read_entry_header` of an entry whose first bytes are ``lead`` (magic and header length) and whose
    header ``read(n)`` gives."""
    if not lead.startswith(MAGIC) or len(lead) < len(MAGIC) + 8:
        raise DamagedEntry(f"{path}: not a samembed cache entry (or an older format)")
    (n,) = struct.unpack("<Q", lead[len(MAGIC):])
    if n > MAX_HEADER_BYTES:
        raise DamagedEntry(f"{path}: a header of {n} bytes (corrupt)")
    raw = read(n)
    if len(raw) != n:
        raise DamagedEntry(f"{path}: the header is cut short (truncated?)")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise DamagedEntry(f"{path}: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise DamagedEntry(f"{path}: unreadable header (not an object)")
    return header, len(MAGIC) + 8 + n


def _check_payload_size(path: Path, header: dict, payload_bytes: int) -> None:
    """Raise :class:`DamagedEntry` unless the entry holds as many payload bytes as its header says."""
    if payload_bytes != header.get("payload_bytes"):
        raise DamagedEntry(f"{path}: {payload_bytes} payload bytes, the header says {header.get('payload_bytes')} "
                           "(truncated?)")


def _other_encoding(header: dict) -> str:
    """Why an entry whose local vectors are not in :data:`LOCAL_ENCODING` is not used."""
    encoding = header.get("local_encoding")
    if encoding is None:
        return "an entry of an older version (its local vectors in half precision)"
    return f"an entry of another version (its local vectors as {encoding})"



#: what :func:`cache_info` says of a file of the older, torch-pickled format (named otherwise: never read again)
OLDER_FORMAT = "an older format"


def _entry_summary(path: Path, size: int) -> dict:
    """What ``samembed cache info`` says of one entry of ``size`` bytes: the image and model it holds, its local grid
    (shape and spacing in z, y, x order) and how many of that grid's voxels it stores, or why it is not used:
    ``damaged`` (a header that is not an entry's, or a file shorter or longer than its header says; its checksum is
    verified only when the entry is used), with ``older`` True for an older version's entry (its key is not this
    version's: never read, only removed by ``samembed cache clear``)."""
    if OLDER_ENTRY_NAME.fullmatch(path.name):
        return {"damaged": OLDER_FORMAT, "older": True}
    try:
        h, offset = read_entry_header(path)
        _check_payload_size(path, h, size - offset)
        if h.get("checksum_covers") != CHECKSUM_COVERS:
            return {"damaged": "an entry of an older version (its checksum did not cover its header)", "older": True}
        if h.get("local_encoding") != LOCAL_ENCODING:
            return {"damaged": _other_encoding(h), "older": True}
        grid = h["local_grid"]
        arrays = h["arrays"]
        return {"image": str(h.get("image") or "?"), "model": str(h.get("model_id") or "?"),
                "grid_zyx": [int(v) for v in grid["shape_zyx"]],
                "spacing_zyx_mm": [float(v) for v in reversed(grid["spacing_mm"])],
                "stored_voxels": _stored_count(arrays)}
    except DamagedEntry as e:
        return {"damaged": str(e).removeprefix(f"{path}: ")}
    except (KeyError, IndexError, TypeError, ValueError):
        return {"damaged": "a header without the entry's grid (another version?)"}
    except PermissionError as e:  # another user's: a match leaves it as it is (it is not recomputed into the file)
        return {"damaged": f"unreadable ({e.strerror or e})", "unreadable": True}
    except OSError as e:  # one unreadable entry does not stop the listing
        return {"damaged": f"unreadable ({e.strerror or e})"}


def entry_files(cache_dir: str | Path) -> list[Path]:
    """The cache entries in the folder ``cache_dir``, sorted: files named by a key and :data:`ENTRY_SUFFIX`
    (:data:`ENTRY_NAME`; a damaged one too: it is listed as such, and removed), and older entries, named by their key
    and ``.pt`` (:data:`OLDER_ENTRY_NAME`), that hold what such an entry held (:func:`_older_entry`). Any other file,
    a checkpoint ``model.pt``, ``my.samemb.pt``, a text file or a content-addressed checkpoint that happens to be
    named by 32 hex digits, is not an entry: never listed, never removed."""
    folder = Path(cache_dir)
    return sorted(p for p in folder.iterdir()
                  if (ENTRY_NAME.fullmatch(p.name) or (OLDER_ENTRY_NAME.fullmatch(p.name) and _older_entry(p)))
                  and p.is_file())


def _older_entry(path: Path) -> bool:
    """Whether ``path`` is an entry of the older format: a zip that ``torch.save`` wrote whose pickle holds the
    entry's ``meta`` (:data:`_OLDER_ENTRY_WORDS`), read without unpickling it. A file this user may not read, or that
    is not such a zip, is not taken for one (it is left alone)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist()
                       if i.filename.endswith("/data.pkl") and i.file_size <= _OLDER_ENTRY_PICKLE_MAX]
            if len(pickles) != 1:
                return False
            data = archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return False
    return all(word in data for word in _OLDER_ENTRY_WORDS)


def cache_info(cache_dir: str | Path) -> dict:
    """Entries and bytes in a cache folder (``samembed cache info``): per entry its file name, size (bytes),
    modification time (seconds since the epoch: when it was last written or used, :func:`mark_used`) and
    :func:`_entry_summary`'s fields. Only the headers are read: a corrupt payload of the right size shows when the
    entry is next used (and is recomputed then)."""
    folder = Path(cache_dir)
    files = entry_files(folder)
    entries = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:  # removed meanwhile (another process's `cache clear`)
            continue
        entries.append({"file": f.name, "bytes": st.st_size, "modified": st.st_mtime, **_entry_summary(f, st.st_size)})
    left = []
    for f in unfinished_files(folder):
        try:
            left.append((f.name, f.stat().st_size))
        except OSError:
            continue
    return {"folder": str(folder), "entries": len(entries), "bytes": sum(e["bytes"] for e in entries),
            "files": [(e["file"], e["bytes"]) for e in entries], "details": entries, "unfinished": left}


#: an entry's temporary file while it is written (:func:`samembed.io.atomic_path`), renamed to the entry when
#: complete; one left behind is a write that a killed process (the OOM killer, a batch system's limit) did not finish
UNFINISHED_NAME = re.compile(r"\.[0-9a-f]{32}" + re.escape(ENTRY_SUFFIX) + r"\.[A-Za-z0-9_]+\.tmp\.pt")
#: an unfinished write older than this (seconds since its last change) is taken as abandoned: a running write
#: changes its file every moment, and a whole entry takes seconds to write
ABANDONED_AFTER_S = 600.0


def unfinished_files(cache_dir: str | Path) -> list[Path]:
    """Temporary files of entry writes (:data:`UNFINISHED_NAME`) in the folder, sorted, not changed for
    :data:`ABANDONED_AFTER_S`: left by processes killed while writing (never read; ``samembed cache clear``
    removes them)."""
    now = time.time()
    found = []
    for p in Path(cache_dir).iterdir():
        if UNFINISHED_NAME.fullmatch(p.name):
            try:
                if p.is_file() and now - p.stat().st_mtime > ABANDONED_AFTER_S:
                    found.append(p)
            except OSError:  # removed meanwhile (its write finished)
                continue
    return sorted(found)


def mark_used(path: Path) -> None:
    """Note that the cache entry ``path`` was just read: its modification time becomes now, so that it shows when
    the entry was last written or used, and :func:`cache_clear` with a limit removes the entries left unused first.
    Another user's entry, which this user may not change, keeps its time."""
    with contextlib.suppress(OSError):
        os.utime(path)


@dataclass(frozen=True)
class ClearLimits:
    """Which entries :func:`cache_clear` removes: all when both are None; else those not written or used
    (:func:`mark_used`) for ``unused_for_s`` seconds, and then the least recently used until the rest take at most
    ``max_bytes``. Entries of an older format, which this version never reads, go in every case."""

    unused_for_s: float | None = None
    max_bytes: int | None = None

    @property
    def all(self) -> bool:
        return self.unused_for_s is None and self.max_bytes is None


def _entries_to_clear(entries: list[Path], limits: ClearLimits) -> list[Path]:
    """The entries of ``entries`` that ``limits`` removes (:class:`ClearLimits`)."""
    if limits.all:
        return list(entries)
    now = time.time()
    dated = []
    for f in entries:
        try:
            st = f.stat()
        except FileNotFoundError:  # removed meanwhile (another process's clear)
            continue
        older = _entry_summary(f, st.st_size).get("older", False)  # (an older-format name is told by its name alone)
        dated.append((st.st_mtime, st.st_size, f, older))
    dated.sort(key=lambda e: -e[0])  # the most recently used first
    gone, kept_bytes, full = [], 0, False
    for mtime, size, f, older in dated:
        stale = limits.unused_for_s is not None and now - mtime > limits.unused_for_s
        # the first entry that does not fit, and every one used before it (not a smaller, older one that would)
        full = full or (not (older or stale) and limits.max_bytes is not None and kept_bytes + size > limits.max_bytes)
        if older or stale or full:
            gone.append(f)
        else:
            kept_bytes += size
    return sorted(gone)


def cache_clear(cache_dir: str | Path, limits: ClearLimits = ClearLimits()) -> tuple[int, int, list[tuple[Path, str]]]:
    """Delete the cache entries (:func:`entry_files`: current and older format, nothing else) in the folder that
    ``limits`` selects (all by default), and the abandoned writes (:func:`unfinished_files`), each that this user may
    delete; returns how many entries and writes were removed, and each file left with the reason (a shared folder
    holds other users' entries, which a sticky folder does not let this user remove)."""
    left: list[tuple[Path, str]] = []

    def removed(files: list[Path]) -> int:
        n = 0
        for f in files:  # no header needs reading to delete them
            try:
                f.unlink(missing_ok=True)
                n += 1
            except OSError as e:
                left.append((f, e.strerror or str(e)))
        return n

    entries = removed(_entries_to_clear(entry_files(cache_dir), limits))
    return entries, removed(unfinished_files(cache_dir)), left
