"""Report section: accuracy and calibration on the ID test data, before and after temperature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve.evaluation.plotting import pyplot, save
from sdde_serve.evaluation.results import Evaluation
from sdde_serve.evaluation.section import Context, Section, num, pct

ECE_BINS = 15


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": cal.accuracy(probs, labels),
        "nll": cal.nll(probs, labels),
        "ece": cal.ece(probs, labels, n_bins=ECE_BINS),
        "brier": cal.brier(probs, labels),
    }


def compute(ctx: Context, config: None) -> dict[str, Any]:
    ev = ctx.evaluation
    member_acc = (ev.id_set.logits.argmax(axis=2) == ev.labels[:, None]).mean(axis=0)
    return {
        "classification": {
            "before": classification_metrics(ev.probs_before, ev.labels),
            "after": classification_metrics(ev.probs_after, ev.labels),
            "members": {"accuracy": [float(a) for a in member_acc]},
        }
    }


def markdown(m: dict[str, Any]) -> list[str]:
    cls = m["classification"]
    lines = [
        "## Classification and calibration (ID test data)",
        "",
        "| | accuracy (%) | NLL | ECE (%) | Brier |",
        "|---|---|---|---|---|",
    ]
    for when in ("before", "after"):
        c = cls[when]
        lines.append(
            f"| {when} calibration | {pct(c['accuracy'])} | {num(c['nll'])} | "
            f"{pct(c['ece'])} | {num(c['brier'])} |"
        )
    accs = cls["members"]["accuracy"]
    return [
        *lines,
        "",
        "Per-member accuracy (%): "
        + ", ".join(f"member {i}: {pct(a)}" for i, a in enumerate(accs))
        + f"; ensemble: {pct(cls['after']['accuracy'])}.",
        "",
    ]


def _reliability_panel(ax: Any, probs: np.ndarray, labels: np.ndarray, title: str) -> None:
    bins = cal.reliability_bins(probs, labels, n_bins=ECE_BINS)
    edges, count = bins["edges"], bins["count"]
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    used = count > 0
    ax.bar(
        centers[used],
        bins["accuracy"][used],
        width=width[used],
        edgecolor="black",
        color="tab:blue",
        alpha=0.8,
        label="accuracy",
    )
    ax.bar(
        centers[used],
        bins["confidence"][used] - bins["accuracy"][used],
        bottom=bins["accuracy"][used],
        width=width[used],
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ece = cal.ece(probs, labels, n_bins=ECE_BINS)
    ax.set_title(f"{title}\nECE = {100 * ece:.2f}%")
    ax.set_xlabel("confidence (max ensemble probability)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def plot_reliability(evaluation: Evaluation, path: Path) -> Path:
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 4.2), sharey=True)
    t = evaluation.metrics["model"]["temperature"]
    for ax, probs, title in (
        (axes[0], evaluation.probs_before, "before calibration (T = 1)"),
        (axes[1], evaluation.probs_after, f"after calibration (T = {t:.3g})"),
    ):
        _reliability_panel(ax, probs, evaluation.labels, title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return save(fig, path)


def plots(evaluation: Evaluation, out: Path) -> list[Path]:
    return [plot_reliability(evaluation, out / "reliability.png")]


def summary(m: dict[str, Any]) -> list[str]:
    after = m["classification"]["after"]
    return [
        f"accuracy {100 * after['accuracy']:.2f}%  NLL {after['nll']:.4f}  "
        f"ECE {100 * after['ece']:.2f}%  (T = {m['model']['temperature']:.3g})"
    ]


SECTION = Section("classification", compute, markdown, plots, summary)
