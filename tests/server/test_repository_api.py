"""Repository mode in-process: routes by model name and version, version policy, the
repository API (pin, roll back, shadow, promote), auth, start-up checks. With --workers 2:
test_feedback_scale_out.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sdde_serve.engine import ModelLoadError
from sdde_serve.errors import UserError
from sdde_serve.server.app import create_app
from sdde_serve.server.cli import _preload, build_settings
from sdde_serve.server.repo_poll import poll_once
from sdde_serve.server.settings import Settings
from tests.server.conftest import gray_png, metric, scrape
from tests.server.test_repository import MODEL, add_version, versions  # noqa: F401 (fixture)

OTHER = "other"
PNG = {"content": gray_png(0), "headers": {"Content-Type": "image/png"}}


@pytest.fixture
def two_models(tmp_path: Path, versions: dict[str, Path]) -> Path:  # noqa: F811
    repo = tmp_path / "repo"
    add_version(repo, "1", versions["1"])
    add_version(repo, "2", versions["2"])
    add_version(repo, "4", versions["1"], name=OTHER)
    (repo / MODEL / "config.pbtxt").write_text('name: "digits"\n')  # Triton's files: ignored
    (repo / MODEL / "notes").mkdir()
    return repo


@contextmanager
def serve_repo(repo: Path, **settings) -> Iterator[TestClient]:
    app = create_app(Settings(model=repo, intra_op_threads=1, **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def version_of(client: TestClient, url: str = f"/v1/models/{MODEL}:predict") -> str:
    r = client.post(url, **PNG)
    assert r.status_code == 200, r.text
    return r.json()["version"]


def test_every_model_is_served_at_its_latest_version_by_name(two_models):
    with serve_repo(two_models) as client:
        extensions = client.get("/v2").json()["extensions"]
        digits = client.get(f"/v2/models/{MODEL}").json()
        other = client.get(f"/v2/models/{OTHER}/versions/4").json()
        ready = {
            path: client.get(path).status_code
            for path in (
                "/v2/health/ready",
                f"/v2/models/{MODEL}/ready",
                f"/v2/models/{MODEL}/versions/2/ready",
                f"/v2/models/{MODEL}/versions/1/ready",
                "/v2/models/nope/ready",
            )
        }
        v2_infer = client.post(
            f"/v2/models/{OTHER}/infer",
            json={"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                              "data": [0.5] * 64}]},
        )  # fmt: skip
        ambiguous = client.post("/v1/predict", **PNG)
        not_loaded = client.post(f"/v1/models/{MODEL}/versions/1:predict", **PNG)
        unknown = client.post("/v1/models/nope:predict", **PNG)
        assert version_of(client) == "2"
        assert version_of(client, f"/v1/models/{OTHER}:predict") == "4"
        samples = scrape(client.get("/metrics").text)
    assert extensions == ["binary_tensor_data", "model_repository"]
    assert digits["name"] == MODEL and digits["versions"] == ["2"]
    assert other["name"] == OTHER and other["versions"] == ["4"]
    assert ready == {
        "/v2/health/ready": 200,
        f"/v2/models/{MODEL}/ready": 200,
        f"/v2/models/{MODEL}/versions/2/ready": 200,
        f"/v2/models/{MODEL}/versions/1/ready": 404,
        "/v2/models/nope/ready": 404,
    }
    assert v2_infer.status_code == 200
    assert v2_infer.json()["model_name"] == OTHER and v2_infer.json()["model_version"] == "4"
    assert ambiguous.status_code == 400 and OTHER in ambiguous.json()["error"]
    assert not_loaded.status_code == 404 and "not loaded" in not_loaded.json()["error"]
    assert unknown.status_code == 404
    for name, version in ((MODEL, "2"), (OTHER, "4")):
        assert metric(samples, "sdde_model_ready", model=name) == 1
        assert metric(samples, "sdde_model_version_info", model=name, version=version,
                      role="serving") == 1  # fmt: skip
    assert metric(samples, "sdde_version_predictions_total", model=MODEL, version="2",
                  outcome="in_distribution") + metric(
        samples, "sdde_version_predictions_total", model=MODEL, version="2", outcome="ood_flagged"
    ) == 1  # fmt: skip


def test_pin_roll_forward_and_back_with_the_load_api(two_models):
    load = f"/v2/repository/models/{MODEL}/load"
    with serve_repo(two_models, pin=[f"{MODEL}:1"]) as client:
        assert version_of(client) == "1"
        latest = client.post(load, json={"parameters": {"version": "latest"}})
        assert version_of(client) == "2"
        back = client.post(load, json={"parameters": {"version": "1"}})
        assert version_of(client) == "1"
        again = client.post(load)  # keeps the pin: nothing to do
        missing = client.post(load, json={"parameters": {"version": "9"}})
        bad = client.post(load, json={"parameters": {"version": "two"}})
        nope = client.post("/v2/repository/models/nope/load")
        assert version_of(client) == "1"
        index = client.post("/v2/repository/index").json()
        ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
    assert latest.json() == {"name": MODEL, "version": "2", "state": "READY", "changed": True,
                             "previous": "1"}  # fmt: skip
    assert back.json()["version"] == "1" and back.json()["previous"] == "2"
    assert again.json()["changed"] is False
    assert missing.status_code == 404 and nope.status_code == 404
    assert bad.status_code == 422
    assert [(r["name"], r["version"], r["state"]) for r in index] == [
        (MODEL, "1", "READY"), (MODEL, "2", "UNAVAILABLE"), (OTHER, "4", "READY"),
    ]  # fmt: skip
    assert [(r["name"], r["version"]) for r in ready_only] == [(MODEL, "1"), (OTHER, "4")]


def test_shadow_set_through_the_api_goes_live_and_stops_shadowing(two_models):
    load = f"/v2/repository/models/{MODEL}/load"
    with serve_repo(two_models, pin=[f"{MODEL}:1"]) as client:
        shadow = client.post(load, json={"parameters": {"shadow": "2"}})
        self_shadow = client.post(load, json={"parameters": {"shadow": "1"}})
        assert version_of(client) == "1"
        assert version_of(client, f"/v1/models/{MODEL}/versions/2:predict") == "2"
        promote = client.post(load, json={"parameters": {"version": "2"}})
        assert version_of(client) == "2"
        index = client.post("/v2/repository/index", json={"ready": True}).json()
        samples = scrape(client.get("/metrics").text)
    assert shadow.status_code == 200 and shadow.json()["shadow"] == "2"
    assert self_shadow.status_code == 400 and "serving version" in self_shadow.json()["error"]
    assert promote.json()["changed"] is True
    assert [(r["version"], r.get("reason")) for r in index if r["name"] == MODEL] == [
        ("2", "serving")
    ]
    # version 2 was loaded as the shadow, then afresh as the live version (the shadow's batches
    # stay out of the live series)
    assert metric(samples, "sdde_model_loads_total", model=MODEL, version="2") == 2
    assert metric(samples, "sdde_model_version_info", model=MODEL, version="2", role="serving") == 1
    assert ("sdde_model_version_info", (("model", MODEL), ("role", "shadow"), ("version", "2"))) \
        not in samples  # fmt: skip


def test_repository_api_and_feedback_are_behind_the_api_key(two_models):
    auth = {"Authorization": "Bearer k1"}
    with serve_repo(two_models, api_keys=["k1"]) as client:
        paths = ["/v2/repository/index", f"/v2/repository/models/{MODEL}/load",
                 f"/v2/repository/models/{MODEL}/unload"]  # fmt: skip
        open_ = [client.post(p).status_code for p in paths]
        feedback = client.post("/v1/feedback", json=[{"id": "x", "label": 1}]).status_code
        keyed = client.post("/v2/repository/index", headers=auth).status_code
    assert open_ == [401, 401, 401] and feedback == 401 and keyed == 200


def test_a_plain_model_file_has_no_repository_api(linear_client):
    """The whole extension answers alike on a one-file server (GET /v2 does not list it): the
    index would list one model that load and unload could not act on."""
    answers = [
        linear_client.post(f"/v2/repository/models/linear-test/{action}")
        for action in ("load", "unload")
    ] + [linear_client.post("/v2/repository/index")]
    reasons = {r.json()["error"] for r in answers}
    assert [r.status_code for r in answers] == [400, 400, 400]
    assert len(reasons) == 1 and "needs `sdde serve REPO_DIR`" in reasons.pop()
    assert "model_repository" not in linear_client.get("/v2").json()["extensions"]
    assert linear_client.get("/v2/models/linear-test/ready").status_code == 200


def test_start_up_falls_back_below_a_corrupt_latest_version_and_checks_pins(
    tmp_path,
    versions,  # noqa: F811
    caplog,
):
    repo = tmp_path / "repo"
    add_version(repo, "1", versions["1"])
    add_version(repo, "2", versions["corrupt"])
    settings = Settings(model=repo, intra_op_threads=1)
    preloaded = _preload(settings)["preloaded"]
    assert list(preloaded.engines) == [MODEL] and preloaded.engines[MODEL][0] == "1"
    assert [(n, v) for n, v, _ in preloaded.refused] == [(MODEL, "2")]
    assert "model digits version 2 refused" in caplog.text
    # the app that starts from it counts and lists the refusal, and does not retry the same file
    with TestClient(create_app(settings, preloaded=preloaded)) as client:
        client.portal.call(poll_once, client.app.state.sdde.repository)  # type: ignore[attr-defined]
        samples = scrape(client.get("/metrics").text)
        index = client.post("/v2/repository/index").json()
        assert version_of(client) == "1"
    assert metric(samples, "sdde_model_load_failures_total", model=MODEL, version="2") == 1
    assert [(r["version"], r["state"], r.get("reason")) for r in index] == [
        ("1", "READY", "serving"), ("2", "UNAVAILABLE", "failed to load (see the log)")
    ]  # fmt: skip
    with pytest.raises(ModelLoadError, match="pinned version 2"):
        shutil.rmtree(repo / MODEL / "2")
        _preload(Settings(model=repo, pin=[f"{MODEL}:2"]))
    with pytest.raises(ModelLoadError, match="unknown models: nope"):
        _preload(Settings(model=repo, pin=["nope:1"]))
    with pytest.raises(ModelLoadError, match="--shadow digits:5: no such model version"):
        _preload(Settings(model=repo, shadow=[f"{MODEL}:5"]))
    with pytest.raises(UserError, match="need a model repository"):
        _preload(Settings(model=versions["1"], shadow=[f"{MODEL}:5"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no models"):
        _preload(Settings(model=empty))
    add_version(empty, "1", versions["corrupt"])
    with pytest.raises(ModelLoadError, match="no version loads"):
        _preload(Settings(model=empty))


def test_pin_and_shadow_flags_are_validated():
    import argparse

    for flag in ("pin", "shadow"):
        with pytest.raises(UserError, match="NAME:VERSION"):
            build_settings(argparse.Namespace(**{flag: ["digits"]}))
        with pytest.raises(UserError, match="NAME:VERSION"):
            build_settings(argparse.Namespace(**{flag: ["digits:latest"]}))
    s = build_settings(argparse.Namespace(pin=["a:1", "b.c:12"], shadow=["a:2"]))
    assert s.model_versions(s.pin) == {"a": "1", "b.c": "12"}
    assert Settings(_env_file=None, pin="a:1,b:2").pin == ["a:1", "b:2"]


def test_a_shadow_version_that_fails_to_load_leaves_live_serving_alone(two_models, versions):  # noqa: F811
    add_version(two_models, "3", versions["corrupt"])
    with serve_repo(two_models, pin=[f"{MODEL}:2"], shadow=[f"{MODEL}:3"]) as client:
        assert version_of(client) == "2"
        samples = scrape(client.get("/metrics").text)
    assert metric(samples, "sdde_model_load_failures_total", model=MODEL, version="3") == 1
    assert (
        metric(samples, "sdde_shadow_images_total", model=MODEL, version="3", live_version="2") == 0
    )


def test_an_unloaded_model_has_no_readiness_series_until_loaded_again(two_models):
    with serve_repo(two_models) as client:
        client.post(f"/v2/repository/models/{OTHER}/unload")
        unloaded = scrape(client.get("/metrics").text)
        still = client.get("/v2/health/ready").status_code
        client.post(f"/v2/repository/models/{OTHER}/load")
        loaded = scrape(client.get("/metrics").text)
    # a model unloaded on purpose must not look "not ready" (SddeModelNotReady would page)
    assert ("sdde_model_ready", (("model", OTHER),)) not in unloaded
    assert metric(unloaded, "sdde_model_ready", model=MODEL) == 1 and still == 200
    assert metric(loaded, "sdde_model_ready", model=OTHER) == 1
