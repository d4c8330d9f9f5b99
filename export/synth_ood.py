"""Validation OOD data synthesized from in-distribution images, for ``--ood-score auto``.

Without ``--ood-val`` sets, ``auto`` had nothing to measure and deployed a score chosen on
another data set. Outlier-exposure work builds surrogate outliers from the in-distribution data
itself (Hendrycks et al., ICLR 2019; patch permutations as in Tack et al., CSI, NeurIPS 2020;
between-class mixtures as in Thulasidasan et al., NeurIPS 2019): images that keep the low-level
statistics of the data (ink, texture, colour histogram) but not its classes. Each kind below
does one such thing, on uint8 ``[N, C, H, W]`` images at the data's own size:

* ``patch-shuffle``: a 4 x 4 grid of patches permuted (local strokes kept, shape destroyed);
* ``pixel-permute``: every pixel position permuted (the histogram kept, all structure gone);
* ``corrupt``: a strong Gaussian blur (sigma = side / 10) plus Gaussian noise (sd 64 grey levels);
* ``mixup``: the pixel mean of two images of different classes (a class mixture).

``DEFAULT_KINDS`` leaves ``corrupt`` out (measured on real validation OOD, see below).

Deterministic: the same images, kinds, size and seed give the same sets, whatever the order
of the kinds (each kind draws from its own stream, seeded by ``(seed, kind)``). numpy only.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from sdde_serve.errors import UserError

KINDS = ("patch-shuffle", "pixel-permute", "corrupt", "mixup")
# what export synthesizes by default: of the 15 subsets of KINDS, the largest whose choice
# matched the choice on real validation OOD (letters, photo crops) on every MNIST run measured;
# ``corrupt`` favoured logit scores that did worse there (docs/export.md, benchmarks/
# synth_ood_mnist.py)
DEFAULT_KINDS = ("patch-shuffle", "pixel-permute", "mixup")
PER_KIND = 500  # images per kind (fewer when the source has fewer)
SEED = 0
GRID = 4  # patch-shuffle: patches per side
NOISE_SD = 64.0  # corrupt: grey levels
BLUR_FRACTION = 0.1  # corrupt: Gaussian sigma as a fraction of the image side


def patch_shuffle(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute the GRID x GRID patches of each image (a border that does not divide stays)."""
    n, c, h, w = images.shape
    ph, pw = h // GRID, w // GRID
    out = images.copy()
    core = out[:, :, : ph * GRID, : pw * GRID].reshape(n, c, GRID, ph, GRID, pw)
    patches = core.transpose(0, 2, 4, 1, 3, 5).reshape(n, GRID * GRID, c, ph, pw)
    order = np.argsort(rng.random((n, GRID * GRID)), axis=1)
    shuffled = np.take_along_axis(patches, order[:, :, None, None, None], axis=1)
    grid = shuffled.reshape(n, GRID, GRID, c, ph, pw).transpose(0, 3, 1, 4, 2, 5)
    out[:, :, : ph * GRID, : pw * GRID] = grid.reshape(n, c, ph * GRID, pw * GRID)
    return out


def pixel_permute(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute the pixel positions of each image (channels move together)."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)
    order = np.argsort(rng.random((n, h * w)), axis=1)
    return np.take_along_axis(flat, order[:, None, :], axis=2).reshape(n, c, h, w)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float ``[N, C, H, W]``, edges padded, truncated at 3 sigma."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = images
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        window = np.arange(out.shape[axis])
        out = sum(t * np.take(padded, window + i, axis=axis) for i, t in enumerate(taps))
    return out


def corrupt(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strong blur, then Gaussian noise, clipped to uint8."""
    sigma = BLUR_FRACTION * max(images.shape[2:])
    blurred = gaussian_blur(images.astype(np.float64), sigma)
    noisy = blurred + rng.normal(0.0, NOISE_SD, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def mixup(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mean of each image and a random partner of another class (any image if one class)."""
    partner = np.empty(len(images), np.int64)
    for c in np.unique(labels):
        mine = labels == c
        others = np.flatnonzero(~mine) if not mine.all() else np.arange(len(images))
        partner[mine] = others[rng.integers(len(others), size=int(mine.sum()))]
    mixed = (images.astype(np.uint16) + images[partner].astype(np.uint16) + 1) // 2
    return mixed.astype(np.uint8)


KIND_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "patch-shuffle": patch_shuffle,
    "pixel-permute": pixel_permute,
    "corrupt": corrupt,
    "mixup": mixup,
}


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--synth-ood``: ``default``, ``all``, ``none`` or comma-separated kinds -> the kinds."""
    text = text.strip()
    if text in ("default", "all"):
        return DEFAULT_KINDS if text == "default" else KINDS
    if text == "none":
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KIND_FUNCTIONS]
    if bad or not kinds:
        raise UserError(
            f"--synth-ood must be default, all, none or a comma-separated list of "
            f"{', '.join(KINDS)}; "
            f"got {text!r}"
        )
    return tuple(dict.fromkeys(kinds))


def kind_rng(seed: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(kind.encode())])


def synthesize(
    images: np.ndarray,
    labels: np.ndarray | None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    *,
    per_kind: int = PER_KIND,
    seed: int = SEED,
) -> dict[str, np.ndarray]:
    """``{kind: uint8 [n, C, H, W]}``: each kind applied to its own seeded draw of ``images``
    (without replacement, ``n = min(per_kind, len(images))``)."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) < 2:
        raise ValueError("synthesize needs at least two uint8 [N, C, H, W] images")
    labels = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels)
    out = {}
    for kind in kinds:
        rng = kind_rng(seed, kind)
        idx = np.sort(rng.choice(len(images), size=min(per_kind, len(images)), replace=False))
        out[kind] = KIND_FUNCTIONS[kind](images[idx], labels[idx], rng)
    return out
