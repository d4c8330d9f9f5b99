"""`sdde eval` end to end: metrics.json, report.md and the plots.

The hand-made linear ensemble (tests/onnx_factory.py) checks every number against a numpy
recomputation; the tiny trained LeNet ensemble checks that the report renders with all plots,
CAM overlays included (LeNet exports carry no ``cams`` output, so the maps come from GradCAM on
the checkpoint, as the MNIST benchmark does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sdde_serve import calibration as cal
from sdde_serve.cli import main as sdde_main
from sdde_serve.data import load_dataset
from sdde_serve.evaluation.diversity import diversity_metrics
from sdde_serve.evaluation.metrics import ood_metrics
from tests.evaluation.helpers import check_png, labelled_npz, noise_npz, texture_npz
from tests.onnx_factory import reference_outputs

OOD_KEYS = {"auroc", "aupr_in", "aupr_out", "fpr95"}
SCORE_KEYS = {"mal", "msp", "msp_avg_logits", "minmax"}


@pytest.fixture(scope="module")
def linear_report(linear_model, tmp_path_factory: pytest.TempPathFactory):
    path, weights = linear_model
    d = tmp_path_factory.mktemp("eval_linear")
    id_spec = str(labelled_npz(d / "id.npz", 300, 8, classes=4, seed=1))
    noise = str(noise_npz(d / "noise.npz", 120, 8, seed=2, high=90))
    tex = str(texture_npz(d / "tex.npz", 90, 8, seed=3))
    out = d / "out"
    rc = sdde_main(
        [
            "eval",
            str(path),
            "--data",
            id_spec,
            "--ood",
            f"noise={noise}",
            "--ood",
            f"tex={tex}",
            "--group",
            "far=noise,tex",
            "--group",
            "near=tex",
            "--out-dir",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "path": path,
        "weights": weights,
        "out": out,
        "metrics": metrics,
        "specs": {"id": id_spec, "noise": noise, "tex": tex},
    }


def _outputs(rep, spec: str, split: str = "test") -> tuple[dict, np.ndarray | None]:
    data = load_dataset(spec, split=split)
    t = rep["metrics"]["model"]["temperature"]
    ref = reference_outputs(rep["weights"], data.as_model_input(1, 8, 8), 3, t)
    return ref, data.labels


def test_classification_matches_numpy(linear_report) -> None:
    ref, labels = _outputs(linear_report, linear_report["specs"]["id"])
    m = linear_report["metrics"]["classification"]
    t = linear_report["metrics"]["model"]["temperature"]
    assert t == 1.5
    for when, temp in (("before", 1.0), ("after", t)):
        probs = cal.ensemble_probs(ref["logits"], temp)
        assert m[when]["accuracy"] == pytest.approx(cal.accuracy(probs, labels), abs=1e-9)
        assert m[when]["nll"] == pytest.approx(cal.nll(probs, labels), rel=1e-4)
        assert m[when]["ece"] == pytest.approx(cal.ece(probs, labels, 15), abs=1e-4)
        assert m[when]["brier"] == pytest.approx(cal.brier(probs, labels), rel=1e-4)
    members = (ref["logits"].argmax(2) == labels[:, None]).mean(0)
    np.testing.assert_allclose(m["members"]["accuracy"], members)


def test_ood_metrics_match_numpy(linear_report) -> None:
    m = linear_report["metrics"]
    ref_id, labels = _outputs(linear_report, linear_report["specs"]["id"])
    per_set = {}
    for name in ("noise", "tex"):
        ref, _ = _outputs(linear_report, linear_report["specs"][name])
        assert set(m["ood"]["sets"][name]) == SCORE_KEYS
        for score in ("mal", "msp"):
            expected = ood_metrics(ref_id[score], ref[score])
            got = m["ood"]["sets"][name][score]
            assert got == pytest.approx(expected, abs=1e-3)  # float32 graph vs float64 numpy
        minmax = ood_metrics(ref_id["logits"].max(2).min(1), ref["logits"].max(2).min(1))
        assert m["ood"]["sets"][name]["minmax"] == pytest.approx(minmax, abs=1e-3)
        per_set[name] = m["ood"]["sets"][name]
    for score in SCORE_KEYS:
        for k in OOD_KEYS:
            far = m["ood"]["groups"]["far"][score][k]
            assert far == pytest.approx((per_set["noise"][score][k] + per_set["tex"][score][k]) / 2)
            assert m["ood"]["groups"]["near"][score][k] == pytest.approx(per_set["tex"][score][k])
    assert m["groups"] == {"far": ["noise", "tex"], "near": ["tex"], "all": ["noise", "tex"]}
    div = diversity_metrics(ref_id["logits"], labels)
    assert m["diversity"]["id"] == pytest.approx(div, abs=1e-6)
    # the deployed rule, OOD when mal < threshold (0.5 in the hand-made manifest)
    op = m["operating_point"]
    assert op["score"] == "mal" and op["threshold"] == 0.5
    assert op["id_acceptance"] == pytest.approx(np.mean(ref_id["mal"] >= 0.5), abs=1e-9)
    assert max(m["graph_check"].values()) < 1e-4


def test_files_and_conventions(linear_report) -> None:
    out = linear_report["out"]
    for name in ("reliability", "hist_mal", "hist_msp", "roc_mal", "roc_msp"):
        check_png(out / f"{name}.png")
    assert not (out / "cams.png").exists()  # the linear graph has no cams
    assert linear_report["metrics"]["cams"] is None
    report = (out / "report.md").read_text()
    assert "in-distribution is the positive class" in report
    assert "![roc_mal](roc_mal.png)" in report
    assert "| **far** (mean of noise, tex) |" in report
    # metrics.json is strict JSON (NaN would be written as null)
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_no_plots_needs_no_matplotlib(linear_model, tmp_path: Path) -> None:
    path, _ = linear_model
    id_spec = str(labelled_npz(tmp_path / "id.npz", 50, 8, classes=4))
    rc = sdde_main(
        ["eval", str(path), "--data", id_spec, "--no-plots", "--out-dir", str(tmp_path / "o")]
    )
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["metrics.json", "report.md"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ood", "noequals"], "expected NAME=SPEC"),
        (["--ood", "a=X", "--ood", "a=Y"], "given twice"),
        (["--ood", "a=X", "--group", "near=a,b"], "unknown OOD set(s) b"),
        (["--ood", "a=/no/such/dir"], "no such file or directory"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_arguments_are_clear_errors(
    linear_model, tmp_path: Path, capsys, extra, message
) -> None:
    path, _ = linear_model
    id_spec = str(labelled_npz(tmp_path / "id.npz", 20, 8, classes=4))
    extra = [e.replace("=X", f"={id_spec}").replace("=Y", f"={id_spec}") for e in extra]
    rc = sdde_main(["eval", str(path), "--data", id_spec, "--out-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_unlabelled_or_mismatched_id_data(linear_model, tmp_path: Path, capsys) -> None:
    path, _ = linear_model
    unlabelled = str(noise_npz(tmp_path / "u.npz", 10, 8))
    assert (
        sdde_main(["eval", str(path), "--data", unlabelled, "--out-dir", str(tmp_path / "o")]) == 2
    )
    assert "needs labels" in capsys.readouterr().err
    ten_classes = str(labelled_npz(tmp_path / "ten.npz", 40, 8, classes=10, seed=4))
    assert (
        sdde_main(["eval", str(path), "--data", ten_classes, "--out-dir", str(tmp_path / "o")]) == 2
    )
    assert "the model has 4 classes" in capsys.readouterr().err
    assert (
        sdde_main(
            [
                "eval",
                str(tmp_path / "missing.onnx"),
                "--data",
                ten_classes,
                "--out-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no such model file" in capsys.readouterr().err


# --- the tiny trained model --------------------------------------------------------------------


def _in_range(value: float | None, lo: float, hi: float) -> bool:
    return value is not None and math.isfinite(value) and lo - 1e-9 <= value <= hi + 1e-9


def test_tiny_model_report_with_all_plots(tiny_model: Path, tiny_run: Path, tmp_path: Path) -> None:
    from sdde_serve.engine import Engine
    from sdde_serve.evaluation.evaluate import evaluate
    from sdde_serve.evaluation.report import write_report
    from training.cams import cam_fn_from_run

    engine = Engine(tiny_model, intra_op_threads=1)
    cam_fn = cam_fn_from_run(tiny_run, temperature=engine.manifest.temperature)
    size = engine.input_shape[1]
    ood = {
        "noise": load_dataset(str(noise_npz(tmp_path / "noise.npz", 60, 8, seed=5))),
        "textures": load_dataset(str(texture_npz(tmp_path / "tex.npz", 60, 8, seed=6))),
    }
    ev = evaluate(
        engine,
        load_dataset("digits", split="test"),
        ood,
        groups={"far": ["noise", "textures"]},
        id_spec="digits",
        cam_images=32,
        cam_fn=cam_fn,
    )
    written = write_report(ev, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {
        "metrics.json",
        "report.md",
        "reliability.png",
        "hist_mal.png",
        "hist_msp.png",
        "roc_mal.png",
        "roc_msp.png",
        "hist_knn.png",  # the deployed score is plotted too
        "roc_knn.png",
        "cams.png",
        "p_values_qq.png",
    }
    for p in written:
        if p.suffix == ".png":
            check_png(p)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(m) >= {
        "schema",
        "model",
        "conventions",
        "data",
        "groups",
        "classification",
        "ood",
        "operating_point",
        "diversity",
        "cams",
        "graph_check",
    }
    assert m["model"]["members"] == 3 and size == 28
    assert m["data"]["id"]["n"] == len(load_dataset("digits", split="test"))
    for when in ("before", "after"):
        c = m["classification"][when]
        assert _in_range(c["accuracy"], 0, 1) and _in_range(c["ece"], 0, 1)
        assert _in_range(c["nll"], 0, 50) and _in_range(c["brier"], 0, 2)
    assert len(m["classification"]["members"]["accuracy"]) == 3
    assert m["classification"]["after"]["accuracy"] > 0.3  # trained, if only for a few steps
    for block in (*m["ood"]["sets"].values(), *m["ood"]["groups"].values()):
        assert set(block) == SCORE_KEYS | {"knn"}  # the tiny model has a KNN bank
        for score in block.values():
            assert set(score) == OOD_KEYS and all(_in_range(v, 0, 1) for v in score.values())
    d = m["diversity"]["id"]
    assert _in_range(d["disagreement"], 0, 1) and _in_range(d["double_fault"], 0, 1)
    assert _in_range(d["mutual_information"], 0, math.log(3))
    for k in ("q_statistic", "correlation"):
        assert d[k] is None or _in_range(d[k], -1, 1)
    cams = m["cams"]
    assert cams["source"] == "checkpoint" and cams["images_per_set"] == 32
    assert cams["map_size"] == [5, 5]  # LeNet conv2 at 28x28
    assert all(_in_range(v, -1, 1) for v in (cams["id"], *cams["ood"].values()))
    assert max(m["graph_check"].values()) < 1e-4


def _with_cams_output(src: Path, dst: Path) -> Path:
    """The linear ensemble plus a ``cams`` output: every member's "CAM" is the normalised image
    (so all members agree and the mean pairwise cosine is exactly 1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdde_serve.manifest import read_manifest, weights_sha256, write_manifest

    model = onnx.load(str(src))
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "cam_reps"))
    g.node.append(helper.make_node("Tile", ["normed", "cam_reps"], ["cams"]))
    g.output.append(helper.make_tensor_value_info("cams", TensorProto.FLOAT, ["batch", 3, 8, 8]))
    manifest = read_manifest(model)
    manifest = manifest.model_copy(
        update={"outputs": [*manifest.outputs, "cams"], "weights_sha256": weights_sha256(model)}
    )
    write_manifest(model, manifest)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return dst


