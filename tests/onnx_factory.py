"""A hand-made ensemble ONNX file for fast, torch-free runtime tests.

Each of N members is a linear classifier on the flattened, normalised pixels, so every output can
be recomputed in numpy (:func:`reference_outputs`). The graph has the exported models' interface
(input ``images``; outputs ``logits``, ``probs``, ``mal``, ``msp``; initializer ``temperature``)
and a valid manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdde_serve.calibrate import conformal_ood_spec
from sdde_serve.calibration import ensemble_probs, mal, msp
from sdde_serve.manifest import (
    CalibrationInfo,
    CalibrationMetrics,
    InputSpec,
    Manifest,
    OODSpec,
    weights_sha256,
    write_manifest,
)


def make_linear_ensemble(
    path: Path,
    *,
    members: int = 3,
    classes: int = 4,
    channels: int = 1,
    size: int = 8,
    temperature: float = 1.5,
    threshold: float = 0.5,
    score: str = "mal",
    seed: int = 0,
    calibration_scores: list[float] | None = None,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write the model to ``path``; returns it and the weights for :func:`reference_outputs`.

    Without ``calibration_scores`` the manifest is that of a file exported before conformal
    p-values (no p-values, ``score < threshold``); with them (sorted), the threshold derives
    from alpha = 0.05 as export computes it.
    """
    rng = np.random.default_rng(seed)
    d = channels * size * size
    weights = {
        "W": rng.normal(0, 1.0, (d, members * classes)).astype(np.float32),
        "b": rng.normal(0, 0.5, (members * classes,)).astype(np.float32),
        "mean": np.full((1, channels, 1, 1), 0.5, np.float32),
        "std": np.full((1, channels, 1, 1), 0.25, np.float32),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits += [
        numpy_helper.from_array(np.array(temperature, np.float32), "temperature"),
        numpy_helper.from_array(np.array([-1, d], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([-1, members, classes], np.int64), "ens_shape"),
    ]
    nodes = [
        helper.make_node("Sub", ["images", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("Reshape", ["normed", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["z"]),
        helper.make_node("Reshape", ["z", "ens_shape"], ["logits"]),
        helper.make_node("Div", ["logits", "temperature"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["member_probs"], axis=-1),
        helper.make_node("ReduceMean", ["member_probs"], ["probs"], axes=[1], keepdims=0),
        helper.make_node("ReduceMean", ["logits"], ["avg_logits"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["avg_logits"], ["mal"], axes=[-1], keepdims=0),
        helper.make_node("ReduceMax", ["probs"], ["msp"], axes=[-1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "linear_ensemble",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.FLOAT, ["batch", channels, size, size]
            )
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", members, classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("mal", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("msp", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    metrics = CalibrationMetrics(accuracy=0.5, nll=1.0, ece=0.1)
    manifest = Manifest(
        name="linear-test",
        version="7",
        classes=[f"class{i}" for i in range(classes)],
        input=InputSpec(
            channels=channels,
            height=size,
            width=size,
            mean=[0.5] * channels,
            std=[0.25] * channels,
            color="L" if channels == 1 else "RGB",
        ),
        arch="linear",
        members=members,
        method="hand-made",
        temperature=temperature,
        ood=OODSpec(score=score, threshold=threshold, id_acceptance=0.95)
        if calibration_scores is None
        else conformal_ood_spec(np.asarray(calibration_scores), score=score, id_acceptance=0.95),
        calibration=CalibrationInfo(
            data="none",
            n=0,
            temperature=temperature,
            fitted_at="2026-01-01T00:00:00+00:00",
            before=metrics,
            after=metrics,
        ),
        weights_sha256=weights_sha256(model),
    )
    write_manifest(model, manifest)
    onnx.save(model, str(path))
    return path, weights


def reference_outputs(
    weights: dict[str, np.ndarray], images: np.ndarray, members: int, temperature: float
) -> dict[str, np.ndarray]:
    """The model's outputs recomputed in float64 numpy."""
    x = (images.astype(np.float64) - weights["mean"]) / weights["std"]
    z = x.reshape(len(x), -1) @ weights["W"].astype(np.float64) + weights["b"]
    logits = z.reshape(len(x), members, -1)
    probs = ensemble_probs(logits, temperature)
    return {"logits": logits, "probs": probs, "mal": mal(logits), "msp": msp(probs)}
