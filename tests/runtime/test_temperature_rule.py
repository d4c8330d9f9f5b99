"""The cross-validated temperature rule (sdde_serve/temperature.py) and its manifest record."""

from __future__ import annotations

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve.calibrate import fit_calibration
from sdde_serve.temperature import (
    bootstrap_interval,
    choose_temperature,
    fold_indices,
    per_image_nll,
)


def _logits(n: int, *, members: int, classes: int, scale: float, seed: int):
    """Member logits whose true calibration is known: labels are *drawn* from softmax(z) of
    calibrated logits z, and the members see ``scale * z`` (scale > 1: over-confident by a factor
    ``scale``, so the right temperature is ``scale``)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, (n, 1, classes)) + rng.normal(0, 0.3, (n, members, classes))
    p = cal.ensemble_probs(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return scale * z, labels


def test_recovers_the_temperature_of_over_confident_logits() -> None:
    logits, labels = _logits(1500, members=3, classes=5, scale=3.0, seed=0)
    d = choose_temperature(logits, labels)
    assert d.applied, d.reason
    assert abs(d.temperature - 3.0) / 3.0 < 0.15, d.temperature
    assert d.gain_interval[0] > 0 and d.cv_nll_fitted < d.cv_nll_t1
    assert len(d.folds) == 5 and sum(f.n for f in d.folds) == 1500
    assert "applied" in d.reason


def _confident_calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Confident logits whose labels are drawn from their own probabilities: calibrated at
    T = 1 by construction, and right on ~99% of images (a split like MNIST's validation)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (n, 1, 10)) + rng.normal(0, 0.3, (n, 3, 10))
    z[np.arange(n), :, rng.integers(0, 10, n)] += rng.normal(9.0, 1.5, (n, 1))
    p = cal.ensemble_probs(z)
    return z, np.array([rng.choice(10, p=row) for row in p])


def test_keeps_t_1_on_a_split_with_almost_no_errors() -> None:
    """800 images with 4 to 7 errors from a model calibrated at T = 1: the plain fit lands at
    T = 0.89 to 0.95 (sharpening, from the handful of errors), the held-out NLL shows no gain
    beyond noise, so T = 1 is kept and the reason says why."""
    for seed in (0, 1, 4, 7):
        logits, labels = _confident_calibrated(800, seed)
        d = choose_temperature(logits, labels)
        assert 3 <= d.errors <= 8
        assert d.fitted < 0.96  # the plain fit would sharpen
        assert not d.applied and d.temperature == 1.0, d.reason
        assert d.gain_interval[0] <= 0.0 < d.gain_interval[1]
        assert "T = 1 kept" in d.reason and "beyond noise" in d.reason
        assert f"{d.errors} of 800 images misclassified" in d.reason


def test_a_separable_split_keeps_t_1_because_the_fit_is_on_the_bound() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(0, 1, (200, 2, 4))
    logits[np.arange(200), :, labels] += 6.0
    d = choose_temperature(logits, labels)
    assert d.errors == 0 and not d.applied and d.temperature == 1.0
    assert "search bound" in d.reason


def test_cross_validated_nll_is_the_held_out_nll_by_hand() -> None:
    logits, labels = _logits(300, members=2, classes=3, scale=2.0, seed=3)
    d = choose_temperature(logits, labels, folds=3, draws=200)
    held = fold_indices(300, 3)
    nll = np.empty(300)
    for fold, idx in zip(d.folds, held, strict=True):
        train = np.setdiff1d(np.arange(300), idx)
        t = cal.fit_temperature(logits[train], labels[train])
        assert fold.temperature == t and fold.n == len(idx)
        nll[idx] = per_image_nll(logits[idx], labels[idx], t)
        assert np.isclose(fold.nll_fitted, nll[idx].mean())
        assert np.isclose(fold.nll_t1, cal.ensemble_nll(logits[idx], labels[idx], 1.0))
    assert np.isclose(d.cv_nll_fitted, nll.mean())
    assert np.isclose(d.cv_nll_t1, cal.ensemble_nll(logits, labels, 1.0))


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(4)
    small, large = rng.normal(1.0, 1.0, 50), rng.normal(1.0, 1.0, 5000)
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    # the default is a 90% interval (its lower end a one-sided 95% bound): half-width ~1.645 se
    se = large.std() / np.sqrt(5000)
    assert abs((hi_l - lo_l) / 2 - 1.645 * se) < 0.1 * se
    lo95, hi95 = bootstrap_interval(large, confidence=0.95)
    assert abs((hi95 - lo95) / 2 - 1.96 * se) < 0.1 * se
    assert hi_s - lo_s > 5 * (hi_l - lo_l)


def test_fit_calibration_records_the_rule_and_the_calibration_scores() -> None:
    logits, labels = _logits(400, members=3, classes=4, scale=3.0, seed=5)
    info, ood = fit_calibration(logits, labels, data="synthetic", id_acceptance=0.95, score="mal")
    rule = info.rule
    assert rule is not None and rule.applied and info.temperature == rule.fitted
    assert len(rule.folds) == 5 and rule.gain_interval[0] > 0
    assert rule.errors == int((cal.ensemble_probs(logits).argmax(1) != labels).sum())
    scores = np.sort(cal.mal(logits))
    assert ood.calibration_scores == [float(s) for s in scores]
    # the threshold is the j-th smallest score, j = ceil(0.05 * 401) - 1 = 20
    assert ood.threshold == scores[19]
