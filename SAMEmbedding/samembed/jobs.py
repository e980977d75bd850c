"""Matching one command's targets several at once (``samembed match --jobs``).

One target at a time leaves a core idle on a CPU of two or more: between torch's kernels, the search, the polish,
the prior's fit and the bookkeeping run on one core, and torch's kernels themselves gain little from a second thread
on the small tiles of one target. Two targets at once, each with its share of torch's threads, keep both cores
busy. One atlas into 20 OpenKBP CTs on the 2-core VM (``samembed match`` with torch's default two threads):
13.3-13.9 s one at a time, 10.6-10.8 s two at a time, the same table byte for byte.

The first target is matched alone, with every thread: it embeds the source (its global map and the tiles around the
points and their round trips), which every later target reads. The later targets then run ``jobs`` at a time inside
:func:`samembed.embedding.concurrent_matching`, which keeps the source's maps consistent while several threads read
and fill them. Each target's result is the one it gets alone: torch's kernels give the same values on one thread
as on two (tested), and every tile of the source is computed once, under its maps' lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

log = logging.getLogger(__name__)

#: ``--jobs auto`` runs at most this many targets at once (each holds its own maps: memory grows with it)
AUTO_JOBS = 2


def auto_jobs(n_targets: int, torch_threads: int, device_type: str) -> int:
    """The targets to match at once when the user does not say: :data:`AUTO_JOBS` on a CPU with that many of torch's
    threads, for three targets or more (the first is matched alone); else 1. A GPU runs one target at a time."""
    if device_type != "cpu" or n_targets < 3:
        return 1
    return max(1, min(AUTO_JOBS, int(torch_threads)))


def each_target(n_targets: int, work: Callable[[int], None], jobs: int, cancel: threading.Event) -> None:
    """Call ``work(i)`` for every target index ``i``: the first alone, then the others ``jobs`` at a time, each thread
    with ``torch threads // jobs`` of torch's threads (at least one).

    ``work`` handles its target's own failures (a :class:`~samembed.errors.TargetError` is the caller's to report
    and skip); anything else it raises, or an interrupt, sets ``cancel`` (which ``work`` passes to the matcher, so
    targets in flight stop at their next tile), starts no further target, waits for those in flight and is raised
    here. What finished before is the caller's to keep."""
    import torch

    from .embedding import concurrent_matching

    if n_targets == 0:
        return
    work(0)
    if jobs <= 1 or n_targets < 3:
        for i in range(1, n_targets):
            work(i)
        return
    with concurrent_matching(max(1, torch.get_num_threads() // jobs)):
        pool = ThreadPoolExecutor(jobs, thread_name_prefix="samembed-target")
        futures = [pool.submit(work, i) for i in range(1, n_targets)]
        try:
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:  # the first error in the targets' order
                if f in finished and f.exception() is not None:
                    raise f.exception()
        except BaseException:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
