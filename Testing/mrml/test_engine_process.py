"""The engine in a persistent child process, through the logic and the worker: warm cache, crash, cancel.

The child runs ``samembed.Matcher`` with seeded random weights (``random:sam-lite``) on small real CT blocks.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from samembed import InputError
from SAMEmbeddingLib import mrml_io
from SAMEmbeddingLib.engine_process import EngineProcess, EngineProcessError
from SAMEmbeddingLib.logic import MatchLogic
from SAMEmbeddingLib.worker import Worker

from .mrml_helpers import DATA, add_points, add_volume, control_points, ijk_to_ras, load_volume, require, voxels

pytestmark = pytest.mark.needs_data


def _ras(node, ijk) -> np.ndarray:
    return (ijk_to_ras(node) @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


def _shifted_copy(scene, node, shift_ras, name):
    matrix = ijk_to_ras(node)
    matrix[:3, 3] += shift_ras
    return add_volume(scene, voxels(node), matrix, name)


@pytest.fixture
def a_process_logic(a_scene):
    logic = MatchLogic(a_scene, model="random:sam-lite", device="cpu", cacheBytes=1 << 30, engine="process")
    yield logic
    logic.close()


@pytest.fixture
def a_worker():
    worker = Worker()
    yield worker
    worker.shutdown()


def _volume_files(engine: EngineProcess) -> set[Path]:
    """The volume files in the engine's folders (its temporary folder, and the one in shared memory)."""
    return {*engine._tmp.glob("*.npy"), *engine._volumes.glob("*.npy")}


def _wait_for(condition, worker, timeout=120.0):
    end = time.monotonic() + timeout
    while not condition():
        worker.poll()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_the_second_click_reuses_the_process_its_volumes_and_their_embeddings(a_scene, a_process_logic, a_small_ct):
    """The second click's speed comes from reuse, checked here without a clock (timing targets live in
    benchmarks/first_click.py): one process, each volume sent once, and a nearby correction computes at most a
    little more of the embeddings already in the process."""
    target = _shifted_copy(a_scene, a_small_ct, [30.0, 0.0, 0.0], "target")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])

    a_process_logic.matchPoints(a_small_ct, points, [target], [0])
    first_bytes = a_process_logic.cacheBytesInUse()
    engine = a_process_logic.getMatcher()
    first_voxels = engine.inputVoxels
    assert first_voxels > 0
    # the second click lands near the first, as a correction does: the volumes are in the process and the
    # embedding tiles around the click are cached there (a click far away computes its own tiles on demand)
    points.AddControlPoint(*_ras(a_small_ct, (61, 73, 10)), "L2")
    outputs = a_process_logic.matchPoints(a_small_ct, points, [target], [1])

    assert isinstance(engine, EngineProcess) and engine.starts == 1
    assert engine.imagesSent == 2, "each volume is sent once per node and modification time"
    grown = a_process_logic.cacheBytesInUse() - first_bytes
    assert 0 <= grown <= 0.25 * first_bytes, f"the nearby click computed {grown} new bytes over {first_bytes}"
    # what the network ran for the second click: a little more around it, not the first click's tiles again (a
    # test that counted memory only passed when the process dropped its embeddings before each click; an audit)
    more = engine.inputVoxels - first_voxels
    assert 0 <= more <= 0.5 * first_voxels, f"the nearby click ran {more} input voxels; the first ran {first_voxels}"
    _, matched = control_points(outputs.pointLists[0])
    assert matched.shape == (2, 3)


def test_a_second_node_with_the_same_voxels_is_not_sent_again_and_leaves_no_file(a_scene, a_process_logic, a_small_ct):
    """The logic copies each volume into the file the child reads (hashed meanwhile); when the hash says the child
    holds the content (another node with the same voxels and geometry), the file goes and nothing is sent."""
    twin = add_volume(a_scene, voxels(a_small_ct), ijk_to_ras(a_small_ct), "twin")
    target = _shifted_copy(a_scene, a_small_ct, [30.0, 0.0, 0.0], "target")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    outputs = a_process_logic.matchPoints(a_small_ct, points, [target, twin], [0])
    engine = a_process_logic.getMatcher()
    assert engine.imagesSent == 2, "the twin's content is the source's: sent once"
    assert a_process_logic.imageForVolume(twin).hashed
    assert not _volume_files(engine), "a volume file was left behind"
    assert len(outputs.rows) == 2
    twin_row = next(r for r in outputs.rows if r.target == "twin")
    assert np.linalg.norm(np.asarray(twin_row.pointRAS) - _ras(a_small_ct, (64, 70, 10))) < 1.0  # its own point (sub-voxel fit)


def test_a_volume_in_memory_is_written_while_it_is_hashed_and_a_twin_leaves_no_file(a_small_ct):
    """An image whose voxels are in memory (a script's, or the module's on Windows) is written to its file while it
    is hashed; the second of two images with the same content is not sent, and its file goes."""
    from samembed import Image

    image = mrml_io.image_from_volume_node(a_small_ct)
    twin = Image(image.array.copy(), image.grid, "twin")
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    try:
        with engine._lock:
            engine._ensureStarted()
            assert engine._ensureImage(image) == engine._ensureImage(twin) == image.content_hash()
        assert engine.imagesSent == 1 and twin.hashed and len(engine._sentFiles) == 1
        assert _volume_files(engine) <= engine._sentFiles  # the first one's, until the child has read it
    finally:
        engine.close()


def _mapped_image(engine: EngineProcess, array: np.ndarray, grid, name: str):
    """An image mapped from a volume file of ``engine``'s, as the logic makes it (hashed ahead)."""
    from samembed import Image

    path = engine.newVolumeFile()
    np.save(path, array)
    image = Image(np.load(path, mmap_mode="r"), grid, name)
    engine.hashAhead(image)
    return image, path


def test_the_engine_process_starts_while_the_first_volume_is_copied(a_scene, a_process_logic, a_small_ct):
    """A click that finds no engine process running starts it as the logic copies the click's first volume
    (``EngineProcess.startAhead``), so that its start and torch's import go beside the copies; the click's request
    then uses that process."""
    engine = a_process_logic.getMatcher()
    assert engine.pid is None
    a_process_logic.imageForVolume(a_small_ct)
    end = time.monotonic() + 60.0
    while engine.pid is None:  # no request sent
        assert time.monotonic() < end, "the engine process did not start ahead"
        time.sleep(0.01)
    pid = engine.pid
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    a_process_logic.matchPoints(a_small_ct, points, [a_small_ct], [0])
    assert engine.starts == 1 and engine.pid == pid


