"""Calibration of an exported model: the temperature and the conformal OOD rule.

Runs the model with onnxruntime on labelled held-out data and fits the *ensemble's* temperature
as Ashukha et al. (2020, "Pitfalls of in-domain uncertainty estimation and ensembling")
prescribe: one T shared by all members, applied to every member's logits before the
probabilities are averaged, chosen to minimise the NLL of the averaged probabilities over log T
(and applied only when cross-validation shows it helps); then the conformal OOD rule accepting
``id_acceptance`` of those images. numpy + onnx + onnxruntime only: this must work where PyTorch
is not installed (a test imports ``sdde calibrate`` with ``torch`` blocked).

:func:`calibrate_model` is what both ``sdde export`` (on the run's validation split, never the
test split) and ``sdde calibrate`` (:mod:`sdde_serve.calibrate_cmd`, through
:func:`calibrate_file`) use, so both fit T and the threshold the same way, on the exported
graph's own float32 outputs: the boundary image is then accepted by the graph itself (a float64
recomputation from PyTorch logits can differ in the last bits and reject it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve import conformal, scores
from sdde_serve.engine import make_session
from sdde_serve.errors import UserError
from sdde_serve.manifest import (
    OOD_SCORES,
    CalibrationInfo,
    CalibrationMetrics,
    OODSpec,
    ScoreSelection,
    TemperatureFold,
    TemperatureRule,
    get_temperature,
    load_onnx,
    now_iso,
    read_manifest,
    save_onnx_atomic,
    set_temperature,
    weights_sha256,
    write_manifest,
)
from sdde_serve.temperature import TemperatureDecision, choose_temperature

if TYPE_CHECKING:  # onnx loads lazily (manifest.py does the same)
    import onnx

SCORE_KINDS = OOD_SCORES


def metrics(probs: np.ndarray, labels: np.ndarray) -> CalibrationMetrics:
    return CalibrationMetrics(
        accuracy=cal.accuracy(probs, labels), nll=cal.nll(probs, labels), ece=cal.ece(probs, labels)
    )


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    data: str,
    id_acceptance: float,
    score: str,
    scores_at: Callable[[float], np.ndarray] | None = None,
) -> tuple[CalibrationInfo, OODSpec]:
    """Choose T on member logits ``[n, N, L]`` and fit the conformal OOD rule at ``id_acceptance``.

    T minimises the NLL of ``mean_m softmax(z_m / T)`` (one T for all members, applied before
    averaging, searched over log T: ``sdde_serve.calibration.fit_temperature``) and is applied
    only when K-fold cross-validation shows it lowers the held-out NLL beyond noise
    (``sdde_serve.temperature.choose_temperature``; else T = 1, with the reason in
    ``info.rule``). The OOD scores are taken on the same images *after* T is applied (MSP
    depends on T; MAL does not), stored sorted as the conformal calibration set, and the
    threshold derives from alpha = 1 - ``id_acceptance`` (:func:`conformal_ood_spec`).
    ``scores_at(T)``, when given,
    returns the scores as the deployed graph computes them at temperature T (float32), so the
    boundary image is accepted by the graph itself, not only by a float64 recomputation.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    check_calibration_data(logits, labels, data=data)
    if score not in scores.SCORES or (scores_at is None and not scores.get(score).member_subset):
        raise UserError(f"unknown OOD score {score!r}; choose one of: {', '.join(scores.SCORES)}")
    if not 0.0 < id_acceptance <= 1.0:
        raise UserError(f"--id-acceptance must be in (0, 1], got {id_acceptance}")
    before = cal.ensemble_probs(logits, 1.0)
    decision = choose_temperature(logits, labels)
    temperature = decision.temperature
    after = cal.ensemble_probs(logits, temperature)
    if scores_at is None:  # a score of the logits alone (the registry's member_subset ones)
        values = scores.get(score).compute(scores.ScoreData(logits, temperature))
    else:
        values = scores_at(temperature)
    ood = conformal_ood_spec(values, score=score, id_acceptance=id_acceptance)
    warnings = calibration_warnings(decision, ood, len(labels))
    info = CalibrationInfo(
        data=data,
        n=len(labels),
        temperature=temperature,
        fitted_at=now_iso(),
        before=metrics(before, labels),
        after=metrics(after, labels),
        warning="; ".join(warnings) or None,
        rule=temperature_rule(decision),
    )
    return info, ood


