"""Split-conformal p-values for the OOD decision, and Benjamini-Hochberg over a batch job.

The calibration set is the deployed OOD score of the held-out in-distribution images the
threshold is fitted on (the run's validation split at export, the labelled set of
``sdde calibrate``), stored sorted in the manifest (``ood.calibration_scores``). For a new
image with score ``s`` (higher = more in-distribution)::

    ood_p_value = (1 + #{calibration scores <= s}) / (n + 1)

and the image is flagged when ``ood_p_value < alpha`` (``alpha = 1 - id_acceptance``).

Guarantee (Vovk et al. 2005; Angelopoulos & Bates 2021, "A gentle introduction to conformal
prediction"): if the new image and the n calibration images are exchangeable (same distribution,
the calibration images used neither for training nor for choosing the score), then
``P(ood_p_value <= u) <= u`` for every u, so the false-flag rate on in-distribution traffic is at
most alpha: exactly ``(ceil(alpha (n + 1)) - 1) / (n + 1)``, which lies in
``(alpha - 1/(n + 1), alpha]``. The statement is marginal (averaged over the draw of the
calibration set); for one fixed calibration set the rate is Beta-distributed around it with a
standard deviation of about ``sqrt(alpha (1 - alpha) / n)``.

numpy only (the runtime imports it).
"""

from __future__ import annotations

import math

import numpy as np


def sorted_scores(scores: np.ndarray) -> list[float]:
    """The calibration scores as the manifest stores them: sorted ascending, as Python floats
    (float64; a float32 graph score converts exactly, so ties with served scores are kept)."""
    s = np.sort(np.asarray(scores, np.float64).ravel())
    if not np.isfinite(s).all():
        raise ValueError("calibration scores must be finite")
    return [float(v) for v in s]


def p_values(calibration: np.ndarray | list[float], scores: np.ndarray) -> np.ndarray:
    """``(1 + #{calibration <= s}) / (n + 1)`` for each score ``s``; ``calibration`` sorted.

    Ties count as "as in-distribution as the calibration image" (``<=``), which keeps the
    p-value valid (super-uniform) whatever the ties. A NaN score gets p = 1/(n + 1) (the most
    surprising value): a NaN is never evidence of being in distribution.
    """
    cal = np.asarray(calibration, np.float64)
    s = np.asarray(scores, np.float64)
    below = np.searchsorted(cal, s, side="right")  # #{cal <= s}; NaN sorts past the end
    below = np.where(np.isnan(s), 0, below)
    return (1.0 + below) / (len(cal) + 1.0)


def flag_index(n: int, alpha: float) -> int:
    """How many of the n sorted calibration scores lie strictly below the threshold.

    ``p < alpha`` holds exactly when ``#{cal <= s} < alpha (n + 1) - 1``, i.e. when
    ``#{cal <= s} <= j - 1`` with ``j = ceil(alpha (n + 1)) - 1``: when ``s`` is below the j-th
    smallest calibration score (1-based). ``j <= 0``: nothing can be flagged.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    # 1e-9: alpha (n + 1) computed as 0.05 * 20 = 1.0000000000000002 must still count as 1
    return max(math.ceil(alpha * (n + 1) - 1e-9) - 1, 0)


def threshold_for_alpha(calibration: np.ndarray | list[float], alpha: float) -> float:
    """The score threshold with ``score < threshold  <=>  p_value < alpha``.

    The ``j``-th smallest calibration score, ``j = ceil(alpha (n + 1)) - 1`` (1-based); ``-inf``
    when ``j = 0`` (``alpha < 2 / (n + 1)``: too few calibration scores to flag anything at alpha).
    """
    cal = np.asarray(calibration, np.float64)
    j = flag_index(len(cal), alpha)
    return float(cal[j - 1]) if j > 0 else float("-inf")


def expected_false_flag_rate(n: int, alpha: float) -> float:
    """The exact marginal false-flag rate ``P(p < alpha)`` under exchangeability: ``j / (n+1)``."""
    return flag_index(n, alpha) / (n + 1)


def benjamini_hochberg(p: np.ndarray, q: float) -> np.ndarray:
    """Boolean mask of the discoveries of the Benjamini-Hochberg procedure at FDR level ``q``.

    Sort the m p-values, take the largest k with ``p_(k) <= k q / m`` and flag every p-value
    ``<= p_(k)``. With (conformal) p-values of in-distribution images, the expected share of
    in-distribution images among the flagged ones is at most q (Bates et al. 2023, "Testing for
    outliers with conformal p-values", show conformal p-values are PRDS, so BH controls the FDR).
    """
    p = np.asarray(p, np.float64)
    return p <= bh_cutoff(p, q)


def bh_cutoff(p: np.ndarray, q: float) -> float:
    """The Benjamini-Hochberg p-value cutoff (flag ``p <= cutoff``); -1 when nothing is flagged.

    Only the cutoff depends on the whole job, so a batch pass can compute it from the p-values
    alone and then flag rows while streaming them.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"the FDR level must be in (0, 1), got {q}")
    s = np.sort(np.asarray(p, np.float64).ravel())
    m = len(s)
    if m == 0:
        return -1.0
    ok = np.nonzero(s <= q * np.arange(1, m + 1) / m)[0]
    return float(s[ok[-1]]) if len(ok) else -1.0


def binomial_upper_bound(alpha: float, n: int, delta: float = 1e-3) -> float:
    """A fraction that ``Binomial(n, alpha) / n`` exceeds with probability at most ``delta``.

    Bernstein's inequality: ``P(mean - alpha >= t) <= exp(-n t^2 / (2 alpha (1 - alpha) + 2t/3))``,
    solved for t. Valid for every n (no normal approximation), so it needs no minimum traffic;
    the alert rule in deploy/prometheus computes the same expression in PromQL.
    """
    if n <= 0:
        return float("inf")
    log_term = math.log(1.0 / delta)
    var = alpha * (1.0 - alpha)
    t = (log_term / 3.0 + math.sqrt(log_term**2 / 9.0 + 2.0 * n * var * log_term)) / n
    return alpha + t
