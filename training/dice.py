"""DICE (Rame & Cord, "DICE: Diversity in Deep Ensembles via Conditional Redundancy Adversarial
Estimation", ICLR 2021), as the official SDDE code trains it (its ``diversity/dice.py`` and
``networks/discriminator.py``): the paper's last baseline of Table 3.

A discriminator ``D(e_i, e_j, y)`` learns to tell a pair of two members' embeddings of the *same*
image (the joint distribution given the class) from a pair whose second embedding comes from
another image *of the same class* (the product of the class-conditional marginals). Its logit
estimates the log density ratio ``log p(e_i, e_j | y) / (p(e_i | y) p(e_j | y))``, the conditional
redundancy of the two members; the members minimise it (clipped with ``tau·tanh(·/tau)``).

Embeddings are each member's pre-logit features: the input of its final ``fc`` layer, read with a
forward pre-hook so the model code stays as it is (when the models grow a ``pre_logits`` output,
``logits_and_embeddings`` is the one place to switch to it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from training.ensemble import Ensemble, batchnorm_mode

# Discriminator of the official code: MLP 256-256-100 with LeakyReLU(0.2), label embedding of 64.
UNITS = (256, 256, 100)
LABEL_DIM = 64


class Discriminator(nn.Module):
    """``D(e1, e2, y)``: one logit per pair, higher = "a pair from the joint distribution"."""

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.label_embedder = nn.Embedding(num_classes, LABEL_DIM)
        layers: list[nn.Module] = []
        width = 2 * embedding_dim + LABEL_DIM
        for n in UNITS:
            layers += [nn.Linear(width, n), nn.LeakyReLU(0.2)]
            width = n
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, e1: Tensor, e2: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([e1, e2, self.label_embedder(y)], dim=-1)).squeeze(-1)


def logits_and_embeddings(ensemble: Ensemble, x01: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits ``[B, N, L]`` and each member's pre-logit embedding ``[B, D]`` from one forward."""
    embeddings: list[Tensor] = []
    hooks = [
        m.fc.register_forward_pre_hook(lambda _mod, args: embeddings.append(args[0]))
        for m in ensemble.members
    ]
    try:
        xn = ensemble.normalize(x01)
        logits = torch.stack([m(xn) for m in ensemble.members], dim=1)
    finally:
        for h in hooks:
            h.remove()
    return logits, embeddings


def embedding_dim(ensemble: Ensemble, sample: Tensor) -> int:
    """The members' embedding width, from one image in eval mode (BatchNorm stats untouched)."""
    with torch.no_grad(), batchnorm_mode(ensemble, "eval"):
        return int(logits_and_embeddings(ensemble, sample[:1])[1][0].shape[-1])


def same_class_partner(y: Tensor) -> tuple[Tensor, Tensor]:
    """For each sample, another sample of its class (the next one in batch order, cyclically),
    and a mask of the samples that have one (a class seen once in the batch has no partner).

    The official code needs class-balanced batches and rolls each class's samples by one; this is
    the same rolling for any class counts.
    """
    partner = torch.arange(len(y), device=y.device)
    has = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).squeeze(-1)
        if len(idx) > 1:
            partner[idx] = idx.roll(-1)
            has[idx] = True
    return partner, has


def redundancy(logit: Tensor, tau: float) -> Tensor:
    """The clipped log density ratio of pairs with discriminator logits ``logit``.

    ``-log(exp(-log σ(d)) - 1 + 1e-6)`` is ``d`` up to the 1e-6 (since ``1/σ(d) - 1 = exp(-d)``);
    written as the official code does, then clipped to ``(-tau, tau)`` with ``tau·tanh(r/tau)``.
    """
    log_ratio = -((-F.logsigmoid(logit)).exp() - 1 + 1e-6).log()
    return tau * torch.tanh(log_ratio / tau)


def dice_losses(
    disc: nn.Module, embeddings: list[Tensor], y: Tensor, *, tau: float
) -> tuple[Tensor, Tensor, float]:
    """``(members' redundancy term, discriminator loss, discriminator accuracy)``.

    * redundancy: mean over member pairs i < j of the mean clipped log ratio of the joint pairs,
      through a *detached copy* of the discriminator (its parameters get no gradient from it);
    * discriminator loss: mean over pairs of ``-(log σ(D(joint)) + log σ(-D(product))) / 2`` on
      *detached* embeddings (the members get no gradient from it).
    """
    n = len(embeddings)
    params = {k: v.detach() for k, v in disc.named_parameters()}
    partner, has = same_class_partner(y)
    terms, d_losses, accs = [], [], []
    for i in range(n):
        for j in range(i + 1, n):
            ei, ej = embeddings[i], embeddings[j]
            terms.append(redundancy(functional_call(disc, params, (ei, ej, y)), tau).mean())
            ei_d, ej_d = ei.detach(), ej.detach()
            joint = disc(ei_d, ej_d, y)
            product = disc(ei_d[has], ej_d[partner[has]], y[has])
            d_joint = F.logsigmoid(joint).mean()
            d_product = F.logsigmoid(-product).mean() if len(product) else joint.new_zeros(())
            d_losses.append(-0.5 * (d_joint + d_product))
            with torch.no_grad():
                right = (joint > 0).float().sum() + (product < 0).float().sum()
                accs.append(float(right) / (len(joint) + len(product)))
    return torch.stack(terms).mean(), torch.stack(d_losses).mean(), sum(accs) / len(accs)
