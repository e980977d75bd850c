"""Run a propagation on Dask: :func:`propagate` (the Python API behind ``samembed propagate``).

The client (this process) starts or joins the cluster, asks one worker to embed the atlas into the cache
folder, submits one task per scan, and writes each scan's files as soon as its result arrives
(``distributed.as_completed``); a lost worker's tasks are rescheduled by Dask, a scan that fails is recorded in
``failures.csv``, and an interruption (Ctrl-C, a ``cancel`` event) keeps every finished scan for ``resume``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Cancelled, InputError, SamEmbedError, refuse_mixed_dimensions
from ..io import output_folder
from ..names import atlas_names
from ..options import MatchOptions
from ..stopping import StopBetweenSteps
from .manifest import Scan, file_stamp, read_scans
from .results import ResultStore
from .settings import Atlas, PropagateSettings

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = MatchOptions()
DEFAULT_SETTINGS = PropagateSettings()

#: ``on_result(record, client)``: called on the client after each scan's files are written (tests, GUIs)
ResultHook = Callable[[dict, Any], None]


class MissingDependencyError(SamEmbedError):
    """An optional dependency (Dask, Jinja2) is not installed."""


def require_dask() -> None:
    """Raise :class:`MissingDependencyError` with the install command when Dask distributed is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            "samembed propagate runs on Dask distributed, which is not installed; "
            "install it with: pip install 'samembed[dataset]'  (or: pip install \"dask[distributed]\" jinja2)") from e


@dataclass
class PropagateSummary:
    """What a run did. Times in seconds; ``skipped`` scans were finished by an earlier run with the same settings,
    ``stale`` ones were finished with other settings and redone."""

    out_dir: Path
    total: int
    finished: int
    failed: int
    skipped: int
    stale: int
    elapsed_s: float
    interrupted: bool = False
    report: Path | None = None
    workers: int = 0
    timings: dict = field(default_factory=dict)


def _atlas_list(atlases: Sequence[Atlas] | Atlas) -> list[Atlas]:
    """The atlases of a run (one, or several whose landmarks are fused per scan)."""
    if isinstance(atlases, (Atlas, str, os.PathLike)) or not hasattr(atlases, "__iter__"):
        atlases = [atlases]
    atlases = list(atlases)  # (a list, a tuple, a generator, ...)
    if not atlases:
        raise InputError("no atlas given; pass --atlas IMAGE POINTS")
    for a in atlases:
        if not isinstance(a, Atlas):
            what = ("samembed.Atlas, an image with its points for Matcher.match_atlases"
                    if type(a).__module__ == "samembed.fusion" else type(a).__name__)
            raise InputError(f"propagate() takes atlases as files, samembed.propagate.Atlas(image_path, points_path), "
                             f"not {what}")
    return atlases


def _check_atlas_points(atlases: list[Atlas], point_lists: list, settings: PropagateSettings) -> None:
    """Each atlas's points against its image, here, before the cluster starts and anything is written: a point file
    of x,y only for a 3D atlas, or points outside it (RAS read as LPS), was refused by a worker, after the atlas was
    embedded, with Dask's traceback of the worker's task before the message (as ``samembed match`` does it, before
    torch loads)."""
    from ..io import check_point_dims, check_points_inside, read_image

    dims = []
    for a, pl in zip(atlases, point_lists):
        image = read_image(a.image, spacing_mm=settings.spacing_mm)
        check_point_dims(pl, a.points, image.ndim, a.image)
        check_points_inside(pl, a.points, image, a.ras)
        dims.append(image.ndim)
    # (else every scan would fail with it, one row of failures.csv each)
    refuse_mixed_dimensions([(a.image, d) for a, d in zip(atlases, dims)], "scans")


