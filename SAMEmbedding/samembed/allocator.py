"""How the C allocator of an engine process keeps freed memory: reused by later tiles, not handed back to the OS.

Embedding runs the network tile by tile, and each tile allocates and frees large activations (a few MB to tens of MB
each). glibc serves an allocation above its mmap threshold (128 KB, raised up to 32 MB as such blocks are freed)
with a fresh mapping and unmaps it on free, and returns free memory at the top of its heap above the trim threshold
(twice the mmap threshold). Either way later allocations start from pages the kernel must fault in and zero again:
measured on a cold ``samembed match`` of two head-and-neck CTs, 250-290 k minor page faults and 0.8-0.9 s of system
time (about 3 us a fault on a VM). With :func:`keep_freed_memory`, allocations below 64 MiB come from the heap, and
the heap keeps up to 256 MiB of free memory at its top. PyTorch asks for each tensor with ``posix_memalign``, a
little more than a freed tensor of the same size, so a freed block serves later, differently sized tensors once its
free neighbours have merged with it, not the same tensor again. Measured side by side (5 alternating runs each; the
local network's own faults in a pair 52 k -> 6 k): pairs 180-185 k faults and 0.55-0.57 s of system time, the user
time unchanged, 1.06x-1.26x faster; one atlas into 5 targets 620 k -> 390 k faults, 1.11x; peak RSS +0.03-0.1 GB;
the same results (``benchmarks/results/cold_ab.md``).

It is a process-wide setting, so the engine applies it only in processes of its own: the ``samembed match`` and
``samembed embed`` commands, and the Slicer module's engine process, which returns what is free to the OS after each
request (:func:`release_free_memory`), so that it holds no more than its cache while idle. A script may call them
too. This module imports no torch.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc ``<malloc.h>``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: allocations below this come from the heap and are reused after they are freed, bytes (the features of a whole
#: volume, hundreds of MB, are still mapped on their own and unmapped when freed)
MMAP_THRESHOLD_BYTES = 64 << 20
#: the largest mmap threshold every glibc accepts on 64-bit systems (``mallopt(3)``; glibc before 2.35 or so refuses
#: more), bytes: the fallback where :data:`MMAP_THRESHOLD_BYTES` is refused
MMAP_THRESHOLD_MAX_BYTES = 32 << 20
#: free memory the heap keeps at its top instead of returning it to the OS, bytes
TRIM_THRESHOLD_BYTES = 256 << 20
_INT_MAX = 2**31 - 1  # mallopt takes an int


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (which has ``mallopt`` and ``malloc_trim``), else None (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols this process has loaded, the C library's among them (no search)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        libc.malloc_trim.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


#: the environment variables by which a user tunes glibc's allocator (``mallopt(3)``); ``GLIBC_TUNABLES`` too, where
#: it names a ``glibc.malloc.`` tunable
MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                    "MALLOC_ARENA_MAX")


def users_malloc_settings(environ: Mapping[str, str], besides: Mapping[str, str] | None = None) -> list[str]:
    """The allocator settings a user made in ``environ`` (see :data:`MALLOC_VARIABLES`), which
    :func:`keep_freed_memory` leaves as they are: a user who keeps a container's memory low by them keeps it so.
    ``besides``: values not made by the user, but by the program that started this process (Dask's nannies start
    their workers with ``MALLOC_TRIM_THRESHOLD_=65536``)."""
    besides = besides or {}
    found = [name for name in MALLOC_VARIABLES if environ.get(name, "") != "" and environ.get(name) != besides.get(name)]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return found


def keep_freed_memory(mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES,
                      trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES,
                      besides: Mapping[str, str] | None = None) -> bool:
    """Have this process's allocator keep freed memory for reuse (see the module docstring): allocations below
    ``mmap_threshold_bytes`` from the heap (or below :data:`MMAP_THRESHOLD_MAX_BYTES` where this glibc refuses more),
    up to ``trim_threshold_bytes`` of free memory kept at the heap's top.

    Returns whether the setting took effect. Where the C library is not glibc, or it refuses both thresholds, nothing
    changes: the trim threshold is set only with the mmap threshold, since setting it alone would stop glibc from
    raising its mmap threshold by itself. Applies to this process and to processes it forks afterwards, not to
    processes it starts otherwise. Nothing changes either where the user tuned the allocator in the environment
    (:func:`users_malloc_settings`; ``besides`` as there).

    Raises:
        ValueError: a threshold outside 0..2^31 - 1 bytes (``mallopt`` takes an int).
    """
    for name, value in (("mmap_threshold_bytes", mmap_threshold_bytes), ("trim_threshold_bytes", trim_threshold_bytes)):
        if not 0 <= int(value) <= _INT_MAX:
            raise ValueError(f"{name}={value}: must be 0..{_INT_MAX} bytes")
    libc = _glibc()
    if libc is None:
        return False
    users = users_malloc_settings(os.environ, besides)
    if users:
        log.info("the allocator is tuned in the environment (%s): freed memory is returned as set there",
                 ", ".join(users))
        return False
    ok = any(bool(libc.mallopt(M_MMAP_THRESHOLD, v))
             for v in (int(mmap_threshold_bytes), min(int(mmap_threshold_bytes), MMAP_THRESHOLD_MAX_BYTES)))
    if not ok:
        log.info("this C library refuses an mmap threshold of %d bytes: freed memory is returned as before",
                 mmap_threshold_bytes)
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold_bytes)))


def release_free_memory() -> bool:
    """Return the heap's free memory to the OS now (glibc's ``malloc_trim(0)``; False elsewhere or when nothing was
    returned): for a long-lived process that kept freed memory (:func:`keep_freed_memory`) and goes idle, so that
    what one request freed does not stay resident until the next."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
