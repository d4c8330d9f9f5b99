"""The KNN and minmax OOD scores in the graph, the bank, and the choice of the deployed score."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from export.graph import build_graph, to_onnx
from export.knn import (
    build_bank,
    default_k,
    knn_scores,
    normalize_rows,
    pre_logit_features,
    stratified_subsample,
)
from export.select import ScoreInputs, choose, select_score
from export.verify import VerificationError, run_onnx, verification_inputs, verify
from sdde_serve import calibration as cal
from sdde_serve import conformal
from sdde_serve import scores as score_registry
from sdde_serve.engine import Engine
from sdde_serve.errors import UserError
from sdde_serve.manifest import KNN_BANK_INITIALIZER, load_onnx, read_manifest
from sdde_serve.preprocess import ImageLimits, decode_image
from sdde_serve.scoring import deployed_score, make_predictions, score_of
from training.ensemble import build_ensemble


def _lenets(members: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_ensemble(
        "lenet", members=members, num_classes=4, in_chans=1, mean=[0.5], std=[0.25]
    ).eval()


def test_pre_logits_feed_the_final_linear_layer_for_every_arch():
    from training.models import ARCHS, create_model

    for arch, size in (("lenet", 28), ("resnet18_32", 32), ("resnet18", 64), ("resnet50", 64)):
        torch.manual_seed(0)
        m = create_model(arch, num_classes=3, in_chans=ARCHS[arch].input_channels).eval()
        x = torch.rand(2, m.in_chans, size, size)
        with torch.no_grad():
            f = m.forward_head(m.forward_features(x), pre_logits=True)
            assert f.shape[1] == m.get_classifier().in_features  # 84, 512, 512, 2048
            torch.testing.assert_close(m.get_classifier()(f), m(x), rtol=0, atol=0)


def test_knn_reference_is_the_kth_largest_cosine_by_hand():
    bank = normalize_rows(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    q = np.array([[2.0, 0.0], [0.0, -3.0]])
    # cosines of q0: 1, 0, 0.7071; of q1: 0, -1, -0.7071
    np.testing.assert_allclose(knn_scores(q, bank, 1), [1.0, 0.0])
    np.testing.assert_allclose(knn_scores(q, bank, 2), [np.sqrt(0.5), -np.sqrt(0.5)])
    np.testing.assert_allclose(knn_scores(q, bank, 3), [0.0, -1.0])
    with pytest.raises(UserError, match=r"KNN k must be in 1\.\.3"):
        knn_scores(q, bank, 4)


@pytest.mark.parametrize("layout", ["loop", "packed"])
def test_graph_knn_and_minmax_equal_numpy_on_a_small_bank(layout):
    ens = _lenets()
    rng = np.random.default_rng(0)
    bank = normalize_rows(rng.normal(size=(17, 2 * 84))).astype(np.float32)
    graph = build_graph(
        ens, layout, input_shape=(1, 28, 28), knn_bank=torch.from_numpy(bank), knn_k=3
    )
    proto = to_onnx(graph, input_shape=(1, 28, 28))
    assert graph.output_names == ["logits", "probs", "mal", "msp", "minmax", "knn"]
    inits = {i.name: i for i in proto.graph.initializer}
    assert list(inits[KNN_BANK_INITIALIZER].dims) == [168, 17]  # dims x rows: MatMul's layout
    x = rng.random((5, 1, 28, 28), dtype=np.float32)
    out = run_onnx(proto, x)
    feats = pre_logit_features(ens, x)
    np.testing.assert_allclose(out["knn"], knn_scores(feats, bank, 3), atol=1e-6)
    np.testing.assert_array_equal(out["minmax"], out["logits"].max(axis=2).min(axis=1))
    # dynamic batch: one image alone gives its own row of the batch
    np.testing.assert_allclose(run_onnx(proto, x[2:3])["knn"], out["knn"][2:3], atol=1e-6)
    # verification covers both new outputs: a wrong bank is caught, naming the output
    report = verify(
        proto, ens, temperature=1.0, inputs=verification_inputs((1, 28, 28), x), knn=(bank, 3)
    )
    assert {"knn", "minmax"} <= set(report["real"])
    with pytest.raises(VerificationError, match="'knn'"):
        verify(proto, ens, temperature=1.0, inputs={"x": x}, knn=(bank[::-1].copy(), 1))
    with pytest.raises(VerificationError, match="knn"):
        verify(proto, ens, temperature=1.0, inputs={"x": x})  # a bank output nobody checks


def test_k_larger_than_the_bank_is_refused():
    ens = _lenets()
    bank = torch.from_numpy(normalize_rows(np.eye(4, 168)).astype(np.float32))
    with pytest.raises(UserError, match=r"1\.\.4"):
        build_graph(ens, "loop", input_shape=(1, 28, 28), knn_bank=bank, knn_k=5)


def test_export_refuses_k_larger_than_the_bank(tiny_run, tmp_path):
    from export import export_run

    with pytest.raises(UserError, match="--knn-k 50 is larger than the KNN bank"):
        export_run(tiny_run, tmp_path / "m.onnx", knn_k=50, knn_bank=20)
    # the run's training split is smaller than the requested bank: its real size counts
    with pytest.raises(UserError, match=r"--knn-k 5000 is larger than the KNN bank \(\d+ rows"):
        export_run(tiny_run, tmp_path / "m.onnx", knn_k=5000, knn_bank=10_000)
    with pytest.raises(UserError, match="needs a KNN bank"):
        export_run(tiny_run, tmp_path / "m.onnx", score="knn", knn_bank=0)
    assert not (tmp_path / "m.onnx").exists()


def test_bank_subsample_is_stratified_and_deterministic_for_a_seed():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    a = stratified_subsample(labels, 10, seed=7)
    assert np.array_equal(a, stratified_subsample(labels, 10, seed=7))
    assert not np.array_equal(a, stratified_subsample(labels, 10, seed=8))
    assert np.bincount(labels[a]).tolist() == [5, 3, 2]  # each class keeps its share
    assert np.all(np.diff(a) > 0)  # sorted, no repeats
    # largest remainders: 7 of (50, 30, 20) -> exact (3.5, 2.1, 1.4) -> (4, 2, 1)
    assert np.bincount(labels[stratified_subsample(labels, 7, seed=0)]).tolist() == [4, 2, 1]
    assert np.array_equal(stratified_subsample(labels, 500, seed=0), np.arange(100))
    feats = np.random.default_rng(0).normal(size=(100, 6))
    b1, b2 = (build_bank(feats, labels, rows=10, seed=3) for _ in range(2))
    assert np.array_equal(b1.bank, b2.bank) and b1.bank.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b1.bank, axis=1), 1.0, rtol=1e-6)
    assert (
        b1.memory_bytes == 10 * 6 * 4
        and default_k(10) == 1
        and default_k(7200) == 1
        and default_k(50_000) == 5
    )


def test_minmax_is_the_least_confident_members_max_logit():
    logits = np.array([[[1.0, 5.0], [3.0, 2.0], [0.0, 4.0]]])  # member maxima 5, 3, 4
    assert cal.minmax(logits)[0] == 3.0
    minmax = score_registry.get("minmax")
    assert minmax.compute(score_registry.ScoreData(logits))[0] == 3.0


def test_auto_picks_the_score_that_separates_on_validation_ood():
    rng = np.random.default_rng(0)
    n = 200
    # logits: MAL/minmax cannot tell ID from OOD (same distribution); features can
    logits_id, logits_ood = rng.normal(size=(2, n, 2, 3))
    feats_id = np.abs(rng.normal(size=(n, 4))) + np.array([5.0, 0, 0, 0])
    feats_ood = np.abs(rng.normal(size=(n, 4))) + np.array([0, 0, 0, 5.0])
    train = np.abs(rng.normal(size=(300, 4))) + np.array([5.0, 0, 0, 0])
    bank = build_bank(train, None, rows=300).bank
    kw = {
        "id_data": ScoreInputs(logits_id, feats_id),
        "id_name": "val",
        "ood_specs": {"o": "o.npz"},
        "temperature": 1.0,
        "bank": bank,
        "default_k": 1,
        "knn_k": None,
    }
    score, k, why = select_score("auto", ood_val={"o": ScoreInputs(logits_ood, feats_ood)}, **kw)
    assert score == "knn" and why.method == "auto" and why.val_auroc[f"knn@{k}"] > 0.99
    assert max(why.val_auroc["mal"], why.val_auroc["minmax"]) < 0.7
    assert set(why.val_auroc) >= {"mal", "msp", "minmax", "knn@1", "knn@200"}
    # the other way round: logits separate, features do not -> a logit score wins
    sep_id = logits_id + np.array([8.0, 0, 0])
    score, _, why = select_score(
        "auto",
        ood_val={"o": ScoreInputs(logits_ood, feats_id[::-1])},
        **{**kw, "id_data": ScoreInputs(sep_id, feats_id)},
    )
    assert score in ("mal", "minmax", "msp") and why.val_auroc[score] == max(why.val_auroc.values())
    # no validation OOD data: the benchmark's default; a given score is kept and recorded
    assert select_score("auto", ood_val={}, **kw)[:2] == ("knn", 1)
    assert select_score("auto", ood_val={}, **{**kw, "bank": None})[:2] == ("mal", None)
    given = select_score("msp", ood_val={"o": ScoreInputs(logits_ood, feats_ood)}, **kw)
    assert given[0] == "msp" and given[2].method == "given" and given[2].val_auroc
    # ties go to the earlier candidate
    same = np.arange(5.0)
    assert choose({"a": same, "b": same}, {"o": {"a": same - 10, "b": same - 10}})[0] == "a"


def test_default_export_deploys_knn_with_its_record(tiny_model):
    m = read_manifest(load_onnx(tiny_model))
    assert m.ood.score == "knn" and m.ood.selection is not None
    # no --ood-val: auto ranks on synthesized validation OOD sets (tests/export/test_synth_ood.py)
    why = m.ood.selection
    assert why.method == "auto" and why.synthesized is not None
    assert m.knn is not None and max(why.val_auroc, key=lambda c: why.val_auroc[c]) == (
        f"knn@{m.knn.k}"
    )
    assert m.knn.dims == 3 * 84 and m.knn.memory_bytes == m.knn.rows * m.knn.dims * 4
    assert m.knn.source.startswith("training split") and "validation" in m.knn.source
    assert m.outputs[:6] == ["logits", "probs", "mal", "msp", "minmax", "knn"]


def test_bank_is_built_from_training_images_only(tiny_run, tiny_model):
    from export.choice import training_bank
    from training.run import load_run, load_train_split

    run = load_run(tiny_run)
    train = load_train_split(tiny_run, run.config)
    bank, _ = training_bank(run, (1, 28, 28), rows=10**6, seed=0)
    m = read_manifest(load_onnx(tiny_model))
    assert bank.rows == len(train) == m.knn.rows and bank.source_images == len(train)
    # every validation image's nearest bank row is not itself (similarity < 1 - 1e-6 for most)
    val_feats = pre_logit_features(run.ensemble, run.val.as_model_input(1, 28, 28))
    top1 = knn_scores(val_feats, bank.bank, 1)
    train_feats = pre_logit_features(run.ensemble, train.as_model_input(1, 28, 28)[:50])
    train_top1 = knn_scores(train_feats, bank.bank, 1)
    assert np.all(train_top1 > 1 - 1e-5)  # training images are in the bank ...
    assert np.mean(top1 > 1 - 1e-5) < 0.05  # ... validation images are not


def test_demo_samples_photo_and_noise_flagged_digit_not(tiny_model, tmp_path):
    from sdde_serve.samples import write_samples

    engine = Engine(tiny_model)
    paths = write_samples(tmp_path)
    x = np.stack(
        [decode_image(p.read_bytes(), engine.manifest.input, ImageLimits()) for p in paths]
    )
    preds = make_predictions(engine.run(x), engine.manifest)
    flagged = {p.name: pred.is_ood for p, pred in zip(paths, preds, strict=True)}
    assert flagged == {"digit.png": False, "noise.png": True, "photo.png": True}
    assert {pred.score_kind for pred in preds} == {"knn"}
    # with a margin, not at the edge (issue 21 item 6: p = 0.055 flipped the old photo on
    # another machine): p below alpha / 2 for both outliers, the digit well above alpha
    alpha = engine.manifest.ood.alpha
    digit, noise, photo = (pred.ood_p_value for pred in preds)
    assert digit is not None and digit > 2 * alpha
    assert noise is not None and photo is not None and max(noise, photo) < alpha / 2


def test_new_scores_are_higher_for_in_distribution(tiny_model):
    """docs/conventions.md: minmax and knn, like MAL and MSP, are higher = in-distribution."""
    from sdde_serve.data import load_dataset

    engine = Engine(tiny_model)
    digits = engine.run(load_dataset("digits@test").as_model_input(1, 28, 28)[:200])
    noise = engine.run(np.random.default_rng(0).random((200, 1, 28, 28), dtype=np.float32))
    for kind in ("knn", "mal"):  # the 30-step model already separates digits from noise
        assert np.median(score_of(digits, kind)) > np.median(score_of(noise, kind)), kind
    # minmax: every member more confident -> higher; one unsure member pulls it down
    sure = np.array([[[6.0, 0.0], [5.0, 1.0]]])
    assert cal.minmax(sure)[0] > cal.minmax(sure * [[[1.0], [0.1]]])[0]
    assert (score_of(digits, "minmax") == cal.minmax(digits.logits)).all()
    np.testing.assert_array_equal(deployed_score(digits, engine.manifest), digits.knn)


def test_calibrate_refits_the_knn_threshold_from_the_graph(tiny_model, tmp_path):
    from sdde_serve.calibrate import calibrate_file
    from sdde_serve.data import load_dataset

    path = tmp_path / "m.onnx"
    shutil.copy(tiny_model, path)
    before = read_manifest(load_onnx(path))
    _, ood = calibrate_file(path, "digits@test", id_acceptance=0.9)
    after = read_manifest(load_onnx(path))
    assert ood.score == "knn" and after.ood.selection == before.ood.selection
    assert after.knn == before.knn
    knn = Engine(path).run(load_dataset("digits@test").as_model_input(1, 28, 28)).knn
    # the refit rule is the conformal one, on the graph's own knn output
    assert ood.calibration_scores == conformal.sorted_scores(knn)
    assert ood.threshold == conformal.threshold_for_alpha(ood.calibration_scores, 0.1)
    _, ood = calibrate_file(path, "digits@test", score="minmax")
    m = read_manifest(load_onnx(path))
    assert m.ood.score == "minmax" and m.ood.selection.method == "given"


def test_auto_with_validation_ood_and_a_float16_subsampled_bank(tiny_run, tmp_path):
    from export import export_run

    noise = tmp_path / "noise.npz"
    rng = np.random.default_rng(1)
    np.savez(noise, images=rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8))
    out = tmp_path / "m.onnx"
    m = export_run(
        tiny_run,
        out,
        score="auto",
        ood_val={"noise": str(noise)},
        knn_bank=300,
        knn_dtype="float16",
        with_cams=False,
    )
    assert m.knn.rows == 300 and m.knn.dtype == "float16" and m.knn.subsample == "stratified"
    assert m.knn.memory_bytes == 300 * 252 * 2
    assert m.ood.selection.method == "auto" and m.ood.selection.ood_val == {"noise": str(noise)}
    best = max(m.ood.selection.val_auroc, key=m.ood.selection.val_auroc.get)
    assert best.split("@")[0] == m.ood.score
    if m.ood.score == "knn":
        assert best == f"knn@{m.knn.k}"
    inits = {i.name: i for i in load_onnx(out).graph.initializer}
    assert inits[KNN_BANK_INITIALIZER].data_type == 10  # FLOAT16 in the file
    engine = Engine(out)
    assert engine.run(np.zeros((2, 1, 28, 28), np.float32)).knn.shape == (2,)


def test_a_model_without_a_bank_still_loads_and_serves(linear_model):
    from fastapi.testclient import TestClient

    from sdde_serve.server.app import create_app
    from sdde_serve.server.settings import Settings

    path, _ = linear_model
    engine = Engine(path)
    assert engine.manifest.knn is None and engine.manifest.ood.selection is None
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    out = engine.run(x)
    assert out.knn is None and out.minmax is None  # an older graph: four outputs
    np.testing.assert_array_equal(score_of(out, "minmax"), out.logits.max(2).min(1))
    with pytest.raises(ValueError, match="no 'knn' output"):
        score_of(out, "knn")
    preds = make_predictions(out, engine.manifest)
    assert [p.score_kind for p in preds] == ["mal"] * 3
    app = create_app(Settings(model=str(path)), engine=engine)
    with TestClient(app) as client:
        meta = client.get(f"/v2/models/{engine.manifest.name}").json()
        names = {o["name"] for o in meta["outputs"]}
        assert "minmax" in names and "knn" not in names
        body = {"inputs": [{"name": "images", "shape": [3, 1, 8, 8], "datatype": "FP32"}]}
        body["inputs"][0]["data"] = x.ravel().tolist()
        r = client.post(f"/v2/models/{engine.manifest.name}/infer", json=body)
        assert r.status_code == 200, r.text
        outs = {o["name"]: o["data"] for o in r.json()["outputs"]}
        np.testing.assert_allclose(outs["minmax"], out.logits.max(2).min(1), rtol=1e-6)
        body["outputs"] = [{"name": "knn"}]
        r = client.post(f"/v2/models/{engine.manifest.name}/infer", json=body)
        assert r.status_code == 400 and "knn" in r.json()["error"]


def test_cli_score_choices_match_the_exporter():
    from export import cli
    from export.knn import DEFAULT_BANK_ROWS
    from export.select import SCORE_CHOICES

    assert cli.SCORE_CHOICES == SCORE_CHOICES and cli.DEFAULT_BANK_ROWS == DEFAULT_BANK_ROWS


def test_knn_for_many_k_equals_one_k_at_a_time():
    from export.knn import knn_scores_many

    rng = np.random.default_rng(3)
    bank = normalize_rows(rng.normal(size=(40, 5)))
    q = rng.normal(size=(7, 5))
    many = knn_scores_many(q, bank, [1, 4, 40])
    for k in (1, 4, 40):
        np.testing.assert_allclose(many[k], knn_scores(q, bank, k), rtol=0, atol=1e-12)
        # and both equal a plain full sort
        np.testing.assert_allclose(many[k], -np.sort(-(normalize_rows(q) @ bank.T), 1)[:, k - 1])


def test_training_bank_equals_build_bank_on_all_features(tiny_run):
    """The exporter computes features for the kept rows only; same bank as subsampling after."""
    from export.choice import training_bank
    from training.run import load_run, load_train_split

    run = load_run(tiny_run)
    train = load_train_split(tiny_run, run.config)
    bank, source = training_bank(run, (1, 28, 28), rows=100, seed=4)
    feats = pre_logit_features(run.ensemble, train.as_model_input(1, 28, 28))
    ref = build_bank(feats, train.labels, rows=100, seed=4)
    np.testing.assert_allclose(bank.bank, ref.bank, atol=1e-6)
    assert np.array_equal(bank.indices, ref.indices) and bank.source_images == len(train)
    assert "stratified by class, seed 4" in source


def test_knn_deployed_without_a_knn_output_is_refused(tmp_path, linear_model):
    """A manifest that deploys knn on a graph without the output fails at load, not per request;
    calibrating a bank-less file for knn says why."""
    from sdde_serve.calibrate import calibrate_file
    from sdde_serve.engine import ModelLoadError
    from tests.onnx_factory import make_linear_ensemble

    path, _ = make_linear_ensemble(tmp_path / "knn.onnx", score="knn")
    with pytest.raises(ModelLoadError, match="deploys 'knn' but the graph lacks it"):
        Engine(path)
    copy = tmp_path / "linear.onnx"
    shutil.copy(linear_model[0], copy)
    npz = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz, images=rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8), labels=np.arange(40) % 4
    )
    with pytest.raises(UserError, match=r"no 'knn' output .*--knn-bank"):
        calibrate_file(copy, str(npz), score="knn")
    before = copy.read_bytes()
    _, ood = calibrate_file(copy, str(npz), score="minmax")  # an older graph: from its logits
    assert ood.score == "minmax" and copy.read_bytes() != before
