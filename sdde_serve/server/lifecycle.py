"""What every answered prediction goes through after scoring, for v1 and v2 alike: an id per
image, the feedback store, per-version counts, and shadow scoring once the response is sent."""

from __future__ import annotations

import uuid

import numpy as np
from starlette.background import BackgroundTask

from sdde_serve.engine import EngineOutput
from sdde_serve.scoring import Prediction
from sdde_serve.server.deps import ServerState
from sdde_serve.server.repository import ModelRuntime


def new_ids(n: int) -> list[str]:
    """Random (uuid4) ids: unguessable, so one client cannot label another's predictions."""
    return [uuid.uuid4().hex for _ in range(n)]


def after_predict(
    state: ServerState,
    runtime: ModelRuntime,
    images: np.ndarray,
    out: EngineOutput,
    preds: list[Prediction],
) -> tuple[list[str], BackgroundTask | None]:
    """(one id per image, the background task to attach to the response, if any)."""
    ids = new_ids(len(preds))
    flags = np.array([p.is_ood for p in preds], dtype=bool)
    if state.feedback is not None:
        state.feedback.keep(
            ids,
            runtime.name,
            runtime.version,
            runtime.manifest.classes,
            out.probs,
            (p.ood_score for p in preds),
            flags.tolist(),
        )
    if state.lifecycle is not None:
        counter = state.lifecycle.version_predictions
        for p in preds:
            counter.labels(model=runtime.name, version=runtime.version, outcome=p.outcome).inc()
    background = None
    if state.shadow is not None:
        background = state.shadow.schedule(runtime, images, out.probs.argmax(axis=1), flags)
    return ids, background
