"""``--pretrained``: members start from a file's weights, heads of another class count are
re-initialised per member, bad files give one line (exit 2), and a timm model so started trains,
exports (verified against torch), and exports to int8. Nothing downloads: the "pretrained" files
are random weights saved by the tests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from safetensors.torch import save_file

from sdde_serve import cli as sdde_cli
from sdde_serve.calibrate import run_graph
from sdde_serve.errors import UserError
from sdde_serve.manifest import load_onnx, read_manifest
from training import models, pretrained
from training.config import TrainConfig
from training.ensemble import build_ensemble

NAME = "test_resnet"
ARCH = f"timm:{NAME}"


def timm_file(tmp_path: Path, num_classes: int = 1000, suffix: str = ".pt") -> Path:
    """A random-weights 'pretrained' file in timm's own format (bare parameter names)."""
    torch.manual_seed(123)
    state = timm.create_model(NAME, num_classes=num_classes).state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def members_from(path: Path, num_classes: int, members: int = 2):
    torch.manual_seed(0)
    ens = build_ensemble(
        ARCH,
        members=members,
        num_classes=num_classes,
        in_chans=3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        pretrained=str(path),
    )
    return [m.net.state_dict() for m in ens.members]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_other_class_count_loads_the_body_and_gives_each_member_its_own_head(tmp_path, suffix):
    path = timm_file(tmp_path, num_classes=1000, suffix=suffix)
    file = pretrained.read_state_dict(path)
    a, b = members_from(path, num_classes=5)
    body = [k for k in file if not k.startswith("fc.")]
    assert body and all(torch.equal(a[k], file[k]) and torch.equal(b[k], file[k]) for k in body)
    assert a["fc.weight"].shape == (5, 96)  # re-initialised at the run's class count ...
    assert not torch.equal(a["fc.weight"], b["fc.weight"])  # ... per member
    # each head is the member's own draw from the seeded RNG: the same as without the file
    torch.manual_seed(0)
    fresh = build_ensemble(ARCH, members=2, num_classes=5, in_chans=3, mean=[0] * 3, std=[1] * 3)
    torch.testing.assert_close(a["fc.weight"], fresh.members[0].net.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(b["fc.bias"], fresh.members[1].net.fc.bias, rtol=0, atol=0)


def test_same_class_count_loads_the_head_too(tmp_path):
    path = timm_file(tmp_path, num_classes=4)
    file = pretrained.read_state_dict(path)
    for member in members_from(path, num_classes=4):
        assert all(torch.equal(member[k], v) for k, v in file.items())


def test_headless_backbone_file_keeps_the_fresh_heads(tmp_path):
    full = pretrained.read_state_dict(timm_file(tmp_path, num_classes=5))
    path = tmp_path / "backbone.pt"
    torch.save({k: v for k, v in full.items() if not k.startswith("fc.")}, path)
    a, _ = members_from(path, num_classes=5)
    assert torch.equal(a["conv1.0.weight"], full["conv1.0.weight"])
    assert not torch.equal(a["fc.weight"], full["fc.weight"])


def test_wrapped_ddp_checkpoint_of_a_builtin_arch_loads(tmp_path):
    torch.manual_seed(1)
    source = models.create_model("resnet20", num_classes=10, in_chans=3)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(0)
    ens = build_ensemble(
        "resnet20",
        members=2,
        num_classes=10,
        in_chans=3,
        mean=[0] * 3,
        std=[1] * 3,
        pretrained=str(path),
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ens(x)[:, 1], source.eval()(x), rtol=0, atol=0)


def test_hub_without_published_weights_or_offline_is_one_line(monkeypatch):
    with pytest.raises(UserError, match="no published weights for --arch resnet20"):
        pretrained.hub_state_dict("resnet20")

    def offline() -> dict:
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    spec = dataclasses.replace(models.ARCHS["resnet18"], hub=offline)  # never downloads
    monkeypatch.setitem(models.ARCHS, "resnet18", spec)
    with pytest.raises(UserError, match=r"cannot get weights for resnet18 \(\[Errno -3\]") as e:
        pretrained.hub_state_dict("resnet18")
    assert "\n" not in str(e.value)


def rgb_npz(tmp_path: Path, n: int = 64, side: int = 32) -> Path:
    """Three colour classes a small CNN separates: a class-dependent tint plus noise."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    images = rng.integers(0, 100, (n, 3, side, side)) + 70 * labels[:, None, None, None]
    path = tmp_path / "rgb.npz"
    np.savez(path, images=images.astype(np.uint8), labels=labels, classes=np.array(list("abc")))
    return path


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    code = sdde_cli.main(["train", *argv])
    return code, capsys.readouterr().err.strip()


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(timm_file(tmp_path, suffix=".safetensors").read_bytes()[:500])
    other = tmp_path / "resnet20.pt"
    torch.save(models.create_model("resnet20", num_classes=3, in_chans=3).state_dict(), other)
    return {
        "missing": (tmp_path / "nope.pt", "no such file"),
        "corrupt": (corrupt, "unreadable (UnpicklingError)"),
        "truncated": (truncated, "unreadable"),
        "mismatched": (other, f"does not fit {ARCH}: missing"),
    }


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated", "mismatched"])
def test_bad_pretrained_file_is_one_line_exit_2_and_writes_nothing(kind, tmp_path, capsys):
    path, message = bad_files(tmp_path)[kind]
    data = rgb_npz(tmp_path)
    argv = ["--data", str(data), "--arch", ARCH, "--pretrained", str(path), "--method", "de"]
    code, err = run_cli(*argv, "--cam-samples", "0", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_timm_run_from_a_pretrained_file_trains_exports_evaluates_and_quantizes(tmp_path):
    """2 steps of DE at 32 px (no CAMs: the map is 1x1), fp32 export, sdde eval, int8 export."""
    from export import export_run
    from export.quantize import PrecisionOptions
    from training.run import load_run
    from training.trainer import train

    weights = timm_file(tmp_path)
    cfg = TrainConfig(
        data=str(rgb_npz(tmp_path)),
        arch=ARCH,
        pretrained=str(weights),
        input_size=32,
        members=2,
        method="de",
        epochs=1,
        batch_size=16,
        max_steps=2,
        cam_samples=0,
        eval_train_samples=0,
        progress=False,
        out=str(tmp_path / "run"),
    )
    run_dir = Path(train(cfg))
    config = json.loads((run_dir / "config.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert config["model"]["pretrained"] == {"source": str(weights), "sha256": digest}
    assert config["augment"] == "crop-flip"  # colour data: the SDDE CIFAR recipe

    fp32 = export_run(run_dir, tmp_path / "m.onnx", name="timm")  # verify() ran inside
    assert fp32.arch == ARCH and fp32.training_config["model"]["pretrained"]["sha256"] == digest
    run = load_run(run_dir)
    images = run.val.as_model_input(3, 32, 32)
    with torch.no_grad():
        expected = run.ensemble(torch.from_numpy(images)).numpy()
    got = run_graph(load_onnx(tmp_path / "m.onnx"), images, ["logits"])["logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    # sdde eval reads the timm model's graph like any other: its accuracy is the torch ensemble's
    data = cfg.data
    argv = ["eval", str(tmp_path / "m.onnx"), "--data", data, "--threads", "1"]
    assert sdde_cli.main([*argv, "--out-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    full = np.load(data)
    with torch.no_grad():
        x = torch.from_numpy(full["images"].astype(np.float32) / 255.0)
        torch_acc = float(
            (run.ensemble(x).softmax(-1).mean(1).argmax(-1).numpy() == full["labels"]).mean()
        )
    assert report["model"]["arch"] == ARCH
    assert report["classification"]["before"]["accuracy"] == pytest.approx(torch_acc, abs=1e-9)

    options = PrecisionOptions(precision="int8", max_accuracy_drop=100.0, max_auroc_drop=100.0)
    int8 = export_run(run_dir, tmp_path / "q.onnx", name="timm", precision=options)
    q = load_onnx(tmp_path / "q.onnx")
    assert int8.precision == "int8" and read_manifest(q).precision == "int8"
    assert any(t.data_type == onnx.TensorProto.INT8 for t in q.graph.initializer)


def test_resume_continues_from_the_checkpoint_without_the_start_file(tmp_path):
    from training.trainer import train

    torch.manual_seed(5)
    weights = tmp_path / "lenet.pt"
    torch.save(models.create_model("lenet", num_classes=10, in_chans=1).state_dict(), weights)
    settings = dict(data="digits", arch="lenet", members=2, method="de", batch_size=32)
    settings.update(cam_samples=0, eval_train_samples=0, progress=False, out=str(tmp_path / "r"))
    train(TrainConfig(**settings, pretrained=str(weights), max_steps=2))
    first = json.loads((tmp_path / "r" / "config.json").read_text())["model"]["pretrained"]
    weights.unlink()  # the start file is gone: a resume must not need it
    train(TrainConfig(**settings, pretrained=str(weights), max_steps=3, resume=True))
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model"]["pretrained"] == first and first["sha256"]
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
