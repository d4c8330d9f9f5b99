"""``sdde train``: flags are the TrainConfig fields (one each, same name, with help text).

``add_arguments`` imports no torch (``sdde --help`` and the serving image stay light); ``main``
imports the trainer only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from typing import Any

from training.config import (
    AUGMENT_CHOICES,
    BACKEND_CHOICES,
    BEST_METRIC_CHOICES,
    DIVERSITY_BN_CHOICES,
    FIELD_HELP,
    SALIENCY_CHOICES,
    SHARED_SOURCE_CHOICES,
    TrainConfig,
    flag,
)

HELP = (
    "Train a Saliency-Diversified Deep Ensemble (or a baseline) and write a run directory. "
    "Under torchrun it trains data-parallel."
)

# Field annotation (a string under postponed evaluation) -> argparse type.
TYPES: dict[str, Any] = {
    "int": int,
    "int | None": int,
    "float": float,
    "float | None": float,
    "str": str,
    "str | None": str,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "saliency": SALIENCY_CHOICES,
    "diversity_bn": DIVERSITY_BN_CHOICES,
    "augment": AUGMENT_CHOICES,
    "best_metric": BEST_METRIC_CHOICES,
    "backend": BACKEND_CHOICES,
    "shared_source": SHARED_SOURCE_CHOICES,
}
METAVARS: dict[str, str] = {
    "data": "SPEC",
    "outliers": "SPEC",
    "arch": "NAME",
    "pretrained": "PATH|hub",
    "members": "N",
    "method": "METHOD",
    "epochs": "E",
    "out": "RUN_DIR",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``batch_size`` -> ``--batch-size``), defaults from it.

    Absent flags stay absent from the namespace (``argparse.SUPPRESS``): ``--resume`` must know
    which flags the user passed, since only those may change the recorded run.
    """
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": f"{FIELD_HELP[f.name]} [default: {default!r}]",
            "dest": f.name,
        }
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = TYPES[str(f.type)]
            kwargs["metavar"] = METAVARS.get(f.name, f.name.upper())
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
                del kwargs["metavar"]
        parser.add_argument("--" + flag(f.name), **kwargs)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields whose flags were passed."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Flags over TrainConfig's defaults; with ``--resume``, over the recorded run's config."""
    given = given_flags(args)
    if given.get("resume"):
        from training.run import resume_config  # imports torch: only when resuming

        return resume_config(given)
    return TrainConfig(**given)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()  # flag combinations fail before torch is imported

    from training.trainer import train  # imports torch

    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(out, file=sys.stdout)
    return 0
