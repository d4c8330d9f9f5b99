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
    query = F.normalize(x.features, dim=-1)  # [B, N, D]
    sims = torch.einsum("bnd,ndr->bnr", query, bank)
    k = k_for(int(bank.shape[-1]))
    return torch.topk(sims, k, dim=-1).values[..., -1].mean(dim=1)
