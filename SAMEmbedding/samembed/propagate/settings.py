"""How a propagation run executes: :class:`PropagateSettings` (one frozen value) and the atlas it carries.

Torch- and dask-free, so ``samembed --help`` and the CLI's argument checks stay fast. What is *matched* is a
:class:`~samembed.options.MatchOptions`; what is set here is *where and how* the work runs (model, cluster,
output), plus the few engine settings that change results (model, modality, tiling, precision), which enter the run's
fingerprint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import InputError
from ..options import MODALITIES, PRECISIONS


@dataclass(frozen=True)
class Atlas:
    """One annotated image: the image file and its point file (CSV ``label,x,y,z``, ``.fcsv``, ``.mrk.json``).

    ``ras`` says that a CSV point file is in RAS (Slicer) instead of LPS mm; ``.fcsv``/``.mrk.json`` carry
    their own frame.
    """

    image: str
    points: str
    ras: bool = False
    #: the image's and the point file's paths as given (absolute, links not followed): what the outputs name it by
    given: tuple[str, str] = dataclasses.field(default=("", ""), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "given", tuple(os.path.abspath(Path(p).expanduser()) for p in (self.image, self.points)))
        object.__setattr__(self, "image", str(Path(self.image).expanduser().resolve()))
        object.__setattr__(self, "points", str(Path(self.points).expanduser().resolve()))
        if not Path(self.image).exists():
            raise InputError(f"{self.image}: atlas image not found; check the first path of --atlas IMAGE POINTS")
        if not Path(self.points).is_file():
            raise InputError(f"{self.points}: atlas point file not found; check the second path of --atlas IMAGE POINTS")


class EngineKey(NamedTuple):
    """What a worker's :class:`~samembed.api.Matcher` is built from (:meth:`PropagateSettings.engine_key`)."""

    model: str
    device: str
    modality: str
    max_tile_voxels: int
    spacing_mm: float | None
    cache_bytes: int
    precision: str


@dataclass(frozen=True)
class PropagateSettings:
    """Where and how a propagation runs (sizes in bytes, times in seconds).

    Attributes:
        model: model name, checkpoint path or ``random:<arch>`` (as ``Matcher(model=...)``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` on each worker.
        precision: the network's arithmetic on each worker (``samembed match --precision``; part of the run's
            fingerprint).
        modality: ``"auto"``, ``"ct"``, ``"mri"`` or ``"xray"``.
        max_tile_voxels: inputs larger than this are embedded in slabs (``Matcher(max_tile_voxels=...)``).
        spacing_mm: pixel spacing assumed for 2D files without one (PNG/JPEG).
        workers: number of local worker processes (one thread each) when no ``scheduler`` is given.
        scheduler: address of an existing Dask scheduler (``tcp://host:8786``, ``tls://...``) to join instead
            of starting a local cluster; TLS uses Dask's own security settings (``distributed.comm.tls.*``).
        memory_limit: per local worker, as Dask takes it (``"4GB"``, ``"auto"``: the machine's memory / workers).
        cache_dir: the embedding cache folder that carries the atlas embedding to the workers (default
            ``OUT/cache``); on a multi-machine cluster it must be on a file system every worker sees.
        cache_bytes: memory cap of each worker's in-memory embedding cache.
        resume: continue a run in the same output folder, skipping scans finished with the same settings.
        ras: write ``.mrk.json`` files in RAS (Slicer) instead of LPS; ``matches.csv`` is always LPS mm.
        report: write ``report.html`` at the end.
        thumbnails: render the axial/coronal thumbnails of each landmark (on the workers).
        thumbnail_mm: width of a thumbnail crop, mm.
        report_thumbnails: at most this many (scan, landmark) thumbnails go into the report, least confident
            first, so that a 10,000-scan report stays a few tens of MB.
        csv_every_s: ``matches.csv``/``failures.csv`` are rewritten (atomically) at most this often while the
            run goes, and always at its end; each scan's own files are written as soon as it arrives.
        progress: show a progress bar on stderr.
    """

    model: str = "default"
    device: str = "auto"
    precision: str = "auto"
    modality: str = "auto"
    max_tile_voxels: int = 24_000_000
    spacing_mm: float | None = None
    workers: int = 2
    scheduler: str | None = None
    memory_limit: str = "auto"
    cache_dir: str | None = None
    cache_bytes: int = 3 << 30
    resume: bool = False
    ras: bool = False
    report: bool = True
    thumbnails: bool = True
    thumbnail_mm: float = 80.0
    report_thumbnails: int = 3000
    csv_every_s: float = 10.0
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise InputError(f"workers must be a whole number >= 1, not {self.workers!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.modality not in MODALITIES:
            raise InputError(f"modality must be auto, ct, mri or xray, not {self.modality!r}")
        if self.scheduler is not None and "://" not in self.scheduler:
            raise InputError(f"scheduler {self.scheduler!r}: give the full address, e.g. tcp://host:8786 or tls://host:8786")
        for name in ("thumbnail_mm", "csv_every_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise InputError(f"{name} must be a number >= 0, not {getattr(self, name)!r}")
        thumbs = self.report_thumbnails
        if not isinstance(thumbs, int) or isinstance(thumbs, bool) or thumbs < 0:
            raise InputError(f"report_thumbnails (--report-thumbnails) must be a whole number >= 0, not {thumbs!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.memory_limit not in ("auto", None):  # Dask's sizes (else its own error, an internal one, once the
            # cluster starts); None: no limit, as Dask takes it
            try:
                from dask.utils import parse_bytes
            except ImportError:  # (propagate itself says that Dask is missing)
                parse_bytes = None
            try:
                if parse_bytes is not None:
                    parse_bytes(self.memory_limit)
            except (TypeError, ValueError, AttributeError):
                raise InputError(f"memory limit (--memory-limit) {self.memory_limit!r}: give a size per worker such as "
                                 "6GB or 6000MB, or auto (the machine's memory shared by the workers)") from None

    def replace(self, **changes: Any) -> PropagateSettings:
        """A copy with some settings changed."""
        known = {f.name for f in fields(self)}
        for key in changes:
            if key not in known:
                raise InputError(f"unknown propagate setting {key!r}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for ``run.json``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def engine_key(self) -> EngineKey:
        """The settings a worker's Matcher is built from (workers keep one Matcher per key)."""
        return EngineKey(self.model, self.device, self.modality, self.max_tile_voxels, self.spacing_mm,
                         self.cache_bytes, self.precision)

    def result_fields(self) -> dict[str, Any]:
        """The settings that change results, for the run's fingerprint (not where or how fast it runs)."""
        fields_ = {"modality": self.modality, "max_tile_voxels": self.max_tile_voxels, "spacing_mm": self.spacing_mm,
                   "ras": self.ras}  # the model enters as its id and SHA-256 (resolved on a worker)
        if self.precision != "auto":  # (runs before --precision reached the workers ran auto: theirs stay valid)
            fields_["precision"] = self.precision
        return fields_


