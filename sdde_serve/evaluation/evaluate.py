"""Evaluate an exported model: run the ONNX graph on ID and OOD data and compute every metric.

:func:`evaluate` returns an :class:`Evaluation`: ``metrics`` (the JSON-ready dict written to
``metrics.json``) and the arrays the plots need. It runs the *deployed artifact* through
onnxruntime (:class:`sdde_serve.engine.Engine`), never the PyTorch checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve.data import ArrayDataset
from sdde_serve.engine import Engine, EngineOutput
from sdde_serve.errors import UserError
from sdde_serve.evaluation import cams as cam_metrics
from sdde_serve.evaluation.conformal_eval import conformal_metrics
from sdde_serve.evaluation.diversity import diversity_metrics
from sdde_serve.evaluation.metrics import OOD_METRICS, mean_metrics, ood_metrics
from sdde_serve.scoring import score_of

SCHEMA = "sdde-eval/1"
CAM_SEED = 0

POSITIVE_CLASS = (
    "in-distribution is the positive class for AUROC, AUPR-In and FPR@95 (FPR@95 = fraction of "
    "OOD samples accepted at the threshold that accepts 95% of ID samples); AUPR-Out treats OOD "
    "as positive with the negated score; scores are higher = more in-distribution"
)


def _msp_avg_logits(out: EngineOutput, temperature: float) -> np.ndarray:
    return cal.softmax(np.asarray(out.logits, np.float64).mean(axis=1)).max(axis=1)


def _graph_score(name: str) -> Callable[[EngineOutput, float], np.ndarray | None]:
    def score(out: EngineOutput, temperature: float) -> np.ndarray | None:
        if name == "knn" and out.knn is None:
            return None  # a model exported without a KNN bank
        return score_of(out, name)

    return score


# OOD scores, all "higher = more in-distribution". ``mal``, ``msp``, ``minmax`` and ``knn`` are
# the graph's own outputs, the scores a manifest can deploy (``msp`` uses the manifest's
# temperature; ``minmax``, the official code's aggregation, is recomputed from the logits of
# graphs exported before it was an output; ``knn`` exists only in graphs with a KNN bank).
# ``msp_avg_logits`` is the official code's other aggregation (MSP of the member-averaged logits
# at T = 1), computed here from the graph's member logits.
SCORES: dict[str, Callable[[EngineOutput, float], np.ndarray | None]] = {
    "mal": _graph_score("mal"),
    "msp": _graph_score("msp"),
    "minmax": _graph_score("minmax"),
    "knn": _graph_score("knn"),
    "msp_avg_logits": _msp_avg_logits,
}
PRIMARY_SCORES = ("mal", "msp")
SCORE_DESCRIPTIONS = {
    "mal": "max over classes of member-averaged logits (graph output)",
    "msp": "max of mean over members of softmax(logits / T) (graph output)",
    "minmax": "min over members of the member's max logit (official code; graph output)",
    "knn": "k-th largest cosine similarity of the concatenated member pre-logit features to "
    "the training-feature bank (graph output)",
    "msp_avg_logits": "max of softmax(member-averaged logits), T = 1 (official code)",
}


@dataclass
class ScoredSet:
    """One dataset's model outputs: OOD scores, member logits and (optionally) CAMs."""

    name: str
    spec: str
    logits: np.ndarray  # [n, N, L]
    scores: dict[str, np.ndarray]
    cam_images: np.ndarray | None = None  # [k, C, H, W] in [0, 1]
    cams: np.ndarray | None = None  # [k, N, h, w]

    def __len__(self) -> int:
        return len(self.logits)


