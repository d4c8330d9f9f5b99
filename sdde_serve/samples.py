"""Write a few sample images for trying a served digits model: ``python -m sdde_serve.samples DIR``.

``digit.png`` is a held-out digit (in-distribution), ``noise.png`` uniform noise and
``photo.png`` a landscape drawn procedurally (sky, sun, a ridge and textured ground), so that
it needs no download and no extra package. Natural images have a roughly 1/f amplitude
spectrum (Field, 1987): the ground and the sky's grain are seeded 1/f noise. Both are far from
digits (white strokes on black): ``make demo``'s detector flags them with p at its floor on
every seed measured (docs/export.md, "Synthesized validation OOD data").
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sdde_serve.data import chw_to_pil, load_dataset

PHOTO_SIZE = 128


def pink_noise(n: int, seed: int, beta: float = 1.0) -> np.ndarray:
    """``[n, n]`` noise with amplitude ~ 1/f^beta, zero mean and unit standard deviation."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :])
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**beta
    spectrum[0, 0] = 0.0
    img = np.fft.irfft2(spectrum, s=(n, n))
    return (img - img.mean()) / img.std()


def landscape(n: int = PHOTO_SIZE) -> np.ndarray:
    """A gray ``[n, n]`` uint8 landscape: bright sky darkening downwards, a sun, a wavy ridge
    and 1/f-textured ground below it, all fixed by seeds."""
    yy, xx = np.mgrid[0:n, 0:n] / n
    sky = 200.0 - 60.0 * yy
    sun = 255.0 * (np.hypot(yy - 0.22, xx - 0.72) < 0.09)
    ridge = 0.55 + 0.08 * np.sin(6 * xx + 1) + 0.04 * np.sin(17 * xx)
    ground = 90.0 + 25.0 * pink_noise(n, seed=1)
    img = np.where(yy > ridge, ground, np.maximum(sky, sun)) + 6.0 * pink_noise(n, 2, beta=1.5)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_samples(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    test = load_dataset("digits", split="test")
    rng = np.random.default_rng(0)
    images = {
        "digit.png": chw_to_pil(test.images[0]).resize((64, 64), Image.Resampling.NEAREST),
        "noise.png": Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)),
        "photo.png": Image.fromarray(landscape()),
    }
    paths = []
    for name, img in images.items():
        img.save(directory / name)
        paths.append(directory / name)
    return paths


if __name__ == "__main__":
    for p in write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "samples")):
        print(p)
