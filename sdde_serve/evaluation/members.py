"""``sdde eval --members-sweep``: quality against the number of members (the paper's Figure 6).

Every member costs serving time; this answers "how many do I need?" without retraining. The graph
already outputs each member's logits, so for k = 1..N the ensemble of a member subset is
recomputed from them: the **first k** members (what exporting a smaller ensemble would give) and
the **mean over random subsets** of size k (all subsets when there are at most ``subsets`` of
them), which says how much is the members' number and how much their luck.

For each subset: accuracy, NLL, ECE and Brier at a temperature, and the OOD AUROC and FPR@95 of
every registered score computable from member logits that the graph has (sdde_serve/scores/,
``member_subset``): ``mal``, ``msp`` (at the subset's T), ``minmax`` (min over members of each
member's max logit), ``energy`` where exported. Feature-space scores (kNN, Mahalanobis on the
members' pre-logit features) are not subsettable from logits and are left out.

The temperature: all N members are the exported graph, at the T its manifest records (so the
k = N row is the main table's). A smaller subset, given labelled validation data, gets the T the
export's rule would choose for it (``sdde_serve.temperature.choose_temperature``: the fitted T
only where cross-validation shows it lowers the held-out NLL, else T = 1), as exporting that
subset would; without validation data every subset uses the manifest's T.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve import scores
from sdde_serve.data import ArrayDataset
from sdde_serve.errors import UserError
from sdde_serve.evaluation.metrics import mean_metrics, ood_metrics
from sdde_serve.evaluation.plotting import pyplot, save
from sdde_serve.evaluation.results import Evaluation
from sdde_serve.evaluation.section import Context, Loader, block_section
from sdde_serve.temperature import choose_temperature

SCHEMA_KEY = "members_sweep"
SWEEP_OOD_METRICS = ("auroc", "fpr95")


def _subset_score(name: str) -> Callable[[np.ndarray, float], np.ndarray]:
    spec = scores.get(name)
    return lambda z, t: spec.compute(scores.ScoreData(np.asarray(z, np.float64), t))


def subset_scores(available: Iterable[str]) -> dict[str, Callable[[np.ndarray, float], np.ndarray]]:
    """logits [n, k, L] of a member subset, its temperature -> score (higher = more ID), for
    every registered score computable from member logits alone (``member_subset``) that the
    evaluated graph has (``available``)."""
    return {n: _subset_score(n) for n in scores.names(member_subset=True) if n in available}


# the scores of every graph (mal, msp and minmax, recomputed for older graphs)
SUBSET_SCORES = subset_scores(("mal", "msp", "minmax"))
_SUBSET_WORDING = {
    "mal": "max over classes of the subset's member-averaged logits",
    "msp": "max of the subset's mean of softmax(logits / T), T refitted for the subset",
    "minmax": "min over the subset's members of each member's max logit",
}


def score_docs(names: Iterable[str]) -> dict[str, str]:
    return {n: _SUBSET_WORDING.get(n, f"{scores.get(n).summary}, of the subset") for n in names}


def not_subsettable() -> dict[str, str]:
    """Registered scores the sweep cannot recompute for a subset, and why."""
    return {
        n: f"{scores.get(n).summary}: it needs the members' pre-logit features or statistics "
        "stored in the graph for the whole ensemble, which member logits cannot reproduce for a "
        "subset"
        for n in scores.names(member_subset=False)
    }


@dataclass(frozen=True)
class SweepConfig:
    subsets: int = 5  # random subsets per k (all of them when C(N, k) is at most this)
    seed: int = 0


def member_subsets(n_members: int, k: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """Up to ``count`` distinct sorted subsets of size ``k``: all of them if there are so few."""
    if math.comb(n_members, k) <= count:
        return list(itertools.combinations(range(n_members), k))
    rng = np.random.default_rng([seed, k])
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < count:
        chosen[tuple(sorted(int(i) for i in rng.choice(n_members, size=k, replace=False)))] = None
    return list(chosen)


def subset_metrics(
    evaluation: Evaluation,
    members: tuple[int, ...],
    temperature: float,
) -> dict[str, Any]:
    """Classification and OOD metrics of the ensemble made of ``members`` at ``temperature``."""
    idx = list(members)
    id_logits = evaluation.id_set.logits[:, idx]
    labels = evaluation.labels
    probs = cal.ensemble_probs(id_logits, temperature)
    fns = subset_scores(evaluation.id_set.scores)
    id_scores = {s: fn(id_logits, temperature) for s, fn in fns.items()}
    sets = {
        ood.name: {
            s: _pick(ood_metrics(id_scores[s], fn(ood.logits[:, idx], temperature)))
            for s, fn in fns.items()
        }
        for ood in evaluation.ood_sets
    }
    groups = {
        g: {s: mean_metrics([sets[n][s] for n in names]) for s in fns}
        for g, names in evaluation.groups.items()
    }
    return {
        "members": idx,
        "temperature": temperature,
        "accuracy": cal.accuracy(probs, labels),
        "nll": cal.nll(probs, labels),
        "ece": cal.ece(probs, labels, n_bins=15),
        "brier": cal.brier(probs, labels),
        "ood": {"sets": sets, "groups": groups},
    }


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in SWEEP_OOD_METRICS}


def _tree_stat(trees: list[Any], fn: Callable[[list[float]], float]) -> Any:
    """Apply ``fn`` leaf-wise over structurally identical dicts of numbers."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _tree_stat([t[k] for t in trees], fn) for k in first}
    return fn([float(t) for t in trees])


