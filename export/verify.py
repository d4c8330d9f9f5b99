"""Verification of every export: the ONNX file must compute what the PyTorch ensemble computes.

1. ``onnx.checker.check_model(full_check=True)`` (structure, opset, shape inference).
2. onnxruntime against an independent PyTorch reference on each named input set (random pixels
   and real validation images): the reference takes logits from ``Ensemble.forward`` (not the
   exported layout, so a layout bug shows), computes ``probs``/``mal``/``msp``/``minmax`` from
   them in float64, ``knn`` from ``Ensemble.forward_pre_logits`` and the bank the exporter built
   (numpy, float64: export/knn.py), and ``cams`` with autograd GradCAM. Any output whose max
   abs difference exceeds its tolerance fails the export with a message naming the output, the
   input set and the size.

Every other registered OOD score in the graph (energy, mahalanobis: sdde_serve/scores/) is
compared with its float64 numpy reference on the PyTorch logits and pre-logit features, with the
statistics the exporter fitted, within its registered tolerance (relative to max(1, |reference|)
where the spec says so: squared distances grow large).

Tolerances (``TOLERANCES``): 1e-4 on logits, MAL and minmax, 1e-5 on probabilities, MSP and
the KNN cosine similarity (which lies in [-1, 1]); CAMs 1e-4
relative to their largest value, compared only on rows whose predicted class is not a near-tie
(a 1e-7 wobble may legitimately flip the argmax there, and with it the explained class).

3. :func:`build_probe`: a few validation images and the final graph's outputs on them, stored in
   the manifest so that the engine repeats the check on the machine that serves the file.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from export.layouts import ensemble_members, last_map
from sdde_serve import scores as score_registry
from sdde_serve.errors import UserError
from sdde_serve.manifest import ProbeCheck
from sdde_serve.probe import PROBE_IMAGES, cpu_kind, encode_images, make_probe

TOLERANCES: dict[str, float] = {
    "logits": 1e-4,
    "probs": 1e-5,
    "mal": 1e-4,
    "msp": 1e-5,
    "minmax": 1e-4,
    "knn": 1e-5,
    "cams": 1e-4,
}
# rows whose two largest reference probabilities are closer than this skip the CAM comparison
_TIE_GAP = 1e-4


class VerificationError(UserError):
    """The exported graph does not reproduce PyTorch within tolerance."""


def reference_outputs(
    ensemble: nn.Module,
    images: np.ndarray,
    temperature: float,
    *,
    with_cams: bool,
    with_minmax: bool = False,
    knn: tuple[np.ndarray, int] | None = None,
    scores: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """What the graph must output, computed with PyTorch independently of the layout.

    ``scores``: further registered scores and their statistics (their numpy references)."""
    ensemble = ensemble.eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    with torch.no_grad():
        logits = ensemble(x).double()
    probs = torch.softmax(logits / temperature, dim=-1).mean(dim=1)
    out = {
        "logits": logits.numpy(),
        "probs": probs.numpy(),
        "mal": logits.mean(dim=1).amax(dim=-1).numpy(),
        "msp": probs.amax(dim=-1).numpy(),
    }
    if with_minmax:
        out["minmax"] = logits.amax(dim=-1).amin(dim=1).numpy()
    if knn is not None:
        from export.knn import knn_scores, pre_logit_features

        bank, k = knn
        out["knn"] = knn_scores(pre_logit_features(ensemble, images), bank, k)
    if scores:
        with torch.no_grad():
            feats = ensemble.forward_pre_logits(x).double().numpy()
        for name, stats in scores.items():
            data = score_registry.ScoreData(out["logits"], temperature, feats, stats)
            out[name] = score_registry.get(name).compute(data)
    if with_cams:
        out["cams"] = gradcam_last_map(ensemble, x, probs.argmax(dim=-1)).numpy()
    return out


def gradcam_last_map(ensemble: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """GradCAM (autograd) of ``classes`` on every member's last feature map: ``[B, N, h, w]``."""
    xn = (x - ensemble.mean.reshape(1, -1, 1, 1)) / ensemble.std.reshape(1, -1, 1, 1)
    maps = []
    for member in ensemble_members(ensemble):
        with torch.no_grad():
            a = last_map(member, xn)
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            y = member.classifier(a)
            (grad,) = torch.autograd.grad(y.gather(1, classes[:, None]).sum(), a)
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        maps.append(torch.relu((alpha * a).sum(dim=1)).detach())
    return torch.stack(maps, dim=1).double()


