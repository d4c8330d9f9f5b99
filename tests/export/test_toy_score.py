"""A score registered in the test only, carried through export -> serve -> score -> eval: adding a
score is one spec (numpy reference + graph head) and one registration (docs/scores.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from torch import Tensor

from export.scores import GraphInputs
from sdde_serve import scores
from sdde_serve.scores import ScoreData, ScoreSpec


def margin_reference(d: ScoreData) -> np.ndarray:
    """Toy score: the gap between the two largest member-averaged logits (higher = surer)."""
    top2 = np.sort(np.asarray(d.logits, np.float64).mean(axis=1), axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def margin_head(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    top2 = x.logits.mean(dim=1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


MARGIN = ScoreSpec(
    "margin",
    "gap between the two largest member-averaged logits",
    margin_reference,
    graph=margin_head,  # a plug-in may pass its head itself; built-ins name "module:function"
    member_subset=True,
)


@pytest.fixture
def margin():
    scores.register(MARGIN)
    try:
        yield MARGIN
    finally:
        scores.unregister("margin")


def test_a_registered_score_goes_through_export_serve_score_and_eval(margin, tiny_run, tmp_path):
    from export import export_run
    from sdde_serve.data import ArrayDataset, load_dataset
    from sdde_serve.engine import Engine
    from sdde_serve.evaluation.evaluate import evaluate
    from sdde_serve.evaluation.members import members_sweep
    from sdde_serve.scoring import make_predictions, score_of

    out = tmp_path / "m.onnx"
    m = export_run(tiny_run, out, score="margin", knn_bank=50, with_cams=False)
    assert m.ood.score == "margin" and m.outputs[-1] == "margin"
    engine = Engine(out)
    digits = load_dataset("digits@test").subset(np.arange(100))
    images = digits.as_model_input(1, 28, 28)
    got = engine.run(images)
    ref = margin_reference(ScoreData(got.logits))
    np.testing.assert_allclose(score_of(got, "margin"), ref, atol=1e-5)
    preds = make_predictions(got, engine.manifest)
    assert {p.score_kind for p in preds} == {"margin"}
    np.testing.assert_allclose([p.ood_score for p in preds], ref, atol=1e-5)
    assert all(p.is_ood == (p.ood_score < m.ood.threshold) for p in preds)
    noise = np.random.default_rng(0).integers(0, 256, (60, 1, 8, 8), dtype=np.uint8)
    ev = evaluate(engine, digits, {"noise": ArrayDataset("noise", noise)}, cam_images=0)
    ood = ev.metrics["ood"]
    assert "margin" in ood["scores"] and ood["deployed"] == "margin"
    assert (
        "margin" in ood["sets"]["noise"] and "gap" in ev.metrics["conventions"]["scores"]["margin"]
    )
    assert "margin" in members_sweep(ev)["first"][0]["ood"]["sets"]["noise"]
    # served: the v2 protocol offers and computes the new output
    from fastapi.testclient import TestClient

    from sdde_serve.server.app import create_app
    from sdde_serve.server.settings import Settings

    with TestClient(create_app(Settings(model=str(out)), engine=engine)) as client:
        body = {"inputs": [{"name": "images", "shape": [4, 1, 28, 28], "datatype": "FP32"}]}
        body["inputs"][0]["data"] = images[:4].ravel().tolist()
        body["outputs"] = [{"name": "margin"}, {"name": "ood_score"}]
        r = client.post(f"/v2/models/{m.name}/infer", json=body)
        assert r.status_code == 200, r.text
        outs = {o["name"]: o["data"] for o in r.json()["outputs"]}
        np.testing.assert_allclose(outs["margin"], ref[:4], atol=1e-5)
        np.testing.assert_allclose(outs["ood_score"], ref[:4], atol=1e-5)


def test_an_unregistered_score_is_refused_at_export_and_load(tmp_path):
    from export import check_ood_options
    from sdde_serve.errors import UserError
    from sdde_serve.manifest import OODSpec

    with pytest.raises(UserError, match="--ood-score must be one of"):
        check_ood_options("margin", knn_k=None, knn_bank=10)
    with pytest.raises(ValueError, match="unknown OOD score 'margin'"):
        OODSpec(score="margin", threshold=0.0)