def _sweep_rows(
    evaluation: Evaluation, config: SweepConfig, temperature: Callable[[tuple[int, ...]], float]
) -> tuple[list[dict], list[dict]]:
    """For k = 1..N: the first k members' metrics, and the mean and std over random k-subsets."""
    n_members = evaluation.id_set.logits.shape[1]
    first, random = [], []
    for k in range(1, n_members + 1):
        head = tuple(range(k))
        first.append(subset_metrics(evaluation, head, temperature(head)))
        subsets = member_subsets(n_members, k, config.subsets, config.seed)
        results = [subset_metrics(evaluation, s, temperature(s)) for s in subsets]
        numbers = [{k2: v for k2, v in r.items() if k2 != "members"} for r in results]
        random.append(
            {
                "k": k,
                "subsets": [list(s) for s in subsets],
                "mean": _tree_stat(numbers, lambda v: float(np.mean(v))),
                "std": _tree_stat(numbers, lambda v: float(np.std(v))),
            }
        )
    return first, random


def members_sweep(
    evaluation: Evaluation,
    *,
    val_logits: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    val_name: str = "",
    config: SweepConfig = SweepConfig(),
) -> dict[str, Any]:
    """The ``members_sweep`` block of metrics.json, from the evaluation's member logits.

    ``val_logits`` ``[n, N, L]`` and ``val_labels``: the graph's member logits on labelled
    validation data, on which the export's temperature rule chooses T for each subset smaller
    than N (never on the test data).
    """
    n_members = evaluation.id_set.logits.shape[1]
    if config.subsets < 1:
        raise UserError("--sweep-subsets must be >= 1")
    refit = val_logits is not None
    if refit:
        val_logits = np.asarray(val_logits, np.float64)
        val_labels = np.asarray(val_labels, np.int64)
        if val_logits.ndim != 3 or val_logits.shape[1] != n_members or len(val_labels) < 2:
            raise UserError(f"--val-data: need >= 2 labelled images for a {n_members}-member graph")
    manifest_t = float(evaluation.metrics["model"]["temperature"])
    temperatures: dict[tuple[int, ...], float] = {}

    def temperature(members: tuple[int, ...]) -> float:
        if not refit or len(members) == n_members:
            return manifest_t  # the graph itself: what its export chose, the main table's T
        if members not in temperatures:
            decision = choose_temperature(val_logits[:, list(members)], val_labels)
            temperatures[members] = decision.temperature  # 1.0 where the rule keeps T = 1
        return temperatures[members]

    first, random = _sweep_rows(evaluation, config, temperature)
    return {
        "members": n_members,
        "k": list(range(1, n_members + 1)),
        "subsets_per_k": config.subsets,
        "seed": config.seed,
        "temperature": (
            f"the manifest's T = {manifest_t:.4g} for all {n_members} members (the main "
            "table's); for smaller subsets the T the export's rule chooses (the fitted T where "
            "cross-validation shows it lowers the held-out NLL, else 1) on "
            f"{val_name or 'the validation data'} ({len(val_labels)} images)"
            if refit
            else f"the manifest's T = {manifest_t:.4g} for every subset (no --val-data)"
        ),
        "temperature_refitted": refit,
        "scores": score_docs(subset_scores(evaluation.id_set.scores)),
        "not_subsettable": not_subsettable(),
        "ood_metrics": list(SWEEP_OOD_METRICS),
        "first": first,
        "random": random,
    }


