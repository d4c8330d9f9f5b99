"""The trainer: ``train(cfg) -> Path``.

Three parts, in reading order: ``setup`` (data checks, the ensemble and its optimizer, resume)
builds a ``Run``; ``loop`` feeds one typed ``StepBatch`` per step to ``train_step``, which is
the algorithm (loss, backward, gradient average, SGD step); ``end_of_epoch`` evaluates, keeps
the best weights and checkpoints.

One step trains every member at once: the method (``training.methods``) turns a ``StepBatch``
(one batch per member, one shared diversity batch, optional outliers) into a scalar loss; we take
one SGD step (Nesterov momentum, weight decay, per-step cosine learning rate) on all members'
parameters. The batch plan (``training.data``) is a pure function of (seed, stream, step), which
makes resuming, DataLoader workers and DDP sharding reproduce the single-process run.

DDP and the double backward: SDDE differentiates through GradCAM (``autograd.grad`` with
``create_graph=True``), and ``DistributedDataParallel`` supports neither ``autograd.grad`` nor
members called outside its ``forward``. So we do not wrap the ensemble: every process starts
from rank 0's weights, computes the full loss and ``backward()`` on its shard, then gradients
are averaged with one bucketed ``all_reduce`` before ``optimizer.step()`` (and BatchNorm
buffers likewise), which keeps replicas bit-identical. The cost versus DDP is the lost overlap
of communication with the backward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from sdde_serve.data import load_dataset, train_val_split
from sdde_serve.errors import UserError
from training import data as D
from training import registry, saliency
from training.config import ResolvedConfig, TrainConfig
from training.dead_members import reinitialize_member, stuck_members
from training.ensemble import Ensemble, build_ensemble
from training.methods import METHODS, StepBatch
from training.run import (
    BEST,
    LAST,
    METRICS,
    append_metrics,
    check_fresh_out,
    check_same_data,
    keep_metrics_up_to,
    load_resume,
    read_weights,
    record_resumed_config,
    save_state,
    save_weights,
    set_rng_state,
    write_run_header,
)

ALLREDUCE_BUCKET = 1 << 24  # elements per gradient all-reduce call (bounds the extra memory)


def train(cfg: TrainConfig) -> Path:
    """Trains an ensemble as ``cfg`` says; returns the run directory (see docs/training.md)."""
    cfg.validate()
    ctx = setup_distributed(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.close()


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


def _train(cfg: TrainConfig, ctx: DistContext) -> Path:
    run = setup(cfg, ctx)
    if run.step >= run.end_step:
        where = f"the run in {run.out} is at step {run.step} of {run.end_step}"
        log(run.main, f"nothing to do: {where}")
        return run.out
    loop(run)
    return run.out


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

    # --- data: load, split (seeded, recorded), convert to the model's input ------------------
    full = load_dataset(given.data, split="train")
    if full.labels is None:
        raise UserError(f"--data {given.data!r} has no labels; training needs a labelled set")
    cfg = given.resolve(data_channels=full.channels)
    train_idx, val_idx = train_val_split(len(full), cfg.val_fraction, cfg.seed)
    fingerprint = full.fingerprint()
    if state is not None:
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
    plan = batch_plan(cfg, ctx, len(train_t), outliers_t)
    total_steps = cfg.epochs * plan.steps_per_epoch
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # --- the ensemble: members drawn from the seeded RNG, identical on every process ----------
    device = ctx.device
    torch.manual_seed(cfg.seed)
    ensemble = build_ensemble(
        cfg.arch,
        members=cfg.members,
        num_classes=n_classes,
        in_chans=chans,
        mean=mean,
        std=std,
        saliency_layer=cfg.saliency_layer,
        backend=cfg.backend,
        pretrained=None if state is not None else cfg.pretrained,  # a resume loads its own
    )
    use_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (use_cuda and cfg.channels_last) else None
    ensemble.to(device=device, memory_format=memory_format or torch.preserve_format)
    params = [p for p in ensemble.parameters() if p.requires_grad]
    # OpenOOD / the paper: SGD, Nesterov momentum 0.9, weight decay 5e-4 on every parameter.
    optimizer = torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    method = METHODS[cfg.method]
    aux, aux_optimizer = make_aux(method, ensemble, n_classes, train_t.x[:1].to(device), cfg)
    run = Run(
        cfg=cfg,
        ctx=ctx,
        out=out,
        train_t=train_t,
        val_t=val_t,
        train_eval=D.train_eval_subset(train_t, cfg.eval_train_samples, cfg.seed),
        outliers_t=outliers_t,
        plan=plan,
        ensemble=ensemble,
        params=params,
        optimizer=optimizer,
        method=method,
        aux=aux,
        aux_optimizer=aux_optimizer,
        memory_format=memory_format,
        autocast=autocast_for(device, cfg),
        total_steps=total_steps,
        end_step=end_step,
        num_classes=n_classes,
    )

    # --- resume: weights, optimizer, RNG, step and running sums; or write the fresh run ------
    if state is not None:
        resume_from(run, state)
    elif run.main:
        write_run_header(out, cfg, full, fingerprint, val_idx, mean, std, n_classes)
    ctx.broadcast_module(ensemble)  # replicas start identical (no-op on one process)
    if aux is not None:
        ctx.broadcast_module(aux)
    return run


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


def resume_from(run: Run, state: dict[str, Any]) -> None:
    """Weights, optimizer, RNG, step, best and the running sums of ``last_state.pt``."""
    run.ensemble.load_state_dict(read_weights(run.out / LAST), strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    load_aux_state(run.aux, run.aux_optimizer, state)
    run.step, run.best = int(state["step"]), state.get("best")
    run.running = Running(
        dict(state["running"]["sums"]),
        int(state["running"]["count"]),
        dict(state["running"].get("counts") or {}),
    )
    run.elapsed = float(state.get("elapsed_s", 0.0))
    if run.main:
        keep_metrics_up_to(run.out / METRICS, run.step)
        record_resumed_config(run.out, run.cfg)  # e.g. more --epochs: config.json says so


# --- the loop ----------------------------------------------------------------------------------


def loop(run: Run) -> None:
    """Steps ``run.step .. run.end_step - 1``: one ``train_step`` each, an evaluation and a
    checkpoint at each epoch end (and at the last step), a checkpoint on Ctrl-C."""
    cfg, ctx, main = run.cfg, run.ctx, run.main
    device = ctx.device
    dataset = D.StepDataset(run.plan, run.train_t, run.outliers_t)
    loader = D.step_loader(
        dataset, run.step, run.end_step, workers=cfg.workers, pin_memory=device.type == "cuda"
    )
    bar = tqdm(
        total=run.end_step,
        initial=run.step,
        unit="step",
        dynamic_ncols=True,
        # Only rank 0 draws, and only on a terminal (logs stay clean under CI and torchrun).
        disable=not (main and cfg.progress and sys.stderr.isatty()),
    )
    images_per_step = cfg.batch_size * cfg.members  # member batches (the rate in the bar)
    start_step, elapsed0 = run.step, run.elapsed
    log(
        main,
        f"training {cfg.members} x {cfg.arch} with {cfg.method} on {cfg.data}: "
        f"{len(run.train_t)} train / {len(run.val_t)} val images, "
        f"{run.steps_per_epoch} steps per epoch, steps {run.step}..{run.end_step} of "
        f"{run.total_steps}, device {device}, {ctx.world} process(es), augment {run.plan.augment}",
    )
    with StopRequest() as stop:
        t_last = time.perf_counter()
        for cpu_batch in loader:
            # Per-step cosine decay from lr to min_lr over the whole run (no warm-up, as OpenOOD).
            lr = cosine_lr(run.step, run.total_steps, cfg.lr, cfg.min_lr)
            batch = dataclasses.replace(
                cpu_batch.to(device, run.memory_format),
                diversity_scale=diversity_ramp(run.step, run.steps_per_epoch, cfg),
                aux=run.aux,
            )
            shard_terms = train_step(run, batch, lr)
            run.step += 1

            # One small all-reduce: loss terms averaged over processes (= the single-process
            # values of the global batch) and the ranks agreeing on when to stop (Ctrl-C, NaN).
            terms, (stop_now,) = ctx.reduce_step(shard_terms, stop.requested)
            loss_value = terms["loss"]
            run.running.add(terms)
            if not math.isfinite(loss_value):
                raise UserError(
                    f"the loss diverged (loss={loss_value}) at step {run.step}; try a lower --lr "
                    f"(the last checkpoint in {run.out} is kept)"
                )

            now = time.perf_counter()
            run.elapsed += now - t_last
            t_last = now
            if not bar.disable:
                rate = (run.step - start_step) * images_per_step / max(run.elapsed - elapsed0, 1e-9)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False
                )
                bar.update(1)

            if run.step % run.steps_per_epoch == 0 or run.step == run.end_step:
                end_of_epoch(run, lr, bar)
                t_last = time.perf_counter()  # evaluation time is not training time

            if stop_now:
                if main:
                    checkpoint(run)
                bar.close()
                log(
                    main,
                    f"interrupted at step {run.step}: checkpoint saved in {run.out}; "
                    "continue with --resume",
                )
                ctx.barrier()
                raise KeyboardInterrupt
    bar.close()
    best = run.best
    log(
        main,
        f"done: {run.out} (step {run.step}, best ensemble val {cfg.best_metric}: "
        f"{best['value'] if best else float('nan'):.4f})",
    )


def train_step(run: Run, batch: StepBatch, lr: float) -> dict[str, float]:
    """One SGD step of every member (and of the method's auxiliary module); returns the loss
    terms of this process's shard, ``loss`` included."""
    for group in run.optimizer.param_groups:
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


# --- the epoch end: evaluate, keep the best, checkpoint ----------------------------------------


def end_of_epoch(run: Run, lr: float, bar: tqdm) -> None:
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
    record["train"].update(accuracy_only(evaluate(ensemble, run.train_eval, cfg, device)))
    record["val"] = evaluate(ensemble, run.val_t, cfg, device)
    record["val"]["cam_similarity"] = cam_similarity(ensemble, run.val_t, cfg, device)
    run.best, record["best"] = update_best(run.best, record["val"], cfg.best_metric)
    if record["best"]:
        save_weights(ensemble, run.out / BEST, run.step)
    stuck = stuck_members(record["val"].get("member_acc", []), run.num_classes)
    if revive_stuck(run, stuck, epoch_end):
        record["stuck_members"] = stuck
    checkpoint(run)
    append_metrics(run.out / METRICS, record)
    log_epoch(record, cfg.epochs, bar)


def revive_stuck(run: Run, stuck: list[dict[str, Any]], epoch_end: bool) -> bool:
    """Re-initialises the members rank 0 found stuck near chance (training/dead_members.py)
    at a full epoch end before the last step (a member revived then would be exported untrained);
    says so in the log and returns whether any was stuck. Every process takes part."""
    if not epoch_end:
        return False
    n = run.ensemble.num_members
    ids = {s["member"] for s in stuck}
    _, flags = run.ctx.reduce_step({}, *[i in ids for i in range(n)])
    members = [i for i, flag in enumerate(flags) if flag]
    act = run.step < run.end_step
    for s in stuck:
        s["action"] = "reinitialized" if act else "none (last step)"
    for i in members if act else []:
        reinitialize_member(run.ensemble, i, run.optimizer, run.cfg, run.num_classes, run.step)
    for s in stuck:
        log(
            run.main,
            f"member {s['member']} is stuck near chance (val acc {s['val_acc']:.3f}, chance "
            f"{s['chance']:.3f}) while its peers reach {s['peer_acc']:.3f}: {s['action']} "
            f"at step {run.step}",
        )
    return bool(members)


def checkpoint(run: Run) -> None:
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
    )


