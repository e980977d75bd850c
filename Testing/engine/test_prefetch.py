"""``samembed match`` reads and preprocesses its first images in a second process while torch loads
(:mod:`samembed.prefetch`): the inputs it hands over are the engine's own, a mismatch or a failure falls back to the
engine, and the command's output is the same with or without it."""

from __future__ import annotations

import csv
import logging
import mmap
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from samembed import prefetch
from samembed.cli import main
from samembed.io import read_image
from samembed.preprocess import PreprocessConfig, body_mask_array, preprocess
from samembed.registry import registered_local_stride_zyx, registered_pad_multiple_zyx, registered_preprocess, registry

from ..conftest import data_file


def _start(paths, config: dict, pad_multiple_zyx=None, body_stride_zyx=None, share_work=False) -> prefetch.Prefetch:
    """A prefetch started here, where torch is already imported (the command starts it before); ``share_work`` as
    the command's (else the engine waits for every image the child may read, as these tests ask at once)."""
    return prefetch.Prefetch(prefetch.PrefetchRequest(tuple(str(x) for x in paths), config,
                                                      pad_multiple_zyx=pad_multiple_zyx, body_stride_zyx=body_stride_zyx),
                             share_work=share_work)


@pytest.mark.needs_data
def test_a_prefetched_input_is_the_engines_own_and_is_handed_out_once():
    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    config = registered_preprocess("default")
    pad = registered_pad_multiple_zyx("default")
    assert config is not None, "models.json must declare the default model's preprocessing"
    assert pad is not None, "models.json must declare the default model's padding multiple"
    stride = registered_local_stride_zyx("default")
    p = _start([path], config, pad, stride)
    try:
        image = p.image(str(path))
        assert image is not None and image.content_hash() == read_image(path).content_hash()
        cfg = PreprocessConfig.from_dict(config)
        assert p.take(image.content_hash(), PreprocessConfig(spacing_mm=3.0), "auto", pad) is None  # other settings
        assert p.take(image.content_hash(), cfg, "auto", (16, 16, 16)) is None  # another padding multiple
        got = p.take(image.content_hash(), cfg, "auto", pad)
        ref = preprocess(read_image(path), cfg, "auto", pad)
        assert all(n % m == 0 for n, m in zip(got.array.shape, pad)), "CT comes padded to the network's multiple"
        assert np.array_equal(got.array, ref.array) and got.grid.shape_zyx == ref.grid.shape_zyx
        # the voxels came through the shared region, not the pipe (see the module docstring)
        assert isinstance(got.array.base, mmap.mmap) and isinstance(image.array.base, mmap.mmap)
        # its body mask, made as the engine makes it on the local grid, with the input
        assert got.body_stride_zyx == stride
        assert np.array_equal(got.body, body_mask_array(ref.array[::stride[0], ::stride[1], ::stride[2]], ref.modality))
        assert got.modality == ref.modality and got.fill_value == ref.fill_value
        assert p.take(image.content_hash(), cfg, "auto", pad) is None, "handed out twice"
    finally:
        p.close()


@pytest.mark.needs_data
def test_arrays_too_large_for_the_shared_region_go_through_the_pipe(monkeypatch):
    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    monkeypatch.setattr(prefetch, "ARENA_BYTES", 1 << 20)  # 1 MiB: neither the image nor its input fits
    config, pad = registered_preprocess("default"), registered_pad_multiple_zyx("default")
    p = _start([path], config, pad, registered_local_stride_zyx("default"))
    try:
        image = p.image(str(path))
        got = p.take(image.content_hash(), PreprocessConfig.from_dict(config), "auto", pad)
    finally:
        p.close()
    assert not isinstance(image.array.base, mmap.mmap) and not isinstance(got.array.base, mmap.mmap)
    assert got.body is not None, "the body mask travels with its input through the pipe too"
    ref = read_image(path)
    assert np.array_equal(image.array, ref.array)
    assert np.array_equal(got.array, preprocess(ref, PreprocessConfig.from_dict(config), "auto", pad).array)


