"""Every widget name the module code uses exists in the .ui file, and the parameter wiring matches."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET

from .static_helpers import MODULE_FILE, UI_FILE


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _parameter_fields() -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "SAMEmbeddingParameterNode":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("SAMEmbeddingParameterNode not found")


def test_every_ui_name_the_module_uses_exists_in_the_ui_file():
    used = set(re.findall(r"\bself\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    missing = sorted(used - set(_ui_widgets()))
    assert used, "the module uses no ui names: the check would be empty"
    assert not missing, f"SAMEmbedding.py uses widgets absent from {UI_FILE.name}: {missing}"


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
