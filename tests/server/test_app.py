"""The app in-process (TestClient): every endpoint on real models, OOD policy, metrics, auth."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sdde_serve.data import chw_to_pil, load_dataset
from sdde_serve.engine import Engine, EngineOutput
from sdde_serve.preprocess import ImageLimits, decode_image
from sdde_serve.scoring import deployed_score, make_predictions
from sdde_serve.server.batcher import Batcher
from sdde_serve.server.deps import ModelRuntime, get_runtime
from sdde_serve.server.settings import Settings
from tests.onnx_factory import reference_outputs
from tests.server.conftest import encode, gray_png, metric, scrape, serve

V2_HEADER = "Inference-Header-Content-Length"


def digits_pngs(n: int) -> list[bytes]:
    test = load_dataset("digits", split="test")
    return [encode(chw_to_pil(test.images[i])) for i in range(n)]


def black_png(size: int = 28) -> bytes:
    return encode(Image.new("L", (size, size), 0))


def multipart(pngs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.png", p, "image/png")) for i, p in enumerate(pngs)]


def expected(engine: Engine, pngs: list[bytes], policy: str = "flag"):
    x = np.stack([decode_image(p, engine.manifest.input, ImageLimits()) for p in pngs])
    return make_predictions(engine.run(x), engine.manifest, top_k=3, policy=policy)


# --- /v1/predict on the real tiny model -------------------------------------------------------


def test_predict_multipart_json_and_raw_agree_with_engine_and_scoring(tiny_engine):
    pngs = digits_pngs(3)
    want = expected(tiny_engine, pngs)
    with serve(tiny_engine) as client:
        a = client.post("/v1/predict", files=multipart(pngs))
        b64 = [base64.b64encode(p).decode() for p in pngs]
        b = client.post("/v1/predict", json={"images": b64})
        c = client.post("/v1/predict", content=pngs[0], headers={"content-type": "image/png"})
    assert a.status_code == b.status_code == c.status_code == 200
    body = a.json()
    assert body["model"] == "tiny-digits" and body["version"] == "1"
    assert [p["filename"] for p in body["predictions"]] == ["img0.png", "img1.png", "img2.png"]
    assert [p["index"] for p in body["predictions"]] == [0, 1, 2]
    for got, ref in zip(body["predictions"], want, strict=True):
        assert got["label"] == ref.label and got["class_name"] == ref.class_name
        assert got["confidence"] == pytest.approx(ref.confidence, rel=1e-6)
        assert got["ood_score"] == pytest.approx(ref.ood_score, rel=1e-6)
        assert got["agreement"] == pytest.approx(ref.agreement)
        assert [t["label"] for t in got["top_k"]] == [t.label for t in ref.top_k]
        assert got["threshold"] == tiny_engine.manifest.ood.threshold

    def strip(preds: list[dict]) -> list[dict]:  # every prediction has its own id
        return [{k: v for k, v in p.items() if k not in ("filename", "id")} for p in preds]

    assert strip(b.json()["predictions"]) == strip(body["predictions"])  # whatever the encoding
    assert strip(c.json()["predictions"]) == strip(body["predictions"])[:1]  # one: a list of one


def test_ood_flag_and_reject_on_a_blank_image(tiny_engine):
    digit, blank = digits_pngs(1)[0], black_png()
    in_dist = expected(tiny_engine, [digit])[0]
    with serve(tiny_engine) as client:
        flagged = client.post("/v1/predict", files=multipart([blank])).json()["predictions"][0]
        rejected = client.post(
            "/v1/predict?ood_policy=reject", files=multipart([blank, digit])
        ).json()
    assert flagged["is_ood"] is True and flagged["label"] is not None
    assert flagged["ood_score"] < flagged["threshold"]
    blank_r, digit_r = rejected["predictions"]
    assert rejected["ood_policy"] == "reject"
    assert blank_r["rejected"] is True and "label" not in blank_r and "top_k" not in blank_r
    assert blank_r["reason"].startswith("out of distribution")
    assert digit_r["rejected"] is in_dist.is_ood  # an accepted digit keeps its label
    # server default reject, overridden per request in the JSON body and the form
    with serve(tiny_engine, ood_policy="reject") as client:
        default = client.post("/v1/predict", files=multipart([blank])).json()
        body = {"images": [base64.b64encode(blank).decode()], "ood_policy": "flag"}
        override = client.post("/v1/predict", json=body).json()
        form = client.post("/v1/predict", files=multipart([blank]), data={"ood_policy": "flag"})
    assert default["predictions"][0]["rejected"] is True
    assert override["ood_policy"] == "flag" and override["predictions"][0]["label"] is not None
    assert form.json()["predictions"][0]["rejected"] is False


def test_top_k_and_probabilities_options(tiny_engine):
    pngs = digits_pngs(1)
    with serve(tiny_engine, top_k=2) as client:
        default = client.post("/v1/predict", files=multipart(pngs)).json()["predictions"][0]
        more = client.post("/v1/predict?top_k=5&probabilities=true", files=multipart(pngs)).json()[
            "predictions"
        ][0]
    assert len(default["top_k"]) == 2 and "probabilities" not in default
    assert len(more["top_k"]) == 5 and len(more["probabilities"]) == 10
    assert sum(more["probabilities"]) == pytest.approx(1.0, abs=1e-5)


# --- v2 on the real tiny model ----------------------------------------------------------------


def test_v2_json_and_binary_match_the_engine(tiny_engine):
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 28, 28), dtype=np.float32)
    x[0] = 0.0  # blank: out of distribution
    ref = tiny_engine.run(x)
    name = tiny_engine.manifest.name
    tensor = {"name": "images", "shape": list(x.shape), "datatype": "FP32"}
    with serve(tiny_engine) as client:
        js = client.post(
            f"/v2/models/{name}/infer",
            json={"id": "r1", "inputs": [{**tensor, "data": x.reshape(-1).tolist()}]},
        )
        header = json.dumps(
            {
                "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                "outputs": [
                    {"name": "probs", "parameters": {"binary_data": True}},
                    {"name": "is_ood", "parameters": {"binary_data": True}},
                    {"name": "label"},
                ],
                "parameters": {"ood_policy": "reject"},
            }
        ).encode()
        bn = client.post(
            f"/v2/models/{name}/infer",
            content=header + x.tobytes(),
            headers={V2_HEADER: str(len(header))},
        )
    assert js.status_code == 200, js.text
    out = {o["name"]: o for o in js.json()["outputs"]}
    assert js.json()["id"] == "r1" and js.json()["model_name"] == name
    np.testing.assert_allclose(np.reshape(out["probs"]["data"], (3, 10)), ref.probs, rtol=1e-6)
    np.testing.assert_allclose(np.reshape(out["logits"]["data"], (3, 3, 10)), ref.logits, rtol=1e-6)
    thr = tiny_engine.manifest.ood.threshold
    score = deployed_score(ref, tiny_engine.manifest)  # knn: the tiny model's default
    assert out["is_ood"]["data"] == (score < thr).tolist() and out["is_ood"]["data"][0]
    assert out["label"]["data"] == ref.probs.argmax(1).tolist()  # flag: every image labelled

    assert bn.status_code == 200 and bn.headers["content-type"] == "application/octet-stream"
    n = int(bn.headers[V2_HEADER])
    head, raw = json.loads(bn.content[:n]), bn.content[n:]
    outs = {o["name"]: o for o in head["outputs"]}
    probs = np.frombuffer(raw[: 3 * 10 * 4], "<f4").reshape(3, 10)
    np.testing.assert_allclose(probs, ref.probs, rtol=1e-6)
    assert outs["probs"]["parameters"]["binary_data_size"] == 120
    is_ood = np.frombuffer(raw[120:123], "?")
    assert is_ood.tolist() == (score < thr).tolist()
    labels = outs["label"]["data"]  # reject: OOD rows carry -1
    assert labels == [-1 if o else int(p) for o, p in zip(is_ood, ref.probs.argmax(1), strict=True)]


# --- metadata, health, readiness --------------------------------------------------------------


def test_v2_metadata_and_health(linear_engine):
    with serve(linear_engine) as client:
        server = client.get("/v2").json()
        meta = client.get("/v2/models/linear-test").json()
        versioned = client.get("/v2/models/linear-test/versions/7")
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/linear-test/ready").json() == {
            "name": "linear-test",
            "ready": True,
        }
        unknown = client.get("/v2/models/nope")
        wrong_version = client.get("/v2/models/linear-test/versions/8")
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200
    assert "binary_tensor_data" in server["extensions"]
    assert meta["name"] == "linear-test" and meta["versions"] == ["7"]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["parameters"]["providers"] == ",".join(linear_engine.providers)
    assert json.loads(meta["parameters"]["classes"]) == linear_engine.manifest.classes
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes["probs"] == [-1, 4] and shapes["logits"] == [-1, 3, 4]
    assert versioned.json() == meta
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    assert wrong_version.status_code == 404


def test_not_loaded_answers_503_with_retry_after(linear_engine):
    with serve(linear_engine) as client:
        state = client.app.state.sdde
        runtime, state.runtime, state.ready = state.runtime, None, False  # as while loading
        ready = client.get("/v2/health/ready")
        model_ready = client.get("/v2/models/linear-test/ready")
        predict = client.post("/v1/predict", files=multipart([gray_png()]))
        infer = client.post("/v2/models/linear-test/infer", json={"inputs": []})
        live = client.get("/v2/health/live")
        state.runtime, state.ready = runtime, True
        again = client.post("/v1/predict", files=multipart([gray_png()]))
    for r in (ready, model_ready, predict, infer):
        assert r.status_code == 503
    assert predict.headers["retry-after"] == "2" and "not ready" in predict.json()["error"]
    assert live.status_code == 200 and again.status_code == 200


def test_sigterm_turns_readiness_off_but_still_answers_until_the_drain(linear_engine):
    import signal

    import uvicorn

    from sdde_serve.server.cli import DrainingServer

    with serve(linear_engine) as client:
        server = DrainingServer(uvicorn.Config(client.app), client.app.state.sdde)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on the signal
        ready = client.get("/v2/health/ready")
        late = client.post("/v1/predict", files=multipart([gray_png()]))
        samples = scrape(client.get("/metrics").text)
    assert server.should_exit
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert late.status_code == 200
    assert metric(samples, "sdde_model_ready", model="linear-test") == 0


def test_lifespan_loads_the_model_when_none_is_given(linear):
    from fastapi.testclient import TestClient

    from sdde_serve.server.app import create_app

    app = create_app(Settings(model=linear[0], intra_op_threads=1))
    assert not app.state.sdde.ready
    with TestClient(app) as client:
        assert client.get("/v2/health/ready").status_code == 200
        samples = scrape(client.get("/metrics").text)
    assert metric(samples, "sdde_model_ready", model="linear-test") == 1
    assert not app.state.sdde.ready  # shutdown turned it off


# --- swapped resources: overload and timeouts -------------------------------------------------


class GatedEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, images: np.ndarray) -> EngineOutput:
        self.entered.set()
        self.gate.wait(10)
        return self.engine.run(images)


def gated_runtime(client, engine: Engine, **batcher):
    gated = GatedEngine(engine)
    runtime = ModelRuntime(engine.manifest, engine.providers, Batcher(gated.run, **batcher))

    async def override() -> ModelRuntime:  # async: starts the batcher on the app's loop
        runtime.batcher.start()
        return runtime

    client.app.dependency_overrides[get_runtime] = override
    return gated, runtime


def test_full_queue_answers_503_and_recovers(linear_engine):
    with serve(linear_engine) as client:
        gated, runtime = gated_runtime(
            client, linear_engine, max_batch_size=1, max_delay_s=0.0, max_queue_size=1
        )
        results: list[int] = []

        def post() -> None:
            results.append(client.post("/v1/predict", files=multipart([gray_png()])).status_code)

        first = threading.Thread(target=post)
        first.start()
        assert gated.entered.wait(10)  # the engine holds request 1
        second = threading.Thread(target=post)
        second.start()
        deadline = time.monotonic() + 10
        while runtime.batcher.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.005)  # request 2 fills the queue
        full = client.post("/v1/predict", files=multipart([gray_png()]))
        gated.gate.set()
        first.join(10)
        second.join(10)
        after = client.post("/v1/predict", files=multipart([gray_png()]))
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert "queue full" in full.json()["error"]
    assert results == [200, 200] and after.status_code == 200


def test_request_timeout_answers_503(linear_engine):
    with serve(linear_engine, request_timeout_s=0.2) as client:
        gated, _ = gated_runtime(client, linear_engine, max_batch_size=4, max_delay_s=0.0)
        slow = client.post("/v1/predict", files=multipart([gray_png()]))
        gated.gate.set()
        fast = client.post("/v1/predict", files=multipart([gray_png()]))
    assert slow.status_code == 503 and "timed out" in slow.json()["error"]
    assert fast.status_code == 200


def test_concurrent_requests_are_batched(linear_engine):
    n = 12
    with serve(linear_engine, max_queue_delay_ms=200) as client:
        barrier = threading.Barrier(n)
        codes: list[int] = []

        def post(i: int) -> None:
            barrier.wait()
            codes.append(client.post("/v1/predict", files=multipart([gray_png(i)])).status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        samples = scrape(client.get("/metrics").text)
    assert codes == [200] * n
    calls = metric(samples, "sdde_batch_size_count", model="linear-test")
    assert metric(samples, "sdde_batch_size_sum", model="linear-test") == n
    assert calls < n  # at least one engine call carried several requests' images


# --- API keys ---------------------------------------------------------------------------------


def test_api_keys(linear_engine, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# one per line\nfile-key\n")
    with serve(linear_engine, api_keys=["k1", "k2"], api_keys_file=key_file) as client:
        files = multipart([gray_png()])
        none = client.post("/v1/predict", files=files)
        wrong = client.post("/v1/predict", files=files, headers={"Authorization": "Bearer k3"})
        basic = client.post("/v1/predict", files=files, headers={"Authorization": "Basic k1"})
        good = [
            client.post("/v1/predict", files=files, headers={"Authorization": f"Bearer {k}"})
            for k in ("k1", "k2", "file-key")
        ]
        meta = client.get("/v2/models/linear-test")
        meta_ok = client.get("/v2/models/linear-test", headers={"Authorization": "bearer k1"})
        infer = client.post("/v2/models/linear-test/infer", json={"inputs": []})
        # model readiness names the model: behind the key (unknown names must not be probed)
        model_ready = client.get("/v2/models/linear-test/ready")
        model_ready_ok = client.get("/v2/models/x/ready", headers={"Authorization": "Bearer k1"})
        open_paths = [
            client.get(p).status_code for p in ("/v2/health/live", "/v2/health/ready")
        ] + [client.get("/metrics").status_code]
    assert model_ready_ok.status_code == 404
    for r in (none, wrong, basic, meta, infer, model_ready):
        assert r.status_code == 401 and r.json() == {"error": "missing or invalid API key"}
    assert none.headers["www-authenticate"].startswith("Bearer")
    assert [r.status_code for r in good] == [200, 200, 200] and meta_ok.status_code == 200
    assert open_paths == [200, 200, 200]


# --- metrics move by exactly the predictions made ---------------------------------------------


def test_metrics_move_by_exactly_the_predictions(linear, linear_engine):
    _, weights = linear
    manifest = linear_engine.manifest
    thr = manifest.ood.threshold
    pngs = [gray_png(s) for s in range(6)]
    x = np.stack([decode_image(p, manifest.input) for p in pngs])
    ref = reference_outputs(weights, x, manifest.members, manifest.temperature)
    ood = ref["mal"] < thr
    assert 0 < ood.sum() < 6  # the fixture's threshold splits these images
    labels = ref["probs"].argmax(1)
    v2x = x[:2]
    with serve(linear_engine) as client:
        before = scrape(client.get("/metrics").text)
        assert client.post("/v1/predict", files=multipart(pngs[:4])).status_code == 200
        r = client.post("/v1/predict?ood_policy=reject", files=multipart(pngs[4:]))
        assert r.status_code == 200
        body = {"inputs": [{"name": "images", "shape": [2, 1, 8, 8], "datatype": "FP32",
                            "data": v2x.reshape(-1).tolist()}]}  # fmt: skip
        assert client.post("/v2/models/linear-test/infer", json=body).status_code == 200
        assert client.post("/v1/predict", content=b"x", headers={"content-type": "image/png"})
        after = scrape(client.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    model = manifest.name
    flagged_idx = [0, 1, 2, 3, 0, 1]  # /v1 flag (4 images), then v2 flag (images 0 and 1)
    want_in = sum(not ood[i] for i in flagged_idx) + sum(not ood[i] for i in (4, 5))
    want_flag = sum(bool(ood[i]) for i in flagged_idx)
    want_rej = sum(bool(ood[i]) for i in (4, 5))
    assert delta("sdde_predictions_total", model=model, outcome="in_distribution") == want_in
    assert delta("sdde_predictions_total", model=model, outcome="ood_flagged") == want_flag
    assert delta("sdde_predictions_total", model=model, outcome="rejected") == want_rej
    for c, name in enumerate(manifest.classes):
        want = sum(1 for i in [*flagged_idx, 4, 5] if not ood[i] and labels[i] == c)
        assert delta("sdde_predicted_class_total", model=model, class_name=name) == want
    assert delta("sdde_ood_score_count", model=model) == 8
    assert delta("sdde_ood_score_sum", model=model) == pytest.approx(
        sum(ref["mal"][i] for i in [*flagged_idx, 4, 5]), rel=1e-5
    )
    below = sum(1 for i in [*flagged_idx, 4, 5] if ref["mal"][i] <= thr)
    assert delta("sdde_ood_score_bucket", model=model, le=repr(float(thr))) == below
    assert delta("sdde_confidence_count", model=model) == 8 - want_rej
    assert delta("sdde_batch_size_sum", model=model) == 8
    assert delta("sdde_requests_total", endpoint="/v1/predict", status="200") == 2
    assert delta("sdde_requests_total", endpoint="/v1/predict", status="400") == 1
    assert delta("sdde_requests_total", endpoint="/v2/models/{name}/infer", status="200") == 1
    assert delta("sdde_request_duration_seconds_count", endpoint="/v1/predict") == 3
    info = {
        "model": model, "version": "7", "members": "3", "score": "mal",
        "providers": ",".join(linear_engine.providers), "threshold": repr(float(thr)),
    }  # fmt: skip
    assert metric(after, "sdde_model_info", **info) == 1
    assert metric(after, "sdde_model_ready", model=model) == 1
    assert metric(after, "sdde_queue_depth", model=model) == 0
