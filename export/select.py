"""Choosing the deployed OOD score (``sdde export --ood-score auto``) on validation data only.

Candidates: every registered score (sdde_serve/scores/) marked ``candidate``, in registration
order: ``mal``, ``msp`` (at the validation-fitted T), ``minmax``, ``knn@k`` for every k in
:data:`CANDIDATE_KS` the bank allows, ``energy``, and the scores with fitted statistics
(``mahalanobis``) when the training-split statistics were given. Each is scored on the run's
in-distribution validation split against every ``--ood-val`` set; the candidate with the best
mean AUROC (in-distribution positive) wins, ties going to the earlier candidate. Without
``--ood-val`` the sets are synthesized from the validation images (export/synth_ood.py, called
by export/choice.py); with none at all the benchmark's choice is deployed (:data:`DEFAULT_SCORE`,
k from the bank size). The sets reported as results must never be
passed here.

numpy only (the features and logits come from the caller), so the rule is testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdde_serve import scores
from sdde_serve.evaluation.metrics import auroc, fpr_at_tpr
from sdde_serve.manifest import ScoreSelection

# what `auto` deploys without validation OOD data: KNN at export.knn.default_k; chosen by
# benchmarks/mnist_ood.py on its validation OOD sets (docs/export.md)
DEFAULT_SCORE = "knn"
FALLBACK_WITHOUT_BANK = "mal"
CANDIDATE_KS = (1, 2, 5, 10, 20, 50, 100, 200)


def score_choices() -> tuple[str, ...]:
    """``--ood-score``'s choices: every registered score, then ``auto``."""
    return (*scores.names(), "auto")


SCORE_CHOICES = score_choices()  # the built-in scores' (see score_choices for later ones)


@dataclass
class ScoreInputs:
    """One image set, as the candidates need it."""

    logits: np.ndarray  # [n, N, L]
    features: np.ndarray | None  # [n, N*D] concatenated pre-logit features (None: no bank)

    def score_data(self, temperature: float, stats: dict | None = None) -> scores.ScoreData:
        """The registry's view: member features ``[n, N, D]``."""
        n, members = self.logits.shape[:2]
        feats = None if self.features is None else self.features.reshape(n, members, -1)
        return scores.ScoreData(
            np.asarray(self.logits, np.float64), temperature, feats, stats or {}
        )


def candidate_name(score: str, k: int | None = None) -> str:
    return f"knn@{k}" if score == "knn" else score


def parse_candidate(name: str) -> tuple[str, int | None]:
    """``"knn@10"`` -> ``("knn", 10)``, ``"mal"`` -> ``("mal", None)``."""
    score, _, k = name.partition("@")
    return score, (int(k) if k else None)


def candidate_scores(
    data: ScoreInputs,
    *,
    temperature: float,
    bank: np.ndarray | None,
    ks: list[int],
    stats: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Every candidate's score (higher = in-distribution) on one image set.

    ``stats``: fitted training-split statistics of the registered scores that need them; a
    score whose statistics (or features) are missing is not a candidate.
    """
    from export.knn import knn_scores_many

    stats = stats or {}
    out: dict[str, np.ndarray] = {}
    for name in scores.names(candidate=True):
        spec = scores.get(name)
        if name == "knn":
            if bank is not None and data.features is not None:
                for k, values in knn_scores_many(data.features, bank, ks).items():
                    out[candidate_name("knn", k)] = values
        elif (spec.fit is None or name in stats) and (
            data.features is not None or not spec.needs_features
        ):
            out[name] = spec.compute(data.score_data(temperature, stats.get(name)))
    return out


def choose(
    id_scores: dict[str, np.ndarray], ood_scores: dict[str, dict[str, np.ndarray]]
) -> tuple[str, dict[str, float], dict[str, dict[str, float]]]:
    """The candidate with the best mean AUROC over the OOD sets, equal AUROCs going to the lower
    mean FPR@95, then to the earlier candidate; (name, means, per set)."""
    if not ood_scores:
        raise ValueError("choosing a score needs at least one validation OOD set")
    per_set = {
        c: {name: auroc(id_scores[c], sets[c]) for name, sets in ood_scores.items()}
        for c in id_scores
    }
    means = {c: float(np.mean(list(v.values()))) for c, v in per_set.items()}
    fpr = mean_fpr95(id_scores, ood_scores)
    best = min(means, key=lambda c: (-means[c], fpr[c]))  # min keeps the first of equal keys
    return best, means, per_set


def mean_fpr95(
    id_scores: dict[str, np.ndarray], ood_scores: dict[str, dict[str, np.ndarray]]
) -> dict[str, float]:
    """Each candidate's FPR@95 (OOD accepted at 95% ID acceptance), averaged over the sets."""
    return {
        c: float(np.mean([fpr_at_tpr(id_scores[c], sets[c]) for sets in ood_scores.values()]))
        for c in id_scores
    }


def select_score(
    requested: str,
    *,
    id_data: ScoreInputs,
    id_name: str,
    ood_val: dict[str, ScoreInputs],
    ood_specs: dict[str, str],
    temperature: float,
    bank: np.ndarray | None,
    default_k: int,
    knn_k: int | None,
    stats: dict[str, dict[str, np.ndarray]] | None = None,
) -> tuple[str, int | None, ScoreSelection]:
    """(score, k, why): the deployed score, the graph's k (None without a bank), the record."""
    rows = 0 if bank is None else len(bank)
    ks = sorted({k for k in CANDIDATE_KS if k <= rows} | {default_k} if rows else set())
    if knn_k is not None:
        ks = [knn_k]  # the user fixed k: auto still chooses among the scores
    means: dict[str, float] = {}
    per_set: dict[str, dict[str, float]] = {}
    fpr: dict[str, float] = {}
    best = None
    if ood_val:
        kw = {"temperature": temperature, "bank": bank, "ks": ks, "stats": stats}
        id_scores = candidate_scores(id_data, **kw)
        ood = {n: candidate_scores(d, **kw) for n, d in ood_val.items()}
        best, means, per_set = choose(id_scores, ood)
        fpr = mean_fpr95(id_scores, ood)
    k = None if bank is None else (knn_k or default_k)
    common = {
        "val_auroc": means,
        "val_auroc_per_set": per_set,
        "val_fpr95": fpr,
        "ood_val": dict(ood_specs),
        "id_data": id_name if ood_val else None,
        "id_n": len(id_data.logits) if ood_val else None,
    }
    if requested != "auto":
        reason = f"--ood-score {requested}"
        return requested, k, ScoreSelection(method="given", reason=reason, **common)
    if best is not None:
        score, best_k = parse_candidate(best)
        if best_k is not None:
            k = best_k
        reason = (
            f"best mean validation AUROC ({100 * means[best]:.2f}) over "
            f"{', '.join(ood_val)} against {id_name}"
        )
        return score, k, ScoreSelection(method="auto", reason=reason, **common)
    score = DEFAULT_SCORE if bank is not None else FALLBACK_WITHOUT_BANK
    reason = (
        f"no --ood-val data: the default {score}"
        + (f" (k = {k} for a {rows}-row bank)" if score == "knn" else "")
        + " chosen by benchmarks/mnist_ood.py on its validation OOD sets"
    )
    return score, k, ScoreSelection(method="default", reason=reason, **common)
