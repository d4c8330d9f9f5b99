"""The OOD-score registry and its detectors: each graph output against its float64 numpy reference
(random features and a tiny trained run), the sign convention, and a toy score registered in the
test only carried through export -> serve -> score -> eval (docs/scores.md)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from export.choice import final_layers
from export.graph import build_graph, to_onnx
from export.knn import pre_logit_features
from export.verify import VerificationError, run_onnx, verification_inputs, verify
from sdde_serve import scores
from sdde_serve.errors import UserError
from sdde_serve.scores import FitData, ScoreData, ScoreSpec
from sdde_serve.scores.mahalanobis import fit as fit_mahalanobis
from training.ensemble import build_ensemble


def _lenets(members: int = 2, classes: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return build_ensemble(
        "lenet", members=members, num_classes=classes, in_chans=1, mean=[0.5], std=[0.25]
    ).eval()


def test_registry_lists_every_score_once_with_its_traits():
    assert scores.names()[:4] == ("mal", "msp", "minmax", "knn")
    assert {"energy", "mahalanobis"} <= set(scores.names())
    assert set(scores.names(member_subset=True)) == {"mal", "msp", "minmax", "energy"}
    assert scores.names(recompute_from_logits=True) == ("minmax",)
    assert all(s.higher_is_in_distribution for s in scores.SCORES.values())
    with pytest.raises(ValueError, match="already registered"):
        scores.register(scores.get("mal"))
    with pytest.raises(ValueError, match="higher = more in-distribution"):
        scores.register(ScoreSpec("neg", "x", lambda d: -d.logits.max(-1).mean(1), "m:f",
                                  higher_is_in_distribution=False))  # fmt: skip
    with pytest.raises(UserError, match="unknown OOD score 'nope'"):
        scores.get("nope")


def test_energy_is_t_logsumexp_of_the_averaged_logits_by_hand():
    logits = np.array([[[1.0, 3.0], [3.0, 1.0]]])  # averaged: [2, 2]
    got = scores.get("energy").compute(ScoreData(logits, temperature=2.0))
    np.testing.assert_allclose(got, [2.0 * np.log(2 * np.exp(1.0))])
    # a soft maximum of the averaged logits: MAL <= energy <= MAL + T log L
    z = np.random.default_rng(0).normal(size=(50, 3, 5)) * 4
    for t in (0.5, 1.0, 3.0):
        e = scores.get("energy").compute(ScoreData(z, t))
        mal = z.mean(1).max(1)
        assert np.all(mal <= e + 1e-12) and np.all(e <= mal + t * np.log(5) + 1e-12)


def _openood_mds(train: np.ndarray, labels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """OpenOOD's MDS for one network, written the way its postprocessor does it."""
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(0) for c in classes])
    centred = train - means[np.searchsorted(classes, labels)]
    cov = np.cov(centred, rowvar=False, bias=True)  # EmpiricalCovariance: MLE, mean removed
    precision = np.linalg.pinv(cov)
    d = np.stack([np.einsum("bd,de,be->b", x - m, precision, x - m) for m in means], axis=1)
    return (-d).max(axis=1)


