"""samembed: SAM (Self-supervised Anatomical eMbedding) engine.

Find the same anatomical point across medical images: every voxel gets a global vector (coarse body
position) and a local vector (fine structure); a point is matched by the best joint cosine similarity.

Public API::

    from samembed import Matcher, MatchOptions
    result = Matcher(model="default", device="auto").match(source, points_lps_mm, targets,
                                                          options=MatchOptions(refine=False, polish=True))

Importing this package loads no Slicer, Qt or VTK module.
"""

from typing import TYPE_CHECKING

from .errors import (
    Cancelled,
    CheckpointError,
    DeviceUnavailableError,
    InputError,
    ModelNotAvailableError,
    SamEmbedError,
    TargetError,
)
from .options import MatchOptions

if TYPE_CHECKING:  # the lazy names below, for type checkers
    from .api import Matcher
    from .fusion import Atlas, FusionOptions
    from .image import Grid, Image, lps_to_ras, ras_to_lps
    from .io import read_image, read_points, write_image
    from .result import Match, MatchResult

__version__ = "0.1.0"

#: the public names loaded on first use, and their modules: ``import samembed`` (and ``import samembed.cli``) loads
#: no numpy, so that the ``samembed`` command can set numpy's BLAS threads before numpy loads
#: (:mod:`samembed.blas_threads`); torch loads with ``Matcher``, SimpleITK with the readers
_LAZY = {"Atlas": "fusion", "FusionOptions": "fusion", "Grid": "image", "Image": "image", "lps_to_ras": "image",
         "ras_to_lps": "image", "Match": "result", "MatchResult": "result", "Matcher": "api", "read_image": "io",
         "write_image": "io", "read_points": "io"}
#: lazy names that load torch or SimpleITK: left out of ``dir(samembed)``, so that listing the package (tab
#: completion, ``inspect.getmembers``, ``help``) loads neither
_HEAVY = frozenset({"Matcher", "read_image", "write_image", "read_points"})


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'samembed' has no attribute {name!r}; the public names: {', '.join(__all__)}")


__all__ = [
    "Atlas", "Cancelled", "FusionOptions", "CheckpointError", "DeviceUnavailableError", "Grid", "Image", "InputError", "Match", "MatchOptions",
    "MatchResult", "Matcher", "ModelNotAvailableError", "SamEmbedError", "TargetError", "lps_to_ras", "ras_to_lps", "read_image",
    "read_points", "write_image", "__version__",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | (set(__all__) - _HEAVY))
