"""``sdde eval --members-sweep``: k = N equals the full ensemble (with and without validation
data), k = 1 the single member, T chosen per smaller subset by the export's rule on validation
data, and the subset sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdde_serve import calibration as cal
from sdde_serve.data import load_dataset
from sdde_serve.engine import Engine
from sdde_serve.evaluation.evaluate import evaluate
from sdde_serve.evaluation.members import (
    SUBSET_SCORES,
    SweepConfig,
    member_subsets,
    members_sweep,
    sweep_on_engine,
)
from sdde_serve.evaluation.metrics import ood_metrics
from sdde_serve.temperature import choose_temperature
from tests.evaluation.helpers import labelled_npz, noise_npz, texture_npz

CLASSIFICATION = ("accuracy", "nll", "ece", "brier")


@pytest.fixture(scope="module")
def linear_eval(linear_model, tmp_path_factory: pytest.TempPathFactory):
    path, _ = linear_model
    d = tmp_path_factory.mktemp("sweep_linear")
    engine = Engine(path, intra_op_threads=1)
    data = load_dataset(str(labelled_npz(d / "id.npz", 240, 8, classes=4, seed=1)), split="test")
    ood = {
        "noise": load_dataset(str(noise_npz(d / "n.npz", 100, 8, seed=2, high=90))),
        "tex": load_dataset(str(texture_npz(d / "t.npz", 60, 8, seed=3))),
    }
    ev = evaluate(engine, data, ood, groups={"far": ["noise", "tex"]})
    val = load_dataset(str(labelled_npz(d / "val.npz", 150, 8, classes=4, seed=9)), split="test")
    return engine, ev, val


def test_k_equals_n_is_the_full_ensemble(linear_eval) -> None:
    _, ev, _ = linear_eval
    sweep = members_sweep(ev, config=SweepConfig(subsets=4))
    full, after = sweep["first"][-1], ev.metrics["classification"]["after"]
    assert full["members"] == [0, 1, 2]
    for k in CLASSIFICATION:
        assert full[k] == after[k]  # same logits, same T (the manifest's): identical numbers
    sets = ev.metrics["ood"]["sets"]
    for name in ("noise", "tex"):
        got = full["ood"]["sets"][name]
        assert got["minmax"]["auroc"] == sets[name]["minmax"]["auroc"]
        assert got["minmax"]["fpr95"] == sets[name]["minmax"]["fpr95"]
        # the graph's float32 mal/msp against float64 recomputations: ties may differ slightly
        assert got["mal"]["auroc"] == pytest.approx(sets[name]["mal"]["auroc"], abs=2e-3)
        assert got["msp"]["auroc"] == pytest.approx(sets[name]["msp"]["auroc"], abs=2e-3)
    far = ev.metrics["ood"]["groups"]["far"]["minmax"]["auroc"]
    assert full["ood"]["groups"]["far"]["minmax"]["auroc"] == pytest.approx(far)
    # one subset of size N: the random mean is the full ensemble, with no spread
    last = sweep["random"][-1]
    assert last["subsets"] == [[0, 1, 2]]
    assert last["mean"]["accuracy"] == full["accuracy"] and last["std"]["accuracy"] == 0.0


def test_k_equals_one_is_the_single_member(linear_eval) -> None:
    _, ev, _ = linear_eval
    sweep = members_sweep(ev, config=SweepConfig(subsets=5))
    t = ev.metrics["model"]["temperature"]
    labels = ev.labels
    singles = []
    for m in range(3):
        z = ev.id_set.logits[:, m]
        probs = cal.softmax(z / t)
        single = {
            "accuracy": float((z.argmax(1) == labels).mean()),
            "nll": cal.nll(probs, labels),
            "ece": cal.ece(probs, labels),
            "brier": cal.brier(probs, labels),
        }
        assert single["accuracy"] == ev.metrics["classification"]["members"]["accuracy"][m]
        noise = ev.ood_sets[0].logits[:, m]
        single["mal"] = ood_metrics(z.max(1), noise.max(1))["auroc"]
        single["msp"] = ood_metrics(probs.max(1), cal.softmax(noise / t).max(1))["auroc"]
        singles.append(single)
    first = sweep["first"][0]
    assert first["members"] == [0]
    for k in CLASSIFICATION:
        assert first[k] == pytest.approx(singles[0][k], rel=1e-12)
    for score in ("mal", "msp", "minmax"):  # with one member, minmax = mal = its max logit
        expected = singles[0]["msp" if score == "msp" else "mal"]
        assert first["ood"]["sets"]["noise"][score]["auroc"] == pytest.approx(expected)
    # C(3, 1) = 3 <= 5 subsets: every member once, and the mean is the members' mean
    one = sweep["random"][0]
    assert one["subsets"] == [[0], [1], [2]]
    assert one["mean"]["accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in singles]))
    assert one["std"]["nll"] == pytest.approx(np.std([s["nll"] for s in singles]))


def test_with_validation_data_k_equals_n_is_still_the_main_table(linear_eval) -> None:
    """All N members are the exported graph: its manifest T, whatever T a fit on the validation
    data would give (here the raw fit is far from the manifest's 1.5)."""
    engine, ev, val = linear_eval
    sweep = sweep_on_engine(ev, engine, SweepConfig(subsets=3), val_data=val)
    val_logits = engine.run_batches(val.as_model_input(1, 8, 8)).logits.astype(np.float64)
    assert abs(cal.fit_temperature(val_logits, val.labels) - 1.5) > 0.05  # would disagree
    full, after = sweep["first"][-1], ev.metrics["classification"]["after"]
    assert full["temperature"] == ev.metrics["model"]["temperature"] == pytest.approx(1.5)
    for k in CLASSIFICATION:
        assert full[k] == after[k]
    assert sweep["random"][-1]["mean"]["nll"] == after["nll"]


def test_temperature_is_chosen_per_subset_by_the_exports_rule(linear_eval) -> None:
    engine, ev, val = linear_eval
    sweep = sweep_on_engine(ev, engine, SweepConfig(subsets=3), val_data=val)
    assert sweep["temperature_refitted"] and "150 images" in sweep["temperature"]
    val_logits = engine.run_batches(val.as_model_input(1, 8, 8)).logits.astype(np.float64)
    for first in sweep["first"][:-1]:  # k < N; k = N: the test above
        idx = first["members"]
        t = choose_temperature(val_logits[:, idx], val.labels).temperature
        assert first["temperature"] == pytest.approx(t, rel=1e-9)
        probs = cal.ensemble_probs(ev.id_set.logits[:, idx], t)
        assert first["nll"] == pytest.approx(cal.nll(probs, ev.labels), rel=1e-9)
        msp_id = cal.msp(probs)
        msp_noise = cal.msp(cal.ensemble_probs(ev.ood_sets[0].logits[:, idx], t))
        expected = ood_metrics(msp_id, msp_noise)["auroc"]
        assert first["ood"]["sets"]["noise"]["msp"]["auroc"] == pytest.approx(expected)
    # the accuracy does not depend on T for one member; the T-free scores not at all
    plain = members_sweep(ev, config=SweepConfig(subsets=3))
    assert plain["first"][0]["accuracy"] == sweep["first"][0]["accuracy"]
    assert (
        plain["first"][1]["ood"]["sets"]["tex"]["mal"]
        == sweep["first"][1]["ood"]["sets"]["tex"]["mal"]
    )


def test_member_subsets() -> None:
    assert member_subsets(5, 5, 3, seed=0) == [(0, 1, 2, 3, 4)]
    assert member_subsets(4, 1, 10, seed=0) == [(0,), (1,), (2,), (3,)]
    picked = member_subsets(10, 4, 6, seed=1)
    assert len(picked) == 6 == len(set(picked))
    assert all(len(s) == 4 and list(s) == sorted(s) for s in picked)
    assert member_subsets(10, 4, 6, seed=1) == picked  # seeded
    assert member_subsets(10, 4, 6, seed=2) != picked
    assert len(member_subsets(5, 2, 10, seed=0)) == math.comb(5, 2)


def test_minmax_by_hand() -> None:
    z = np.array([[[1.0, 3.0], [2.0, 0.5], [0.0, 4.0]]])  # members' max: 3, 2, 4
    assert SUBSET_SCORES["minmax"](z, 1.0)[0] == 2.0
    assert SUBSET_SCORES["mal"](z, 1.0)[0] == pytest.approx(7.5 / 3)
