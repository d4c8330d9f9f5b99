"""Per-epoch validation: the numbers each ``metrics.jsonl`` record holds, and the best checkpoint.

``validate`` scores every member and the ensemble (accuracy, NLL) on held-out images;
``cam_similarity`` is the paper's diversity measure on them; ``update_best`` decides whether
this epoch's weights become ``best.safetensors``. Rank 0 runs these; nothing here trains.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from training import data as D
from training import saliency
from training.config import TrainConfig
from training.distributed import autocast_for
from training.ensemble import Ensemble


@torch.no_grad()
def member_logits(
    ensemble: Ensemble, data: D.Tensors, cfg: TrainConfig, device: torch.device
) -> Tensor:
    """Logits ``[B, N, L]`` (images, members, classes; float32, CPU) on ``data`` (eval mode)."""
    chunks = []
    for x, _ in D.eval_batches(data, cfg.eval_batch_size):
        with autocast_for(device, cfg):
            chunks.append(ensemble(x.to(device)).float().cpu())
    if not chunks:
        return torch.empty(0, ensemble.num_members, 0)
    return torch.cat(chunks)


def validate(
    ensemble: Ensemble, data: D.Tensors, cfg: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Accuracy and NLL of each member and of the ensemble (mean of member probabilities)."""
    if len(data) == 0 or data.y is None:
        return {}
    logits = member_logits(ensemble, data, cfg, device)
    y = data.y
    log_p = torch.log_softmax(logits, dim=-1)  # [B, N, L]
    member_acc = (logits.argmax(-1) == y[:, None]).double().mean(0)
    member_nll = -log_p.gather(-1, y[:, None, None].expand(-1, logits.shape[1], 1)).double()
    # Ensemble probabilities average probabilities (not logits): log mean_i p_i.
    ens_log_p = torch.logsumexp(log_p, dim=1) - math.log(logits.shape[1])
    return {
        "member_acc": [round(float(v), 6) for v in member_acc],
        "member_nll": [round(float(v), 6) for v in member_nll.mean(0).squeeze(-1)],
        "ensemble_acc": round(float((ens_log_p.argmax(-1) == y).double().mean()), 6),
        "ensemble_nll": round(float(-ens_log_p.gather(-1, y[:, None]).double().mean()), 6),
    }


def accuracy_only(metrics: dict[str, Any]) -> dict[str, Any]:
    """The accuracies of ``validate``'s metrics (the per-epoch train record keeps only those)."""
    return {k: v for k, v in metrics.items() if k.endswith("acc")}


def cam_similarity(
    ensemble: Ensemble, data: D.Tensors, cfg: TrainConfig, device: torch.device
) -> float | None:
    """Mean pairwise cosine similarity of the members' GradCAMs on held-out images.

    The paper's diversity measure (its Figure 5): GradCAM for the ground-truth class, the official
    normalisation, each unordered pair of members once. Lower = more diverse saliency.
    """
    if cfg.cam_samples <= 0 or ensemble.num_members < 2 or len(data) == 0 or data.y is None:
        return None
    n = min(cfg.cam_samples, len(data))
    x, y = data.x[:n].to(device), data.y[:n].to(device)
    return round(saliency.cam_similarity(ensemble, x, y, batch_size=cfg.eval_batch_size), 6)


def update_best(
    best: dict[str, Any] | None, val: dict[str, Any], metric: str
) -> tuple[dict[str, Any], bool]:
    """Best checkpoint: highest ensemble val accuracy (ties: lower NLL), or lowest NLL."""
    acc, nll = val["ensemble_acc"], val["ensemble_nll"]
    key = (acc, -nll) if metric == "acc" else (-nll, acc)
    if best is None or key > tuple(best["key"]):
        value = acc if metric == "acc" else nll
        return {"key": list(key), "value": value, "metric": metric}, True
    return best, False
