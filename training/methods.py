"""Training methods: one loss per ``--method``, in a registry.

Every method maps ``(ensemble, StepBatch, cfg)`` to ``(scalar loss, {name: float})``. ``cfg`` is
any object with the fields used here (``TrainConfig`` in training; a namespace in tests):
``lambda_div``, ``beta_oe``, ``saliency``, ``diversity_bn``, ``adv_eps``; the baselines' own
weights (``ncl_weight``, ``adp_weight``, ...) are read with ``option``: from attributes of that
name or from a dict ``cfg.extra``, else the method's defaults in its registry entry.

The registry itself (traits, hyper-parameter names, which class is whose loss) is torch-free and
lives in training/registry.py; ``METHODS`` here maps each registered name to its loss object.

Reductions: cross-entropy is the mean over samples of each member, then the mean over members
("mean CE"), so the loss scale does not grow with the ensemble size and one learning rate fits
every N. Diversity terms are means over member pairs and samples for the same reason.

| method   | loss |
|----------|------|
| de       | mean CE, each member on its own batch |
| sdde     | mean CE + λ·L_div (Algorithm 1; L_div on the shared batch) |
| oe       | mean CE + β·L_OE (outlier batch) |
| sdde-oe  | mean CE + λ·L_div + β·L_OE, both on the outlier batch, pseudo-labels (Algorithm 2) |
| ncl      | mean CE + w·NCL penalty, all members on the shared batch |
| dice     | mean CE + w·DICE redundancy (+ the discriminator's own loss), shared batch |
| adp      | mean CE + w·(−α·H(ensemble) − β·log det), all members on the shared batch |
| de-adv   | mean CE + mean CE on FGSM samples (Lakshminarayanan et al.) |

See docs/training-methods.md for the formulas and the measured choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdde_serve.errors import UserError
from training import registry
from training.ensemble import Ensemble, batchnorm_mode
from training.saliency import (
    Pairs,
    diversity_loss,
    diversity_similarity,
    pair_members,
    saliency_maps,
    sample_pairs,
)


@dataclass
class StepBatch:
    """What one optimizer step sees. Pixels in [0, 1], labels int64."""

    member_batches: list[tuple[Tensor, Tensor]]  # per-member (x01, y) for cross-entropy
    # One batch seen by all members (diversity term); None on a step that skips the term
    # (--diversity-period).
    shared: tuple[Tensor, Tensor] | None
    outliers: Tensor | None = None  # unlabeled OOD batch (oe, sdde-oe)
    # Factor on the diversity weight at this step (λ warm-up, DICE ramp-up); 1 = full weight.
    diversity_scale: float = 1.0
    # The method's auxiliary module, if it has one (DICE's discriminator); never exported.
    aux: nn.Module | None = None
    # The global step this batch trains (set by the batch plan; None for a hand-built batch):
    # with the run's seed it draws --diversity-pairs' member pairs.
    step: int | None = None

    def to(self, device: torch.device, memory_format: torch.memory_format | None) -> StepBatch:
        """The images and labels on ``device`` (images in ``memory_format`` when given)."""

        def move(x: Tensor) -> Tensor:
            x = x.to(device, non_blocking=True)
            return x if memory_format is None else x.contiguous(memory_format=memory_format)

        def pair(xy: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return move(xy[0]), xy[1].to(device, non_blocking=True)

        return dataclasses.replace(
            self,
            member_batches=[pair(xy) for xy in self.member_batches],
            shared=None if self.shared is None else pair(self.shared),
            outliers=None if self.outliers is None else move(self.outliers),
        )

    def pin_memory(self) -> StepBatch:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``)."""
        return dataclasses.replace(
            self,
            member_batches=[(x.pin_memory(), y.pin_memory()) for x, y in self.member_batches],
            shared=None if self.shared is None else tuple(t.pin_memory() for t in self.shared),
            outliers=None if self.outliers is None else self.outliers.pin_memory(),
        )


