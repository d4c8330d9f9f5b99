"""Conformal p-values on evaluation data: the ID false-flag rate at alpha and a QQ plot.

On in-distribution test data exchangeable with the calibration images, the p-values are
(super-)uniform: the share below alpha is at most alpha (exactly ``(ceil(alpha (n + 1)) - 1) /
(n + 1)`` averaged over calibration sets) and the QQ plot lies on the diagonal. OOD sets should
pile up near zero. A model exported without calibration scores has no p-values: the section is
``None``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve import conformal
from sdde_serve.evaluation.plotting import pyplot, save
from sdde_serve.evaluation.results import Evaluation
from sdde_serve.evaluation.section import Context, Section
from sdde_serve.manifest import Manifest
from sdde_serve.scoring import no_calibration_scores_message

# alphas reported besides the manifest's own
ALPHAS = (0.01, 0.05, 0.1)


def other_alphas(alpha: float) -> list[float]:
    """``ALPHAS`` less the manifest's ``alpha``: its row is reported once, first."""
    return [a for a in ALPHAS if not math.isclose(a, alpha, rel_tol=1e-9)]


def conformal_metrics(
    manifest: Manifest, id_scores: np.ndarray, ood_scores: dict[str, np.ndarray]
) -> dict[str, Any] | None:
    """False-flag rates of the deployed score's p-values (``None`` without calibration scores).

    ``id_scores`` / ``ood_scores``: the deployed OOD score of each image (the manifest's).
    """
    cal = manifest.ood.calibration_scores
    if cal is None:
        return None
    n, m = len(cal), len(id_scores)
    p_id = conformal.p_values(cal, id_scores)
    p_ood = {name: conformal.p_values(cal, s) for name, s in ood_scores.items()}

    def at(alpha: float) -> dict[str, Any]:
        rate = float((p_id < alpha).mean())
        expected = conformal.expected_false_flag_rate(n, alpha)
        # noise of the empirical rate: the test set's binomial sd and the calibration set's
        # (the rate given one calibration set is Beta-distributed around `expected`)
        sd = math.sqrt(expected * (1 - expected) * (1 / m + 1 / n))
        return {
            "alpha": alpha,
            "id_false_flag_rate": rate,
            "expected": expected,
            "noise_sd": sd,
            "ood_flag_rate": {k: float((p < alpha).mean()) for k, p in p_ood.items()},
        }

    alpha = manifest.ood.alpha
    return {
        "score": manifest.ood.score,
        "n_calibration": n,
        "n_id": m,
        "alpha": alpha,
        "at_alpha": at(alpha),
        "by_alpha": [at(a) for a in other_alphas(alpha)],  # the manifest's not repeated
        # largest gap between the ID p-values' empirical CDF and the uniform one (KS statistic)
        "id_ks_uniform": ks_uniform(p_id),
        "guarantee": "P(p < alpha) <= alpha for in-distribution images exchangeable with the "
        "calibration images (marginally over calibration sets)",
    }


