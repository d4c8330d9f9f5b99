"""The Open Inference Protocol (v2), as Triton and KServe speak it, with the binary extension.

Input: one tensor ``images``, FP32, shape ``[B, C, H, W]``, pixels in [0, 1], as JSON ``data``
(flat or nested, row-major) or as raw little-endian bytes after the JSON header (binary tensor
extension: the header's length is in ``Inference-Header-Content-Length``, the tensor carries
``parameters.binary_data_size``). Outputs (all by default): see :func:`output_table`. An output is
returned as bytes when it asks ``binary_data: true`` or the request sets ``binary_data_output``.
The per-request parameter ``ood_policy`` (``flag``/``reject``) sets ``label`` to -1 for rejected
images; ``alpha`` overrides the model's (``is_ood = ood_p_value < alpha``).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.background import BackgroundTask

from sdde_serve import __version__, scores
from sdde_serve.calibration import member_agreement
from sdde_serve.engine import EngineOutput
from sdde_serve.manifest import Manifest
from sdde_serve.scoring import Prediction, make_predictions, score_of
from sdde_serve.server.after_predict import after_predict
from sdde_serve.server.deps import (
    AuthDep,
    ModelRuntime,
    NotReady,
    RuntimeDep,
    StateDep,
)
from sdde_serve.server.errors import ApiError
from sdde_serve.server.limits import check_json_values, deadline_after, offload
from sdde_serve.server.overrides import parse_overrides

# every v2 route but the health probes is behind the API key when keys are configured (one
# declaration here, not one per route); the probes carry no key (the orchestrator calls them)
router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], dependencies=[AuthDep])
open_router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "images"
PLATFORM = "onnxruntime_onnx"
OFFLOAD_JSON_BYTES = 64 * 1024
# responses with more logits than this are serialised in the decode pool, not on the event loop
OFFLOAD_RESPONSE_VALUES = 4096

# v2 datatype -> little-endian numpy dtype
DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "INT64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}

Outputs = dict[str, tuple[str, np.ndarray]]
OutputFn = Callable[[EngineOutput, list[Prediction]], np.ndarray]


def _score_output(name: str) -> OutputFn:
    return lambda o, p: score_of(o, name)


OutputSpec = tuple[str, Callable[[int, int], list[int]], OutputFn]
# name -> (datatype, shape after the batch dim as a function of (members, classes), compute)
OUTPUTS: dict[str, OutputSpec] = {
    "probs": ("FP32", lambda n, c: [c], lambda o, p: o.probs),
    "logits": ("FP32", lambda n, c: [n, c], lambda o, p: o.logits),
    # every registered OOD score (sdde_serve/scores/) goes here, see output_table
    "ood_score": ("FP32", lambda n, c: [], lambda o, p: np.array([x.ood_score for x in p])),
    "is_ood": ("BOOL", lambda n, c: [], lambda o, p: np.array([x.is_ood for x in p])),
    # p-values lie in (0, 1]; -1 (as `label` for a rejected image) for models exported without
    # calibration scores, which have none (JSON has no NaN)
    "ood_p_value": (
        "FP32",
        lambda n, c: [],
        lambda o, p: np.array([-1.0 if x.ood_p_value is None else x.ood_p_value for x in p]),
    ),
    "label": (
        "INT64",
        lambda n, c: [],
        lambda o, p: np.array([-1 if x.label is None else x.label for x in p]),
    ),
    "agreement": ("FP32", lambda n, c: [], lambda o, p: member_agreement(o.logits, o.probs)),
}


def output_table() -> dict[str, OutputSpec]:
    """:data:`OUTPUTS` with every registered OOD score after ``logits`` (the registry as it is
    now: a score registered after this module loaded is served too)."""
    fixed = list(OUTPUTS.items())
    score_outputs = [(n, ("FP32", _no_dims, _score_output(n))) for n in scores.names()]
    return dict([*fixed[:2], *score_outputs, *fixed[2:]])


def _no_dims(members: int, classes: int) -> list[int]:
    return []


def model_outputs(manifest: Manifest) -> list[str]:
    """The outputs this model offers: all of :func:`output_table` but the scores its graph lacks
    and cannot recompute from its logits (``knn`` without a KNN bank, other fitted scores)."""
    return [n for n in output_table() if n not in scores.SCORES or score_available(manifest, n)]


def score_available(manifest: Manifest, name: str) -> bool:
    spec = scores.get(name)
    if spec.in_every_graph or spec.recompute_from_logits:
        return True
    if name == "knn":  # graphs with a bank have always recorded it in the manifest
        return manifest.knn is not None
    return name in manifest.outputs


class TensorRequest(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class OutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorRequest] = Field(min_length=1)
    outputs: list[OutputRequest] | None = None


class TensorResponse(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[TensorResponse]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="providers in use, classes, OOD rule, members"
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


ModelName = Annotated[
    str, Path(description="the model name (repository directory, else the manifest's)")
]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` substituted in place.

    A schema put into ``openapi_extra`` is copied as is: its ``#/$defs/...`` references would
    point into the OpenAPI document's root, where nothing is, and client generators and schema
    fuzzers would skip the operation. The request models are not recursive, so inlining ends.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**resolve(defs[ref.removeprefix("#/$defs/")]), **resolve(rest)}
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _check_model(runtime: ModelRuntime, name: str, version: str | None = None) -> None:
    if name != runtime.name:
        raise ApiError(404, f"unknown model {name!r}; this server serves {runtime.name!r}")
    if version is not None and version != runtime.version:
        raise ApiError(404, f"unknown version {version!r} of {name!r} (have {runtime.version!r})")


# --- health (open: probes carry no API key) ---------------------------------------------------


@open_router.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@open_router.get("/health/ready", summary="Readiness: some model answers, warmed up, not draining")
async def ready(state: StateDep) -> JSONResponse:
    # asked of the repository on each probe (not only at start): unloading the last model
    # through the repository API must take the pod out of the load balancer's rotation
    answers = state.ready and state.repository is not None and state.repository.ready()
    return JSONResponse({"ready": answers}, status_code=200 if answers else 503)


# Model readiness names a model: behind the API key (the router's) like the metadata; the health
# probes above stay open for the orchestrator.
@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(name: ModelName, state: StateDep, version: str | None = None) -> JSONResponse:
    if state.repository is None:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    try:
        state.repository.resolve(name, version)
    except NotReady:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    return JSONResponse(
        {"name": name, "ready": state.ready}, status_code=200 if state.ready else 503
    )


# --- metadata and inference (API key when configured) -----------------------------------------


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(state: StateDep) -> ServerMetadata:
    extensions = ["binary_tensor_data"]
    if state.repository is not None and state.repository.root is not None:
        extensions.append("model_repository")  # as Triton reports its repository API
    return ServerMetadata(name="sdde-serve", version=__version__, extensions=extensions)


@router.get("/models/{name}", response_model=ModelMetadata, summary="Model metadata")
@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    include_in_schema=False,
)
async def model_metadata(
    name: ModelName, runtime: RuntimeDep, state: StateDep, version: str | None = None
) -> ModelMetadata:
    _check_model(runtime, name, version)
    m = runtime.manifest
    members, classes = m.members, m.num_classes
    assert state.repository is not None
    return ModelMetadata(
        name=runtime.name,
        versions=state.repository.loaded_versions(runtime.name),
        platform=PLATFORM,
        inputs=[
            TensorMetadata(
                name=INPUT_NAME,
                datatype="FP32",
                shape=[-1, m.input.channels, m.input.height, m.input.width],
            )
        ],
        outputs=[
            TensorMetadata(name=name, datatype=dt, shape=[-1, *shape(members, classes)])
            for name, (dt, shape, _) in output_table().items()
            if name in model_outputs(m)
        ],
        parameters={
            "providers": ",".join(runtime.providers),
            "classes": json.dumps(m.classes),
            "members": members,
            "ood_score": m.ood.score,
            "ood_threshold": m.ood.threshold,
            # absent for models without calibration scores (no p-values)
            **({"ood_alpha": m.ood.alpha} if m.ood.calibration_scores is not None else {}),
            "temperature": m.temperature,
            "input_range": "[0, 1]",
        },
    )


# --- inference --------------------------------------------------------------------------------


def _split_body(request: Request, body: bytes) -> tuple[bytes, bytes]:
    raw = request.headers.get(HEADER_LENGTH)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("", "application/json", "application/octet-stream"):
        raise ApiError(415, f"unsupported content type {media!r} for v2 inference")
    if raw is None:
        return body, b""
    try:
        n = int(raw)
    except ValueError:
        raise ApiError(400, f"{HEADER_LENGTH} is not an integer: {raw[:40]!r}") from None
    if not 0 < n <= len(body):
        raise ApiError(400, f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
    return body[:n], body[n:]


def _max_values(runtime: ModelRuntime, max_images: int) -> int:
    """Most values a valid header can hold: the largest input tensor as JSON ``data``, plus room
    for the outputs list and parameters (see :func:`check_json_values`)."""
    spec = runtime.manifest.input
    return max_images * spec.channels * spec.height * spec.width + 8 * len(output_table()) + 64


def _parse(header: bytes, max_values: int | None = None) -> InferenceRequest:
    if not header:
        raise ApiError(400, "empty body: expected a v2 inference request")
    if max_values is not None:
        # bounded before parsing: a huge list of tiny values would become millions of objects
        check_json_values(header, max_values, "inference request")
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"invalid inference request: {loc}: {first['msg']}") from None


def _input_array(
    req: InferenceRequest, binary: bytes, runtime: ModelRuntime, max_images: int
) -> np.ndarray:
    names = [t.name for t in req.inputs]
    if names != [INPUT_NAME]:
        raise ApiError(400, f"expected exactly one input {INPUT_NAME!r}, got {names}")
    tensor = req.inputs[0]
    spec = runtime.manifest.input
    expected = [spec.channels, spec.height, spec.width]
    if tensor.datatype != "FP32":
        raise ApiError(400, f"input {INPUT_NAME!r} must be FP32, got {tensor.datatype!r}")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != expected or not 1 <= shape[0] <= max_images:
        raise ApiError(
            400,
            f"input {INPUT_NAME!r} must have shape [B, {', '.join(map(str, expected))}] "
            f"with 1 <= B <= {max_images}, got {shape}",
        )
    count = math.prod(shape)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise ApiError(400, "input has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size != count * 4:
            raise ApiError(
                400, f"binary_data_size {size!r} != {count} FP32 values x 4 bytes = {count * 4}"
            )
        if len(binary) != size:
            raise ApiError(400, f"binary part has {len(binary)} bytes, expected {size}")
        array = np.frombuffer(binary, dtype="<f4").astype(np.float32).reshape(shape)
    else:
        if binary:
            raise ApiError(
                400, f"{len(binary)} binary bytes but no input declares binary_data_size"
            )
        if tensor.data is None:
            raise ApiError(400, f"input {INPUT_NAME!r} has neither 'data' nor binary_data_size")
        try:
            values = np.asarray(tensor.data)
        except (ValueError, TypeError):
            raise ApiError(400, "input data is not a rectangular array of numbers") from None
        if values.dtype.kind not in "iuf":
            raise ApiError(400, "input data must be numbers")
        if values.size != count:
            raise ApiError(400, f"input data has {values.size} values, shape {shape} needs {count}")
        array = values.astype(np.float32).reshape(shape)
    if not np.isfinite(array).all():
        raise ApiError(400, "input contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0.0 or hi > 1.0:
        raise ApiError(400, f"pixel values must be in [0, 1], got min {lo:.4g} max {hi:.4g}")
    return array


def _requested(req: InferenceRequest, available: list[str]) -> list[tuple[str, bool]]:
    default_binary = bool((req.parameters or {}).get("binary_data_output", False))
    if not req.outputs:
        return [(name, default_binary) for name in available]
    wanted = []
    seen: set[str] = set()
    for out in req.outputs:
        if out.name not in available:
            raise ApiError(400, f"unknown output {out.name!r}; available: {', '.join(available)}")
        if out.name in seen:  # each copy would cost a full serialisation of the tensor
            raise ApiError(400, f"output {out.name!r} is requested more than once")
        seen.add(out.name)
        binary = (out.parameters or {}).get("binary_data", default_binary)
        wanted.append((out.name, bool(binary)))
    return wanted


@router.post(
    "/models/{name}/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    summary="Inference (JSON or binary tensors)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(InferenceRequest)}},
        }
    },
    responses={
        400: {"description": "malformed request, wrong tensor name/shape/datatype/size, NaN"},
        404: {"description": "unknown model or version"},
        413: {"description": "body too large"},
        422: {"description": "parameter ood_policy or alpha out of range (as in /v1)"},
        503: {"description": "not ready, queue full, timed out"},
    },
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(
    name: ModelName,
    request: Request,
    state: StateDep,
    runtime: RuntimeDep,
    version: str | None = None,
) -> Response:
    _check_model(runtime, name, version)
    settings = state.settings
    deadline = deadline_after(settings.request_timeout_s)
    with runtime.batcher.expect():
        header, binary = _split_body(request, await request.body())
        if len(header) > settings.max_json_bytes:
            raise ApiError(
                413, f"JSON header of {len(header)} bytes exceeds the limit of "
                f"{settings.max_json_bytes}"
            )  # fmt: skip
        max_images = settings.max_images_per_request

        def parse() -> tuple[InferenceRequest, list[tuple[str, bool]], np.ndarray]:
            req = _parse(header, _max_values(runtime, max_images))
            # bad outputs are refused before the input is converted
            wanted = _requested(req, model_outputs(runtime.manifest))
            return req, wanted, _input_array(req, binary, runtime, max_images)

        if len(header) + len(binary) > OFFLOAD_JSON_BYTES:
            # a large JSON tensor takes milliseconds to parse: not on the event loop
            req, wanted, images = await offload(state.decode_pool, deadline, parse)
        else:
            req, wanted, images = parse()
        params = req.parameters or {}
        policy, alpha = parse_overrides(
            params.get("ood_policy"),
            params.get("alpha"),
            settings.ood_policy,
            runtime.manifest,
            runtime.name,
        )
    remaining = max(deadline - time.monotonic(), 0.001)
    out = await runtime.batcher.submit(images, timeout=remaining)
    manifest = runtime.manifest
    preds = make_predictions(out, manifest, top_k=1, policy=policy, alpha=alpha)
    state.metrics.observe_predictions(runtime.name, preds)
    ids, background = after_predict(state, runtime, images, out, preds)
    meta: dict[str, Any] = {
        "model_name": runtime.name,
        "model_version": runtime.version,
        # one id per image, comma-separated (v2 parameters are scalars), for POST /v1/feedback
        "parameters": {"prediction_ids": ",".join(ids)},
    }
    if req.id is not None:
        meta["id"] = req.id
    serialise = functools.partial(_response, meta, wanted, background)
    if len(out) * manifest.members * manifest.num_classes > OFFLOAD_RESPONSE_VALUES:
        return await offload(state.decode_pool, float("inf"), serialise, out, preds)
    return serialise(out, preds)


def _response(
    meta: dict[str, Any],
    wanted: list[tuple[str, bool]],
    background: BackgroundTask | None,
    out: EngineOutput,
    preds: list[Prediction],
) -> Response:
    """The v2 response: ``meta`` (model, version, ids) with the wanted outputs, as JSON or as a
    JSON header + binary tensors (serialised off the loop when large)."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    table = output_table()
    for out_name, binary_out in wanted:
        datatype, _, compute = table[out_name]
        array = np.asarray(compute(out, preds)).astype(DTYPES[datatype])
        entry: dict[str, Any] = {"name": out_name, "datatype": datatype, "shape": list(array.shape)}
        if binary_out:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    body: dict[str, Any] = {**meta, "outputs": entries}
    if not chunks:
        return JSONResponse(body, background=background)
    head = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
        background=background,
    )
