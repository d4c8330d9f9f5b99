"""Fixtures for the batch scorer: small seeded images (good and bad) and a CLI runner."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdde_serve.cli import main as sdde_main


def write_images(root: Path, n: int, *, seed: int = 0) -> list[Path]:
    """``n`` seeded images of mixed format, mode and size (PNG gray/RGB/RGBA, JPEG) under root."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = root / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(6, 24)), int(rng.integers(6, 24))
        kind = i % 4
        if kind == 0:
            img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
            path = sub / f"img{i:03d}.png"
        elif kind == 1:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            path = sub / f"img{i:03d}.jpg"
        elif kind == 2:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
            path = sub / f"img{i:03d}.png"
        else:
            img = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
            path = sub / f"img{i:03d}.jpeg"
        img.save(path)
        paths.append(path)
    return paths


def write_bad_files(root: Path) -> dict[str, Path]:
    """One file per failure kind; ``unreadable`` is a directory named like an image."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    bad = {
        "corrupt": root / "corrupt.png",
        "truncated": root / "truncated.png",
        "not_image": root / "notes.jpg",
        "empty": root / "empty.png",
    }
    bad["corrupt"].write_bytes(png[:16] + rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    bad["truncated"].write_bytes(png[: len(png) // 2])
    bad["not_image"].write_text("this is a text file, not a JPEG\n")
    bad["empty"].write_bytes(b"")
    # root can read anything, so "unreadable" is a path open() cannot read: a directory
    unreadable = root / "unreadable.png"
    unreadable.mkdir(exist_ok=True)
    bad["unreadable"] = unreadable
    return bad


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 30)


def score(*argv: str | Path) -> int:
    """Run ``sdde score ARGV`` in-process; returns the exit code."""
    return sdde_main(["score", *map(str, argv)])