class Method(Protocol):
    name: str

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]: ...


# λ for 28x28 gray data, chosen on validation OOD at 20 epochs on 3 seeds with the default dose
# (docs/training-methods.md, "λ at convergence"); the paper's MNIST value was 0.1.
GRAY28_LAMBDA = 1.0


def default_lambda(channels: int, size: int | tuple[int, int] | torch.Size) -> float:
    """The diversity weight: ``GRAY28_LAMBDA`` for 28x28 single-channel data (MNIST-like), else
    the paper's 0.005 (its CIFAR value; not tuned here)."""
    hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    return GRAY28_LAMBDA if channels == 1 and hw == (28, 28) else 0.005


def option(cfg: Any, name: str, method: str) -> float:
    """A method's hyper-parameter: ``cfg.<name>``, else ``cfg.extra[name]``, else the default in
    ``method``'s registry entry (a KeyError there is a method that forgot to declare it)."""
    value = getattr(cfg, name, None)
    if value is None:
        value = (getattr(cfg, "extra", None) or {}).get(name)
    return float(registry.spec(method).defaults[name] if value is None else value)


def diversity_weight(cfg: Any, x: Tensor) -> float:
    lam = getattr(cfg, "lambda_div", None)
    return default_lambda(x.shape[1], x.shape[-2:]) if lam is None else float(lam)


# The user's choices are checked once, by TrainConfig.validate(); a namespace cfg in a test that
# lacks them gets the config defaults.
def _saliency_kind(cfg: Any) -> str:
    return str(getattr(cfg, "saliency", "gradcam"))


def _bn_mode(cfg: Any) -> str:
    return str(getattr(cfg, "diversity_bn", "eval"))


def member_ce(ensemble: Ensemble, batch: StepBatch) -> Tensor:
    """Mean over members of each member's mean cross-entropy on its own batch."""
    if len(batch.member_batches) != ensemble.num_members:
        raise ValueError(
            f"StepBatch has {len(batch.member_batches)} member batches for "
            f"{ensemble.num_members} members"
        )
    logits = ensemble.forward_each([x for x, _ in batch.member_batches])
    losses = [F.cross_entropy(z, y) for z, (_, y) in zip(logits, batch.member_batches, strict=True)]
    return torch.stack(losses).mean()


def shared_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean CE over members of ``logits [B, N, L]`` against the same labels ``y [B]``."""
    b, n, num_classes = logits.shape
    # Row b*N + i holds member i on sample b, hence each label repeated N times in a row.
    return F.cross_entropy(logits.reshape(b * n, num_classes), y.repeat_interleave(n))


def oe_loss(logits: Tensor) -> Tensor:
    """Outlier Exposure: mean over outliers and members of (logsumexp z − mean z).

    It is the cross-entropy to the uniform distribution up to the constant log L: zero exactly
    when a member's logits are all equal on the outlier.
    """
    return (torch.logsumexp(logits, dim=-1) - logits.mean(dim=-1)).mean()


def ncl_penalty(logits: Tensor) -> Tensor:
    """Negative correlation: mean over pairs i<j and samples of (p_i − p̄)·(p_j − p̄).

    ``p̄`` (member-averaged probabilities) is detached as in Liu & Yao and the official code: each
    member is pushed away from the ensemble mean, the mean itself is not a training target.
    Since sum_{j≠i} (p_j − p̄) = −(p_i − p̄), minimising it spreads the members apart.
    """
    probs = logits.softmax(-1)
    dev = probs - probs.mean(dim=1, keepdim=True).detach()  # [B, N, L]
    n = dev.shape[1]
    gram = dev @ dev.transpose(1, 2)
    i, j = torch.triu_indices(n, n, offset=1, device=logits.device)
    return gram[:, i, j].mean()


def adp_terms(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """ADP (Pang et al. 2019): ensemble entropy H and log-det of the non-maximal predictions.

    Non-maximal predictions: each member's probabilities without the true class, L2-normalised;
    ``log det(M^T M + 1e-5 I)`` (the official jitter keeps it finite when N > L − 1) averaged over
    the batch. Both terms are to be maximised.
    """
    b, n, num_classes = logits.shape
    probs = logits.softmax(-1)
    keep = ~F.one_hot(y, num_classes).bool()  # [B, L]
    alt = probs.masked_select(keep[:, None, :]).view(b, n, num_classes - 1)
    alt = alt / (alt.norm(dim=-1, keepdim=True) + 1e-6)
    gram = alt @ alt.transpose(1, 2) + 1e-5 * torch.eye(n, dtype=alt.dtype, device=alt.device)
    log_det = torch.logdet(gram).mean()
    mean_p = probs.mean(dim=1)
    entropy = -(mean_p * (mean_p + 1e-20).log()).sum(-1).mean()
    return entropy, log_det


def cam_log(maps: Tensor, kind: str, pairs: Pairs | None = None) -> dict[str, float]:
    """The official CAM similarity of the step's GradCAM maps (the logged metric; the loss is the
    bounded ``diversity_loss``, which differs from it only on near-constant maps); over the
    step's ``pairs`` when the term was computed on some pairs only (an unbiased estimate)."""
    if kind != "gradcam":
        return {}
    return {"cam_similarity": float(diversity_similarity(maps.detach(), kind, pairs))}


