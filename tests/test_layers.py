"""The layers only point down (docs/architecture.md), checked on every module's imports, those
inside functions included, by parsing the source (nothing is imported).

    blitzscale (CLI, supervision, private Redis)                          top
    web ──► tasks.control, tasks.client          tasks.runtime ──► engine
            tasks.queue (Celery app), tasks.weights (weight data plane)
    common                                                                 leaf

An import of our own modules inside a function must say why in a comment (on its line, or on
the comment line that opens its block of imports): lazy imports exist to keep torch out of a
process, never to dodge a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "engine", "tasks", "web", "blitzscale")

# layer -> the layers it may import (besides itself). The longest matching prefix names a module's layer.
ALLOWED = {
    "common": set(),
    "engine": set(),
    "tasks": set(),  # the package's own __init__
    "tasks.queue": {"common"},
    "tasks.weights": {"common"},
    "tasks.runtime": {"common", "engine", "tasks.queue", "tasks.weights"},
    "tasks.client": {"common", "tasks.queue"},
    "tasks.control": {"common", "tasks.queue", "tasks.weights"},
    "web": {"common", "tasks.client", "tasks.control", "tasks.weights"},
    "blitzscale": {"common", "engine", "tasks.queue", "tasks.weights", "tasks.runtime", "tasks.client", "tasks.control"},
}
CLI_ONLY = "tasks.queue.cli_app"  # Celery's command line imports it; no module of ours may


def layer_of(module: str) -> str | None:
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, path))
    return found


def imports(tree: ast.AST) -> list[tuple[ast.stmt, str, bool]]:
    """(node, imported module, inside a function) for every import of our packages."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"relative import at line {child.lineno}: use the module's full path"
                # `from common import logs` imports common.logs; `from common.x import y` imports common.x
                found.extend((child, f"{child.module}.{alias.name}" if child.module in PACKAGES else child.module,
                              in_function) for alias in child.names)
            visit(child, inner)

    visit(tree, False)
    return [(node, name, inner) for node, name, inner in found if name.split(".")[0] in PACKAGES]


ALL = modules()


@pytest.mark.parametrize("module, path", ALL, ids=[name for name, _ in ALL])
def test_imports_point_down(module, path):
    layer = layer_of(module)
    assert layer is not None, f"{module} belongs to no layer: add its package to ALLOWED"
    wrong = []
    for node, imported, _ in imports(ast.parse(path.read_text())):
        target = layer_of(imported)
        if imported == CLI_ONLY or imported.startswith(CLI_ONLY + "."):
            wrong.append(f"line {node.lineno}: {imported} is for Celery's command line only")
        elif target != layer and target not in ALLOWED[layer] and not layer.startswith(target + "."):
            wrong.append(f"line {node.lineno}: {layer} must not import {target} ({imported})")
    assert not wrong, f"{module}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module, path", ALL, ids=[name for name, _ in ALL])
def test_imports_inside_functions_say_why(module, path):
    source = path.read_text()
    lines = source.splitlines()
    found = imports(ast.parse(source))
    import_lines = {n for node, _, _ in found for n in range(node.lineno, node.end_lineno + 1)}
    unexplained = [f"line {node.lineno}: {name}" for node, name, inner in found
                   if inner and not _explained(lines, node, import_lines)]
    assert not unexplained, f"{module}: imports inside functions without a comment saying why:\n" + \
        "\n".join(unexplained)


def _explained(lines: list[str], node: ast.stmt, import_lines: set[int]) -> bool:
    """A comment on the import's lines, or on the line that opens its block of imports."""
    if any("#" in lines[n - 1] for n in range(node.lineno, node.end_lineno + 1)):
        return True
    n = node.lineno - 1
    while n >= 1:
        text = lines[n - 1].strip()
        if text.startswith("#"):
            return True
        if text and n not in import_lines and not text.startswith(("import ", "from ")):
            return False
        n -= 1
    return False


def test_the_checker_sees_a_violation():
    """The checks above are not vacuous: a web module importing the engine, and an unexplained
    import inside a function, are found."""
    tree = ast.parse("import engine.engine\n\ndef f():\n    from tasks.control import cluster\n")
    found = imports(tree)
    assert [(name, inner) for _, name, inner in found] == [("engine.engine", False), ("tasks.control", True)]
    assert layer_of("engine.engine") not in ALLOWED["web"]
    lines = ["def f():", "    x = 1", "    from tasks.control import cluster"]
    node = ast.parse("\n".join(lines)).body[0].body[1]
    assert not _explained(lines, node, {3})
    lines[1] = "    # torch: only a replica loads it"
    assert _explained(lines, node, {3})
