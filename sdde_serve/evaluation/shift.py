"""``sdde eval --shift``: accuracy, calibration and the OOD flag under corruption shift.

The paper's Table 5 (CIFAR-10-C / CIFAR-100-C): the ID test images are corrupted
(:mod:`sdde_serve.evaluation.corruptions`) at severities 1-5 and run through the deployed graph.
For each corruption and severity: accuracy, NLL, ECE and Brier of the calibrated probabilities
(the manifest's T, as served), the **flag rate** (fraction with ``score < threshold`` under the
manifest's rule: it should rise with severity rather than confidence staying high on wrong answers)
and **AUROC(correct vs wrong)** of the deployed OOD score (correct predictions are the positive
class: can the score tell the model's errors on shifted data apart?). Severity 0 is the clean data.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve import scoring
from sdde_serve.data import ArrayDataset
from sdde_serve.engine import Engine
from sdde_serve.errors import UserError
from sdde_serve.evaluation import corruptions as corr
from sdde_serve.evaluation.metrics import auroc
from sdde_serve.evaluation.plotting import pyplot, save
from sdde_serve.evaluation.section import Context, Loader, block_section

SCHEMA_KEY = "shift"
METRICS = ("accuracy", "confidence", "nll", "ece", "brier", "flag_rate", "auroc_correct")
LABELS = {
    "accuracy": "accuracy (%)",
    "confidence": "mean confidence (%)",
    "nll": "NLL",
    "ece": "ECE (%)",
    "brier": "Brier",
    "flag_rate": "OOD-flag rate (%)",
    "auroc_correct": "AUROC correct vs wrong (%)",
}
PERCENT = {"accuracy", "confidence", "ece", "flag_rate", "auroc_correct"}


@dataclass(frozen=True)
class ShiftConfig:
    corruptions: tuple[str, ...] = corr.DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = corr.SEVERITIES
    seed: int = 0
    max_images: int = 0  # 0: every ID test image; else a seeded random subset of this many


def shift_metrics(
    probs: np.ndarray, labels: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """The numbers of one (corruption, severity) cell; AUROC is None without errors.

    ``confidence`` (mean max probability) next to ``accuracy`` tells over- from under-confidence,
    which ECE alone does not.
    """
    correct = np.asarray(probs).argmax(axis=1) == labels
    separable = 0 < correct.sum() < len(correct)
    return {
        "accuracy": cal.accuracy(probs, labels),
        "confidence": float(np.asarray(probs).max(axis=1).mean()),
        "nll": cal.nll(probs, labels),
        "ece": cal.ece(probs, labels, n_bins=15),
        "brier": cal.brier(probs, labels),
        "flag_rate": float(np.mean(np.asarray(scores) < threshold)),
        "auroc_correct": auroc(scores[correct], scores[~correct]) if separable else None,
    }


def _mean(cells: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Unweighted mean of each metric over cells, skipping undefined (None) values."""
    out: dict[str, float | None] = {}
    for k in METRICS:
        values = [c[k] for c in cells if c[k] is not None]
        out[k] = float(np.mean(values)) if values else None
    return out


def parse_corruptions(text: str) -> tuple[str, ...]:
    """``"default"``, ``"all"``, a family name or a comma list of corruptions/families."""
    names: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if item == "default":
            names += corr.DEFAULT_CORRUPTIONS
        elif item == "all":
            names += corr.CORRUPTIONS
        elif item in corr.FAMILIES:
            names += [n for n, c in corr.CORRUPTIONS.items() if c.family == item]
        elif item in corr.CORRUPTIONS:
            names.append(item)
        else:
            choices = ", ".join(["default", "all", *corr.FAMILIES, *corr.CORRUPTIONS])
            raise UserError(f"--corruptions: unknown corruption {item!r} (choose from {choices})")
    return tuple(dict.fromkeys(names))


def parse_severities(text: str) -> tuple[int, ...]:
    try:
        values = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--severities {text!r}: expected integers 1..5, e.g. 1,3,5") from None
    if not values or values[0] < 1 or values[-1] > 5:
        raise UserError(f"--severities {text!r}: severities run from 1 to 5")
    return tuple(values)


