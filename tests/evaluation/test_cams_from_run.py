"""``sdde eval --cams-from-run``: CAM similarity for graphs without a ``cams`` output.

The maps come from ``training.cams`` (GradCAM at the training saliency layer on the run's
checkpoint, for the class of the graph's calibrated ``probs``); they are checked equal to
``training.saliency.gradcam`` with the graph's own argmax, and the CLI's numbers are recomputed
from those reference maps on the same seeded image subset.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdde_serve.cli import main as sdde_main
from sdde_serve.data import load_dataset
from sdde_serve.evaluation import cams as cam_metrics
from sdde_serve.evaluation.evaluate import CAM_SEED
from tests.evaluation.helpers import check_png, noise_npz

CAM_IMAGES = 16


def _reference_cams(run_dir: Path, engine, x: np.ndarray) -> np.ndarray:
    """``training.saliency.gradcam`` for the class the exported graph's ``probs`` pick."""
    import torch

    from training.run import load_run
    from training.saliency import gradcam

    classes = torch.from_numpy(engine.run(x).probs.argmax(axis=1).astype(np.int64))
    ensemble = load_run(run_dir).ensemble.eval()
    return gradcam(ensemble, torch.from_numpy(x), classes, create_graph=False).detach().numpy()


def _cam_subset(x: np.ndarray) -> np.ndarray:
    """The images ``evaluate`` draws for CAMs (its seeded subset)."""
    return x[np.sort(np.random.default_rng(CAM_SEED).permutation(len(x))[:CAM_IMAGES])]


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    from sdde_serve.engine import Engine

    return Engine(tiny_model, intra_op_threads=1)


