"""The trainer: ``train(cfg) -> Path``.

Three parts, in reading order: ``setup`` (data checks, the ensemble and its optimizer, resume)
builds a ``Run``; ``loop`` feeds one typed ``StepBatch`` per step to ``train_step``, which is
the algorithm (loss, backward, gradient average, SGD step); ``end_of_epoch`` validates, keeps
the best weights and checkpoints.

One step trains every member at once: the method (``training.methods``) turns a ``StepBatch``
(one batch per member, one shared diversity batch, optional outliers) into a scalar loss; we take
one SGD step (Nesterov momentum, weight decay, per-step cosine learning rate) on all members'
parameters. The batch plan (``training.data``) is a pure function of (seed, stream, step), which
makes resuming, DataLoader workers and DDP sharding reproduce the single-process run.

The rest lives next door: ``training.distributed`` (devices, the process group, gradient
averaging; why not ``DistributedDataParallel``), ``training.validation`` (the per-epoch
metrics, the best checkpoint), ``training.checkpointing`` (``last_state.pt``, ``--resume``),
``training.interrupt`` (Ctrl-C) and ``training.progress`` (running means, bar, log lines).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdde_serve.data import ArrayDataset, load_dataset, train_val_split
from sdde_serve.errors import UserError
from training import data as D
from training import registry
from training.checkpointing import checkpoint, resume_from
from training.config import ResolvedConfig, TrainConfig
from training.dead_members import Guard, reinitialize_member
from training.distributed import DistContext, autocast_for, setup_distributed
from training.ensemble import Ensemble, build_ensemble
from training.interrupt import CheckpointedStop, StopRequest
from training.methods import METHODS, StepBatch
from training.progress import Running, StepBar, log, log_epoch
from training.run import (
    BEST,
    METRICS,
    append_metrics,
    check_fresh_out,
    check_same_data,
    load_resume,
    save_weights,
    write_run_header,
)
from training.validation import accuracy_only, cam_similarity, update_best, validate


def train(cfg: TrainConfig) -> Path:
    """Trains an ensemble as ``cfg`` says; returns the run directory (see docs/training.md)."""
    cfg.validate()
    ctx = setup_distributed(cfg.device)
    together = False  # every process got here in step: the group can be torn down
    try:
        run = setup(cfg, ctx)
        if run.step >= run.end_step:
            where = f"the run in {run.out} is at step {run.step} of {run.end_step}"
            log(run.main, f"nothing to do: {where}")
        else:
            loop(run)
        together = True
        return run.out
    except CheckpointedStop:
        together = True  # raised on every process after a barrier (stop_at_checkpoint)
        raise
    finally:
        ctx.close(together)


@dataclass
class Run:
    """Everything the loop works with, built once by ``setup``; ``step``, ``best``, ``running``
    and ``elapsed`` change as it trains (and are what a checkpoint saves)."""

    cfg: ResolvedConfig
    ctx: DistContext
    out: Path
    # data
    train_t: D.Tensors
    val_t: D.Tensors
    train_eval: D.Tensors  # a fixed unaugmented train subset for the per-epoch train accuracy
    outliers_t: D.Tensors | None
    plan: D.Plan
    # model and optimisation
    ensemble: Ensemble
    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    method: Any  # the loss (training.methods): the other half of the algorithm
    aux: torch.nn.Module | None  # DICE's discriminator: its own optimizer, never exported
    aux_optimizer: torch.optim.Optimizer | None
    memory_format: torch.memory_format | None
    autocast: Any  # bf16 autocast on CUDA with --amp, else a no-op context
    # schedule and progress
    total_steps: int  # the cosine schedule spans all epochs
    end_step: int  # --max-steps may stop earlier
    num_classes: int
    guard: Guard  # the dead-member guard's memory (training/dead_members.py)
    step: int = 0
    best: dict[str, Any] | None = None
    running: Running = field(default_factory=lambda: Running())
    elapsed: float = 0.0

    @property
    def main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch


# --- setup: data, model, optimizer, resume -----------------------------------------------------


def setup(given: TrainConfig, ctx: DistContext) -> Run:
    """Checks and loads the data, builds the ensemble and its optimizer, then resumes the
    recorded run or writes the fresh run's header. The order of the seeded steps is fixed:
    resuming replays it to restore the same RNG streams."""
    out = Path(given.out)
    state: dict[str, Any] | None = None
    if given.resume:
        given, state = load_resume(given, out)
    else:
        check_fresh_out(out)
    ctx.barrier()  # every process checked `out` before rank 0 writes into it
    cfg, data = load_data(given, out, resuming=state is not None)
    plan = batch_plan(cfg, ctx, len(data.train_t), data.outliers_t)
    total_steps = cfg.epochs * plan.steps_per_epoch

    ensemble, memory_format = build_model(cfg, data, ctx.device, resuming=state is not None)
    optimizer, params = make_optimizer(ensemble, cfg)
    method = METHODS[cfg.method]
    sample = data.train_t.x[:1].to(ctx.device)
    aux, aux_optimizer = make_aux(method, ensemble, data.num_classes, sample, cfg)
    run = Run(
        cfg=cfg,
        ctx=ctx,
        out=out,
        train_t=data.train_t,
        val_t=data.val_t,
        train_eval=D.train_eval_subset(data.train_t, cfg.eval_train_samples, cfg.seed),
        outliers_t=data.outliers_t,
        plan=plan,
        ensemble=ensemble,
        params=params,
        optimizer=optimizer,
        method=method,
        aux=aux,
        aux_optimizer=aux_optimizer,
        memory_format=memory_format,
        autocast=autocast_for(ctx.device, cfg),
        total_steps=total_steps,
        end_step=min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps,
        num_classes=data.num_classes,
        guard=Guard.fresh(cfg.members),
    )
    if state is not None:  # weights, optimizer, RNG, step and running sums
        resume_from(run, state)
    elif run.main:
        header = (data.full, data.fingerprint, data.val_idx, data.mean, data.std, data.num_classes)
        write_run_header(out, cfg, *header)
    ctx.broadcast_module(ensemble)  # replicas start identical (no-op on one process)
    if aux is not None:
        ctx.broadcast_module(aux)
    return run


def make_optimizer(ensemble: Ensemble, cfg: ResolvedConfig) -> tuple[torch.optim.SGD, list[Tensor]]:
    """OpenOOD / the paper: SGD, Nesterov momentum 0.9, weight decay 5e-4 on every parameter.
    One parameter group per member, so that a member the dead-member guard revives gets a
    schedule of its own (``member_lrs``); the flat list serves the gradient average and
    clipping."""
    groups = [[p for p in m.parameters() if p.requires_grad] for m in ensemble.members]
    optimizer = torch.optim.SGD(
        [{"params": group} for group in groups],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    return optimizer, [p for group in groups for p in group]


@dataclass
class Data:
    """The run's data as ``load_data`` checked and converted it."""

    full: ArrayDataset  # the labelled set as loaded: its fingerprint and split are recorded
    fingerprint: str
    val_idx: np.ndarray
    train_t: D.Tensors
    val_t: D.Tensors
    outliers_t: D.Tensors | None
    mean: list[float]  # per channel, of the training inputs
    std: list[float]
    num_classes: int


