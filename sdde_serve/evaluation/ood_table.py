"""Report section: OOD detection per set and group for every score, and the deployed rule.

Also the score table itself (which scores an evaluation computes from the graph's outputs), as
:mod:`.evaluate` scores every data set with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve import scores
from sdde_serve.engine import EngineOutput
from sdde_serve.evaluation.metrics import OOD_METRICS, mean_metrics, ood_metrics, roc_curve
from sdde_serve.evaluation.plotting import pyplot, save
from sdde_serve.evaluation.results import Evaluation
from sdde_serve.evaluation.section import Context, Section, pct
from sdde_serve.scoring import score_of

METRIC_LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "fpr95": "FPR@95"}


def _msp_avg_logits(out: EngineOutput, temperature: float) -> np.ndarray:
    return cal.softmax(np.asarray(out.logits, np.float64).mean(axis=1)).max(axis=1)


def _graph_score(name: str) -> Callable[[EngineOutput, float], np.ndarray | None]:
    def score(out: EngineOutput, temperature: float) -> np.ndarray | None:
        if out.score(name) is None and not scores.get(name).recompute_from_logits:
            return None  # not in this graph (a KNN bank, fitted statistics: chosen at export)
        return score_of(out, name)

    return score


def score_table() -> dict[str, Callable[[EngineOutput, float], np.ndarray | None]]:
    """OOD scores, all "higher = more in-distribution": every registered score the graph has
    (sdde_serve/scores/; ``msp`` at the manifest's temperature; ``minmax`` recomputed from the
    logits of graphs exported before it was an output; ``knn`` only in graphs with a KNN bank),
    then ``msp_avg_logits``, the official code's other aggregation (MSP of the member-averaged
    logits at T = 1), computed here from the graph's member logits."""
    return {
        **{n: _graph_score(n) for n in scores.names()},
        "msp_avg_logits": _msp_avg_logits,
    }


def score_descriptions() -> dict[str, str]:
    return {
        **{n: f"{s.summary} (graph output)" for n, s in scores.SCORES.items()},
        "msp": "max of mean over members of softmax(logits / T) (graph output)",
        "minmax": "min over members of the member's max logit (official code; graph output)",
        "msp_avg_logits": "max of softmax(member-averaged logits), T = 1 (official code)",
    }


# the built-in scores' table (what a report of an older metrics file falls back to)
SCORES = score_table()
PRIMARY_SCORES = ("mal", "msp")


def compute(ctx: Context, config: None) -> dict[str, Any]:
    """The ``ood`` entry (every score on every set and group) and the deployed rule's
    ``operating_point``."""
    ev, manifest = ctx.evaluation, ctx.engine.manifest
    id_scores = ev.id_set.scores
    score_names = [k for k in score_table() if k in id_scores]  # knn only with a bank
    per_set = {
        s.name: {k: ood_metrics(id_scores[k], s.scores[k]) for k in score_names}
        for s in ev.ood_sets
    }
    per_group = {
        g: {k: mean_metrics([per_set[n][k] for n in names]) for k in score_names}
        for g, names in ev.groups.items()
    }
    thr, kind = float(manifest.ood.threshold), manifest.ood.score
    knn = None if manifest.knn is None else {"k": manifest.knn.k, "rows": manifest.knn.rows}
    return {
        "ood": {
            "metrics": list(OOD_METRICS),
            "scores": score_names,
            "deployed": kind,
            "knn": knn,
            "sets": per_set,
            "groups": per_group,
        },
        "operating_point": {
            "score": kind,
            "threshold": thr,
            "id_acceptance": float(np.mean(id_scores[kind] >= thr)),
            "ood_rejection": {s.name: float(np.mean(s.scores[kind] < thr)) for s in ev.ood_sets},
        },
    }


def _table(m: dict, score: str) -> list[str]:
    header = "| OOD set | " + " | ".join(METRIC_LABELS.values()) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_LABELS) + 1)]
    for name, by_score in m["ood"]["sets"].items():
        lines.append(
            f"| {name} | " + " | ".join(pct(by_score[score][k]) for k in METRIC_LABELS) + " |"
        )
    for name, by_score in m["ood"]["groups"].items():
        members = ", ".join(m["groups"][name])
        lines.append(
            f"| **{name}** (mean of {members}) | "
            + " | ".join(pct(by_score[score][k]) for k in METRIC_LABELS)
            + " |"
        )
    return lines


