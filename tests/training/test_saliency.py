"""Saliency maps and the SDDE similarity, against hand computations and reference loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from training.ensemble import Ensemble, build_ensemble
from training.models import SplitModel
from training.saliency import (
    cam_similarity,
    diversity_similarity,
    gradcam,
    input_gradient,
    mean_pairwise_cosine,
    normalize_maps,
    saliency_maps,
)


class TinyCAMNet(SplitModel):
    """conv -> global average pool -> linear: GradCAM has a closed form.

    z_c = sum_k W[c, k] * mean_hw A_k + b_c, so dz_c/dA_k(h, w) = W[c, k] / (h w): the channel
    weights are W[c, k] / (h w) and CAM = ReLU(sum_k W[c, k] / (h w) * A_k).
    """

    stage_names = ("conv",)

    def __init__(self, in_chans: int = 1, channels: int = 3, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, channels, 3, padding=1)
        self.fc = nn.Linear(channels, num_classes)
        self._set_split(num_classes, in_chans, "conv")

    def stage(self, name: str) -> nn.Module:
        return self.conv

    def classifier(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def _lenet_ensemble(n: int = 3) -> Ensemble:
    torch.manual_seed(0)
    return build_ensemble("lenet", members=n, num_classes=10, in_chans=1, mean=[0.5], std=[0.25])


# -- normalisation and similarity ---------------------------------------------------------------


def test_normalize_maps_matches_hand_computation_on_4x4() -> None:
    m = torch.tensor(
        [[9.0, 9.0, 9.0, 9.0], [9.0, 1.0, 2.0, 9.0], [9.0, 3.0, 6.0, 9.0], [9.0, 9.0, 9.0, 9.0]]
    )
    # Crop the border -> [1, 2, 3, 6]; mean 3; deviations [-2, -1, 0, 3]; population std
    # sqrt(14 / 4); standardised = dev / std; L2-normalised = dev / ||dev|| = dev / sqrt(14).
    std = math.sqrt(14 / 4)
    z = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-6)
    expected = z / (z.norm() + 1e-6)
    torch.testing.assert_close(expected, torch.tensor([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(14))
    out = normalize_maps(m.view(1, 1, 4, 4))
    assert out.shape == (1, 1, 4)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-7)


def test_normalize_maps_constant_map_is_zero_and_tiny_maps_are_rejected() -> None:
    out = normalize_maps(torch.full((1, 2, 5, 5), 3.0))
    assert torch.equal(out, torch.zeros(1, 2, 9))
    with pytest.raises(ValueError, match="2x2 leave nothing"):
        normalize_maps(torch.rand(1, 2, 2, 2))


def test_identical_maps_have_similarity_one() -> None:
    g = torch.Generator().manual_seed(0)
    one = torch.rand(4, 1, 6, 6, generator=g)
    maps = one.expand(4, 3, 6, 6)
    torch.testing.assert_close(diversity_similarity(maps, "gradcam"), torch.tensor(1.0))
    # Positive rescaling of a map does not change its standardised shape either.
    scaled = torch.cat([one, 5 * one, one + 2], dim=1)
    torch.testing.assert_close(diversity_similarity(scaled, "gradcam"), torch.tensor(1.0))


def test_pairwise_mean_covers_each_pair_once() -> None:
    # Sample 0: three members with known cosines: (e1, e2) = 0, (e1, d) = (e2, d) = 1/sqrt(2).
    # Sample 1: identical members, every cosine 1.
    s0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    s1 = torch.tensor([[2.0, 1.0], [2.0, 1.0], [4.0, 2.0]])
    maps = torch.stack([s0, s1])  # [B=2, N=3, D=2]
    expected_s0 = (0.0 + 2 / math.sqrt(2)) / 3  # mean over the 3 unordered pairs
    expected = (expected_s0 + 1.0) / 2  # mean over the batch
    torch.testing.assert_close(mean_pairwise_cosine(maps), torch.tensor(expected))
    # Trailing dims are flattened: the same numbers as [B, N, 1, 2] maps.
    torch.testing.assert_close(mean_pairwise_cosine(maps.view(2, 3, 1, 2)), torch.tensor(expected))
    with pytest.raises(ValueError, match="at least 2 members"):
        mean_pairwise_cosine(maps[:, :1])


# -- GradCAM --------------------------------------------------------------------------------------


def test_gradcam_equals_closed_form_for_linear_head() -> None:
    torch.manual_seed(0)
    members = [TinyCAMNet() for _ in range(2)]
    ens = Ensemble(members, mean=[0.5], std=[0.25]).eval()
    x = torch.rand(3, 1, 5, 5)
    y = torch.tensor([0, 3, 1])
    maps = gradcam(ens, x, y, create_graph=False)
    assert maps.shape == (3, 2, 5, 5)
    xn = (x - 0.5) / 0.25
    for i, m in enumerate(members):
        with torch.no_grad():
            a = m.conv(xn)  # [B, K, 5, 5]
            w = m.fc.weight[y] / 25.0  # [B, K]
            expected = torch.relu((a * w[:, :, None, None]).sum(1))
        torch.testing.assert_close(maps[:, i], expected, rtol=1e-5, atol=1e-6)


def test_gradcam_batched_equals_per_sample_per_member_reference() -> None:
    ens = _lenet_ensemble(3).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 28, 28, generator=g)
    y = torch.tensor([1, 7, 3, 3])
    maps = gradcam(ens, x, y, create_graph=False)
    assert maps.shape == (4, 3, 5, 5)
    xn = ens.normalize(x)
    for b in range(4):
        for i, m in enumerate(ens.members):
            f = m.forward_features(xn[b : b + 1])
            (grad,) = torch.autograd.grad(m.forward_head(f)[0, y[b]], f)
            ref = torch.relu((f * grad.mean(dim=(2, 3), keepdim=True)).sum(1))[0]
            torch.testing.assert_close(maps[b, i], ref, rtol=1e-4, atol=1e-6)


def test_diversity_loss_reaches_weights_on_both_sides_of_the_saliency_layer() -> None:
    ens = _lenet_ensemble(3).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    div = diversity_similarity(gradcam(ens, x, y, create_graph=True), "gradcam")
    div.backward()
    before = ("block1.0.weight", "block2.0.weight")  # produce the feature map
    after = ("block3.0.weight", "classifier1.weight", "fc.weight")  # only via the double backward
    for i, m in enumerate(ens.members):
        params = dict(m.named_parameters())
        for name in before + after:
            grad = params[name].grad
            assert grad is not None and grad.abs().sum() > 0, f"member {i}: no gradient on {name}"

    # Without create_graph the channel weights are constants: the layers after the feature map
    # get no gradient at all. The double backward is what carries L_div past the saliency layer.
    ens.zero_grad(set_to_none=True)
    diversity_similarity(gradcam(ens, x, y, create_graph=False), "gradcam").backward()
    params = dict(ens.members[0].named_parameters())
    assert params["block1.0.weight"].grad is not None
    assert all(params[name].grad is None for name in after)


def test_input_gradient_equals_per_member_reference() -> None:
    ens = _lenet_ensemble(2).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 28, 28, generator=g)
    y = torch.tensor([0, 5, 9])
    grads = input_gradient(ens, x, y, create_graph=False)
    assert grads.shape == (3, 2, 1, 28, 28)
    for i, m in enumerate(ens.members):
        xn = ens.normalize(x).detach().requires_grad_(True)
        (ref,) = torch.autograd.grad(m(xn).gather(1, y[:, None]).sum(), xn)
        torch.testing.assert_close(grads[:, i], ref, rtol=1e-5, atol=1e-7)


def test_pseudo_labels_for_unlabeled_batches_are_the_ensemble_prediction() -> None:
    ens = _lenet_ensemble(3).eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    maps, logits = saliency_maps(ens, x, None, create_graph=False)
    predicted = logits.mean(1).argmax(-1)
    torch.testing.assert_close(maps, gradcam(ens, x, predicted, create_graph=False))


def test_cam_similarity_is_eval_mode_metric_and_restores_modes() -> None:
    ens = _lenet_ensemble(3)
    ens.train()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (10,), generator=g)
    value = cam_similarity(ens, x, y, batch_size=4)  # batches of 4, 4, 2
    assert all(m.training for m in ens.modules())
    ens.eval()
    expected = diversity_similarity(gradcam(ens, x, y, create_graph=False), "gradcam")
    assert value == pytest.approx(float(expected.detach()), abs=1e-5)
    with pytest.raises(ValueError, match="labels must lie in"):
        gradcam(ens, x, torch.full((10,), 10), create_graph=False)
