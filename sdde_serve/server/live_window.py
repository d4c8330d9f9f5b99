"""The ``sdde_live_*`` gauges: accuracy, NLL, ECE and OOD-flag precision over the labels that
arrived in the last ``--feedback-window`` seconds, per model and version.

Every figure is a ratio of sums (accuracy = correct / labelled; ECE = sum over the 15 confidence
bins of |sum of confidences - number correct| / labelled, which is ``calibration.ece``'s formula
regrouped), and sums add up across processes. So with ``sdde serve --workers N`` each worker
writes its own window's sums into a ``livesum`` gauge in the shared metrics directory
(``WINDOW_SUMS``, refreshed at each label and every ``REFRESH_S`` as labels leave the window),
and the worker that answers ``/metrics`` turns the merged sums into the ratios
(:func:`merged_live_families`). A worker that exits takes its window with it; the counters
(and the recording rules built on them) keep everything. Across replicas: the recording rules.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from sdde_serve.server.lifecycle_metrics import ECE_BINS, bin_label

WINDOW_SUMS = "sdde_live_window_sums"  # internal: merged over workers, never exported as such
REFRESH_S = 1.0
Key = tuple[str, str]  # (model, version)
Sums = dict[str, float]


@dataclass(slots=True)
class Row:
    time: float  # when the label arrived (the window is in label time)
    model: str
    version: str
    truth: int  # -1: none of the classes
    correct: bool
    confidence: float  # probability of the predicted class
    nll: float  # -log p(truth); 0 when truth is -1
    is_ood: bool


def confidence_bin(confidence: float) -> int:
    """Index of the right-closed bin ``(b/n, (b+1)/n]``, as calibration.ece bins."""
    return min(max(math.ceil(confidence * ECE_BINS) - 1, 0), ECE_BINS - 1)


def contributions(r: Row) -> Sums:
    """What one label adds to its (model, version)'s sums: labelled, known (truth is a class),
    correct, nll, flagged, flagged_ood, and per confidence bin ``conf:<edge>`` and
    ``correct:<edge>``."""
    out = {
        "labelled": 1.0,
        "flagged": float(r.is_ood),
        "flagged_ood": float(r.is_ood and r.truth < 0),
    }
    if r.truth >= 0:
        edge = bin_label(confidence_bin(r.confidence))
        out.update(known=1.0, correct=float(r.correct), nll=r.nll)
        out[f"conf:{edge}"] = r.confidence
        out[f"correct:{edge}"] = float(r.correct)
    return out


def row_sums(rows: Iterable[Row]) -> dict[Key, Sums]:
    """Per (model, version): the sums of the rows' :func:`contributions`."""
    out: dict[Key, Sums] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        _add(out[(r.model, r.version)], contributions(r), 1.0)
    return out


def _add(sums: Sums, contribution: Sums, sign: float) -> None:
    for quantity, value in contribution.items():
        sums[quantity] += sign * value


def ratios(s: Sums) -> dict[str, float]:
    stats = {"labelled": s.get("labelled", 0.0)}
    known = s.get("known", 0.0)
    if known:
        stats["accuracy"] = s["correct"] / known
        stats["nll"] = s["nll"] / known
        deviation = sum(
            abs(s.get(f"conf:{e}", 0.0) - s.get(f"correct:{e}", 0.0))
            for e in map(bin_label, range(ECE_BINS))
        )
        stats["ece"] = deviation / known
    if s.get("flagged"):
        stats["ood_precision"] = s["flagged_ood"] / s["flagged"]
    return stats


