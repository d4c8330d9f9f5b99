"""The trainer: every method trains, checkpoints resume exactly, bad input gives one clear line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdde_serve import cli as sdde_cli
from sdde_serve.errors import UserError
from tests.conftest import tiny_train_config
from training import data as D
from training import registry
from training.checkpointing import per_member_groups
from training.config import FIELD_HELP, CommonConfig, ResolvedConfig, TrainConfig
from training.dead_members import Guard
from training.interrupt import CheckpointedStop
from training.methods import METHODS
from training.trainer import cosine_lr, member_lrs, train

REPO = Path(__file__).resolve().parents[2]


def tiny(out: Path, **kw) -> TrainConfig:
    settings = dict(members=2, epochs=1, batch_size=32, max_steps=2, cam_samples=32)
    settings.update(eval_train_samples=64, progress=False)
    return tiny_train_config(out, official_protocol=True, **{**settings, **kw})


@pytest.fixture(scope="module")
def noise_npz(tmp_path_factory) -> Path:
    """Unlabeled 'outliers': random 8x8 gray images in a .npz (images only, no labels)."""
    path = tmp_path_factory.mktemp("outliers") / "noise.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, size=(48, 1, 8, 8), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> str:
    """300 training digits as a .npz spec: 270 train / 30 val, 8 steps of 32 per epoch."""
    from sdde_serve.data import load_dataset

    ds = load_dataset("digits")
    path = tmp_path_factory.mktemp("small") / "digits300.npz"
    np.savez(path, images=ds.images[:300], labels=ds.labels[:300], classes=np.array(ds.classes))
    return str(path)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_a_few_steps_without_nan(method, tmp_path, noise_npz):
    extra = {"outliers": str(noise_npz)} if registry.spec(method).needs_outliers else {}
    # 3 steps: sdde's first step has λ 0 (the warm-up) and its second none (--diversity-period 2)
    run = train(tiny(tmp_path / method, method=method, max_steps=3, **extra))
    last = records(run)[-1]
    assert last["step"] == 3
    assert math.isfinite(last["train"]["loss"]) and math.isfinite(last["val"]["ensemble_nll"])
    assert all(math.isfinite(v) for v in last["val"]["member_nll"])
    weights = load_file(str(run / "last.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    # the method's own loss terms reach metrics.jsonl
    expected = {
        "sdde": "div",
        "sdde-oe": "oe",
        "oe": "oe",
        "ncl": "ncl",
        "adp": "log_det",
        "dice": "discriminator_loss",
        "de-adv": "adv",
        "de": "ce",
    }[method]
    assert expected in last["train"]


def test_run_directory_format(tmp_path):
    run = train(tiny(tmp_path / "run", max_steps=3))
    assert sorted(p.name for p in run.iterdir()) == [
        "best.safetensors",
        "config.json",
        "last.safetensors",
        "last_state.pt",
        "metrics.jsonl",
        "split.json",
    ]
    config = json.loads((run / "config.json").read_text())
    assert config["schema"] == "sdde-run/1"
    assert set(config["data"]) >= {
        "spec",
        "split",
        "classes",
        "channels",
        "height",
        "width",
        "mean",
        "std",
    }
    assert config["data"]["spec"] == "digits" and config["data"]["classes"][3] == "3"
    assert (config["data"]["channels"], config["data"]["height"]) == (1, 28)
    # resolved defaults: the lambda for 28x28 gray inputs, LeNet's second conv block
    assert config["lambda_div"] == 1.0 and config["saliency_layer"] == "conv2"
    # mean/std are those of the training inputs
    from sdde_serve.data import load_dataset, train_val_split

    full = load_dataset("digits")
    train_idx, val_idx = train_val_split(len(full), 0.1, 0)
    x = full.subset(train_idx).as_model_input(1, 28, 28)
    assert config["data"]["mean"][0] == pytest.approx(float(x.mean()), abs=1e-6)
    assert config["data"]["std"][0] == pytest.approx(float(x.std(ddof=1)), abs=1e-6)
    split = json.loads((run / "split.json").read_text())
    assert split["val_indices"] == val_idx.tolist() and split["n"] == len(full)
    assert split["fingerprint"] == full.fingerprint()
    state = torch.load(run / "last_state.pt", weights_only=True)
    assert state["step"] == 3 and "optimizer" in state
    weights = load_file(str(run / "best.safetensors"))
    assert any(k.startswith("members.1.") for k in weights) and "mean" in weights


def test_cosine_schedule_per_step():
    assert cosine_lr(0, 100, 0.1, 1e-6) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 0.1, 1e-6) == pytest.approx((0.1 + 1e-6) / 2)
    assert cosine_lr(100, 100, 0.1, 1e-6) == pytest.approx(1e-6)
    assert cosine_lr(25, 100, 0.1, 0.0) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_a_revived_member_restarts_the_schedule_the_others_keep():
    # member 1 was revived at step 60 of 100: its cosine runs from --lr over its 40 steps left
    cfg = SimpleNamespace(lr=0.1, min_lr=0.0)
    run = SimpleNamespace(cfg=cfg, step=60, total_steps=100, guard=Guard(born=[0, 60, 0]))
    lrs = member_lrs(run)
    assert lrs[0] == lrs[2] == pytest.approx(0.05 * (1 + math.cos(0.6 * math.pi)))
    assert lrs[1] == pytest.approx(0.1)
    run.step = 80
    assert member_lrs(run)[1] == pytest.approx(0.05)  # half-way through its own life


def test_a_one_group_checkpoint_resumes_into_per_member_groups():
    # checkpoints written before each member had its own group hold one group of all parameters
    members = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)]
    flat = [p for m in members for p in m.parameters()]
    old = torch.optim.SGD(flat, lr=0.1, momentum=0.9)
    sum(p.sum() for p in flat).backward()
    old.step()
    new = torch.optim.SGD([{"params": list(m.parameters())} for m in members], lr=0.1, momentum=0.9)
    new.load_state_dict(per_member_groups(old.state_dict(), new))
    assert [len(g["params"]) for g in new.param_groups] == [2, 2]
    for p in flat:  # each momentum buffer stayed with its parameter
        assert torch.equal(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])


def test_resume_mid_epoch_gives_identical_state(tmp_path, small_digits):
    # 8 steps per epoch, 2 epochs; the first run stops mid-way through epoch 2.
    cfg = tiny(tmp_path / "straight", data=small_digits, epochs=2, max_steps=None)
    straight = train(cfg)
    part = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), max_steps=11)
    resumed = train(part)
    assert torch.load(resumed / "last_state.pt", weights_only=True)["step"] == 11
    train(dataclasses.replace(part, max_steps=None, resume=True))
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sa = torch.load(straight / "last_state.pt", weights_only=True)
    sb = torch.load(resumed / "last_state.pt", weights_only=True)
    for ka, kb in zip(
        sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(ka["momentum_buffer"], kb["momentum_buffer"])
    # the per-epoch records agree too (the interrupted run adds one at its max_steps stop)
    ra = records(straight)
    rb = [r for r in records(resumed) if r["step"] != 11]
    strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, small_digits):
    cfg = tiny(
        tmp_path / "run",
        data=small_digits,
        epochs=50,
        max_steps=None,
        cam_samples=0,
        eval_train_samples=0,
    )
    # the first epoch's record is written inside the loop, after the stop handler is installed;
    # config.json (written by setup, before it) raced with it on a loaded machine
    first_record = Path(cfg.out) / "metrics.jsonl"

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 60
        while not first_record.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(CheckpointedStop):  # the stop every process reached together
        train(cfg)
    step = torch.load(Path(cfg.out) / "last_state.pt", weights_only=True)["step"]
    assert step >= 1
    # resuming continues from that step exactly as an uninterrupted run
    train(dataclasses.replace(cfg, resume=True, max_steps=step + 1))
    ref = train(dataclasses.replace(cfg, out=str(tmp_path / "ref"), max_steps=step + 1))
    a = load_file(str(Path(cfg.out) / "last.safetensors"))
    b = load_file(str(ref / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_runs_repeat_with_or_without_workers_and_seeds_differ(tmp_path, small_digits):
    a = train(tiny(tmp_path / "a", data=small_digits))
    # DataLoader workers prepare the same batches (they are a function of the step alone)
    b = train(tiny(tmp_path / "b", data=small_digits, workers=2))
    c = train(tiny(tmp_path / "c", data=small_digits, seed=1))
    wa, wb, wc = (load_file(str(r / "last.safetensors")) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_members_get_their_own_orders_and_ddp_shards_add_up():
    n, b = 100, 8
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    data = D.Tensors(x, torch.arange(n))
    plan = D.Plan(seed=0, members=3, batch_size=b, n_train=n, augment="none")
    step = D.StepDataset(plan, data)[5]
    ys = [y.tolist() for _, y in step.member_batches]
    assert len({tuple(y) for y in ys}) == 3  # three different orders
    # each member sees every sample once per epoch (drop_last: 12 full batches of 8)
    epoch = [D.StepDataset(plan, data)[t].member_batches[1][1] for t in range(plan.steps_per_epoch)]
    assert len(set(torch.cat(epoch).tolist())) == plan.steps_per_epoch * b
    # two shards of a crop-flip batch are exactly the single-process batch, interleaved
    crop = dataclasses.replace(plan, augment="crop-flip")
    whole = D.StepDataset(crop, data)[3].shared[0]
    parts = [
        D.StepDataset(dataclasses.replace(crop, rank=r, world=2), data)[3].shared[0] for r in (0, 1)
    ]
    assert torch.equal(whole[0::2], parts[0]) and torch.equal(whole[1::2], parts[1])


def test_crop_flip_matches_a_hand_computed_crop():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    aug = D.CropFlip()
    # offset (4, 4) with padding 4 is the identity; (5, 3) shifts one row up and one column right
    same = aug.apply(x, (torch.tensor([4]), torch.tensor([4]), torch.tensor([False])))
    assert torch.equal(same, x)
    shifted = aug.apply(x, (torch.tensor([5]), torch.tensor([3]), torch.tensor([False])))
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, :3, 1:] = x[0, 0, 1:, :3]
    assert torch.equal(shifted, expected)
    flipped = aug.apply(x, (torch.tensor([4]), torch.tensor([4]), torch.tensor([True])))
    assert torch.equal(flipped, x.flip(-1))
    assert D.choose_augment("auto", 3, 32) == "crop-flip"
    assert D.choose_augment("auto", 1, 28) == "none"


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    code = sdde_cli.main(["train", *argv])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "oe"], "--method oe needs --outliers"),
        (["--members", "1", "--method", "sdde"], "use --members >= 2"),
        (["--arch", "vgg99"], "unknown --arch 'vgg99'"),
        (["--method", "bagging"], "unknown --method 'bagging'"),
        (["--data", "/no/such/dir"], "no such file or directory"),
        (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
        (["--min-lr", "0.5"], "must not exceed --lr"),
    ],
)
def test_bad_flags_give_one_clear_line(argv, message, tmp_path, capsys):
    code, err = run_cli(*argv, "--out", str(tmp_path / "run"), "--max-steps", "1", capsys=capsys)
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_run_directory_is_never_overwritten(tmp_path, capsys, small_digits):
    run = train(tiny(tmp_path / "run", data=small_digits, max_steps=1))
    code, err = run_cli("--out", str(run), "--members", "2", capsys=capsys)
    assert code == 2 and "already holds a run; pass --resume" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    code, err = run_cli("--out", str(tmp_path / "other"), capsys=capsys)
    assert code == 2 and "not empty" in err
    code, err = run_cli("--out", str(tmp_path / "none"), "--resume", capsys=capsys)
    assert code == 2 and "config.json is missing" in err
    # resuming with a different method is refused: a resume continues the recorded run
    code, err = run_cli("--out", str(run), "--resume", "--method", "de", capsys=capsys)
    assert code == 2 and "--method" in err and "differ" in err
    with pytest.raises(UserError, match="no labels"):
        npz = tmp_path / "unlabeled.npz"
        np.savez(npz, images=np.zeros((20, 1, 8, 8), np.uint8))
        train(tiny(tmp_path / "u", data=str(npz)))


def test_cli_flags_cover_the_config_without_importing_torch():
    code = (
        "import argparse, sys\n"
        "from training import cli\n"
        "p = argparse.ArgumentParser(); cli.add_arguments(p)\n"
        "a = p.parse_args(['--batch-size', '64', '--no-nesterov', '--lambda-div', '0.2'])\n"
        "c = cli.config_from_args(a)\n"
        "assert (c.batch_size, c.nesterov, c.lambda_div, c.members) == (64, False, 0.2, 5)\n"
        "assert 'torch' not in sys.modules, 'add_arguments imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(CommonConfig)}


def test_colour_32x32_resnet_gets_crop_flip_and_trains(tmp_path, noise_npz):
    """The CIFAR-like path: 3x32x32 inputs, OpenOOD's ResNet18_32x32, BatchNorm, augmentation."""
    rng = np.random.default_rng(1)
    npz = tmp_path / "colour.npz"
    np.savez(
        npz, images=rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8), labels=np.arange(40) % 4
    )
    run = train(
        tiny(
            tmp_path / "run",
            data=str(npz),
            arch="resnet18_32x32",
            method="sdde-oe",
            outliers=str(noise_npz),
            batch_size=4,
            max_steps=1,
            cam_samples=4,
            eval_train_samples=4,
            val_fraction=0.1,
        )
    )
    config = json.loads((run / "config.json").read_text())
    assert config["augment"] == "crop-flip" and config["saliency_layer"] == "layer3"
    assert config["lambda_div"] == 0.005  # not 28x28 gray
    assert (config["data"]["channels"], config["data"]["height"]) == (3, 32)
    assert math.isfinite(records(run)[-1]["train"]["loss"])
    weights = load_file(str(run / "last.safetensors"))
    assert any("running_mean" in k for k in weights)  # BatchNorm statistics are checkpointed