def ks_uniform(p: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of the sample ``p`` to Uniform(0, 1)."""
    s = np.sort(np.asarray(p, np.float64))
    k = np.arange(1, len(s) + 1) / len(s)
    return float(max((k - s).max(), (s - (k - 1 / len(s))).max())) if len(s) else 0.0


def p_values_of(evaluation: Evaluation, manifest_cal: list[float], kind: str) -> dict:
    """``{"ID": p, set name: p, ...}`` for the QQ plot."""
    out = {"ID": conformal.p_values(manifest_cal, evaluation.id_set.scores[kind])}
    for s in evaluation.ood_sets:
        out[s.name] = conformal.p_values(manifest_cal, s.scores[kind])
    return out


def plot_p_value_qq(evaluation: Evaluation, p_values: dict[str, np.ndarray], path: Path) -> Path:
    """Sorted p-values against uniform quantiles: ID on the diagonal, OOD near zero."""
    c = evaluation.metrics["conformal"]
    fig, ax = pyplot().subplots(figsize=(4.8, 4.5))
    for name, p in p_values.items():
        s = np.sort(p)
        q = (np.arange(1, len(s) + 1) - 0.5) / len(s)
        ax.plot(q, s, label=name, linewidth=2.0 if name == "ID" else 1.2)
    ax.plot([0, 1], [0, 1], "k:", linewidth=1, label="uniform")
    ax.axhline(c["alpha"], color="grey", linestyle="--", linewidth=0.8, label="alpha")
    ax.set_xlabel("uniform quantile")
    ax.set_ylabel("p-value quantile")
    rate = c["at_alpha"]["id_false_flag_rate"]
    ax.set_title(f"OOD p-values ({c['score']}); ID flagged {100 * rate:.2f}% at alpha")
    ax.legend(fontsize=8, loc="upper left")
    return save(fig, path)


def markdown(metrics: dict[str, Any] | None) -> list[str]:
    """The report's section."""
    lines = ["## Conformal p-values", ""]
    if metrics is None:
        return [
            *lines,
            f"No p-values: {no_calibration_scores_message()}; it flags `score < threshold`. "
            "Refit with `sdde calibrate` to get them.",
            "",
        ]
    lines += [
        f"p-value = (1 + #{{calibration scores <= s}}) / (n + 1) on the deployed score "
        f"`{metrics['score']}`, n = {metrics['n_calibration']}; guarantee: {metrics['guarantee']}.",
        "",
        "| alpha | ID false-flag rate (test) | exact rate under exchangeability | noise sd | "
        "OOD flagged |",
        "|---|---|---|---|---|",
    ]
    for row in [metrics["at_alpha"], *metrics["by_alpha"]]:
        ood = ", ".join(f"{k} {100 * v:.1f}%" for k, v in row["ood_flag_rate"].items()) or "-"
        lines.append(
            f"| {row['alpha']:g} | {100 * row['id_false_flag_rate']:.2f}% | "
            f"{100 * row['expected']:.2f}% | {100 * row['noise_sd']:.2f}% | {ood} |"
        )
    lines += [
        "",
        f"The first row is the manifest's alpha. KS distance of the ID p-values to uniform: "
        f"{metrics['id_ks_uniform']:.4f} (`p_values_qq.png`: ID on the diagonal, OOD near 0).",
        "",
    ]
    return lines


# --- the report section -------------------------------------------------------------------------


def compute(ctx: Context, config: None) -> dict[str, Any]:
    """p-values of the deployed score (``None`` for models without calibration scores)."""
    ev, manifest = ctx.evaluation, ctx.engine.manifest
    kind = manifest.ood.score
    ood = {s.name: s.scores[kind] for s in ev.ood_sets}
    return {"conformal": conformal_metrics(manifest, ev.id_set.scores[kind], ood)}


def plots(evaluation: Evaluation, out: Path) -> list[Path]:
    cal_scores = evaluation.calibration_scores
    if not evaluation.metrics.get("conformal") or cal_scores is None:
        return []
    p_values = p_values_of(evaluation, cal_scores, evaluation.metrics["conformal"]["score"])
    return [plot_p_value_qq(evaluation, p_values, out / "p_values_qq.png")]


def summary(m: dict[str, Any]) -> list[str]:
    c = m["conformal"]
    if c is None:
        return [f"p-values: none ({no_calibration_scores_message()})"]
    a = c["at_alpha"]
    return [
        f"ID false-flag rate at alpha = {c['alpha']:g}: {100 * a['id_false_flag_rate']:.2f}% "
        f"(nominal {100 * c['alpha']:.2f}%, exact {100 * a['expected']:.2f}% "
        f"+- {100 * a['noise_sd']:.2f}% noise; n = {c['n_calibration']} calibration scores)"
    ]


SECTION = Section("conformal", compute, lambda m: markdown(m.get("conformal")), plots, summary)
