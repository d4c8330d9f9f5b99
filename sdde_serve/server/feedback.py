"""Delayed labels: a label for any prediction id, on any worker of any replica.

Every prediction gets an ``id``: a signed prediction record (:mod:`tokens`) holding what a label
needs to judge it (model, version, time, predicted class, OOD flag, calibrated probabilities;
never the image). Any process started with the same ``--feedback-secret`` verifies it and counts
the label, so labels need no shared store and no sticky routing. An id that fails the signature
refuses the whole call (400, nothing counted); an id older than ``--feedback-max-age`` is
answered ``expired``; a 32-hex id of an sdde-serve from before signed ids ``unknown``.

A label is a class (index or name) or ``null``: the image belongs to none of the classes (it
really was out of distribution). Feedback is idempotent per id within one process: the last
``--feedback-max-size`` labelled ids are remembered, the same label again is a ``duplicate``,
another label a ``conflict`` (neither counted again). Across processes a repeat is not seen:
clients send each label once (docs/server.md).

Labelled predictions feed two kinds of series (lifecycle_metrics): counters that Prometheus sums
over workers, replicas and windows (accuracy, NLL, ECE per bin, OOD-flag precision: recording
rules in deploy/prometheus), and ``sdde_live_*`` gauges over the labels that arrived in the last
``--feedback-window`` seconds, merged over the workers of one server (:mod:`live_window`; across
replicas, the recording rules).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import numpy as np
from prometheus_client.core import Metric
from pydantic import BaseModel, Field, StrictInt, StrictStr

from sdde_serve.server.lifecycle_metrics import LifecycleMetrics, bin_label
from sdde_serve.server.live_window import LiveWindow, Row, confidence_bin
from sdde_serve.server.tokens import (
    LEGACY_ID,
    NONCE_BYTES,
    PredictionRecord,
    Signer,
    TokenError,
)

Result = Literal["accepted", "duplicate", "conflict", "unknown", "expired", "invalid"]
Clock = Callable[[], float]
ClassesOf = Callable[[str, str], "list[str] | None"]  # (model, version) -> class names, if known
MAX_ID_CHARS = 1024  # a signed id is ~90 characters with 10 classes, ~240 above FULL_CLASSES


class FeedbackItem(BaseModel):
    id: StrictStr = Field(min_length=1, max_length=MAX_ID_CHARS, description="the prediction's id")
    label: StrictInt | StrictStr | None = Field(
        description="true class (index or name), or null: none of the classes (really OOD)"
    )


class FeedbackResult(BaseModel):
    id: str
    result: Result
    reason: str | None = None


class FeedbackResponse(BaseModel):
    accepted: int
    results: list[FeedbackResult]


class ForgedId(ValueError):
    """An item's id is not a prediction id this deployment issued: the call is refused."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(
            f"feedback item {index}: the id is not a prediction id of this service ({why})"
        )


