"""Image bytes -> model input, shared by the server and the batch scorer.

Conversions (documented in docs/conventions.md):

* EXIF orientation is applied first, so a phone photo is seen upright.
* Palette (``P``) images are expanded to RGB(A); anything with alpha (``RGBA``, ``LA``, ``PA``) is
  composited onto a **black** background (MNIST-style data has black backgrounds, and black is what
  "no signal" means to a model trained on [0, 1] pixels).
* ``CMYK`` and ``YCbCr`` go through Pillow's conversion to RGB.
* 16-bit (``I;16*``) and 32-bit integer (``I``) images are scaled to 8 bits by dividing by 257
  (65535 -> 255); float (``F``) images are taken as [0, 1] intensities.
* Then the model's channels and size: RGB -> gray by ITU-R 601-2 luma, gray -> RGB by repetition,
  and the manifest's resize (stretch, or shorter side then centre crop) by the one transform of
  every path, :func:`sdde_serve.transform.to_model_array`.

Decode cost is counted in pixels decoded: a JPEG's pixels after libjpeg's DCT scaling (``draft``,
1/2 to 1/8, chosen from the header), so a 12 MP photo costs what its 1/8-scale image costs for a
small model; every other format (and a progressive JPEG, whose coefficient buffer holds the full
image) costs its full width x height.
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdde_serve.manifest import InputSpec
from sdde_serve.transform import Reduced, needed_side, to_model_array


class ImageError(ValueError):
    """The bytes are not an image we can use; ``str(exc)`` is the reason for the client."""


# Formats decoded at all (Pillow's ``Image.open(..., formats=...)``): the ones
# :data:`sdde_serve.data.IMAGE_SUFFIXES` names. Every other plugin (EPS, which runs Ghostscript;
# PSD, ICNS, FITS, ...) is never tried on untrusted bytes.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
# Per-image pixel limit when none is configured: a Full-HD frame (1920x1080 fits), or 256 times
# the model's input for larger models. Measured peak cost of one image at this limit: ~16 MB
# (RGBA) above the decoded pixels themselves, see docs/server.md.
MIN_DEFAULT_PIXELS = 2**21
PIXELS_PER_MODEL_PIXEL = 256
MIN_DEFAULT_BYTES = 8 * 1024 * 1024
# Per request, by default: this many images at the per-image limit.
REQUEST_PIXEL_IMAGES = 4

# Pillow keeps up to 64 MB of decompressed PNG text (zTXt/iTXt chunks) per file, read while the
# file is opened, before any size check: a few KB on the wire cost 65 MB (measured). The model
# never reads metadata; 1 MiB leaves room for real EXIF/XMP. Process-wide, like Pillow's own
# MAX_IMAGE_PIXELS.
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024

_TRANSPOSE = {  # EXIF orientation -> the transpose that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)


@dataclass(frozen=True)
class ImageLimits:
    """What one image (and one request) may cost to decode; ``None`` = derived from the model."""

    # encoded size; None: 4 bytes per allowed pixel (an RGBA bitmap's size), at least 8 MiB
    max_bytes: int | None = None
    # decompression-bomb guard: pixels decoded per image (a baseline JPEG's after libjpeg's
    # scaling, module docstring), checked from the header before any pixel is decoded
    max_pixels: int | None = None
    # the sum over the images of one request (server), checked from the headers as well
    max_request_pixels: int | None = None
    formats: tuple[str, ...] = ACCEPTED_FORMATS

    def bytes_limit(self, spec: InputSpec) -> int:
        """The per-image limit on encoded bytes for a model reading ``spec``."""
        if self.max_bytes is not None:
            return self.max_bytes
        return max(MIN_DEFAULT_BYTES, 4 * self.pixels(spec))

    def pixels(self, spec: InputSpec) -> int:
        """The per-image pixel limit for a model reading ``spec``."""
        if self.max_pixels is not None:
            return self.max_pixels
        return max(MIN_DEFAULT_PIXELS, PIXELS_PER_MODEL_PIXEL * spec.height * spec.width)

    def request_pixels(self, spec: InputSpec) -> int:
        if self.max_request_pixels is not None:
            return self.max_request_pixels
        return REQUEST_PIXEL_IMAGES * self.pixels(spec)


class PixelBudget:
    """Pixels being decoded at once, across the threads of one process.

    Each decode holds its image's pixel count while it runs, so concurrent decodes of large
    images wait for each other (memory stays at about one large image's decode cost) while small
    images still decode in parallel. An image larger than the whole budget runs alone.
    """

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, deadline: float | None = None) -> Iterator[None]:
        pixels = min(pixels, self.pixels)
        with self._cond:
            while self._used + pixels > self.pixels:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise TimeoutError("waited past the deadline for decode capacity")
                self._cond.wait(timeout)
            self._used += pixels
        try:
            yield
        finally:
            with self._cond:
                self._used -= pixels
                self._cond.notify_all()


class _Opened(NamedTuple):
    img: Image.Image
    full: tuple[int, int]  # width, height in the file
    scale: int  # libjpeg's DCT scaling set by ``draft`` (1, 2, 4 or 8; 1 for other formats)
    cost: int  # pixels the decode holds (module docstring)


def _open(data: bytes, spec: InputSpec, limits: ImageLimits) -> _Opened:
    """Read the header only: format, size and the pixel limit; nothing is decoded yet.

    A JPEG is set to decode at a reduced scale (``draft``); its cost is checked against the
    per-image limit.
    """
    if not data:
        raise ImageError("empty image")
    max_bytes = limits.bytes_limit(spec)
    if len(data) > max_bytes:
        raise ImageError(f"image of {len(data)} bytes exceeds the limit of {max_bytes}")
    img = Image.open(io.BytesIO(data), formats=limits.formats)
    width, height = img.size
    if width == 0 or height == 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    cost, scale = width * height, 1
    if img.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with extra frames (depth, preview)
        side = needed_side(spec.transform, spec.height, spec.width)
        img.draft(img.mode, (side, side))  # keeps both sides at least `side`
        scale = img.decoderconfig[0] if img.decoderconfig else 1
        if not img.info.get("progressive"):
            cost = img.size[0] * img.size[1]
    limit = limits.pixels(spec)
    if cost > limit:
        scaled = "" if cost == width * height else f" ({img.size[0]}x{img.size[1]} decoded)"
        raise ImageError(f"image of {width}x{height} pixels{scaled} exceeds the limit of {limit}")
    return _Opened(img, (width, height), scale, cost)


@contextmanager
def _client_errors() -> Iterator[None]:
    """Every way Pillow fails on bad bytes, as an :class:`ImageError` (never a server error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (ImageError, TimeoutError):
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"not a recognised image format (accepted: {', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image exceeds the decompression-bomb pixel limit") from None
    except MemoryError:
        raise ImageError("image too large to decode") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError
        raise ImageError(f"corrupt or truncated image ({str(exc)[:120]})") from None
    except Exception as exc:
        # Some Pillow plugins fail on hostile files with TypeError, struct.error, IndexError...:
        # still the client's bad bytes, never a server error
        raise ImageError(f"cannot decode image ({type(exc).__name__})") from None


def image_pixels(data: bytes, spec: InputSpec, limits: ImageLimits) -> int:
    """The decode cost from the header (format and per-image limit checked), without decoding:
    width x height, after libjpeg's scaling for a baseline JPEG."""
    with _client_errors():
        return _open(data, spec, limits).cost


def check_request_pixels(
    images: list[tuple[str, bytes]], spec: InputSpec, limits: ImageLimits
) -> None:
    """Refuse a request whose images (``(label, bytes)``) together exceed the pixel budget.

    Reads headers only (microseconds each), so a request of many large images is refused before
    any of them costs a decode. Raises :class:`ImageError` naming the first bad image or the total.
    """
    budget = limits.request_pixels(spec)
    total = 0
    for label, data in images:
        try:
            total += image_pixels(data, spec, limits)
        except ImageError as exc:
            raise ImageError(f"{label}: {exc}") from None
    if total > budget:
        raise ImageError(
            f"the images hold {total} pixels together, over the limit of {budget} per request"
        )


def _reduce_factor(size: tuple[int, int], spec: InputSpec) -> int:
    """The integer factor that keeps the image's shorter side at least twice the side the
    resize brings it to (the same in either orientation: EXIF may swap the axes)."""
    return max(1, min(size) // needed_side(spec.transform, spec.height, spec.width))


def _sixteen_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer gray -> 8-bit by dividing by 257 with rounding, in integers.

    ``round(v / 257)`` is ``v // 257`` plus one when the remainder exceeds 128 (257 is odd: no
    ties); unsigned 16-bit stays in 16 bits, so a 2 MP image costs a few 4 MB arrays instead of
    the float64 copies (8 bytes a pixel each) a float division would make.
    """
    arr = np.asarray(img)
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        arr = arr.astype(np.uint16, copy=False)
    else:  # mode I: signed 32-bit, clipped to the 16-bit range first
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    q = arr // 257
    q += (arr - q * 257) > 128
    return Image.fromarray(q.astype(np.uint8), mode="L")


def _to_l_or_rgb(img: Image.Image, spec: InputSpec) -> tuple[Image.Image, int]:
    """Mode conversions (module docstring), after an integer reduction in the native mode where
    Pillow has one, so the full-size image is never copied into a wider mode. Returns the image
    and the reduction factor applied (1: none)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        img, mode = _sixteen_to_l(img), "L"
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32) * np.float32(255.0)
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    factor = _reduce_factor(img.size, spec)
    if factor > 1 and mode in ("L", "RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        img = img.reduce(factor)  # box average; RGBA/LA premultiplied, as compositing needs
    else:
        factor = 1
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), factor
    if mode in ("L", "RGB"):
        return img, factor
    return img.convert("RGB"), factor  # 1, CMYK, YCbCr, LAB, HSV


