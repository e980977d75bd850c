"""The parameter node maps onto one ``samembed.MatchOptions``, and every option reaches the engine through the logic."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest

from samembed import InputError, MatchOptions
from SAMEmbeddingLib.parameters import OPTION_PARAMETERS, matchOptionsFromParameters, optionDefault

from .mrml_helpers import add_points, ijk_to_ras, slicer

CHANGED = {  # a value other than the default for every option (the ROI is added by the test)
    "prior_window_mm": 33.0, "global_window_mm": 12.0, "search_body": False, "refine": True, "refine_window_mm": 7.0,
    "consistency": True, "consistency_inlier_mm": 9.0, "consistency_window_mm": 11.0, "polish": False,
    "polish_min_ncc": 0.25, "polish_levels": ((3.0, 12.0, 6.0), (1.0, 8.0, 2.0)), "roundtrip_tolerance_mm": 4.5,
    "heatmap": True,
}


def _defaults() -> SimpleNamespace:
    """What a fresh parameter node holds (the wrapper's defaults are these calls)."""
    return SimpleNamespace(**{parameter: optionDefault(option) for option, parameter in OPTION_PARAMETERS.items()})


def test_every_match_option_has_exactly_one_parameter():
    assert set(OPTION_PARAMETERS) == {f.name for f in fields(MatchOptions)}
    assert len(set(OPTION_PARAMETERS.values())) == len(OPTION_PARAMETERS)


def test_a_fresh_parameter_node_gives_the_default_options():
    assert matchOptionsFromParameters(_defaults()) == MatchOptions()


def test_every_option_is_reachable_from_the_parameter_node(a_scene):
    roi = slicer.vtkMRMLMarkupsROINode()
    a_scene.AddNode(roi)
    roi.SetCenter(10.0, -20.0, 30.0)
    roi.SetSize(40.0, 50.0, 60.0)
    parameters = _defaults()
    for option, value in CHANGED.items():
        text = ", ".join(" ".join(f"{v:g}" for v in level) for level in value) if option == "polish_levels" else value
        setattr(parameters, OPTION_PARAMETERS[option], text)
    parameters.searchBox = roi

    options = matchOptionsFromParameters(parameters)

    for option, value in CHANGED.items():
        assert getattr(options, option) == value, option
    # RAS box (-10..30, -45..5, 0..60) -> LPS (x0, y0, z0, x1, y1, z1)
    assert options.box_lps_mm == pytest.approx((-30.0, -5.0, 0.0, 10.0, 45.0, 60.0))
    changed = {f.name for f in fields(MatchOptions) if getattr(options, f.name) != getattr(MatchOptions(), f.name)}
    assert changed == {f.name for f in fields(MatchOptions)}


@pytest.mark.parametrize(("parameter", "value", "message"), [
    ("priorWindowMm", -1.0, "prior_window_mm must be a finite number >= 0"),
    ("polishLevels", "2 16 x", "polish levels '2 16 x'"),
    ("polishLevels", "2 16", "polish_levels must be"),
])
def test_a_bad_parameter_is_a_clear_input_error(parameter, value, message):
    parameters = _defaults()
    setattr(parameters, parameter, value)
    with pytest.raises(InputError, match=message):
        matchOptionsFromParameters(parameters)


def test_a_search_box_not_placed_yet_is_a_clear_input_error(a_scene):
    """An ROI made by the selector's "Create new" and not placed has no size: its box was the point at the origin,
    and every target's search was confined to it. It is refused, named; a placed one of no depth is a box."""
    roi = slicer.vtkMRMLMarkupsROINode()
    roi.SetName("box")
    a_scene.AddNode(roi)
    parameters = _defaults()
    parameters.searchBox = roi
    with pytest.raises(InputError, match="the search box 'box' has no size \\(not placed yet\\?\\): place it"):
        matchOptionsFromParameters(parameters)
    roi.SetCenter(10.0, -20.0, 30.0)
    roi.SetSize(40.0, 50.0, 0.0)  # a box on one plane (a one-slice image's)
    assert matchOptionsFromParameters(parameters).box_lps_mm == pytest.approx((-30.0, -5.0, 30.0, 10.0, 45.0, 30.0))


class RecordingMatcher:
    """Records the options of each engine call and answers with the clicked points (no model needed)."""

    def __init__(self):
        self.options = []
        self.cache_bytes = 0

    def match(self, source, points_lps_mm, targets, labels=None, options=None, *, mask=None, progress=None,
              cancel=None, target_names=None):
        from samembed import Match, MatchResult

        self.options.append(options)
        matches = [Match(label, target_names[0], 0, np.asarray(p, dtype=float), 1.0, True, 0.0)
                   for label, p in zip(labels, points_lps_mm)]
        heatmaps = {(0, label): targets[0] for label in labels} if options.heatmap else {}
        return MatchResult(matches, list(target_names), heatmaps)

    def match_each(self, source, targets, calls, on_target, *, jobs=None, cancel=None, target_names=None):
        for i, (target, target_calls) in enumerate(zip(targets, calls)):  # one at a time, each call recorded
            on_target(i, None)
            on_target(i, [self.match(source, c.points_lps_mm, [target], c.labels, c.options,
                                     target_names=[target_names[i]]) for c in target_calls])

    def clear_cache(self):
        pass


def test_every_option_reaches_the_engine_through_the_logic(a_scene, a_small_ct):
    from SAMEmbeddingLib.logic import MatchLogic

    matcher = RecordingMatcher()
    logic = MatchLogic(a_scene, matcher=matcher)
    centre = (ijk_to_ras(a_small_ct) @ np.array([64.0, 64.0, 10.0, 1.0]))[:3]
    points = add_points(a_scene, [centre, centre + [5.0, 0.0, 0.0]], ["A", "B"])
    options = MatchOptions(**{k: v for k, v in CHANGED.items() if k != "heatmap"}, box_lps_mm=(0, 0, 0, 1, 1, 1))

    logic.matchPoints(a_small_ct, points, [a_small_ct], None, options)

    assert matcher.options == [options]
    logic.matchPoints(a_small_ct, points, [a_small_ct], None, options.replace(heatmap=True), heatmapPointIndex=1)
    # two points and a heatmap: all matched with the options, then the heatmap point alone, search only
    assert matcher.options[1] == options
    assert matcher.options[2] == options.replace(heatmap=True, refine=False, consistency=False, polish=False)
