"""The FastAPI application factory (FastAPI's "Bigger Applications" layout).

``create_app(settings, engine=None)`` wires settings, metrics, the batcher and the routers. The
lifespan loads the engine (unless one is given), warms it up, and only then turns readiness on;
on shutdown readiness goes off first, then accepted requests drain, then the batcher stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdde_serve import __version__
from sdde_serve.engine import Engine
from sdde_serve.preprocess import ImageLimits
from sdde_serve.server.batcher import Batcher
from sdde_serve.server.deps import ModelRuntime, ServerState
from sdde_serve.server.errors import BodyLimitMiddleware, install_error_handlers
from sdde_serve.server.metrics import Metrics
from sdde_serve.server.multiprocess import worker_exiting
from sdde_serve.server.routes import metrics as metrics_routes
from sdde_serve.server.routes import predict, v2
from sdde_serve.server.settings import Settings

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
    return Engine(
        settings.model,
        intra_op_threads=settings.intra_op_threads,
        require_gpu=settings.require_gpu,
        spin_wait=settings.spin_wait,
    )


def set_ready(state: ServerState, ready: bool) -> None:
    state.ready = ready and state.runtime is not None
    if state.runtime is not None:
        state.metrics.model_ready.labels(model=state.runtime.manifest.name).set(int(state.ready))


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    metrics = Metrics()
    state = ServerState(
        settings=settings,
        metrics=metrics,
        limits=ImageLimits(max_bytes=settings.max_body_bytes, max_pixels=settings.max_image_pixels),
        api_keys=[k.encode() for k in settings.all_api_keys()],
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine if engine is not None else await asyncio.to_thread(load_engine, settings)
        # per lifespan (not per app): a pool shut down at one shutdown can't serve the next start
        state.decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="sdde-decode"
        )
        manifest = eng.manifest
        metrics.set_model(manifest, eng.providers)
        batcher = Batcher(
            eng.run,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            metrics=metrics,
            model=manifest.name,
        )
        # warm-up sizes a loaded server will see: single requests and full batches
        sizes = tuple(sorted({1, settings.max_batch_size}))
        await asyncio.to_thread(eng.warmup, sizes)
        batcher.start()
        # requests are served from here on; readiness (the probe) may go off again on SIGTERM
        # while accepted and late-arriving requests are still answered until the batcher closes
        state.runtime = ModelRuntime(manifest, list(eng.providers), batcher)
        set_ready(state, True)
        log.info(
            "serving %s v%s (%d members, %s %s < %.4g is OOD) on %s",
            manifest.name,
            manifest.version,
            manifest.members,
            manifest.ood.score,
            "score",
            manifest.ood.threshold,
            ", ".join(eng.providers),
        )
        try:
            yield
        finally:
            set_ready(state, False)
            await batcher.close(settings.drain_timeout_s)
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            worker_exiting(metrics.multiprocess_dir)

    app = FastAPI(
        title="sdde-serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.sdde = state
    install_error_handlers(app)
    app.include_router(predict.router)
    app.include_router(v2.open_router)
    app.include_router(v2.router)
    app.include_router(metrics_routes.router)
    # added last = outermost: the metrics see every status, including the body limit's 413
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, app_ref=app)
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory sdde_serve.server.app:app_from_env``: settings from ``SDDE_*`` only
    (how ``sdde serve --workers N`` starts each worker process)."""
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
