"""The ``samembed`` command line: ``match``, ``embed``, ``info``, ``train``, ``propagate``, ``web``; ``evaluate`` and
``make-suites`` when the benchmark package ``samembed_bench`` is installed (``pip install -e benchmarks``; else they
say so and exit 2).

Exit codes: 0 success, 2 bad input (message names the file and the problem), 1 internal error, 3 when some
inputs failed and the others were done (``match`` and ``embed``: the images named; ``propagate``: the scans listed in
failures.csv), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM
(``kill``, ``timeout``, a batch system's limit); both keep what was finished (:mod:`samembed.stopping`).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .errors import EXIT_SOME_FAILED, DeviceUnavailableError, InputError, SamEmbedError, TargetError, of_the_target
from .options import MODALITIES, PRECISIONS
from .progress import PhaseProgress
from .stopping import Terminated, stop_on_sigterm
from .torch_import import after_torch_import, before_torch_import, meta_kernels_skipped

log = logging.getLogger("samembed")


def _make_matcher(args):
    from .api import Matcher

    device = args.device
    if device == "auto":
        import torch

        if not torch.cuda.is_available():
            log.info("no CUDA device: running on the CPU")
    # one command matches each target once: 1 GB of embeddings in memory (the source and the current target always
    # stay) keeps a long target list within the memory of a single pair
    return Matcher(model=args.model, device=device, cache_dir=getattr(args, "cache_dir", None), cache_bytes=1 << 30,
                   modality=getattr(args, "modality", "auto"), spacing_mm=getattr(args, "spacing", None),
                   precision=getattr(args, "precision", "auto"))


#: ``samembed match`` flags -> :class:`~samembed.options.MatchOptions` fields (the help and the default of each
#: come from the dataclass, so every option is reachable and each default is declared once)
_OPTION_FLAGS: dict[str, tuple[str, dict]] = {
    "prior_window_mm": ("--prior-window", {"type": float, "metavar": "MM"}),
    "global_window_mm": ("--global-window", {"type": float, "metavar": "MM"}),
    "search_body": ("--body-mask", {"action": argparse.BooleanOptionalAction}),
    "box_lps_mm": ("--box", {"type": float, "nargs": 6, "metavar": ("X0", "Y0", "Z0", "X1", "Y1", "Z1")}),
    "refine": ("--refine", {"action": argparse.BooleanOptionalAction}),
    "refine_window_mm": ("--refine-window", {"type": float, "metavar": "MM"}),
    "consistency": ("--consistency", {"action": argparse.BooleanOptionalAction}),
    "consistency_inlier_mm": ("--consistency-inlier", {"type": float, "metavar": "MM"}),
    "consistency_window_mm": ("--consistency-window", {"type": float, "metavar": "MM"}),
    "polish": ("--polish", {"action": argparse.BooleanOptionalAction}),
    "polish_min_ncc": ("--polish-min-ncc", {"type": float, "metavar": "NCC"}),
    "polish_levels": ("--polish-levels", {"type": lambda text: _parse_levels(text), "metavar": "S,T,W;..."}),
    "roundtrip_tolerance_mm": ("--roundtrip-tolerance", {"type": float, "metavar": "MM"}),
}


def _parse_levels(text: str) -> tuple:
    """``"2,16,8;1,10,2"`` -> ((2, 16, 8), (1, 10, 2))."""
    try:
        return tuple(tuple(float(v) for v in level.split(",")) for level in text.split(";") if level.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give levels as step,template,search;... in mm") from None


def _positive_mm(text: str) -> float:
    """A finite length > 0, in mm (argparse type: a bad value is refused naming the flag)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a length in mm greater than 0, e.g. 0.1")
    return value


def at_least_one(text: str) -> int:
    """An integer >= 1 (argparse type; the benchmark commands' too)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def _jobs_value(text: str) -> str | int:
    """A ``--jobs`` value (argparse type): ``auto`` or a whole number of targets >= 1."""
    if text == "auto":
        return text
    try:
        return at_least_one(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1, or auto") from None


def _jobs(args, n_targets: int, matcher) -> int:
    """The targets the command matches at once (``--jobs``; :func:`samembed.jobs.auto_jobs` for auto)."""
    import torch

    from .jobs import auto_jobs

    jobs = getattr(args, "jobs", "auto")
    if jobs == "auto":
        heatmaps = bool(getattr(args, "heatmap_dir", None))
        return auto_jobs(n_targets, torch.get_num_threads(), matcher.device.type, heatmaps)
    return int(jobs)


class _Turns:
    """The command's progress over its targets when several are matched at once (``--jobs``): the bar stands at the
    targets finished plus the parts done of those in flight, so it never moves back, and names the phase of the
    target that last reported. ``lock`` also guards the command's lists of finished and skipped targets."""

    def __init__(self, bar: PhaseProgress, n_targets: int) -> None:
        self.bar, self.n = bar, n_targets
        self.lock = threading.RLock()
        self.unfinished = list(range(n_targets))  # target indices not matched nor skipped yet, in order
        self._parts: dict[int, float] = {}  # target index -> its part done (0..1), while in flight

    def update(self, ti: int, part: float, phase: str) -> None:
        with self.lock:
            self._parts[ti] = max(self._parts.get(ti, 0.0), float(part))
            self.bar.update(self.n - len(self.unfinished) + sum(self._parts.values()), self.n, phase)

    def finished(self, ti: int) -> None:
        """Target ``ti`` is matched or skipped."""
        with self.lock:
            self._parts.pop(ti, None)
            self.unfinished.remove(ti)


def _add_match_options(p: argparse.ArgumentParser, preset_help: str = "same-patient") -> None:
    """The search flags (one per :class:`~samembed.options.MatchOptions` field) and ``--preset``, whose default
    for this command ``preset_help`` describes."""
    from .options import PRESETS, MatchOptions

    g = p.add_argument_group("search options (see samembed.MatchOptions)")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="starting point of the options below, which change it: same-patient (the defaults listed "
                        "below) or between-patients (--refine --no-polish: OpenKBP organs between patients 8.9 "
                        "instead of 11.2 mm on compact organs, benchmarks/results/landmarks_v3_idle.md) (default: "
                        f"{preset_help})")
    for name, (flag, kw) in _OPTION_FLAGS.items():
        g.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=MatchOptions.help(name, command_line=True), **kw)


def match_options_from_args(args, default_preset: str = "same-patient", **extra):
    """The :class:`~samembed.options.MatchOptions` of parsed ``match`` flags: the ``--preset`` (else
    ``default_preset``) changed by the flags given (unset flags keep the preset's values)."""
    from .options import MatchOptions

    values = {name: getattr(args, name) for name in _OPTION_FLAGS if hasattr(args, name)}
    values.update(extra)
    try:
        return MatchOptions.preset(getattr(args, "preset", None) or default_preset).replace(**values)
    except InputError as e:  # name the flag the user typed
        name = str(e).split(" ", 1)[0]
        raise InputError(f"{_OPTION_FLAGS[name][0]}: {e}" if name in _OPTION_FLAGS else str(e)) from None


def _atlas_pairs(args) -> list[tuple[str, str]]:
    """(image, points) of every ``--atlas IMAGE POINTS`` and every row of ``--atlases MANIFEST.csv``."""
    import csv

    pairs = [tuple(a) for a in (args.atlas or [])]
    if args.atlases:
        manifest = Path(args.atlases)
        if not manifest.is_file():
            raise InputError(f"{manifest}: atlas manifest not found")
        try:
            text = manifest.read_text(encoding="utf-8-sig")  # a byte-order mark (spreadsheets' "CSV UTF-8") skipped
        except UnicodeDecodeError as e:
            raise InputError(f"{manifest}: not UTF-8 text ({e.reason}); save the manifest as CSV UTF-8") from None
        from .io import row_delimiter

        lines = text.splitlines()
        delimiter = row_delimiter(lines[0] if lines else "",
                                  lambda fields, _: {"image", "points"} <= {k.strip().lower() for k in fields})
        if delimiter is None:
            raise InputError(f"{manifest}: an atlas manifest is a CSV whose header names the columns image,points")
        rows = list(csv.DictReader(lines, delimiter=delimiter))
        if not rows:
            raise InputError(f"{manifest}: the manifest names no atlas (a header and no rows); add a row image,points "
                             "per atlas")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k is not None} for r in rows]
        base = manifest.parent
        pairs += [(str(base / r["image"]), str(base / r["points"])) for r in rows]
    return pairs


def match_command_options(args):
    """The options of ``samembed match``: with ``--atlas``/``--atlases`` the between-patients preset (atlases are
    other people's annotated scans), else the same-patient one, then ``--preset`` and the flags given."""
    default = "between-patients" if args.atlas or args.atlases else "same-patient"
    return match_options_from_args(args, default, heatmap=bool(args.heatmap_dir))


