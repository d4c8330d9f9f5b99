#!/bin/sh
# The serving install, shared by deploy/Dockerfile, deploy/Dockerfile.gpu and
# tests/deploy/test_image_install.py (which runs it in a fresh venv exactly as the image does).
#
# usage: sh deploy/install-serving.sh VENV [cpu|gpu]      (run from the source tree)
#        ORT_REQUIREMENT='onnxruntime-gpu==1.31.*' sh deploy/install-serving.sh VENV gpu
#
# It installs the base dependencies of pyproject.toml (never the [train] extra, so never torch)
# and the package itself. The one deviation from a plain `pip install .`: the ONNX Runtime
# distribution is chosen by flavour. pyproject.toml names onnxruntime-gpu on Linux x86_64 (it
# also runs on CPU), but its wheel carries ~340 MB of CUDA kernels a CPU image can never use.
set -eu

venv=${1:?usage: install-serving.sh VENV [cpu|gpu]}
flavour=${2:-cpu}
case "$flavour" in
  cpu) runtime=${ORT_REQUIREMENT:-"onnxruntime>=1.18"} ;;
  # the GPU image pins it: onnxruntime-gpu's CUDA major must match the base image's
  gpu) runtime=${ORT_REQUIREMENT:-"onnxruntime-gpu>=1.18"} ;;
  *) echo "install-serving.sh: flavour must be cpu or gpu, got '$flavour'" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

# The base dependencies, read from pyproject.toml so this file never drifts from it.
requirements="$venv/serving-requirements.txt"
"$venv/bin/python" - "$runtime" > "$requirements" <<'PY'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join([d for d in deps if not d.startswith("onnxruntime")] + [sys.argv[1]]))
PY

pip install --quiet -r "$requirements"
# --no-deps: the dependencies are in place; this keeps pip from adding onnxruntime-gpu back.
pip install --quiet --no-deps .

# Fail the build, not the first request, if the serving stack is broken or torch crept in.
"$venv/bin/python" -I - <<'PY'
import importlib.util
import sys

import onnxruntime

import sdde_serve.server.app  # noqa: F401  (FastAPI app, routes, metrics)
import uvicorn  # noqa: F401

if importlib.util.find_spec("torch") is not None:
    sys.exit("install-serving.sh: torch is installed in the serving environment")
print("serving install ok: onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
PY
