"""Against a real ``sdde serve`` process: HTTP, tritonclient (JSON and binary), batching,
SIGTERM drain, and start-up failures."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from sdde_serve.cli import main as sdde_main
from sdde_serve.scoring import deployed_score
from tests.server.conftest import REPO, ServerProcess, encode, gray_png, metric, scrape


def test_every_endpoint_over_http(tiny_server, tiny_engine):
    url = tiny_server.url
    blank = encode(Image.new("L", (28, 28), 0))
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2").json()["name"] == "sdde-serve"
        assert c.get("/v2/models/tiny-digits").json()["parameters"]["providers"] == ",".join(
            tiny_engine.providers
        )
        assert c.get("/v2/models/tiny-digits/ready").status_code == 200
        r = c.post("/v1/predict", files=[("files", ("blank.png", blank, "image/png"))])
        assert r.status_code == 200 and r.json()["predictions"][0]["is_ood"] is True
        r = c.post("/v1/predict", content=b"junk", headers={"content-type": "image/png"})
        assert r.status_code == 400 and "error" in r.json()
        assert c.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
        text = c.get("/metrics").text
    assert "sdde_model_info{" in text and 'sdde_model_ready{model="tiny-digits"} 1.0' in text


def test_tritonclient_json_and_binary(tiny_server, tiny_engine):
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    x = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    x[1] = 0.0
    ref = tiny_engine.run(x)
    thr = tiny_engine.manifest.ood.threshold
    score = deployed_score(ref, tiny_engine.manifest)
    client = tc.InferenceServerClient(url=tiny_server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny-digits")
        meta = client.get_model_metadata("tiny-digits")
        assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
        for binary in (False, True):
            inp = tc.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("probs", "is_ood")]
            res = client.infer("tiny-digits", [inp], outputs=outs)
            np.testing.assert_allclose(res.as_numpy("probs"), ref.probs, rtol=1e-6)
            assert res.as_numpy("is_ood").tolist() == (score < thr).tolist()
        # no outputs named: tritonclient asks for all of them in binary
        inp = tc.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("tiny-digits", [inp], model_version="1")
        np.testing.assert_allclose(res.as_numpy("logits"), ref.logits, rtol=1e-6)
        np.testing.assert_allclose(res.as_numpy("ood_score"), score, rtol=1e-6)
        assert res.as_numpy("label").dtype == np.int64
        bad = tc.InferInput("images", [1, 1, 28, 27], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 28, 27), np.float32))
        with pytest.raises(InferenceServerException, match="shape"):
            client.infer("tiny-digits", [bad])
    finally:
        client.close()


def test_concurrent_clients_are_batched(tiny_server):
    n = 16
    before = scrape(httpx.get(tiny_server.url + "/metrics").text)
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def post(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            r = c.post(tiny_server.url + "/v1/predict", files=[("files", ("x.png", gray_png(i)))])
            codes.append(r.status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = scrape(httpx.get(tiny_server.url + "/metrics").text)
    images = metric(after, "sdde_batch_size_sum", model="tiny-digits") - metric(
        before, "sdde_batch_size_sum", model="tiny-digits"
    )
    calls = metric(after, "sdde_batch_size_count", model="tiny-digits") - metric(
        before, "sdde_batch_size_count", model="tiny-digits"
    )
    assert codes == [200] * n and images == n
    assert calls < n  # mean batch size > 1


def test_sigterm_drains_in_flight_requests_then_exits(tiny_model):
    server = ServerProcess(tiny_model)
    try:
        server.wait_ready()
        body = gray_png(3)
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(head + body[:10])  # a request in flight: half its body sent
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # listener closed: no new work
            httpx.get(server.url + "/v2/health/ready", timeout=2)
        sock.sendall(body[10:])
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b'"predictions"' in reply
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


# --- start-up failures: one clear line, nonzero exit ------------------------------------------


def test_missing_model_file_fails_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "sdde_serve", "serve", "/nonexistent/model.onnx"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: /nonexistent/model.onnx: no such model file"]


def cli_error(capsys, *argv: str) -> str:
    assert sdde_main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_corrupt_model_fails_with_one_line(tmp_path, capsys, linear):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(linear[0].read_bytes()[:200])
    assert "not a readable ONNX model" in cli_error(capsys, str(corrupt))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00" * 64)
    assert "garbage.onnx" in cli_error(capsys, str(garbage))


def test_tampered_weights_fail_the_sha_check(tmp_path, capsys, linear):
    model = onnx.load(str(linear[0]))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "W":
            w = numpy_helper.to_array(init).copy()
            w[0, 0] += 1.0
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, "W"))
    path = tmp_path / "tampered.onnx"
    onnx.save(model, str(path))
    assert "do not match the manifest's SHA-256" in cli_error(capsys, str(path))


def test_require_gpu_fails_fast_without_one(capsys, linear):
    from sdde_serve.engine import cuda_usable

    if cuda_usable():
        pytest.skip("a GPU is usable here: --require-gpu would start")
    assert "--require-gpu" in cli_error(capsys, str(linear[0]), "--require-gpu")


def test_bad_settings_fail_with_one_line(capsys, linear, tmp_path):
    assert "max_queue_size" in cli_error(
        capsys, str(linear[0]), "--max-batch-size", "64", "--max-queue-size", "8"
    )
    assert "port" in cli_error(capsys, str(linear[0]), "--port", "70000")
    assert "cannot read API keys" in cli_error(
        capsys, str(linear[0]), "--api-keys-file", str(tmp_path / "none")
    )
