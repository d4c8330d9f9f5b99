"""``POST /v1/predict``: one or more images in, one prediction per image out.

Images arrive as multipart files (``curl -F files=@a.png -F files=@b.png``), as JSON with base64
strings (``{"images": ["iVBOR..."]}``) or as one raw image body (``Content-Type: image/png``).
The response has one shape whatever the count: ``predictions`` in input order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from sdde_serve.manifest import InputSpec
from sdde_serve.preprocess import ImageError, ImageLimits, check_request_pixels, decode_image
from sdde_serve.scoring import OOD_POLICIES, OODPolicy, Prediction, make_predictions
from sdde_serve.server.after_predict import after_predict
from sdde_serve.server.batcher import RequestTimeoutError
from sdde_serve.server.deps import AuthDep, ModelRuntime, RuntimeDep, ServerState, StateDep
from sdde_serve.server.domain_errors import BadParameter
from sdde_serve.server.errors import ApiError
from sdde_serve.server.limits import check_json_values, deadline_after, offload, read_body
from sdde_serve.server.overrides import number_or_text, parse_overrides

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[AuthDep])


class PredictRequest(BaseModel):
    """JSON body: base64-encoded image files (PNG, JPEG, ...; ``data:`` URLs accepted)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, description="base64 of each encoded image file")
    ood_policy: OODPolicy | None = Field(
        None, description="override the server's OOD policy for this request"
    )
    top_k: int | None = Field(None, ge=1, le=1000, description="classes listed in top_k")
    probabilities: bool | None = Field(None, description="include the full calibrated vector")
    alpha: float | None = Field(
        None, ge=0.0, lt=1.0, description="override the model's alpha: is_ood = ood_p_value < alpha"
    )


class ImagePrediction(Prediction):
    index: int = Field(description="position of the image in the request")
    filename: str | None = Field(None, description="multipart file name, when given")
    id: str | None = Field(None, description="this prediction's id, for POST /v1/feedback")


class PredictResponse(BaseModel):
    model: str
    version: str
    ood_policy: OODPolicy
    predictions: list[ImagePrediction]


_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "ood_policy": {"type": "string", "enum": list(OOD_POLICIES)},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
        "probabilities": {"type": "boolean"},
        "alpha": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    },
}
_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": _FORM_SCHEMA},
        "application/json": {"schema": PredictRequest.model_json_schema()},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad image, bad base64, empty body, too many images"},
    401: {"description": "missing or invalid API key (when keys are configured)"},
    413: {"description": "body larger than max_body_bytes (JSON: max_json_bytes)"},
    415: {"description": "unsupported content type"},
    422: {"description": "JSON body or query does not match the schema"},
    503: {"description": "not ready, queue full or timed out (Retry-After)"},
}
_FORM_FIELDS = {"ood_policy", "top_k", "probabilities", "alpha"}


@dataclass
class _Parsed:
    files: list[tuple[str | None, bytes]]  # (multipart file name, encoded bytes)
    options: dict[str, Any]  # per-request overrides from the body or form


async def _read_multipart(request: Request, state: ServerState) -> _Parsed:
    limit = state.settings.max_images_per_request
    # starlette answers malformed multipart and too many files with HTTPException(400)
    form = await request.form(max_files=limit, max_fields=len(_FORM_FIELDS))
    try:
        files: list[tuple[str | None, bytes]] = []
        options: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename, await value.read()))
            elif key == "alpha":  # text; checked with /v2's by parse_overrides
                options[key] = number_or_text(value)
            elif key in _FORM_FIELDS:
                options[key] = value
            else:
                raise ApiError(400, f"unexpected form field {key!r} (send images as files)")
        return _Parsed(files=files, options=options)
    finally:
        await form.close()


def _b64(index: int, text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {index}: invalid base64") from None


def _parse_json(body: bytes, max_images: int) -> _Parsed:
    """Parse a JSON body (in the decode pool). The image count is bounded before parsing: each
    image costs at most two commas (``data:`` URLs have one), options a few."""
    check_json_values(body, 2 * max_images + len(_FORM_FIELDS) + 8, "JSON body")
    try:
        req = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, f"invalid request: {loc}: {first['msg']}") from None
    _check_count(len(req.images), max_images)
    options = req.model_dump(exclude={"images"}, exclude_none=True)
    return _Parsed(files=[(None, _b64(i, s)) for i, s in enumerate(req.images)], options=options)


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ApiError(400, "no images in the request")
    if n > max_images:
        raise ApiError(400, f"{n} images exceed the limit of {max_images} per request")


async def _read_request(
    request: Request, state: ServerState, spec: InputSpec, deadline: float
) -> _Parsed:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    settings = state.settings
    if media == "multipart/form-data":
        return await _read_multipart(request, state)
    if media == "application/json":
        body = await read_body(request, settings.max_json_bytes, "JSON body")
        if not body:
            raise ApiError(400, "empty body: send images as multipart files or base64 JSON")
        return await offload(
            state.decode_pool, deadline, _parse_json, body, settings.max_images_per_request
        )
    if media.startswith("image/") or media == "application/octet-stream":
        body = await read_body(request, state.limits.bytes_limit(spec), "image")
        if not body:
            raise ApiError(400, "empty body: send images as multipart files or base64 JSON")
        return _Parsed(files=[(None, body)], options={})
    if not await request.body():
        raise ApiError(400, "empty body: send images as multipart files or base64 JSON")
    raise ApiError(
        415,
        f"unsupported content type {media or '(none)'!r}: send multipart/form-data files, "
        "application/json with base64 images, or one raw image/*",
    )


def _option(options: dict[str, Any], name: str, query: Any) -> Any:
    """The body's (or form's) value, else the query's: the more specific wins."""
    value = options.get(name)
    return query if value is None else value


