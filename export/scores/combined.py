"""Graph head of ``combined`` (sdde_serve/scores/combined.py): the mal and knn heads, standardised
by the stored ``median`` and ``scale``, averaged. Its ``knn_bank`` statistic is the graph's
``knn_bank`` buffer itself when the two are equal (export/graph.py stores it once)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from export.scores import GraphInputs
from export.scores.builtin import knn, mal
from sdde_serve.scores.knn_members import k_for


def combined(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    bank = stats["knn_bank"]  # [N*D, R]
    near = knn(x, {"bank": bank}, {"k": k_for(int(bank.shape[-1]))})
    z = (torch.stack([mal(x, {}, {}), near], dim=1) - stats["median"]) / stats["scale"]
    return z.mean(dim=1)