def test_a_volume_file_sent_then_forgotten_is_not_sent_again(a_small_ct):
    """The child removes the file of a volume it is told to forget; a volume sent again later, while that message
    may still be on its way, goes in a new file, and the request that uses it works."""
    source = mrml_io.image_from_volume_node(a_small_ct)
    engine = EngineProcess(model="random:sam-lite", device="cpu", maxImages=2)
    try:
        images = [_mapped_image(engine, source.array + k, source.grid, f"v{k}")[0] for k in range(3)]
        with engine._lock:
            engine._ensureStarted()
            for image in images:  # the third pushes the first out: the child removes its unread file
                engine._ensureImage(image)
            engine._ensureImage(images[0])  # sent again
        assert engine.imagesSent == 4
        centre = source.grid.index_to_lps([[(n - 1) / 2 for n in source.grid.size_ijk]])
        assert len(engine.match(images[0], centre, [images[2]]).matches) == 1
        # every file sent so far is read or forgotten, and removed by the child: the engine stops tracking them when
        # it sends the next (one path stayed per volume ever sent, over a session of clicks: a leak review)
        with engine._lock:
            engine._ensureImage(images[1])  # forgotten before: sent again
        assert engine.imagesSent == 5 and len(engine._sentFiles) == 1
    finally:
        engine.close()


def test_volume_files_not_sent_yet_outlive_a_restart_and_go_with_their_images(a_small_ct):
    """A volume file whose image was not sent yet stays when the child stops (the next child gets it as it is); the
    file of an image that goes without having been sent (the logic's cache dropped it) is removed."""
    import gc

    source = mrml_io.image_from_volume_node(a_small_ct)
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    try:
        with engine._lock:
            engine._ensureStarted()
        kept, kept_path = _mapped_image(engine, source.array, source.grid, "kept")
        dropped, dropped_path = _mapped_image(engine, source.array + 1, source.grid, "dropped")
        with engine._lock:
            engine._stop(5.0)
        assert kept_path.is_file() and dropped_path.is_file()
        del dropped
        gc.collect()
        assert not dropped_path.exists(), "the file of an image that went unsent was left behind"
        with engine._lock:
            engine._ensureStarted()
            engine._ensureImage(kept)
        assert engine._sentFiles == {kept_path}, "the file was not sent as it is"
    finally:
        engine.close()


def test_each_volume_is_copied_once_into_the_file_the_engine_process_reads(a_scene, a_process_logic, a_small_ct,
                                                                         monkeypatch):
    """With the engine process, the logic copies a volume out of VTK straight into the file the child reads, hashed
    in a thread meanwhile (before any request), and sends that file: no second write. The child removes it once read;
    the image, mapped from it, stays valid, and a restarted child gets the voxels written again."""
    from SAMEmbeddingLib import engine_process

    engine = a_process_logic.getMatcher()
    image = a_process_logic.imageForVolume(a_small_ct)
    assert isinstance(image.array, np.memmap) and Path(image.array.filename).parent == engine._volumes
    end = time.monotonic() + 30.0
    while not image.hashed:  # hashed ahead, in the engine's thread
        assert time.monotonic() < end, "the volume was not hashed ahead"
        time.sleep(0.01)
    assert engine.imagesSent == 0, "nothing is sent before a request"

    def no_second_write(*args, **kwargs):
        raise AssertionError("the volume was written a second time")

    monkeypatch.setattr(engine_process.np, "save", no_second_write)
    target = _shifted_copy(a_scene, a_small_ct, [30.0, 0.0, 0.0], "target")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    first = control_points(a_process_logic.matchPoints(a_small_ct, points, [target], [0]).pointLists[0])[1]
    assert engine.imagesSent == 2
    assert not _volume_files(engine), "a volume file was left behind"
    np.testing.assert_array_equal(image.array, voxels(a_small_ct))  # the mapping outlives the file

    monkeypatch.undo()
    os.kill(engine.pid, signal.SIGKILL)  # the next request starts another child, which needs every volume again
    end = time.monotonic() + 30.0
    while engine._proc.poll() is None:
        assert time.monotonic() < end
        time.sleep(0.01)
    again = control_points(a_process_logic.matchPoints(a_small_ct, points, [target], [0]).pointLists[0])[1]
    assert engine.starts == 2 and engine.imagesSent == 4
    np.testing.assert_allclose(again, first, atol=1e-6)
    assert not _volume_files(engine), "a volume file was left behind"


def test_the_engine_process_loads_torch_from_its_start_before_any_request(a_scene, a_process_logic, a_small_ct,
                                                                         monkeypatch):
    """torch's import runs from the child's start, beside the parent writing the first click's volumes; the first
    request then matches with it (one import in the child's life). The child runs numpy's BLAS on one thread
    (samembed.blas_threads)."""
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    engine = a_process_logic.getMatcher()
    engine.sendVolumes([a_process_logic.imageForVolume(a_small_ct)])  # starts the child; no request sent
    end = time.monotonic() + 120.0
    while "torch loaded in" not in engine._logPath.read_text():
        assert engine.pid is not None, engine._logPath.read_text()
        assert time.monotonic() < end, "torch was not loaded without a request:\n" + engine._logPath.read_text()
        time.sleep(0.05)
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    a_process_logic.matchPoints(a_small_ct, points, [a_small_ct], [0])
    assert engine.starts == 1 and engine._logPath.read_text().count("torch loaded in") == 1
    if sys.platform.startswith("linux"):
        assert engine.pid is not None, "the engine process is not running"
        assert b"\0OPENBLAS_NUM_THREADS=1\0" in b"\0" + Path(f"/proc/{engine.pid}/environ").read_bytes()


def test_a_torch_that_cannot_be_imported_is_reported_by_each_request(a_scene, a_small_ct, tmp_path, monkeypatch):
    """A broken torch in the engine process (here a stand-in package that raises on import, first on its path): the
    import thread's own error reaches the caller of every request that needs the engine, named as such, and the
    process keeps answering."""
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this torch is broken on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(broken.parent), os.environ.get("PYTHONPATH", "")]))
    logic = MatchLogic(a_scene, model="random:sam-lite", device="cpu", engine="process")
    try:
        points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
        for _ in range(2):
            with pytest.raises(RuntimeError, match="engine could not be imported: this torch is broken on purpose"):
                logic.matchPoints(a_small_ct, points, [a_small_ct], [0])
        engine = logic.getMatcher()
        assert engine.starts == 1 and engine.pid is not None
        assert engine._logPath.read_text().count("importing the engine failed") == 1
    finally:
        logic.close()


