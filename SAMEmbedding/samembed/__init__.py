"""samembed: SAM (Self-supervised Anatomical eMbedding) engine.

Find the same anatomical point across medical images: every voxel gets a global vector (coarse body
position) and a local vector (fine structure); a point is matched by the best joint cosine similarity.

Public API::

    from samembed import Matcher
    result = Matcher(model="default", device="auto").match(source, points_lps_mm, targets,
                                                          options=MatchOptions(refine=False, polish=True))

Importing this package loads no Slicer, Qt or VTK module.
"""

from .errors import (
    Cancelled,
    CheckpointError,
    DeviceUnavailableError,
    InputError,
    ModelNotAvailableError,
    SamEmbedError,
    TargetError,
)
from .fusion import Atlas, FusionOptions
from .image import Grid, Image, lps_to_ras, ras_to_lps
from .options import MatchOptions
from .result import Match, MatchResult

__version__ = "0.1.0"


def __getattr__(name):  # lazy: keep `import samembed` light (torch loads on first use)
    if name == "Matcher":
        from . import api

        return getattr(api, name)
    if name in ("read_image", "write_image", "read_points"):  # SimpleITK loads on first use
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'samembed' has no attribute {name!r}; the public names: {', '.join(__all__)}")


__all__ = [
    "Atlas", "Cancelled", "FusionOptions", "CheckpointError", "DeviceUnavailableError", "Grid", "Image", "InputError", "Match", "MatchOptions",
    "MatchResult", "Matcher", "ModelNotAvailableError", "SamEmbedError", "TargetError", "lps_to_ras", "ras_to_lps", "read_image",
    "read_points", "write_image", "__version__",
]
