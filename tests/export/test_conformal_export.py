"""Export and ``sdde calibrate`` record the temperature rule and the conformal calibration set."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from sdde_serve import conformal
from sdde_serve.cli import main as sdde_main
from sdde_serve.data import load_dataset
from sdde_serve.engine import Engine
from sdde_serve.scoring import deployed_score
from sdde_serve.temperature import choose_temperature


def test_export_stores_the_sorted_validation_scores_and_the_rule(tiny_run, tiny_model) -> None:
    from training.run import load_run

    engine = Engine(tiny_model)
    m = engine.manifest
    run = load_run(tiny_run)
    out = engine.run_batches(run.val.as_model_input(1, 28, 28))
    # the calibration set is the graph's own deployed score on the validation split, sorted
    assert m.ood.calibration_scores == conformal.sorted_scores(deployed_score(out, m))
    assert m.ood.threshold == conformal.threshold_for_alpha(m.ood.calibration_scores, 0.05)
    # the rule's evidence is what choose_temperature finds on the same logits
    d = choose_temperature(out.logits, run.val.labels)
    rule = m.calibration.rule
    assert rule is not None and rule.applied == d.applied and rule.reason == d.reason
    assert m.temperature == d.temperature and rule.fitted == d.fitted
    assert [f.temperature for f in rule.folds] == [f.temperature for f in d.folds]
    assert rule.errors == d.errors and rule.gain_interval == list(d.gain_interval)


def test_calibrate_cli_prints_the_rule_and_refits_the_calibration_set(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "model.onnx"
    shutil.copy(tiny_model, path)
    assert sdde_main(["calibrate", str(path), "--data", "digits@test"]) == 0
    printed = capsys.readouterr().out
    engine = Engine(path)
    m = engine.manifest
    assert f"T rule       {m.calibration.rule.reason}" in printed
    assert "p-value < alpha = 0.05" in printed
    test = load_dataset("digits@test")
    assert len(m.ood.calibration_scores) == len(test) == m.calibration.n
    scores = deployed_score(engine.run_batches(test.as_model_input(1, 28, 28)), m)
    assert m.ood.calibration_scores == conformal.sorted_scores(scores)
    flagged = (conformal.p_values(m.ood.calibration_scores, scores) < 0.05).sum()
    assert flagged == (scores < m.ood.threshold).sum()
    # j = ceil(0.05 * 360) - 1 = 17 scores lie below the threshold, fewer where scores tie with it
    assert flagged <= conformal.flag_index(len(test), 0.05) == 17
    assert np.isfinite(m.ood.threshold)
