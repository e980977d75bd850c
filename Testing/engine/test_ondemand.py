"""On-demand local embedding on real CT pairs: it finds what whole-volume embedding finds, its tiles are reused,
and a damaged disk entry is recomputed, never trusted.

The reference is the same Matcher code with both images embedded whole first (``Matcher.embed``, which the match
then takes from the memory cache); the on-demand run is a fresh Matcher, whose ``match`` embeds the global maps
and only the local tiles its searches read. Points: organ centroids, points whose local voxel sits on a tile-block
border (block = 4 local voxels), and points near the image's first and last slices.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from samembed import Cancelled, Matcher, MatchOptions
from samembed.image import Image
from samembed.io import read_image
from samembed.matcher import boxes_around
from samembed.tiles import ENTRY_SUFFIX, plan_tiles

from ..conftest import data_file, two_level_default

PAIRS = {
    "openkbp": ("openkbp/ct/pt_215_ct.nii.gz", "openkbp/ct/pt_232_ct.nii.gz"),
    "lidc": ("lidc/LIDC-IDRI-0002_ct_2mm.nii.gz", "lidc/LIDC-IDRI-0003_ct_2mm.nii.gz"),
}
PURE = MatchOptions(polish=False)  # the SAM search alone: the matched voxel and its sub-voxel fit


def centroids(patient: str) -> np.ndarray:
    rows = csv.DictReader(data_file("ct", "openkbp", "oar_centroids.csv").open())
    return np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in rows if r["patient"] == patient])


def border_and_edge_points(maps, n_border: int = 3, seed: int = 0) -> np.ndarray:
    """LPS mm centres of body voxels on tile-block borders (indices 0 or 3 mod 4 on every axis), and of body
    voxels on the second and second-to-last valid slices (near the image edge)."""
    shape = maps.local_grid.shape_zyx
    ok = (maps.valid & maps.body).reshape(shape).numpy()
    zyx = np.argwhere(ok)
    rng = np.random.default_rng(seed)
    on_border = zyx[np.all(np.isin(zyx % 4, (0, 3)), axis=1)]
    picks = [on_border[rng.choice(len(on_border), n_border, replace=False)]]
    zs = np.unique(zyx[:, 0])
    for z in (zs[1], zs[-2]):
        row = zyx[zyx[:, 0] == z]
        picks.append(row[[len(row) // 2]])
    sel = np.concatenate(picks)
    return maps.local_grid.index_to_lps(sel[:, ::-1].astype(np.float64))


@pytest.fixture(scope="module")
def whole_cache(tmp_path_factory):
    """The whole-volume reference's disk cache folder (its entries are whole images' body voxels)."""
    return tmp_path_factory.mktemp("whole-cache")


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request, whole_cache):
    """(name, source, target, points, whole-volume matcher) of a real CT pair."""
    src_rel, tgt_rel = PAIRS[request.param]
    src = read_image(data_file("ct", *src_rel.split("/")))
    tgt = read_image(data_file("ct", *tgt_rel.split("/")))
    whole = Matcher("default", device="cpu", cache_dir=whole_cache / request.param)
    smaps = whole.embed(src)
    whole.embed(tgt)
    pts = border_and_edge_points(smaps)
    if request.param == "openkbp":
        pts = np.concatenate([centroids("pt_215"), pts])
    return request.param, src, tgt, pts, whole


def cached(matcher: Matcher, image):
    """The maps ``matcher`` holds in memory for ``image`` (as its last match left them)."""
    emb = matcher.embedder_for(image.ndim)
    return emb.cache.get(emb.key(image))


#: how far a polished match may move (mm) when the SAM match it starts from differs by float rounding
POLISHED_MM = 1e-3


def _same(a, b, tol_score: float = 1e-5, tol_mm: float = 1e-4) -> None:
    """The same matched voxel and sub-voxel fit (within ``tol_mm``), scores within ``tol_score``."""
    pa = np.array([m.point_lps_mm for m in a.matches])
    pb = np.array([m.point_lps_mm for m in b.matches])
    np.testing.assert_allclose(pa, pb, atol=tol_mm, rtol=0)
    np.testing.assert_allclose([m.score for m in a.matches], [m.score for m in b.matches], atol=tol_score, rtol=0)
    assert [m.confident for m in a.matches] == [m.confident for m in b.matches]


def _covered(plan, missing: np.ndarray, stride: int) -> np.ndarray:
    """Local voxels inside the plan's input boxes."""
    out = np.zeros_like(missing)
    for start, stop in plan.boxes_input:
        out[tuple(slice(a // stride, -(-b // stride)) for a, b in zip(start, stop))] = True
    return out


def _cost(boxes, halo: int, shape) -> int:
    return sum(int(np.prod([min(s, b + halo) - max(0, a - halo) for a, b, s in zip(start, stop, shape)]))
               for start, stop in boxes)


def test_the_tile_plan_covers_every_missing_voxel_and_splits_distant_searches():
    stride, step, halo = 2, 8, 32
    shape_in = (160, 240, 240)
    local = tuple(s // stride for s in shape_in)
    missing = np.zeros(local, dtype=bool)
    missing[10:14, 10:16, 10:14] = True  # two windows far apart along two axes ...
    missing[60:70, 100:110, 95:112] = True
    missing[62, 104, 100] = True
    plan = plan_tiles(missing, stride, step, halo, shape_in)
    assert not plan.whole
    assert (_covered(plan, missing, stride) | ~missing).all(), "a missing voxel lies outside every box"
    assert len(plan.boxes_input) == 2, plan.boxes_input
    one = [(tuple(int(v) * stride // step * step for v in np.argwhere(missing).min(0)),
            tuple(min(s, (int(v) * stride // step + 1) * step) for v, s in zip(np.argwhere(missing).max(0), shape_in)))]
    assert _cost(plan.boxes_input, halo, shape_in) < _cost(one, halo, shape_in) / 2
    # ... and two windows closer than their halos share one box (two halos would cost more)
    near = np.zeros(local, dtype=bool)
    near[20:24, 20:24, 20:24] = True
    near[20:24, 20:24, 30:34] = True
    plan = plan_tiles(near, stride, step, halo, shape_in)
    assert len(plan.boxes_input) == 1 and (_covered(plan, near, stride) | ~near).all()
    assert plan_tiles(np.zeros(local, dtype=bool), stride, step, halo, shape_in).boxes_input == []
    assert plan_tiles(np.ones(local, dtype=bool), stride, step, halo, shape_in).whole


def _greedy_plan_reference(missing, stride: int, step: int, halo: int, shape_in) -> list:
    """The tile plan's boxes by the rule plan_tiles documents, one candidate split at a time: split the blocks'
    bounding box at the gap (axis, then threshold, in increasing order; the first of equal costs) that lowers the
    summed cost most, while a split pays."""
    block = step // stride
    nb = tuple(-(-s // block) for s in missing.shape)
    padded = np.pad(missing, [(0, n * block - s) for n, s in zip(nb, missing.shape)])
    blocks = padded.reshape(*sum(((n, block) for n in nb), ())).any(axis=tuple(range(1, 2 * len(nb), 2)))

    def box(lo, hi):
        return (tuple(int(v * step) for v in lo), tuple(int(min((v + 1) * step, s)) for v, s in zip(hi, shape_in)))

    def cost(pts):
        start, stop = box(pts.min(0), pts.max(0))
        return int(np.prod([min(s, e + halo) - max(0, a - halo) for a, e, s in zip(start, stop, shape_in)]))

    out, todo = [], [np.argwhere(blocks)]
    while todo:
        pts = todo.pop()
        best, split = cost(pts), None
        for a in range(pts.shape[1]):
            for t in np.unique(pts[:, a])[:-1]:
                left = pts[:, a] <= t
                c = cost(pts[left]) + cost(pts[~left])
                if c < best:
                    best, split = c, (a, t)
        if split is None:
            out.append(box(pts.min(0), pts.max(0)))
        else:
            left = pts[:, split[0]] <= split[1]
            todo += [pts[left], pts[~left]]
    return out


def test_the_tile_plan_splits_as_one_split_at_a_time_would():
    """plan_tiles scores every split of an axis at once (running minima and maxima): its boxes are those of trying
    the splits one by one, on scattered and clustered searches in 2D and 3D."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        d = 2 if trial % 4 == 0 else 3
        stride, step, halo = 2, int(rng.choice([4, 8])), int(rng.choice([8, 32]))
        shape_in = tuple(int(v) for v in rng.integers(40, 160, d))
        missing = np.zeros(tuple(s // stride for s in shape_in), dtype=bool)
        if trial % 5 == 0:  # scattered voxels
            missing[:] = rng.random(missing.shape) < 0.002
        for _ in range(int(rng.integers(1, 8))):  # search windows
            c, r = [int(rng.integers(0, s)) for s in missing.shape], [int(rng.integers(0, 10)) for _ in range(d)]
            missing[tuple(slice(max(0, a - b), a + b + 1) for a, b in zip(c, r))] = True
        plan = plan_tiles(missing, stride, step, halo, shape_in, whole_fraction=2.0)  # never the whole volume
        assert plan.boxes_input == _greedy_plan_reference(missing, stride, step, halo, shape_in), trial


def test_the_blocks_holding_missing_voxels_are_those_of_the_whole_padded_grid():
    """The tile plan's blocks are reduced over the missing voxels' bounding box only: the same blocks as reducing the
    whole grid, padded to whole blocks, for boxes, scattered voxels, a voxel in the last partial block, and none."""
    from samembed.tiles import _blocks_holding

    def whole(mask, block):
        nb = tuple(-(-s // block) for s in mask.shape)
        padded = np.pad(mask, [(0, n * block - s) for n, s in zip(nb, mask.shape)])
        return padded.reshape(*sum(((n, block) for n in nb), ())).any(axis=tuple(range(1, 2 * len(nb), 2)))

    rng = np.random.default_rng(3)
    for trial in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 30, 2 if trial % 3 == 0 else 3))
        mask = np.zeros(shape, dtype=bool)
        if trial % 4 == 1:
            mask |= rng.random(shape) < 0.02
        for _ in range(int(rng.integers(0, 4))):
            lo = [int(rng.integers(0, n)) for n in shape]
            mask[tuple(slice(a, int(rng.integers(a, n)) + 1) for a, n in zip(lo, shape))] = True
        if trial % 7 == 2:
            mask[tuple(n - 1 for n in shape)] = True  # the last voxel: a partial block on every axis
        for block in (1, 2, 3, 4):
            assert np.array_equal(_blocks_holding(mask, block), whole(mask, block)), (trial, block)


@pytest.mark.needs_data
def test_the_prior_s_global_pairs_taken_in_chunks_are_those_of_the_whole_product(monkeypatch):
    """:func:`samembed.matcher.global_pairs` takes each source sample's best target candidate a chunk of samples at a
    time (no (samples, candidates) product held whole): the pairs must be those of one product over every sample."""
    import samembed.matcher as matcher_module
    from samembed.api import as_image

    m = Matcher("random:sam-lite", device="cpu")
    src, tgt = (m.embedder.embed(as_image(data_file("ct", "openkbp", "ct", f"pt_{p}_ct.nii.gz")), on_demand=True)
                for p in ("215", "232"))
    chunked = matcher_module.global_pairs(src, tgt)
    assert len(chunked[0]) > 2 * matcher_module.PRIOR_CHUNK  # several chunks
    monkeypatch.setattr(matcher_module, "PRIOR_CHUNK", 1 << 30)  # one chunk: the whole product
    whole = matcher_module.global_pairs(src, tgt)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


@pytest.mark.needs_data
def test_the_network_input_kept_to_compute_more_tiles_is_counted_in_the_maps_memory_and_its_image_let_go():
    """A map computed in part keeps its network input (or, loaded from the disk cache, its image) to compute more
    tiles: 53 MB of a head CT beside 33 MB of features. The memory cache's limit did not count it, and a process
    matching one atlas into many scans rose to about 3x that limit. It is counted now; and once the input is
    prepared, the image kept to prepare it is let go."""
    import functools
    import gc
    import weakref
    from types import SimpleNamespace

    from samembed.api import as_image
    from samembed.embedding import TileComputer

    m = Matcher("random:sam-lite", device="cpu")
    maps = m.embedder.embed(as_image(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")), on_demand=True)
    tiles = maps.tiles
    held = tiles.nbytes
    assert held > 0 and held == tiles.input().nelement() * tiles.input().element_size()  # (the same array)
    with_input = maps.nbytes
    maps.tiles = None
    try:
        assert with_input - maps.nbytes == held, "the maps' memory leaves out the input they keep"
    finally:
        maps.tiles = tiles
    # loaded from the disk cache: the image is kept until the first tile needs the input, then let go
    image = Image.from_array(np.zeros((16, 16, 16), np.float32))
    gone = weakref.ref(image)
    computer = TileComputer(SimpleNamespace(device=torch.device("cpu"), half=False),
                            functools.partial(lambda im: im.array + 1.0, image), held_bytes=image.array.nbytes)
    assert computer.nbytes == 16 ** 3 * 4
    del image
    gc.collect()
    assert gone() is not None  # (held to prepare the input)
    computer.input()
    gc.collect()
    assert gone() is None, "the image outlived the input made from it"
    assert computer.nbytes == 16 ** 3 * 4


@pytest.mark.needs_data
def test_global_vectors_are_the_same_before_and_after_their_tiles_are_computed():
    """The search prior reads global vectors of voxels whose tiles may or may not be computed yet: both ways must
    give the same values bit for bit, else a prior (and a match) depends on what earlier searches computed."""
    import torch

    from samembed.api import as_image

    m = Matcher("random:sam-lite", device="cpu")
    maps = m.embedder.embed(as_image(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")), on_demand=True)
    body = torch.nonzero(maps.search_mask(True)).reshape(-1)
    flat = body[torch.randperm(len(body), generator=torch.Generator().manual_seed(0))[:200]]
    before = maps.global_at(flat)
    assert not bool(maps.ready[flat].any())
    # the memory cache asks every map for its size on every put: the touched pages are counted once per fill
    from samembed import embedding

    counted = []
    touched = embedding._touched_fraction
    embedding._touched_fraction = lambda *a: counted.append(1) or touched(*a)
    try:
        held = maps.nbytes
        assert maps.nbytes == held and len(counted) == 1, "counted again with no tile computed"
        maps.ensure_flat(flat)
        assert maps.ready is None or bool(maps.ready[flat].all())
        assert torch.equal(maps.global_at(flat), before)
        # the memory the maps report grows with their tiles, so the memory cache's cap sees them
        assert maps.nbytes > held and len(counted) == (1 if maps.ready is None else 2)
    finally:
        embedding._touched_fraction = touched


@pytest.mark.needs_data
def test_a_window_s_global_similarity_from_the_coarse_map_is_the_product_with_each_voxel_s_global_vector():
    """No voxel stores its upsampled global vector: a search interpolates the coarse map's products with its queries
    and divides by each voxel's stored length. That must equal the product with the voxels' upsampled, normalised
    vectors (:meth:`global_at`) to float rounding, at the window's edges and beyond the body's box too; and
    :meth:`global_at` gives the same vectors bit for bit whether it upsamples whole planes or single voxels."""
    import torch

    from samembed.api import as_image
    from samembed.matcher import query_vectors

    m = Matcher("random:sam-lite", device="cpu")
    maps = m.embedder.embed(as_image(data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")), on_demand=True)
    shape = np.array(maps.local_grid.shape_zyx)
    cl = maps.local_channels
    rng = np.random.default_rng(0)
    q = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(3, maps.channels)).astype(np.float32)), dim=1)
    body = np.argwhere(maps.body.reshape(*shape).numpy())
    centre = body[len(body) // 2]
    for lo, hi in ((np.maximum(centre - 6, 0), np.minimum(centre + 5, shape - 1)),  # a window in the body
                   (np.zeros(3, int), np.minimum([4, 9, 7], shape - 1))):  # a corner of the grid (air, zero vectors)
        maps.ensure(lo, hi)
        got = maps.global_similarity_box(q[:, cl:], lo, hi)
        flat = torch.from_numpy(np.ravel_multi_index(tuple(np.indices(hi - lo + 1).reshape(3, -1) + lo[:, None]), shape))
        want = q[:, cl:] @ maps.global_at(flat)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        # the whole vectors of the voxels: the stored local ones, then the same global ones
        rows = maps.rows_at(flat)
        assert torch.equal(rows[:, :cl], maps.vectors[flat].float()) and torch.equal(rows[:, cl:], maps.global_at(flat).T)
    planes = torch.arange(int(np.prod(shape[1:])) * 3) + int(np.prod(shape[1:])) * int(centre[0])  # three whole planes
    one_by_one = torch.cat([maps.global_at(planes[i:i + 100]) for i in range(0, len(planes), 100)], 1)
    assert torch.equal(maps.global_at(planes), one_by_one)
    # a query vector interpolated between voxels: linear in the voxels' whole vectors, each half re-normalised
    box_lo, box_hi = np.maximum(centre - 2, 0), np.minimum(centre + 2, shape - 1)
    maps.ensure(box_lo, box_hi)
    at = box_lo + 0.3 + rng.random((4, 3)) * (box_hi - box_lo - 0.6)  # (k, j, i) inside the box
    sub = maps.rows_at(torch.from_numpy(np.ravel_multi_index(
        tuple(np.indices(box_hi - box_lo + 1).reshape(3, -1) + box_lo[:, None]), shape)))
    vol = sub.T.reshape(1, -1, *(box_hi - box_lo + 1))
    norm = (2 * (at - box_lo)[:, ::-1] + 1) / (box_hi - box_lo + 1)[::-1] - 1  # grid_sample's (x, y, z)
    ref = torch.nn.functional.grid_sample(vol, torch.from_numpy(norm.astype(np.float32)).reshape(1, -1, 1, 1, 3),
                                          mode="bilinear", align_corners=False).reshape(vol.shape[1], -1).T
    ref = torch.cat([torch.nn.functional.normalize(ref[:, :cl], dim=1), torch.nn.functional.normalize(ref[:, cl:], dim=1)], 1)
    got = query_vectors(maps, maps.local_grid.index_to_lps(at[:, ::-1]), mode="bilinear")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
@pytest.mark.parametrize(("shape", "gshape"), [((37, 45, 29), (10, 12, 8)), ((37, 45), (10, 12))])
def test_a_tile_upsamples_its_stored_lines_and_searches_its_windows_as_the_whole_map_would(fraction, shape, gshape):
    """A sparse tile's global vectors, upsampled line by line, are the whole map's bit for bit (a voxel's vector
    never depends on how it was computed), and so are their lengths; a window's products, taken plane by plane,
    are the one product's to float rounding."""
    import torch

    from samembed.matcher import _box_products
    from samembed.tiles import (
        channel_norms,
        coarse_span,
        normalize_channels,
        upsample_at,
        upsample_box,
        upsample_lengths_box,
        upsample_lines,
        upsample_part,
    )

    rng = np.random.default_rng(len(shape))
    glob = torch.from_numpy(rng.normal(size=(6, *gshape)).astype(np.float32))
    lo = np.array([3, 4, 2][: len(shape)])
    hi = np.array(shape) - np.array([5, 1, 3][: len(shape)])
    whole = upsample_box(glob, shape, np.zeros(len(shape), int), np.array(shape) - 1)
    box = upsample_box(glob, shape, lo, hi)
    inner = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
    assert torch.equal(box, whole[(slice(None), *inner)])
    span = coarse_span(gshape, shape, lo, hi)  # only the coarse voxels the box reads, in whole-tensor passes
    assert torch.equal(upsample_part(glob[(slice(None), *span)], gshape, span, shape, lo, hi), box)
    held = np.nonzero(rng.random(tuple(hi[:-1] - lo[:-1] + 1)) < fraction)
    sel = tuple(torch.from_numpy(v) for v in held)
    lines = upsample_lines(glob, shape, lo, hi, held)
    assert lines.shape == (6, len(held[0]), hi[-1] - lo[-1] + 1)
    assert torch.equal(lines, box[(slice(None), *sel, slice(None))])
    assert torch.equal(normalize_channels(lines.clone()), normalize_channels(box.clone())[(slice(None), *sel, slice(None))])
    # the vectors' lengths without the vectors, from the coarse planes: the lengths of the vectors to float rounding,
    # and the same bit for bit on every path (box, lines, single voxels)
    lengths = upsample_lengths_box(glob, shape, lo, hi)
    torch.testing.assert_close(lengths, channel_norms(box.clone()), atol=1e-6, rtol=1e-6)
    assert torch.equal(upsample_lengths_box(glob, shape, np.zeros(len(shape), int), np.array(shape) - 1)[inner], lengths)
    assert torch.equal(upsample_lines(glob, shape, lo, hi, held, lengths=True), lengths[(*sel, slice(None))])
    if len(held[0]):
        zyx = np.stack([v + o for v, o in zip(held, lo[:-1])] + [np.full(len(held[0]), lo[-1] + 1)], 1)
        assert torch.equal(upsample_at(glob, shape, zyx), lines[:, :, 1])
        assert torch.equal(upsample_at(glob, shape, zyx, lengths=True), lengths[(*sel, slice(None))][:, 1])
    q = torch.from_numpy(rng.normal(size=(3, 6)).astype(np.float32))
    rows = whole.movedim(0, -1).contiguous()  # voxel-major, as the feature buffer is
    for b in (inner, (inner[0], *(slice(0, n) for n in shape[1:]))):  # a window; whole planes (a view)
        want = (q @ rows[b].reshape(-1, 6).T).float()  # one product over the gathered box's rows
        # the BLAS kernel's blocking depends on the matrix sizes, so a plane's product may round differently
        torch.testing.assert_close(_box_products(q, rows, b), want, atol=1e-6, rtol=0)


def test_voxel_major_rows_take_channel_major_values_bit_for_bit_and_give_them_back():
    """The feature buffer is voxel-major; maps come out of the network channel-major. Writing them into rows (at
    flat indices or in order) changes no value, across several transpose blocks; rows normalised in place are the
    channel-major normalisation's to 1 ulp. A cache entry's packed directions come back as unit rows close to the
    vectors stored, and storing leaves the rows as they were."""
    import torch

    from samembed.tiles import (
        DIRECTION_BITS,
        new_feature_rows,
        normalize_channels,
        normalize_rows,
        packed_directions,
        unpacked_directions,
        write_rows,
    )

    rng = np.random.default_rng(3)
    local = torch.from_numpy(rng.normal(size=(6, 50)).astype(np.float32))
    glob = torch.from_numpy(rng.normal(size=(4, 50)).astype(np.float32))
    rows = new_feature_rows(200, 10, torch.float32, "cpu")
    assert rows.shape == (200, 10) and rows.is_contiguous()  # one voxel's vector per row, contiguous
    flat = torch.from_numpy(rng.choice(200, size=50, replace=False))
    write_rows(rows, [local, glob], flat, block=7)
    both = torch.cat([local, glob])
    assert torch.equal(rows[flat], both.T)
    for dtype in (torch.float16, torch.bfloat16):  # numpy's indexed assignment, and index_copy_ where numpy has no type
        half = torch.zeros((200, 10), dtype=dtype)
        write_rows(half[:, 2:], [local, glob[:2]], flat, block=7)  # into a strided view of the rows
        assert torch.equal(half[flat, 2:], torch.cat([local, glob[:2]]).T.to(dtype)) and not half[:, :2].any()
    ordered = new_feature_rows(50, 10, torch.float32, "cpu")
    write_rows(ordered[:, :6], [local], block=7)  # in order, into some of the channels
    write_rows(ordered[:, 6:], [glob], block=7)
    assert torch.equal(ordered, both.T)
    unit = normalize_rows(ordered[:, :6])
    torch.testing.assert_close(unit, normalize_channels(local.clone()).T, atol=2e-7, rtol=0)  # 1 ulp at most
    some = local.T[10:17].contiguous()
    assert torch.equal(normalize_rows(some), unit[10:17])  # a row's values do not depend on the other rows
    # normalised on the way in (a stored tile's local half): the values of rows normalised where they land
    normed = new_feature_rows(200, 10, torch.float32, "cpu")
    write_rows(normed, [local, glob], flat, block=7, unit=slice(0, 6))
    assert torch.equal(normed[flat][:, :6], unit) and torch.equal(normed[flat][:, 6:], glob.T)
    # a cache entry's packed directions (of rows picked by index, and of all rows), read back as unit rows: at
    # 8 bits (64 bytes a vector), 10 (the entries', 80 bytes) and 12 (96 bytes), each within its step
    vectors = normalize_rows(torch.from_numpy(rng.normal(size=(300, 64)).astype(np.float32)))
    kept = vectors.clone()
    pick = torch.from_numpy(rng.choice(300, size=120, replace=False))
    for bits, nbytes, within in ((8, 64, 5e-3), (DIRECTION_BITS, 80, 1.2e-3), (12, 96, 3e-4)):
        for index, want in ((pick, vectors[pick]), (None, vectors)):
            packed = packed_directions(vectors, index, bits, block=7)
            assert packed.dtype == np.uint8 and packed.shape == (len(want), nbytes)
            ints = unpacked_directions(packed, 64, bits)
            top = (1 << (bits - 1)) - 1
            assert torch.equal(ints.abs().amax(1), torch.full((len(want),), float(top))), "not the whole range"
            torch.testing.assert_close(ints, (want * (top / want.abs().amax(1, keepdim=True))).round(), atol=0, rtol=0)
            back = new_feature_rows(len(want), 64, torch.float32, "cpu")
            write_rows(back, [ints.T], block=7, unit=slice(None))
            torch.testing.assert_close(torch.linalg.vector_norm(back, dim=1), torch.ones(len(want)))
            assert float((back - want).abs().max()) < within, bits
    # a model whose local channels do not fill the last group (30 of 32 at 10 bits): filled with zeros
    odd = normalize_rows(torch.from_numpy(rng.normal(size=(50, 30)).astype(np.float32)))
    packed = packed_directions(odd, None, DIRECTION_BITS, block=7)
    assert packed.shape == (50, 40)
    ints = unpacked_directions(packed, 30)
    assert ints.shape == (50, 30)
    torch.testing.assert_close(ints, (odd * (511 / odd.abs().amax(1, keepdim=True))).round(), atol=0, rtol=0)
    assert torch.equal(vectors, kept), "storing changed the rows"


@pytest.mark.needs_data
@pytest.mark.parametrize("precision", ["auto", "fp32"])  # auto: the shipped model's int8 (int8 or bfloat16 global)
def test_on_demand_matching_equals_whole_volume_embedding_and_reuses_its_tiles(pair, precision, tmp_path):
    import torch

    name, src, tgt, pts, whole = pair
    if precision != "auto":
        whole = Matcher("default", device="cpu", cache_dir=tmp_path, precision=precision)
        whole.embed(src)
        whole.embed(tgt)
    od = Matcher("default", device="cpu", precision=precision)
    assert od.embedder.precision == ("int8-int8" if precision == "auto" else precision)
    miss = od.match(src, pts, [tgt], options=PURE)
    _same(whole.match(src, pts, [tgt], options=PURE), miss)
    # a tile-cache hit: nothing recomputed, the same result
    tiles = cached(od, tgt).tiles
    computed = None if tiles is None else tiles.tiles_computed
    _same(miss, od.match(src, pts, [tgt], options=PURE), tol_score=0.0)
    if tiles is not None:
        assert tiles.tiles_computed == computed, "the second match recomputed tiles"
    # with the polish (the default): its NCC optimum on the original voxels moves by ~1e-4 mm when its start moves
    # by float rounding (on-demand tiles and the whole map differ by ~1e-7), so 1e-3 mm (1/2000 of a voxel) here
    _same(whole.match(src, pts, [tgt]), od.match(src, pts, [tgt]), tol_mm=POLISHED_MM)
    tmaps = cached(od, tgt)
    if name == "openkbp":  # organs a few cm apart: their windows cover part of the target only
        assert not tmaps.complete, f"{name}: a few points should not need the whole target's local map"
    ref = whole.embed(tgt)
    ready = tmaps.ready if tmaps.ready is not None else slice(None)
    diff = (tmaps.features[:, ready] - ref.features[:, ready]).abs().max()
    assert float(diff) <= 1e-5, f"{name}: tile features differ from the whole-volume map by {float(diff):.2g}"
    # the lengths of the upsampled global vectors: the same upsampling on any box, bit for bit
    assert torch.equal(tmaps.global_norm[ready], ref.global_norm[ready])


@pytest.fixture(scope="module")
def two_level_model(pair):
    """The default's network without its local 16 mm level (tile halo 16, see ``two_level_default``), as a model
    with an int8 calibration made on the pair's source."""
    import torch

    from samembed.embedding import Embedder
    from samembed.models import LoadedModel, load_model
    from samembed.networks.int8 import calibrate

    default = load_model("default")
    net = two_level_default()
    arr = Embedder(default, "cpu")._prepare(pair[1])[0]
    qparams = calibrate(net, [torch.from_numpy(arr)[None, None]])
    return LoadedModel(net, default.preprocess, "two-level-default@test", None, {}, int8=qparams)


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_local_branch_of_two_levels_matches_on_demand_as_whole_volume(pair, two_level_model, precision):
    """A network of half the halo (16 input voxels) tiles as exactly as the default: on-demand matches equal
    whole-volume ones, in int8 and float32, and its tiles are the whole map's values."""
    name, src, tgt, pts, _ = pair
    whole = Matcher(two_level_model, device="cpu", precision=precision)
    whole.embed(src)
    ref = whole.embed(tgt)
    od = Matcher(two_level_model, device="cpu", precision=precision)
    assert od.embedder.net.spec.tile_halo == 16 and od.embedder.precision == precision
    _same(whole.match(src, pts, [tgt], options=PURE), od.match(src, pts, [tgt], options=PURE))
    tmaps = cached(od, tgt)
    assert not tmaps.complete, "a few points should not need the whole target's local map"
    ready = tmaps.ready if tmaps.ready is not None else slice(None)
    assert float((tmaps.features[:, ready] - ref.features[:, ready]).abs().max()) <= 1e-5


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)
def test_a_heatmap_covers_the_search_mask_with_the_whole_maps_values_and_embeds_no_air(pair):
    """A heatmap over the search mask (the body) holds the whole-volume map's similarities; every other voxel is -1,
    and the target's local map is not embedded there (a head-and-neck CT's body is about a tenth of its grid)."""
    from samembed.heatmap import voxel_lookup
    from samembed.matcher import heatmap_image, nearest_voxel_lps, query_vectors, similarity

    _, src, tgt, pts, whole = pair
    labels = ["a", "b"]
    od = Matcher("default", device="cpu")
    res = od.match(src, pts[:2], [tgt], labels, PURE.replace(heatmap=True))
    tmaps = cached(od, tgt)
    allowed = tmaps.search_mask(True)
    assert not tmaps.complete and bool(tmaps.ready[allowed].all())
    assert float(tmaps.ready.float().mean()) < 0.5, "the heatmap embedded most of the grid"
    ref_src, ref_tgt = whole.embed(src), whole.embed(tgt)
    full = similarity(query_vectors(ref_src, nearest_voxel_lps(ref_src, pts[:2])), ref_tgt)  # every voxel
    for n, lab in enumerate(labels):
        hm = res.heatmaps[(0, lab)].array
        want = heatmap_image(full[n].masked_fill(~allowed, float("-inf")), ref_tgt).array
        np.testing.assert_allclose(hm, want, atol=1e-5, rtol=0)
        assert float((hm > -1).mean()) < 0.5 and float(hm.max()) > 0.5
        # on the model's grid (--heatmap-grid model): each model voxel's value, which the full-size map gives every
        # target voxel whose centre falls in it, bit for bit; the match's score is its value at the match
        small = res.heatmaps.on_model_grid((0, lab))
        assert small.grid is res.heatmaps.model_grid((0, lab))
        assert small.grid.shape_zyx == tmaps.local_grid.shape_zyx
        np.testing.assert_array_equal(small.grid.ijk_to_lps, tmaps.local_grid.ijk_to_lps)
        assert small.array.dtype == np.float32 and small.array.shape == tmaps.local_grid.shape_zyx
        lookup = voxel_lookup(small.grid, res.heatmaps.image_grid((0, lab)))
        np.testing.assert_array_equal(np.append(small.array.reshape(-1), np.float32(-1.0))[lookup], hm)
        m = res.matches[n]
        at = tuple(np.round(small.grid.lps_to_index(np.asarray(m.point_lps_mm)[None])[0][::-1]).astype(int))
        assert abs(float(small.array[at]) - m.score) <= 1e-6


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)
def test_embedding_the_body_for_the_cache_leaves_the_air_and_gives_the_whole_maps_values(pair, tmp_path):
    """``Embedder.embed_body`` (``samembed embed``): the body's local vectors as the whole-volume map has them, the
    air around it never run through the network, and a cache entry holding exactly the body."""
    from samembed.tiles import ENTRY_SUFFIX, read_entry

    _, _, tgt, _, whole = pair
    emb = Matcher("default", device="cpu", cache_dir=tmp_path).embedder_for(3)
    maps = emb.embed_body(tgt)
    body = maps.body
    assert not maps.complete and bool(maps.ready[body].all())
    assert float(maps.ready.float().mean()) < 0.5, "most of a head-and-neck grid is air"
    assert maps.tiles.input_voxels < maps.tiles.input().numel(), "no more network input than one whole volume"
    ref = whole.embed(tgt)
    diff = (maps.vectors[body] - ref.vectors[body]).abs().max()
    assert float(diff) <= 1e-5, f"body vectors differ from the whole-volume map by {float(diff):.2g}"
    (entry,) = tmp_path.glob(f"*{ENTRY_SUFFIX}")
    _, (_, body_bits, stored_bits, _) = read_entry(entry)
    assert np.array_equal(stored_bits, body_bits)


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)  # one pair is enough for the disk format
def test_disk_entries_are_small_reused_and_recomputed_when_damaged(pair, whole_cache, tmp_path, caplog):
    from samembed.tiles import cache_info

    name, src, tgt, pts, _ = pair
    # a whole 128^3 CT (the reference embedded both images whole): body voxels only, packed local directions
    sizes = [p.stat().st_size for p in (whole_cache / name).glob(f"*{ENTRY_SUFFIX}")]
    assert len(sizes) == 2 and max(sizes) <= 40e6, sizes
    # on-demand tiles are written too
    first_dir = tmp_path / "first"
    fresh = Matcher("default", device="cpu", cache_dir=first_dir).match(src, pts, [tgt], options=PURE)
    entries = sorted(first_dir.glob(f"*{ENTRY_SUFFIX}"))
    assert len(entries) == 2
    for damage in ("corrupt", "truncated", "header"):
        folder = tmp_path / damage
        folder.mkdir()
        for path in entries:
            data = path.read_bytes()
            if damage == "header":  # one digit of the local grid's spacing: every vector would sit elsewhere
                at = data.index(b'"spacing_mm": [') + len(b'"spacing_mm": [')
                data = data[:at] + str((int(chr(data[at])) + 1) % 10).encode() + data[at + 1:]
            elif damage == "truncated":
                data = data[: len(data) // 2]
            else:
                data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
            (folder / path.name).write_bytes(data)
        # `samembed cache info` reads the headers only: a truncated entry is named damaged there; a corrupt payload
        # of the right size, or a header that still reads, shows when the entry is used (below). Before, a damaged
        # header was trusted (from an audit): a spacing of 5 mm for 4 moved matches by up to 66 mm
        assert all(("damaged" in e) == (damage == "truncated") for e in cache_info(folder)["details"]), damage
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
            again = Matcher("default", device="cpu", cache_dir=folder).match(src, pts, [tgt], options=PURE)
        assert sum("damaged cache entry" in r.getMessage() for r in caplog.records) == 2, damage
        _same(fresh, again, tol_score=0.0)  # recomputed in full precision: exactly the fresh result
    # `samembed cache info`: what each intact entry holds
    m = Matcher("default", device="cpu")
    held = {e["image"]: e for e in cache_info(first_dir)["details"]}
    assert set(held) == {src.name, tgt.name}, held
    for image in (src, tgt):
        e, maps = held[image.name], m.embedder.embed(image, on_demand=True)
        assert "damaged" not in e and e["model"] == maps.model_id
        assert e["grid_zyx"] == list(maps.local_grid.shape_zyx)
        assert e["spacing_zyx_mm"] == pytest.approx(list(maps.local_grid.spacing_mm[::-1]))
        assert 0 < e["stored_voxels"] < int(np.prod(maps.local_grid.shape_zyx))
    # an intact entry is used: the stored voxels need no preprocessing; the packed directions move little
    m2 = Matcher("default", device="cpu", cache_dir=first_dir)
    loaded_src = m2.embedder.embed(src, on_demand=True)
    assert not loaded_src.complete and int(loaded_src.ready.sum()) > 0
    assert loaded_src.tiles._x is None, "a disk hit needs no preprocessing until a search leaves the stored voxels"
    loaded = m2.match(src, pts, [tgt], options=PURE)
    pa = np.array([x.point_lps_mm for x in fresh.matches])
    pb = np.array([x.point_lps_mm for x in loaded.matches])
    # (measured: the 11 points at most 0.019 mm apart, scores 2e-4; the same check with 8 bits moved points of the
    # landmark benchmark by up to 14 mm)
    assert float(np.linalg.norm(pa - pb, axis=1).max()) < 0.1
    np.testing.assert_allclose([x.score for x in fresh.matches], [x.score for x in loaded.matches], atol=1e-3)


def test_cache_info_names_a_radiograph_grid_by_its_two_axes(tmp_path, capsys):
    """A 2D entry's local grid was labelled "(zyx)"."""
    from samembed.cli import main
    from samembed.tiles import ENTRY_SUFFIX, LOCAL_ENCODING, write_entry

    grid = {"shape_zyx": [20, 30], "spacing_mm": [3.0, 2.0], "origin_lps_mm": [0.0, 0.0], "direction": [1.0, 0, 0, 1.0]}
    header = {"local_grid": grid, "global_grid": grid, "model_id": "sam-lite-2d@0123", "key": "k", "image": "hand.png",
              "local_encoding": LOCAL_ENCODING}
    arrays = [np.zeros((64, 3, 5), np.float16), np.packbits(np.ones(600, bool)), np.packbits(np.ones(600, bool)),
              np.zeros((600, 80), np.uint8)]
    write_entry(tmp_path / f"{'9' * 32}{ENTRY_SUFFIX}", header, arrays)
    assert main(["cache", "info", str(tmp_path)]) == 0
    assert "hand.png  sam-lite-2d@0123  local grid 20x30 (yx) at 2x3 mm" in capsys.readouterr().out


def test_cache_info_names_what_each_entry_holds_and_the_damaged_ones(tmp_path, capsys):
    """``samembed cache info``: per entry its size, time, image, model, local grid and stored voxels, from the header
    alone; entries cut short, shorter than their header says, not entries at all or of the older format are named
    (they are recomputed when used); the count agrees in number. Files that are not entries (a checkpoint kept in
    the folder) are neither listed nor removed by ``samembed cache clear``."""
    from samembed.cli import main
    from samembed.tiles import ENTRY_SUFFIX, LOCAL_ENCODING, write_entry

    grid = {"shape_zyx": [10, 20, 30], "spacing_mm": [4.0, 3.0, 2.0], "origin_lps_mm": [0.0, 0.0, 0.0],
            "direction": np.eye(3).ravel().tolist()}
    header = {"local_grid": grid, "global_grid": grid, "model_id": "sam-lite-ct@0123", "key": "k", "image": "pt_1.nii.gz",
              "local_encoding": LOCAL_ENCODING}
    arrays = [np.zeros((64, 3, 5, 8), np.float16), np.packbits(np.ones(6000, bool)), np.packbits(np.ones(6000, bool)),
              np.zeros((1234, 80), np.uint8)]

    def entry(c: str):  # named by a key (32 hex digits), as the engine names them
        return tmp_path / f"{c * 32}{ENTRY_SUFFIX}"

    good = entry("a")
    write_entry(good, header, arrays)
    entry("b").write_bytes(good.read_bytes()[:-10])  # its payload cut short
    entry("c").write_bytes(good.read_bytes()[:20])  # its header cut short
    entry("d").write_bytes(b"not an entry")
    half = {k: v for k, v in header.items() if k != "local_encoding"}  # the local vectors in float16, as before
    write_entry(entry("e"), half, arrays[:3] + [np.zeros((64, 1234), np.float16)])
    write_entry(entry("f"), {**header, "local_encoding": "12-bit directions"}, arrays)  # another version's
    older = tmp_path / f"{'0' * 31}f.pt"  # an entry of the older, torch-saved format: named by its key
    meta = {"local_grid": grid, "global_grid": grid, "model_id": "sam-lite-ct@0123", "image": "pt_1.nii.gz"}
    torch.save({"local": torch.zeros(2, dtype=torch.float16), "global": torch.zeros(2, dtype=torch.float16),
                "body": torch.ones(2, dtype=torch.bool), "meta": json.dumps(meta)}, older)
    # not entries: never listed, never removed (a checkpoint kept beside the cache, a file of that suffix but not
    # named by a key, a text file named by 32 hex digits, a checkpoint named by its MD5 as content-addressed
    # stores name them: a review found `cache clear` removed it)
    foreign = [tmp_path / "model.pt", tmp_path / "notes.txt", tmp_path / f"{'0' * 31}g.pt",
               tmp_path / f"my{ENTRY_SUFFIX}", tmp_path / f"{'0' * 31}e.pt", tmp_path / f"{'0' * 31}d.pt"]
    for f in foreign[:-1]:
        f.write_bytes(b"someone's file")
    torch.save({"weights": torch.zeros(3), "meta": "a checkpoint"}, foreign[-1])
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and lines[-1].startswith("7 entries,"), lines
    assert lines[0].endswith(f"[{older.name}]") and "older format" in lines[0]
    assert "pt_1.nii.gz  sam-lite-ct@0123  local grid 10x20x30 (zyx) at 2x3x4 mm, 1,234 voxels stored" in lines[1]
    assert lines[1].endswith(f"[{good.name}]")
    assert "truncated" in lines[2] and all("damaged" in line for line in lines[2:5]), lines
    assert ("an entry of an older version (its local vectors in half precision), never read by this version "
            "(`samembed cache clear` empties the folder)") in lines[5], lines
    assert "an entry of another version (its local vectors as 12-bit directions), never read" in lines[6], lines
    for f in ("b", "c", "d", "e", "f"):
        entry(f).unlink()
    older.unlink()
    assert main(["cache", "info", str(tmp_path)]) == 0  # the folder as an argument, as --cache-dir
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 entry,")
    assert main(["cache", "info"]) == 2
    assert "which cache folder? samembed cache info FOLDER" in capsys.readouterr().err
    assert main(["cache", "info", str(tmp_path), "--cache-dir", str(tmp_path / "other")]) == 2
    assert "two cache folders given" in capsys.readouterr().err
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 1 entry from" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in foreign)


def _entries(folder, n: int) -> list:
    from samembed.tiles import ENTRY_SUFFIX

    made = [folder / f"{i:032x}{ENTRY_SUFFIX}" for i in range(n)]
    for f in made:
        f.write_bytes(b"x")
    return made


def test_cache_clear_removes_what_it_may_and_names_what_it_left(tmp_path, capsys, monkeypatch):
    """In a shared (sticky) folder another user's entry cannot be removed: `cache clear` stopped there, leaving
    this user's later entries and printing no count (a review). Now it removes the rest, says how many it left and
    why, and fails."""
    from pathlib import Path

    from samembed.cli import main

    theirs, *mine = _entries(tmp_path, 4)
    unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self == theirs:
            raise PermissionError(1, "Operation not permitted", str(self))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    assert main(["cache", "clear", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert f"removed 3 entries from {tmp_path}" in out
    assert (f"error: 1 file left, not removed (Operation not permitted), e.g. {theirs.name}: they belong to another "
            "user") in err
    assert [p.name for p in tmp_path.iterdir()] == [theirs.name]


def test_cache_clear_with_limits_removes_the_entries_unused_longest_and_keeps_the_rest(tmp_path, capsys):
    """The disk cache had no bound but `cache clear`, which empties it. `--unused-days` removes the entries not
    written or used for that long, `--max-gb` the least recently used until the rest fit; an entry of an older
    format, never read by this version, goes either way; the other files stay."""
    import os
    import time

    from samembed.cli import main
    from samembed.tiles import ENTRY_SUFFIX

    now = time.time()
    made = {}
    for name, days, size in (("a", 40, 1000), ("b", 1, 3000), ("c", 0, 2000), ("d", 5, 1000)):
        f = tmp_path / f"{name * 32}{ENTRY_SUFFIX}"
        f.write_bytes(b"x" * size)
        os.utime(f, (now - days * 86400, now - days * 86400))
        made[name] = f
    older = tmp_path / f"{'0' * 31}f.pt"  # an entry of the older, torch-saved format, used just now
    grid = {"shape_zyx": [2, 2, 2], "spacing_mm": [1.0, 1.0, 1.0]}
    torch.save({"local": torch.zeros(2), "global": torch.zeros(2), "body": torch.ones(2, dtype=torch.bool),
                "meta": json.dumps({"local_grid": grid, "global_grid": grid, "model_id": "m", "image": "i"})}, older)
    (tmp_path / "notes.txt").write_text("someone's file")

    def left() -> set[str]:
        return {p.name[0] for p in tmp_path.iterdir()}

    assert main(["cache", "clear", str(tmp_path), "--unused-days", "30"]) == 0
    assert left() == {"b", "c", "d", "n"}  # a (40 days) and the older format gone
    assert f"removed 2 entries (not used for 30 days) from {tmp_path}; 3 left, 0.0 MB" in capsys.readouterr().out
    # 4 kB: c (2 kB, used last) fits, b (3 kB) does not: b goes, and d, used before it, too (though it would fit)
    assert main(["cache", "clear", str(tmp_path), "--max-gb", "0.000004"]) == 0
    assert left() == {"c", "n"}
    assert "removed 2 entries (beyond the 4e-06 GB used most recently)" in capsys.readouterr().out
    for bad in (["clear", str(tmp_path), "--max-gb", "-1"], ["clear", str(tmp_path), "--unused-days", "nan"],
                ["info", str(tmp_path), "--unused-days", "3"]):
        assert main(["cache", *bad]) == 2
        assert ("give a number of" if "clear" in bad else "`cache info` lists them all") in capsys.readouterr().err
    assert left() == {"c", "n"}


@pytest.mark.needs_data
def test_an_entry_read_from_the_disk_cache_is_marked_as_used(tmp_path):
    """Reading an entry sets its time, so that `cache clear --unused-days/--max-gb` keeps the entries in use."""
    import os

    ct = read_image(data_file("ct", "openkbp", "ct", "pt_202_ct.nii.gz"))
    point = ct.grid.index_to_lps([[64, 64, 64]])
    Matcher("random:sam-lite", device="cpu", cache_dir=tmp_path).match(ct, point, [ct],
                                                                       options=MatchOptions(polish=False))
    (entry,) = tmp_path.glob(f"*{ENTRY_SUFFIX}")
    os.utime(entry, (1e9, 1e9))  # 2001
    Matcher("random:sam-lite", device="cpu", cache_dir=tmp_path).match(ct, point, [ct],
                                                                       options=MatchOptions(polish=False))
    assert entry.stat().st_mtime > 1.7e9


def test_cache_info_lists_the_entries_left_when_another_process_removes_one_meanwhile(tmp_path, capsys, monkeypatch):
    """Another process's `cache clear` removed an entry between the listing and its `stat`: `cache info` failed
    with "No such file or directory" (a review). The entry is now left out, and the count agrees."""
    from samembed import tiles
    from samembed.cli import main

    gone, *kept = _entries(tmp_path, 3)
    listed = tiles.entry_files(tmp_path)
    gone.unlink()
    monkeypatch.setattr(tiles, "entry_files", lambda folder: listed)
    assert main(["cache", "info", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("2 entries,") and not any(gone.name in line for line in lines), lines


def test_the_help_and_cache_info_do_not_import_torch(tmp_path):
    code = ("import sys\nfrom samembed.cli import main, build_parser\n"
            "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            f"main(['cache', 'info', '--cache-dir', {str(tmp_path)!r}])\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False" in out


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)  # a pair with a trustworthy prior; one is enough
def test_prepare_computes_global_maps_priors_and_the_source_only_and_the_match_after_it_is_unchanged(pair):
    name, src, tgt, pts, _ = pair
    prepared = Matcher("default", device="cpu")
    timings = prepared.prepare(src, [tgt])
    assert set(timings) == {"embed_s", "prior_s", "whole_s", "total_s", "targets_without_prior", "skipped"}
    assert timings["targets_without_prior"] == 0 and timings["skipped"] == []
    smaps, tmaps = cached(prepared, src), cached(prepared, tgt)
    assert smaps is not None and tmaps is not None, "prepare embedded neither image"
    body = smaps.search_mask(True)
    assert smaps.ready is None or bool(smaps.ready[body].all()), "the source's body (read by every click) is missing"
    assert tmaps.ready is not None and not bool(tmaps.ready.any()), \
        "prepare computed target tiles although the prior is trustworthy (a click computes its own window)"
    assert len(prepared._priors) == 1 and next(iter(prepared._priors.values())) is not None, \
        "the pair's affine prior was not fitted (this pair has a trustworthy one)"
    copies = list(smaps._compact.values())
    assert copies, "the source's searched features were not copied for the searches"
    prepared.prepare(src, [tgt])  # again: everything is cached, nothing is computed or copied again
    assert cached(prepared, src) is smaps and cached(prepared, tgt) is tmaps and len(prepared._priors) == 1
    assert all(a[1] is b[1] for a, b in zip(copies, smaps._compact.values())), "the source was embedded again"
    assert not bool(tmaps.ready.any())
    _same(Matcher("default", device="cpu").match(src, pts, [tgt]), prepared.match(src, pts, [tgt]),  # scores <= 1e-5
          tol_mm=POLISHED_MM)  # the default polishes (see the on-demand test)


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)  # one pair is enough
def test_a_prepare_cancelled_while_embedding_the_source_whole_stops_and_leaves_correct_maps(pair):
    name, src, tgt, pts, _ = pair
    cancel, phases = threading.Event(), []

    def progress(done, total, phase):
        phases.append(phase)
        if "whole" in phase:
            cancel.set()  # as the GUI does when the user picks other volumes mid-way

    prepared = Matcher("default", device="cpu")  # a cancel point before each tile of the whole map
    with pytest.raises(Cancelled):
        prepared.prepare(src, [tgt], progress=progress, cancel=cancel)
    smaps = cached(prepared, src)
    assert any("whole (the source)" in p for p in phases)
    assert smaps.ready is not None and not bool(smaps.ready[smaps.search_mask(True)].all()), \
        "the cancel came too late to stop anything"
    _same(Matcher("default", device="cpu").match(src, pts, [tgt]), prepared.match(src, pts, [tgt]), tol_mm=POLISHED_MM)


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)
def test_a_cancel_set_while_matching_stops_the_match_at_its_next_tile(pair):
    """A match's cancel reaches every local tile (``tiles_cancelled_by``): set while the target's windows are about to
    be embedded, it stops the match there with ``Cancelled`` (it was checked between targets only, so the target
    ran to its end); the tiles finished stay, and a match after it gives the uncancelled matches."""
    _, src, tgt, pts, _ = pair
    cancel = threading.Event()

    def progress(done, total, phase):
        if phase.startswith("matching"):
            cancel.set()  # after the target's global map and prior, before its windows' tiles

    matcher = Matcher("default", device="cpu")
    with pytest.raises(Cancelled) as stopped:
        matcher.match(src, pts, [tgt], progress=progress, cancel=cancel)
    assert stopped.value.partial is not None and stopped.value.partial.matches == []
    tmaps = cached(matcher, tgt)
    assert tmaps.ready is not None and not bool(tmaps.ready.any()), "no tile of the target's windows was embedded"
    _same(Matcher("default", device="cpu").match(src, pts, [tgt]), matcher.match(src, pts, [tgt]))


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)
def test_while_targets_are_matched_at_once_a_tile_never_writes_over_computed_voxels(pair, monkeypatch):
    """A whole volume's tile over maps with tiles already computed (a round trip without a prior fills the source
    whole) runs in place: it writes every voxel of the box, then puts the computed ones back. While targets are
    matched at once (``concurrent_matching``, the command's ``--jobs``) another thread may be reading those voxels,
    so the tile takes its own buffers and writes the new voxels only: the same values, bit for bit."""
    from samembed.embedding import TileComputer, concurrent_matching

    _, src, _, pts, _ = pair
    in_place = []
    tile_in_place = TileComputer._tile_in_place
    monkeypatch.setattr(TileComputer, "_tile_in_place",
                        lambda self, maps, *a: (in_place.append(maps.image_name), tile_in_place(self, maps, *a)))
    filled, reads, changed = {}, [0], [0]
    for concurrently in (False, True):
        emb = Matcher("default", device="cpu").embedder_for(3)
        maps = emb.embed(src, on_demand=True)
        lo, hi = boxes_around(maps, pts[:3], 30.0)
        maps.ensure(lo, hi)
        before = maps.ready.clone()
        flat = torch.nonzero(before).reshape(-1)
        rows = maps.rows_at(flat).clone()
        stop = threading.Event()

        def reader(maps=maps, flat=flat, rows=rows, stop=stop) -> None:  # another target's thread, reading them
            while not stop.is_set():
                changed[0] += not torch.equal(maps.rows_at(flat), rows)
                reads[0] += 1

        thread = threading.Thread(target=reader) if concurrently else None
        with concurrent_matching(1) if concurrently else contextlib.nullcontext():
            if thread:
                thread.start()
            try:
                maps.ensure_all()
            finally:
                stop.set()
                if thread:
                    thread.join()
        assert maps.complete and torch.equal(maps.rows_at(flat), rows)
        filled[concurrently] = maps.vectors.clone()
        assert len(in_place) == 1, in_place  # in place when alone; never while matching at once
    assert torch.equal(filled[True], filled[False])
    assert reads[0] >= 5 and changed[0] == 0, f"{changed[0]} of {reads[0]} reads saw computed voxels change"


@pytest.mark.needs_data
@pytest.mark.parametrize("pair", ["openkbp"], indirect=True)
def test_the_refinement_of_all_points_at_once_equals_point_by_point_and_embeds_in_few_passes(pair):
    from samembed.refine import refine_points

    _, src, tgt, pts, _ = pair
    clicks = pts[:4]
    plain = Matcher("default", device="cpu").match(src, clicks, [tgt], options=PURE)
    emb = Matcher("default", device="cpu").embedder_for(3)  # fresh maps: no local tile computed yet
    smaps, tmaps = emb.embed(src, on_demand=True), emb.embed(tgt, on_demand=True)
    found = np.array([m.point_lps_mm for m in plain.matches])
    scores = np.array([m.score for m in plain.matches])
    fills = {"n": 0}
    real_fill = tmaps.tiles.fill

    def counting_fill(*a, **k):
        fills["n"] += 1
        return real_fill(*a, **k)

    tmaps.tiles.fill = counting_fill
    together = refine_points(smaps, tmaps, clicks, found, scores, window_mm=20.0)
    assert fills["n"] <= 2, f"{fills['n']} target fills for 4 points' four passes (one per forward pass expected)"
    for n in range(len(clicks)):
        alone = refine_points(smaps, tmaps, clicks[n:n + 1], found[n:n + 1], scores[n:n + 1], window_mm=20.0)
        np.testing.assert_array_equal(alone.points_lps_mm[0], together.points_lps_mm[n])
        assert alone.pairs_used[0] == together.pairs_used[n] > 0


@pytest.mark.needs_data
def test_a_pairs_round_trip_finds_the_source_tiles_embedded_with_the_clicks(monkeypatch):
    """The source is embedded once around the clicks, with a margin for the round trip's windows (around each
    match's inverse-prior image): between two patients' organ centroids no second pass over the source is needed,
    whose boxes would each pay a full halo for a thin slab of voxels. The margin changes the cost only: the matches
    are those without it."""
    import samembed.api

    src = read_image(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz"))
    tgt = read_image(data_file("ct", "openkbp", "ct", "pt_232_ct.nii.gz"))
    m = Matcher("default", device="cpu")
    with_margin = m.match(src, centroids("pt_215"), [tgt])
    smaps = cached(m, src)
    assert not smaps.complete and smaps._fills == 1, f"the source was filled in {smaps._fills} passes"
    monkeypatch.setattr(samembed.api, "ROUND_TRIP_MARGIN_MM", 0.0)
    m = Matcher("default", device="cpu")
    without = m.match(src, centroids("pt_215"), [tgt])
    assert cached(m, src)._fills == 2  # the round trip's second pass, which the margin saves
    _same(without, with_margin, tol_mm=POLISHED_MM)


@pytest.mark.needs_data
def test_a_dropped_matchers_maps_are_freed_at_once_not_by_the_cyclic_collector(tmp_path):
    """A matcher's cache holds its maps, and on-demand maps hold what embeds their tiles: were that the embedder
    (which holds the cache), the maps would sit in a reference cycle, and a dropped matcher's maps (hundreds of MB per
    CT) would stay in memory until Python's cyclic collector happened to run. Checked with the collector off, for
    maps embedded here and for maps read back from a disk entry (whose tiles are made from the image later)."""
    import gc
    import weakref

    src, tgt = (read_image(data_file("ct", p)) for p in PAIRS["openkbp"])
    pts = centroids("pt_215")[:2]

    def run(cache_dir):
        m = Matcher(model="default", device="cpu", cache_dir=cache_dir)
        m.match(src, pts, [tgt], options=PURE)
        maps = list(m.cache._items.values())
        assert len(maps) == 2 and all(mp.tiles is not None for mp in maps), "on-demand maps with tiles left to make"
        return [weakref.ref(mp) for mp in maps]

    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for cache_dir in (None, tmp_path, tmp_path):  # embedded, embedded and stored, read back from the disk entry
            refs = run(cache_dir)
            alive = [r().image_name for r in refs if r() is not None]
            assert not alive, f"maps of {alive} outlived their matcher (a reference cycle), cache_dir={cache_dir}"
    finally:
        if was_enabled:
            gc.enable()
    assert any(tmp_path.glob(f"*{ENTRY_SUFFIX}"))


def test_writes_left_unfinished_by_killed_processes_are_listed_and_cleared_but_a_running_one_is_left(tmp_path, capsys):
    """A process killed while it wrote an entry (the OOM killer, a batch system's limit) left its temporary file,
    up to a whole entry's size, which `cache info` did not show and `cache clear` did not remove, so they piled up in
    a shared folder (from an audit). Those not changed for ABANDONED_AFTER_S are shown and removed; a fresh one may
    be a write in progress in another process, and stays."""
    import os
    import time

    from samembed.cli import main
    from samembed.tiles import ABANDONED_AFTER_S

    key = "0" * 32
    abandoned = tmp_path / f".{key}{ENTRY_SUFFIX}.a1b2c3d4.tmp.pt"
    running = tmp_path / f".{'1' * 32}{ENTRY_SUFFIX}.e5f6g7h8.tmp.pt"
    other = tmp_path / ".notes.txt.a1b2c3d4.tmp.pt"  # not an entry's write
    for f in (abandoned, running, other):
        f.write_bytes(b"x" * 2_000_000)
    old = time.time() - ABANDONED_AFTER_S - 60
    os.utime(abandoned, (old, old))
    os.utime(other, (old, old))
    assert main(["cache", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 unfinished write of stopped processes, 2.0 MB" in out, out
    assert main(["cache", "clear", str(tmp_path)]) == 0
    assert "removed 0 entries and 1 unfinished write of stopped processes" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name])


def test_an_entry_whose_checksum_did_not_cover_its_header_is_named_and_recomputed(tmp_path, capsys):
    """Entries written before the checksum covered the header could carry a damaged grid unseen: `cache info` names
    them an older version (whose keys this version never reads), and reading one raises, so that it is never
    trusted."""
    import hashlib
    import json
    import struct

    from samembed.cli import main
    from samembed.tiles import MAGIC, DamagedEntry, read_entry

    payload = np.zeros(16, np.float16).tobytes()
    grid = {"shape_zyx": [1, 2, 8], "spacing_mm": [4.0, 4.0, 4.0], "origin_lps_mm": [0.0, 0.0, 0.0],
            "direction": np.eye(3).ravel().tolist()}
    head = json.dumps({"local_grid": grid, "global_grid": grid, "model_id": "m", "key": "k", "image": "a.nii.gz",
                       "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                       "arrays": [["float16", [16]]]}).encode()
    old = tmp_path / f"{'a' * 32}{ENTRY_SUFFIX}"
    old.write_bytes(MAGIC + struct.pack("<Q", len(head)) + head + payload)
    with pytest.raises(DamagedEntry, match="older version"):
        read_entry(old)
    assert main(["cache", "info", str(tmp_path)]) == 0
    assert "an entry of an older version (its checksum did not cover its header), never read by this version" in \
        capsys.readouterr().out


def test_a_windowed_search_takes_its_queries_at_once_unless_every_window_is_the_whole_grid(pair, monkeypatch):
    """The windowed search takes all its queries in one pass (their groups bound the memory), and each gets what it
    gets searched alone; when every window holds no voxel to search (all off the grid), each searches the whole
    grid, and the (queries, voxels) products stay in chunks of 64, as without windows."""
    import samembed.matcher as matcher_module

    _, src, tgt, pts, _ = pair
    emb = Matcher("default", device="cpu").embedder_for(3)
    smaps, tmaps = emb.embed(src, on_demand=True), emb.embed(tgt, on_demand=True)
    seeds = np.concatenate([pts[:2] + off for off in np.stack(np.meshgrid(*[np.arange(-2, 3) * 4.0] * 3,
                                                                           indexing="ij"), -1).reshape(-1, 3)])
    queries = matcher_module.query_vectors(smaps, seeds)
    sizes = []
    search = matcher_module._sparse_search

    def recorded(q, *a, **k):
        sizes.append(len(q))
        return search(q, *a, **k)

    monkeypatch.setattr(matcher_module, "_sparse_search", recorded)
    together = matcher_module.match_queries(queries, tmaps, window_mm=20.0, window_centres_lps_mm=seeds)
    assert sizes == [len(seeds)] and len(seeds) == 250
    for n in (0, 77, 249):
        alone = matcher_module.match_queries(queries[n:n + 1], tmaps, window_mm=20.0,
                                             window_centres_lps_mm=seeds[n:n + 1])
        assert alone.flat_index[0] == together.flat_index[n]
        assert alone.scores[0] == pytest.approx(together.scores[n], abs=1e-6)
    sizes.clear()
    matcher_module.match_queries(queries[:100], tmaps, window_mm=20.0, window_centres_lps_mm=seeds[:100] + 1e5)
    assert sizes == [64, 36]


def test_cache_info_calls_another_user_s_unreadable_entry_so_not_damaged(tmp_path, capsys, monkeypatch):
    """An entry this user may not read was listed as "damaged, recomputed when next used", but a match leaves it as it
    is (it is not recomputed into the file) (a review). Root reads every file: the refusal is the system's, made
    here."""
    import errno

    from samembed import tiles
    from samembed.cli import main
    from samembed.tiles import ENTRY_SUFFIX, LOCAL_ENCODING, write_entry

    grid = {"shape_zyx": [4, 5, 6], "spacing_mm": [4.0, 4.0, 4.0], "origin_lps_mm": [0.0, 0.0, 0.0],
            "direction": np.eye(3).ravel().tolist()}
    header = {"local_grid": grid, "global_grid": grid, "model_id": "sam-lite-ct@0123", "key": "k", "image": "pt_1.nii.gz",
              "local_encoding": LOCAL_ENCODING}
    theirs = tmp_path / f"{'a' * 32}{ENTRY_SUFFIX}"
    write_entry(theirs, header, [np.zeros((64, 1, 2, 2), np.float16), np.packbits(np.ones(120, bool)),
                                 np.packbits(np.ones(120, bool)), np.zeros((120, 80), np.uint8)])
    real = tiles.read_entry_header

    def denied(path, *a, **k):
        if str(path) == str(theirs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(tiles, "read_entry_header", denied)
    assert main(["cache", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "this user may not read it; it is left as it is" in out and "recomputed when next used" not in out, out


def test_a_heatmap_made_in_slabs_is_the_whole_take_and_its_lookup_the_resampling(monkeypatch):
    """A heatmap on the target's voxels was one ``np.take`` over the whole grid: numpy made the int32 lookup an intp
    copy and buffered the output, 1.2 GB of temporaries for a 400 MB map, and the lookup was copied out of SimpleITK
    (a review: one heatmap of a 0.5 mm chest CT peaked at 7.3 GB). Made in slabs, from SimpleITK's own buffer: the
    same values, into a given buffer too."""
    import SimpleITK as sitk

    from samembed import heatmap
    from samembed.image import Grid
    from samembed.io import image_to_sitk

    model = Grid((6, 7, 8), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), np.eye(3))
    target = Grid((25, 30, 34), (1.1, 0.9, 1.3), (-2.0, -1.0, 0.5), np.eye(3))
    lookup = heatmap.voxel_lookup(model, target)
    flat = np.arange(6 * 7 * 8, dtype=np.int32).reshape(6, 7, 8)
    resampled = sitk.Resample(image_to_sitk(Image(flat, model, "i")), [34, 30, 25], sitk.Transform(),
                              sitk.sitkNearestNeighbor, (-2.0, -1.0, 0.5), (1.1, 0.9, 1.3), tuple(np.eye(3).ravel()),
                              float(flat.size), sitk.sitkInt32)
    np.testing.assert_array_equal(lookup, sitk.GetArrayFromImage(resampled))
    values = np.random.default_rng(0).uniform(-1, 1, flat.size).astype(np.float32)
    values[::7] = -np.inf  # outside the search mask
    table = np.append(heatmap.heatmap_values(values), np.float32(-1.0))
    monkeypatch.setattr(heatmap, "TAKE_SLAB", 1000)  # many slabs, the last one short
    made = heatmap.heatmap_from_lookup(values, lookup, target).array
    np.testing.assert_array_equal(made, np.take(table, lookup))
    buffer = np.full(lookup.shape, 7.0, dtype=np.float32)
    assert heatmap.heatmap_from_lookup(values, lookup, target, out=buffer).array is buffer
    np.testing.assert_array_equal(buffer, made)
