"""The feature buffer of freed maps, kept for the next image's maps in a process that matches many targets.

Each on-demand map holds a feature buffer for its whole local grid (:func:`samembed.tiles.new_feature_rows`), and a
tile stored into it makes its voxels' pages resident: the kernel faults in and zeroes each 4 KB page on its first
touch. On a VM a fault costs 5-20 us, and one target of an atlas run stores 9-14 k pages of tiles. The buffer is
hundreds of MB of address space, so the C allocator maps it on its own and unmaps it when it is freed: the next
target's buffer starts from fresh pages again, even at the same address.

With :func:`keep_freed_rows` (a process-wide setting, for a process of the engine's own), the buffer of maps that
are freed is kept, with its resident pages, and the next buffer of the same dtype and device that fits in it is a
view of it. The searches of one atlas's points into targets of the same kind touch much the same rows, so most of
the next target's tiles land on pages already resident (measured over 5 head-and-neck CTs: 61-99 % of a target's
pages). A buffer comes back uninitialised either way: a map reads only the voxels it computed (``ready``).

A buffer is kept only when nothing else refers to its memory any more: a view of a freed map's features that a
caller still holds (``maps.local``, say) keeps it out of the pool, so a later map never writes into memory someone
reads. One buffer is kept at a time (the largest), as resident memory: :func:`drop_spare` frees it. This module
imports torch only when a buffer is made.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_lock = threading.Lock()
_enabled = False
#: the 1-D allocations of freed maps' buffers, the most recent last (at most :data:`KEPT`)
_kept: list[torch.Tensor] = []
#: buffers kept at a time: a target's maps are freed while the next target's are in use (two buffers in turn)
KEPT = 2
_served = 0  # buffers served from kept ones in this process


def keep_freed_rows(enabled: bool = True) -> None:
    """Keep the feature buffers of freed maps for later maps' buffers in this process (see the module docstring);
    ``enabled=False`` stops it and frees the buffers kept."""
    global _enabled
    _enabled = bool(enabled)
    if not enabled:
        drop_kept()


def drop_kept() -> None:
    """Free the buffers kept for later maps."""
    with _lock:
        _kept.clear()


def kept_bytes() -> int:
    """Bytes of address space of the buffers kept for later maps (their resident pages are at most that)."""
    with _lock:
        return sum(b.numel() * b.element_size() for b in _kept)


def reuses() -> int:
    """How many buffers this process served from freed ones (for logs and tests)."""
    return _served


def _only_ours(base: torch.Tensor) -> bool:
    """Nothing but ``base`` refers to its memory (no view of it is held anywhere else)."""
    import torch

    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # without a way to tell, nothing is reused
        return False
    # held by ``base``, by the tensor it is a view of (if any) and by the storage object made here to ask: any more
    # is a view held elsewhere
    return use_count(base.untyped_storage()._cdata) <= 2 + (base._base is not None)


def take(n_values: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised 1-D buffer of ``n_values``: the first values of the most recently freed buffer kept that
    has this dtype and device and is large enough (it is then no longer kept), else a new one. A kept buffer that is
    still referred to elsewhere is let go (it is freed when that reference goes)."""
    import torch

    global _served
    device = torch.device(device)
    with _lock:
        kept = [b for b in _kept if _only_ours(b)]
        _kept.clear()
        for b in reversed(kept):
            if b.dtype == dtype and b.device == device and b.numel() >= n_values:
                _kept.extend(k for k in kept if k is not b)
                _served += 1
                log.debug("feature buffer of %d MB served from a freed one of %d MB", n_values * b.element_size() >> 20,
                          b.numel() * b.element_size() >> 20)
                return b[:n_values]
        _kept.extend(kept)
    return torch.empty(int(n_values), dtype=dtype, device=device)


def give_back_when_freed(owner: object, rows: torch.Tensor) -> None:
    """When ``owner`` (the maps that hold ``rows``) is freed, keep the allocation ``rows`` is a view of for a later
    :func:`take`; nothing unless :func:`keep_freed_rows` is on, and only for CPU memory (what faults)."""
    if not _enabled or rows.device.type != "cpu":
        return
    base = rows if rows._base is None else rows._base
    if base.storage_offset() != 0 or not base.is_contiguous():
        return
    finalizer = weakref.finalize(owner, _give_back, base if base.dim() == 1 else base.view(-1))
    finalizer.atexit = False  # at exit there is no later map


def _give_back(flat: torch.Tensor) -> None:
    """Keep ``flat`` for a later :func:`take`. The maps being freed still hold their views of it while this runs
    (a finalizer runs before the object's attributes are cleared), so whether it is referred to elsewhere is asked
    when it is taken."""
    if not _enabled:
        return
    with _lock:
        _kept.append(flat)
        del _kept[:-KEPT]
