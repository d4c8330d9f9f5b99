"""The training-method registry: each ``--method``'s traits and hyper-parameters, torch-free.

One ``MethodSpec`` per method says what the rest of the code needs to know about it: whether it
needs an outlier set, whether its loss compares members (then it needs two or more), whether its
diversity term may be skipped on some steps, its hyper-parameters (``Option``s: the manifest
records exactly those), and its loss object, named by module path so that this module (and so
``sdde train --help``) never imports torch. The ``--method`` help text, the config checks (which
methods compare members, need outliers, may skip the term) and export's hyper-parameter list are
all derived from ``METHODS``.

A method's hyper-parameter is declared once, as an ``Option`` (name, type, default, range or
choices, help) in its spec: ``sdde train`` gets its ``--flag`` from it, ``TrainConfig`` its field
and default, ``TrainConfig.validate`` its range check, the loss its fallback default
(``methods.option``). An option several methods read (``--shared-source``) is one ``Option``
object listed in each spec.

Add a method: write its loss class (``loss(ensemble, batch, cfg) -> (loss, logs)``, see
training/methods.py) and ``register()`` a spec naming it and declaring its options;
docs/training-methods.md walks through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from sdde_serve.errors import UserError


@dataclass(frozen=True)
class Option:
    """One hyper-parameter: the config field ``name``, the flag ``--name-with-dashes``.

    ``default`` None means "derived when the config is resolved" (the help says from what); such
    an option also accepts None. Numbers must lie in [``low``, ``high``] (``low_open``: ``low``
    itself excluded; None: unbounded); a string with ``choices`` must be one of them.
    """

    name: str
    type: type  # int, float, str or bool
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def annotation(self) -> str:
        """The config field's type, as written in a dataclass (``"float | None"``)."""
        return self.type.__name__ + (" | None" if self.default is None else "")

    def check(self, value: Any) -> None:
        """Raises UserError (naming the flag) unless ``value`` is allowed."""
        if value is None and self.default is None:
            return
        if self.choices and value not in self.choices:
            raise UserError(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.type in (int, float) and not self._in_range(value):
            raise UserError(f"{self.flag} must be {self.range_text()}, got {value}")

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def range_text(self) -> str:
        """``>= 0``, ``> 0``, ``in (0, 1]``, ``<= 1`` or ``any value``."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f"in {'(' if self.low_open else '['}{low:g}, {high:g}]"
        if low is not None:
            return f"{'>' if self.low_open else '>='} {low:g}"
        return f"<= {high:g}" if high is not None else "any value"


# The options of the built-in methods; an option several methods read is one object.
LAMBDA_DIV = Option(
    "lambda_div",
    float,
    None,
    "weight of the diversity term (None: 1.0 for 28x28 gray inputs, else 0.005)",
    low=0,
)
SALIENCY = Option(
    "saliency",
    str,
    "gradcam",
    "saliency map for the diversity loss: gradcam or inputgrad (paper's Appendix B)",
    choices=("gradcam", "inputgrad"),
)
SALIENCY_LAYER = Option(
    "saliency_layer", str, None, "layer whose feature map feeds GradCAM (None: the arch's default)"
)
DIVERSITY_BN = Option(
    "diversity_bn",
    str,
    "eval",
    "BatchNorm mode for the shared diversity batch: eval (running stats) or train",
    choices=("eval", "train"),
)
LAMBDA_WARMUP = Option(
    "lambda_warmup_epochs",
    float,
    1.0,
    "ramp the diversity weight linearly from 0 over this many epochs",
    low=0,
)
# The SDDE training protocol (docs/training-methods.md, "The official protocol"):
SHARED_SOURCE = Option(
    "shared_source",
    str,
    "member",
    "diversity batch: member (one member's batch, chosen at random each step, fed to all: the "
    "official trainer) or stream (a batch stream of its own)",
    choices=("member", "stream"),
)
SHARED_BATCH = Option(
    "shared_batch",
    float,
    1.0,
    "sdde: diversity batch size as a fraction of --batch-size (1: all of it; 0.5 with "
    "--diversity-period 4 costs 1.1-1.2x a DE step)",
    low=0,
    high=1,
    low_open=True,
)
# SDDE's default dose is one random member pair every 2nd step: 1.2x a DE step (all pairs every
# step: 2.2x) with SDDE's validation OOD edge over DE kept on 3 seeds at 20 epochs
# (docs/training-methods.md, "The cheaper dose: the default"). The paper's: --diversity-period 1
# --diversity-pairs 0 (with its --lambda-div 0.1 on 28x28 gray data).
DIVERSITY_PERIOD = Option(
    "diversity_period",
    int,
    2,
    "sdde: compute the diversity term every k-th step only (official diversity_loss_period; "
    "1: every step, the paper's)",
    low=1,
)
DIVERSITY_PAIRS = Option(
    "diversity_pairs",
    int,
    1,
    "sdde: compute the diversity term on this many member pairs, drawn at random each step from "
    "--seed and the step (0: all N(N-1)/2 pairs, the paper's); saliency maps only for their "
    "members",
    low=0,
)
BETA_OE = Option("beta_oe", float, 0.5, "weight of the Outlier-Exposure loss", low=0)
OUTLIER_BATCH_SIZE = Option(
    "outlier_batch_size", int, None, "outlier batch size (None: --batch-size)", low=1
)

# The diversity weight and saliency options of the SDDE family; the λ warm-up ramps its term.
_SDDE = (LAMBDA_DIV, SALIENCY, SALIENCY_LAYER, DIVERSITY_BN, LAMBDA_WARMUP)
# How the diversity batch is drawn, how often and on how many member pairs the term is computed
_PROTOCOL = (SHARED_SOURCE, SHARED_BATCH, DIVERSITY_PERIOD, DIVERSITY_PAIRS)
# The dose options at the paper's values: the term on every step, the whole shared batch, all
# member pairs. A method whose term is not separate from its loss (not ``periodic``) has no other
# dose, and its resolved config records these.
EVERY_STEP: dict[str, Any] = {"diversity_period": 1, "shared_batch": 1.0, "diversity_pairs": 0}
_OE = (BETA_OE, OUTLIER_BATCH_SIZE)


@dataclass(frozen=True)
class MethodSpec:
    """One training method. ``loss`` is ``"module:Class"`` (imported on first use), a class or an
    instance with ``loss(ensemble, batch, cfg)``."""

    name: str
    summary: str  # one line for docs and error messages
    loss: Any
    # The method's own hyper-parameters: flags, config fields, checks and defaults.
    options: tuple[Option, ...] = ()
    # Common config fields (not options) that shape this method's result, recorded with its
    # options in the manifest (the outlier set, a clip that only this method turns on).
    records: tuple[str, ...] = ()
    needs_outliers: bool = False  # trains on an unlabeled outlier batch (--outliers)
    compares_members: bool = False  # the loss compares members: needs --members >= 2
    # The diversity term is an add-on to each member's own cross-entropy, so it may be skipped on
    # some steps (--diversity-period) or computed on part of a batch (--shared-batch).
    periodic: bool = False
    ramp: str = "lambda_warmup_epochs"  # config field: epochs of the linear diversity-weight ramp
    grad_clip: float = 0.0  # gradient-norm clip when --grad-clip is not given (0: off)

    @property
    def hparams(self) -> tuple[str, ...]:
        """Config fields this method reads beyond the common ones: recorded in the manifest."""
        return tuple(o.name for o in self.options) + self.records

    @property
    def defaults(self) -> dict[str, Any]:
        """Each option's default (what ``methods.option`` falls back on)."""
        return {o.name: o.default for o in self.options}

    def load(self) -> Any:
        """The loss object (imports its module, hence torch, for a built-in method)."""
        obj = self.loss
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
        return obj() if isinstance(obj, type) else obj


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Adds ``spec`` to the registry. A name already taken is an error (no silent override), and
    so is an option whose name another method declares differently (one flag, one meaning)."""
    if spec.name in METHODS:
        raise ValueError(f"training method {spec.name!r} is already registered")
    known = options()
    for option in spec.options:
        if known.get(option.name, option) != option:
            raise ValueError(
                f"method {spec.name!r} declares option {option.name!r} unlike another method"
            )
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


def options() -> dict[str, Option]:
    """Every registered method's options by name, in registration order (a shared one once)."""
    found: dict[str, Option] = {}
    for s in METHODS.values():
        for option in s.options:
            found.setdefault(option.name, option)
    return found


for _spec in (
    MethodSpec(
        "de", "Deep Ensemble: each member on its own batch", "training.methods:DeepEnsemble"
    ),
    MethodSpec(
        "sdde",
        "Saliency-Diversified Deep Ensemble (Algorithm 1)",
        "training.methods:SDDE",
        options=_SDDE + _PROTOCOL,
        compares_members=True,
        periodic=True,
    ),
    MethodSpec(
        "oe",
        "an ensemble of Outlier-Exposure models",
        "training.methods:OutlierExposure",
        options=_OE,
        records=("outliers",),
        needs_outliers=True,
    ),
    MethodSpec(
        "sdde-oe",
        "SDDE with Outlier Exposure (Algorithm 2)",
        "training.methods:SDDEOutlierExposure",
        options=_SDDE + _OE,
        records=("outliers",),
        needs_outliers=True,
        compares_members=True,
    ),
    MethodSpec(
        "ncl",
        "negative correlation learning",
        "training.methods:NegativeCorrelation",
        # the official SDDE code's train_ncl.yml
        options=(
            Option(
                "ncl_weight", float, 0.1, "ncl: weight of the negative-correlation penalty", low=0
            ),
            SHARED_SOURCE,
        ),
        compares_members=True,
    ),
    MethodSpec(
        "adp",
        "adaptive diversity promoting",
        "training.methods:AdaptiveDiversityPromoting",
        # train_adp.yml: Pang et al.'s defaults
        options=(
            Option("adp_weight", float, 0.1, "adp: weight of the ADP regulariser", low=0),
            Option(
                "adp_alpha",
                float,
                2.0,
                "adp: weight of the ensemble entropy inside the regulariser",
                low=0,
            ),
            Option(
                "adp_beta",
                float,
                0.5,
                "adp: weight of the log-determinant inside the regulariser",
                low=0,
            ),
            SHARED_SOURCE,
        ),
        compares_members=True,
    ),
    MethodSpec(
        "dice",
        "DICE conditional-redundancy diversity",
        "training.methods:DICE",
        # DICE (Rame & Cord 2021), the official code's settings
        options=(
            Option(
                "dice_weight", float, 0.2, "dice: weight of the conditional-redundancy term", low=0
            ),
            Option(
                "dice_rampup_epochs",
                float,
                20.0,
                "dice: ramp the DICE weight linearly from 0 over this many epochs",
                low=0,
            ),
            Option(
                "dice_tau",
                float,
                10.0,
                "dice: tanh clipping of the discriminator's log density ratio",
                low=0,
                low_open=True,
            ),
            Option(
                "discriminator_lr",
                float,
                1e-4,
                "dice: learning rate of the discriminator (RMSprop)",
                low=0,
                low_open=True,
            ),
            SHARED_SOURCE,
        ),
        records=("grad_clip",),
        compares_members=True,
        ramp="dice_rampup_epochs",
        grad_clip=1.0,  # the official DICE config clips gradients at 1.0
    ),
    MethodSpec(
        "de-adv",
        "Deep Ensemble with FGSM adversarial training",
        "training.methods:AdversarialDeepEnsemble",
        options=(
            Option(
                "adv_eps",
                float,
                0.01,
                "de-adv: adversarial step size as a fraction of the input range",
                low=0,
            ),
        ),
    ),
):
    register(_spec)
