"""Model repository, hot swaps, the repository API, unload drains, shadow scoring.

The lifecycle scenarios run against a real ``sdde serve REPO_DIR`` process on loopback, with
bounded load loops; routing and API details run in-process. Versions are hand-made linear
ensembles (different seeds: different answers), copied into a temporary repository.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.onnx_factory import make_linear_ensemble, reference_outputs
from tests.server.conftest import ServerProcess, decode, gray_png, metric, scrape

MODEL = "digits"
IMAGES = [gray_png(seed) for seed in range(12)]


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model files: "1" and "2" (different weights and thresholds) and "corrupt" (version 2
    with one weight changed after the manifest was written: its SHA-256 check fails)."""
    root = tmp_path_factory.mktemp("versions")
    x = np.stack([decode(png) for png in IMAGES])
    files = {}
    for version, seed in (("1", 0), ("2", 1)):
        _, weights = make_linear_ensemble(root / "probe.onnx", seed=seed)
        threshold = float(np.median(reference_outputs(weights, x, 3, 1.5)["mal"]))
        files[version], _ = make_linear_ensemble(
            root / f"v{version}.onnx", seed=seed, threshold=threshold
        )
    model = onnx.load(str(files["2"]))
    bias = next(t for t in model.graph.initializer if t.name == "b")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, "b"))
    files["corrupt"] = root / "corrupt.onnx"
    onnx.save(model, str(files["corrupt"]))
    return files


def add_version(repo: Path, version: str, source: Path, name: str = MODEL) -> None:
    """Copy under a hidden name, then rename: a poll never sees a half-written version."""
    staging = repo / name / f".tmp-{version}"
    staging.mkdir(parents=True)
    shutil.copyfile(source, staging / "model.onnx")
    staging.rename(repo / name / version)


def wait_until(done: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def predict_url(url: str, version: str | None = None) -> str:
    path = f"/v1/models/{MODEL}" + (f"/versions/{version}" if version else "") + ":predict"
    return url + path


def png_post(client: httpx.Client, url: str, png: bytes) -> httpx.Response:
    return client.post(url, content=png, headers={"Content-Type": "image/png"}, timeout=60)


def load_loop(url: str, out: list[tuple[int, str]], stop: threading.Event, limit: int) -> None:
    """Sequential requests on one keep-alive connection until ``stop`` (at most ``limit``)."""
    with httpx.Client() as client:
        for i in range(limit):
            if stop.is_set():
                return
            r = png_post(client, predict_url(url), IMAGES[i % len(IMAGES)])
            out.append((r.status_code, r.json().get("version", "") if r.status_code == 200 else ""))


def metrics_of(url: str) -> dict:
    return scrape(httpx.get(url + "/metrics", timeout=10).text)


@pytest.fixture
def repo(tmp_path: Path, versions: dict[str, Path]) -> Path:
    root = tmp_path / "repo"
    add_version(root, "1", versions["1"])
    return root


# --- real server processes --------------------------------------------------------------------


def test_a_new_version_switches_in_under_load_and_a_corrupt_one_is_refused(repo, versions):
    server = ServerProcess(repo, "--max-queue-delay-ms", "1")
    try:
        server.wait_ready()
        results: list[list[tuple[int, str]]] = [[] for _ in range(4)]
        stop = threading.Event()
        threads = [
            threading.Thread(target=load_loop, args=(server.url, out, stop, 2000))
            for out in results
        ]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: all(len(r) >= 5 for r in results), what="the load loop")
            add_version(repo, "2", versions["2"])
            load = httpx.post(server.url + f"/v2/repository/models/{MODEL}/load", timeout=60)
            marks = [len(r) for r in results]
            wait_until(
                lambda: all(len(r) >= m + 5 for r, m in zip(results, marks, strict=True)),
                what="requests after the switch",
            )
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert load.status_code == 200, load.text
        assert load.json() | {"state": "READY"} == {
            "name": MODEL, "version": "2", "state": "READY", "changed": True, "previous": "1"
        }  # fmt: skip
        for answers in results:
            assert {status for status, _ in answers} == {200}  # 0 failed requests
            seen = [version for _, version in answers]
            switch = seen.index("2")  # each client switches once, from 1 to 2, and stays
            assert switch > 0 and set(seen[:switch]) == {"1"} and set(seen[switch:]) == {"2"}

        # a corrupt version 3 is refused: version 2 keeps serving; log, response and metric say so
        add_version(repo, "3", versions["corrupt"])
        refused = httpx.post(server.url + f"/v2/repository/models/{MODEL}/load", timeout=60)
        with httpx.Client() as client:
            after = png_post(client, predict_url(server.url), IMAGES[0])
        samples = metrics_of(server.url)
        index = httpx.post(server.url + "/v2/repository/index", timeout=10).json()
        log = server.output()
    finally:
        server.stop()
    assert refused.status_code == 400
    reason = refused.json()["error"]
    assert "version 3" in reason and "SHA-256" in reason and "version 2 stays in service" in reason
    assert after.status_code == 200 and after.json()["version"] == "2"
    assert metric(samples, "sdde_model_load_failures_total", model=MODEL, version="3") == 1
    assert metric(samples, "sdde_model_loads_total", model=MODEL, version="2") == 1
    assert metric(samples, "sdde_model_version_info", model=MODEL, version="2", role="serving") == 1
    retired = ("sdde_model_version_info", (("model", MODEL), ("role", "serving"), ("version", "1")))
    assert retired not in samples
    assert metric(samples, "sdde_model_ready", model=MODEL) == 1
    states = {row["version"]: row for row in index}
    assert states["2"]["state"] == "READY" and states["1"]["state"] == "UNAVAILABLE"
    assert states["3"]["state"] == "UNAVAILABLE" and "failed" in states["3"]["reason"]
    assert "model digits version 3 refused" in log and "SHA-256" in log


