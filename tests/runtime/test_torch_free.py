"""The runtime package must never import torch (the serving install has none)."""

import subprocess
import sys

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
