"""Data specs: one parser for every command that names a dataset.

A spec is a short string (``digits``, a path, ``torchvision:CIFAR10``) optionally followed by
``@SPLIT``. Loading returns an :class:`ArrayDataset` of uint8 images in ``[N, C, H, W]``; the
conversion to a model's channels and size (:meth:`ArrayDataset.as_model_input`) is the same
PIL-based conversion the server applies to uploaded images, so train, eval and serve agree.

This module is numpy + Pillow only (``digits`` needs scikit-learn, ``torchvision:`` needs
torchvision); both are imported lazily with a clear message when missing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdde_serve.errors import UserError
from sdde_serve.extras import require_extra
from sdde_serve.manifest import InputSpec
from sdde_serve.preprocess import ImageError, ImageLimits, decode_image
from sdde_serve.transform import Resize, to_model_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# digits is split once, with this seed, into a train part (which training splits again into
# train/validation) and a test part that only evaluation reads.
DIGITS_SPLIT_SEED = 20240607
DIGITS_TEST_FRACTION = 0.2
# a training run directory as a data spec: RUN_DIR@val is the part it held out (named
# ``<data>:val`` in manifests, e.g. digits@train:val), RUN_DIR@train the part it trained on
RUN_FILES = ("config.json", "split.json")
RUN_PARTS = ("val", "train")
# Local files (sdde eval) are the user's own: Pillow's decompression-bomb limit (89 MP) only
LOCAL_FILE_LIMITS = ImageLimits(max_bytes=2**31, max_pixels=Image.MAX_IMAGE_PIXELS)


@dataclass
class ArrayDataset:
    """Images as uint8 ``[N, C, H, W]`` (C is 1 or 3), optional int64 labels, class names."""

    name: str
    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    # images were decoded for one model by the server's decode path (load_dataset's ``model``):
    # already its input, never resized again
    model_ready: bool = False

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise UserError(
                f"{self.name}: images must be [N, C, H, W] with C in (1, 3), "
                f"got shape {self.images.shape}"
            )
        if self.images.dtype != np.uint8:
            raise UserError(f"{self.name}: images must be uint8, got {self.images.dtype}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise UserError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: np.ndarray, name: str | None = None) -> ArrayDataset:
        labels = None if self.labels is None else self.labels[indices]
        return ArrayDataset(
            name or self.name, self.images[indices], labels, list(self.classes), self.model_ready
        )

    def fingerprint(self) -> str:
        """SHA-256 of pixels and labels: detects a data spec that now means other data."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
        return h.hexdigest()

    def as_model_input(
        self, channels: int, height: int, width: int, resize: Resize | None = None
    ) -> np.ndarray:
        """float32 ``[N, channels, height, width]`` in [0, 1], converted as the server does.

        ``resize``: the model's (``manifest.input.transform``); None: the default a model
        exported from this data records (:meth:`Resize.default_for`), which is what training
        and export, which have no manifest yet, apply. Images already at the model's channels
        and size are used as they are when the resize leaves them unchanged, or when the
        loader decoded them for this model (``model_ready``).
        """
        resize = resize or Resize.default_for(channels)
        at_size = self.channels == channels and self.size == (height, width)
        if at_size and (self.model_ready or resize.keeps(height, width)):
            return self.images.astype(np.float32) / 255.0
        if self.model_ready:
            raise UserError(f"{self.name}: decoded for a {self.size} model, not {height}x{width}")
        out = np.empty((len(self), channels, height, width), dtype=np.float32)
        for i, img in enumerate(self.images):
            out[i] = to_model_array(chw_to_pil(img), channels, height, width, resize)
        return out


# --- image conversion shared with the server (sdde_serve.preprocess) -------------------------


def chw_to_pil(img: np.ndarray) -> Image.Image:
    """A uint8 ``[C, H, W]`` array as a PIL image (mode L or RGB)."""
    return Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The one train/validation split: a seeded permutation, validation taken from its head."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"validation fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise UserError(f"dataset of {n} images is too small for a validation split")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --- spec parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    text: str
    kind: str
    location: str
    split: str | None


