"""SAMEmbedding.s4ext and the ExtensionsIndex entry SAMEmbedding.json agree with the CMake metadata."""

from __future__ import annotations

import json

import pytest

from .static_helpers import REPO, cmake_sets

SCHEMA_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
               "enabled", "tier"}  # slicer-extension-catalog-entry-schema v1.0.1 (additionalProperties: false)


@pytest.fixture(scope="module")
def cmake() -> dict[str, str]:
    return {k: " ".join(v) for k, v in cmake_sets(REPO / "CMakeLists.txt").items() if k.startswith("EXTENSION_")}


@pytest.fixture(scope="module")
def s4ext() -> dict[str, str]:
    out = {}
    for line in (REPO / "SAMEmbedding.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out[key] = value.strip()
    return out


@pytest.fixture(scope="module")
def catalog() -> dict:
    return json.loads((REPO / "SAMEmbedding.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("s4ext_key", "cmake_key"), [
    ("homepage", "EXTENSION_HOMEPAGE"), ("category", "EXTENSION_CATEGORY"), ("contributors", "EXTENSION_CONTRIBUTORS"),
    ("description", "EXTENSION_DESCRIPTION"), ("iconurl", "EXTENSION_ICONURL"), ("status", "EXTENSION_STATUS"),
    ("screenshoturls", "EXTENSION_SCREENSHOTURLS"), ("depends", "EXTENSION_DEPENDS"), ("enabled", "EXTENSION_ENABLED"),
])
def test_s4ext_agrees_with_cmake(s4ext, cmake, s4ext_key, cmake_key):
    assert s4ext[s4ext_key] == cmake[cmake_key]


def test_the_extension_depends_on_pytorch_and_has_a_real_description(cmake):
    assert cmake["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    description = cmake["EXTENSION_DESCRIPTION"]
    assert len(description) > 60 and "example" not in description.lower() and "SAM" in description
    assert cmake["EXTENSION_CATEGORY"]


def test_the_catalog_entry_fits_the_extensions_index_schema(catalog):
    assert set(catalog) <= SCHEMA_KEYS, set(catalog) - SCHEMA_KEYS
    assert {"$schema", "category", "scm_url"} <= set(catalog)
    assert catalog["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert isinstance(catalog["build_dependencies"], list)
    assert isinstance(catalog.get("tier", 1), int) and 1 <= catalog.get("tier", 1) <= 5


def test_the_catalog_entry_agrees_with_cmake_and_s4ext(catalog, cmake, s4ext):
    assert catalog["category"] == cmake["EXTENSION_CATEGORY"] == s4ext["category"]
    assert catalog["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split() == s4ext["depends"].split()
    assert s4ext["scmurl"].removesuffix(".git") == catalog["scm_url"]
    assert catalog["scm_revision"] == s4ext["scmrevision"]
    assert cmake["EXTENSION_HOMEPAGE"].startswith(catalog["scm_url"])


def test_the_icon_and_screenshot_urls_name_files_of_this_repository(cmake):
    """The catalog shows the icon and screenshots from these URLs (the repository's main branch): each must name a
    file that this checkout holds (the screenshot named ``Docs/Screenshot01.png``, which never existed)."""
    prefix = "https://raw.githubusercontent.com/SAMEmbedding/SlicerSAMEmbedding/main/"
    urls = [cmake["EXTENSION_ICONURL"], *cmake["EXTENSION_SCREENSHOTURLS"].split()]
    for url in urls:
        assert url.startswith(prefix), url
        assert (REPO / url[len(prefix):]).is_file(), f"{url} names no file of this repository"