def load_data(given: TrainConfig, out: Path, *, resuming: bool) -> tuple[ResolvedConfig, Data]:
    """Loads, checks and splits the training data (seeded, recorded), converts it to the
    model's input, and resolves the config (its defaults depend on the data's channels)."""
    full = load_dataset(given.data, split="train")
    if full.labels is None:
        raise UserError(f"--data {given.data!r} has no labels; training needs a labelled set")
    cfg = given.resolve(data_channels=full.channels)
    train_idx, val_idx = train_val_split(len(full), cfg.val_fraction, cfg.seed)
    fingerprint = full.fingerprint()
    if resuming:
        check_same_data(out, full, fingerprint)
    size, chans = cfg.input_size, cfg.in_chans
    train_t = D.to_tensors(full.subset(train_idx), chans, size)
    val_t = D.to_tensors(full.subset(val_idx), chans, size)
    # Normalisation statistics of the training inputs; they live inside the ensemble (and the
    # ONNX graph), so every interface takes [0, 1] pixels.
    mean, std = D.channel_stats(train_t.x)
    outliers_t = None
    if cfg.outliers:
        outliers_t = D.to_tensors(load_dataset(cfg.outliers, split="train"), chans, size)
        if len(outliers_t) == 0:
            raise UserError(f"--outliers {cfg.outliers!r} holds no images")
    n_classes = len(full.classes) if full.classes else int(full.labels.max()) + 1
    if int(full.labels.min()) < 0 or int(full.labels.max()) >= n_classes:
        raise UserError(f"--data {cfg.data!r}: labels outside 0..{n_classes - 1}")
    data = Data(full, fingerprint, val_idx, train_t, val_t, outliers_t, mean, std, n_classes)
    return cfg, data


