"""Image decoding (every documented mode conversion, every bad input) and prediction records."""

import io

import numpy as np
import pytest
from PIL import Image

from sdde_serve.engine import EngineOutput
from sdde_serve.manifest import InputSpec, load_onnx, read_manifest
from sdde_serve.preprocess import ImageError, ImageLimits, decode_image
from sdde_serve.scoring import make_predictions

GRAY = InputSpec(channels=1, height=4, width=4, mean=[0.5], std=[0.5])
RGB = InputSpec(channels=3, height=4, width=4, mean=[0.5] * 3, std=[0.5] * 3, color="RGB")


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_gray_png_round_trip():
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    x = decode_image(encode(Image.fromarray(arr)), GRAY)
    np.testing.assert_allclose(x[0], arr / 255.0, atol=1e-7)
    assert x.dtype == np.float32


def test_rgba_composites_on_black():
    img = Image.new("RGBA", (4, 4), (200, 100, 50, 0))  # fully transparent
    img.putpixel((0, 0), (200, 100, 50, 255))
    x = decode_image(encode(img), RGB)
    assert x[:, 1, 1].max() == 0.0
    np.testing.assert_allclose(x[:, 0, 0], np.array([200, 100, 50]) / 255.0, atol=1e-7)


def test_palette_cmyk_and_16bit():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    np.testing.assert_allclose(decode_image(encode(pal), RGB)[:, 0, 0], [1.0, 0.0, 0.0])
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink = white
    assert decode_image(encode(cmyk, "JPEG"), RGB).min() > 0.95
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_allclose(decode_image(encode(sixteen), GRAY), 1.0)
    half = Image.fromarray(np.full((4, 4), 257 * 100, np.uint16))
    np.testing.assert_allclose(decode_image(encode(half), GRAY), 100 / 255.0, atol=1e-7)


def test_resize_to_model_size():
    x = decode_image(encode(Image.new("L", (40, 30), 128)), GRAY)
    assert x.shape == (1, 4, 4)
    np.testing.assert_allclose(x, 128 / 255.0, atol=1e-7)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognised image"),
        (encode(Image.new("L", (64, 64), 3))[:60], "corrupt or truncated"),
    ],
)
def test_bad_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, GRAY)


def test_decompression_bomb_guard_checks_header_before_decoding():
    big = encode(Image.new("L", (3000, 3000), 0))  # compresses to a few KB
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(big, GRAY, ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageError, match="bytes exceeds"):
        decode_image(big, GRAY, ImageLimits(max_bytes=100))


def test_predictions_flag_and_reject(linear_model):
    manifest = read_manifest(load_onnx(linear_model[0]))  # mal, threshold 0.5, 4 classes
    logits = np.array(
        [
            [[4.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]],  # mal = 7/3
            [[0.1, 0.0, 0.0, 0.0], [0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0]],  # mal = 0.1
        ]
    )
    from sdde_serve.calibration import ensemble_probs

    probs = ensemble_probs(logits, manifest.temperature)
    out = EngineOutput(logits, probs, logits.mean(1).max(1), probs.max(1))
    flagged = make_predictions(out, manifest, top_k=2, policy="flag", include_probs=True)
    assert [p.is_ood for p in flagged] == [False, True]
    assert flagged[0].label == 0 and flagged[0].class_name == "class0"
    assert flagged[0].ood_score == pytest.approx(7 / 3) and flagged[0].threshold == 0.5
    assert flagged[0].agreement == pytest.approx(2 / 3)
    assert [c.label for c in flagged[0].top_k] == list(np.argsort(-probs[0])[:2])
    assert flagged[0].confidence == pytest.approx(probs[0].max())
    assert sum(flagged[0].probabilities) == pytest.approx(1.0)
    assert [p.outcome for p in flagged] == ["in_distribution", "ood_flagged"]
    rejected = make_predictions(out, manifest, policy="reject")
    assert rejected[1].rejected and rejected[1].label is None and rejected[1].top_k is None
    assert "0.1 < threshold 0.5" in rejected[1].reason and rejected[1].outcome == "rejected"
    assert not rejected[0].rejected and rejected[0].label == 0
    with pytest.raises(ValueError):
        make_predictions(out, manifest, policy="drop")  # type: ignore[arg-type]