def test_mahalanobis_is_openoods_mds_per_member_averaged():
    rng = np.random.default_rng(0)
    n, members, dims, classes = 300, 3, 6, 4
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(members, classes, dims)) * 3
    train = centres[:, labels].transpose(1, 0, 2) + rng.normal(size=(n, members, dims))
    x = rng.normal(size=(20, members, dims)) * 2
    stats = fit_mahalanobis(FitData(train, labels, np.zeros((members, 2, dims)), np.zeros((3, 2))))
    got = scores.get("mahalanobis").compute(ScoreData(np.zeros((20, members, 2)), 1.0, x, stats))
    want = np.mean([_openood_mds(train[:, m], labels, x[:, m]) for m in range(members)], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # higher = more in-distribution: a training point scores above a far-away one
    near = scores.get("mahalanobis").compute(ScoreData(np.zeros((1, 3, 2)), 1.0, train[:1], stats))
    far = scores.get("mahalanobis").compute(
        ScoreData(np.zeros((1, 3, 2)), 1.0, train[:1] + 50.0, stats)
    )
    assert near[0] > far[0]


def _openood_vim(train, w, b, x, dim):
    """OpenOOD's ViM postprocessor for one network (numpy, float64)."""
    u = -np.linalg.pinv(w) @ b
    centred = train - u
    vals, vecs = np.linalg.eig(centred.T @ centred / len(train))
    ns = np.ascontiguousarray(vecs.T[np.argsort(vals * -1)[dim:]].T).real
    vlogit_train = np.linalg.norm((train - u) @ ns, axis=-1)
    alpha = (train @ w.T + b).max(axis=-1).mean() / vlogit_train.mean()
    logits = x @ w.T + b
    top = logits.max(-1, keepdims=True)
    energy = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
    return energy - alpha * np.linalg.norm((x - u) @ ns, axis=-1)


def test_vim_is_openoods_vim_per_member_averaged():
    rng = np.random.default_rng(2)
    n, members, dims, classes = 400, 2, 8, 3
    train = rng.normal(size=(n, members, dims)) * np.linspace(3, 0.2, dims)
    w, b = rng.normal(size=(members, classes, dims)), rng.normal(size=(members, classes))
    data = FitData(train, rng.integers(0, classes, n), w, b)
    stats = scores.get("vim").fit(data)
    x = rng.normal(size=(15, members, dims)) * 2
    logits = np.einsum("bnd,nld->bnl", x, w) + b
    got = scores.get("vim").compute(ScoreData(logits, 1.0, x, stats))
    want = np.mean(
        [_openood_vim(train[:, m], w[m], b[m], x[:, m], dims // 2) for m in range(members)], axis=0
    )
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # off the training features' principal space scores lower
    off = np.zeros((1, members, dims))
    off[..., -1] = 30.0  # the smallest-variance direction
    base = scores.get("vim").compute(
        ScoreData(np.zeros((1, members, classes)), 1.0, off * 0, stats)
    )
    assert (
        scores.get("vim").compute(ScoreData(np.zeros((1, members, classes)), 1.0, off, stats))
        < base
    )


def test_knn_members_averages_each_members_own_knn():
    from sdde_serve.scores.knn import knn_scores

    rng = np.random.default_rng(3)
    train, x = rng.normal(size=(30, 3, 5)), rng.normal(size=(7, 3, 5))
    stats = scores.get("knn_members").fit(FitData(train, np.zeros(30), *(None, None)))
    got = scores.get("knn_members").compute(ScoreData(np.zeros((7, 3, 2)), 1.0, x, stats))
    from sdde_serve.scores.knn import normalize_rows

    want = np.mean([knn_scores(x[:, m], normalize_rows(train[:, m]), 1) for m in range(3)], 0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # one member: the concatenated knn itself
    one = scores.get("knn_members").fit(FitData(train[:, :1], np.zeros(30), None, None))
    got1 = scores.get("knn_members").compute(ScoreData(np.zeros((7, 1, 2)), 1.0, x[:, :1], one))
    np.testing.assert_allclose(got1, knn_scores(x[:, 0], normalize_rows(train[:, 0]), 1))


@pytest.mark.parametrize("layout", ["loop", "packed"])
def test_graph_energy_mahalanobis_and_vim_equal_numpy(layout):
    ens = _lenets()
    rng = np.random.default_rng(1)
    train = rng.random((40, 1, 28, 28), dtype=np.float32)
    feats = pre_logit_features(ens, train).reshape(40, 2, -1)
    fit_data = FitData(feats, np.arange(40) % 4, *final_layers(ens))
    stats = fit_mahalanobis(fit_data)
    vim_stats = scores.get("vim").fit(fit_data)
    knn_stats = scores.get("knn_members").fit(fit_data)
    graph = build_graph(
        ens,
        layout,
        input_shape=(1, 28, 28),
        temperature=1.7,
        score_stats={
            "energy": {},
            "mahalanobis": stats,
            "vim": vim_stats,
            "knn_members": knn_stats,
        },
    )
    names = ["logits", "probs", "mal", "msp", "minmax", "energy", "mahalanobis", "vim"]
    names.append("knn_members")
    assert graph.output_names == names  # LeNet: no CAMs
    proto = to_onnx(graph, input_shape=(1, 28, 28))
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    assert inits["mahalanobis_precision"] == [2, 84, 84] and inits["mahalanobis_mpm"] == [2, 4]
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    out = run_onnx(proto, x)
    with torch.no_grad():
        logits = ens(torch.from_numpy(x)).double().numpy()
    f = pre_logit_features(ens, x).reshape(6, 2, -1).astype(np.float64)
    energy = scores.get("energy").compute(ScoreData(logits, 1.7))
    np.testing.assert_allclose(out["energy"], energy, atol=1e-4)
    mds = scores.get("mahalanobis").compute(ScoreData(logits, 1.7, f, stats))
    np.testing.assert_allclose(out["mahalanobis"], mds, rtol=1e-4, atol=1e-3)
    vim = scores.get("vim").compute(ScoreData(logits, 1.7, f, vim_stats))
    np.testing.assert_allclose(out["vim"], vim, rtol=1e-4, atol=1e-4)
    km = scores.get("knn_members").compute(ScoreData(logits, 1.7, f, knn_stats))
    np.testing.assert_allclose(out["knn_members"], km, atol=1e-5)
    wanted = {"energy": {}, "mahalanobis": stats, "vim": vim_stats, "knn_members": knn_stats}
    report = verify(proto, ens, temperature=1.7, inputs=verification_inputs((1, 28, 28), x),
                    scores=wanted)  # fmt: skip
    assert {"energy", "mahalanobis", "vim"} <= set(report["real"])
    wrong = {**wanted, "mahalanobis": {**stats, "mpm": stats["mpm"] + 5.0}}
    with pytest.raises(VerificationError, match="'mahalanobis'"):
        verify(proto, ens, temperature=1.7, inputs={"x": x}, scores=wrong)
    with pytest.raises(VerificationError, match="energy"):
        verify(proto, ens, temperature=1.7, inputs={"x": x})  # outputs nobody checks


def test_export_deploys_mahalanobis_from_training_statistics(tiny_run, tmp_path):
    from export import export_run
    from sdde_serve.data import load_dataset
    from sdde_serve.engine import Engine
    from sdde_serve.manifest import load_onnx, read_manifest
    from sdde_serve.scoring import deployed_score, make_predictions
    from training.run import load_run

    out = tmp_path / "m.onnx"
    m = export_run(tiny_run, out, score="mahalanobis", knn_bank=120, with_cams=False,
                   extra_scores=("energy", "vim"))  # fmt: skip
    assert m.ood.score == "mahalanobis" and m.outputs[-3:] == ["energy", "mahalanobis", "vim"]
    rec = m.score_stats["mahalanobis"]
    assert rec.shapes["precision"] == [3, 84, 84] and rec.source.startswith("training split")
    assert rec.memory_bytes == 4 * (3 * 84 * 84 + 3 * 10 * 84 + 3 * 10)
    assert read_manifest(load_onnx(out)).score_stats == m.score_stats
    # the graph's score is the numpy reference on the PyTorch features, statistics refitted here
    from export.choice import training_features

    run = load_run(tiny_run)
    train = training_features(run, (1, 28, 28), rows=120, seed=0)
    stats = train.fit("mahalanobis")
    images = load_dataset("digits@test").as_model_input(1, 28, 28)[:64]
    engine = Engine(out)
    got = engine.run(images)
    feats = pre_logit_features(run.ensemble.eval(), images).reshape(64, 3, -1)
    ref = scores.get("mahalanobis").compute(ScoreData(got.logits, 1.0, feats, stats))
    np.testing.assert_allclose(deployed_score(got, engine.manifest), ref, rtol=1e-4, atol=1e-3)
    vim = scores.get("vim").compute(ScoreData(got.logits, 1.0, feats, train.fit("vim")))
    np.testing.assert_allclose(got.score("vim"), vim, rtol=1e-4, atol=1e-3)
    assert m.score_stats["vim"].shapes == {"u": [3, 84], "residual": [3, 84, 42], "alpha": [3]}
    preds = make_predictions(got, engine.manifest)
    assert {p.score_kind for p in preds} == {"mahalanobis"}
    assert np.mean([not p.is_ood for p in preds]) > 0.7  # test digits mostly accepted
    noise = engine.run(np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32))
    assert np.median(deployed_score(noise, engine.manifest)) < np.median(ref)


def test_export_refuses_a_fitted_score_without_training_features(tiny_run, tmp_path):
    from export import export_run

    with pytest.raises(UserError, match="--knn-bank > 0"):
        export_run(tiny_run, tmp_path / "m.onnx", score="mahalanobis", knn_bank=0)


def test_equal_auroc_goes_to_the_lower_fpr95():
    from export.select import choose

    id_scores = np.arange(100.0)  # 95% acceptance: ID scores >= 5 accepted
    # equal AUROC, 1989 of 2000 pairs ordered: "a" has one OOD image above 89 ID images (and
    # above the threshold: FPR@95 = 1/20), "b" loses 11 pairs below the threshold (FPR@95 = 0)
    ood_a = np.concatenate([[10.5], np.full(19, -1.0)])
    ood_b = np.concatenate([[4.5, 4.5, 0.5], np.full(17, -1.0)])
    best, means, _ = choose({"a": id_scores, "b": id_scores}, {"o": {"a": ood_a, "b": ood_b}})
    assert means["a"] == means["b"] == pytest.approx(1989 / 2000) and best == "b"
    same = {"a": id_scores, "b": id_scores}
    tied = {"o": {"a": ood_a, "b": ood_a}}
    assert choose(same, tied)[0] == "a"  # fully tied: the earlier candidate


def test_validation_split_halves_are_disjoint_and_stratified():
    from export.choice import split_validation
    from sdde_serve.data import ArrayDataset

    labels = np.repeat(np.arange(3), [10, 6, 4])
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1) * np.ones((1, 1, 2, 2), np.uint8)
    pick, cal = split_validation(ArrayDataset("val", images, labels))
    a, b = pick.images[:, 0, 0, 0], cal.images[:, 0, 0, 0]
    assert len(a) == len(b) == 10 and not set(a) & set(b) and set(a) | set(b) == set(range(20))
    assert np.bincount(pick.labels).tolist() == [5, 3, 2]
    assert "choice half" in pick.name and "calibration half" in cal.name


def test_auto_chooses_on_one_half_and_calibrates_on_the_other(tiny_run, tmp_path):
    from export import export_run
    from training.run import load_run

    noise = tmp_path / "noise.npz"
    rng = np.random.default_rng(1)
    np.savez(noise, images=rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8))
    m = export_run(tiny_run, tmp_path / "m.onnx", ood_val={"noise": str(noise)}, knn_bank=120,
                   with_cams=False)  # fmt: skip
    why = m.ood.selection
    n_val = len(load_run(tiny_run).val)
    assert why.calibration_apart and why.id_n + m.calibration.n == n_val
    assert "choice half" in why.id_data and "calibration half" in m.calibration.data
    assert len(m.ood.calibration_scores) == m.calibration.n
    # the validation table: every candidate's AUROC and FPR@95, the fitted scores included
    fitted = {"energy", "mahalanobis", "vim", "knn_members", "knn@1"}
    assert set(why.val_fpr95) == set(why.val_auroc) >= fitted
    best = max(why.val_auroc.values())
    ties = [c for c, v in why.val_auroc.items() if v == best]
    chosen = min(ties, key=lambda c: why.val_fpr95[c])
    assert chosen.split("@")[0] == m.ood.score


def _robust_z_mean_by_hand(columns: list[np.ndarray], ref: list[np.ndarray]) -> np.ndarray:
    """The combined score written out: each base standardised by the median and IQR / 1.349 of
    its ID reference scores, then averaged."""
    z = []
    for s, r in zip(columns, ref, strict=True):
        q1, med, q3 = np.quantile(r, [0.25, 0.5, 0.75])
        z.append((s - med) / ((q3 - q1) / 1.349))
    return np.mean(z, axis=0)


def test_combined_is_the_mean_robust_z_of_mal_and_knn():
    from sdde_serve.scores.combined import standardise

    rng = np.random.default_rng(3)
    n, members, dims, classes = 200, 3, 5, 4
    labels = rng.integers(0, classes, n)
    train = rng.normal(size=(n, members, dims)) + labels[:, None, None]
    w, b = rng.normal(size=(members, classes, dims)), rng.normal(size=(members, classes))
    spec = scores.get("combined")
    fitted = spec.fit(FitData(train, labels, w, b))
    assert set(fitted) == {"knn_bank"} and fitted["knn_bank"].shape == (members * dims, n)
    unit = train.reshape(n, -1) / np.linalg.norm(train.reshape(n, -1), axis=1, keepdims=True)

    def data(x: np.ndarray, stats: dict) -> ScoreData:
        return ScoreData(np.einsum("inD,nlD->inl", x, w) + b, 1.0, x, stats)

    id_x = rng.normal(size=(60, members, dims)) + rng.integers(0, classes, 60)[:, None, None]
    stats = standardise(fitted, data(id_x, fitted))
    x = rng.normal(size=(25, members, dims)) * 3
    got = spec.compute(data(x, stats))

    def bases(xs):  # by hand: MAL, and the nearest (k = 1 for 200 rows) training row's cosine
        logits = np.einsum("inD,nlD->inl", xs, w) + b
        q = xs.reshape(len(xs), -1)
        cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
        return [logits.mean(axis=1).max(axis=1), cos.max(axis=1)]

    want = _robust_z_mean_by_hand(bases(x), bases(id_x))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # the ID reference images themselves sit at median 0 on each base
    np.testing.assert_allclose(np.median(spec.compute(data(id_x, stats))), 0.0, atol=1.0)


def _banks_of(proto, shape: tuple[int, int]) -> list[str]:
    """Names of the initializers of ``shape`` (a KNN bank's ``[N*D, R]``)."""
    return [i.name for i in proto.graph.initializer if tuple(i.dims) == shape]


# knn_dtype: None, no knn output; float32, the knn bank equal to combined's (stored once);
# float16, a float16-rounded knn bank (combined keeps its own float32 copy, the old layout)
@pytest.mark.parametrize(
    ("layout", "knn_dtype"),
    [("loop", None), ("packed", None), ("loop", np.float32), ("packed", np.float32),
     ("loop", np.float16)],
)  # fmt: skip
def test_graph_combined_equals_numpy_and_verifies(layout, knn_dtype):
    from export.knn import normalize_rows
    from sdde_serve.scores.combined import standardise

    ens = _lenets()
    rng = np.random.default_rng(4)
    train = rng.random((40, 1, 28, 28), dtype=np.float32)
    feats = pre_logit_features(ens, train).reshape(40, 2, -1)
    fitted = scores.get("combined").fit(FitData(feats, np.arange(40) % 4, *final_layers(ens)))
    val = rng.random((30, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        val_logits = ens(torch.from_numpy(val)).double().numpy()
    val_f = pre_logit_features(ens, val).reshape(30, 2, -1).astype(np.float64)
    stats = standardise(fitted, ScoreData(val_logits, 1.0, val_f, fitted))
    assert stats["median"].shape == stats["scale"].shape == (2,)
    # the knn bank as export/choice.py builds it: float32 unit rows, [R, N*D]
    bank = None if knn_dtype is None else normalize_rows(feats.reshape(40, -1)).astype(knn_dtype)
    graph = build_graph(
        ens, layout, input_shape=(1, 28, 28), score_stats={"combined": stats},
        knn_bank=None if bank is None else torch.from_numpy(bank.astype(np.float32)), knn_k=1,
    )  # fmt: skip
    assert graph.output_names[-1] == "combined"
    proto = to_onnx(graph, input_shape=(1, 28, 28))
    inits = {i.name for i in proto.graph.initializer}
    assert {"combined_median", "combined_scale"} <= inits
    # one stored bank when the knn score's equals combined's, else combined's own copy
    shared = knn_dtype is np.float32
    want_banks = {None: ["combined_knn_bank"], np.float32: ["knn_bank"],
                  np.float16: ["knn_bank", "combined_knn_bank"]}[knn_dtype]  # fmt: skip
    assert sorted(_banks_of(proto, (feats.shape[1] * feats.shape[2], 40))) == sorted(want_banks)
    assert ("combined_knn_bank" not in inits) == shared
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        logits = ens(torch.from_numpy(x)).double().numpy()
    f = pre_logit_features(ens, x).reshape(6, 2, -1).astype(np.float64)
    want = scores.get("combined").compute(ScoreData(logits, 1.0, f, stats))
    np.testing.assert_allclose(run_onnx(proto, x)["combined"], want, rtol=1e-4, atol=1e-3)
    knn = None if bank is None else (bank.astype(np.float32), 1)
    verify(proto, ens, temperature=1.0, inputs={"x": x}, knn=knn, scores={"combined": stats})
    wrong = {**stats, "median": stats["median"] + 1.0}
    with pytest.raises(VerificationError, match="'combined'"):
        verify(proto, ens, temperature=1.0, inputs={"x": x}, knn=knn, scores={"combined": wrong})


def test_combined_is_fitted_on_the_choice_half_and_calibrated_on_the_other(tiny_run, tmp_path):
    from onnx import numpy_helper

    from export import export_run
    from export.choice import split_validation, training_features
    from export.knn import pre_logit_features as feats_of
    from sdde_serve.data import load_dataset
    from sdde_serve.engine import Engine
    from sdde_serve.manifest import load_onnx
    from sdde_serve.scores.combined import standardise
    from training.run import load_run

    m = export_run(tiny_run, tmp_path / "m.onnx", score="combined", knn_bank=120,
                   with_cams=False)  # fmt: skip
    run = load_run(tiny_run)
    assert m.ood.score == "combined" and "calibration half" in m.calibration.data
    assert m.calibration.n == len(run.val) - len(run.val) // 2
    assert m.score_stats["combined"].shapes == {"median": [2], "scale": [2], "knn_bank": [252, 120]}
    # the KNN bank is stored once: combined reads the knn score's
    assert _banks_of(load_onnx(tmp_path / "m.onnx"), (252, 120)) == ["knn_bank"]
    # ... and counted once: under knn, not again in combined's own bytes (median + scale)
    assert m.score_stats["combined"].memory_bytes == 4 * (2 + 2)
    assert m.knn is not None and m.knn.memory_bytes == 4 * 252 * 120
    # the stored standardisation is the choice half's (refitted here), not the calibration half's
    choice, _ = split_validation(run.val)
    images = choice.as_model_input(1, 28, 28)
    ens = run.ensemble.eval()
    with torch.no_grad():
        logits = ens(torch.from_numpy(images)).double().numpy()
    f = feats_of(ens, images).reshape(len(images), 3, -1).astype(np.float64)
    fitted = training_features(run, (1, 28, 28), rows=120, seed=0).fit("combined")
    want = standardise(fitted, ScoreData(logits, 1.0, f, fitted))
    inits = {i.name: i for i in load_onnx(tmp_path / "m.onnx").graph.initializer}
    np.testing.assert_allclose(numpy_helper.to_array(inits["combined_median"]), want["median"],
                               rtol=1e-5)  # fmt: skip
    # higher = more in-distribution, on the trained run: test digits above uniform noise
    engine = Engine(tmp_path / "m.onnx")
    digits = engine.run(load_dataset("digits@test").as_model_input(1, 28, 28)[:100])
    noise = engine.run(np.random.default_rng(0).random((100, 1, 28, 28), dtype=np.float32))
    assert np.median(digits.score("combined")) > np.median(noise.score("combined"))


def test_auto_ranks_the_combined_score_with_the_others(tiny_run, tmp_path):
    from export import export_run

    noise = tmp_path / "noise.npz"
    rng = np.random.default_rng(2)
    np.savez(noise, images=rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8))
    m = export_run(tiny_run, tmp_path / "m.onnx", ood_val={"noise": str(noise)}, knn_bank=120,
                   with_cams=False)  # fmt: skip
    assert "combined" in m.ood.selection.val_auroc and "combined" in m.ood.selection.val_fpr95


def test_a_file_with_combined_s_own_bank_copy_still_serves(tiny_run, tmp_path, monkeypatch):
    """Files exported before the bank was shared hold a second copy, ``combined_knn_bank``: they
    load, serve and score as the shared layout does."""
    from fastapi.testclient import TestClient

    from export import export_run
    from export.graph import FusedEnsemble
    from sdde_serve.data import chw_to_pil, load_dataset
    from sdde_serve.engine import Engine
    from sdde_serve.manifest import load_onnx
    from sdde_serve.server.app import create_app
    from sdde_serve.server.settings import Settings

    kw = dict(score="combined", knn_bank=120, with_cams=False)
    export_run(tiny_run, tmp_path / "new.onnx", **kw)

    def own_copy(self, name: str, value: np.ndarray) -> str:  # the graph builder before sharing
        self.register_buffer(name, torch.as_tensor(np.asarray(value, np.float32)))
        return name

    monkeypatch.setattr(FusedEnsemble, "store_stat", own_copy)
    export_run(tiny_run, tmp_path / "old.onnx", **kw)
    old = load_onnx(tmp_path / "old.onnx")
    assert sorted(_banks_of(old, (252, 120))) == ["combined_knn_bank", "knn_bank"]
    grown = (tmp_path / "old.onnx").stat().st_size - (tmp_path / "new.onnx").stat().st_size
    assert grown >= 4 * 252 * 120  # the second float32 copy
    images = load_dataset("digits@test").as_model_input(1, 28, 28)[:20]
    new_out, old_out = (Engine(tmp_path / f).run(images) for f in ("new.onnx", "old.onnx"))
    np.testing.assert_allclose(old_out.score("combined"), new_out.score("combined"), atol=1e-5)
    png = io.BytesIO()
    chw_to_pil(load_dataset("digits@test").images[0]).save(png, format="PNG")
    app = create_app(Settings(model=tmp_path / "old.onnx"), Engine(tmp_path / "old.onnx"))
    with TestClient(app, raise_server_exceptions=False) as client:
        png_type = {"content-type": "image/png"}
        r = client.post("/v1/predict", content=png.getvalue(), headers=png_type)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert pred["score_kind"] == "combined"
    assert pred["ood_score"] == pytest.approx(float(old_out.score("combined")[0]), abs=1e-4)
