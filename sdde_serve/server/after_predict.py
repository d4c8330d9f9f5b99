"""What every answered prediction goes through after scoring, for v1 and v2 alike: a signed id
per image (for delayed labels), per-version counts, and shadow scoring once the response is sent."""

from __future__ import annotations

import numpy as np
from starlette.background import BackgroundTask

from sdde_serve.engine import EngineOutput
from sdde_serve.scoring import Prediction
from sdde_serve.server.deps import ServerState
from sdde_serve.server.repository import ModelRuntime


def after_predict(
    state: ServerState,
    runtime: ModelRuntime,
    images: np.ndarray,
    out: EngineOutput,
    preds: list[Prediction],
) -> tuple[list[str], BackgroundTask | None]:
    """(one id per image, the background task to attach to the response, if any)."""
    flags = np.array([p.is_ood for p in preds], dtype=bool)
    ids = [""] * len(preds)
    if state.feedback is not None:
        # signed records (tokens.py): any worker or replica with the same secret judges a label
        ids = state.feedback.issue(runtime.name, runtime.version, out.probs, flags.tolist())
    if state.lifecycle is not None:
        counter = state.lifecycle.version_predictions
        for p in preds:
            counter.labels(model=runtime.name, version=runtime.version, outcome=p.outcome).inc()
    background = None
    if state.shadow is not None:
        background = state.shadow.schedule(runtime, images, out.probs.argmax(axis=1), flags)
    return ids, background
