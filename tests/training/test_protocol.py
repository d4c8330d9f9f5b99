"""The SDDE training protocol options: per-member batches and the shared batch drawn from them,
the diversity period, the shared-batch fraction, crop augmentation (train only), the λ warm-up
(the member-stall fix), DICE's loss, and the options' round trip through config.json and the
manifest."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from export import hyperparameters
from sdde_serve.errors import UserError
from tests.training.test_trainer import tiny as trainer_tiny
from training import data as D
from training import registry
from training.config import TrainConfig
from training.dice import dice_losses, redundancy, same_class_partner
from training.ensemble import build_ensemble
from training.methods import METHODS, StepBatch
from training.run import load_run
from training.saliency import diversity_similarity, saliency_maps
from training.trainer import diversity_ramp, train
from training.validation import validate

PROTOCOL = dict(shared_source="member", diversity_period=2, shared_batch=0.5, augment="crop")


def tiny(out: Path, **kw) -> TrainConfig:
    """test_trainer's tiny run without the per-epoch CAM and train-accuracy passes."""
    return trainer_tiny(out, **{"cam_samples": 0, "eval_train_samples": 0, **kw})


def toy_data(n: int = 100) -> D.Tensors:
    # image i is the constant i/n, so a batch's images name their samples
    x = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1).expand(n, 1, 6, 6)
    return D.Tensors(x.contiguous(), torch.arange(n) % 10)


# --- the batch plan ------------------------------------------------------------------------------


def test_shared_batch_is_the_first_images_of_one_seeded_member_batch_augmented_alike():
    plan = D.Plan(
        seed=3,
        members=4,
        batch_size=8,
        n_train=100,
        augment="crop",
        shared_size=4,
        shared_source="member",
    )
    ds = D.StepDataset(plan, toy_data())
    chosen = set()
    for step in range(12):
        item = ds[step]
        j = plan.shared_member(step)
        chosen.add(j)
        xs, ys = item.shared
        xm, ym = item.member_batches[j]
        assert torch.equal(xs, xm[:4]) and torch.equal(ys, ym[:4])  # same images, same crops
        assert torch.equal(D.StepDataset(plan, toy_data())[step].shared[0], xs)  # seeded
    assert len(chosen) > 1  # the member changes from step to step
    # under two processes the shards of the shared batch add up to the single-process batch
    whole = ds[5].shared[0]
    parts = [
        D.StepDataset(dataclasses.replace(plan, rank=r, world=2), toy_data())[5] for r in (0, 1)
    ]
    assert torch.equal(whole[0::2], parts[0].shared[0])
    assert torch.equal(whole[1::2], parts[1].shared[0])


def test_stream_source_is_independent_of_the_member_batches():
    plan = D.Plan(seed=0, members=3, batch_size=8, n_train=100, augment="none")
    item = D.StepDataset(plan, toy_data())[2]
    shared = item.shared[1].tolist()
    assert all(shared != y.tolist() for _, y in item.member_batches)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_diversity_period_computes_the_term_on_exactly_every_kth_step(k):
    plan = D.Plan(seed=0, members=2, batch_size=8, n_train=100, augment="none", diversity_period=k)
    ds = D.StepDataset(plan, toy_data())
    with_term = [t for t in range(13) if ds[t].shared is not None]
    assert with_term == list(range(0, 13, k))


