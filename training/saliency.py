"""Saliency maps of ensemble members and the SDDE similarity between them.

GradCAM (Selvaraju et al.) per member ``i`` and sample ``b``, for the ground-truth class ``y_b``:

    g      = d z_i[b, y_b] / d A_i[b]          (A_i: feature map [K, h, w] at the saliency layer)
    w_k    = mean over (h, w) of g_k           (channel weights)
    M_i[b] = ReLU(sum_k w_k A_i[b, k])         ([h, w])

computed with ``torch.autograd.grad(..., create_graph=True)`` when the map feeds a loss, so the
loss back-propagates through the gradient itself (double backward) into the member's weights on
both sides of the saliency layer.

The similarity follows the official SDDE code: ``normalize_maps`` crops a 1-pixel border,
standardises each map (zero mean, unit population std, eps 1e-6 on the std) and L2-normalises the
flattened map; ``mean_pairwise_cosine`` averages the cosine similarity over each unordered pair of
members (i < j) and over the batch. That is the *metric* (``cam_similarity``, the paper's Figure 5).

The *training loss* ``diversity_loss`` is the same cosine of centred maps with one change that
keeps its gradient bounded. ``z / (||z|| + eps)`` of a centred map ``z`` has a gradient of size
``1 / ||z||``; GradCAM maps of an untrained LeNet on colour images have standard deviations near
1e-4 and many near 1e-6, so one near-constant map gave one member a diversity gradient 1e5 times
its usual size: the step wrecked its weights, its ReLUs died and it answered one class ever after
(or the loss went NaN). ``diversity_loss`` divides by ``sqrt(||z||^2 + delta_i^2)`` instead, with
``delta_i = FLOOR * rms_b ||z_{b,i}||`` taken per member over the batch (detached): the map
gradient is at most ``1 / delta_i``, a fixed multiple of that member's typical one; maps far
above the floor keep the official cosine; a map far below it (no saliency to speak of) counts
as ~0 instead of a random +-1. ``delta_i`` scales with member ``i``'s maps, so the loss keeps
the official invariance to the scale of a member's maps.

``--diversity-pairs P`` takes both means over P member pairs drawn per step (``sample_pairs``,
``pair_members``) instead of all of them: an unbiased estimate of the all-pairs mean, for which
``saliency_maps(members=...)`` runs only the drawn pairs' members.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from training.choices import SALIENCY_CHOICES
from training.ensemble import Ensemble, batchnorm_mode

EPS = 1e-6  # the official code's eps, on the std and on the L2 norm
# The loss's norm floor as a fraction of the member's typical map norm (see the module doc):
# 0.1 bounds a map's gradient at 10x the typical one and leaves maps above ~0.3x typical within
# 5% of the official cosine.
FLOOR = 0.1
# An absolute floor under delta^2 (delta >= 1e-10, far below any real map norm): an all-zero
# member gives 0, and rsqrt's derivative (-x^-1.5 / 2) stays finite in float32 at x = TINY_SQ.
TINY_SQ = 1e-20
CROP = 1  # border pixels dropped before standardising (official ``padding=1``)
KINDS = SALIENCY_CHOICES


def _check_labels(y: Tensor, logits: Tensor) -> None:
    b, _, num_classes = logits.shape
    if y.ndim != 1 or y.shape[0] != b or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 [B={b}], got {y.dtype} {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )


def _target_score(logits: Tensor, y: Tensor) -> Tensor:
    """Sum over batch and members of each member's logit for class ``y_b``.

    One scalar, one backward: member i's logits depend only on member i's tensors, and (with
    BatchNorm on running statistics) sample b's logit only on sample b, so the gradient of the
    sum w.r.t. each member's per-sample tensors is that sample's own gradient.
    """
    n = logits.shape[1]
    return logits.gather(2, y.long().view(-1, 1, 1).expand(-1, n, 1)).sum()


def pseudo_labels(logits: Tensor) -> Tensor:
    """Ensemble prediction (argmax of member-averaged logits): labels for unlabeled batches."""
    return logits.detach().mean(1).argmax(-1)


def gradcam_from_features(
    feats: Sequence[Tensor], logits: Tensor, y: Tensor, *, create_graph: bool
) -> Tensor:
    """GradCAM maps ``[B, N, h, w]`` from feature maps and the logits ``[B, N, L]`` they gave."""
    _check_labels(y, logits)
    grads = torch.autograd.grad(
        _target_score(logits, y), list(feats), create_graph=create_graph, retain_graph=True
    )
    maps = [
        F.relu((f * g.mean(dim=(2, 3), keepdim=True)).sum(1))
        for f, g in zip(feats, grads, strict=True)
    ]
    return torch.stack(maps, dim=1)


def saliency_maps(
    ensemble: Ensemble,
    x: Tensor,
    y: Tensor | None,
    *,
    kind: str = "gradcam",
    create_graph: bool,
    members: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Saliency maps of every member on images ``x`` (in [0, 1]) and the logits of that pass.

    ``y=None`` uses the ensemble's own prediction as the class (the unlabeled OOD batch of
    Algorithm 2). ``kind="gradcam"`` gives ``[B, N, h, w]``; ``"inputgrad"`` gives the gradient of
    the class logit w.r.t. the (normalised) input, ``[B, N, C, H, W]`` (Appendix B).
    ``members``: only these members (N = their number; the others are not run), labels required
    (a prediction of some members is not the ensemble's). Runs in the ensemble's current
    train/eval mode (see ``batchnorm_mode``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown saliency kind {kind!r}; choose one of {KINDS}")
    if y is None and members is not None:
        raise ValueError("saliency maps of some members need labels (y)")
    with torch.enable_grad():
        if kind == "gradcam":
            feats = ensemble.forward_features(x, members=members)
            logits = ensemble.forward_head(feats, members=members)
            labels = pseudo_labels(logits) if y is None else y
            return gradcam_from_features(feats, logits, labels, create_graph=create_graph), logits
        n = ensemble.num_members if members is None else len(members)
        # One copy of the input per member, so one backward yields each member's own gradient.
        # Differentiate w.r.t. the normalised input (what the official code's network sees).
        xs = ensemble.normalize(x).detach().unsqueeze(0).repeat(n, 1, 1, 1, 1).requires_grad_(True)
        each = ensemble.forward_each(list(xs.unbind(0)), normalized=True, members=members)
        logits = torch.stack(each, dim=1)
        labels = pseudo_labels(logits) if y is None else y
        _check_labels(labels, logits)
        (grad,) = torch.autograd.grad(
            _target_score(logits, labels), xs, create_graph=create_graph, retain_graph=True
        )
        return grad.transpose(0, 1), logits


def gradcam(ensemble: Ensemble, x: Tensor, y: Tensor, *, create_graph: bool) -> Tensor:
    """GradCAM maps ``[B, N, h, w]`` of every member for the ground-truth classes ``y``."""
    return saliency_maps(ensemble, x, y, kind="gradcam", create_graph=create_graph)[0]


def input_gradient(ensemble: Ensemble, x: Tensor, y: Tensor, *, create_graph: bool) -> Tensor:
    """Input-gradient maps ``[B, N, C, H, W]`` (gradient of the class logit w.r.t. the input)."""
    return saliency_maps(ensemble, x, y, kind="inputgrad", create_graph=create_graph)[0]


def crop(maps: Tensor) -> Tensor:
    """``maps [..., h, w]`` without a ``CROP``-pixel border (the official ``padding=1``)."""
    h, w = maps.shape[-2:]
    if h <= 2 * CROP or w <= 2 * CROP:
        raise ValueError(
            f"saliency maps of {h}x{w} leave nothing after cropping a {CROP}-pixel border; "
            "choose an earlier saliency layer or a larger input size"
        )
    return maps[..., CROP:-CROP, CROP:-CROP]


def normalize_maps(maps: Tensor) -> Tensor:
    """The official normalisation, ``[..., h, w] -> [..., D]``: crop, standardise, L2-normalise.

    ``D = (h - 2) * (w - 2)``. A constant map standardises to zeros and stays zero (its cosine
    with anything is 0), exactly as in the official code.
    """
    # float32 even under bf16 autocast: the standardisation and its 1e-6 eps need the precision.
    m = crop(maps).float()
    mean = m.mean(dim=(-2, -1), keepdim=True)
    std = m.std(dim=(-2, -1), keepdim=True, correction=0)  # population std, as in the official code
    z = ((m - mean) / (std + EPS)).flatten(-2)
    return z / (z.norm(dim=-1, keepdim=True) + EPS)


Pairs = Sequence[tuple[int, int]]


def pair_mean(gram: Tensor, pairs: Pairs | None = None) -> Tensor:
    """Mean of ``gram [B, N, N]`` over the batch and the member pairs ``pairs`` (positions on
    the member axis; None: every unordered pair i < j, each once)."""
    n = gram.shape[1]
    if n < 2:
        raise ValueError("pairwise similarity needs at least 2 members")
    if pairs is None:
        i, j = torch.triu_indices(n, n, offset=1, device=gram.device)
    else:
        if not pairs or any(not (0 <= a < n and 0 <= b < n and a != b) for a, b in pairs):
            raise ValueError(f"pairs must be distinct members of 0..{n - 1}, got {list(pairs)}")
        i, j = torch.tensor(list(pairs), dtype=torch.long, device=gram.device).T
    return gram[:, i, j].mean()


def mean_pairwise_cosine(maps: Tensor, pairs: Pairs | None = None) -> Tensor:
    """Mean cosine similarity over unordered member pairs (i < j) and the batch.

    ``maps``: ``[B, N, ...]`` (trailing dims flattened). Each pair counts once; averaging the
    symmetric off-diagonal of the Gram matrix (the official code) gives the same number.
    ``pairs``: only these pairs (see ``pair_mean``).
    """
    if maps.ndim < 3:
        raise ValueError(f"expected maps [B, N, ...], got {tuple(maps.shape)}")
    v = maps.flatten(2).float()
    v = v / (v.norm(dim=-1, keepdim=True) + EPS)
    return pair_mean(v @ v.transpose(1, 2), pairs)  # Gram [B, N, N]


def diversity_similarity(maps: Tensor, kind: str, pairs: Pairs | None = None) -> Tensor:
    """The official similarity of a batch of maps (the metric; training uses ``diversity_loss``).

    GradCAM maps get the official normalisation first. Input gradients are compared raw (the
    official input-gradient loss takes the cosine of the flattened gradients directly).
    """
    if kind == "gradcam":
        return mean_pairwise_cosine(normalize_maps(maps), pairs)
    return mean_pairwise_cosine(maps, pairs)


def soft_unit(v: Tensor) -> Tensor:
    """``v [B, N, D] / sqrt(||v||^2 + delta_n^2)``: unit vectors with a per-member norm floor.

    ``delta_n = FLOOR * sqrt(mean_b ||v_{b,n}||^2)`` over the whole batch (all processes),
    detached (a constant of the step, so it adds no gradient of its own). Bounded: every output
    norm is < 1 and its Jacobian is at most
    ``1 / delta_n``.
    """
    sq = v.pow(2).sum(-1, keepdim=True)  # [B, N, 1]
    typical = global_batch_mean(sq.detach().mean(0, keepdim=True))
    return v * torch.rsqrt(sq + (FLOOR**2 * typical + TINY_SQ))


def global_batch_mean(t: Tensor) -> Tensor:
    """``t`` (a per-shard batch mean) averaged over the data-parallel processes, if any.

    Under torchrun each process holds an equal shard of the shared batch; the floor must be the
    whole batch's, or the loss (and the trajectory) would depend on the number of processes.
    A no-op on one process. Detached input: the collective adds nothing to autograd.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def mean_pairwise_dot(v: Tensor, pairs: Pairs | None = None) -> Tensor:
    """Mean over unordered member pairs (i < j; or ``pairs``) and the batch of ``<v_bi, v_bj>``;
    v [B, N, D]."""
    return pair_mean(v @ v.transpose(1, 2), pairs)


