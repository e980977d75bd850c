"""Match settings as one typed, frozen value: :class:`MatchOptions`.

Every setting of a ``Matcher.match`` call lives here, with its default declared once. The CLI builds one
from its flags (:meth:`MatchOptions.from_mapping`), the Slicer module maps its parameter node onto one, the
benchmarks pass one. The module is torch-free, so the command line can show its defaults quickly.

>>> from samembed.options import MatchOptions
>>> MatchOptions().prior_window_mm, MatchOptions().polish
(50.0, True)
>>> MatchOptions(refine=True).replace(polish=False).polish
False
>>> MatchOptions(prior_window_mm=-5)
Traceback (most recent call last):
...
samembed.errors.InputError: prior_window_mm must be a finite number >= 0 (mm), not -5
>>> MatchOptions.from_mapping({"polish": False, "speed": 2})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
samembed.errors.InputError: unknown match option 'speed'; known: box_lps_mm, consistency, ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import InputError

#: ``progress(done, total, phase)``: ``done`` of ``total`` units of work in the named phase (one type for the
#: embedder, the API, the Slicer logic and the CLI).
ProgressFn = Callable[[float, float, str], None]

#: the network's arithmetic a caller may ask for (``--precision``; :func:`samembed.embedding.resolve_precision`)
PRECISIONS = ("auto", "fp32", "int8", "int8-int8", "int8-bf16")

#: the modalities a caller may name (``--modality``; ``auto``: :func:`samembed.preprocess.detect_modality`)
MODALITIES = ("auto", "ct", "mri", "xray")

#: the farthest a polish level's lattice may reach from its centre, in steps (template plus search half-size): 65^3
#: points per point matched, 140 MB of float32 for a batch of 128 points (the defaults reach 12-14 steps); one of
#: 100 mm at 0.01 mm steps asked for 96 TB at once (an audit)
MAX_POLISH_STEPS = 32
#: the intensity polish's coarse-to-fine levels: (lattice step, template half-size, search half-size), mm
DEFAULT_POLISH_LEVELS: tuple[tuple[float, float, float], ...] = ((2.0, 16.0, 8.0), (1.0, 10.0, 2.0), (0.5, 6.0, 1.0))


#: named starting points of :meth:`MatchOptions.preset` (fields that differ from the defaults), chosen from the
#: landmark benchmark (``benchmarks/results/landmarks_v3_idle.md``, model ``default``):
#:
#: * ``same-patient``: the defaults. Scans of one person (a warped copy, breathing phases, follow-ups): the polish
#:   brings POPI to 0.2 mm and LIDC to 0.8 mm mean; the refinement adds nothing there and costs 0.07-0.13 s per point.
#: * ``between-patients``: refinement on, polish off. OpenKBP organ centroids between different patients: compact
#:   organs 8.9 mm mean against 11.2 with the defaults, 52 % against 38 % of all points within 10 mm (the intensity
#:   polish correlates two people's tissue, which helps nothing there). The default of multi-atlas matching, whose
#:   atlases are other people's annotated scans.
PRESETS: dict[str, dict[str, Any]] = {
    "same-patient": {},
    "between-patients": {"refine": True, "polish": False},
}


def _doc(text: str) -> dict:
    return {"doc": text}


@dataclass(frozen=True)
class MatchOptions:
    """How ``Matcher.match`` searches, checks and polishes (all distances in mm).

    Each field's ``metadata["doc"]`` is the one-line help the CLI and the Slicer module show.
    """

    prior_window_mm: float = field(default=50.0, metadata=_doc(
        "search each point within +-MM of where a robust affine of global-embedding matches puts it "
        "(0: search the whole target, SAM's single argmax; the polish still tries the affine's prediction as a "
        "second start)"))
    global_window_mm: float = field(default=0.0, metadata=_doc(
        "without a prior window: take the joint argmax only within +-MM of the best global match (0: off)"))
    search_body: bool = field(default=True, metadata=_doc(
        "restrict matches to the target's body (replaced by an explicit mask or box)"))
    box_lps_mm: tuple[float, ...] | None = field(default=None, metadata=_doc(
        "search only inside this LPS box (x0, y0, z0, x1, y1, z1), mm"))
    refine: bool = field(default=False, metadata=_doc(
        "cycle-consistent fixed-point refinement around each match (0.07-0.13 s per point)"))
    refine_window_mm: float = field(default=20.0, metadata=_doc(
        "half-size of the refinement's local search boxes (0: whole volumes, slow)"))
    consistency: bool = field(default=False, metadata=_doc(
        "re-search matches that disagree with a robust affine of all matches of a target (8 points at least in 3D, 6 in 2D)"))
    consistency_inlier_mm: float = field(default=15.0, metadata=_doc(
        "a match farther than this from the consistency affine's prediction is searched again"))
    consistency_window_mm: float = field(default=20.0, metadata=_doc(
        "half-size of the consistency step's search window around the affine's prediction"))
    polish: bool = field(default=True, metadata=_doc(
        "sub-voxel polish of each match by normalised cross-correlation of the original voxels around it "
        "(no effect where nothing correlates, e.g. across modalities)"))
    polish_min_ncc: float = field(default=0.5, metadata=_doc(
        "a polished position is kept only where the patches correlate at least this much (-1..1)"))
    polish_levels: tuple[tuple[float, float, float], ...] = field(default=DEFAULT_POLISH_LEVELS, metadata=_doc(
        "polish levels, coarse to fine: (lattice step, template half-size, search half-size) mm each"))
    roundtrip_tolerance_mm: float = field(default=0.0, metadata=_doc(
        "a match is confident when its round trip lands within this distance of the click "
        "(0: two local voxels of the model)"))
    heatmap: bool = field(default=False, metadata=_doc(
        "also return each point's similarity map in each target's geometry, over the voxels a match may land on "
        "(the body, or the mask or box given; not limited to the prior's window); -1 elsewhere"))

    def __post_init__(self) -> None:
        for name in ("prior_window_mm", "global_window_mm", "refine_window_mm", "consistency_inlier_mm",
                     "consistency_window_mm", "roundtrip_tolerance_mm", "polish_min_ncc"):
            object.__setattr__(self, name, _plain_number(getattr(self, name)))  # numpy's numbers as Python's
            if name != "polish_min_ncc":
                _check_distance(name, getattr(self, name))
        for name in ("search_body", "refine", "consistency", "polish", "heatmap"):
            value = getattr(self, name)
            if _is_numpy(value) and type(value).__name__ in ("bool_", "bool"):  # numpy's True
                object.__setattr__(self, name, value := bool(value))
            if not isinstance(value, bool):
                raise InputError(f"{name} must be true or false, not {value!r}")
        v = self.polish_min_ncc
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0:
            raise InputError(f"polish_min_ncc must be a number in [-1, 1], not {v!r}")
        try:
            levels = tuple(tuple(float(x) for x in lv) for lv in self.polish_levels)
        except (TypeError, ValueError):
            levels = ()
        if not levels or any(len(lv) != 3 or not all(math.isfinite(x) and x > 0 for x in lv) for lv in levels):
            raise InputError(f"polish_levels must be (step, template, search) mm triples > 0, e.g. ((2, 16, 8), "
                             f"(1, 10, 2)), not {self.polish_levels!r}")
        for step, template, search in levels:  # a level's lattice reaches (template + search) / step steps each way
            reach = round(template / step) + round(search / step)
            if reach > MAX_POLISH_STEPS:
                raise InputError(
                    f"polish level ({step:g}, {template:g}, {search:g}) mm reaches {reach} steps of {step:g} mm from "
                    f"its centre (a lattice of {2 * reach + 1}^3 points per point matched); at most "
                    f"{MAX_POLISH_STEPS}: take a coarser step or smaller half-sizes (the default's last level is "
                    f"{DEFAULT_POLISH_LEVELS[-1]})")
        object.__setattr__(self, "polish_levels", levels)
        if self.box_lps_mm is not None:
            try:
                box = tuple(float(x) for x in _flatten(self.box_lps_mm))
            except (TypeError, ValueError):
                box = ()
            if len(box) not in (4, 6) or not all(math.isfinite(x) for x in box):
                raise InputError(f"box_lps_mm must be 6 finite numbers x0 y0 z0 x1 y1 z1 (mm), not {self.box_lps_mm!r}")
            object.__setattr__(self, "box_lps_mm", box)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def window_box(self) -> list[list[float]] | None:
        """The search box as ``[[x0, y0, z0], [x1, y1, z1]]`` LPS mm (or 2D corners), or None."""
        if self.box_lps_mm is None:
            return None
        h = len(self.box_lps_mm) // 2
        return [list(self.box_lps_mm[:h]), list(self.box_lps_mm[h:])]

    def replace(self, **changes: Any) -> MatchOptions:
        """A copy with some settings changed; an unknown name is an :class:`InputError`."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), e.g. for ``run.json`` or a parameter node."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MatchOptions:
        """Options from a mapping of field names (unknown names are an :class:`InputError`)."""
        _check_names(values)
        return cls(**dict(values))

    @classmethod
    def preset(cls, name: str) -> MatchOptions:
        """The options of a named preset (:data:`PRESETS`); change fields with :meth:`replace`.

        >>> MatchOptions.preset("between-patients").refine, MatchOptions.preset("between-patients").polish
        (True, False)
        """
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def help(cls, name: str, command_line: bool = False) -> str:
        """The one-line help text of a field, with its default (``command_line``: as its flag takes it)."""
        _check_names({name: None})
        f = {f.name: f for f in fields(cls)}[name]
        shown = _as_typed if command_line else _plain
        presets = "".join(f"; {preset}: {shown(values[name])}" for preset, values in PRESETS.items() if name in values)
        return f"{f.metadata['doc']} (default: {shown(f.default)}{presets})"


