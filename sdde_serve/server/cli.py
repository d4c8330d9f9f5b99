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
import asyncio
import logging
import os
import secrets
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import SecretStr

from sdde_serve.errors import UserError
from sdde_serve.probe import PROBE_MODES
from sdde_serve.scoring import OOD_POLICIES
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
    "--ood-policy": ("ood_policy", {"choices": OOD_POLICIES}),
    "--api-key": ("api_keys", {"action": "append"}),
    "--api-keys-file": ("api_keys_file", {}),
    "--max-body-bytes": ("max_body_bytes", {"type": int}),
    "--max-image-pixels": ("max_image_pixels", {"type": int}),
    "--max-image-bytes": ("max_image_bytes", {"type": int}),
    "--max-request-pixels": ("max_request_pixels", {"type": int}),
    "--max-json-bytes": ("max_json_bytes", {"type": int}),
    "--max-images-per-request": ("max_images_per_request", {"type": int}),
    "--top-k": ("top_k", {"type": int}),
    "--require-gpu": ("require_gpu", {"action": "store_true"}),
    "--probe-check": ("probe_check", {"choices": PROBE_MODES}),
    "--expect-sha256": ("expect_sha256", {"metavar": "HEX"}),
    "--spin-wait": ("spin_wait", {"action": argparse.BooleanOptionalAction}),
    "--decode-threads": ("decode_threads", {"type": int}),
    "--drain-timeout": ("drain_timeout_s", {"type": float}),
    "--pin": ("pin", {"action": "append", "metavar": "NAME:VERSION"}),
    "--poll-repo": ("poll_repo_s", {"type": float, "metavar": "SECS"}),
    "--shadow": ("shadow", {"action": "append", "metavar": "NAME:VERSION"}),
    "--shadow-fraction": ("shadow_fraction", {"type": float}),
    "--shadow-max-pending": ("shadow_max_pending", {"type": int}),
    "--feedback-max-size": ("feedback_max_size", {"type": int}),
    "--feedback-max-age": ("feedback_max_age_s", {"type": float, "metavar": "SECS"}),
    "--feedback-window": ("feedback_window_s", {"type": float, "metavar": "SECS"}),
    "--feedback-secret-file": ("feedback_secret_file", {"metavar": "FILE"}),
    "--log-level": ("log_level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=argparse.SUPPRESS,
        help="exported .onnx file, or a model repository directory "
        "(REPO/<name>/<version>/model.onnx)",
    )
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
        raise UserError(setting_error(exc.errors()[0])) from None


# pydantic's bounds, said as the rest of the CLI says them ("--threads must be >= 0")
BOUNDS = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le"}
BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<="}
KIND_WORDS = {
    "int_parsing": "an integer",
    "float_parsing": "a number",
    "bool_parsing": "true or false",
}


def setting_error(error: Any) -> str:
    """One line in the project's words for pydantic's first error: our own checks' text as it
    is (not "Value error, ..."), bounds as ``--flag must be >= N``, the flag and its variable."""
    ctx = error.get("ctx") or {}
    if error["type"] == "value_error" and "error" in ctx:
        return str(ctx["error"])
    field = str(error["loc"][0]) if error["loc"] else ""
    flag = f"--{field.replace('_', '-')} ({ENV_PREFIX}{field.upper()})" if field else "a setting"
    bound = BOUNDS.get(error["type"])
    if bound is not None:
        return f"{flag} must be {BOUND_WORDS[bound]} {ctx[bound]}, got {error['input']!r}"
    if error["type"] in KIND_WORDS:
        return f"{flag} must be {KIND_WORDS[error['type']]}, got {error['input']!r}"
    return f"invalid {flag}: {error['msg']}"


def settings_env(settings: Settings) -> dict[str, str]:
    """``SDDE_*`` variables that reproduce ``settings`` in a worker process."""
    env = {}
    for name, value in settings.model_dump(exclude_defaults=True).items():
        if value is None:
            continue
        if isinstance(value, list):
            text = ",".join(value)
        elif isinstance(value, SecretStr):
            text = value.get_secret_value()
        else:
            text = str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env


