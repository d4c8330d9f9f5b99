"""Member CAMs from a training run's checkpoint, for graphs that carry no ``cams`` output.

Export adds ``cams`` only where GradCAM needs no backward pass (pooled-linear heads); LeNet graphs
have none, and GradCAM at the *training* saliency layer (LeNet ``conv2``, ResNet ``layer3``) never
fits in a graph. ``sdde eval --cams-from-run RUN_DIR`` (and the MNIST benchmark, and the report
test) get the maps here instead, from the PyTorch checkpoint the model was exported from:

* maps: ``training.saliency.gradcam_from_features`` on each member's feature map at the run's
  saliency layer (``Ensemble.forward_features``), BatchNorm on running statistics;
* class: ``argmax_c mean_m softmax(z_m / T)_c``, the argmax of the calibrated ensemble
  probabilities ``probs``, which is the class the exported graph's own ``cams`` use. Pass the
  model's temperature (``Manifest.temperature``) to match its ``probs`` exactly. This is *not*
  ``training.saliency.pseudo_labels`` (argmax of the averaged logits, what the training loss uses
  on unlabeled batches); the two rarely differ, but the evaluation follows the deployed graph.

Every function takes and returns numpy at the edges: float32 ``[B, C, H, W]`` pixels in [0, 1]
in, float32 ``[B, N, h, w]`` maps out (the ``CamFn`` of ``sdde_serve.evaluation.evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sdde_serve.errors import UserError
from training.ensemble import Ensemble, batchnorm_mode
from training.run import CHECKPOINTS, LoadedRun, load_run
from training.saliency import gradcam_from_features

if TYPE_CHECKING:
    from sdde_serve.engine import Engine

CamFn = Callable[[np.ndarray], np.ndarray]

PROBE_IMAGES = 16  # random images on which the checkpoint must reproduce the graph's logits
PROBE_SEED = 0
# the graph is verified against PyTorch within 1e-4 at export; 1e-3 leaves room for other
# onnxruntime providers, while a different checkpoint is off by far more
LOGITS_ATOL = 1e-3


def predicted_class(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``argmax_c mean_m softmax(logits_m / T)_c`` for logits ``[B, N, L]``: the graph's class."""
    return torch.softmax(logits.detach() / temperature, dim=-1).mean(dim=1).argmax(dim=-1)


def ensemble_cams(ensemble: Ensemble, x: Tensor, *, temperature: float = 1.0) -> Tensor:
    """GradCAM ``[B, N, h, w]`` of every member at the saliency layer, for the predicted class."""
    with batchnorm_mode(ensemble, "eval"), torch.enable_grad():
        feats = ensemble.forward_features(x)
        logits = ensemble.forward_head(feats)
        classes = predicted_class(logits, temperature)
        return gradcam_from_features(feats, logits, classes, create_graph=False).detach()


def _cam_fn(ensemble: Ensemble, temperature: float) -> CamFn:
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}")

    def cam_fn(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return ensemble_cams(ensemble, x, temperature=temperature).numpy()

    return cam_fn


def cam_fn_from_run(
    run_dir: str | Path, checkpoint: str = "best", *, temperature: float = 1.0
) -> CamFn:
    """A function mapping images float32 ``[B, C, H, W]`` in [0, 1] to CAMs ``[B, N, h, w]``.

    Loads ``run_dir``'s ``checkpoint`` with :func:`training.run.load_run` (bad runs raise
    ``UserError``). ``temperature``: the exported model's T, so that the class is the argmax of
    its ``probs`` (T = 1: of the uncalibrated ensemble probabilities).
    """
    return _cam_fn(load_run(run_dir, checkpoint).ensemble.eval(), temperature)


def _check_shape(run: LoadedRun, engine: Engine) -> None:
    """Members, classes and input size of the run must be the model's."""
    data, model, manifest = run.config["data"], run.config["model"], engine.manifest
    run_shape = (int(data["channels"]), int(data["height"]), int(data["width"]))
    ours = (int(model["members"]), [str(c) for c in data["classes"]], run_shape)
    theirs = (manifest.members, list(manifest.classes), tuple(engine.input_shape))
    if ours != theirs:
        raise UserError(
            f"--cams-from-run {run.run_dir}: the run (members, classes, input) {ours} is not the "
            f"model's {theirs}; pass the run the model was exported from"
        )


def _logits_gap(ensemble: Ensemble, engine: Engine) -> float:
    rng = np.random.default_rng(PROBE_SEED)
    x = rng.random((PROBE_IMAGES, *engine.input_shape), dtype=np.float32)
    with torch.no_grad(), batchnorm_mode(ensemble, "eval"):
        ours = ensemble(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - engine.run(x).logits).max())


def cam_fn_for_model(run_dir: str | Path, engine: Engine) -> CamFn:
    """:func:`cam_fn_from_run` for the exported model behind ``engine`` (``sdde eval``).

    Uses the model's temperature and the run's checkpoint that reproduces the graph's logits on
    seeded random images ("best", else "last": export takes either), so the maps belong to the
    weights being evaluated. A run of another shape, or whose checkpoints both give other logits,
    raises ``UserError``.
    """
    present = [c for c, f in CHECKPOINTS.items() if (Path(run_dir) / f).is_file()]
    gaps = {}
    for checkpoint in present or ["best"]:  # none present: load_run says what is wrong
        run = load_run(run_dir, checkpoint)
        _check_shape(run, engine)
        gaps[checkpoint] = _logits_gap(run.ensemble, engine)
        if gaps[checkpoint] <= LOGITS_ATOL:
            return _cam_fn(run.ensemble.eval(), float(engine.manifest.temperature))
    found = ", ".join(f"{k} {v:.3g}" for k, v in gaps.items())
    raise UserError(
        f"--cams-from-run {run_dir}: no checkpoint gives the model's logits (max abs difference: "
        f"{found}); pass the run and weights the model was exported from"
    )
