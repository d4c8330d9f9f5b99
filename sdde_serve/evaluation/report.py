"""Write an :class:`~sdde_serve.evaluation.evaluate.Evaluation` as metrics.json, report.md and PNGs.

matplotlib is the optional ``[eval]`` extra: it is imported only when plots are drawn, with the
Agg backend (no display needed), and a missing install is one clear error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve.errors import UserError
from sdde_serve.evaluation import conformal_eval
from sdde_serve.evaluation.cams import pairwise_cosine_per_image
from sdde_serve.evaluation.evaluate import PRIMARY_SCORES, SCORES, Evaluation
from sdde_serve.evaluation.sections import section_markdown, section_plots
from sdde_serve.extras import require_extra

METRIC_LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "fpr95": "FPR@95"}
DIVERSITY_LABELS = {
    "disagreement": "pairwise disagreement ↑",
    "correlation": "correlation coefficient ↓",
    "q_statistic": "Q-statistic ↓",
    "double_fault": "double-fault (D/S) error rate ↓",
    "mutual_information": "mutual information (nats) ↑",
    "oracle_disagreement": "oracle disagreement (N01+N10)/N ↑",
    "disagreement_error_ratio": "disagreement / member error ↑",
}


def _pyplot() -> Any:
    with require_extra("eval", what="plots need matplotlib", alternative="or pass --no-plots"):
        import matplotlib
    matplotlib.use("Agg")  # files only; never open a window (servers and CI have no display)
    import matplotlib.pyplot as plt

    return plt


def _jsonable(obj: Any) -> Any:
    """Floats that JSON can't hold (NaN, inf) become null; numpy scalars become Python ones."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics(evaluation: Evaluation, path: Path) -> None:
    path.write_text(json.dumps(_jsonable(evaluation.metrics), indent=2, allow_nan=False) + "\n")


# --- plots -------------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> Path:
    # one layout pass; bbox_inches="tight" would draw the figure twice
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_reliability(evaluation: Evaluation, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    t = evaluation.metrics["model"]["temperature"]
    for ax, probs, title in (
        (axes[0], evaluation.probs_before, "before calibration (T = 1)"),
        (axes[1], evaluation.probs_after, f"after calibration (T = {t:.3g})"),
    ):
        bins = cal.reliability_bins(probs, evaluation.labels, n_bins=15)
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
        ece = cal.ece(probs, evaluation.labels, n_bins=15)
        ax.set_title(f"{title}\nECE = {100 * ece:.2f}%")
        ax.set_xlabel("confidence (max ensemble probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return _save(fig, path)


def plot_histograms(evaluation: Evaluation, score: str, path: Path) -> Path:
    plt = _pyplot()
    sets = evaluation.ood_sets
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.2), squeeze=False)
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
    return _save(fig, path)


def plot_roc(evaluation: Evaluation, score: str, path: Path) -> Path:
    from sdde_serve.evaluation.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
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
    return _save(fig, path)


