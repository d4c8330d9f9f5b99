"""Prometheus metrics (names and labels are a contract: see docs/architecture.md).

Every app gets its own :class:`CollectorRegistry`, so several apps in one test process don't
collide and ``/metrics`` shows exactly this app's series. Under ``sdde serve --workers N`` the
values live in prometheus_client's multiprocess files instead and ``/metrics`` merges every
worker's (``multiprocess.py``): counters and histograms are summed, gauges by ``GAUGE_MODES``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sdde_serve import scores
from sdde_serve.manifest import Manifest
from sdde_serve.scores.msp import CONFIDENCE_BUCKETS
from sdde_serve.scoring import Prediction
from sdde_serve.server.multiprocess import multiprocess_dir, remove_series

OUTCOMES = ("in_distribution", "ood_flagged", "rejected")

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def score_bucket_table() -> dict[str, tuple[float, ...]]:
    """Each registered score's histogram bounds (sdde_serve/scores/: a logit's wide, uneven range
    for MAL-like scores, a probability's for MSP, a cosine's for KNN). No negative bounds: with
    one, prometheus_client drops the histogram's _sum (and with it the mean score); scores <= 0
    are all far out of distribution and share the first bucket."""
    return {name: spec.buckets for name, spec in scores.SCORES.items()}


SCORE_BUCKETS = score_bucket_table()


# p-values: fine near 0 (where alpha lives), then even steps so that the distribution can be
# compared with the uniform one it follows on in-distribution traffic; alpha itself is added
P_VALUE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip


def p_value_buckets(alpha: float) -> list[float]:
    return sorted({*P_VALUE_BUCKETS, float(alpha)} - {0.0})


# how each gauge merges across worker processes (prometheus_client multiprocess modes; ignored
# in a single process): queued images add up, the model is ready only when every live worker is,
# and the info gauge is 1 in every worker
GAUGE_MODES = {
    "sdde_queue_depth": "livesum",
    "sdde_model_ready": "livemin",
    "sdde_model_info": "livemax",
    "sdde_ood_alpha": "livemax",
    # lifecycle_metrics.py: what each worker loaded (the same everywhere), and the predictions
    # each worker keeps for delayed labels (its own store: they add up)
    "sdde_model_version_info": "livemax",
    "sdde_feedback_store_size": "livesum",
}


def score_buckets(kind: str, threshold: float) -> list[float]:
    """The score's buckets plus the threshold itself, so the histogram can count
    ``score < threshold`` exactly (``le`` equal to the threshold is the boundary)."""
    table = score_bucket_table()
    bounds = {*table.get(kind, table["mal"]), float(threshold)}
    return sorted(b for b in bounds if b >= 0.0)


@dataclass(frozen=True)
class Family:
    """One Prometheus family, declared as data (a row of a table) and created, on the owner's
    registry, as the owner's attribute ``attr`` by :func:`create_families`."""

    attr: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histograms only


def create_families(owner: object, families: Iterable[Family], registry: CollectorRegistry) -> None:
    """Create each family as ``owner.<attr>``: gauges merge across workers by
    :data:`GAUGE_MODES` (every gauge must have a mode there), histograms get their buckets."""
    for f in families:
        extra: dict[str, Any] = {}
        if f.kind is Gauge:
            extra["multiprocess_mode"] = GAUGE_MODES[f.name]
        if f.buckets is not None:
            extra["buckets"] = f.buckets
        setattr(owner, f.attr, f.kind(f.name, f.help, list(f.labels), registry=registry, **extra))


M = ("model",)
# the server's series (names and labels are a contract: docs/architecture.md)
FAMILIES = (
    Family("predictions", Counter, "sdde_predictions_total", "Images answered, by OOD outcome",
           ("model", "outcome")),
    Family("predicted_class", Counter, "sdde_predicted_class_total",
           "In-distribution predictions by predicted class", ("model", "class_name")),
    Family("confidence", Histogram, "sdde_confidence",
           "Calibrated probability of the predicted class", M, CONFIDENCE_BUCKETS),
    Family("request_duration", Histogram, "sdde_request_duration_seconds", "HTTP request latency",
           ("endpoint",), LATENCY_BUCKETS),
    Family("requests", Counter, "sdde_requests_total", "HTTP requests by endpoint and status",
           ("endpoint", "status")),
    Family("queue_wait", Histogram, "sdde_queue_wait_seconds",
           "Time an image waited in the batching queue", M, LATENCY_BUCKETS),
    Family("engine_duration", Histogram, "sdde_engine_duration_seconds",
           "Time of one engine call (one batch)", M, LATENCY_BUCKETS),
    Family("batch_size", Histogram, "sdde_batch_size", "Images per engine call", M,
           BATCH_BUCKETS),
    Family("queue_depth", Gauge, "sdde_queue_depth", "Images waiting for the engine", M),
    Family("model_ready", Gauge, "sdde_model_ready",
           "1 when the model is loaded, warmed up and not draining", M),
    Family("model_info", Gauge, "sdde_model_info", "The served model (always 1)",
           ("model", "version", "members", "providers", "threshold", "score")),
    Family("p_below_alpha", Counter, "sdde_ood_p_below_alpha_total",
           "Images whose conformal p-value is below the model's alpha (whatever a request set)",
           M),
    Family("alpha", Gauge, "sdde_ood_alpha",
           "The model's alpha = 1 - id_acceptance: the promised in-distribution false-flag rate",
           M),
)  # fmt: skip


