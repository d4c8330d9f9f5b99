"""load_run: a trained run comes back as the trainer left it; broken run dirs give one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdde_serve.data import load_dataset, train_val_split
from sdde_serve.errors import UserError
from tests.conftest import tiny_train_config
from training.run import load_run
from training.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("load_run") / "run"
    # 10 steps per epoch at batch 128: records at the epoch end (step 10) and at the
    # max_steps stop (step 14), so "best" and "last" can be different checkpoints.
    train(tiny_train_config(out, batch_size=128, max_steps=14, progress=False))
    return out


def test_load_run_returns_the_trained_ensemble_and_its_validation_split(run_dir):
    loaded = load_run(run_dir, "last")
    assert loaded.config["schema"] == "sdde-run/1"
    assert loaded.train_config.members == 3 and loaded.train_config.data == "digits"
    ens = loaded.ensemble
    assert not ens.training and all(not m.training for m in ens.modules())
    assert next(ens.parameters()).device.type == "cpu"
    saved = load_file(str(run_dir / "last.safetensors"))
    state = ens.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    # the validation split is the recorded one, on the same images
    full = load_dataset("digits")
    _, val_idx = train_val_split(len(full), 0.1, 0)
    assert np.array_equal(loaded.val.images, full.images[val_idx])
    assert np.array_equal(loaded.val.labels, full.labels[val_idx])


def test_best_checkpoint_reproduces_its_recorded_validation_metrics(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = [r for r in records if r["best"]][-1]
    loaded = load_run(run_dir)  # "best"
    x = torch.from_numpy(loaded.val.as_model_input(1, 28, 28))
    y = torch.from_numpy(loaded.val.labels)
    with torch.no_grad():
        logits = loaded.ensemble(x)  # [B, N, L]
    probs = logits.softmax(-1).mean(1)
    acc = float((probs.argmax(-1) == y).double().mean())
    nll = float(-probs.gather(1, y[:, None]).log().double().mean())
    assert acc == pytest.approx(best["val"]["ensemble_acc"], abs=1e-6)
    assert nll == pytest.approx(best["val"]["ensemble_nll"], abs=1e-5)
    member_acc = (logits.argmax(-1) == y[:, None]).double().mean(0).tolist()
    assert member_acc == pytest.approx(best["val"]["member_acc"], abs=1e-6)
    assert math.isfinite(best["val"]["cam_similarity"])


def broken_copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: truncate(d / "config.json"), "unreadable or truncated"),
        (lambda d: truncate(d / "best.safetensors"), "unreadable or truncated checkpoint"),
        (lambda d: (d / "best.safetensors").unlink(), "no best.safetensors"),
        (lambda d: (d / "split.json").unlink(), "split.json is missing"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"schema": "other/9"})),
            "not an sdde-run/1 run directory",
        ),
        (
            lambda d: (d / "split.json").write_text(
                json.dumps({**json.loads((d / "split.json").read_text()), "fingerprint": "0"})
            ),
            "fingerprint differs",
        ),
    ],
)
def test_broken_run_directories_raise_one_clear_line(run_dir, tmp_path, breakage, message):
    d = broken_copy(run_dir, tmp_path)
    breakage(d)
    with pytest.raises(UserError) as info:
        load_run(d)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_checkpoint_name(run_dir):
    with pytest.raises(UserError, match="checkpoint must be one of best, last"):
        load_run(run_dir, "final")


def test_resume_changes_only_the_flags_the_user_passed(tiny_run):
    """argparse defaults are not flags: before, ``--resume`` took epochs 10 (the default) over
    the run's 2, and ignored a ``--method`` equal to the default though the run used another."""
    import argparse

    from sdde_serve.errors import UserError
    from training import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)

    def config(*argv: str):
        return cli.config_from_args(parser.parse_args(["--out", str(tiny_run), "--resume", *argv]))

    recorded = config()  # tiny_run: epochs 2, max_steps 30, 3 members, batch 64, sdde
    assert (recorded.epochs, recorded.max_steps, recorded.members, recorded.batch_size) == (
        2,
        30,
        3,
        64,
    )
    assert recorded.resume and recorded.out == str(tiny_run)
    longer = config("--epochs", "4", "--method", "sdde")  # overridable; equal to the run
    assert (longer.epochs, longer.members) == (4, 3)
    for flags, name in ((["--method", "de"], "--method"), (["--members", "5"], "--members")):
        with pytest.raises(UserError, match=f"flags differ from it: {name}") as info:
            config(*flags)
        assert "\n" not in str(info.value)
    fresh = cli.config_from_args(parser.parse_args(["--epochs", "3"]))  # no --resume: defaults
    assert (fresh.epochs, fresh.members, fresh.method) == (3, 5, "sdde")
