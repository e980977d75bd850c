"""The module compiles, imports nothing third-party at file scope, and the layers import in one direction."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from .static_helpers import MODULE_DIR, MODULE_FILE

SLICER_PLATFORM = {"slicer", "vtk", "qt", "ctk", "__future__"}
LIB_FILES = sorted((MODULE_DIR / "SAMEmbeddingLib").glob("*.py"))
WIDGET_FILE = MODULE_DIR / "SAMEmbeddingLib" / "widget.py"
"""The one library file that is Qt: the module panel's body. Every other library file runs on slicer-core."""
FILE_SCOPE_FIRST_PARTY = {"SAMEmbeddingLib.parameters"}
"""First-party modules the module file may import at file scope: they load no torch (checked below)."""
ENGINE_FILES = sorted((MODULE_DIR / "samembed").rglob("*.py"))
BENCH_PACKAGE = "samembed_bench"


@pytest.mark.parametrize("path", [MODULE_FILE, *LIB_FILES], ids=lambda p: p.name)
def test_the_module_file_compiles(path):
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


def _file_scope_imports(tree: ast.Module):
    """Import statements run when the file is imported: top level, also inside top-level if/try blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    stack.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def test_the_module_file_imports_no_third_party_package_at_file_scope():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    allowed = set(sys.stdlib_module_names) | SLICER_PLATFORM
    roots = []
    for node in _file_scope_imports(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        names = [n for n in names if n not in FILE_SCOPE_FIRST_PARTY]
        roots += [n.split(".")[0] for n in names if not (isinstance(node, ast.ImportFrom) and node.level)]
    bad = sorted(set(roots) - allowed)
    assert roots, "no file-scope import found: the check would be empty"
    assert not bad, f"SAMEmbedding.py imports {bad} at file scope; import them inside functions after ensureDependencies()"


@pytest.mark.parametrize("path", [p for p in LIB_FILES if p != WIDGET_FILE], ids=lambda p: p.name)
def test_the_library_never_uses_qt_the_application_or_the_global_scene(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] not in ("qt", "ctk") for a in node.names), f"{path.name} imports qt"
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in ("qt", "ctk"), f"{path.name} imports qt"
            assert not (node.module == "slicer" and {a.name for a in node.names} & {"app", "mrmlScene", "util"})
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            assert node.attr not in ("app", "mrmlScene", "util", "modules"), f"{path.name} uses slicer.{node.attr}"


def _fresh_modules(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=MODULE_DIR, capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_importing_samembed_loads_no_slicer_qt_vtk_or_torch():
    loaded = _fresh_modules("import samembed")
    # nor xxhash (the content hash imports it when it hashes): the Slicer module loads before it installs packages
    assert not {"slicer", "qt", "vtk", "vtkmodules", "torch", "xxhash"} & loaded


def test_importing_the_logic_loads_no_qt_and_no_torch():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    loaded = _fresh_modules("import SAMEmbeddingLib.logic, SAMEmbeddingLib.worker")
    assert not {"qt", "torch", "xxhash"} & loaded


@pytest.mark.parametrize("path", [p for p in LIB_FILES if p != WIDGET_FILE], ids=lambda p: p.name)
def test_only_the_module_panel_imports_the_widget(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").endswith("widget"), f"{path.name} imports the Qt widget"


def test_the_file_scope_first_party_imports_load_no_torch_and_no_vtk():
    loaded = _fresh_modules("; ".join(f"import {m}" for m in sorted(FILE_SCOPE_FIRST_PARTY)))
    assert not {"torch", "vtk", "vtkmodules", "qt", "slicer", "xxhash"} & loaded


def test_the_module_file_keeps_metadata_parameter_node_panel_logic_and_test_and_the_panel_is_thin():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"SAMEmbedding", "SAMEmbeddingParameterNode", "SAMEmbeddingWidget", "SAMEmbeddingLogic",
            "SAMEmbeddingTest"} <= set(classes)
    panel = classes["SAMEmbeddingWidget"]
    assert panel.end_lineno - panel.lineno < 60, "the widget body belongs in SAMEmbeddingLib/widget.py"
    logic = classes["SAMEmbeddingLogic"]
    assert "__getattr__" not in {f.name for f in logic.body if isinstance(f, ast.FunctionDef)}, \
        "give SAMEmbeddingLogic explicit console methods instead of a forwarder"


def _module_scope_nodes(tree: ast.Module):
    """Every node run when the file is imported: all of it except the bodies of functions (and lambdas)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def test_no_engine_module_imports_the_benchmark_package():
    """The engine ships without ``samembed_bench``: no import statement of it anywhere in ``samembed``, and no
    dynamic import at module scope (``samembed.cli`` loads it by name inside a function, only when present)."""
    assert len(ENGINE_FILES) > 10, "the engine's sources were not found: the check would be empty"
    assert not (MODULE_DIR / "samembed" / "evaluation").exists(), "the benchmark code lives in benchmarks/samembed_bench"
    bad = []
    for path in ENGINE_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        name = path.relative_to(MODULE_DIR).as_posix()
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            bad += [f"{name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] == BENCH_PACKAGE]
        for node in _module_scope_nodes(tree):
            func = getattr(node, "func", None) if isinstance(node, ast.Call) else None
            called = getattr(func, "attr", None) or getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                bad.append(f"{name}:{node.lineno} imports a module by name at module scope")
    assert not bad, f"the engine must not import the benchmark package {BENCH_PACKAGE}: {bad}"


def test_importing_the_engine_and_its_cli_loads_no_benchmark_code():
    loaded = _fresh_modules("import samembed, samembed.cli, samembed.api")
    assert not {m for m in loaded if m.split(".")[0] == BENCH_PACKAGE or m.startswith("samembed.evaluation")}


def _runtime_unions(tree: ast.Module) -> list[int]:
    """Lines of annotations written ``X | Y`` that Python evaluates when the file is imported (no ``from __future__
    import annotations``): function signatures and annotated names outside functions."""
    lines = []

    def has_union(node) -> bool:
        return node is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node))

    def visit(body, in_function: bool) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                    if arg is not None and has_union(arg.annotation):
                        lines.append(arg.lineno)
                if has_union(node.returns):
                    lines.append(node.lineno)
                visit(node.body, True)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, in_function)
            elif isinstance(node, ast.AnnAssign) and not in_function and has_union(node.annotation):
                lines.append(node.lineno)
            else:
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []) or [], in_function)

    visit(tree.body, False)
    return lines


@pytest.mark.parametrize("path", sorted(MODULE_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(MODULE_DIR)))
def test_no_file_evaluates_a_union_annotation_that_python_3_9_cannot(path):
    """Slicer 5.4-5.8 run Python 3.9, where ``str | None`` evaluated at run time raises a TypeError: a module file
    with one in a signature failed to load. Each file either defers its annotations (``from __future__ import
    annotations``) or writes no such union where it would be evaluated (quoted is fine)."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    deferred = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                   for n in tree.body)
    assert deferred or not _runtime_unions(tree), (
        f"{path}: lines {_runtime_unions(tree)} annotate with X | Y, which Python 3.9 cannot evaluate; add "
        "'from __future__ import annotations' or quote the annotation")
