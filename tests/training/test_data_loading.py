"""An image folder is decoded once per training run, not once per epoch.

``sdde_serve.data`` decodes the folder into a uint8 ``ArrayDataset`` and the trainer converts it
once to in-memory model inputs (``training.data.to_tensors``); epochs index that tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
from PIL import Image

from training.config import TrainConfig
from training.trainer import train

PER_CLASS = 10


def jpeg_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 60, (8, 8, 3))
            pixels[..., 2 * c] += 190  # red or blue tint
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.jpg", quality=90)
    return root


def test_jpeg_folder_is_decoded_once_for_a_two_epoch_run(tmp_path, monkeypatch):
    data = jpeg_folder(tmp_path / "photos")
    opened: list[str] = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    cfg = TrainConfig(
        data=str(data),
        arch="resnet20",
        members=2,
        method="de",
        epochs=2,
        batch_size=8,
        val_fraction=0.1,
        cam_samples=0,
        eval_train_samples=0,
        progress=False,
        out=str(tmp_path / "run"),
    )
    run = Path(train(cfg))
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2  # two full epochs ran ...
    assert sorted(opened) == sorted({str(p) for p in data.rglob("*.jpg")})  # ... each file once
    assert json.loads((run / "config.json").read_text())["augment"] == "crop-flip"