def max_differences(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> dict[str, float]:
    """Max abs difference per output (CAMs relative to their scale, near-ties skipped)."""
    diffs: dict[str, float] = {}
    for name, ref in expected.items():
        got = actual.get(name)
        if got is None:
            raise VerificationError(f"verification failed: the graph has no output {name!r}")
        if got.shape != ref.shape:
            raise VerificationError(
                f"verification failed: output {name!r} has shape {list(got.shape)}, "
                f"PyTorch gives {list(ref.shape)}"
            )
        spec = score_registry.SCORES.get(name)
        if spec is not None and spec.relative_tolerance:
            scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
            diff = np.abs(got.astype(np.float64) - ref).max(initial=0.0) / scale
        elif name == "cams":
            top2 = np.sort(expected["probs"], axis=-1)[:, -2:]
            rows = (top2[:, 1] - top2[:, 0]) > _TIE_GAP
            scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
            diff = np.abs(got[rows] - ref[rows]).max(initial=0.0) / scale
        else:
            diff = np.abs(got.astype(np.float64) - ref).max(initial=0.0)
        diffs[name] = float(diff) if np.isfinite(diff) else float("inf")
    return diffs


def cpu_session(model: onnx.ModelProto):  # -> onnxruntime.InferenceSession
    from sdde_serve.engine import make_session

    return make_session(model.SerializeToString())


def run_onnx(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of ``model`` (a ModelProto or an InferenceSession) on ``images``."""
    session = cpu_session(model) if isinstance(model, onnx.ModelProto) else model
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"images": np.ascontiguousarray(images, dtype=np.float32)})
    return dict(zip(names, values, strict=True))


def verify(
    model: onnx.ModelProto,
    ensemble: nn.Module,
    *,
    temperature: float,
    inputs: dict[str, np.ndarray],
    tolerances: dict[str, float] | None = None,
    knn: tuple[np.ndarray, int] | None = None,
    scores: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """Check ``model`` and compare it with PyTorch on each input set; returns the differences.

    ``knn`` = (bank rows as stored, k): what the graph's ``knn`` output must compute.
    ``scores`` = the graph's other registered scores and their fitted statistics.

    Raises :class:`VerificationError` naming the first output out of tolerance.
    """
    scores = scores or {}
    tol = {
        **TOLERANCES,
        **{n: score_registry.get(n).tolerance for n in scores},
        **(tolerances or {}),
    }
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"verification failed: onnx.checker: {first}") from None
    graph_outputs = {o.name for o in model.graph.output}
    check_score_outputs(graph_outputs, knn is not None, scores)
    session = cpu_session(model)
    report: dict[str, dict[str, float]] = {}
    for set_name, images in inputs.items():
        actual = run_onnx(session, images)
        expected = reference_outputs(
            ensemble,
            images,
            temperature,
            with_cams="cams" in graph_outputs,
            with_minmax="minmax" in graph_outputs,
            knn=knn,
            scores=scores,
        )
        diffs = max_differences(actual, expected)
        for name, diff in diffs.items():
            if not diff <= tol[name]:
                raise VerificationError(
                    f"verification failed: output {name!r} differs from PyTorch by {diff:.3g} "
                    f"on {set_name} inputs (tolerance {tol[name]:g})"
                )
        report[set_name] = diffs
    return report


def check_score_outputs(outputs: set[str], has_bank: bool, scores: dict[str, dict]) -> None:
    """Every score output of the graph must have what it is checked against (a bank for
    ``knn``, statistics for the other registered scores), and nothing given may be missing."""
    if ("knn" in outputs) != has_bank:
        has = "has" if "knn" in outputs else "lacks"
        raise VerificationError(
            f"verification failed: the graph {has} a 'knn' output but a bank was "
            f"{'' if has_bank else 'not '}given to check it against"
        )
    unchecked = [
        o for o in outputs if o in score_registry.SCORES and o not in (*TOLERANCES, *scores)
    ]
    if unchecked:
        raise VerificationError(
            f"verification failed: the graph has score outputs {sorted(unchecked)} with no "
            "statistics given to check them against"
        )


def verification_inputs(
    input_shape: tuple[int, int, int], real: np.ndarray | None, *, seed: int = 0, n_real: int = 64
) -> dict[str, np.ndarray]:
    """Random pixels (batch 1 and an odd batch: the batch axis is dynamic) and real images."""
    rng = np.random.default_rng(seed)
    inputs = {
        "random (batch 1)": rng.random((1, *input_shape), dtype=np.float32),
        "random (batch 7)": rng.random((7, *input_shape), dtype=np.float32),
    }
    if real is not None and len(real):
        inputs["real"] = np.ascontiguousarray(real[:n_real], dtype=np.float32)
    return inputs


def build_probe(model: onnx.ModelProto, images: np.ndarray, precision: str) -> ProbeCheck:
    """The manifest's load-time probe: the first :data:`PROBE_IMAGES` of ``images`` (stored as
    uint8) and ``model``'s own logits (and KNN similarities) on them, computed here on the
    CPU provider (sdde_serve/probe.py)."""
    pixels, decoded = encode_images(images[:PROBE_IMAGES])
    outputs = run_onnx(model, decoded)
    return make_probe(pixels, outputs, precision, computed_on=cpu_kind())
