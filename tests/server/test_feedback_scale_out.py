"""Scale-out: two replicas (server processes on two ports, one feedback secret) of two workers
each. A label is accepted wherever it lands, the counters summed over replicas give the hand
count, and a repository API call reaches both workers of the replica that took it."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from sdde_serve.server.multiprocess import ENV
from tests.server.conftest import ServerProcess, gray_png, metric, scrape
from tests.server.test_repository import MODEL, add_version, versions  # noqa: F401 (fixture)

SECRET = "one secret for every replica, 32+"
MAX_ROUNDS = 120


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, versions) -> Iterator[list[tuple[ServerProcess, Path]]]:  # noqa: F811
    root = tmp_path_factory.mktemp("scale_out")
    repo = root / "repo"
    add_version(repo, "1", versions["1"])
    add_version(repo, "2", versions["2"])
    started = []
    try:
        for i in range(2):
            directory = root / f"metrics{i}"  # each replica its own; the secret is shared
            directory.mkdir()
            env = {ENV: str(directory), "SDDE_FEEDBACK_SECRET": SECRET}
            started.append((ServerProcess(repo, "--workers", "2", env=env), directory))
        for server, _ in started:
            server.wait_ready()
        yield started
    finally:
        outputs = [server.output() for server, _ in started]
        codes = [server.stop() for server, _ in started]
        assert codes == [0] * len(started), outputs


def per_worker(directory: Path, sample: str, **labels: str) -> dict[int, float]:
    """Each worker's own value of counter ``sample`` with ``labels``, from its file."""
    out: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in values:
            _, name, have, _ = json.loads(key)
            if name == sample and labels.items() <= have.items():
                out[pid] = out.get(pid, 0.0) + value
    return out


def predict(server: ServerProcess, seed: int) -> dict:
    r = httpx.post(
        server.url + f"/v1/models/{MODEL}:predict?probabilities=true",
        files=[("files", ("a.png", gray_png(seed), "image/png"))],
        timeout=30,
    )  # a new connection per request: the kernel spreads them over the workers
    assert r.status_code == 200, r.text
    return r.json()