def _read_atlas_points(atlases: list[Atlas]) -> list:
    """Each atlas's point list. Atlases may carry different landmarks (each is fused over the atlases that carry it):
    an atlas that lacks some is named in a warning; labels that repeat in one atlas are refused (naming its point
    file)."""
    from ..fusion import landmark_union
    from ..io import read_points

    lists = [read_points(a.points, ras=a.ras) for a in atlases]
    for note in landmark_union([(a.points, pl.labels) for a, pl in zip(atlases, lists)])[1]:
        log.warning("%s", note)
    return lists


#: the fusion rule of several atlases, in the fingerprint of their runs: 2 = agreement within the limit of the other
#: agreeing atlases' consensus, two at least (two atlases up to twice the limit apart had agreed before)
FUSION_RULE = 2


def fingerprint(prep: dict, job_points: dict, options: MatchOptions, settings: PropagateSettings) -> str:
    """SHA-256 of everything that changes a scan's result: model (id and hash), atlas embedding and points,
    match options and the result-relevant engine settings. Scans finished with the same fingerprint are skipped
    on resume."""
    doc = {"model_id": prep["model_id"], "model_sha256": prep["model_sha256"], "atlas_key": prep["atlas_key"],
           "atlas_content_hash": prep["atlas_content_hash"], "points": job_points, "options": options.to_dict(),
           "engine": settings.result_fields()}
    if "more_atlases" in job_points:  # how atlases are fused: scans fused by an earlier rule are redone on resume
        doc["fusion"] = FUSION_RULE
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _workers_ignore_interrupts() -> Iterator[None]:
    """Start the local cluster's worker processes ignoring SIGINT (they inherit it): a Ctrl-C at the terminal reaches
    every process of its group, and each worker printed a KeyboardInterrupt traceback while this process, which
    handles the interrupt (keeps what finished, then closes the cluster), was still writing. In the main thread
    only (where signal handlers are set); elsewhere nothing changes."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


#: what to do when a script starts a local cluster at its top level: each worker process imports the script again
GUARD_HINT = ("Dask's worker processes import the calling script again, so put the code that calls propagate() "
              "under `if __name__ == \"__main__\":`")


@contextlib.contextmanager
def dask_environment_kept() -> Iterator[None]:
    """A block after which the variables of Dask's ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS``, ... : 1 where they are not set) and ``PYTHONHASHSEED`` are as before it. Dask's nanny writes
    them into this process's environment before it starts each worker process, and leaves them there: every process
    started from this one afterwards (the Slicer module's engine process, a ``samembed`` command) would run torch on
    one thread (torch takes MKL's count), with a fixed hash seed."""
    import dask

    keys = [str(k) for k in dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}]
    keys.append("PYTHONHASHSEED")
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _client(settings: PropagateSettings, client=None) -> Iterator[Any]:
    """The Dask client: the one given, one joined to ``settings.scheduler`` (with Dask's security config), or a
    local cluster of ``settings.workers`` processes with one thread each, bound to 127.0.0.1."""
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster
    from distributed.security import Security

    if settings.scheduler:
        try:
            c = Client(settings.scheduler, security=Security(), timeout="30s")
        except (OSError, TimeoutError) as e:
            raise InputError(f"cannot reach the Dask scheduler at {settings.scheduler}: {e}; "
                             "check the address, and for tls:// Dask's distributed.comm.tls settings") from e
        try:
            yield c
        finally:
            c.close()
        return
    with dask_environment_kept():  # (the cluster's nannies set them for their workers, here)
        with _workers_ignore_interrupts():
            try:
                cluster = LocalCluster(n_workers=settings.workers, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                       memory_limit=settings.memory_limit, silence_logs=logging.ERROR)
            except RuntimeError as e:  # (Dask's own traceback of the worker is logged above)
                raise SamEmbedError(f"the local Dask cluster's worker processes did not start ({e}). Called from a "
                                    f"script? {GUARD_HINT}") from e
        c = Client(cluster)
        try:
            yield c
        finally:
            c.close()
            cluster.close(timeout=20)


class _Bar:
    """Progress on stderr: scans done, failures, scans per minute (a bar with the ETA on a terminal, a line every few
    seconds in a log: :class:`~samembed.progress.CountProgress`)."""

    def __init__(self, total: int, enabled: bool, started_s: float | None = None) -> None:
        self.bar, self.t0, self.done, self.failed = None, time.time(), 0, 0
        if enabled and total:
            from ..progress import CountProgress

            # (a log's lines count seconds from propagate's start, as the command's other lines do)
            self.bar = CountProgress(total, "propagate", unit="scan", started_s=started_s)

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self.bar is not None:
            per_min = 60.0 * self.done / max(time.time() - self.t0, 1e-6)
            # a log's lines give the rate themselves (scan/s)
            rate = "" if self.bar.lines else f", {per_min:.1f} scans/min"
            self.bar.set_postfix_str(f"{self.failed} failed{rate}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def propagate(atlases: Sequence[Atlas] | Atlas, scans: str | Path | Sequence[Scan], out_dir: str | Path,
              options: MatchOptions = DEFAULT_OPTIONS, settings: PropagateSettings = DEFAULT_SETTINGS, *,
              client=None, cancel: threading.Event | None = None, on_result: ResultHook | None = None,
              echo: Callable[[str], None] | None = None) -> PropagateSummary:
    """Carry an atlas's landmarks to many scans on Dask; write per-scan files, tables, ``run.json`` and a report.

    Args:
        atlases: one :class:`Atlas` (image + point file), or several: each landmark is then fused per scan over
            them (``Matcher.match_atlases``); each landmark over the atlases that carry it.
        scans: a manifest CSV (``path`` column, optional ``id``), a folder of images, or a list of :class:`Scan`.
        out_dir: the output folder (created); see :mod:`samembed.propagate.results` for its layout.
        options: how each scan is matched (the same :class:`~samembed.options.MatchOptions` as ``Matcher.match``).
        settings: model, cluster, output and resume settings (:class:`PropagateSettings`).
        client: an existing ``distributed.Client`` to run on (then ``settings.workers``/``scheduler`` are unused).
        cancel: when set, the run stops after the scan in hand, keeps what finished, and raises
            :class:`~samembed.errors.Cancelled` whose ``partial`` is the :class:`PropagateSummary`.
        on_result: called with each scan's record (and the client) after its files are written.
        echo: where one-line messages go (resume counts, summary); default: the log.

    Returns:
        :class:`PropagateSummary`.

    Raises:
        InputError: bad atlas, points, manifest or output folder (an existing run without ``resume``).
        MissingDependencyError: Dask distributed is not installed.
        KeyboardInterrupt, Cancelled: after keeping everything finished.
    """
    require_dask()
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from .task import ScanJob, failure, match_scan, prepare_atlas

    say = echo or log.info
    t0, started_s = time.time(), time.perf_counter()
    atlas_list = _atlas_list(atlases)
    atlas = atlas_list[0]
    if not isinstance(options, MatchOptions):
        raise InputError(f"options must be a samembed.MatchOptions, not {type(options).__name__}")
    if options.heatmap:
        raise InputError("propagate does not write heatmaps; use samembed match --heatmap-dir for a few scans")
    if not isinstance(scans, (list, tuple)) and Path(scans).is_dir() and Path(scans).resolve() == Path(out_dir).resolve():
        # (every file of the folder was left out as the output's own: "no images found in this folder")
        raise InputError(f"--out {out_dir} is the scans folder; choose another folder for the results (nothing was "
                         "written)")
    # a scans folder that holds the output folder: its thumbnails are not scans
    scan_list = list(scans) if isinstance(scans, (list, tuple)) else read_scans(scans, exclude=(out_dir,))
    missing = [s.path for s in scan_list if not os.path.exists(s.path)]
    listed = f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    # none there, on a new run on this machine's own cluster: refused before the cluster starts and the atlas is
    # embedded (a resumed run may hold them all, finished; another cluster's workers may see what this machine
    # does not)
    if missing and len(missing) == len(scan_list) and not settings.resume and not settings.scheduler and client is None:
        manifest = not isinstance(scans, (list, tuple)) and Path(scans).is_file()
        raise InputError(f"none of the {len(scan_list)} scans exists {listed}: check the paths"
                         + ("; a manifest's relative paths are relative to its own folder" if manifest else ""))
    if missing:  # said now, not only in failures.csv once every scan has run (an audit)
        say(f"{len(missing)} of {len(scan_list)} scans are missing here {listed}: a scan that no run has finished is "
            "recorded as failed (failures.csv)")
    point_lists = _read_atlas_points(atlas_list)
    out = Path(out_dir)
    store = ResultStore(out)
    inputs = [*(s.path for s in scan_list), *(f for a in atlas_list for f in (a.image, a.points))]
    held = store.inputs_in_the_way(inputs)
    if held:
        raise InputError(f"{held[0]}{f' and {len(held) - 1} more input(s)' if len(held) > 1 else ''}: lies where the "
                         f"run writes its own files in --out {out} (scans/, thumbs/, superseded/, {', '.join(store.RUN_FILES)}), "
                         "and would be replaced; choose another --out (nothing was changed)")
    in_the_way = store.files_in_the_way()
    if in_the_way and not settings.resume:
        raise InputError(f"{out} already holds the results of a run ({', '.join(in_the_way)}); pass --resume to "
                         "continue it, or choose another --out (nothing was changed)")
    _check_atlas_points(atlas_list, point_lists, settings)
    points = point_lists[0]
    # made and checked before the cluster starts: an --out that is a file or cannot be written is named now, not as a
    # worker's traceback when it first writes there
    output_folder("--out", out)
    cache_dir = str(Path(settings.cache_dir or out / "cache").resolve())
    job = ScanJob(atlas.image, tuple(points.labels), tuple(tuple(float(v) for v in p) for p in points.points_lps_mm),
                  options, settings.engine_key(), cache_dir, settings.thumbnails, settings.thumbnail_mm,
                  tuple((a.image, tuple(pl.labels), tuple(tuple(float(v) for v in p) for p in pl.points_lps_mm))
                        for a, pl in zip(atlas_list[1:], point_lists[1:])),
                  point_files=tuple(str(a.points) for a in atlas_list),
                  atlas_names=tuple(atlas_names([a.given[0] for a in atlas_list], [a.given[1] for a in atlas_list])))
    run_info: dict[str, Any] = {
        "status": "starting", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "out_dir": str(out.resolve()),
        "atlas": {"image": atlas.image, "points": atlas.points, "labels": list(points.labels),
                  "points_lps_mm": [list(p) for p in job.points_lps_mm]},
        "more_atlases": [{"image": a.image, "points": a.points, "labels": list(labels),
                          "points_lps_mm": [list(p) for p in pts]}
                         for a, (_, labels, pts) in zip(atlas_list[1:], job.more_atlases)],
        "scans": len(scan_list), "options": options.to_dict(), "settings": settings.to_dict(), "cache_dir": cache_dir,
        # each atlas as the outputs name it (the rejected column), in the order above
        "atlas_names": list(job.atlas_names),
        # how the run was asked for: the scans' manifest or folder, and this process's command line
        "scans_source": None if isinstance(scans, (list, tuple)) else str(Path(scans).resolve()),
        "argv": list(sys.argv),
    }
    # from the end of the scans on, a first Ctrl-C or SIGTERM is noted, not let through, until the tables and
    # run.json are written whole: while the cluster closes (seconds), or while they are written, a stop left
    # matches.csv without the last scans and run.json "running"
    shield = StopBetweenSteps()
    with contextlib.ExitStack() as ending:  # (the shield, entered after the scans, is left after the tables)
        with _client(settings, client) as c:
            workers = len(c.scheduler_info().get("workers", {}))
            run_info["cluster"] = {"scheduler": c.scheduler.address, "workers": workers}
            t_prep = time.time()
            prep = c.submit(prepare_atlas, job, pure=False, key=f"samembed-atlas-{uuid.uuid4().hex}").result()
            if "input_error" in prep:
                raise InputError(prep["input_error"])
            run_info["phases_s"] = {"start": t_prep - t0, "prepare_atlas": time.time() - t_prep}
            say(f"atlas ready in {time.time() - t_prep:.1f} s in {cache_dir} ({prep['model_id']})")
            job_points = {"labels": list(points.labels), "points_lps_mm": run_info["atlas"]["points_lps_mm"]}
            if job.more_atlases:
                job_points["more_atlases"] = run_info["more_atlases"]
            fp = fingerprint(prep, job_points, options, settings)
            # scans/ holds this run's results only, however far it gets: the results of other settings set aside
            # (and its own given back), and the tables rewritten with the results kept, not cut by a first stop
            with StopBetweenSteps() as moving:
                todo, skipped, stale = store.plan(scan_list, fp)
                store.set_aside_stale()
                store.write_tables(scan_list)
            if moving.requested is not None:
                moving.stop()
            if settings.resume:
                say(f"resume: skipping {skipped} of {len(scan_list)} scans already finished with these settings; "
                    f"{len(todo)} to do" + (f" ({stale} finished with other settings, or whose file changed since, are "
                                            f"redone; their earlier results wait in {store.superseded_dir} until then)"
                                            if stale else ""))
            # what "confident" means in this run's outputs (samembed.api: the tolerance, unless given, is two voxels of the
            # model's local grid; a fused match: most of its atlases agree)
            spacing = prep["local_spacing_mm"]
            tolerance = options.roundtrip_tolerance_mm or 2.0 * sum(spacing) / len(spacing)
            run_info["confidence"] = {
                "roundtrip_tolerance_mm": tolerance,
                "rule": (f"most atlases that carry the landmark agree, two at least (each within the fusion limit of "
                         f"the others' consensus), and one of those matched back within {tolerance:g} mm of its atlas "
                         f"point"
                         if job.more_atlases else
                         f"the match, matched back into the atlas, lands within {tolerance:g} mm of the atlas point"),
                "note": "round-trip consistency, not a measured accuracy: a consistent match can still be wrong"}
            run_info["resolved"] = prep.get("resolved")  # device and precision as "auto" resolved on the first worker
            run_info["atlas_content_hash"] = prep["atlas_content_hash"]
            run_info["atlas_ndim"] = prep["atlas_ndim"]  # (the report describes 2D thumbnails otherwise)
            run_info.update(status="running", fingerprint=fp, model={"id": prep["model_id"], "sha256": prep["model_sha256"]},
                            atlas_embedding_key=prep["atlas_key"], versions={"workers": prep["versions"],
                                                                             "client": _client_versions()},
                            resumed_skipped=skipped, stale=stale)
            store.write_run(run_info)
            # an earlier run's page would stand beside this run's tables (other settings, other scans) until the end:
            # it goes now, and comes back at the end, or as a partial page when the run is interrupted
            (out / "report.html").unlink(missing_ok=True)
            token = uuid.uuid4().hex[:8]
            # each scan file's size and time as this process sees it before the task reads it, for --resume to compare
            # with what it sees then (manifest.file_stamp; a worker's view of a shared disk may differ in resolution)
            stamps = {s.id: file_stamp(s.path) for s in todo}
            futures = {c.submit(match_scan, s, job, key=f"samembed-match-{s.id}-{token}", pure=False): s for s in todo}
            bar = _Bar(len(todo), settings.progress, started_s)
            finished = failed = 0
            t_scans, write_s = time.time(), 0.0
            written: set[str] = set()  # the scans whose results are in the output folder

            def keep(fut, scan: Scan) -> bool:
                """Write one finished task's result (a failure record when it raised); whether it matched."""
                try:
                    rec = fut.result()
                except KilledWorker as e:
                    rec = failure(scan, f"the worker process died each time it matched this scan ({e}); "
                                        "usually out of memory: give workers more memory or use fewer --workers")
                except CancelledError as e:  # not by this run (it cancels only when it stops): by the scheduler,
                    # e.g. when the connection to it was lost; recorded, so that the run does not end "finished"
                    rec = failure(scan, f"the Dask scheduler cancelled this scan ({e or 'no reason given'}); "
                                        "rerun with --resume to match it")
                except Exception as e:  # noqa: BLE001 - e.g. a task that could not be deserialised
                    rec = failure(scan, f"{type(e).__name__}: {e}")
                rec = store.add({**rec, "file": stamps.get(scan.id)}, fp, ras=settings.ras)
                written.add(scan.id)
                return rec["status"] == "ok"

            try:
                for fut in as_completed(futures):
                    scan = futures[fut]
                    t_write = time.time()
                    ok = keep(fut, scan)
                    write_s += time.time() - t_write
                    run_info["phases_s"].update(scans=time.time() - t_scans, client_writes=write_s)
                    finished += ok
                    failed += not ok
                    bar.update(ok)
                    store.write_tables(scan_list, force=False, every_s=settings.csv_every_s)
                    if on_result is not None:
                        on_result(_record_of(store, scan), c)
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"cancelled after {finished + failed} of {len(todo)} scans")
            except (KeyboardInterrupt, Cancelled, Exception) as e:
                # the results that workers finished meanwhile are kept too (they would be computed again on
                # --resume), then the rest is cancelled: in one call (one by one took about 1 ms each)
                ready = [f for f in futures if f.status == "finished" and futures[f].id not in written]
                c.cancel([f for f in futures if f.status != "finished"])
                error = None if isinstance(e, (KeyboardInterrupt, Cancelled)) else e
                try:
                    for f in ready if error is None else ():  # (after an error in writing, the next would fail too)
                        ok = keep(f, futures[f])
                        finished += ok
                        failed += not ok
                except KeyboardInterrupt:  # a second interrupt: what is written is kept
                    pass
                c.cancel(ready)
                try:
                    summary = _finish(store, scan_list, run_info, out, t0, finished, failed, skipped, stale, True,
                                      workers, error=error)
                except Exception as finish_error:  # noqa: BLE001 - e.g. the same full disk: the first error is told
                    if error is None:
                        raise
                    log.warning("could not rewrite the tables and run.json after the error: %s", finish_error)
                    say(f"stopped by an error: {len(written) + skipped} scans are kept in {out / 'scans'}; when its "
                        "cause is fixed, rerun with --resume to finish (it rewrites the tables)")
                    raise e from None
                if settings.report:
                    try:  # the finished scans' page, marked as such
                        summary.report = _report(store, scan_list, settings, out)
                    except KeyboardInterrupt:  # a second interrupt leaves it out
                        pass
                    except Exception as report_error:  # noqa: BLE001 - the interrupt is what the run reports
                        log.warning("could not write the stopped run's report.html: %s", report_error)
                say(f"{'interrupted' if error is None else 'stopped by an error'}: "
                    f"{summary.finished + summary.skipped} scans kept in {out}"
                    f"{' (report.html shows them)' if summary.report else ''}; "
                    f"{'' if error is None else 'when its cause is fixed, '}rerun with --resume to finish")
                if isinstance(e, Cancelled):  # told with the scans kept meanwhile (it said "after 3" beside 4 kept)
                    e.args = (f"cancelled after {finished + failed} of {len(todo)} scans",)
                    e.partial = summary
                raise
            finally:
                bar.close()
            ending.enter_context(shield)
        summary = _finish(store, scan_list, run_info, out, t0, finished, failed, skipped, stale, False, workers)
    try:
        if shield.requested is not None and settings.report:  # (without a page, the run is complete: it ends so)
            shield.stop()
        if settings.report:
            t_report = time.time()
            summary.report = _report(store, scan_list, settings, out)
            run_info["phases_s"]["report"] = time.time() - t_report
            store.write_run(run_info)
    except KeyboardInterrupt:  # (SIGTERM too): every scan is done and in the tables
        if summary.report is None:  # the page is not written
            run_info.update(status="interrupted", note="stopped before report.html was written; every scan is done "
                            "(matches.csv, failures.csv); rerun with --resume to write the page")
            say(f"interrupted: every scan is done ({out / 'matches.csv'}), report.html was not written; rerun with "
                "--resume to write it")
        store.write_run(run_info)
        raise
    say(f"{_count(summary.finished, 'scan')} matched, {summary.failed} failed, {summary.skipped} skipped (finished "
        f"before) in {summary.elapsed_s:.0f} s; results in {out}"
        + (f"; the failures and why: {out / 'failures.csv'}" if summary.failed else ""))
    failures = [(s.id, store.records[s.id].get("reason", "")) for s in scan_list
                if store.records.get(s.id, {}).get("status") == "failed"]
    for sid, reason in failures[:3]:  # the first reasons here too, not only in the file
        say(f"  failed: {sid}: {reason}")
    if len(failures) > 3:
        say(f"  ... and {len(failures) - 3} more in failures.csv")
    return summary


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _report(store: ResultStore, scans: list[Scan], settings: PropagateSettings, out: Path) -> Path:
    """``report.html`` of this run's scans' records (a folder may hold other scans', or records made with other
    settings)."""
    from .report import write_report

    return write_report(out, settings.report_thumbnails,
                        records={s.id: store.records[s.id] for s in scans if s.id in store.records})


