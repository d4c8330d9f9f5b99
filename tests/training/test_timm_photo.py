"""A timm model started from a pretrained file serves a 12 MP JPEG through the crop transform."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sdde_serve.engine import Engine
from sdde_serve.preprocess import decode_image
from tests.server.conftest import serve
from tests.training.test_pretrained import ARCH, rgb_npz, timm_file
from training.config import TrainConfig


def test_timm_model_serves_a_12mp_jpeg_with_the_crop(tmp_path):
    from export import export_run
    from training.trainer import train

    cfg = TrainConfig(
        data=str(rgb_npz(tmp_path)),
        arch=ARCH,
        pretrained=str(timm_file(tmp_path)),
        input_size=32,
        members=2,
        method="de",
        epochs=1,
        batch_size=16,
        max_steps=2,
        cam_samples=0,
        eval_train_samples=0,
        progress=False,
        out=str(tmp_path / "run"),
    )
    manifest = export_run(train(cfg), tmp_path / "m.onnx", name="timm")
    assert manifest.input.resize == "shorter-crop"
    engine = Engine(tmp_path / "m.onnx", intra_op_threads=1)
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    small.resize((4000, 3000), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    with serve(engine) as client:
        resp = client.post(
            "/v1/predict",
            content=data,
            params={"probabilities": True},
            headers={"content-type": "image/jpeg"},
        )
    assert resp.status_code == 200, resp.text
    x = decode_image(data, engine.manifest.input)[None]
    np.testing.assert_allclose(
        resp.json()["predictions"][0]["probabilities"], engine.run(x).probs[0], rtol=1e-6
    )
