"""``sdde eval --shift``: every cell recomputed in numpy on the hand-made linear ensemble, the
aggregates, determinism, the CLI (plots for the tiny trained model) and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdde_serve import calibration as cal
from sdde_serve.cli import main as sdde_main
from sdde_serve.data import ArrayDataset, load_dataset
from sdde_serve.engine import Engine
from sdde_serve.errors import UserError
from sdde_serve.evaluation import corruptions as corr
from sdde_serve.evaluation.evaluate import evaluate
from sdde_serve.evaluation.metrics import auroc
from sdde_serve.evaluation.shift import METRICS, ShiftConfig, evaluate_shift, shift_metrics
from tests.evaluation.helpers import check_png, labelled_npz, noise_npz
from tests.onnx_factory import reference_outputs

CONFIG = ShiftConfig(corruptions=("gaussian_noise", "contrast", "pixelate"), severities=(1, 4))


@pytest.fixture(scope="module")
def linear_shift(linear_model, tmp_path_factory: pytest.TempPathFactory):
    path, weights = linear_model
    d = tmp_path_factory.mktemp("shift_linear")
    data = load_dataset(str(labelled_npz(d / "id.npz", 200, 8, classes=4, seed=5)), split="test")
    engine = Engine(path, intra_op_threads=1)
    return engine, weights, data, evaluate_shift(engine, data, CONFIG, batch_size=64)


def test_shift_metrics_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([0, 1, 1, 0])  # row 1 is wrong
    scores = np.array([3.0, 0.5, 2.0, 1.0])
    m = shift_metrics(probs, labels, scores, threshold=1.5)
    assert m["accuracy"] == 0.75
    assert m["confidence"] == pytest.approx(np.mean([0.9, 0.6, 0.7, 0.8]))
    assert m["flag_rate"] == 0.5  # scores 0.5 and 1.0 are below 1.5
    assert m["auroc_correct"] == 1.0  # the one wrong answer has the lowest score
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    assert m["brier"] == pytest.approx(np.mean([0.02, 0.72, 0.18, 0.08]))
    assert m["ece"] == cal.ece(probs, labels, n_bins=15)
    # all correct: no errors to separate
    assert (
        shift_metrics(probs[[0, 2]], labels[[0, 2]], scores[[0, 2]], 1.5)["auroc_correct"] is None
    )


def test_every_cell_matches_numpy(linear_shift) -> None:
    engine, weights, data, shift = linear_shift
    t, thr = engine.manifest.temperature, engine.manifest.ood.threshold
    assert engine.manifest.ood.score == "mal"
    for name in CONFIG.corruptions:
        for s in CONFIG.severities:
            images = corr.corrupt(data.images, name, s, seed=0).astype(np.float32) / 255
            ref = reference_outputs(weights, images, 3, t)
            correct = ref["probs"].argmax(1) == data.labels
            cell = shift["per_corruption"][name][str(s)]
            assert cell["accuracy"] == pytest.approx(correct.mean())
            assert cell["confidence"] == pytest.approx(ref["probs"].max(1).mean(), rel=1e-5)
            assert cell["nll"] == pytest.approx(cal.nll(ref["probs"], data.labels), rel=1e-5)
            assert cell["ece"] == pytest.approx(cal.ece(ref["probs"], data.labels), abs=1e-5)
            assert cell["brier"] == pytest.approx(cal.brier(ref["probs"], data.labels), rel=1e-5)
            assert cell["flag_rate"] == pytest.approx(np.mean(ref["mal"] < thr), abs=1 / 200)
            expected = auroc(ref["mal"][correct], ref["mal"][~correct])
            assert cell["auroc_correct"] == pytest.approx(expected, abs=2e-3)


def test_clean_row_and_aggregates(linear_shift, linear_model) -> None:
    engine, _, data, shift = linear_shift
    ev = evaluate(engine, data, {})
    after = ev.metrics["classification"]["after"]
    for k in ("accuracy", "nll", "ece", "brier"):
        assert shift["clean"][k] == pytest.approx(after[k], rel=1e-6, abs=1e-9)
    assert shift["clean"]["flag_rate"] == pytest.approx(
        1 - ev.metrics["operating_point"]["id_acceptance"]
    )
    cells = shift["per_corruption"]
    for s in ("1", "4"):
        for k in METRICS:
            values = [cells[c][s][k] for c in CONFIG.corruptions if cells[c][s][k] is not None]
            assert shift["per_severity"][s][k] == pytest.approx(np.mean(values))
        assert shift["per_family"]["digital"][s]["accuracy"] == pytest.approx(
            np.mean([cells["contrast"][s]["accuracy"], cells["pixelate"][s]["accuracy"]])
        )
        assert shift["per_family"]["noise"][s] == cells["gaussian_noise"][s]
    every = [c["accuracy"] for by_sev in cells.values() for c in by_sev.values()]
    assert shift["mean"]["accuracy"] == pytest.approx(np.mean(every))
    assert shift["families"] == {"noise": ["gaussian_noise"], "digital": ["contrast", "pixelate"]}
    assert shift["n"] == 200 and shift["severities"] == [1, 4]


def test_deterministic_and_subsampled(linear_shift) -> None:
    engine, _, data, shift = linear_shift
    assert evaluate_shift(engine, data, CONFIG, batch_size=200) == shift
    other = evaluate_shift(engine, data, ShiftConfig(("gaussian_noise",), (4,), seed=1))
    assert (
        other["per_corruption"]["gaussian_noise"]["4"]
        != shift["per_corruption"]["gaussian_noise"]["4"]
    )
    small = evaluate_shift(engine, data, ShiftConfig(("contrast",), (1,), max_images=50))
    assert small["n"] == 50
    for bad in (ShiftConfig(("contrast",), (0, 1)), ShiftConfig(("snow",)), ShiftConfig(())):
        with pytest.raises(UserError):
            evaluate_shift(engine, data, bad)
    wrong = ArrayDataset("ten", data.images, data.labels + 6, [])
    with pytest.raises(UserError, match="the model has 4 classes"):
        evaluate_shift(engine, wrong, CONFIG)


def test_cli_shift_and_sweep_render_for_the_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    noise = noise_npz(tmp_path / "noise.npz", 40, 8, seed=1)
    out = tmp_path / "report"
    rc = sdde_main(
        [
            "eval",
            str(tiny_model),
            "--data",
            "digits@test",
            "--ood",
            f"noise={noise}",
            "--out-dir",
            str(out),
            "--cam-images",
            "0",
            "--threads",
            "1",
            "--shift",
            "--corruptions",
            "noise,contrast,glass_blur",
            "--severities",
            "1,5",
            "--shift-images",
            "120",
            "--members-sweep",
            "--val-data",
            "digits@train",
            "--sweep-subsets",
            "2",
        ]
    )
    assert rc == 0
    for name in ("shift_metrics", "shift_flag_rate", "members_sweep"):
        check_png(out / f"{name}.png")
    m = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    shift, sweep = m["shift"], m["members_sweep"]
    assert shift["corruptions"] == [
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "speckle_noise",
        "contrast",
        "glass_blur",
    ]
    assert shift["n"] == 120 and set(shift["per_severity"]) == {"1", "5"}
    assert sweep["k"] == [1, 2, 3] and sweep["temperature_refitted"]
    report = (out / "report.md").read_text()
    assert "## Corruption shift" in report and "## Members sweep" in report
    assert "![members_sweep](members_sweep.png)" in report


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shift", "--corruptions", "snow"], "unknown corruption 'snow'"),
        (["--shift", "--severities", "0,1"], "severities run from 1 to 5"),
        (["--shift", "--shift-images", "-1"], "--shift-images"),
        (["--val-data", "digits"], "--val-data is used only by --members-sweep"),
        (["--members-sweep", "--sweep-subsets", "0"], "--sweep-subsets"),
    ],
)
def test_bad_shift_and_sweep_arguments(linear_model, tmp_path: Path, capsys, extra, message):
    path, _ = linear_model
    id_spec = str(labelled_npz(tmp_path / "id.npz", 20, 8, classes=4))
    rc = sdde_main(["eval", str(path), "--data", id_spec, "--out-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o" / "metrics.json").exists()
