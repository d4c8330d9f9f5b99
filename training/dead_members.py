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
line 0.26).

Below the line is not yet stuck: a member is judged only once it has trained ``PATIENCE`` times
as many steps as its peers needed to get going (the first epoch end at which some member's peers
were past ``PEER_PROGRESS``), counted from its own (re)initialisation. A snapshot alone killed
slow starters: on the built-in digits (8 steps an epoch) member 0 of seed 2 was at 0.11 after 3
epochs against peers at 0.40, and it reaches 0.96 when left alone; judged then, it was revived,
judged again 8 steps later, and revived every epoch to the end, so the guard itself made the dead
member it was built to prevent. At the last step every member below the line is reported
(``none (last step)``), whatever its age: that is the run's honest end state.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from training.ensemble import Ensemble
from training.models import create_model

PEER_PROGRESS = 0.25  # peers' share of the way from chance to 1 before anyone is judged
STUCK_FRACTION = 0.2  # stuck: less than this fraction of the peers' gain over chance
PATIENCE = 2  # judged after this many times the steps the peers needed to pass PEER_PROGRESS
REVIVE_SEED_OFFSET = 1_000_003  # keeps the revival seeds apart from the run's own seed


def peers_gain(member_acc: list[float], i: int, chance: float) -> float:
    """How far member ``i``'s peers (the median of the others) got above chance."""
    peers = member_acc[:i] + member_acc[i + 1 :]
    return statistics.median(peers) - chance if peers else 0.0


def got_going(gain: float, chance: float) -> bool:
    """Whether peers ``gain`` above chance went ``PEER_PROGRESS`` of the way from chance to 1."""
    return gain >= PEER_PROGRESS * (1.0 - chance)


def stuck_members(member_acc: list[float], num_classes: int) -> list[dict[str, Any]]:
    """Members below the line now (near chance while their peers learn), whatever their age:
    ``[{member, val_acc, peer_acc, chance}]``."""
    chance = 1.0 / num_classes
    found = []
    for i, acc in enumerate(member_acc):
        gain = peers_gain(member_acc, i, chance)
        if got_going(gain, chance) and acc - chance < STUCK_FRACTION * gain:
            found.append(
                {
                    "member": i,
                    "val_acc": round(acc, 6),
                    "peer_acc": round(chance + gain, 6),
                    "chance": round(chance, 6),
                }
            )
    return found


@dataclass
class Guard:
    """What the guard remembers between epoch ends (saved in ``last_state.pt``): the step at
    which the peers first got going, and the step each member was last (re)initialised at."""

    born: list[int]
    ready_step: int | None = None

    @classmethod
    def fresh(cls, members: int) -> Guard:
        return cls(born=[0] * members)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, members: int) -> Guard:
        # a checkpoint written before the guard kept state starts it afresh
        return cls(**state) if state else cls.fresh(members)

    def to_state(self) -> dict[str, Any]:
        return {"born": list(self.born), "ready_step": self.ready_step}

    def revived(self, member: int, step: int) -> None:
        """``member`` got fresh weights at ``step``: its clock (and its learning-rate schedule,
        ``trainer.member_lrs``) restarts. Called on every process."""
        self.born[member] = step

    def judge(
        self, member_acc: list[float], num_classes: int, step: int, last: bool
    ) -> list[dict[str, Any]]:
        """The members stuck at this epoch end, each with its ``action``: ``reinitialized``
        (the caller does it, then calls ``revived``) or, at the ``last`` step, ``none (last
        step)`` for every member below the line. Sets ``ready_step`` the first time some
        member's peers are past ``PEER_PROGRESS`` (only the judging process needs it)."""
        chance = 1.0 / num_classes
        gains = (peers_gain(member_acc, i, chance) for i in range(len(member_acc)))
        if self.ready_step is None and any(got_going(g, chance) for g in gains):
            self.ready_step = step
        below = stuck_members(member_acc, num_classes)
        if last:
            return [{**s, "action": "none (last step)"} for s in below]
        patience = PATIENCE * (self.ready_step or 0)
        stuck = [s for s in below if step - self.born[s["member"]] >= patience]
        return [{**s, "action": "reinitialized"} for s in stuck]


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
