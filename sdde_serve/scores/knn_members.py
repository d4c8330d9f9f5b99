"""KNN per member: the mean over members of the k-th largest cosine similarity between the
member's own L2-normalised pre-logit features and the same member's features of the training rows
(the KNN bank's rows). The concatenated ``knn`` normalises all members' features together, so a
member with large features dominates it; here every member counts equally. k follows the bank
size as for ``knn`` (``export.knn.default_k``: one per 10,000 rows, at least 1).

Stored (float32): ``bank [N, D, R]`` (unit columns, MatMul's layout), N·D·R values, the same
as ``knn``'s bank.
"""

from __future__ import annotations

import numpy as np

from sdde_serve.scores.knn import SPEC as KNN_SPEC
from sdde_serve.scores.knn import normalize_rows
from sdde_serve.scores.registry import FitData, ScoreData, ScoreSpec

ROWS_PER_K = 10_000  # as export.knn.ROWS_PER_K


def k_for(rows: int) -> int:
    return max(1, round(rows / ROWS_PER_K))


def fit(data: FitData) -> dict[str, np.ndarray]:
    feats = np.asarray(data.features, np.float64)  # [R, N, D]
    unit = np.stack([normalize_rows(feats[:, m]) for m in range(feats.shape[1])])  # [N, R, D]
    return {"bank": unit.transpose(0, 2, 1)}


def reference(d: ScoreData) -> np.ndarray:
    assert d.features is not None
    bank = np.asarray(d.stats["bank"], np.float64)  # [N, D, R]
    feats = np.asarray(d.features, np.float64).reshape(len(d.features), *bank.shape[:2])
    rows, k = bank.shape[-1], k_for(bank.shape[-1])
    per_member = []
    for m in range(bank.shape[0]):
        sims = normalize_rows(feats[:, m]) @ bank[m]  # [B, R]
        per_member.append(np.partition(sims, rows - k, axis=1)[:, rows - k])
    return np.mean(per_member, axis=0)


SPEC = ScoreSpec(
    "knn_members",
    "mean over members of the k-th largest cosine similarity of the member's own pre-logit "
    "features to its features of the training rows",
    reference,
    graph="export.scores.knn_members:knn_members",
    fit=fit,
    needs_features=True,
    tolerance=1e-5,
    buckets=KNN_SPEC.buckets,  # cosine similarities, like knn's
)
