"""Split-conformal p-values, the threshold they imply, BH, and the bound of the alert."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sdde_serve import conformal
from sdde_serve.engine import Engine
from sdde_serve.scoring import NoCalibrationScores, make_predictions
from tests.conftest import CONFORMAL_CAL_N, uniform_images


def test_p_values_by_hand_with_ties_and_scores_beyond_both_ends() -> None:
    cal = [1.0, 2.0, 2.0, 3.0, 5.0]  # n = 5: p = (1 + #{cal <= s}) / 6
    scores = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 9.0, -np.inf, np.inf])
    expected = np.array([1, 2, 2, 4, 4, 6, 6, 1, 6]) / 6
    np.testing.assert_array_equal(conformal.p_values(cal, scores), expected)
    # a NaN score is never evidence of being in distribution
    assert conformal.p_values(cal, np.array([np.nan]))[0] == 1 / 6


@pytest.mark.parametrize(
    ("n", "alpha", "j"),
    [
        (19, 0.05, 0),  # alpha (n + 1) = 1: even the lowest p = 1/20 is not < 0.05
        (39, 0.05, 1),  # p = 1/40 < 0.05 only below the smallest calibration score
        (199, 0.05, 9),  # alpha (n + 1) = 10: c <= 8, i.e. below the 9th smallest
        (800, 0.05, 40),  # 40.05 -> 41 - 1
        (800, 0.01, 8),
        (100, 0.0, 0),
    ],
)
def test_flag_index_by_hand(n: int, alpha: float, j: int) -> None:
    assert conformal.flag_index(n, alpha) == j
    assert conformal.expected_false_flag_rate(n, alpha) == j / (n + 1)


def test_threshold_rule_is_exactly_the_p_value_rule() -> None:
    """score < threshold_for_alpha  <=>  p < alpha, on every score around every calibration
    score (ties included), for several n and alpha."""
    rng = np.random.default_rng(0)
    for n in (1, 5, 19, 20, 39, 100, 801):
        cal = np.sort(np.round(rng.normal(size=n), 1))  # rounding makes ties
        probe = np.concatenate([cal, cal - 1e-9, cal + 1e-9, [cal[0] - 1, cal[-1] + 1]])
        for alpha in (0.0, 0.01, 0.05, 0.1, 0.5, round(1 - 0.95, 12)):
            t = conformal.threshold_for_alpha(cal, alpha)
            np.testing.assert_array_equal(
                probe < t, conformal.p_values(cal, probe) < alpha, err_msg=f"n={n} a={alpha}"
            )


def test_false_flag_rate_on_exchangeable_data_is_within_a_binomial_bound(conformal_model) -> None:
    """Calibration and test images are exchangeable (seeded uniform noise), scored by the
    deployed graph: the share flagged is alpha's exact rate up to binomial noise."""
    path, _ = conformal_model
    engine = Engine(path)
    m = engine.manifest
    assert m.ood.alpha == 0.05 and len(m.ood.calibration_scores) == CONFORMAL_CAL_N
    n_test = 4000
    preds = make_predictions(engine.run(uniform_images(n_test, seed=7)), m)
    flagged = np.array([p.is_ood for p in preds])
    p_vals = np.array([p.ood_p_value for p in preds])
    np.testing.assert_array_equal(flagged, p_vals < 0.05)
    # the marginal rate is j / (n + 1) = 9 / 200; given one calibration set it is Beta-distributed
    # around it (sd ~ sqrt(a (1 - a) / n)) plus the test set's binomial noise: a 4-sigma band
    expected = conformal.expected_false_flag_rate(CONFORMAL_CAL_N, 0.05)
    sd = math.sqrt(expected * (1 - expected) * (1 / CONFORMAL_CAL_N + 1 / n_test))
    assert abs(flagged.mean() - expected) < 4 * sd, (flagged.mean(), expected)


