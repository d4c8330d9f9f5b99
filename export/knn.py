"""The KNN feature bank: what the graph's ``knn`` output compares an input with.

The score is the deep-nearest-neighbour detector of Sun et al. (ICML 2022, "Out-of-distribution
detection with deep nearest neighbors"): the k-th largest cosine similarity between an input's
feature vector and the feature vectors of training images. Here the feature vector is the
concatenation of every member's pre-logit features (``forward_head(f, pre_logits=True)``),
L2-normalised as a whole, so one Gemm + TopK in the graph scores the whole ensemble.

* Rows come from the run's **training** images (split.json's complement): the validation split
  stays held out for the temperature, the threshold and the score choice.
* At most ``rows`` of them are kept, by a seeded subsample stratified by class (each class keeps
  its share, largest remainders first), so a smaller bank still covers every class.
* k and the bank size go together (Sun et al. scale k with the fraction of the training set kept):
  :func:`default_k` is one neighbour per :data:`ROWS_PER_K` rows, rounded, at least 1.

Memory: ``rows x dims x 4`` bytes in float32 (``dims`` = members x pre-logit width: 5 x 84 = 420
for LeNet, 5 x 512 = 2560 for ResNet18), half in float16.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from sdde_serve.errors import UserError
from sdde_serve.manifest import KNN_BANK_INITIALIZER

# the numpy reference lives with the score (sdde_serve/scores/knn.py, torch-free); re-exported
from sdde_serve.scores.knn import knn_scores as knn_scores
from sdde_serve.scores.knn import knn_scores_many as knn_scores_many
from sdde_serve.scores.knn import normalize_rows as normalize_rows

# Default bank size and k per bank rows, chosen by benchmarks/mnist_ood.py on its validation OOD
# sets (docs/export.md): the validation AUROC rose with the bank (1,000 -> 7,200 rows) and fell
# with k at every size (k = 1 best), so k = 1 below 15,000 rows, growing with the bank beyond
# (Sun et al. scale k with the fraction of the training set kept). ResNet18 x 5 at 10,000 rows
# is 102 MB of float32.
DEFAULT_BANK_ROWS = 10_000
ROWS_PER_K = 10_000
# |score(float16 bank) - score(float32 bank)| allowed for --knn-dtype float16
FLOAT16_TOLERANCE = 1e-3
DTYPES = {"float32": np.float32, "float16": np.float16}


def default_k(rows: int) -> int:
    """One neighbour per :data:`ROWS_PER_K` bank rows (at least 1)."""
    return max(1, round(rows / ROWS_PER_K))


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` of ``len(labels)`` items, each class keeping its share.

    Deterministic for a seed. Shares are rounded by largest remainder (ties: lower class first);
    within a class the kept items are a seeded random draw.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / total
    quota = np.floor(exact).astype(int)
    order = np.lexsort((classes, -(exact - quota)))  # largest remainder first
    quota[order[: n - quota.sum()]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


@torch.no_grad()
def pre_logit_features(
    ensemble: nn.Module, images: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Concatenated member pre-logit features ``[n, N*D]`` (float32) of [0, 1] ``images``."""
    parts = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))
        parts.append(ensemble.forward_pre_logits(x).flatten(1).numpy())
    if not parts:
        raise UserError("no images to compute features for")
    return np.concatenate(parts)


def bank_fingerprint(bank: np.ndarray) -> str:
    """SHA-256 of the bank's little-endian bytes as stored (dtype and shape included)."""
    arr = np.ascontiguousarray(bank)
    h = hashlib.sha256()
    h.update(str(arr.dtype.newbyteorder("<")).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


@dataclass
class FeatureBank:
    """Unit rows ``bank [R, dims]`` (float32, or float16-rounded) and how they were chosen."""

    bank: np.ndarray
    dtype: str
    source_images: int
    indices: np.ndarray  # rows' positions in the training split
    seed: int

    @property
    def rows(self) -> int:
        return int(self.bank.shape[0])

    @property
    def dims(self) -> int:
        return int(self.bank.shape[1])

    @property
    def memory_bytes(self) -> int:
        return self.rows * self.dims * np.dtype(DTYPES[self.dtype]).itemsize

    def as_dtype(self, dtype: str) -> FeatureBank:
        return FeatureBank(
            self.bank.astype(DTYPES[dtype]), dtype, self.source_images, self.indices, self.seed
        )


def build_bank(
    features: np.ndarray, labels: np.ndarray | None, *, rows: int, seed: int = 0
) -> FeatureBank:
    """The float32 bank from training ``features [n, dims]``: stratified subsample, unit rows."""
    if rows < 1:
        raise UserError(f"--knn-bank must be >= 1 rows, got {rows}")
    if len(features) == 0:
        raise UserError("the run's training split is empty: no images for the KNN bank")
    # unlabelled training data (never from sdde train, but cheap to allow): one class
    idx = stratified_subsample(np.zeros(len(features)) if labels is None else labels, rows, seed)
    bank = normalize_rows(features[idx]).astype(np.float32)
    return FeatureBank(bank, "float32", len(features), idx, seed)


def store_bank_as(model: onnx.ModelProto, dtype: str) -> None:
    """Store ``knn_bank`` in ``dtype`` (halves the file for float16) behind a Cast to float32.

    Done on the exported graph: the exporter would fold a Cast of a constant straight back.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.name == KNN_BANK_INITIALIZER:
            arr = numpy_helper.to_array(init).astype(DTYPES[dtype])
            graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, KNN_BANK_INITIALIZER))
            break
    else:
        raise UserError("the graph has no 'knn_bank' initializer")
    cast_out = f"{KNN_BANK_INITIALIZER}_float32"
    for node in graph.node:
        node.input[:] = [cast_out if n == KNN_BANK_INITIALIZER else n for n in node.input]
    cast = helper.make_node(
        "Cast", [KNN_BANK_INITIALIZER], [cast_out], to=onnx.TensorProto.FLOAT, name="knn_bank_cast"
    )
    graph.node.insert(0, cast)
