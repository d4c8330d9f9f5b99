"""ViM, Virtual-logit Matching (Wang et al., CVPR 2022; OpenOOD's ``vim``), per member, averaged.

For member m with final layer ``z = W x + b`` and pre-logit features x, all from the training
split: the origin ``u = -pinv(W) b`` (where every logit is 0); the principal space of the
uncentred covariance of ``x - u`` (its ``dim`` leading eigenvectors); the residual space ``R``
(the other eigenvectors); ``alpha = mean(max_c z) / mean(||(x - u) R||)`` on the training rows.
``score_m = logsumexp_c(z_c) - alpha ||(x - u) R||`` (energy minus the scaled virtual logit),
the ensemble's score ``mean_m score_m``. ``dim`` = half the feature width, OpenOOD's choice for
CIFAR ResNet18 (256 of 512).

Stored (float32): ``u [N, D]``, ``residual [N, D, D - dim]``, ``alpha [N]``.
"""

from __future__ import annotations

import numpy as np

from sdde_serve.scores.registry import FitData, ScoreData, ScoreSpec


def principal_dim(width: int) -> int:
    return width // 2


def fit(data: FitData) -> dict[str, np.ndarray]:
    feats = np.asarray(data.features, np.float64)  # [n, N, D]
    weight, bias = np.asarray(data.weight, np.float64), np.asarray(data.bias, np.float64)
    u = -np.einsum("nDl,nl->nD", np.linalg.pinv(weight), bias)  # [N, D]
    centred = feats - u  # EmpiricalCovariance(assume_centered=True) of x - u
    cov = np.einsum("inD,inE->nDE", centred, centred) / len(feats)
    vals, vecs = np.linalg.eigh(cov)  # ascending; ViM keeps the largest `dim` as principal
    dim = principal_dim(feats.shape[-1])
    order = np.argsort(-vals, axis=-1, kind="stable")[:, dim:]
    residual = np.stack([vecs[m][:, order[m]] for m in range(len(vecs))])  # [N, D, D - dim]
    vlogit = np.linalg.norm(np.einsum("inD,nDr->inr", centred, residual), axis=-1)  # [n, N]
    alpha = data.logits.max(axis=-1).mean(axis=0) / vlogit.mean(axis=0)
    return {"u": u, "residual": residual, "alpha": alpha}


def reference(d: ScoreData) -> np.ndarray:
    assert d.features is not None
    z = np.asarray(d.logits, np.float64)
    top = z.max(axis=-1, keepdims=True)
    energy = (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]  # [B, N]
    x = np.asarray(d.features, np.float64).reshape(*z.shape[:2], -1) - d.stats["u"]
    vlogit = np.linalg.norm(np.einsum("bnD,nDr->bnr", x, d.stats["residual"]), axis=-1)
    return (energy - d.stats["alpha"] * vlogit).mean(axis=1)


SPEC = ScoreSpec(
    "vim",
    "mean over members of ViM: energy of the member's logits minus its scaled virtual logit "
    "(norm of the pre-logit features off the training features' principal space)",
    reference,
    graph="export.scores.vim:vim",
    fit=fit,
    needs_features=True,
    tolerance=1e-4,
    relative_tolerance=True,
)