def _plain_number(value: Any) -> Any:
    """A numpy number (``np.float32(50)``, ``np.int64(2)``) as Python's own; anything else as it is."""
    return value.item() if _is_numpy(value) and type(value).__name__ not in ("bool_", "bool") else value


def _is_numpy(value: Any) -> bool:
    """Whether ``value`` is a numpy scalar (told without importing numpy: ``samembed --help`` stays light)."""
    return type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0


def _check_distance(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise InputError(f"{name} must be a finite number >= 0 (mm), not {value!r}")


def _check_names(values: Mapping[str, Any]) -> None:
    known = sorted(f.name for f in fields(MatchOptions))
    for key in values:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), known, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown match option {key!r}{hint}; known: {', '.join(known)}")


def _flatten(value: Any) -> list:
    out: list = []
    for v in value:
        if hasattr(v, "__iter__") and not isinstance(v, str):  # lists, tuples, numpy rows
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _as_typed(value: Any) -> Any:
    """A default as it is typed on the command line: levels as ``S,T,W;S,T,W`` (``--polish-levels``), a box as
    ``X0 Y0 Z0 X1 Y1 Z1``; anything else as it is."""
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) for v in value):
        return ";".join(",".join(f"{x:g}" for x in v) for v in value)
    if isinstance(value, tuple):
        return " ".join(f"{x:g}" for x in value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _checked_init(init: Callable) -> Callable:
    """The dataclass's ``__init__`` with an unknown name an :class:`InputError` that names it (as :meth:`replace` and
    :meth:`from_mapping` say), not Python's ``TypeError``."""
    import functools

    @functools.wraps(init)
    def checked(self, *args: Any, **changes: Any) -> None:
        _check_names(changes)
        init(self, *args, **changes)

    return checked


MatchOptions.__init__ = _checked_init(MatchOptions.__init__)  # type: ignore[method-assign]
# help(MatchOptions) lists every setting with its help and default (kept in each field's metadata)
MatchOptions.__doc__ = (MatchOptions.__doc__ or "") + "\n    Attributes:\n" + "".join(
    f"        {f.name}: {MatchOptions.help(f.name)}\n" for f in fields(MatchOptions))