def build_model(
    cfg: ResolvedConfig, data: Data, device: torch.device, *, resuming: bool
) -> tuple[Ensemble, torch.memory_format | None]:
    """The ensemble on ``device``: members drawn from the seeded RNG, identical on every
    process (a resume then loads its own weights instead of ``--pretrained``)."""
    torch.manual_seed(cfg.seed)
    ensemble = build_ensemble(
        cfg.arch,
        members=cfg.members,
        num_classes=data.num_classes,
        in_chans=cfg.in_chans,
        mean=data.mean,
        std=data.std,
        saliency_layer=cfg.saliency_layer,
        backend=cfg.backend,
        pretrained=None if resuming else cfg.pretrained,
    )
    use_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (use_cuda and cfg.channels_last) else None
    ensemble.to(device=device, memory_format=memory_format or torch.preserve_format)
    return ensemble, memory_format


def batch_plan(cfg: ResolvedConfig, ctx: DistContext, n_train: int, outliers: D.Tensors | None):
    """Per-member orders, the shared diversity batch and outliers, for this process's shard."""
    if cfg.batch_size % ctx.world:
        raise UserError(
            f"--batch-size {cfg.batch_size} must be divisible by the {ctx.world} processes"
        )
    plan = D.Plan(
        seed=cfg.seed,
        members=cfg.members,
        batch_size=cfg.batch_size,
        n_train=n_train,
        augment=D.choose_augment(cfg.augment, cfg.in_chans, cfg.input_size),
        outlier_batch_size=cfg.outlier_batch_size,
        n_outliers=len(outliers) if outliers is not None else 0,
        rank=ctx.rank,
        world=ctx.world,
        shared_size=shared_batch_size(cfg),
        shared_source=cfg.shared_source,
        diversity_period=cfg.diversity_period,
    )
    if plan.shared_batch_size % ctx.world:
        raise UserError(
            f"the shared batch ({plan.shared_batch_size} images, --shared-batch "
            f"{cfg.shared_batch}) must be divisible by the {ctx.world} processes"
        )
    if outliers is not None and plan.outlier_batch_size % ctx.world:
        raise UserError("--outlier-batch-size must be divisible by the number of processes")
    return plan