def test_poll_picks_up_new_versions_and_retries_a_refused_one_only_when_it_changes(repo, versions):
    server = ServerProcess(repo, "--poll-repo", "0.2")
    try:
        server.wait_ready()
        with httpx.Client() as client:

            def serving() -> str:
                return png_post(client, predict_url(server.url), IMAGES[0]).json()["version"]

            assert serving() == "1"
            add_version(repo, "2", versions["2"])
            wait_until(lambda: serving() == "2", what="the poll to switch to version 2")
            add_version(repo, "3", versions["corrupt"])
            wait_until(
                lambda: metric(
                    metrics_of(server.url), "sdde_model_load_failures_total", model=MODEL,
                    version="3",
                ) == 1,
                what="version 3 to be refused",
            )  # fmt: skip
            polls_later = time.monotonic() + 1.0  # five more polls: the same file isn't retried
            while time.monotonic() < polls_later:
                assert serving() == "2"
                time.sleep(0.1)
            failures = metric(
                metrics_of(server.url), "sdde_model_load_failures_total", model=MODEL, version="3"
            )
            # the operator replaces the file: the poll tries again and switches
            shutil.copyfile(versions["1"], repo / MODEL / "3" / "model.onnx")
            wait_until(lambda: serving() == "3", what="the repaired version 3")
    finally:
        server.stop()
    assert failures == 1


