"""Training methods: loss terms against hand computations, training smoke, fused == loop."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdde_serve.errors import UserError
from training import registry
from training.config import TrainConfig
from training.ensemble import Ensemble, batchnorm_mode, build_ensemble
from training.methods import (
    GRAY28_LAMBDA,
    METHODS,
    LossModule,
    StepBatch,
    adp_terms,
    default_lambda,
    member_ce,
    ncl_penalty,
    oe_loss,
    shared_ce,
)
from training.models import SplitModel
from training.saliency import diversity_loss, diversity_similarity, gradcam


class TinyBNNet(SplitModel):
    """Two conv+BatchNorm blocks on 8x8 inputs: exercises BatchNorm modes in milliseconds."""

    stage_names = ("block1", "block2")

    def __init__(self, in_chans: int = 1, num_classes: int = 4, saliency_layer: str = "block1"):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_chans, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU()
        )
        self.fc = nn.Linear(6, num_classes)
        self._set_split(num_classes, in_chans, saliency_layer)

    def stage(self, name: str) -> nn.Module:
        return getattr(self, name)

    def classifier(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def cfg(**overrides: object) -> SimpleNamespace:
    base = dict(
        lambda_div=None,
        beta_oe=0.5,
        saliency="gradcam",
        diversity_bn="eval",
        adv_eps=0.01,
        diversity_pairs=0,  # the paper's term over all pairs (one drawn pair: test_diversity_pairs)
        extra={},
    )
    base.update(overrides)
    return SimpleNamespace(**base)


def tiny_ensemble(n: int = 3, seed: int = 0) -> Ensemble:
    torch.manual_seed(seed)
    return Ensemble([TinyBNNet() for _ in range(n)], mean=[0.5], std=[0.25])


def step_batch(
    n: int, shape: tuple[int, int, int], b: int = 8, classes: int = 4, seed: int = 0
) -> StepBatch:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(b, *shape, generator=g) for _ in range(n)]
    ys = [torch.randint(0, classes, (b,), generator=g) for _ in range(n)]
    shared = (torch.rand(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g))
    return StepBatch(list(zip(xs, ys, strict=True)), shared, torch.rand(b, *shape, generator=g))


def with_aux(name: str, ens: Ensemble, batch: StepBatch, classes: int = 4) -> StepBatch:
    """The batch with the method's auxiliary module (DICE's discriminator), seeded, if any."""
    make = getattr(METHODS[name], "make_aux", None)
    if make is None:
        return batch
    torch.manual_seed(1)
    return dataclasses.replace(batch, aux=make(ens, classes, batch.shared[0]))


# -- hand-computed loss terms ---------------------------------------------------------------------


def test_default_lambda() -> None:
    assert GRAY28_LAMBDA == 1.0  # chosen on validation OOD (docs: "λ at convergence")
    assert default_lambda(1, 28) == GRAY28_LAMBDA
    assert default_lambda(1, (28, 28)) == GRAY28_LAMBDA
    assert default_lambda(3, 28) == 0.005  # colour 28x28 is not MNIST-like
    assert default_lambda(1, 32) == 0.005
    assert default_lambda(3, (32, 32)) == 0.005


def test_oe_loss_hand_value() -> None:
    # One outlier, one member, logits [0, log 3]: logsumexp = log 4, mean = log(3) / 2.
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert float(oe_loss(logits)) == pytest.approx(math.log(4.0) - math.log(3.0) / 2, abs=1e-6)
    # Equal logits c (what OE asks for): logsumexp = c + log L, mean = c, so the loss is log L.
    flat = torch.full((2, 3, 5), 1.7)
    assert float(oe_loss(flat)) == pytest.approx(math.log(5.0), abs=1e-6)


def test_ncl_penalty_hand_value_and_pairs() -> None:
    # Two members: dev_1 = (p1 - p2) / 2 = -dev_2, so the single pair gives -||p1 - p2||^2 / 4.
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]])
    p = logits.softmax(-1)[0]
    expected = -((p[0] - p[1]) ** 2).sum() / 4
    torch.testing.assert_close(ncl_penalty(logits), expected)
    # Three members, two samples: mean over the 3 unordered pairs and the batch.
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    q = z.softmax(-1)
    d = q - q.mean(1, keepdim=True)
    pairs = [(0, 1), (0, 2), (1, 2)]
    ref = sum((d[:, i] * d[:, j]).sum(-1) for i, j in pairs) / 3
    torch.testing.assert_close(ncl_penalty(z), ref.mean())


def test_adp_terms_hand_value() -> None:
    logits = torch.tensor([[[1.0, 0.0, 2.0], [0.5, 0.5, -1.0]]])  # B=1, N=2, L=3
    y = torch.tensor([2])
    p = logits.softmax(-1)[0]
    mean_p = p.mean(0)
    entropy = -(mean_p * mean_p.log()).sum()
    a = p[:, :2] / p[:, :2].norm(dim=-1, keepdim=True)  # drop the true class 2, normalise
    c = (a[0] * a[1]).sum()
    log_det = torch.log((1 + 1e-5) ** 2 - c**2)  # det [[1, c], [c, 1]] + 1e-5 I
    h, ld = adp_terms(logits, y)
    torch.testing.assert_close(h, entropy)
    torch.testing.assert_close(ld, log_det, rtol=1e-4, atol=1e-5)


def test_shared_ce_is_mean_of_member_ce() -> None:
    z = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 1, 1, 2])
    ref = sum(F.cross_entropy(z[:, i], y) for i in range(3)) / 3
    torch.testing.assert_close(shared_ce(z, y), ref)


def test_sdde_loss_is_mean_ce_plus_lambda_times_diversity_loss() -> None:
    torch.manual_seed(0)
    ens = build_ensemble("lenet", members=3, num_classes=4, in_chans=1, mean=[0.5], std=[0.25])
    batch = step_batch(3, (1, 28, 28))
    loss, logs = METHODS["sdde"].loss(ens, batch, cfg())
    assert logs["lambda_div"] == GRAY28_LAMBDA  # default for 28x28 gray
    with torch.no_grad():
        ce = (
            sum(
                F.cross_entropy(m(ens.normalize(x)), y)
                for m, (x, y) in zip(ens.members, batch.member_batches, strict=True)
            )
            / 3
        )
    ens.eval()
    maps = gradcam(ens, *batch.shared, create_graph=False)
    sim = diversity_similarity(maps, "gradcam")  # the official cosine: the logged metric
    div = diversity_loss(maps, "gradcam")  # the bounded loss (test_diversity_loss.py)
    assert logs["ce"] == pytest.approx(float(ce), abs=1e-5)
    assert logs["cam_similarity"] == pytest.approx(float(sim.detach()), abs=1e-5)
    assert logs["div"] == pytest.approx(float(div.detach()), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(
        float(ce) + GRAY28_LAMBDA * float(div.detach()), abs=1e-5
    )
    _, logs = METHODS["sdde"].loss(ens, batch, cfg(lambda_div=0.3))
    assert logs["lambda_div"] == 0.3


def test_de_adv_matches_reference_fgsm() -> None:
    ens = tiny_ensemble(2)
    batch = step_batch(2, (1, 8, 8))
    loss, logs = METHODS["de-adv"].loss(ens, batch, cfg(adv_eps=0.05))
    ref_adv = []
    for m, (x, y) in zip(ens.members, batch.member_batches, strict=True):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(ens.normalize(xr)), y), xr)
        x_adv = (x + 0.05 * g.sign()).clamp(0, 1)
        ref_adv.append(F.cross_entropy(m(ens.normalize(x_adv)), y))
    assert logs["adv"] == pytest.approx(float(sum(ref_adv).detach()) / 2, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(logs["ce"] + logs["adv"], abs=1e-5)


# -- BatchNorm mode of the diversity pass --------------------------------------------------------


def _running_stats(ens: Ensemble) -> list[Tensor]:
    return [b.clone() for name, b in ens.named_buffers() if "running" in name]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_diversity_bn_mode(mode: str) -> None:
    batch = step_batch(3, (1, 8, 8))
    ens, ref = tiny_ensemble(), tiny_ensemble()
    ens.train()
    ref.train()
    METHODS["sdde"].loss(ens, batch, cfg(diversity_bn=mode))
    member_ce(ref, batch)  # the cross-entropy pass alone
    assert all(m.training for m in ens.modules())  # modes restored after the diversity pass
    same = all(
        torch.equal(a, b) for a, b in zip(_running_stats(ens), _running_stats(ref), strict=True)
    )
    # eval: the shared batch uses and leaves the running statistics; train: it updates them.
    assert same == (mode == "eval")
    with pytest.raises(ValueError, match="unknown BatchNorm mode"), batchnorm_mode(ens, "frozen"):
        pass


# -- every method trains -------------------------------------------------------------------------

VARIANTS = [(name, {}) for name in METHODS] + [
    ("sdde", {"saliency": "inputgrad"}),
    ("sdde", {"diversity_bn": "train"}),
    ("sdde-oe", {"saliency": "inputgrad"}),
]


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_each_method_trains_a_few_steps(name: str, overrides: dict[str, str]) -> None:
    ens = tiny_ensemble(3).train()
    batch = with_aux(name, ens, step_batch(3, (1, 8, 8), b=16))
    opt = torch.optim.SGD(ens.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss, logs = METHODS[name].loss(ens, batch, cfg(**overrides))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert all(math.isfinite(v) for v in logs.values()), logs
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in ens.parameters())
    assert losses[-1] < losses[0], losses
    assert "ce" in logs and logs["loss"] == pytest.approx(losses[-1])


def test_lenet_sdde_trains_and_diversifies() -> None:
    torch.manual_seed(0)
    ens = build_ensemble("lenet", members=3, num_classes=4, in_chans=1, mean=[0.5], std=[0.25])
    batch = step_batch(3, (1, 28, 28), b=8)
    opt = torch.optim.SGD(ens.parameters(), lr=0.05, momentum=0.9)
    history = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss, logs = METHODS["sdde"].loss(ens, batch, cfg(lambda_div=1.0))
        loss.backward()
        opt.step()
        history.append((float(loss.detach()), logs["cam_similarity"]))
    assert history[-1][0] < history[0][0]
    assert history[-1][1] < history[0][1]  # the diversity term does its job


def test_bad_inputs_give_clear_errors() -> None:
    ens = tiny_ensemble(3)
    batch = step_batch(3, (1, 8, 8))
    with pytest.raises(UserError, match="needs an outlier batch"):
        METHODS["oe"].loss(ens, StepBatch(batch.member_batches, batch.shared, None), cfg())
    with pytest.raises(ValueError, match="2 member batches for 3 members"):
        METHODS["de"].loss(ens, StepBatch(batch.member_batches[:2], batch.shared), cfg())
    with pytest.raises(ValueError, match="unknown saliency kind 'lime'"):
        METHODS["sdde"].loss(ens, batch, cfg(saliency="lime"))
    with pytest.raises(UserError, match="--saliency must be one of"):
        TrainConfig(saliency="lime").validate()
    with pytest.raises(ValueError, match=r"expected images \[B, 1, H, W\]"):
        ens(torch.rand(2, 3, 8, 8))
    assert registry.names(needs_outliers=True) == ("oe", "sdde-oe")


def test_loss_module_is_the_method_loss() -> None:
    ens = tiny_ensemble(2).eval()
    batch = step_batch(2, (1, 8, 8))
    a, _ = LossModule(ens, METHODS["sdde"])(batch, cfg())
    b, _ = METHODS["sdde"].loss(ens, batch, cfg())
    torch.testing.assert_close(a, b)


# -- fused (vmap) backend == loop backend ---------------------------------------------------------


def _grads(ens: Ensemble) -> dict[str, Tensor]:
    return {k: p.grad for k, p in ens.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(METHODS))
def test_fused_and_loop_give_same_losses_and_gradients(name: str) -> None:
    loop = tiny_ensemble(3).train()
    fused = copy.deepcopy(loop).set_backend("fused")
    batch = with_aux(name, loop, step_batch(3, (1, 8, 8)))
    results = []
    for ens in (loop, fused):
        loss, logs = METHODS[name].loss(ens, batch, cfg())
        loss.backward()
        results.append((loss, logs, _grads(ens), dict(ens.named_buffers())))
    (l1, logs1, g1, b1), (l2, logs2, g2, b2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert logs1.keys() == logs2.keys()
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in b1:  # BatchNorm running statistics updated identically
        torch.testing.assert_close(b1[k], b2[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fused_lenet_logits_features_and_cams_match_loop() -> None:
    torch.manual_seed(0)
    loop = build_ensemble("lenet", members=3, num_classes=10, in_chans=1, mean=[0.5], std=[0.25])
    fused = copy.deepcopy(loop).set_backend("fused")
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(loop(x), fused(x), rtol=1e-5, atol=1e-6)
    for a, b in zip(loop.forward_features(x), fused.forward_features(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        gradcam(loop, x, y, create_graph=False),
        gradcam(fused, x, y, create_graph=False),
        rtol=1e-4,
        atol=1e-6,
    )
    # Unequal per-member batch sizes fall back to the loop and still agree.
    xs = [x[:2], x[:3], x]
    for a, b in zip(loop.forward_each(xs), fused.forward_each(xs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The fused helper adds nothing to the checkpoint.
    assert list(loop.state_dict()) == list(fused.state_dict())