@pytest.mark.needs_data
@pytest.mark.parametrize("arena_bytes", [None, 1 << 20])  # the default region; 1 MiB, where nothing fits
@pytest.mark.parametrize("hash_known", [True, False], ids=["with its hash", "without"])
def test_a_volume_file_is_mapped_by_the_prefetch_and_by_the_engine(tmp_path, monkeypatch, arena_bytes, hash_known):
    """The prefetch maps a volume file instead of loading it. With its sender's hash (the Slicer module's engine
    process), the engine maps the file too: no copy in either process, whatever the region's size, and the mapping
    outlives the file's removal (the engine process removes it once read). Without it, the prefetch hashes the
    voxels and the engine gets the shared copy, or, where it does not fit, a plain array through the pipe, never a
    mapping. The input is the engine's own either way."""
    path = data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz")
    ref = read_image(path)
    npy = tmp_path / "pt_215.npy"
    np.save(npy, ref.array)
    mapped = prefetch.ArrayFile(str(npy), ref.grid, "pt_215", True).read(mapped=True)
    assert isinstance(mapped.array, np.memmap) and not mapped.array.flags.writeable
    if arena_bytes is not None:
        monkeypatch.setattr(prefetch, "ARENA_BYTES", arena_bytes)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = prefetch.Prefetch(prefetch.PrefetchRequest((), config, pad_multiple_zyx=pad, body_stride_zyx=stride),
                          waiting=True)
    try:
        p.give([prefetch.ArrayFile(str(npy), ref.grid, "pt_215", True, ref.content_hash() if hash_known else None)])
        image = p.image(str(npy))
        got = p.take(ref.content_hash(), PreprocessConfig.from_dict(config), "auto", pad)
    finally:
        p.close()
    assert np.array_equal(image.array, ref.array) and image.content_hash() == ref.content_hash()
    if hash_known:
        assert isinstance(image.array, np.memmap) and not image.array.flags.writeable
    else:
        assert not isinstance(image.array, np.memmap)
        assert isinstance(image.array.base, mmap.mmap) == (arena_bytes is None)  # the shared copy, where it fits
    assert np.array_equal(got.array, preprocess(ref, PreprocessConfig.from_dict(config), "auto", pad).array)
    npy.unlink()  # as the engine process removes it once read: a mapping made before still reads
    assert np.array_equal(mapped.array, ref.array) and np.array_equal(image.array, ref.array)


@pytest.mark.needs_data
def test_a_volume_file_gone_before_the_engine_maps_it_is_left_to_the_engine_and_the_rest_still_comes(tmp_path,
                                                                                                    monkeypatch):
    """A volume file that the prefetch read but the engine cannot map any more (removed meanwhile): that image is
    not handed out (the engine reads it itself and reports what is wrong), and the prefetch goes on with the
    others."""
    ref = read_image(data_file("ct", "openkbp", "ct", "pt_215_ct.nii.gz"))
    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    for f in files:
        np.save(f, ref.array)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = prefetch.Prefetch(prefetch.PrefetchRequest((), config, pad_multiple_zyx=pad, body_stride_zyx=stride),
                          waiting=True)
    read = prefetch.ArrayFile.read

    def gone_for_a(self, mapped=False):  # in this process only: the prefetch process was forked before
        if self.path == str(files[0]):
            raise FileNotFoundError(self.path)
        return read(self, mapped)

    monkeypatch.setattr(prefetch.ArrayFile, "read", gone_for_a)
    try:
        p.give([prefetch.ArrayFile(str(f), ref.grid, f.stem, True, ref.content_hash()) for f in files])
        assert p.image(str(files[0])) is None
        second = p.image(str(files[1]))
    finally:
        p.close()
    assert second is not None and np.array_equal(second.array, ref.array)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_a_waiting_prefetch_ends_with_the_process_that_started_it(tmp_path):
    """An engine process that dies (killed, or its parent gone) before its first request must not leave its waiting
    prefetch behind."""
    code = ("import os; from samembed import prefetch; from samembed.registry import registered_preprocess; "
            "p = prefetch.start_waiting(registered_preprocess('default')); "
            "print(p._proc.pid if p is not None else 'none', flush=True); os._exit(0)")
    with open(tmp_path / "out.txt", "w") as f:  # a file, not a pipe: a prefetch left behind would hold a pipe open
        subprocess.run([sys.executable, "-c", code], check=True, stdout=f, timeout=120)
    out = (tmp_path / "out.txt").read_text().split()[0]
    if out == "none":
        pytest.skip("no prefetch on this machine (one core, or no fork)")
    pid, end = int(out), time.monotonic() + 10.0
    while _running(pid):
        assert time.monotonic() < end, f"the prefetch process {pid} outlived the process that started it"
        time.sleep(0.05)