# --- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--members-sweep",
        action="store_true",
        help="also evaluate the ensembles of the first k and of random k members, k = 1..N "
        "(accuracy, calibration, OOD AUROC of mal/msp/minmax) from the graph's member logits",
    )
    parser.add_argument(
        "--val-data",
        metavar="SPEC",
        default=None,
        help="labelled validation data (default split: test) on which --members-sweep chooses T "
        "for each subset smaller than N with the export's rule (all N members keep the "
        "manifest's T); without it every subset uses the manifest's T"
        "%(default).0s",  # no "(default: None)" appended
    )
    parser.add_argument(
        "--sweep-subsets", type=int, default=5, metavar="N", help="random member subsets per size k"
    )
    parser.add_argument(
        "--sweep-seed", type=int, default=0, metavar="N", help="seed of the random subsets"
    )


def config_from_args(args: argparse.Namespace) -> SweepConfig | None:
    if args.val_data and not args.members_sweep:
        raise UserError("--val-data is used only by --members-sweep")
    if not args.members_sweep:
        return None
    if args.sweep_subsets < 1:
        raise UserError("--sweep-subsets must be >= 1")
    return SweepConfig(subsets=args.sweep_subsets, seed=args.sweep_seed)


# --- report -------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _ood_names(sweep: dict[str, Any]) -> tuple[str, list[str]]:
    """The OOD rows to show: the groups when there are any, else the sets."""
    groups = list(sweep["first"][0]["ood"]["groups"])
    return ("groups", groups) if groups else ("sets", list(sweep["first"][0]["ood"]["sets"]))


