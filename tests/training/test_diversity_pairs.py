"""``--diversity-pairs P``: SDDE's diversity term on P member pairs drawn per step.

The draw is a pure function of (seed, step); the term is the mean over the drawn pairs, an
unbiased estimate of the all-pairs mean; only the drawn pairs' members get saliency maps; P = 0
and P = all pairs are today's loss exactly; a resumed run is bit-identical.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from export import hyperparameters
from sdde_serve.errors import UserError
from tests.training.test_trainer import tiny as trainer_tiny
from training import data as D
from training.config import TrainConfig
from training.ensemble import batchnorm_mode, build_ensemble
from training.methods import METHODS, StepBatch
from training.run import resume_config
from training.saliency import (
    FLOOR,
    TINY_SQ,
    diversity_loss,
    pair_members,
    saliency_maps,
    sample_pairs,
)
from training.trainer import train

REPO = Path(__file__).resolve().parents[2]

# --- the draw ------------------------------------------------------------------------------------


def test_the_draw_is_a_pure_function_of_seed_and_step():
    draws = [sample_pairs(5, 3, seed=7, step=t) for t in range(50)]
    assert draws == [sample_pairs(5, 3, seed=7, step=t) for t in range(50)]  # no hidden state
    for pairs in draws:
        assert pairs is not None and len(set(pairs)) == 3 and pairs == sorted(pairs)
        assert all(0 <= i < j < 5 for i, j in pairs)
    assert len({tuple(p) for p in draws}) > 10  # it changes from step to step
    assert draws != [sample_pairs(5, 3, seed=8, step=t) for t in range(50)]  # and with the seed
    # 0 and "all of them" mean every pair: today's code path
    assert sample_pairs(5, 0, 0, 3) is None and sample_pairs(5, 10, 0, 3) is None
    with pytest.raises(ValueError, match="5 members have 10"):
        sample_pairs(5, 11, 0, 0)


def test_the_draw_is_uniform_over_pairs():
    # each of the 10 pairs of 5 members is drawn with probability P / 10
    counts = np.zeros((5, 5))
    for t in range(2000):
        for i, j in sample_pairs(5, 2, seed=0, step=t):
            counts[i, j] += 1
    freq = counts[np.triu_indices(5, 1)] / 2000
    np.testing.assert_allclose(freq, 0.2, atol=0.03)


def test_pair_members_maps_pairs_to_positions_of_the_used_members():
    assert pair_members([(1, 4), (0, 4)]) == ([0, 1, 4], [(1, 2), (0, 2)])


def test_the_batch_plan_gives_each_batch_its_global_step():
    x = torch.rand(40, 1, 6, 6)
    plan = D.Plan(seed=0, members=3, batch_size=8, n_train=40, augment="none")
    ds = D.StepDataset(plan, D.Tensors(x, torch.arange(40) % 10))
    assert [ds[t].step for t in (0, 3, 11)] == [0, 3, 11]
    shard = D.StepDataset(dataclasses.replace(plan, rank=1, world=2), D.Tensors(x, x[:, 0, 0, 0]))
    assert shard[11].step == 11  # every process, hence every process's draw, is the same


# --- the loss by hand ----------------------------------------------------------------------------


def hand_loss(maps: np.ndarray, pairs: list[tuple[int, int]]) -> float:
    """L_div written out in numpy: crop 1 px, centre each map, divide by
    sqrt(|z|^2 + FLOOR^2 * mean_b |z_b,i|^2 + TINY_SQ), mean over samples and ``pairs``."""
    z = maps[:, :, 1:-1, 1:-1].reshape(maps.shape[0], maps.shape[1], -1).astype(np.float64)
    z = z - z.mean(-1, keepdims=True)
    sq = (z**2).sum(-1)  # [B, N]
    floor = FLOOR**2 * sq.mean(0, keepdims=True) + TINY_SQ  # per member, over the batch
    u = z / np.sqrt(sq + floor)[..., None]
    return float(np.mean([(u[:, i] * u[:, j]).sum(-1) for i, j in pairs]))


def test_loss_on_a_drawn_pair_set_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 3, 5, 5)).astype(np.float32)  # 4 samples, 3 members
    every = [(0, 1), (0, 2), (1, 2)]
    t = torch.from_numpy(maps)
    for pairs in ([(0, 2)], [(0, 1), (1, 2)]):
        got = float(diversity_loss(t, "gradcam", pairs))
        assert got == pytest.approx(hand_loss(maps, pairs), rel=1e-5)
    all_pairs = float(diversity_loss(t, "gradcam"))
    assert all_pairs == pytest.approx(hand_loss(maps, every), rel=1e-5)
    # unbiased: averaged over every equally likely draw of P pairs, the estimate is the full mean
    for p in (1, 2):
        draws = [list(c) for c in itertools.combinations(every, p)]
        mean = np.mean([float(diversity_loss(t, "gradcam", d)) for d in draws])
        assert mean == pytest.approx(all_pairs, rel=1e-6)
    # a member's maps alone set its floor: the maps of the pair's members only give the same value
    sub = float(diversity_loss(t[:, [0, 2]], "gradcam", [(0, 1)]))
    assert sub == pytest.approx(float(diversity_loss(t, "gradcam", [(0, 2)])), rel=1e-6)


# --- the SDDE loss -------------------------------------------------------------------------------


def toy(members: int = 3, backend: str = "loop"):
    torch.manual_seed(0)
    ens = build_ensemble(
        "lenet", members=members, num_classes=10, in_chans=1, mean=[0.5], std=[0.25]
    )
    g = torch.Generator().manual_seed(1)
    mb = [(torch.rand(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g))]
    shared = (torch.rand(3, 1, 28, 28, generator=g), torch.randint(0, 10, (3,), generator=g))
    batch = StepBatch(mb * members, shared, step=5)
    return ens.set_backend(backend).train(), batch


def cfg_with(pairs: int, **kw) -> SimpleNamespace:
    base = dict(lambda_div=0.1, saliency="gradcam", diversity_bn="eval", seed=3)
    return SimpleNamespace(**{**base, "diversity_pairs": pairs, **kw})


def loss_and_grads(ens, batch, cfg):
    ens.zero_grad(set_to_none=True)
    loss, logs = METHODS["sdde"].loss(ens, batch, cfg)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in ens.parameters()]
    return loss.detach(), logs, grads


@pytest.mark.parametrize("kind", ["gradcam", "inputgrad"])
def test_zero_and_all_pairs_are_the_papers_loss_bit_for_bit(kind):
    ens, batch = toy()
    ref, _, ref_grads = loss_and_grads(ens, batch, cfg_with(0, saliency=kind))
    loss, _, grads = loss_and_grads(ens, batch, cfg_with(3, saliency=kind))  # 3 members: 3 pairs
    assert torch.equal(loss, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    de, _ = METHODS["de"].loss(ens, batch, cfg_with(0))
    with batchnorm_mode(ens, "eval"):  # the diversity pass's mode (diversity_bn="eval")
        maps, _ = saliency_maps(ens, *batch.shared, kind=kind, create_graph=False)
    term = diversity_loss(maps.detach(), kind)  # the mean over all 3 pairs
    torch.testing.assert_close(ref, de.detach() + 0.1 * term, rtol=1e-5, atol=1e-6)


def test_a_config_without_the_field_draws_the_default_one_pair():
    ens, batch = toy()
    unset = SimpleNamespace(lambda_div=0.1, saliency="gradcam", diversity_bn="eval", seed=3)
    assert torch.equal(
        loss_and_grads(ens, batch, unset)[0], loss_and_grads(ens, batch, cfg_with(1))[0]
    )


def test_one_pair_is_ce_plus_lambda_times_that_pairs_term():
    ens, batch = toy()
    cfg = cfg_with(1)
    ((i, j),) = sample_pairs(3, 1, seed=3, step=5)
    loss, logs, _ = loss_and_grads(ens, batch, cfg)
    de, _ = METHODS["de"].loss(ens, batch, cfg)
    with batchnorm_mode(ens, "eval"):  # the diversity pass's mode (diversity_bn="eval")
        maps, _ = saliency_maps(ens, *batch.shared, kind="gradcam", create_graph=False)
    term = diversity_loss(maps.detach(), "gradcam", [(i, j)])
    torch.testing.assert_close(loss, de.detach() + 0.1 * term, rtol=1e-5, atol=1e-6)
    assert logs["div"] == pytest.approx(float(term), rel=1e-5)
    # another step draws again (here: some step whose pair differs)
    other = next(t for t in range(6, 50) if sample_pairs(3, 1, 3, t) != [(i, j)])
    moved, _, _ = loss_and_grads(ens, dataclasses.replace(batch, step=other), cfg)
    assert not torch.equal(moved, loss)


def test_members_outside_the_drawn_pairs_get_no_saliency_pass():
    ens, batch = toy(members=4)
    cfg = cfg_with(1)
    (pair,) = sample_pairs(4, 1, seed=3, step=5)
    shared_calls = [0] * 4
    for k, m in enumerate(ens.members):
        original = m.forward_features

        def counting(x, k=k, original=original):
            shared_calls[k] += x.shape[0] == 3  # the shared batch has 3 images, members' 4
            return original(x)

        m.forward_features = counting
    loss_and_grads(ens, batch, cfg)
    assert shared_calls == [int(k in pair) for k in range(4)]
    with_term = flat_grads(ens)
    # their gradient is their cross-entropy's alone; the pair's members get the term's too
    ens.zero_grad(set_to_none=True)
    METHODS["de"].loss(ens, batch, cfg)[0].backward()
    for k, (got, ce_only) in enumerate(zip(with_term, flat_grads(ens), strict=True)):
        assert torch.allclose(got, ce_only, rtol=1e-5, atol=1e-7) == (k not in pair), k


def flat_grads(ens) -> list[torch.Tensor]:
    """Each member's gradient, flattened into one vector."""
    return [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in ens.members]