class Metrics:
    """All server metrics, registered on one registry (the families of :data:`FAMILIES`, and
    the OOD-score and p-value histograms, whose buckets come from the first model loaded)."""

    predictions: Counter
    predicted_class: Counter
    confidence: Histogram
    request_duration: Histogram
    requests: Counter
    queue_wait: Histogram
    engine_duration: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    model_ready: Gauge
    model_info: Gauge
    p_below_alpha: Counter
    alpha: Gauge

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # set for `--workers N`: /metrics then merges every worker's files in this directory
        self.multiprocess_dir = multiprocess_dir()
        create_families(self, FAMILIES, self.registry)
        self._ood_score: Histogram | None = None
        self._p_value: Histogram | None = None
        # the model's own threshold (p-value < its alpha <=> score < it), per model
        self._alpha_threshold: dict[str, float] = {}

    def _info_labels(
        self, manifest: Manifest, providers: Sequence[str], name: str | None, version: str | None
    ) -> dict[str, str]:
        return {
            "model": name or manifest.name,
            "version": version or manifest.version,
            "members": str(manifest.members),
            "providers": ",".join(providers),
            "threshold": repr(float(manifest.ood.threshold)),
            "score": manifest.ood.score,
        }

    def unset_model(
        self,
        manifest: Manifest,
        providers: Sequence[str],
        *,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        """Drop the ``sdde_model_info`` series of a version that no longer serves."""
        labels = self._info_labels(manifest, providers, name, version)
        remove_series(self.model_info, *labels.values())

    def set_model(
        self,
        manifest: Manifest,
        providers: Sequence[str],
        *,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        """Describe the loaded model; the OOD-score buckets depend on its score and threshold.

        ``name`` and ``version`` are those it is served under (a repository's directories),
        the manifest's by default. The buckets are those of the first model loaded."""
        self.model_info.labels(**self._info_labels(manifest, providers, name, version)).set(1)
        name = name or manifest.name
        if self._ood_score is None:
            self._ood_score = Histogram(
                "sdde_ood_score",
                "OOD score per image (higher = more in-distribution)",
                ["model"],
                buckets=score_buckets(manifest.ood.score, manifest.ood.threshold),
                registry=self.registry,
            )
        # series exist (at 0) from the start, so rate() works from the first scrape
        for outcome in OUTCOMES:
            self.predictions.labels(model=name, outcome=outcome)
        for family in (self.queue_wait, self.engine_duration, self.batch_size, self.confidence):
            family.labels(model=name)
        self._ood_score.labels(model=name)
        self._set_p_values(manifest, name)
        self.model_ready.labels(model=name)  # set by whoever knows readiness (app, repository)
        self.queue_depth.labels(model=name).set(0)

    def _set_p_values(self, manifest: Manifest, name: str) -> None:
        """p-value series of the model served as ``name``, for models with calibration scores
        (older files have none). The buckets hold the first such model's alpha; the counter of
        p-values below alpha and the alpha gauge are exact for every model."""
        if manifest.ood.calibration_scores is None:
            self._alpha_threshold.pop(name, None)  # a hot swap to an older file
            return
        if self._p_value is None:
            self._p_value = Histogram(
                "sdde_ood_p_value",
                "Conformal OOD p-value per image (uniform on in-distribution traffic)",
                ["model"],
                buckets=p_value_buckets(manifest.ood.alpha),
                registry=self.registry,
            )
        self._p_value.labels(model=name)
        self.p_below_alpha.labels(model=name)
        self.alpha.labels(model=name).set(manifest.ood.alpha)
        self._alpha_threshold[name] = manifest.ood.threshold

    def observe_predictions(self, model: str, predictions: Iterable[Prediction]) -> None:
        assert self._ood_score is not None, "set_model() first"
        threshold = self._alpha_threshold.get(model)
        for p in predictions:
            self.predictions.labels(model=model, outcome=p.outcome).inc()
            self._ood_score.labels(model=model).observe(p.ood_score)
            if p.ood_p_value is not None and self._p_value is not None and threshold is not None:
                self._p_value.labels(model=model).observe(p.ood_p_value)
                if p.ood_score < threshold:  # p-value < the model's alpha
                    self.p_below_alpha.labels(model=model).inc()
            if p.confidence is not None:
                self.confidence.labels(model=model).observe(p.confidence)
            if p.outcome == "in_distribution" and p.class_name is not None:
                self.predicted_class.labels(model=model, class_name=p.class_name).inc()
