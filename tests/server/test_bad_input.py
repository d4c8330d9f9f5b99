"""Every kind of bad input gets a 4xx with a JSON reason (never a 500); the next request works."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.server.conftest import encode, gray_png, png_with_size, serve

HDR = "Inference-Header-Content-Length"
INFER = "/v2/models/linear-test/infer"
PNG = gray_png(0)
GOOD_X = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)


def files(*blobs: bytes) -> list:
    return [("files", (f"f{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def v2(shape=(1, 1, 8, 8), datatype="FP32", data=None, **extra) -> dict:
    tensor = {"name": "images", "shape": list(shape), "datatype": datatype}
    tensor["data"] = GOOD_X.reshape(-1).tolist() if data is None else data
    return {"inputs": [tensor], **extra}


def v2_binary(payload: bytes, size: int | None = None, header_len: int | None = None):
    head = json.dumps(
        {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32",
                     "parameters": {"binary_data_size": len(payload) if size is None else size}}]}
    ).encode()  # fmt: skip
    n = len(head) if header_len is None else header_len
    return {"content": head + payload, "headers": {HDR: str(n)}}


def nan_json(value: str) -> dict:
    data = ", ".join(["0.5"] * 63 + [value])
    text = f'{{"inputs": [{{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [{data}]}}]}}'  # noqa: E501
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


PREDICT = "/v1/predict"


def ctype(value: str) -> dict[str, str]:
    return {"content-type": value}


CORRUPT = PNG[:40] + bytes(reversed(PNG[40:]))
CASES = {
    # /v1/predict
    "corrupt image": ("/v1/predict", {"files": files(CORRUPT)}, 400, "image 0 ('f0.png')"),
    "truncated image": ("/v1/predict", {"files": files(PNG[: len(PNG) // 2])}, 400, "truncated"),
    "non-image": ("/v1/predict", {"files": files(b"hello, not an image")}, 400, "not a recognised"),
    "zero-size image": ("/v1/predict", {"files": files(png_with_size(0, 5))}, 400, "image 0"),
    "bomb image": (PREDICT, {"files": files(png_with_size(100_000, 100_000))}, 400, "exceeds"),
    "second image bad": ("/v1/predict", {"files": files(PNG, b"junk")}, 400, "image 1"),
    "empty file": ("/v1/predict", {"files": files(b"")}, 400, "empty image"),
    "empty body": ("/v1/predict", {"content": b"", "headers": {"content-type": "application/json"}},
                   400, "empty body"),
    "no content type": ("/v1/predict", {"content": b"abc"}, 415, "unsupported content type"),
    "wrong content type": (PREDICT, {"content": b"abc", "headers": ctype("text/plain")}, 415,
                           "text/plain"),
    "bad base64": ("/v1/predict", {"json": {"images": ["%%%not base64"]}}, 400, "invalid base64"),
    "base64 of junk": ("/v1/predict", {"json": {"images": [base64.b64encode(b"junk").decode()]}},
                       400, "not a recognised"),
    "no images": ("/v1/predict", {"json": {"images": []}}, 422, "images"),
    "images not list": ("/v1/predict", {"json": {"images": "abc"}}, 422, "images"),
    "unknown field": ("/v1/predict", {"json": {"images": ["a"], "x": 1}}, 422, "x"),
    "bad policy": (PREDICT, {"json": {"images": ["a"], "ood_policy": "drop"}}, 422, "ood_policy"),
    "bad policy query": ("/v1/predict?ood_policy=drop", {"files": files(PNG)}, 422, "ood_policy"),
    "bad top_k": ("/v1/predict?top_k=0", {"files": files(PNG)}, 422, "top_k"),
    "bad form top_k": (PREDICT, {"files": files(PNG), "data": {"top_k": "many"}}, 422, "top_k"),
    "unexpected form field": ("/v1/predict", {"files": files(PNG), "data": {"x": "1"}}, 400, "'x'"),
    "form without files": ("/v1/predict", {"files": [("top_k", (None, b"2"))]}, 400, "no images"),
    "not json": (PREDICT, {"content": b"{not json", "headers": ctype("application/json")}, 422,
                 "invalid request"),
    "bad multipart": (PREDICT, {"content": b"--x\r\nbroken",
                                "headers": ctype("multipart/form-data; boundary=x")}, 400, ""),
    "too many images": ("/v1/predict", {"files": files(*[PNG] * 5)}, 400, "Too many files"),
    # /v2 infer
    "v2 empty": (INFER, {"content": b""}, 400, "empty body"),
    "v2 not json": (INFER, {"content": b"\x00\x01"}, 400, "invalid inference request"),
    "v2 wrong shape": (INFER, {"json": v2(shape=(1, 1, 8, 9), data=[0.5] * 72)}, 400, "shape"),
    "v2 3d shape": (INFER, {"json": v2(shape=(1, 8, 8), data=[0.5] * 64)}, 400, "shape"),
    "v2 batch 0": (INFER, {"json": v2(shape=(0, 1, 8, 8), data=[])}, 400, "shape"),
    "v2 batch too big": (INFER, {"json": v2(shape=(5, 1, 8, 8), data=[0.5] * 320)}, 400, "B <= 4"),
    "v2 wrong datatype": (INFER, {"json": v2(datatype="FP64")}, 400, "FP32"),
    "v2 too few values": (INFER, {"json": v2(data=[0.5] * 10)}, 400, "10 values"),
    "v2 ragged": (INFER, {"json": v2(data=[[0.5, 0.5], [0.5]])}, 400, "rectangular"),
    "v2 strings": (INFER, {"json": v2(data=["a"] * 64)}, 400, "numbers"),
    "v2 bools": (INFER, {"json": v2(data=[True] * 64)}, 400, "numbers"),
    "v2 no data": (INFER, {"json": {"inputs": [{"name": "images", "shape": [1, 1, 8, 8],
                                                "datatype": "FP32"}]}}, 400, "neither"),
    "v2 NaN": (INFER, nan_json("NaN"), 400, "NaN"),
    "v2 Infinity": (INFER, nan_json("Infinity"), 400, "infinite"),
    "v2 out of range": (INFER, {"json": v2(data=[255.0] * 64)}, 400, "[0, 1]"),
    "v2 wrong input name": (INFER, {"json": {"inputs": [{**v2()["inputs"][0], "name": "x"}]}},
                            400, "'images'"),
    "v2 two inputs": (INFER, {"json": {"inputs": v2()["inputs"] * 2}}, 400, "exactly one"),
    "v2 unknown output": (INFER, {"json": v2(outputs=[{"name": "nope"}])}, 400, "unknown output"),
    "v2 bad policy": (INFER, {"json": v2(parameters={"ood_policy": 3})}, 422, "ood_policy"),
    "v2 bytes short": (INFER, v2_binary(GOOD_X.tobytes()[:-4]), 400, "binary_data_size"),
    "v2 bytes mismatch": (INFER, v2_binary(GOOD_X.tobytes()[:-4], size=256), 400, "252 bytes"),
    "v2 bytes NaN": (INFER, v2_binary(np.full(64, np.nan, np.float32).tobytes()), 400, "NaN"),
    "v2 bytes inf": (INFER, v2_binary(np.full(64, np.inf, np.float32).tobytes()), 400, "infinite"),
    "v2 header length huge": (INFER, v2_binary(GOOD_X.tobytes(), header_len=10**6), 400, "outside"),
    "v2 header length text": (INFER, {"content": b"{}", "headers": {HDR: "abc"}}, 400, "integer"),
    "v2 header length short": (INFER, v2_binary(GOOD_X.tobytes(), header_len=5), 400, "invalid"),
    "v2 trailing bytes": (INFER, {"content": json.dumps(v2()).encode() + b"xx",
                                  "headers": {HDR: str(len(json.dumps(v2())))}}, 400, "binary"),
    "v2 multipart": (INFER, {"files": files(PNG)}, 415, "content type"),
    "v2 unknown model": ("/v2/models/other/infer", {"json": v2()}, 404, "unknown model"),
}  # fmt: skip


@pytest.fixture(scope="module")
def client(linear):
    from sdde_serve.engine import Engine

    with serve(Engine(linear[0], intra_op_threads=1), max_images_per_request=4) as c:
        yield c


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_gets_a_json_4xx_and_the_next_request_works(client, case):
    path, kwargs, status, reason = CASES[case]
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and reason in body["error"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert client.post("/v1/predict", files=files(PNG)).status_code == 200


@pytest.mark.parametrize(
    "img",
    [
        Image.new("CMYK", (12, 10), (0, 0, 0, 0)),
        Image.new("RGBA", (8, 8), (255, 255, 255, 128)),
        Image.fromarray(np.full((9, 9), 40000, np.uint16)),
        Image.new("P", (8, 8), 3),
        Image.new("1", (8, 8), 1),
        Image.new("RGB", (300, 200), (10, 20, 30)),
    ],
    ids=["cmyk-jpeg", "rgba", "16-bit", "palette", "1-bit", "large-rgb"],
)
def test_other_modes_are_converted(client, img):
    data = encode(img, "JPEG" if img.mode == "CMYK" else "PNG")
    r = client.post("/v1/predict", files=files(data))
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["class_name"].startswith("class")


def test_oversized_bodies_get_413_before_being_read(linear_engine):
    big = b"x" * 5000

    def chunks():
        for _ in range(5):
            yield b"y" * 1000

    with serve(linear_engine, max_body_bytes=2000) as client:
        declared = client.post("/v1/predict", content=big, headers={"content-type": "image/png"})
        streamed = client.post(INFER, content=chunks())  # chunked: no Content-Length
        multi = client.post("/v1/predict", files=files(big))
        ok = client.post("/v1/predict", files=files(PNG))
    for r in (declared, streamed, multi):
        assert r.status_code == 413 and "exceeds the limit of 2000 bytes" in r.json()["error"]
    assert ok.status_code == 200


def test_image_pixel_limit(linear_engine):
    with serve(linear_engine, max_image_pixels=1000) as client:
        big = client.post("/v1/predict", files=files(encode(Image.new("L", (40, 30)))))
        small = client.post("/v1/predict", files=files(encode(Image.new("L", (30, 30)))))
    assert (
        big.status_code == 400 and "40x30 pixels exceeds the limit of 1000" in big.json()["error"]
    )
    assert small.status_code == 200


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    r = client.get("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


# --- generated malformed requests -------------------------------------------------------------

PATHS = ["/v1/predict", INFER, "/v2/models/linear-test", "/v2", "/v1/predict?top_k=2"]
CONTENT_TYPES = [None, "application/json", "multipart/form-data; boundary=b", "image/png",
                 "text/plain", "application/octet-stream", "multipart/form-data"]  # fmt: skip
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
    st.text(max_size=8),
)  # fmt: skip
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def v2_requests(draw) -> bytes:
    """Mostly-valid v2 requests with one part perturbed."""
    shape = draw(st.lists(st.integers(-2, 70), min_size=0, max_size=5))
    tensor = {
        "name": draw(st.sampled_from(["images", "x", ""])),
        "shape": shape,
        "datatype": draw(st.sampled_from(["FP32", "FP16", "INT8", "BOOL", "BYTES", "fp32"])),
        "data": draw(st.one_of(json_value, st.lists(st.floats(-2, 2), max_size=80))),
    }
    if draw(st.booleans()):
        tensor["parameters"] = {"binary_data_size": draw(json_value)}
    body = {"inputs": draw(st.sampled_from([[tensor], [], [tensor, tensor]]))}
    if draw(st.booleans()):
        body["outputs"] = draw(json_value)
    if draw(st.booleans()):
        body["parameters"] = draw(json_value)
    return json.dumps(body).encode()


@st.composite
def predict_json(draw) -> bytes:
    body = draw(
        st.dictionaries(st.sampled_from(["images", "ood_policy", "top_k", "x"]), json_value)
    )
    if draw(st.booleans()):
        body["images"] = draw(
            st.lists(st.text(max_size=20) | st.just(base64.b64encode(PNG).decode()))
        )
    return json.dumps(body).encode()


@given(
    path=st.sampled_from(PATHS),
    content_type=st.sampled_from(CONTENT_TYPES),
    body=st.one_of(
        st.binary(max_size=300),
        v2_requests(),
        predict_json(),
        st.builds(
            lambda b, i: PNG[:i] + b + PNG[i + len(b) :],
            st.binary(max_size=8),
            st.integers(0, len(PNG)),
        ),
    ),
    header_len=st.one_of(st.none(), st.integers(-5, 400).map(str), st.text(max_size=4)),
)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_generated_malformed_requests_never_5xx(client, path, content_type, body, header_len):
    headers = {}
    if content_type:
        headers["content-type"] = content_type
    if header_len is not None and header_len.isascii() and header_len.isprintable():
        headers[HDR] = header_len
    method = client.post if path != "/v2" and path != "/v2/models/linear-test" else client.get
    r = client.post(path, content=body, headers=headers) if method is client.post else method(path)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert "error" in r.json()


def test_server_still_answers_after_the_fuzzing(client):
    r = client.post("/v1/predict", files=files(PNG))
    assert r.status_code == 200
    assert io.BytesIO(r.content).read(1) == b"{"
