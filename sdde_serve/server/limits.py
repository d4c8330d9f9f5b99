"""Request limits applied before a body is parsed, and work moved off the event loop.

A request's cost must be bounded by checks that are cheap compared with what they guard:

* a JSON body is refused on its size (``max_json_bytes``) from ``Content-Length`` before it is
  read, or as soon as a streamed body passes it;
* a JSON document cannot hold more values than it has separators (``,``) plus one per container,
  so counting commas (a C-speed ``bytes.count``) bounds the number of values the parser would
  create before it creates any: 11 million empty strings in 32 MB are refused in milliseconds
  instead of becoming 11 million Python objects;
* parsing, base64 and image decoding run in the decode pool, never on the event loop, so health
  probes and other requests are answered meanwhile; work still queued when the request's deadline
  passes is skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from fastapi import Request

from sdde_serve.server.batcher import RequestTimeoutError
from sdde_serve.server.errors import ApiError

T = TypeVar("T")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused with 413 once it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_values(body: bytes, max_values: int, what: str) -> None:
    """Refuse a JSON document that may hold more than ``max_values`` values, before parsing it.

    Values in a JSON document are at most its commas plus one per array or object; the bound is
    checked on commas alone (``max_values`` leaves room for the containers a valid request has).
    Commas inside strings only make the bound stricter, which valid requests (base64, numbers)
    never meet.
    """
    commas = body.count(b",")
    if commas >= max_values:
        raise ApiError(
            400, f"{what} holds more values than a valid request can ({commas} separators)"
        )


def deadline_after(seconds: float) -> float:
    return time.monotonic() + seconds


def before_deadline(deadline: float, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` unless the request already gave up (queued decode work is then skipped)."""
    if time.monotonic() > deadline:
        raise RequestTimeoutError("request timed out while its images were being decoded")
    return fn(*args)


async def offload(pool: Executor | None, deadline: float, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the decode pool, skipped if it only starts after ``deadline``."""
    if pool is None:  # no lifespan (a unit test calling a route helper directly)
        return before_deadline(deadline, fn, *args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, before_deadline, deadline, fn, *args)
