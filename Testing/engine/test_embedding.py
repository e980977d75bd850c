"""Embedding engine: tiled equals untiled, caches (memory LRU with a cap, disk), device handling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from samembed.embedding import GLOBAL_MARGIN_MM, Embedder, EmbeddingCache, global_box, resolve_device
from samembed.errors import DeviceUnavailableError
from samembed.image import Grid, Image
from samembed.io import read_image
from samembed.models import load_model, random_model
from samembed.tiles import ENTRY_SUFFIX

from ..conftest import data_file


def a_ct_like_image(shape=(40, 56, 48), seed=0) -> Image:
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000, np.int16)
    z, y, x = np.indices(shape)
    body = ((y - shape[1] / 2) ** 2 / (0.4 * shape[1]) ** 2 + (x - shape[2] / 2) ** 2 / (0.4 * shape[2]) ** 2) < 1
    arr[body] = rng.normal(40, 30, body.sum()).astype(np.int16)
    arr[(np.abs(x - shape[2] / 2) < 3) & (np.abs(y - shape[1] * 0.6) < 3)] = 700  # a "spine"
    return Image.from_array(arr, spacing_mm=(2.0, 2.0, 2.0), origin_lps_mm=(-40.0, -50.0, 10.0), name="ct-like")


@pytest.fixture(scope="module")
def a_model():
    return random_model("sam-lite", seed=3)


def test_tiled_and_untiled_embeddings_agree(a_model):
    img = a_ct_like_image((72, 48, 40))
    whole = Embedder(a_model, "cpu", EmbeddingCache(), max_tile_voxels=10**9).embed(img)
    tiled = Embedder(a_model, "cpu", EmbeddingCache(), max_tile_voxels=48 * 40 * 8).embed(img)  # many slabs
    assert whole.local.shape == tiled.local.shape
    torch.testing.assert_close(tiled.local, whole.local, atol=2e-5, rtol=0)
    torch.testing.assert_close(tiled.features, whole.features, atol=2e-5, rtol=0)


def test_the_memory_cache_evicts_least_recently_used_beyond_its_cap(a_model):
    imgs = [a_ct_like_image(seed=s) for s in range(3)]
    first = Embedder(a_model, "cpu", EmbeddingCache()).embed(imgs[0])
    cache = EmbeddingCache(max_bytes=int(first.nbytes * 2.5))
    emb = Embedder(a_model, "cpu", cache)
    keys = [emb.embed(im).key for im in imgs]
    assert len(cache) == 2 and cache.get(keys[0]) is None and cache.get(keys[2]) is not None
    assert cache.nbytes <= cache.max_bytes
    # a cap below two images still keeps the last two (a source and its target), and only those
    small = EmbeddingCache(max_bytes=int(first.nbytes * 0.5))
    emb = Embedder(a_model, "cpu", small)
    keys = [emb.embed(im).key for im in imgs]
    assert len(small) == 2 and small.get(keys[0]) is None and small.get(keys[1]) is not None


def test_the_disk_cache_returns_the_same_embeddings(a_model, tmp_path):
    img = a_ct_like_image()
    e1 = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    m1 = e1.embed(img)
    assert len(list(tmp_path.glob("*.samemb.pt"))) == 1
    e2 = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    e2._compute = None  # the second embedder must read the entry: it cannot compute
    m2 = e2.embed(img)
    torch.testing.assert_close(m2.local, m1.local, atol=2e-3, rtol=0)  # stored as fp16
    assert m2.local_grid.same_as(m1.local_grid) and torch.equal(m2.body, m1.body)


def test_an_entry_this_process_cannot_read_is_said_so_and_left_as_it_is(a_model, tmp_path, monkeypatch, caplog):
    """In a folder shared by several users, an entry another user wrote 0600 was called damaged, recomputed and
    replaced (now owned by this user, so that the other could not read it either: every run of both was cold; from
    an audit). Now it is named unreadable, the maps are computed, and the entry stays."""
    import logging

    import samembed.tiles as tiles

    img = a_ct_like_image()
    Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(img)
    (entry,) = tmp_path.glob("*.samemb.pt")
    before = (entry.read_bytes(), entry.stat().st_mtime_ns)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tiles, "read_entry", denied)
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        maps = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(img)
    assert maps.complete
    assert any("cannot read the cache entry" in r.getMessage() and "Permission denied" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not any("damaged" in r.getMessage() for r in caplog.records)
    assert (entry.read_bytes(), entry.stat().st_mtime_ns) == before


def test_a_damaged_entry_is_replaced_also_by_a_network_embedded_whole(a_model, tmp_path, monkeypatch, caplog):
    """A network without separate branches (sam-official's) is embedded whole, with no tile to mark its maps as new:
    a damaged entry was recomputed on every run, warned of each time, and never replaced (a review). It is now
    written again."""
    import logging

    from samembed.tiles import read_entry

    img = a_ct_like_image()
    Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(img)
    (entry,) = tmp_path.glob("*" + ENTRY_SUFFIX)
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the payload: its checksum no longer holds
    entry.write_bytes(bytes(data))
    monkeypatch.setattr(Embedder, "on_demand_capable", property(lambda self: False))  # the path of a whole network
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        maps = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(img)
    assert maps.complete
    assert any("ignoring damaged cache entry" in r.getMessage() for r in caplog.records)
    meta, _ = read_entry(entry)  # raises if it is still the damaged one
    assert meta["key"] == maps.key
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        again = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
        again._compute = None  # read from the entry: it cannot compute
        again.embed(img)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_an_entry_is_written_again_only_when_it_would_hold_more(a_model, tmp_path):
    """Tiles outside the body make the maps new, but the body's voxels are all an entry stores: the entry was rewritten
    unchanged after every match, and a read-only shared cache warned that it could not be written (a review). Now
    it is rewritten only when a body voxel was computed that it does not hold."""
    from samembed.tiles import read_entry

    img = a_ct_like_image()
    first = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    m = first.embed(img, on_demand=True)
    shape = np.asarray(m.local_grid.shape_zyx)
    m.ensure(shape // 2 - 1, shape // 2 + 1)  # a small box in the middle: body voxels
    first.settle(m)
    (entry,) = tmp_path.glob("*" + ENTRY_SUFFIX)

    def state():  # (not its time: reading an entry marks it used, tiles.mark_used)
        return entry.read_bytes(), entry.stat().st_ino

    stored = int(np.unpackbits(read_entry(entry)[1][2]).sum())
    assert 0 < stored < int(m.body.sum())
    before = state()
    second = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    m2 = second.embed(img, on_demand=True)  # read from the entry
    assert int(m2.ready.sum()) == stored
    outside = torch.nonzero(~m2.body & ~m2.ready)[:, 0]
    m2.ensure_flat(outside[:1])  # a voxel outside the body: computed, not stored
    assert m2.dirty and bool(m2.ready[outside[0]])
    second.settle(m2)
    assert state() == before and not m2.dirty
    inside = torch.nonzero(m2.body & ~m2.ready)[:, 0]
    m2.ensure_flat(inside[:1])  # a body voxel the entry does not hold: written
    second.settle(m2)
    assert state() != before
    assert int(np.unpackbits(read_entry(entry)[1][2]).sum()) > stored


def test_a_cache_folder_that_cannot_be_searched_is_left_alone(a_model, tmp_path, monkeypatch, caplog):
    """Another user's cache folder (mode 0700) made ``Path.is_file`` raise, and the match failed with "Permission
    denied" instead of computing its maps without the cache (a review). Now the folder is named, the maps computed,
    and nothing is written there."""
    import logging
    import pathlib

    img = a_ct_like_image()
    folder = tmp_path / "theirs"
    folder.mkdir()
    is_file = pathlib.Path.is_file

    def denied(self):
        if self.parent == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return is_file(self)

    monkeypatch.setattr(pathlib.Path, "is_file", denied)
    emb = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=folder)
    assert not emb.holds(img)
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        maps = emb.embed(img)
    assert maps.complete
    assert any("cannot look into the cache folder" in r.getMessage() and str(folder) in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not list(folder.iterdir())


def test_a_box_wholly_outside_the_grid_computes_nothing(a_model):
    """A box below the grid's start was clipped at its start only: its end, negative, then wrapped around and most of
    the grid was embedded (a review; the engine's own callers clip their boxes first)."""
    m = Embedder(a_model, "cpu", EmbeddingCache()).embed(a_ct_like_image(), on_demand=True)
    shape = np.asarray(m.local_grid.shape_zyx)
    m.ensure(np.array([-10, 0, 0]), np.array([-5, 2, 2]))
    m.ensure(shape + 3, shape + 8)
    assert not bool(m.ready.any())
    m.ensure(np.array([-10, 0, 0]), np.array([0, 1, 1]))  # partly inside: that part (with its tile's rounding)
    assert bool(m.ready.reshape(tuple(shape))[0, :2, :2].all())
    assert int(m.ready.sum()) < m.ready.numel() // 8


def test_an_embedder_storing_in_a_folder_shares_its_network_and_stores_there_only(a_model, tmp_path):
    """``storing_in`` (a propagate worker's embedder for the run's atlas folder) keeps one copy of the network and
    writes the folder's entries; the embedder it came from still writes nowhere, and both give the same maps."""
    img = a_ct_like_image()
    emb = Embedder(a_model, "cpu", EmbeddingCache())
    disk = emb.storing_in(tmp_path)
    assert disk.net is emb.net and disk.cache is emb.cache and emb.cache_dir is None
    stored = disk.embed(img)
    assert len(list(tmp_path.glob("*.samemb.pt"))) == 1
    emb.cache.clear()
    again = emb.embed(img)
    assert len(list(tmp_path.glob("*.samemb.pt"))) == 1
    torch.testing.assert_close(again.features, stored.features, atol=0, rtol=0)


def test_cache_keys_depend_on_content_and_model(a_model):
    img = a_ct_like_image()
    other = random_model("sam-lite", seed=4)
    k1 = Embedder(a_model).key(img)
    assert k1 == Embedder(a_model).key(a_ct_like_image())
    assert k1 != Embedder(other).key(img)
    assert k1 != Embedder(a_model).key(a_ct_like_image(seed=9))


def test_a_modality_asked_for_that_auto_finds_shares_the_entry_of_auto(a_model, tmp_path):
    """``--modality ct`` on a CT and ``auto`` made two disk entries for one scan, with the same maps (an audit)."""
    img = a_ct_like_image()
    auto = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    assert Embedder(a_model, modality="ct").key(img) == auto.key(img)
    assert Embedder(a_model, modality="mri").key(img) != auto.key(img)  # another preprocessing: its own entry
    fresh = auto.embed(img)
    ct = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path, modality="ct")
    ct._compute = None  # (read from the entry auto wrote: not computed again)
    stored = ct.embed(img)
    assert torch.equal(stored.valid, fresh.valid)
    assert [f.name for f in tmp_path.iterdir()] == [f"{auto.key(img)}{ENTRY_SUFFIX}"]


def test_cuda_requested_but_absent_errors_or_falls_back_with_a_warning():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.warns(UserWarning, match="falling back to the CPU"):
        assert resolve_device("cuda", fallback=True).type == "cpu"
    assert resolve_device("auto").type == "cpu"


def test_a_2d_image_needs_a_2d_model(a_model):
    from samembed.errors import InputError

    img2d = Image.from_array(np.random.default_rng(0).random((64, 64)).astype(np.float32), name="xray.png")
    with pytest.raises(InputError, match="xray.png: a 2D image cannot be embedded by the 3D model"):
        Embedder(a_model).embed(img2d)


def test_the_global_box_is_the_body_box_grown_by_the_margin_on_the_global_grid():
    body = np.zeros((20, 30, 30), dtype=bool)  # local grid, 2 input voxels per voxel: input 40 x 60 x 60
    body[5:9, 10:14, 12:20] = True  # input voxels z 10..18, y 20..28, x 24..40
    box = global_box(body, (2, 2, 2), (8, 8, 8), 4, (40, 60, 60))
    # grown by 4 input voxels, widened to multiples of 8, clipped to the input
    assert box == (slice(0, 24), slice(16, 32), slice(16, 48))
    assert global_box(np.zeros_like(body), (2, 2, 2), (8, 8, 8), 4, (40, 60, 60)) is None  # no body: whole input
    assert global_box(np.ones_like(body), (2, 2, 2), (8, 8, 8), 4, (40, 60, 60)) is None  # the box is the input


def test_a_head_and_neck_cts_global_map_is_computed_over_the_body_box_and_covers_every_body_voxel():
    """A head-and-neck CT's wide field of view: the global map is the network's map of the body's box (the same
    values), zero vectors beyond it, and every body voxel's global vector, which interpolates its neighbours, is a
    unit vector read inside the box."""
    image = read_image(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz"))
    embedder = Embedder(load_model("default"), "cpu", EmbeddingCache())
    maps = embedder.embed(image, on_demand=True)
    arr = embedder._prepare(image)[0]
    spec = embedder.model.spec
    margin = int(np.ceil(GLOBAL_MARGIN_MM / embedder.model.preprocess.spacing_mm))
    box = global_box(maps.body.reshape(maps.local_grid.shape_zyx).numpy(), embedder.local_stride_zyx,
                     tuple(reversed(spec.global_stride)), margin, arr.shape)
    assert box is not None
    share = np.prod([b.stop - b.start for b in box]) / arr.size
    assert share < 0.9, f"the body's box is {share:.0%} of the input"
    x = torch.from_numpy(np.ascontiguousarray(arr[box]))[None, None]
    with torch.inference_mode():
        part = torch.nn.functional.normalize(embedder.net.forward_global(x), dim=1)[0]
    g = tuple(slice(b.start // s, b.stop // s) for b, s in zip(box, reversed(spec.global_stride)))
    torch.testing.assert_close(maps.global_[(slice(None), *g)], part, atol=0, rtol=0)
    inside = torch.zeros(maps.global_.shape[1:], dtype=torch.bool)
    inside[g] = True
    assert float(maps.global_[:, ~inside].abs().max()) == 0.0
    body = torch.nonzero(maps.body).reshape(-1)
    norms = maps.global_at(body).norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_an_entry_of_another_layout_is_recomputed_not_raised(a_model, tmp_path, caplog):
    """An entry that reads cleanly (its checksum holds) but holds other arrays than this version writes, e.g. from
    another samembed version sharing the folder, is damaged for this one: recomputed with a warning (a review found
    it raised ValueError out of the match)."""
    import logging

    from samembed.tiles import LOCAL_ENCODING, write_entry

    img = a_ct_like_image()
    emb = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    path = emb._disk_path(emb.key(img))
    write_entry(path, {"key": emb.key(img), "model_id": a_model.model_id, "local_encoding": LOCAL_ENCODING},
                [np.zeros(4, np.float16)] * 3)
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        maps = emb.embed(img)
    assert maps.complete
    assert any("ignoring damaged cache entry" in r.getMessage() for r in caplog.records)


def test_entries_of_another_encoding_are_never_trusted_and_two_versions_keep_their_own(a_model, tmp_path, caplog,
                                                                                         monkeypatch):
    """Entries written before the local vectors were stored as packed directions hold them in float16. The key names
    the encoding, so a version of each sharing a folder keeps its own entry (a review: each replaced the other's on
    every run); an entry of another encoding found under this version's key is recomputed, never trusted. The next
    run reads this version's entry: its stored voxels need no network."""
    import logging

    from samembed import embedding, tiles
    from samembed.tiles import LOCAL_ENCODING, read_entry, write_entry

    img = a_ct_like_image()
    emb = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    fresh = emb.embed(img)
    path = emb._disk_path(emb.key(img))
    header, arrays = read_entry(path)
    assert header["local_encoding"] == LOCAL_ENCODING and arrays[3].dtype == np.uint8
    stored = torch.from_numpy(np.flatnonzero(np.unpackbits(arrays[2], count=fresh.valid.numel())))
    assert len(stored) > 0
    # the half-precision version's entry: under its own key, left as it is
    monkeypatch.setattr(embedding, "LOCAL_ENCODING", "half precision")
    older_path = emb._disk_path(emb.key(img))
    monkeypatch.undo()
    assert older_path != path
    header.pop("local_encoding")
    for k in ("payload_bytes", "arrays", "checksum_covers", "sha256"):
        header.pop(k)
    half = fresh.vectors[stored].T.half().numpy()
    write_entry(older_path, header, arrays[:3] + [np.zeros_like(half)])  # (zeros: never to be used)
    older = older_path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        warm = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(img, on_demand=True)
    assert not caplog.records and older_path.read_bytes() == older
    assert warm.tiles.input_voxels == 0 and bool(warm.ready[stored].all()), "this version's entry was not read"
    assert float((warm.vectors[stored] * fresh.vectors[stored]).sum(1).min()) > 1 - 1e-3  # the directions read back
    info = {e["file"]: e for e in tiles.cache_info(tmp_path)["details"]}
    assert "older version (its local vectors in half precision)" in info[older_path.name]["damaged"]
    assert "damaged" not in info[path.name]
    # an entry of another encoding under this version's key (a copied file, another version's bug): recomputed
    write_entry(path, header, arrays[:3] + [np.zeros_like(half)])
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        maps = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(img)
    assert any("recomputing the cache entry" in r.getMessage() and str(path) in r.getMessage()
               and "its local vectors in half precision" in r.getMessage() for r in caplog.records), caplog.records
    assert maps.complete and torch.equal(maps.vectors, fresh.vectors), "the other encoding's vectors were used"
    assert read_entry(path)[0]["local_encoding"] == LOCAL_ENCODING, "it was not written again"


def test_vectors_holding_nan_are_not_stored_in_the_cache(a_model, tmp_path, caplog):
    """A NaN has no direction: packed, it came back as a zero vector, so a warm run differed from a cold one without
    a word (a review). Such maps are not written; the warning names the entry."""
    import logging

    img = a_ct_like_image()
    emb = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    maps = emb.embed(img)
    path = emb._disk_path(maps.key)
    path.unlink()
    maps.vectors[int(torch.nonzero(maps.body)[0])] = float("nan")  # a body voxel: one that is stored
    maps.dirty = True
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        emb.save(maps)
    assert not path.exists()
    assert any(str(path) in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records), caplog.records


@pytest.mark.parametrize(("direction", "reoriented"), [
    (np.eye(2), False), ([[np.cos(0.035), -np.sin(0.035)], [np.sin(0.035), np.cos(0.035)]], False),
    (np.eye(2) + 3e-8 * np.array([[0.0, 1.0], [-1.0, 0.0]]), False), (np.diag([-1.0, -1.0]), True),
    ([[0.0, 1.0], [1.0, 0.0]], True), (np.diag([1.0, -1.0, 1.0]), True), (np.eye(3), False)])
def test_only_a_permuted_or_flipped_grid_counts_as_reoriented(direction, reoriented):
    """The cache key marks 2D inputs that are now oriented onto x and y; a grid kept as it is (tilted by 2 degrees,
    or float noise in its direction) keeps its key (a review: such keys changed though the input did not)."""
    from samembed.image import Grid
    from samembed.preprocess import axes_reoriented

    d = len(direction)
    assert axes_reoriented(Grid((4,) * d, (1.0,) * d, (0.0,) * d, np.asarray(direction))) == reoriented


def test_an_entry_under_another_image_s_name_is_not_used_but_recomputed(a_model, tmp_path, caplog):
    """An entry names its image and model inside as well as in its file name: one found under another image's name
    (copied, renamed, a key collision) is not taken for that image's maps, and they are computed (no test broke when
    the check inside was dropped: a review)."""
    import logging
    import shutil

    one, other = a_ct_like_image(), a_ct_like_image()
    other.array[other.array > 0] += 200  # another image of the same shape: another key
    first = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(one)
    (entry,) = tmp_path.glob("*" + ENTRY_SUFFIX)
    fresh = Embedder(a_model, "cpu", EmbeddingCache()).embed(other)  # (no cache: what its maps are)
    assert first.key != fresh.key and first.key in entry.name
    shutil.copy(entry, tmp_path / entry.name.replace(first.key, fresh.key))
    assert len(list(tmp_path.glob("*" + ENTRY_SUFFIX))) == 2
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        maps = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path).embed(other)
    assert any("written for another image or model" in r.getMessage() for r in caplog.records), caplog.text
    np.testing.assert_array_equal(maps.global_.float().numpy(), fresh.global_.float().numpy())  # its own, computed


def test_an_entry_that_may_not_be_replaced_is_left_and_the_others_are_written(a_model, tmp_path, monkeypatch,
                                                                              caplog):
    """Another user's entry in a shared folder: its refusal stopped every later write of the run ("the cache folder
    is only read from now on"), though the folder was writable (a review). The refused entry is left as it is."""
    import errno
    import logging

    import samembed.tiles as tiles

    one, other = a_ct_like_image(), a_ct_like_image(seed=1)
    owner = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    first = owner.embed(one, on_demand=True)  # its global map only: no tile computed yet
    owner.save(first)
    (theirs,) = tmp_path.glob("*" + ENTRY_SUFFIX)
    before = theirs.read_bytes()
    real_write = tiles.write_entry

    def refused(path, *a, **k):  # the owner's entry: this user may not replace it (EPERM in a sticky folder)
        if str(path) == str(theirs):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real_write(path, *a, **k)

    monkeypatch.setattr(tiles, "write_entry", refused)
    embedder = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="samembed.embedding"):
        embedder.save(embedder.embed(one))  # the whole of it: more than the entry holds, written again: refused
        embedder.save(embedder.embed(other))
    said = [r.getMessage() for r in caplog.records]
    assert any(f"could not replace the cache entry {theirs}" in m and "the other entries are written" in m
               for m in said), said
    assert not embedder.disk_write_failed and not any("only read from now on" in m for m in said)
    assert theirs.read_bytes() == before and len(list(tmp_path.glob("*" + ENTRY_SUFFIX))) == 2  # the other's written
    assert first.key in theirs.name


def test_the_memory_cache_s_size_can_be_read_while_another_thread_stores_maps():
    """``EmbeddingCache.nbytes`` summed its dict without the lock: read while a worker stored maps, it raised
    "OrderedDict mutated during iteration" (338 times in 20,000 reads in a review; ``Matcher.cache_bytes``, the
    Slicer logic's ``cacheBytesInUse``)."""
    from types import SimpleNamespace

    cache = EmbeddingCache(max_bytes=1 << 40)
    stop, errors = threading.Event(), []

    def store():
        n = 0
        while not stop.is_set():
            cache.put(f"k{n % 500}", SimpleNamespace(nbytes=8, key=f"k{n % 500}"))
            if n % 7 == 0:
                cache.clear()
            n += 1

    worker = threading.Thread(target=store)
    worker.start()
    try:
        for _ in range(20000):
            try:
                assert cache.nbytes >= 0
            except RuntimeError as e:
                errors.append(e)
    finally:
        stop.set()
        worker.join()
    assert not errors, f"{len(errors)} reads failed: {errors[0]}"


def test_an_entry_another_process_wrote_with_more_voxels_is_not_replaced_by_fewer(a_model, tmp_path):
    """``samembed embed`` stored a whole body, and a match running beside it then replaced the entry with its own few
    tiles (it writes what it holds, never looking at the file): embed had said it stored the whole body (a review).
    An entry written meanwhile with as many voxels or more is kept; a damaged one is still replaced."""
    from samembed.tiles import read_entry, stored_voxels

    image = a_ct_like_image()
    match = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    few = match.embed(image, on_demand=True)  # the match's: a few tiles, from no entry
    few.ensure(np.array([10, 20, 20]), np.array([14, 26, 26]))
    embed = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    whole = embed.embed(image)  # meanwhile, `samembed embed`: every body voxel
    embed.save(whole)
    (entry,) = tmp_path.glob("*" + ENTRY_SUFFIX)
    held = stored_voxels(entry, whole.key)
    assert held == int(whole.body.sum())
    match.save(few)  # the match ends
    assert stored_voxels(entry, whole.key) == held
    read_entry(entry)  # (intact)
    # a damaged entry, found so by a later load, is replaced whatever its header says
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF
    entry.write_bytes(bytes(data))
    again = Embedder(a_model, "cpu", EmbeddingCache(), cache_dir=tmp_path)
    small = again.embed(image, on_demand=True)
    small.ensure(np.array([10, 20, 20]), np.array([14, 26, 26]))
    again.save(small)
    meta, _ = read_entry(entry)  # intact again: replaced
    assert 0 < stored_voxels(entry, whole.key) < held


def test_an_image_whose_spacing_makes_it_metres_across_is_refused_with_its_size(a_model):
    """A 128^3 CT read at 20 mm (2.56 m across) asked the network for 1280^3 input voxels and ended in "internal
    error: MemoryError" (a review); it is refused before anything is made, naming its extent."""
    from samembed.errors import InputError

    image = a_ct_like_image(shape=(128, 128, 128))
    huge = Image(image.array, Grid(image.grid.shape_zyx, (20.0, 20.0, 20.0), image.grid.origin_lps_mm,
                                   image.grid.direction), "wrong-spacing.nii.gz")
    with pytest.raises(InputError, match=r"wrong-spacing.nii.gz: spans 2560 x 2560 x 2560 mm \(20 x 20 x 20 mm "
                                         r"voxels\).*check its voxel size"):
        Embedder(a_model, "cpu", EmbeddingCache()).embed(huge, on_demand=True)
