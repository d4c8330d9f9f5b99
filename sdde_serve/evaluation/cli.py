"""``sdde eval``: accuracy, calibration, OOD detection, diversity and a report for an ONNX file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdde_serve.deprecation import add_deprecated_alias
from sdde_serve.probe import add_probe_argument

if TYPE_CHECKING:
    from sdde_serve.engine import Engine
    from sdde_serve.evaluation.evaluate import CamFn

# (run_dir, engine) -> the member CAMs of that run's checkpoint for the engine's images (GradCAM:
# needs torch). The composition root (sdde_serve/cli.py) hands main a factory of one, so that this
# torch-free package never names the layer above it.
CamProvider = Callable[[str, "Engine"], "CamFn"]

HELP = "evaluate an exported model: accuracy, calibration, OOD metrics, diversity, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="exported ONNX file (with its sdde manifest)")
    parser.add_argument(
        "--data",
        required=True,
        help="in-distribution test data spec (default split: test), e.g. digits",
    )
    parser.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="an OOD data set (repeatable); labels, if any, are ignored",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=SET[,SET...]",
        help="average OOD sets into a group row, e.g. near=a,b (repeatable)",
    )
    parser.add_argument(
        "--out-dir",
        dest="out",
        default=None,  # required, checked in main: argparse would not count the old spelling
        metavar="DIR",
        help="directory for the report (metrics.json, report.md, plots); required",
    )
    # -o names an output *file* in every other command (score); a directory here was a trap
    add_deprecated_alias(parser, "-o", "--out", new="--out-dir", dest="out")
    parser.add_argument("--batch-size", type=int, default=256, help="images per onnxruntime call")
    parser.add_argument(
        "--cam-images",
        type=int,
        default=256,
        help="images per set for the CAM similarity (0: skip)",
    )
    parser.add_argument(
        "--cams-from-run",
        metavar="RUN_DIR",
        default=None,
        help="compute the member CAMs with GradCAM at the training saliency layer from the "
        "checkpoint of RUN_DIR (the run the model was exported from: best, else last, checked "
        "against the graph's logits), for the class of the graph's calibrated probs; overrides "
        "the graph's own cams output; needs the [train] extra (torch)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)"
    )
    add_probe_argument(parser)
    parser.add_argument(
        "--no-plots",
        action="store_true",
        help="write metrics.json and report.md only (no matplotlib needed)",
    )
    from sdde_serve.evaluation.sections import SECTIONS

    for section in SECTIONS:  # the optional analyses' flags (--shift, --members-sweep, ...)
        if section.add_arguments is not None:
            section.add_arguments(parser)


def main(args: argparse.Namespace, *, cam_provider: Callable[[], CamProvider] | None = None) -> int:
    """Run ``sdde eval``; ``cam_provider`` loads the ``--cams-from-run`` CAMs (torch) when asked."""
    from sdde_serve.data import load_dataset
    from sdde_serve.engine import Engine
    from sdde_serve.errors import UserError
    from sdde_serve.evaluation.evaluate import evaluate, parse_groups, parse_named_specs
    from sdde_serve.evaluation.plotting import pyplot
    from sdde_serve.evaluation.report import summary_lines, write_report
    from sdde_serve.evaluation.sections import SECTIONS

    if args.out is None:
        raise UserError("the report directory is required: --out-dir DIR")
    if args.batch_size < 1 or args.cam_images < 0 or args.threads < 0:
        raise UserError("--batch-size must be >= 1, --cam-images and --threads >= 0")
    ood_specs = parse_named_specs(args.ood, "--ood")
    groups = parse_groups(args.group, list(ood_specs))
    if not args.no_plots:
        pyplot()  # a missing matplotlib fails now, not after minutes of inference
    if args.cams_from_run and cam_provider is None:
        raise UserError("--cams-from-run needs a CAM provider (run it as `sdde eval`)")
    # before the slow part, so that a missing torch fails at once
    cam_fn_for_model = cam_provider() if args.cams_from_run and cam_provider else None
    engine = Engine(args.model, intra_op_threads=args.threads, probe_check=args.probe_check)
    cam_fn = cam_fn_for_model(args.cams_from_run, engine) if cam_fn_for_model else None

    def load(spec: str) -> Any:  # folders of files are decoded as the server decodes them
        return load_dataset(spec, split="test", model=engine.manifest.input)

    id_data = load(args.data)
    ood_data = {name: load(spec) for name, spec in ood_specs.items()}
    # every optional analysis's flags checked and its data loaded before the slow part
    configs = {s.name: s.configure(args, load) for s in SECTIONS if s.configure is not None}
    evaluation = evaluate(
        engine,
        id_data,
        ood_data,
        groups=groups,
        id_spec=args.data,
        ood_specs=ood_specs,
        batch_size=args.batch_size,
        cam_images=args.cam_images,
        cam_fn=cam_fn,
        configs=configs,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    written = write_report(evaluation, args.out, plots=not args.no_plots)
    for line in summary_lines(evaluation.metrics):
        print(line)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
