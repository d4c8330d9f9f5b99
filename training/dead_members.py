"""The dead-member guard: find a member stuck near chance while its peers learn, and revive it.

A member whose weights were wrecked by one huge step (the reason ``saliency.diversity_loss``
bounds its gradient) answers one class for everything from then on: it wastes its share of the
compute, pulls the averaged probabilities towards uniform and makes every member-wise OOD score
(minmax) constant. The trainer checks each member's validation accuracy at every epoch end; a
member judged stuck gets fresh initial weights (drawn from a generator seeded by the run's seed,
the step and the member, so the run stays deterministic and resumable) and loses its momentum.

Stuck means both: its peers (the median of the other members) went at least ``PEER_PROGRESS``
of the way from chance (1 / classes) to perfect, so there is plainly something to learn; and the
member gained less than ``STUCK_FRACTION`` of what its peers gained over chance. That is the grace
period: nobody is judged while the peers are still near chance themselves. On the CIFAR-10 repro
of docs/training-methods.md the dead member sat at 0.162 against peers at 0.61 (chance 0.167; the
line 0.26). A slow starter is not judged: on 540 digits a plain DE member at 0.13 after one epoch,
peer at 0.28, caught up to 0.45 (peer 0.93) two epochs later; its peer had gone 0.2 of the way.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from training.ensemble import Ensemble
from training.models import create_model

PEER_PROGRESS = 0.25  # peers' share of the way from chance to 1 before anyone is judged
STUCK_FRACTION = 0.2  # stuck: less than this fraction of the peers' gain over chance
REVIVE_SEED_OFFSET = 1_000_003  # keeps the revival seeds apart from the run's own seed


def stuck_members(member_acc: list[float], num_classes: int) -> list[dict[str, Any]]:
    """Members near chance while their peers learn: ``[{member, val_acc, peer_acc, chance}]``."""
    chance = 1.0 / num_classes
    found = []
    for i, acc in enumerate(member_acc):
        peers = member_acc[:i] + member_acc[i + 1 :]
        if not peers:
            return []
        peer = statistics.median(peers)
        gain = peer - chance
        if gain >= PEER_PROGRESS * (1.0 - chance) and acc - chance < STUCK_FRACTION * gain:
            found.append(
                {
                    "member": i,
                    "val_acc": round(acc, 6),
                    "peer_acc": round(peer, 6),
                    "chance": round(chance, 6),
                }
            )
    return found


def revive_seed(seed: int, step: int, member: int) -> int:
    """The seed of member ``member``'s fresh weights at ``step``: a function of the three only."""
    return (seed * REVIVE_SEED_OFFSET + step) * 1009 + member


def reinitialize_member(
    ensemble: Ensemble,
    member: int,
    optimizer: torch.optim.Optimizer,
    cfg: Any,
    num_classes: int,
    step: int,
) -> None:
    """Fresh initial weights for ``member`` (the architecture's own initialisation, built on the
    CPU from ``revive_seed``; the global RNG streams are left as they were) and no momentum."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(revive_seed(cfg.seed, step, member))
        fresh = create_model(
            cfg.arch,
            num_classes=num_classes,
            in_chans=cfg.in_chans,
            saliency_layer=cfg.saliency_layer,
        )
    target = ensemble.members[member]
    # load_state_dict copies in place: the optimizer keeps pointing at the same tensors.
    target.load_state_dict(fresh.state_dict(), strict=True)
    for p in target.parameters():
        optimizer.state.pop(p, None)
