"""Dynamic batching with a numpy stand-in engine whose answer per image is known."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from sdde_serve.engine import EngineOutput
from sdde_serve.server.batcher import (
    Batcher,
    DrainingError,
    QueueFullError,
    RequestTimeoutError,
    TooManyImagesError,
)
from sdde_serve.server.metrics import Metrics


class FakeEngine:
    """Outputs derived from each image's first pixel, so slicing mistakes show; records batches."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def run(self, images: np.ndarray) -> EngineOutput:
        self.gate.wait(5)
        self.batches.append(len(images))
        if self.delay:
            time.sleep(self.delay)
        first = images[:, 0, 0, 0].astype(np.float32)
        if self.fail_on is not None and (first == self.fail_on).any():
            raise RuntimeError("engine failed")
        return EngineOutput(
            logits=np.repeat(first[:, None, None], 2, axis=1),
            probs=np.stack([first, 1 - first], axis=1),
            mal=first,
            msp=first,
        )


def images(*values: float) -> np.ndarray:
    return np.array(values, np.float32).reshape(-1, 1, 1, 1)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_one_engine_call_and_get_their_own_rows():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=32, max_delay_s=0.05)
        b.start()
        engine.gate.clear()  # hold the engine so all requests queue behind the first call
        first = asyncio.ensure_future(b.submit(images(0.5)))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b.submit(images(i / 100, i / 100 + 0.001))) for i in range(8)]
        await asyncio.sleep(0.01)
        engine.gate.set()
        outs = await asyncio.gather(first, *rest)
        await b.close()
        return outs

    outs = run(main())
    assert engine.batches == [1, 16]  # 8 requests of 2 images coalesced into one call
    np.testing.assert_allclose(outs[0].mal, [0.5])
    for i, out in enumerate(outs[1:]):
        np.testing.assert_allclose(out.mal, [i / 100, i / 100 + 0.001], rtol=1e-6)
        np.testing.assert_allclose(out.probs[:, 1], 1 - out.mal)


def test_batches_never_exceed_max_and_keep_order():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=8, max_delay_s=0.0)
        b.start()
        engine.gate.clear()
        futs = [asyncio.ensure_future(b.submit(images(i, i, i))) for i in range(10)]
        await asyncio.sleep(0.01)
        engine.gate.set()
        outs = await asyncio.gather(*futs)
        await b.close()
        return outs

    outs = run(main())
    assert max(engine.batches) <= 8 and sum(engine.batches) == 30
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out.mal, [i, i, i])


def test_request_larger_than_a_batch_is_split():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=4, max_delay_s=0.0)
        b.start()
        out = await b.submit(images(*range(10)))
        await b.close()
        return out

    out = run(main())
    assert engine.batches == [4, 4, 2]
    np.testing.assert_array_equal(out.mal, np.arange(10))


def test_lone_request_does_not_wait_for_the_delay_but_expected_ones_are_waited_for():
    engine = FakeEngine()

    async def lone():
        b = Batcher(engine.run, max_batch_size=8, max_delay_s=2.0)
        b.start()
        t = time.perf_counter()
        await b.submit(images(1))
        elapsed = time.perf_counter() - t

        # a second request announced (decoding) while the first waits: one batch of two
        async def late():
            with b.expect():
                await asyncio.sleep(0.05)
            return await b.submit(images(3))

        task = asyncio.ensure_future(late())
        await asyncio.sleep(0)
        out = await asyncio.gather(b.submit(images(2)), task)
        await b.close()
        return elapsed, out

    elapsed, (a, c) = run(lone())
    assert elapsed < 1.0  # nobody else was coming: no 2 s wait
    assert engine.batches == [1, 2]
    assert a.mal[0] == 2 and c.mal[0] == 3


def test_full_queue_refuses_at_once():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=2, max_delay_s=0.0, max_queue_size=4)
        b.start()
        engine.gate.clear()
        running = asyncio.ensure_future(b.submit(images(0, 0)))  # taken by the engine
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit(images(1, 1, 1, 1)))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await b.submit(images(2))
        assert b.queue_depth == 4
        engine.gate.set()
        await asyncio.gather(running, queued)
        ok = await b.submit(images(3))  # served again once the queue drained
        await b.close()
        return ok

    assert run(main()).mal[0] == 3


