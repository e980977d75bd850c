"""Matching several targets at once: ``samembed match --jobs``, and clicks into several targets (:func:`match_each`,
which :meth:`samembed.Matcher.match_each` runs for the Slicer module, its engine process and the web viewer).

One target at a time leaves a core idle on a CPU of two or more: between torch's kernels, the search, the polish,
the prior's fit and the bookkeeping run on one core, and torch's kernels themselves gain little from a second thread
on the small tiles of one target. Two targets at once, each with its share of torch's threads, keep both cores
busy. One atlas into 20 OpenKBP CTs on the 2-core VM (``samembed match`` with torch's default two threads,
``benchmarks/jobs.py``): 1.18-1.36x faster per target two at a time (0.70 -> 0.59 s and 0.65 -> 0.48 s in two
runs), the same table byte for byte.

The targets are matched one at a time until one is matched: it embeds the source or atlases (their global maps and
the tiles around the points and their round trips), which every later target reads. The later targets then run
``jobs`` at a time inside :func:`samembed.embedding.concurrent_matching`, which keeps the source's maps consistent
while several threads read and fill them: each maps' tiles are filled under its own lock, and no tile writes over
voxels already computed. Each target's matches are the ones it gets alone: the tiles are the same on one thread as
on two (tested on this VM, int8 and float32), and the shipped int8 network's tiles are the same whatever box they
were computed in. A heatmap is that of a run on ``torch threads // jobs`` threads: its product over every voxel sums
in another order on one thread than on two (a few voxels of a CT's million differ by one step of its rounding), and
with heatmaps the matches are read from those products, so a match or a round trip can move with them: a job that
makes heatmaps runs one target at a time unless told otherwise (:func:`auto_jobs`).
With float32 arithmetic a source tile that a round trip adds may be computed in another box than one at a time would
(the threads' timing decides which needs it first), equal to float rounding (about 1e-7), as with the targets in
another order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import Cancelled, TargetError, of_the_target
from .fusion import Atlas, FusionOptions
from .options import MatchOptions

if TYPE_CHECKING:
    from .api import Matcher
    from .embedding import EmbeddingCache
    from .image import Image
    from .result import MatchResult

log = logging.getLogger(__name__)

#: ``--jobs auto`` runs at most this many targets at once (each holds its own maps: memory grows with it)
AUTO_JOBS = 2


def auto_jobs(n_targets: int, torch_threads: int, device_type: str, heatmaps: bool = False) -> int:
    """The targets to match at once when the user does not say: :data:`AUTO_JOBS` on a CPU with that many of torch's
    threads, for three targets or more (the first is matched alone); else 1. A GPU runs one target at a time, and so
    does a job that makes heatmaps (``heatmaps``): its matches are read from the whole products, whose sums on
    fewer threads differ in their last digits, which can move a match or a round trip (a review: 4 of 75 rows of 15
    head-and-neck targets with ``--jobs 2``), so only one target at a time gives each the matches it gets alone."""
    if device_type != "cpu" or n_targets < 3 or heatmaps:
        return 1
    return max(1, min(AUTO_JOBS, int(torch_threads)))


@contextlib.contextmanager
def cache_floor(cache: EmbeddingCache, shared: int, jobs: int):
    """A block in which the memory ``cache`` keeps, whatever its cap, the ``shared`` maps every target reads (the
    source, or the atlases) and one more per target in flight (``jobs``): else one thread's maps could evict what the
    others read, to be recomputed. Its floor is given back after."""
    kept = cache.min_kept
    cache.min_kept = max(kept, shared + jobs) if jobs > 1 else kept
    try:
        yield
    finally:
        cache.min_kept = kept


def each_target(n_targets: int, work: Callable[[int], bool], jobs: int, cancel: threading.Event) -> None:
    """Call ``work(i)`` for every target index ``i``: one at a time until a target is matched (``work`` returns
    True; False for a target skipped as the caller's own problem, e.g. unreadable), so the source or atlases are
    embedded once, by that target; then the others ``jobs`` at a time, each thread with ``torch threads // jobs`` of
    torch's threads (at least one).

    Anything ``work`` raises, or an interrupt, sets ``cancel`` (which ``work`` passes to the matcher, so targets in
    flight stop at their next tile, or finish when they need none), starts no further target, waits for those in
    flight (through further interrupts: none of them may touch the caller's results once this returns) and is
    raised here. What finished before is the caller's to keep."""
    import torch

    from .embedding import concurrent_matching

    i = 0
    while i < n_targets and not work(i):  # until the source is embedded (a target matched)
        i += 1
    i += 1
    if jobs <= 1 or n_targets - i < 2:
        for k in range(i, n_targets):
            work(k)
        return
    with concurrent_matching(max(1, torch.get_num_threads() // jobs)):
        pool = ThreadPoolExecutor(jobs, thread_name_prefix="samembed-target")
        futures: list = []
        try:
            futures = [pool.submit(work, k) for k in range(i, n_targets)]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:  # the first error in the targets' order
                if f in finished and f.exception() is not None:
                    raise f.exception()
        except BaseException:
            # no further target, and the ones in flight waited for (they stop at their next tile or finish), through
            # further interrupts (a second Ctrl-C, a SIGTERM): their results must be in place before the caller
            # writes them, and the source's maps must not leave concurrent_matching while they read it. Waited for
            # by their futures, not by joining the pool's threads: a join that a signal interrupts takes the thread
            # for ended in this Python (3.11; bpo-45274), and a retried shutdown then returned while a target still
            # ran, which wrote its result after the caller had written the others (a review)
            cancel.set()
            _wait_for_all(futures, pool)
            raise
        pool.shutdown(wait=True)


def _wait_for_all(futures: list, pool: ThreadPoolExecutor) -> None:
    """Cancel what has not started in ``pool`` and wait until every one of ``futures`` is done, through any
    interrupt meanwhile."""
    while True:
        try:
            pool.shutdown(wait=False, cancel_futures=True)
            pending = [f for f in futures if not f.done()]
            if not pending:
                return
            wait(pending, timeout=0.1)
        except BaseException:  # noqa: BLE001, S112 - the first stop is the one the caller raises
            continue


class AnyOf:
    """A cancel that is set when any of ``events`` is (None ones left out): read-only, ``is_set()`` as the matcher
    reads its cancel, so a job can stop its own work without setting its caller's event."""

    def __init__(self, *events: threading.Event | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def each_atlas(n_atlases: int, match: Callable[[int, AnyOf], MatchResult], told: Callable[[str], None],
               device_type: str, cache: EmbeddingCache, cancel: threading.Event | None = None) -> list[MatchResult]:
    """The matches of ``n_atlases`` atlases into one target (``match(i, cancel)``: atlas ``i``'s, stopping at its next
    tile once ``cancel`` is set), in the atlases' order: the first alone (it embeds the target: its global map, the
    tiles of its windows), then the others two at a time on a CPU where torch has two threads or more, each with half
    of them, as :func:`each_target` runs targets; one at a time when targets already run at once
    (:func:`samembed.embedding.matching_concurrently`: ``--jobs``, a click's or a fusion's targets), on a GPU, or for
    fewer than three atlases. Each atlas's matches are the ones it gets alone (the target's tiles are the same whichever
    atlas computes them). While two run, the memory ``cache`` keeps the target and the atlases in flight.

    ``told(phase)`` names the atlases about to be matched ("atlas 2/3", "atlases 2-3/3"), always in the calling
    thread. The caller's ``cancel`` is never set here: each atlas gets one that is set by it, or by this call's own stop
    (an atlas's error or an interrupt stops the others at their next tile); the first error is raised once those in
    flight are done."""
    import torch

    from .embedding import matching_concurrently

    results: list[MatchResult | None] = [None] * n_atlases
    jobs = max(1, min(AUTO_JOBS, int(torch.get_num_threads())))
    if device_type != "cpu" or n_atlases < 3 or matching_concurrently():
        jobs = 1
    caller = threading.current_thread()
    stop = threading.Event()  # this call's own: set by each_target when an atlas fails or on an interrupt
    either = AnyOf(cancel, stop)

    def work(i: int) -> bool:
        if either.is_set():
            raise Cancelled("cancelled")
        if threading.current_thread() is caller and (jobs == 1 or i == 0):
            told(f"atlas {i + 1}/{n_atlases}")
        results[i] = match(i, either)
        if i == 0 and jobs > 1:
            told(f"atlases 2-{n_atlases}/{n_atlases}, {jobs} at a time")
        return True

    if jobs > 1:
        log.info("%d atlases: the first alone, then %d at a time", n_atlases, jobs)
    with cache_floor(cache, 1, jobs):
        each_target(n_atlases, work, jobs, stop)
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class MatchCall:
    """One :meth:`samembed.Matcher.match` of a target in :func:`match_each`: the source points (LPS mm), their labels
    (None: P1, P2, ..., as :meth:`~samembed.Matcher.match` names them) and the settings."""

    points_lps_mm: np.ndarray
    labels: tuple[str, ...] | None
    options: MatchOptions

    #: the images other than the target that the call reads (the source), kept in memory while targets run at once
    shared = 1

    def run(self, matcher: Matcher, source: Image | None, target: Image, cancel: threading.Event,
            target_names: list[str] | None) -> MatchResult:
        """The call's :meth:`~samembed.Matcher.match` of ``source`` into ``target``."""
        return matcher.match(source, self.points_lps_mm, [target], self.labels, self.options, cancel=cancel,
                             target_names=target_names)


@dataclass(frozen=True)
class FuseCall:
    """One :meth:`samembed.Matcher.match_atlases` of a target in :func:`match_each`: the landmarks of several
    atlases (:class:`~samembed.fusion.Atlas`, their images read: :class:`~samembed.image.Image`) matched into it
    and fused per landmark, with these settings. The source is not read (it may be None)."""

    atlases: tuple[Atlas, ...]
    options: MatchOptions
    fusion: FusionOptions = FusionOptions()

    @property
    def shared(self) -> int:
        """The images other than the target that the call reads: the atlases' (each once). While targets run at
        once, the memory cache keeps them all, whatever its cap, as ``samembed match --atlases --jobs`` does."""
        return len({id(a.image) for a in self.atlases})

    def run(self, matcher: Matcher, source: Image | None, target: Image, cancel: threading.Event,
            target_names: list[str] | None) -> MatchResult:
        """The call's :meth:`~samembed.Matcher.match_atlases` into ``target``."""
        return matcher.match_atlases(self.atlases, [target], self.options, fusion=self.fusion, cancel=cancel,
                                     target_names=target_names)


def atlases_of(calls: Sequence[Sequence[MatchCall | FuseCall]]) -> Iterator[Atlas]:
    """The atlases of every :class:`FuseCall` in ``calls`` (per target, its calls), in order, repeats included."""
    return (a for cs in calls for c in cs if isinstance(c, FuseCall) for a in c.atlases)


def with_atlas_images(calls: Sequence[Sequence[MatchCall | FuseCall]],
                      image_of: Callable[[Atlas], object]) -> list[list[MatchCall | FuseCall]]:
    """``calls`` with the image of each :class:`FuseCall`'s atlas replaced by ``image_of(atlas)`` (read from a path,
    or sent to the engine process as its volume's key and back), the atlas keeping its name
    (:attr:`~samembed.fusion.Atlas.display_name`). What is not an Atlas is left for
    :meth:`~samembed.Matcher.match_atlases` to name."""
    def atlas(a):
        return replace(a, image=image_of(a), name=a.display_name) if isinstance(a, Atlas) else a

    return [[replace(c, atlases=tuple(atlas(a) for a in c.atlases)) if isinstance(c, FuseCall) else c for c in cs]
            for cs in calls]


#: what :func:`match_each` tells of a target: None when it starts, its results (one per call) when it is matched, or
#: its own problem (:class:`~samembed.errors.TargetError`) when it is skipped
TargetEvent = Union[None, "list[MatchResult]", TargetError]


def match_each(matcher: Matcher, source: Image | None, targets: Sequence[Callable[[], Image]],
               calls: Sequence[Sequence[MatchCall | FuseCall]], on_target: Callable[[int, TargetEvent], None], *,
               jobs: int | None = None, cancel: threading.Event | None = None,
               target_names: Sequence[str] | None = None) -> None:
    """Match ``source`` (or atlases) into every target with that target's ``calls``, as :func:`each_target` orders
    them: one at a time until one is matched (it embeds the source, or the atlases), then ``jobs`` at a time (None:
    :func:`auto_jobs`). Run by :meth:`samembed.Matcher.match_each`, which tells each target in its caller's thread.

    Args:
        source: the image the points of the :class:`MatchCall` are in (None when every call is a :class:`FuseCall`).
        targets: per target, a function that gives its image (read when the target's turn comes).
        calls: per target, the matches to make (:class:`MatchCall`, e.g. the points, then one point's heatmap; or
            :class:`FuseCall`, several atlases' landmarks fused there).
        on_target: ``on_target(i, event)`` (:data:`TargetEvent`) when target ``i`` starts, is matched or is skipped;
            never two calls at once (from the thread that matched it). What it raises stops the job as an error does.
        cancel: set to stop: targets in flight stop at their next tile; :class:`~samembed.errors.Cancelled` is raised.
        target_names: the targets' names in messages (default: the images' names).

    Raises:
        samembed.Cancelled, or the first error other than a target's own problem; the targets told as matched
        before it are the caller's to keep.
    """
    import torch

    n = len(targets)
    if len(calls) != n:
        raise ValueError(f"{len(calls)} lists of calls for {n} targets")
    cancel = threading.Event() if cancel is None else cancel
    heatmaps = any(isinstance(c, MatchCall) and c.options.heatmap for cs in calls for c in cs)
    jobs = auto_jobs(n, torch.get_num_threads(), matcher.device.type, heatmaps) if jobs is None else max(1, int(jobs))
    told = threading.Lock()

    def tell(i: int, event: TargetEvent) -> None:
        with told:
            if event is None and cancel.is_set():  # no target starts once the job is stopped (checked here, under
                raise Cancelled("cancelled")  # the lock: a cancel may come while the other target is being told)
            on_target(i, event)

    def work(i: int) -> bool:
        tell(i, None)
        names = None if target_names is None else [target_names[i]]
        try:
            with of_the_target():
                image = targets[i]()
            results = [c.run(matcher, source, image, cancel, names) for c in calls[i]]
        except TargetError as e:
            tell(i, e)
            return False
        tell(i, results)
        return True

    if jobs > 1 and n > 2:
        log.info("%d targets: the first alone, then %d at a time", n, jobs)
    with cache_floor(matcher.cache, max((c.shared for cs in calls for c in cs), default=1), jobs):
        each_target(n, work, jobs, cancel)