def check_calibration_data(logits: np.ndarray, labels: np.ndarray, *, data: str) -> None:
    """Member logits ``[n, N, L]`` with n >= 2 labels in ``0..L-1``, else a :class:`UserError`."""
    if logits.ndim != 3 or len(logits) != len(labels):
        raise UserError(f"calibration needs logits [n, N, L] and n labels, got {logits.shape}")
    if len(labels) < 2:
        raise UserError(f"calibration data {data!r} has {len(labels)} labelled images; need >= 2")
    if labels.min() < 0 or labels.max() >= logits.shape[-1]:
        raise UserError(f"calibration data {data!r} has labels outside 0..{logits.shape[-1] - 1}")


def calibration_warnings(decision: TemperatureDecision, ood: OODSpec, n: int) -> list[str]:
    """What the manifest's ``calibration.warning`` says: a T fit without an interior optimum,
    or ``n`` calibration images too few to flag anything at the rule's alpha."""
    warnings = []
    if cal.temperature_at_bound(decision.fitted):
        warnings.append(
            f"the fitted T = {decision.fitted:.4g} is on the search bound: the NLL keeps falling, "
            f"as it does when (nearly) every one of the {n} images is classified "
            "correctly by every member; T = 1 kept. Refit on more or harder held-out data with "
            "`sdde calibrate`"
        )
    if conformal.flag_index(n, ood.alpha) == 0 and ood.alpha > 0:
        warnings.append(
            f"{n} calibration images are too few to flag anything at alpha = "
            f"{ood.alpha:g} (the smallest p-value is 1/(n + 1) = {1 / (n + 1):.3g}); "
            "calibrate on more held-out images"
        )
    return warnings


def temperature_rule(d: TemperatureDecision) -> TemperatureRule:
    """The manifest's record of the cross-validated temperature rule."""
    folds = [TemperatureFold(**vars(f)) for f in d.folds]
    return TemperatureRule(
        applied=d.applied,
        reason=d.reason,
        fitted=d.fitted,
        errors=d.errors,
        folds=folds,
        cv_nll_t1=None if not folds else d.cv_nll_t1,
        cv_nll_fitted=None if not folds else d.cv_nll_fitted,
        gain=None if not folds else d.gain,
        gain_interval=None if not folds else list(d.gain_interval),
    )


def conformal_ood_spec(scores: np.ndarray, *, score: str, id_acceptance: float) -> OODSpec:
    """The OOD rule from the deployed scores of held-out in-distribution images.

    The scores are stored sorted (the conformal calibration set) and the threshold derives from
    alpha = 1 - id_acceptance so that ``score < threshold`` is exactly ``p_value < alpha``
    (sdde_serve/conformal.py); with too few images to flag anything at alpha it is the lowest
    float (nothing is flagged).
    """
    stored = conformal.sorted_scores(scores)
    spec = OODSpec(score=score, threshold=0.0, id_acceptance=id_acceptance)
    threshold = conformal.threshold_for_alpha(stored, spec.alpha)
    threshold = max(threshold, -sys.float_info.max)  # JSON has no -inf
    return spec.model_copy(update={"threshold": threshold, "calibration_scores": stored})


def run_graph(
    model: onnx.ModelProto, images: np.ndarray, names: list[str], batch_size: int = 256
) -> dict[str, np.ndarray]:
    """``names`` outputs of ``model`` on float32 [0, 1] ``images``, in chunks (CPU provider)."""
    session = make_session(model.SerializeToString())
    parts = [
        session.run(names, {"images": np.ascontiguousarray(images[i : i + batch_size])})
        for i in range(0, len(images), batch_size)
    ]
    return {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(names)}


def validation_scores(
    model: onnx.ModelProto, images: np.ndarray, score: str, batch_size: int = 256
) -> np.ndarray:
    """The deployed OOD ``score`` of ``images`` as ``model`` itself computes it (float32 outputs).

    THE place where export and ``sdde calibrate`` get the held-out split's deployed scores (the
    threshold is fitted on them); the serving-side counterpart is
    :func:`sdde_serve.scoring.deployed_score`. Graphs without a ``minmax`` output (exported
    before it existed) get it from their logits, exactly; ``knn`` must be in the graph.
    """
    outputs = {o.name for o in model.graph.output}
    if score in outputs:
        return run_graph(model, images, [score], batch_size)[score].astype(np.float64)
    if score in scores.SCORES and scores.get(score).recompute_from_logits:
        found = run_graph(model, images, ["logits"], batch_size)
        logits = np.asarray(found["logits"], np.float64)
        return scores.get(score).compute(scores.ScoreData(logits, get_temperature(model)))
    raise UserError(
        f"the model has no {score!r} output"
        + (" (exported without a KNN bank: re-export with --knn-bank)" if score == "knn" else "")
    )