# --- the protocol: shared batch size, diversity ramp, auxiliary modules ------------------------


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


def aux_state(
    aux: torch.nn.Module | None, opt: torch.optim.Optimizer | None
) -> dict[str, Any] | None:
    if aux is None or opt is None:
        return None
    weights = {k: v.detach().cpu() for k, v in aux.state_dict().items()}
    return {"weights": weights, "optimizer": opt.state_dict()}


def load_aux_state(
    aux: torch.nn.Module | None, opt: torch.optim.Optimizer | None, state: dict[str, Any]
) -> None:
    saved = state.get("aux")
    if aux is None or opt is None:
        return
    if saved is None:
        raise UserError("--resume: the saved state has no discriminator (not a dice run?)")
    aux.load_state_dict(saved["weights"])
    opt.load_state_dict(saved["optimizer"])


# --- learning rate -----------------------------------------------------------------------------


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Cosine from ``lr`` at step 0 to ``min_lr`` at ``total_steps`` (evaluated every step)."""
    progress = min(step / max(1, total_steps), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# --- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def member_logits(ensemble: Ensemble, data: D.Tensors, cfg: TrainConfig, device) -> Tensor:
    """Logits ``[M, N, L]`` (float32, CPU) of every member on ``data`` (eval mode)."""
    chunks = []
    for x, _ in D.eval_batches(data, cfg.eval_batch_size):
        with autocast_for(device, cfg):
            chunks.append(ensemble(x.to(device)).float().cpu())
    if not chunks:
        return torch.empty(0, ensemble.num_members, 0)
    return torch.cat(chunks)


def evaluate(ensemble: Ensemble, data: D.Tensors, cfg: TrainConfig, device) -> dict[str, Any]:
    """Accuracy and NLL of each member and of the ensemble (mean of member probabilities)."""
    if len(data) == 0 or data.y is None:
        return {}
    logits = member_logits(ensemble, data, cfg, device)
    y = data.y
    log_p = torch.log_softmax(logits, dim=-1)  # [M, N, L]
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
    return {k: v for k, v in metrics.items() if k.endswith("acc")}


def cam_similarity(ensemble: Ensemble, data: D.Tensors, cfg: TrainConfig, device) -> float | None:
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


def autocast_for(device: torch.device, cfg: TrainConfig):
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- devices and distributed -------------------------------------------------------------------


def pick_device(flag: str, local_rank: int | None) -> torch.device:
    """``auto`` -> CUDA when present (the process's local GPU under torchrun), else CPU."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cpu":
        return torch.device("cpu")
    if not flag.startswith("cuda"):
        raise UserError(f"unknown --device {flag!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {flag} asked for CUDA, but no CUDA device is available")
    if flag == "cuda" and local_rank is not None:
        flag = f"cuda:{local_rank}"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise UserError(f"bad --device {flag!r}; use cuda or cuda:N") from None
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s)")
    torch.cuda.set_device(device)
    return device


