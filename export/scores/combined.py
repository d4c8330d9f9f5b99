"""Graph head of ``combined`` (sdde_serve/scores/combined.py): each base score's own head on its
own statistics, standardised by the stored ``median`` and ``scale``, averaged."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from export.scores import GraphInputs, head
from sdde_serve.scores.combined import BASES


def combined(x: GraphInputs, stats: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    cols = []
    for base in BASES:
        prefix = f"{base.name}_"
        own = {k.removeprefix(prefix): v for k, v in stats.items() if k.startswith(prefix)}
        cols.append(head(base.name)(x, own, {}))
    z = (torch.stack(cols, dim=1) - stats["median"]) / stats["scale"]
    return z.mean(dim=1)
