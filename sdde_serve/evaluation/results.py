"""What an evaluation holds: the scored data sets and the metrics the sections computed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# images float32 [k, C, H, W] in [0, 1] -> CAMs [k, N, h, w] of the ensemble's predicted class
CamFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class ScoredSet:
    """One dataset's model outputs: OOD scores, member logits and (optionally) CAMs."""

    name: str
    spec: str
    logits: np.ndarray  # [n, N, L]
    scores: dict[str, np.ndarray]
    cam_images: np.ndarray | None = None  # [k, C, H, W] in [0, 1]
    cams: np.ndarray | None = None  # [k, N, h, w]

    def __len__(self) -> int:
        return len(self.logits)


@dataclass
class Evaluation:
    metrics: dict
    id_set: ScoredSet
    ood_sets: list[ScoredSet]
    labels: np.ndarray
    probs_before: np.ndarray  # T = 1
    probs_after: np.ndarray  # the manifest's T
    groups: dict[str, list[str]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    calibration_scores: list[float] | None = None  # the manifest's (conformal p-values)