def test_the_engine_started_ahead_is_the_one_the_first_click_uses(a_scene, a_process_logic, a_worker, a_small_ct):
    """The module starts the engine when it is entered (``startEngineOn``): the child is running with its model
    before any volume is chosen, and the first click uses that child instead of starting another."""
    task = a_process_logic.startEngineOn(a_worker)
    _wait_for(task.finished.is_set, a_worker)
    assert task.state == "done", task.error
    engine = a_process_logic.getMatcher()
    assert isinstance(engine, EngineProcess) and engine.starts == 1 and engine.pid is not None
    assert engine.imagesSent == 0, "starting the engine sent no volume"
    pid = engine.pid
    # the engine process paused its garbage collector while torch loaded, and left the objects tracked until then
    # out of its later scans (samembed.collector), and it left torch's Python meta kernels out of the import
    # (samembed.torch_import), as the samembed command does
    loaded = [line for line in engine._logPath.read_text().splitlines() if "left out of the garbage" in line]
    assert len(loaded) == 1, engine._logPath.read_text()
    assert int(loaded[0].split("(about ")[-1].split()[0]) > 50_000, loaded[0]
    assert "without its Python meta kernels" in loaded[0], loaded[0]
    a_process_logic.startEngine()  # again (the module entered a second time): nothing new
    assert engine.starts == 1 and engine.pid == pid
    target = _shifted_copy(a_scene, a_small_ct, [30.0, 0.0, 0.0], "target")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    outputs = a_process_logic.matchPoints(a_small_ct, points, [target], [0])
    assert engine.starts == 1 and engine.pid == pid, "the first click started another engine"
    # the click needed none of torch's meta kernels (samembed.torch_import logs when something does)
    assert "meta kernels for" not in engine._logPath.read_text(), engine._logPath.read_text()
    _, matched = control_points(outputs.pointLists[0])
    assert matched.shape == (1, 3)


def test_volumes_are_sent_ahead_only_while_a_prefetch_can_take_them(a_scene, a_process_logic, a_small_ct):
    """The logic sends a click's volumes ahead for the engine process's prefetch, which exists only for a registered
    model (its preprocessing known before torch loads) and only until the first match: otherwise every request
    sends its own volumes, one at a time (none written to disk ahead of need)."""
    from samembed import Image

    engine = a_process_logic.getMatcher()
    image = a_process_logic.imageForVolume(a_small_ct)
    other = Image(image.array + 1, image.grid, "other")
    engine.sendVolumes([image, other])  # random:sam-lite: not registered, no prefetch in the child
    assert engine.starts == 1 and engine.imagesSent == 0
    ahead = EngineProcess(model="default", device="cpu")
    try:
        ahead.sendVolumes([image, other])  # a registered model, before the first match: sent
        assert ahead.imagesSent == 2
        centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
        ahead.match(image, centre, [image])
        third = Image(image.array + 2, image.grid, "third")
        ahead.sendVolumes([third])  # after it: the prefetch is gone, nothing sent ahead
        assert ahead.imagesSent == 2
    finally:
        ahead.close()


def test_the_same_match_in_the_process_and_here(a_scene, a_process_logic, a_matcher, a_small_ct):
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10)), _ras(a_small_ct, (40, 90, 6))], ["L1", "L2"])
    here = MatchLogic(a_scene, matcher=a_matcher)

    _, in_process = control_points(a_process_logic.matchPoints(a_small_ct, points, [a_small_ct]).pointLists[0])
    rows_process = [r.score for r in a_process_logic.resultRows(points)]
    _, in_here = control_points(here.matchPoints(a_small_ct, points, [a_small_ct]).pointLists[0])

    np.testing.assert_allclose(in_process, in_here, atol=1e-6)
    assert rows_process == pytest.approx([r.score for r in here.resultRows(points)])


@pytest.mark.parametrize("started", [False, True], ids=["cold", "started"])
def test_the_first_clicks_volumes_are_preprocessed_in_a_second_process_and_match_as_here(a_scene, started):
    """The engine process forks its prefetch before it imports torch. A click that starts the engine: that second
    process reads and preprocesses every volume of the click while torch loads. A click after the module started
    the engine (torch loaded): every volume but the source, which the engine preprocesses itself meanwhile. Its log
    says so (the time is measured by benchmarks/first_click.py); the matches are those of the engine in this
    process."""
    import csv

    ct = DATA / "ct" / "openkbp" / "ct"
    source = load_volume(a_scene, ct / "pt_239_ct.nii.gz", "pt_239")
    targets = [load_volume(a_scene, ct / f"{p}_ct.nii.gz", p) for p in ("pt_231", "pt_206")]
    rows = csv.DictReader(require(DATA / "ct" / "openkbp" / "oar_centroids.csv").open())
    cents = [r for r in rows if r["patient"] == "pt_239"][:2]
    points = add_points(a_scene, [[-float(r["x_mm"]), -float(r["y_mm"]), float(r["z_mm"])] for r in cents],
                        [r["structure"] for r in cents])
    logic = MatchLogic(a_scene, model="default", device="cpu", engine="process")
    try:
        if started:
            logic.startEngine()
        out_process = logic.matchPoints(source, points, targets)
        points_process = [control_points(n)[1] for n in out_process.pointLists]  # (the same nodes are written below)
        log = logic.getMatcher()._logTail(40)
        rows_process = logic.resultRows(points)
        assert not _volume_files(logic.getMatcher()), "a volume file was left behind"
    finally:
        logic.close()
    # the second target's volume too (sent ahead of the click's one request)
    ahead = 2 if started else 3
    assert f"{ahead} volumes read and {ahead} preprocessed ahead by the prefetch process" in log, log
    if started and os.name == "posix":  # the source, read by the engine itself: mapped, as the prefetch maps the rest
        assert "pt_239: mapped from its volume file" in log, log
    here = MatchLogic(a_scene, model="default", device="cpu")
    out_here = here.matchPoints(source, points, targets)
    for a, b in zip(points_process, out_here.pointLists, strict=True):
        np.testing.assert_allclose(a, control_points(b)[1], atol=1e-4)
    assert [r.score for r in rows_process] == pytest.approx([r.score for r in here.resultRows(points)], abs=1e-5)