def parse_spec(text: str) -> DataSpec:
    """Split ``SOURCE[@SPLIT]`` and decide which loader reads SOURCE."""
    text = text.strip()
    if not text:
        raise UserError("empty data spec")
    source, split = text, None
    if "@" in text and not Path(text).exists():
        source, split = text.rsplit("@", 1)
        if split.endswith(tuple(f":{part}" for part in RUN_PARTS)):
            raise UserError(
                f"data spec {text!r} names the images a training run held out of "
                f"{source}@{split.split(':')[0]} (its split.json), which only that run can "
                f"rebuild: pass RUN_DIR@{split.rsplit(':', 1)[1]}, RUN_DIR being the run "
                "directory the model was exported from"
            )
        if split not in ("train", "test", "val", "all"):
            raise UserError(f"data spec {text!r}: unknown split {split!r} (train, test, all)")
    if source == "digits":
        return DataSpec(text, "digits", "", split)
    if source.startswith("torchvision:"):
        return DataSpec(text, "torchvision", source.split(":", 1)[1], split)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"data spec {text!r}: no such file or directory (expected 'digits', "
            "'torchvision:NAME', a directory of IDX files or images, or a .npz file)"
        )
    if path.is_file():
        if path.suffix == ".npz":
            return DataSpec(text, "npz", str(path), split)
        raise UserError(f"data spec {text!r}: a file must be .npz")
    if all((path / name).is_file() for name in RUN_FILES):
        return DataSpec(text, "run", str(path), split)
    if _idx_files(path):
        return DataSpec(text, "idx", str(path), split)
    return DataSpec(text, "folder", str(path), split)


def load_dataset(
    spec: str, *, split: str = "train", model: InputSpec | None = None
) -> ArrayDataset:
    """Load a data spec; ``split`` is the command's default, overridden by ``SPEC@SPLIT``.

    ``model``: the input of the model the images are for; a folder of image files is then
    decoded file by file exactly as the server decodes them (other specs are arrays already).
    """
    parsed = parse_spec(spec)
    if parsed.kind in ("folder", "npz") and parsed.split is not None:
        # one set of images, no splits: "@test" must not quietly mean "all of them"
        what = "an image folder" if parsed.kind == "folder" else "a .npz file"
        raise UserError(
            f"data spec {spec!r}: {parsed.location} is {what}, which has no splits; drop "
            f"'@{parsed.split}' to use all its images, or point at a folder or file of "
            "only the images you mean"
        )
    if parsed.kind == "run" and parsed.split is None:
        raise UserError(
            f"data spec {spec!r} is a training run: say which part, {spec}@val (the images "
            f"it held out) or {spec}@train (the images it trained on)"
        )
    split = parsed.split or split
    if model is not None and parsed.kind == "folder":
        return _load_folder_for(parsed, model)
    return LOADERS[parsed.kind](parsed, split)


def _load_digits(spec: DataSpec, split: str) -> ArrayDataset:
    with require_extra("eval", "train", what="the 'digits' data spec needs scikit-learn"):
        from sklearn.datasets import load_digits
    bunch = load_digits()
    # pixel values are 0..16: stretch to the 0..255 of ordinary images
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_val_split(len(images), DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(images))}.get(split)
    if idx is None:
        raise UserError(f"digits has splits train, test and all, not {split!r}")
    return ArrayDataset(f"digits@{split}", images[idx], labels[idx], [str(i) for i in range(10)])


