"""The batch scorer and the server give the same answers; ``--url`` writes the local rows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from sdde_serve.batch.inputs import iter_inputs
from sdde_serve.batch.writers import read_rows
from sdde_serve.engine import Engine
from sdde_serve.server.app import create_app
from sdde_serve.server.settings import Settings

from .conftest import score, write_bad_files

ROOT = Path(__file__).resolve().parents[2]


def test_same_answers_as_the_server(tmp_path: Path, linear_model, images) -> None:
    """The server decodes the uploaded files itself (/v1/predict); the rows must agree."""
    model, _ = linear_model
    out = tmp_path / "rows.jsonl"
    assert score(model, tmp_path / "images", "-o", out, "--probs", "--top-k", "3") == 0
    rows = list(read_rows(out))
    paths = list(iter_inputs([str(tmp_path / "images")]))

    app = create_app(Settings(model=model, max_batch_size=8), engine=Engine(model))
    with TestClient(app) as client:
        files = [("files", (Path(p).name, Path(p).read_bytes())) for p in paths]
        resp = client.post("/v1/predict", files=files, params={"probabilities": True, "top_k": 3})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert len(preds) == len(rows) == 30
    for row, pred in zip(rows, preds, strict=True):
        assert row["label"] == pred["label"] and row["class_name"] == pred["class_name"]
        assert row["is_ood"] == pred["is_ood"] and row["rejected"] == pred["rejected"]
        assert [c["label"] for c in row["top_k"]] == [c["label"] for c in pred["top_k"]]
        # the server may batch differently: the last float bits of a GEMM can differ
        for key in ("confidence", "ood_score", "agreement"):
            assert row[key] == pytest.approx(pred[key], rel=1e-6, abs=1e-7), key
        np.testing.assert_allclose(row["probs"], pred["probabilities"], rtol=1e-6, atol=1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(linear_model):
    model, _ = linear_model
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdde_serve", "serve", str(model), "--port", str(port),
         "--log-level", "warning"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server did not become ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_url_mode_writes_the_local_rows(tmp_path: Path, linear_model, images, server) -> None:
    model, _ = linear_model
    suffix = ".csv"
    bad = write_bad_files(tmp_path / "images" / "bad")
    local, remote = tmp_path / f"local{suffix}", tmp_path / f"remote{suffix}"
    args = [model, tmp_path / "images", "--probs", "--top-k", "2", "--batch-size", "8"]
    assert score(*args, "-o", local) == 1
    assert score(*args, "-o", remote, "--url", server) == 1
    assert list(read_rows(remote)) == list(read_rows(local))  # same batches: identical bits
    errors = list(read_rows(tmp_path / f"remote.errors{suffix}"))
    assert errors == list(read_rows(tmp_path / f"local.errors{suffix}"))
    assert len(errors) == len(bad) - 1  # the directory named unreadable.png is walked, not read


def test_url_mode_refuses_another_model(tmp_path: Path, server, images, capsys) -> None:
    from tests.onnx_factory import make_linear_ensemble

    other, _ = make_linear_ensemble(tmp_path / "other.onnx", temperature=2.5)
    rc = score(other, tmp_path / "images", "-o", tmp_path / "o.jsonl", "--url", server)
    assert rc == 2
    assert "differs" in capsys.readouterr().err
