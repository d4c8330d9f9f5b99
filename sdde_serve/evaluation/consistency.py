"""Report section: the graph's own probs and scores against numpy on the graph's member logits."""

from __future__ import annotations

from typing import Any

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve.evaluation.section import Context, Section


def compute(ctx: Context, config: None) -> dict[str, Any]:
    """Max abs differences: the graph computes probs/mal/msp itself, numpy must agree with it."""
    out, logits = ctx.id_output, ctx.evaluation.id_set.logits
    probs = ctx.evaluation.probs_after
    check = {
        "probs_max_abs_diff": float(np.abs(out.probs - probs).max()),
        "mal_max_abs_diff": float(np.abs(out.mal - cal.mal(logits)).max()),
        "msp_max_abs_diff": float(np.abs(out.msp - cal.msp(probs)).max()),
    }
    if out.minmax is not None:
        check["minmax_max_abs_diff"] = float(np.abs(out.minmax - cal.minmax(logits)).max())
    return {"graph_check": check}


def markdown(m: dict[str, Any]) -> list[str]:
    gc = m["graph_check"]
    return [
        "## Consistency check",
        "",
        "Graph outputs vs numpy recomputation from the graph's member logits (max abs diff): "
        f"probs {gc['probs_max_abs_diff']:.2e}, MAL {gc['mal_max_abs_diff']:.2e}, "
        f"MSP {gc['msp_max_abs_diff']:.2e}.",
        "",
    ]


SECTION = Section("graph_check", compute, markdown)
