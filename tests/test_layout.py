"""The package's layout: no import cycle among fixres's modules, no module over MAX_MODULE_LINES
lines, no function over MAX_FUNCTION_LINES, read from the source with `ast` (nothing is imported).

Every import counts, at any depth (one inside a function included): a cycle that only a
function-level import keeps from failing at import time is still two modules that need each
other."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


PACKAGE = ROOT / "fixres"
SOURCES = sorted(PACKAGE.glob("*.py")) + sorted(ROOT.glob("*.py"))  # the package and the top-level scripts


def fixres_imports(path: Path) -> set[str]:
    """The fixres modules `path` imports, at any depth: `import fixres.x`, `from fixres.x import ...`,
    `from fixres import x` (x a module), and the relative forms inside the package."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("fixres.")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: inside fixres/, `from . import x` or `from .x import y`
                module = "fixres" + ("." + module if module else "")
            if module == "fixres":
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif module.startswith("fixres."):
                found.add(module.split(".")[1])
    return found


def import_graph() -> dict[str, set[str]]:
    return {path.stem: fixres_imports(path) - {path.stem} for path in sorted(PACKAGE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], else None (depth-first search, three colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_fixres():
    graph = import_graph()
    assert {"models", "adapter", "data"} <= set(graph)  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(f"fixres.{m}" for m in cycle)


def test_the_cycle_check_finds_a_cycle_through_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from fixres.adapt import ADAPTER\n    from fixres import data\n")
    assert fixres_imports(source) == {"adapt", "data"}
    assert find_cycle({"models": {"adapt"}, "adapt": {"data", "models"}, "data": set()}) == ["adapt", "models", "adapt"]
    assert find_cycle({"models": {"adapter"}, "adapter": set()}) is None


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_no_module_over_the_line_limit():
    over = [f"{relative(p)}: {n} lines" for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not over, f"over {MAX_MODULE_LINES} lines: " + "; ".join(over)


def test_no_function_over_the_line_limit():
    over = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                over.append(f"{relative(path)}:{node.lineno} {node.name}(): {lines} lines")
    assert not over, f"over {MAX_FUNCTION_LINES} lines: " + "; ".join(over)
