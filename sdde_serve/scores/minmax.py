"""minmax, the official SDDE code's aggregation: ``min_m max_c z[b, m, c]`` (the least confident
member's max logit). Graphs exported before it existed get it from their logits, exactly (max and
min only pick float32 values)."""

from __future__ import annotations

from sdde_serve import calibration as cal
from sdde_serve.scores.registry import ScoreSpec

SPEC = ScoreSpec(
    "minmax",
    "min over members of the member's max logit",
    lambda d: cal.minmax(d.logits),
    graph="export.scores.builtin:minmax",
    member_subset=True,
    recompute_from_logits=True,
)
