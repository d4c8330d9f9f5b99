"""OOD-detection metrics in numpy (no scikit-learn at run time).

Convention (docs/architecture.md, docs/evaluation.md): scores are "higher = more
in-distribution", and **in-distribution is the positive class** for AUROC, AUPR-In and FPR@95.
AUPR-Out makes OOD the positive class and negates the score. This is the convention of the SDDE
paper and of OpenOOD v1.5; older work (Hendrycks & Gimpel 2017, some ODIN/energy code) reports
FPR@95 with OOD as the positive class, which gives other numbers.

Ties are handled exactly like scikit-learn: the curves step through *distinct* thresholds, so
tied samples enter together (AUROC then equals the Mann-Whitney statistic with ties counted as
1/2; average precision is the step-wise sum of scikit-learn's ``average_precision_score``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdde_serve.calibration import threshold_for_acceptance

TPR_LEVEL = 0.95
OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


@dataclass(frozen=True)
class Curve:
    """Cumulative counts above each distinct threshold (thresholds in decreasing order)."""

    thresholds: np.ndarray
    tps: np.ndarray  # positives with score >= threshold
    fps: np.ndarray  # negatives with score >= threshold

    @property
    def n_pos(self) -> int:
        return int(self.tps[-1])

    @property
    def n_neg(self) -> int:
        return int(self.fps[-1])


def _check(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(scores) == 0:
        raise ValueError(f"{what}: no scores")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: scores contain NaN or infinity")
    return scores


def binary_curve(pos_scores: np.ndarray, neg_scores: np.ndarray) -> Curve:
    """Counts of positives/negatives scoring >= each distinct threshold, highest first."""
    pos = _check(pos_scores, "positive class")
    neg = _check(neg_scores, "negative class")
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    # last index of each run of equal scores: tied samples cross the threshold together
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(is_pos)[last]
    fps = (last + 1) - tps
    return Curve(scores[last], tps, fps)


def roc_curve(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) with ID positive, starting at (0, 0); every distinct threshold is a point."""
    c = binary_curve(id_scores, ood_scores)
    fpr = np.r_[0.0, c.fps / c.n_neg]
    tpr = np.r_[0.0, c.tps / c.n_pos]
    return fpr, tpr


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, ID positive) = P(s_id > s_ood) + P(tie) / 2."""
    fpr, tpr = roc_curve(id_scores, ood_scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def average_precision(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds (scikit-learn's definition).

    No interpolation: the step-wise sum is what ``average_precision_score`` computes and is
    the usual "AUPR" of OOD papers using scikit-learn.
    """
    c = binary_curve(pos_scores, neg_scores)
    precision = c.tps / (c.tps + c.fps)
    recall = c.tps / c.n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with ID as the positive class (score as is)."""
    return average_precision(id_scores, ood_scores)


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with OOD as the positive class and the score negated."""
    return average_precision(
        -np.asarray(ood_scores, np.float64), -np.asarray(id_scores, np.float64)
    )


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = TPR_LEVEL) -> float:
    """Fraction of OOD samples accepted at the highest threshold accepting >= ``tpr`` of ID.

    The threshold is :func:`sdde_serve.calibration.threshold_for_acceptance` (the one rule for
    "the threshold accepting a rate of the ID scores"); the result equals
    ``fpr[argmax(tpr_curve >= tpr)]`` on scikit-learn's ``roc_curve`` (OpenOOD's recipe).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"TPR level must be in (0, 1], got {tpr}")
    id_s = _check(id_scores, "positive class")
    ood_s = _check(ood_scores, "negative class")
    return float(np.mean(ood_s >= threshold_for_acceptance(id_s, tpr)))


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR@95%TPR (ID positive) for one score and one OOD set."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, TPR_LEVEL),
    }


def mean_metrics(per_set: list[dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over OOD sets (the paper's near/far "average" columns)."""
    if not per_set:
        raise ValueError("no OOD sets to average")
    return {k: float(np.mean([m[k] for m in per_set])) for k in per_set[0]}
