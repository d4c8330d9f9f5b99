"""Similarity of the members' class-activation maps (the SDDE paper's Figure 5), numpy only.

The normalisation is the official code's (``corl-team/sdde``,
``openood/trainers/diversity/gradcam.py`` and ``common.py``), the same that the training loss
uses (``training.saliency.normalize_maps``):

1. crop a 1-pixel border (GradCAM maps of padded convolutions have edge artefacts),
2. standardise each map: ``(m - mean) / (std + 1e-6)`` with the population std,
3. L2-normalise the flattened map: ``m / (||m|| + 1e-6)``,
4. cosine = dot product of the normalised maps, averaged over the N(N-1)/2 member pairs and
   then over images.

The maps themselves (GradCAM of the predicted class, ReLU applied) come from the exported graph's
``cams`` output; this module only compares them.
"""

from __future__ import annotations

import numpy as np

from sdde_serve.errors import UserError

STD_EPS = 1e-6
NORM_EPS = 1e-6
BORDER = 1


class MapsTooSmallError(UserError, ValueError):
    """Maps that cropping the border leaves empty: the similarity is not the training's one.

    A :class:`UserError` for ``sdde eval`` (one line, exit 2), a ``ValueError`` as the training
    side's ``training.saliency.normalize_maps`` raises for the same maps."""


def normalize_maps(maps: np.ndarray, border: int = BORDER) -> np.ndarray:
    """``[B, N, h, w]`` maps -> ``[B, N, D]`` standardised, L2-normalised, border-cropped."""
    maps = np.asarray(maps, np.float64)
    if maps.ndim != 4:
        raise ValueError(f"CAMs must be [B, N, h, w], got {maps.shape}")
    h, w = maps.shape[2:]
    if h <= 2 * border or w <= 2 * border:
        # the training loss refuses these maps too: a whole-map similarity would be another metric
        raise MapsTooSmallError(
            f"saliency maps of {h}x{w} leave nothing after cropping a {border}-pixel border; "
            "choose an earlier saliency layer or a larger input size (or --cam-images 0)"
        )
    if border > 0:
        maps = maps[:, :, border:-border, border:-border]
    flat = maps.reshape(*maps.shape[:2], -1)
    flat = (flat - flat.mean(axis=2, keepdims=True)) / (flat.std(axis=2, keepdims=True) + STD_EPS)
    return flat / (np.linalg.norm(flat, axis=2, keepdims=True) + NORM_EPS)


def pairwise_cosine_per_image(maps: np.ndarray, border: int = BORDER) -> np.ndarray:
    """``[B]`` mean cosine similarity over unordered member pairs, per image."""
    z = normalize_maps(maps, border)
    n = z.shape[1]
    if n < 2:
        raise ValueError("CAM similarity needs at least two members")
    gram = z @ z.transpose(0, 2, 1)  # [B, N, N]
    iu = np.triu_indices(n, k=1)
    return gram[:, iu[0], iu[1]].mean(axis=1)


def mean_pairwise_cosine(maps: np.ndarray, border: int = BORDER) -> float:
    """Mean over images and member pairs of the cosine similarity of normalised CAMs."""
    return float(pairwise_cosine_per_image(maps, border).mean())