def step_pairs(cfg: Any, batch: StepBatch, members: int) -> list[tuple[int, int]] | None:
    """The member pairs of this step's diversity term (None: all), drawn from ``cfg.seed`` and
    the batch's global step (``--diversity-pairs``; ``saliency.sample_pairs``)."""
    count = int(option(cfg, "diversity_pairs", "sdde"))
    if count == 0:
        return None
    if batch.step is None:
        raise ValueError("--diversity-pairs draws pairs per step: the StepBatch needs its step")
    return sample_pairs(members, count, int(getattr(cfg, "seed", 0)), batch.step)


def _shared(batch: StepBatch, name: str) -> tuple[Tensor, Tensor]:
    if batch.shared is None:
        raise ValueError(f"--method {name} trains on the shared batch, but the step has none")
    return batch.shared


def _outliers(batch: StepBatch, name: str) -> Tensor:
    if batch.outliers is None:
        raise UserError(f"--method {name} needs an outlier batch (--outliers SPEC)")
    return batch.outliers


def _logs(**terms: Tensor | float) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in terms.items()}


# --------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class DeepEnsemble:
    name: str = "de"

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        ce = member_ce(ensemble, batch)
        return ce, _logs(loss=ce, ce=ce)


@dataclass(frozen=True)
class SDDE:
    """Algorithm 1: mean CE on the members' own batches + λ·L_div on one shared batch.

    The shared batch runs through all members in ``cfg.diversity_bn`` mode ("eval" like the
    official code: BatchNorm on running statistics, which also keeps each sample's GradCAM its
    own; see docs). ``create_graph=True`` keeps the map differentiable (double backward).
    """

    name: str = "sdde"

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        kind = _saliency_kind(cfg)
        ce = member_ce(ensemble, batch)
        if batch.shared is None or batch.diversity_scale == 0:
            # --diversity-period: this step is cross-entropy only (the official trainer's
            # apply_diversity=False); the logged lambda says so
            return ce, _logs(loss=ce, ce=ce, lambda_div=0.0, diversity_step=0.0)
        x, y = batch.shared
        lam = diversity_weight(cfg, x) * batch.diversity_scale
        pairs = step_pairs(cfg, batch, ensemble.num_members)
        # --diversity-pairs: maps (and their double backward) only for the drawn pairs' members
        used, local = (None, None) if pairs is None else pair_members(pairs)
        with batchnorm_mode(ensemble, _bn_mode(cfg)):
            maps, _ = saliency_maps(ensemble, x, y, kind=kind, create_graph=True, members=used)
        div = diversity_loss(maps, kind, local)
        loss = ce + lam * div
        logs = _logs(loss=loss, ce=ce, div=div, lambda_div=lam, diversity_step=1.0)
        return loss, {**logs, **cam_log(maps, kind, local)}


