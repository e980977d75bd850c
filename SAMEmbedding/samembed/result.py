"""What a match returns: :class:`Match` (one point) and :class:`MatchResult` (one ``Matcher.match`` call).

Torch-free (numpy and :mod:`samembed.image` only), so a result can be pickled to and read by a process that never
loads torch, such as Slicer's main process reading the engine process's answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .heatmap import Heatmaps
from .image import lps_to_ras
from .names import joined_names


def markups_description(m: Mapping[str, Any], rejected: Sequence[str] = (), fused: bool | None = None) -> str:
    """A match's description in a ``.mrk.json`` or ``.fcsv``: readable, and parseable as ``key=value`` pairs.
    ``m`` holds a :class:`Match`'s fields by name (``score``, ``confident``, ``roundtrip_mm``, ``rematched``,
    ``polished``, ``ncc``, and for a fused match ``atlases``, ``agreeing``, ``spread_mm``); ``rejected``: the
    rejected atlases' names in the outputs (:func:`samembed.names.joined_names` joins them); ``fused``: whether the
    matches were fused from atlases (their counts are then written for every point, a landmark of one atlas's too;
    None: where more than one atlas carried it)."""
    text = f"score={m['score']:.3f}; confident={str(m['confident']).lower()}; roundtrip_mm={m['roundtrip_mm']:.1f}"
    text += "; rematched=true" if m["rematched"] else ""
    text += f"; polished=true; ncc={m['ncc']:.3f}" if m["polished"] else ""
    if fused or fused is None and m.get("atlases", 1) > 1:
        text += f"; atlases={m['atlases']}; agreeing={m['agreeing']}; spread_mm={m['spread_mm']:.1f}"
    text += f"; rejected={joined_names(rejected)}" if rejected else ""
    return text


@dataclass
class Match:
    """One matched point.

    Attributes:
        label: the source point's label.
        target: the target's name (file path or given name); ``target_index`` its position in the list.
        point_lps_mm: matched position, LPS mm (3 values; in 2D, z = 0 for a picture, the slice's z for a
            one-slice volume).
        score: SAM similarity where the match ended (mean of local and global cosine, in [-1, 1]); it equals the
            heatmap's value there.
        confident: the round trip target -> source (searched the same way: with the prior window, inside the
            inverse affine's window, and polished back when the match was polished) lands within
            ``MatchOptions.roundtrip_tolerance_mm`` of the click.
        roundtrip_mm: that round-trip distance, mm.
        rematched: the consistency step searched this point again (it disagreed with the other matches).
        atlases, agreeing, spread_mm, rejected: for a fused match (:meth:`Matcher.match_atlases`), how many atlases
            predicted it, how many agreed, the spread (RMS distance, mm) of the agreeing predictions around the
            fused point, and the names of the rejected atlases; 1, 1, 0 and () for a plain match.
        per_atlas: for a fused match, each atlas that carries the landmark: ``(name, (x, y, z) LPS mm, score,
            agreeing)``, its own prediction (which atlas said what, e.g. to find a misplaced atlas point); () for
            a plain match.
        polished: the intensity polish (``MatchOptions(polish=True)``) moved this match; ``ncc`` is the normalised
            cross-correlation of its source and target patches there (NaN when the polish did not move it).
    """

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
    rejected: tuple[str, ...] = ()
    per_atlas: tuple[tuple[str, tuple[float, ...], float, bool], ...] = ()

    @property
    def point_ras_mm(self) -> np.ndarray:
        """Matched position in RAS mm (Slicer)."""
        return lps_to_ras(self.point_lps_mm)


@dataclass
class MatchResult:
    """All matches of a ``Matcher.match`` call, plus heatmaps when asked for and timings (seconds)."""

    matches: list[Match]
    targets: list[str]
    heatmaps: Heatmaps = field(default_factory=Heatmaps)  # (target_index, label) -> Image, made when read
    timings: dict = field(default_factory=dict)
    #: what the inputs made the engine warn of, e.g. an atlas given twice or atlases that lack landmarks (also
    #: logged, once per matcher): for a front end whose engine logs elsewhere (the Slicer module's engine process)
    notes: list[str] = field(default_factory=list)

    def for_target(self, index: int) -> list[Match]:
        """Matches in target ``index``, in source point order."""
        return [m for m in self.matches if m.target_index == index]

    def points_lps_mm(self, index: int = 0) -> np.ndarray:
        """(N, 3) matched positions in target ``index``, LPS mm, in source point order (``lps_to_ras`` for
        Slicer's frame)."""
        return np.array([m.point_lps_mm for m in self.for_target(index)], dtype=np.float64).reshape(-1, 3)

    def __repr__(self) -> str:  # (the dataclass's listed every field of every match)
        confident = sum(m.confident for m in self.matches)
        return (f"MatchResult({len(self.matches)} matches in {len(self.targets)} target(s), {confident} confident, "
                f"{len(self.heatmaps)} heatmap(s); .matches, .points_lps_mm(target), .rows())")

    def rows(self, ras: bool = False) -> list[dict]:
        """One dict per match with target, label, x, y, z (LPS, or RAS if ``ras``), score, confident and
        roundtrip_mm (why a match is not confident: its round trip landed that far from the click, mm; for a fused
        match, whose flag says whether the atlases agreed, the median round trip of the agreeing atlases)."""
        out = []
        for m in self.matches:
            p = m.point_ras_mm if ras else m.point_lps_mm
            out.append({"target": m.target, "label": m.label, "x": float(p[0]), "y": float(p[1]), "z": float(p[2]),
                        "score": m.score, "confident": m.confident, "roundtrip_mm": m.roundtrip_mm})
        return out
