"""Graph head of ``energy`` (sdde_serve/scores/energy.py): ``T * logsumexp(mean_m z / T)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from export.scores import GraphInputs


def energy(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    return x.temperature * torch.logsumexp(x.logits.mean(dim=1) / x.temperature, dim=-1)
