"""What the routes depend on, injected with ``Annotated`` aliases.

Tests swap any of these with ``app.dependency_overrides[get_runtime] = ...``.
"""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from sdde_serve.manifest import Manifest
from sdde_serve.preprocess import ImageLimits, PixelBudget
from sdde_serve.server.batcher import Batcher, Unavailable
from sdde_serve.server.errors import ApiError
from sdde_serve.server.metrics import Metrics
from sdde_serve.server.settings import Settings


@dataclass
class ModelRuntime:
    """A loaded model behind its batcher: everything a prediction needs."""

    manifest: Manifest
    providers: list[str]
    batcher: Batcher


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    limits: ImageLimits
    decode_pool: ThreadPoolExecutor | None = None  # created by the lifespan
    decode_budget: PixelBudget | None = None  # created by the lifespan (needs the model)
    api_keys: list[bytes] = field(default_factory=list)
    runtime: ModelRuntime | None = None
    ready: bool = False


class NotReady(Unavailable):
    retry_after = 2


async def get_state(request: Request) -> ServerState:
    return request.app.state.sdde


StateDep = Annotated[ServerState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


async def get_runtime(state: StateDep) -> ModelRuntime:
    """The loaded, warmed-up model. Not gated on readiness: after SIGTERM the probe says "not
    ready" but requests still arriving are answered until the batcher closes."""
    if state.runtime is None:
        raise NotReady("model is not ready yet (loading)")
    return state.runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RuntimeDep = Annotated[ModelRuntime, Depends(get_runtime)]


async def check_api_key(request: Request, state: StateDep) -> None:
    """Bearer API keys, when configured. Every key is compared (constant time, no early exit),
    so response timing reveals neither a key's prefix nor which key matched."""
    if not state.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    matched = False
    for key in state.api_keys:
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise ApiError(
            401, "missing or invalid API key", {"WWW-Authenticate": 'Bearer realm="sdde"'}
        )


AuthDep = Depends(check_api_key)
