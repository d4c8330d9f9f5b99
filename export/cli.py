"""``sdde export RUN_DIR -o model.onnx``: one verified ONNX file with its manifest.

``add_arguments`` imports no torch (``sdde export --help`` stays fast); ``main`` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.select import SCORE_CHOICES as SCORE_CHOICES
from export.select import score_choices
from sdde_serve import scores

if TYPE_CHECKING:
    from export.quantize import PrecisionOptions
    from sdde_serve.manifest import Manifest

HELP = (
    "Fuse a trained run into one ONNX graph (all members in one session.run), calibrate its "
    "temperature and OOD threshold on the run's validation split, verify it against PyTorch "
    "and write it with its manifest."
)
# kept in sync with export.layouts.LAYOUTS (a test checks); listed here so --help needs no torch
LAYOUT_CHOICES = ("loop", "packed")
# kept in sync with export.knn's default (a test checks); the score choices come from the
# registry (export.select.score_choices: numpy only, so --help still needs no torch)
DEFAULT_BANK_ROWS = 10_000
# kept in sync with export.quantize.PRECISIONS (a test checks)
PRECISION_CHOICES = ("fp32", "int8", "bf16", "fp16")
# `sdde` shows defaults in --help; a zero-width "%(default)" field stops it from appending
# "(default: None)" where the help text already says what None means
NO_AUTO_DEFAULT = "%(default).0s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # one function per group of flags; the order of the calls is the order --help lists them
    add_run_arguments(parser)
    add_score_arguments(parser)
    add_knn_arguments(parser)
    add_model_arguments(parser)
    add_precision_arguments(parser)
    parser.add_argument(
        "--triton-repo",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write a Triton model repository entry for the exported file under DIR"
        + NO_AUTO_DEFAULT,
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What to export, where to, in which layout, at which ID acceptance."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory of sdde train")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="ONNX file to write" + NO_AUTO_DEFAULT
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUT_CHOICES,
        default=None,
        help="member layout in the graph (default: the faster one measured for the arch)"
        + NO_AUTO_DEFAULT,
    )
    parser.add_argument(
        "--id-acceptance",
        type=float,
        default=0.95,
        help="fraction of in-distribution validation images the OOD threshold accepts",
    )


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The deployed OOD score and the validation OOD data that choose it."""
    parser.add_argument(
        "--ood-score",
        "--score",
        dest="score",
        # read from the registry now: scores registered after this module's import count too
        choices=score_choices(),
        default="auto",
        help="deployed OOD score (higher = in-distribution): "
        + scores.help_lines()
        + "; or auto: the best mean AUROC against the --ood-val sets, without them against sets "
        "synthesized from the validation images (--synth-ood), and with --synth-ood none knn "
        "(the default measured by benchmarks/mnist_ood.py)",
    )
    parser.add_argument(
        "--with-score",
        dest="extra_scores",
        action="append",
        default=[],
        choices=scores.names(),
        metavar="NAME",
        help="also put this registered OOD score in the graph (repeatable; the deployed one "
        "always is): sdde eval then reports it beside the others",
    )
    parser.add_argument(
        "--ood-val",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="validation OOD data (repeatable; default split: train) for --ood-score auto and for "
        "comparing a --precision other than fp32 with fp32; never the sets you report results on",
    )
    parser.add_argument(
        "--synth-ood",
        default="default",
        metavar="KINDS",
        help="without --ood-val, auto ranks the scores on validation OOD data synthesized from the "
        "validation images: default (patch-shuffle, pixel-permute, mixup), all, none (deploy the "
        "fixed default score instead) or a comma-separated list of patch-shuffle, pixel-permute, "
        "corrupt, mixup (docs/export.md)",
    )


