"""A real Prometheus scrapes a real `sdde serve` and evaluates the repository's rules.

A known mix of in-distribution and OOD images goes in; the recording rule
``sdde:ood_rate:ratio_rate5m`` must come out as exactly that OOD rate. The rule file is the
repository's, with only its range windows shortened (``[5m]`` -> ``[2m]``) so that the test does
not wait five minutes: the expressions are otherwise the same text. The Grafana dashboard's
queries run against the same Prometheus, so a typo in a panel's PromQL fails here.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.deploy.helpers import (
    DEPLOY,
    REPO,
    RULES,
    clean_env,
    free_port,
    stop,
    tool,
    wait_http,
)
from tests.deploy.test_manifests import dashboard_exprs
from tests.onnx_factory import make_linear_ensemble, reference_outputs

TEST_WINDOW = "2m"  # longer than the test runs: the window covers every series from birth
N_ID, N_FLAGGED, N_REJECTED = 6, 2, 2  # OOD rate = 4 / 10


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def known_mix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes], list[bytes]]:
    """A hand-made model and images whose outcome is known from a numpy reference.

    The threshold is the median MAL of seeded noise images, so both outcomes are plentiful; only
    images far (> 0.05) from the threshold are used, so float differences cannot flip one.
    """
    root = tmp_path_factory.mktemp("prom_mix")
    _, weights = make_linear_ensemble(root / "probe.onnx")
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (200, 8, 8), dtype=np.uint8)
    x = pixels[:, None].astype(np.float32) / 255.0
    mal = reference_outputs(weights, x, 3, 1.5)["mal"]
    threshold = float(np.median(mal))
    path, _ = make_linear_ensemble(root / "mix.onnx", threshold=threshold)
    in_dist = [png(p) for p, m in zip(pixels, mal, strict=True) if m > threshold + 0.05]
    ood = [png(p) for p, m in zip(pixels, mal, strict=True) if m < threshold - 0.05]
    return path, in_dist[:N_ID], ood[: N_FLAGGED + N_REJECTED]


def test_rules_file_has_the_shortenable_windows():
    """What the test rewrites is really there (or the rewrite would test nothing)."""
    text = RULES.read_text()
    assert text.count("[5m]") >= 4 and f"[{TEST_WINDOW}]" not in text


def test_rule_file_rewrite_changes_only_windows():
    original, shortened = RULES.read_text(), _test_rules_text()
    assert re.sub(r"\[\w+\]", "[W]", original) == re.sub(r"\[\w+\]", "[W]", shortened)


def _test_rules_text() -> str:
    return RULES.read_text().replace("[5m]", f"[{TEST_WINDOW}]")


# one server process, and `--workers 2`: its /metrics merges both workers' samples
# (prometheus_client multiprocess mode), so every query below must give the same answers
@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(known_mix, tmp_path_factory, request) -> Iterator[str]:
    model, _, _ = known_mix
    port = free_port()
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "sdde_serve", "serve", str(model), "--host", "127.0.0.1"]
    cmd += ["--workers", str(request.param)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--threads", "1", "--log-level", "warning"],
        cwd=tmp_path_factory.mktemp("srv"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/v2/health/ready", 60, proc)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(server: str, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("prometheus")
    (root / "sdde.rules.yml").write_text(_test_rules_text())
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"] = [
        {
            "job_name": "sdde",  # the deployed config's job name (SddeTargetDown selects it)
            "static_configs": [{"targets": [server.removeprefix("http://")]}],
        }
    ]
    config["rule_files"] = [str(root / "sdde.rules.yml")]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", 30, proc)
        yield url
    finally:
        stop(proc)


def query(prom: str, expr: str) -> list[dict]:
    qs = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{prom}/api/v1/query?{qs}", timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def poll(prom: str, expr: str, done, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(prom, expr)
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.25)


def predict(server: str, images: list[bytes], policy: str) -> list[dict]:
    body = json.dumps(
        {"images": [base64.b64encode(i).decode() for i in images], "ood_policy": policy}
    ).encode()
    request = urllib.request.Request(
        server + "/v1/predict", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)["predictions"]


def test_recording_rule_returns_the_ood_rate_sent(server: str, prometheus: str, known_mix):
    _, in_dist, ood = known_mix
    assert len(in_dist) == N_ID and len(ood) == N_FLAGGED + N_REJECTED
    # The counters' zero samples are scraped before any traffic: rate() then counts every
    # prediction (a series born at 1 would lose its first increment).
    poll(prometheus, 'sdde_predictions_total{job="sdde"}', lambda r: len(r) == 3)

    # interleaved, in several requests and both policies, like real traffic
    answers = predict(server, in_dist[:3] + ood[:N_FLAGGED], "flag")
    answers += predict(server, in_dist[3:] + ood[N_FLAGGED:], "reject")
    outcomes = [
        "rejected" if a["rejected"] else "ood_flagged" if a["is_ood"] else "in_distribution"
        for a in answers
    ]
    assert (
        outcomes
        == ["in_distribution"] * 3
        + ["ood_flagged"] * N_FLAGGED
        + ["in_distribution"] * 3
        + ["rejected"] * N_REJECTED
    )

    total = N_ID + N_FLAGGED + N_REJECTED
    counted = poll(
        prometheus,
        'sum(sdde_predictions_total{job="sdde"})',
        lambda r: r and float(r[0]["value"][1]) == total,
    )
    assert counted and float(counted[0]["value"][1]) == total, "Prometheus never saw them all"
    by_outcome = query(prometheus, 'sdde_predictions_total{job="sdde"}')
    assert {r["metric"]["outcome"]: float(r["value"][1]) for r in by_outcome} == {
        "in_distribution": N_ID,
        "ood_flagged": N_FLAGGED,
        "rejected": N_REJECTED,
    }
    # Prometheus' clock when the last prediction was queryable, so ingested: a rule evaluated
    # after it sees every prediction (one evaluated between a scrape's start and its append
    # would not)
    seen_at = float(counted[0]["value"][0])
    recorded = poll(
        prometheus,
        "timestamp(sdde:ood_rate:ratio_rate5m)",
        lambda r: r and float(r[0]["value"][1]) > seen_at,
    )
    assert recorded and float(recorded[0]["value"][1]) > seen_at, "no rule evaluation after"
    (rate,) = query(prometheus, "sdde:ood_rate:ratio_rate5m")
    assert rate["metric"] == {"__name__": "sdde:ood_rate:ratio_rate5m", "model": "linear-test"}
    expected = (N_FLAGGED + N_REJECTED) / total
    print(f"recorded OOD rate {rate['value'][1]} (sent {expected})")
    assert float(rate["value"][1]) == pytest.approx(expected, abs=1e-9)

    # every rule evaluates without error on real series
    with urllib.request.urlopen(prometheus + "/api/v1/rules", timeout=5) as r:
        groups = json.load(r)["data"]["groups"]
    rules = [rule for g in groups for rule in g["rules"]]
    in_file = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(in_file) and all(rule["health"] == "ok" for rule in rules), rules
    # a healthy server: no alert but the OOD one (40% OOD may well leave it pending) is active
    states = {r["name"]: r["state"] for r in rules if r["type"] == "alerting"}
    assert {n: s for n, s in states.items() if n != "SddeOODRateHigh"} == dict.fromkeys(
        [
            "SddeOODShareAboveAlpha",  # this model has no p-values
            "SddeHighErrorRate",
            "SddeLatencyP99High",
            "SddeModelNotReady",
            "SddeTargetDown",
            "SddeLiveAccuracyDrop",
        ],
        "inactive",
    ), states
    (ready,) = query(prometheus, "sdde_model_ready")
    assert ready["value"][1] == "1"


def test_dashboard_queries_run_on_real_series(server: str, prometheus: str):
    """Every panel's PromQL parses and the panels that must show data do."""
    poll(prometheus, "sdde_model_info", lambda r: len(r) == 1)
    substitutions = {
        "$__rate_interval": "30s",
        "$__range": "5m",
        "$model": ".*",
        "$job": ".*",
        "$endpoint": ".*",
    }
    for expr in dashboard_exprs():
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        query(prometheus, expr)  # status success = valid PromQL
    # series every deployment has from the first scrape
    for expr in ["sdde_model_info", "sdde_model_ready", "sdde_queue_depth", "sdde_requests_total"]:
        assert query(prometheus, expr), expr