def plot_cam_grid(
    evaluation: Evaluation, path: Path, per_set: int = 3, max_ood_rows: int = 4
) -> Path | None:
    """Rows: a few ID images, then a few from each OOD set; columns: input, one CAM per member."""
    rows = []
    for s in [evaluation.id_set, *evaluation.ood_sets]:
        if s.cams is None or s.cam_images is None:
            continue
        limit = (
            per_set
            if s is evaluation.id_set
            else max(1, min(per_set, max_ood_rows // max(1, len(evaluation.ood_sets))))
        )
        for i in range(min(limit, len(s.cams))):
            rows.append(("ID" if s is evaluation.id_set else s.name, s.cam_images[i], s.cams[i]))
    if not rows:
        return None
    plt = _pyplot()
    members = rows[0][2].shape[0]
    fig, axes = plt.subplots(
        len(rows), members + 1, figsize=(1.6 * (members + 1), 1.7 * len(rows)), squeeze=False
    )
    for r, (name, image, maps) in enumerate(rows):
        img = image.transpose(1, 2, 0)
        cmap = "gray" if img.shape[2] == 1 else None
        img = img[..., 0] if img.shape[2] == 1 else np.clip(img, 0, 1)
        h, w = img.shape[:2]
        cosine = float(pairwise_cosine_per_image(maps[None])[0])
        axes[r, 0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[r, 0].set_ylabel(f"{name}\ncos {cosine:.2f}", fontsize=8)
        for m in range(members):
            ax = axes[r, m + 1]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
            cam = maps[m]
            span = float(cam.max() - cam.min())
            cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
            # the CAM is stretched over the whole image (the upsampling GradCAM visualisations use)
            ax.imshow(
                cam,
                cmap="jet",
                alpha=0.45,
                extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                interpolation="bilinear",
                vmin=0,
                vmax=1,
            )
            if r == 0:
                ax.set_title(f"member {m}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("per-member class-activation maps (predicted class)", fontsize=9)
    return _save(fig, path)


def write_plots(evaluation: Evaluation, out: Path) -> list[Path]:
    written = [plot_reliability(evaluation, out / "reliability.png")]
    if evaluation.ood_sets:
        deployed = evaluation.metrics["operating_point"]["score"]
        for score in dict.fromkeys([*PRIMARY_SCORES, deployed]):
            written.append(plot_histograms(evaluation, score, out / f"hist_{score}.png"))
            written.append(plot_roc(evaluation, score, out / f"roc_{score}.png"))
    grid = plot_cam_grid(evaluation, out / "cams.png")
    if grid is not None:
        written.append(grid)
    cal_scores = evaluation.calibration_scores
    if evaluation.metrics.get("conformal") and cal_scores is not None:
        kind = evaluation.metrics["conformal"]["score"]
        p_values = conformal_eval.p_values_of(evaluation, cal_scores, kind)
        qq = out / "p_values_qq.png"
        written.append(conformal_eval.plot_p_value_qq(evaluation, p_values, qq))
    written += section_plots(evaluation.metrics, out)  # --shift, --members-sweep
    return written


# --- markdown ----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _ood_table(m: dict, score: str) -> list[str]:
    header = "| OOD set | " + " | ".join(METRIC_LABELS.values()) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_LABELS) + 1)]
    for name, by_score in m["ood"]["sets"].items():
        lines.append(
            f"| {name} | " + " | ".join(_pct(by_score[score][k]) for k in METRIC_LABELS) + " |"
        )
    for name, by_score in m["ood"]["groups"].items():
        members = ", ".join(m["groups"][name])
        lines.append(
            f"| **{name}** (mean of {members}) | "
            + " | ".join(_pct(by_score[score][k]) for k in METRIC_LABELS)
            + " |"
        )
    return lines


def render_markdown(evaluation: Evaluation, plots: list[Path]) -> str:
    m = evaluation.metrics
    model, conv, cls = m["model"], m["conventions"], m["classification"]
    lines = [
        f"# Evaluation of {model['name']} v{model['version']}",
        "",
        f"Model file `{model['path']}`: {model['members']} × {model['arch']} ({model['method']}), "
        f"{model['classes']} classes, temperature T = {model['temperature']:.4g}, run with "
        f"onnxruntime on {', '.join(model['providers'])}.",
        f"In-distribution test data: `{m['data']['id']['spec'] or m['data']['id']['name']}` "
        f"({m['data']['id']['n']} images).",
        "",
        "## Conventions",
        "",
        f"* Positive class: {conv['positive_class']}.",
        "* OOD metrics are in percent; FPR@95 lower is better, the others higher.",
        "* ECE uses 15 equal-width confidence bins. *Before* = T = 1 from the graph's member "
        f"logits; *after* = {conv['after_calibration']}.",
        "* Group rows are unweighted means over the group's OOD sets.",
        "",
        "## Classification and calibration (ID test data)",
        "",
        "| | accuracy (%) | NLL | ECE (%) | Brier |",
        "|---|---|---|---|---|",
    ]
    for when in ("before", "after"):
        c = cls[when]
        lines.append(
            f"| {when} calibration | {_pct(c['accuracy'])} | {_num(c['nll'])} | "
            f"{_pct(c['ece'])} | {_num(c['brier'])} |"
        )
    accs = cls["members"]["accuracy"]
    lines += [
        "",
        "Per-member accuracy (%): "
        + ", ".join(f"member {i}: {_pct(a)}" for i, a in enumerate(accs))
        + f"; ensemble: {_pct(cls['after']['accuracy'])}.",
        "",
    ]
    if m["ood"]["sets"]:
        lines += ["## OOD detection", ""]
        for score in m["ood"].get("scores", SCORES):
            lines += [
                f"### Score: {score} — {conv['scores'][score]}",
                "",
                *_ood_table(m, score),
                "",
            ]
        op = m["operating_point"]
        lines += [
            f"Deployed rule (manifest): OOD when `{op['score']} < {op['threshold']:.4g}`. On this "
            f"ID test data it accepts {_pct(op['id_acceptance'])}% of ID images; it rejects "
            + ", ".join(f"{_pct(v)}% of {k}" for k, v in op["ood_rejection"].items())
            + ".",
            "",
        ]
    lines += conformal_eval.markdown(m.get("conformal"))
    div = m["diversity"]
    lines += [
        "## Diversity (ID test data; Kuncheva & Whitaker 2003, pair-averaged)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {DIVERSITY_LABELS[k]} | {_num(v)} |" for k, v in div["id"].items()]
    if div["ood"]:
        lines += [
            "",
            "On OOD data (label-free metrics): "
            + "; ".join(
                f"{name}: disagreement {_num(d['disagreement'])}, "
                f"MI {_num(d['mutual_information'])}"
                for name, d in div["ood"].items()
            )
            + ".",
        ]
    lines.append("")
    if m["cams"] is not None:
        cams = m["cams"]
        lines += [
            "## CAM similarity (mean pairwise cosine of normalised member CAMs; lower = more "
            "diverse)",
            "",
            f"{cams['images_per_set']} images per set, maps {cams['map_size'][0]}×"
            f"{cams['map_size'][1]} from the {cams['source']} (class: the ensemble's "
            "prediction), 1-pixel border cropped, standardised, L2-normalised.",
            "",
            "| data | cosine similarity |",
            "|---|---|",
            f"| ID | {_num(cams['id'])} |",
            *[f"| {k} | {_num(v)} |" for k, v in cams["ood"].items()],
            "",
        ]
    else:
        lines += [
            "No CAMs: the graph has no `cams` output and no checkpoint provided them, so "
            "the CAM similarity is not computed.",
            "",
        ]
    gc = m["graph_check"]
    lines += [
        "## Consistency check",
        "",
        "Graph outputs vs numpy recomputation from the graph's member logits (max abs diff): "
        f"probs {gc['probs_max_abs_diff']:.2e}, MAL {gc['mal_max_abs_diff']:.2e}, "
        f"MSP {gc['msp_max_abs_diff']:.2e}.",
        "",
    ]
    lines += section_markdown(m)  # --shift, --members-sweep
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def write_report(evaluation: Evaluation, out: str | Path, *, plots: bool = True) -> list[Path]:
    """Write metrics.json, report.md and (with ``plots``) the PNGs into ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"-o {out}: cannot create the output directory ({exc})") from None
    if plots:
        _pyplot()  # fail before writing anything when matplotlib is missing
    written = write_plots(evaluation, out) if plots else []
    write_metrics(evaluation, out / "metrics.json")
    (out / "report.md").write_text(render_markdown(evaluation, written))
    return [out / "metrics.json", out / "report.md", *written]
