"""Typed errors raised on purpose by the engine.

Every message names the file (or object) and the problem, and says what to do. The CLI maps
:class:`InputError` (and its subclasses) to exit code 2 and anything else to exit code 1; a command over many scans
that finished, some of whose scans failed, exits with :data:`EXIT_SOME_FAILED`.
"""

from __future__ import annotations

from typing import Any

#: exit code of a command over many scans (``samembed match`` with several targets, ``samembed propagate``) that went
#: through all of them, some of which failed: each is named, and the others' results are written
EXIT_SOME_FAILED = 3


class SamEmbedError(Exception):
    """Base of every error the engine raises on purpose."""


class InputError(SamEmbedError, ValueError):
    """Bad file, point, option or geometry given by the user; the CLI exits with 2."""


class TargetError(InputError):
    """A problem of one target image, not of the source, the points or the settings: it cannot be read, is too small
    for the model, has another dimension than the source, or leaves nothing to search. A command over many targets
    names it and skips that target (``samembed match`` with several targets)."""


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
