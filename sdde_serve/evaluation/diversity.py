"""Ensemble diversity metrics (the SDDE paper's Table 1), numpy only.

The pairwise measures follow Kuncheva & Whitaker (2003), "Measures of diversity in classifier
ensembles and their relationship with the ensemble accuracy", Machine Learning 51:181-207. For two
members i, k and the *oracle* outputs (correct / wrong on each sample) let

    N11 = both correct, N00 = both wrong, N10 = only i correct, N01 = only k correct, n = sum.

Each pairwise measure is averaged over the M(M-1)/2 unordered pairs of the M members, as
Kuncheva & Whitaker do.
A pair whose measure is 0/0 (e.g. two members that are never wrong: Q and rho are undefined) is
left out of the average; when every pair is undefined the result is NaN (``null`` in JSON).

Up/down: more diverse = higher disagreement, lower Q, lower rho, lower double-fault, higher
mutual information.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np

from sdde_serve.calibration import softmax
from sdde_serve.evaluation.section import Context, Section, num

_EPS = 1e-12


def _check_preds(preds: np.ndarray) -> np.ndarray:
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] < 2:
        raise ValueError(f"member predictions must be [B, N] with N >= 2, got {preds.shape}")
    return preds


def _pairs(preds: np.ndarray) -> list[tuple[int, int]]:
    return list(combinations(range(preds.shape[1]), 2))


def _mean_defined(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def oracle_counts(correct_i: np.ndarray, correct_k: np.ndarray) -> tuple[int, int, int, int]:
    """(N11, N10, N01, N00) of two members' oracle outputs (True = correct)."""
    a, b = np.asarray(correct_i, bool), np.asarray(correct_k, bool)
    return (int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b)), int(np.sum(~a & ~b)))


def _pairwise_oracle(
    preds: np.ndarray, labels: np.ndarray, measure: Callable[[int, int, int, int], float]
) -> float:
    preds = _check_preds(preds)
    correct = preds == np.asarray(labels)[:, None]
    return _mean_defined(
        [measure(*oracle_counts(correct[:, i], correct[:, k])) for i, k in _pairs(preds)]
    )


def pairwise_disagreement(preds: np.ndarray) -> float:
    """Mean over member pairs of the fraction of samples whose predicted *labels* differ.

    ``dis = mean_{i<k} mean_b [y_hat_i(b) != y_hat_k(b)]``. This is the label-level disagreement
    used for deep ensembles (Fort, Hu & Lakshminarayanan 2019, "Deep Ensembles: A Loss Landscape
    Perspective"); it needs no labels, so it also applies to OOD data. Kuncheva & Whitaker's
    oracle disagreement ``(N01 + N10) / n`` is :func:`oracle_disagreement`; the two differ only on
    samples where both members are wrong with different labels.
    """
    preds = _check_preds(preds)
    return float(np.mean([np.mean(preds[:, i] != preds[:, k]) for i, k in _pairs(preds)]))


def oracle_disagreement(preds: np.ndarray, labels: np.ndarray) -> float:
    """Kuncheva & Whitaker's disagreement ``(N01 + N10) / n`` (Skalak 1996), pair-averaged."""
    return _pairwise_oracle(
        preds, labels, lambda n11, n10, n01, n00: (n10 + n01) / (n11 + n10 + n01 + n00)
    )


def _q(n11: int, n10: int, n01: int, n00: int) -> float:
    den = n11 * n00 + n01 * n10
    return (n11 * n00 - n01 * n10) / den if den else float("nan")


def q_statistic(preds: np.ndarray, labels: np.ndarray) -> float:
    """Yule's Q: ``(N11 N00 - N01 N10) / (N11 N00 + N01 N10)`` (Kuncheva & Whitaker).

    In [-1, 1]; 0 for statistically independent members, 1 when they err together.
    """
    return _pairwise_oracle(preds, labels, _q)


