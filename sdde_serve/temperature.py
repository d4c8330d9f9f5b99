"""When to apply a fitted temperature: K-fold cross-validation inside the calibration split.

:func:`sdde_serve.calibration.fit_temperature` finds the T that minimises the NLL of the data it
is given; on a split the members classify almost perfectly that T only sharpens confidence that
was already right, and the held-out NLL gets worse. So the rule is:

1. Split the n calibration images into K folds (seeded). For each fold, fit T on the other K - 1
   folds and score the per-image NLL of the held-out fold at that T and at T = 1.
2. The paired per-image differences ``nll(T = 1) - nll(T_fold)`` estimate how much applying a
   fitted T improves the NLL on images it was not fitted on. Their mean is the cross-validated
   gain; a percentile bootstrap over images (seeded) gives its 90% interval, whose lower end is
   a one-sided 95% lower bound of the gain.
3. Apply T (fitted on all n images) only when that lower bound is above 0 (the gain is beyond
   noise: a one-sided test, since the question is one-sided, "does T lower the NLL?") and the
   fit on all images has an interior optimum (not on the search bound). Otherwise keep T = 1 and
   say why.

numpy only: ``sdde calibrate`` runs where PyTorch is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdde_serve import calibration as cal

DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAP = 2000
# two-sided level of the reported interval: its lower end is the one-sided 95% lower bound
CONFIDENCE = 0.90
SEED = 0


@dataclass
class FoldResult:
    n: int
    temperature: float  # fitted on the other folds
    nll_t1: float  # held-out NLL at T = 1
    nll_fitted: float  # held-out NLL at this fold's T


@dataclass
class TemperatureDecision:
    """The outcome of the rule and its evidence (recorded in the manifest)."""

    temperature: float  # the T to deploy: ``fitted`` or 1.0
    fitted: float  # T fitted on all n images
    applied: bool
    reason: str
    n: int
    errors: int  # images the ensemble (at T = 1) misclassifies
    folds: list[FoldResult] = field(default_factory=list)
    cv_nll_t1: float = float("nan")
    cv_nll_fitted: float = float("nan")
    gain: float = float("nan")  # cv_nll_t1 - cv_nll_fitted (> 0: T helps)
    gain_interval: tuple[float, float] = (float("nan"), float("nan"))


def per_image_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    lp = cal.ensemble_log_probs(logits, temperature)
    return -lp[np.arange(len(labels)), labels]


def fold_indices(n: int, k: int, seed: int = SEED) -> list[np.ndarray]:
    """k nearly equal folds of a seeded permutation of ``range(n)``."""
    return list(np.array_split(np.random.default_rng(seed).permutation(n), k))


def bootstrap_interval(
    values: np.ndarray, *, draws: int = DEFAULT_BOOTSTRAP, confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean of ``values`` (resampling the values)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    chunk = max(1, 4_000_000 // len(values))  # draws per chunk: ~32 MB of indices at any n
    for start in range(0, draws, chunk):
        stop = min(start + chunk, draws)
        idx = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def cross_validated_nll(
    logits: np.ndarray, labels: np.ndarray, k: int, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, list[FoldResult]]:
    """(per-image NLL at T = 1, per-image NLL at the T fitted on the other folds, the folds):
    ``k`` seeded folds (:func:`fold_indices`), each scored at the T of the other ``k - 1``."""
    n = len(labels)
    nll_t1 = per_image_nll(logits, labels, 1.0)
    nll_cv = np.empty(n)
    results = []
    for held in fold_indices(n, k, seed):
        train = np.setdiff1d(np.arange(n), held, assume_unique=True)
        t = cal.fit_temperature(logits[train], labels[train])
        nll_cv[held] = per_image_nll(logits[held], labels[held], t)
        results.append(
            FoldResult(len(held), t, float(nll_t1[held].mean()), float(nll_cv[held].mean()))
        )
    return nll_t1, nll_cv, results


def choose_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = DEFAULT_FOLDS,
    draws: int = DEFAULT_BOOTSTRAP,
    seed: int = SEED,
) -> TemperatureDecision:
    """Apply the fitted T only when cross-validation shows it lowers the NLL beyond noise."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    fitted = cal.fit_temperature(logits, labels)
    errors = int((cal.ensemble_probs(logits, 1.0).argmax(axis=1) != labels).sum())
    k = min(folds, n)

    def keep(reason: str, **evidence: object) -> TemperatureDecision:
        return TemperatureDecision(1.0, fitted, False, reason, n, errors, **evidence)  # type: ignore[arg-type]

    if k < 2:
        return keep(f"{n} calibration image(s) cannot be cross-validated; T = 1 kept")
    nll_t1, nll_cv, results = cross_validated_nll(logits, labels, k, seed)
    diff = nll_t1 - nll_cv
    interval = bootstrap_interval(diff, draws=draws, seed=seed)
    evidence = {
        "folds": results,
        "cv_nll_t1": float(nll_t1.mean()),
        "cv_nll_fitted": float(nll_cv.mean()),
        "gain": float(diff.mean()),
        "gain_interval": interval,
    }
    summary = (
        f"{k}-fold cross-validated NLL {evidence['cv_nll_t1']:.4f} at T = 1 vs "
        f"{evidence['cv_nll_fitted']:.4f} at the fitted T (gain {diff.mean():+.4f}, "
        f"90% interval [{interval[0]:+.4f}, {interval[1]:+.4f}]; {errors} of {n} "
        "images misclassified)"
    )
    if cal.temperature_at_bound(fitted):
        return keep(
            f"T = {fitted:.4g} fitted on all {n} images is on the search bound (no interior "
            f"optimum: the split is (nearly) separable); T = 1 kept. {summary}",
            **evidence,
        )
    if not interval[0] > 0.0:
        return keep(
            f"T = {fitted:.4g} does not improve the held-out NLL beyond noise; T = 1 kept. "
            f"{summary}. Calibrate on more held-out data (sdde calibrate, or train with a "
            "larger --val-fraction) to fit T",
            **evidence,
        )
    return TemperatureDecision(
        fitted, fitted, True, f"T = {fitted:.4g} applied: {summary}", n, errors, **evidence
    )  # type: ignore[arg-type]
