"""CAM similarity: official normalisation (crop border, standardise, L2) on hand-made maps."""

from __future__ import annotations

import numpy as np
import pytest

from sdde_serve.evaluation.cams import (
    mean_pairwise_cosine,
    normalize_maps,
    pairwise_cosine_per_image,
)

INNER = np.array([[1.0, 2.0], [3.0, 4.0]])


def _with_border(inner: np.ndarray, border_value: float) -> np.ndarray:
    out = np.full((4, 4), border_value)
    out[1:3, 1:3] = inner
    return out


def test_normalisation_by_hand() -> None:
    maps = _with_border(INNER, 100.0)[None, None]
    z = normalize_maps(maps)
    # inner values 1..4: mean 2.5, population std sqrt(1.25); then unit L2 norm
    std = np.sqrt(1.25)
    expected = (INNER.ravel() - 2.5) / (std + 1e-6)
    expected /= np.linalg.norm(expected) + 1e-6
    np.testing.assert_allclose(z[0, 0], expected, rtol=1e-12)


def test_cosine_by_hand_and_border_ignored() -> None:
    a = _with_border(INNER, 0.0)
    same_shape = _with_border(2 * INNER + 5, -50.0)  # affine copy, different border
    flipped = _with_border(INNER[::-1, ::-1], 9.0)  # values 4..1: exactly anti-correlated
    maps = np.stack([a, same_shape, flipped])[None]  # [1, 3, 4, 4]
    per_pair = [1.0, -1.0, -1.0]  # (a, same), (a, flipped), (same, flipped)
    assert mean_pairwise_cosine(maps) == pytest.approx(np.mean(per_pair), abs=1e-5)


def test_orthogonal_maps_and_per_image_mean() -> None:
    # inner 3x3 maps (5x5 with border); two zero-mean orthogonal patterns
    p = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], float)
    q = p.T
    assert float((p * q).sum()) == 0.0
    img1 = np.stack([np.pad(p, 1), np.pad(q, 1)])  # cosine 0
    img2 = np.stack([np.pad(p, 1), np.pad(p, 1)])  # cosine 1
    maps = np.stack([img1, img2])
    np.testing.assert_allclose(pairwise_cosine_per_image(maps), [0.0, 1.0], atol=1e-5)
    assert mean_pairwise_cosine(maps) == pytest.approx(0.5, abs=1e-5)


def test_constant_map_is_zero_not_nan() -> None:
    maps = np.stack([np.ones((4, 4)), _with_border(INNER, 0.0)])[None]
    assert mean_pairwise_cosine(maps) == pytest.approx(0.0)


def test_needs_two_members() -> None:
    with pytest.raises(ValueError, match="two members"):
        mean_pairwise_cosine(np.zeros((2, 1, 4, 4)))


def test_same_as_the_training_loss_similarity() -> None:
    """Equivalent paths: the numpy metric equals training.saliency's torch implementation."""
    import torch

    from training.saliency import diversity_similarity

    rng = np.random.default_rng(0)
    maps = np.maximum(rng.normal(0.2, 1.0, (6, 4, 5, 5)), 0.0)  # ReLU'd, like GradCAM
    expected = float(diversity_similarity(torch.from_numpy(maps), "gradcam"))
    # training's version L2-normalises twice (normalize_maps, then the cosine), so its eps of
    # 1e-6 enters twice; the official code and this module normalise once: ~1e-7 apart
    assert mean_pairwise_cosine(maps) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (1, 6), (6, 2), (3, 3), (3, 5), (6, 4)])
def test_numpy_and_torch_normalisation_agree_on_every_map_size(size: tuple[int, int]) -> None:
    """Before: on maps of 2 pixels or fewer a side, numpy kept the whole map (a number unlike
    the training loss's) while torch refused them; now both refuse, and agree elsewhere."""
    import torch

    from training.saliency import normalize_maps as torch_normalize_maps

    maps = np.random.default_rng(1).normal(size=(2, 3, *size))
    try:
        expected = torch_normalize_maps(torch.from_numpy(maps)).double().numpy()
    except ValueError as exc:
        with pytest.raises(ValueError, match="leave nothing after cropping") as info:
            normalize_maps(maps)
        assert str(exc).split(";")[0] == str(info.value).split(";")[0]
        return
    np.testing.assert_allclose(normalize_maps(maps), expected, atol=1e-6)
