"""Export's side of the OOD-score registry (sdde_serve/scores/): each score's graph head.

A head is a function ``head(x: GraphInputs, stats: dict[str, Tensor], params: dict) -> [B]``
named by its :class:`~sdde_serve.scores.registry.ScoreSpec`'s ``graph`` (``"module:function"``,
imported here on first use, so the runtime never imports torch). ``stats`` are the float32 buffers
holding the score's fitted statistics (initializers ``<score>_<key>`` of the exported graph; a
statistic equal to one already in the graph, such as ``combined``'s copy of the KNN bank, is the
buffer of the first, ``knn_bank``: export/graph.py stores it once).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor

from sdde_serve import scores


class GraphInputs(NamedTuple):
    """What every head may read: the graph's own intermediate tensors."""

    logits: Tensor  # [B, N, L]
    probs: Tensor  # [B, L] = mean_m softmax(logits_m / T)
    features: Tensor  # [B, N, D] member pre-logit features
    temperature: Tensor  # the scalar ``temperature`` initializer


Head = Callable[[GraphInputs, dict[str, Tensor], dict[str, Any]], Tensor]


def head(name: str) -> Head:
    """The graph head of registered score ``name``."""
    target = scores.get(name).graph
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def initializer_name(score: str, key: str) -> str:
    """The graph initializer holding statistic ``key`` of ``score``."""
    return f"{score}_{key}"