@dataclass(frozen=True)
class OutlierExposure:
    """An ensemble of OE models: mean CE + β·L_OE on the unlabeled outlier batch.

    The outlier pass uses ``cfg.diversity_bn`` like every auxiliary pass of the official trainer.
    """

    name: str = "oe"

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        xo = _outliers(batch, self.name)
        ce = member_ce(ensemble, batch)
        with batchnorm_mode(ensemble, _bn_mode(cfg)):
            oe = oe_loss(ensemble(xo))
        beta = float(cfg.beta_oe)
        loss = ce + beta * oe
        return loss, _logs(loss=loss, ce=ce, oe=oe)


@dataclass(frozen=True)
class SDDEOutlierExposure:
    """Algorithm 2: mean CE + λ·L_div + β·L_OE, the last two on the outlier batch.

    Outliers have no labels: GradCAM takes the ensemble's predicted class (pseudo-label, detached),
    as the official code does. One pass over the outliers serves both terms.
    """

    name: str = "sdde-oe"

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        kind = _saliency_kind(cfg)
        xo = _outliers(batch, self.name)
        ce = member_ce(ensemble, batch)
        lam = diversity_weight(cfg, xo)
        with batchnorm_mode(ensemble, _bn_mode(cfg)):
            maps, logits = saliency_maps(ensemble, xo, None, kind=kind, create_graph=True)
        div = diversity_loss(maps, kind)
        oe = oe_loss(logits)
        beta = float(cfg.beta_oe)
        loss = ce + lam * div + beta * oe
        logs = _logs(loss=loss, ce=ce, div=div, oe=oe, lambda_div=lam)
        return loss, {**logs, **cam_log(maps, kind)}


@dataclass(frozen=True)
class NegativeCorrelation:
    """NCL: all members on the shared batch (as in the paper and the official config,
    ``same_batch: True``): mean CE + w·ncl_penalty from the same forward, in the current mode."""

    name: str = "ncl"

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        x, y = _shared(batch, self.name)
        logits = ensemble(x)
        ce = shared_ce(logits, y)
        ncl = ncl_penalty(logits)
        loss = ce + option(cfg, "ncl_weight", self.name) * ncl
        return loss, _logs(loss=loss, ce=ce, ncl=ncl)


@dataclass(frozen=True)
class AdaptiveDiversityPromoting:
    """ADP: all members on the shared batch; mean CE + w·(−α·H − β·log det)."""

    name: str = "adp"

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        x, y = _shared(batch, self.name)
        logits = ensemble(x)
        ce = shared_ce(logits, y)
        entropy, log_det = adp_terms(logits, y)
        adp = (
            -option(cfg, "adp_alpha", self.name) * entropy
            - option(cfg, "adp_beta", self.name) * log_det
        )
        loss = ce + option(cfg, "adp_weight", self.name) * adp
        return loss, _logs(loss=loss, ce=ce, adp=adp, entropy=entropy, log_det=log_det)


