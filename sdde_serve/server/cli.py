"""``sdde serve MODEL``: the HTTP server under uvicorn.

Every flag maps onto one :class:`~sdde_serve.server.settings.Settings` field; a flag that is not
given leaves the field to its ``SDDE_*`` environment variable or default. The model is loaded and
verified before the server binds, so a missing, corrupt or tampered file (or ``--require-gpu``
without a GPU) stops start-up with one clear line and exit status 2.

SIGTERM (and Ctrl-C): readiness goes off at once (``/v2/health/ready`` answers 503), the listener
closes, in-flight requests finish (at most ``--drain-timeout`` seconds), then the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from sdde_serve.errors import UserError
from sdde_serve.server.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from sdde_serve.server.deps import ServerState

log = logging.getLogger("sdde.server")

HELP = "serve an exported model over HTTP: /v1/predict, the v2 inference protocol, /metrics"

# flag -> (Settings field, extra argparse keywords)
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--host": ("host", {}),
    "--port": ("port", {"type": int}),
    "--workers": ("workers", {"type": int}),
    "--threads": ("intra_op_threads", {"type": int}),
    "--max-batch-size": ("max_batch_size", {"type": int}),
    "--max-queue-delay-ms": ("max_queue_delay_ms", {"type": float}),
    "--max-queue-size": ("max_queue_size", {"type": int}),
    "--timeout": ("request_timeout_s", {"type": float}),
    "--ood-policy": ("ood_policy", {"choices": ["flag", "reject"]}),
    "--api-key": ("api_keys", {"action": "append"}),
    "--api-keys-file": ("api_keys_file", {}),
    "--max-body-bytes": ("max_body_bytes", {"type": int}),
    "--max-image-pixels": ("max_image_pixels", {"type": int}),
    "--max-images-per-request": ("max_images_per_request", {"type": int}),
    "--top-k": ("top_k", {"type": int}),
    "--require-gpu": ("require_gpu", {"action": "store_true"}),
    "--spin-wait": ("spin_wait", {"action": argparse.BooleanOptionalAction}),
    "--decode-threads": ("decode_threads", {"type": int}),
    "--drain-timeout": ("drain_timeout_s", {"type": float}),
    "--log-level": ("log_level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=argparse.SUPPRESS, help="exported .onnx file")
    for flag, (field, extra) in FLAGS.items():
        info = Settings.model_fields[field]
        default = info.get_default(call_default_factory=True)
        env = ENV_PREFIX + field.upper()
        parser.add_argument(
            flag,
            dest=field,
            default=argparse.SUPPRESS,  # absent -> environment or default
            help=f"{info.description or field} [env {env}; default {default!r}]",
            **extra,
        )


def build_settings(args: argparse.Namespace) -> Settings:
    """Environment first, then the flags that were given."""
    from pydantic import ValidationError

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"invalid setting {where}: {first['msg']}") from None


def settings_env(settings: Settings) -> dict[str, str]:
    """``SDDE_*`` variables that reproduce ``settings`` in a worker process."""
    env = {}
    for name, value in settings.model_dump(exclude_defaults=True).items():
        if value is None:
            continue
        text = ",".join(value) if isinstance(value, list) else str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env


class DrainingServer(uvicorn.Server):
    """uvicorn's server, turning readiness off first on SIGTERM/SIGINT: load balancers stop
    sending while uvicorn closes the listener and waits for in-flight requests."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        from sdde_serve.server.app import set_ready

        set_ready(self.state, False)
        log.info("%s: readiness off, draining", signal.Signals(sig).name)
        super().handle_exit(sig, frame)


def _serve_one(settings: Settings) -> int:
    from sdde_serve.server.app import create_app, load_engine
    from sdde_serve.server.multiprocess import clean_dir, multiprocess_dir

    if (metrics_dir := multiprocess_dir()) is not None:  # set by the operator: start afresh
        clean_dir(metrics_dir)
    engine = load_engine(settings)  # ModelLoadError: one clear line, before binding
    app = create_app(settings, engine)
    state = app.state.sdde

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        access_log=settings.log_level == "debug",
    )
    server = DrainingServer(config, state)
    # uvicorn re-raises the signal it handled once it has shut down, under the handler that was
    # installed before it started: a no-op one lets a drained SIGTERM end with exit status 0
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    server.run()
    if not server.started:
        raise UserError("the server did not start (see the log above)")
    return 0


def _serve_many(settings: Settings) -> int:
    from sdde_serve.server.app import load_engine
    from sdde_serve.server.multiprocess import shared_metrics_dir

    load_engine(settings)  # fail fast in the parent; each worker then loads its own session
    os.environ.update(settings_env(settings))
    # the workers (spawned, so they import prometheus_client afresh) find the directory in
    # PROMETHEUS_MULTIPROC_DIR and write their metrics there; any of them merges them all
    with shared_metrics_dir() as metrics_dir:
        log.info("%d workers; metrics merged from %s", settings.workers, metrics_dir)
        uvicorn.run(
            "sdde_serve.server.app:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
            access_log=settings.log_level == "debug",
        )
    return 0


def main(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    if settings.model is None:
        raise UserError("no model given: sdde serve MODEL.onnx (or set SDDE_MODEL)")
    settings.all_api_keys()  # an unreadable key file fails now, not at the first request
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _serve_one(settings) if settings.workers == 1 else _serve_many(settings)
