"""How an image of any size becomes the model's pixels: the one transform of every path.

The server and the batch scorer (:func:`sdde_serve.preprocess.decode_image`), ``sdde eval`` and
training-time evaluation (:meth:`sdde_serve.data.ArrayDataset.as_model_input`) all end in
:func:`to_model_array`, so one image gives the same pixels everywhere. The manifest records which
resize a model reads (:class:`sdde_serve.manifest.InputSpec` ``resize``, ``resize_size``):

* ``bilinear-stretch``: bilinear resize straight to the model's height x width, aspect ratio not
  kept (what models trained on images already at their size, such as MNIST digits, expect);
* ``shorter-crop``: torchvision's eval transform, ``Resize(resize_size)`` (the shorter side to
  ``resize_size``, bilinear with antialiasing, the longer side truncated to an integer) then
  ``CenterCrop((height, width))``. Computed as one resize of the box the crop covers: Pillow's
  filter reads pixels outside the box, so this equals resizing the whole image and cropping, at
  the cost of the crop only.

numpy + Pillow only (the runtime never imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

ResizeMode = Literal["bilinear-stretch", "shorter-crop"]
STRETCH: ResizeMode = "bilinear-stretch"
CROP: ResizeMode = "shorter-crop"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Resize:
    """How an image is brought to the model's size (module docstring)."""

    mode: ResizeMode = STRETCH
    # shorter-crop: the shorter side before the centre crop; None: the model's larger side (the
    # crop then cuts only the longer side, torchvision's ``crop_pct`` = 1)
    size: int | None = None

    @staticmethod
    def default_for(channels: int) -> Resize:
        """A colour model (square crops of natural images) crops; a grey one (digits) stretches."""
        return Resize(CROP) if channels == 3 else Resize(STRETCH)

    def shorter_side(self, height: int, width: int) -> int:
        """The side the image's shorter side is resized to (stretch: the model's larger side)."""
        return self.size if self.mode == CROP and self.size is not None else max(height, width)

    def keeps(self, height: int, width: int) -> bool:
        """Whether an image already at the model's size comes out unchanged."""
        return self.mode == STRETCH or self.shorter_side(height, width) == min(height, width)

    def source_box(self, full: tuple[int, int], height: int, width: int) -> Box:
        """The part of an image of size ``full`` (width, height) that the model sees."""
        w, h = full
        if self.mode == STRETCH:
            return (0.0, 0.0, float(w), float(h))
        short = self.shorter_side(height, width)
        # torchvision's _compute_resized_output_size: the long side truncated, not rounded
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        top = round((new_h - height) / 2.0)  # torchvision's center_crop offsets
        left = round((new_w - width) / 2.0)
        sx, sy = w / new_w, h / new_h
        return (left * sx, top * sy, (left + width) * sx, (top + height) * sy)


@dataclass(frozen=True)
class Reduced:
    """Where an image reduced by an integer ``factor`` (JPEG draft, ``Image.reduce``) came from.

    The reduced image covers the full image of size ``full`` (width, height) divided by
    ``factor``, starting at ``offset`` in its own pixels: reductions round sizes up, so a partial
    block is left over, on the right and bottom unless an EXIF transpose moved it.
    """

    full: tuple[int, int]
    factor: int
    offset: tuple[float, float] = (0.0, 0.0)

    def box(self, box: Box) -> Box:
        """A box of the full image in the reduced image's coordinates."""
        (ox, oy), f = self.offset, self.factor
        return (ox + box[0] / f, oy + box[1] / f, ox + box[2] / f, oy + box[3] / f)


def to_model_array(
    img: Image.Image,
    channels: int,
    height: int,
    width: int,
    resize: Resize | None = None,
    *,
    reduced: Reduced | None = None,
) -> np.ndarray:
    """A PIL image (any mode Pillow converts to L or RGB) as float32 ``[C, H, W]`` in [0, 1].

    Channels: RGB -> gray uses PIL's ITU-R 601-2 luma; gray -> RGB repeats the channel. Size:
    ``resize`` (None: stretch). With ``reduced``, ``img`` is a reduction of a larger image: the
    box is computed on the full image and mapped into ``img``, which equals transforming the full
    image up to rounding.
    """
    img = img.convert("L" if channels == 1 else "RGB")
    resize = resize or Resize()
    if reduced is None:
        box = resize.source_box(img.size, height, width)
    else:
        box = reduced.box(resize.source_box(reduced.full, height, width))
    if img.size != (width, height) or box != (0.0, 0.0, float(width), float(height)):
        img = img.resize((width, height), Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def needed_side(resize: Resize, height: int, width: int) -> int:
    """The shorter side an image must keep for the resize to see full detail: twice the side it
    is resized to (a bilinear reduction by 2 or more reads every pixel it covers)."""
    return 2 * resize.shorter_side(height, width)
