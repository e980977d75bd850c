"""What runs on a Dask worker: embed the atlas once, then match one scan per task.

Each worker process keeps one :class:`~samembed.api.Matcher` (model loaded) and the atlas embedding across
tasks in a module-level slot keyed by the engine settings. The atlas embedding reaches the workers through
the on-disk embedding cache folder: :func:`prepare_atlas` computes it once and stores it there; every worker
then loads it from that folder instead of recomputing it. Scan embeddings are never written to disk.

The functions here return plain dicts (a *record* per scan) and never raise for a bad scan: a scan that
cannot be read, has the wrong dimension or runs out of memory comes back as a failure record with the reason.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, is_out_of_memory
from ..options import MatchOptions
from .manifest import Scan
from .settings import EngineKey


@dataclass(frozen=True)
class ScanJob:
    """Everything a worker needs besides the scan (small, pickled with each task).

    ``points_lps_mm`` is a tuple of (x, y, z) LPS mm triples; ``engine`` the worker Matcher's settings
    (:meth:`PropagateSettings.engine_key`); ``cache_dir`` the folder carrying the atlas embedding.
    """

    atlas_image: str
    labels: tuple[str, ...]
    points_lps_mm: tuple[tuple[float, float, float], ...]
    options: MatchOptions
    engine: EngineKey
    cache_dir: str
    thumbnails: bool = True
    thumbnail_mm: float = 80.0
    #: further atlases (image path, labels, points) fused with the first one (``Matcher.match_atlases``)
    more_atlases: tuple[tuple[str, tuple[str, ...], tuple[tuple[float, float, float], ...]], ...] = ()
    #: each atlas's point file (:attr:`all_atlases` order), which its name in the outputs may hold (two raters'
    #: points on one image); the client checked the points against their images before the run
    #: (:func:`samembed.propagate.run.propagate`)
    point_files: tuple[str, ...] = ()
    #: each atlas's name in the outputs (:attr:`all_atlases` order; :func:`samembed.names.atlas_names` of the paths
    #: as the user gave them, a link's own name, not its target's); empty: from the paths here
    atlas_names: tuple[str, ...] = ()

    @property
    def all_atlases(self) -> list[tuple[str, tuple[str, ...], tuple[tuple[float, float, float], ...]]]:
        """Every atlas of the run as (image path, labels, points LPS mm), the first one first."""
        return [(self.atlas_image, self.labels, self.points_lps_mm), *self.more_atlases]


@dataclass
class _Engine:
    """A worker's Matcher, the atlas embeddings it holds, and counters the tests and the benchmark read."""

    key: EngineKey
    matcher: Any
    atlases: dict = field(default_factory=dict)  # (atlas path, cache dir) -> (Image, EmbeddingMaps)
    stats: dict = field(default_factory=lambda: {"model_loads": 1, "atlas_loaded": 0, "atlas_computed": 0, "scans": 0})


_ENGINE: dict[str, _Engine] = {}  # one per worker process: {"engine": _Engine}
#: tasks of one process run one at a time: a worker started with several threads shares one Matcher and its
#: caches, so extra threads would only contend for them (start workers with one thread each and more processes)
_LOCK = threading.Lock()


def _engine(job: ScanJob) -> _Engine:
    """This process's engine for ``job.engine`` (built on first use; a different key replaces it).

    Building it also has the worker's C allocator keep freed memory for the next tile
    (:func:`samembed.allocator.keep_freed_memory`), as ``samembed match`` does: Dask starts its workers with
    ``MALLOC_TRIM_THRESHOLD_=65536``, which hands every freed tile's activations back to the OS, so each tile faulted
    its memory in afresh. Measured on one local worker, 5 OpenKBP scans after the first: 1.4-1.9 s per scan without,
    0.78-1.3 s with (the same matches); a worker then holds up to 256 MB of free memory for reuse."""
    eng = _ENGINE.get("engine")
    if eng is None or eng.key != job.engine:
        _ENGINE.clear()  # free the previous model and embeddings before loading another
        from ..allocator import keep_freed_memory
        from ..api import Matcher

        keep_freed_memory(besides=DASK_WORKER_MALLOC)

        key = job.engine
        matcher = Matcher(model=key.model, device=key.device, cache_bytes=key.cache_bytes, cache_dir=None,
                          modality=key.modality, max_tile_voxels=key.max_tile_voxels, spacing_mm=key.spacing_mm,
                          precision=key.precision)
        eng = _ENGINE["engine"] = _Engine(job.engine, matcher)
    return eng


#: what Dask's nannies set in their workers' environment by default (``distributed.nanny.pre-spawn-environ``): not a
#: user's setting, which :func:`~samembed.allocator.keep_freed_memory` would leave as it is
DASK_WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "65536"}


