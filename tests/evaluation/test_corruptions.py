"""The corruptions of ``sdde eval --shift``: contract (seeded, shape/dtype/range, severity 0) and
the numerics against scipy/scikit-image/Pillow references and hand computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdde_serve.errors import UserError
from sdde_serve.evaluation import corruptions as corr
from sdde_serve.evaluation.shift import parse_corruptions, parse_severities

ALL = list(corr.CORRUPTIONS)
# corruptions that draw random numbers (the others are fixed filters)
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "fog",
    "elastic_transform",
}


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images: blobs, not white noise (blurs must change them visibly)."""
    rng = np.random.default_rng(seed)
    x = corr.gaussian_filter(rng.random(shape), 1.0)
    x = (x - x.min()) / (x.max() - x.min())
    return np.rint(x * 255).astype(np.uint8)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32), (3, 1, 8, 8)])
def test_each_corruption_is_seeded_and_keeps_shape_dtype_and_range(name, shape) -> None:
    x = _images(shape)
    before = x.copy()
    for severity in (1, 5):
        a = corr.corrupt(x, name, severity, seed=7)
        b = corr.corrupt(x, name, severity, seed=7)
        assert a.shape == x.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)  # deterministic for a seed
        assert not np.array_equal(a, x), (name, severity)  # and it does corrupt
        if name in RANDOM:
            assert not np.array_equal(a, corr.corrupt(x, name, severity, seed=8))
    np.testing.assert_array_equal(x, before)  # the input is not modified
    xf = x.astype(np.float32) / 255
    f = corr.corrupt(xf, name, 3, seed=1)
    assert f.dtype == np.float32 and f.shape == xf.shape
    assert f.min() >= 0.0 and f.max() <= 1.0


@pytest.mark.parametrize("name", ALL)
def test_severity_zero_is_the_identity(name) -> None:
    x = _images((2, 1, 8, 8))
    out = corr.corrupt(x, name, 0, seed=3)
    np.testing.assert_array_equal(out, x)
    assert out is not x
    xf = x.astype(np.float64) / 255
    np.testing.assert_array_equal(corr.corrupt(xf, name, 0), xf)


def test_seed_streams_do_not_depend_on_what_ran_before() -> None:
    x = _images((2, 1, 28, 28))
    first = corr.corrupt(x, "gaussian_noise", 2, seed=0)
    corr.corrupt(x, "fog", 4, seed=0)
    np.random.seed(123)  # the global state is never used
    np.testing.assert_array_equal(corr.corrupt(x, "gaussian_noise", 2, seed=0), first)
    # severities and corruptions draw from distinct streams
    assert corr.corruption_seed(0, "fog", 1).entropy != corr.corruption_seed(0, "fog", 2).entropy


def test_chunks_have_their_own_streams(monkeypatch) -> None:
    monkeypatch.setattr(corr, "CHUNK", 3)
    x = np.repeat(_images((1, 1, 8, 8)), 7, axis=0)  # seven copies of one image
    for name in ("gaussian_noise", "elastic_transform", "fog"):
        full = corr.corrupt(x, name, 3, seed=1)
        # prefix-stable: the first chunks do not depend on the images after them
        np.testing.assert_array_equal(corr.corrupt(x[:6], name, 3, seed=1), full[:6])
        assert not np.array_equal(full[:3], full[3:6])  # and chunks draw different numbers