@dataclass
class Evaluation:
    metrics: dict
    id_set: ScoredSet
    ood_sets: list[ScoredSet]
    labels: np.ndarray
    probs_before: np.ndarray  # T = 1
    probs_after: np.ndarray  # the manifest's T
    groups: dict[str, list[str]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    calibration_scores: list[float] | None = None  # the manifest's (conformal p-values)


def parse_named_specs(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["NAME=SPEC", ...]`` -> ordered ``{NAME: SPEC}``; bad or duplicate items: UserError."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise UserError(f"{flag} {item!r}: expected NAME=SPEC (e.g. {flag} noise=noise.npz)")
        if name in out:
            raise UserError(f"{flag}: the name {name!r} is given twice")
        out[name] = spec
    return out


def parse_groups(items: list[str] | None, ood_names: list[str]) -> dict[str, list[str]]:
    """``["near=a,b", "far=c"]`` -> ``{"near": ["a", "b"], "far": ["c"]}``, names checked."""
    groups: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, members = item.partition("=")
        name = name.strip()
        sets = [s.strip() for s in members.split(",") if s.strip()]
        if not sep or not name or not sets:
            raise UserError(f"--group {item!r}: expected NAME=SET[,SET...] (e.g. near=a,b)")
        if name in groups:
            raise UserError(f"--group: the group {name!r} is given twice")
        unknown = [s for s in sets if s not in ood_names]
        if unknown:
            known = ", ".join(ood_names) or "none"
            raise UserError(
                f"--group {name}: unknown OOD set(s) {', '.join(unknown)} (--ood names: {known})"
            )
        groups[name] = sets
    return groups


def _run(engine: Engine, data: ArrayDataset, batch_size: int) -> tuple[np.ndarray, EngineOutput]:
    if len(data) == 0:
        raise UserError(f"{data.name}: the data set is empty")
    x = data.as_model_input(*engine.input_shape, engine.manifest.input.transform)
    return x, engine.run_batches(x, batch_size)


# images float32 [k, C, H, W] in [0, 1] -> CAMs [k, N, h, w] of the ensemble's predicted class
CamFn = Callable[[np.ndarray], np.ndarray]


def _cam_subset(
    engine: Engine, x: np.ndarray, k: int, batch_size: int, cam_fn: CamFn | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if k <= 0 or not (engine.has_cams or cam_fn is not None):
        return None, None
    # a seeded random subset: the first k images of a sorted folder may all look alike
    idx = np.sort(np.random.default_rng(CAM_SEED).permutation(len(x))[:k])
    if cam_fn is None:
        maps = engine.run_batches(x[idx], batch_size, with_cams=True).cams
    else:  # a caller's cam_fn wins over the graph's cams (sdde eval --cams-from-run)
        maps = np.concatenate(
            [
                cam_fn(x[idx][i : i + batch_size])  # type: ignore[misc]
                for i in range(0, len(idx), batch_size)
            ]
        )
    return x[idx], np.asarray(maps, np.float64)


def _score(name: str, spec: str, out: EngineOutput, temperature: float) -> ScoredSet:
    scores = {k: fn(out, temperature) for k, fn in SCORES.items()}
    present = {k: v for k, v in scores.items() if v is not None}
    return ScoredSet(name, spec, np.asarray(out.logits, np.float64), present)


def _classification(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": cal.accuracy(probs, labels),
        "nll": cal.nll(probs, labels),
        "ece": cal.ece(probs, labels, n_bins=15),
        "brier": cal.brier(probs, labels),
    }


def evaluate(
    engine: Engine,
    id_data: ArrayDataset,
    ood_data: dict[str, ArrayDataset],
    *,
    groups: dict[str, list[str]] | None = None,
    id_spec: str = "",
    ood_specs: dict[str, str] | None = None,
    batch_size: int = 256,
    cam_images: int = 256,
    cam_fn: CamFn | None = None,
) -> Evaluation:
    """Every metric of docs/evaluation.md for one exported model.

    CAMs come from ``cam_fn`` when given (e.g. GradCAM on the PyTorch checkpoint, which only
    torch-side callers can provide: this package never imports torch), else from the graph's
    ``cams`` output when it has one; with neither, the CAM similarity is skipped.
    """
    manifest = engine.manifest
    temperature = float(manifest.temperature)
    groups = dict(groups or {})
    ood_specs = ood_specs or {}
    if len(id_data) == 0:
        raise UserError(f"--data {id_spec or id_data.name}: the data set is empty")
    if id_data.labels is None:
        raise UserError(f"--data {id_spec or id_data.name}: in-distribution test data needs labels")
    for g, names in groups.items():
        unknown = [n for n in names if n not in ood_data]
        if unknown:
            raise UserError(f"group {g}: unknown OOD set(s) {', '.join(unknown)}")
    labels = np.asarray(id_data.labels, np.int64)
    if labels.min() < 0 or labels.max() >= manifest.num_classes:
        raise UserError(
            f"--data {id_spec or id_data.name}: labels run from {labels.min()} to "
            f"{labels.max()} but the model has {manifest.num_classes} classes"
        )

    x_id, out_id = _run(engine, id_data, batch_size)
    id_set = _score("id", id_spec, out_id, temperature)
    id_set.cam_images, id_set.cams = _cam_subset(engine, x_id, cam_images, batch_size, cam_fn)
    logits = id_set.logits
    probs_before = cal.ensemble_probs(logits, 1.0)
    probs_after = cal.ensemble_probs(logits, temperature)

    ood_sets = []
    for name, data in ood_data.items():
        x, out = _run(engine, data, batch_size)
        scored = _score(name, ood_specs.get(name, ""), out, temperature)
        scored.cam_images, scored.cams = _cam_subset(engine, x, cam_images, batch_size, cam_fn)
        ood_sets.append(scored)
    if ood_sets and "all" not in groups and len(ood_sets) > 1:
        groups["all"] = [s.name for s in ood_sets]

    member_acc = (logits.argmax(axis=2) == labels[:, None]).mean(axis=0)
    # the graph computes probs/mal/msp itself: they must match numpy on its own logits
    graph_check = {
        "probs_max_abs_diff": float(np.abs(out_id.probs - probs_after).max()),
        "mal_max_abs_diff": float(np.abs(out_id.mal - cal.mal(logits)).max()),
        "msp_max_abs_diff": float(np.abs(out_id.msp - cal.msp(probs_after)).max()),
    }
    if out_id.minmax is not None:
        graph_check["minmax_max_abs_diff"] = float(np.abs(out_id.minmax - cal.minmax(logits)).max())

    scores = [k for k in SCORES if k in id_set.scores]  # knn only with a bank
    per_set = {
        s.name: {k: ood_metrics(id_set.scores[k], s.scores[k]) for k in scores} for s in ood_sets
    }
    per_group = {
        g: {k: mean_metrics([per_set[n][k] for n in names]) for k in scores}
        for g, names in groups.items()
    }
    thr, kind = float(manifest.ood.threshold), manifest.ood.score
    operating_point = {
        "score": kind,
        "threshold": thr,
        "id_acceptance": float(np.mean(id_set.scores[kind] >= thr)),
        "ood_rejection": {s.name: float(np.mean(s.scores[kind] < thr)) for s in ood_sets},
    }

    diversity = {"id": diversity_metrics(logits, labels)}
    diversity["ood"] = {s.name: diversity_metrics(s.logits) for s in ood_sets}
    cam_result = None
    if id_set.cams is not None:
        cam_result = {
            "id": cam_metrics.mean_pairwise_cosine(id_set.cams),
            "ood": {
                s.name: cam_metrics.mean_pairwise_cosine(s.cams)
                for s in ood_sets
                if s.cams is not None
            },
            "source": "checkpoint" if cam_fn is not None else "graph",
            "images_per_set": len(id_set.cams),
            "map_size": list(id_set.cams.shape[2:]),
        }

    metrics = {
        "schema": SCHEMA,
        "model": {
            "path": str(engine.path),
            "name": manifest.name,
            "version": manifest.version,
            "arch": manifest.arch,
            "method": manifest.method,
            "members": manifest.members,
            "classes": len(manifest.classes),
            "temperature": temperature,
            "providers": list(engine.providers),
        },
        "conventions": {
            "positive_class": POSITIVE_CLASS,
            "scores": {k: SCORE_DESCRIPTIONS[k] for k in scores},
            "ece_bins": 15,
            "before_calibration": "T = 1 from the graph's member logits",
            "after_calibration": f"T = {temperature:g} (the manifest's)",
            "group_average": "unweighted mean over the group's OOD sets",
        },
        "data": {
            "id": {"spec": id_spec, "name": id_data.name, "n": len(id_data)},
            "ood": {s.name: {"spec": s.spec, "n": len(s)} for s in ood_sets},
        },
        "groups": groups,
        "classification": {
            "before": _classification(probs_before, labels),
            "after": _classification(probs_after, labels),
            "members": {"accuracy": [float(a) for a in member_acc]},
        },
        "ood": {
            "metrics": list(OOD_METRICS),
            "scores": scores,
            "deployed": kind,
            "knn": None
            if manifest.knn is None
            else {"k": manifest.knn.k, "rows": manifest.knn.rows},
            "sets": per_set,
            "groups": per_group,
        },
        "operating_point": operating_point,
        # p-values of the deployed score (None for models without calibration scores)
        "conformal": conformal_metrics(
            manifest, id_set.scores[kind], {s.name: s.scores[kind] for s in ood_sets}
        ),
        "diversity": diversity,
        "cams": cam_result,
        "graph_check": graph_check,
    }
    return Evaluation(
        metrics,
        id_set,
        ood_sets,
        labels,
        probs_before,
        probs_after,
        groups,
        list(manifest.classes),
        calibration_scores=manifest.ood.calibration_scores,
    )
