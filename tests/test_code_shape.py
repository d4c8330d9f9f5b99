"""The code's shape (issue 24), pinned for sdde_serve/, training/ and export/: no function over 60
lines, no private name imported or reached across modules, no import cycle (function-level and
TYPE_CHECKING imports included), and a repository service that speaks no HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdde_serve", "training", "export")
MAX_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(p): (p, ast.parse(p.read_text()))
    for package in PACKAGES
    for p in (ROOT / package).rglob("*.py")
}


def _source(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <source> import ...`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    path, _ = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def bindings(module: str) -> list[tuple[str, str, str | None]]:
    """(local name, source module, imported name or None for a module) of every project import
    in ``module``, at any depth; ``from a import b`` where ``a.b`` is a module binds module a.b."""
    found: list[tuple[str, str, str | None]] = []
    for node in ast.walk(MODULES[module][1]):
        if isinstance(node, ast.Import):
            found += [(a.asname or a.name, a.name, None) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            source = _source(module, node)
            for a in node.names:
                if f"{source}.{a.name}" in MODULES:
                    found.append((a.asname or a.name, f"{source}.{a.name}", None))
                elif source in MODULES:
                    found.append((a.asname or a.name, source, a.name))
    return found


def test_no_function_is_over_60_lines() -> None:
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1}"
        for module, (_, tree) in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert long == []


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_across_modules() -> None:
    private = [
        f"{module} imports {source}.{name}"
        for module in MODULES
        for _, source, name in bindings(module)
        if _private(name)
    ]
    assert private == []


def test_no_private_name_is_reached_through_a_module() -> None:
    """``from sdde_serve import triton`` then ``triton._NAME_RE`` is a private import too."""
    reached = []
    for module, (_, tree) in MODULES.items():
        modules = {local: source for local, source, name in bindings(module) if name is None}
        reached += [
            f"{module} uses {modules[node.value.id]}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and _private(node.attr)
        ]
    assert reached == []


def test_no_import_cycle() -> None:
    graph = {m: {source for _, source, _ in bindings(m) if source != m} for m in MODULES}
    cycles = []
    for start in graph:
        stack, seen = [start], set()
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt == start:
                    cycles.append(start)
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    assert cycles == []


@pytest.mark.parametrize(
    "module", ["repository", "repo_files", "repo_poll", "repo_shadow", "repo_index"]
)
def test_the_repository_service_speaks_no_http(module: str) -> None:
    """Domain errors only: server/errors.py alone gives them status codes."""
    name = f"sdde_serve.server.{module}"
    assert "sdde_serve.server.errors" not in {source for _, source, _ in bindings(name)}
    _, tree = MODULES[name]
    roots = {
        (getattr(node, "module", None) or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not roots & {"fastapi", "starlette"}
