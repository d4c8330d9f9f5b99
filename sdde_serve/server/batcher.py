"""Dynamic batching: concurrent requests share one engine call.

Requests put their images on an asyncio queue; one worker task takes what is queued, waits at most
``max_delay_s`` for more while requests are still being decoded, and runs the batch in a one-thread
executor, so the event loop keeps accepting and decoding while the engine computes. Under load the
queue fills while the engine is busy, so batches form without any waiting; a lone request on an
idle server is dispatched at once (nothing to wait for), which keeps batch-1 latency at the
engine's own.

The queue is bounded in images: a request that would overflow it is refused at once
(:class:`QueueFullError`, HTTP 503 with Retry-After) instead of growing memory. Every request has a
deadline (:class:`RequestTimeoutError`); an image whose request gave up is dropped, not computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from sdde_serve.engine import EngineOutput
from sdde_serve.server.metrics import Metrics

log = logging.getLogger("sdde.server.batcher")

RunFn = Callable[[np.ndarray], EngineOutput]


class Unavailable(Exception):
    """The request cannot be served now; HTTP 503 with ``retry_after`` seconds."""

    retry_after = 1


class QueueFullError(Unavailable):
    pass


class RequestTimeoutError(Unavailable):
    pass


class DrainingError(Unavailable):
    retry_after = 5


class TooManyImagesError(ValueError):
    """The request alone is larger than the whole queue: it could never be accepted (HTTP 413,
    not a 503 that tells the client to retry)."""


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future[EngineOutput]
    enqueued: float = field(default_factory=time.perf_counter)
    counted: bool = True  # its images are still in ``_pending``


class Batcher:
    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue_size: int = 1024,
        metrics: Metrics | None = None,
        model: str = "model",
    ) -> None:
        if max_queue_size < max_batch_size:
            raise ValueError("max_queue_size must be >= max_batch_size")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self._model = model
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._pending = 0  # images queued, not yet handed to the engine
        self._expecting = 0  # requests still decoding: worth waiting for
        self._in_flight = 0  # submitted requests not yet answered
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # one thread: onnxruntime parallelises inside a call; two calls at once would only compete
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdde-engine")

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what was accepted (up to ``timeout`` s), stop the worker.

        Requests still queued when the worker stops fail at once with :class:`DrainingError`
        instead of waiting out their own timeouts.
        """
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_queued(DrainingError("server stopped before this request was computed"))
        # waits for an engine call still running, off the loop: the failed requests answer now
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def _fail_queued(self, exc: Exception) -> None:
        items = [self._carry] if self._carry is not None else []
        self._carry = None
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        for item in items:
            self._release(item)
            if not item.future.done():
                item.future.set_exception(exc)
        self._gauge()

    @property
    def queue_depth(self) -> int:
        return self._pending

    # --- submitting ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def expect(self) -> Iterator[None]:
        """Mark a request that will submit soon (while it decodes), so a forming batch waits."""
        self._expecting += 1
        try:
            yield
        finally:
            self._expecting -= 1

    async def submit(self, images: np.ndarray, *, timeout: float | None = None) -> EngineOutput:
        """Run ``images`` [k, C, H, W] through the engine together with other requests' images."""
        if self._closing or self._task is None:
            raise DrainingError("server is shutting down")
        k = len(images)
        if k == 0:
            raise ValueError("no images")
        if k > self.max_queue_size:
            raise TooManyImagesError(
                f"{k} images exceed the queue's capacity of {self.max_queue_size} "
                "(max_queue_size): send fewer per request"
            )
        if self._pending + k > self.max_queue_size:
            raise QueueFullError(
                f"queue full ({self._pending} images waiting, limit {self.max_queue_size})"
            )
        loop = asyncio.get_running_loop()
        # a request larger than a batch is split so no engine call exceeds max_batch_size
        items = [
            _Item(images[i : i + self.max_batch_size], loop.create_future())
            for i in range(0, k, self.max_batch_size)
        ]
        self._in_flight += 1
        try:
            for item in items:
                self._pending += len(item.images)
                self._queue.put_nowait(item)
            self._gauge()
            futures = [item.future for item in items]
            try:
                done = await asyncio.wait_for(asyncio.gather(*futures), timeout)
            except asyncio.TimeoutError:
                for item in items:
                    item.future.cancel()  # still queued: the worker skips it
                    self._release(item)  # and its capacity is free for others now
                self._gauge()
                raise RequestTimeoutError(f"request timed out after {timeout:g} s") from None
            return done[0] if len(done) == 1 else EngineOutput.concat(list(done))
        finally:
            self._in_flight -= 1

    # --- the worker ----------------------------------------------------------------------------

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(model=self._model).set(self._pending)

    def _release(self, item: _Item) -> None:
        """Stop counting ``item`` in the queue depth (once: on dequeue or when it gives up)."""
        if item.counted:
            item.counted = False
            self._pending -= len(item.images)

    def _take(self, item: _Item) -> bool:
        """Account for an item leaving the queue; False if its request already gave up."""
        self._release(item)
        return not item.future.done()

    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        assert first is not None
        batch = [first] if self._take(first) else []
        n = sum(len(i.images) for i in batch)
        deadline = loop.time() + self.max_delay_s
        while n < self.max_batch_size:
            # wait only while someone is about to submit; otherwise take what is queued and go
            wait = deadline - loop.time() if self._expecting else 0.0
            item = await self._next(max(wait, 0.0))
            if item is None:
                break
            if n + len(item.images) > self.max_batch_size:
                self._carry = item  # first in the next batch: order is kept
                break
            if self._take(item):
                batch.append(item)
                n += len(item.images)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._gauge()
            if not batch:
                continue
            images = (
                np.concatenate([i.images for i in batch]) if len(batch) > 1 else batch[0].images
            )
            started = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self._run, images)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(DrainingError("server stopped"))
                raise
            except Exception as exc:  # the engine failed: every request of the batch learns why
                log.exception("engine call failed for a batch of %d", len(images))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            if self._metrics is not None:
                m, model = self._metrics, self._model
                m.batch_size.labels(model=model).observe(len(images))
                m.engine_duration.labels(model=model).observe(elapsed)
                for item in batch:
                    m.queue_wait.labels(model=model).observe(started - item.enqueued)
            start = 0
            for item in batch:
                stop = start + len(item.images)
                if not item.future.done():
                    item.future.set_result(out.slice(start, stop))
                start = stop
