"""Layouts: how the N members of an ensemble are laid out inside one ONNX graph.

A layout turns a ``training.ensemble.Ensemble`` into a *core* module

    core(images01) -> (logits [B, N, L], last_maps [B, N, K, h, w] | None)
    core.forward_all(images01) -> (logits, last_maps, pre_logits [B, N, D])

where ``last_maps`` are the members' last feature maps (the input of their classifier), used for
class-activation maps, and ``pre_logits`` what each member's final linear layer reads
(``forward_head(f, pre_logits=True)``), used by the KNN OOD score (export/graph.py). The logits
are computed from those features, so they cost nothing extra. Normalisation (mean/std) happens
inside the core, so the graph takes plain [0, 1] pixels.

* ``loop``: the N member subgraphs side by side. onnxruntime runs them one after the other, each
  with its own dense convolutions.
* ``packed``: the Packed-Ensembles layout: members become channel groups. Activations are
  ``[B, N*C, H, W]`` (member-major); every Conv2d becomes one grouped convolution with N times
  the groups (the first one, which reads the shared image, a dense one with N times the output
  channels), BatchNorm one BatchNorm over N*C channels, Linear one batched matmul. Because the
  packing is member-major, ``flatten(1)`` of a packed map is the concatenation of the members'
  flattened maps, so the models' own forward code runs unchanged on packed tensors.

  This is exactly what ``torch.func.vmap`` over stacked member weights lowers to (the training
  code's fused backend). We build it explicitly instead of exporting vmap because torch 2.14's
  conv batching rule reads the batch size as a plain int: ``torch.export`` then specialises the
  batch axis (guard ``Eq(batch, 2)``) and the graph loses its dynamic batch (docs/export.md).

Both layouts export with the TorchScript exporter (fast, and the graphs are plain conv nets).
Which one is faster depends on the architecture and the CPU; ``DEFAULT_LAYOUT`` records what
``benchmarks/bench_engine.py`` measured on the development machine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdde_serve.errors import UserError


def ensemble_members(ensemble: nn.Module) -> list[nn.Module]:
    return list(ensemble.members)


def ensemble_norm(ensemble: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std as float32 ``[1, C, 1, 1]`` tensors (copies)."""
    mean = torch.as_tensor(ensemble.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.as_tensor(ensemble.std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return mean.clone(), std.clone()


# --- where the class-activation maps come from -----------------------------------------------


def supports_last_map(member: nn.Module) -> bool:
    """Members split into stages + classifier (training.models.SplitModel) expose their last map."""
    return all(hasattr(member, a) for a in ("stage_names", "stage", "classifier", "saliency_layer"))


def last_map(member: nn.Module, x: Tensor) -> Tensor:
    """The member's last feature map: the stages after the saliency layer, without classifier."""
    z = member.forward_features(x)
    names = list(member.stage_names)
    for name in names[names.index(member.saliency_layer) + 1 :]:
        z = member.stage(name)(z)
    return z


# --- loop --------------------------------------------------------------------------------------


class _Normalize(nn.Module):
    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        mean, std = ensemble_norm(ensemble)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class LoopCore(nn.Module):
    """N member subgraphs side by side."""

    def __init__(self, ensemble: nn.Module, with_maps: bool) -> None:
        super().__init__()
        self.normalize = _Normalize(ensemble)
        self.members = nn.ModuleList(copy.deepcopy(m).eval() for m in ensemble_members(ensemble))
        self.with_maps = with_maps

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.normalize(images)
        if not self.with_maps:
            return torch.stack([m(x) for m in self.members], dim=1), None
        maps = [last_map(m, x) for m in self.members]
        logits = [m.classifier(z) for m, z in zip(self.members, maps, strict=True)]
        return torch.stack(logits, dim=1), torch.stack(maps, dim=1)

    def forward_all(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        x = self.normalize(images)
        maps = [last_map(m, x) for m in self.members]
        feats = [m.pre_logits(z) for m, z in zip(self.members, maps, strict=True)]
        logits = [m.get_classifier()(f) for m, f in zip(self.members, feats, strict=True)]
        stacked = torch.stack(maps, dim=1) if self.with_maps else None
        return torch.stack(logits, dim=1), stacked, torch.stack(feats, dim=1)


# --- packed ------------------------------------------------------------------------------------


class PackedConv2d(nn.Module):
    """N Conv2d as one: dense with N*O outputs on the shared input, grouped on packed input."""

    def __init__(self, convs: list[nn.Conv2d]) -> None:
        super().__init__()
        c = convs[0]
        if c.padding_mode != "zeros":
            raise UserError(f"packed layout: padding_mode {c.padding_mode!r} is not supported")
        self.n = len(convs)
        self.in_channels = c.in_channels  # of one member: the shared input has this many
        self.stride, self.padding, self.dilation, self.groups = (
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
        )
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in convs]), False)
        self.bias = (
            None
            if c.bias is None
            else nn.Parameter(torch.cat([m.bias.detach() for m in convs]), False)
        )

    def forward(self, x: Tensor) -> Tensor:
        # The channel count is static, so this branch is resolved once, at export.
        shared = x.shape[1] == self.in_channels
        groups = self.groups if shared else self.groups * self.n
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups)


