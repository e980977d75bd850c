"""Plain copies of the engine's results, free of torch: what the engine process sends back.

``samembed.api.Match`` lives in a module that imports torch, so Slicer's main process would load torch just to
unpickle one. :class:`MatchValue` and :class:`ResultValue` carry the same attributes (the logic reads them the same
way) and import only numpy and samembed's torch-free image module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from samembed import lps_to_ras


@dataclass
class MatchValue:
    """One matched point, as ``samembed.Match`` (positions LPS mm, score in [-1, 1], round trip mm)."""

    label: str
    target: str
    target_index: int
    point_lps_mm: np.ndarray
    score: float
    confident: bool
    roundtrip_mm: float
    rematched: bool = False
    polished: bool = False
    ncc: float = float("nan")
    atlases: int = 1
    agreeing: int = 1
    spread_mm: float = 0.0
    rejected: tuple = ()

    @property
    def point_ras_mm(self) -> np.ndarray:
        """Matched position in RAS mm (Slicer)."""
        return lps_to_ras(self.point_lps_mm)

    @classmethod
    def of(cls, match) -> MatchValue:
        """A copy of a ``samembed.Match`` (or anything with its attributes)."""
        return cls(str(match.label), str(match.target), int(match.target_index), np.asarray(match.point_lps_mm, float),
                   float(match.score), bool(match.confident), float(match.roundtrip_mm), bool(match.rematched),
                   bool(match.polished), float(match.ncc), int(getattr(match, "atlases", 1)),
                   int(getattr(match, "agreeing", 1)), float(getattr(match, "spread_mm", 0.0)),
                   tuple(getattr(match, "rejected", ())))


@dataclass
class ResultValue:
    """The matches of one ``match`` call, as ``samembed.MatchResult``: heatmaps keyed ``(target index, label)``."""

    matches: list[MatchValue]
    targets: list[str]
    heatmaps: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, result) -> ResultValue:
        """A copy of a ``samembed.MatchResult`` (heatmap images are shared, not copied)."""
        return cls([MatchValue.of(m) for m in result.matches], list(result.targets), dict(result.heatmaps),
                   dict(result.timings))