def _cmd_match(args) -> int:
    options = match_command_options(args)  # bad options: before any file is made
    pairs = _atlas_pairs(args)
    if pairs and args.points:
        raise InputError("--points belongs to a single source image; with --atlas each atlas names its own points")
    if not pairs and (len(args.images) < 2 or not args.points):
        missing = ("no image given" if not args.images else
                   f"only one image ({args.images[0]}): the source; add the target(s) after it" if len(args.images) < 2
                   else "no --points FILE: the source's points to match")
        raise InputError(f"{missing}. Give SOURCE TARGET... --points FILE, or --atlas IMAGE POINTS [--atlas ...] "
                         "TARGET...")
    if args.heatmap_grid != "image" and not args.heatmap_dir:
        raise InputError(f"--heatmap-grid {args.heatmap_grid} says how to write heatmaps; give --heatmap-dir DIR too "
                         "(where they go)")
    if args.cache_dir:  # (a read-only one is read)
        from .io import check_is_folder

        check_is_folder("--cache-dir", Path(args.cache_dir))
    target_paths = args.images if pairs else args.images[1:]
    prefetch = _start_prefetch(args, [pairs[0][0], *target_paths] if pairs else args.images)
    try:
        return _match(args, options, pairs, target_paths, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()


def _start_prefetch(args, paths: list[str]):
    """Read and preprocess the images in a second process while torch loads (:mod:`samembed.prefetch`):
    for a registered model or a checkpoint of ``samembed train`` on the CPU, before anything imports torch."""
    from . import prefetch
    from .registry import registered_local_stride_zyx, registered_pad_multiple_zyx, registered_preprocess

    if args.device == "cuda":
        return None
    return prefetch.start(paths, registered_preprocess(args.model), getattr(args, "modality", "auto"),
                          getattr(args, "spacing", None), registered_pad_multiple_zyx(args.model),
                          registered_local_stride_zyx(args.model))


def _match(args, options, pairs, target_paths, prefetch) -> int:
    from .io import check_point_dims, check_points_inside, markups_suffix, read_points, warn_unknown_spacing
    from .names import atlas_names, repeated_labels, target_ids

    t0 = getattr(args, "started_s", None) or time.perf_counter()  # the command's start: torch's import counts
    n = len(target_paths)
    out = Path(args.out)
    folder_out = out.is_dir() or str(args.out).endswith(("/", "\\"))
    ids = target_ids(target_paths)
    # with several atlases: each atlas's name in the outputs (which were rejected), by its file name, or its path
    # where two share a name (atlases one per folder), and its point file's too where one image is an atlas twice
    # (names.atlas_names); keyed by the atlas's name in messages (its image's path, and its point file's where the
    # image repeats); empty: no fusion
    atlas_images = [image for image, _ in pairs]
    atlas_keys = [image if atlas_images.count(image) == 1 else f"{image} ({points})" for image, points in pairs]
    fused = dict(zip(atlas_keys, atlas_names(atlas_images, [p for _, p in pairs]))) if len(pairs) > 1 else {}
    # what can be wrong with the inputs and outputs is found before torch loads (1-2 s)
    suffix = markups_suffix(out)
    if not folder_out and suffix and n != 1:
        raise InputError(f"--out {out}: a {suffix} file holds the points of one target, and there "
                         f"are {n}; give a folder (--out {out.parent / 'matches'}/) for one .mrk.json per target, or "
                         "a .csv file for all of them")
    if len(pairs) > 1 and args.heatmap_dir:  # (the engine refuses it too, but only once torch has loaded)
        raise InputError(f"--heatmap-dir {args.heatmap_dir}: heatmaps are not available when {len(pairs)} atlases are "
                         "fused (a heatmap belongs to one atlas's point); match one atlas for them, or leave out "
                         "--heatmap-dir")
    if pairs:
        atlas_points = [read_points(pts_file, ras=args.ras) for _, pts_file in pairs]
        labels = list(atlas_points[0].labels)
    else:
        points = read_points(args.points, ras=args.ras)
        labels = list(points.labels)
        repeated = sorted(lab for lab in repeated_labels(labels) if lab)
        if repeated or "" in labels:  # (the atlases' and the heatmaps' labels are refused when they repeat)
            log.warning("%s: %s; the outputs tell such points apart by their order only: give each point a label "
                        "of its own", args.points, "; ".join(
                            ([f"labels repeat ({', '.join(repeated)})"] if repeated else [])
                            + ([f"{labels.count('')} point(s) have no label"] if "" in labels else [])))
    _require_images([*([image for image, _ in pairs] or args.images[:1]), *target_paths])  # atlases or the source
    if len(pairs) > 1 and args.figure_dir:
        raise InputError(f"--figure-dir {args.figure_dir}: a figure shows one source point beside its match, and "
                         f"{len(pairs)} atlases are fused; match one atlas for them, or leave out --figure-dir")
    for flag, folder in (("--heatmap-dir", args.heatmap_dir), ("--figure-dir", args.figure_dir)):
        if folder:  # (one file per label; the heatmaps' refused by the engine too)
            _refuse_repeated_labels(labels, pairs[0][1] if pairs else args.points, flag)
    heatmaps = _heatmap_names(ids, labels) if args.heatmap_dir else {}
    figures = _figure_names(ids, labels) if args.figure_dir else {}
    # a run that stops partway writes what it finished beside an earlier run's complete file, not over it
    partial_out = _partial_name(out) if not folder_out and out.is_file() else out
    _refuse_overwriting_inputs(args, pairs, target_paths,
                               [*([out / f"{i}.mrk.json" for i in ids] if folder_out else dict.fromkeys([out, partial_out])),
                                *(Path(args.heatmap_dir) / name for name in heatmaps.values()),
                                *(Path(args.figure_dir) / name for name in figures.values())])
    _prepare_outputs(args, out, folder_out)
    earlier_heatmaps = _note_heatmap_folder(args.heatmap_dir, heatmaps, labels) if args.heatmap_dir else set()
    bar = PhaseProgress(n, "loading torch" if "torch" not in sys.modules else "reading", not args.quiet, started_s=t0)
    try:
        from .api import Atlas, as_image  # torch
        from .jobs import cache_floor, each_target
    except BaseException:  # an interrupt while torch loads: the bar goes before the message
        bar.close()
        raise
    finally:  # torch's meta kernels' placeholder away, and torch's objects out of the collector's scans; not the
        after_torch_import()  # engine's, made next: its maps and embedder form cycles a collection must still free
    log.debug("torch loaded%s", " without its Python meta kernels" if meta_kernels_skipped() else "")

    images_read: dict[str, object] = {}  # a file named twice (a scan matched to itself) is read once
    # why a file could not be read: the first target, read early, is reported at its turn without being read again
    # (each read of a damaged file inflated it again and printed the library's own message again; a review)
    unreadable: dict[str, BaseException] = {}

    def read(path: str):  # the image the prefetch read, else the file
        key = str(path)
        if key in unreadable:
            raise unreadable[key]
        if key not in images_read:
            image = None if prefetch is None else prefetch.image(path)
            try:
                # (a picture without its pixel spacing is warned of when it is used, not for a target that is
                # skipped)
                images_read[key] = as_image(path if image is None else image, spacing_mm=args.spacing,
                                            warn_spacing=False)
            except (InputError, PermissionError) as e:
                unreadable[key] = e
                raise
        return images_read[key]

    def read_target(path: str):  # what keeps a target from being read is its own problem, skipped among several
        try:
            with of_the_target():
                return read(path)
        except PermissionError as e:  # (one target alone: the system's refusal, exit 1, as for any other file)
            if n == 1:
                raise
            raise _refused(e, path) from e

    bar.phase("reading")
    done: list = []  # each finished target's MatchResult whose files are written, in order
    done_at: list[int] = []  # the place of each of them among the targets (a skipped one leaves a gap)
    drawn: dict[int, int] = {}  # the figures drawn of each target (--figure-dir), by its place
    failed: list[tuple[int, str, TargetError]] = []  # targets that could not be read or matched, skipped (in order)
    hint_given: list[int] = []  # the target whose heatmaps were written first (its size hints at the others')
    mapped: dict[int, int] = {}  # the heatmaps written of each target as it finished (several targets), by its place

    def heatmaps_done() -> dict[tuple[int, str], str]:  # the heatmap names by place in `done`
        return {(k, label): heatmaps[(ti, label)] for k, ti in enumerate(done_at) for label in dict.fromkeys(labels)
                if (ti, label) in heatmaps}
    written = writing = False
    wrote: set[str] = set()  # what the final writing has finished ("csv")
    try:
        # the first target, then the source: the prefetch process reads both at once (the later targets after
        # them), and an image it has not started is read here meanwhile (samembed.prefetch._Claims). Each later
        # target is read when its turn comes: the prefetch process reads and preprocesses it meanwhile, on the
        # second core, while the targets before it are matched (PrefetchRequest.in_turn; LIDC-0001 into its three
        # warps: 6.6 -> 6.1-6.2 s, 1.53 -> 1.42 GB). A target that cannot be read or matched is named and skipped
        # at its turn, and the others go on (below).
        try:
            read(target_paths[0])
        except (InputError, PermissionError):
            if n == 1:
                raise  # (else reported at its turn, below)
        if pairs:
            atlases = [Atlas(read(image), pl.points_lps_mm, tuple(pl.labels), key)
                       for (image, _), pl, key in zip(pairs, atlas_points, atlas_keys)]
            for a, (_, pts_file), pl in zip(atlases, pairs, atlas_points):
                warn_unknown_spacing(a.image)
                check_point_dims(pl, pts_file, a.image.ndim, a.display_name)
                check_points_inside(pl, pts_file, a.image, args.ras)
        else:
            source = read(args.images[0])
            warn_unknown_spacing(source)
            check_point_dims(points, args.points, source.ndim, args.images[0])
            check_points_inside(points, args.points, source, args.ras)
        # the content of what every target is matched from (the source, or the atlases): never forgotten (below)
        kept = {images_read[str(p)].content_hash() for p in ([image for image, _ in pairs] or args.images[:1])}
        bar.phase("loading the model")
        matcher = _make_matcher(args)
        matcher.embedder.prefetch = prefetch
        source_shown: list[int] = []  # the turn that showed the source's embedding (progress, below)
        jobs = _jobs(args, n, matcher)
        turns = _Turns(bar, n)
        cancel = threading.Event()  # set when the run stops: targets in flight (--jobs) stop at their next tile
        names = list(map(str, target_paths))

        def one_target(ti: int) -> bool:
            # one target per call (the source's maps and the atlases stay cached; with --jobs, several calls at once):
            # each finished target's markups file is written at once, and a failure or an interrupt keeps the
            # targets finished before it. True when matched, False when skipped.
            name = names[ti]

            def progress(d: float, total: float, phase: str, ti: int = ti) -> None:
                # the source's embedding is shown once, in the first turn that reaches the matcher (a first target
                # skipped before it does not hide it); later turns' "embedding source" finds it cached
                if phase.startswith("embedding source"):
                    if source_shown:
                        return
                    source_shown.append(ti)
                turns.update(ti, d / max(total, 1), re.sub(r"\b1/1\b", f"{ti + 1}/{n}", phase))

            try:
                one = [read_target(name)]
                if pairs:
                    r = matcher.match_atlases(atlases, one, options, mask=args.mask, progress=progress,
                                              cancel=cancel, target_names=[name])
                else:
                    r = matcher.match(source, points.points_lps_mm, one, points.labels, options, mask=args.mask,
                                      progress=progress, cancel=cancel, target_names=[name])
                warn_unknown_spacing(one[0])  # once matched (a target skipped below, e.g. of another dimension: not)
                if figures:  # drawn now, while the target is read: a run that stops keeps the finished targets'
                    drawn[ti] = _draw_figures(args, r, atlases[0].image if pairs else source,
                                              atlas_points[0] if pairs else points, one[0],
                                              {lab: figures[(ti, lab)] for lab in dict.fromkeys(labels)})
            except TargetError as e:  # this target's own problem (unreadable, too small, another dimension, ...)
                if n == 1:
                    raise
                # named now and at the end, and the other targets go on: one bad scan of a long list does not
                # stop the rest (an interrupt or an internal error still stops the run; what is done is kept)
                log.error("target %d/%d skipped (the other targets go on): %s", ti + 1, n, e)
                with turns.lock:
                    bisect.insort(failed, (ti, name, e), key=lambda f: f[0])
                    turns.finished(ti)
                    _forget_target(matcher, images_read, name, [names[i] for i in turns.unfinished], kept, prefetch)
                return False
            finally:
                one = None
            if folder_out:
                _write_markups(args, r, out / f"{ids[ti]}.mrk.json", fused)
            if heatmaps and n > 1:  # written now, not held to the end: each target's take as much as 70 MB on the
                # model's grid (one alone is written at the end, once the engine's memory is freed)
                turns.update(ti, 1.0, f"writing heatmaps {ti + 1}/{n}")
                with turns.lock:
                    first = not hint_given
                    hint_given.append(ti)
                mapped[ti] = _write_heatmaps(args, [r], {(0, lab): heatmaps[(ti, lab)] for lab in dict.fromkeys(labels)
                                                         if (ti, lab) in heatmaps}, of_targets=n if first else 0)
            with turns.lock:  # in the targets' order, whichever finished first
                k = bisect.bisect(done_at, ti)
                done_at.insert(k, ti)  # (first: an interrupt between the two leaves no result without its place)
                done.insert(k, r)  # kept from here on, whatever stops the run (the memory is freed after)
                turns.finished(ti)
                # (a target whose file comes again, later or in flight, keeps its image and maps)
                _forget_target(matcher, images_read, name, [names[i] for i in turns.unfinished], kept, prefetch)
            return True

        with cache_floor(matcher.cache, len(kept), jobs):  # the source (or atlases) and the targets in flight
            each_target(n, one_target, jobs, cancel)
        if not done and failed:  # (several targets, none matched: each is named above)
            raise InputError(f"none of the {n} targets could be matched: each is named above") from failed[0][2]
        # writing needs none of the engine's embeddings, images and prefetched arrays: freed before the heatmaps,
        # each as large as its target, are made (LIDC-0001 with 50 heatmaps: 2.72 -> 1.76 GB peak)
        matcher = source = atlases = None
        images_read.clear()
        bar.phase("writing")
        writing = True
        try:
            mapped[-1] = _write_match_outputs(args, done, out, folder_out, heatmaps_done(), fused, prefetch, wrote)
        except OSError as e:
            if (folder_out or "csv" in wrote or partial_out == out or not e.filename2
                    or os.path.realpath(e.filename2) != os.path.realpath(out)):
                raise  # (not the move into place of an earlier run's --out: a full disk, ...)
            # the table could not replace an earlier run's --out (a read-only or immutable file, ...): the matches go
            # beside it, as an interrupted run's would, instead of being lost
            try:
                _write_match_outputs(args, done, partial_out, folder_out, heatmaps_done(), fused, prefetch)
            except OSError as again:
                log.error("could not write the matches beside it either: %s", again)
                raise e from None
            written = True
            raise OSError(e.errno, f"{e.strerror or e}; the matches are in {partial_out} (the earlier {out} is left "
                                   "as it was): check that file's permissions, or choose another --out",
                          str(out)) from e
        written = True
        log.debug("torch's Python meta kernels: %s", "never loaded" if meta_kernels_skipped() else "loaded")
        stale = None if folder_out else _partial_name(out)
        if stale is not None and stale.is_file():  # kept: it may hold targets this run did not have
            log.info("%s, left by an earlier run that stopped, is still there; this run's matches are in %s", stale,
                     out)
    finally:
        if not written and done and not writing:  # failed or interrupted while matching: what was finished is kept
            matcher = source = atlases = None
            images_read.clear()
            with turns.lock:  # the results and their heatmaps' names from one moment (each_target waited for every
                kept, kept_heatmaps = list(done), heatmaps_done()  # target in flight: nothing comes after this)
            try:
                _write_match_outputs(args, kept, partial_out, folder_out, kept_heatmaps, fused, prefetch)
                replaced = len(earlier_heatmaps & set(kept_heatmaps.values()))
                log.error("kept the matches of the %d of %d targets finished before this stopped, in %s%s%s%s%s",
                          len(kept), n, partial_out, f" and {args.heatmap_dir}" if args.heatmap_dir else "",
                          f" ({out}, of an earlier run, is left as it was)" if partial_out != out else "",
                          f"; the heatmaps written replaced {replaced} of an earlier run's of the same names"
                          if replaced else "",
                          f"; {len(failed)} skipped before: {', '.join(name for _, name, _ in failed)}" if failed else "")
            except BaseException as e:  # noqa: BLE001 - the original error is the one to report (a second Ctrl-C too)
                log.error("could not write all of the %d finished targets to %s%s: %s", len(kept), partial_out,
                          f" and {args.heatmap_dir}" if args.heatmap_dir else "",
                          "interrupted" if isinstance(e, KeyboardInterrupt) else str(e) or type(e).__name__)
        elif not written and writing:  # stopped while writing: the heatmaps are not started again (an interrupt
            kept = folder_out or "csv" in wrote  # means stop), but a table not written yet is, at once (milliseconds)
            table = out
            if not kept and done and isinstance(sys.exc_info()[1], KeyboardInterrupt):  # (Ctrl-C, SIGTERM; not a
                # full disk, where the table beside it would fail as well)
                try:
                    _write_table(args, done, partial_out, fused)
                    kept, table = True, partial_out
                except BaseException as e:  # noqa: BLE001 - the original error is the one to report
                    log.error("could not write the matches to %s: %s", partial_out,
                              "interrupted" if isinstance(e, KeyboardInterrupt) else str(e) or type(e).__name__)
            log.error("stopped while writing: %s", "the matches were not written" if not kept else
                      f"the matches are in {table}" + ("; not every heatmap was written" if args.heatmap_dir else ""))
        bar.close()
    if not args.quiet:
        for r in done:
            for m, row in zip(r.matches, r.rows(ras=args.ras)):
                frame = "RAS" if args.ras else "LPS"
                # a fused match is confident when its atlases agree: said with how many, not with a round trip
                # (a landmark that one atlas carries: "1 of 1", never confident under fusion's "two at least")
                why = (f"{m.agreeing} of {m.atlases} atlases agree, spread {m.spread_mm:.1f} mm" if pairs
                       else f"round trip {row['roundtrip_mm']:.1f} mm")
                print(f"{Path(row['target']).name}\t{row['label']}\t({row['x']:.1f}, {row['y']:.1f}, {row['z']:.1f}) "
                      f"mm {frame}\tscore {row['score']:.3f}\t{'confident' if row['confident'] else 'NOT confident'} "
                      f"({why})")
        print(f"wrote {out}{_written_summary(args, done, sum(drawn.values()), sum(mapped.values()))} in {time.perf_counter() - t0:.1f} s")
    if failed:
        log.error("%d of %d targets could not be matched (each is named above): %s; %s holds the others", len(failed),
                  n, ", ".join(name for _, name, _ in failed), out)
        return EXIT_SOME_FAILED
    return 0


def _forget_target(matcher, images_read: dict, name: str, later: Sequence, kept: set[str], prefetch) -> None:
    """Drop target ``name``'s image, maps and prefetched input once it is not among the ``later`` targets: memory
    stays bounded over many targets (one atlas into 100 OpenKBP CTs: peak RSS 4.28 -> 2.10 GB, 0.61 -> 0.58 s per
    target, the same matches). The maps and input stay when the image holds what the source or an atlas holds
    (content hashes ``kept``: their maps, whose input a later search may still take)."""
    if name in map(str, later):
        return
    image = images_read.pop(name, None)  # (none: it could not be read)
    if image is not None and image.content_hash() not in kept:
        matcher.forget(image)
        if prefetch is not None:
            prefetch.discard(image.content_hash())


def _write_table(args, done: list, out: Path, fused: dict[str, str] | None) -> None:
    """The matches of the finished targets ``done`` in the file ``out``: a CSV of every row, or one target's
    markups (``.mrk.json``, ``.fcsv``, ...)."""
    from .io import (
        DISTANCE_DECIMALS,
        POSITION_DECIMALS,
        SCORE_DECIMALS,
        csv_number,
        csv_text,
        markups_suffix,
        write_text_atomic,
    )

    if markups_suffix(out):  # one target's markups (_match refuses several)
        _write_markups(args, done[0], out, fused)
        return
    # the frame of x, y, z in every row, last (scripts that index the columns keep theirs): the file read back as
    # points (samembed.io.read_points) takes it, and refuses a --ras that contradicts it
    frame = "RAS" if args.ras else "LPS"
    rows = [["target", "label", "x", "y", "z", "score", "confident", "roundtrip_mm"]
            + (["atlases", "agreeing", "spread_mm", "rejected"] if fused else []) + ["frame"]]
    for res in done:
        for r, m in zip(res.rows(ras=args.ras), res.matches):
            rows.append([str(r["target"]), r["label"], *(csv_number(r[k], POSITION_DECIMALS) for k in "xyz"),
                         csv_number(r["score"], SCORE_DECIMALS), str(r["confident"]).lower(),
                         csv_number(r["roundtrip_mm"], DISTANCE_DECIMALS)]
                        + ([str(m.atlases), str(m.agreeing), csv_number(m.spread_mm, DISTANCE_DECIMALS),
                            _rejected(m, fused)] if fused else []) + [frame])
    write_text_atomic(out, csv_text(rows))


def _note_heatmap_folder(folder: str, heatmaps: dict[tuple[int, str], str], labels: list[str]) -> set[str]:
    """Before any work, say what the heatmap ``folder`` holds that this run will not write (an earlier run's
    heatmaps of other points or targets would lie beside this run's without a word: a review), and which labels are
    numbered to keep their files apart (``a/b`` and ``a_b`` would both be ``a_b``); returns the names of this run's
    heatmaps that are there already (an earlier run's, which this run replaces)."""
    from .names import label_ids

    ours = set(heatmaps.values())
    try:
        there = {p.name for p in Path(folder).iterdir() if p.name.endswith("_heatmap.nii.gz")}
    except OSError:  # (not made yet)
        there = set()
    others = sorted(there - ours)
    if others:
        log.warning("%s holds %d heatmap(s) that this run does not write (of an earlier run's points or targets, "
                    "e.g. %s); they stay beside this run's: remove them, or give another --heatmap-dir",
                    folder, len(others), others[0])
    safe = label_ids(labels)
    shared = [f"{label!r} as {safe[label]!r}" for label in dict.fromkeys(labels)
              if safe[label] != label_ids([label])[label]]  # (made unique: its plain name is another label's)
    if shared:
        log.warning("labels that would share a heatmap file name are told apart by a number: %s", ", ".join(shared))
    return there & ours


def _partial_name(out: Path) -> Path:
    """Where a stopped run writes what it finished when ``out`` holds an earlier run's results:
    ``matches.csv`` -> ``matches.partial.csv``, ``pt.mrk.json`` -> ``pt.partial.mrk.json``."""
    name = out.name
    for suffix in (".mrk.json", *([out.suffix] if out.suffix else [])):
        if name.lower().endswith(suffix):
            return out.with_name(f"{name[: -len(suffix)]}.partial{name[-len(suffix):]}")
    return out.with_name(f"{name}.partial")


def _require_images(paths: list[str]) -> None:
    """Raise :class:`InputError` for an image path that does not exist (before torch loads; a file that exists but
    is no image is found when it is read)."""
    for path in paths:
        if not Path(path).exists():
            from .io import did_you_mean  # (only then: the cold path imports nothing more before torch)

            raise InputError(f"{path}: file not found{did_you_mean(path)}")


def _refused(e: PermissionError, path: str) -> TargetError:
    """A read of ``path`` that the system refused, as that one input's own problem (named by its file), which a
    command over several inputs skips."""
    return TargetError(f"{e.filename}: {e.strerror}" if e.filename else f"{path}: {e}")


def _prepare_outputs(args, out: Path, folder_out: bool) -> None:
    """Make the output folders (``--out FOLDER/``, ``--heatmap-dir``) and check that every output can be written,
    before anything is computed; :class:`InputError` names the flag, the path and the problem."""
    from .io import check_writable, markups_suffix, output_folder

    folders = [(flag, Path(folder)) for flag, folder in (("--heatmap-dir", args.heatmap_dir),
                                                         ("--figure-dir", args.figure_dir)) if folder]
    if folder_out:
        folders.insert(0, ("--out", out))
    else:
        if args.heatmap_dir and Path(os.path.abspath(out)) == Path(os.path.abspath(args.heatmap_dir)):
            raise InputError(f"--out {out} is also the --heatmap-dir folder; give --out a file name in it, e.g. "
                             f"{Path(out) / 'matches.csv'}")
        if not markups_suffix(out) and not out.name.lower().endswith(".csv"):
            # any other name got CSV text: an image given by mistake (--out scan.nii.gz) was replaced by a table
            raise InputError(f"--out {out}: the matches are written as a .csv table, a .mrk.json, .json or .fcsv "
                             f"point file, or into a folder (ending in /); give such a name, e.g. "
                             f"{out.with_name(out.name.split('.')[0] + '.csv')} (nothing was written)")
    # --out may name a file in the --heatmap-dir (or --figure-dir) this run makes: checked once that folder is made,
    # else first (a refused --out leaves no new folder behind)
    in_made = any(Path(os.path.abspath(folder)) in Path(os.path.abspath(out)).parents for flag, folder in folders
                  if flag != "--out")
    if not folder_out and not in_made:
        check_writable(out)  # (a link: where it points, as it is written)
    for flag, folder in folders:
        output_folder(flag, folder)
    if not folder_out and in_made:
        check_writable(out)


#: heatmaps on the targets' voxels above this many bytes of float32 (to make, round and compress) get a hint
HEATMAP_HINT_BYTES = 1 << 30


def heatmap_grid_hint(n_maps: int, image_voxels: int, model_voxels: int) -> str | None:
    """What to tell a user about to write ``n_maps`` heatmaps on the targets' voxels (``image_voxels`` in all) whose
    maps have ``model_voxels`` values in all: when that is more than :data:`HEATMAP_HINT_BYTES` of float32 and at
    least 4x the maps' own values, that ``--heatmap-grid model`` writes the same maps much faster; else None."""
    if image_voxels * 4 < HEATMAP_HINT_BYTES or image_voxels < 4 * max(model_voxels, 1):
        return None
    return (f"writing {n_maps} heatmap(s) on the targets' voxels: {image_voxels * 4 / 1e9:.1f} GB of float32 to "
            f"compress, {image_voxels / max(model_voxels, 1):.0f}x the maps' own values; --heatmap-grid model writes "
            "the same maps on the model's grid, in the same physical space, in a fraction of the time")


def _refuse_repeated_labels(labels: list[str], points_file: str, flag: str = "--heatmap-dir") -> None:
    """Raise :class:`InputError` naming ``points_file`` and the first label given to several of its points: a
    heatmap (``--heatmap-dir``) or a figure (``--figure-dir``: ``flag``) is written per label."""
    from .names import repeated_labels

    repeated = repeated_labels(labels)
    if repeated:
        what = "heatmap" if flag == "--heatmap-dir" else "figure"
        raise InputError(f"{points_file}: the label '{repeated[0]}' is given to {labels.count(repeated[0])} points, and "
                         f"{flag} writes one {what} per label; give each point its own label, or leave out {flag}")


def _heatmap_names(ids: list[str], labels: list[str]) -> dict[tuple[int, str], str]:
    """The heatmap file name of every (target index, label): ``<target id>_<label>_heatmap.nii.gz``
    (:func:`samembed.names.label_ids`), made unique where a target id and a label run together the same way
    (``case`` + ``L_R``, ``case_L`` + ``R``)."""
    from .names import deduplicated, label_ids

    safe = label_ids(labels)
    keys = [(ti, lab) for ti in range(len(ids)) for lab in dict.fromkeys(labels)]
    names = deduplicated([f"{ids[ti]}_{safe[lab]}" for ti, lab in keys])
    return {k: f"{name}_heatmap.nii.gz" for k, name in zip(keys, names)}


def _figure_names(ids: list[str], labels: list[str]) -> dict[tuple[int, str], str]:
    """The figure file name of every (target index, label) (``--figure-dir``): ``<target id>_<label>.png``, unique as
    the heatmaps' (:func:`_heatmap_names`)."""
    return {k: name[: -len("_heatmap.nii.gz")] + ".png" for k, name in _heatmap_names(ids, labels).items()}


def _draw_figures(args, result, source, points, target, names: dict[str, str]) -> int:
    """Draw each match of ``result`` (one target) into ``--figure-dir`` as ``names[label]``
    (:func:`samembed.figures.save_match_figure`), with its heatmap when the result has one (on the model's grid,
    resampled on the crop only); returns how many were drawn."""
    from .figures import save_match_figure

    where = dict(zip(points.labels, points.points_lps_mm))
    for m in result.matches:
        key = (m.target_index, m.label)
        heatmap = result.heatmaps.on_model_grid(key) if key in result.heatmaps else None
        save_match_figure(Path(args.figure_dir) / names[m.label], source, where[m.label], target, m.point_lps_mm,
                          heatmap, title=f"{m.label}: score {m.score:.2f} "
                                         f"({'confident' if m.confident else 'NOT confident'})")
    return len(result.matches)


def _refuse_overwriting_inputs(args, pairs, target_paths, outputs: list[Path]) -> None:
    """Raise :class:`InputError` before anything is computed when an output would land on an input (an image, the
    points, a mask, an atlas or its points, the atlas manifest): e.g. ``--out data/`` where an atlas's
    ``.mrk.json`` lies beside its image."""
    hit = _input_overwritten(outputs, [*args.images, *target_paths, args.points, args.mask,
                                       getattr(args, "atlases", None), *(p for pair in pairs for p in pair)])
    if hit is not None:
        o, given = hit
        flag = ("--heatmap-dir" if args.heatmap_dir and Path(o).parent == Path(args.heatmap_dir) else
                "--figure-dir" if args.figure_dir and Path(o).parent == Path(args.figure_dir) else "--out")
        raise InputError(f"{o}: writing it would overwrite the input {given}; choose another {flag}")


def _input_overwritten(outputs: Sequence, inputs: Sequence) -> tuple[object, object] | None:
    """The first of ``outputs`` that is one of ``inputs`` (None entries skipped), by the file each names (links and
    ``..`` followed), with that input as given; None when none is."""
    known: dict[str, object] = {}
    for p in inputs:
        if p:
            known.setdefault(os.path.realpath(p), p)
    return next(((o, known[os.path.realpath(o)]) for o in outputs if os.path.realpath(o) in known), None)


def _write_markups(args, r, path: Path, fused: dict[str, str]) -> None:
    """One target's matches as a ``.mrk.json``."""
    from .io import PointList, write_points

    ms = r.matches
    write_points(PointList([m.label for m in ms], [m.point_lps_mm for m in ms], [_describe(m, fused) for m in ms]),
                 path, ras=args.ras)


def _describe(m, fused: dict[str, str]) -> str:
    """A match's ``.mrk.json`` description (:func:`samembed.result.markups_description`). ``fused``: each atlas's
    name in the outputs (by its name in messages), empty when no atlases were fused."""
    from .result import markups_description

    return markups_description(vars(m), _rejected_names(m, fused), fused=bool(fused))


def _rejected_names(m, fused: dict[str, str]) -> list[str]:
    """The atlases a fused match rejected, by their names in the outputs."""
    return [fused.get(a, Path(a).name) for a in m.rejected]


def _rejected(m, fused: dict[str, str]) -> str:
    """The atlases a fused match rejected, by their names in the outputs (:func:`samembed.names.joined_names`)."""
    from .names import joined_names

    return joined_names(_rejected_names(m, fused))


def _written_summary(args, done: list, figures: int = 0, maps: int = 0) -> str:
    """What the closing line adds to the output's name: how many matches, how many confident, and the counts and
    folders of the ``maps`` heatmaps and ``figures`` written (the line named the table alone; 3 of 5 matches not
    confident went unsaid but in the rows)."""
    matches = [m for r in done for m in r.matches]
    text = f" ({len(matches)} match{'' if len(matches) == 1 else 'es'}, {sum(m.confident for m in matches)} confident)"
    return (text + (f" and {maps} heatmap{'' if maps == 1 else 's'} in {args.heatmap_dir}" if maps else "")
            + (f" and {figures} figure{'' if figures == 1 else 's'} in {args.figure_dir}" if figures else ""))


def _write_match_outputs(args, done: list, out: Path, folder_out: bool, heatmap_names: dict[tuple[int, str], str],
                         fused: dict[str, str] | None = None, prefetch=None, wrote: set[str] | None = None) -> int:
    """The outputs of the finished targets ``done`` (a MatchResult each, in order) not written yet: the CSV (all
    their rows; the ``.mrk.json`` per target was written as each finished) and the heatmaps, named by
    ``heatmap_names`` (:func:`_heatmap_names`). Fused matches carry how many atlases agreed and their spread (mm).
    Each target's files are named by :func:`samembed.names.target_ids`: unique, so targets of the same file name in
    different folders (``a/ct.nii.gz``, ``b/ct.nii.gz``) keep their own files; the heatmaps not written yet
    (:func:`_write_heatmaps`): returns how many."""
    if not folder_out:  # the table first, before anything else takes time (a stop then loses no match)
        _write_table(args, done, out, fused)
        if wrote is not None:
            wrote.add("csv")
    if prefetch is not None:  # (its memory, before the heatmaps take theirs)
        prefetch.close()
    return _write_heatmaps(args, done, heatmap_names, engine_freed=True)


def _write_heatmaps(args, done: list, heatmap_names: dict[tuple[int, str], str], of_targets: int = 1,
                    engine_freed: bool = False) -> int:
    """The heatmaps of the finished targets ``done`` (a MatchResult each) into ``--heatmap-dir``, named by
    ``heatmap_names`` (by place in ``done`` and label); each result's maps are dropped once written. ``of_targets``:
    the run's targets, when ``done`` is its first target's result alone (the hint about their size is given
    then, for all of them). ``engine_freed``: the engine was let go (the end of the run), and its reference cycles
    are collected first. Returns how many were written."""
    if not args.heatmap_dir or not any(len(res.heatmaps) for res in done):
        return 0
    if args.heatmap_grid == "image" and of_targets:
        keys = [(res, key) for res in done for key in res.heatmaps]
        hint = heatmap_grid_hint(len(keys) * of_targets,
                                 sum(math.prod(r.heatmaps.image_grid(k).shape_zyx) for r, k in keys) * of_targets,
                                 sum(math.prod(r.heatmaps.model_grid(k).shape_zyx) for r, k in keys) * of_targets)
        if hint:
            log.info("%s", hint)
    import gc
    from concurrent.futures import ThreadPoolExecutor

    if engine_freed:  # (not per target while the engine lives: a full collection took 0.09 s and freed nothing)
        # on-demand maps and their embedder refer to each other (maps -> tiles -> embedder -> its cache -> maps):
        # freed here, not whenever the next full collection happens to run
        gc.collect()
    from .io import new_sitk_buffer, write_heatmap

    # each heatmap is made (samembed.heatmap.Heatmaps.make) and written while the next one is made: the compression
    # runs outside the GIL, and at most `workers` written maps are in flight besides the one being made. Each is made
    # in the buffer of a SimpleITK image of its target's grid, which is written without a copy and then reused for a
    # later map of that grid: no image-sized memory is made afresh per heatmap (LIDC-0001: 140 MB each, at about
    # 3 us per fresh 4 KB page on this VM). On the model's grid (--heatmap-grid model) each map is a new small array.
    workers = max(1, min(2, os.cpu_count() or 1))
    free: list = []  # (grid, sitk image, its voxels) not in flight
    with ThreadPoolExecutor(workers, thread_name_prefix="samembed-heatmap") as pool:
        pending: list = []
        for ti, res in enumerate(done):
            for key in res.heatmaps:
                buf = None
                if args.heatmap_grid == "model":
                    img = res.heatmaps.on_model_grid(key)
                else:
                    grid = res.heatmaps.image_grid(key)
                    free = [b for b in free if b[0] is grid]  # another target's buffers are dropped
                    buf = free.pop() if free else (grid, *new_sitk_buffer(grid))
                    img = res.heatmaps.make(key, out=buf[2])
                path = Path(args.heatmap_dir) / heatmap_names[(ti, key[1])]
                pending.append((pool.submit(write_heatmap, img, path, in_place=True), buf))  # made for this write
                del img
                if len(pending) >= workers:
                    job, back = pending.pop(0)
                    job.result()  # raises the writer's error, if any
                    if back is not None:
                        free.append(back)
        for job, _ in pending:
            job.result()
    from .heatmap import Heatmaps

    written = sum(len(res.heatmaps) for res in done)
    for res in done:  # written: the dense maps go (with many targets they took 2.7 MB per point of a chest CT)
        res.heatmaps = Heatmaps()
    return written


def _cmd_embed(args) -> int:
    if not args.cache_dir:
        raise InputError("samembed embed needs --cache-dir DIR to store the embeddings")
    _require_images(args.images)  # before the cache folder is made and torch loads
    from .io import output_folder

    output_folder("--cache-dir", Path(args.cache_dir))
    bar = PhaseProgress(len(args.images), "loading torch" if "torch" not in sys.modules else "loading the model",
                        not args.quiet, started_s=getattr(args, "started_s", None))
    try:
        try:
            from .api import as_image  # torch
        finally:
            after_torch_import()  # as in _match (samembed.torch_import)
        bar.phase("loading the model")
        matcher = _make_matcher(args)
        unstored, skipped = [], []
        stored = 0  # images embedded and stored
        for n, path in enumerate(args.images):
            t0 = time.time()
            bar.update(n, len(args.images), f"reading {Path(path).name}")
            label = f"embedding {n + 1}/{len(args.images)} {Path(path).name}"
            try:  # an image that cannot be read or embedded is its own problem: among several, named and skipped
                with of_the_target():
                    image = as_image(path, spacing_mm=args.spacing)
                    # what a cache entry holds: the global map and the body's local vectors (the air is never
                    # embedded)
                    embedder = matcher.embedder_for(image.ndim)
                    maps = embedder.embed_body(image, progress=lambda done, total, phase, label=label:
                                               bar.phase(f"{label}: {phase} {done:g}/{total:g}"))
            except (TargetError, PermissionError) as e:
                if len(args.images) == 1:
                    raise
                log.error("image %d/%d skipped (the others go on): %s", n + 1, len(args.images),
                          _refused(e, path) if isinstance(e, PermissionError) else e)
                skipped.append(path)
                continue
            if embedder.disk_write_failed:  # (clear_cache below tries the folder again for the next image)
                unstored.append(path)
            else:
                stored += 1
            bar.update(n + 1, len(args.images), label)
            log.info("%s: local %s, global %s, %.1f s", path, maps.local_grid.shape_zyx, tuple(maps.global_.shape),
                     time.time() - t0)
            matcher.clear_cache()
    except KeyboardInterrupt:  # (Ctrl-C, SIGTERM): what is stored stays, and is said, also with --quiet
        bar.close()
        if stored:
            log.warning("stopped after %d of %d images: their embeddings are in %s; the same command again embeds the "
                        "rest (those are found there)", stored, len(args.images), args.cache_dir)
        raise
    finally:
        bar.close()
    if unstored:
        log.error("%d of %d images were not stored in %s (see the warnings above; a full disk or a folder this user "
                  "may not write): %s", len(unstored), len(args.images), args.cache_dir, ", ".join(map(str, unstored)))
        return 1
    if skipped:  # (as samembed match: 3 when the others were embedded, 2 when none could be)
        log.error("%d of %d images could not be embedded (each is named above): %s", len(skipped), len(args.images),
                  ", ".join(map(str, skipped)))
        return 2 if len(skipped) == len(args.images) else EXIT_SOME_FAILED
    return 0


def _cmd_cache(args) -> int:
    """``samembed cache info|clear FOLDER`` (or ``--cache-dir FOLDER``): what the embedding cache holds, or empty
    it (or remove the entries unused for ``--unused-days``, and the least recently used beyond ``--max-gb``)."""
    from .tiles import OLDER_FORMAT, ClearLimits, cache_clear, cache_info

    given = [f for f in (args.folder, args.cache_dir) if f]
    if not given:
        raise InputError(f"which cache folder? samembed cache {args.action} FOLDER (the --cache-dir given to match or "
                         "embed)")
    if len(given) == 2 and Path(given[0]).resolve() != Path(given[1]).resolve():
        raise InputError(f"two cache folders given, {given[0]} and --cache-dir {given[1]}; give one")
    folder = given[0]
    if Path(folder).exists() and not Path(folder).is_dir():
        raise InputError(f"{folder}: is a file, not a cache folder (give the --cache-dir used with match or embed)")
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: no such cache folder (give the --cache-dir used with match or embed)")
    limits = ClearLimits(None if args.unused_days is None else args.unused_days * 86400.0,
                         None if args.max_gb is None else int(args.max_gb * 1e9))
    for flag, value in (("--unused-days", args.unused_days), ("--max-gb", args.max_gb)):
        if value is not None and args.action != "clear":
            raise InputError(f"{flag} says which entries `samembed cache clear` removes; `cache info` lists them all")
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{flag} {value:g}: give a number of {'days' if flag == '--unused-days' else 'GB'}, 0 "
                             "or more")
    if args.action == "clear":
        n, writes, kept = cache_clear(folder, limits)
        also = f" and {writes} unfinished {'write' if writes == 1 else 'writes'} of stopped processes" if writes else ""
        parts = ([f"not used for {args.unused_days:g} days"] if args.unused_days is not None else []) + (
            [f"beyond the {args.max_gb:g} GB used most recently"] if args.max_gb is not None else [])
        which = f" ({' or '.join(parts)})" if parts else ""
        rest = cache_info(folder) if not limits.all else None
        print(f"removed {n} {'entry' if n == 1 else 'entries'}{which}{also} from {folder}"
              + ("" if rest is None else f"; {rest['entries']} left, {rest['bytes'] / 1e6:.1f} MB"))
        if kept:  # (another user's, in a shared folder): named, and the command fails
            why = sorted({reason for _, reason in kept})
            print(f"error: {len(kept)} {'file' if len(kept) == 1 else 'files'} left, not removed ({'; '.join(why)}), "
                  f"e.g. {kept[0][0].name}: they belong to another user, or the folder may not be changed; ask its "
                  "owner", file=sys.stderr)
            return 1
        return 0
    info = cache_info(folder)
    for e in info["details"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["modified"]))
        if e.get("damaged") == OLDER_FORMAT:  # named otherwise than today's entries: never read again
            what = "an older format, never read (`samembed cache clear` empties the folder)"
        elif e.get("older"):  # its key names another format: never read by this version
            what = f"{e['damaged']}, never read by this version (`samembed cache clear` empties the folder)"
        elif e.get("unreadable"):  # (a match computes its maps without it, and leaves the file as it is)
            what = f"{e['damaged']}: this user may not read it; it is left as it is (its owner may clear it)"
        elif "damaged" in e:
            what = f"damaged, recomputed when next used: {e['damaged']}"
        else:
            grid = "x".join(str(v) for v in e["grid_zyx"])
            spacing = "x".join(f"{v:g}" for v in e["spacing_zyx_mm"])
            stored = "" if e["stored_voxels"] is None else f", {e['stored_voxels']:,} voxels stored"
            axes = "zyx"[-len(e["grid_zyx"]):]  # (a radiograph's grid: yx)
            what = f"{e['image']}  {e['model']}  local grid {grid} ({axes}) at {spacing} mm{stored}"
        print(f"{e['bytes'] / 1e6:8.1f} MB  {when}  {what}  [{e['file']}]")
    n = info["entries"]
    print(f"{n} {'entry' if n == 1 else 'entries'}, {info['bytes'] / 1e6:.1f} MB in {info['folder']}")
    if info["unfinished"]:
        k = len(info["unfinished"])
        print(f"{k} unfinished {'write' if k == 1 else 'writes'} of stopped processes, "
              f"{sum(b for _, b in info['unfinished']) / 1e6:.1f} MB (never read; `samembed cache clear` removes them)")
    return 0


