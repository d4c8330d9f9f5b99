"""combined: the mean of a few base scores' robust z-scores, standardised on validation ID data.

``combined = mean_b (s_b - median_b) / scale_b`` over the base scores :data:`BASES`, where
``median_b`` and ``scale_b = IQR_b / 1.349`` (the standard deviation of a normal with that IQR)
are fitted on in-distribution validation images: the *choice half* of the validation split
(export/choice.py), never the calibration half that T, the threshold and the conformal
calibration scores come from, so those stay exchangeable with future in-distribution scores.
The base scores' own statistics (knn_members's bank) come from the training split, as when
they are deployed alone.

Why z-scores and not per-base conformal p-values (ranks): a p-value is a step function of its
score, so the float32 graph and its float64 reference disagree by a whole step wherever a base
score lands next to a reference score (the validation images it is verified on land exactly
there); the z-score is smooth, and the median/IQR keep a heavy-tailed base from drowning the
others on in-distribution data. Its conformal p-value
keeps the guarantee the usual way: the threshold is a quantile of held-out ID combined scores.

Stored (float32): ``median [B]``, ``scale [B]`` and each base's statistics as
``<base>_<key>`` (initializers ``combined_<base>_<key>``): knn_members's bank ``[N, D, R]``, the
size of the KNN bank (a second copy; the graph's ``knn`` reads its own).

The bases were chosen on validation OOD data (benchmarks/combined_ood_mnist.py, real MNIST,
val-glyphs and val-photos only): mal + knn_members led the base sets tried there; with
mahalanobis (61.7 validation AUROC alone on MNIST, far-OOD FPR@95 96%) the combination lost.
"""

from __future__ import annotations

import numpy as np

from sdde_serve.scores.knn_members import SPEC as KNN_MEMBERS
from sdde_serve.scores.mal import SPEC as MAL
from sdde_serve.scores.registry import FitData, ScoreData, ScoreSpec

# a logit score (MAL: the members' agreement on a class) and a feature-neighbourhood score (KNN
# per member: distance to the nearest training image); they fail on different outliers (issue 22:
# on CIFAR-10 photographs MAL led KNN, on letters KNN led MAL)
BASES: tuple[ScoreSpec, ...] = (MAL, KNN_MEMBERS)
IQR_TO_SD = 1.349  # the IQR of a standard normal


def base_stats(stats: dict[str, np.ndarray], base: ScoreSpec) -> dict[str, np.ndarray]:
    """``base``'s own statistics among the combined score's."""
    prefix = f"{base.name}_"
    return {k.removeprefix(prefix): v for k, v in stats.items() if k.startswith(prefix)}


def base_scores(d: ScoreData) -> np.ndarray:
    """``[B, len(BASES)]`` float64: every base score's reference."""
    cols = []
    for base in BASES:
        data = ScoreData(d.logits, d.temperature, d.features, base_stats(dict(d.stats), base))
        cols.append(base.compute(data))
    return np.stack(cols, axis=1)


def fit(data: FitData) -> dict[str, np.ndarray]:
    """The bases' statistics from the training rows; the standardisation is added by
    :func:`standardise` from validation ID images (export/choice.py)."""
    out: dict[str, np.ndarray] = {}
    for base in BASES:
        if base.fit is not None:
            out.update({f"{base.name}_{k}": v for k, v in base.fit(data).items()})
    return out


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
    "mean of the robust z-scores of mal and knn_members, standardised on validation ID images",
    reference,
    graph="export.scores.combined:combined",
    fit=fit,
    needs_features=True,
    # float32 cosines (1e-5, knn_members's tolerance) divided by an ID spread of ~0.01-0.1
    tolerance=1e-3,
    relative_tolerance=True,
)
