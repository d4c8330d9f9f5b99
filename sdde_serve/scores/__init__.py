"""The OOD scores: one module each, one registration line each (sdde_serve/scores/registry.py).

Registration order is the order of every list derived from the registry (CLI help, evaluation
tables, `auto`'s candidates: ties go to the earlier score).
"""

from __future__ import annotations

from sdde_serve.scores import combined, energy, knn, knn_members, mahalanobis, mal, minmax, msp, vim
from sdde_serve.scores.registry import (
    SCORES,
    FitData,
    ScoreData,
    ScoreSpec,
    get,
    help_lines,
    names,
    register,
    unregister,
)

register(mal.SPEC)
register(msp.SPEC)
register(minmax.SPEC)
register(knn.SPEC)
register(energy.SPEC)
register(mahalanobis.SPEC)
register(vim.SPEC)
register(knn_members.SPEC)
register(combined.SPEC)

__all__ = [
    "SCORES",
    "FitData",
    "ScoreData",
    "ScoreSpec",
    "get",
    "help_lines",
    "names",
    "register",
    "unregister",
]
