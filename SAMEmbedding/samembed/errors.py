"""Typed errors raised on purpose by the engine.

Every message names the file (or object) and the problem, and says what to do. The CLI maps
:class:`InputError` (and its subclasses) to exit code 2 and anything else to exit code 1; a command over many scans
that finished, some of whose scans failed, exits with :data:`EXIT_SOME_FAILED`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: exit code of a command over many scans (``samembed match`` with several targets, ``samembed propagate``) that went
#: through all of them, some of which failed: each is named, and the others' results are written
EXIT_SOME_FAILED = 3


class SamEmbedError(Exception):
    """Base of every error the engine raises on purpose."""


class InputError(SamEmbedError, ValueError):
    """Bad file, point, option or geometry given by the user; the CLI exits with 2."""


class TargetError(InputError):
    """A problem of one target image, not of the source, the points or the settings: it cannot be read (also for lack
    of permission, among several targets), is too small for the model, has another dimension than the source, or
    leaves nothing to search. A command over many targets names it and skips that target (``samembed match`` with
    several targets, the Slicer module's point matching and multi-atlas fusion).

    Raised by ``Matcher.match`` over several targets, it tells which and keeps what was done: ``target_index`` is
    the target's place among them, ``partial`` the ``MatchResult`` of the targets finished before it, so that a
    script can keep those and go on with the targets after it."""

    target_index: int | None = None
    partial: Any = None


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit the architecture (lists the mismatches)."""


class ModelNotAvailableError(InputError):
    """A registered model whose weights are not present on this machine."""


class DeviceUnavailableError(InputError):
    """The requested compute device (e.g. CUDA) is not present."""


class Cancelled(SamEmbedError):
    """Raised when a long operation is cancelled; ``partial`` holds what was finished."""

    def __init__(self, message: str = "cancelled", partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial


@contextlib.contextmanager
def of_the_target() -> Iterator[None]:
    """An :class:`InputError` raised inside is the target's own problem (reading it, embedding it, its search region):
    raised as a :class:`TargetError` with the same message, which a command over many targets skips. The errors of
    the machine (:class:`DeviceUnavailableError`) and of the model pass as they are."""
    try:
        yield
    except (TargetError, DeviceUnavailableError, CheckpointError, ModelNotAvailableError):
        raise
    except InputError as e:
        raise TargetError(str(e)) from e


def refuse_mixed_dimensions(named_ndims: list[tuple[str, int]], of: str) -> None:
    """Raise :class:`InputError` listing each atlas's dimension when the atlases ``named_ndims`` ((name, 2 or 3)) are
    not all of one: each target (or scan: ``of``) would be refused by some of them as if it were at fault."""
    if len({d for _, d in named_ndims}) > 1:
        dims = ", ".join(f"{name} ({d}D)" for name, d in named_ndims)
        raise InputError(f"the atlases are not all of one dimension: {dims}; give atlases of the {of}' dimension")


#: what an allocation that failed says, from Python, torch, oneDNN's loader or the dynamic linker
_OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "cannot allocate memory", "out of memory", "failed to map segment")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (``MemoryError``; torch's "DefaultCPUAllocator: can't allocate
    memory"; a library that could not be mapped under a memory limit, which reads as a broken install)."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(t in text for t in _OUT_OF_MEMORY_TEXTS)


def out_of_memory_advice(error: BaseException) -> str:
    """One line for a user whose run ran out of memory: what happened and what to do."""
    text = str(error).strip() or type(error).__name__
    return (f"out of memory ({type(error).__name__}: {text[:200]}): this machine, or its memory limit (ulimit -v, a "
            "container's), could not hold the run; match fewer targets at once (--jobs 1), close other programs, or "
            "raise the limit")
