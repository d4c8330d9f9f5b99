"""Graph head of ``mahalanobis`` (sdde_serve/scores/mahalanobis.py): per member
``max_c -(x^T P x - 2 x . pmu_c + mpm_c)``, averaged over the members."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from export.scores import GraphInputs


def mahalanobis(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    f = x.features  # [B, N, D]
    xp = torch.einsum("bnd,nde->bne", f, stats["precision"])
    quad = (xp * f).sum(dim=-1, keepdim=True)  # [B, N, 1]
    dist = quad - 2.0 * torch.einsum("bnd,ncd->bnc", f, stats["pmu"]) + stats["mpm"]
    return (-dist).amax(dim=-1).mean(dim=1)