def add_knn_arguments(parser: argparse.ArgumentParser) -> None:
    """The KNN bank of training features and the k of the knn score."""
    parser.add_argument(
        "--knn-bank",
        type=int,
        default=DEFAULT_BANK_ROWS,
        metavar="N",
        help="most rows of the KNN bank: features of the run's training images, a seeded "
        "subsample stratified by class when there are more; memory rows x members x pre-logit "
        "width x 4 bytes (0: no knn output)",
    )
    parser.add_argument(
        "--knn-k",
        type=int,
        default=None,
        help="k of the knn score (default: chosen by auto on --ood-val, else one per 10,000 bank "
        "rows, at least 1)" + NO_AUTO_DEFAULT,
    )
    parser.add_argument(
        "--knn-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage of the bank in the file (float16: half the size; refused if it moves a "
        "validation score by more than 1e-3)",
    )
    parser.add_argument(
        "--knn-seed", type=int, default=0, help="seed of the bank's stratified subsample"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which weights, the model's name and version, the opset, the CAM output."""
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="which weights to export"
    )
    parser.add_argument(
        "--name", default=None, help="model name (default: the run dir's name)" + NO_AUTO_DEFAULT
    )
    parser.add_argument(
        "--model-version", default=None, help="model version (default: 1)" + NO_AUTO_DEFAULT
    )
    parser.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default: 17)" + NO_AUTO_DEFAULT
    )
    parser.add_argument(
        "--no-cams", action="store_true", help="leave out the class-activation-map output"
    )


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision (docs/export.md, Precision)")
    group.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="fp32",
        help="numeric precision of the member networks: int8 (static QDQ, for CPUs), fp16 (for "
        "the CUDA provider); T and the threshold are refitted on the converted graph and it is "
        "compared with fp32 on the validation split",
    )
    group.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.3,
        help="refuse a converted graph whose validation accuracy is this many points below fp32",
    )
    group.add_argument(
        "--max-auroc-drop",
        type=float,
        default=0.5,
        help="refuse a converted graph whose validation OOD AUROC (with --ood-val) is this many "
        "points below fp32",
    )
    group.add_argument(
        "--max-nll-increase",
        type=float,
        default=5.0,
        help="refuse a converted graph whose validation NLL is this many percent above fp32's",
    )
    group.add_argument(
        "--max-ece-increase",
        type=float,
        default=2.0,
        help="refuse a converted graph whose validation ECE is this many points above fp32's",
    )
    group.add_argument(
        "--calibration-images",
        type=int,
        default=512,
        help="training images (never validation) that int8 activation ranges are calibrated on",
    )


def precision_options(args: argparse.Namespace) -> PrecisionOptions:
    import dataclasses

    from export.quantize import PrecisionOptions
    from sdde_serve.data import load_dataset
    from sdde_serve.evaluation.evaluate import parse_named_specs

    specs = parse_named_specs(getattr(args, "ood_val", None), "--ood-val")
    return PrecisionOptions(
        precision=args.precision,
        max_accuracy_drop=args.max_accuracy_drop,
        max_auroc_drop=args.max_auroc_drop,
        max_nll_increase=args.max_nll_increase,
        max_ece_increase=args.max_ece_increase,
        calibration_images=args.calibration_images,
        # each set under the NAME the user gave it (recorded in the manifest as ood_data)
        ood_val=[
            dataclasses.replace(load_dataset(spec, split="train"), name=name)
            for name, spec in specs.items()
        ],
    )


