"""Torch-side data: in-memory model inputs, augmentation, and the per-step batch plan.

Design: every batch is a pure function of ``(seed, stream, epoch, step)``. Each member has its own
stream (Deep Ensembles: every member sees its own data order), Outlier Exposure an endless outlier
stream, and the diversity term one shared batch per step, drawn either as the official trainer
does (``shared_source="member"``: the batch of one member chosen at random, fed to all members) or
from a stream of its own (``"stream"``). The shared batch may be smaller than the member batch
(``shared_size``) and exists only on the steps that compute the diversity term (every
``diversity_period``-th). Because nothing depends on generator
*state*, a resumed run (even mid-epoch), a run with DataLoader workers, and a run sharded over
torchrun processes all see exactly the batches a single uninterrupted process sees.

Under DDP every process computes the same *global* batch indices and augmentation parameters and
keeps its shard ``[rank::world]`` (what ``DistributedSampler`` does to an index list), so the
global batch of K processes equals the single-process batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sdde_serve.data import ArrayDataset
from sdde_serve.errors import UserError
from training.config import auto_augment
from training.methods import StepBatch

# Stream kinds: part of every seed, so streams never share random numbers.
MEMBER, SHARED, OUTLIER = 0, 1, 2
# Images converted per chunk when building model inputs (bounds peak memory of the conversion).
CONVERT_CHUNK = 4096


@dataclass
class Tensors:
    """Model-input pixels in memory: float32 ``[N, C, H, W]`` in [0, 1] and optional labels."""

    x: Tensor
    y: Tensor | None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def to_tensors(ds: ArrayDataset, channels: int, size: int) -> Tensors:
    """Convert with ``ArrayDataset.as_model_input`` (the server's conversion), chunk by chunk."""
    parts = [
        torch.from_numpy(
            ds.subset(np.arange(i, min(i + CONVERT_CHUNK, len(ds)))).as_model_input(
                channels, size, size
            )
        )
        for i in range(0, len(ds), CONVERT_CHUNK)
    ]
    x = torch.cat(parts) if parts else torch.empty(0, channels, size, size)
    y = None if ds.labels is None else torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
    return Tensors(x.contiguous(), y)


def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training inputs (the ensemble normalises with these)."""
    x64 = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = x64.mean(dim=1)
    # A constant channel would divide by zero; 1.0 leaves it unscaled.
    std = x64.std(dim=1).clamp_min(1e-6)
    std = torch.where(std < 1e-3, torch.ones_like(std), std)
    return [float(v) for v in mean], [float(v) for v in std]


# --- augmentation ------------------------------------------------------------------------------


def rng_for(*key: int) -> np.random.Generator:
    """An independent generator for an integer key (numpy's SeedSequence mixes the whole key)."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class Augment:
    """A batch augmentation split into drawing parameters and applying them.

    Parameters are drawn for the whole global batch with one generator; each process applies
    them to its own shard only, so K processes together augment exactly as one process does.
    """

    def draw(self, rng: np.random.Generator, b: int) -> tuple[Tensor, ...]:
        return ()

    def apply(self, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        return x


class CropFlip(Augment):
    """OpenOOD's ``RandomCrop(size, padding=4)`` + ``RandomHorizontalFlip`` on a whole batch.

    Padding is zeros in [0, 1] pixel space (black), as torchvision pads before ``Normalize``.
    """

    pad = 4

    def draw(self, rng: np.random.Generator, b: int) -> tuple[Tensor, ...]:
        oy = torch.from_numpy(rng.integers(0, 2 * self.pad + 1, size=b))
        ox = torch.from_numpy(rng.integers(0, 2 * self.pad + 1, size=b))
        flip = torch.from_numpy(rng.random(b) < 0.5)
        return oy, ox, flip

    def apply(self, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        oy, ox, flip = params
        b, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (self.pad,) * 4)
        rows = oy[:, None] + torch.arange(h)[None, :]  # [B, H]
        cols = ox[:, None] + torch.arange(w)[None, :]  # [B, W]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put channels last


class Crop(CropFlip):
    """``RandomCrop(size, padding=4)`` alone: the translation part of OpenOOD's augmentation.

    For digits, where a mirrored 2 or 7 is not a digit of its class. The flip is still drawn (and
    ignored) so a crop-only batch has exactly the offsets of the crop-flip batch of the same seed.
    """

    def draw(self, rng: np.random.Generator, b: int) -> tuple[Tensor, ...]:
        oy, ox, flip = super().draw(rng, b)
        return oy, ox, torch.zeros_like(flip)


AUGMENTATIONS: dict[str, Augment] = {"none": Augment(), "crop": Crop(), "crop-flip": CropFlip()}


def choose_augment(name: str, channels: int, size: int) -> str:
    """The augmentation to use: ``name``, or for ``auto`` the per-dataset rule of the config."""
    return auto_augment(channels, size) if name == "auto" else name


# --- the batch plan ----------------------------------------------------------------------------

SHARED_SOURCES = ("member", "stream")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches per epoch (drop_last), at least one (a tiny set gives one short batch)."""
    return max(1, n_train // batch_size)


@dataclass(frozen=True)
class Plan:
    """What every step draws. Shared by all processes; ``rank``/``world`` pick the shard."""

    seed: int
    members: int
    batch_size: int
    n_train: int
    augment: str
    outlier_batch_size: int = 0
    n_outliers: int = 0
    rank: int = 0
    world: int = 1
    shared_size: int | None = None  # None: batch_size
    shared_source: str = "stream"
    diversity_period: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n_train, self.batch_size)

    @property
    def shared_batch_size(self) -> int:
        return min(self.batch_size, self.shared_size or self.batch_size)

    def has_diversity(self, step: int) -> bool:
        """Whether global step ``step`` (0-based) computes the diversity term: every k-th one,
        starting with the first (``step % k == 0``)."""
        return step % self.diversity_period == 0

    def shared_member(self, step: int) -> int:
        """The member whose batch is the shared batch at ``step`` (``shared_source="member"``)."""
        return int(rng_for(self.seed, SHARED, 0, step, 2).integers(self.members))


@lru_cache(maxsize=64)
def _permutation(seed: int, kind: int, index: int, epoch: int, n: int) -> np.ndarray:
    return rng_for(seed, kind, index, epoch).permutation(n)


class StepDataset(Dataset):
    """Item ``t`` is everything global step ``t`` trains on, for this process's shard.

    Returns a ``StepBatch`` on the CPU: ``member_batches`` (one (x, y) per member), ``shared``
    ((x, y) seen by every member: the diversity batch; None on steps without the diversity term),
    ``outliers`` (x or None) and ``step`` (``t``: with the seed it draws ``--diversity-pairs``);
    the trainer moves it to the device and adds the step's diversity scale and the method's
    auxiliary module. Use with ``step_loader``.
    """

    def __init__(self, plan: Plan, train: Tensors, outliers: Tensors | None = None) -> None:
        if train.y is None:
            raise UserError("training data has no labels")
        self.plan, self.train, self.outliers = plan, train, outliers
        self.augment = AUGMENTATIONS[plan.augment]

    def __len__(self) -> int:  # not used for iteration (the sampler gives the steps)
        return 2**62

    def _labelled(
        self, kind: int, index: int, step: int, size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Stream ``(kind, index)``'s batch at ``step``; ``size``: only its first ``size`` images
        (exactly those images, augmented exactly as in the full batch)."""
        p = self.plan
        epoch, k = divmod(step, p.steps_per_epoch)
        perm = _permutation(p.seed, kind, index, epoch, p.n_train)
        idx = perm[k * p.batch_size : (k + 1) * p.batch_size]
        return self._draw(self.train, idx, kind, index, step, size)

    def _draw(
        self,
        data: Tensors,
        idx: np.ndarray,
        kind: int,
        index: int,
        step: int,
        size: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        p = self.plan
        # Draw augmentation parameters for the global batch, then keep this rank's shard: every
        # process draws identical parameters, so the shards add up to the single-process batch.
        params = self.augment.draw(rng_for(p.seed, kind, index, step, 1), len(idx))
        if size is not None:
            idx, params = idx[:size], tuple(q[:size] for q in params)
        shard = slice(p.rank, None, p.world)
        mine = torch.from_numpy(idx[shard])
        x = self.augment.apply(data.x[mine], tuple(q[shard] for q in params))
        y = None if data.y is None else data.y[mine]
        return x.contiguous(), y

    def _outlier_batch(self, step: int) -> Tensor:
        # An endless stream: positions [t*B, (t+1)*B) of concatenated per-pass permutations.
        p = self.plan
        assert self.outliers is not None
        n, b = p.n_outliers, p.outlier_batch_size
        pos = np.arange(step * b, (step + 1) * b, dtype=np.int64)
        passes, offsets = np.divmod(pos, n)
        perms = {int(e): _permutation(p.seed, OUTLIER, 0, int(e), n) for e in np.unique(passes)}
        idx = np.array([perms[int(e)][o] for e, o in zip(passes, offsets, strict=True)])
        x, _ = self._draw(self.outliers, idx, OUTLIER, 0, step)
        return x

    def _shared(self, step: int) -> tuple[Tensor, Tensor] | None:
        p = self.plan
        if not p.has_diversity(step):
            return None  # this step skips the diversity term: nothing to prepare
        if p.shared_source == "member":
            return self._labelled(MEMBER, p.shared_member(step), step, p.shared_batch_size)
        return self._labelled(SHARED, 0, step, p.shared_batch_size)

    def __getitem__(self, step: int) -> StepBatch:
        members = [self._labelled(MEMBER, i, step) for i in range(self.plan.members)]
        shared = self._shared(step)
        outliers = self._outlier_batch(step) if self.outliers is not None else None
        return StepBatch(member_batches=members, shared=shared, outliers=outliers, step=step)


def _identity(item: StepBatch) -> StepBatch:
    return item


def step_loader(
    dataset: StepDataset, start_step: int, end_step: int, *, workers: int, pin_memory: bool
) -> DataLoader:
    """Batches for steps ``start_step .. end_step - 1`` in order (workers prefetch ahead)."""
    return DataLoader(
        dataset,
        batch_size=None,  # each item already is a whole step
        sampler=range(start_step, end_step),
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def eval_batches(data: Tensors, batch_size: int, limit: int | None = None):
    """Un-augmented batches in order, for validation passes."""
    n = len(data) if limit is None else min(limit, len(data))
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        yield data.x[i:j], None if data.y is None else data.y[i:j]


def train_eval_subset(data: Tensors, n: int, seed: int) -> Tensors:
    """A fixed, seeded subset of the training inputs (unaugmented) to measure train accuracy."""
    if n <= 0 or len(data) == 0:
        return Tensors(data.x[:0], None if data.y is None else data.y[:0])
    idx = torch.from_numpy(np.sort(rng_for(seed, 99).permutation(len(data))[:n]))
    return Tensors(data.x[idx], None if data.y is None else data.y[idx])


def n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
