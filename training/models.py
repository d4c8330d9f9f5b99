"""Model factory: every architecture split at its saliency layer (timm's contract).

Each model is a chain of named feature *stages* followed by a classifier. ``saliency_layer``
names the stage whose output GradCAM looks at; the chain is cut right after it:

* ``forward_features(x)`` runs the stages up to and including the saliency layer and returns its
  feature map ``[B, K, h, w]``,
* ``forward_head(f)`` runs the remaining stages and the classifier and returns logits ``[B, L]``;
  ``forward_head(f, pre_logits=True)`` stops before the last linear layer and returns the vector
  it reads (timm's contract: 84-d for LeNet, 512-d for ResNet18, 2048-d for ResNet50), the
  feature the KNN OOD score compares (export/knn.py),
* ``forward(x) == forward_head(forward_features(x))``
  ``== get_classifier()(forward_head(forward_features(x), pre_logits=True))``.

So GradCAM needs no hooks: the feature map is an ordinary tensor of the graph, and
``torch.autograd.grad(logit, feature_map, create_graph=True)`` gives a differentiable map.

Architectures (``ARCHS``): ``lenet`` (OpenOOD/SDDE LeNet, 28x28), ``resnet20`` (He et al.'s
0.27M-parameter CIFAR ResNet-20, for CPUs), ``resnet18_32`` (OpenOOD's ResNet18_32x32: 3x3 stem,
no max-pool; alias ``resnet18_32x32``), ``resnet18`` and ``resnet50`` (torchvision's 224x224
architectures), and ``timm:NAME`` for any timm model whose ``forward_features`` is a feature map
(``arch_spec``). Every model is built with random weights: nothing is downloaded here
(pretrained weights: training/pretrained.py). Module names follow the reference implementations
so their state dicts line up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdde_serve.errors import UserError

__all__ = [
    "ARCHS",
    "ArchSpec",
    "LeNet",
    "ResNet18_32",
    "ResNet20",
    "SplitModel",
    "TimmModel",
    "TorchvisionResNet",
    "arch_spec",
]


class SplitModel(nn.Module):
    """A chain of named feature stages plus a classifier, cut after ``saliency_layer``."""

    #: Feature stages in forward order; valid values of ``saliency_layer``.
    stage_names: tuple[str, ...] = ()
    #: Other accepted spellings of stage names (e.g. OpenOOD's ``block2`` for LeNet's ``conv2``).
    stage_aliases: dict[str, str] = {}  # noqa: RUF012 (read-only class table)

    num_classes: int
    in_chans: int
    saliency_layer: str
    fc: nn.Module  # the final linear layer (get_classifier)

    def _set_split(self, num_classes: int, in_chans: int, saliency_layer: str) -> None:
        name = self.stage_aliases.get(saliency_layer, saliency_layer)
        if name not in self.stage_names:
            known = ", ".join(self.stage_names)
            raise UserError(
                f"unknown saliency layer {saliency_layer!r} for {type(self).__name__}; "
                f"choose one of: {known}"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.saliency_layer = name
        self._split = self.stage_names.index(name) + 1

    def stage(self, name: str) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def pre_logits(self, x: Tensor) -> Tensor:
        """Last feature map -> the vector the final linear layer reads (pooling, flatten, ...)."""
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's name); every architecture here calls it ``fc``."""
        return self.fc

    def pretrained_target(self) -> nn.Module:
        """The module whose ``state_dict`` a pretrained file holds (training/pretrained.py)."""
        return self

    def classifier(self, x: Tensor) -> Tensor:
        """Everything after the last feature stage (pooling, flatten, fully connected)."""
        return self.get_classifier()(self.pre_logits(x))

    def forward_features(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects [B, {self.in_chans}, H, W] inputs, "
                f"got {tuple(x.shape)}"
            )
        for name in self.stage_names[: self._split]:
            x = self.stage(name)(x)
        return x

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        for name in self.stage_names[self._split :]:
            f = self.stage(name)(f)
        return self.pre_logits(f) if pre_logits else self.classifier(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# LeNet (OpenOOD / official SDDE code)


class LeNet(SplitModel):
    """OpenOOD's LeNet for 28x28 inputs: three conv blocks, then 120 -> 84 -> classes.

    Shapes at 28x28: conv1 -> [6, 14, 14], conv2 -> [16, 5, 5], conv3 -> [120, 1, 1]. The official
    SDDE code takes GradCAM on the second block's output (``conv2``, 5x5; 3x3 after the crop).
    ReLUs are not in-place (the reference uses in-place ones): in-place ops on tensors that a
    double backward revisits, and under ``vmap``, buy nothing here and risk errors.
    """

    stage_names = ("conv1", "conv2", "conv3")
    stage_aliases = {"block1": "conv1", "block2": "conv2", "block3": "conv3"}  # noqa: RUF012

    def __init__(self, *, num_classes: int, in_chans: int = 1, saliency_layer: str = "conv2"):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(6, 16, kernel_size=5, stride=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block3 = nn.Sequential(nn.Conv2d(16, 120, kernel_size=5, stride=1), nn.ReLU())
        self.classifier1 = nn.Linear(120, 84)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(84, num_classes)
        self._set_split(num_classes, in_chans, saliency_layer)

    def stage(self, name: str) -> Callable[[Tensor], Tensor]:
        return {"conv1": self.block1, "conv2": self.block2, "conv3": self.block3}[name]

    def pre_logits(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.classifier1.in_features:
            # Only 28x28 inputs end in a 1x1 conv3 map; say so instead of a matmul shape error.
            raise ValueError(
                "LeNet expects 28x28 inputs (resize the data to the arch's input_size)"
            )
        return self.relu(self.classifier1(x))


# --------------------------------------------------------------------------------------------
# ResNet18 for 32x32 inputs (OpenOOD's ResNet18_32x32)


class BasicBlock(nn.Module):
    """OpenOOD's BasicBlock (``shortcut`` naming, as in its state dicts)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18_32(SplitModel):
    """OpenOOD's ResNet18_32x32: 3x3 stride-1 stem, no max-pool, layers of 64/128/256/512.

    Feature maps at 32x32: stem/layer1 32x32, layer2 16x16, layer3 8x8, layer4 4x4.
    The official SDDE code takes GradCAM on layer3 (not the last block).
    """

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, *, num_classes: int, in_chans: int = 3, saliency_layer: str = "layer3"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes_in = 64
        layers = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(
                nn.Sequential(BasicBlock(planes_in, planes, stride), BasicBlock(planes, planes, 1))
            )
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self._set_split(num_classes, in_chans, saliency_layer)

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def stage(self, name: str) -> Callable[[Tensor], Tensor]:
        return self._stem if name == "stem" else getattr(self, name)

    def pre_logits(self, x: Tensor) -> Tensor:
        return self.avgpool(x).flatten(1)


# --------------------------------------------------------------------------------------------
# ResNet-20 for 32x32 inputs (He et al. 2016, Section 4.2)


class ShortcutA(nn.Module):
    """He et al.'s option-A shortcut: identity, subsampled by ``stride``, new channels zero.

    Parameter-free (why ResNet-20 has 0.27M parameters, not more). Channels are padded per group
    of ``in_planes``: on the packed export layout (export/layouts.py) activations hold N members'
    channels side by side, and each member must get its own zero channels.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.in_planes, self.stride = in_planes, stride
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        groups = x.unflatten(1, (-1, self.in_planes))  # [B, G, C, h, w]; G = 1 unless packed
        lo = self.extra // 2
        return F.pad(groups, (0, 0, 0, 0, lo, self.extra - lo)).flatten(1, 2)


class BlockA(BasicBlock):
    """``BasicBlock`` with the option-A shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, stride)
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)  # type: ignore[assignment]


class ResNet20(SplitModel):
    """He et al.'s CIFAR ResNet-20: 3x3 conv (16), three stages of 3 basic blocks with 16, 32 and
    64 channels (strides 1, 2, 2), global average pooling, linear: 0.27M parameters (option-A
    shortcuts, as in the paper's CIFAR experiments).

    Feature maps at 32x32: stem/layer1 32x32, layer2 16x16, layer3 8x8. GradCAM defaults to
    layer3: the 8x8 map the official SDDE code uses for ResNet18_32x32.
    """

    stage_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(self, *, num_classes: int, in_chans: int = 3, saliency_layer: str = "layer3"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in, layers = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BlockA(planes_in, planes, stride), BlockA(planes, planes)]
            layers.append(nn.Sequential(*blocks, BlockA(planes, planes)))
            planes_in = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # the paper's initialisation (He et al. 2015)
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
        self._set_split(num_classes, in_chans, saliency_layer)

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def stage(self, name: str) -> Callable[[Tensor], Tensor]:
        return self._stem if name == "stem" else getattr(self, name)

    def pre_logits(self, x: Tensor) -> Tensor:
        return self.avgpool(x).flatten(1)


# --------------------------------------------------------------------------------------------
# torchvision ResNet18 / ResNet50 for 224x224 inputs


class TorchvisionResNet(SplitModel):
    """A torchvision ResNet (``weights=None``) re-expressed as stages; same parameter names."""

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self, depth: int, *, num_classes: int, in_chans: int = 3, saliency_layer: str = "layer3"
    ):
        super().__init__()
        from torchvision.models import resnet18, resnet50  # imported lazily: it is slow

        builders = {18: resnet18, 50: resnet50}
        net = builders[depth](weights=None, num_classes=num_classes)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            # Same initialisation torchvision gives its own convolutions.
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.avgpool = net.avgpool
        self.fc = net.fc
        self._set_split(num_classes, in_chans, saliency_layer)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage(self, name: str) -> Callable[[Tensor], Tensor]:
        return self._stem if name == "stem" else getattr(self, name)

    def pre_logits(self, x: Tensor) -> Tensor:
        return self.avgpool(x).flatten(1)


# --------------------------------------------------------------------------------------------
# timm models (``timm:NAME``)

TIMM_PREFIX = "timm:"
TIMM_STAGE = "features"  # the one saliency layer of a timm model: forward_features' output


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(
            "--arch timm:NAME needs timm: pip install 'sdde-serve[train]' (or pip install timm)"
        ) from None
    return timm


class TimmModel(SplitModel):
    """A timm model under this project's split contract, which is timm's own.

    timm CNNs already provide ``forward_features`` (the last feature map ``[B, C, h, w]``),
    ``forward_head(f, pre_logits=...)`` and ``get_classifier()``: this class only forwards to
    them (``net``) and names the one cut point, ``features``. GradCAM therefore looks at the last
    feature map (timm has no generic way to resume its forward from an earlier stage). The
    timm model's own parameter names live under ``net.``; a pretrained file holds them bare.
    """

    stage_names = (TIMM_STAGE,)

    def __init__(
        self, name: str, *, num_classes: int, in_chans: int = 3, saliency_layer: str = TIMM_STAGE
    ):
        super().__init__()
        self.net = import_timm().create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans
        )
        self.timm_name = name
        self._set_split(num_classes, in_chans, saliency_layer)

    def pretrained_target(self) -> nn.Module:
        return self.net

    def stage(self, name: str) -> Callable[[Tensor], Tensor]:
        return self.net.forward_features

    def forward_features(self, x: Tensor) -> Tensor:
        f = super().forward_features(x)
        if f.ndim != 4:  # arch_spec refuses these up front; a second line of defence
            raise UserError(f"timm:{self.timm_name}: forward_features is not a [B, C, H, W] map")
        return f

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        return self.net.forward_head(f, pre_logits=pre_logits)

    def pre_logits(self, x: Tensor) -> Tensor:
        return self.net.forward_head(x, pre_logits=True)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def classifier(self, x: Tensor) -> Tensor:
        return self.net.forward_head(x)


def _feature_map_shape(name: str, size: int) -> tuple[int, ...]:
    """forward_features' output shape at ``size`` px, computed on the meta device (no memory,
    no arithmetic: cheap even for a large model)."""
    with torch.device("meta"):
        net = import_timm().create_model(name, pretrained=False).eval()
        return tuple(net.forward_features(torch.empty(2, 3, size, size)).shape)


@lru_cache(maxsize=32)
def timm_spec(name: str) -> ArchSpec:
    """The ArchSpec of ``timm:NAME``; refuses unknown names and non-spatial feature outputs."""
    timm = import_timm()
    if not name or not timm.is_model(name):
        raise UserError(f"timm has no model {name!r} (list them: timm.list_models('*pattern*'))")
    cfg = timm.get_pretrained_cfg(name)
    size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    shape = _feature_map_shape(name, size)
    if len(shape) != 4:
        raise UserError(
            f"timm:{name}: forward_features gives {list(shape)} (tokens?), not a [B, C, H, W] "
            "feature map; GradCAM and the CAM export need a CNN-like model"
        )

    def build(**kw: Any) -> SplitModel:
        return TimmModel(name, **kw)

    def hub() -> dict[str, Tensor]:
        return timm.create_model(name, pretrained=True).state_dict()

    return ArchSpec(TIMM_PREFIX + name, size, 3, TIMM_STAGE, (TIMM_STAGE,), build, hub)


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ArchSpec:
    """What the trainer needs to know about an architecture before building it."""

    name: str
    input_size: int  # square input side the architecture is designed for (H = W)
    input_channels: int  # channels of the data it is usually trained on (the model takes any)
    default_saliency_layer: str
    saliency_layers: tuple[str, ...]
    build: Callable[..., SplitModel]
    # The published weights (``--pretrained hub``): downloads; None when there are none.
    hub: Callable[[], dict[str, Tensor]] | None = None


def _lenet(**kw: object) -> SplitModel:
    return LeNet(**kw)  # type: ignore[arg-type]


def _resnet18_32(**kw: object) -> SplitModel:
    return ResNet18_32(**kw)  # type: ignore[arg-type]


def _resnet18(**kw: object) -> SplitModel:
    return TorchvisionResNet(18, **kw)  # type: ignore[arg-type]


def _resnet50(**kw: object) -> SplitModel:
    return TorchvisionResNet(50, **kw)  # type: ignore[arg-type]


def _resnet20(**kw: object) -> SplitModel:
    return ResNet20(**kw)  # type: ignore[arg-type]


def _torchvision_hub(name: str) -> Callable[[], dict[str, Tensor]]:
    def hub() -> dict[str, Tensor]:
        from torchvision.models import get_model_weights

        return get_model_weights(name).DEFAULT.get_state_dict(progress=False)

    return hub


_RESNET_STAGES = ResNet18_32.stage_names
_RESNET18_32 = ArchSpec("resnet18_32", 32, 3, "layer3", _RESNET_STAGES, _resnet18_32)
_TV_HUB18, _TV_HUB50 = _torchvision_hub("resnet18"), _torchvision_hub("resnet50")

ARCHS: dict[str, ArchSpec] = {
    "lenet": ArchSpec("lenet", 28, 1, "conv2", LeNet.stage_names, _lenet),
    "resnet20": ArchSpec("resnet20", 32, 3, "layer3", ResNet20.stage_names, _resnet20),
    "resnet18_32": _RESNET18_32,
    "resnet18_32x32": _RESNET18_32,  # OpenOOD's name for the same network
    "resnet18": ArchSpec("resnet18", 224, 3, "layer3", _RESNET_STAGES, _resnet18, _TV_HUB18),
    "resnet50": ArchSpec("resnet50", 224, 3, "layer3", _RESNET_STAGES, _resnet50, _TV_HUB50),
}


def arch_spec(arch: str) -> ArchSpec:
    """The spec of a built-in name or of ``timm:NAME``; unknown names raise ``UserError``."""
    if arch.startswith(TIMM_PREFIX):
        return timm_spec(arch[len(TIMM_PREFIX) :])
    spec = ARCHS.get(arch)
    if spec is None:
        known = ", ".join([*ARCHS, TIMM_PREFIX + "NAME"])
        raise UserError(f"unknown --arch {arch!r}; choose one of: {known}")
    return spec


def create_model(
    arch: str, *, num_classes: int, in_chans: int, saliency_layer: str | None = None
) -> SplitModel:
    """Builds one (randomly initialised) ensemble member of ``arch``.

    ``saliency_layer=None`` takes the architecture's default (the official code's choice).
    Unknown names raise ``UserError`` with the valid choices.
    """
    spec = arch_spec(arch)
    if num_classes < 1 or in_chans < 1:
        raise UserError(f"num_classes and in_chans must be >= 1, got {num_classes}, {in_chans}")
    layer = spec.default_saliency_layer if saliency_layer is None else saliency_layer
    return spec.build(num_classes=num_classes, in_chans=in_chans, saliency_layer=layer)


# Border GradCAM maps lose before they are compared (training/saliency.py's crop, per side).
CAM_BORDER = 1


def saliency_map_hw(arch: str, in_chans: int, size: int, layer: str | None) -> tuple[int, int]:
    """Height and width of ``arch``'s saliency-layer map at ``size`` px (on the meta device)."""
    with torch.device("meta"):
        model = create_model(arch, num_classes=2, in_chans=in_chans, saliency_layer=layer).eval()
        shape = model.forward_features(torch.empty(2, in_chans, size, size)).shape
    return int(shape[-2]), int(shape[-1])


def check_saliency_map(arch: str, in_chans: int, size: int, layer: str | None) -> None:
    """Refuses, before training starts, a saliency map too small for CAMs to compare.

    Maps lose a 1-pixel border, then are standardised: a 3x3 map leaves one pixel, which
    standardises to zero, so the diversity term would be identically zero. At 32 px a timm
    ImageNet CNN (stride 32) ends in a 1x1 map; it needs 128 px for 4x4.
    """
    h, w = saliency_map_hw(arch, in_chans, size, layer)
    side = 2 * CAM_BORDER + 2  # 2x2 left after the crop: one pixel would standardise to zero
    if min(h, w) < side:
        raise UserError(
            f"--arch {arch} at --input-size {size} gives a {h}x{w} map at its saliency layer; "
            f"CAMs (SDDE's diversity term, the per-epoch CAM similarity) need at least "
            f"{side}x{side}: raise --input-size, choose an earlier --saliency-layer, or use a "
            "method without CAMs and --cam-samples 0"
        )