def test_a_clicks_targets_after_the_first_are_matched_two_at_a_time_in_the_engine_process_as_here(a_scene,
                                                                                                   monkeypatch):
    """With two torch threads in the engine process (Slicer's default on a 2-core machine), a click into three targets
    matches the first alone, then the other two at once (samembed.jobs.match_each, its log says so). Each target's
    point list is written as it is matched; the matches, the rows' order and the progress are those of the engine in
    this process matching one target at a time."""
    import csv

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the child's threads (CI's test workers have one each; torch takes
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # MKL's count, which a Dask nanny may have left at 1 here)
    ct = DATA / "ct" / "openkbp" / "ct"
    source = load_volume(a_scene, ct / "pt_239_ct.nii.gz", "pt_239")
    targets = [load_volume(a_scene, ct / f"{p}_ct.nii.gz", p) for p in ("pt_231", "pt_206", "pt_215")]
    rows = csv.DictReader(require(DATA / "ct" / "openkbp" / "oar_centroids.csv").open())
    cents = [r for r in rows if r["patient"] == "pt_239"][:2]
    points = add_points(a_scene, [[-float(r["x_mm"]), -float(r["y_mm"]), float(r["z_mm"])] for r in cents],
                        [r["structure"] for r in cents])
    logic = MatchLogic(a_scene, model="default", device="cpu", engine="process")
    progress = []
    try:
        out_process = logic.matchPoints(source, points, targets, progress=lambda *a: progress.append(a))
        points_process = [control_points(n)[1] for n in out_process.pointLists]  # (the same nodes are written below)
        log = logic.getMatcher()._logTail(40)
        rows_process = logic.resultRows(points)
    finally:
        logic.close()
    assert "3 targets: the first alone, then 2 at a time" in log, log
    assert [p[0] for p in progress] == sorted(p[0] for p in progress) and progress[-1][0] == 3, progress
    here = MatchLogic(a_scene, model="default", device="cpu")
    out_here = here.matchPoints(source, points, targets)
    assert [n.GetName() for n in out_process.pointLists] == [n.GetName() for n in out_here.pointLists]
    for a, b in zip(points_process, out_here.pointLists, strict=True):
        np.testing.assert_allclose(a, control_points(b)[1], atol=1e-4)
    assert [(r.target, r.label) for r in rows_process] == [(r.target, r.label) for r in here.resultRows(points)]
    assert [r.score for r in rows_process] == pytest.approx([r.score for r in here.resultRows(points)], abs=1e-5)


def test_a_click_whose_every_target_the_engine_process_cannot_match_says_so_and_the_next_click_works(a_small_ct):
    """Every target of a click too small for the model: the job ends with an InputError naming them (the engine
    process is told to stop the request), and the same engine matches the next click."""
    from samembed import Image
    from SAMEmbeddingLib.logic import MatchJob, TargetSpec

    image = mrml_io.image_from_volume_node(a_small_ct)
    tiny = [Image.from_array(image.array[8 + k:10 + k, 60:63, 60:63].copy(), name=f"tiny{k}") for k in range(3)]
    centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    try:
        job = MatchJob("src", "pts", ["c"], ["c"], centre, image, [TargetSpec(f"n{k}", t.name, t) for k, t in
                                                                  enumerate(tiny)])
        with pytest.raises(InputError, match="none of the 3 targets could be matched") as caught:
            job.run(engine)
        assert [name for name, _ in caught.value.jobOutcome.skipped] == ["tiny0", "tiny1", "tiny2"]
        later = MatchJob("src", "pts", ["c"], ["c"], centre, image, [TargetSpec("n", "same", image)] * 2)
        assert [r.name for r in later.run(engine).results] == ["same", "same"]
    finally:
        engine.close()


def test_a_volume_whose_file_the_engine_process_cannot_read_is_named_and_sent_again(a_small_ct):
    """A volume file the child could not read (removed before it was read, e.g. a cleaned /dev/shm; or no memory to
    read it into) was dropped by the child while the parent still counted it as sent: the click failed with the
    reader's bare error, and every later click with that volume with a KeyError, until the engine restarted (a
    review). The error now names the volume, and the next click sends it again."""
    source = mrml_io.image_from_volume_node(a_small_ct)
    centre = source.grid.index_to_lps([[(n - 1) / 2 for n in source.grid.size_ijk]])
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    try:
        target, path = _mapped_image(engine, source.array + 1, source.grid, "the target")
        with engine._lock:
            engine._ensureStarted()
            engine._ensureImage(target)
        os.remove(path)  # before the child reads it: the voxels stay mapped here
        with pytest.raises(InputError, match="the target: the engine process could not read this volume's file"):
            engine.match(source, centre, [target])
        assert len(engine.match(source, centre, [target]).matches) == 1, "it was not sent again"
        assert engine.starts == 1
    finally:
        engine.close()


def test_a_volume_file_that_cannot_be_written_is_removed_and_the_error_names_the_volume(a_small_ct, monkeypatch):
    """A volume written for the child on a full disk left its partial file behind, with numpy's bare message (a
    review)."""
    import SAMEmbeddingLib.engine_process as engine_process
    from samembed import Image

    image = mrml_io.image_from_volume_node(a_small_ct)
    in_memory = Image(image.array.copy(), image.grid, "in memory")

    def full_disk(path, array):
        Path(path).write_bytes(b"\x93NUMPY" + bytes(1000))  # part of it written
        raise OSError(28, "No space left on device")

    engine = EngineProcess(model="random:sam-lite", device="cpu")
    try:
        monkeypatch.setattr(engine_process.np, "save", full_disk)
        with engine._lock, pytest.raises(InputError, match=r"in memory: cannot write its voxels for the engine "
                                                           r"process to .*No space left on device.*free space there"):
            engine._ensureImage(in_memory)
        assert not _volume_files(engine)
    finally:
        engine.close()


def test_an_engine_dropped_without_close_leaves_no_child_folder_or_lock(a_small_ct):
    """An engine (or the logic holding it) dropped by a script without close(), or left open at the interpreter's
    exit, killed its child but left its folders, their volume files (0.35 GB each for thin-slice CTs) and its lock
    descriptors, which kept other engines from sweeping them (a review). It now releases what close() does."""
    import gc

    source = mrml_io.image_from_volume_node(a_small_ct)
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    with engine._lock:
        engine._ensureStarted()
    image, path = _mapped_image(engine, source.array, source.grid, "kept by the script")
    pid, folders, locks = engine.pid, (engine._tmp, engine._volumes), (engine._tmpLock, engine._volumesLock)
    assert path.is_file() and all(f.is_dir() for f in folders)
    end = time.monotonic() + 30.0
    while engine._hashing:  # (a hash under way holds the engine until it ends)
        assert time.monotonic() < end, "the hash ahead did not end"
        time.sleep(0.01)
    del engine
    gc.collect()
    assert not any(f.exists() for f in folders), "the engine's folders were left"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    for fd in locks:
        if fd is not None:
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)
    assert image.array.shape == source.array.shape  # the script's image stays readable (its mapping)


