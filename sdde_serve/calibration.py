"""Calibration and scoring math, numpy only (conventions: docs/conventions.md).

* Ensemble probabilities average member *probabilities*: ``mean_m softmax(z_m / T)``.
* T divides logits; T > 1 softens. We store T, never 1/T.
* MAL (the paper's Eq. 9) = max over classes of the member-averaged *logits* (no temperature:
  dividing by T > 0 would only rescale it). MSP = max of the ensemble probabilities.
* Both scores: higher = more in-distribution; an input is OOD when ``score < threshold``.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(log_softmax(z, axis))


def ensemble_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``[B, N, L]`` member logits -> ``[B, L]`` mean of member softmax(logits / T)."""
    return softmax(np.asarray(logits, np.float64) / temperature, axis=-1).mean(axis=1)


def ensemble_log_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log of :func:`ensemble_probs`, computed stably (logsumexp over members)."""
    lp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=-1)  # [B, N, L]
    m = lp.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(lp - m).mean(axis=1, keepdims=True)))[:, 0]


def mal(logits: np.ndarray) -> np.ndarray:
    """Maximum Average Logit: ``max_c mean_m z[b, m, c]``."""
    return np.asarray(logits, np.float64).mean(axis=1).max(axis=-1)


def msp(probs: np.ndarray) -> np.ndarray:
    """Maximum Softmax Probability of the ensemble probabilities ``[B, L]``."""
    return np.asarray(probs, np.float64).max(axis=-1)


def minmax(logits: np.ndarray) -> np.ndarray:
    """The official SDDE code's score: ``min_m max_c z[b, m, c]`` (least confident member)."""
    return np.asarray(logits, np.float64).max(axis=-1).min(axis=1)


def member_agreement(logits: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
    """Fraction of members whose own argmax equals the ensemble's argmax.

    The ensemble's class is the argmax of ``probs`` (the calibrated probabilities, which choose
    the label the server returns) when given, else of the probabilities averaged at T = 1; the
    two can differ when T != 1, so callers that report a label pass the probabilities.
    """
    logits = np.asarray(logits)
    ensemble = (ensemble_probs(logits) if probs is None else np.asarray(probs)).argmax(axis=-1)
    return (logits.argmax(axis=-1) == ensemble[:, None]).mean(axis=1)


# --- classification / calibration metrics ------------------------------------------------------


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(axis=-1) == labels).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    p = np.asarray(probs, np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, _EPS, None)).mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over samples of the squared distance to the one-hot label, summed over classes."""
    probs = np.asarray(probs, np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected Calibration Error with ``n_bins`` equal-width confidence bins on (0, 1].

    Bin b holds confidences in ``(b/n, (b+1)/n]``; ECE = sum_b |B_b|/n · |acc(B_b) − conf(B_b)|.
    """
    probs = np.asarray(probs, np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # right-closed bins: conf == 1/15 falls in the first bin, conf == 1 in the last
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin counts, accuracy and confidence (the data behind a reliability diagram)."""
    probs = np.asarray(probs, np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    acc = np.bincount(bins, weights=correct, minlength=n_bins) / np.maximum(count, 1)
    mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / np.maximum(count, 1)
    return {
        "edges": np.linspace(0, 1, n_bins + 1),
        "count": count,
        "accuracy": acc,
        "confidence": mean_conf,
    }


# --- fitting -------------------------------------------------------------------------------------


def ensemble_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    lp = ensemble_log_probs(logits, temperature)
    return float(-lp[np.arange(len(labels)), labels].mean())


# The search range of log T. T = e^-4 ≈ 0.018 already turns every member's softmax into a vote;
# a fit that ends on a bound has found no interior optimum (see temperature_at_bound).
LOG_T_BOUNDS = (-4.0, 4.0)
_GRID_POINTS = 33  # coarse grid over LOG_T_BOUNDS: steps of 0.25 in log T


def temperature_at_bound(temperature: float, bounds: tuple[float, float] = LOG_T_BOUNDS) -> bool:
    """Whether a fitted T sits on the search bound: the NLL kept falling towards T -> 0 or ∞.

    That happens when (nearly) every calibration image is classified correctly by every member
    (the NLL -> 0 as T -> 0): the data say nothing about the right T, so the fit should not be
    trusted and more (or harder) held-out data is needed.
    """
    # Within one grid step rather than exactly on the bound: where the NLL has flattened to its
    # float64 floor, golden-section search stops anywhere in the first grid cell.
    step = (bounds[1] - bounds[0]) / (_GRID_POINTS - 1)
    log_t = float(np.log(temperature))
    return min(log_t - bounds[0], bounds[1] - log_t) <= step + 1e-9


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    log_t_bounds: tuple[float, float] = LOG_T_BOUNDS,
    tol: float = 1e-6,
) -> float:
    """T minimising the NLL of the ensemble's averaged probabilities ``mean_m softmax(z_m / T)``.

    One temperature shared by all members, applied before averaging: the "temperature scaling
    of the ensemble" of Ashukha et al. (2020). The search runs over log T so that T > 0 and the
    steps are scale-free: a coarse grid finds the basin (the NLL in log T can be flat far from
    the optimum), then golden-section search refines it.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim == 2:
        logits = logits[:, None]
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on zero samples")

    def loss(log_t: float) -> float:
        return ensemble_nll(logits, labels, float(np.exp(log_t)))

    lo, hi = log_t_bounds
    grid = np.linspace(lo, hi, _GRID_POINTS)
    values = [loss(g) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    invphi = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - invphi * (b - a), a + invphi * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - invphi * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + invphi * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))


def threshold_for_acceptance(scores: np.ndarray, rate: float) -> float:
    """The score threshold that accepts (``score >= threshold``) ``rate`` of ``scores``.

    Takes the order statistic at index ``floor((1 - rate) * n)`` of the sorted scores, so at
    least ``rate`` of the given scores are accepted (exactly, when there are no ties). The
    operating point of FPR@95 (:func:`sdde_serve.evaluation.metrics.fpr_at_tpr`); the deployed
    threshold is the conformal one (:func:`sdde_serve.conformal.threshold_for_alpha`).
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"acceptance rate must be in (0, 1], got {rate}")
    s = np.sort(np.asarray(scores, np.float64))
    if len(s) == 0:
        raise ValueError("cannot choose a threshold from zero scores")
    k = int(np.floor((1.0 - rate) * len(s) + 1e-9))
    return float(s[min(k, len(s) - 1)])
