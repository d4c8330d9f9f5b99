"""The ensemble module: N members, input normalisation inside, two interchangeable backends.

``Ensemble(members, mean, std)`` takes pixels in [0, 1] (``NCHW`` float32) everywhere and
normalises them itself, so checkpoints, export and serving agree on one input convention.

Two backends compute exactly the same functions (tests pin it):

* ``"loop"`` (default): a Python loop over ``members``.
* ``"fused"``: all members in one call with ``torch.func`` (``vmap`` + ``functional_call`` over
  the members' parameters stacked along a new leading axis). The stacked tensors are rebuilt with
  ``torch.stack`` on every call: that copy is differentiable, so gradients land on each member's
  own ``Parameter`` and the optimizer, checkpoints and the loop backend keep working on
  ``members`` unchanged. Only forward passes run inside ``vmap``; every ``autograd.grad`` (GradCAM,
  input gradients, the double backward of the diversity loss) is taken outside it: double
  backward through a vmapped forward is not supported by torch.func, while gradients of a
  vmapped forward taken outside it are.

Logits come out as ``[B, N, L]`` (batch, member, class), the layout of the ONNX graph.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from training.choices import BACKEND_CHOICES, DIVERSITY_BN_CHOICES
from training.models import create_model
from training.pretrained import load_into, source_state_dict

BACKENDS = BACKEND_CHOICES
BN_MODES = DIVERSITY_BN_CHOICES


class Ensemble(nn.Module):
    """Members of identical input convention; ``forward(x01) -> logits [B, N, L]``."""

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        members: Sequence[nn.Module],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        backend: str = "loop",
    ):
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.members = nn.ModuleList(members)
        # Buffers (saved in the state dict) so a checkpoint alone reproduces the preprocessing.
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.backend = "loop"
        self.set_backend(backend)

    # -- configuration -----------------------------------------------------------------------

    @property
    def num_members(self) -> int:
        return len(self.members)

    def set_backend(self, backend: str) -> Ensemble:
        if backend not in BACKENDS:
            raise ValueError(f"unknown ensemble backend {backend!r}; choose one of {BACKENDS}")
        if backend == "fused" and "_fused" not in self.__dict__:
            # A plain attribute, not a submodule: the fused helper holds a parameter-free
            # ("meta") template that must stay out of state_dict() and parameters().
            self.__dict__["_fused"] = _Fused(list(self.members))
        self.backend = backend
        return self

    # -- public passes (all take pixels in [0, 1] unless normalized=True) ----------------------

    def normalize(self, x01: Tensor) -> Tensor:
        if x01.ndim != 4 or x01.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected images [B, {self.mean.shape[1]}, H, W] in [0, 1], got {tuple(x01.shape)}"
            )
        return (x01 - self.mean) / self.std

    def forward(self, x01: Tensor) -> Tensor:
        """Logits ``[B, N, L]`` of every member on the same images."""
        xn = self.normalize(x01)
        if self.backend == "fused":
            return self._fused_impl.call("all", self.members, xn, None).transpose(0, 1)
        return torch.stack([m(xn) for m in self.members], dim=1)

    def forward_features(
        self, x01: Tensor, *, normalized: bool = False, members: Sequence[int] | None = None
    ) -> list[Tensor]:
        """Per-member feature maps ``[B, K, h, w]`` at each member's saliency layer.

        ``members``: only these members, in this order (None: all). The others are not run at
        all: a diversity term on a few member pairs costs only their passes.
        """
        xn = x01 if normalized else self.normalize(x01)
        chosen = self.chosen(members)
        if self.backend == "fused":
            return list(self._fused_impl.call("features", chosen, xn, None).unbind(0))
        return [m.forward_features(xn) for m in chosen]

    features = forward_features

    def forward_head(
        self, feats: Sequence[Tensor], *, members: Sequence[int] | None = None
    ) -> Tensor:
        """Logits ``[B, N, L]`` from the per-member feature maps of ``forward_features``
        (``members``: the members those maps belong to, as given there; N = their number)."""
        chosen = self.chosen(members)
        if len(feats) != len(chosen):
            raise ValueError(f"expected {len(chosen)} feature maps, got {len(feats)}")
        if self.backend == "fused":
            out = self._fused_impl.call("head", chosen, torch.stack(list(feats)), 0)
            return out.transpose(0, 1)
        return torch.stack([m.forward_head(f) for m, f in zip(chosen, feats, strict=True)], dim=1)

    def forward_pre_logits(self, x01: Tensor) -> Tensor:
        """Every member's pre-logit features ``[B, N, D]`` (what its final linear layer reads)."""
        xn = self.normalize(x01)
        return torch.stack(
            [m.forward_head(m.forward_features(xn), pre_logits=True) for m in self.members], dim=1
        )

    def forward_each(
        self,
        xs: Sequence[Tensor],
        *,
        normalized: bool = False,
        members: Sequence[int] | None = None,
    ) -> list[Tensor]:
        """Member ``i`` on its own batch ``xs[i]``; returns the list of logits ``[B_i, L]``
        (``members``: the k-th batch goes to member ``members[k]``; None: all members)."""
        chosen = self.chosen(members)
        if len(xs) != len(chosen):
            raise ValueError(f"expected one batch per member ({len(chosen)}), got {len(xs)}")
        xns = list(xs) if normalized else [self.normalize(x) for x in xs]
        same_shape = all(x.shape == xns[0].shape for x in xns)
        if self.backend == "fused" and same_shape:
            return list(self._fused_impl.call("all", chosen, torch.stack(xns), 0).unbind(0))
        # Loop (also the fused backend's fallback for batches of unequal size).
        return [m(x) for m, x in zip(chosen, xns, strict=True)]

    def chosen(self, members: Sequence[int] | None) -> Sequence[nn.Module]:
        """The member modules ``members`` names (None: all of them), checked."""
        if members is None:
            return self.members
        if not members or any(not 0 <= i < self.num_members for i in members):
            raise ValueError(f"members must name some of 0..{self.num_members - 1}, got {members}")
        return [self.members[i] for i in members]

    @property
    def _fused_impl(self) -> _Fused:
        return self.__dict__["_fused"]


