"""KNN, the deep-nearest-neighbour detector of Sun et al. (ICML 2022): the k-th largest cosine
similarity between an input's L2-normalised concatenated member pre-logit features and the rows of
a bank of training features (built at export by export/knn.py, stored as ``knn_bank``)."""

from __future__ import annotations

import numpy as np

from sdde_serve.errors import UserError
from sdde_serve.scores.registry import ScoreData, ScoreSpec


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), in float64."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def knn_scores(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Reference of the graph's ``knn``: k-th largest cosine of each query row to ``bank`` rows.

    ``queries`` are raw (concatenated) features ``[B, dims]``; ``bank`` rows are unit vectors.
    """
    bank = np.asarray(bank, np.float64)
    if not 1 <= k <= len(bank):
        raise UserError(f"KNN k must be in 1..{len(bank)} (the bank's rows), got {k}")
    sims = normalize_rows(queries) @ bank.T  # [B, R]
    # the k-th largest = the (R - k)-th smallest
    return np.partition(sims, len(bank) - k, axis=1)[:, len(bank) - k]


def knn_scores_many(queries: np.ndarray, bank: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """:func:`knn_scores` for several k at once (one similarity matrix, one partial sort)."""
    bank = np.asarray(bank, np.float64)
    if not ks:
        return {}
    if not 1 <= min(ks) <= max(ks) <= len(bank):
        raise UserError(f"KNN k must be in 1..{len(bank)} (the bank's rows), got {sorted(ks)}")
    sims = normalize_rows(queries) @ bank.T
    top = max(ks)
    best = -np.sort(-np.partition(sims, len(bank) - top, axis=1)[:, len(bank) - top :], axis=1)
    return {k: best[:, k - 1] for k in ks}


def reference(d: ScoreData) -> np.ndarray:
    assert d.features is not None
    return knn_scores(d.features.reshape(len(d.features), -1), d.stats["bank"], int(d.params["k"]))


SPEC = ScoreSpec(
    "knn",
    "k-th largest cosine similarity of the concatenated member pre-logit features to a bank of "
    "training features",
    reference,
    graph="export.scores.builtin:knn",
    needs_features=True,
    tolerance=1e-5,
    # a cosine similarity; in-distribution images crowd close to 1
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96,
             0.97, 0.98, 0.99, 0.995, 1.0),
)  # fmt: skip
