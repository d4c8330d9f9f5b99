"""The runtime package must never import torch (the serving install has none)."""

import ast
import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib, pkgutil, sys
import sdde_serve
optional = {"ray", "pyarrow", "matplotlib"}  # extras: a module may need one, never torch
for info in pkgutil.walk_packages(sdde_serve.__path__, "sdde_serve."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as exc:
        if exc.name.split(".")[0] not in optional:
            raise
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("LEAKED", leaked)
"""


def test_no_sdde_serve_module_imports_torch():
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "LEAKED []" in res.stdout, res.stdout


def test_cli_help_lists_every_command_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\nfrom sdde_serve.cli import main; main(['--help'])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    for name in ("train", "export", "calibrate", "eval", "serve", "score"):
        assert name in res.stdout


def _names_training(node: ast.AST) -> bool:
    """An import of the ``training`` package, or a dotted module path into it in code."""
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "training" for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] == "training"
    if isinstance(node, ast.Name | ast.Attribute):
        return (node.id if isinstance(node, ast.Name) else node.attr) == "training"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value == "training" or node.value.startswith("training.")
    return False


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring constants (prose may cite training/ modules; code may not)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            found.add(id(first.value))
    return found


# the composition root wires training's commands and the CAM provider in by module path; extras
# maps the top-level name ``training`` to the [train] extra in its "install ..." messages
ALLOWED = {Path("sdde_serve/cli.py"), Path("sdde_serve/extras.py")}


def test_no_sdde_serve_module_names_training():
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in sorted((root / "sdde_serve").rglob("*.py")):
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(rel))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if id(node) not in docs and _names_training(node):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders and all(Path(o.split(":")[0]) in ALLOWED for o in offenders), offenders
