"""Engine outputs -> per-image predictions: the one implementation the server and batch use."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from sdde_serve.calibration import member_agreement, ood_score
from sdde_serve.engine import EngineOutput
from sdde_serve.manifest import OOD_SCORES, Manifest

OODPolicy = Literal["flag", "reject"]
OOD_POLICIES: tuple[str, ...] = ("flag", "reject")


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
    score_kind: str = Field(
        description="'mal' (max average logit), 'msp', 'minmax' (min over members of the "
        "member's max logit) or 'knn' (k-th largest cosine similarity to training features)"
    )
    threshold: float = Field(description="is_ood = ood_score < threshold")
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
    logits, exactly (max and min only pick float32 values). ``knn`` needs the graph's bank.
    """
    if kind not in OOD_SCORES:
        raise ValueError(f"unknown OOD score {kind!r}; choose one of {OOD_SCORES}")
    value = getattr(out, kind)
    if value is None and kind in ("minmax",):
        value = ood_score(kind, out.logits, out.probs)
    if value is None:
        raise ValueError(f"the model has no {kind!r} output (exported without a KNN bank)")
    return np.asarray(value, np.float64)


def deployed_score(out: EngineOutput, manifest: Manifest) -> np.ndarray:
    """The manifest's OOD score of every image: THE score compared with the threshold.

    The one place that says which number decides ``is_ood`` (server, batch scoring, evaluation's
    operating point); its validation-split counterpart at export/calibration is
    :func:`sdde_serve.calibrate_cmd.validation_scores`.
    """
    return score_of(out, manifest.ood.score)


def make_predictions(
    out: EngineOutput,
    manifest: Manifest,
    *,
    top_k: int = 3,
    policy: OODPolicy = "flag",
    include_probs: bool = False,
) -> list[Prediction]:
    if policy not in OOD_POLICIES:
        raise ValueError(f"OOD policy must be one of {OOD_POLICIES}, got {policy!r}")
    kind, threshold = manifest.ood.score, manifest.ood.threshold
    scores = deployed_score(out, manifest)
    agreement = member_agreement(out.logits, out.probs)
    k = max(1, min(top_k, manifest.num_classes))
    order = np.argsort(-out.probs, axis=1, kind="stable")[:, :k]
    predictions = []
    for i in range(len(out)):
        score = float(scores[i])
        is_ood = bool(score < threshold)
        common = {"ood_score": score, "score_kind": kind, "threshold": threshold, "is_ood": is_ood}
        if is_ood and policy == "reject":
            reason = f"out of distribution: {kind} score {score:.4g} < threshold {threshold:.4g}"
            predictions.append(Prediction(**common, rejected=True, reason=reason))
            continue
        label = int(order[i, 0])
        predictions.append(
            Prediction(
                **common,
                label=label,
                class_name=manifest.classes[label],
                confidence=float(out.probs[i, label]),
                top_k=[
                    ClassProbability(
                        label=int(c),
                        class_name=manifest.classes[c],
                        probability=float(out.probs[i, c]),
                    )
                    for c in order[i]
                ],
                agreement=float(agreement[i]),
                probabilities=[float(p) for p in out.probs[i]] if include_probs else None,
            )
        )
    return predictions