def _atlas(eng: _Engine, job: ScanJob, path: str | None = None, complete_entry: bool = False):
    """An atlas image of the run (the first by default) and its embedding, loaded from the cache folder (computed
    and stored there if absent). ``complete_entry`` (the run's preparation, before any scan): also when the folder
    holds an entry, make sure it holds the whole body (an entry that a ``samembed match --cache-dir`` or a stopped
    run left partial is completed, a damaged one recomputed), so that every worker reads the same voxels."""
    path = job.atlas_image if path is None else path
    key = (path, job.cache_dir)
    if key not in eng.atlases:
        m = eng.matcher
        wanted = {(a[0], job.cache_dir) for a in job.all_atlases}
        for old in [k for k in eng.atlases if k not in wanted]:  # one run's atlases at a time: a long-lived
            del eng.atlases[old]  # worker must not collect every run's atlases
        image = _read_atlas(job, path)
        # the worker's network for the atlas's dimension (model "default": the 2D model for radiographs; the
        # matcher's own embedder is the 3D one, which refused a radiograph atlas), with the run's folder
        disk = m.embedder_for(image.ndim).storing_in(job.cache_dir)
        on_disk = disk._disk_path(disk.key(image)).is_file()
        if complete_entry or not on_disk:
            m.cache.clear()  # an in-memory copy (e.g. of an earlier run) would keep it from reaching the folder
            # what an entry holds (the global map, the body's local map): computed once, or the missing part of it
            disk.embed_body(image)
            m.cache.clear()
        # every worker matches with the maps read from the folder (packed directions), so results do not depend on
        # where a scan ran (the worker that computed them would otherwise hold float32 maps); a voxel the folder does not
        # hold (outside the body) is computed when a search reads it, the same on every worker (tiles are exact)
        maps = disk.embed(image, on_demand=True)
        eng.stats["atlas_loaded" if on_disk else "atlas_computed"] += 1
        eng.atlases[key] = (image, maps)
    return eng.atlases[key]


def _read_atlas(job: ScanJob, path: str):
    """The atlas image at ``path``, read as the worker's matcher reads images (with the run's ``spacing_mm``)."""
    from ..api import as_image
    from ..io import spacing_warning_said

    image = as_image(path, spacing_mm=job.engine.spacing_mm, warn_spacing=False)
    if not image.pixel_spacing_known:  # the command said so as it read the atlas: not again by every worker, for
        spacing_warning_said()  # the atlas nor for the scans (the run's one --spacing applies to all)
    return image


def versions() -> dict[str, str]:
    """Versions of what computes the results, as seen by this process."""
    import platform

    import SimpleITK as sitk
    import torch

    from .. import __version__

    out = {"samembed": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "SimpleITK": sitk.Version.VersionString()}
    try:
        import dask
        import distributed

        out.update(dask=dask.__version__, distributed=distributed.__version__)
    except ImportError:
        pass
    return out


def prepare_atlas(job: ScanJob) -> dict:
    """Load the model and compute the atlas embedding into the cache folder (once per run).

    Returns the model's id and SHA-256 (None for random weights), the atlas embedding's cache key, the versions
    on the worker and the time taken (s); or ``{"input_error": message}`` for an input the engine refuses (an atlas
    of another dimension than the model's, say): returned, not raised, so that the worker does not log Dask's
    "Compute Failed" block with its traceback before the command's one line.
    """
    try:
        return _prepare_atlas(job)
    except InputError as e:
        return {"input_error": str(e)}


def _prepare_atlas(job: ScanJob) -> dict:
    t0 = time.time()
    os.makedirs(job.cache_dir, exist_ok=True)
    keys, hashes = [], []
    # (each atlas's points were checked against its image by the client, before the cluster started: their
    # coordinates per point, inside it, and the atlases' one dimension)
    for path, _, _ in job.all_atlases:
        with _LOCK:
            eng = _engine(job)
            image, maps = _atlas(eng, job, path, complete_entry=True)
        d = image.ndim
        keys.append(maps.key)
        hashes.append(image.content_hash())
    model = eng.matcher.embedder_for(d).model  # (the model that embeds the atlases' dimension)
    return {"model_id": model.model_id, "model_sha256": model.sha256, "atlas_key": "+".join(keys),
            "atlas_content_hash": "+".join(hashes), "atlas_ndim": d, "versions": versions(),
            "local_spacing_mm": [float(v) for v in maps.local_grid.spacing_mm],
            # what "auto" resolved to on this worker (a worker of another CPU may resolve otherwise: each scan's
            # record says its own, see match_scan)
            "resolved": _resolved(eng, d),
            "prepare_s": time.time() - t0, "stats": dict(eng.stats)}


def _resolved(eng: _Engine, ndim: int | None = None) -> dict:
    """The device and arithmetic this worker's engine runs for ``ndim``-D images (``--device``/``--precision auto``
    resolved; default: its model's own dimension)."""
    embedder = eng.matcher.embedder if ndim is None else eng.matcher.embedder_for(ndim)
    return {"device": str(embedder.device), "precision": embedder.precision}