def _resolve(
    options: dict[str, Any], state: ServerState, top_k_q: int | None, probs_q: bool
) -> tuple[int, bool]:
    top_k = _option(options, "top_k", top_k_q) or state.settings.top_k
    try:
        top_k = int(top_k)
    except (TypeError, ValueError):
        raise BadParameter(f"top_k must be an integer, got {top_k!r}") from None
    if not 1 <= top_k <= 1000:
        raise BadParameter(f"top_k must be between 1 and 1000, got {top_k}")
    probs = _option(options, "probabilities", probs_q)
    if isinstance(probs, str):
        probs = probs.lower() in ("1", "true", "yes", "on")
    return top_k, bool(probs)


def _label(i: int, name: str | None) -> str:
    return f"image {i}" + (f" ({name!r})" if name else "")


def _check_pixels(
    files: list[tuple[str | None, bytes]], spec: InputSpec, limits: ImageLimits
) -> None:
    try:
        check_request_pixels(
            [(_label(i, name), data) for i, (name, data) in enumerate(files)], spec, limits
        )
    except ImageError as exc:
        raise ApiError(400, str(exc)) from None


async def decode_all(
    files: list[tuple[str | None, bytes]],
    runtime: ModelRuntime,
    state: ServerState,
    deadline: float | None = None,
) -> np.ndarray:
    """Decode every image in the decode pool (off the loop); 400 naming the first bad one.

    The headers are read first (format, pixels per image and per request), so a request whose
    images would cost too much is refused before any is decoded; decoding that would only start
    after ``deadline`` is skipped.
    """
    spec, limits = runtime.manifest.input, state.limits
    assert state.decode_pool is not None, "lifespan not started"
    if deadline is None:
        deadline = deadline_after(state.settings.request_timeout_s)
    pool = state.decode_pool
    await offload(pool, deadline, _check_pixels, files, spec, limits)
    budget = state.decode_budget
    jobs = [
        offload(pool, deadline, decode_image, data, spec, limits, budget, deadline)
        for _, data in files
    ]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for i, (result, (name, _)) in enumerate(zip(results, files, strict=True)):
        if isinstance(result, ImageError):
            raise ApiError(400, f"{_label(i, name)}: {result}")
        if isinstance(result, TimeoutError):  # waited past the deadline for decode capacity
            raise RequestTimeoutError("request timed out while its images were being decoded")
        if isinstance(result, BaseException):
            raise result
    return np.stack(results)  # type: ignore[arg-type]


def _path_param(name: str) -> dict[str, Any]:
    """OpenAPI entry of a path parameter that ``get_runtime`` reads from ``request.path_params``
    (one handler serves the unnamed route too, so it cannot declare it as an argument)."""
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify images, with OOD detection",
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses=_ERRORS,
)
# KServe's v1 route shape; with a versioned form as in v2 (the body is this API's, not KServe's)
@router.post(
    "/models/{name}:predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify images with the named model (its serving version)",
    openapi_extra={"requestBody": _REQUEST_BODY, "parameters": [_path_param("name")]},
    responses={**_ERRORS, 404: {"description": "unknown or unloaded model or version"}},
)
@router.post(
    "/models/{name}/versions/{version}:predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify images with one loaded version of the named model",
    openapi_extra={
        "requestBody": _REQUEST_BODY,
        "parameters": [_path_param("name"), _path_param("version")],
    },
    responses={**_ERRORS, 404: {"description": "unknown or unloaded model or version"}},
)
async def predict(
    request: Request,
    runtime: RuntimeDep,
    state: StateDep,
    ood_policy: Annotated[
        OODPolicy | None, Query(description="override the server's OOD policy")
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, le=1000)] = None,
    probabilities: Annotated[bool, Query(description="include the full vector")] = False,
    alpha: Annotated[
        float | None,
        Query(ge=0.0, lt=1.0, description="override the model's alpha (is_ood = p-value < alpha)"),
    ] = None,
) -> Response:
    started = time.perf_counter()
    settings = state.settings
    batcher = runtime.batcher
    deadline = deadline_after(settings.request_timeout_s)
    with batcher.expect():  # a batch being formed now waits for these images
        parsed = await _read_request(request, state, runtime.manifest.input, deadline)
        _check_count(len(parsed.files), settings.max_images_per_request)
        k, include_probs = _resolve(parsed.options, state, top_k, probabilities)
        policy, alpha_used = parse_overrides(
            _option(parsed.options, "ood_policy", ood_policy),
            _option(parsed.options, "alpha", alpha),
            state.settings.ood_policy,
            runtime.manifest,
            runtime.name,
        )
        images = await decode_all(parsed.files, runtime, state, deadline)
    remaining = settings.request_timeout_s - (time.perf_counter() - started)
    out = await batcher.submit(images, timeout=max(remaining, 0.001))
    manifest = runtime.manifest
    preds = make_predictions(
        out, manifest, top_k=k, policy=policy, include_probs=include_probs, alpha=alpha_used
    )
    state.metrics.observe_predictions(runtime.name, preds)
    ids, background = after_predict(state, runtime, images, out, preds)
    answer = PredictResponse.model_construct(  # built from validated parts: no re-validation
        model=runtime.name,
        version=runtime.version,
        ood_policy=policy,
        predictions=[
            ImagePrediction.model_construct(
                **dict(p), index=i, filename=parsed.files[i][0], id=ids[i]
            )
            for i, p in enumerate(preds)
        ],
    )
    # a Response skips FastAPI's second validation pass of the return value (response_model
    # still documents the schema); serialising once in pydantic-core is the cheap part
    return Response(
        answer.model_dump_json(exclude_none=True),
        media_type="application/json",
        background=background,  # shadow scoring, once the answer is sent
    )
