"""Write a few sample images for trying a served digits model: ``python -m sdde_serve.samples DIR``.

``digit.png`` is a held-out digit (in-distribution), ``noise.png`` uniform noise and
``photo.png`` a gradient pattern (both out-of-distribution for a digits model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sdde_serve.data import chw_to_pil, load_dataset


def write_samples(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    test = load_dataset("digits", split="test")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    images = {
        "digit.png": chw_to_pil(test.images[0]).resize((64, 64), Image.Resampling.NEAREST),
        "noise.png": Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)),
        "photo.png": Image.fromarray(((xx * 4 + yy * 2) % 256).astype(np.uint8)),
    }
    paths = []
    for name, img in images.items():
        img.save(directory / name)
        paths.append(directory / name)
    return paths


if __name__ == "__main__":
    for p in write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "samples")):
        print(p)