@contextmanager
def batchnorm_mode(module: nn.Module, mode: str) -> Iterator[None]:
    """Runs a block with BatchNorm in ``mode``.

    ``"eval"``: every submodule in eval mode (BatchNorm uses and keeps its running statistics),
    then each submodule's own previous flag is restored. ``"train"``: the module is left in its
    current mode (train mode during training: batch statistics, running stats updated).
    """
    if mode not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {mode!r}; choose one of {BN_MODES}")
    if mode == "train":
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def build_ensemble(
    arch: str,
    *,
    members: int,
    num_classes: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    saliency_layer: str | None = None,
    backend: str = "loop",
    pretrained: str | None = None,
) -> Ensemble:
    """``members`` freshly initialised models of ``arch`` (drawn from the current torch RNG).

    ``pretrained`` (a file or ``"hub"``, training/pretrained.py): every member then starts from
    those weights, except a classifier of another shape, which keeps its fresh initialisation.
    """
    nets = [
        create_model(
            arch, num_classes=num_classes, in_chans=in_chans, saliency_layer=saliency_layer
        )
        for _ in range(members)
    ]
    if pretrained is not None:
        state = source_state_dict(pretrained, arch)
        load_into(nets, state, pretrained)
    return Ensemble(nets, mean, std, backend=backend)


class _Stage(nn.Module):
    """Exposes one part of a member as ``forward`` (``functional_call`` only calls forward)."""

    def __init__(self, net: nn.Module, part: str):
        super().__init__()
        self.net = net
        self.part = part

    def forward(self, x: Tensor) -> Tensor:
        if self.part == "features":
            return self.net.forward_features(x)
        if self.part == "head":
            return self.net.forward_head(x)
        return self.net(x)


class _Fused:
    """``vmap`` over members of one architecture, with parameters stacked per call."""

    def __init__(self, members: list[nn.Module]):
        shapes = [
            [(k, v.shape) for k, v in [*m.named_parameters(), *m.named_buffers()]] for m in members
        ]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("the fused backend needs members of identical architecture")
        template = copy.deepcopy(members[0]).to("meta")  # structure only; tensors come per call
        self.stages = {part: _Stage(template, part) for part in ("all", "features", "head")}

    def call(self, part: str, members: Sequence[nn.Module], x: Tensor, x_dim: int | None) -> Tensor:
        """Runs ``part`` of every member; ``x_dim=None`` shares ``x``, ``0`` gives member i x[i].

        Returns the outputs stacked on a leading member axis ``[N, ...]``.
        """
        # Look-ups built once per call: dict(named_parameters()) per key would be quadratic.
        pdicts = [dict(m.named_parameters()) for m in members]
        bdicts = [dict(m.named_buffers()) for m in members]
        params = {f"net.{k}": torch.stack([d[k] for d in pdicts]) for k in pdicts[0]}
        buffers = {f"net.{k}": torch.stack([d[k] for d in bdicts]) for k in bdicts[0]}
        stage = self.stages[part]
        # The template mirrors the members' train/eval flags (BatchNorm behaviour depends on it).
        for t_mod, m_mod in zip(stage.net.modules(), members[0].modules(), strict=True):
            t_mod.training = m_mod.training

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(stage, {**p, **b}, (xi,))

        out = vmap(one, in_dims=(0, 0, x_dim))(params, buffers, x)
        if buffers and members[0].training:
            # BatchNorm updated the stacked running statistics in place: hand them back.
            with torch.no_grad():
                for k in bdicts[0]:
                    stacked = buffers[f"net.{k}"]
                    for i, d in enumerate(bdicts):
                        d[k].copy_(stacked[i])
        return out