def test_bad_arguments() -> None:
    x = _images((1, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown corruption"):
        corr.corrupt(x, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        corr.corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        corr.corrupt(x[0], "fog", 1)
    with pytest.raises(ValueError, match="uint8 or float"):
        corr.corrupt(x.astype(np.int32), "fog", 1)


def test_parse_corruptions_and_severities() -> None:
    assert parse_corruptions("default") == corr.DEFAULT_CORRUPTIONS
    assert len(corr.DEFAULT_CORRUPTIONS) == 13 and "speckle_noise" not in corr.DEFAULT_CORRUPTIONS
    assert parse_corruptions("all") == tuple(corr.CORRUPTIONS)
    assert parse_corruptions("weather,contrast,fog") == ("fog", "brightness", "contrast")
    assert parse_severities("5,1,3") == (1, 3, 5)
    with pytest.raises(UserError, match="unknown corruption 'snow'"):
        parse_corruptions("noise,snow")
    for bad in ("0,1", "6", "a", ""):
        with pytest.raises(UserError, match="--severities"):
            parse_severities(bad)


# --- numerics against references ---------------------------------------------------------------


def test_gaussian_filter_matches_scipy() -> None:
    from scipy import ndimage

    x = np.random.default_rng(0).random((2, 1, 9, 11))
    for sigma, truncate, ours, theirs in (
        (0.7, 4.0, "edge", "nearest"),
        (2.5, 3.0, "symmetric", "reflect"),
    ):
        ref = ndimage.gaussian_filter(x, (0, 0, sigma, sigma), truncate=truncate, mode=theirs)
        got = corr.gaussian_filter(x, sigma, truncate=truncate, mode=ours)
        np.testing.assert_allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize(("ours", "theirs"), [("symmetric", "reflect"), ("reflect", "mirror")])
def test_bilinear_sampling_matches_scipy_map_coordinates(ours, theirs) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(1)
    x = rng.random((2, 1, 7, 9))
    yy = rng.uniform(-12, 18, (2, 7, 9))  # far outside the image too: the borders reflect
    xx = rng.uniform(-12, 20, (2, 7, 9))
    got = corr.bilinear_sample(x, yy, xx, ours)
    for i in range(2):
        ref = ndimage.map_coordinates(x[i, 0], [yy[i], xx[i]], order=1, mode=theirs)
        np.testing.assert_allclose(got[i, 0], ref, atol=1e-12)


def test_noise_statistics() -> None:
    x = np.full((4, 1, 64, 64), 0.5)
    g = corr.corrupt(x, "gaussian_noise", 3, seed=0) - 0.5
    assert abs(g.std() - 0.08) < 0.003 and abs(g.mean()) < 0.003
    s = corr.corrupt(x, "shot_noise", 5, seed=0)  # Poisson(0.5 * 50) / 50: mean 0.5, var 0.01
    assert abs(s.mean() - 0.5) < 0.005 and abs(s.std() - 0.1) < 0.005
    imp = corr.corrupt(x, "impulse_noise", 5, seed=0)
    hit = imp != 0.5
    assert abs(hit.mean() - 0.07) < 0.006 and set(np.unique(imp[hit])) == {0.0, 1.0}
    sp = corr.corrupt(x, "speckle_noise", 5, seed=0) - 0.5  # x * N(0, 0.2): std 0.1
    assert abs(sp.std() - 0.1) < 0.004


def test_contrast_and_brightness_by_hand() -> None:
    x = np.array([[[[0.0, 0.2], [0.4, 1.0]]]])
    mean = x.mean()
    np.testing.assert_allclose(corr.corrupt(x, "contrast", 5), (x - mean) * 0.15 + mean)
    np.testing.assert_allclose(corr.corrupt(x, "brightness", 5), np.minimum(x + 0.3, 1.0))


def test_brightness_on_colour_matches_an_hsv_round_trip() -> None:
    from skimage import color

    rgb = np.random.default_rng(2).random((6, 5, 3))
    rgb[0, 0] = 0.0  # black: hue and saturation 0
    hsv = color.rgb2hsv(rgb)
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.15, 0, 1)
    ref = color.hsv2rgb(hsv)
    got = corr.corrupt(rgb.transpose(2, 0, 1)[None], "brightness", 3)[0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, ref, atol=1e-12)


def test_defocus_kernel_and_zoom_matrix() -> None:
    k = corr._disk_kernel(1.0, 0.2)
    assert k.sum() == pytest.approx(1.0) and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    # radius 1: the centre and its four neighbours share the mass before anti-aliasing
    assert k[2, 2] > k[1, 2] > k[1, 1] > 0
    np.testing.assert_allclose(corr._zoom_matrix(9, 1.0), np.eye(9))
    m = corr._zoom_matrix(9, 1.2)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert m[4, 4] == 1.0  # the centre stays put
    # CIFAR's pixel parameters as they are up to 45 px, power-of-two scaling above
    assert corr._scale(np.zeros((1, 1, 28, 28))) == 1.0
    assert corr._scale(np.zeros((1, 1, 8, 8))) == 1.0
    assert corr._scale(np.zeros((1, 1, 64, 64))) == 2.0
    assert corr._scale(np.zeros((1, 1, 224, 224))) == 8.0


def test_pixelate_and_jpeg_match_pillow() -> None:
    x = _images((2, 1, 28, 28))
    box = Image.Resampling.BOX
    ref = [
        np.rint(
            np.asarray(
                Image.fromarray(img[0].astype(np.float32) / 255)
                .resize((18, 18), box)
                .resize((28, 28), box)
            )
            * 255
        )
        for img in x
    ]
    got = corr.corrupt(x, "pixelate", 5)[:, 0].astype(np.float64)
    np.testing.assert_allclose(got, np.array(ref), atol=1)  # float32 rounding at .5
    buf = io.BytesIO()
    Image.fromarray(x[0, 0]).save(buf, format="JPEG", quality=40)
    buf.seek(0)
    np.testing.assert_array_equal(corr.corrupt(x, "jpeg_compression", 5)[0, 0], Image.open(buf))


def test_fog_and_motion_blur_shapes_of_effect() -> None:
    plasma = corr.plasma_fractal(3, 16, 2.0, np.random.default_rng(0))
    assert plasma.shape == (3, 16, 16)
    assert np.allclose(plasma.min(axis=(1, 2)), 0) and np.allclose(plasma.max(axis=(1, 2)), 1)
    # motion blur of a single bright pixel is a streak of total mass 1 (away from the borders)
    x = np.zeros((1, 1, 32, 32))
    x[0, 0, 16, 16] = 1.0
    streak = corr.motion_blur(x, (6, 2), np.random.default_rng(0))
    assert streak.sum() == pytest.approx(1.0) and (streak > 1e-3).sum() >= 3
