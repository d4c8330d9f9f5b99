"""The one input transform (sdde_serve/transform.py): torchvision's eval transform reproduced,
the decode path and ``as_model_input`` equal, old manifests kept on the stretch."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from sdde_serve.data import ArrayDataset
from sdde_serve.manifest import InputSpec
from sdde_serve.preprocess import decode_image
from sdde_serve.transform import CROP, STRETCH, Resize, to_model_array

# (width, height): landscape 4:3, portrait 3:4, square, panorama, small and odd
PHOTO_SIZES = [(320, 240), (240, 320), (250, 250), (500, 150), (91, 37)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A procedural colour photo: smooth gradients, a few sharp-edged shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / width, y / height
    img = np.stack(
        [
            120 + 100 * np.sin(3 * u + 2 * v),
            90 + 80 * np.cos(5 * v - u),
            60 + 60 * u * v + 40 * np.sin(11 * u),
        ],
        axis=-1,
    )
    for _ in range(4):  # discs: edges the antialiasing filter must treat like torchvision
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < (r * min(width, height)) ** 2
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def torchvision_eval(img: Image.Image, height: int, width: int, size: int) -> np.ndarray:
    """torchvision's eval transform on a PIL image, as uint8 ``[C, H, W]``."""
    out = T.Compose([T.Resize(size), T.CenterCrop((height, width))])(img)
    return np.asarray(out, dtype=np.int16).transpose(2, 0, 1)


def rgb_spec(size: int, **kw) -> InputSpec:
    return InputSpec(
        channels=3, height=size, width=size, mean=[0.5] * 3, std=[0.5] * 3, color="RGB", **kw
    )


@pytest.mark.parametrize(("width", "height"), PHOTO_SIZES)
@pytest.mark.parametrize(
    ("model_h", "model_w", "resize_size"),
    [(32, 32, None), (224, 224, 256), (24, 40, None)],  # crop_pct 1, ImageNet's 0.875, not square
)
def test_shorter_crop_is_torchvisions_eval_transform(width, height, model_h, model_w, resize_size):
    img = photo(width, height)
    got = to_model_array(img, 3, model_h, model_w, Resize(CROP, resize_size))
    want = torchvision_eval(img, model_h, model_w, resize_size or max(model_h, model_w))
    diff = np.abs(np.round(got * 255.0).astype(np.int16) - want)
    assert diff.max() <= 1  # one grey level: float rounding of the box, nothing else


@pytest.mark.parametrize(("width", "height"), PHOTO_SIZES)
def test_stretch_is_torchvisions_resize_to_both_sides(width, height):
    img = photo(width, height, seed=1)
    got = np.round(to_model_array(img, 3, 28, 36) * 255.0).astype(np.int16)
    want = np.asarray(T.Resize((28, 36))(img), dtype=np.int16).transpose(2, 0, 1)
    assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize(("width", "height"), [(800, 600), (600, 800), (1200, 300)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decoding_a_large_photo_reduces_first_and_stays_close_to_torchvision(width, height, fmt):
    """PNG: box-reduced, JPEG: libjpeg's DCT scaling, then the crop of the reduced image."""
    data = encode(photo(width, height, seed=2), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    full = Image.open(io.BytesIO(data)).convert("RGB")  # what torchvision would be given
    got = decode_image(data, rgb_spec(32, resize="shorter-crop"))
    want = torchvision_eval(full, 32, 32, 32) / 255.0
    # measured: 0.25-0.34 grey levels on average, at most 6 (pixels on a disc's edge)
    assert np.abs(got - want).mean() < 1 / 255
    assert np.abs(got - want).max() < 10 / 255


def test_the_decode_path_and_as_model_input_are_one_transform():
    """An array dataset and the PNGs of its images give the same pixels, bit for bit."""
    rng = np.random.default_rng(3)
    shapes = [(3, 48, 64), (3, 64, 48), (1, 40, 30)]
    for resize in ("bilinear-stretch", "shorter-crop"):
        spec = rgb_spec(32, resize=resize)
        for shape in shapes:
            images = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
            x = ArrayDataset("a", images).as_model_input(3, 32, 32, spec.transform)
            for img, row in zip(images, x, strict=True):
                pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
                np.testing.assert_array_equal(decode_image(encode(pil), spec), row)


def test_images_already_at_the_model_size_are_left_alone_unless_the_crop_zooms():
    images = np.random.default_rng(4).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    ds = ArrayDataset("a", images)
    as_is = images.astype(np.float32) / 255.0
    np.testing.assert_array_equal(ds.as_model_input(3, 32, 32, Resize(CROP)), as_is)
    zoomed = ds.as_model_input(3, 32, 32, Resize(CROP, 40))  # torchvision: Resize(40), crop 32
    want = torchvision_eval(Image.fromarray(images[0].transpose(1, 2, 0)), 32, 32, 40)
    assert np.abs(np.round(zoomed[0] * 255) - want).max() <= 1


def test_old_manifests_keep_the_stretch_and_colour_models_default_to_the_crop():
    old = {"channels": 3, "height": 16, "width": 16, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert InputSpec.model_validate(old).transform == Resize(STRETCH)
    assert InputSpec.model_validate({**old, "resize": "bilinear-stretch"}).transform.mode == STRETCH
    # a 4:3 photo through an old manifest is squeezed exactly as before
    img = photo(64, 48)
    np.testing.assert_array_equal(
        decode_image(encode(img), InputSpec.model_validate(old)),
        np.asarray(img.resize((16, 16), Image.Resampling.BILINEAR), np.float32).transpose(2, 0, 1)
        / 255.0,
    )
    assert Resize.default_for(3) == Resize(CROP) and Resize.default_for(1) == Resize(STRETCH)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"resize_size": 40}, "'shorter-crop' only"),
        ({"resize": "shorter-crop", "resize_size": 8}, "smaller than the crop"),
        ({"resize": "fit"}, "resize"),
    ],
)
def test_inconsistent_resize_fields_are_refused(fields, reason):
    from pydantic import ValidationError

    base = {"channels": 1, "height": 16, "width": 16, "mean": [0.5], "std": [0.5]}
    with pytest.raises(ValidationError, match=reason):
        InputSpec.model_validate({**base, **fields})