def _rho(n11: int, n10: int, n01: int, n00: int) -> float:
    den = np.sqrt(float(n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
    return (n11 * n00 - n01 * n10) / den if den else float("nan")


def correlation_coefficient(preds: np.ndarray, labels: np.ndarray) -> float:
    """Correlation of the oracle outputs (Kuncheva & Whitaker):

    ``rho = (N11 N00 - N01 N10) / sqrt((N11 + N10)(N01 + N00)(N11 + N01)(N10 + N00))``.
    """
    return _pairwise_oracle(preds, labels, _rho)


def double_fault(preds: np.ndarray, labels: np.ndarray) -> float:
    """Double-fault (D/S error) rate ``N00 / n``: how often two members are *both* wrong.

    Giacinto & Roli (2001), "Design of effective neural network ensembles for image
    classification purposes", Image and Vision Computing 19:699-707; Kuncheva & Whitaker.
    """
    return _pairwise_oracle(preds, labels, lambda n11, n10, n01, n00: n00 / (n11 + n10 + n01 + n00))


def disagreement_error_ratio(preds: np.ndarray, labels: np.ndarray) -> float:
    """Label disagreement divided by the mean member error rate (Fort et al. 2019, Fig. 6).

    An alternative reading of "D/S" (disagreement over single-model error); reported as an
    extra column. NaN when no member makes an error.
    """
    preds = _check_preds(preds)
    err = float(np.mean(preds != np.asarray(labels)[:, None]))
    return pairwise_disagreement(preds) / err if err > 0 else float("nan")


def entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats, ``-sum p log p`` (0 log 0 = 0)."""
    p = np.asarray(probs, np.float64)
    return -np.sum(p * np.log(np.clip(p, _EPS, None)), axis=axis)


def mutual_information(member_probs: np.ndarray) -> float:
    """Mean over samples of ``H(mean_m p_m) - mean_m H(p_m)`` in nats (member probs ``[B, N, L]``).

    The mutual information between the prediction and the member index (the "epistemic" part of
    the predictive entropy; Depeweg et al. 2018, Malinin & Gales 2018). 0 when all members agree
    exactly, at most ``log N``.
    """
    p = np.asarray(member_probs, np.float64)
    if p.ndim != 3:
        raise ValueError(f"member probabilities must be [B, N, L], got {p.shape}")
    return float(np.mean(entropy(p.mean(axis=1)) - entropy(p).mean(axis=1)))


def diversity_metrics(
    logits: np.ndarray, labels: np.ndarray | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """All diversity metrics from member logits ``[B, N, L]``.

    Member predictions are each member's argmax; member probabilities (for the mutual
    information) are ``softmax(logits / temperature)``. Without labels only the label-free
    metrics (disagreement, mutual information) are returned.
    """
    logits = np.asarray(logits, np.float64)
    preds = logits.argmax(axis=-1)
    out = {
        "disagreement": pairwise_disagreement(preds),
        "mutual_information": mutual_information(softmax(logits / temperature, axis=-1)),
    }
    if labels is not None:
        labels = np.asarray(labels)
        out.update(
            {
                "correlation": correlation_coefficient(preds, labels),
                "q_statistic": q_statistic(preds, labels),
                "double_fault": double_fault(preds, labels),
                "oracle_disagreement": oracle_disagreement(preds, labels),
                "disagreement_error_ratio": disagreement_error_ratio(preds, labels),
            }
        )
    return out


# --- the report section -------------------------------------------------------------------------

LABELS = {
    "disagreement": "pairwise disagreement ↑",
    "correlation": "correlation coefficient ↓",
    "q_statistic": "Q-statistic ↓",
    "double_fault": "double-fault (D/S) error rate ↓",
    "mutual_information": "mutual information (nats) ↑",
    "oracle_disagreement": "oracle disagreement (N01+N10)/N ↑",
    "disagreement_error_ratio": "disagreement / member error ↑",
}


def compute(ctx: Context, config: None) -> dict[str, Any]:
    ev = ctx.evaluation
    return {
        "diversity": {
            "id": diversity_metrics(ev.id_set.logits, ev.labels),
            "ood": {s.name: diversity_metrics(s.logits) for s in ev.ood_sets},
        }
    }


def markdown(m: dict[str, Any]) -> list[str]:
    div = m["diversity"]
    lines = [
        "## Diversity (ID test data; Kuncheva & Whitaker 2003, pair-averaged)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {LABELS[k]} | {num(v)} |" for k, v in div["id"].items()],
    ]
    if div["ood"]:
        lines += [
            "",
            "On OOD data (label-free metrics): "
            + "; ".join(
                f"{name}: disagreement {num(d['disagreement'])}, MI {num(d['mutual_information'])}"
                for name, d in div["ood"].items()
            )
            + ".",
        ]
    return [*lines, ""]


SECTION = Section("diversity", compute, markdown)