def test_labels_for_any_replica_and_worker_add_up_to_the_hand_count(replicas):
    (a, dir_a), (b, dir_b) = replicas
    answers, sent, correct_by_hand, nll_by_hand = [], 0, 0, 0.0
    at = {a.url: [0, 0], b.url: [0, 0]}  # per replica taking the label: labels, right ones
    for i in range(MAX_ROUNDS):
        # predicted on one replica, labelled on the other, alternating
        (pred_at, label_at) = (a, b) if i % 2 == 0 else (b, a)
        pred = predict(pred_at, i)["predictions"][0]
        truth = pred["label"] if i % 3 else (pred["label"] + 1) % 4  # a third wrong
        r = httpx.post(label_at.url + "/v1/feedback", json=[{"id": pred["id"], "label": truth}],
                       timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        answers.append(r.json()["results"][0]["result"])
        sent += 1
        correct_by_hand += truth == pred["label"]
        at[label_at.url][0] += 1
        at[label_at.url][1] += truth == pred["label"]
        nll_by_hand -= math.log(pred["probabilities"][truth])
        spread = [per_worker(d, "sdde_feedback_total", result="accepted") for d in (dir_a, dir_b)]
        if i >= 20 and all(sum(v > 0 for v in w.values()) == 2 for w in spread):
            break  # both workers of both replicas have accepted labels
    assert answers == ["accepted"] * sent
    assert all(len(w) == 2 and all(v > 0 for v in w.values()) for w in spread), spread
    # what Prometheus' recording rules compute: sum by (model) over every replica's /metrics
    totals = {"correct": 0.0, "labels": 0.0, "nll": 0.0}
    key = {"model": MODEL, "version": "2"}
    for server in (a, b):
        samples = scrape(httpx.get(server.url + "/metrics", timeout=10).text)
        # the windowed gauges merge both workers of the replica that answers the scrape
        labels, right = at[server.url]
        assert metric(samples, "sdde_live_labelled", **key) == labels
        assert metric(samples, "sdde_live_accuracy", **key) == pytest.approx(right / labels)
        assert not any(name == "sdde_live_window_sums" for name, _ in samples)
        totals["correct"] += metric(samples, "sdde_feedback_correct_total", **key)
        totals["labels"] += metric(
            samples, "sdde_feedback_labels_total", **key, truth="in_distribution"
        )
        totals["nll"] += metric(samples, "sdde_feedback_nll_total", **key)
    assert totals["labels"] == sent
    assert totals["correct"] == correct_by_hand
    assert totals["correct"] / totals["labels"] == correct_by_hand / sent
    assert totals["nll"] / sent == pytest.approx(nll_by_hand / sent, abs=1 / 4096)


def served_by(directory: Path, version: str) -> dict[int, float]:
    """Workers that answered with ``version`` (a loaded version's series exist at 0)."""
    counts = per_worker(directory, "sdde_version_predictions_total", model=MODEL, version=version)
    return {pid: n for pid, n in counts.items() if n > 0}


def test_repository_api_reaches_every_worker(replicas):
    (a, directory), _ = replicas
    api = a.url + f"/v2/repository/models/{MODEL}"
    before = served_by(directory, "2")
    pinned = httpx.post(api + "/load", json={"parameters": {"version": "1"}}, timeout=60).json()
    assert pinned["version"] == "1" and pinned["workers"] == 2, pinned
    assert "workers_pending" not in pinned
    for i in range(MAX_ROUNDS):  # until both workers have answered with version 1
        assert predict(a, i)["version"] == "1"
        if i >= 10 and len(served_by(directory, "1")) == 2:
            break
    assert len(served_by(directory, "1")) == 2
    assert served_by(directory, "2") == before  # no worker still answers with version 2
    # a worker that dies is restarted by uvicorn and catches up (version 1) before it is ready
    victim = min(served_by(directory, "1"))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(served_by(directory, "1")) < 3 and time.monotonic() < deadline:
        assert predict(a, 0)["version"] == "1"
    assert len(served_by(directory, "1")) == 3  # the new worker answered, with version 1
    assert served_by(directory, "2") == before
    unloaded = httpx.post(api + "/unload", timeout=60).json()
    assert unloaded["workers"] == 2 and "workers_pending" not in unloaded
    gone = {
        httpx.post(a.url + f"/v1/models/{MODEL}:predict", timeout=30,
                   files=[("files", ("a.png", gray_png(0), "image/png"))]).status_code
        for _ in range(20)
    }  # fmt: skip
    back = httpx.post(api + "/load", json={"parameters": {"version": "latest"}}, timeout=60)
    index = httpx.post(a.url + "/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert gone == {404}
    assert back.json()["version"] == "2" and back.json()["workers"] == 2
    assert [(r["name"], r["version"]) for r in index] == [(MODEL, "2")]


def test_every_replica_of_the_deploy_manifests_gets_the_same_feedback_secret():
    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    pod = yaml.safe_load((deploy / "k8s" / "deployment.yaml").read_text())["spec"]["template"]
    isvc = next(yaml.safe_load_all((deploy / "kserve" / "inferenceservice.yaml").read_text()))
    for container in (pod["spec"]["containers"][0], isvc["spec"]["predictor"]["containers"][0]):
        env = {e["name"]: e for e in container["env"]}
        ref = env["SDDE_FEEDBACK_SECRET"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "sdde-serve-feedback", "key": "secret"}  # no "optional"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    assert compose["services"]["sdde"]["environment"]["SDDE_FEEDBACK_SECRET"] == (
        "${SDDE_FEEDBACK_SECRET:-}"  # unset: empty, which the server reads as "no secret"
    )


@pytest.fixture(autouse=True)
def _no_inherited_multiprocess_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