def test_unload_drains_in_flight_requests(repo):
    server = ServerProcess(repo)
    try:
        server.wait_ready()
        body = json.dumps({"images": [base64.b64encode(IMAGES[0]).decode()]})
        half = len(body) // 2
        sending = threading.Event()
        slow: dict[str, object] = {}

        def slow_body():
            yield body[:half].encode()
            sending.set()
            time.sleep(1.0)  # the request is in flight (it holds version 1) while unload starts
            yield body[half:].encode()

        def slow_request() -> None:
            r = httpx.post(
                predict_url(server.url), content=slow_body(),
                headers={"Content-Type": "application/json"}, timeout=60,
            )  # fmt: skip
            slow["response"], slow["done"] = r, time.monotonic()

        thread = threading.Thread(target=slow_request)
        thread.start()
        assert sending.wait(30)

        def in_flight() -> int:
            rows = httpx.post(server.url + "/v2/repository/index", timeout=10).json()
            return sum(r.get("in_flight", 0) for r in rows)

        wait_until(lambda: in_flight() == 1, what="the slow request to hold its version")
        unload = httpx.post(server.url + f"/v2/repository/models/{MODEL}/unload", timeout=60)
        unloaded_at = time.monotonic()
        thread.join(60)
        with httpx.Client() as client:
            gone = png_post(client, predict_url(server.url), IMAGES[0])
        ready = httpx.get(server.url + f"/v2/models/{MODEL}/ready", timeout=10)
        reload = httpx.post(server.url + f"/v2/repository/models/{MODEL}/load", timeout=60)
        with httpx.Client() as client:
            back = png_post(client, predict_url(server.url), IMAGES[0])
    finally:
        server.stop()
    response = slow["response"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200 and response.json()["version"] == "1"
    assert unload.status_code == 200, unload.text
    assert unload.json() == {"name": MODEL, "unloaded": ["1"], "drained_requests": 1}
    assert slow["done"] <= unloaded_at  # unload answered only once the request was done
    assert gone.status_code == 404 and "unloaded" in gone.json()["error"]
    assert ready.status_code == 404
    assert reload.status_code == 200 and back.json()["version"] == "1"


def _strip_ids(body: bytes) -> bytes:
    data = json.loads(body)
    for p in data.get("predictions", []):
        p.pop("id")
    data.get("parameters", {}).pop("prediction_ids", None)
    return json.dumps(data).encode()


def test_shadow_scoring_counts_agreement_and_never_changes_responses(tmp_path, versions):
    repo = tmp_path / "repo"
    add_version(repo, "1", versions["1"])
    add_version(repo, "2", versions["2"])
    pinned = ("--pin", f"{MODEL}:1")
    plain = ServerProcess(repo, *pinned)
    shadowed = ServerProcess(repo, *pinned, "--shadow", f"{MODEL}:2")
    x = np.stack([decode(png) for png in IMAGES[:4]])
    infer = {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                    "data": x.reshape(-1).tolist()}],
    }  # fmt: skip
    try:
        plain.wait_ready()
        shadowed.wait_ready()
        bodies: dict[str, list[bytes]] = {}
        for server in (plain, shadowed):
            with httpx.Client() as client:
                answers = [png_post(client, predict_url(server.url), png) for png in IMAGES]
                answers.append(
                    client.post(server.url + f"/v2/models/{MODEL}/infer", json=infer, timeout=60)
                )
            assert all(r.status_code == 200 for r in answers)
            bodies[server.url] = [r.content for r in answers]
        # what the candidate answers on its own (loaded as the shadow, it can be named; requests
        # naming it are not shadow-scored themselves)
        with httpx.Client() as client:
            own = [png_post(client, predict_url(shadowed.url, "2"), png).json() for png in IMAGES]
        key = {"model": MODEL, "version": "2", "live_version": "1"}
        total = len(IMAGES) + len(x)
        wait_until(
            lambda: metric(metrics_of(shadowed.url), "sdde_shadow_images_total", **key) >= total,
            what="shadow scoring",
        )
        samples = metrics_of(shadowed.url)
        plain_samples = metrics_of(plain.url)
    finally:
        plain.stop()
        shadowed.stop()
    assert [_strip_ids(b) for b in bodies[plain.url]] == [
        _strip_ids(b) for b in bodies[shadowed.url]
    ]  # byte-identical apart from the fresh ids
    assert all(json.loads(b)["version"] == "1" for b in bodies[shadowed.url][:-1])

    # expected counts from each version's own answers: the 12 PNGs, then the same first 4
    # images once more as the v2 tensor
    p1 = [json.loads(b)["predictions"][0] for b in bodies[shadowed.url][:-1]]
    p2 = [a["predictions"][0] for a in own]
    tensor = {o["name"]: o["data"] for o in json.loads(bodies[shadowed.url][-1])["outputs"]}
    assert tensor["label"] == [a["label"] for a in p1[:4]]  # the same images, the same answers
    assert tensor["is_ood"] == [a["is_ood"] for a in p1[:4]]
    scored = p1 + p1[:4], p2 + p2[:4]  # (live, candidate) per shadow-scored image
    same_label = sum(a["label"] == b["label"] for a, b in zip(*scored, strict=True))
    same_flag = sum(a["is_ood"] == b["is_ood"] for a, b in zip(*scored, strict=True))
    assert 0 < same_label < total and 0 < same_flag < total  # a non-trivial case
    assert metric(samples, "sdde_shadow_images_total", **key) == total
    assert metric(samples, "sdde_shadow_label_agreement_total", **key) == same_label
    assert metric(samples, "sdde_shadow_ood_agreement_total", **key) == same_flag
    assert metric(samples, "sdde_shadow_ood_flagged_total", **key, side="candidate") == sum(
        b["is_ood"] for b in scored[1]
    )
    assert metric(samples, "sdde_shadow_ood_flagged_total", **key, side="live") == sum(
        a["is_ood"] for a in scored[0]
    )
    assert metric(samples, "sdde_shadow_duration_seconds_count", model=MODEL, version="2") == (
        len(IMAGES) + 1
    )
    assert metric(samples, "sdde_model_version_info", model=MODEL, version="2", role="shadow") == 1
    # the live series count live traffic only: the shadow's engine calls are not in them
    assert metric(samples, "sdde_batch_size_sum", model=MODEL) == total
    assert metric(plain_samples, "sdde_batch_size_sum", model=MODEL) == total
    assert metric(plain_samples, "sdde_shadow_images_total", **key) == 0