def test_a_click_and_a_prepare_into_more_targets_than_the_engine_keeps_send_them_all(a_small_ct):
    """A click's targets go in one request: with more volumes than the engine process keeps (``maxImages``), none of
    that request's volumes is forgotten while it is sent (before, the child was told to forget the source and the first
    targets and failed with a KeyError); the next request's volumes push the extra ones out again."""
    from samembed import Image
    from SAMEmbeddingLib.logic import MatchJob, TargetSpec

    image = mrml_io.image_from_volume_node(a_small_ct)
    targets = [Image(image.array + k, image.grid, f"t{k}") for k in range(1, 5)]
    centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
    engine = EngineProcess(model="random:sam-lite", device="cpu", maxImages=3)
    try:
        job = MatchJob("src", "pts", ["c"], ["c"], centre, image,
                       [TargetSpec(f"n{k}", t.name, t) for k, t in enumerate(targets)])
        assert [r.name for r in job.run(engine).results] == ["t1", "t2", "t3", "t4"]
        assert len(engine._sent) == 5
        assert engine.prepare(image, targets)["total_s"] >= 0.0
        later = MatchJob("src", "pts", ["c"], ["c"], centre, targets[0], [TargetSpec("n", "t2", targets[1])])
        assert [r.name for r in later.run(engine).results] == ["t2"]
        assert len(engine._sent) == 3
    finally:
        engine.close()


def test_killing_the_process_mid_match_gives_a_clear_error_and_the_next_match_works(
        a_scene, a_process_logic, a_worker, a_small_ct):
    target = _shifted_copy(a_scene, a_small_ct, [0.0, 25.0, 0.0], "target")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    errors, finished = [], []

    a_process_logic.startMatch(a_worker, a_small_ct, points, [target], onError=errors.append,
                               onFinished=finished.append)
    engine = a_process_logic.getMatcher()
    _wait_for(lambda: engine.pid is not None, a_worker)  # started for this match: the request is on its way
    os.kill(engine.pid, signal.SIGKILL)
    assert a_worker.waitForIdle(timeout=60)

    assert len(errors) == 1 and isinstance(errors[0], EngineProcessError), errors
    assert "engine process stopped unexpectedly" in str(errors[0]) and "started again on the next match" in str(errors[0])
    a_process_logic.startMatch(a_worker, a_small_ct, points, [target], onError=errors.append,
                               onFinished=finished.append)
    assert a_worker.waitForIdle(timeout=120)
    assert len(errors) == 1 and len(finished) == 1 and not finished[0].cancelled
    assert control_points(finished[0].pointLists[0])[0] == ["L1"]
    assert a_process_logic.getMatcher().starts == 2


def test_a_cancel_stops_the_match_and_the_next_match_works(a_scene, a_process_logic, a_worker, a_small_ct):
    targets = [_shifted_copy(a_scene, a_small_ct, [10.0 * n, 0.0, 0.0], f"T{n}") for n in (1, 2, 3)]
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    progress, finished = [], []

    task = a_process_logic.startMatch(a_worker, a_small_ct, points, targets, onProgress=lambda *a: progress.append(a),
                                      onFinished=finished.append)
    _wait_for(lambda: progress, a_worker)  # the first target is being matched in the child
    task.cancel()
    assert a_worker.waitForIdle(timeout=30)  # a hang guard: how soon it stops is no unit test's to time

    assert finished[0].cancelled and len(finished[0].pointLists) < 3
    a_process_logic.startMatch(a_worker, a_small_ct, points, targets[:1], onFinished=finished.append)
    assert a_worker.waitForIdle(timeout=120)
    assert not finished[1].cancelled and len(finished[1].pointLists) == 1


def test_an_engine_error_in_the_process_arrives_as_the_same_error(a_scene, a_small_ct):
    logic = MatchLogic(a_scene, model="no-such-model", device="cpu", engine="process")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    try:
        with pytest.raises(InputError, match="unknown model 'no-such-model'"):
            logic.matchPoints(a_small_ct, points, [a_small_ct])
    finally:
        logic.close()


def test_volumes_mapped_for_the_engine_process_match_the_same_in_this_process_after_a_switch(
        a_scene, a_process_logic, a_small_ct):
    """The logic keeps the images it made for the engine process (mapped from files the process removed, in a folder
    removed when the process stops); switched to the engine in this process, it matches them as before."""
    target = _shifted_copy(a_scene, a_small_ct, [30.0, 0.0, 0.0], "target")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    image = a_process_logic.imageForVolume(a_small_ct)
    folders = (a_process_logic.getMatcher()._tmp, a_process_logic.getMatcher()._volumes)
    in_process = control_points(a_process_logic.matchPoints(a_small_ct, points, [target], [0]).pointLists[0])[1]
    a_process_logic.useEngineProcess(False)
    assert not any(folder.exists() for folder in folders)
    assert a_process_logic.imageForVolume(a_small_ct) is image and isinstance(image.array, np.memmap)
    here = control_points(a_process_logic.matchPoints(a_small_ct, points, [target], [0]).pointLists[0])[1]
    np.testing.assert_allclose(here, in_process, atol=1e-4)


def test_several_volumes_go_to_their_own_files_on_the_copy_threads_and_are_hashed_ahead(a_scene, a_process_logic,
                                                                                         a_small_ct):
    """The volumes of one click are copied on the logic's copy threads straight into volume files of the engine
    process's, each hashed ahead on the engine's hashing threads; the hashes are those of a plain conversion."""
    from SAMEmbeddingLib.engine_process import HASH_THREADS

    nodes = [a_small_ct, *(_shifted_copy(a_scene, a_small_ct, [10.0 * k, 0.0, 0.0], f"copy {k}") for k in (1, 2, 3))]
    engine = a_process_logic.getMatcher()
    images = a_process_logic.imagesForVolumes(nodes)
    files = {Path(image.array.filename) for image in images}
    assert all(isinstance(image.array, np.memmap) for image in images) and len(files) == 4
    assert files == _volume_files(engine)
    assert engine._hasher is not None and engine._hasher._max_workers == HASH_THREADS
    for node, image in zip(nodes, images):
        path = Path(image.array.filename)
        assert engine._contentHash(image, path) == mrml_io.image_from_volume_node(node).content_hash()


def test_volume_files_go_when_copying_several_volumes_fails(a_scene, a_process_logic, a_small_ct, monkeypatch):
    """When copying a click's volumes fails on the copy threads (here: out of memory as each is mapped), the error
    reaches the caller and no volume file is left in the engine's folders (in shared memory they hold memory); the
    next try copies them again."""
    import gc

    nodes = [a_small_ct, *(_shifted_copy(a_scene, a_small_ct, [10.0 * k, 0.0, 0.0], f"copy {k}") for k in (1, 2))]
    engine = a_process_logic.getMatcher()
    mapped = mrml_io._mapped

    def no_memory(*args, **kwargs):
        raise MemoryError("no memory left")

    monkeypatch.setattr(mrml_io, "_mapped", no_memory)
    with pytest.raises(MemoryError):
        a_process_logic.imagesForVolumes(nodes)
    gc.collect()
    assert not _volume_files(engine), "a volume file was left behind"
    monkeypatch.setattr(mrml_io, "_mapped", mapped)
    images = a_process_logic.imagesForVolumes(nodes)
    assert len({Path(image.array.filename) for image in images}) == 3


