"""Devices and data-parallel training: one process, or one of ``torchrun``'s.

Why not ``DistributedDataParallel``: SDDE differentiates through GradCAM (``autograd.grad`` with
``create_graph=True``), and DDP supports neither ``autograd.grad`` nor members called outside its
``forward``. So the ensemble is not wrapped: every process starts from rank 0's weights
(``broadcast_module``), computes the full loss and ``backward()`` on its shard, then gradients are
averaged with one bucketed ``all_reduce`` before ``optimizer.step()`` (``average_gradients``; and
BatchNorm buffers likewise, ``average_buffers``), which keeps replicas bit-identical. The cost
versus DDP is the lost overlap of communication with the backward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sdde_serve.errors import UserError
from training.config import TrainConfig

ALLREDUCE_BUCKET = 1 << 24  # elements per gradient all-reduce call (bounds the extra memory)


def pick_device(flag: str, local_rank: int | None) -> torch.device:
    """``auto`` -> CUDA when present (the process's local GPU under torchrun), else CPU."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cpu":
        return torch.device("cpu")
    if not flag.startswith("cuda"):
        raise UserError(f"unknown --device {flag!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {flag} asked for CUDA, but no CUDA device is available")
    if flag == "cuda" and local_rank is not None:
        flag = f"cuda:{local_rank}"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise UserError(f"bad --device {flag!r}; use cuda or cuda:N") from None
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s)")
    torch.cuda.set_device(device)
    return device


@dataclass
class DistContext:
    """Rank/world of this process and the collectives the loop needs (no-ops on one process)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    def close(self, together: bool) -> None:
        """Tears down the group this process made. ``together``: every process is here too.

        Then a barrier comes first: gloo aborts (SIGABRT) a process whose peer destroyed the
        group while it was still finishing. Otherwise (this process failed alone) nothing is
        torn down, since a peer may be inside a collective and the teardown would hang; the
        exit ends the run and torchrun stops the rest.
        """
        if not (self.owns_group and dist.is_initialized()):
            return
        if together:
            self.barrier()
            dist.destroy_process_group()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        if self.world == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def average_gradients(self, params: list[Tensor]) -> None:
        """Mean of the gradients over processes: a sum of per-shard means / world."""
        if self.world == 1:
            return
        for bucket in buckets(params):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p, g in zip(bucket, grads, strict=True):
                n = g.numel()
                piece = flat[offset : offset + n].view(g.shape)
                if p.grad is None:
                    p.grad = piece.clone()
                else:
                    p.grad.copy_(piece)
                offset += n

    def average_buffers(self, module: torch.nn.Module) -> None:
        """BatchNorm running statistics: the mean over processes.

        Each process updated them with its shard's batch statistics; the mean of the updated
        running means equals the single-process update with the global batch (equal shards).
        """
        if self.world == 1:
            return
        floats = [b for b in module.buffers() if b.is_floating_point()]
        if not floats:
            return
        flat = torch.cat([b.reshape(-1) for b in floats])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for b in floats:
            b.copy_(flat[offset : offset + b.numel()].view(b.shape))
            offset += b.numel()

    def reduce_step(
        self, terms: dict[str, float], *flags: bool
    ) -> tuple[dict[str, float], tuple[bool, ...]]:
        """Loss terms averaged over processes, and each flag true if true on any process."""
        if self.world == 1:
            return terms, tuple(bool(f) for f in flags)
        keys = sorted(terms)
        values = [float(terms[k]) for k in keys] + [float(f) for f in flags]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        out = t.tolist()
        means = {k: out[i] / self.world for i, k in enumerate(keys)}
        return means, tuple(v > 0 for v in out[len(keys) :])

    def replicas_in_sync(self, module: torch.nn.Module) -> bool:
        """All processes hold bit-identical weights (hash of the state dict, gathered)."""
        digest = weights_digest(module)
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, digest)
        return len(set(digests)) == 1

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def buckets(params: list[Tensor]) -> Iterator[list[Tensor]]:
    """``params`` in order, in groups of about ``ALLREDUCE_BUCKET`` elements: one all-reduce
    per group, so the flat copy it needs stays bounded."""
    bucket: list[Tensor] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= ALLREDUCE_BUCKET:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def setup_distributed(device_flag: str) -> DistContext:
    """Single process, or one process of ``torchrun`` (``WORLD_SIZE`` > 1 in the environment).

    NCCL on GPUs, gloo on CPU. A process group initialised by the caller is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext(pick_device(device_flag, None))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_flag, local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(device, dist.get_rank(), dist.get_world_size(), owns)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of ``module``'s state dict (names and bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def autocast_for(device: torch.device, cfg: TrainConfig) -> Any:
    """bf16 autocast on CUDA with ``--amp`` (training and validation passes), else a no-op."""
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