def test_predicted_class_is_the_argmax_of_calibrated_probs() -> None:
    import torch

    from training.cams import predicted_class
    from training.saliency import pseudo_labels

    # member 0 is sure of class 0, members 1 and 2 mildly prefer class 1:
    # mean logits [6.67, 1.33] -> 0; T = 1: probs [0.413, 0.587] -> 1;
    # T = 10: member softmaxes [0.881, 0.119], [0.450, 0.550] x2 -> [0.594, 0.406] -> 0
    logits = torch.tensor([[[20.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])
    assert pseudo_labels(logits).tolist() == [0]
    assert predicted_class(logits, 1.0).tolist() == [1]
    assert predicted_class(logits, 10.0).tolist() == [0]


def test_maps_equal_saliency_gradcam(tiny_run: Path, engine) -> None:
    from training.cams import cam_fn_for_model, cam_fn_from_run

    x = load_dataset("digits", split="test").as_model_input(*engine.input_shape)[:64]
    ref = _reference_cams(tiny_run, engine, x)
    ours = cam_fn_from_run(tiny_run, temperature=engine.manifest.temperature)(x)
    assert ours.dtype == np.float32 and ref.max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(cam_fn_for_model(tiny_run, engine)(x), ref, rtol=1e-6, atol=1e-8)


def test_cli_writes_cam_similarity_and_overlays(tiny_model: Path, tiny_run: Path, engine, tmp_path):
    noise = noise_npz(tmp_path / "noise.npz", 40, 8, seed=7)
    out = tmp_path / "out"
    argv = [
        "eval",
        str(tiny_model),
        "--data",
        "digits",
        "--ood",
        f"noise={noise}",
        "--out-dir",
        str(out),
    ]
    argv += ["--cam-images", str(CAM_IMAGES), "--threads", "1", "--cams-from-run", str(tiny_run)]
    assert sdde_main(argv) == 0
    cams = json.loads((out / "metrics.json").read_text())["cams"]
    assert cams["source"] == "checkpoint" and cams["images_per_set"] == CAM_IMAGES
    assert cams["map_size"] == [5, 5]  # LeNet conv2 (the training saliency layer) at 28x28
    # the same numbers from the reference maps on the same images
    for key, spec in (("id", "digits"), ("noise", str(noise))):
        x = _cam_subset(load_dataset(spec, split="test").as_model_input(*engine.input_shape))
        expected = cam_metrics.mean_pairwise_cosine(_reference_cams(tiny_run, engine, x))
        got = cams["id"] if key == "id" else cams["ood"][key]
        assert got == pytest.approx(expected, abs=1e-6), key
    check_png(out / "cams.png")
    assert "cams.png" in (out / "report.md").read_text()


def _with_fake_cams(src: Path, dst: Path) -> Path:
    """The tiny LeNet model plus a ``cams`` output that is no GradCAM: the top-left 5x5 pixels,
    the same for every member (pairwise cosine 1 wherever that corner is not constant)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdde_serve.manifest import read_manifest, weights_sha256, write_manifest

    model = onnx.load(str(src))
    g = model.graph
    for name, value in {"cc_start": [0, 0], "cc_end": [5, 5], "cc_axes": [2, 3]}.items():
        g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    g.initializer.append(numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "cc_reps"))
    g.node.append(helper.make_node("Slice", ["images", "cc_start", "cc_end", "cc_axes"], ["cc"]))
    g.node.append(helper.make_node("Tile", ["cc", "cc_reps"], ["cams"]))
    g.output.append(helper.make_tensor_value_info("cams", TensorProto.FLOAT, ["batch", 3, 5, 5]))
    manifest = read_manifest(model)
    manifest = manifest.model_copy(
        update={"outputs": [*manifest.outputs, "cams"], "weights_sha256": weights_sha256(model)}
    )
    write_manifest(model, manifest)
    onnx.save(model, str(dst))
    return dst


def test_flag_wins_over_the_graph_cams(tiny_model: Path, tiny_run: Path, engine, tmp_path) -> None:
    from sdde_serve.engine import Engine

    model = _with_fake_cams(tiny_model, tmp_path / "with_cams.onnx")
    assert Engine(model, intra_op_threads=1).has_cams
    argv = ["eval", str(model), "--data", "digits", "--cam-images", str(CAM_IMAGES)]
    argv += ["--threads", "1", "--no-plots", "--cams-from-run", str(tiny_run)]
    assert sdde_main([*argv, "--out-dir", str(tmp_path / "out")]) == 0
    cams = json.loads((tmp_path / "out" / "metrics.json").read_text())["cams"]
    x = _cam_subset(load_dataset("digits", split="test").as_model_input(*engine.input_shape))
    expected = cam_metrics.mean_pairwise_cosine(_reference_cams(tiny_run, engine, x))
    assert cams["source"] == "checkpoint", "evaluate() must prefer cam_fn over the graph's cams"
    assert cams["id"] == pytest.approx(expected, abs=1e-6)


def _perturbed_copy(run_dir: Path, dst: Path, *, keep_last: str | None) -> Path:
    """A copy of the run whose ``best`` weights are off by 0.1 everywhere; ``last`` becomes
    the original ``best`` when ``keep_last="best"``, else it is perturbed too."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run_dir, dst)
    best = load_file(str(run_dir / "best.safetensors"))
    bad = {k: v + 0.1 if v.is_floating_point() else v for k, v in best.items()}
    save_file(bad, str(dst / "best.safetensors"))
    save_file(best if keep_last == "best" else bad, str(dst / "last.safetensors"))
    return dst


def test_falls_back_to_the_last_checkpoint_when_it_is_the_exported_one(
    tiny_run: Path, engine, tmp_path
) -> None:
    from training.cams import cam_fn_for_model

    run = _perturbed_copy(tiny_run, tmp_path / "run", keep_last="best")
    x = load_dataset("digits", split="test").as_model_input(*engine.input_shape)[:8]
    np.testing.assert_allclose(
        cam_fn_for_model(run, engine)(x), _reference_cams(tiny_run, engine, x), rtol=1e-6
    )


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_errors_are_one_line(tiny_model: Path, tiny_run: Path, tmp_path, capsys) -> None:
    base = ["eval", str(tiny_model), "--data", "digits", "--no-plots", "--cams-from-run"]
    out = tmp_path / "out"
    assert sdde_main([*base, str(tmp_path / "nope"), "--out-dir", str(out)]) == 2
    assert "does not exist" in _one_line_error(capsys)
    bad = _perturbed_copy(tiny_run, tmp_path / "bad", keep_last=None)
    assert sdde_main([*base, str(bad), "--out-dir", str(out)]) == 2
    assert "no checkpoint gives the model's logits" in _one_line_error(capsys)
    assert not out.exists()  # nothing written


def test_missing_torch_says_install_the_train_extra(tiny_model: Path, tiny_run: Path, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
        "from sdde_serve.cli import main\n"
        f"sys.exit(main(['eval', {str(tiny_model)!r}, '--data', 'digits', '--no-plots',"
        f" '--out-dir', {str(tmp_path / 'out')!r}, '--cams-from-run', {str(tiny_run)!r}]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: --cams-from-run needs PyTorch") and "\n" not in err, err
    assert "sdde-serve[train]" in err
