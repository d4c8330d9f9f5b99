"""The ``sdde`` command line.

Each subcommand lives in its own module, imported only when that subcommand runs, so that
``sdde serve`` and ``sdde score`` never import PyTorch. A command module exposes ``HELP`` (one
line), ``add_arguments(parser)`` (must not import torch) and ``main(args) -> int`` (plus, as
keyword arguments, the factories :data:`PROVIDERS` lists for it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sdde_serve import __version__
from sdde_serve.errors import UserError
from sdde_serve.extras import EXTRA_MODULES, require_extra

if TYPE_CHECKING:
    from sdde_serve.evaluation.cli import CamProvider

# name -> (module, one-line summary shown before the module is imported)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.cli", "train an SDDE / Deep Ensemble (needs the [train] extra)"),
    "export": ("export.cli", "fuse a trained run into one ONNX file with its manifest"),
    "calibrate": (
        "sdde_serve.calibrate_cmd",
        "refit temperature and OOD threshold",
    ),
    "eval": ("sdde_serve.evaluation.cli", "accuracy, calibration, OOD metrics and a report"),
    "serve": ("sdde_serve.server.cli", "serve an exported model over HTTP"),
    "score": ("sdde_serve.batch.cli", "score image files offline"),
}


def _cam_provider() -> CamProvider:
    """GradCAM on a run's checkpoint (training/cams.py) for ``sdde eval --cams-from-run``."""
    with require_extra("train", what="--cams-from-run needs PyTorch"):
        return importlib.import_module("training.cams").cam_fn_for_model


# This module is the composition root: the one place in sdde_serve that names the layers above
# the runtime (training needs torch), by module path, loaded only when used. A command's main
# receives these factories as keyword arguments: command -> {argument: factory}.
PROVIDERS: dict[str, dict[str, Callable[[], Any]]] = {"eval": {"cam_provider": _cam_provider}}


def _load(name: str) -> ModuleType:
    module_name, _ = COMMANDS[name]
    try:
        with require_extra(*EXTRA_MODULES, what=f"'sdde {name}' needs an optional module"):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # not an extra's: a broken install
        raise UserError(f"'sdde {name}' needs the missing module {exc.name!r}") from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="sdde",
        description="Saliency-Diversified Deep Ensembles: train, export, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"sdde-serve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            module = _load(name)
            p.description = module.HELP
            p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
            module.add_arguments(p)
            p.set_defaults(_main=partial(module.main, **PROVIDERS.get(name, {})))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        args.command_line = argv  # as typed: `sdde score` prints it back to resume with
        if args.command is None:
            parser.print_help()
            return 2
        return int(args._main(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted", file=sys.stderr)  # a job says how to continue
        return 130


if __name__ == "__main__":
    sys.exit(main())