def test_cams_from_the_graph(linear_model, tmp_path: Path) -> None:
    from sdde_serve.engine import Engine
    from sdde_serve.evaluation.evaluate import evaluate
    from sdde_serve.evaluation.report import write_report

    path = _with_cams_output(linear_model[0], tmp_path / "cams.onnx")
    engine = Engine(path, intra_op_threads=1)
    assert engine.has_cams
    id_data = load_dataset(str(labelled_npz(tmp_path / "id.npz", 40, 8, classes=4)))
    ood = {"tex": load_dataset(str(texture_npz(tmp_path / "tex.npz", 30, 8, seed=1)))}
    ev = evaluate(engine, id_data, ood, cam_images=10)
    cams = ev.metrics["cams"]
    assert cams["source"] == "graph" and cams["images_per_set"] == 10
    assert cams["map_size"] == [8, 8]
    assert cams["id"] == pytest.approx(1.0, abs=1e-5)
    assert cams["ood"]["tex"] == pytest.approx(1.0, abs=1e-5)
    # the overlays show the same seeded images the similarity was computed on
    x = id_data.as_model_input(1, 8, 8)
    idx = np.sort(np.random.default_rng(0).permutation(len(x))[:10])
    np.testing.assert_array_equal(ev.id_set.cam_images, x[idx])
    written = write_report(ev, tmp_path / "out")
    check_png(tmp_path / "out" / "cams.png")
    assert tmp_path / "out" / "cams.png" in written


def test_the_old_output_flag_still_works_and_warns(linear_model, tmp_path: Path, capsys) -> None:
    """``-o`` names an output file everywhere else; eval's directory is ``--out-dir`` now
    (CHANGELOG.md). The old spellings keep working for a while, with a warning."""
    path, _ = linear_model
    id_spec = str(labelled_npz(tmp_path / "id.npz", 50, 8, classes=4))
    base = ["eval", str(path), "--data", id_spec, "--no-plots"]
    assert sdde_main([*base, "-o", str(tmp_path / "a")]) == 0
    assert "-o is deprecated and will be removed; use --out-dir" in capsys.readouterr().err
    assert sdde_main([*base, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "metrics.json").exists() and (tmp_path / "b" / "report.md").exists()
    assert sdde_main(base) == 2
    assert "--out-dir DIR" in capsys.readouterr().err
