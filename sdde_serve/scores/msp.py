"""MSP: the maximum of the calibrated ensemble probabilities ``mean_m softmax(z_m / T)``."""

from __future__ import annotations

from sdde_serve import calibration as cal
from sdde_serve.scores.registry import ScoreSpec

CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))

SPEC = ScoreSpec(
    "msp",
    "max of the calibrated ensemble probabilities",
    lambda d: cal.msp(cal.ensemble_probs(d.logits, d.temperature)),
    graph="export.scores.builtin:msp",
    member_subset=True,
    in_every_graph=True,
    tolerance=1e-5,
    buckets=CONFIDENCE_BUCKETS,
)