def test_timeout_drops_the_request_and_the_batcher_keeps_serving():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=2, max_delay_s=0.0)
        b.start()
        engine.gate.clear()
        blocker = asyncio.ensure_future(b.submit(images(0)))
        await asyncio.sleep(0.01)
        with pytest.raises(RequestTimeoutError):
            await b.submit(images(9), timeout=0.05)
        engine.gate.set()
        await blocker
        out = await b.submit(images(4))
        await b.close()
        return out

    out = run(main())
    assert out.mal[0] == 4
    assert engine.batches == [1, 1]  # the timed-out image was never computed


def test_engine_failure_reaches_every_request_of_the_batch_then_recovers():
    engine = FakeEngine(fail_on=7.0)

    async def main():
        b = Batcher(engine.run, max_batch_size=8, max_delay_s=0.0)
        b.start()
        engine.gate.clear()
        futs = [asyncio.ensure_future(b.submit(images(v))) for v in (1, 7, 2)]
        await asyncio.sleep(0.01)
        engine.gate.set()
        results = await asyncio.gather(*futs, return_exceptions=True)
        after = await b.submit(images(5))
        await b.close()
        return results, after

    results, after = run(main())
    assert engine.batches == [3, 1]  # one batch of three, then the request after
    assert [str(r) for r in results] == ["engine failed"] * 3
    assert after.mal[0] == 5


def test_close_drains_accepted_requests_then_refuses():
    engine = FakeEngine(delay=0.05)

    async def main():
        b = Batcher(engine.run, max_batch_size=1, max_delay_s=0.0)
        b.start()
        futs = [asyncio.ensure_future(b.submit(images(i))) for i in range(3)]
        await asyncio.sleep(0)
        await b.close(timeout=5)
        done = await asyncio.gather(*futs)
        with pytest.raises(DrainingError):
            await b.submit(images(1))
        return done

    done = run(main())
    assert [float(o.mal[0]) for o in done] == [0, 1, 2]


def test_metrics_count_batches_images_and_waits():
    engine = FakeEngine()
    metrics = Metrics()

    async def main():
        b = Batcher(engine.run, max_batch_size=16, max_delay_s=0.0, metrics=metrics, model="m")
        b.start()
        engine.gate.clear()
        futs = [asyncio.ensure_future(b.submit(images(i, i))) for i in range(5)]
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(*futs)
        await b.close()

    run(main())
    get = metrics.registry.get_sample_value
    assert get("sdde_batch_size_sum", {"model": "m"}) == 10  # every image once
    assert get("sdde_batch_size_count", {"model": "m"}) == len(engine.batches)
    assert get("sdde_engine_duration_seconds_count", {"model": "m"}) == len(engine.batches)
    assert get("sdde_queue_wait_seconds_count", {"model": "m"}) == 5  # one per request
    assert get("sdde_queue_depth", {"model": "m"}) == 0


def test_a_timed_out_request_frees_its_queue_capacity_at_once():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=2, max_delay_s=0.0, max_queue_size=4)
        b.start()
        engine.gate.clear()
        running = asyncio.ensure_future(b.submit(images(0, 0)))  # held by the engine
        await asyncio.sleep(0.01)
        with pytest.raises(RequestTimeoutError):
            await b.submit(images(1, 1, 1, 1), timeout=0.02)  # filled the queue, then gave up
        depth = b.queue_depth  # before: 4 until the worker dequeued the dead request
        late = asyncio.ensure_future(b.submit(images(2, 2, 2, 2)))  # before: QueueFullError
        await asyncio.sleep(0.01)
        engine.gate.set()
        await running
        out = await late
        await b.close()
        return depth, out

    depth, out = run(main())
    assert depth == 0 and out.mal.tolist() == [2, 2, 2, 2]


def test_close_fails_queued_requests_at_once_instead_of_at_their_timeout():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=1, max_delay_s=0.0, max_queue_size=8)
        b.start()
        engine.gate.clear()
        running = asyncio.ensure_future(b.submit(images(0), timeout=30))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit(images(1), timeout=30))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close(timeout=0.05))
        await asyncio.sleep(0.2)  # the drain gave up; the queued request must know already
        assert queued.done()
        engine.gate.set()
        await closing
        return await asyncio.gather(running, queued, return_exceptions=True)

    _, queued = run(main())
    assert isinstance(queued, DrainingError) and "stopped" in str(queued)


def test_a_request_larger_than_the_whole_queue_is_refused_as_too_large():
    engine = FakeEngine()

    async def main():
        b = Batcher(engine.run, max_batch_size=2, max_delay_s=0.0, max_queue_size=4)
        b.start()
        with pytest.raises(TooManyImagesError, match="max_queue_size"):
            await b.submit(images(*range(5)))  # idle server: not a retryable 503
        await b.close()

    run(main())