def test_a_task_is_claimed_once_by_whoever_asks_first():
    import multiprocessing

    claims = prefetch._Claims(multiprocessing.get_context("fork"))
    assert claims.claim(0, prefetch.READ, prefetch.CHILD) and claims.claim(0, prefetch.READ, prefetch.CHILD)
    assert not claims.claim(0, prefetch.READ, prefetch.ENGINE), "the child started it: the engine waits for it"
    assert claims.claim(0, prefetch.PREPROCESS, prefetch.ENGINE), "each task of an image is claimed on its own"
    assert not claims.claim(0, prefetch.PREPROCESS, prefetch.CHILD)
    assert claims.claim(1, prefetch.READ, prefetch.ENGINE) and not claims.claim(1, prefetch.READ, prefetch.CHILD)
    beyond = prefetch.CLAIMED_IMAGES
    assert claims.claim(beyond, prefetch.READ, prefetch.CHILD) and not claims.claim(beyond, prefetch.READ, prefetch.ENGINE)


@pytest.mark.needs_data
def test_an_image_the_child_has_not_started_is_read_by_the_engine_and_left_by_the_child(tmp_path, monkeypatch):
    """While the child reads the source (held here until the engine has asked), the engine asks for the target:
    nobody has started it, so the engine reads it itself (``image`` gives None at once) and the child skips it. The
    source still comes from the child, read and preprocessed as the engine would; the target's input is the
    engine's to make (``take`` gives None without waiting)."""
    import multiprocessing

    from samembed import io as samembed_io

    source, target = (data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (215, 232))
    asked = multiprocessing.get_context("fork").Event()
    read_log = tmp_path / "child_reads.txt"
    real_read = samembed_io.read_image

    def held_read(path, *a, **k):  # in the child (forked with this patch): note each read; hold the source's
        with read_log.open("a") as fh:
            fh.write(f"{path}\n")
        if str(path) == str(source):
            assert asked.wait(60), "the engine never asked for the target"
        return real_read(path, *a, **k)

    monkeypatch.setattr(samembed_io, "read_image", held_read)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = _start([source, target], config, pad, stride, share_work=True)
    try:
        for _ in range(600):  # the child has started on the source
            if read_log.exists():
                break
            time.sleep(0.05)
        assert p.image(str(target)) is None, "the engine must read an image nobody has started"
        asked.set()
        image = p.image(str(source))
        assert image is not None and np.array_equal(image.array, real_read(source).array)
        cfg = PreprocessConfig.from_dict(config)
        got = p.take(image.content_hash(), cfg, "auto", pad)
        assert got is not None and np.array_equal(got.array, preprocess(real_read(source), cfg, "auto", pad).array)
        assert p.take(real_read(target).content_hash(), cfg, "auto", pad) is None
    finally:
        p.close()
    assert read_log.read_text().split() == [str(source)], "the child read the target the engine took"


@pytest.mark.needs_data
def test_an_input_the_child_has_not_started_is_made_by_the_engine_while_the_child_still_reads(tmp_path, monkeypatch):
    """The child has read the source and holds on the target's reading; the engine asks for the source's input,
    which the child would make only after its reads: the engine makes it itself (``take`` gives None at once), and
    the child, which then makes the target's input, leaves the source's."""
    import multiprocessing

    from samembed import io as samembed_io
    from samembed import preprocess as samembed_preprocess

    source, target = (data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (215, 232))
    asked = multiprocessing.get_context("fork").Event()
    made_log = tmp_path / "child_inputs.txt"
    real_read, real_preprocess = samembed_io.read_image, samembed_preprocess.preprocess

    reading_target = tmp_path / "child_reads_the_target"

    def held_read(path, *a, **k):
        if str(path) == str(target):
            reading_target.touch()
            assert asked.wait(60), "the engine never asked for the source's input"
        return real_read(path, *a, **k)

    def noted_preprocess(image, *a, **k):
        with made_log.open("a") as fh:
            fh.write(f"{image.name}\n")
        return real_preprocess(image, *a, **k)

    monkeypatch.setattr(samembed_io, "read_image", held_read)
    monkeypatch.setattr(samembed_preprocess, "preprocess", noted_preprocess)
    config, pad, stride = (registered_preprocess("default"), registered_pad_multiple_zyx("default"),
                           registered_local_stride_zyx("default"))
    p = _start([source, target], config, pad, stride, share_work=True)
    cfg = PreprocessConfig.from_dict(config)
    try:
        for _ in range(600):  # the child has read the source and started on the target
            if reading_target.exists():
                break
            time.sleep(0.05)
        image = p.image(str(source))
        assert p.take(image.content_hash(), cfg, "auto", pad) is None, "the engine must make an input nobody started"
        asked.set()
        other = p.image(str(target))
        assert other is not None
        got = p.take(other.content_hash(), cfg, "auto", pad)
        assert got is not None and np.array_equal(got.array, preprocess(real_read(target), cfg, "auto", pad).array)
    finally:
        p.close()
    assert made_log.read_text().split() == [str(target)], "the child made the input the engine took"
