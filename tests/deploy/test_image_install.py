"""The CPU image, without Docker: its build steps in a fresh virtual environment, then its server.

No Docker engine runs here, so this test reads deploy/Dockerfile and does what it does: it lays
out a build context from the build stage's COPY lines, runs the build stage's RUN line (the shared
deploy/install-serving.sh) with /opt/sdde pointing at a temporary venv, and starts the image's
ENTRYPOINT with the final stage's ENV (model path, host and port pointed at the test's own). The
one difference: pip's cache stays on (PIP_NO_CACHE_DIR is dropped) to keep the test fast; the
cache changes how long installing takes, not what gets installed.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdde_serve.engine import Engine
from sdde_serve.manifest import load_onnx, read_manifest
from sdde_serve.preprocess import decode_image
from tests.deploy.helpers import DEPLOY, REPO, clean_env, free_port, stop, wait_http
from tests.deploy.test_dockerfiles import instructions

pytestmark = pytest.mark.slow
DOCKERFILE = DEPLOY / "Dockerfile"
VENV_IN_IMAGE = "/opt/sdde"


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for word, args in instructions(DOCKERFILE):
        if word == "FROM":
            out.append([])
        out[-1].append((word, args))
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, args in stage:
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def lay_out_context(build: list[tuple[str, str]], ctx: Path) -> None:
    """What the build stage's COPY lines put under its WORKDIR."""
    for word, args in build:
        if word != "COPY":
            continue
        *sources, dest = args.split()
        for src in sources:
            source = REPO / src
            target = ctx / dest / source.name if dest.endswith("/") else ctx / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                # Dockerfile.dockerignore drops caches
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build, *_ = stages()
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert ("WORKDIR", "/src") in build
    root = tmp_path_factory.mktemp("image")
    ctx, venv = root / "src", root / "opt-sdde"
    lay_out_context(build, ctx)
    (run,) = [args for word, args in build if word == "RUN"]
    # python3 on PATH is a plain CPython 3.11, like the base image's (not this test's venv)
    bindir = root / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys._base_executable)
    assert sys.version_info[:2] == (3, 11), "the image runs Python 3.11"
    env = clean_env(**env_of(build), PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.pop("PIP_NO_CACHE_DIR")
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        ["sh", "-c", run.replace(VENV_IN_IMAGE, str(venv))],
        cwd=ctx,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"install failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "serving install ok" in done.stdout
    return venv


def test_serving_venv_has_no_torch(image_venv: Path):
    py = str(image_venv / "bin" / "python")
    done = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True, cwd="/")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    listed = subprocess.run(
        [py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"sdde-serve", "onnxruntime", "fastapi", "uvicorn"} <= names
    # CPU image: the CPU runtime only; never the training stack
    assert not names & {"torch", "torchvision", "onnxruntime-gpu", "onnxscript", "scikit-learn"}
    # the package is installed, not imported from a source tree
    where = subprocess.run(
        [py, "-c", "import sdde_serve; print(sdde_serve.__file__)"],
        capture_output=True, text=True, check=True, cwd="/",
    )  # fmt: skip
    assert where.stdout.startswith(str(image_venv))


def test_image_entrypoint_serves_the_tiny_model(image_venv: Path, tiny_model: Path, tmp_path):
    final = stages()[-1]
    (entrypoint,) = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    env_image = env_of(final)
    assert env_image["SDDE_MODEL"] == "/models/model.onnx"
    port = free_port()
    env = clean_env(**env_image)
    env.update(
        PATH=env_image["PATH"]
        .replace(VENV_IN_IMAGE, str(image_venv))
        .replace("$PATH", os.environ["PATH"]),
        SDDE_MODEL=str(tiny_model),  # the image's /models/model.onnx
        SDDE_HOST="127.0.0.1",  # loopback here; 0.0.0.0 in the container
        SDDE_PORT=str(port),
        SDDE_INTRA_OP_THREADS="1",
    )
    env.pop("PYTHONPATH", None)
    entry = [shutil.which(entrypoint[0], path=env["PATH"]), *entrypoint[1:]]
    assert entry[0] == str(image_venv / "bin" / "sdde")
    healthcheck = [str(image_venv / "bin" / "python"), str(DEPLOY / "healthcheck.py")]

    # nothing listening yet: the HEALTHCHECK command says unhealthy
    assert subprocess.run(healthcheck, env=env, capture_output=True).returncode == 1

    proc = subprocess.Popen(
        entry, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert json.loads(wait_http(url + "/v2/health/ready", 60, proc)) == {"ready": True}
        assert subprocess.run(healthcheck, env=env, capture_output=True).returncode == 0

        manifest = read_manifest(load_onnx(tiny_model))
        rng = np.random.default_rng(0)
        c, h, w = manifest.input.channels, manifest.input.height, manifest.input.width
        pixels = rng.integers(0, 256, (h, w) if c == 1 else (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        boundary = uuid.uuid4().hex
        head = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="files"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        body = head.encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            url + "/v1/predict?probabilities=true",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.load(r)
        (pred,) = answer["predictions"]
        assert answer["model"] == manifest.name

        # the image's onnxruntime (CPU build) answers like this environment's engine
        x = decode_image(buf.getvalue(), manifest.input)[None]
        ref = Engine(tiny_model, intra_op_threads=1).run(x)
        np.testing.assert_allclose(pred["probabilities"], ref.probs[0], atol=1e-5)
        assert pred["label"] == int(ref.probs[0].argmax())
        assert pred["class_name"] == manifest.classes[pred["label"]]
        score = getattr(ref, manifest.ood.score)[0]
        assert pred["ood_score"] == pytest.approx(float(score), abs=1e-4)
        assert pred["is_ood"] == bool(score < manifest.ood.threshold)

        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            assert b"sdde_predictions_total" in r.read()
    finally:
        stop(proc)
    # SIGTERM drains and exits cleanly, as the container's STOPSIGNAL expects
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