def _upright(
    img: Image.Image, orientation: int | None, reduced: Reduced
) -> tuple[Image.Image, Reduced]:
    """The EXIF transpose of a reduced image (cheap, before the resize: a crop is the upright
    image's), and where the full image now lies in it (the partial block moves with the flip)."""
    if orientation not in _TRANSPOSE:
        return img, reduced
    (w, h), f = reduced.full, reduced.factor
    px, py = img.size[0] - w / f, img.size[1] - h / f  # the partial block, right and bottom
    offsets = {2: (px, 0), 3: (px, py), 4: (0, py), 5: (0, 0), 6: (py, 0), 7: (py, px), 8: (0, px)}
    full = (h, w) if orientation in _SWAPS_AXES else (w, h)
    return img.transpose(_TRANSPOSE[orientation]), Reduced(full, f, offsets[orientation])


def decode_image(
    data: bytes,
    spec: InputSpec,
    limits: ImageLimits | None = None,
    budget: PixelBudget | None = None,
    deadline: float | None = None,
) -> np.ndarray:
    """Decode one encoded image into float32 ``[C, H, W]`` in [0, 1] for the model.

    Decode cost is bounded before any pixel is decoded: accepted formats only, the byte limit and
    the pixel limit read from the header, and (with ``budget``) the pixels decoded at once by the
    process; ``deadline`` (``time.monotonic()``) stops a decode still waiting for the budget. A
    JPEG is decoded straight at a reduced scale (``draft``: libjpeg's 1/2, 1/4, 1/8 DCT scaling),
    other images are box-reduced in their own mode, to no less than twice the size the model's
    resize reads. Raises :class:`ImageError` with a client-facing reason for anything unusable
    (``TimeoutError`` past the deadline).
    """
    limits = limits or ImageLimits()
    with _client_errors():
        img, full, scale, cost = _open(data, spec, limits)
        with budget.hold(cost, deadline) if budget else nullcontext():
            img.load()  # decodes now: truncated or corrupt data fails here
            orientation = img.getexif().get(_ORIENTATION)
            img, factor = _to_l_or_rgb(img, spec)
        img, reduced = _upright(img, orientation, Reduced(full, scale * factor))
    return to_model_array(
        img, spec.channels, spec.height, spec.width, spec.transform, reduced=reduced
    )