def render_markdown(sweep: dict[str, Any]) -> list[str]:
    lines = [
        "## Members sweep (quality against ensemble size)",
        "",
        f"For k = 1..{sweep['members']}: the first k members, and the mean ± std over up to "
        f"{sweep['subsets_per_k']} random subsets of size k (seed {sweep['seed']}; all subsets "
        f"where there are no more). Temperature: {sweep['temperature']}. Scores recomputed from "
        "the graph's member logits: "
        + "; ".join(f"`{k}` = {v}" for k, v in sweep["scores"].items())
        + ". Not subsettable: "
        + "; ".join(f"`{k}` ({v})" for k, v in sweep["not_subsettable"].items())
        + ".",
        "",
        "| k | accuracy first k | accuracy random | NLL first k | NLL random | ECE first k "
        "| ECE random | T first k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f, r in zip(sweep["first"], sweep["random"], strict=True):
        m, s = r["mean"], r["std"]
        lines.append(
            f"| {len(f['members'])} | {_pct(f['accuracy'])} | {_pct(m['accuracy'])} ± "
            f"{_pct(s['accuracy'])} | {f['nll']:.4f} | {m['nll']:.4f} ± {s['nll']:.4f} | "
            f"{_pct(f['ece'])} | {_pct(m['ece'])} ± {_pct(s['ece'])} | {f['temperature']:.3g} |"
        )
    kind, names = _ood_names(sweep)
    if names:
        scores = list(sweep["scores"])
        lines += [
            "",
            f"OOD AUROC (%) by k, first k / random mean ({kind}):",
            "",
            "| k | " + " | ".join(f"{n} {s}" for n in names for s in scores) + " |",
            "|" + "---|" * (1 + len(names) * len(scores)),
        ]
        for f, r in zip(sweep["first"], sweep["random"], strict=True):
            cells = [
                f"{_pct(f['ood'][kind][n][s]['auroc'])} / "
                f"{_pct(r['mean']['ood'][kind][n][s]['auroc'])}"
                for n in names
                for s in scores
            ]
            lines.append(f"| {len(f['members'])} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def plot_sweep(sweep: dict[str, Any], path: Path) -> Path:
    """Accuracy, NLL, ECE and OOD AUROC per group against k (first k solid, random dashed)."""
    plt = pyplot()
    kind, names = _ood_names(sweep)
    ks = sweep["k"]
    panels = [("accuracy", "accuracy (%)"), ("nll", "NLL"), ("ece", "ECE (%)")]
    n_panels = len(panels) + len(names)
    cols = min(n_panels, 4)
    rows = -(-n_panels // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    axes = grid.ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    axes = axes[:n_panels]

    def draw(ax: Any, get: Callable[[dict], float], scale: float, color: str, label: str) -> None:
        ax.plot(ks, [scale * get(f) for f in sweep["first"]], "o-", color=color, label=label)
        mean = np.array([scale * get(r["mean"]) for r in sweep["random"]])
        std = np.array([scale * get(r["std"]) for r in sweep["random"]])
        ax.plot(ks, mean, "--", color=color, linewidth=1)
        ax.fill_between(ks, mean - std, mean + std, color=color, alpha=0.15)

    for ax, (key, title) in zip(axes, panels, strict=False):
        scale = 1.0 if key == "nll" else 100.0
        draw(ax, lambda d, key=key: d[key], scale, "tab:blue", "first k")
        ax.set_title(title)
    colors = dict(zip(sweep["scores"], ("tab:blue", "tab:orange", "tab:green"), strict=False))
    for ax, name in zip(axes[len(panels) :], names, strict=True):
        for score, color in colors.items():
            draw(
                ax,
                lambda d, name=name, score=score: d["ood"][kind][name][score]["auroc"],
                100.0,
                color,
                score,
            )
        ax.set_title(f"OOD AUROC (%): {name}")
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set_xticks(ks)
        ax.set_xlabel("members k")
    fig.suptitle("first k members (solid) and random subsets of k (dashed, ± std)", fontsize=9)
    return save(fig, path)


def write_plots(sweep: dict[str, Any], out: Path) -> list[Path]:
    return [plot_sweep(sweep, out / "members_sweep.png")]


def sweep_on_engine(
    evaluation: Evaluation,
    engine: Any,
    config: SweepConfig,
    *,
    val_data: Any = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """:func:`members_sweep` with the validation logits computed by ``engine`` on ``val_data``."""
    if val_data is None:
        return members_sweep(evaluation, config=config)
    if val_data.labels is None or len(val_data) < 2:
        raise UserError(f"--val-data {val_data.name}: need >= 2 labelled images")
    labels = np.asarray(val_data.labels, np.int64)
    if labels.min() < 0 or labels.max() >= len(evaluation.classes):
        raise UserError(
            f"--val-data {val_data.name}: labels run from {labels.min()} to {labels.max()} "
            f"but the model has {len(evaluation.classes)} classes"
        )
    out = engine.run_batches(
        val_data.as_model_input(*engine.input_shape, engine.manifest.input.transform), batch_size
    )
    return members_sweep(
        evaluation,
        val_logits=out.logits,
        val_labels=labels,
        val_name=val_data.name,
        config=config,
    )


def summary(sweep: dict[str, Any] | None) -> list[str]:
    """Console lines for ``sdde eval``: accuracy and ECE of the first k members."""
    if not sweep:
        return []
    return [
        "members sweep (first k): "
        + "  ".join(
            f"k={len(f['members'])} acc {_pct(f['accuracy'])} ECE {_pct(f['ece'])}"
            for f in sweep["first"]
        )
    ]


# --- the report section -------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRequest:
    """What ``--members-sweep`` asked for: the config and the ``--val-data`` set (loaded)."""

    config: SweepConfig
    val_data: ArrayDataset | None = None


def _configure(args: argparse.Namespace, load: Loader) -> SweepRequest | None:
    config = config_from_args(args)
    if config is None:
        return None
    return SweepRequest(config, load(args.val_data) if args.val_data else None)


def _compute(ctx: Context, request: SweepRequest) -> dict[str, Any]:
    block = sweep_on_engine(
        ctx.evaluation,
        ctx.engine,
        request.config,
        val_data=request.val_data,
        batch_size=ctx.batch_size,
    )
    return {SCHEMA_KEY: block}


SECTION = block_section(
    SCHEMA_KEY,
    _compute,
    render_markdown,
    write_plots,
    summary,
    add_arguments=add_arguments,
    configure=_configure,
)
