"""``sdde calibrate``: torch-free refit of T and the threshold, rewritten atomically."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdde_serve import calibration as cal
from sdde_serve.calibrate import fit_calibration
from sdde_serve.errors import UserError
from sdde_serve.manifest import get_temperature, load_onnx, read_manifest, weights_sha256

ROOT = Path(__file__).resolve().parents[2]
# makes `import torch` fail as if torch were not installed (sys.modules['torch'] = None would
# also do, but scipy, which scikit-learn's digits loader imports, trips over a None entry)
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copy(tiny_model, path)
    return path


def _outputs(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ["logits", "probs", "mal", "msp", "minmax", "knn"]
    return dict(zip(names, sess.run(names, {"images": images}), strict=True))


def test_calibrate_without_torch_changes_probs_as_softmax_predicts(model_copy: Path):
    from sdde_serve.data import load_dataset

    before_manifest = read_manifest(load_onnx(model_copy))
    images = load_dataset("digits@test").as_model_input(1, 28, 28)[:200]
    before = _outputs(model_copy, images)

    # a fresh interpreter in which torch is not installed: calibrate must not need it at all
    code = (
        BLOCK_TORCH + "from sdde_serve.cli import main\n"
        f"code = main(['calibrate', {str(model_copy)!r}, '--data', 'digits@test'])\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m, v in sys.modules.items()"
        " if v is not None), 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "temperature" in proc.stdout

    proto = load_onnx(model_copy)
    manifest = read_manifest(proto)
    t_new = get_temperature(proto)
    assert manifest.temperature == pytest.approx(t_new, rel=1e-6)
    assert manifest.calibration.temperature == manifest.temperature
    assert t_new != pytest.approx(before_manifest.temperature, rel=1e-3)
    assert manifest.calibration.data == "digits@test"
    assert manifest.calibration.n == len(load_dataset("digits@test"))
    # everything but T, the threshold and the calibration record is kept
    keep = manifest.model_dump(exclude={"temperature", "ood", "calibration"})
    assert keep == before_manifest.model_dump(exclude={"temperature", "ood", "calibration"})
    assert manifest.weights_sha256 == weights_sha256(proto)

    after = _outputs(model_copy, images)
    np.testing.assert_array_equal(after["logits"], before["logits"])
    np.testing.assert_array_equal(after["mal"], before["mal"])
    expected = cal.ensemble_probs(before["logits"], t_new)
    np.testing.assert_allclose(after["probs"], expected, atol=1e-6)
    np.testing.assert_array_equal(after["probs"].argmax(1), before["probs"].argmax(1))
    assert np.abs(after["probs"] - before["probs"]).max() > 1e-3
    # the deployed score's threshold (knn by default) accepts 95% of the calibration images
    all_images = load_dataset("digits@test").as_model_input(1, 28, 28)
    accepted = (
        _outputs(model_copy, all_images)[manifest.ood.score] >= manifest.ood.threshold
    ).mean()
    assert 0.95 <= accepted <= 0.95 + 2 / len(all_images)


def test_calibrate_msp_threshold_and_acceptance(model_copy: Path, tmp_path: Path):
    from sdde_serve.calibrate import calibrate_file
    from sdde_serve.data import load_dataset

    _, ood = calibrate_file(model_copy, "digits@test", id_acceptance=0.8, score="msp")
    manifest = read_manifest(load_onnx(model_copy))
    assert manifest.ood == ood and ood.score == "msp" and ood.id_acceptance == 0.8
    images = load_dataset("digits@test").as_model_input(1, 28, 28)
    msp = _outputs(model_copy, images)["msp"]
    accepted = (msp >= ood.threshold).mean()  # the graph's own float32 scores
    assert 0.8 <= accepted <= 0.8 + 2 / len(images)
    assert not [p for p in model_copy.parent.iterdir() if p.name.endswith(".tmp")]


def test_calibrate_bad_data_leaves_the_file_alone(model_copy: Path, tmp_path: Path, capsys):
    from sdde_serve.cli import main

    original = model_copy.read_bytes()
    bad = tmp_path / "three_classes.npz"
    rng = np.random.default_rng(0)
    np.savez(
        bad,
        images=rng.integers(0, 255, (20, 1, 28, 28), dtype=np.uint8),
        labels=rng.integers(0, 3, 20),
        classes=np.array(["a", "b", "c"]),
    )
    assert main(["calibrate", str(model_copy), "--data", str(bad)]) == 2
    assert "3 classes" in capsys.readouterr().err
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, images=rng.integers(0, 255, (20, 1, 28, 28), dtype=np.uint8))
    assert main(["calibrate", str(model_copy), "--data", str(unlabeled)]) == 2
    assert "no labels" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "missing.onnx"), "--data", "digits"]) == 2
    assert model_copy.read_bytes() == original
    assert sorted(p.name for p in model_copy.parent.iterdir()) == sorted(
        ["model.onnx", "three_classes.npz", "unlabeled.npz"]
    )


def test_fit_calibration_recovers_a_known_temperature():
    # labels drawn from softmax(z / 2): the NLL-optimal temperature is 2 (up to sampling noise)
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 3.0, (20000, 1, 4))
    p = cal.softmax(z[:, 0] / 2.0)
    labels = (rng.random((20000, 1)) > p.cumsum(1)).sum(1)
    two_members = np.concatenate([z, z], axis=1)  # identical members: same T
    info, ood = fit_calibration(
        two_members, labels, data="synthetic", id_acceptance=0.9, score="mal"
    )
    assert info.temperature == pytest.approx(2.0, rel=0.05)
    assert info.after.nll < info.before.nll
    assert (cal.mal(two_members) >= ood.threshold).mean() == pytest.approx(0.9, abs=1e-4)
    with pytest.raises(UserError, match="labels outside"):
        fit_calibration(z, labels + 4, data="x", id_acceptance=0.9, score="mal")
    with pytest.raises(UserError, match="id-acceptance"):
        fit_calibration(z, labels, data="x", id_acceptance=1.5, score="mal")