def calibrate_model(
    model: onnx.ModelProto,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    data: str,
    id_acceptance: float,
    score: str,
    batch_size: int = 256,
) -> tuple[CalibrationInfo, OODSpec]:
    """Fit T and the threshold on the graph's own outputs; sets ``model``'s ``temperature``.

    The manifest is not touched (the caller writes it). Used by ``sdde calibrate`` and by
    ``sdde export`` (on the run's validation split), so both calibrate the same way.
    """
    if len(images) == 0:
        raise UserError(f"calibration data {data!r} is empty")
    logits = run_graph(model, images, ["logits"], batch_size)["logits"]

    def scores_at(temperature: float) -> np.ndarray:
        set_temperature(model, temperature)
        return validation_scores(model, images, score, batch_size)

    info, ood = fit_calibration(
        logits, labels, data=data, id_acceptance=id_acceptance, score=score, scores_at=scores_at
    )
    set_temperature(model, info.temperature)
    return info, ood


def calibrate_file(
    model_path: str | Path,
    data: str,
    *,
    id_acceptance: float | None = None,
    score: str | None = None,
    batch_size: int = 256,
) -> tuple[CalibrationInfo, OODSpec]:
    """Refit and rewrite ``model_path`` in place; returns what was written."""
    from sdde_serve.data import load_dataset

    model_path = Path(model_path)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    proto = load_onnx(model_path)
    manifest = read_manifest(proto, source=str(model_path))
    if weights_sha256(proto) != manifest.weights_sha256:
        raise UserError(f"{model_path}: weights do not match the manifest's SHA-256; not touched")
    dataset = load_dataset(data, split="test", model=manifest.input)
    if dataset.labels is None:
        raise UserError(f"calibration data {data!r} has no labels")
    if dataset.classes and len(dataset.classes) != manifest.num_classes:
        raise UserError(
            f"calibration data {data!r} has {len(dataset.classes)} classes, "
            f"the model {manifest.num_classes}"
        )
    spec = manifest.input
    images = dataset.as_model_input(spec.channels, spec.height, spec.width, spec.transform)
    info, ood = calibrate_model(
        proto,
        images,
        dataset.labels,
        data=dataset.name,
        id_acceptance=manifest.ood.id_acceptance if id_acceptance is None else id_acceptance,
        score=manifest.ood.score if score is None else score,
        batch_size=batch_size,
    )
    # the refit rule; what else the manifest's OOD record holds is kept (why the score was
    # chosen, unless --score changed it)
    refit = {
        "score": ood.score,
        "threshold": ood.threshold,
        "id_acceptance": ood.id_acceptance,
        "calibration_scores": ood.calibration_scores,
    }
    if ood.score != manifest.ood.score:
        why = ScoreSelection(method="given", reason=f"sdde calibrate --score {ood.score}")
        refit["selection"] = why
    ood = manifest.ood.model_copy(update=refit)
    updated = manifest.model_copy(
        update={"temperature": info.temperature, "ood": ood, "calibration": info}
    )
    write_manifest(proto, updated)
    save_onnx_atomic(proto, model_path)
    return info, ood


def decision_lines(info: CalibrationInfo, ood: OODSpec) -> list[str]:
    """What ``sdde calibrate`` and ``sdde export`` print about T and the OOD rule."""
    lines = []
    if info.rule is not None:
        lines.append(f"T rule       {info.rule.reason}")
    n = len(ood.calibration_scores or [])
    rate = conformal.expected_false_flag_rate(n, ood.alpha) if n else float("nan")
    lines.append(
        f"OOD          {ood.score} < {ood.threshold:.6g}  <=>  p-value < alpha = {ood.alpha:g} "
        f"({n} calibration scores; in-distribution false-flag rate {rate:.2%} <= alpha)"
    )
    return lines
