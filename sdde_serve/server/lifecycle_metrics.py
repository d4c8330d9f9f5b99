"""Prometheus series of the model lifecycle: versions, loads, shadow scoring, delayed labels.

New series only (the ``sdde_*`` series of :mod:`metrics` keep their names and labels); every one
that concerns a model carries ``model`` and ``version``. Names and labels are listed in
docs/architecture.md. The windowed ``sdde_live_*`` gauges are computed at scrape time by the
feedback store (:mod:`feedback`), registered on the same registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sdde_serve.server.metrics import LATENCY_BUCKETS, Family, create_families
from sdde_serve.server.multiprocess import remove_series

ECE_BINS = 15  # equal-width confidence bins, as sdde_serve.calibration.ece's default
FEEDBACK_RESULTS = ("accepted", "duplicate", "conflict", "unknown", "expired", "invalid")


def bin_label(index: int) -> str:
    """Upper edge of confidence bin ``index`` (bins are right-closed: ``(lo, hi]``)."""
    return f"{(index + 1) / ECE_BINS:.4f}"


V = ("model", "version")
SHADOW = ("model", "version", "live_version")  # candidate `version` against the live one
BINS = ("model", "version", "bin")
FAMILIES = (
    # --- repository
    Family("version_info", Gauge, "sdde_model_version_info",
           "Loaded model versions (always 1); role = serving | shadow", (*V, "role")),
    Family("loads", Counter, "sdde_model_loads_total",
           "Model versions loaded, verified and warmed up", V),
    Family("load_failures", Counter, "sdde_model_load_failures_total",
           "Model versions refused (corrupt, unverifiable, failing warm-up); the serving "
           "version stays", V),
    Family("version_predictions", Counter, "sdde_version_predictions_total",
           "Images answered, by model version and OOD outcome", (*V, "outcome")),
    # --- shadow scoring: the candidate against the live version on the same images
    Family("shadow_images", Counter, "sdde_shadow_images_total",
           "Live images also scored by the shadow version", SHADOW),
    Family("shadow_label_agreement", Counter, "sdde_shadow_label_agreement_total",
           "Shadow-scored images whose predicted class equals the live one", SHADOW),
    Family("shadow_ood_agreement", Counter, "sdde_shadow_ood_agreement_total",
           "Shadow-scored images whose OOD flag equals the live one", SHADOW),
    Family("shadow_ood", Counter, "sdde_shadow_ood_flagged_total",
           "Shadow-scored images flagged OOD, by who scored them (side = candidate | live)",
           (*SHADOW, "side")),
    Family("shadow_duration", Histogram, "sdde_shadow_duration_seconds",
           "Time the shadow version took for one request (queue wait and engine)", V,
           LATENCY_BUCKETS),
    Family("shadow_skipped", Counter, "sdde_shadow_skipped_total",
           "Live requests not shadow-scored: reason = busy | unavailable | error",
           (*V, "reason")),
    # --- delayed labels
    Family("feedback", Counter, "sdde_feedback_total",
           "Feedback items by result (accepted, duplicate, conflict, unknown, expired, invalid)",
           ("result",)),
    Family("store_size", Gauge, "sdde_feedback_store_size",
           "Predictions kept, waiting for a label"),
    Family("labels_total", Counter, "sdde_feedback_labels_total",
           "Labelled predictions; truth = in_distribution (a class) | ood (none of the classes)",
           (*V, "truth")),
    Family("correct", Counter, "sdde_feedback_correct_total",
           "Labelled in-distribution images whose predicted class was right", V),
    Family("nll", Counter, "sdde_feedback_nll_total",
           "Sum of -log p(true class) over labelled in-distribution images", V),
    Family("flagged", Counter, "sdde_feedback_flagged_total",
           "Labelled images the model had flagged OOD, by truth", (*V, "truth")),
    Family("bin_images", Counter, "sdde_feedback_bin_images_total",
           "Labelled in-distribution images by confidence bin (bin = upper edge)", BINS),
    Family("bin_correct", Counter, "sdde_feedback_bin_correct_total",
           "Correct ones per confidence bin", BINS),
    Family("bin_confidence", Counter, "sdde_feedback_bin_confidence_total",
           "Sum of confidences per confidence bin", BINS),
)  # fmt: skip


class LifecycleMetrics:
    """The families of :data:`FAMILIES` on one registry, and the series a loaded version starts
    with."""

    version_info: Gauge
    loads: Counter
    load_failures: Counter
    version_predictions: Counter
    shadow_images: Counter
    shadow_label_agreement: Counter
    shadow_ood_agreement: Counter
    shadow_ood: Counter
    shadow_duration: Histogram
    shadow_skipped: Counter
    feedback: Counter
    store_size: Gauge
    labels_total: Counter
    correct: Counter
    nll: Counter
    flagged: Counter
    bin_images: Counter
    bin_correct: Counter
    bin_confidence: Counter

    def __init__(self, registry: CollectorRegistry) -> None:
        create_families(self, FAMILIES, registry)
        for result in FEEDBACK_RESULTS:
            self.feedback.labels(result=result)

    def loaded(self, model: str, version: str) -> None:
        """A version now serves or shadows: its series exist (at 0) from here on."""
        self.loads.labels(model=model, version=version).inc()
        self.load_failures.labels(model=model, version=version)
        for outcome in ("in_distribution", "ood_flagged", "rejected"):
            self.version_predictions.labels(model=model, version=version, outcome=outcome)
        for truth in ("in_distribution", "ood"):
            self.labels_total.labels(model=model, version=version, truth=truth)
            self.flagged.labels(model=model, version=version, truth=truth)
        self.correct.labels(model=model, version=version)
        self.nll.labels(model=model, version=version)

    def set_role(self, model: str, version: str, role: str | None) -> None:
        for other in ("serving", "shadow"):
            if other != role:
                remove_series(self.version_info, model, version, other)
        if role is not None:
            self.version_info.labels(model=model, version=version, role=role).set(1)
