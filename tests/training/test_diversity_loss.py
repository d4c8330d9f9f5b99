"""The bounded SDDE diversity loss: by hand on a 2-member toy, its gradient on near-constant
maps (the cause of dead members), and its agreement with the official cosine elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.saliency import FLOOR, diversity_loss, diversity_similarity


def _reference(maps: np.ndarray, kind: str) -> float:
    """float64 numpy: crop (gradcam), centre (gradcam), v / sqrt(|v|^2 + d_n^2) with
    d_n^2 = FLOOR^2 * mean_b |v_bn|^2, then the mean over pairs and the batch of <v_bi, v_bj>."""
    m = maps.astype(np.float64)
    if kind == "gradcam":
        m = m[..., 1:-1, 1:-1]
    b, n = m.shape[:2]
    v = m.reshape(b, n, -1)
    if kind == "gradcam":
        v = v - v.mean(-1, keepdims=True)
    sq = (v**2).sum(-1)  # [B, N]
    delta_sq = FLOOR**2 * sq.mean(0)  # [N]
    u = v / np.sqrt(sq + delta_sq)[..., None]
    dots = [u[k, i] @ u[k, j] for k in range(b) for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(dots))


def test_two_member_toy_by_hand() -> None:
    # One sample, two members, 3x3 maps: cropping leaves the centre pixel only, so use 4x4.
    a = np.array([[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 6, 0], [0, 0, 0, 0]], dtype=np.float32)
    b = np.array([[5, 5, 5, 5], [5, 6, 1, 5], [5, 1, 0, 5], [5, 5, 5, 5]], dtype=np.float32)
    maps = np.stack([a, b])[None]  # [1, 2, 4, 4]
    # By hand: centred a = [-2, -1, 0, 3] (|a|^2 = 14), centred b = [4, -1, -1, -2] (|b|^2 = 22);
    # with one sample d^2 = FLOOR^2 |.|^2, so the loss is <a, b> / sqrt(14 * 22) / (1 + FLOOR^2).
    expected = (-8 + 1 + 0 - 6) / np.sqrt(14 * 22) / (1 + FLOOR**2)
    got = float(diversity_loss(torch.from_numpy(maps), "gradcam"))
    assert got == pytest.approx(expected, abs=1e-6)
    assert got == pytest.approx(_reference(maps, "gradcam"), abs=1e-6)


@pytest.mark.parametrize("kind", ["gradcam", "inputgrad"])
def test_matches_float64_reference_on_random_maps(kind: str) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((6, 3, 5, 5)).astype(np.float32) ** 3
    maps[0, 1] = 0.25  # a constant map: centred to zero, it adds 0 (not NaN) to the mean
    got = float(diversity_loss(torch.from_numpy(maps), kind))
    assert got == pytest.approx(_reference(maps, kind), abs=1e-6)


def test_scale_invariant_per_member_and_close_to_the_official_cosine() -> None:
    torch.manual_seed(0)
    maps = torch.rand(8, 3, 5, 5)
    scaled = maps * torch.tensor([1.0, 1e-4, 1e3]).view(1, 3, 1, 1)
    torch.testing.assert_close(diversity_loss(scaled, "gradcam"), diversity_loss(maps, "gradcam"))
    # maps of similar contrast: the floor only shrinks each cosine by about 1 / (1 + FLOOR^2)
    official = float(diversity_similarity(maps, "gradcam"))
    assert float(diversity_loss(maps, "gradcam")) == pytest.approx(official, rel=0.05)


def _map_grad(maps: torch.Tensor, fn) -> torch.Tensor:
    maps = maps.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(maps), maps)
    return grad


def test_near_constant_map_gets_a_bounded_gradient() -> None:
    # What an untrained LeNet gives on colour images: maps of std ~1e-4, one of them near-flat.
    torch.manual_seed(0)
    maps = 1e-4 * torch.rand(16, 2, 5, 5)
    maps[3, 1] = 2e-4 + 1e-9 * torch.rand(5, 5)
    new = _map_grad(maps, lambda m: diversity_loss(m, "gradcam"))
    old = _map_grad(maps, lambda m: diversity_similarity(m, "gradcam"))
    typical = old.flatten(1).norm(dim=1).median()
    assert torch.isfinite(new).all()
    # the official normalisation: the near-flat map's gradient dwarfs every other one
    assert old[3].norm() > 1e3 * typical
    # the bounded loss: its gradient is at most 1/delta per map, delta = FLOOR * the member's rms
    # map norm; here that is within a small multiple of the typical gradient
    centred = maps[..., 1:-1, 1:-1].flatten(2)
    centred = centred - centred.mean(-1, keepdim=True)
    delta = FLOOR * centred.pow(2).sum(-1).mean(0).sqrt()  # [N]
    per_map = new.flatten(2).norm(dim=-1)  # [B, N]
    # d mean_over(B * pairs) / d map <= (1 / delta) / B per map (one pair here)
    assert (per_map <= 1.0 / (delta * maps.shape[0]) + 1e-6).all()
    assert new[3, 1].norm() < 20 * typical


def test_all_zero_maps_give_zero_loss_and_zero_gradient() -> None:
    maps = torch.zeros(4, 3, 5, 5)
    grad = _map_grad(maps, lambda m: diversity_loss(m, "gradcam"))
    assert float(diversity_loss(maps, "gradcam")) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
