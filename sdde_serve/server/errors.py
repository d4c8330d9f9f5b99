"""Error responses: every failure is a JSON ``{"error": "<reason>"}`` with a 4xx/503 status.

The v2 protocol prescribes exactly this shape, and ``/v1`` uses it too so clients parse one error
format. Bodies never carry stack traces: unexpected exceptions are logged and answered with a
generic 500 (the tests check that bad input never reaches it).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdde_serve.scoring import NoCalibrationScores
from sdde_serve.server.batcher import TooManyImagesError, Unavailable
from sdde_serve.server.domain_errors import (
    BadParameter,
    LoadFailed,
    Refused,
    UnknownModel,
)

log = logging.getLogger("sdde.server")


class ApiError(Exception):
    """A client-facing error: ``status`` and one-line ``reason``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


class BodyTooLarge(StarletteHTTPException):
    """Raised while streaming a body past the limit. An ``HTTPException`` so that FastAPI's own
    body parsing re-raises it instead of turning it into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


# Domain errors -> HTTP status: the one place a service failure gets its status code. 422 for a
# parameter outside its declared range, as FastAPI answers for every declared parameter (query,
# JSON body schema) of /v1 and the repository API; /v2 body parameters follow it.
STATUS: dict[type[Exception], int] = {
    UnknownModel: 404,
    Refused: 400,
    LoadFailed: 400,  # the serving version stays; the reason says which failed and why
    BadParameter: 422,
    NoCalibrationScores: 422,
    TooManyImagesError: 413,
}


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


NOT_JSON = "the request body is not valid JSON"


def _validation_reason(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _not_json_reason(err: Any) -> str:
    msg = str(err.get("msg", ""))
    if msg.startswith("Invalid JSON: "):  # pydantic's parser names the place
        return f"{NOT_JSON}: {msg.removeprefix('Invalid JSON: ')}"
    return f"{NOT_JSON} (parsing stopped at character {err.get('loc', ('?',))[-1]})"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.reason, exc.headers)

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return error_response(503, str(exc), {"Retry-After": str(exc.retry_after)})

    async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
        status = next(code for cls, code in STATUS.items() if isinstance(exc, cls))
        return error_response(status, str(exc))

    for cls in STATUS:
        app.add_exception_handler(cls, _domain_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if reason == "There was an error parsing the body":  # FastAPI's words, e.g. not UTF-8
            reason = f"{NOT_JSON} (or not a well-formed form): could not parse it"
        return error_response(exc.status_code, reason, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # FastAPI's words: "0: JSON decode error"
                return error_response(400, _not_json_reason(err))
        return error_response(422, _validation_reason(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes`` without reading them whole.

    A declared ``Content-Length`` over the limit is refused before the app runs; a body streamed
    without one (chunked) is counted as it arrives and refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_json(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # escaped the app's handlers (read outside a route)
            if started:
                raise
            await _send_json(send, 413, str(exc.detail))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