def _cmd_info(args) -> int:
    import platform

    import SimpleITK as sitk
    import torch

    from . import __version__
    from .models import models_dir, read_int8_calibration, registry
    from .networks.int8 import has_global_scales, int8_arithmetic, native_bf16
    from .registry import checkpoint_header

    print(f"samembed {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"SimpleITK {sitk.Version.VersionString()}")
    cuda = torch.cuda.is_available()
    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}; threads {torch.get_num_threads()}; "
          f"CPU instructions {torch.backends.cpu.get_cpu_capability()}, "
          f"{'native bfloat16 (int8-bf16 can run: the default of models calibrated without global scales)' if native_bf16() else 'no native bfloat16: int8-bf16 cannot run'}; "
          f"int8 path: {int8_arithmetic()}")
    print(f"models ({models_dir() / 'models.json'}):")
    for m in registry().get("models", []):
        avail = "available" if m.get("file") and (models_dir() / m["file"]).is_file() else "not on this machine"
        calibrated = avail == "available" and read_int8_calibration(models_dir() / m["file"], m.get("sha256"))
        both = calibrated and has_global_scales(calibrated)
        int8 = (f"  int8 on the CPU (calibrated{', global branch too' if both else ''})" if calibrated else "")
        aliases = f"  (also --model {', '.join(m['aliases'])})" if m.get("aliases") else ""
        spacing = f"{m.get('spacing_mm', '?')} mm"
        header = checkpoint_header(models_dir() / m["file"]) if avail == "available" else None
        read = (header or {}).get("preprocess", {}).get("spacing_mm")
        if read is not None and read != m.get("spacing_mm"):  # (the file's is what matching uses: a review)
            spacing = f"{read} mm (models.json says {m.get('spacing_mm')}: the file's is used)"
        print(f"  {m['name']:<18} {m.get('architecture', '?'):<14} {spacing}  {avail}{int8}{aliases}"
              + (f"  - {m.get('note')}" if avail != "available" and m.get("note") else ""))
    print("  random:<arch>      seeded random weights for smoke tests (sam-lite, sam-lite-2d, sam-official)")
    return 0


