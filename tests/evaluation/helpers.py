"""Small seeded OOD sets for evaluation tests: uniform noise and scikit-image textures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_npz(path: Path, n: int, size: int, seed: int = 0, high: int = 256) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, high, (n, 1, size, size), dtype=np.uint8))
    return path


def texture_npz(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """Random crops of scikit-image's bundled brick/grass/gravel textures, resized to ``size``."""
    import skimage.data

    rng = np.random.default_rng(seed)
    textures = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()]
    crops = []
    for i in range(n):
        tex = textures[i % len(textures)]
        y, x = rng.integers(0, tex.shape[0] - 64, size=2)
        crop = Image.fromarray(tex[y : y + 64, x : x + 64]).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        crops.append(np.asarray(crop, np.uint8))
    np.savez(path, images=np.stack(crops)[:, None])
    return path


def labelled_npz(path: Path, n: int, size: int, classes: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        images=rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8),
        labels=rng.integers(0, classes, n),
    )
    return path


def check_png(path: Path, min_bytes: int = 5000) -> None:
    """A real, non-blank PNG: valid header, decodes, reasonable size, more than one colour."""
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(path) as img:
        img.load()
        assert img.width >= 200 and img.height >= 150, (path, img.size)
        arr = np.asarray(img.convert("L"), np.float64)
    assert arr.std() > 5.0, path  # not a blank canvas
