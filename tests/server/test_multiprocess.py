"""``sdde serve --workers 2``: one /metrics for all workers (prometheus_client multiprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from sdde_serve.server.lifecycle_metrics import LifecycleMetrics
from sdde_serve.server.metrics import GAUGE_MODES, Metrics
from sdde_serve.server.multiprocess import ENV, clean_dir, forget_dead_workers
from tests.server.conftest import ServerProcess, gray_png, metric, scrape

MAX_REQUESTS = 400


def per_worker(directory: Path, sample: str) -> dict[int, float]:
    """Each worker's own value of counter ``sample`` (summed over labels), from its file."""
    out: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        values = MmapedDict.read_all_values_from_file(str(path))
        out[pid] = sum(v[1] for v in values if json.loads(v[0])[1] == sample)
    return out


def test_two_workers_metrics_sum_counters_across_workers(linear, tmp_path):
    model, _ = linear
    directory = tmp_path / "metrics"
    directory.mkdir()
    # left by an earlier server: must not be added to this one's counters
    stale = directory / "counter_99999999.db"
    stale.write_bytes(b"\0" * 8)
    server = ServerProcess(model, "--workers", "2", env={ENV: str(directory)})
    try:
        server.wait_ready()
        sent = 0
        counts: dict[int, float] = {}
        # a new connection per request: the kernel spreads accepts over both workers
        while sent < MAX_REQUESTS:
            r = httpx.post(
                server.url + "/v1/predict",
                files=[("files", ("a.png", gray_png(sent), "image/png"))],
                timeout=30,
            )
            assert r.status_code == 200, r.text
            sent += 1
            if sent % 10 == 0:
                counts = per_worker(directory, "sdde_predictions_total")
                if len(counts) == 2 and all(v > 0 for v in counts.values()):
                    break
        assert not stale.exists()
        assert len(counts) == 2 and all(v > 0 for v in counts.values()), counts
        samples = scrape(httpx.get(server.url + "/metrics", timeout=10).text)
        total = sum(
            metric(samples, "sdde_predictions_total", model="linear-test", outcome=o)
            for o in ("in_distribution", "ood_flagged", "rejected")
        )
        # one scrape, answered by one worker, counts what both answered
        assert total == sent == sum(counts.values())
        assert metric(
            samples, "sdde_requests_total", endpoint="/v1/predict", status="200"
        ) == float(sent)
        assert metric(
            samples, "sdde_request_duration_seconds_count", endpoint="/v1/predict"
        ) == float(sent)
        # gauges merged by their stated mode: one series each, not one per worker
        assert metric(samples, "sdde_model_ready", model="linear-test") == 1.0
        assert metric(samples, "sdde_queue_depth", model="linear-test") == 0.0
        info = [k for k in samples if k[0] == "sdde_model_info"]
        assert len(info) == 1 and samples[info[0]] == 1.0
        assert not any(("pid", p) in labels for _, labels in samples for p in map(str, counts))
    finally:
        code = server.stop()
    assert code == 0, server.output()


def test_gauge_modes_are_stated_for_every_gauge():
    from prometheus_client import Gauge

    m = Metrics()
    lifecycle = LifecycleMetrics(m.registry)
    # prometheus_client keeps the name and the mode private
    gauges = {
        c._name: c._multiprocess_mode
        for c in [*vars(m).values(), *vars(lifecycle).values()]
        if isinstance(c, Gauge)
    }
    assert gauges == GAUGE_MODES


def test_dead_workers_live_gauges_are_dropped_but_counters_kept(tmp_path):
    clean_dir(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    pid = int(dead.stdout)
    for name in (f"gauge_livesum_{pid}.db", f"counter_{pid}.db", f"gauge_livesum_{os.getpid()}.db"):
        (tmp_path / name).write_bytes(b"")
    forget_dead_workers(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"counter_{pid}.db", f"gauge_livesum_{os.getpid()}.db"])
    (tmp_path / "histogram_7.db").write_bytes(b"")
    clean_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(autouse=True)
def _no_inherited_multiprocess_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_removing_an_absent_series_is_silent_in_multiprocess_mode(tmp_path, monkeypatch):
    """prometheus_client warns at every remove() in multiprocess mode, also of a series that
    was never created: the start-up removals printed one warning per worker."""
    import warnings

    from prometheus_client import CollectorRegistry, Gauge

    from sdde_serve.server.multiprocess import remove_series

    monkeypatch.setenv(ENV, str(tmp_path))
    gauge = Gauge("sdde_test_role", "t", ["model", "role"], registry=CollectorRegistry())
    gauge.labels(model="m", role="serving").set(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert remove_series(gauge, "m", "shadow") is False
    with pytest.warns(UserWarning, match="multi-process"):  # a real removal: still said
        assert remove_series(gauge, "m", "serving") is True
    assert remove_series(gauge, "m", "serving") is False