def test_sdde_without_a_shared_batch_is_plain_cross_entropy():
    torch.manual_seed(0)
    ens = build_ensemble("lenet", members=2, num_classes=10, in_chans=1, mean=[0.5], std=[0.25])
    xs = [(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(2)]
    cfg = SimpleNamespace(
        lambda_div=0.1, saliency="gradcam", diversity_bn="eval", diversity_pairs=0
    )
    sdde, logs = METHODS["sdde"].loss(ens, StepBatch(xs, None), cfg)
    de, _ = METHODS["de"].loss(ens, StepBatch(xs, None), cfg)
    torch.testing.assert_close(sdde, de)
    assert logs["diversity_step"] == 0.0 and "div" not in logs
    # with a shared batch and half the weight (a warm-up step): CE + 0.05 * L_div
    shared = (torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    loss, logs = METHODS["sdde"].loss(ens, StepBatch(xs, shared, diversity_scale=0.5), cfg)
    maps, _ = saliency_maps(ens, *shared, kind="gradcam", create_graph=False)
    expected = de + 0.05 * diversity_similarity(maps, "gradcam")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert logs["lambda_div"] == pytest.approx(0.05)


def test_period_in_a_run_averages_the_term_over_its_own_steps(tmp_path, digits300):
    cfg = tiny(tmp_path / "k2", data=digits300, max_steps=5, lambda_warmup_epochs=0.0, **PROTOCOL)
    run = train(cfg)
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["train"]["diversity_step"] == pytest.approx(3 / 5)  # steps 0, 2, 4 of 0..4
    assert "div" in rec["train"]


# --- reproducibility and resume ------------------------------------------------------------------


def test_protocol_runs_repeat_and_resume_bit_identically(tmp_path, digits300):
    # 9 steps per epoch; stop at step 5 (mid-epoch, between diversity steps), then resume
    cfg = tiny(tmp_path / "straight", data=digits300, epochs=1, max_steps=None, **PROTOCOL)
    straight = train(cfg)
    again = train(dataclasses.replace(cfg, out=str(tmp_path / "again")))
    part = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), max_steps=5)
    resumed = train(part)
    train(dataclasses.replace(part, max_steps=None, resume=True))
    a = load_file(str(straight / "last.safetensors"))
    for other in (again, resumed):
        b = load_file(str(other / "last.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_dice_discriminator_resumes_bit_identically(tmp_path, digits300):
    cfg = tiny(tmp_path / "straight", data=digits300, method="dice", max_steps=4)
    straight = train(cfg)
    part = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), max_steps=2)
    train(part)
    train(dataclasses.replace(part, max_steps=4, resume=True))
    sa = torch.load(straight / "last_state.pt", weights_only=True)["aux"]["weights"]
    sb = torch.load(tmp_path / "resumed" / "last_state.pt", weights_only=True)["aux"]["weights"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a = load_file(str(straight / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the discriminator is never part of the exported weights
    assert not any("label_embedder" in k for k in a)


# --- augmentation is for training only -----------------------------------------------------------


def test_crop_augments_training_batches_but_never_evaluation(tmp_path, digits300):
    data = toy_data()
    crop = D.Crop()
    oy, ox, flip = crop.draw(np.random.default_rng(0), 50)
    assert not flip.any() and ((oy != 4) | (ox != 4)).any()
    run = train(tiny(tmp_path / "crop", data=digits300, augment="crop", max_steps=3))
    loaded = load_run(run, "best")
    assert loaded.config["augment"] == "crop"
    # the recorded validation metrics are those of the plain (unaugmented) validation images
    val = D.Tensors(
        torch.from_numpy(loaded.val.as_model_input(1, 28, 28)),
        torch.from_numpy(np.asarray(loaded.val.labels, dtype=np.int64)),
    )
    got = validate(
        loaded.ensemble, val, loaded.train_config.resolve(data_channels=1), torch.device("cpu")
    )
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert got["ensemble_acc"] == pytest.approx(rec["val"]["ensemble_acc"], abs=1e-6)
    assert got["ensemble_nll"] == pytest.approx(rec["val"]["ensemble_nll"], abs=1e-5)
    # evaluation batches are the stored images as they are
    batches = list(D.eval_batches(data, 64))
    assert torch.equal(torch.cat([x for x, _ in batches]), data.x)


# --- the options round-trip ----------------------------------------------------------------------


def test_protocol_options_round_trip_through_config_json_and_the_manifest(tmp_path, digits300):
    opts = dict(PROTOCOL, lambda_warmup_epochs=0.5, lambda_div=0.05)
    cfg = tiny(tmp_path / "run", data=digits300, **opts)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    run = train(cfg)
    recorded = json.loads((run / "config.json").read_text())
    for k, v in opts.items():
        assert recorded[k] == v, k
    assert load_run(run).train_config.shared_batch == 0.5
    hp = hyperparameters(recorded)  # what export writes into manifest.hyperparameters
    for k, v in opts.items():
        assert hp[k] == v, k
    dice = hyperparameters({**recorded, "method": "dice", "dice_weight": 0.2, "grad_clip": 1.0})
    assert dice["dice_weight"] == 0.2 and dice["grad_clip"] == 1.0


def test_a_run_recorded_before_the_protocol_options_keeps_its_protocol(tmp_path, digits300):
    run = train(tiny(tmp_path / "old", data=digits300, max_steps=1))
    raw = json.loads((run / "config.json").read_text())
    protocol = ("shared_source", "shared_batch", "diversity_period", "diversity_pairs")
    for k in (*protocol, "lambda_warmup_epochs"):
        del raw[k]
    (run / "config.json").write_text(json.dumps(raw))
    old = load_run(run).train_config
    assert tuple(getattr(old, k) for k in protocol) == ("stream", 1.0, 1, 0)
    assert old.lambda_warmup_epochs == 0.0


def test_protocol_options_are_checked():
    with pytest.raises(UserError, match="--diversity-period and --shared-batch apply"):
        TrainConfig(method="ncl", diversity_period=4, shared_batch=0.5).validate()
    with pytest.raises(UserError, match="--shared-batch must be in"):
        TrainConfig(shared_batch=0.0).validate()
    with pytest.raises(UserError, match="--shared-source must be one of"):
        TrainConfig(shared_source="other").validate()
    assert TrainConfig(method="dice").resolve(data_channels=1).grad_clip == 1.0
    # one random pair every 2nd step, on the full shared batch, is the default (docs: "The
    # cheaper dose: the default"); the paper's dose is a flag pair away
    resolved = TrainConfig().resolve(data_channels=1)
    dose = (resolved.diversity_period, resolved.shared_batch, resolved.diversity_pairs)
    assert dose == (2, 1.0, 1)
    paper = TrainConfig(diversity_period=1, diversity_pairs=0).resolve(data_channels=1)
    assert (paper.diversity_period, paper.diversity_pairs) == tuple(
        registry.EVERY_STEP[k] for k in ("diversity_period", "diversity_pairs")
    )
    assert TrainConfig().resolve(data_channels=1).grad_clip == 0.0


# --- the member stall: mechanism and fix ---------------------------------------------------------


def test_lambda_warm_up_ramps_linearly_and_its_first_step_is_exactly_deep_ensembles(
    tmp_path, digits300
):
    cfg = TrainConfig(lambda_warmup_epochs=2.0)
    assert [diversity_ramp(t, 10, cfg) for t in (0, 5, 10, 20, 30)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert diversity_ramp(0, 10, TrainConfig(lambda_warmup_epochs=0.0)) == 1.0
    assert diversity_ramp(5, 10, TrainConfig(method="dice", dice_rampup_epochs=1.0)) == 0.5
    # With the shared batch drawn from a member's batch, SDDE's first step under the warm-up is
    # DE's first step bit for bit: the diversity gradient that destabilises fresh members is off.
    common = dict(data=digits300, max_steps=1, shared_source="member")
    sdde = train(tiny(tmp_path / "sdde", lambda_warmup_epochs=1.0, **common))
    de = train(tiny(tmp_path / "de", method="de", **common))
    a, b = load_file(str(sdde / "last.safetensors")), load_file(str(de / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_members_get_a_diversity_gradient_comparable_to_their_ce_gradient():
    """The stall mechanism (docs/training-methods.md): at initialisation GradCAM maps are
    ~1e-4 in scale and L_div standardises them, so at λ = 0.1 the diversity gradient of a fresh
    member is of the order of its cross-entropy gradient (0.5-1.5x on seeded inits; the CE
    gradient alone is what lets a member learn its classes). Pinned on a seeded LeNet x 5."""
    from sdde_serve.data import load_dataset

    torch.manual_seed(0)
    ds = load_dataset("digits")
    t = D.to_tensors(ds.subset(np.arange(128)), 1, 28)
    mean, std = D.channel_stats(t.x)
    ens = build_ensemble("lenet", members=5, num_classes=10, in_chans=1, mean=mean, std=std)
    params = [list(m.parameters()) for m in ens.members]
    logits = ens(t.x)
    ratios = []
    maps, _ = saliency_maps(ens, t.x, t.y, kind="gradcam", create_graph=True)
    div = diversity_similarity(maps, "gradcam")
    flat = [p for ps in params for p in ps]
    g_div = torch.autograd.grad(div, flat, allow_unused=True)
    i = 0
    for m, ps in enumerate(params):
        ce = F.cross_entropy(logits[:, m], t.y)
        g_ce = torch.cat([g.flatten() for g in torch.autograd.grad(ce, ps, retain_graph=True)])
        gd = torch.cat([g.flatten() for g in g_div[i : i + len(ps)] if g is not None])
        i += len(ps)
        ratios.append(float(0.1 * gd.norm() / g_ce.norm()))
    assert max(ratios) > 0.8 and min(ratios) > 0.3, ratios
    assert float(maps.detach().flatten(2).std(-1).mean()) < 1e-3


# --- DICE ---------------------------------------------------------------------------------------


class DotDiscriminator(nn.Module):
    """D(e1, e2, y) = <e1, e2> + b_y: simple enough to compute the DICE losses by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor([0.5, -0.25]))

    def forward(self, e1: Tensor, e2: Tensor, y: Tensor) -> Tensor:
        return (e1 * e2).sum(-1) + self.b[y]


def test_same_class_partner_rolls_within_each_class():
    partner, has = same_class_partner(torch.tensor([0, 1, 0, 2, 0, 1]))
    assert partner.tolist() == [2, 5, 4, 3, 0, 1]
    assert has.tolist() == [True, True, True, False, True, True]


def test_dice_losses_match_a_hand_computation():
    tau = 2.0
    e = [
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True),
        torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 2.0]], requires_grad=True),
    ]
    y = torch.tensor([0, 1, 0])
    disc = DotDiscriminator()
    red, d_loss, acc = dice_losses(disc, e, y, tau=tau)
    # joint logits: <e0_b, e1_b> + b_y
    joint = [0.5 + 0.5, 0.0 - 0.25, 2.0 + 0.5]
    # product pairs: sample 0 <-> 2 within class 0 (sample 1 is alone in class 1)
    with torch.no_grad():
        product = [float(e[0][0] @ e[1][2]) + 0.5, float(e[0][2] @ e[1][0]) + 0.5]

    def clipped(d: float) -> float:
        p = 1 / (1 + math.exp(-d))
        return tau * math.tanh(-math.log(1 / p - 1 + 1e-6) / tau)

    def logsig(d: float) -> float:
        return -math.log1p(math.exp(-d))

    assert float(red.detach()) == pytest.approx(sum(clipped(d) for d in joint) / 3, rel=1e-5)
    hand = -0.5 * (sum(logsig(d) for d in joint) / 3 + sum(logsig(-d) for d in product) / 2)
    assert float(d_loss.detach()) == pytest.approx(hand, rel=1e-5)
    assert acc == pytest.approx((2 + 0) / 5)  # joint > 0: 2 of 3 (1.0, 2.5); product < 0: none
    # the redundancy term trains the members only; the discriminator loss the discriminator only
    g_emb = torch.autograd.grad(red, e, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in g_emb)
    assert torch.autograd.grad(red, disc.b, allow_unused=True)[0] is None
    assert torch.autograd.grad(d_loss, e, allow_unused=True) == (None, None)
    assert torch.autograd.grad(d_loss, disc.b)[0].abs().sum() > 0
    # the official formula is the logit itself, up to the 1e-6 and the clipping
    d = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(redundancy(d, 100.0), d, atol=1e-4, rtol=1e-3)
