"""Photos as photographers make them, on a colour model that crops (issue 20): a 12 MP JPEG is
answered with the default limits, decompression bombs are still refused, and the server, the
batch scorer and ``sdde eval``'s data loading give the same pixels and probabilities."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from sdde_serve.batch.inputs import iter_inputs
from sdde_serve.calibration import nll
from sdde_serve.cli import main as sdde_main
from sdde_serve.data import load_dataset
from sdde_serve.engine import Engine
from sdde_serve.manifest import InputSpec, read_manifest, write_manifest
from sdde_serve.preprocess import ImageError, ImageLimits, decode_image, image_pixels
from sdde_serve.transform import CROP
from tests.batch.conftest import score
from tests.onnx_factory import make_linear_ensemble
from tests.server.conftest import png_with_size, serve

SIZE = 16


@pytest.fixture(scope="module")
def crop_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-channel 16x16 linear ensemble whose manifest records the shorter-side crop."""
    path = tmp_path_factory.mktemp("crop_model") / "crop.onnx"
    make_linear_ensemble(path, channels=3, size=SIZE)
    proto = onnx.load(str(path))
    manifest = read_manifest(proto)
    spec = manifest.input.model_copy(update={"resize": CROP})
    write_manifest(proto, manifest.model_copy(update={"input": spec}))
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def crop_engine(crop_model: Path) -> Engine:
    return Engine(crop_model, intra_op_threads=1)


def smooth_photo(width: int, height: int) -> Image.Image:
    """A large photo cheaply: a small smooth image upscaled (sharp content is not the point)."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    return small.resize((width, height), Image.Resampling.BILINEAR)


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_12mp() -> Image.Image:
    return smooth_photo(4000, 3000)


def test_a_12_megapixel_jpeg_is_answered_with_the_default_limits(crop_engine, photo_12mp):
    data = jpeg(photo_12mp)
    spec = crop_engine.manifest.input
    # counted after libjpeg's 1/8 scaling: 500x375, under the 2 MP default of a small model
    assert image_pixels(data, spec, ImageLimits()) == 500 * 375 < ImageLimits().pixels(spec)
    with serve(crop_engine) as client:
        resp = client.post(
            "/v1/predict",
            content=data,
            params={"probabilities": True},
            headers={"content-type": "image/jpeg"},
        )
    assert resp.status_code == 200, resp.text
    x = decode_image(data, spec)[None]
    np.testing.assert_allclose(
        resp.json()["predictions"][0]["probabilities"], crop_engine.run(x).probs[0], rtol=1e-6
    )


def test_formats_that_cannot_be_scaled_while_decoding_still_count_every_pixel(
    crop_engine, photo_12mp
):
    spec = crop_engine.manifest.input
    buf = io.BytesIO()
    Image.new("RGB", photo_12mp.size, (90, 120, 30)).save(buf, format="PNG")  # 12 MP, 36 KB
    progressive = jpeg(photo_12mp, progressive=True)  # libjpeg keeps all coefficients
    with serve(crop_engine) as client:
        for data, kind, reason in [
            (buf.getvalue(), "image/png", "exceeds the limit of 2097152"),
            (progressive, "image/jpeg", "exceeds the limit of 2097152"),
            # a bomb: 900 MP in a few bytes (Pillow's own guard answers first)
            (png_with_size(30000, 30000), "image/png", "decompression-bomb pixel limit"),
        ]:
            resp = client.post("/v1/predict", content=data, headers={"content-type": kind})
            assert resp.status_code == 400, resp.text
            assert reason in resp.json()["error"]
    with pytest.raises(ImageError, match="exceeds the limit"):
        image_pixels(progressive, spec, ImageLimits())


def test_a_huge_baseline_jpeg_is_refused_on_its_scaled_size():
    """JPEG's own bound: 1/8 is libjpeg's largest scaling, so 64 x the limit is the most any
    accepted JPEG holds (read from the header: nothing is decoded)."""
    spec = InputSpec(channels=1, height=28, width=28, mean=[0.5], std=[0.5])
    data = jpeg(Image.new("RGB", (8 * 600, 8 * 500)))  # 600x500 after 1/8
    assert image_pixels(data, spec, ImageLimits(max_pixels=300_000)) == 300_000
    with pytest.raises(ImageError, match=r"4800x4000 pixels \(600x500 decoded\)"):
        image_pixels(data, spec, ImageLimits(max_pixels=299_999))


def write_photos(root: Path) -> list[Path]:
    """Photos of several shapes and formats in two class folders (some reduced when decoded)."""
    rng = np.random.default_rng(5)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (40, 40), (300, 200), (90, 160), (700, 500)]):
        arr = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB").resize((w, h), Image.Resampling.BILINEAR)
        sub = root / f"c{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"p{i}.jpg" if i % 2 else f"p{i}.png")
        img.save(path)
        paths.append(path)
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo held upright
    rotated = root / "c0" / "rotated.jpg"
    smooth_photo(320, 240).save(rotated, exif=exif.tobytes())
    return [*paths, rotated]


def test_server_batch_and_eval_give_the_same_pixels_and_probabilities(
    tmp_path: Path, crop_model, crop_engine
):
    root = tmp_path / "photos"
    write_photos(root)
    paths = list(iter_inputs([str(root)]))  # sorted: the order eval's folder loader reads too
    spec = crop_engine.manifest.input

    # sdde eval: the folder decoded for the model, then as_model_input (evaluate.py's _run)
    data = load_dataset(str(root), split="test", model=spec)
    x_eval = data.as_model_input(*crop_engine.input_shape, spec.transform)
    x_server = np.stack([decode_image(Path(p).read_bytes(), spec) for p in paths])
    np.testing.assert_array_equal(x_eval, x_server)  # one code path: bit for bit
    probs_eval = crop_engine.run(x_eval).probs
    # and the command itself: its NLL is that of these probabilities up to float32 rounding
    # (eval recomputes them from the logits in float64); the stretch gives 4.38, not 5.22
    report = tmp_path / "report"
    args = ["eval", crop_model, "--data", root, "--out-dir", report, "--no-plots"]
    assert sdde_main([*map(str, args), "--cam-images", "0"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["classification"]["after"]["nll"] == pytest.approx(
        nll(probs_eval, data.labels), rel=1e-6
    )

    out = tmp_path / "rows.jsonl"
    assert score(crop_model, root, "-o", out, "--probs") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == paths

    with serve(crop_engine) as client:
        files = [("files", (Path(p).name, Path(p).read_bytes())) for p in paths]
        resp = client.post("/v1/predict", files=files, params={"probabilities": True})
    assert resp.status_code == 200, resp.text
    for i, (row, pred) in enumerate(zip(rows, resp.json()["predictions"], strict=True)):
        # batches of other sizes may change the last float bits of a GEMM, nothing more
        np.testing.assert_allclose(row["probs"], probs_eval[i], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(pred["probabilities"], probs_eval[i], rtol=1e-6, atol=1e-7)