def print_precision(manifest: Manifest) -> None:
    check = manifest.precision_check
    if check is None:
        return
    a, b = check.fp32, check.converted
    print(f"  precision {check.precision} vs fp32 on {check.data} ({check.n} images):")
    drop = 0.0 - check.accuracy_drop_points  # 0.0 - 0.0 prints +0.00, not -0.00
    print(f"    accuracy {a.accuracy:.4f} -> {b.accuracy:.4f} ({drop:+.2f} points)")
    print(
        f"    NLL {a.nll:.4f} -> {b.nll:.4f} ({check.nll_increase_percent:+.1f}%), "
        f"ECE {a.ece:.4f} -> {b.ece:.4f} ({check.ece_increase_points:+.2f} points)"
    )
    print(
        f"    labels agree on {check.label_agreement:.2%}; "
        f"max |logit diff| {check.max_abs_logit_diff:.3g}"
    )
    if check.auroc_drop_points is not None:
        print(
            f"    AUROC ({manifest.ood.score}) vs {check.ood_data} ({check.n_ood} images): "
            f"{a.auroc:.4f} -> {b.auroc:.4f} ({-check.auroc_drop_points:+.2f} points)"
        )
    if check.calibration_data:
        print(f"    int8 activation ranges from {check.calibration_data}")


def main(args: argparse.Namespace) -> int:
    from export import export_run

    manifest = export_run(args.run_dir, args.output, **export_options(args))
    print_summary(args.output, manifest)
    if args.triton_repo is not None:
        from sdde_serve.triton import write_triton_repo

        model_dir = write_triton_repo(args.output, args.triton_repo, name=manifest.name)
        print(f"  Triton model repository entry: {model_dir}")
    return 0


def export_options(args: argparse.Namespace) -> dict[str, Any]:
    """``export_run``'s keyword arguments from the parsed flags (bad values raise UserError)."""
    from export.synth_ood import parse_kinds
    from sdde_serve.evaluation.evaluate import parse_named_specs

    return dict(
        layout=args.layout,
        id_acceptance=args.id_acceptance,
        checkpoint=args.checkpoint,
        name=args.name,
        version=args.model_version,
        with_cams=not args.no_cams,
        opset=args.opset,
        score=args.score,
        ood_val=parse_named_specs(args.ood_val, "--ood-val"),
        knn_k=args.knn_k,
        knn_bank=args.knn_bank,
        knn_dtype=args.knn_dtype,
        knn_seed=args.knn_seed,
        precision=precision_options(args),
        synth_ood=parse_kinds(args.synth_ood),
        extra_scores=tuple(args.extra_scores),
    )


def print_summary(output: Path, manifest: Manifest) -> None:
    """What was written: the model, its validation calibration, the OOD decision, the score's
    choice, the KNN bank and the precision check."""
    from sdde_serve.calibrate import decision_lines

    cal = manifest.calibration
    print(
        f"wrote {output}: {manifest.name} v{manifest.version}, {manifest.arch} x"
        f"{manifest.members}, layout {manifest.layout}, opset {manifest.opset}, "
        f"outputs {', '.join(manifest.outputs)}"
    )
    print(
        f"  validation ({cal.data}, {cal.n} images): accuracy {cal.after.accuracy:.4f}, "
        f"NLL {cal.before.nll:.4f} -> {cal.after.nll:.4f}, "
        f"ECE {cal.before.ece:.4f} -> {cal.after.ece:.4f} at T = {cal.temperature:.4f}"
    )
    for line in decision_lines(cal, manifest.ood):
        print(f"  {line}")
    print_score_choice(manifest)
    if manifest.knn is not None:
        knn = manifest.knn
        print(
            f"  KNN bank: {knn.rows} x {knn.dims} {knn.dtype} ({knn.memory_bytes / 1e6:.1f} MB), "
            f"k = {knn.k}, from the {knn.source}"
        )
    print_precision(manifest)
    if cal.warning:
        print(f"warning: {cal.warning}")


def print_score_choice(manifest: Manifest) -> None:
    why = manifest.ood.selection
    if why is None:
        return
    print(f"  score chosen: {why.method} ({why.reason})")
    for name, auroc in sorted(why.val_auroc.items(), key=lambda kv: -kv[1]):
        fpr = why.val_fpr95.get(name)
        tail = "" if fpr is None else f", FPR@95 {100 * fpr:.2f}"
        print(f"    validation AUROC {name:>11}: {100 * auroc:.2f}{tail}")
