"""combined: the mean of the robust z-scores of MAL and KNN, standardised on validation ID data.

``combined = mean_b (s_b - median_b) / scale_b`` over the base scores :data:`BASES` (``mal`` and
the concatenated-feature ``knn`` at the bank's default k), where ``median_b`` and
``scale_b = IQR_b / 1.349`` (the standard deviation of a normal with that IQR) are fitted on
in-distribution validation images: the *choice half* of the validation split (export/choice.py),
never the calibration half that T, the threshold and the conformal calibration scores come from,
so those stay exchangeable with future in-distribution scores. The KNN base's bank comes from
the training split, as the graph's own ``knn`` bank does.

Why z-scores and not per-base conformal p-values (ranks): a p-value is a step function of its
score, so the float32 graph and its float64 reference disagree by a whole step wherever a base
score lands next to a reference score (the validation images it is verified on land exactly
there); the z-score is smooth, and the median/IQR keep a heavy-tailed base from drowning the
others on in-distribution data. Its conformal p-value keeps the guarantee the usual way: the
threshold is a quantile of held-out ID combined scores.

Stored (float32): ``median [2]``, ``scale [2]`` and ``knn_bank [N*D, R]`` (unit columns: the
KNN bank's rows). ``fit`` returns its own bank so that this reference needs nothing but its
statistics; in the graph it equals the ``knn`` score's ``knn_bank``, which export stores once and
both heads read (export/graph.py). Only beside a float16-stored KNN bank (``--knn-dtype
float16``) does it keep a float32 copy ``combined_knn_bank``, as every file exported before the
sharing does; such files serve unchanged (the runtime never reads a score's initializers).

The bases were chosen on validation OOD data (benchmarks/combined_ood_mnist.py, real MNIST,
val-glyphs and val-photos only): of mal + mahalanobis, mal + knn_members, mal + vim, minmax +
mahalanobis, mal + mahalanobis + knn_members and mal + knn, mal + knn had the best validation
AUROC.
"""

from __future__ import annotations

import numpy as np

from sdde_serve.scores.knn import knn_scores, normalize_rows
from sdde_serve.scores.knn_members import k_for
from sdde_serve.scores.mal import SPEC as MAL
from sdde_serve.scores.registry import FitData, ScoreData, ScoreSpec

# a logit score (MAL: the members' agreement on a class) and a feature-neighbourhood score (KNN:
# the nearest training image); they fail on different outliers (issue 22: on CIFAR-10
# photographs MAL led KNN, on letters KNN led MAL)
BASES = ("mal", "knn")
IQR_TO_SD = 1.349  # the IQR of a standard normal


def base_scores(d: ScoreData) -> np.ndarray:
    """``[B, 2]`` float64: MAL and the k-th largest cosine to ``knn_bank`` (k by its rows)."""
    assert d.features is not None
    bank = np.asarray(d.stats["knn_bank"], np.float64).T  # [R, N*D] unit rows
    knn = knn_scores(np.asarray(d.features).reshape(len(d.features), -1), bank, k_for(len(bank)))
    return np.stack([MAL.compute(d), knn], axis=1)


def fit(data: FitData) -> dict[str, np.ndarray]:
    """The KNN base's bank from the training rows; the standardisation is added by
    :func:`standardise` from validation ID images (export/choice.py)."""
    rows = normalize_rows(np.asarray(data.features).reshape(len(data.features), -1))
    return {"knn_bank": rows.T}


def standardise(stats: dict[str, np.ndarray], id_data: ScoreData) -> dict[str, np.ndarray]:
    """``stats`` plus ``median`` and ``scale`` of the bases on ``id_data`` (validation ID)."""
    s = base_scores(ScoreData(id_data.logits, id_data.temperature, id_data.features, stats))
    q1, median, q3 = np.percentile(s, [25, 50, 75], axis=0)
    scale = np.maximum((q3 - q1) / IQR_TO_SD, 1e-12)  # a constant base must not divide by 0
    return {**stats, "median": median, "scale": scale}


def reference(d: ScoreData) -> np.ndarray:
    z = (base_scores(d) - d.stats["median"]) / d.stats["scale"]
    return z.mean(axis=1)


SPEC = ScoreSpec(
    "combined",
    "mean of the robust z-scores of mal and knn, standardised on validation ID images",
    reference,
    graph="export.scores.combined:combined",
    fit=fit,
    needs_features=True,
    # float32 cosines (1e-5, knn's tolerance) divided by an ID spread of ~0.01-0.1
    tolerance=1e-3,
    relative_tolerance=True,
)
