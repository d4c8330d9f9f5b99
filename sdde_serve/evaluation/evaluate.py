"""Evaluate an exported model: run the ONNX graph on ID and OOD data and compute every metric.

:func:`evaluate` returns an :class:`Evaluation`: ``metrics`` (the JSON-ready dict written to
``metrics.json``) and the arrays the plots need. It runs the *deployed artifact* through
onnxruntime (:class:`sdde_serve.engine.Engine`), never the PyTorch checkpoint, scores every set
once, then lets each registered report section (:mod:`.sections`) compute its entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve.data import ArrayDataset
from sdde_serve.engine import Engine, EngineOutput
from sdde_serve.errors import UserError
from sdde_serve.evaluation.ood_table import score_descriptions, score_table
from sdde_serve.evaluation.results import CamFn, Evaluation, ScoredSet
from sdde_serve.evaluation.sections import SECTIONS, Context

SCHEMA = "sdde-eval/1"
CAM_SEED = 0

POSITIVE_CLASS = (
    "in-distribution is the positive class for AUROC, AUPR-In and FPR@95 (FPR@95 = fraction of "
    "OOD samples accepted at the threshold that accepts 95% of ID samples); AUPR-Out treats OOD "
    "as positive with the negated score; scores are higher = more in-distribution"
)

__all__ = ["CAM_SEED", "SCHEMA", "CamFn", "Evaluation", "ScoredSet", "evaluate"]


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
    values = {k: fn(out, temperature) for k, fn in score_table().items()}
    present = {k: v for k, v in values.items() if v is not None}
    return ScoredSet(name, spec, np.asarray(out.logits, np.float64), present)


def _checked_labels(
    engine: Engine, id_data: ArrayDataset, ood_names: list[str], groups: dict, id_spec: str
) -> np.ndarray:
    """The ID labels, after checking the data and groups (UserErrors before any inference)."""
    what = f"--data {id_spec or id_data.name}"
    if len(id_data) == 0:
        raise UserError(f"{what}: the data set is empty")
    if id_data.labels is None:
        raise UserError(f"{what}: in-distribution test data needs labels")
    for g, names in groups.items():
        unknown = [n for n in names if n not in ood_names]
        if unknown:
            raise UserError(f"group {g}: unknown OOD set(s) {', '.join(unknown)}")
    labels = np.asarray(id_data.labels, np.int64)
    n_classes = engine.manifest.num_classes
    if labels.min() < 0 or labels.max() >= n_classes:
        raise UserError(
            f"{what}: labels run from {labels.min()} to "
            f"{labels.max()} but the model has {n_classes} classes"
        )
    return labels


def _header(engine: Engine, id_data: ArrayDataset, ev: Evaluation, id_spec: str) -> dict:
    """metrics.json's entries before the sections': what was evaluated, on what, how to read it."""
    manifest, temperature = engine.manifest, float(engine.manifest.temperature)
    score_names = [k for k in score_table() if k in ev.id_set.scores]  # knn only with a bank
    return {
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
            "scores": {k: score_descriptions()[k] for k in score_names},
            "ece_bins": 15,
            "before_calibration": "T = 1 from the graph's member logits",
            "after_calibration": f"T = {temperature:g} (the manifest's)",
            "group_average": "unweighted mean over the group's OOD sets",
        },
        "data": {
            "id": {"spec": id_spec, "name": id_data.name, "n": len(id_data)},
            "ood": {s.name: {"spec": s.spec, "n": len(s)} for s in ev.ood_sets},
        },
        "groups": ev.groups,
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
    configs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Every metric of docs/evaluation.md for one exported model: each registered section's.

    CAMs come from ``cam_fn`` when given (e.g. GradCAM on the PyTorch checkpoint, which only
    torch-side callers can provide: this package never imports torch), else from the graph's
    ``cams`` output when it has one; with neither, the CAM similarity is skipped. ``configs``:
    section name -> config of the optional sections to run (``{"shift": ShiftConfig()}``).
    """
    groups, ood_specs, configs = dict(groups or {}), ood_specs or {}, configs or {}
    labels = _checked_labels(engine, id_data, list(ood_data), groups, id_spec)
    t = float(engine.manifest.temperature)

    def scored(name: str, data: ArrayDataset, spec: str) -> tuple[ScoredSet, EngineOutput]:
        x, out = _run(engine, data, batch_size)
        s = _score(name, spec, out, t)
        s.cam_images, s.cams = _cam_subset(engine, x, cam_images, batch_size, cam_fn)
        return s, out

    id_set, out_id = scored("id", id_data, id_spec)
    ood_sets = [scored(n, d, ood_specs.get(n, ""))[0] for n, d in ood_data.items()]
    if "all" not in groups and len(ood_sets) > 1:
        groups["all"] = [s.name for s in ood_sets]
    ev = Evaluation(
        {},
        id_set,
        ood_sets,
        labels,
        cal.ensemble_probs(id_set.logits, 1.0),
        cal.ensemble_probs(id_set.logits, t),
        groups,
        list(engine.manifest.classes),
        calibration_scores=engine.manifest.ood.calibration_scores,
    )
    ev.metrics.update(_header(engine, id_data, ev, id_spec))
    source = None if id_set.cams is None else "checkpoint" if cam_fn is not None else "graph"
    ctx = Context(engine, ev, id_data, out_id, source, batch_size, progress)
    for section in SECTIONS:
        config = configs.get(section.name)
        if section.optional and config is None:
            continue  # an analysis not asked for (--shift, --members-sweep)
        ev.metrics.update(section.compute(ctx, config))
    return ev