def _packed_batchnorm(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    b = bns[0]
    out = nn.BatchNorm2d(
        b.num_features * len(bns),
        eps=b.eps,
        momentum=b.momentum,
        affine=b.affine,
        track_running_stats=b.track_running_stats,
    )
    if not b.track_running_stats:
        raise UserError("packed layout: BatchNorm without running statistics is not supported")
    with torch.no_grad():
        out.running_mean.copy_(torch.cat([m.running_mean for m in bns]))
        out.running_var.copy_(torch.cat([m.running_var for m in bns]))
        if b.affine:
            out.weight.copy_(torch.cat([m.weight for m in bns]))
            out.bias.copy_(torch.cat([m.bias for m in bns]))
    return out.eval()


class PackedLinear(nn.Module):
    """N Linear layers on a packed ``[B, N*I]`` input -> ``[B, N*O]`` (one batched matmul)."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.n = len(linears)
        self.member_in = linears[0].in_features
        # what the models' own shape checks compare against: the packed width
        self.in_features = self.n * self.member_in
        self.out_features = self.n * linears[0].out_features
        # [N, I, O]: x [N, B, I] @ w -> [N, B, O]
        self.weight = nn.Parameter(torch.stack([m.weight.detach().T for m in linears]), False)
        has_bias = linears[0].bias is not None
        self.bias = (
            nn.Parameter(torch.stack([m.bias.detach() for m in linears]).unsqueeze(1), False)
            if has_bias
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.n, self.member_in).transpose(0, 1)  # [N, B, I]
        y = torch.matmul(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(0, 1).reshape(-1, self.out_features)


def _pack_conv(mods: list[nn.Module]) -> nn.Module:
    return PackedConv2d(mods)  # type: ignore[arg-type]


def _pack_bn(mods: list[nn.Module]) -> nn.Module:
    return _packed_batchnorm(mods)  # type: ignore[arg-type]


def _pack_linear(mods: list[nn.Module]) -> nn.Module:
    return PackedLinear(mods)  # type: ignore[arg-type]


# Leaf modules with weights and how to pack them; parameter-free leaves (ReLU, pooling, Flatten,
# Dropout in eval) act per channel or per element and work unchanged on packed tensors.
PACKERS: dict[type, Callable[[list[nn.Module]], nn.Module]] = {
    nn.Conv2d: _pack_conv,
    nn.BatchNorm2d: _pack_bn,
    nn.Linear: _pack_linear,
}


def pack_members(members: list[nn.Module]) -> nn.Module:
    """A copy of ``members[0]`` whose weighted leaves compute all members at once."""
    template = copy.deepcopy(members[0]).eval()
    names = [n for n, _ in template.named_modules()]
    for name in names:
        if not name:
            continue
        mod = template.get_submodule(name)
        if any(True for _ in mod.children()):
            continue  # containers: their leaves are replaced
        packer = PACKERS.get(type(mod))
        if packer is None:
            if any(True for _ in mod.parameters(recurse=False)) or any(
                True for _ in mod.buffers(recurse=False)
            ):
                raise UserError(f"packed layout: cannot pack {type(mod).__name__} ({name})")
            continue
        parent_name, _, child = name.rpartition(".")
        parent = template.get_submodule(parent_name) if parent_name else template
        setattr(parent, child, packer([m.get_submodule(name) for m in members]))
    return template


class PackedCore(nn.Module):
    def __init__(self, ensemble: nn.Module, with_maps: bool) -> None:
        super().__init__()
        members = ensemble_members(ensemble)
        self.n = len(members)
        self.normalize = _Normalize(ensemble)
        self.packed = pack_members(members)
        self.with_maps = with_maps

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.normalize(images)
        if not self.with_maps:
            logits = self.packed(x)
            return logits.reshape(-1, self.n, logits.shape[-1] // self.n), None
        z = last_map(self.packed, x)  # [B, N*K, h, w]
        logits = self.packed.classifier(z)
        b_k_h_w = (-1, self.n, z.shape[1] // self.n, z.shape[2], z.shape[3])
        return logits.reshape(-1, self.n, logits.shape[-1] // self.n), z.reshape(b_k_h_w)

    def forward_all(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        z = last_map(self.packed, self.normalize(images))  # [B, N*K, h, w]
        # member-major packing: the packed pre-logit vector is the members' concatenated
        feats = self.packed.pre_logits(z)  # [B, N*D]
        logits = self.packed.get_classifier()(feats)
        maps = None
        if self.with_maps:
            maps = z.reshape(-1, self.n, z.shape[1] // self.n, z.shape[2], z.shape[3])
        return (
            logits.reshape(-1, self.n, logits.shape[-1] // self.n),
            maps,
            feats.reshape(-1, self.n, feats.shape[-1] // self.n),
        )


# --- registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    build: Callable[[nn.Module, bool], nn.Module]  # (ensemble, with_maps) -> core
    summary: str


LAYOUTS: dict[str, Layout] = {
    "loop": Layout("loop", LoopCore, "N member subgraphs side by side"),
    "packed": Layout("packed", PackedCore, "members as channel groups of grouped convolutions"),
}

# The faster layout per architecture, measured by benchmarks/bench_engine.py on the development
# CPU (docs/export.md). Architectures not listed use FALLBACK_LAYOUT.
DEFAULT_LAYOUT: dict[str, str] = {
    # loop: 1.1-1.7x packed at batch 64, ~equal at 1-8 (grouped convs with 6-16 channels per
    # group keep onnxruntime's conv kernels far from their dense efficiency)
    "lenet": "loop",
    # packed: 4-10% ahead at batch 1 and 64, equal at 8 (within the noise of a shared machine)
    "resnet18_32": "packed",
    "resnet18_32x32": "packed",
}
FALLBACK_LAYOUT = "loop"


def default_layout(arch: str) -> str:
    return DEFAULT_LAYOUT.get(arch, FALLBACK_LAYOUT)


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise UserError(f"unknown layout {name!r}; choose one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