def make_aux(
    method: Any, ensemble: Ensemble, n_classes: int, sample: Tensor, cfg: TrainConfig
) -> tuple[torch.nn.Module | None, torch.optim.Optimizer | None]:
    """The method's auxiliary module (DICE's discriminator) and its optimizer, else Nones.

    RMSprop with the members' momentum and weight decay, constant learning rate: the official
    DICE setting.
    """
    build = getattr(method, "make_aux", None)
    if build is None:
        return None, None
    aux = build(ensemble, n_classes, sample).to(sample.device)
    opt = torch.optim.RMSprop(
        aux.parameters(),
        lr=cfg.discriminator_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    return aux, opt


# --- the loop ----------------------------------------------------------------------------------


def loop(run: Run) -> None:
    """Steps ``run.step .. run.end_step - 1``: one ``train_step`` each, a validation and a
    checkpoint at each epoch end (and at the last step), a checkpoint on Ctrl-C."""
    cfg, ctx, main = run.cfg, run.ctx, run.main
    dataset = D.StepDataset(run.plan, run.train_t, run.outliers_t)
    pin = ctx.device.type == "cuda"
    loader = D.step_loader(dataset, run.step, run.end_step, workers=cfg.workers, pin_memory=pin)
    bar = StepBar(
        run.step,
        run.end_step,
        cfg.batch_size * cfg.members,  # member batches: the rate the bar shows
        run.elapsed,
        enabled=main and cfg.progress and sys.stderr.isatty(),
    )
    log(
        main,
        f"training {cfg.members} x {cfg.arch} with {cfg.method} on {cfg.data}: "
        f"{len(run.train_t)} train / {len(run.val_t)} val images, "
        f"{run.steps_per_epoch} steps per epoch, steps {run.step}..{run.end_step} of "
        f"{run.total_steps}, device {ctx.device}, {ctx.world} process(es), "
        f"augment {run.plan.augment}",
    )
    with StopRequest() as stop:
        t_last = time.perf_counter()
        for cpu_batch in loader:
            # Per-step cosine decay from lr to min_lr over the whole run (no warm-up, as OpenOOD).
            lr = cosine_lr(run.step, run.total_steps, cfg.lr, cfg.min_lr)
            batch = dataclasses.replace(
                cpu_batch.to(ctx.device, run.memory_format),
                diversity_scale=diversity_ramp(run.step, run.steps_per_epoch, cfg),
                aux=run.aux,
            )
            shard_terms = train_step(run, batch, member_lrs(run))
            run.step += 1

            # One small all-reduce: loss terms averaged over processes (= the single-process
            # values of the global batch) and the ranks agreeing on when to stop (Ctrl-C, NaN).
            terms, (stop_now,) = ctx.reduce_step(shard_terms, stop.requested)
            loss = terms["loss"]
            run.running.add(terms)
            if not math.isfinite(loss):
                raise UserError(
                    f"the loss diverged (loss={loss}) at step {run.step}; try a lower --lr "
                    f"(the last checkpoint in {run.out} is kept)"
                )
            now = time.perf_counter()
            run.elapsed += now - t_last
            t_last = now
            bar.update(run.step, run.elapsed, loss, lr)

            if run.step % run.steps_per_epoch == 0 or run.step == run.end_step:
                end_of_epoch(run, lr)
                t_last = time.perf_counter()  # validation time is not training time
            if stop_now:
                stop_at_checkpoint(run, bar)
    bar.close()
    best = run.best["value"] if run.best else float("nan")
    log(main, f"done: {run.out} (step {run.step}, best ensemble val {cfg.best_metric}: {best:.4f})")


def stop_at_checkpoint(run: Run, bar: StepBar) -> None:
    """A stop was asked for (Ctrl-C on some process): rank 0 checkpoints, then every process
    raises ``CheckpointedStop`` (a ``KeyboardInterrupt``) together (``--resume`` continues from
    that step)."""
    if run.main:
        checkpoint(run)
    bar.close()
    log(
        run.main,
        f"interrupted at step {run.step}: checkpoint saved in {run.out}; continue with --resume",
    )
    run.ctx.barrier()
    raise CheckpointedStop


def train_step(run: Run, batch: StepBatch, lrs: list[float]) -> dict[str, float]:
    """One SGD step of every member (member ``i`` at learning rate ``lrs[i]``) and of the
    method's auxiliary module; returns the loss terms of this process's shard, ``loss``
    included."""
    for group, lr in zip(run.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    run.ensemble.train()
    with run.autocast:
        loss, terms = run.method.loss(run.ensemble, batch, run.cfg)
    run.optimizer.zero_grad(set_to_none=True)
    if run.aux_optimizer is not None:
        run.aux_optimizer.zero_grad(set_to_none=True)
    # One backward serves the members and the discriminator (DICE detaches what each must not
    # train); the gradient average makes every process take the single-process step.
    loss.backward()
    run.ctx.average_gradients(run.params)
    clip = run.cfg.grad_clip
    if clip:
        torch.nn.utils.clip_grad_norm_(run.params, clip)
    run.optimizer.step()
    if run.aux is not None and run.aux_optimizer is not None:
        aux_params = list(run.aux.parameters())
        run.ctx.average_gradients(aux_params)
        if clip:  # the official code clips the discriminator's too
            torch.nn.utils.clip_grad_norm_(aux_params, clip)
        run.aux_optimizer.step()
    run.ctx.average_buffers(run.ensemble)  # BatchNorm running stats of all shards
    return {**terms, "loss": float(loss.detach())}


# --- the epoch end: validate, keep the best, checkpoint -------------------------------------


def end_of_epoch(run: Run, lr: float) -> None:
    """Appends the epoch's record to metrics.jsonl (train means, validation metrics, CAM
    similarity), saves best/last weights and the resumable state (rank 0 only)."""
    epoch_end = run.step % run.steps_per_epoch == 0
    record: dict[str, Any] = {
        "epoch": round(run.step / run.steps_per_epoch, 4),
        "step": run.step,
        "lr": lr,
        "time_s": round(run.elapsed, 3),
        "train": run.running.means(),
    }
    if epoch_end:  # a max_steps stop mid-epoch keeps summing into the epoch's record
        run.running = Running()
    if run.ctx.world > 1:
        record["replicas_in_sync"] = run.ctx.replicas_in_sync(run.ensemble)
    if not run.main:
        revive_stuck(run, [], epoch_end)  # rank 0 judges; the others follow its verdict
        return
    cfg, device, ensemble = run.cfg, run.ctx.device, run.ensemble
    ensemble.eval()
    record["train"].update(accuracy_only(validate(ensemble, run.train_eval, cfg, device)))
    record["val"] = validate(ensemble, run.val_t, cfg, device)
    record["val"]["cam_similarity"] = cam_similarity(ensemble, run.val_t, cfg, device)
    run.best, record["best"] = update_best(run.best, record["val"], cfg.best_metric)
    if record["best"]:
        save_weights(ensemble, run.out / BEST, run.step)
    member_acc = record["val"].get("member_acc", [])
    last = run.step >= run.end_step
    stuck = run.guard.judge(member_acc, run.num_classes, run.step, last) if epoch_end else []
    revive_stuck(run, stuck, epoch_end)
    if stuck:
        record["stuck_members"] = stuck
    checkpoint(run)
    append_metrics(run.out / METRICS, record)
    log_epoch(record, cfg.epochs)


def revive_stuck(run: Run, stuck: list[dict[str, Any]], epoch_end: bool) -> None:
    """Re-initialises the members rank 0's guard judged stuck (training/dead_members.py; at
    the last step it only reports them: a member revived then would be exported untrained)
    and says so in the log. Every process takes part."""
    if not epoch_end:
        return
    n = run.ensemble.num_members
    revive = {s["member"] for s in stuck if s["action"] == "reinitialized"}
    _, flags = run.ctx.reduce_step({}, *[i in revive for i in range(n)])
    for i in [i for i, flag in enumerate(flags) if flag]:
        reinitialize_member(run.ensemble, i, run.optimizer, run.cfg, run.num_classes, run.step)
        run.guard.revived(i, run.step)
    for s in stuck:
        log(
            run.main,
            f"member {s['member']} is stuck near chance (val acc {s['val_acc']:.3f}, chance "
            f"{s['chance']:.3f}) while its peers reach {s['peer_acc']:.3f}: {s['action']} "
            f"at step {run.step}",
        )


# --- the schedules: learning rate, shared batch size, diversity ramp ---------------------------


def member_lrs(run: Run) -> list[float]:
    """Each member's learning rate at ``run.step``: the run's cosine over the member's own life,
    from its (re)initialisation to the end. A member never revived (born at step 0) follows the
    run's schedule; a revived one starts again from ``--lr``, as a fresh member needs to."""
    cfg = run.cfg
    return [
        cosine_lr(run.step - born, run.total_steps - born, cfg.lr, cfg.min_lr)
        for born in run.guard.born
    ]


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Cosine from ``lr`` at step 0 to ``min_lr`` at ``total_steps`` (evaluated every step)."""
    progress = min(step / max(1, total_steps), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def shared_batch_size(cfg: TrainConfig) -> int:
    """Images in the diversity batch: ``--shared-batch`` of the member batch, at least one."""
    return max(1, round(cfg.batch_size * cfg.shared_batch))


def diversity_ramp(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Factor on the diversity weight at ``step``: a linear ramp from 0 over the warm-up epochs
    (the method's registry entry names the field: ``--lambda-warmup-epochs`` for sdde,
    ``--dice-rampup-epochs`` for dice), then 1."""
    epochs = float(getattr(cfg, registry.spec(cfg.method).ramp))
    if epochs <= 0:
        return 1.0
    return min(1.0, step / (epochs * steps_per_epoch))
