"""Graph heads of the scores every graph has had since their introduction (mal, msp, minmax, knn);
the torch ops are exactly those export/graph.py traced before the registry, so graphs keep their
structure."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from export.scores import GraphInputs


def mal(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    return x.logits.mean(dim=1).amax(dim=-1)


def msp(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    return x.probs.amax(dim=-1)


def minmax(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    return x.logits.amax(dim=-1).amin(dim=1)


def knn(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    """k-th largest cosine to the bank, stored transposed ``[N*D, R]`` (MatMul's layout)."""
    query = F.normalize(x.features.flatten(1), dim=1)  # [B, N*D], unit rows
    sims = torch.matmul(query, stats["bank"])  # [B, R] cosines
    return torch.topk(sims, int(params["k"]), dim=1).values[:, -1]