def _record_of(store: ResultStore, scan: Scan) -> dict:
    """The record of ``scan`` as written (:meth:`ResultStore.add`)."""
    return store.records[scan.id]


def _finish(store: ResultStore, scans: list[Scan], run_info: dict, out: Path, t0: float, finished: int, failed: int,
            skipped: int, stale: int, interrupted: bool, workers: int,
            error: BaseException | None = None) -> PropagateSummary:
    """Write the tables and ``run.json``; the summary, with the mean per-scan times of this run's scans. A run
    stopped by ``error`` (a full disk, say) is recorded as ``failed``, with the error."""
    store.write_tables(scans)
    elapsed = time.time() - t0
    keys = ("read_s", "embed_s", "match_s", "thumbnails_s", "total_s")
    recent = [r for r in store.records.values() if r.get("status") == "ok" and r.get("finished", "") >= run_info["started"]]
    timings = {k: sum(r["timings"].get(k, 0.0) for r in recent) / len(recent) for k in keys} if recent else {}
    n_failed = sum(1 for s in scans if store.records.get(s.id, {}).get("status") == "failed")
    if error is not None:
        run_info["error"] = f"{type(error).__name__}: {error}"
    run_info.update(status="failed" if error is not None else "interrupted" if interrupted else "finished",
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    elapsed_s=elapsed, matched_this_run=finished, failed_this_run=failed,
                    done=sum(1 for s in scans if store.records.get(s.id, {}).get("status") == "ok"), failed=n_failed,
                    mean_scan_timings_s=timings)
    store.write_run(run_info)
    return PropagateSummary(out, len(scans), finished, failed, skipped, stale, elapsed, interrupted, None, workers, timings)


def _client_versions() -> dict:
    import platform

    from .. import __version__

    out = {"samembed": __version__, "python": platform.python_version()}
    try:
        import dask
        import distributed

        out.update(dask=dask.__version__, distributed=distributed.__version__)
    except ImportError:
        pass
    return out
