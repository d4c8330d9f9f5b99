"""What the routes depend on, injected with ``Annotated`` aliases.

Tests swap any of these with ``app.dependency_overrides[get_runtime] = ...``.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from sdde_serve.preprocess import ImageLimits, PixelBudget
from sdde_serve.server.domain_errors import NotReady
from sdde_serve.server.errors import ApiError
from sdde_serve.server.feedback import FeedbackStore
from sdde_serve.server.lifecycle_metrics import LifecycleMetrics
from sdde_serve.server.metrics import Metrics
from sdde_serve.server.repository import ModelRepository, ModelRuntime
from sdde_serve.server.settings import Settings

if TYPE_CHECKING:
    from sdde_serve.server.repo_sync import RepositorySync
    from sdde_serve.server.shadow import ShadowScorer

__all__ = ["ModelRuntime", "NotReady"]  # re-exported: routes and tests import them from here


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    limits: ImageLimits
    decode_pool: ThreadPoolExecutor | None = None  # created by the lifespan
    decode_budget: PixelBudget | None = None  # created by the lifespan (needs the model)
    api_keys: list[bytes] = field(default_factory=list)
    ready: bool = False
    repository: ModelRepository | None = None  # created by create_app, filled by the lifespan
    lifecycle: LifecycleMetrics | None = None
    feedback: FeedbackStore | None = None
    shadow: ShadowScorer | None = None
    repository_sync: RepositorySync | None = None  # --workers N: API calls reach every worker

    @property
    def runtime(self) -> ModelRuntime | None:
        """The serving version of the only model (None while loading or with several)."""
        entry = self.repository.default_entry() if self.repository is not None else None
        return entry.serving if entry is not None else None

    @runtime.setter
    def runtime(self, value: ModelRuntime | None) -> None:
        entry = self.repository.default_entry() if self.repository is not None else None
        assert entry is not None, "runtime is the only model's: use the repository"
        entry.serving = value


async def get_state(request: Request) -> ServerState:
    return request.app.state.sdde


StateDep = Annotated[ServerState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


async def get_repository(state: StateDep) -> ModelRepository:
    if state.repository is None:
        raise NotReady("model is not ready yet (loading)")
    return state.repository


RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]


async def get_runtime(request: Request, state: StateDep) -> AsyncIterator[ModelRuntime]:
    """The model version the request names (path ``{name}`` and ``{version}``; neither: the only
    model), held until the request is done: a hot swap or an unload waits for it to finish on
    this version. Not gated on readiness: after SIGTERM the probe says "not ready" but requests
    still arriving are answered until the batcher closes."""
    if state.repository is None:
        raise NotReady("model is not ready yet (loading)")
    params = request.path_params
    runtime = state.repository.resolve(params.get("name"), params.get("version"))
    with runtime.use():
        yield runtime


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
