"""Diversity metrics on tiny prediction matrices, hand-computed (see the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdde_serve.evaluation.diversity import (
    correlation_coefficient,
    disagreement_error_ratio,
    diversity_metrics,
    double_fault,
    mutual_information,
    oracle_counts,
    oracle_disagreement,
    pairwise_disagreement,
    q_statistic,
)

LABELS = np.array([0, 1, 2, 3])
# columns = members; oracle (correct?) per member: m0 = TTTF, m1 = TTFF, m2 = FTTF
PREDS = np.array(
    [
        [0, 0, 1],
        [1, 1, 1],
        [2, 0, 2],
        [0, 1, 2],
    ]
)


def test_oracle_counts() -> None:
    correct = np.equal(PREDS, LABELS[:, None])
    assert oracle_counts(correct[:, 0], correct[:, 1]) == (2, 1, 0, 1)
    assert oracle_counts(correct[:, 0], correct[:, 2]) == (2, 1, 0, 1)
    assert oracle_counts(correct[:, 1], correct[:, 2]) == (1, 1, 1, 1)


def test_label_disagreement() -> None:
    # pairs (0,1): rows 2,3 differ -> 1/2; (0,2): rows 0,3 -> 1/2; (1,2): rows 0,2,3 -> 3/4
    assert pairwise_disagreement(PREDS) == pytest.approx((0.5 + 0.5 + 0.75) / 3)


def test_oracle_measures() -> None:
    # (0,1) and (0,2): N11=2 N10=1 N01=0 N00=1; (1,2): all four counts 1
    assert q_statistic(PREDS, LABELS) == pytest.approx((1 + 1 + 0) / 3)
    rho_01 = (2 * 1 - 0) / math.sqrt(3 * 1 * 2 * 2)
    assert correlation_coefficient(PREDS, LABELS) == pytest.approx((2 * rho_01 + 0) / 3)
    assert double_fault(PREDS, LABELS) == pytest.approx(0.25)
    assert oracle_disagreement(PREDS, LABELS) == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    # member error = 5 wrong of 12 predictions
    assert disagreement_error_ratio(PREDS, LABELS) == pytest.approx((1.75 / 3) / (5 / 12))


def test_undefined_pairs_are_left_out() -> None:
    labels = np.array([0, 1, 0, 1])
    perfect = np.stack([labels, labels], axis=1)
    # two members never wrong: Q and rho are 0/0 for the only pair -> NaN, not 0 or 1
    assert math.isnan(q_statistic(perfect, labels))
    assert math.isnan(correlation_coefficient(perfect, labels))
    assert double_fault(perfect, labels) == 0.0
    assert pairwise_disagreement(perfect) == 0.0
    assert math.isnan(disagreement_error_ratio(perfect, labels))
    # members that err: m1 on row 0, m2 on rows 0 and 1. Pairs with the perfect member are
    # 0/0 (N00 = N01 = 0); the pair (m1, m2) has N11=2 N10=1 N01=0 N00=1 -> Q = 1, rho = 1/sqrt(3)
    m1, m2 = labels.copy(), labels.copy()
    m1[0] = m2[0] = 1
    m2[1] = 0
    preds = np.column_stack([labels, m1, m2])
    assert q_statistic(preds, labels) == pytest.approx(1.0)
    assert correlation_coefficient(preds, labels) == pytest.approx(2 / np.sqrt(3 * 1 * 2 * 2))
    assert double_fault(preds, labels) == pytest.approx((0 + 0 + 1 / 4) / 3)


def test_identical_members_have_no_diversity() -> None:
    labels = np.array([0, 1, 2, 0, 1])
    member = np.array([0, 1, 1, 2, 1])  # wrong on rows 2 and 3
    preds = np.stack([member] * 3, axis=1)
    assert pairwise_disagreement(preds) == 0.0
    assert q_statistic(preds, labels) == pytest.approx(1.0)
    assert correlation_coefficient(preds, labels) == pytest.approx(1.0)
    assert double_fault(preds, labels) == pytest.approx(2 / 5)


def test_mutual_information() -> None:
    # fully disagreeing confident members: H(mean) = log 2, member entropies 0
    p = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert mutual_information(p) == pytest.approx(math.log(2))
    # identical members: 0
    q = np.array([[[0.3, 0.7], [0.3, 0.7]], [[0.5, 0.5], [0.5, 0.5]]])
    assert mutual_information(q) == pytest.approx(0.0, abs=1e-12)
    # one sample by hand: members [0.8, 0.2] and [0.4, 0.6]
    r = np.array([[[0.8, 0.2], [0.4, 0.6]]])

    def h(v: list[float]) -> float:
        return -sum(x * math.log(x) for x in v)

    expected = h([0.6, 0.4]) - (h([0.8, 0.2]) + h([0.4, 0.6])) / 2
    assert mutual_information(r) == pytest.approx(expected)


def test_diversity_metrics_from_logits() -> None:
    # logits whose argmax reproduces PREDS
    logits = np.full((4, 3, 4), -1.0)
    for b in range(4):
        for m in range(3):
            logits[b, m, PREDS[b, m]] = 2.0
    out = diversity_metrics(logits, LABELS)
    assert out["disagreement"] == pytest.approx(pairwise_disagreement(PREDS))
    assert out["q_statistic"] == pytest.approx(2 / 3)
    assert out["double_fault"] == pytest.approx(0.25)
    assert 0.0 < out["mutual_information"] < math.log(3)
    assert set(diversity_metrics(logits)) == {"disagreement", "mutual_information"}


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        pairwise_disagreement(np.zeros((5, 1), int))
    with pytest.raises(ValueError, match=r"\[B, N, L\]"):
        mutual_information(np.zeros((5, 3)))
