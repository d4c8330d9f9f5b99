"""The training-method registry: each ``--method``'s traits and hyper-parameters, torch-free.

One ``MethodSpec`` per method says what the rest of the code needs to know about it: whether it
needs an outlier set, whether its loss compares members (then it needs two or more), whether its
diversity term may be skipped on some steps, which config fields are its hyper-parameters (the
manifest records exactly those), and its loss object, named by module path so that this module
(and so ``sdde train --help``) never imports torch. The ``--method`` help text, the config
checks (which methods compare members, need outliers, may skip the term) and export's
hyper-parameter list are all derived from ``METHODS``.

Add a method: write its loss class (``loss(ensemble, batch, cfg) -> (loss, logs)``, see
training/methods.py) and ``register()`` a spec naming it; docs/training-methods.md walks through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from sdde_serve.errors import UserError

# The diversity weight and saliency options of the SDDE family; the λ warm-up ramps its term.
_SDDE = ("lambda_div", "saliency", "saliency_layer", "diversity_bn", "lambda_warmup_epochs")
# How the diversity batch is drawn and how often the term is computed
_PROTOCOL = ("shared_source", "shared_batch", "diversity_period")
_OE = ("outliers", "beta_oe", "outlier_batch_size")


@dataclass(frozen=True)
class MethodSpec:
    """One training method. ``loss`` is ``"module:Class"`` (imported on first use), a class or an
    instance with ``loss(ensemble, batch, cfg)``."""

    name: str
    summary: str  # one line for docs and error messages
    loss: Any
    # Config fields this method reads beyond the common ones: recorded in the manifest.
    hparams: tuple[str, ...] = ()
    # Defaults of hyper-parameters read through ``methods.option`` when a ``cfg`` lacks them
    # (a namespace in tests, or a method's option that is not a TrainConfig field).
    defaults: dict[str, float] = field(default_factory=dict)
    needs_outliers: bool = False  # trains on an unlabeled outlier batch (--outliers)
    compares_members: bool = False  # the loss compares members: needs --members >= 2
    # The diversity term is an add-on to each member's own cross-entropy, so it may be skipped on
    # some steps (--diversity-period) or computed on part of a batch (--shared-batch).
    periodic: bool = False
    ramp: str = "lambda_warmup_epochs"  # config field: epochs of the linear diversity-weight ramp
    grad_clip: float = 0.0  # gradient-norm clip when --grad-clip is not given (0: off)

    def load(self) -> Any:
        """The loss object (imports its module, hence torch, for a built-in method)."""
        obj = self.loss
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
        return obj() if isinstance(obj, type) else obj


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Adds ``spec`` to the registry; a name already taken is an error (no silent override)."""
    if spec.name in METHODS:
        raise ValueError(f"training method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def spec(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is a user error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(METHODS)
        raise UserError(f"unknown --method {name!r}; choose one of: {known}") from None


def names(**traits: bool) -> tuple[str, ...]:
    """Registered method names, optionally only those with the given traits
    (``names(needs_outliers=True)``)."""
    return tuple(
        s.name for s in METHODS.values() if all(getattr(s, k) == v for k, v in traits.items())
    )


for _spec in (
    MethodSpec(
        "de", "Deep Ensemble: each member on its own batch", "training.methods:DeepEnsemble"
    ),
    MethodSpec(
        "sdde",
        "Saliency-Diversified Deep Ensemble (Algorithm 1)",
        "training.methods:SDDE",
        hparams=_SDDE + _PROTOCOL,
        compares_members=True,
        periodic=True,
    ),
    MethodSpec(
        "oe",
        "an ensemble of Outlier-Exposure models",
        "training.methods:OutlierExposure",
        hparams=_OE,
        needs_outliers=True,
    ),
    MethodSpec(
        "sdde-oe",
        "SDDE with Outlier Exposure (Algorithm 2)",
        "training.methods:SDDEOutlierExposure",
        hparams=_SDDE + _OE,
        needs_outliers=True,
        compares_members=True,
    ),
    MethodSpec(
        "ncl",
        "negative correlation learning",
        "training.methods:NegativeCorrelation",
        # the official SDDE code's train_ncl.yml
        hparams=("ncl_weight", "shared_source"),
        defaults={"ncl_weight": 0.1},
        compares_members=True,
    ),
    MethodSpec(
        "adp",
        "adaptive diversity promoting",
        "training.methods:AdaptiveDiversityPromoting",
        # train_adp.yml: Pang et al.'s defaults
        hparams=("adp_weight", "adp_alpha", "adp_beta", "shared_source"),
        defaults={"adp_weight": 0.1, "adp_alpha": 2.0, "adp_beta": 0.5},
        compares_members=True,
    ),
    MethodSpec(
        "dice",
        "DICE conditional-redundancy diversity",
        "training.methods:DICE",
        hparams=(
            "dice_weight",
            "dice_rampup_epochs",
            "dice_tau",
            "discriminator_lr",
            "grad_clip",
            "shared_source",
        ),
        defaults={"dice_weight": 0.2, "dice_tau": 10.0},
        compares_members=True,
        ramp="dice_rampup_epochs",
        grad_clip=1.0,  # the official DICE config clips gradients at 1.0
    ),
    MethodSpec(
        "de-adv",
        "Deep Ensemble with FGSM adversarial training",
        "training.methods:AdversarialDeepEnsemble",
        hparams=("adv_eps",),
    ),
):
    register(_spec)
