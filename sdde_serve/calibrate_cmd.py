"""``sdde calibrate``: refit the temperature and the OOD threshold of an exported model.

The command only: the library (fit T and the conformal OOD rule on the graph's own outputs,
rewrite the file) is :mod:`sdde_serve.calibrate`, which ``sdde export`` also uses. numpy + onnx +
onnxruntime only: this must work where PyTorch is not installed (a test imports this module with
``torch`` blocked).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdde_serve.calibrate import SCORE_KINDS, calibrate_file, decision_lines

HELP = (
    "refit the temperature (applied only when cross-validation shows it helps) and the "
    "conformal OOD calibration set and threshold of an exported model on labelled held-out "
    "data (onnxruntime + numpy; rewrites the file atomically)"
)
# `sdde` shows defaults in --help; a zero-width "%(default)" field stops it from appending
# "(default: None)" where the help text already says what None means
NO_AUTO_DEFAULT = "%(default).0s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="exported ONNX file (rewritten in place)")
    parser.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="labelled data spec (digits@test, an IDX dir, a class-folder dir, a .npz; "
        "default split: test)" + NO_AUTO_DEFAULT,
    )
    parser.add_argument(
        "--id-acceptance",
        type=float,
        default=None,
        help="fraction of these images the OOD threshold accepts (default: the manifest's)"
        + NO_AUTO_DEFAULT,
    )
    parser.add_argument(
        "--score",
        choices=SCORE_KINDS,
        default=None,
        help="OOD score the threshold applies to (default: the manifest's)" + NO_AUTO_DEFAULT,
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per onnxruntime call")


def main(args: argparse.Namespace) -> int:
    info, ood = calibrate_file(
        args.model,
        args.data,
        id_acceptance=args.id_acceptance,
        score=args.score,
        batch_size=args.batch_size,
    )
    b, a = info.before, info.after
    print(f"calibrated {args.model} on {info.data} ({info.n} images)")
    print(f"  temperature  {info.temperature:.4f}")
    print(f"  accuracy     {a.accuracy:.4f}")
    print(f"  NLL          {b.nll:.4f} -> {a.nll:.4f}")
    print(f"  ECE          {b.ece:.4f} -> {a.ece:.4f}")
    for line in decision_lines(info, ood):
        print(f"  {line}")
    if info.warning:
        print(f"warning: {info.warning}")
    return 0