@dataclass(frozen=True)
class DICE:
    """DICE (Rame & Cord 2021) as in the official SDDE code: all members on the shared batch
    (``same_batch: True``); mean CE + w·mean over pairs of the clipped log density ratio that a
    conditional discriminator assigns to their (detached-discriminator) embedding pairs; plus the
    discriminator's own loss on detached embeddings, so one backward trains both (the
    discriminator's parameters get only its loss, the members' only theirs). See training/dice.py.
    """

    name: str = "dice"

    def make_aux(self, ensemble: Ensemble, num_classes: int, sample: Tensor) -> nn.Module:
        from training.dice import Discriminator, embedding_dim

        return Discriminator(num_classes, embedding_dim(ensemble, sample))

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        from training.dice import dice_losses, logits_and_embeddings

        if batch.aux is None:
            raise ValueError("--method dice needs its discriminator (StepBatch.aux)")
        x, y = _shared(batch, self.name)
        logits, emb = logits_and_embeddings(ensemble, x)
        ce = shared_ce(logits, y)
        redundancy, disc_loss, disc_acc = dice_losses(
            batch.aux, emb, y, tau=option(cfg, "dice_tau", self.name)
        )
        weight = option(cfg, "dice_weight", self.name) * batch.diversity_scale
        loss = ce + weight * redundancy + disc_loss
        return loss, _logs(
            loss=loss,
            ce=ce,
            dice=redundancy,
            dice_weight=weight,
            discriminator_loss=disc_loss,
            discriminator_accuracy=disc_acc,
        )


@dataclass(frozen=True)
class AdversarialDeepEnsemble:
    """Deep Ensembles with adversarial training: CE(x) + CE(x + ε·sign ∇x CE), per member.

    ε = ``cfg.adv_eps`` times the input range (pixels span [0, 1], so the range is 1). The
    perturbation is a constant (sign() has zero derivative, and Lakshminarayanan et al. treat x'
    as data), so its gradient is taken without ``create_graph``; x' is clipped to [0, 1] to stay
    a valid image.
    """

    name: str = "de-adv"

    def loss(
        self, ensemble: Ensemble, batch: StepBatch, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        if len(batch.member_batches) != ensemble.num_members:
            raise ValueError("StepBatch needs one member batch per member")
        eps = float(cfg.adv_eps) * 1.0  # input range of [0, 1] pixels
        xs = [x.detach().requires_grad_(True) for x, _ in batch.member_batches]
        ys = [y for _, y in batch.member_batches]
        logits = ensemble.forward_each(xs)
        ce = torch.stack([F.cross_entropy(z, y) for z, y in zip(logits, ys, strict=True)]).mean()
        grads = torch.autograd.grad(ce, xs, retain_graph=True)
        x_adv = [
            (x + eps * g.sign()).clamp(0.0, 1.0).detach() for x, g in zip(xs, grads, strict=True)
        ]
        adv_logits = ensemble.forward_each(x_adv)
        adv = torch.stack(
            [F.cross_entropy(z, y) for z, y in zip(adv_logits, ys, strict=True)]
        ).mean()
        loss = ce + adv
        return loss, _logs(loss=loss, ce=ce, adv=adv)


class _Registered(Mapping[str, Method]):
    """``METHODS[name]``: the loss object of the registered method ``name`` (training/registry.py),
    so a method registered anywhere (a test, a plug-in) trains like a built-in one."""

    def __getitem__(self, name: str) -> Method:
        if name not in registry.METHODS:
            raise KeyError(name)
        return registry.METHODS[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(registry.METHODS)

    def __len__(self) -> int:
        return len(registry.METHODS)


METHODS: Mapping[str, Method] = _Registered()


class LossModule(nn.Module):
    """``forward(batch, cfg) -> (loss, logs)`` of one method on one ensemble.

    For DistributedDataParallel: DDP synchronises gradients only for work done inside its
    ``forward``, and the methods call ``forward_each``/``forward_features``/... rather than
    ``Ensemble.forward``. Wrapping this module (``DDP(LossModule(ens, method))``) puts the whole
    loss, double backward included, inside DDP's forward.
    """

    def __init__(self, ensemble: Ensemble, method: Method):
        super().__init__()
        self.ensemble = ensemble
        self.method = method

    def forward(self, batch: StepBatch, cfg: Any) -> tuple[Tensor, dict[str, float]]:
        return self.method.loss(self.ensemble, batch, cfg)
