"""Issue 12's server items: request limits before parsing, v2 output checks, shutdown and
authentication edge cases, a valid OpenAPI document."""

from __future__ import annotations

import base64
import json
import logging
import socket
import sys
import time

import numpy as np
import pytest

from sdde_serve.cli import main as sdde_main
from sdde_serve.server.app import create_app
from sdde_serve.server.cli import drain_seconds
from sdde_serve.server.settings import Settings
from tests.server.conftest import ServerProcess, encode, gray_png, serve


def _json(images: list[str]) -> dict:
    return {
        "content": json.dumps({"images": images}),
        "headers": {"content-type": "application/json"},
    }


def test_json_bodies_are_limited_before_they_are_parsed(linear_engine):
    png = base64.b64encode(gray_png()).decode()
    with serve(linear_engine, max_images_per_request=2, max_json_bytes=4096) as client:
        big = client.post("/v1/predict", **_json(["A" * 5000]))
        many = client.post("/v1/predict", **_json([""] * 50))  # counted before any decoding
        three = client.post("/v1/predict", **_json([png] * 3))
        data_urls = client.post("/v1/predict", **_json([f"data:image/png;base64,{png}"] * 2))
    assert big.status_code == 413 and "JSON body" in big.json()["error"]
    assert many.status_code == 400 and "more values" in many.json()["error"]
    assert three.status_code == 400 and "limit of 2" in three.json()["error"]
    assert data_urls.status_code == 200 and len(data_urls.json()["predictions"]) == 2


def test_v2_refuses_duplicate_outputs_and_oversized_headers(linear_engine):
    x = np.zeros((1, 1, 8, 8), np.float32)
    inp = {"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}
    url = "/v2/models/linear-test/infer"
    with serve(linear_engine, max_json_bytes=100_000) as client:
        dup = client.post(url, json={"inputs": [inp], "outputs": [{"name": "probs"}] * 2})
        unknown = client.post(url, json={"inputs": [inp], "outputs": [{"name": "nope"}]})
        padded = {**inp, "data": [0.0] * 20_000}  # far more values than [1, 1, 8, 8] needs
        many = client.post(url, json={"inputs": [padded]})
        huge = client.post(url, json={"inputs": [inp], "id": "x" * 200_000})
        ok = client.post(url, json={"inputs": [inp], "outputs": [{"name": "probs"}]})
    assert dup.status_code == 400 and "more than once" in dup.json()["error"]
    assert unknown.status_code == 400 and "unknown output" in unknown.json()["error"]
    assert many.status_code == 400 and "more values" in many.json()["error"]
    assert huge.status_code == 413
    assert ok.status_code == 200 and [o["name"] for o in ok.json()["outputs"]] == ["probs"]


def test_a_request_larger_than_the_queue_gets_413_not_503(linear_engine):
    files = [("files", (f"{i}.png", gray_png(i), "image/png")) for i in range(40)]
    with serve(linear_engine, max_batch_size=8, max_queue_size=32) as client:
        r = client.post("/v1/predict", files=files)
        assert client.post("/v1/predict", files=files[:32]).status_code == 200
    assert r.status_code == 413 and "max_queue_size" in r.json()["error"]


def test_pixel_limits_refuse_from_the_header_and_per_request(linear_engine):
    from PIL import Image

    big = encode(Image.new("L", (300, 300), 0))
    files = [("files", (f"{i}.png", big, "image/png")) for i in range(3)]
    with serve(linear_engine, max_image_pixels=100_000, max_request_pixels=200_000) as client:
        one = client.post("/v1/predict", files=files[:2])
        three = client.post("/v1/predict", files=files)
        eps = client.post(  # Pillow's EPS plugin would run Ghostscript: never tried
            "/v1/predict",
            content=b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n",
            headers={"content-type": "image/x-eps"},
        )
    assert one.status_code == 200
    assert three.status_code == 400 and "per request" in three.json()["error"]
    assert eps.status_code == 400 and "not a recognised image format" in eps.json()["error"]


def test_openapi_document_is_valid_and_every_reference_resolves():
    from openapi_spec_validator import validate

    doc = create_app(Settings()).openapi()
    validate(doc)
    refs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for ref in refs:  # before: '#/$defs/TensorRequest' in the v2 infer body pointed nowhere
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    body = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert schema["properties"]["inputs"]["items"]["properties"]["shape"]["type"] == "array"


def test_an_api_keys_file_without_keys_refuses_to_start(linear, tmp_path, capsys):
    empty = tmp_path / "keys"
    empty.write_text("# rotated out\n\n")
    assert sdde_main(["serve", str(linear[0]), "--api-keys-file", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no key" in err and len(err.splitlines()) == 1


def test_an_open_server_says_so_loudly(linear_engine, caplog):
    with caplog.at_level(logging.WARNING, logger="sdde.server"), serve(linear_engine):
        pass
    assert any("NO API KEYS CONFIGURED" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="sdde.server"),
        serve(linear_engine, api_keys=["k"]),
    ):
        pass
    assert not any("NO API KEYS" in r.getMessage() for r in caplog.records)


def test_drain_timeout_below_one_second_is_kept():
    assert drain_seconds(Settings(drain_timeout_s=0.3)) == 0.3  # before: int() made it "no limit"
    with pytest.raises(ValueError):
        Settings(drain_timeout_s=0)


def test_a_sub_second_drain_timeout_ends_shutdown_with_a_request_in_flight(linear):
    server = ServerProcess(linear[0], "--drain-timeout", "0.3")
    try:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            # a request whose body never completes: in flight until the drain gives up
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000\r\n\r\n" + b"\x89PNG"
            )
            time.sleep(0.3)
            started = time.monotonic()
            server.proc.terminate()
            server.proc.wait(timeout=20)  # before: waited forever
            took = time.monotonic() - started
    finally:
        server.stop()
    assert took < 15


def test_the_signal_handler_defers_the_gauge_to_the_event_loop(linear_engine):
    """A signal handler interrupts the main thread anywhere, possibly inside a Prometheus update
    holding the (non-reentrant) metrics lock: it only flips the plain readiness flag."""
    import asyncio
    import signal

    import uvicorn

    from sdde_serve.server.cli import DrainingServer
    from tests.server.conftest import metric, scrape

    with serve(linear_engine) as client:
        state = client.app.state.sdde
        server = DrainingServer(uvicorn.Config(client.app), state)

        def gauge() -> float:
            return metric(
                scrape(client.get("/metrics").text), "sdde_model_ready", model="linear-test"
            )

        async def main() -> tuple[bool, float, float]:
            server.handle_exit(signal.SIGTERM, None)  # as from a signal, while this loop runs
            flag, before = state.ready, gauge()
            await asyncio.sleep(0)  # the loop runs the deferred update
            return flag, before, gauge()

        flag, before, after = asyncio.run(main())
    assert flag is False and before == 1 and after == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_allocator_returns_freed_decode_buffers():
    import platform

    from sdde_serve.server.memory import bound_allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert bound_allocator() is True