def test_outlier_stream_cycles_through_every_outlier():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    train_t = D.Tensors(x, torch.zeros(10, dtype=torch.int64))
    outliers = D.Tensors(x + 100, None)
    plan = D.Plan(
        seed=0,
        members=1,
        batch_size=4,
        n_train=10,
        augment="none",
        outlier_batch_size=4,
        n_outliers=10,
    )
    ds = D.StepDataset(plan, train_t, outliers)
    seen = torch.cat([ds[t].outliers[:, 0, 0, 0] for t in range(5)]).tolist()  # 20 draws
    assert sorted(seen[:10]) == [100.0 + i for i in range(10)]  # one full pass, then the next
    assert sorted(seen[10:]) == [100.0 + i for i in range(10)]


def test_resolve_fills_every_derived_field_and_keeps_the_fields():
    raw = TrainConfig(method="oe", outliers="digits")
    resolved = raw.resolve(data_channels=1)
    assert isinstance(resolved, ResolvedConfig)
    assert list(resolved.to_dict()) == list(raw.to_dict())  # config.json keeps its keys
    derived = ("input_size", "in_chans", "saliency_layer", "lambda_div", "outlier_batch_size")
    assert all(getattr(raw, k) is None for k in derived)
    assert (resolved.input_size, resolved.in_chans, resolved.lambda_div) == (28, 1, 1.0)
    assert resolved.outlier_batch_size == raw.batch_size and resolved.grad_clip == 0.0
    assert resolved.augment == "none" and resolved.saliency_layer
    # resolving twice changes nothing, and explicit values are kept
    assert resolved.resolve(data_channels=3) == resolved
    assert TrainConfig(in_chans=3, lambda_div=0.2).resolve(data_channels=1).in_chans == 3