def diversity_loss(maps: Tensor, kind: str, pairs: Pairs | None = None) -> Tensor:
    """The SDDE diversity loss L_div that training minimises (bounded gradient; module doc).

    GradCAM maps ``[B, N, h, w]``: border cropped, centred per map, ``soft_unit``, mean pairwise
    dot product. Input gradients ``[B, N, ...]``: ``soft_unit`` of the raw flattened gradients (the
    official input-gradient loss is their plain cosine). Float32 even under bf16 autocast.
    ``pairs``: the mean over these pairs of map positions only (``sample_pairs``). A member's
    floor ``delta`` depends on its own maps only, so its terms are those of the all-pairs loss.
    """
    if maps.ndim < 3:
        raise ValueError(f"expected maps [B, N, ...], got {tuple(maps.shape)}")
    if kind == "gradcam":
        m = crop(maps).float().flatten(2)
        v = m - m.mean(-1, keepdim=True)
    else:
        v = maps.float().flatten(2)
    return mean_pairwise_dot(soft_unit(v), pairs)


# Part of the key of the pair draw's generator. The batch plan's generators (training/data.py)
# take keys of 4 or 5 integers, this one 3, so the two never share a stream.
PAIR_STREAM = 0x50414952  # "PAIR"


def sample_pairs(members: int, count: int, seed: int, step: int) -> list[tuple[int, int]] | None:
    """``count`` distinct unordered member pairs ``(i, j)``, i < j, drawn uniformly at random
    for global step ``step`` of a run seeded ``seed``; sorted. None means "every pair":
    ``count`` 0 or all ``N(N-1)/2`` of them.

    A pure function of its arguments: a resumed run, every DDP process and both backends draw
    the same pairs with no generator state to save. A uniform draw without replacement makes
    the mean over the drawn pairs an unbiased estimate of the mean over all pairs.
    """
    total = members * (members - 1) // 2
    if not 0 <= count <= total:
        raise ValueError(f"{count} member pairs requested; {members} members have {total}")
    if count in (0, total):
        return None
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), PAIR_STREAM])
    everyone = [(i, j) for i in range(members) for j in range(i + 1, members)]
    return [everyone[k] for k in np.sort(rng.permutation(total)[:count])]


def pair_members(pairs: Pairs) -> tuple[list[int], list[tuple[int, int]]]:
    """The members that ``pairs`` names (sorted) and the pairs as positions in that list: the
    ``members`` of ``saliency_maps`` and the ``pairs`` of ``diversity_loss``."""
    used = sorted({m for pair in pairs for m in pair})
    where = {m: k for k, m in enumerate(used)}
    return used, [(where[a], where[b]) for a, b in pairs]


def cam_similarity(ensemble: Ensemble, x: Tensor, y: Tensor, *, batch_size: int = 256) -> float:
    """Mean pairwise cosine of normalised GradCAM maps on ``(x, y)``: the paper's Figure-5 metric.

    Evaluated in eval mode (running BatchNorm statistics), in batches; the result is the
    sample-weighted mean over batches. Leaves the ensemble's modes and weights untouched.
    """
    if x.shape[0] == 0:
        raise ValueError("cam_similarity needs at least one image")
    total, count = 0.0, 0
    with batchnorm_mode(ensemble, "eval"):
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            maps = gradcam(ensemble, xb, yb, create_graph=False).detach()
            total += float(diversity_similarity(maps, "gradcam")) * xb.shape[0]
            count += xb.shape[0]
    return total / count