def _idx_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if "-idx" in p.name and "ubyte" in p.name)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise UserError(f"{path}: truncated IDX file ({len(data) - offset} of {expected} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _load_idx(spec: DataSpec, split: str) -> ArrayDataset:
    directory = Path(spec.location)
    prefixes = {"train": ("train",), "test": ("t10k", "test"), "all": ("",)}.get(split)
    if prefixes is None:
        raise UserError(f"{directory}: IDX directories have splits train and test, not {split!r}")

    def find(kind: str) -> Path | None:
        for p in _idx_files(directory):
            if kind in p.name and any(p.name.startswith(pre) for pre in prefixes):
                return p
        return None

    images_path, labels_path = find("images-idx3"), find("labels-idx1")
    if images_path is None:
        available = ", ".join(p.name for p in _idx_files(directory))
        raise UserError(f"{directory}: no {split!r} images IDX file (found: {available})")
    images = read_idx(images_path)[:, None]
    labels = read_idx(labels_path).astype(np.int64) if labels_path else None
    classes = [str(i) for i in range(int(labels.max()) + 1)] if labels is not None else []
    return ArrayDataset(f"{directory.name}@{split}", images, labels, classes)


def _load_npz(spec: DataSpec, split: str) -> ArrayDataset:
    try:
        arrays = np.load(spec.location, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{spec.location}: cannot read .npz ({exc})") from None
    key = next((k for k in ("images", "x", "X") if k in arrays), None)
    if key is None:
        raise UserError(f"{spec.location}: .npz needs an 'images' (or 'x') array")
    images = arrays[key]
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if images.dtype != np.uint8:
        # float arrays are taken as [0, 1] pixels
        images = np.clip(np.round(images.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    label_key = next((k for k in ("labels", "y", "Y") if k in arrays), None)
    labels = arrays[label_key].astype(np.int64) if label_key else None
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"]]
    elif labels is not None:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        classes = []
    return ArrayDataset(Path(spec.location).stem, np.ascontiguousarray(images), labels, classes)


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()
    except (OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


def _folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sub-directories) and ``(file, label)`` pairs (-1: no label) of a folder."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        classes = [p.name for p in subdirs]
        files = [
            (f, i)
            for i, d in enumerate(subdirs)
            for f in sorted(d.rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        classes = []
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return classes, files


def _load_folder(spec: DataSpec, split: str) -> ArrayDataset:
    root = Path(spec.location)
    classes, files = _folder_files(root)
    pil = [_read_image(f) for f, _ in files]
    # A folder mixes sizes and modes: bring all to the first image's size, gray only if all are.
    channels = 1 if all(im.mode == "L" for im in pil) else 3
    width, height = pil[0].size
    images = np.stack(
        [
            np.round(to_model_array(im, channels, height, width) * 255.0).astype(np.uint8)
            for im in pil
        ]
    )
    labels = np.array([lab for _, lab in files], dtype=np.int64) if classes else None
    return ArrayDataset(root.name, images, labels, classes)


def read_run_json(path: Path) -> Any:
    """One JSON file of a run directory; missing or unreadable is a UserError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing (not a complete run directory)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: unreadable or truncated ({type(exc).__name__})") from None


def _load_run(spec: DataSpec, split: str) -> ArrayDataset:
    return run_part(Path(spec.location), split)


def run_part(root: Path, part: str, source: str | None = None) -> ArrayDataset:
    """A run's held-out (``val``) or training (``train``) images: its data spec (``source``,
    else config.json's) loaded as the trainer loaded it, less or only split.json's validation
    indices, checked to be the same images (fingerprint)."""
    if part not in RUN_PARTS:
        raise UserError(f"{root} is a training run: its parts are @val and @train, not @{part}")
    record = read_run_json(root / "split.json")
    try:
        source = source or read_run_json(root / "config.json")["data"]["spec"]
        n, fingerprint = int(record["n"]), record["fingerprint"]
        val = np.asarray(record["val_indices"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{root}: incomplete run record ({exc!r})") from None
    full = load_dataset(source, split="train")  # the call the trainer made
    if len(full) != n or full.fingerprint() != fingerprint:
        raise UserError(
            f"data spec {source!r} no longer gives the images {root} was trained on "
            "(fingerprint differs)"
        )
    if val.size and (val.min() < 0 or val.max() >= n):
        raise UserError(f"{root / 'split.json'}: validation indices out of range")
    if part == "val":
        return full.subset(val, name=f"{full.name}:val")
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return full.subset(np.flatnonzero(keep), name=f"{full.name}:train")


def _decode_file(path: Path, model: InputSpec) -> np.ndarray:
    try:
        x = decode_image(path.read_bytes(), model, LOCAL_FILE_LIMITS)
    except (OSError, ImageError) as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None
    # the decoded pixels are k / 255 exactly: stored as k, as_model_input gives them back
    return np.round(x * 255.0).astype(np.uint8)


def _load_folder_for(spec: DataSpec, model: InputSpec) -> ArrayDataset:
    """A folder decoded file by file as the server and ``sdde score`` decode uploads (EXIF,
    alpha, the JPEG scaling, the model's resize), so the same file gives the same pixels."""
    root = Path(spec.location)
    classes, files = _folder_files(root)
    images = np.stack([_decode_file(f, model) for f, _ in files])
    labels = np.array([lab for _, lab in files], dtype=np.int64) if classes else None
    return ArrayDataset(root.name, images, labels, classes, model_ready=True)


def _load_torchvision(spec: DataSpec, split: str) -> ArrayDataset:
    with require_extra("train", what="torchvision data specs need torchvision"):
        import torchvision.datasets as tvd
    cls = getattr(tvd, spec.location, None)
    if cls is None:
        raise UserError(f"torchvision has no dataset {spec.location!r}")
    root = os.environ.get("SDDE_DATA_DIR", str(Path.home() / ".cache" / "sdde" / "data"))
    kwargs = {"split": split} if spec.location in ("SVHN",) else {"train": split == "train"}
    try:
        ds = cls(root=root, download=True, **kwargs)
    except Exception as exc:  # network errors, corrupt archives: all reported the same way
        raise UserError(f"torchvision:{spec.location}: cannot load ({exc})") from None
    data = np.asarray(ds.data)
    if data.ndim == 3:
        data = data[:, None]
    elif data.shape[-1] == 3:
        data = data.transpose(0, 3, 1, 2)
    labels = np.asarray(getattr(ds, "targets", getattr(ds, "labels", None)), dtype=np.int64)
    classes = [str(c) for c in getattr(ds, "classes", range(int(labels.max()) + 1))]
    return ArrayDataset(
        f"{spec.location}@{split}", np.ascontiguousarray(data, np.uint8), labels, classes
    )


LOADERS: dict[str, Callable[[DataSpec, str], ArrayDataset]] = {
    "digits": _load_digits,
    "idx": _load_idx,
    "npz": _load_npz,
    "folder": _load_folder,
    "torchvision": _load_torchvision,
    "run": _load_run,
}
