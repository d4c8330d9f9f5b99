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
  bilinear resize to the model's height and width (:func:`sdde_serve.data.to_model_array`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdde_serve.data import to_model_array
from sdde_serve.manifest import InputSpec


class ImageError(ValueError):
    """The bytes are not an image we can use; ``str(exc)`` is the reason for the client."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    # decompression-bomb guard: checked from the header, before any pixel is decoded
    max_pixels: int = 40_000_000


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img.convert("I"), dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64) * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if mode in ("L", "RGB"):
        return img
    return img.convert("RGB")  # 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, spec: InputSpec, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode one encoded image into float32 ``[C, H, W]`` in [0, 1] for the model.

    Raises :class:`ImageError` with a client-facing reason for anything unusable.
    """
    limits = limits or ImageLimits()
    if not data:
        raise ImageError("empty image")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width == 0 or height == 0:
                raise ImageError(f"image has zero size ({width}x{height})")
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"image of {width}x{height} pixels exceeds the limit of {limits.max_pixels}"
                )
            img.load()  # decodes now: truncated or corrupt data fails here
            img = ImageOps.exif_transpose(img)
            img = _to_l_or_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image exceeds the decompression-bomb pixel limit") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError
        raise ImageError(f"corrupt or truncated image ({str(exc)[:120]})") from None
    except Exception as exc:
        # Some Pillow plugins fail on hostile files with TypeError, struct.error, IndexError...:
        # still the client's bad bytes, never a server error
        raise ImageError(f"cannot decode image ({type(exc).__name__})") from None
    return to_model_array(img, spec.channels, spec.height, spec.width)
