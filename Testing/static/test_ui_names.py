"""Every widget name the module code uses exists in the .ui file, and the parameter wiring matches."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET

from .static_helpers import MODULE_DIR, MODULE_FILE, UI_FILE

WIDGET_FILE = MODULE_DIR / "SAMEmbeddingLib" / "widget.py"


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _parameter_fields() -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "SAMEmbeddingParameterNode":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("SAMEmbeddingParameterNode not found")


def test_every_ui_name_the_module_uses_exists_in_the_ui_file():
    used = set()
    for path in (MODULE_FILE, WIDGET_FILE):
        used |= set(re.findall(r"\bself\.ui\.(\w+)", path.read_text(encoding="utf-8")))
    missing = sorted(used - set(_ui_widgets()))
    assert used, "the module uses no ui names: the check would be empty"
    assert not missing, f"the module panel uses widgets absent from {UI_FILE.name}: {missing}"


def test_every_slicer_parameter_name_is_a_parameter_node_field():
    fields = _parameter_fields()
    names = []
    for widget in _ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names.append(prop.find("string").text)
    assert names
    assert set(names) <= fields, set(names) - fields
    assert len(names) == len(set(names)), "two widgets bound to one parameter"


def test_every_mrml_widget_receives_the_scene():
    root = ET.parse(UI_FILE).getroot()
    mrml = {n for n, w in _ui_widgets().items() if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml and mrml <= connected, mrml - connected


def test_the_ui_top_level_is_a_mrml_widget_named_after_the_module():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert (top.get("class"), top.get("name"), root.findtext("class")) == ("qMRMLWidget", "SAMEmbedding", "SAMEmbedding")


def _parameter_defaults() -> dict[str, ast.expr | None]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "SAMEmbeddingParameterNode":
            return {s.target.id: s.value for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("SAMEmbeddingParameterNode not found")


def test_every_match_option_has_a_parameter_whose_default_is_read_from_match_options():
    from SAMEmbeddingLib.parameters import OPTION_PARAMETERS

    defaults = _parameter_defaults()
    for option, parameter in OPTION_PARAMETERS.items():
        assert parameter in defaults, f"the parameter node has no field {parameter} for MatchOptions.{option}"
        value = defaults[parameter]
        if value is None:  # a node reference (the search box ROI): no default to declare
            continue
        assert isinstance(value, ast.Call) and getattr(value.func, "id", "") == "optionDefault", \
            f"{parameter} re-declares a default; write = optionDefault({option!r})"
        assert [a.value for a in value.args] == [option]


def test_no_ui_widget_bound_to_a_match_option_declares_an_initial_state():
    from SAMEmbeddingLib.parameters import OPTION_PARAMETERS

    bound = set(OPTION_PARAMETERS.values())
    for widget in _ui_widgets().values():
        names = [p.find("string").text for p in widget.findall("property") if p.get("name") == "SlicerParameterName"]
        if names and names[0] in bound:
            state = {"checked", "value"} | ({"text"} if widget.get("class") == "QLineEdit" else set())
            declared = {p.get("name") for p in widget.findall("property")} & state
            assert not declared, f"{widget.get('name')} declares {declared}; the parameter node sets it"