def test_many_calibration_draws_average_to_the_exact_rate() -> None:
    """Marginal guarantee: over fresh calibration sets the flag rate averages to j / (n + 1)."""
    rng = np.random.default_rng(3)
    n, alpha, draws, n_test = 99, 0.05, 2000, 50
    rates = []
    for _ in range(draws):
        cal, test = np.sort(rng.normal(size=n)), rng.normal(size=n_test)
        rates.append((conformal.p_values(cal, test) < alpha).mean())
    expected = conformal.expected_false_flag_rate(n, alpha)  # 4 / 100
    # each draw's rate has variance <= a(1-a)(1/n + 1/n_test); 5 sigma over the draws' mean
    sd = math.sqrt(expected * (1 - expected) * (1 / n + 1 / n_test) / draws)
    assert abs(np.mean(rates) - expected) < 5 * sd
    assert expected <= alpha


def _bh_reference(p: np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg as the step-up adjusted p-values (statsmodels' 'fdr_bh')."""
    m = len(p)
    order = np.argsort(p)
    adjusted = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out <= q


def test_benjamini_hochberg_by_hand() -> None:
    # m = 5, q = 0.1: bounds k q / m = .02 .04 .06 .08 .10; the largest k with p_(k) <= bound is 4
    # (0.07 <= 0.08) although p_(3) = 0.065 > 0.06: step-up flags all four
    p = np.array([0.2, 0.01, 0.065, 0.03, 0.07])
    np.testing.assert_array_equal(
        conformal.benjamini_hochberg(p, 0.1), [False, True, True, True, True]
    )
    assert conformal.bh_cutoff(p, 0.1) == 0.07
    assert not conformal.benjamini_hochberg(np.array([0.5, 0.9]), 0.1).any()
    assert conformal.bh_cutoff(np.array([]), 0.1) == -1.0


def test_benjamini_hochberg_matches_the_adjusted_p_value_reference() -> None:
    rng = np.random.default_rng(5)
    for m in (1, 10, 333):
        # a mixture of null (uniform) and small p-values, with ties from a discrete grid
        p = np.concatenate([rng.random(m), rng.random(m // 3) * 1e-3])
        p = np.round(p, 3)
        for q in (0.01, 0.05, 0.2):
            np.testing.assert_array_equal(conformal.benjamini_hochberg(p, q), _bh_reference(p, q))


def test_binomial_bound_holds_and_tightens() -> None:
    for alpha in (0.01, 0.05):
        for n in (10, 100, 1000, 100_000):
            bound = conformal.binomial_upper_bound(alpha, n, delta=1e-3)
            # exact binomial tail at the bound is at most delta (Bernstein is conservative)
            tail = stats.binom.sf(math.floor(bound * n), n, alpha)
            assert tail <= 1e-3, (alpha, n, bound, tail)
    assert conformal.binomial_upper_bound(0.05, 100_000) < 0.053  # +0.3 pp at 100k images


def test_models_without_calibration_scores_keep_the_threshold_and_report_no_p_value(
    linear_model,
) -> None:
    path, _ = linear_model
    engine = Engine(path)
    m = engine.manifest
    assert m.ood.calibration_scores is None
    preds = make_predictions(engine.run(uniform_images(20, seed=1)), m)
    assert all(p.ood_p_value is None and p.alpha is None for p in preds)
    assert [p.is_ood for p in preds] == [p.ood_score < m.ood.threshold for p in preds]
    with pytest.raises(NoCalibrationScores, match="no calibration scores"):
        make_predictions(engine.run(uniform_images(2, seed=1)), m, alpha=0.1)


def test_alpha_override_moves_the_threshold_with_the_p_value(conformal_model) -> None:
    path, _ = conformal_model
    engine = Engine(path)
    out = engine.run(uniform_images(500, seed=9))
    for alpha in (0.01, 0.05, 0.2):
        preds = make_predictions(out, engine.manifest, alpha=alpha)
        assert all(p.alpha == alpha for p in preds)
        assert [p.is_ood for p in preds] == [p.ood_p_value < alpha for p in preds]
    assert sum(p.is_ood for p in make_predictions(out, engine.manifest, alpha=0.2)) > sum(
        p.is_ood for p in make_predictions(out, engine.manifest, alpha=0.01)
    )
