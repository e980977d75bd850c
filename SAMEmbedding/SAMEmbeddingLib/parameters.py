"""The module's parameter node as one ``samembed.MatchOptions``: the one place the two meet.

Every field of :class:`samembed.MatchOptions` has a parameter of the module's parameter node
(:data:`OPTION_PARAMETERS`), whose default is read from ``MatchOptions()`` by :func:`optionDefault`, so no default
is declared twice. :func:`matchOptionsFromParameters` turns the parameter values into one ``MatchOptions``.

Two fields are stored in a form Slicer can edit:

* ``box_lps_mm`` is a markups ROI node (``searchBox``); its world RAS bounds become the LPS box;
* ``polish_levels`` is text, one level per comma: ``"2 16 8, 1 10 2, 0.5 6 1"`` (step, template, search mm).

>>> optionDefault("polish"), optionDefault("polish_levels")
(True, '2 16 8, 1 10 2, 0.5 6 1')
>>> parsePolishLevels("2 16 8, 1 10 2")
((2.0, 16.0, 8.0), (1.0, 10.0, 2.0))

Only ``samembed``'s torch-free top level is imported (its options and errors, numpy; no torch, no VTK), so the
module file may import this at file scope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from samembed import InputError, MatchOptions

OPTION_PARAMETERS: dict[str, str] = {
    "prior_window_mm": "priorWindowMm",
    "global_window_mm": "globalWindowMm",
    "search_body": "searchBody",
    "box_lps_mm": "searchBox",
    "refine": "refine",
    "refine_window_mm": "refineWindowMm",
    "consistency": "consistency",
    "consistency_inlier_mm": "consistencyInlierMm",
    "consistency_window_mm": "consistencyWindowMm",
    "polish": "polish",
    "polish_min_ncc": "polishMinNcc",
    "polish_levels": "polishLevels",
    "roundtrip_tolerance_mm": "roundtripToleranceMm",
    "heatmap": "showHeatmap",
}
"""``MatchOptions`` field -> parameter node field (camelCase, as Slicer parameters are named)."""

_DEFAULTS = MatchOptions()


def formatPolishLevels(levels) -> str:
    """``((2, 16, 8), (1, 10, 2))`` -> ``"2 16 8, 1 10 2"`` (mm)."""
    return ", ".join(" ".join(f"{v:g}" for v in level) for level in levels)


def parsePolishLevels(text: str) -> tuple[tuple[float, ...], ...]:
    """``"2 16 8, 1 10 2"`` -> ``((2.0, 16.0, 8.0), (1.0, 10.0, 2.0))``; the values are checked by ``MatchOptions``.

    Raises:
        samembed.InputError: text that is not numbers in groups separated by commas.
    """
    try:
        return tuple(tuple(float(v) for v in level.replace(";", " ").split()) for level in str(text).split(",") if level.strip())
    except ValueError as e:
        raise InputError(f"polish levels {text!r}: write 'step template search' in mm per level, levels separated "
                         "by commas, e.g. '2 16 8, 1 10 2, 0.5 6 1'") from e


def boxLPSFromROI(roiNode) -> tuple[float, ...] | None:
    """The world-axis-aligned box around a markups ROI, as ``(x0, y0, z0, x1, y1, z1)`` LPS mm (None: no ROI).

    Raises:
        samembed.InputError: an ROI of no size on every axis: one made (the selector's "Create new") and not
            placed yet, whose box would be the point at the origin.
    """
    if roiNode is None:
        return None
    bounds = [0.0] * 6
    roiNode.GetRASBounds(bounds)  # xmin, xmax, ymin, ymax, zmin, zmax in world RAS
    if all(hi <= lo for lo, hi in zip(bounds[0::2], bounds[1::2])):
        raise InputError(f"the search box '{roiNode.GetName()}' has no size (not placed yet?): place it in a view, "
                         "or choose no search box")
    r0, r1, a0, a1, s0, s1 = bounds
    return (-r1, -a1, s0, -r0, -a0, s1)


def optionDefault(optionName: str) -> Any:
    """The parameter node's default for a ``MatchOptions`` field: ``MatchOptions()``'s, in the parameter's form."""
    value = getattr(_DEFAULTS, optionName)
    if optionName == "polish_levels":
        return formatPolishLevels(value)
    if optionName == "box_lps_mm":
        return None
    return value


_FROM_PARAMETER: dict[str, Callable[[Any], Any]] = {
    "box_lps_mm": boxLPSFromROI,
    "polish_levels": parsePolishLevels,
}


def matchOptionsFromParameters(parameters) -> MatchOptions:
    """One ``MatchOptions`` from the module's parameter node (any object with the :data:`OPTION_PARAMETERS`
    attributes, e.g. the wrapped parameter node).

    Raises:
        samembed.InputError: a value ``MatchOptions`` refuses (the message names the option and the fix).
    """
    values = {}
    for optionName, parameterName in OPTION_PARAMETERS.items():
        value = getattr(parameters, parameterName)
        convert = _FROM_PARAMETER.get(optionName)
        values[optionName] = convert(value) if convert else value
    return MatchOptions.from_mapping(values)

