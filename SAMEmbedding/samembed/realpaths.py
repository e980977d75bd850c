"""``os.path.realpath`` with each folder resolved once, while torch loads in an engine process.

During torch's import, the first custom operator it registers names its source line (``inspect.getframeinfo``), and
:func:`inspect.getmodule` then builds its map of every loaded module's file: ``os.path.realpath`` of each, about a
thousand paths. ``realpath`` is written in Python on POSIX and walks every component of every path with an ``lstat``
(``/work/.../site-packages/torch/...``, a dozen components each): 0.04-0.06 s of a cold ``samembed match`` on the
2-core VM, every time, because the map is built once per process (if not there, by ``torch.jit``'s overload checks a
moment later).

:func:`memoise_realpath` puts a version in its place that resolves each folder once and then only checks whether the
file's own name is a symbolic link (one ``lstat``): the same answer, as long as no link on the way changes while torch
loads, for every path it takes; any other path (relative, not normalised, bytes, ``strict=True``, a file name that is
itself a link) goes to the original. :func:`restore_realpath` puts the original back; the engine's processes call the
two around torch's import (:mod:`samembed.torch_import`), so the rest of the process, and any script, sees Python's
own (a prefetch process forked in between keeps the memoised one, which answers the same). Only on POSIX. This
module imports no torch.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable

_original: Callable[..., str] | None = None


def _memoised(original: Callable[..., str]) -> Callable[..., str]:
    folders: dict[str, str] = {}

    def realpath(filename, *, strict: bool = False):
        if (strict or not isinstance(filename, str) or not filename.startswith("/")
                or posixpath.normpath(filename) != filename):
            return original(filename, strict=strict)
        head, tail = posixpath.split(filename)
        if not tail:  # the root
            return original(filename)
        folder = folders.get(head)
        if folder is None:
            folder = folders[head] = original(head)
        resolved = posixpath.join(folder, tail)
        # the folder is resolved; the name is resolved too unless it is a link (which the original follows)
        return original(filename) if posixpath.islink(resolved) else resolved

    realpath.__doc__ = original.__doc__
    return realpath


def memoise_realpath() -> bool:
    """Until :func:`restore_realpath`, resolve each folder once in ``os.path.realpath`` (see the module docstring).
    Returns whether it did (not on Windows, nor a second time)."""
    global _original
    if os.name != "posix" or _original is not None:
        return False
    _original = posixpath.realpath
    posixpath.realpath = _memoised(_original)  # os.path is posixpath: os.path.realpath too
    return True


def restore_realpath() -> None:
    """Put Python's own ``os.path.realpath`` back (nothing when :func:`memoise_realpath` did not replace it)."""
    global _original
    if _original is not None:
        posixpath.realpath = _original
        _original = None
