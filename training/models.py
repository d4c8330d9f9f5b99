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

Architectures (``ARCHS``): ``lenet`` (OpenOOD/SDDE LeNet, 28x28), ``resnet18_32`` (OpenOOD's
ResNet18_32x32: 3x3 stem, no max-pool; alias ``resnet18_32x32``), ``resnet18`` and ``resnet50``
(torchvision's 224x224 architectures, always built with ``weights=None``: nothing is downloaded).
Module names follow the reference implementations so their state dicts line up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from sdde_serve.errors import UserError

__all__ = ["ARCHS", "ArchSpec", "LeNet", "ResNet18_32", "SplitModel", "TorchvisionResNet"]


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


def _lenet(**kw: object) -> SplitModel:
    return LeNet(**kw)  # type: ignore[arg-type]


def _resnet18_32(**kw: object) -> SplitModel:
    return ResNet18_32(**kw)  # type: ignore[arg-type]


def _resnet18(**kw: object) -> SplitModel:
    return TorchvisionResNet(18, **kw)  # type: ignore[arg-type]


def _resnet50(**kw: object) -> SplitModel:
    return TorchvisionResNet(50, **kw)  # type: ignore[arg-type]


_RESNET_STAGES = ResNet18_32.stage_names
_RESNET18_32 = ArchSpec("resnet18_32", 32, 3, "layer3", _RESNET_STAGES, _resnet18_32)

ARCHS: dict[str, ArchSpec] = {
    "lenet": ArchSpec("lenet", 28, 1, "conv2", LeNet.stage_names, _lenet),
    "resnet18_32": _RESNET18_32,
    "resnet18_32x32": _RESNET18_32,  # OpenOOD's name for the same network
    "resnet18": ArchSpec("resnet18", 224, 3, "layer3", _RESNET_STAGES, _resnet18),
    "resnet50": ArchSpec("resnet50", 224, 3, "layer3", _RESNET_STAGES, _resnet50),
}


def create_model(
    arch: str, *, num_classes: int, in_chans: int, saliency_layer: str | None = None
) -> SplitModel:
    """Builds one (randomly initialised) ensemble member of ``arch``.

    ``saliency_layer=None`` takes the architecture's default (the official code's choice).
    Unknown names raise ``UserError`` with the valid choices.
    """
    spec = ARCHS.get(arch)
    if spec is None:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if num_classes < 1 or in_chans < 1:
        raise UserError(f"num_classes and in_chans must be >= 1, got {num_classes}, {in_chans}")
    layer = spec.default_saliency_layer if saliency_layer is None else saliency_layer
    return spec.build(num_classes=num_classes, in_chans=in_chans, saliency_layer=layer)
