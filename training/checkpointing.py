"""Checkpoints and ``--resume``: what ``last_state.pt`` saves and how a run continues from it.

The files themselves (names, formats, atomic writes) are ``training.run``'s; this module maps a
training run's state onto them and back. A resumed run continues bit-identically: weights,
optimizer (momentum buffers), RNG streams, step, best-so-far, the dead-member guard's memory and
the running loss sums are all restored, and so are the method's auxiliary module and its
optimizer (DICE's discriminator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from sdde_serve.errors import UserError
from training.config import ResolvedConfig
from training.dead_members import Guard
from training.ensemble import Ensemble
from training.progress import Running
from training.run import (
    LAST,
    METRICS,
    keep_metrics_up_to,
    read_weights,
    record_resumed_config,
    save_state,
    save_weights,
    set_rng_state,
)


class Resumable(Protocol):
    """What a checkpoint saves and a resume restores (``training.trainer.Run`` has these)."""

    cfg: ResolvedConfig
    out: Path
    ensemble: Ensemble
    optimizer: torch.optim.Optimizer
    aux: torch.nn.Module | None
    aux_optimizer: torch.optim.Optimizer | None
    step: int
    best: dict[str, Any] | None
    guard: Guard
    running: Running
    elapsed: float

    @property
    def main(self) -> bool: ...


def checkpoint(run: Resumable) -> None:
    """last.safetensors and last_state.pt: what ``--resume`` continues from."""
    save_weights(run.ensemble, run.out / LAST, run.step)
    save_state(
        run.out,
        run.optimizer,
        run.step,
        run.best,
        run.running.to_state(),
        run.elapsed,
        run.cfg,
        aux=aux_state(run.aux, run.aux_optimizer),
        guard=run.guard.to_state(),
    )


def resume_from(run: Resumable, state: dict[str, Any]) -> None:
    """Weights, optimizer, RNG, step, best, the guard and the running sums of ``last_state.pt``."""
    run.ensemble.load_state_dict(read_weights(run.out / LAST), strict=True)
    run.optimizer.load_state_dict(per_member_groups(state["optimizer"], run.optimizer))
    set_rng_state(state["rng"])
    load_aux_state(run.aux, run.aux_optimizer, state)
    run.step, run.best = int(state["step"]), state.get("best")
    run.guard = Guard.from_state(state.get("guard"), run.ensemble.num_members)
    run.running = Running.from_state(state["running"])
    run.elapsed = float(state.get("elapsed_s", 0.0))
    if run.main:
        keep_metrics_up_to(run.out / METRICS, run.step)
        record_resumed_config(run.out, run.cfg)  # e.g. more --epochs: config.json says so


def per_member_groups(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``saved`` (an optimizer state dict) with the one parameter group that checkpoints had
    before each member got its own (2026-12) split like ``optimizer``'s groups; parameter ids
    run in the same order, so the momentum buffers stay with their parameters."""
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != 1 or len(groups) == 1:
        return saved
    (old,) = saved["param_groups"]
    ids, split = iter(old["params"]), []
    for group in groups:
        split.append({**old, "params": [next(ids) for _ in group["params"]]})
    return {**saved, "param_groups": split}


def aux_state(
    aux: torch.nn.Module | None, opt: torch.optim.Optimizer | None
) -> dict[str, Any] | None:
    """The auxiliary module's weights (on the CPU) and optimizer state, for ``last_state.pt``."""
    if aux is None or opt is None:
        return None
    weights = {k: v.detach().cpu() for k, v in aux.state_dict().items()}
    return {"weights": weights, "optimizer": opt.state_dict()}


def load_aux_state(
    aux: torch.nn.Module | None, opt: torch.optim.Optimizer | None, state: dict[str, Any]
) -> None:
    """Restores what ``aux_state`` saved into a resumed run's auxiliary module."""
    saved = state.get("aux")
    if aux is None or opt is None:
        return
    if saved is None:
        raise UserError("--resume: the saved state has no discriminator (not a dice run?)")
    aux.load_state_dict(saved["weights"])
    opt.load_state_dict(saved["optimizer"])
