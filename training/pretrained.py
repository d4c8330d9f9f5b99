"""Pretrained weights for ensemble members: ``--pretrained PATH`` or ``--pretrained hub``.

A file is a state dict of the architecture (``torch.save(model.state_dict())`` as .pt/.pth,
read with ``weights_only=True``, or a .safetensors file): torchvision's names for ``resnet18`` /
``resnet50``, timm's for ``timm:NAME`` (what ``timm.create_model(NAME).state_dict()`` holds, the
format of timm's published files), this project's for the others. ``hub`` asks torchvision or
timm for the published weights (a download: never in tests).

Every member starts from the same weights. The classifier (``get_classifier()``) is loaded only
when the file has it with the model's shapes; otherwise each member keeps its own fresh head,
drawn from the run's seeded RNG like a from-scratch member (so heads differ between members,
bodies do not). Any other mismatch (a missing or unexpected tensor, another shape) is an error,
never a partial load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdde_serve.errors import UserError
from training.models import SplitModel, arch_spec

HUB = "hub"
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Wrappers training scripts put around a state dict (``{"state_dict": ...}``), and DDP's prefix.
WRAPPER_KEYS = ("state_dict", "model")
DDP_PREFIX = "module."
# BatchNorm counters older files lack; they do not change what the network computes.
OPTIONAL_SUFFIX = "num_batches_tracked"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a .pt/.pth/.bin or .safetensors file; one-line UserError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"--pretrained {path}: expected one of {', '.join(SUFFIXES)}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or pickled-object file: one clear line
        raise UserError(f"--pretrained {path}: unreadable ({exc.__class__.__name__})") from None
    return unwrap(raw, str(path))


def unwrap(raw: Any, label: str) -> dict[str, Tensor]:
    """A plain ``{name: tensor}`` dict from a checkpoint (wrappers and ``module.`` removed)."""
    for key in WRAPPER_KEYS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise UserError(f"--pretrained {label}: not a state dict of tensors")
    if raw and all(k.startswith(DDP_PREFIX) for k in raw):
        raw = {k[len(DDP_PREFIX) :]: v for k, v in raw.items()}
    return dict(raw)


def hub_state_dict(arch: str) -> dict[str, Tensor]:
    """The arch's published weights from torchvision / timm (a download)."""
    spec = arch_spec(arch)
    if spec.hub is None:
        raise UserError(f"--pretrained hub: no published weights for --arch {arch}; pass a file")
    try:
        return spec.hub()
    except Exception as exc:  # offline, no such weights, ...: one line
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise UserError(f"--pretrained hub: cannot get weights for {arch} ({first})") from None


def source_state_dict(source: str, arch: str) -> dict[str, Tensor]:
    return hub_state_dict(arch) if source == HUB else read_state_dict(source)


def head_keys(target: nn.Module, classifier: nn.Module) -> set[str]:
    """State-dict names of the classifier's tensors inside ``target``."""
    for prefix, module in target.named_modules():
        if module is classifier:
            dot = f"{prefix}." if prefix else ""
            return {dot + k for k in classifier.state_dict()}
    return set()


def merged_state(model: SplitModel, state: dict[str, Tensor], label: str) -> dict[str, Tensor]:
    """``model``'s pretrained target state with ``state`` loaded, head kept when shapes differ."""
    target = model.pretrained_target()
    own = target.state_dict()
    head = head_keys(target, model.get_classifier())
    # a file without a classifier (a headless backbone) is fine: the fresh heads stay
    missing = sorted(
        k for k in own if k not in state and k not in head and not k.endswith(OPTIONAL_SUFFIX)
    )
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"--pretrained {label} does not fit {model_name(model)}: {what}")
    fits = head_fits(model, state)
    merged = dict(own)
    for k, v in state.items():
        if k in head and not fits:
            continue  # another class count: the member's own fresh head stays
        if v.shape != own[k].shape:
            raise UserError(
                f"--pretrained {label} does not fit {model_name(model)}: {k} is "
                f"{list(v.shape)} in the file, {list(own[k].shape)} in the model"
            )
        merged[k] = v.to(own[k].dtype)
    return merged


def head_fits(model: SplitModel, state: dict[str, Tensor]) -> bool:
    """Whether the file's classifier has the model's shapes (same class count and width)."""
    target = model.pretrained_target()
    own = target.state_dict()
    keys = head_keys(target, model.get_classifier())
    return all(k in state and own[k].shape == state[k].shape for k in keys)


def model_name(model: SplitModel) -> str:
    name = getattr(model, "timm_name", None)
    return f"timm:{name}" if name else type(model).__name__


def load_into(members: Sequence[SplitModel], state: dict[str, Tensor], label: str) -> None:
    """Loads ``state`` into every member (``merged_state``: the head only when it fits)."""
    for member in members:
        member.pretrained_target().load_state_dict(merged_state(member, state, label))


def record(source: str | None) -> dict[str, Any] | None:
    """What config.json records of the weights a run started from."""
    if source is None:
        return None
    if source == HUB:
        return {"source": HUB, "sha256": None}
    return {"source": str(source), "sha256": file_sha256(source)}
