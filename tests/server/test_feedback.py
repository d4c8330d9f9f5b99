"""Delayed labels: signed ids on every prediction, POST /v1/feedback, duplicate memory and age
limit, and the live accuracy / NLL / ECE / OOD-flag precision it exports (checked against hand
computations on the probabilities the predictions returned, within the ids' quantisation:
tokens.py). Across processes: test_feedback_scale.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdde_serve import calibration as cal
from sdde_serve.server.feedback import FeedbackItem, FeedbackStore, ForgedId, confidence_bin
from sdde_serve.server.lifecycle_metrics import ECE_BINS, LifecycleMetrics, bin_label
from sdde_serve.server.tokens import Signer
from tests.server.conftest import gray_png, metric, scrape, serve
from tests.server.test_app import multipart

MODEL, VERSION = "linear-test", "7"
KEY = {"model": MODEL, "version": VERSION}
# ids carry -ln p in steps of 1/2048: per image NLL within 1/4096, p within 0.025 % (tokens.py)
NLL_TOL = 1 / 4096
ECE_TOL = 5e-4


def hand_ece(conf: list[float], correct: list[bool], n_bins: int = 15) -> float:
    """ECE written out: bins (b/n, (b+1)/n], sum over bins of |bin| / N * |acc - mean conf|."""
    total = 0.0
    for b in range(n_bins):
        members = [i for i, c in enumerate(conf) if b / n_bins < c <= (b + 1) / n_bins]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - mean_conf)
    return total


def test_feedback_turns_into_accuracy_nll_ece_and_ood_precision(linear_engine):
    pngs = [gray_png(seed) for seed in range(10)]
    with serve(linear_engine) as client:
        answer = client.post("/v1/predict?probabilities=true", files=multipart(pngs)).json()
        preds = answer["predictions"]
        ids = [p["id"] for p in preds]
        # the constructed case: one flagged image labelled "none of the classes" (really OOD),
        # six of the others with their predicted class (right), three with the next one (wrong)
        flagged = [i for i, p in enumerate(preds) if p["is_ood"]]
        assert 1 < len(flagged) < 10  # the seeded case has both outcomes
        ood = flagged[-1]
        others = [i for i in range(10) if i != ood]
        right = others[:6]
        truth: list[int | None] = [
            p["label"] if i in right else (p["label"] + 1) % 4 for i, p in enumerate(preds)
        ]
        truth[ood] = None
        items = [{"id": i, "label": t} for i, t in zip(ids, truth, strict=True)]
        items[right[0]]["label"] = f"class{truth[right[0]]}"  # a class name works as well
        first = client.post("/v1/feedback", json=items)
        samples = scrape(client.get("/metrics").text)
        again = client.post("/v1/feedback", json=items[:2]).json()
        samples_again = scrape(client.get("/metrics").text)
    assert len(set(ids)) == 10
    assert first.status_code == 200
    assert first.json() == {
        "accepted": 10,
        "results": [{"id": i, "result": "accepted"} for i in ids],
    }
    probs = np.array([p["probabilities"] for p in preds])
    labelled = [i for i, t in enumerate(truth) if t is not None]
    conf = [float(probs[i].max()) for i in labelled]
    correct = [i in right for i in labelled]
    labels = np.array([truth[i] for i in labelled])
    accuracy = 6 / 9
    nll = -sum(math.log(probs[i, truth[i]]) for i in labelled) / 9
    ece = hand_ece(conf, correct)
    assert ece == pytest.approx(cal.ece(probs[labelled], labels), abs=1e-12)
    precision = sum(truth[i] is None for i in flagged) / len(flagged)

    # the process's own window
    assert metric(samples, "sdde_live_labelled", **KEY) == 10
    assert metric(samples, "sdde_live_accuracy", **KEY) == pytest.approx(accuracy)
    assert metric(samples, "sdde_live_nll", **KEY) == pytest.approx(nll, abs=NLL_TOL)
    assert metric(samples, "sdde_live_ece", **KEY) == pytest.approx(ece, abs=ECE_TOL)
    assert metric(samples, "sdde_live_ood_precision", **KEY) == pytest.approx(precision)
    # the counters Prometheus aggregates (the recording rules' inputs) give the same numbers
    in_dist = metric(samples, "sdde_feedback_labels_total", **KEY, truth="in_distribution")
    assert in_dist == 9
    assert metric(samples, "sdde_feedback_labels_total", **KEY, truth="ood") == 1
    assert metric(samples, "sdde_feedback_correct_total", **KEY) / in_dist == accuracy
    assert metric(samples, "sdde_feedback_nll_total", **KEY) / in_dist == pytest.approx(
        nll, abs=NLL_TOL
    )
    bins = [bin_label(b) for b in range(ECE_BINS)]
    counted_ece = sum(
        abs(
            metric(samples, "sdde_feedback_bin_confidence_total", **KEY, bin=b)
            - metric(samples, "sdde_feedback_bin_correct_total", **KEY, bin=b)
        )
        for b in bins
    ) / sum(metric(samples, "sdde_feedback_bin_images_total", **KEY, bin=b) for b in bins)
    assert counted_ece == pytest.approx(ece, abs=ECE_TOL)
    assert counted_ece == pytest.approx(metric(samples, "sdde_live_ece", **KEY), abs=1e-9)
    flags = {t: metric(samples, "sdde_feedback_flagged_total", **KEY, truth=t)
             for t in ("ood", "in_distribution")}  # fmt: skip
    assert flags["ood"] / sum(flags.values()) == pytest.approx(precision)
    # idempotent: the same labels again change nothing
    assert [r["result"] for r in again["results"]] == ["duplicate", "duplicate"]
    for name in ("sdde_live_accuracy", "sdde_feedback_correct_total", "sdde_live_labelled"):
        assert metric(samples_again, name, **KEY) == metric(samples, name, **KEY)
    assert metric(samples_again, "sdde_feedback_total", result="duplicate") == 2


def test_v2_ids_unknown_conflicting_and_invalid_labels_are_reported_not_failed(linear_engine):
    x = [0.5] * 64
    infer = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8],
                         "data": x + x}]}  # fmt: skip
    with serve(linear_engine) as client:
        r = client.post(f"/v2/models/{MODEL}/infer", json=infer).json()
        ids = r["parameters"]["prediction_ids"].split(",")
        results = client.post(
            "/v1/feedback",
            json=[
                {"id": ids[0], "label": 1},
                {"id": ids[0], "label": 2},
                {"id": ids[1], "label": 99},
                {"id": ids[1], "label": "no-such-class"},
                {"id": "f" * 32, "label": 1},
            ],
        ).json()
        forged = forge(ids[1])
        refused = [
            client.post("/v1/feedback", json=[{"id": ids[1], "label": 1}, {"id": bad, "label": 1}])
            for bad in (forged, ids[1][:-4], "not-a-token", "!!")
        ]
        after = client.post("/v1/feedback", json=[{"id": ids[1], "label": 1}]).json()
        bad = [
            client.post("/v1/feedback", json=body).status_code
            for body in ([], {"id": ids[1], "label": 1}, [{"id": ids[1]}], [{"label": 1}],
                         [{"id": "x" * 1025, "label": 1}], [{"id": ids[1], "label": 1.5}],
                         [{"id": ids[1], "label": True}])
        ]  # fmt: skip
        not_json = client.post(
            "/v1/feedback", content=b"\xff", headers={"Content-Type": "application/json"}
        )
        not_json_text = client.post(
            "/v1/feedback", content=b"id=1", headers={"Content-Type": "application/json"}
        )
    assert len(ids) == 2 and len(set(ids)) == 2
    assert [(x["result"], x.get("reason", "")) for x in results["results"]] == [
        ("accepted", ""),
        ("conflict", "already labelled 'class1'"),
        ("invalid", f"label 99 is not a class of {MODEL}"),
        ("invalid", f"label 'no-such-class' is not a class of {MODEL}"),
        ("unknown", "an unsigned id from an earlier sdde-serve: its prediction is not known"),
    ]
    assert results["accepted"] == 1
    assert bad == [422] * 7
    assert not_json.status_code == 400
    reason = "the request body is not valid JSON (or not a well-formed form): could not parse it"
    assert not_json.json() == {"error": reason}
    assert not_json_text.status_code == 400
    assert not_json_text.json() == {
        "error": "the request body is not valid JSON (parsing stopped at character 0)"
    }
    # an altered or foreign id refuses the whole call, nothing counted: the good item still is
    assert [r.status_code for r in refused] == [400] * 4
    reasons = [r.json()["error"] for r in refused]
    assert all(r.startswith("feedback item 1: the id is not a prediction id") for r in reasons)
    assert "signature mismatch" in reasons[0] and "signature mismatch" in reasons[1]
    assert after["results"][0]["result"] == "accepted"


def forge(token: str) -> str:
    """``token`` with its predicted class changed, signature kept: what a forger would try."""
    import base64

    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[14] ^= 1  # the predicted class's low byte (tokens._HEAD: >BI8sBHH)
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SECRET = b"a test secret of 32 characters.."


def make_store(**limits) -> tuple[FeedbackStore, Clock, LifecycleMetrics]:
    from prometheus_client import CollectorRegistry

    metrics = LifecycleMetrics(CollectorRegistry())
    clock = Clock()
    limits = {"max_size": 3, "max_age_s": 100.0, "window_s": 50.0, **limits}
    store = FeedbackStore(metrics, Signer(SECRET), clock=clock, **limits)
    return store, clock, metrics


def issue(store: FeedbackStore, probs: list[list[float]]) -> list[str]:
    return store.issue("m", "1", np.array(probs), [False] * len(probs))


def results(store: FeedbackStore, labels: dict[str, int | str | None]) -> list[str]:
    items = [FeedbackItem(id=i, label=label) for i, label in labels.items()]
    return [r.result for r in store.label(items, lambda m, v: ["a", "b"]).results]


def test_ids_expire_by_age_and_duplicates_are_remembered_up_to_the_size_limit():
    store, clock, metrics = make_store()
    old = issue(store, [[0.9, 0.1]])
    clock.now += 60
    p = issue(store, [[0.9, 0.1]] * 5)
    clock.now += 50  # `old` is 110 s old: past the age limit; the others 50 s
    assert results(store, {old[0]: 0, p[0]: 0, p[1]: "b", p[2]: None}) == [
        "expired", "accepted", "accepted", "accepted"
    ]  # fmt: skip
    assert results(store, {p[0]: "a", p[1]: 0, p[2]: None}) == [
        "duplicate",
        "conflict",
        "duplicate",
    ]
    assert metrics.store_size._value.get() == 3
    # a fourth labelled id pushes the oldest remembered one out: its label would count again
    assert results(store, {p[3]: 0, p[0]: 0}) == ["accepted", "accepted"]
    with pytest.raises(ForgedId, match=r"item 1: .*signature mismatch"):
        store.label([FeedbackItem(id=p[4], label=0), FeedbackItem(id=forge(p[4]), label=0)],
                    lambda m, v: None)  # fmt: skip
    assert results(store, {p[4]: "a"}) == ["accepted"]  # the refused call counted nothing


def test_another_secret_refuses_and_unknown_class_names_are_invalid():
    store, _, _ = make_store()
    (foreign,) = Signer(b"x" * 32).issue(
        "m", "1", 1000, [b"\0" * 8], [False], np.array([[0.6, 0.4]])
    )
    with pytest.raises(ForgedId, match="another feedback secret"):
        results(store, {foreign: 0})
    (pid,) = issue(store, [[0.6, 0.4]])
    answer = store.label([FeedbackItem(id=pid, label="a")], lambda m, v: None).results[0]
    assert answer.result == "invalid" and "send the class index" in (answer.reason or "")
    assert store.label([FeedbackItem(id=pid, label=1)], lambda m, v: None).results[0].result == (
        "accepted"
    )


def test_window_gauges_cover_only_recent_labels():
    store, clock, _ = make_store(max_size=10)
    a, b = issue(store, [[0.9, 0.1], [0.3, 0.7]])
    results(store, {a: 0})  # right, confidence 0.9
    clock.now += 30
    results(store, {b: 0})  # wrong, confidence 0.7
    both = store.window_stats()[("m", "1")]
    assert both["labelled"] == 2 and both["accuracy"] == 0.5
    assert both["ece"] == pytest.approx(hand_ece([0.9, 0.7], [True, False]), abs=ECE_TOL)
    clock.now += 30  # "a" was labelled 60 s ago: out of the 50 s window
    recent = store.window_stats()[("m", "1")]
    assert recent["labelled"] == 1 and recent["accuracy"] == 0.0
    assert recent["nll"] == pytest.approx(-math.log(0.3), abs=NLL_TOL)
    assert recent["ece"] == pytest.approx(0.7, rel=5e-4)
    clock.now += 100
    assert store.window_stats() == {}
    assert [m.samples for m in store.collect()] == [[]] * 5  # no stale values once empty


def test_confidence_bins_match_calibration_ece_bins():
    for conf in (1 / 15, 0.5, 1.0, 0.0001, 14 / 15 + 1e-9):
        expected = min(max(int(np.ceil(conf * 15)) - 1, 0), 14)
        assert confidence_bin(conf) == expected
    assert bin_label(0) == "0.0667" and bin_label(14) == "1.0000"


def test_remembering_no_labelled_ids_when_the_size_is_zero(linear_engine):
    with serve(linear_engine, feedback_max_size=0) as client:
        pred = client.post("/v1/predict", files=multipart([gray_png()])).json()["predictions"][0]
        body = [{"id": pred["id"], "label": 0}]
        first, again = (client.post("/v1/feedback", json=body).json() for _ in range(2))
    assert first["results"][0]["result"] == again["results"][0]["result"] == "accepted"


def test_window_sums_of_two_workers_merge_into_the_ratios_of_all_their_labels():
    from prometheus_client.core import GaugeMetricFamily

    from sdde_serve.server.live_window import WINDOW_SUMS, Row, merged_live_families, row_sums

    rng = np.random.default_rng(3)
    rows = [
        Row(0.0, "m", "1", int(t), bool(c), float(conf), float(nll), bool(f))
        for t, c, conf, nll, f in zip(rng.integers(-1, 3, 40), rng.random(40) < 0.7,
                                      rng.uniform(0.3, 1, 40), rng.uniform(0, 2, 40),
                                      rng.random(40) < 0.3, strict=True)
    ]  # fmt: skip
    merged = GaugeMetricFamily(WINDOW_SUMS, "", labels=["model", "version", "quantity"])
    totals: dict[str, float] = {}
    for half in (rows[:15], rows[15:]):  # each worker's own window: livesum adds them
        for quantity, value in row_sums(half)[("m", "1")].items():
            totals[quantity] = totals.get(quantity, 0.0) + value
    for quantity, value in totals.items():
        merged.add_metric(["m", "1", quantity], value)
    out = {f.name: f.samples[0].value for f in merged_live_families([merged]) if f.samples}
    known = [r for r in rows if r.truth >= 0]
    conf = np.array([r.confidence for r in known])
    correct = [r.correct for r in known]
    flagged = [r for r in rows if r.is_ood]
    assert WINDOW_SUMS not in out and out["sdde_live_labelled"] == 40
    assert out["sdde_live_accuracy"] == pytest.approx(np.mean(correct))
    assert out["sdde_live_nll"] == pytest.approx(np.mean([r.nll for r in known]))
    assert out["sdde_live_ece"] == pytest.approx(hand_ece(list(conf), correct))
    assert out["sdde_live_ood_precision"] == pytest.approx(np.mean([r.truth < 0 for r in flagged]))


def test_feedback_secret_from_the_environment_or_a_file(tmp_path):
    from sdde_serve.errors import UserError
    from sdde_serve.server.settings import Settings

    assert Settings(feedback_secret="").feedback_key() is None  # compose's unset ${VAR:-}
    assert Settings(feedback_secret=" a secret of 16+ chars\n").feedback_key() == (
        b"a secret of 16+ chars"
    )
    path = tmp_path / "secret"
    path.write_text("from a mounted secret file\n")
    assert Settings(feedback_secret_file=path).feedback_key() == b"from a mounted secret file"
    with pytest.raises(UserError, match="at least 16 characters"):
        Settings(feedback_secret="short").feedback_key()
    with pytest.raises(UserError, match="cannot read the feedback secret"):
        Settings(feedback_secret_file=tmp_path / "missing").feedback_key()
    assert "secret of" not in repr(Settings(feedback_secret="a secret of 16+ chars"))
    # --workers N: the workers get the secret itself, not pydantic's "**********"
    from sdde_serve.server.cli import settings_env

    env = settings_env(Settings(feedback_secret="a secret of 16+ chars"))
    assert env["SDDE_FEEDBACK_SECRET"] == "a secret of 16+ chars"


def test_running_window_sums_equal_the_sums_of_the_rows_still_in_the_window():
    from sdde_serve.server.live_window import LiveWindow, Row, row_sums

    clock = Clock()
    window = LiveWindow(50.0, clock, shared=False)
    rng = np.random.default_rng(5)
    rows = []
    for step in range(60):  # labels arrive over 120 s; the window keeps the last 50 s
        clock.now += 2.0
        truth, conf, nll = int(rng.integers(-1, 3)), rng.uniform(0.2, 1), rng.uniform(0, 3)
        row = Row(clock.now, "m", str(step % 2), truth, bool(step % 3), conf, nll, step % 5 == 0)
        rows.append(row)
        window.add(row)
        running = window.sums()
        recomputed = row_sums(r for r in rows if r.time >= clock.now - 50.0)
        assert running.keys() == recomputed.keys()
        for key, sums in recomputed.items():  # a bin emptied again stays in the running sums at 0
            for quantity in running[key].keys() | sums.keys():
                assert running[key].get(quantity, 0) == pytest.approx(sums.get(quantity, 0))
