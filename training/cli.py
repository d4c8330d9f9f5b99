"""``sdde train``: flags are the TrainConfig fields (one each, same name, with help text).

A common field's flag comes from its ``CommonConfig`` field and ``FIELD_HELP``; a method option's
from its ``registry.Option`` declaration (type, choices, help), including options of methods
registered after import (a plug-in), so a method's option needs no line here.

``add_arguments`` imports no torch (``sdde --help`` and the serving image stay light); ``main``
imports the trainer only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from typing import Any

from training import registry
from training.choices import AUGMENT_CHOICES, BACKEND_CHOICES, BEST_METRIC_CHOICES
from training.config import FIELD_HELP, CommonConfig, TrainConfig, flag

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
    "augment": AUGMENT_CHOICES,
    "best_metric": BEST_METRIC_CHOICES,
    "backend": BACKEND_CHOICES,
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
    """One flag per TrainConfig field (``batch_size`` -> ``--batch-size``), defaults from it,
    then one per registered method option.

    Absent flags stay absent from the namespace (``argparse.SUPPRESS``): ``--resume`` must know
    which flags the user passed, since only those may change the recorded run.
    """
    for f in fields(CommonConfig):
        default = f.default if f.default is not MISSING else None
        choices = CHOICES.get(f.name, ())
        metavar = METAVARS.get(f.name, f.name.upper())
        kind = bool if f.type == "bool" else TYPES[str(f.type)]
        add_flag(parser, f.name, kind, default, FIELD_HELP[f.name], choices, metavar)
    for option in registry.options().values():
        add_flag(
            parser,
            option.name,
            option.type,
            option.default,
            option.help,
            option.choices,
            option.name.upper(),
        )


def add_flag(
    parser: argparse.ArgumentParser,
    name: str,
    kind: type,
    default: Any,
    help_text: str,
    choices: tuple[str, ...],
    metavar: str,
) -> None:
    """``--name``: a ``--name/--no-name`` switch for a bool, else a typed value."""
    kwargs: dict[str, Any] = {
        "default": argparse.SUPPRESS,
        "help": f"{help_text} [default: {default!r}]",
        "dest": name,
    }
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif choices:
        kwargs.update(type=kind, choices=choices)
    else:
        kwargs.update(type=kind, metavar=metavar)
    parser.add_argument("--" + flag(name), **kwargs)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields and method options whose flags were passed."""
    names = {f.name for f in fields(CommonConfig)} | set(registry.options())
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Flags over TrainConfig's defaults; with ``--resume``, over the recorded run's config."""
    given = given_flags(args)
    if given.get("resume"):
        from training.run import resume_config  # imports torch: only when resuming

        return resume_config(given)
    return TrainConfig.from_dict(given)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()  # flag combinations fail before torch is imported

    from training.trainer import train  # imports torch

    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(out, file=sys.stdout)
    return 0
