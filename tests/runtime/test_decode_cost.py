"""Bounded decode cost (issue 12): limits derived from the model, integer 16-bit conversion,
reduction before conversion, accepted formats, the per-request pixel budget."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from sdde_serve.data import to_model_array
from sdde_serve.manifest import InputSpec
from sdde_serve.preprocess import (
    ImageError,
    ImageLimits,
    PixelBudget,
    check_request_pixels,
    decode_image,
)

GRAY28 = InputSpec(channels=1, height=28, width=28, mean=[0.5], std=[0.5])
RGB224 = InputSpec(channels=3, height=224, width=224, mean=[0.5] * 3, std=[0.5] * 3, color="RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_limits_are_derived_from_the_model_input():
    limits = ImageLimits()
    assert limits.pixels(GRAY28) == 2**21  # a Full-HD frame fits: 1920 x 1080
    assert limits.pixels(GRAY28) >= 1920 * 1080
    assert limits.pixels(RGB224) == 256 * 224 * 224
    assert limits.request_pixels(GRAY28) == 4 * 2**21
    assert limits.bytes_limit(GRAY28) == 8 * 1024 * 1024  # at least 8 MiB
    assert ImageLimits(max_pixels=10, max_request_pixels=7).request_pixels(GRAY28) == 7


def test_sixteen_bit_integer_conversion_equals_the_float_rule_for_every_value():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    spec = InputSpec(channels=1, height=256, width=256, mean=[0.5], std=[0.5])
    x = decode_image(encode(img), spec)[0]
    expected = np.clip(np.round(values / 257.0), 0, 255) / 255.0  # the documented convention
    np.testing.assert_allclose(x, expected.astype(np.float32), atol=1e-7)


def test_large_images_are_reduced_first_and_match_a_direct_resize():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (7, 7), dtype=np.uint8)
    big = Image.fromarray(base).resize((700, 700), Image.Resampling.NEAREST)  # blocks of 100
    for fmt in ("PNG", "WEBP"):
        data = encode(big, fmt, lossless=True) if fmt == "WEBP" else encode(big)
        got = decode_image(data, GRAY28)
        direct = to_model_array(big, 1, 28, 28)  # full-size conversion, no reduction
        assert np.abs(got - direct).max() < 0.025, fmt  # rounding of the reduction
    rgba = Image.new("RGBA", (600, 600), (255, 255, 255, 128))  # half-transparent white
    np.testing.assert_allclose(decode_image(encode(rgba), GRAY28), 128 / 255.0, atol=1 / 255)


def test_jpeg_is_decoded_at_a_reduced_scale():
    img = Image.new("RGB", (1600, 1600), (10, 200, 30))
    x = decode_image(encode(img, "JPEG", quality=95), RGB224)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), np.array([10, 200, 30]) / 255.0, atol=0.03)
    opened = Image.open(io.BytesIO(encode(img, "JPEG")))
    opened.draft("RGB", (56, 56))
    assert opened.size == (200, 200)  # what decode_image asks of libjpeg for a 28x28 model


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", "not a recognised image format"),
        (encode(Image.new("L", (9, 9)), "ICO"), "not a recognised image format"),
        (encode(Image.new("L", (2000, 2000)), "PNG"), "exceeds the limit of 1000000"),
    ],
)
def test_unaccepted_formats_and_oversized_headers_are_refused(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, GRAY28, ImageLimits(max_pixels=1_000_000))


def test_the_request_budget_sums_headers_and_names_the_bad_image():
    img = encode(Image.new("L", (500, 400), 0))  # 200,000 pixels
    limits = ImageLimits(max_pixels=300_000, max_request_pixels=500_000)
    check_request_pixels([("a", img), ("b", img)], GRAY28, limits)
    with pytest.raises(ImageError, match="600000 pixels together"):
        check_request_pixels([("a", img)] * 3, GRAY28, limits)
    with pytest.raises(ImageError, match=r"^b: not a recognised"):
        check_request_pixels([("a", img), ("b", b"junk")], GRAY28, limits)


def test_pixel_budget_never_holds_more_than_its_pixels():
    budget = PixelBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def work(n: int) -> None:
        counted = min(n, budget.pixels)  # an image over the budget counts as all of it
        with budget.hold(n):
            with lock:
                held[0] += counted
                peak[0] = max(peak[0], held[0])
            threading.Event().wait(0.01)
            with lock:
                held[0] -= counted

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 10, 500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100  # the 500-pixel image counts as the whole budget and runs alone
    with pytest.raises(TimeoutError), budget.hold(80), budget.hold(30, deadline=0.0):
        pass


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_after_reduction_equals_transposing_the_full_image(orientation):
    from PIL import ImageOps

    arr = np.zeros((400, 800), np.uint8)
    arr[:, 400:] = 255
    arr[:100, :200] = 128
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, exif=exif.tobytes())
    spec = InputSpec(channels=1, height=32, width=16, mean=[0.5], std=[0.5])
    expected = to_model_array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), 1, 32, 16)
    got = decode_image(data, spec)
    assert got.shape == (1, 32, 16)
    assert np.abs(got - expected).max() < 0.025


def test_png_text_metadata_is_bounded_while_opening():
    """Pillow reads zTXt chunks before any size check: 64 MB of text in a few KB."""
    from benchmarks.hostile_requests import png_text_bomb

    with pytest.raises(ImageError, match="text chunks"):
        decode_image(png_text_bomb(chunks=3, size=1024 * 1024), GRAY28)
    small = png_text_bomb(chunks=2, size=1000)  # ordinary metadata still decodes
    assert decode_image(small, GRAY28).shape == (1, 28, 28)