def drain_seconds(settings: Settings) -> float:
    """uvicorn's graceful-shutdown limit. Passed as given: ``int()`` truncated values below 1 s
    to 0, which uvicorn reads as "no limit" (shutdown then waited forever)."""
    return settings.drain_timeout_s


class DrainingServer(uvicorn.Server):
    """uvicorn's server, turning readiness off first on SIGTERM/SIGINT: load balancers stop
    sending while uvicorn closes the listener and waits for in-flight requests."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Signal context: the handler interrupts the main thread between bytecodes, possibly
        # inside a Prometheus update holding its (non-reentrant) lock. Only a plain attribute is
        # written here (the probe reads it); the gauge is updated from the event loop.
        self.state.ready = False
        name = signal.Signals(sig).name
        try:
            asyncio.get_running_loop().call_soon_threadsafe(_readiness_off, self.state, name)
        except RuntimeError:  # called outside the loop's thread (not from a signal): at once
            _readiness_off(self.state, name)
        super().handle_exit(sig, frame)


def _readiness_off(state: ServerState, signal_name: str) -> None:
    from sdde_serve.server.app import set_ready

    set_ready(state, False)
    log.info("%s: readiness off, draining", signal_name)


def _preload(settings: Settings) -> dict[str, Any]:
    """Load what the server will serve, before binding (ModelLoadError: one clear line):
    ``{"engine": ...}`` for a model file, ``{"preloaded": ...}`` for a repository."""
    from sdde_serve.server.app import load_engine

    assert settings.model is not None
    if not settings.model.is_dir():
        if settings.pin or settings.shadow or settings.poll_repo_s:
            raise UserError("--pin, --shadow and --poll-repo need a model repository directory")
        return {"engine": load_engine(settings)}
    from sdde_serve.server.lifecycle_metrics import LifecycleMetrics
    from sdde_serve.server.metrics import Metrics
    from sdde_serve.server.repository import ModelRepository

    metrics = Metrics()  # start-up's failures are logged; the app counts from its own start
    repository = ModelRepository(settings, metrics, LifecycleMetrics(metrics.registry))
    return {"preloaded": repository.preload()}


def _serve_one(settings: Settings) -> int:
    from sdde_serve.server.app import create_app
    from sdde_serve.server.multiprocess import clean_dir, multiprocess_dir

    if (metrics_dir := multiprocess_dir()) is not None:  # set by the operator: start afresh
        clean_dir(metrics_dir)
    app = create_app(settings, **_preload(settings))
    state = app.state.sdde

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=drain_seconds(settings),
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
    from sdde_serve.server.multiprocess import shared_metrics_dir

    _preload(settings)  # fail fast in the parent; each worker then loads its own sessions
    os.environ.update(settings_env(settings))
    if settings.feedback_key() is None:
        # one random key for all the workers: any of them accepts a label for any prediction
        os.environ[ENV_PREFIX + "FEEDBACK_SECRET"] = secrets.token_urlsafe(32)
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
            timeout_graceful_shutdown=drain_seconds(settings),
            access_log=settings.log_level == "debug",
        )
    return 0


def main(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    if settings.model is None:
        raise UserError("no model given: sdde serve MODEL.onnx|REPO_DIR (or set SDDE_MODEL)")
    if settings.expect_sha256 and settings.model.is_dir():
        raise UserError(
            "--expect-sha256 pins one model file; a repository's versions are each checked "
            "against their own manifests"
        )
    settings.all_api_keys()  # an unreadable or empty key file fails now, not later
    settings.feedback_key()  # likewise the feedback secret
    from sdde_serve.server.memory import bound_allocator

    bound_allocator()  # before the engine and the thread pools allocate anything
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _serve_one(settings) if settings.workers == 1 else _serve_many(settings)