def _cmd_train(args) -> int:
    from .training.config import load_config, validate_config
    from .training.train import Trainer

    cfg = load_config(args.config, args.set)
    for key in ("arch", "objective", "data", "iterations"):
        if getattr(args, key) is not None:  # (--iterations 0 was taken as not given)
            setattr(cfg, key, getattr(args, key))
    if args.out:
        cfg.out_dir = args.out
    validate_config(cfg, f"{args.config or 'config'} with the command's settings")
    final = Trainer(cfg, progress=not args.quiet).run(resume=args.resume)
    print(f"wrote {final}")
    return 0


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the network's arithmetic: int8 local convolutions on the CPU (2.2-2.6x faster; needs the "
                        "model's calibration, see `samembed quantize`), int8-int8 (also the global branch in int8, "
                        "2x faster; needs a calibration with its scales), int8-bf16 (the global branch in bfloat16 "
                        "instead, 2x faster; needs a CPU with native bfloat16), fp32, or auto (the fastest of these "
                        "that the model and CPU allow: int8-int8 for the shipped CT models)")


def _model_name(text: str) -> str:
    """A ``--model`` value (argparse type): a bare name (no folder, no suffix) that names no registered model nor a
    file here is refused before any image is read, with the closest registered name as a suggestion
    (:func:`samembed.registry.unknown_model`). A path is left to the model's loading, which names a missing file (a
    Dask cluster's workers may see files and registries this machine does not)."""
    from .registry import unknown_model

    if "/" in text or "\\" in text or "." in text:
        return text
    try:
        why = unknown_model(text)
    except (InputError, OSError) as e:  # the registry itself (invalid JSON, unreadable): say so, not "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def _add_common(p: argparse.ArgumentParser, cache_help: str = "on-disk embedding cache folder") -> None:
    p.add_argument("--model", default="default", type=_model_name,
                   help="model name (see `samembed info`), checkpoint path, or random:<arch>")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the network runs (auto: CUDA when present, else the CPU)")
    _add_precision(p)
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--modality", default="auto", choices=MODALITIES,
                   help="how intensities are mapped (auto: a 2D image is a radiograph, a volume reaching air in HU a "
                        "CT, else MRI)")
    p.add_argument("--spacing", type=_positive_mm, metavar="MM",
                   help="pixel spacing (mm) for 2D files that carry none (PNG/JPEG)")
    add_log_flags(p)