def evaluate_shift(
    engine: Engine,
    id_data: ArrayDataset,
    config: ShiftConfig = ShiftConfig(),
    *,
    batch_size: int = 256,
    corrupted: Callable[[np.ndarray, str, int], np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The ``shift`` block of metrics.json for ``engine`` on corrupted copies of ``id_data``.

    ``corrupted(images, name, severity)`` replaces :func:`corruptions.corrupt` (seeded with
    ``config.seed``), e.g. to reuse corrupted sets across models in a benchmark.
    """
    manifest = engine.manifest
    data, labels = _shift_data(id_data, config, manifest.num_classes)
    threshold = float(manifest.ood.threshold)

    def make(name: str, severity: int) -> np.ndarray:
        if corrupted is not None:
            return corrupted(data.images, name, severity)
        return corr.corrupt(data.images, name, severity, seed=config.seed)

    def cell(images: np.ndarray) -> dict[str, float | None]:
        shifted = ArrayDataset(data.name, images, labels, list(data.classes), data.model_ready)
        out = engine.run_batches(
            shifted.as_model_input(*engine.input_shape, manifest.input.transform), batch_size
        )
        return shift_metrics(out.probs, labels, scoring.deployed_score(out, manifest), threshold)

    clean = cell(data.images)
    per_corruption: dict[str, dict[str, dict]] = {}
    for name in config.corruptions:
        if progress:
            progress(name)
        per_corruption[name] = {str(s): cell(make(name, s)) for s in config.severities}
    return {
        "corruptions": list(config.corruptions),
        "families": corr.families(config.corruptions),
        "severities": list(config.severities),
        "seed": config.seed,
        "n": len(data),
        "score": manifest.ood.score,
        "threshold": threshold,
        "id_acceptance": float(manifest.ood.id_acceptance),
        "temperature": float(manifest.temperature),
        "implementation": "sdde_serve.evaluation.corruptions (CIFAR-10-C parameters)",
        "metrics": list(METRICS),
        "clean": clean,
        **_aggregates(per_corruption, config),
    }


def _shift_data(
    id_data: ArrayDataset, config: ShiftConfig, num_classes: int
) -> tuple[ArrayDataset, np.ndarray]:
    """The (subsampled) ID data to corrupt and its labels, after checking data and config."""
    if id_data.labels is None or len(id_data) == 0:
        raise UserError(f"--shift needs labelled ID test data ({id_data.name} has none)")
    unknown = [c for c in config.corruptions if c not in corr.CORRUPTIONS]
    if unknown or not config.corruptions:
        raise UserError(f"--corruptions: none given, or unknown: {', '.join(unknown)}")
    if not config.severities or not set(config.severities) <= set(corr.SEVERITIES):
        raise UserError(f"--severities {config.severities}: severities run from 1 to 5")
    data = id_data
    if 0 < config.max_images < len(id_data):
        rng = np.random.default_rng(config.seed)
        data = id_data.subset(np.sort(rng.permutation(len(id_data))[: config.max_images]))
    labels = np.asarray(data.labels, np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(
            f"{id_data.name}: labels run from {labels.min()} to {labels.max()} "
            f"but the model has {num_classes} classes"
        )
    return data, labels


def _aggregates(per_corruption: dict[str, dict[str, dict]], config: ShiftConfig) -> dict:
    """Unweighted means of the cells: per family, per severity and over everything."""
    sev = [str(s) for s in config.severities]
    return {
        "per_corruption": per_corruption,
        "per_family": {
            f: {s: _mean([per_corruption[n][s] for n in names]) for s in sev}
            for f, names in corr.families(config.corruptions).items()
        },
        "per_severity": {s: _mean([per_corruption[n][s] for n in config.corruptions]) for s in sev},
        "mean": _mean([c for by_sev in per_corruption.values() for c in by_sev.values()]),
    }


# --- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shift",
        action="store_true",
        help="also evaluate under corruption shift: the ID test data corrupted at each severity "
        "(accuracy, NLL, ECE, Brier, OOD-flag rate, AUROC of the OOD score for correct vs wrong)",
    )
    parser.add_argument(
        "--corruptions",
        default="default",
        metavar="LIST",
        help="comma list of corruptions or families (noise, blur, weather, digital); 'default' "
        f"= {len(corr.DEFAULT_CORRUPTIONS)} of the 15 CIFAR-10-C ones (no snow, frost), 'all' "
        "adds speckle_noise and gaussian_blur",
    )
    parser.add_argument(
        "--severities", default="1,2,3,4,5", metavar="LIST", help="comma list of severities 1..5"
    )
    parser.add_argument(
        "--shift-seed", type=int, default=0, metavar="N", help="seed of the corruptions"
    )
    parser.add_argument(
        "--shift-images",
        type=int,
        default=0,
        metavar="N",
        help="corrupt a seeded random subset of this many ID test images (0: all)",
    )


def config_from_args(args: argparse.Namespace) -> ShiftConfig | None:
    if not args.shift:
        return None
    if args.shift_images < 0:
        raise UserError("--shift-images must be >= 0")
    return ShiftConfig(
        corruptions=parse_corruptions(args.corruptions),
        severities=parse_severities(args.severities),
        seed=args.shift_seed,
        max_images=args.shift_images,
    )


# --- report -------------------------------------------------------------------------------------


def _fmt(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.2f}" if metric in PERCENT else f"{value:.4f}"


def _row(label: str, cell: dict[str, float | None]) -> str:
    return f"| {label} | " + " | ".join(_fmt(k, cell[k]) for k in METRICS) + " |"


def render_markdown(shift: dict[str, Any]) -> list[str]:
    header = "| | " + " | ".join(LABELS[k] for k in METRICS) + " |"
    rule = "|" + "---|" * (len(METRICS) + 1)
    lines = [
        "## Corruption shift",
        "",
        f"{shift['n']} ID test images corrupted with {len(shift['corruptions'])} corruptions "
        f"({', '.join(shift['corruptions'])}) at severities "
        f"{', '.join(map(str, shift['severities']))}; seed {shift['seed']}; CIFAR-10-C severity "
        "parameters (`sdde_serve.evaluation.corruptions`). Probabilities at the manifest's "
        f"T = {shift['temperature']:.4g}. Flag rate: fraction with `{shift['score']} < "
        f"{shift['threshold']:.4g}` (the deployed rule, which accepts "
        f"{100 * shift['id_acceptance']:.0f}% of the ID validation data). AUROC correct vs "
        f"wrong: the deployed `{shift['score']}` score separating correct (positive) from wrong "
        "predictions. Rows are unweighted means over corruptions.",
        "",
        "### By severity (mean over corruptions)",
        "",
        header,
        rule,
        _row("clean (0)", shift["clean"]),
        *[_row(f"severity {s}", c) for s, c in shift["per_severity"].items()],
        _row("**mean 1-5**", shift["mean"]),
        "",
        "### By corruption (mean over severities)",
        "",
        header.replace("| |", "| corruption (family) |", 1),
        rule,
    ]
    for name, by_sev in shift["per_corruption"].items():
        family = corr.CORRUPTIONS[name].family if name in corr.CORRUPTIONS else "?"
        lines.append(_row(f"{name} ({family})", _mean(list(by_sev.values()))))
    sev = [str(s) for s in shift["severities"]]
    lines += [
        "",
        "### Accuracy / ECE (%) by family and severity",
        "",
        "| family | " + " | ".join(f"severity {s}" for s in sev) + " |",
        "|" + "---|" * (len(sev) + 1),
    ]
    for fam, by_sev in shift["per_family"].items():
        cells = [
            f"{_fmt('accuracy', by_sev[s]['accuracy'])} / {_fmt('ece', by_sev[s]['ece'])}"
            for s in sev
        ]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _series(shift: dict[str, Any], by_sev: dict[str, dict], metric: str) -> tuple[list, list]:
    xs, ys = [0], [shift["clean"][metric]]
    for s in shift["severities"]:
        xs.append(s)
        ys.append(by_sev[str(s)][metric])
    scale = 100.0 if metric in PERCENT else 1.0
    return xs, [np.nan if y is None else scale * y for y in ys]


def plot_metrics(shift: dict[str, Any], path: Path) -> Path:
    """Rows: accuracy, NLL, ECE, Brier; columns: families; lines per corruption, family mean."""
    plt = pyplot()
    fams = shift["families"]
    rows = ("accuracy", "nll", "ece", "brier")
    fig, axes = plt.subplots(
        len(rows), len(fams), figsize=(3.3 * len(fams), 2.4 * len(rows)), squeeze=False
    )
    for c, (fam, names) in enumerate(fams.items()):
        for r, metric in enumerate(rows):
            ax = axes[r, c]
            for name in names:
                ax.plot(
                    *_series(shift, shift["per_corruption"][name], metric),
                    marker=".",
                    linewidth=1,
                    label=name,
                )
            ax.plot(
                *_series(shift, shift["per_family"][fam], metric),
                color="black",
                linewidth=2.2,
                label=f"{fam} mean",
            )
            ax.set_xticks([0, *shift["severities"]])
            if r == 0:
                ax.set_title(fam)
                ax.legend(fontsize=6, loc="lower left")
            if c == 0:
                ax.set_ylabel(LABELS[metric])
            if r == len(rows) - 1:
                ax.set_xlabel("severity (0 = clean)")
    fig.suptitle(f"corruption shift: {shift['n']} ID test images, T = {shift['temperature']:.3g}")
    return save(fig, path)


def plot_flag_rate(shift: dict[str, Any], path: Path) -> Path:
    """OOD-flag rate and AUROC(correct vs wrong) of the deployed score against severity."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("flag_rate", "auroc_correct"), strict=True):
        for fam in shift["families"]:
            ax.plot(*_series(shift, shift["per_family"][fam], metric), marker="o", label=fam)
        ax.plot(
            *_series(shift, shift["per_severity"], metric),
            color="black",
            linewidth=2.2,
            label="all corruptions",
        )
        ax.set_xticks([0, *shift["severities"]])
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel(LABELS[metric])
    axes[0].axhline(
        100 * (1 - shift["id_acceptance"]),
        color="grey",
        linestyle="--",
        linewidth=1,
        label="expected on ID data",
    )
    axes[0].set_title(f"flagged as OOD ({shift['score']} < {shift['threshold']:.3g})")
    axes[1].set_title(f"{shift['score']}: correct vs wrong predictions")
    axes[0].legend(fontsize=8, loc="upper left")
    return save(fig, path)


def write_plots(shift: dict[str, Any], out: Path) -> list[Path]:
    return [
        plot_metrics(shift, out / "shift_metrics.png"),
        plot_flag_rate(shift, out / "shift_flag_rate.png"),
    ]


def summary(shift: dict[str, Any] | None) -> list[str]:
    """Console lines for ``sdde eval``: clean vs mean-corrupted vs worst severity."""
    if not shift:
        return []
    worst = shift["per_severity"][str(shift["severities"][-1])]
    cells = (
        ("clean", shift["clean"]),
        ("mean", shift["mean"]),
        (f"sev {shift['severities'][-1]}", worst),
    )
    return [
        f"shift {label:>6}: "
        + "  ".join(
            f"{k} {_fmt(k, cell[k])}"
            for k in ("accuracy", "confidence", "ece", "flag_rate", "auroc_correct")
        )
        for label, cell in cells
    ]


# --- the report section -------------------------------------------------------------------------


def _compute(ctx: Context, config: ShiftConfig) -> dict[str, Any]:
    progress = lambda name: ctx.report(f"shift: {name}")  # noqa: E731
    block = evaluate_shift(
        ctx.engine, ctx.id_data, config, batch_size=ctx.batch_size, progress=progress
    )
    return {SCHEMA_KEY: block}


def _configure(args: argparse.Namespace, load: Loader) -> ShiftConfig | None:
    return config_from_args(args)


SECTION = block_section(
    SCHEMA_KEY,
    _compute,
    render_markdown,
    write_plots,
    summary,
    add_arguments=add_arguments,
    configure=_configure,
)