class FeedbackStore:
    def __init__(
        self,
        metrics: LifecycleMetrics,
        signer: Signer,
        *,
        max_size: int,
        max_age_s: float,
        window_s: float,
        shared: bool = False,
        clock: Clock = time.time,
    ) -> None:
        self.metrics = metrics
        self.signer = signer
        self.max_size = max_size
        self.max_age_s = max_age_s
        self.window_s = window_s
        self.clock = clock
        self._seen: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # nonce -> issued, truth
        # shared: --workers N, each worker's window sums merged at scrape time (live_window.py)
        self.window = LiveWindow(window_s, clock, shared)
        self._lock = threading.Lock()

    # --- predictions out -----------------------------------------------------------------------

    def issue(
        self, model: str, version: str, probs: np.ndarray, flags: Iterable[bool]
    ) -> list[str]:
        """One signed id per image (``probs``: [N, L] calibrated; ``flags``: OOD flags)."""
        flags = [bool(f) for f in flags]
        nonces = [os.urandom(NONCE_BYTES) for _ in flags]
        return self.signer.issue(model, version, self.clock(), nonces, flags, np.asarray(probs))

    # --- labels in -----------------------------------------------------------------------------

    def label(self, items: list[FeedbackItem], classes_of: ClassesOf) -> FeedbackResponse:
        """Count each item's label. :class:`ForgedId` (nothing counted) when an id fails."""
        records = [self._verify(i, item.id) for i, item in enumerate(items)]
        now = self.clock()
        results = []
        with self._lock:
            self._forget(now)
            for item, record in zip(items, records, strict=True):
                result, reason = self._one(item, record, now, classes_of)
                self.metrics.feedback.labels(result=result).inc()
                results.append(FeedbackResult(id=item.id, result=result, reason=reason))
            self.metrics.store_size.set(len(self._seen))
        accepted = sum(r.result == "accepted" for r in results)
        if accepted:
            self.window.publish()  # --workers N: a scrape right after sees these labels
        return FeedbackResponse(accepted=accepted, results=results)

    def _verify(self, index: int, pid: str) -> PredictionRecord | None:
        if LEGACY_ID.match(pid):
            return None
        try:
            return self.signer.verify(pid)
        except TokenError as exc:
            raise ForgedId(index, str(exc)) from None

    def _forget(self, now: float) -> None:
        """The first-labelled ids while past the age limit (their labels are answered expired
        anyway), then the first-labelled ones over the size limit."""
        while self._seen and next(iter(self._seen.values()))[0] < now - self.max_age_s:
            self._seen.popitem(last=False)
        while len(self._seen) > self.max_size:
            self._seen.popitem(last=False)

    def _one(
        self, item: FeedbackItem, record: PredictionRecord | None, now: float, classes_of: ClassesOf
    ) -> tuple[Result, str | None]:
        if record is None:
            return (
                "unknown",
                "an unsigned id from an earlier sdde-serve: its prediction is not known",
            )
        if record.issued < now - self.max_age_s:
            return "expired", f"prediction older than the {self.max_age_s:g} s feedback age limit"
        classes = classes_of(record.model, record.version)
        truth = _truth(item.label, len(record.probs), classes)
        if truth is None:
            return "invalid", _invalid_reason(item.label, record.model, classes)
        seen = self._seen.get(record.nonce)
        if seen is not None:
            if seen[1] == truth:
                return "duplicate", None
            return "conflict", f"already labelled {_name(seen[1], classes)!r}"
        self._seen[record.nonce] = (record.issued, truth)
        self._forget(now)
        self._count(record, truth)
        confidence = float(record.probs[record.predicted])
        nll = -math.log(max(float(record.probs[truth]), 1e-12)) if truth >= 0 else 0.0
        self.window.add(
            Row(now, record.model, record.version, truth, record.predicted == truth, confidence,
                nll, record.is_ood)
        )  # fmt: skip
        return "accepted", None

    def _count(self, record: PredictionRecord, truth: int) -> None:
        m, labels = self.metrics, {"model": record.model, "version": record.version}
        side = "ood" if truth < 0 else "in_distribution"
        m.labels_total.labels(**labels, truth=side).inc()
        if record.is_ood:
            m.flagged.labels(**labels, truth=side).inc()
        if truth < 0:
            return
        confidence = float(record.probs[record.predicted])
        correct = record.predicted == truth
        p_true = float(np.clip(record.probs[truth], 1e-12, None))
        m.correct.labels(**labels).inc(int(correct))
        m.nll.labels(**labels).inc(-np.log(p_true))
        b = bin_label(confidence_bin(confidence))
        m.bin_images.labels(**labels, bin=b).inc()
        m.bin_correct.labels(**labels, bin=b).inc(int(correct))
        m.bin_confidence.labels(**labels, bin=b).inc(confidence)

    # --- windowed gauges (a prometheus_client collector) ----------------------------------------

    def window_stats(self) -> dict[tuple[str, str], dict[str, float]]:
        """Per (model, version), over labels of the last ``window_s`` seconds: ``labelled``,
        ``accuracy``, ``nll``, ``ece`` (in-distribution truths), ``ood_precision`` (flagged)."""
        return self.window.stats()

    def collect(self) -> Iterator[Metric]:
        return self.window.collect()

    def describe(self) -> list[Metric]:
        return []  # names only known at collect time; keeps registration from calling collect


def _truth(label: int | str | None, n_classes: int, classes: list[str] | None) -> int | None:
    if label is None:
        return -1
    if isinstance(label, int):
        return label if 0 <= label < n_classes else None
    return classes.index(label) if classes is not None and label in classes else None


def _invalid_reason(label: int | str | None, model: str, classes: list[str] | None) -> str:
    if isinstance(label, str) and classes is None:
        return f"class names of {model} are not known here (not loaded): send the class index"
    return f"label {label!r} is not a class of {model}"


def _name(truth: int, classes: list[str] | None) -> str | int | None:
    if truth < 0:
        return None
    return classes[truth] if classes is not None else truth
