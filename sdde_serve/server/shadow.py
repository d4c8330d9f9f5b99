"""Shadow scoring: a candidate version sees a share of live traffic, after the live answer.

The live response is built and sent exactly as without a shadow; only then (a Starlette
background task that just schedules an asyncio task, so even a keep-alive connection's next
request does not wait) are the same images submitted to the candidate's own batcher. Its labels
and OOD flags are compared with the live ones and counted, labelled by both versions. A bounded
number of images may wait for the candidate (``--shadow-max-pending``): past it, requests are
skipped (``sdde_shadow_skipped_total{reason="busy"}``) rather than queued, so a slow candidate
can never hold memory or live capacity hostage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import numpy as np
from starlette.background import BackgroundTask

from sdde_serve.scoring import make_predictions
from sdde_serve.server.batcher import Unavailable
from sdde_serve.server.lifecycle_metrics import LifecycleMetrics
from sdde_serve.server.repository import ModelRepository, ModelRuntime

log = logging.getLogger("sdde.server.shadow")


class ShadowScorer:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: LifecycleMetrics,
        *,
        fraction: float,
        max_pending: int,
        timeout_s: float,
        seed: int | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.fraction = fraction
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.pending = 0
        self._random = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(
        self, live: ModelRuntime, images: np.ndarray, labels: np.ndarray, flags: np.ndarray
    ) -> BackgroundTask | None:
        """The background task that shadow-scores this request, or None (no shadow, not
        sampled, or too much pending)."""
        entry = self.repository.entries.get(live.name)
        candidate = entry.shadow if entry is not None else None
        if candidate is None or candidate is live or live is not entry.serving:
            return None  # explicit-version requests to the candidate itself aren't compared
        if self.fraction < 1.0 and self._random.random() >= self.fraction:
            return None
        if self.pending + len(images) > self.max_pending:
            self.metrics.shadow_skipped.labels(
                model=live.name, version=candidate.version, reason="busy"
            ).inc()
            return None
        return BackgroundTask(self._spawn, candidate, live, images, labels, flags)

    async def _spawn(
        self,
        candidate: ModelRuntime,
        live: ModelRuntime,
        images: np.ndarray,
        labels: np.ndarray,
        flags: np.ndarray,
    ) -> None:
        # counted here, not when scheduled: a response whose client vanished never runs this
        self.pending += len(images)
        task = asyncio.get_running_loop().create_task(
            self._score(candidate, live, images, labels, flags)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(
        self,
        candidate: ModelRuntime,
        live: ModelRuntime,
        images: np.ndarray,
        labels: np.ndarray,
        flags: np.ndarray,
    ) -> None:
        model, version = live.name, candidate.version
        try:
            with candidate.use():
                started = time.perf_counter()
                out = await candidate.batcher.submit(images, timeout=self.timeout_s)
                elapsed = time.perf_counter() - started
            preds = make_predictions(out, candidate.manifest, top_k=1)
        except Unavailable:
            self.metrics.shadow_skipped.labels(
                model=model, version=version, reason="unavailable"
            ).inc()
            return
        except Exception:
            log.exception("shadow scoring with %s version %s failed", model, version)
            self.metrics.shadow_skipped.labels(model=model, version=version, reason="error").inc()
            return
        finally:
            self.pending -= len(images)
        m = self.metrics
        key = {"model": model, "version": version, "live_version": live.version}
        cand_labels = out.probs.argmax(axis=1)
        cand_flags = np.array([p.is_ood for p in preds])
        m.shadow_images.labels(**key).inc(len(images))
        m.shadow_label_agreement.labels(**key).inc(int((cand_labels == labels).sum()))
        m.shadow_ood_agreement.labels(**key).inc(int((cand_flags == flags).sum()))
        m.shadow_ood.labels(**key, side="candidate").inc(int(cand_flags.sum()))
        m.shadow_ood.labels(**key, side="live").inc(int(flags.sum()))
        m.shadow_duration.labels(model=model, version=version).observe(elapsed)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
