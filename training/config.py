"""The training configuration: one typed dataclass, saved resolved as ``RUN_DIR/config.json``.

This module must not import torch: ``sdde train --help`` builds its flags from these fields.
Every field is a CLI flag of the same name (``batch_size`` -> ``--batch-size``). The common
fields are declared in ``CommonConfig`` with their help in ``FIELD_HELP``; a method's
hyper-parameters are declared once, as ``registry.Option``s in its ``MethodSpec``
(training/registry.py), and become fields here (type, default) and checks in ``validate``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Self

from sdde_serve.errors import UserError
from training import registry
from training.choices import AUGMENT_CHOICES, BACKEND_CHOICES, BEST_METRIC_CHOICES


@dataclass
class CommonConfig:
    """The fields every method shares; ``TrainConfig`` adds the methods' options."""

    data: str = "digits"
    arch: str = "lenet"
    pretrained: str | None = None
    members: int = 5
    method: str = "sdde"
    epochs: int = 10
    out: str = "runs/default"
    batch_size: int = 128
    lr: float = 0.1
    min_lr: float = 1e-6
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    outliers: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    device: str = "auto"
    workers: int = 0
    resume: bool = False
    # Added beyond the contract's list (each is a CLI flag too):
    input_size: int | None = None
    in_chans: int | None = None
    augment: str = "auto"
    amp: bool = True
    channels_last: bool = True
    best_metric: str = "acc"
    cam_samples: int = 256
    eval_train_samples: int = 1024
    eval_batch_size: int = 256
    progress: bool = True
    backend: str = "loop"
    grad_clip: float | None = None


# One field per option of the methods registered when this module loads (the built-ins:
# lambda_div, ncl_weight, dice_tau, ...), typed and defaulted by its declaration in
# training/registry.py, the one place an option is written.
MethodOptions = dataclasses.make_dataclass(
    "MethodOptions",
    [(o.name, o.annotation, field(default=o.default)) for o in registry.options().values()],
    bases=(CommonConfig,),
)


