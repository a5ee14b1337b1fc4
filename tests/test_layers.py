"""The package's layers: no import cycle, every module importable alone, and the README's design map in import order.

The graph counts every import of a ``clip`` module anywhere in a file, inside functions too: an import deferred to
a function is still a dependency, and a cycle through one is still a knot for the reader.
"""
import ast
import pathlib
import re
import subprocess
import sys
from typing import Dict, List, Set

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "clip"
ENTRY_MODULES = {"__init__", "__main__"}  # the package's front doors: they may import anything
LAUNCHER = "clip_dropin_launcher"  # the top-level module where the clip command starts, beside the package


def modules() -> List[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def imports_of(name: str) -> Set[str]:
    """The ``clip`` modules that ``clip/<name>.py`` (or the top-level launcher) imports, anywhere in the file."""
    path = REPO / f"{LAUNCHER}.py" if name == LAUNCHER else PACKAGE / f"{name}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = set(modules())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("clip.") and alias.name.count(".") >= 1}
        elif isinstance(node, ast.ImportFrom):
            relative = node.level == 1 and name != LAUNCHER
            absolute = node.level == 0 and (node.module or "").split(".")[0] == "clip"
            if not (relative or absolute):
                continue
            parts = (node.module or "").split(".")[0 if relative else 1:]
            if parts and parts[0]:
                found.add(parts[0])
            else:  # `from . import x` or `from clip import x`: the names are modules or the package's own names
                found |= {alias.name for alias in node.names}
    return (found & known) - {name}


def graph() -> Dict[str, Set[str]]:
    return {name: imports_of(name) for name in modules()}


def test_the_graph_sees_deferred_imports():
    assert "simple_tokenizer" in imports_of("clip")
    assert "_registry" in imports_of("clip")


def test_no_import_cycle():
    edges = {name: deps - ENTRY_MODULES for name, deps in graph().items() if name not in ENTRY_MODULES}
    done: Set[str] = set()

    def visit(name: str, path: List[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(edges[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = [name for name in modules() if name != "__main__"]
    running = {name: subprocess.Popen([sys.executable, "-c", f"import clip.{name}" if name != "__init__" else
                                       "import clip"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name in names}
    failed = {}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        if process.returncode:
            failed[name] = stderr.strip().splitlines()[-1:]
    assert not failed


def _design_map_order() -> List[str]:
    """The modules in the order the README's design map lists them."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Design map", 1)[1].split("\n## ", 1)[0]
    order: List[str] = []
    for line in section.splitlines():
        if line.startswith("|"):
            first_cell = line.split("|")[1]
            order += [m for m in re.findall(r"`(?:clip/)?(\w+)\.py`", first_cell) if m not in order]
    return order


def test_the_design_map_lists_every_module_bottom_first():
    order = _design_map_order()
    assert order[-1] == LAUNCHER, "the launcher starts the command: it comes last, above the package"
    order = order[:-1]
    assert sorted(order) == modules(), "the design map must list every module of clip/ once"
    for position, name in enumerate(order):
        above = set(order[position + 1:]) - ENTRY_MODULES
        if name in ENTRY_MODULES:
            continue
        assert not (imports_of(name) & above), f"{name} imports {imports_of(name) & above}, listed above it"


def test_the_launcher_imports_only_the_command_line_and_only_in_a_function():
    """It checks the package's files before importing any of them: no ``clip`` import at module level."""
    assert imports_of(LAUNCHER) == {"_cli"}
    tree = ast.parse((REPO / f"{LAUNCHER}.py").read_text(encoding="utf-8"))
    top_level = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    top_level += [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert not [name for name in top_level if name == "clip" or name.startswith("clip.")]