def test_feedback_and_version_series_reach_prometheus(server: str, prometheus: str, known_mix):
    """Labels for earlier predictions turn into the sdde_feedback_* counters, the live gauges and
    the recording rules' values (their 1 h window shortened the same way as above).

    Prediction ids are signed records, so whichever worker takes the label accepts it: one
    call, every label accepted; the counters and the live gauges add up across workers."""
    _, in_dist, _ = known_mix
    answers = predict(server, in_dist[:4], "flag")
    # two right, one wrong, one "none of the classes"
    labels = [answers[0]["label"], answers[1]["label"], (answers[2]["label"] + 1) % 4, None]
    body = json.dumps([{"id": a["id"], "label": y} for a, y in zip(answers, labels, strict=True)])
    post = urllib.request.Request(
        server + "/v1/feedback", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(post, timeout=30) as r:
        results = json.load(r)["results"]
    assert [x["result"] for x in results] == ["accepted"] * 4
    key = '{job="sdde",model="linear-test",version="7"}'
    correct = poll(
        prometheus, "sdde_feedback_correct_total" + key, lambda r: r and r[0]["value"][1] == "2"
    )
    assert correct and correct[0]["value"][1] == "2"
    (live,) = poll(prometheus, "sdde_live_accuracy" + key, lambda r: len(r) == 1)
    assert float(live["value"][1]) == pytest.approx(2 / 3)
    (labelled,) = query(prometheus, 'sdde_feedback_labels_total{job="sdde",truth="ood"}')
    assert labelled["value"][1] == "1"
    (version,) = query(prometheus, 'sdde_model_version_info{job="sdde",role="serving"}')
    assert version["metric"]["version"] == "7"
    assert query(prometheus, 'sdde_version_predictions_total{job="sdde",model="linear-test"}')
    # the recording rule's expression over a window covering the test: 2 of 3 right
    rule = next(
        r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r.get("record") == "sdde:live_accuracy:ratio_rate1h"
    )
    (ratio,) = poll(prometheus, rule.replace("[1h]", f"[{TEST_WINDOW}]"), lambda r: len(r) == 1)
    assert float(ratio["value"][1]) == pytest.approx(2 / 3)