def test_a_volume_file_the_engine_reads_itself_is_mapped_and_outlives_its_file(a_small_ct, tmp_path):
    """A volume file that the engine process reads itself (not prefetched: a request's first volume when the engine
    was started ahead) is mapped, as the prefetch maps it, not read into fresh memory, when the parent maps it too;
    the image stays whole once the file is removed, with its sender's hash. A file the parent wrote when it sent
    the volume is read into memory (mapped, it would keep its disk space after its removal)."""
    from samembed.prefetch import ArrayFile
    from SAMEmbeddingLib.engine_process import MAP_VOLUME_FILES, readVolumeFile

    plain = mrml_io.image_from_volume_node(a_small_ct)
    path = tmp_path / "volume.npy"
    np.save(path, plain.array)
    written = readVolumeFile(ArrayFile(str(path), plain.grid, plain.name, content_hash=plain.content_hash()))
    assert not isinstance(written.array, np.memmap) and np.array_equal(written.array, plain.array)
    image = readVolumeFile(ArrayFile(str(path), plain.grid, plain.name, content_hash=plain.content_hash(), shared=True))
    assert MAP_VOLUME_FILES is (os.name == "posix")
    if MAP_VOLUME_FILES:
        assert isinstance(image.array, np.memmap) and not image.array.flags.writeable
    path.unlink()
    np.testing.assert_array_equal(image.array, plain.array)
    assert image.hashed and image.content_hash() == plain.content_hash()


def test_volume_files_go_to_shared_memory_where_it_has_room(monkeypatch):
    """Volume files go to a folder of their own in /dev/shm when it has room for a click's thin-slice CTs (no disk
    to write back to), held locked while the engine lives; else to the temporary folder. Both folders go with the
    engine."""
    from SAMEmbeddingLib import engine_process

    shm = Path("/dev/shm")
    stat = os.statvfs(shm) if shm.is_dir() else None
    if stat is None or min(stat.f_bavail * stat.f_frsize,
                           engine_process._availableMemory()) < engine_process.SHARED_MEMORY_MIN_FREE:
        pytest.skip("no /dev/shm with room for volume files on this machine")
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    assert engine._volumes.parent == shm and engine.newVolumeFile().parent == engine._volumes
    assert engine._volumes.name.startswith(f"{engine_process.VOLUMES_PREFIX}{os.getpid()}-")
    engine_process._removeStaleVolumeFolders(shm)  # another engine starting: this one's folder is in use
    assert engine._volumes.is_dir()
    folders = (engine._tmp, engine._volumes)
    engine.close()
    assert not any(folder.exists() for folder in folders)
    monkeypatch.setattr(engine_process, "SHARED_MEMORY_MIN_FREE", 1 << 60)
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    try:
        assert engine._volumes == engine._tmp
    finally:
        engine.close()


