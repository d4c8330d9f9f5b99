"""The server package's shape (issue 24): small functions, no private name imported across
modules, no import cycle (function-level and TYPE_CHECKING imports included), and a repository
service that speaks no HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

import sdde_serve.server

SERVER = Path(sdde_serve.server.__file__).parent
MODULES = {
    ".".join(p.relative_to(SERVER).with_suffix("").parts): ast.parse(p.read_text())
    for p in SERVER.rglob("*.py")
}
PREFIX = "sdde_serve.server."


def _imports(tree: ast.Module) -> list[tuple[str, str]]:
    """(module, name) of every ``from sdde_serve.server.X import name``, at any depth."""
    return [
        (node.module.removeprefix(PREFIX), alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PREFIX)
        for alias in node.names
    ]


def test_no_function_is_over_60_lines() -> None:
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1}"
        for module, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


def test_no_private_name_is_imported_across_modules() -> None:
    private = [
        f"{module} imports {source}.{name}"
        for module, tree in MODULES.items()
        for source, name in _imports(tree)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_the_server_modules_import_no_cycle() -> None:
    graph = {
        module: {source for source, _ in _imports(tree) if source in MODULES}
        for module, tree in MODULES.items()
    }

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []


def test_the_repository_service_speaks_no_http() -> None:
    """Domain errors only: errors.py alone gives them status codes."""
    for module in ("repository", "repo_files", "repo_poll", "repo_shadow", "repo_index"):
        sources = {source for source, _ in _imports(MODULES[module])}
        assert "errors" not in sources, module
        assert not any(
            isinstance(node, ast.Import | ast.ImportFrom)
            and any(
                (getattr(node, "module", None) or alias.name).split(".")[0]
                in ("fastapi", "starlette")
                for alias in node.names
            )
            for node in ast.walk(MODULES[module])
        ), module
