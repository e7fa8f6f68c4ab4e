"""pyproject.toml says `requires-python = ">=3.10"`: the service's code must parse as 3.10 and
import nothing the standard library added later (adversarial review: `enum.StrEnum`, 3.11's, in
common/protocol.py stopped the web, the replicas and every test from importing on 3.10)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("blitzscale", "common", "tasks", "web")
# Standard-library names added in 3.11 or later, by module (None: the whole module).
NEWER = {
    "enum": {"StrEnum", "ReprEnum", "verify", "member", "nonmember", "global_enum"},
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "override",
               "TypeVarTuple", "Unpack", "Required", "NotRequired", "dataclass_transform"},
    "datetime": {"UTC"},
    "asyncio": {"TaskGroup", "timeout", "Runner"},
    "itertools": {"batched"},
    "tomllib": None,
    "wsgiref.types": None,
}


def newer_names(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in NEWER and node.level == 0:
            names = NEWER[node.module]
            found += [f"{node.module}.{a.name}" for a in node.names if names is None or a.name in names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in NEWER and NEWER[a.name] is None]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in NEWER:
            if node.attr in (NEWER[node.value.id] or ()):
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_service_needs_nothing_newer_than_python_310():
    problems = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            try:
                tree = ast.parse(source, filename=str(path), feature_version=(3, 10))
            except SyntaxError as error:
                problems.append(f"{path.relative_to(ROOT)}:{error.lineno}: not 3.10 syntax: {error.msg}")
                continue
            problems += [f"{path.relative_to(ROOT)}: {name} (newer than 3.10)" for name in newer_names(tree)]
    assert not problems, "\n".join(problems)
