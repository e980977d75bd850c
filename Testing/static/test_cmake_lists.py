"""CMake lists every file that must ship; nothing unlisted would reach users' Slicer."""

from __future__ import annotations

import json
import struct

from .static_helpers import MODULE_DIR, REPO, cmake_sets, project_files

MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"


def _listed() -> set[str]:
    sets = cmake_sets(MODULE_CMAKE)
    scripts = [s.replace("${MODULE_NAME}", sets["MODULE_NAME"][0]) for s in sets["MODULE_PYTHON_SCRIPTS"]]
    listed = {f"SAMEmbedding/{s}" for s in scripts + sets["MODULE_PACKAGE_RESOURCES"]}
    listed |= set(sets["MODULE_SHARED_RESOURCES"])
    return listed


def _must_ship() -> set[str]:
    files = project_files("SAMEmbedding/SAMEmbedding.py", "SAMEmbedding/SAMEmbeddingLib", "SAMEmbedding/SAMEmbeddingWeb",
                          "SAMEmbedding/samembed", "Resources/UI", "Resources/Icons", "Resources/Models")
    # every file: the packages' own non-Python files too (the propagation report's template: without it, a report
    # could not be written from an installed extension)
    need = set(files)
    registry = REPO / "Resources" / "Models" / "models.json"
    for model in json.loads(registry.read_text(encoding="utf-8")).get("models", []):
        for key in ("file", "model_card"):
            if model.get(key):
                need.add(f"Resources/Models/{model[key]}")
    return need


def test_cmake_lists_every_python_file_ui_icon_and_model_file():
    missing = sorted(_must_ship() - _listed())
    assert not missing, f"add these to SAMEmbedding/CMakeLists.txt or they will not ship: {missing}"


def test_everything_cmake_lists_exists():
    absent = sorted(p for p in _listed() if not (REPO / p).is_file())
    assert not absent, f"SAMEmbedding/CMakeLists.txt lists files that do not exist: {absent}"


def test_the_module_uses_the_scripted_module_macro_with_generic_and_self_tests():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text
    assert "RESOURCES ${MODULE_PACKAGE_RESOURCES}" in text
    assert "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_the_extension_adds_the_module():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(SAMEmbedding)" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text


def test_the_extension_icon_is_a_128_pixel_png():
    data = (REPO / "Resources" / "Icons" / "SAMEmbedding.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_the_benchmark_package_does_not_ship():
    """``benchmarks/samembed_bench`` (suites, elastix baselines, the hand benchmark) stays out of the extension."""
    shipped = [p for p in _listed() if p.startswith("benchmarks/") or "samembed_bench" in p or "/evaluation/" in p]
    assert not shipped, f"SAMEmbedding/CMakeLists.txt ships benchmark code: {shipped}"
