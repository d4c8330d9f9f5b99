"""MAL, the paper's Eq. 9: ``max_c mean_m z[b, m, c]`` (no temperature: dividing by T > 0 would only
rescale it)."""

from __future__ import annotations

from sdde_serve import calibration as cal
from sdde_serve.scores.registry import ScoreSpec

SPEC = ScoreSpec(
    "mal",
    "max over classes of the member-averaged logits",
    lambda d: cal.mal(d.logits),
    graph="export.scores.builtin:mal",
    member_subset=True,
    in_every_graph=True,
)