#: the help of ``-q`` and ``-v``, before the command or after it
QUIET_HELP = "no progress bar, summary or informational log lines"
VERBOSE_HELP = "debug log lines (and tracebacks of internal errors)"


def add_log_flags(p: argparse.ArgumentParser) -> None:
    """``-v`` and ``-q`` on a command's own parser, so that either goes before the command or after it
    (``samembed -v match ...`` or ``samembed match ... -v``). Their defaults are the main parser's: a flag given
    before the command stays set when the command does not give it again."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)


# ------------------------------------------------------------------------------------------ benchmark commands
#: the separate benchmark package (``benchmarks/samembed_bench``, not part of the engine or the Slicer extension)
BENCH_PACKAGE = "samembed_bench"

#: sub-commands that package adds, with their one-line help (shown whether or not it is installed)
BENCH_COMMANDS: dict[str, str] = {
    "evaluate": "landmark benchmark: run methods on case files, write tables and plots",
    "make-suites": "build the benchmark suites from ../shared/data",
}


def _bench_cli():
    """The benchmark package's CLI module (``samembed_bench.cli``), or None when the package is not installed.

    Loaded by name inside this function: the engine has no import of the benchmark package. Only the package's
    own absence counts as "not installed"; any other import error inside it propagates.
    """
    import importlib

    try:
        return importlib.import_module(f"{BENCH_PACKAGE}.cli")
    except ModuleNotFoundError as e:
        if e.name in (BENCH_PACKAGE, f"{BENCH_PACKAGE}.cli"):
            return None
        raise


def _cmd_quantize(args) -> int:
    from .models import load_model
    from .quantize import QuantizeSettings, calibrate_model, qparams_path, sample_images
    from .training.config import load_config

    cfg = load_config(args.config, [])
    settings = QuantizeSettings(images=args.images, seed=args.seed, exclude=tuple(args.exclude))
    images = sample_images(list(cfg.data), list(cfg.exclude), settings, Path.cwd())
    model = load_model(args.model)
    if not model.info.get("file"):
        raise InputError(f"model '{args.model}' has no weights file to calibrate")
    if model.spec.arch != cfg.arch:  # (a CT model on radiographs failed deep in the padding)
        raise InputError(f"--config {args.config} trains {cfg.arch} models, but --model {args.model} is a "
                         f"{model.spec.arch} model; give the config the model was trained with")
    out = Path(args.out) if args.out else qparams_path(model.info["file"])
    if os.path.realpath(out) == os.path.realpath(model.info["file"]) or out.suffix.lower() in (".pt", ".pth"):
        raise InputError(f"{out}: --out names the model's weights (or a checkpoint); the calibration is a JSON file, "
                         f"by default {qparams_path(model.info['file'])}")
    # the config or a calibration image was replaced by the calibration (a review): a .json name, and no input's
    if out.suffix.lower() != ".json":
        raise InputError(f"{out}: --out names the calibration, a JSON file; give a name ending in .json (by default "
                         f"{qparams_path(model.info['file'])})")
    hit = _input_overwritten([out], [args.config, *images])
    if hit is not None:
        raise InputError(f"{out}: writing it would overwrite the input {hit[1]}; choose another --out")
    from .io import check_writable

    check_writable(out)  # before minutes of calibration, not after them
    bar = PhaseProgress(len(images), "calibrating", not args.quiet, started_s=getattr(args, "started_s", None))
    try:
        calibrate_model(model, images, settings, out, progress=bar.update)
    finally:
        bar.close()
    if not args.quiet:
        print(f"wrote {out}: int8 scales of {model.model_id} from {len(images)} training images")
    return 0


def _cmd_web(args) -> int:
    """``samembed web``: imports trame only here; the web viewer lives beside the engine (SAMEmbeddingWeb)."""
    here = Path(__file__).resolve().parents[1]  # SAMEmbedding/: SAMEmbeddingLib and SAMEmbeddingWeb live here
    if (here / "SAMEmbeddingWeb").is_dir() and str(here) not in sys.path:
        sys.path.insert(0, str(here))
    try:
        import trame_slicer  # noqa: F401
        from SAMEmbeddingWeb.app import WebOptions, run
    except ImportError as e:
        print(f"error: 'samembed web' needs the web extra ({e}); from a source checkout of SAMEmbedding run: "
              "pip install -e '.[web]'", file=sys.stderr)
        return 2
    _require_images(args.images)  # (a missing one was said only in the page, and the server ran on: a review)
    if not (math.isfinite(args.idle_timeout) and args.idle_timeout >= 0):
        raise InputError(f"--idle-timeout {args.idle_timeout:g}: give seconds, 0 or more (0: run until Ctrl-C)")
    return run(WebOptions(images=args.images, host=args.host, port=args.port, base_path=args.base_path,
                          data_root=args.data_root, max_upload_mb=args.max_upload_mb, model=args.model,
                          device=args.device, cache_dir=args.cache_dir, idle_timeout_s=args.idle_timeout))


def _bench_missing(args) -> int:
    """``func`` of a benchmark sub-command when the benchmark package is missing: say how to install it, exit 2."""
    print(f"error: 'samembed {args.command}' needs the benchmark package {BENCH_PACKAGE}, which is not installed; "
          "from a source checkout of SAMEmbedding run: pip install -e benchmarks", file=sys.stderr)
    return 2


def _add_bench_commands(sub) -> None:
    """``evaluate`` and ``make-suites``: the benchmark package's parsers when it is installed, else stand-ins that
    show in ``--help`` and exit 2 with the install command when run."""
    bench = _bench_cli()
    if bench is not None:
        bench.add_parsers(sub)
        for name in BENCH_COMMANDS:  # -v and -q after these commands too
            add_log_flags(sub.choices[name])
        return
    for name, text in BENCH_COMMANDS.items():
        # no option prefix: every argument (--out, --help, ...) lands in the catch-all, so any call gets the message
        b = sub.add_parser(name, help=f"{text} (needs {BENCH_PACKAGE}: pip install -e benchmarks)",
                           prefix_chars="\0", add_help=False)
        b.add_argument("arguments", nargs="*")
        b.set_defaults(func=_bench_missing)


class _Parser(argparse.ArgumentParser):
    """The ``samembed`` parser: a mistyped option is refused with the command's closest option as a suggestion
    (``unrecognized arguments: --pionts x (--pionts: did you mean --points?)``)."""

    #: the commands' parsers by name (set by :func:`build_parser`)
    commands: dict = {}

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's own signature
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            import difflib

            command = self.commands.get(getattr(ns, "command", None), self)
            # the command's long options, compared without the dashes every one of them shares
            names = {s[2:]: s for a in command._actions for s in a.option_strings if s.startswith("--")}
            hints = []
            for token in extras:
                if token.startswith("--"):
                    close = difflib.get_close_matches(token.split("=", 1)[0][2:], list(names), 1)
                    hints += [f"{token}: did you mean {names[close[0]]}?"] if close else []
            # under the command's own usage (samembed match ...), as argparse refuses the command's other mistakes
            command.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
        return ns


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``samembed`` command."""
    p = _Parser(prog="samembed", description="SAM anatomical embeddings: match points across medical images.")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub.choices

    m = sub.add_parser("match", help="match points from a source image (or several atlases) into target images",
                       usage="samembed match SOURCE TARGET... --points FILE --out OUT [options]\n"
                             "       samembed match --atlas IMAGE POINTS [--atlas IMAGE POINTS ...] TARGET... --out OUT",
                       epilog="Exit status: 0 when every target was matched; 3 when some targets could not be read or "
                              "matched (each is named, skipped, and the others are written); 2 for bad input (no "
                              "target matched, a bad option or file); 1 when the system refused a read or a write, or on "
                              "an internal error; 130 when interrupted; 143 when stopped by SIGTERM.")
    m.add_argument("images", nargs="+", metavar="IMAGE",
                   help="SOURCE then TARGET...; with --atlas/--atlases every IMAGE is a target")
    m.add_argument("--points", help="the source's points: CSV (label,x,y,z or label,x,y), .fcsv or .mrk.json")
    m.add_argument("--atlas", nargs=2, action="append", metavar=("IMAGE", "POINTS"),
                   help="an annotated atlas (repeat it): each landmark's predictions from all atlases are fused per "
                        "target (score-weighted geometric median; atlases that disagree are rejected, see the output)")
    m.add_argument("--atlases", metavar="MANIFEST.csv", help="atlases listed in a CSV with the columns image,points")
    m.add_argument("--out", required=True, help="CSV file (for one target also a .mrk.json or .fcsv file), or a folder "
                   "for one .mrk.json per target")
    m.add_argument("--heatmap-dir", help="write each point's similarity map per target (target geometry; -1 outside the "
                   "voxels searched: the body, or --mask / --box)")
    m.add_argument("--heatmap-grid", choices=("image", "model"), default="image",
                   help="the heatmaps' voxels: the target's own (image, the default) or the model's grid (model: the "
                        "map's own resolution, 4 mm for CT, in the same physical space, so a viewer overlays it on "
                        "the target; a chest CT's heatmap 2.7 MB instead of 140 MB of float32: 50 of them written "
                        "in 1 s instead of 10 s)")
    m.add_argument("--figure-dir", help="draw a picture per matched point and target, <target>_<label>.png: the source "
                   "around the point beside the target around its match, with its heatmap when --heatmap-dir is given "
                   "(about 0.2 s each)")
    m.add_argument("--ras", action="store_true", help="CSV points in and out are RAS (Slicer) instead of LPS")
    m.add_argument("--mask", help="search only where this image (target space) is non-zero")
    m.add_argument("--jobs", type=_jobs_value, default="auto", metavar="N",
                   help="targets matched at once after the first, each with its share of torch's threads (the same "
                        "matches; each holds its own target in memory); auto (the default): 2 on a CPU where torch "
                        "has 2 or more threads (OMP_NUM_THREADS), for 3 targets or more, else 1; 1 with "
                        "--heatmap-dir (its matches come from sums over every voxel, which differ in their last "
                        "digits on fewer threads: with N > 1 a match may move)")
    _add_match_options(m, "same-patient; between-patients with --atlas/--atlases")
    _add_common(m)
    m.set_defaults(func=_cmd_match)

    e = sub.add_parser("embed", help="pre-compute embeddings into a cache folder (each image's global map and its body's "
                       "local map)")
    e.add_argument("images", nargs="+", metavar="IMAGE")
    _add_common(e, cache_help="the on-disk embedding cache folder to fill (required)")
    e.set_defaults(func=_cmd_embed)

    c = sub.add_parser("cache", help="show or clear an embedding cache folder",
                       description="info: each entry's size, when it was last written or used, its image, model and "
                                   "grid; clear: remove the entries (all, or those the limits below select) and the "
                                   "unfinished writes of stopped processes")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("folder", nargs="?", help="the cache folder (the --cache-dir given to match or embed)")
    c.add_argument("--cache-dir", help="the cache folder, as match and embed take it (instead of FOLDER)")
    c.add_argument("--unused-days", type=float, metavar="DAYS",
                   help="clear: only the entries not written or used for DAYS days (default: every entry)")
    c.add_argument("--max-gb", type=float, metavar="GB",
                   help="clear: the least recently used entries, until the rest take at most GB gigabytes "
                        "(default: every entry)")
    add_log_flags(c)
    c.set_defaults(func=_cmd_cache)

    i = sub.add_parser("info", help="models, device and versions")
    add_log_flags(i)
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser("train", help="self-supervised training (SAM and related objectives)",
                       description="Train an embedding network on a config's images (Resources/Models/*.yaml are the "
                                   "shipped models' configs; every setting is listed in "
                                   "samembed.training.config.TrainConfig). The run folder (out_dir, --out) gets "
                                   "last.pt every checkpoint_every iterations, train_log.csv, loss_curve.png and the "
                                   "final NAME.pt. Ctrl-C or SIGTERM stops after the iteration under way with its "
                                   "checkpoint; --resume goes on as if never stopped.")
    t.add_argument("--config", help="YAML, TOML or JSON config file")
    t.add_argument("--arch", choices=["sam-lite", "sam-lite-2d", "sam-official"])
    from .training.config import OBJECTIVE_HELP

    t.add_argument("--objective", help="sam (default), or a weighted sum such as sam+isimed:0.5; the objectives: "
                   + "; ".join(f"{k}: {v}" for k, v in OBJECTIVE_HELP.items()))
    t.add_argument("--data", nargs="+", help="folders (recursive), list files or images")
    t.add_argument("--out", help="output folder")
    t.add_argument("--iterations", type=int)
    t.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or (no value) from the run folder's last.pt when it exists, "
                        "else start anew (from the config's init_from weights, if set)")
    t.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config settings (values as JSON: lr=5e-4 exclude='[\"pt_1*\"]')")
    add_log_flags(t)
    t.set_defaults(func=_cmd_train)

    from .quantize import QuantizeSettings  # loads no numpy: the parser is built before the engine's settings

    qz = sub.add_parser("quantize", help="calibrate a sam-lite model's int8 form on a sample of its training images")
    qz.add_argument("--config", required=True, help="the model's training config (its data and exclude lists)")
    qz.add_argument("--model", default="default", type=_model_name, help="model name or checkpoint path (a .pt file)")
    qz.add_argument("--images", type=int, default=QuantizeSettings.images,
                    help=f"training images to sample (default {QuantizeSettings.images})")
    qz.add_argument("--seed", type=int, default=QuantizeSettings.seed,
                    help=f"seed of the images' sample (default {QuantizeSettings.seed})")
    qz.add_argument("--exclude", nargs="*", default=[], metavar="GLOB",
                    help="file-name globs to leave out beside the config's (e.g. the images an evaluation uses)")
    qz.add_argument("--out", help="output JSON (default: <weights stem>.int8.json beside the weights, which the "
                                  "engine reads)")
    add_log_flags(qz)
    qz.set_defaults(func=_cmd_quantize)

    w = sub.add_parser("web", help="the matching viewer in a browser (needs the web extra: pip install -e '.[web]')")
    w.add_argument("images", nargs="*", metavar="IMAGE", help="volumes to open: the first is the source")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (every request needs the access token in the printed URL)")
    w.add_argument("--port", type=int, default=8080, help="port (0: a free one)")
    w.add_argument("--base-path", default="/", help="URL prefix to serve under as well as /, for a reverse proxy "
                                                      "(e.g. /sam/: the page is at http://host:port/sam/)")
    w.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="folders the page may open by path (repeatable; default: the folders of IMAGE)")
    w.add_argument("--max-upload-mb", type=float, default=512.0, help="largest upload accepted, MB")
    w.add_argument("--model", default="default", type=_model_name)
    w.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])  # (the module's arithmetic: auto)
    w.add_argument("--cache-dir", help="on-disk embedding cache folder")
    w.add_argument("--idle-timeout", type=float, default=0.0, metavar="S",
                   help="stop once no page has been connected for S seconds (default 0: run until Ctrl-C)")
    add_log_flags(w)
    w.set_defaults(func=_cmd_web)

    from .propagate.cli import add_parser as add_propagate_parser  # dask is imported only when it runs

    add_propagate_parser(sub)
    _add_bench_commands(sub)
    return p


