"""Calibration math against hand-computed values (conventions: docs/conventions.md)."""

import math

import numpy as np
import pytest

from sdde_serve import calibration as cal
from sdde_serve import scores as score_registry


def test_ensemble_probs_average_member_probabilities_not_logits():
    # member 1: softmax([0, ln 3]) = [1/4, 3/4]; member 2: softmax([ln 3, 0]) = [3/4, 1/4]
    logits = np.array([[[0.0, math.log(3)], [math.log(3), 0.0]]])
    np.testing.assert_allclose(cal.ensemble_probs(logits), [[0.5, 0.5]], atol=1e-12)
    # temperature divides the logits: T = 2 -> softmax([0, ln3 / 2]) = [1/(1+√3), √3/(1+√3)]
    one = logits[:, :1]
    s3 = math.sqrt(3)
    np.testing.assert_allclose(cal.ensemble_probs(one, 2.0), [[1 / (1 + s3), s3 / (1 + s3)]])
    np.testing.assert_allclose(
        np.exp(cal.ensemble_log_probs(logits, 0.7)), cal.ensemble_probs(logits, 0.7), atol=1e-12
    )


def test_mal_is_max_of_member_averaged_logits_and_msp_max_prob():
    logits = np.array([[[1.0, 3.0], [3.0, -1.0]]])  # average [2, 1]
    assert cal.mal(logits)[0] == pytest.approx(2.0)
    assert cal.msp(np.array([[0.2, 0.7, 0.1]]))[0] == pytest.approx(0.7)
    # MAL is not the mean of member maxima (that would be 3)
    assert cal.mal(logits)[0] != pytest.approx(logits.max(axis=2).mean())


def test_member_agreement():
    # ensemble prob argmax is class 0; members' argmax: 0, 0, 1
    logits = np.array([[[5.0, 0.0], [4.0, 0.0], [0.0, 1.0]]])
    assert cal.member_agreement(logits)[0] == pytest.approx(2 / 3)


def test_nll_brier_accuracy_by_hand():
    probs = np.array([[0.25, 0.75], [0.9, 0.1]])
    labels = np.array([1, 1])
    assert cal.nll(probs, labels) == pytest.approx(-(math.log(0.75) + math.log(0.1)) / 2)
    # brier: (0.25² + 0.25²) and (0.9² + 0.9²), averaged
    assert cal.brier(probs, labels) == pytest.approx((0.125 + 1.62) / 2)
    assert cal.accuracy(probs, labels) == 0.5


def test_ece_by_hand():
    # 4 samples, 15 bins. confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 1.0 (correct)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [1.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    # bin (0.8667, 0.9333]: two samples, acc 0.5, conf 0.9 -> 2/4 * 0.4
    # bin (0.5333, 0.6]: acc 1, conf 0.6 -> 1/4 * 0.4 ; bin (0.9333, 1]: acc 1, conf 1 -> 0
    assert cal.ece(probs, labels) == pytest.approx(0.5 * 0.4 + 0.25 * 0.4)


def test_ece_matches_a_reference_loop():
    rng = np.random.default_rng(3)
    probs = cal.softmax(rng.normal(0, 2, (500, 5)))
    labels = rng.integers(0, 5, 500)
    conf, pred = probs.max(1), probs.argmax(1)
    ref = 0.0
    for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ref += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    assert cal.ece(probs, labels) == pytest.approx(ref, abs=1e-12)
    bins = cal.reliability_bins(probs, labels)
    assert bins["count"].sum() == 500


@pytest.mark.parametrize("true_t", [0.5, 3.0])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2.0, (20000, 1, 6))  # calibrated logits: labels are drawn from them
    p = cal.softmax(z[:, 0])
    labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)
    observed = z * true_t  # over-confident (T > 1) or under-confident (T < 1) by true_t
    t = cal.fit_temperature(observed, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    assert cal.ensemble_nll(observed, labels, t) < cal.ensemble_nll(observed, labels, 1.0)


def test_threshold_accepts_the_requested_fraction():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    thr = cal.threshold_for_acceptance(scores, 0.95)
    assert thr == 6.0  # accepts 6..100: 95 scores
    assert (scores >= thr).mean() == pytest.approx(0.95)
    assert cal.threshold_for_acceptance(scores, 1.0) == 1.0
    with pytest.raises(ValueError):
        cal.threshold_for_acceptance(scores, 0.0)


def test_registered_scores_of_the_logits_by_hand():
    logits = np.array([[[1.0, 3.0], [3.0, -1.0]]])  # member-averaged logits [2, 1]

    def score(kind: str) -> float:
        return score_registry.get(kind).compute(score_registry.ScoreData(logits))[0]

    assert score("mal") == pytest.approx(2.0)
    # members' softmax: [1, e^2] / (1 + e^2) and [e^4, 1] / (1 + e^4), averaged
    first = (math.exp(4) / (1 + math.exp(4)) + 1 / (1 + math.exp(2))) / 2
    assert score("msp") == pytest.approx(max(first, 1 - first))
    assert score("minmax") == pytest.approx(3.0)  # member maxima 3 and 3


def test_member_agreement_follows_the_calibrated_label():
    # at T = 1 the averaged probabilities pick class 1 (member 3 is very sure of it); at T = 0.1
    # members vote almost one-hot and the majority, class 0, wins: agreement follows the label
    logits = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 8.0]]])
    assert cal.ensemble_probs(logits).argmax() == 1
    assert cal.member_agreement(logits)[0] == pytest.approx(1 / 3)
    cold = cal.ensemble_probs(logits, 0.1)
    assert cold.argmax() == 0
    assert cal.member_agreement(logits, cold)[0] == pytest.approx(2 / 3)


def test_a_fit_on_separable_data_is_flagged_as_on_the_bound():
    from sdde_serve.calibrate import fit_calibration

    # every member right on every image: the NLL falls all the way to T -> 0
    logits = np.tile(np.array([[[5.0, 0.0], [4.0, 1.0]]]), (20, 1, 1))
    labels = np.zeros(20, dtype=int)
    t = cal.fit_temperature(logits, labels)
    assert cal.temperature_at_bound(t) and t < np.exp(-3.75) + 1e-9
    info, _ = fit_calibration(logits, labels, data="sep", id_acceptance=0.95, score="mal")
    assert info.warning and "search bound" in info.warning
    # with mistakes, the optimum is interior and nothing is flagged
    labels[:5] = 1
    info, _ = fit_calibration(logits, labels, data="mixed", id_acceptance=0.95, score="mal")
    assert info.warning is None and not cal.temperature_at_bound(info.temperature)
