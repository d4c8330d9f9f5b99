"""The FastAPI application factory (FastAPI's "Bigger Applications" layout).

``create_app(settings, engine=None)`` wires settings, metrics, the batcher and the routers. The
lifespan loads the engine (unless one is given), warms it up, and only then turns readiness on;
on shutdown readiness goes off first, then accepted requests drain, then the batcher stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdde_serve import __version__
from sdde_serve.engine import Engine
from sdde_serve.preprocess import ImageLimits, PixelBudget
from sdde_serve.server.deps import ServerState
from sdde_serve.server.errors import BodyLimitMiddleware, install_error_handlers
from sdde_serve.server.feedback import FeedbackStore
from sdde_serve.server.lifecycle_metrics import LifecycleMetrics
from sdde_serve.server.metrics import Metrics
from sdde_serve.server.multiprocess import worker_exiting
from sdde_serve.server.repo_poll import poll_forever
from sdde_serve.server.repo_shadow import start_shadows
from sdde_serve.server.repo_sync import RepositorySync
from sdde_serve.server.repository import ModelRepository, Preloaded, open_engine
from sdde_serve.server.routes import feedback as feedback_routes
from sdde_serve.server.routes import metrics as metrics_routes
from sdde_serve.server.routes import predict, v2
from sdde_serve.server.routes import repository as repository_routes
from sdde_serve.server.settings import Settings
from sdde_serve.server.shadow import ShadowScorer
from sdde_serve.server.tokens import Signer

log = logging.getLogger("sdde.server")

DESCRIPTION = """\
Image classification with a Saliency-Diversified Deep Ensemble and out-of-distribution (OOD)
detection. `/v1/predict` is the simple API; `/v2/...` is the Open Inference Protocol (Triton,
KServe) with the binary tensor extension. Errors are `{"error": "<reason>"}`.
"""


def load_engine(settings: Settings) -> Engine:
    """The engine the settings describe (raises ``ModelLoadError``, one clear line)."""
    from sdde_serve.engine import ModelLoadError, cuda_usable

    if settings.model is None:
        raise ModelLoadError("no model given (argument MODEL or SDDE_MODEL)")
    if settings.require_gpu and not cuda_usable():
        # checked before onnxruntime tries (and prints C++ errors about) the CUDA provider
        raise ModelLoadError("--require-gpu: no usable GPU provider (CUDA driver/libraries)")
    return open_engine(settings, settings.model)


def set_ready(state: ServerState, ready: bool) -> None:
    repository = state.repository
    state.ready = ready and repository is not None and repository.ready()
    if repository is not None:
        for entry in repository.entries.values():
            if entry.unloaded:
                continue
            serving = state.ready and entry.serving is not None
            state.metrics.model_ready.labels(model=entry.name).set(int(serving))


async def start_repository_sync(
    state: ServerState, repository: ModelRepository
) -> asyncio.Task[None] | None:
    """With several workers on a repository: catch up with the repository API calls the other
    workers took, then follow them (repo_sync.py)."""
    directory = state.metrics.multiprocess_dir
    if state.settings.workers == 1 or directory is None or repository.root is None:
        return None
    state.repository_sync = RepositorySync(repository, directory)
    await state.repository_sync.follow_once()
    return asyncio.get_running_loop().create_task(
        state.repository_sync.follow_forever(), name="repository-sync"
    )


def build_state(settings: Settings) -> ServerState:
    """Metrics, the feedback store and the limits of one app (the repository fills in at start)."""
    metrics = Metrics()
    lifecycle = LifecycleMetrics(metrics.registry)
    feedback = FeedbackStore(
        lifecycle,
        Signer(settings.feedback_key() or os.urandom(32)),
        max_size=settings.feedback_max_size,
        max_age_s=settings.feedback_max_age_s,
        window_s=settings.feedback_window_s,
        shared=metrics.multiprocess_dir is not None,
    )
    metrics.registry.register(feedback)
    return ServerState(
        settings=settings,
        metrics=metrics,
        limits=ImageLimits(
            max_bytes=settings.max_image_bytes,  # None: derived from the pixel limit
            max_pixels=settings.max_image_pixels,  # None: derived from the model's input
            max_request_pixels=settings.max_request_pixels,
        ),
        api_keys=[k.encode() for k in settings.all_api_keys()],
        lifecycle=lifecycle,
        feedback=feedback,
    )


async def start_serving(
    state: ServerState,
    repository: ModelRepository,
    engine: Engine | None,
    preloaded: Preloaded | None,
) -> list[asyncio.Task[None]]:
    """Load (unless preloaded), warm up and wire everything, turn readiness on; the background
    tasks it started (polling, worker sync, the live window) are returned for the stop."""
    settings, lifecycle = state.settings, state.lifecycle
    assert lifecycle is not None and state.feedback is not None
    # per lifespan (not per app): a pool shut down at one shutdown can't serve the next start
    state.decode_pool = ThreadPoolExecutor(
        settings.decode_threads, thread_name_prefix="sdde-decode"
    )
    # requests are served from here on; readiness (the probe) may go off again on SIGTERM
    # while accepted and late-arriving requests are still answered until the batchers close
    await repository.start(engine, preloaded)
    await start_shadows(repository)
    state.repository = repository
    state.shadow = ShadowScorer(
        repository,
        lifecycle,
        fraction=settings.shadow_fraction,
        max_pending=settings.shadow_max_pending,
        timeout_s=settings.request_timeout_s,
    )
    # large images decode one at a time (bounded memory), small ones in parallel: one budget
    # for the process, sized by the largest per-image limit of the models served at start
    state.decode_budget = PixelBudget(
        max(
            state.limits.pixels(entry.serving.manifest.input)
            for entry in repository.entries.values()
            if entry.serving is not None
        )
    )
    warn_if_open(state)
    # a restarted worker catches up with the API calls the others took before it is ready
    tasks = [await start_repository_sync(state, repository)]
    loop = asyncio.get_running_loop()
    if state.metrics.multiprocess_dir is not None:  # labels leave each worker's window over time
        tasks.append(loop.create_task(state.feedback.window.publish_forever()))
    set_ready(state, True)
    log_serving(repository)
    if repository.root is not None and settings.poll_repo_s > 0:
        poll = poll_forever(repository, settings.poll_repo_s)
        tasks.append(loop.create_task(poll, name="repository-poll"))
    return [t for t in tasks if t is not None]


async def stop_serving(
    state: ServerState, repository: ModelRepository, tasks: list[asyncio.Task[None]]
) -> None:
    """Readiness off first, then accepted requests drain, then the batchers stop."""
    set_ready(state, False)
    for task in tasks:
        task.cancel()
    if state.shadow is not None:
        await state.shadow.close()
    await repository.close(state.settings.drain_timeout_s)
    if state.decode_pool is not None:
        state.decode_pool.shutdown(wait=False, cancel_futures=True)
    worker_exiting(state.metrics.multiprocess_dir)


def warn_if_open(state: ServerState) -> None:
    settings = state.settings
    if not state.api_keys:
        log.warning(
            "NO API KEYS CONFIGURED: /v1 and /v2 inference and metadata are open to anyone "
            "who can reach %s:%s (set --api-key or --api-keys-file)",
            settings.host,
            settings.port,
        )
    if settings.feedback_key() is None:
        log.warning(
            "no feedback secret: prediction ids are signed with a random key, so labels "
            "(POST /v1/feedback) reach only this process until it restarts (set "
            "SDDE_FEEDBACK_SECRET or --feedback-secret-file, the same on every replica)"
        )


def log_serving(repository: ModelRepository) -> None:
    for entry in repository.entries.values():
        runtime = entry.serving
        if runtime is None:  # unloaded through the API (another worker's call)
            continue
        manifest = runtime.manifest
        log.info(
            "serving %s v%s (%d members, %s %s < %.4g is OOD) on %s",
            runtime.name,
            runtime.version,
            manifest.members,
            manifest.ood.score,
            "score",
            manifest.ood.threshold,
            ", ".join(runtime.providers),
        )


ROUTERS = (
    predict.router,
    v2.open_router,
    v2.router,
    repository_routes.router,
    feedback_routes.router,
    metrics_routes.router,
)


def create_app(
    settings: Settings, engine: Engine | None = None, preloaded: Preloaded | None = None
) -> FastAPI:
    """The app. ``engine``: serve this loaded model file; ``preloaded``: the repository's
    starting versions, loaded before the server binds (``ModelRepository.preload``); neither:
    the lifespan loads what ``settings.model`` names."""
    state = build_state(settings)
    assert state.lifecycle is not None
    repository = ModelRepository(settings, state.metrics, state.lifecycle)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = await start_serving(state, repository, engine, preloaded)
        try:
            yield
        finally:
            await stop_serving(state, repository, tasks)

    app = FastAPI(
        title="sdde-serve", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.sdde = state
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    # added last = outermost: the metrics see every status, including the body limit's 413
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics, app_ref=app)
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory sdde_serve.server.app:app_from_env``: settings from ``SDDE_*`` only
    (how ``sdde serve --workers N`` starts each worker process)."""
    from sdde_serve.server.memory import bound_allocator

    bound_allocator()  # each worker process, like the single-process server
    return create_app(Settings())


class RequestMetricsMiddleware:
    """``sdde_requests_total`` and ``sdde_request_duration_seconds`` by route template (bounded
    label values: ``/v2/models/{name}/infer``, never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, app_ref: FastAPI) -> None:
        self.app = app
        self.metrics = metrics
        self.app_ref = app_ref

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:  # answered before routing (413 on Content-Length): match it ourselves
            for candidate in self.app_ref.router.routes:
                match, _ = candidate.matches(scope)
                if match != Match.NONE:
                    route = candidate
                    break
        return getattr(route, "path", None) or "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = self._endpoint(scope)
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.request_duration.labels(endpoint=endpoint).observe(
                time.perf_counter() - started
            )
