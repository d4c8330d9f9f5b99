"""Export: parity of every architecture and layout with PyTorch, the temperature initializer,
CAMs against autograd GradCAM, verification catching wrong graphs, the manifest, bad run dirs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.graph import build_graph, linear_head_weights, to_onnx
from export.layouts import LAYOUTS, PackedCore, ensemble_members
from export.verify import VerificationError, run_onnx, verification_inputs, verify
from sdde_serve import calibration as cal
from sdde_serve.errors import UserError
from sdde_serve.manifest import (
    Manifest,
    get_temperature,
    load_onnx,
    read_manifest,
    set_temperature,
    weights_sha256,
)
from training.ensemble import Ensemble
from training.models import create_model

ROOT = Path(__file__).resolve().parents[2]


def tiny_ensemble(arch: str, members: int, channels: int, seed: int = 0) -> Ensemble:
    """Untrained members with non-trivial BatchNorm statistics (so BN folding is exercised)."""
    torch.manual_seed(seed)
    nets = [create_model(arch, num_classes=7, in_chans=channels).eval() for _ in range(members)]
    for net in nets:
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.normal_(0.0, 0.1)
    return Ensemble(nets, [0.4] * channels, [0.3] * channels).eval()


# (arch, members, input shape): resnet18 (torchvision, built for 224) at a small 64x64 input
ARCH_CASES = [
    ("lenet", 3, (1, 28, 28)),
    ("resnet18_32", 2, (3, 32, 32)),
    ("resnet18", 2, (3, 64, 64)),
]


@pytest.mark.parametrize(("arch", "members", "shape"), ARCH_CASES, ids=[c[0] for c in ARCH_CASES])
def test_every_arch_and_layout_matches_pytorch(arch, members, shape):
    ensemble = tiny_ensemble(arch, members, shape[0])
    real = np.random.default_rng(1).random((3, *shape), dtype=np.float32)
    for layout in LAYOUTS:
        graph = build_graph(ensemble, layout, input_shape=shape, temperature=1.3)
        model = to_onnx(graph, input_shape=shape)
        # verify() raises with the output and the size of any difference over tolerance
        report = verify(model, ensemble, temperature=1.3, inputs=verification_inputs(shape, real))
        assert set(report) == {"random (batch 1)", "random (batch 7)", "real"}
        diffs = report["random (batch 7)"]
        assert diffs["logits"] <= 1e-4 and diffs["probs"] <= 1e-5
        # ResNets (GAP + linear classifier) carry exact CAMs; LeNet's MLP head does not
        assert ("cams" in diffs) == arch.startswith("resnet")
        names = [o.name for o in model.graph.output]
        assert names[:4] == ["logits", "probs", "mal", "msp"]
        # the batch axis is dynamic on the input and on every output
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_packed_layout_equals_the_training_fused_backend_and_loop():
    """Three equivalent paths: explicit grouped convs, torch.func.vmap, a Python loop."""
    ensemble = tiny_ensemble("lenet", 3, 1, seed=3)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loop = ensemble(x)
        packed, _ = PackedCore(ensemble, with_maps=False)(x)
        ensemble.set_backend("fused")
        fused = ensemble(x)
        ensemble.set_backend("loop")
    torch.testing.assert_close(packed, loop, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, fused, atol=1e-5, rtol=0)


def test_cams_are_gradcam_for_the_predicted_class():
    """The gradient-free CAM equals autograd GradCAM on the last map (exact for GAP+linear)."""
    ensemble = tiny_ensemble("resnet18_32", 2, 3, seed=5)
    net = ensemble_members(ensemble)[0]
    assert linear_head_weights(net.classifier, (512, 4, 4)) is not None
    lenet = create_model("lenet", num_classes=7, in_chans=1).eval()
    assert linear_head_weights(lenet.classifier, (120, 1, 1)) is None  # MLP head: no exact CAM

    graph = build_graph(ensemble, "loop", input_shape=(3, 32, 32), temperature=1.0)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = dict(zip(graph.output_names, graph(x), strict=True))
    probs, cams = outs["probs"], outs["cams"]
    assert cams.shape == (3, 2, 4, 4)
    xn = ensemble.normalize(x)
    pred = probs.argmax(-1)
    for m, member in enumerate(ensemble_members(ensemble)):
        with torch.no_grad():
            a = member.layer4(member.forward_features(xn))
        a.requires_grad_(True)
        y = member.classifier(a)
        (g,) = torch.autograd.grad(y.gather(1, pred[:, None]).sum(), a)
        expected = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
        torch.testing.assert_close(cams[:, m], expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def lenet_export():
    ensemble = tiny_ensemble("lenet", 2, 1, seed=7)
    graph = build_graph(ensemble, "loop", input_shape=(1, 28, 28), temperature=1.5)
    return ensemble, to_onnx(graph, input_shape=(1, 28, 28))


def test_temperature_is_a_named_initializer_that_changes_probs(lenet_export):
    _, model = lenet_export
    init = next(i for i in model.graph.initializer if i.name == "temperature")
    assert init.data_type == onnx.TensorProto.FLOAT and list(init.dims) == []
    assert float(numpy_helper.to_array(init)) == pytest.approx(1.5)
    x = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32)
    before = run_onnx(model, x)
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    set_temperature(changed, 0.25)
    after = run_onnx(changed, x)
    np.testing.assert_array_equal(after["logits"], before["logits"])
    np.testing.assert_array_equal(after["mal"], before["mal"])
    np.testing.assert_allclose(
        after["probs"], cal.ensemble_probs(before["logits"], 0.25), atol=1e-6
    )
    assert np.abs(after["probs"] - before["probs"]).max() > 1e-3


def test_verification_catches_a_wrong_graph(lenet_export):
    ensemble, model = lenet_export
    inputs = verification_inputs((1, 28, 28), None)
    verify(model, ensemble, temperature=1.5, inputs=inputs)  # the real one passes

    wrong_bias = onnx.ModelProto()
    wrong_bias.CopyFrom(model)
    # nudge one classifier bias by 1e-3: only the logits of that class move
    init = next(i for i in wrong_bias.graph.initializer if i.name.endswith("fc.bias"))
    arr = numpy_helper.to_array(init).copy()
    arr[0] += 1e-3
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    with pytest.raises(VerificationError, match=r"output 'logits' differs from PyTorch by 0\.001"):
        verify(wrong_bias, ensemble, temperature=1.5, inputs=inputs)

    wrong_t = onnx.ModelProto()
    wrong_t.CopyFrom(model)
    set_temperature(wrong_t, 1.6)
    with pytest.raises(VerificationError, match=r"output 'probs' differs .* \(tolerance 1e-05\)"):
        verify(wrong_t, ensemble, temperature=1.5, inputs=inputs)

    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(VerificationError, match=r"onnx\.checker"):
        verify(broken, ensemble, temperature=1.5, inputs=inputs)


# --- end to end on the session's tiny trained run ---------------------------------------------


def test_exported_manifest_round_trip_and_calibration(tiny_run, tiny_model):
    from training.run import load_run

    proto = load_onnx(tiny_model)
    manifest = read_manifest(proto)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.name == "tiny-digits" and manifest.version == "1"
    assert manifest.arch == "lenet" and manifest.members == 3 and manifest.method == "sdde"
    assert manifest.classes == [str(i) for i in range(10)]
    assert (manifest.input.channels, manifest.input.height, manifest.input.width) == (1, 28, 28)
    assert manifest.layout in LAYOUTS and manifest.opset == 17
    assert manifest.outputs == [o.name for o in proto.graph.output]
    assert manifest.weights_sha256 == weights_sha256(proto)
    assert manifest.temperature == pytest.approx(get_temperature(proto), rel=1e-6)
    assert manifest.calibration.temperature == manifest.temperature
    assert manifest.calibration.data.endswith(":val")  # the validation split, not test
    assert manifest.hyperparameters["lambda_div"] > 0
    assert manifest.training_config["model"]["members"] == 3
    config = json.loads((tiny_run / "config.json").read_text())
    assert manifest.training_config["seed"] == config["seed"]

    # recompute the calibration from the graph's own outputs on the validation split
    run = load_run(tiny_run)
    images = run.val.as_model_input(1, 28, 28)
    out = run_onnx(proto, images)
    labels = run.val.labels
    t = manifest.temperature
    assert manifest.calibration.n == len(labels)
    nll_t = cal.ensemble_nll(out["logits"], labels, t)
    assert nll_t == pytest.approx(manifest.calibration.after.nll, abs=1e-5)
    # T is the NLL minimiser: nudging it either way does not help
    assert nll_t <= cal.ensemble_nll(out["logits"], labels, t * 1.05) + 1e-9
    assert nll_t <= cal.ensemble_nll(out["logits"], labels, t / 1.05) + 1e-9
    assert manifest.calibration.after.nll <= manifest.calibration.before.nll + 1e-9
    # the default export deploys KNN (export/select.py), thresholded on the graph's own output
    accepted = (out["knn"] >= manifest.ood.threshold).mean()
    assert manifest.ood.score == "knn" and manifest.ood.id_acceptance == 0.95
    assert 0.95 <= accepted <= 0.95 + 2 / len(labels)


def test_cli_export_packed_layout_with_triton_repo(tiny_run, tmp_path, capsys):
    from sdde_serve.cli import main

    out = tmp_path / "m.onnx"
    code = main(
        [
            "export",
            str(tiny_run),
            "-o",
            str(out),
            "--layout",
            "packed",
            "--id-acceptance",
            "0.9",
            "--name",
            "packed-digits",
            "--model-version",
            "7",
            "--triton-repo",
            str(tmp_path / "repo"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(load_onnx(out))
    assert (manifest.layout, manifest.name, manifest.version) == ("packed", "packed-digits", "7")
    assert manifest.ood.id_acceptance == 0.9
    assert (tmp_path / "repo" / "packed-digits" / "config.pbtxt").is_file()
    assert "wrote" in capsys.readouterr().out


def test_every_file_export_writes_is_replaced_whole(tiny_run, tmp_path, monkeypatch):
    """The ONNX file and the Triton entry (model copy, labels, config) are each written to a
    temporary file and renamed over the target (sdde_serve/atomic.py): a reader never sees one
    half-written, and no temporary file is left behind."""
    from sdde_serve.cli import main

    renamed: list[Path] = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "m.onnx"
    flags = ["--knn-bank", "0", "--synth-ood", "none", "--no-cams", "--name", "digits"]
    code = main(["export", str(tiny_run), "-o", str(out), *flags, "--triton-repo", str(tmp_path)])
    assert code == 0
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    triton = [tmp_path / "digits" / n for n in ("1/model.onnx", "config.pbtxt", "labels.txt")]
    assert written == sorted([out, *triton])
    assert sorted(p for p in renamed if p.is_relative_to(tmp_path)) == written


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def test_bad_run_directories_give_clear_errors(tiny_run, tmp_path, capsys):
    from export import export_run
    from sdde_serve.cli import main

    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "nope", out)

    truncated = _copy_run(tiny_run, tmp_path / "t")
    text = (truncated / "config.json").read_text()
    (truncated / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="truncated"):
        export_run(truncated, out)

    other = _copy_run(tiny_run, tmp_path / "o")
    config = json.loads((other / "config.json").read_text())
    config["schema"] = "someone-else/3"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="schema"):
        export_run(other, out)

    weights = _copy_run(tiny_run, tmp_path / "w")
    data = (weights / "best.safetensors").read_bytes()
    (weights / "best.safetensors").write_bytes(data[: len(data) // 3])
    # through the CLI: one "error:" line, exit status 2, no traceback, nothing written
    assert main(["export", str(weights), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "best.safetensors" in err and "Traceback" not in err
    assert not out.exists()


def test_export_help_imports_no_torch():
    from export.cli import LAYOUT_CHOICES

    assert tuple(LAYOUTS) == LAYOUT_CHOICES
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from sdde_serve.cli import build_parser\n"
        "build_parser('export').parse_args(['export', 'RUN', '-o', 'm.onnx'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