def test_fused_backend_draws_and_computes_the_same_term():
    loop, batch = toy(members=4)
    fused, _ = toy(members=4, backend="fused")
    a, la, _ = loss_and_grads(loop, batch, cfg_with(2))
    b, lb, _ = loss_and_grads(fused, batch, cfg_with(2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert la["div"] == pytest.approx(lb["div"], rel=1e-4, abs=1e-6)


def test_a_hand_built_batch_without_a_step_is_a_clear_error():
    ens, batch = toy()
    with pytest.raises(ValueError, match="needs its step"):
        METHODS["sdde"].loss(ens, dataclasses.replace(batch, step=None), cfg_with(1))


# --- the option ----------------------------------------------------------------------------------


def test_the_option_is_checked():
    with pytest.raises(UserError, match="at most the 3 member pairs of --members 3"):
        TrainConfig(members=3, diversity_pairs=4).validate()
    with pytest.raises(UserError, match="--diversity-pairs applies to --method sdde only"):
        TrainConfig(method="ncl", diversity_pairs=2).validate()
    with pytest.raises(UserError, match="--diversity-pairs must be >= 0"):
        TrainConfig(diversity_pairs=-1).validate()
    TrainConfig(members=3, diversity_pairs=3).validate()
    assert (TrainConfig().diversity_pairs, TrainConfig().diversity_period) == (1, 2)  # the default
    TrainConfig(members=2).validate()  # the one pair of two members
    # another method takes the default or the paper's value, and records the paper's
    for pairs in (0, 1):
        ncl = TrainConfig(method="ncl", diversity_pairs=pairs).resolve(data_channels=1)
        assert (ncl.diversity_pairs, ncl.diversity_period, ncl.shared_batch) == (0, 1, 1.0)


def tiny(out: Path, **kw) -> TrainConfig:
    settings = dict(members=3, cam_samples=0, eval_train_samples=0, lambda_warmup_epochs=0.0)
    return trainer_tiny(out, **{**settings, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def test_a_run_repeats_resumes_bit_identically_and_records_the_option(tmp_path, digits300):
    cfg = tiny(tmp_path / "straight", data=digits300, max_steps=4, diversity_pairs=1)
    straight = train(cfg)
    part = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), max_steps=2)
    train(part)
    resumed = train(dataclasses.replace(part, max_steps=4, resume=True))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    every = train(dataclasses.replace(cfg, out=str(tmp_path / "all"), diversity_pairs=0))
    everyone = weights(every)
    assert not all(torch.equal(a[k], everyone[k]) for k in a)  # the option changed the training
    recorded = json.loads((straight / "config.json").read_text())
    assert recorded["diversity_pairs"] == 1
    assert hyperparameters(recorded)["diversity_pairs"] == 1  # what export puts in the manifest
    with pytest.raises(UserError, match="--diversity-pairs"):  # a resume keeps the recorded draw
        resume_config({"out": str(straight), "diversity_pairs": 2})


@pytest.mark.slow
def test_two_gloo_processes_draw_the_pairs_one_process_draws(tmp_path, digits300):
    """Each torchrun process draws the same pairs (a pure function of seed and step), so the
    2-process run logs the single-process loss and its replicas stay identical."""
    flags = dict(data=digits300, members=4, batch_size=64, max_steps=3, diversity_pairs=1)
    flags.update(epochs=1, cam_samples=0, eval_train_samples=0, lambda_warmup_epochs=0)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "training", *args, f"--out={tmp_path / 'ddp'}", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(TrainConfig(**flags, out=str(tmp_path / "single"), progress=False))
    ddp, one = (last_record(run) for run in (tmp_path / "ddp", single))
    assert ddp["replicas_in_sync"]
    for key in ("loss", "ce", "div"):  # another draw moves div by far more than rounding
        assert ddp["train"][key] == pytest.approx(one["train"][key], rel=1e-4, abs=1e-5), key


def last_record(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