def live_families(stats: dict[Key, dict[str, float]]) -> list[Metric]:
    labels = ["model", "version"]
    families = {
        "labelled": GaugeMetricFamily(
            "sdde_live_labelled", "Labels received in the window", labels=labels
        ),
        "accuracy": GaugeMetricFamily(
            "sdde_live_accuracy",
            "Accuracy among labelled in-distribution images, over the window",
            labels=labels,
        ),
        "nll": GaugeMetricFamily(
            "sdde_live_nll",
            "Mean -log p(true class) among labelled in-distribution images, over the window",
            labels=labels,
        ),
        "ece": GaugeMetricFamily(
            "sdde_live_ece",
            f"Expected calibration error ({ECE_BINS} bins) among labelled in-distribution "
            "images, over the window",
            labels=labels,
        ),
        "ood_precision": GaugeMetricFamily(
            "sdde_live_ood_precision",
            "Share of labelled OOD-flagged images that really were none of the classes",
            labels=labels,
        ),
    }
    for (model, version), values in stats.items():
        for key, family in families.items():
            if key in values:
                family.add_metric([model, version], values[key])
    return list(families.values())


def merged_live_families(families: Iterable[Metric]) -> list[Metric]:
    """``/metrics`` with ``--workers N``: the workers' merged window sums become the
    ``sdde_live_*`` gauges (the sums themselves are not exported)."""
    out, sums = [], defaultdict(dict)
    for family in families:
        if family.name != WINDOW_SUMS:
            out.append(family)
            continue
        for sample in family.samples:
            key = (sample.labels["model"], sample.labels["version"])
            sums[key][sample.labels["quantity"]] = sample.value
    stats = {key: ratios(s) for key, s in sums.items() if s.get("labelled")}
    return out + live_families(stats)


class LiveWindow:
    """The labels of the last ``window_s`` seconds; a prometheus_client collector (one process)
    or, ``shared``, the writer of this worker's sums (several)."""

    def __init__(self, window_s: float, clock: Callable[[], float], shared: bool) -> None:
        self.window_s = window_s
        self.clock = clock
        self._rows: deque[Row] = deque()
        self._sums: dict[Key, Sums] = defaultdict(lambda: defaultdict(float))
        self._lock = threading.Lock()
        self._gauge = None
        self._published: set[tuple[str, str, str]] = set()
        if shared:  # values go to this worker's file in the shared directory; no registry
            self._gauge = Gauge(
                WINDOW_SUMS,
                "Sums over this worker's feedback window (merged into sdde_live_*)",
                ["model", "version", "quantity"],
                registry=None,
                multiprocess_mode="livesum",
            )

    def add(self, row: Row) -> None:
        with self._lock:
            self._rows.append(row)
            _add(self._sums[(row.model, row.version)], contributions(row), 1.0)

    def sums(self) -> dict[Key, Sums]:
        """Running sums (kept as labels arrive and leave: a refresh costs the labels that left
        the window, not the whole window)."""
        now = self.clock()
        with self._lock:
            while self._rows and self._rows[0].time < now - self.window_s:
                row = self._rows.popleft()
                key = (row.model, row.version)
                _add(self._sums[key], contributions(row), -1.0)
                if self._sums[key]["labelled"] < 0.5:  # counts are exact; drop float residue
                    del self._sums[key]
            return {key: dict(s) for key, s in self._sums.items()}

    def stats(self) -> dict[Key, dict[str, float]]:
        return {key: ratios(s) for key, s in self.sums().items()}

    def publish(self) -> None:
        """``shared``: this worker's sums into its livesum gauge (vanished ones set to 0)."""
        if self._gauge is None:
            return
        current = {
            (model, version, q): v
            for (model, version), s in self.sums().items()
            for q, v in s.items()
        }
        for labels in self._published - current.keys():
            self._gauge.labels(*labels).set(0.0)
        for labels, value in current.items():
            self._gauge.labels(*labels).set(value)
        self._published = set(current)

    async def publish_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            self.publish()

    # --- prometheus_client collector (one process) ---------------------------------------------

    def collect(self) -> Iterator[Metric]:
        if self._gauge is None:
            yield from live_families(self.stats())

    def describe(self) -> list[Metric]:
        return []  # names only known at collect time; keeps registration from calling collect