#: commands after which :func:`run` ends the process at once: each has written (atomically) and closed everything
#: when it returns, and starts no process or server of its own (``propagate`` runs a Dask cluster, ``web`` a server,
#: ``train`` long jobs: those shut the interpreter down normally)
FAST_EXIT_COMMANDS = frozenset({"match", "embed", "cache", "info"})
#: commands whose process keeps freed memory for later tiles (:func:`samembed.allocator.keep_freed_memory`), leaves
#: torch's objects out of the garbage collector's scans (:mod:`samembed.collector`) and imports torch without its
#: Python meta kernels until something needs them (:mod:`samembed.torch_import`): they embed, then end; the
#: long-lived ones (``web``, ``train``, ``propagate``) keep the C library's, Python's and torch's own ways
KEEP_FREED_COMMANDS = frozenset({"match", "embed"})


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return _main(build_parser().parse_args(argv))


def run() -> NoReturn:
    """The ``samembed`` command: :func:`main` on ``sys.argv``, then the exit.

    After the commands of :data:`FAST_EXIT_COMMANDS` the process ends through :func:`exit_now`: with torch loaded,
    the interpreter's normal shutdown takes about 0.5 s on a 2-core machine (measured: ``import torch`` then exit),
    a tenth of a cold ``samembed match``, after its results are written.

    For the commands of :data:`KEEP_FREED_COMMANDS` the process is the engine's own, short-lived one: it gets
    :func:`engine_process_settings` (freed memory kept for the next tile, the garbage collector paused until torch is
    loaded, torch's Python meta kernels left out until needed, numpy's BLAS on one thread) before the command's first
    allocation; the prefetch process it forks keeps the allocator's setting too."""
    try:
        args = build_parser().parse_args()
        if args.command in KEEP_FREED_COMMANDS:
            engine_process_settings()
    except KeyboardInterrupt:  # Ctrl-C while the arguments are read: as within the command, without a traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    code = _main(args)
    if args.command in FAST_EXIT_COMMANDS:
        exit_now(code)
    sys.exit(code)


