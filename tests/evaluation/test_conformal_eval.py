"""``sdde eval``: the ID false-flag rate at alpha next to the nominal one, and the QQ plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdde_serve import conformal
from sdde_serve.cli import main as sdde_main
from sdde_serve.data import load_dataset
from sdde_serve.engine import Engine
from sdde_serve.evaluation.conformal_eval import conformal_metrics, ks_uniform, markdown
from tests.evaluation.helpers import check_png, labelled_npz


def _ood_npz(path: Path, model: Path) -> Path:
    """The 40 lowest-MAL of 4000 noise images: out of distribution for the model."""
    x = np.random.default_rng(3).integers(0, 256, (4000, 1, 8, 8), dtype=np.uint8)
    mal = Engine(model).run(x.astype(np.float32) / 255).mal
    np.savez(path, images=x[np.argsort(mal)[:40]])
    return path


def test_eval_reports_the_false_flag_rate_and_the_qq_plot(
    conformal_model, tmp_path: Path, capsys
) -> None:
    model, _ = conformal_model
    # uniform noise, as the calibration images: exchangeable up to the 8-bit quantisation
    id_spec = str(labelled_npz(tmp_path / "id.npz", 1500, 8, classes=4, seed=8))
    ood_spec = str(_ood_npz(tmp_path / "odd.npz", model))
    out = tmp_path / "report"
    argv = [
        "eval",
        str(model),
        "--data",
        id_spec,
        "--ood",
        f"odd={ood_spec}",
        "--out-dir",
        str(out),
    ]
    assert sdde_main([*argv, "--cam-images", "0"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())["conformal"]

    engine = Engine(model)
    cal = engine.manifest.ood.calibration_scores
    x = load_dataset(id_spec, split="test").as_model_input(1, 8, 8)
    p = conformal.p_values(cal, engine.run(x).mal)
    a = m["at_alpha"]
    assert m["alpha"] == a["alpha"] == 0.05 and m["n_calibration"] == len(cal) and m["n_id"] == 1500
    assert a["id_false_flag_rate"] == (p < 0.05).mean()
    assert a["expected"] == conformal.expected_false_flag_rate(len(cal), 0.05)
    # exchangeable: within 4 noise sd of the exact rate
    assert abs(a["id_false_flag_rate"] - a["expected"]) < 4 * a["noise_sd"]
    assert a["ood_flag_rate"]["odd"] > 0.8
    assert [r["alpha"] for r in m["by_alpha"]] == [0.01, 0.1]  # the manifest's 0.05 once
    assert m["id_ks_uniform"] == ks_uniform(p) < 0.1
    check_png(out / "p_values_qq.png")
    assert "ID false-flag rate at alpha = 0.05" in printed
    report = (out / "report.md").read_text()
    assert "## Conformal p-values" in report
    section = report.split("## Conformal p-values")[1].split("\n## ")[0]
    alphas = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| 0")]
    assert alphas == ["0.05", "0.01", "0.1"]  # each once, the manifest's first


def test_ks_uniform_by_hand() -> None:
    # sorted 0.1, 0.5, 0.6: ECDF steps 1/3, 2/3, 1 -> gaps 1/3-0.1, 0.5-1/3, ...; max = 0.4 at 1.0
    assert np.isclose(ks_uniform(np.array([0.6, 0.1, 0.5])), max(1 / 3 - 0.1, 2 / 3 - 0.5, 0.4))


def test_a_model_without_calibration_scores_has_no_conformal_section(
    linear_model, tmp_path: Path, capsys
) -> None:
    model, _ = linear_model
    id_spec = str(labelled_npz(tmp_path / "id.npz", 50, 8, classes=4))
    out = tmp_path / "r"
    argv = ["eval", str(model), "--data", id_spec, "--out-dir", str(out), "--no-plots"]
    assert sdde_main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["conformal"] is None
    assert "p-values: none" in capsys.readouterr().out
    assert "stores no calibration scores" in (out / "report.md").read_text()


def test_each_alpha_is_reported_once_whatever_the_manifests(conformal_model) -> None:
    model, _ = conformal_model
    manifest = Engine(model).manifest
    scores = np.linspace(0.0, 1.0, 50)
    for alpha, others in ((0.05, [0.01, 0.1]), (0.02, [0.01, 0.05, 0.1]), (0.1, [0.01, 0.05])):
        ood = manifest.ood.model_copy(update={"id_acceptance": 1.0 - alpha})
        m = conformal_metrics(manifest.model_copy(update={"ood": ood}), scores, {})
        assert [r["alpha"] for r in [m["at_alpha"], *m["by_alpha"]]] == [alpha, *others]
        rows = [line for line in markdown(m) if line.startswith("| 0")]
        assert [row.split("|")[1].strip() for row in rows] == [f"{a:g}" for a in [alpha, *others]]
