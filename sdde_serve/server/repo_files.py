"""A Triton-layout model repository on disk: ``REPO/<name>/<version>/model.onnx``.

``<version>`` is a positive integer; other entries (``config.pbtxt``, ``labels.txt``, a ``.tmp``
directory being copied) are ignored. Model names follow Triton's rule (:data:`MODEL_NAME_RE`,
the one ``sdde export --triton-repo`` writes by).
"""

from __future__ import annotations

import re
from pathlib import Path

from sdde_serve.triton import MODEL_NAME_RE

MODEL_FILE = "model.onnx"
VERSION_RE = re.compile(r"^[1-9][0-9]*$")
Stamp = tuple[int, int]  # (mtime_ns, size) of a model file: a changed file is a new load


def stamp(path: Path) -> Stamp:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def scan(root: Path) -> dict[str, dict[str, Path]]:
    """``{name: {version: model file}}`` for every model directory under ``root``."""
    models: dict[str, dict[str, Path]] = {}
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not MODEL_NAME_RE.match(model_dir.name):
            continue
        versions = {
            v.name: v / MODEL_FILE
            for v in model_dir.iterdir()
            if VERSION_RE.match(v.name) and (v / MODEL_FILE).is_file()
        }
        models[model_dir.name] = dict(sorted(versions.items(), key=lambda kv: int(kv[0])))
    return models
