"""Common image corruptions (Hendrycks & Dietterich 2019) in numpy and Pillow, for any image size.

The reference implementations (``make_cifar_c.py`` / ``make_imagenet_c.py`` of
hendrycks/robustness, packaged as ``imagecorruptions``) cannot be used as they are here:
``imagecorruptions`` 1.1.2 (its last release, 2020) fails to import without ``pkg_resources`` (gone
from setuptools >= 81), its fog uses ``np.float_`` (removed in NumPy 2), its glass and Gaussian
blurs pass ``multichannel=`` (removed in scikit-image 0.19), it refuses images under 32×32 (MNIST
is 28×28, the bundled digits 8×8), always returns 3 channels, draws from NumPy's global random
state, needs OpenCV, and uses ImageNet-C severities (a 10-20 px motion blur) made for 224 px images.
So this module re-implements the corruptions with the **CIFAR-10-C severity parameters** (made for
32 px images), from the published formulas, vectorised over the batch:

* ``noise``: gaussian_noise, shot_noise, impulse_noise, speckle_noise
* ``blur``: defocus_blur, glass_blur, motion_blur, zoom_blur, gaussian_blur
* ``weather``: fog, brightness
* ``digital``: contrast, elastic_transform, pixelate, jpeg_compression

:data:`DEFAULT_CORRUPTIONS` are the 13 of the 15 benchmark corruptions this module has (the
CIFAR-10-C/ImageNet-C "common" set without ``snow`` and ``frost``: frost blends in photographs
of frost that the package ships, snow ImageMagick's motion blur of a synthetic layer); speckle
noise and Gaussian blur are the reference's extra ("validation") corruptions and are opt-in.
Length parameters (blur radii, pixel shifts) are CIFAR-10-C's pixel values for images up to 45 px
(MNIST's 28, the digits' 8) and scale by the power of two nearest to ``min(H, W) / 32`` above;
the elastic transform's are fractions of the image side, as in the reference.

Every corruption is deterministic for ``(seed, name, severity)``: it draws from its own
``numpy.random.Generator`` (never the global state), so the corrupted set does not depend on which
other corruptions ran before. Severity 0 is the identity. Images keep their shape, dtype and range
(uint8 in 0..255, or float in [0, 1]).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 32  # CIFAR-10-C's parameters are for 32 × 32 images

# x: float64 [N, C, H, W] in [0, 1]; p: the severity's parameter; rng: the corruption's generator
CorruptFn = Callable[[np.ndarray, object, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Corruption:
    name: str
    family: str
    fn: CorruptFn
    params: tuple  # one entry per severity 1..5 (CIFAR-10-C's values)


# --- filters and sampling on [N, C, H, W] --------------------------------------------------------

# np.pad modes: "edge" = scipy/skimage "nearest", "symmetric" = scipy "reflect" (about the pixel
# edge), "reflect" = scipy "mirror" = OpenCV's default BORDER_REFLECT_101 (about the edge pixel)


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    if sigma <= 0:
        return np.ones(1)
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's rule
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _correlate1d(x: np.ndarray, k: np.ndarray, axis: int, mode: str) -> np.ndarray:
    r = len(k) // 2
    if r == 0:
        return x * k[0]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode=mode)
    n = x.shape[axis]
    return sum(w * np.take(xp, np.arange(j, j + n), axis=axis) for j, w in enumerate(k))


def gaussian_filter(x: np.ndarray, sigma: float, *, truncate: float = 4.0, mode: str = "edge"):
    """Separable Gaussian blur over the last two axes (skimage.filters.gaussian's defaults)."""
    k = _gaussian_kernel(sigma, truncate)
    return _correlate1d(_correlate1d(x, k, -2, mode), k, -1, mode)


def _correlate2d(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(ry, ry), (rx, rx)]
    xp = np.pad(x, pad, mode=mode)
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    for (i, j), v in np.ndenumerate(kernel):
        if v != 0:
            out += v * xp[..., i : i + h, j : j + w]
    return out


def _fold(c: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map continuous coordinates into [0, n - 1] by reflection ("symmetric" or "reflect")."""
    if n == 1:
        return np.zeros_like(c)
    if mode == "symmetric":  # about -0.5 and n - 0.5
        c = np.mod(c + 0.5, 2 * n) - 0.5
        c = np.where(c > n - 0.5, 2 * n - 1 - c, c)
    else:  # "reflect": about 0 and n - 1
        c = np.mod(c, 2 * n - 2)
        c = np.where(c > n - 1, 2 * n - 2 - c, c)
    return np.clip(c, 0, n - 1)


def bilinear_sample(x: np.ndarray, yy: np.ndarray, xx: np.ndarray, mode: str) -> np.ndarray:
    """``x[n, :, yy, xx]`` with bilinear interpolation; coordinates ``[N, H', W']``."""
    n_img, _, h, w = x.shape
    yy, xx = _fold(yy, h, mode), _fold(xx, w, mode)
    y0, x0 = np.floor(yy).astype(np.int64), np.floor(xx).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (yy - y0)[:, None], (xx - x0)[:, None]
    b = np.arange(n_img)[:, None, None]

    def at(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:
        return np.moveaxis(x[b, :, yi, xi], -1, 1)  # [N, H', W', C] -> [N, C, H', W']

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return top * (1 - fy) + bottom * fy


def _scale(x: np.ndarray) -> float:
    """1 up to 45 px (CIFAR-10-C's pixel values), else the power of two nearest to side / 32.

    Never below 1: on 8×8 images a scaled-down blur would be no blur at all. And a power of two
    rather than side / 32, so MNIST's 28 px keep the reference's discrete kernels (a defocus
    radius of 1 px takes in the 4 neighbours; 0.875 px would take in none).
    """
    return float(max(1.0, 2.0 ** round(np.log2(min(x.shape[-2:]) / REFERENCE_SIZE))))


# --- noise ---------------------------------------------------------------------------------------


def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=sigma, size=x.shape)


def shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * photons) / photons


def impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    # salt and pepper, half each, per value (skimage.util.random_noise(mode="s&p"))
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(np.float64), x)


def speckle_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(scale=sigma, size=x.shape)


# --- blur ----------------------------------------------------------------------------------------


def gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return gaussian_filter(x, sigma * _scale(x))


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    half = int(np.ceil(radius)) + 1  # room for the disk and the anti-aliasing blur around it
    t = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-0.5 * (np.arange(-1, 2) / alias_blur) ** 2)  # OpenCV's 3×3 GaussianBlur
    g /= g.sum()
    return _correlate1d(_correlate1d(disk, g, 0, "constant"), g, 1, "constant")


def defocus_blur(x: np.ndarray, p: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = p
    return _correlate2d(x, _disk_kernel(radius * _scale(x), alias_blur), "reflect")


def glass_blur(x: np.ndarray, p: tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    sigma, delta, iterations = p
    sigma *= _scale(x)
    delta = max(1, round(delta * _scale(x)))
    # the reference quantises to 8 bits between the two blurs
    x = np.floor(np.clip(gaussian_filter(x, sigma), 0, 1) * 255) / 255
    n_img, _, h, w = x.shape
    b = np.arange(n_img)
    # local pixel shuffle: the reference's sequential swaps, run for every image at once
    for _ in range(iterations):
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                dy, dx = rng.integers(-delta, delta, size=(2, n_img))  # [-delta, delta) as there
                i2, j2 = i + dy, j + dx
                a, c = x[b, :, i, j].copy(), x[b, :, i2, j2].copy()
                x[b, :, i, j], x[b, :, i2, j2] = c, a
    return gaussian_filter(x, sigma)


def motion_blur(x: np.ndarray, p: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """ImageMagick's MotionBlurImage: a one-sided Gaussian streak at a random angle."""
    radius, sigma = p
    radius = max(1, round(radius * _scale(x)))
    sigma *= _scale(x)
    n_img, _, h, w = x.shape
    width = 2 * radius + 1
    taps = np.arange(width)
    k = np.exp(-(taps**2) / (2 * sigma**2))
    k /= k.sum()
    angle = np.deg2rad(rng.uniform(-45, 45, size=n_img))
    dy = np.ceil(taps[None] * np.sin(angle)[:, None] - 0.5).astype(np.int64)  # [N, width]
    dx = np.ceil(taps[None] * np.cos(angle)[:, None] - 0.5).astype(np.int64)
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    b = np.arange(n_img)[:, None, None]
    out = np.zeros_like(x)
    for t in range(width):
        yi = np.clip(rows + dy[:, t, None, None], 0, h - 1)
        xi = np.clip(cols + dx[:, t, None, None], 0, w - 1)
        out += k[t] * np.moveaxis(x[b, :, yi, xi], -1, 1)
    return out


def _zoom_matrix(n: int, z: float) -> np.ndarray:
    """``[n, n]`` bilinear-interpolation matrix of a zoom by ``z`` about the centre."""
    centre = (n - 1) / 2
    c = _fold(centre + (np.arange(n) - centre) / z, n, "symmetric")
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    m = np.zeros((n, n))
    np.add.at(m, (np.arange(n), lo), 1 - (c - lo))
    np.add.at(m, (np.arange(n), hi), c - lo)
    return m


def zoom_blur(x: np.ndarray, max_zoom: float, rng: np.random.Generator) -> np.ndarray:
    """Mean of the image and its centre zooms by 1, 1.01, ..., ``max_zoom`` (bilinear)."""
    h, w = x.shape[-2:]
    zooms = np.arange(1, max_zoom + 1e-9, 0.01)
    out = x.copy()
    for z in zooms:  # the same zoom for every image: two small matrix products
        out += _zoom_matrix(h, z) @ x @ _zoom_matrix(w, z).T
    return out / (len(zooms) + 1)


# --- weather -------------------------------------------------------------------------------------


def plasma_fractal(
    n_img: int, size: int, decay: float, rng: np.random.Generator, *, wibble: float = 100.0
) -> np.ndarray:
    """Diamond-square height maps ``[n, size, size]`` in [0, 1] (size a power of two)."""
    m = np.zeros((n_img, size, size))
    step = size

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        m[:, half:size:step, half:size:step] = noisy_mean(square)
        centres = m[:, half:size:step, half:size:step]
        corners = m[:, 0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        m[:, 0:size:step, half:size:step] = noisy_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        m[:, half:size:step, 0:size:step] = noisy_mean(top)
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)


def fog(x: np.ndarray, p: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    strength, decay = p
    n_img, _, h, w = x.shape
    size = 1 << max(1, (max(h, w) - 1).bit_length())
    plasma = plasma_fractal(n_img, size, decay, rng)[:, None, :h, :w]
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + strength * plasma) * peak / (peak + strength)


def brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Add ``shift`` to HSV value, hue and saturation kept (gray: add to the pixel)."""
    # with H and S fixed, RGB is linear in V: no HSV round trip needed; black stays gray
    v = x.max(axis=1, keepdims=True)
    v2 = np.minimum(v + shift, 1.0)
    return np.where(v > 0, x * v2 / np.maximum(v, 1e-12), v2)


# --- digital -------------------------------------------------------------------------------------


def contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(2, 3), keepdims=True)
    return (x - mean) * factor + mean


def elastic_transform(
    x: np.ndarray, p: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """A random affine warp, then a smooth random displacement field (fractions of the side)."""
    n_img, _, h, w = x.shape
    side = min(h, w)
    alpha, sigma, affine = (v * side for v in p)
    centre = np.array([w // 2, h // 2], np.float64)  # (x, y)
    sq = max(1, side // 3)  # three non-collinear points around the centre
    src = np.array([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    rows = np.arange(h, dtype=np.float64)[:, None] * np.ones((1, w))
    cols = np.ones((h, 1)) * np.arange(w, dtype=np.float64)[None, :]
    dst = src + rng.uniform(-affine, affine, size=(n_img, *src.shape))
    # the affine maps src onto dst: [x y 1] @ A = dst, A [N, 3, 2]; warpAffine samples the
    # source at its inverse, so solve for the map dst -> src instead
    inv = np.linalg.solve(np.concatenate([dst, np.ones((n_img, 3, 1))], axis=2), src[None])
    xx = (
        inv[:, 0, 0, None, None] * cols + inv[:, 1, 0, None, None] * rows + inv[:, 2, 0, None, None]
    )
    yy = (
        inv[:, 0, 1, None, None] * cols + inv[:, 1, 1, None, None] * rows + inv[:, 2, 1, None, None]
    )
    x = bilinear_sample(x, yy, xx, "reflect")
    field = rng.uniform(-1, 1, size=(2, n_img, h, w))
    dy, dx = (gaussian_filter(f, sigma, truncate=3.0, mode="symmetric") * alpha for f in field)
    return bilinear_sample(x, rows + dy, cols + dx, "symmetric")


def _per_image(x: np.ndarray, fn: Callable[[Image.Image], Image.Image], mode: str) -> np.ndarray:
    """Apply a Pillow operation to each image: 8-bit ``L``/``RGB`` or per-channel float ``F``."""
    out = np.empty_like(x)
    for i in range(len(x)):
        if mode == "F":
            for c in range(x.shape[1]):
                out[i, c] = np.asarray(fn(Image.fromarray(x[i, c].astype(np.float32))))
            continue
        u8 = np.rint(np.clip(x[i], 0, 1) * 255).astype(np.uint8)
        img = Image.fromarray(u8[0]) if u8.shape[0] == 1 else Image.fromarray(u8.transpose(1, 2, 0))
        arr = np.asarray(fn(img), np.float64) / 255
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out


def pixelate(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[-2:]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    box = Image.Resampling.BOX
    return _per_image(x, lambda im: im.resize(small, box).resize((w, h), box), "F")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        out.load()
        return out.copy()


def jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    return _per_image(x, lambda im: _jpeg(im, quality), "8bit")


# --- the registry --------------------------------------------------------------------------------

# CIFAR-10-C's parameters for severities 1..5 (hendrycks/robustness, make_cifar_c.py)
CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("gaussian_noise", "noise", gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
        Corruption("shot_noise", "noise", shot_noise, (500, 250, 100, 75, 50)),
        Corruption("impulse_noise", "noise", impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
        Corruption("speckle_noise", "noise", speckle_noise, (0.06, 0.1, 0.12, 0.16, 0.2)),
        Corruption(
            "defocus_blur",
            "blur",
            defocus_blur,
            ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        ),
        Corruption(
            "glass_blur",
            "blur",
            glass_blur,
            ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        ),
        Corruption(
            "motion_blur", "blur", motion_blur, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
        ),
        Corruption("zoom_blur", "blur", zoom_blur, (1.05, 1.10, 1.15, 1.20, 1.25)),
        Corruption("gaussian_blur", "blur", gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
        Corruption("fog", "weather", fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))),
        Corruption("brightness", "weather", brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
        Corruption("contrast", "digital", contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
        Corruption(
            "elastic_transform",
            "digital",
            elastic_transform,
            (
                (0, 0, 0.08),
                (0.05, 0.2, 0.07),
                (0.08, 0.06, 0.06),
                (0.1, 0.04, 0.05),
                (0.1, 0.03, 0.03),
            ),
        ),
        Corruption("pixelate", "digital", pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
        Corruption("jpeg_compression", "digital", jpeg_compression, (80, 65, 58, 50, 40)),
    )
}
EXTRA = ("speckle_noise", "gaussian_blur")
DEFAULT_CORRUPTIONS = tuple(name for name in CORRUPTIONS if name not in EXTRA)
FAMILIES = ("noise", "blur", "weather", "digital")


def families(names: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """``{family: [corruption, ...]}`` for the given corruptions, in :data:`FAMILIES` order."""
    out = {f: [n for n in names if CORRUPTIONS[n].family == f] for f in FAMILIES}
    return {f: members for f, members in out.items() if members}


CHUNK = 256  # images corrupted at once: bounds the float64 working memory of large sets


def corruption_seed(seed: int, name: str, severity: int, chunk: int = 0) -> np.random.SeedSequence:
    # crc32, not hash(): Python salts str hashes per process
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(severity), chunk])


def corrupt(images: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """``images`` ``[N, C, H, W]`` (C = 1 or 3; uint8, or float in [0, 1]) corrupted.

    Returns a new array of the same shape and dtype. Severity 0 returns an unchanged copy.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or int(severity) != severity or not 0 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 0..5, got {severity!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got {images.shape}")
    is_uint8 = images.dtype == np.uint8
    if not is_uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    if severity == 0 or len(images) == 0:
        return images.copy()
    spec = CORRUPTIONS[name]
    out = np.empty_like(images)
    # one random stream per chunk of CHUNK images: the result does not depend on memory, and
    # the first images of a set are corrupted the same whatever follows them
    for chunk, start in enumerate(range(0, len(images), CHUNK)):
        part = images[start : start + CHUNK]
        x = part.astype(np.float64) / 255 if is_uint8 else part.astype(np.float64)
        rng = np.random.default_rng(corruption_seed(seed, name, severity, chunk))
        y = np.clip(spec.fn(x, spec.params[severity - 1], rng), 0.0, 1.0)
        out[start : start + CHUNK] = np.rint(y * 255) if is_uint8 else y
    return out
