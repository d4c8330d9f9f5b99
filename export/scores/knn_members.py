"""Graph head of ``knn_members`` (sdde_serve/scores/knn_members.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from export.scores import GraphInputs
from sdde_serve.scores.knn_members import k_for


def knn_members(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    bank = stats["bank"]  # [N, D, R] unit columns
    # members first: a batched MatMul reads the bank as stored and leaves [N, B, R] as is;
    # the equivalent einsum ("bnd,ndr->bnr") ran ~25% slower in onnxruntime (CPU, ResNet18 x 5,
    # R = 10,000, batch 64: benchmarks/bench_scores.py), transposing its [B, N, R] result
    query = F.normalize(x.features, dim=-1).transpose(0, 1)  # [N, B, D]
    sims = torch.matmul(query, bank)  # [N, B, R]
    k = k_for(int(bank.shape[-1]))
    return torch.topk(sims, k, dim=-1).values[..., -1].mean(dim=0)
