"""Engine outputs -> per-image predictions: the one implementation the server and batch use."""

from __future__ import annotations

import sys
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, Field

from sdde_serve import conformal, scores
from sdde_serve.calibration import member_agreement
from sdde_serve.engine import EngineOutput
from sdde_serve.manifest import Manifest

OODPolicy = Literal["flag", "reject"]
OOD_POLICIES: tuple[str, ...] = get_args(OODPolicy)


class ClassProbability(BaseModel):
    label: int
    class_name: str
    probability: float


class Prediction(BaseModel):
    """One image's answer. With policy ``reject`` an OOD image carries no label, only the reason."""

    label: int | None = Field(None, description="predicted class index (absent when rejected)")
    class_name: str | None = None
    confidence: float | None = Field(None, description="calibrated probability of `label`")
    top_k: list[ClassProbability] | None = None
    ood_score: float = Field(description="higher = more in-distribution")
    score_kind: str = Field(description="the deployed OOD score: " + scores.help_lines())
    threshold: float = Field(description="is_ood = ood_score < threshold")
    ood_p_value: float | None = Field(
        None,
        description="split-conformal p-value (1 + #{calibration scores <= ood_score}) / (n + 1); "
        "absent for models exported without calibration scores",
    )
    alpha: float | None = Field(
        None, description="is_ood = ood_p_value < alpha (absent without calibration scores)"
    )
    is_ood: bool
    rejected: bool = False
    reason: str | None = None
    agreement: float | None = Field(
        None, description="fraction of members whose own argmax equals the ensemble's"
    )
    probabilities: list[float] | None = Field(None, description="full calibrated vector")

    @property
    def outcome(self) -> str:
        """``in_distribution``, ``ood_flagged`` or ``rejected`` (the metrics' outcome label)."""
        if self.rejected:
            return "rejected"
        return "ood_flagged" if self.is_ood else "in_distribution"


def score_of(out: EngineOutput, kind: str) -> np.ndarray:
    """The OOD score ``kind`` of every image, as the graph computed it (float32 -> float64).

    Graphs exported before ``minmax`` existed lack that output: it is recomputed from their
    logits, exactly (max and min only pick float32 values); so is any registered score marked
    ``recompute_from_logits``. ``knn`` needs the graph's bank, other fitted scores their stats.
    """
    if kind not in scores.SCORES:
        raise ValueError(f"unknown OOD score {kind!r}; choose one of {scores.names()}")
    spec = scores.get(kind)
    value = out.score(kind)
    if value is None and spec.recompute_from_logits:
        value = spec.compute(scores.ScoreData(np.asarray(out.logits, np.float64)))
    if value is None:
        why = " (exported without a KNN bank)" if kind == "knn" else ""
        raise ValueError(f"the model has no {kind!r} output{why}")
    return np.asarray(value, np.float64)


def deployed_score(out: EngineOutput, manifest: Manifest) -> np.ndarray:
    """The manifest's OOD score of every image: THE score compared with the threshold.

    The one place that says which number decides ``is_ood`` (server, batch scoring, evaluation's
    operating point); its validation-split counterpart at export/calibration is
    :func:`sdde_serve.calibrate.validation_scores`.
    """
    return score_of(out, manifest.ood.score)


