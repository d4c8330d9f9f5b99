"""Graph head of ``vim`` (sdde_serve/scores/vim.py): per member
``logsumexp(z) - alpha ||(x - u) R||``, averaged over the members."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from export.scores import GraphInputs


def vim(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    energy = torch.logsumexp(x.logits, dim=-1)  # [B, N]
    off = torch.einsum("bnd,ndr->bnr", x.features - stats["u"], stats["residual"])
    vlogit = off.square().sum(dim=-1).sqrt()  # [B, N]
    return (energy - stats["alpha"] * vlogit).mean(dim=1)