def test_the_volume_folders_of_ended_engines_are_removed_and_the_others_left(tmp_path):
    """Files in shared memory hold memory until removed: the folders of engines that ended without removing theirs
    (a Slicer that crashed) are removed when another engine starts. A folder whose lock an engine holds (in any
    process namespace that shares the folder, whatever process ID its name carries), one without a lock file, and
    names that are not an engine's own are left alone."""
    import fcntl

    from SAMEmbeddingLib import engine_process

    prefix = engine_process.VOLUMES_PREFIX
    made = engine_process._sharedMemoryFolder(tmp_path) if engine_process._availableMemory() else None
    stale = tmp_path / f"{prefix}{os.getpid()}-ended-"  # a live process ID: the lock, not the name, decides
    held = tmp_path / f"{prefix}1-held-"
    odd = tmp_path / f"{prefix}99999999999999999999999-odd-"  # no process ID at all
    unlocked = tmp_path / f"{prefix}2-nolock-"
    for folder in (stale, held, odd, unlocked):
        folder.mkdir()
        (folder / "volume-1.npy").write_bytes(b"held memory")
    for folder in (stale, held, odd):
        (folder / engine_process.VOLUMES_LOCK).touch()
    fd = os.open(held / engine_process.VOLUMES_LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an engine that lives
    try:
        engine_process._removeStaleVolumeFolders(tmp_path)
    finally:
        os.close(fd)
    assert not stale.exists() and not odd.exists()
    assert held.is_dir() and unlocked.is_dir()
    if made is not None:  # a new engine's folder: locked from the moment it has its name
        folder, lock = made
        try:
            engine_process._removeStaleVolumeFolders(tmp_path)
            assert folder.is_dir() and folder.name.startswith(f"{prefix}{os.getpid()}-")
        finally:
            os.close(lock)


def test_a_start_ahead_after_close_starts_nothing_and_a_failed_one_is_the_next_requests_error(a_small_ct):
    """An engine closed before its start ahead ran starts no child; a start ahead that fails is raised by the next
    request (not tried a second time there), and the request after it starts the child."""
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    with engine._lock:  # close() gets the lock before the start ahead's thread
        engine.startAhead()
        engine._closed = True
    engine._starter.join(60)
    assert not engine._starter.is_alive() and engine.starts == 0 and engine.pid is None
    engine.close()

    engine = EngineProcess(model="random:sam-lite", device="cpu", python="/nonexistent/python")
    try:
        engine.startAhead()
        end = time.monotonic() + 30.0
        while engine._startError is None:
            assert time.monotonic() < end, "the start ahead did not fail"
            time.sleep(0.01)
        image = mrml_io.image_from_volume_node(a_small_ct)
        centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
        engine.python = None  # a child could start now: the first request reports the failure instead of trying
        with pytest.raises(EngineProcessError, match="cannot start the engine process with /nonexistent/python"):
            engine.match(image, centre, [image])
        assert engine.starts == 0
        assert len(engine.match(image, centre, [image]).matches) == 1
        assert engine.starts == 1
    finally:
        engine.close()


@pytest.mark.skipif(os.name != "posix", reason="the stand-in interpreter is a shell script")
def test_a_failed_start_leaves_no_thread_listener_or_child_and_says_so(tmp_path):
    """A child that ends at once (here an interpreter that exits with 3, before it reads its connection details)
    gives an EngineProcessError each time, not a BrokenPipeError, and leaves nothing behind: before, each failed
    start kept a thread waiting in accept() on a listening socket for the rest of the session."""
    import threading

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    engine = EngineProcess(model="random:sam-lite", device="cpu", python=str(fake))
    before = threading.active_count()
    try:
        for _ in range(3):
            with pytest.raises(EngineProcessError, match="did not start"), engine._lock:
                engine._ensureStarted()
        end = time.monotonic() + 10.0
        while threading.active_count() > before:
            assert time.monotonic() < end, [t.name for t in threading.enumerate()]
            time.sleep(0.05)
        assert engine.starts == 0 and engine.pid is None
    finally:
        engine.close()


def test_a_closed_engine_starts_no_child_and_makes_no_volume_file_again(a_small_ct):
    """A job still running when the engine closed (the module left) stops as if cancelled: before, it started a
    child that nobody closed, and made the volume folder again without its lock, so no engine ever removed it."""
    from samembed import Cancelled

    image = mrml_io.image_from_volume_node(a_small_ct)
    centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    folder = engine._volumes
    engine.close()
    with pytest.raises(Cancelled, match="closed"):
        engine.newVolumeFile()
    with pytest.raises(Cancelled, match="closed"):
        engine.match(image, centre, [image])
    assert engine.starts == 0 and engine.pid is None and not folder.exists() and not engine._tmp.exists()


@pytest.mark.skipif(os.name != "posix", reason="the folders' locks are POSIX file locks")
def test_the_temporary_folders_of_ended_engines_are_removed_and_the_living_ones_left(monkeypatch, tmp_path):
    """Where shared memory has no room, an engine's volume files go to its temporary folder, up to 0.35 GB each: an
    engine that ended without removing it (a Slicer that crashed) left it for ever. The next engine removes it, as
    it removes the shared-memory ones; a living engine's folder and folders without a lock file stay."""
    import tempfile

    from SAMEmbeddingLib import engine_process

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    living = EngineProcess(model="random:sam-lite", device="cpu")
    crashed = EngineProcess(model="random:sam-lite", device="cpu")
    crashed_tmp = crashed._tmp
    (crashed_tmp / "volume-1.npy").write_bytes(b"a volume left behind")
    os.close(crashed._tmpLock)  # what a crash does to its lock (the folder stays)
    crashed._tmpLock = None
    unlocked = tmp_path / f"{engine_process.TEMP_PREFIX}nolock"
    unlocked.mkdir()
    try:
        assert crashed_tmp.parent == tmp_path and crashed_tmp.is_dir()
        later = EngineProcess(model="random:sam-lite", device="cpu")
        later.close()
        assert not crashed_tmp.exists(), "an ended engine's temporary folder was left"
        assert living._tmp.is_dir() and unlocked.is_dir()
    finally:
        living.close()
        crashed.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the engine process's children from /proc")
def test_a_target_the_engine_process_cannot_match_is_skipped_and_the_job_goes_on(a_small_ct):
    """A target with a problem of its own (too small for the model) among several comes back from the engine process
    as a samembed.TargetError: the job skips it and matches the next target. The engine logs it in one line, not as
    a failed request with its traceback, and keeps its prefetch for the targets read ahead (a failed request ends
    it)."""
    from samembed import Image
    from SAMEmbeddingLib.logic import MatchJob, TargetSpec

    image = mrml_io.image_from_volume_node(a_small_ct)
    tiny = Image.from_array(image.array[:2, :3, :3].copy(), name="tiny")
    later = Image(image.array + 1, image.grid, "later")
    engine = EngineProcess(model="default", device="cpu")
    try:
        centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
        job = MatchJob("src", "pts", ["c"], ["c"], centre, image,
                       [TargetSpec("n0", "tiny", tiny), TargetSpec("n1", "later", later)])
        outcome = job.run(engine)
        assert [r.name for r in outcome.results] == ["later"]
        assert [name for name, _ in outcome.skipped] == ["tiny"] and "too small" in outcome.skipped[0][1]
        log_text = engine._logPath.read_text()
        assert "request match_each: target 1 of 2 skipped: " in log_text, log_text[-2000:]
        assert "request match_each failed" not in log_text, log_text[-2000:]
    finally:
        engine.close()


def test_a_job_stopped_between_its_targets_lets_the_engine_drop_what_it_read_ahead(a_small_ct):
    """The module sends a click's volumes ahead, then asks for one target at a time; a cancel between two requests
    never reached the engine, whose prefetch kept the later targets' images and inputs (up to 1 GiB of shared
    memory) for the rest of the session. The job now says when it is over, and the prefetch goes."""
    from samembed import Image
    from SAMEmbeddingLib.logic import MatchJob, TargetSpec

    image = mrml_io.image_from_volume_node(a_small_ct)
    targets = [Image(image.array + k, image.grid, f"t{k}") for k in (1, 2, 3)]
    engine = EngineProcess(model="default", device="cpu")
    try:
        centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
        job = MatchJob("src", "pts", ["c"], ["c"], centre, image,
                       [TargetSpec(f"n{k}", t.name, t) for k, t in enumerate(targets)])
        cancel = threading.Event()
        seen = []

        def stop_after_the_first(result):
            seen.append(result)
            cancel.set()  # the user cancels between the first and the second target

        outcome = job.run(engine, cancel=cancel, onTarget=stop_after_the_first)
        assert outcome.cancelled and len(outcome.results) == 1
        children = Path(f"/proc/{engine.pid}/task/{engine.pid}/children")
        end = time.monotonic() + 30.0
        while children.read_text().split():  # the prefetch process ends once let go
            assert time.monotonic() < end, "the engine's prefetch process still runs after the job stopped"
            time.sleep(0.05)
        assert "preprocessed ahead by the prefetch process" in engine._logPath.read_text()
    finally:
        engine.close()


@pytest.mark.skipif(os.name != "posix", reason="the stand-in interpreter is a shell script")
def test_a_connection_that_never_authenticates_does_not_hold_the_start(tmp_path, monkeypatch):
    """Another local program that connects to the engine's port and never answers (here: a stand-in child that
    does just that) is dropped after ``HANDSHAKE_TIMEOUT_S``; the start then fails within its own time limit, with
    the usual error, instead of waiting for ever with the engine's lock held (which hung the module's cleanup)."""
    import sys

    from SAMEmbeddingLib import engine_process

    monkeypatch.setattr(engine_process, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(engine_process, "START_TIMEOUT_S", 3.0)
    silent = ("import json, socket, sys, time; hello = json.loads(sys.stdin.readline()); "
              "s = socket.create_connection(tuple(hello['address'])); time.sleep(60)")
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"{silent}\"\n")
    fake.chmod(0o755)
    engine = EngineProcess(model="random:sam-lite", device="cpu", python=str(fake))
    try:
        started = time.monotonic()
        with pytest.raises(EngineProcessError, match="did not start"), engine._lock:
            engine._ensureStarted()
        assert time.monotonic() - started < 15
    finally:
        engine.close()


def test_a_job_given_a_closed_engine_ends_as_cancelled(a_small_ct):
    """A job queued while the engine closed (another model chosen) ends as cancelled, not as a failure."""
    from SAMEmbeddingLib.logic import MatchJob, TargetSpec

    image = mrml_io.image_from_volume_node(a_small_ct)
    centre = image.grid.index_to_lps([[(n - 1) / 2 for n in image.grid.size_ijk]])
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    engine.close()
    outcome = MatchJob("src", "pts", ["c"], ["c"], centre, image, [TargetSpec("n", "t", image)]).run(engine)
    assert outcome.cancelled and outcome.results == [] and engine.starts == 0


@pytest.mark.skipif(os.name != "posix", reason="the stand-in interpreter is a shell script")
def test_closing_during_a_start_that_never_connects_returns_at_once(tmp_path):
    """The module's cleanup closes the engine; a start under way (here a child that never connects) held the lock
    for up to START_TIMEOUT_S (120 s), and the cleanup with it. It now gives up when the engine closes."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")  # exec: a kill of the "interpreter" leaves no sleep behind
    fake.chmod(0o755)
    engine = EngineProcess(model="random:sam-lite", device="cpu", python=str(fake))
    engine.startAhead()
    time.sleep(0.5)  # the start is waiting for the child's connection
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 10
    engine._starter.join(10)
    assert not engine._starter.is_alive() and engine.pid is None


def test_a_one_slice_volume_sent_to_the_process_keeps_its_slices_z():
    """A radiograph loaded as a one-slice volume is matched as a 2D image whose matches lie at its slice's z; the
    volume's z was lost on its way to the engine process, whose matches (the atlas path's, which the module does not
    correct) lay at z = 0 (a review)."""
    from samembed.image import Grid, single_slice_to_2d
    from samembed.io import read_image

    from ..conftest import hand_model, hand_radiographs

    model = hand_model()
    flat = read_image(hand_radiographs(1)[0], spacing_mm=0.2)
    plane = single_slice_to_2d(flat.array[None], Grid((1, *flat.array.shape), (0.2, 0.2, 1.0), (0.0, 0.0, 37.0),
                                                      np.eye(3)), "one slice")
    assert plane.plane_z_mm == 37.0
    point = np.array([[*plane.grid.index_to_lps([[300, 400]])[0], 37.0]])
    # the same pixels at another z (another node, or this one moved): the same content hash, another volume
    higher = single_slice_to_2d(flat.array[None], Grid((1, *flat.array.shape), (0.2, 0.2, 1.0), (0.0, 0.0, 50.0),
                                                       np.eye(3)), "one slice, higher")
    assert higher.content_hash() == plane.content_hash()
    engine = EngineProcess(model=str(model), device="cpu")
    try:
        found = engine.match(plane, point, [plane]).matches[0].point_lps_mm
        above = engine.match(higher, point + [0.0, 0.0, 13.0], [higher]).matches[0].point_lps_mm
    finally:
        engine.close()
    assert found[2] == 37.0
    assert above[2] == 50.0, "the process kept the first volume's z for the same pixels (a review)"


def test_a_message_names_the_volume_of_its_request_also_for_a_twin_the_child_holds(a_small_ct):
    """Two volumes with the same voxels and geometry are one volume to the child (sent once), but a message names
    the one of its request: here a constant target, refused by name, sent first as one node and then as its twin."""
    from samembed import Image

    source = mrml_io.image_from_volume_node(a_small_ct)
    flat = np.zeros_like(np.asarray(source.array))
    centre = source.grid.index_to_lps([[(n - 1) / 2 for n in source.grid.size_ijk]])
    engine = EngineProcess(model="random:sam-lite", device="cpu")
    try:
        for name in ("flat one", "flat two"):
            with pytest.raises(InputError, match=f"^{name}: image is constant"):
                engine.match(source, centre, [Image(flat.copy(), source.grid, name)])
        assert engine.imagesSent == 2, "the twin's content is the first's: sent once"
    finally:
        engine.close()


@pytest.mark.parametrize("engine", ["process", "here"])
def test_a_message_names_a_renamed_volume_by_its_new_name(a_scene, a_small_ct, engine):
    """The logic keeps each volume's image while its voxels and geometry stay (its cache key leaves the name out),
    but a renamed node is named by its new name, in either engine: here a constant target, refused by name."""
    flat = add_volume(a_scene, np.zeros_like(voxels(a_small_ct)), ijk_to_ras(a_small_ct), "flat")
    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    logic = MatchLogic(a_scene, model="random:sam-lite", device="cpu", cacheBytes=1 << 30, engine=engine)
    try:
        for name in ("flat", "flat, renamed"):
            flat.SetName(name)
            with pytest.raises(InputError, match=f"^{name}: image is constant"):
                logic.matchPoints(a_small_ct, points, [flat], [0])
        assert logic.imageForVolume(flat).name == "flat, renamed"
    finally:
        logic.close()


def test_the_engine_process_reads_and_writes_the_disk_cache_it_is_given(a_scene, a_small_ct, tmp_path):
    """``MatchLogic(cacheDir=...)`` was dropped with ``engine="process"`` (what the module panel uses), without a word
    (a review): the child now embeds into that folder, under the keys the engine in this process uses; a second
    engine process on that folder gives the same match."""
    from samembed.tiles import ENTRY_SUFFIX

    points = add_points(a_scene, [_ras(a_small_ct, (64, 70, 10))], ["L1"])
    entries, matched = {}, {}
    for engine, folder in (("process", "cache"), ("here", "here"), ("process", "cache")):
        logic = MatchLogic(a_scene, model="random:sam-lite", device="cpu", engine=engine, cacheDir=str(tmp_path / folder))
        try:
            logic.matchPoints(a_small_ct, points, [a_small_ct], [0])
            node = logic.outputPointList(points, a_small_ct)
            pos = [0.0, 0.0, 0.0]
            node.GetNthControlPointPosition(0, pos)
            matched.setdefault(engine, []).append(pos)
        finally:
            logic.close()
        entries[folder] = sorted(p.name for p in (tmp_path / folder).glob("*" + ENTRY_SUFFIX))
    assert len(entries["cache"]) == 1 and entries["cache"] == entries["here"], entries
    np.testing.assert_allclose(matched["process"][0], matched["process"][1], atol=0.5)  # (read back: rounded)


def test_a_volume_that_cannot_be_written_for_want_of_open_files_is_not_told_to_free_space(tmp_path, monkeypatch):
    """At the limit of open files the engine's volume could not be written, and the error said to free disk space
    (a review); it now names the limit."""
    import errno

    from samembed import InputError
    from samembed.image import Image
    from SAMEmbeddingLib import engine_process

    image = Image.from_array(np.zeros((4, 5, 6), np.int16), name="ct.nii.gz")
    for code, said in ((errno.EMFILE, "limit of open files"), (errno.ENOSPC, "free space there")):
        def refuse(*a, code=code, **k):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(engine_process.np, "save", refuse)
        with pytest.raises(InputError, match=said):
            engine_process._saveVolume(tmp_path / "v.npy", image)
        assert not (tmp_path / "v.npy").exists()