def markdown(m: dict[str, Any]) -> list[str]:
    if not m["ood"]["sets"]:
        return []
    lines = ["## OOD detection", ""]
    for score in m["ood"].get("scores", SCORES):
        lines += [
            f"### Score: {score} — {m['conventions']['scores'][score]}",
            "",
            *_table(m, score),
            "",
        ]
    op = m["operating_point"]
    return [
        *lines,
        f"Deployed rule (manifest): OOD when `{op['score']} < {op['threshold']:.4g}`. On this "
        f"ID test data it accepts {pct(op['id_acceptance'])}% of ID images; it rejects "
        + ", ".join(f"{pct(v)}% of {k}" for k, v in op["ood_rejection"].items())
        + ".",
        "",
    ]


def plot_histograms(evaluation: Evaluation, score: str, path: Path) -> Path:
    sets = evaluation.ood_sets
    fig, axes = pyplot().subplots(1, len(sets), figsize=(4 * len(sets), 3.2), squeeze=False)
    id_scores = evaluation.id_set.scores[score]
    op = evaluation.metrics["operating_point"]
    for ax, s in zip(axes[0], sets, strict=True):
        both = np.concatenate([id_scores, s.scores[score]])
        edges = np.histogram_bin_edges(both, bins=40)
        ax.hist(id_scores, bins=edges, density=True, alpha=0.6, label="ID", color="tab:blue")
        ax.hist(
            s.scores[score], bins=edges, density=True, alpha=0.6, label=s.name, color="tab:orange"
        )
        if op["score"] == score:
            ax.axvline(
                op["threshold"],
                color="black",
                linestyle="--",
                linewidth=1,
                label="deployed threshold",
            )
        auroc = evaluation.metrics["ood"]["sets"][s.name][score]["auroc"]
        ax.set_title(f"{score.upper()}: ID vs {s.name} (AUROC {100 * auroc:.1f})")
        ax.set_xlabel(f"{score} (higher = more in-distribution)")
        ax.legend(fontsize=8, loc="upper left")  # loc="best" searches all points: slow
    return save(fig, path)


def plot_roc(evaluation: Evaluation, score: str, path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(4.8, 4.5))
    for s in evaluation.ood_sets:
        fpr, tpr = roc_curve(evaluation.id_set.scores[score], s.scores[score])
        auroc = evaluation.metrics["ood"]["sets"][s.name][score]["auroc"]
        ax.plot(fpr, tpr, label=f"{s.name} (AUROC {100 * auroc:.1f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("FPR (OOD accepted)")
    ax.set_ylabel("TPR (ID accepted; ID = positive)")
    ax.set_title(f"ROC, score = {score.upper()}")
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, path)


def plots(evaluation: Evaluation, out: Path) -> list[Path]:
    """Score histograms and ROC curves of the primary scores and the deployed one."""
    if not evaluation.ood_sets:
        return []
    written = []
    deployed = evaluation.metrics["operating_point"]["score"]
    for score in dict.fromkeys([*PRIMARY_SCORES, deployed]):
        written.append(plot_histograms(evaluation, score, out / f"hist_{score}.png"))
        written.append(plot_roc(evaluation, score, out / f"roc_{score}.png"))
    return written


def summary(m: dict[str, Any]) -> list[str]:
    """AUROC / FPR@95 per set and group for every score but ``msp_avg_logits``."""
    names = [s for s in m["ood"]["scores"] if s != "msp_avg_logits"]
    lines = []
    if m["ood"]["sets"]:
        lines.append(f"OOD (deployed: {m['ood']['deployed']}), AUROC / FPR@95 %:")
        lines.append(f"{'':>16}  " + "  ".join(f"{s:>13}" for s in names))
    for name, by_score in {**m["ood"]["sets"], **m["ood"]["groups"]}.items():
        cells = [
            f"{100 * by_score[s]['auroc']:6.2f}/{100 * by_score[s]['fpr95']:6.2f}" for s in names
        ]
        lines.append(f"{name:>16}: " + "  ".join(cells))
    return lines


SECTION = Section("ood", compute, markdown, plots, summary)