@dataclass
class TrainConfig(MethodOptions):
    """The training configuration: ``CommonConfig``'s fields and every registered method option.

    An option registered after this module loaded (a plug-in, a test's method) has no field: its
    value lives in ``extra`` and reads as an attribute all the same (``cfg.toy_weight``, its
    default when unset); ``from_dict``/``to_dict`` (config.json) keep it a top-level key.
    """

    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Python calls this only for a name that is not a field: a late-registered option.
        option = None if name.startswith("__") else registry.options().get(name)
        if option is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.__dict__.get("extra", {}).get(name, option.default)

    # --- resolution -------------------------------------------------------------------------

    def resolve(self, *, data_channels: int | None = None) -> ResolvedConfig:
        """A copy with every ``None`` default filled in and every value checked; its type says
        so (``ResolvedConfig``: those fields are no longer optional).

        ``data_channels`` is the channel count of the training images; the model takes that many
        channels unless ``in_chans`` says otherwise. Arch-dependent defaults (input size, saliency
        layer) come from ``training.models.ARCHS``; the diversity weight from
        ``training.methods.default_lambda`` (1.0 for 28x28 gray inputs, 0.005 otherwise).
        """
        # Imported here: they import torch, and resolve() is a training-time call (--help must
        # not pay for torch). Neither imports this module (their choice lists are in
        # training.choices), so this is no import cycle.
        from training import methods, models

        self.validate()
        spec = models.arch_spec(self.arch)  # UserError for unknown names
        method = registry.spec(self.method)
        if method.needs_outliers and not self.outliers:
            raise UserError(f"--method {self.method} needs --outliers SPEC (unlabeled OOD images)")
        size = int(spec.input_size) if self.input_size is None else self.input_size
        if self.in_chans is not None:
            chans = self.in_chans
        else:
            chans = int(data_channels) if data_channels is not None else spec.input_channels
        lam, layer, outlier_batch = self.lambda_div, self.saliency_layer, self.outlier_batch_size
        gradcam_loss = "lambda_div" in method.hparams and self.saliency == "gradcam"
        if self.cam_samples > 0 or gradcam_loss:  # the run compares GradCAMs
            models.check_saliency_map(self.arch, chans, size, layer)
        return ResolvedConfig.from_dict(
            {
                **self.to_dict(),
                "input_size": size,
                "in_chans": chans,
                "saliency_layer": spec.default_saliency_layer if layer is None else layer,
                "lambda_div": float(methods.default_lambda(chans, size)) if lam is None else lam,
                "augment": auto_augment(chans, size) if self.augment == "auto" else self.augment,
                "outlier_batch_size": self.batch_size if outlier_batch is None else outlier_batch,
                # the official DICE config clips gradients at 1.0; the other configs do not clip
                "grad_clip": method.grad_clip if self.grad_clip is None else self.grad_clip,
                # a method without a separate diversity term has no dose but the paper's
                **({} if method.periodic else registry.EVERY_STEP),
            }
        )

    def check_dose(self, method: registry.MethodSpec) -> None:
        """The diversity dose options (period, shared batch, pairs) apply to a ``periodic``
        method only. Any other accepts only their defaults or the paper's values (``EVERY_STEP``;
        config fields are common to every method, so a default cannot be told from a given
        value) and records the paper's (``resolve``)."""
        only = " or ".join(registry.names(periodic=True))
        if not method.periodic:
            options = registry.options()
            given = [
                options[name].flag
                for name, paper in registry.EVERY_STEP.items()
                if getattr(self, name) not in (paper, options[name].default)
            ]
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise UserError(
                    f"{' and '.join(given)} {verb} to --method {only} only "
                    f"(for {self.method} the shared batch is the training batch)"
                )
            return
        pairs = self.members * (self.members - 1) // 2  # a larger draw is refused, not clamped
        if self.diversity_pairs > pairs:
            raise UserError(
                f"--diversity-pairs {self.diversity_pairs}: at most the {pairs} member pairs of "
                f"--members {self.members} (0: all pairs)"
            )

    def validate(self) -> None:
        """Checks that need no torch: value ranges and flag combinations (raises UserError)."""
        method = registry.spec(self.method)
        positive = ("members", "epochs", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "input_size", "in_chans"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{flag(name)} must be >= 1, got {value}")
        for name in ("lr", "min_lr", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise UserError(f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise UserError(f"--grad-clip must be >= 0 (0: off), got {self.grad_clip}")
        for option in registry.options().values():  # each method option's declared range
            option.check(getattr(self, option.name))
        if self.min_lr > self.lr:
            raise UserError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.workers < 0 or self.cam_samples < 0 or self.eval_train_samples < 0:
            raise UserError("--workers, --cam-samples and --eval-train-samples must be >= 0")
        for name, choices in (
            ("augment", AUGMENT_CHOICES),
            ("best_metric", BEST_METRIC_CHOICES),
            ("backend", BACKEND_CHOICES),
        ):
            if getattr(self, name) not in choices:
                got = getattr(self, name)
                raise UserError(f"--{flag(name)} must be one of {', '.join(choices)}, got {got!r}")
        if method.compares_members and self.members < 2:
            raise UserError(
                f"--method {self.method} compares members with each other: use --members >= 2"
            )
        self.check_dose(method)
        if self.nesterov and self.momentum == 0:
            raise UserError("--nesterov needs --momentum > 0 (or pass --no-nesterov)")
        if not self.data:
            raise UserError("--data must name a data spec (e.g. digits)")

    # --- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field and every registered option, flat (``extra`` is not a key of its own)."""
        d = dataclasses.asdict(self)
        del d["extra"]
        return {**d, **{name: getattr(self, name) for name in registry.options() if name not in d}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Builds a config from a flat dict; unknown keys are an error (a typo must not be
        ignored). A registered option without a field goes to ``extra``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        late = set(registry.options()) - names
        unknown = sorted(set(d) - names - late)
        if unknown:
            raise UserError(f"unknown training config keys: {', '.join(unknown)}")
        extra = {k: v for k, v in d.items() if k in late}
        return cls(**{k: v for k, v in d.items() if k in names}, extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


@dataclass
class ResolvedConfig(TrainConfig):
    """A ``TrainConfig`` after ``resolve()``: each field whose ``None`` means "derive it" holds
    the derived value, typed as such (the trainer needs no casts). Always built by ``resolve()``;
    the defaults below only satisfy the dataclass. Same fields, so config.json is unchanged."""

    lambda_div: float = 0.0
    saliency_layer: str = ""
    outlier_batch_size: int = 0
    input_size: int = 0
    in_chans: int = 0
    grad_clip: float = 0.0


def auto_augment(channels: int, size: int) -> str:
    """``auto``: crop+flip for colour (natural) images, none for gray/digit sets.

    Crop+flip (``RandomCrop(size, padding=4)`` + horizontal flip) is the official SDDE / OpenOOD
    CIFAR protocol. Flips and crops are wrong for digits (a mirrored 2 is not a 2), and the
    paper's MNIST setting trains gray 28x28 sets without augmentation. ``size`` is unused today
    (kept so a size-dependent recipe needs no new signature).
    """
    return "crop-flip" if channels == 3 else "none"


def flag(name: str) -> str:
    """Field name -> CLI flag name without dashes prefix (``batch_size`` -> ``batch-size``)."""
    return name.replace("_", "-")


# Fields that a `--resume` may change: they do not alter the optimisation trajectory except where
# the user asks for it (more epochs extend the cosine schedule; a new max_steps moves the stop).
RESUME_OVERRIDABLE = frozenset(
    {"epochs", "max_steps", "device", "workers", "resume", "progress", "eval_batch_size"}
)

# Help text for each common field's flag (CommonConfig's fields: checked in tests); a method
# option's help is in its declaration (training/registry.py).
FIELD_HELP: dict[str, str] = {
    "data": "training data spec: digits, an IDX dir, an image folder, a .npz, torchvision:NAME",
    "arch": "model architecture: lenet, resnet20, resnet18_32x32, resnet18, resnet50 or "
    "timm:NAME (any timm CNN)",
    "pretrained": "start every member from these weights: a state dict (.pt/.pth/.safetensors; "
    "its SHA-256 goes into config.json) or 'hub' (torchvision/timm download); a classifier of "
    "another class count is re-initialised per member",
    "members": "number of ensemble members",
    "method": f"training method: {', '.join(registry.METHODS)}",
    "epochs": "training epochs (the cosine schedule spans all of them)",
    "out": "run directory to write (config, split, metrics, checkpoints)",
    "batch_size": "batch size per member (global: split across processes under torchrun)",
    "lr": "peak learning rate of SGD",
    "min_lr": "learning rate at the end of the per-step cosine decay",
    "momentum": "SGD momentum",
    "nesterov": "use Nesterov momentum",
    "weight_decay": "SGD weight decay",
    "outliers": "unlabeled OOD data spec, required by --method "
    + " and ".join(registry.names(needs_outliers=True)),
    "val_fraction": "fraction of the training split held out for validation",
    "seed": "random seed (initialisation, split, data order, augmentation)",
    "max_steps": "stop after this many steps (None: all; the schedule still spans --epochs)",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "workers": "DataLoader worker processes preparing batches (0: in the main process)",
    "resume": "continue the run in --out from its last_state.pt",
    "input_size": "model input height and width (None: the arch's)",
    "in_chans": "model input channels (None: the training data's)",
    "augment": "auto (crop+flip for colour images, none for gray ones), none, crop (random "
    "28-px crop of the 4-px padded image, no flip) or crop-flip",
    "amp": "bf16 autocast on CUDA",
    "channels_last": "channels-last memory format on CUDA",
    "best_metric": "validation metric choosing best.safetensors: ensemble acc or nll",
    "cam_samples": "held-out images for the per-epoch CAM similarity (0: skip)",
    "eval_train_samples": "training images (unaugmented) for per-epoch train accuracy (0: skip)",
    "eval_batch_size": "batch size for validation passes",
    "progress": "progress bar (only shown on a terminal)",
    "backend": "ensemble backend: loop over members, or fused (torch.func vmap over members)",
    "grad_clip": "clip the gradient norm of the members' parameters (None: 1.0 for dice, else "
    "off; 0: off)",
}