@dataclass
class DistContext:
    """Rank/world of this process and the collectives the loop needs (no-ops on one process)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        if self.world == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def average_gradients(self, params: list[Tensor]) -> None:
        """Mean of the gradients over processes: a sum of per-shard means / world."""
        if self.world == 1:
            return
        for bucket in _buckets(params):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p, g in zip(bucket, grads, strict=True):
                n = g.numel()
                piece = flat[offset : offset + n].view(g.shape)
                if p.grad is None:
                    p.grad = piece.clone()
                else:
                    p.grad.copy_(piece)
                offset += n

    def average_buffers(self, module: torch.nn.Module) -> None:
        """BatchNorm running statistics: the mean over processes.

        Each process updated them with its shard's batch statistics; the mean of the updated
        running means equals the single-process update with the global batch (equal shards).
        """
        if self.world == 1:
            return
        floats = [b for b in module.buffers() if b.is_floating_point()]
        if not floats:
            return
        flat = torch.cat([b.reshape(-1) for b in floats])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for b in floats:
            b.copy_(flat[offset : offset + b.numel()].view(b.shape))
            offset += b.numel()

    def reduce_step(
        self, terms: dict[str, float], *flags: bool
    ) -> tuple[dict[str, float], tuple[bool, ...]]:
        """Loss terms averaged over processes, and each flag true if true on any process."""
        if self.world == 1:
            return terms, tuple(bool(f) for f in flags)
        keys = sorted(terms)
        values = [float(terms[k]) for k in keys] + [float(f) for f in flags]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        out = t.tolist()
        means = {k: out[i] / self.world for i, k in enumerate(keys)}
        return means, tuple(v > 0 for v in out[len(keys) :])

    def replicas_in_sync(self, module: torch.nn.Module) -> bool:
        """All processes hold bit-identical weights (hash of the state dict, gathered)."""
        digest = weights_digest(module)
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, digest)
        return len(set(digests)) == 1

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _buckets(params: list[Tensor]) -> Iterator[list[Tensor]]:
    bucket: list[Tensor] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= ALLREDUCE_BUCKET:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def setup_distributed(device_flag: str) -> DistContext:
    """Single process, or one process of ``torchrun`` (``WORLD_SIZE`` > 1 in the environment).

    NCCL on GPUs, gloo on CPU. A process group initialised by the caller is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext(pick_device(device_flag, None))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_flag, local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(device, dist.get_rank(), dist.get_world_size(), owns)


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --- batches -----------------------------------------------------------------------------------


