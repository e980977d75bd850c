"""Multi-atlas fusion: one robust consensus per landmark and target from the predictions of several atlases.

Each atlas (an annotated scan) predicts every landmark it carries in a target; the predictions of a landmark are
fused by a score-weighted geometric median (of two: their score-weighted mean) of the atlases that agree: those
within ``FusionOptions.outlier_mm`` (or ``outlier_mads`` median absolute deviations, whichever is larger) of a first,
unweighted median and of the consensus of the other agreeing atlases (the farthest is dropped until every one is).
Agreement takes two atlases: with fewer, none agrees, and the point is the best-scoring atlas's. The rejection is
visible in the result: how many atlases agreed, which were rejected, and the spread (mm) of the agreeing ones.

>>> import numpy as np
>>> p = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [80, 0, 0]])   # four agree, one is 80 mm off
>>> f = fuse_points(p, np.full(5, 0.9))
>>> np.round(f.point_lps_mm, 1).tolist(), f.agreeing.tolist()
([0.5, 0.5, 0.0], [True, True, True, True, False])
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .names import repeated_labels


@dataclass(frozen=True)
class Atlas:
    """An annotated scan for :meth:`Matcher.match_atlases`: the image, its landmarks (N, 3) LPS mm, their labels
    (None: P1, P2, ... as :meth:`Matcher.match` names unlabelled points), and a name for messages and results (its
    file path by default)."""

    image: object
    points_lps_mm: np.ndarray
    labels: tuple[str, ...]
    name: str = ""

    def __post_init__(self) -> None:  # labels as the matches carry them: text (one string is one label)
        if self.labels is None:  # as Matcher.match names unlabelled points: P1, P2, ...
            points = np.asarray(self.points_lps_mm)
            labels = [f"P{i + 1}" for i in range(1 if points.ndim == 1 else len(points))]
        else:
            labels = [self.labels] if isinstance(self.labels, str) else self.labels
        object.__setattr__(self, "labels", tuple(str(v) for v in labels))

    @property
    def display_name(self) -> str:
        """Its ``name``, else its file's path, else the name of a :class:`samembed.Image` or SimpleITK image held in
        memory (two unnamed in-memory atlases were both "atlas": :meth:`Matcher.match_atlases` names them apart)."""
        if self.name:
            return self.name
        if isinstance(self.image, (str, os.PathLike)):
            return str(self.image)
        own = getattr(self.image, "name", None)
        return own if isinstance(own, str) and own else "atlas"


def landmark_union(named_labels: Sequence[tuple[str, Sequence[str]]]) -> tuple[list[str], list[str]]:
    """The landmarks of several atlases, and what a user should be told about their sets.

    Atlases may carry different landmarks (a structure outside one atlas's field of view, a rater who left one out):
    each landmark is fused over the atlases that carry it. Returns ``(labels, notes)``: every label once, in the
    order the atlases first name it (the first atlas's order, then each later atlas's new ones), and one note per
    atlas that lacks some of them (naming the atlas and the labels, e.g. to catch a misspelt label, which becomes a
    landmark of its own). Raises :class:`InputError` naming the atlas (first of each pair) whose labels repeat.
    """
    for name, labels in named_labels:
        if "" in labels:  # fused by label: the unlabelled points of two atlases would be taken for one landmark
            raise InputError(f"{name}: {list(labels).count('')} point(s) have no label; each atlas's landmarks need "
                             "labels (the atlases' predictions are fused by label)")
        repeated = sorted(repeated_labels(labels))
        if repeated:
            raise InputError(f"{name}: landmark labels repeat ({', '.join(map(repr, repeated))}); each atlas needs "
                             "unique labels")
    union = list(dict.fromkeys(lab for _, labels in named_labels for lab in labels))
    notes = []
    for name, labels in named_labels:
        have = set(labels)
        missing = [lab for lab in union if lab not in have]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            notes.append(f"{name} lacks {len(missing)} of the {len(union)} landmarks that the atlases carry "
                         f"({shown}): each landmark is fused over the atlases that carry it (the 'atlases' count)")
    return union, notes


#: the limit the atlases' scatter (``outlier_mads`` MADs) may set is at most this many times ``outlier_mm``
MAD_LIMIT_CAP = 2.0


@dataclass(frozen=True)
class FusionOptions:
    """How predictions of several atlases are fused (distances in mm).

    Attributes:
        outlier_mm: a prediction farther than this from the first median is rejected (at least).
        outlier_mads: ... or farther than this many median absolute deviations, when that is larger (up to
            :data:`MAD_LIMIT_CAP` times ``outlier_mm``).
        min_weight: score weights are clipped below at this value (a negative score still counts a little).
    """

    outlier_mm: float = 15.0
    outlier_mads: float = 3.0
    min_weight: float = 0.05

    def __post_init__(self) -> None:
        for name in ("outlier_mm", "outlier_mads", "min_weight"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)) or not np.isfinite(v) or v <= 0:
                raise InputError(f"{name} must be a finite number > 0, not {v!r}")
            object.__setattr__(self, name, float(v))  # (a numpy number as a plain one, as MatchOptions takes them)


@dataclass
class Fused:
    """One fused landmark: the consensus point (LPS mm), which atlases agreed, their spread and mean score."""

    point_lps_mm: np.ndarray
    agreeing: np.ndarray  # (A,) bool; none when the atlases have no consensus (the point is then the best-scoring's)
    spread_mm: float  # root-mean-square distance of the agreeing predictions (with none: of all) to the fused point
    score: float  # weighted mean score of the agreeing predictions (with none: the best-scoring's)


def geometric_median(points: np.ndarray, weights: np.ndarray, iterations: int = 100, tol_mm: float = 1e-4) -> np.ndarray:
    """Weighted geometric median (Weiszfeld) of (N, d) points: the point minimising sum w_i |x - p_i|."""
    x = np.average(points, axis=0, weights=weights)
    for _ in range(iterations):
        d = np.linalg.norm(points - x, axis=1)
        if np.any(d < 1e-9):  # on a data point: keep it when it is the optimum (its weight outweighs the pull)
            k = int(np.argmin(d))
            others = d > 1e-9
            pull = np.sum((weights[others] / d[others])[:, None] * (points[others] - x), axis=0)
            if np.linalg.norm(pull) <= weights[k]:
                return points[k].copy()
            d = np.maximum(d, 1e-9)
        w = weights / d
        new = np.sum(w[:, None] * points, axis=0) / w.sum()
        if np.linalg.norm(new - x) < tol_mm:
            return new
        x = new
    return x


def _consensus(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The fused point of some predictions: their weighted geometric median; of two, their weighted mean (the
    median of two points is the heavier one); of one, itself."""
    if len(points) == 1:
        return points[0].copy()
    if len(points) == 2:
        return np.average(points, axis=0, weights=weights)
    return geometric_median(points, weights)


def fuse_points(points_lps_mm: np.ndarray, scores: np.ndarray, options: FusionOptions = FusionOptions()) -> Fused:
    """Fuse (A, d) predictions of one landmark by A atlases, with their SAM scores (A,).

    The predictions within the limit (``outlier_mm``, or ``outlier_mads`` MADs) of their unweighted median are the
    candidates; a candidate agrees when it lies within the limit of the consensus of the other candidates too (else
    the farthest is dropped, and the rest are checked again), and the agreeing ones are fused by a score-weighted
    geometric median (two: their score-weighted mean). Agreement takes two predictions at least: two atlases up to
    twice the limit apart each lay within the limit of their midpoint, and were said to agree (a review: a rater's
    26 mm error adopted as confident). Without agreement the point is the best-scoring atlas's, agreed with by none.
    """
    p = np.asarray(points_lps_mm, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if len(p) == 1:
        return Fused(p[0].copy(), np.ones(1, dtype=bool), 0.0, float(s[0]))
    first = geometric_median(p, np.ones(len(p)))
    dist = np.linalg.norm(p - first, axis=1)
    mad = float(np.median(np.abs(dist - np.median(dist))))
    # the MADs' limit grows with the scatter, up to twice outlier_mm: among 3 or 4 atlases the outliers themselves
    # are half the deviations, and atlases 60 mm apart (0, 60 and 200 mm), or 2 at 90 and 120 mm from 2 that agree,
    # were said to agree (a review)
    limit = min(max(options.outlier_mm, options.outlier_mads * 1.4826 * mad), MAD_LIMIT_CAP * options.outlier_mm)
    agree = dist <= limit
    w = np.maximum(s, options.min_weight)
    while agree.sum() >= 2:  # each round keeps them all, or drops one
        idx = np.flatnonzero(agree)
        off = np.array([np.linalg.norm(p[i] - _consensus(p[idx[idx != i]], w[idx[idx != i]])) for i in idx])
        if off.max() <= limit:
            break
        agree[idx[int(np.argmax(off))]] = False
    if agree.sum() < 2:  # no consensus: two atlases (or two equal groups) farther apart than the limit
        agree = np.zeros(len(p), dtype=bool)
        best = int(np.argmax(s))  # the best-scoring prediction, agreed with by none
        return Fused(p[best].copy(), agree, float(np.sqrt(np.mean(np.sum((p - p[best]) ** 2, axis=1)))),
                     float(s[best]))
    point = _consensus(p[agree], w[agree])
    spread = float(np.sqrt(np.mean(np.sum((p[agree] - point) ** 2, axis=1))))
    return Fused(point, agree, spread, float(np.average(s[agree], weights=w[agree])))
