"""Conformal p-values in the server: v1 fields, the v2 output, the alpha override, metrics."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sdde_serve import conformal
from sdde_serve.engine import Engine
from sdde_serve.preprocess import decode_image
from tests.server.conftest import gray_png, metric, scrape, serve
from tests.server.test_app import multipart

PNGS = [gray_png(s) for s in range(24)]


@pytest.fixture(scope="module")
def conformal_engine(conformal_model) -> Engine:
    return Engine(conformal_model[0], intra_op_threads=1)


def _reference(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """(MAL, p-value) of PNGS, from the engine and the stored calibration scores."""
    x = np.stack([decode_image(p, engine.manifest.input) for p in PNGS])
    mal = np.asarray(engine.run(x).mal, np.float64)
    return mal, conformal.p_values(engine.manifest.ood.calibration_scores, mal)


def _v2_body(engine: Engine, parameters: dict | None = None) -> dict:
    x = np.stack([decode_image(p, engine.manifest.input) for p in PNGS])
    body: dict = {
        "inputs": [
            {"name": "images", "shape": list(x.shape), "datatype": "FP32",
             "data": x.reshape(-1).tolist()}
        ]
    }  # fmt: skip
    if parameters:
        body["parameters"] = parameters
    return body


def test_v1_predictions_carry_the_p_value_and_alpha_overrides(conformal_engine) -> None:
    _, p = _reference(conformal_engine)
    assert 0 < (p < 0.5).sum() < len(p)  # alpha = 0.5 splits these images
    b64 = [base64.b64encode(x).decode() for x in PNGS]
    with serve(conformal_engine) as client:
        plain = client.post("/v1/predict", files=multipart(PNGS)).json()["predictions"]
        by_json = client.post("/v1/predict", json={"images": b64, "alpha": 0.5})
        by_query = client.post("/v1/predict?alpha=0.5", files=multipart(PNGS))
        by_form = client.post("/v1/predict", files=multipart(PNGS), data={"alpha": "0.5"})
        bad = client.post("/v1/predict", json={"images": b64[:1], "alpha": 1.5})
        bad_form = client.post("/v1/predict", files=multipart(PNGS[:1]), data={"alpha": "x"})
    np.testing.assert_allclose([r["ood_p_value"] for r in plain], p)
    assert [r["alpha"] for r in plain] == [0.05] * len(p)
    assert [r["is_ood"] for r in plain] == list(p < 0.05)
    for response in (by_json, by_query, by_form):
        assert response.status_code == 200, response.text
        preds = response.json()["predictions"]
        assert [r["alpha"] for r in preds] == [0.5] * len(p)
        assert [r["is_ood"] for r in preds] == list(p < 0.5)
        thr = conformal.threshold_for_alpha(conformal_engine.manifest.ood.calibration_scores, 0.5)
        assert {r["threshold"] for r in preds} == {thr}
    assert bad.status_code == 422 and "error" in bad.json()
    assert bad_form.status_code == 422 and "alpha" in bad_form.json()["error"]


def test_v2_output_and_alpha_parameter(conformal_engine) -> None:
    _, p = _reference(conformal_engine)
    name = conformal_engine.manifest.name
    with serve(conformal_engine) as client:
        plain = client.post(f"/v2/models/{name}/infer", json=_v2_body(conformal_engine))
        half = client.post(
            f"/v2/models/{name}/infer", json=_v2_body(conformal_engine, {"alpha": 0.5})
        )
        bad = client.post(
            f"/v2/models/{name}/infer", json=_v2_body(conformal_engine, {"alpha": "high"})
        )
        meta = client.get(f"/v2/models/{name}").json()
    out = {o["name"]: o for o in plain.json()["outputs"]}
    assert out["ood_p_value"]["datatype"] == "FP32" and out["ood_p_value"]["shape"] == [len(p)]
    np.testing.assert_allclose(out["ood_p_value"]["data"], p, rtol=1e-6)
    assert out["is_ood"]["data"] == list(p < 0.05)
    assert {o["name"]: o for o in half.json()["outputs"]}["is_ood"]["data"] == list(p < 0.5)
    assert bad.status_code == 422 and "alpha" in bad.json()["error"]
    assert meta["parameters"]["ood_alpha"] == 0.05
    assert {"name": "ood_p_value", "datatype": "FP32", "shape": [-1]} in meta["outputs"]


def test_v1_and_v2_refuse_a_bad_override_alike(conformal_engine) -> None:
    """One parser for both APIs: the same status (422, as every parameter out of its range) and
    the same reason for the same bad alpha or OOD policy."""
    name = conformal_engine.manifest.name
    bad = {"alpha": "1.5", "ood_policy": "drop"}
    with serve(conformal_engine) as client:
        answers = {
            key: (
                client.post("/v1/predict", files=multipart(PNGS[:1]), data={key: value}),
                client.post(
                    f"/v2/models/{name}/infer",
                    json=_v2_body(
                        conformal_engine, {key: float(value) if key == "alpha" else value}
                    ),
                ),
            )
            for key, value in bad.items()
        }
    assert answers["alpha"][0].json() == {"error": "alpha must be a number in [0, 1), got 1.5"}
    assert answers["ood_policy"][0].json() == {
        "error": "ood_policy must be 'flag' or 'reject', got 'drop'"
    }
    for v1, v2 in answers.values():
        assert (v1.status_code, v1.json()) == (v2.status_code, v2.json()) == (422, v1.json())


def test_a_model_without_calibration_scores_serves_without_p_values(linear_engine) -> None:
    name = linear_engine.manifest.name
    with serve(linear_engine) as client:
        v1 = client.post("/v1/predict", files=multipart(PNGS[:3]))
        v1_alpha = client.post("/v1/predict?alpha=0.1", files=multipart(PNGS[:3]))
        body = _v2_body(linear_engine)
        v2 = client.post(f"/v2/models/{name}/infer", json=body)
        v2_alpha = client.post(
            f"/v2/models/{name}/infer", json={**body, "parameters": {"alpha": 0.1}}
        )
        meta = client.get(f"/v2/models/{name}").json()
    assert v1.status_code == 200
    assert all("ood_p_value" not in r and "alpha" not in r for r in v1.json()["predictions"])
    assert v1_alpha.status_code == 422 and "no calibration scores" in v1_alpha.json()["error"]
    out = {o["name"]: o for o in v2.json()["outputs"]}
    assert out["ood_p_value"]["data"] == [-1.0] * len(PNGS)
    assert v2_alpha.status_code == 422 and "no calibration scores" in v2_alpha.json()["error"]
    assert "ood_alpha" not in meta["parameters"]


def test_p_value_metrics_count_against_the_models_alpha(conformal_engine) -> None:
    _, p = _reference(conformal_engine)
    model = conformal_engine.manifest.name
    with serve(conformal_engine) as client:
        before = scrape(client.get("/metrics").text)
        assert client.post("/v1/predict", files=multipart(PNGS)).status_code == 200
        # a request's own alpha changes its flags, not what the monitoring counts
        assert client.post("/v1/predict?alpha=0.5", files=multipart(PNGS)).status_code == 200
        after = scrape(client.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("sdde_ood_p_value_count", model=model) == 2 * len(p)
    assert delta("sdde_ood_p_value_sum", model=model) == pytest.approx(2 * p.sum())
    for le in ("0.05", "0.1", "0.5", "1.0"):
        assert delta("sdde_ood_p_value_bucket", model=model, le=le) == 2 * (p <= float(le)).sum()
    assert delta("sdde_ood_p_below_alpha_total", model=model) == 2 * (p < 0.05).sum()
    assert metric(after, "sdde_ood_alpha", model=model) == 0.05


def test_a_repository_serves_p_values_under_the_served_names(
    tmp_path, conformal_model, linear_model
) -> None:
    """Repository mode: the p-value series and the alpha override follow the served name (not
    the manifest's), and a model file without calibration scores sits beside one with them."""
    from fastapi.testclient import TestClient

    from sdde_serve.server.app import create_app
    from sdde_serve.server.settings import Settings
    from tests.server.test_repository import add_version

    repo = tmp_path / "repo"
    add_version(repo, "1", conformal_model[0], name="conf")
    add_version(repo, "3", linear_model[0], name="plain")
    _, p = _reference(Engine(conformal_model[0]))
    app = create_app(Settings(model=repo, intra_op_threads=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        conf = client.post("/v1/models/conf:predict?alpha=0.5", files=multipart(PNGS))
        plain = client.post("/v1/models/plain:predict?alpha=0.5", files=multipart(PNGS[:1]))
        samples = scrape(client.get("/metrics").text)
    assert conf.status_code == 200, conf.text
    assert [r["is_ood"] for r in conf.json()["predictions"]] == list(p < 0.5)
    assert plain.status_code == 422 and "'plain'" in plain.json()["error"]
    assert metric(samples, "sdde_ood_p_value_count", model="conf") == len(p)
    assert metric(samples, "sdde_ood_p_below_alpha_total", model="conf") == (p < 0.05).sum()
    assert metric(samples, "sdde_ood_alpha", model="conf") == 0.05
    assert ("sdde_ood_alpha", (("model", "plain"),)) not in samples