def failure(scan: Scan, reason: str, **extra: Any) -> dict:
    """The record of a scan that could not be matched."""
    return {"scan": scan.id, "path": scan.path, "status": "failed", "reason": reason, **extra}


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if is_out_of_memory(e):
        return (f"out of memory ({type(e).__name__}: {text[:200]}); give each worker more memory (fewer --workers, "
                "--memory-limit) or lower max_tile_voxels")
    if isinstance(e, InputError):
        return text
    return f"{type(e).__name__}: {text}"


def match_scan(scan: Scan, job: ScanJob) -> dict:
    """Match the atlas points into one scan; a record with the matches, thumbnails (PNG bytes) and timings (s).

    Never raises for a bad scan: the record then has ``status="failed"`` and the ``reason``.
    """
    with _LOCK:
        return _match_scan(scan, job)


def _match_scan(scan: Scan, job: ScanJob) -> dict:
    t0, cpu0 = time.time(), time.process_time()
    try:
        from ..api import as_image

        eng = _engine(job)
        images = [_atlas(eng, job, path)[0] for path, _, _ in job.all_atlases]
        m = eng.matcher
        t_read = time.time()
        target = as_image(scan.path, spacing_mm=m.spacing_mm)
        t_read = time.time() - t_read
        if job.more_atlases:  # several atlases: each landmark fused over them
            from ..fusion import Atlas, landmark_union
            from ..names import atlas_names

            # each named as the outputs name it (the rejected ones): briefly, and apart where one image is an atlas
            # twice (two raters' landmarks)
            names = job.atlas_names or atlas_names([path for path, _, _ in job.all_atlases], job.point_files)
            atlases = [Atlas(img, np.asarray(pts), labels, name)
                       for img, (_, labels, pts), name in zip(images, job.all_atlases, names)]
            # which atlases lack which landmarks: said once by the command at its start, not again by every worker
            # (a worker's line landed unprefixed among the progress lines)
            m.already_said(landmark_union([(a.display_name, a.labels) for a in atlases])[1])
            res = m.match_atlases(atlases, [target], job.options, target_names=[scan.path])
        else:
            res = m.match(images[0], np.asarray(job.points_lps_mm), [target], list(job.labels), job.options,
                          target_names=[scan.path])
        t_thumbs = time.time()
        thumbs = {}
        matches = []
        if job.thumbnails:
            from .thumbnails import landmark_pngs

            thumbs = dict(zip((mt.label for mt in res.matches),
                              landmark_pngs(target, [mt.point_lps_mm for mt in res.matches], job.thumbnail_mm)))
        for mt in res.matches:
            matches.append({"label": mt.label, "x": float(mt.point_lps_mm[0]), "y": float(mt.point_lps_mm[1]),
                            "z": float(mt.point_lps_mm[2]), "score": float(mt.score), "confident": bool(mt.confident),
                            "roundtrip_mm": float(mt.roundtrip_mm), "rematched": bool(mt.rematched),
                            "polished": bool(mt.polished), "ncc": float(mt.ncc), "atlases": int(mt.atlases),
                            "agreeing": int(mt.agreeing), "spread_mm": float(mt.spread_mm),
                            "rejected": list(mt.rejected),
                            # each atlas's own prediction, by its name in the outputs (the scan's JSON record)
                            "per_atlas": [{"atlas": name, "x": p[0], "y": p[1], "z": p[2], "score": score,
                                           "agreeing": agreeing, "from_fused_mm": float(np.linalg.norm(
                                               np.subtract(p, mt.point_lps_mm)))}
                                          for name, p, score, agreeing in mt.per_atlas]})
        t_thumbs = time.time() - t_thumbs
    except Exception as e:  # noqa: BLE001 - every failure of one scan is recorded, the run goes on
        return failure(scan, _reason(e), timings={"total_s": time.time() - t0}, worker=_where())
    finally:
        _release(job)
    eng.stats["scans"] += 1
    timings = {"read_s": t_read, "embed_s": res.timings.get("target0_embed_s", 0.0),
               "match_s": res.timings.get("target0_match_s", 0.0), "thumbnails_s": t_thumbs,
               "total_s": time.time() - t0, "cpu_s": time.process_time() - cpu0}
    return {"scan": scan.id, "path": scan.path, "status": "ok", "matches": matches, "thumbnails": thumbs,
            # (the width its thumbnails were made at: a resumed run may make the later scans' at another)
            "thumbnail_mm": float(job.thumbnail_mm) if job.thumbnails else None,
            "timings": timings, "worker": {**_where(), **_resolved(eng, target.ndim)}, "stats": dict(eng.stats)}


def _release(job: ScanJob) -> None:
    """Drop the scan's embedding (and priors) but keep the atlas embedding in memory for the next task."""
    eng = _ENGINE.get("engine")
    if eng is None:
        return
    eng.matcher.clear_cache()
    for _, maps in eng.atlases.values():
        eng.matcher.cache.put(maps.key, maps)


def _where() -> dict:
    """This worker's process id, address (when on Dask) and resident memory (bytes)."""
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        import psutil

        out["rss_bytes"] = int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        from distributed import get_worker

        out["address"] = get_worker().address
    except (ImportError, ValueError):
        pass
    return out
