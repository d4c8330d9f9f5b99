"""Server settings: one typed object, read once, from ``SDDE_*`` environment variables and flags.

``sdde serve`` builds it from the environment and overrides the fields whose flags were given
(flags win). The app receives it in :func:`sdde_serve.server.app.create_app` and never reads the
environment again, so a test can build any configuration without touching ``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sdde_serve.errors import UserError
from sdde_serve.scoring import OODPolicy

ENV_PREFIX = "SDDE_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", protected_namespaces=()
    )

    model: Path | None = Field(
        None,
        description="the exported ONNX model to serve, or a model repository directory "
        "(REPO/<name>/<version>/model.onnx, as `sdde export --triton-repo` writes)",
    )
    host: str = Field("127.0.0.1", description="interface to bind (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    workers: int = Field(1, ge=1, description="server processes, each with its own model")
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime intra-op threads per process (0 = one per core)"
    )
    max_batch_size: int = Field(32, ge=1, description="most images in one engine call")
    max_queue_delay_ms: float = Field(
        2.0, ge=0.0, description="longest a request waits for others to fill its batch"
    )
    max_queue_size: int = Field(
        1024, ge=1, description="images waiting for the engine before new requests get 503"
    )
    request_timeout_s: float = Field(
        30.0, gt=0.0, description="per request: queue wait plus inference, else 503"
    )
    ood_policy: OODPolicy = Field(
        "flag", description="default OOD policy; requests may override it"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys accepted (comma-separated in SDDE_API_KEYS); empty = open",
    )
    api_keys_file: Path | None = Field(
        None, description="file with one API key per line (a mounted secret)"
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="request bodies above this get 413"
    )
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        description="decode-cost guard: width x height per image (a baseline JPEG's after "
        "libjpeg's 1/2-1/8 scaling), read from the header before decoding "
        "(default: 2,097,152, a Full-HD frame, or 256 x the model's input if larger)",
    )
    max_image_bytes: int | None = Field(
        None,
        ge=1,
        description="encoded bytes per image (default: 4 x the pixel limit, at least 8 MiB)",
    )
    max_request_pixels: int | None = Field(
        None, ge=1, description="width x height summed over one request (default: 4 x per image)"
    )
    max_json_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="JSON bodies (/v1 base64, the v2 header) above this get 413 before parsing",
    )
    max_images_per_request: int = Field(256, ge=1, description="images in one request")
    top_k: int = Field(3, ge=1, description="default number of classes in top_k")
    expect_sha256: str | None = Field(
        None,
        description="refuse to start unless the model file's SHA-256 (sha256sum MODEL) is this",
    )
    require_gpu: bool = Field(False, description="fail at start-up unless a GPU provider loads")
    spin_wait: bool = Field(
        True,
        description="onnxruntime threads spin between calls: lower latency on dedicated cores; "
        "turn off on shared or oversubscribed CPUs, where spinning steals their time",
    )
    decode_threads: int = Field(2, ge=1, description="threads decoding images off the loop")
    drain_timeout_s: float = Field(
        30.0, gt=0.0, description="on SIGTERM, longest wait for in-flight requests (seconds)"
    )
    pin: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="repository: serve NAME at VERSION (NAME:VERSION, repeatable; comma-separated "
        "in SDDE_PIN) instead of its latest version",
    )
    poll_repo_s: float = Field(
        0.0, ge=0.0, description="repository: look for new versions every SECS (0 = never)"
    )
    shadow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="score live traffic of NAME also with VERSION, after answering (NAME:VERSION, "
        "repeatable); its agreement, OOD rate and latency go to /metrics",
    )
    shadow_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="share of live requests also sent to the shadow version"
    )
    shadow_max_pending: int = Field(
        256, ge=1, description="images queued for shadow scoring before more are skipped"
    )
    feedback_max_size: int = Field(
        100_000, ge=0, description="predictions kept for delayed labels (0 = keep none)"
    )
    feedback_max_age_s: float = Field(
        7 * 86400.0, gt=0.0, description="how long a prediction waits for its label"
    )
    feedback_window_s: float = Field(
        3600.0, gt=0.0, description="window of the sdde_live_* accuracy, NLL, ECE gauges"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level (debug adds uvicorn's access log)"
    )

    @field_validator("api_keys", "pin", "shadow", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_queue_size < self.max_batch_size:
            raise ValueError("max_queue_size must be >= max_batch_size")
        for spec in (*self.pin, *self.shadow):
            name, _, version = spec.rpartition(":")
            if not name or not version.isdigit():
                raise ValueError(f"expected NAME:VERSION (a number), got {spec!r}")
        return self

    def model_versions(self, specs: list[str]) -> dict[str, str]:
        """``["digits:2"]`` (``pin`` or ``shadow``) -> ``{"digits": "2"}``."""
        return dict(spec.rsplit(":", 1) for spec in specs)  # type: ignore[misc]

    def all_api_keys(self) -> list[str]:
        """Keys from ``api_keys`` and ``api_keys_file`` (blank lines and ``#`` comments skipped)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text()
            except OSError as exc:
                raise UserError(f"{self.api_keys_file}: cannot read API keys ({exc})") from None
            from_file = [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
            if not from_file:
                # an empty mounted secret must not silently turn authentication off
                raise UserError(
                    f"{self.api_keys_file}: the API keys file holds no key; refusing to start "
                    "open (remove --api-keys-file to serve without authentication)"
                )
            keys += from_file
        return keys
