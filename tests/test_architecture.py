"""The package's shape (docs/architecture.md), read from the source: layers import only downwards, no import circle
(imports inside functions count), no module outside variants/ branches on a variant's class, a small top level,
results that are data, a README that stays a front door."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "attnswap"

# What each layer (a folder, or a top-level module) may import of attnswap besides itself; docs/architecture.md.
MAY_IMPORT = {
    "errors": set(), "paths": set(), "plots": set(),
    "validate": {"errors"},
    "config": {"errors", "validate"},
    "runs": {"errors", "paths", "validate"},
    "kernels": {"errors"},
    "variants": {"errors", "kernels"},
    "hf": {"errors", "paths", "validate", "runs", "kernels", "variants"},
    "data": {"errors", "paths", "validate"},
    "train": {"errors", "paths", "validate", "runs", "config", "kernels", "variants", "hf", "data"},
    "measure": {"errors", "paths", "validate", "runs", "config", "plots", "kernels", "variants", "hf", "data", "train"},
    # The report draws with the figure functions of the stages that measured, and computes attention maps only
    # when asked for them and no run folder holds any (measure/attention_maps.py).
    "report": {"errors", "runs", "plots", "measure"},
}
ENTRY_POINTS = {"__init__", "cli", "pipeline"}  # these may import any layer


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The attnswap modules ``path`` imports anywhere in it (module level and inside functions)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    resolved = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("attnswap"):
            resolved.add(name)
    return resolved


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_no_import_circle_counting_imports_inside_functions():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # A module's own package (its __init__) runs before it anyway; only module-to-module edges can close a circle.
    graph = {name: {t for t in targets if not name.startswith(t + ".") and t != "attnswap"} for name, targets in
             graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start)
            assert circle is None, "import circle: " + " -> ".join(circle)


def test_layers_import_only_what_docs_architecture_allows():
    modules = _modules()
    wrong = []
    for name, path in sorted(modules.items()):
        layer = _layer(name)
        if layer in ENTRY_POINTS:
            continue
        assert layer in MAY_IMPORT, f"{name}: layer {layer!r} is not in MAY_IMPORT (and docs/architecture.md)"
        for target in sorted(_imports(path, modules)):
            if target != "attnswap" and _layer(target) not in MAY_IMPORT[layer] | {layer}:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_outside_variants_branches_on_a_variant_class():
    """isinstance / issubclass / ``type(x) is`` on a class defined in variants/ (other than the base interface)
    belongs in that variant's own file."""
    concrete = set()
    for path in (PACKAGE / "variants").glob("*.py"):
        if path.name != "base.py":
            concrete |= {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
    assert {"Window", "Mixture", "MixtureState", "DuoState"} <= concrete
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "variants":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named: list[ast.AST] = []
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                named = [node.args[1]]
            elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot, ast.Eq)) for op in node.ops):
                if isinstance(node.left, ast.Call) and getattr(node.left.func, "id", None) == "type":
                    named = node.comparators
            for target in named:
                names = {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(target) if isinstance(n, ast.Attribute)}
                if names & concrete:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_at_most_ten_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_results_are_data_and_the_readme_a_front_door():
    code = [str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").rglob("*")
            if p.suffix in (".py", ".patch", ".diff", ".ipynb")]
    assert not code, code
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_src_names_no_session_or_issue():
    pattern = re.compile(r"\bsession\b|\bissue\s*#?\d+|\bwave\b", re.I)
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_the_checker_sees_a_circle_and_a_branch(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and a planted isinstance are found."""
    package = tmp_path / "attnswap"
    (package / "variants").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "variants" / "__init__.py").write_text("")
    (package / "variants" / "window.py").write_text("class Window: ...\nclass Mixture: ...\n"
                                                    "class MixtureState: ...\nclass DuoState: ...\n")
    (package / "a.py").write_text("def f():\n    from attnswap.b import g\n")
    (package / "b.py").write_text("from attnswap.a import f\nfrom attnswap.variants.window import Window\n"
                                  "def g(x):\n    return isinstance(x, Window)\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle_counting_imports_inside_functions()
    with pytest.raises(AssertionError, match="isinstance"):
        test_no_module_outside_variants_branches_on_a_variant_class()
