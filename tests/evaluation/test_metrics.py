"""OOD metrics: hand-computed values and scikit-learn as the reference (ties included)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from sdde_serve.calibration import threshold_for_acceptance
from sdde_serve.evaluation.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    mean_metrics,
    ood_metrics,
    roc_curve,
)

ID = np.array([0.9, 0.8, 0.4])
OOD = np.array([0.5, 0.1])


def test_hand_computed_no_ties() -> None:
    # 5 of the 6 (id, ood) pairs are ordered correctly (0.4 < 0.5 is the exception)
    assert auroc(ID, OOD) == pytest.approx(5 / 6)
    # ranking P P N P N: AP = 1/3*1 + 1/3*1 + 1/3*3/4
    assert aupr_in(ID, OOD) == pytest.approx(11 / 12)
    # negated, OOD positive: -0.1(O) -0.4(I) -0.5(O) ...: AP = 1/2*1 + 1/2*2/3
    assert aupr_out(ID, OOD) == pytest.approx(5 / 6)
    # accepting all 3 ID images needs threshold 0.4, which accepts the OOD 0.5
    assert fpr_at_tpr(ID, OOD) == pytest.approx(0.5)


def test_hand_computed_ties() -> None:
    # pairs: (1,2) 0, (1,0) 1, (2,2) 1/2, (2,0) 1, (3,2) 1, (3,0) 1 -> 4.5 / 6
    assert auroc([1, 2, 3], [2, 0]) == pytest.approx(0.75)
    # one threshold holds all three tied samples: precision 2/3 at recall 1
    assert aupr_in([1, 1], [1, 0]) == pytest.approx(2 / 3)
    # all tied: the ROC is the diagonal
    assert auroc([1, 1, 1], [1, 1]) == pytest.approx(0.5)
    assert fpr_at_tpr([1, 1, 1], [1, 1]) == pytest.approx(1.0)


def test_fpr95_hand_computed_twenty() -> None:
    id_scores = np.arange(1, 21, dtype=float)  # accept 19 of 20: threshold 2
    assert fpr_at_tpr(id_scores, [0.5, 1.5, 2.5, 10.5]) == pytest.approx(0.5)
    assert fpr_at_tpr(id_scores, [0.5, 1.5, 1.9, 1.0]) == pytest.approx(0.0)


def test_perfect_and_inverted_separation() -> None:
    m = ood_metrics([5, 6, 7], [1, 2])
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    m = ood_metrics([1, 2], [5, 6, 7])
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0


def _random_case(rng: np.random.Generator, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    n_id, n_ood = rng.integers(1, 300, size=2)
    id_s = rng.normal(1.0, 1.0, n_id)
    ood_s = rng.normal(0.0, 1.0, n_ood)
    if ties:  # few distinct values: many ties within and across classes
        id_s, ood_s = np.round(id_s), np.round(ood_s)
    return id_s, ood_s


@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn(ties: bool) -> None:
    rng = np.random.default_rng(123 + ties)
    for _ in range(25):
        id_s, ood_s = _random_case(rng, ties)
        y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
        s = np.r_[id_s, ood_s]
        assert auroc(id_s, ood_s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert aupr_in(id_s, ood_s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert aupr_out(id_s, ood_s) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
        # OpenOOD's recipe on scikit-learn's curve (all thresholds kept)
        fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
        assert fpr_at_tpr(id_s, ood_s) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_roc_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    id_s, ood_s = np.round(rng.normal(1, 1, 50), 1), np.round(rng.normal(0, 1, 40), 1)
    y = np.r_[np.ones(50), np.zeros(40)]
    fpr_sk, tpr_sk, _ = sk_roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    fpr, tpr = roc_curve(id_s, ood_s)
    np.testing.assert_allclose(fpr, fpr_sk)
    np.testing.assert_allclose(tpr, tpr_sk)


def test_fpr95_equals_acceptance_threshold_path() -> None:
    """FPR@95 = OOD accepted at calibration.threshold_for_acceptance(id, 0.95): one rule."""
    rng = np.random.default_rng(5)
    for ties in (False, True):
        for _ in range(40):
            id_s, ood_s = _random_case(rng, ties)
            thr = threshold_for_acceptance(id_s, 0.95)
            assert fpr_at_tpr(id_s, ood_s) == pytest.approx(np.mean(ood_s >= thr), abs=1e-12)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no scores"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="TPR level"):
        fpr_at_tpr([1.0], [0.0], tpr=0.0)


def test_mean_metrics_is_unweighted() -> None:
    a = {"auroc": 0.9, "fpr95": 0.2}
    b = {"auroc": 0.7, "fpr95": 0.6}
    assert mean_metrics([a, b]) == pytest.approx({"auroc": 0.8, "fpr95": 0.4})
