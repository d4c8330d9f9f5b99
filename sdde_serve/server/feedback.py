"""Delayed labels: predictions kept by id until their ground truth arrives.

Every prediction gets an ``id``. The store keeps, per id, what is needed to judge the prediction
once its label comes: model, version, time, the calibrated probability vector, the OOD score and
flag. Never the image. It is bounded by count (``--feedback-max-size``, oldest dropped first) and
by age (``--feedback-max-age``); a label for a dropped id is answered ``expired`` (the last
``max_size`` dropped ids are remembered, as strings only), one for an id never issued (or dropped
longer ago) ``unknown``.

A label is a class (index or name) or ``null``: the image belongs to none of the classes (it
really was out of distribution). Feedback is idempotent per id: the first label counts, the same
label again is a ``duplicate``, another label a ``conflict`` (neither counted again).

Labelled predictions feed two kinds of series (lifecycle_metrics): counters that Prometheus can
aggregate over replicas and windows (accuracy, NLL, ECE per bin, OOD-flag precision: recording
rules in deploy/prometheus), and ``sdde_live_*`` gauges this process computes at scrape time over
the labels that arrived in the last ``--feedback-window`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, Field, StrictInt, StrictStr

from sdde_serve import calibration as cal
from sdde_serve.server.lifecycle_metrics import ECE_BINS, LifecycleMetrics, bin_label

Result = Literal["accepted", "duplicate", "conflict", "unknown", "expired", "invalid"]
Clock = Callable[[], float]
_UNSET = -2  # a kept prediction without a label yet (-1 is the label "none of the classes")


class FeedbackItem(BaseModel):
    id: StrictStr = Field(min_length=1, max_length=64, description="the prediction's id")
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


@dataclass(slots=True)
class Kept:
    model: str
    version: str
    time: float
    probs: np.ndarray  # [L] float32, calibrated
    ood_score: float
    is_ood: bool
    classes: list[str]  # the manifest's list (shared, not copied)
    truth: int = _UNSET  # -1: none of the classes


@dataclass(slots=True)
class Labelled:
    time: float  # when the label arrived (the window is in label time)
    model: str
    version: str
    probs: np.ndarray
    truth: int  # -1: none of the classes
    is_ood: bool


def confidence_bin(confidence: float) -> int:
    """Index of the right-closed bin ``(b/n, (b+1)/n]``, as calibration.ece bins."""
    return min(max(int(np.ceil(confidence * ECE_BINS)) - 1, 0), ECE_BINS - 1)


class FeedbackStore:
    def __init__(
        self,
        metrics: LifecycleMetrics,
        *,
        max_size: int,
        max_age_s: float,
        window_s: float,
        clock: Clock = time.time,
    ) -> None:
        self.metrics = metrics
        self.max_size = max_size
        self.max_age_s = max_age_s
        self.window_s = window_s
        self.clock = clock
        self._kept: OrderedDict[str, Kept] = OrderedDict()  # oldest first
        self._gone: OrderedDict[str, None] = OrderedDict()  # ids dropped (size or age)
        self._window: deque[Labelled] = deque()
        self._lock = threading.Lock()

    # --- predictions in ------------------------------------------------------------------------

    def keep(
        self,
        ids: list[str],
        model: str,
        version: str,
        classes: list[str],
        probs: np.ndarray,
        scores: Iterable[float],
        flags: Iterable[bool],
    ) -> None:
        if self.max_size == 0:
            return
        now = self.clock()
        probs = np.asarray(probs, np.float32)
        with self._lock:
            for i, (pid, score, flag) in enumerate(zip(ids, scores, flags, strict=True)):
                self._kept[pid] = Kept(model, version, now, probs[i].copy(), score, flag, classes)
            self._evict(now)

    def _evict(self, now: float) -> None:
        def drop(pid: str) -> None:
            self._kept.pop(pid)
            self._gone[pid] = None
            if len(self._gone) > max(self.max_size, 1):
                self._gone.popitem(last=False)

        while len(self._kept) > self.max_size:
            drop(next(iter(self._kept)))
        oldest = now - self.max_age_s
        while self._kept and next(iter(self._kept.values())).time < oldest:
            drop(next(iter(self._kept)))
        self.metrics.store_size.set(len(self._kept))

    # --- labels in -----------------------------------------------------------------------------

    def label(self, items: list[FeedbackItem]) -> FeedbackResponse:
        now = self.clock()
        results = []
        with self._lock:
            self._evict(now)
            for item in items:
                result, reason = self._one(item, now)
                self.metrics.feedback.labels(result=result).inc()
                results.append(FeedbackResult(id=item.id, result=result, reason=reason))
        accepted = sum(r.result == "accepted" for r in results)
        return FeedbackResponse(accepted=accepted, results=results)

    def _one(self, item: FeedbackItem, now: float) -> tuple[Result, str | None]:
        kept = self._kept.get(item.id)
        if kept is None:
            if item.id in self._gone:
                return "expired", "prediction no longer kept (store size or age limit)"
            return "unknown", "no prediction with this id"
        truth = _truth(item.label, kept.classes)
        if truth is None:
            return "invalid", f"label {item.label!r} is not a class of {kept.model}"
        if kept.truth != _UNSET:
            if kept.truth == truth:
                return "duplicate", None
            return "conflict", f"already labelled {_name(kept.truth, kept.classes)!r}"
        kept.truth = truth
        self._count(kept, truth)
        self._window.append(Labelled(now, kept.model, kept.version, kept.probs, truth, kept.is_ood))
        return "accepted", None

    def _count(self, kept: Kept, truth: int) -> None:
        m, labels = self.metrics, {"model": kept.model, "version": kept.version}
        side = "ood" if truth < 0 else "in_distribution"
        m.labels_total.labels(**labels, truth=side).inc()
        if kept.is_ood:
            m.flagged.labels(**labels, truth=side).inc()
        if truth < 0:
            return
        predicted = int(np.argmax(kept.probs))
        confidence = float(kept.probs[predicted])
        correct = predicted == truth
        p_true = float(np.clip(kept.probs[truth], 1e-12, None))
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
        now = self.clock()
        with self._lock:
            while self._window and self._window[0].time < now - self.window_s:
                self._window.popleft()
            rows = list(self._window)
        groups: dict[tuple[str, str], list[Labelled]] = {}
        for row in rows:
            groups.setdefault((row.model, row.version), []).append(row)
        return {key: _stats(group) for key, group in groups.items()}

    def collect(self) -> Iterator[Metric]:
        families = {
            "labelled": GaugeMetricFamily(
                "sdde_live_labelled", "Labels received in the window", labels=["model", "version"]
            ),
            "accuracy": GaugeMetricFamily(
                "sdde_live_accuracy",
                "Accuracy among labelled in-distribution images, over the window",
                labels=["model", "version"],
            ),
            "nll": GaugeMetricFamily(
                "sdde_live_nll",
                "Mean -log p(true class) among labelled in-distribution images, over the window",
                labels=["model", "version"],
            ),
            "ece": GaugeMetricFamily(
                "sdde_live_ece",
                f"Expected calibration error ({ECE_BINS} bins) among labelled in-distribution "
                "images, over the window",
                labels=["model", "version"],
            ),
            "ood_precision": GaugeMetricFamily(
                "sdde_live_ood_precision",
                "Share of labelled OOD-flagged images that really were none of the classes",
                labels=["model", "version"],
            ),
        }
        for (model, version), stats in self.window_stats().items():
            for key, family in families.items():
                if key in stats:
                    family.add_metric([model, version], stats[key])
        yield from families.values()

    def describe(self) -> list[Metric]:
        return []  # names only known at collect time; keeps registration from calling collect


def _truth(label: int | str | None, classes: list[str]) -> int | None:
    if label is None:
        return -1
    if isinstance(label, int):
        return label if 0 <= label < len(classes) else None
    return classes.index(label) if label in classes else None


def _name(truth: int, classes: list[str]) -> str | None:
    return None if truth < 0 else classes[truth]


def _stats(rows: list[Labelled]) -> dict[str, float]:
    stats: dict[str, float] = {"labelled": float(len(rows))}
    known = [r for r in rows if r.truth >= 0]
    if known:
        probs = np.stack([r.probs for r in known])
        labels = np.array([r.truth for r in known])
        stats["accuracy"] = cal.accuracy(probs, labels)
        stats["nll"] = cal.nll(probs, labels)
        stats["ece"] = cal.ece(probs, labels, n_bins=ECE_BINS)
    flagged = [r for r in rows if r.is_ood]
    if flagged:
        stats["ood_precision"] = sum(r.truth < 0 for r in flagged) / len(flagged)
    return stats
