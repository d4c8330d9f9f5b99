"""The Dockerfiles: hadolint (strictest threshold) and the properties the issue asks for."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy.helpers import DEPLOY, REPO, tool

DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu"]


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def final_stage(path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    done = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_layout(path):
    final = final_stage(path)
    words = dict(final)
    # non-root by numeric uid (Kubernetes runAsNonRoot can check it)
    assert words["USER"] == "10001:10001"
    assert "/v2/health/ready" in (DEPLOY / "healthcheck.py").read_text()
    assert words["HEALTHCHECK"].endswith('CMD ["python", "/opt/sdde/healthcheck.py"]')
    assert words["ENTRYPOINT"] == '["sdde", "serve"]'
    assert "SDDE_MODEL=/models/model.onnx" in words["ENV"]
    assert "EXPOSE" in words and words["EXPOSE"] == "8000"
    # the serving install is the shared script, never a pip line that could pull in torch
    runs = [args for word, args in instructions(path) if word == "RUN"]
    installs = [r for r in runs if "install-serving.sh" in r]
    flavour = "gpu" if path.name.endswith(".gpu") else "cpu"
    assert len(installs) == 1 and installs[0].endswith(f"install-serving.sh /opt/sdde {flavour}")
    assert not any("pip install" in r or "torch" in r for r in runs)
    # every COPY source exists in the repository (the build context)
    for word, args in instructions(path):
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"{path.name}: COPY {src} is missing"


def test_gpu_image_uses_cuda_with_cudnn_and_requires_gpu():
    ins = instructions(DEPLOY / "Dockerfile.gpu")
    arg = next(a for w, a in ins if w == "ARG" and a.startswith("CUDA_IMAGE="))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", arg)
    assert "SDDE_REQUIRE_GPU=true" in dict(final_stage(DEPLOY / "Dockerfile.gpu"))["ENV"]
    assert any(w == "ARG" and a.startswith('ORT_REQUIREMENT="onnxruntime-gpu') for w, a in ins)


def test_cpu_image_is_python_311_slim():
    froms = [a for w, a in instructions(DEPLOY / "Dockerfile") if w == "FROM"]
    assert froms == ["python:3.11-slim AS build", "python:3.11-slim"]
