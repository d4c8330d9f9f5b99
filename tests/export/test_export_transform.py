"""Export records the input transform the run was evaluated with (issue 20)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdde_serve.engine import Engine
from tests.conftest import tiny_train_config


def test_a_colour_run_exports_the_shorter_side_crop(tmp_path: Path) -> None:
    from export import export_run
    from training.trainer import train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 3, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images, labels=np.arange(60) % 3)
    config = tiny_train_config(
        tmp_path / "run", data=str(tmp_path / "rgb.npz"), members=2, max_steps=2, batch_size=16
    )
    model = tmp_path / "rgb.onnx"
    manifest = export_run(train(config), model, name="rgb", version="1", knn_bank=0)
    assert (manifest.input.color, manifest.input.resize) == ("RGB", "shorter-crop")
    assert manifest.input.resize_size is None  # the model's side: square images are not cut
    # what the server reads back from the file
    assert Engine(model).manifest.input.transform == manifest.input.transform