def make_predictions(
    out: EngineOutput,
    manifest: Manifest,
    *,
    top_k: int = 3,
    policy: OODPolicy = "flag",
    include_probs: bool = False,
    alpha: float | None = None,
) -> list[Prediction]:
    """One :class:`Prediction` per image of ``out``.

    ``alpha`` overrides the manifest's (``1 - id_acceptance``) for this call; it needs a model
    with calibration scores (:func:`ood_rule`).
    """
    if policy not in OOD_POLICIES:
        raise ValueError(f"OOD policy must be one of {OOD_POLICIES}, got {policy!r}")
    kind, threshold, alpha = ood_rule(manifest, alpha)
    scores = deployed_score(out, manifest)
    cal_scores = manifest.ood.calibration_scores
    p_values = None if cal_scores is None else conformal.p_values(cal_scores, scores)
    agreement = member_agreement(out.logits, out.probs)
    k = max(1, min(top_k, manifest.num_classes))
    order = np.argsort(-out.probs, axis=1, kind="stable")[:, :k]
    predictions = []
    for i in range(len(out)):
        score = float(scores[i])
        # score < threshold is p_value < alpha (the threshold derives from alpha); comparing
        # scores avoids deciding on the rounding of (1 + c) / (n + 1) against alpha
        is_ood = bool(score < threshold)
        common = {
            "ood_score": score,
            "score_kind": kind,
            "threshold": threshold,
            "is_ood": is_ood,
            "ood_p_value": None if p_values is None else float(p_values[i]),
            "alpha": alpha,
        }
        if is_ood and policy == "reject":
            predictions.append(rejected_prediction(common))
            continue
        predictions.append(
            labelled_prediction(
                common,
                out.probs[i],
                order[i],
                classes=manifest.classes,
                agreement=float(agreement[i]),
                include_probs=include_probs,
            )
        )
    return predictions


def rejected_prediction(common: dict[str, Any]) -> Prediction:
    """An OOD image under policy ``reject``: the OOD fields of ``common`` and why, no label."""
    reason = (
        f"out of distribution: {common['score_kind']} score {common['ood_score']:.4g} < "
        f"threshold {common['threshold']:.4g}"
    )
    if common["ood_p_value"] is not None:
        reason += f" (p-value {common['ood_p_value']:.4g} < alpha {common['alpha']:g})"
    return Prediction(**common, rejected=True, reason=reason)


def labelled_prediction(
    common: dict[str, Any],
    probs: np.ndarray,
    top: np.ndarray,
    *,
    classes: list[str],
    agreement: float,
    include_probs: bool,
) -> Prediction:
    """An image's label and top classes (``top``: class indices, most probable first) from its
    calibrated ``probs``, with the OOD fields of ``common``."""
    label = int(top[0])
    return Prediction(
        **common,
        label=label,
        class_name=classes[label],
        confidence=float(probs[label]),
        top_k=[
            ClassProbability(label=int(c), class_name=classes[c], probability=float(probs[c]))
            for c in top
        ],
        agreement=agreement,
        probabilities=[float(p) for p in probs] if include_probs else None,
    )


def no_calibration_scores_message(model: str | None = None) -> str:
    """The one wording of "this model has no calibration scores, hence no p-values" (the error
    below, batch scoring's ``--fdr``, the evaluation report); ``model``: its name, if known."""
    which = "the model" if model is None else f"model {model!r}"
    return f"{which} stores no calibration scores (exported before p-values)"


class NoCalibrationScores(ValueError):
    """An alpha was asked of a model exported without calibration scores (scoring and the
    server raise this, named by the model as it is served)."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"{no_calibration_scores_message(model)}: it cannot apply an alpha; refit it with "
            "`sdde calibrate`"
        )


def ood_rule(manifest: Manifest, alpha: float | None = None) -> tuple[str, float, float | None]:
    """(score kind, threshold, alpha) of the OOD decision, with an optional alpha override.

    Models exported before p-values existed carry no calibration scores: they keep the stored
    threshold and have no alpha; asking them for an alpha raises :class:`NoCalibrationScores`.
    """
    ood = manifest.ood
    if ood.calibration_scores is None:
        if alpha is not None:
            raise NoCalibrationScores(manifest.name)
        return ood.score, ood.threshold, None
    if alpha is None or alpha == ood.alpha:
        return ood.score, ood.threshold, ood.alpha
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    threshold = conformal.threshold_for_alpha(ood.calibration_scores, alpha)
    return ood.score, max(threshold, -sys.float_info.max), alpha