@dataclass
class Running:
    """Sums of the loss terms since the last record (saved in last_state.pt for exact resume)."""

    sums: dict[str, float] | None = None
    count: int = 0
    # Steps that logged each term: a term computed on some steps only (the diversity term under
    # --diversity-period) is averaged over those steps, not diluted by the others.
    counts: dict[str, int] | None = None

    def add(self, terms: dict[str, float]) -> None:
        self.sums = self.sums or {}
        self.counts = self.counts or {}
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def to_state(self) -> dict[str, Any]:
        return {
            "sums": dict(self.sums or {}),
            "count": self.count,
            "counts": dict(self.counts or {}),
        }

    def means(self) -> dict[str, Any]:
        if not self.count or not self.sums:
            return {}
        counts = self.counts or {}
        return {k: round(v / counts.get(k, self.count), 6) for k, v in self.sums.items()}


# --- stop requests (Ctrl-C) --------------------------------------------------------------------


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to stop after the current step and checkpoint;
    a second one interrupts at once. Handlers are restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be set from the main thread (tests may train in others).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- logging -----------------------------------------------------------------------------------


def log(main: bool, message: str) -> None:
    if main:
        tqdm.write(message, file=sys.stderr)


def log_epoch(record: dict[str, Any], epochs: int, bar: tqdm) -> None:
    val = record.get("val", {})
    cam = val.get("cam_similarity")
    parts = [
        f"epoch {record['epoch']:g}/{epochs}",
        f"step {record['step']}",
        f"loss {record['train'].get('loss', float('nan')):.4f}",
        f"val acc {val.get('ensemble_acc', float('nan')):.4f}",
        f"val nll {val.get('ensemble_nll', float('nan')):.4f}",
    ]
    if cam is not None:
        parts.append(f"cam sim {cam:.4f}")
    if record.get("best"):
        parts.append("(best)")
    tqdm.write("  ".join(parts), file=sys.stderr)