def engine_process_settings() -> None:
    """The process-wide settings of a process that embeds, then ends (the commands of :data:`KEEP_FREED_COMMANDS`,
    applied by :func:`run` before the command's first allocation): freed memory kept for the next tile
    (:func:`samembed.allocator.keep_freed_memory`), and torch's coming import prepared
    (:func:`samembed.torch_import.before_torch_import`: the garbage collector paused until torch is loaded, torch's
    Python meta kernels left out until needed), and numpy's BLAS on one thread, before numpy loads
    (:func:`samembed.blas_threads.one_blas_thread`: no worker spinning beside torch's threads). The command calls
    :func:`~samembed.torch_import.after_torch_import` once torch is loaded. A benchmark that runs a command's function
    in a process of its own calls this too, before it imports numpy and torch."""
    from .allocator import keep_freed_memory
    from .blas_threads import one_blas_thread

    one_blas_thread()
    keep_freed_memory()
    before_torch_import()


def exit_now(code: int) -> NoReturn:
    """End the process with exit ``code`` once the log, stdout and stderr are flushed, skipping the interpreter's
    shutdown (module teardown and the C++ destructors of the libraries it loaded). Only for a process whose work is
    done: files written and closed, no thread or child process still working."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to flush
            stream.flush()
    os._exit(int(code))


@contextlib.contextmanager
def _command_log(level: int):
    """The command's log lines on stderr ("LEVEL message", at ``level``) for the command's duration, where the process
    has no logging of its own; a script that calls :func:`main` finds its root logger as it was afterwards (it was
    left configured, its level and handler the command's). Logging the caller set up is left to it."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before)
        handler.close()


def _main(args: argparse.Namespace) -> int:
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    with _command_log(level):
        return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    """The command of ``args``, its errors as exit codes with one line each (see :func:`_main`)."""
    args.started_s = time.perf_counter()  # what a command reports as its time starts here, before torch loads
    try:
        with stop_on_sigterm():
            return int(args.func(args) or 0)
    except DeviceUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SamEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"terminated: {e}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the system refused a read or a write (permissions, a full disk, ...)
        # a file moved into place names its destination: the temporary file it was written to is gone
        name = e.filename2 if e.filename2 else e.filename
        print(f"error: {f'{name}: ' if name else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
        if getattr(args, "verbose", False):
            raise
        from .errors import is_out_of_memory, out_of_memory_advice

        if is_out_of_memory(e):  # (said as an internal error, or as a broken install when a library could not map)
            print(f"error: {out_of_memory_advice(e)}", file=sys.stderr)
            return 1
        print(f"internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run()
