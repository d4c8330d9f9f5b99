"""Similarity of the members' class-activation maps (the SDDE paper's Figure 5), numpy only.

The normalisation is the official code's (``corl-team/sdde``,
``openood/trainers/diversity/gradcam.py`` and ``common.py``), the same that the training loss
uses (``training.saliency.normalize_maps``):

1. crop a 1-pixel border (GradCAM maps of padded convolutions have edge artefacts),
2. standardise each map: ``(m - mean) / (std + 1e-6)`` with the population std,
3. L2-normalise the flattened map: ``m / (||m|| + 1e-6)``,
4. cosine = dot product of the normalised maps, averaged over the N(N-1)/2 member pairs and
   then over images.

The maps themselves (GradCAM of the predicted class, ReLU applied) come from the exported graph's
``cams`` output or the run's checkpoint; this module only compares them (and, as a report
section, draws them over their images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve.errors import UserError
from sdde_serve.evaluation.plotting import pyplot, save
from sdde_serve.evaluation.results import Evaluation
from sdde_serve.evaluation.section import Context, Section, num

STD_EPS = 1e-6
NORM_EPS = 1e-6
BORDER = 1


class MapsTooSmallError(UserError, ValueError):
    """Maps that cropping the border leaves empty: the similarity is not the training's one.

    A :class:`UserError` for ``sdde eval`` (one line, exit 2), a ``ValueError`` as the training
    side's ``training.saliency.normalize_maps`` raises for the same maps."""


def normalize_maps(maps: np.ndarray, border: int = BORDER) -> np.ndarray:
    """``[B, N, h, w]`` maps -> ``[B, N, D]`` standardised, L2-normalised, border-cropped."""
    maps = np.asarray(maps, np.float64)
    if maps.ndim != 4:
        raise ValueError(f"CAMs must be [B, N, h, w], got {maps.shape}")
    h, w = maps.shape[2:]
    if h <= 2 * border or w <= 2 * border:
        # the training loss refuses these maps too: a whole-map similarity would be another metric
        raise MapsTooSmallError(
            f"saliency maps of {h}x{w} leave nothing after cropping a {border}-pixel border; "
            "choose an earlier saliency layer or a larger input size (or --cam-images 0)"
        )
    if border > 0:
        maps = maps[:, :, border:-border, border:-border]
    flat = maps.reshape(*maps.shape[:2], -1)
    flat = (flat - flat.mean(axis=2, keepdims=True)) / (flat.std(axis=2, keepdims=True) + STD_EPS)
    return flat / (np.linalg.norm(flat, axis=2, keepdims=True) + NORM_EPS)


def pairwise_cosine_per_image(maps: np.ndarray, border: int = BORDER) -> np.ndarray:
    """``[B]`` mean cosine similarity over unordered member pairs, per image."""
    z = normalize_maps(maps, border)
    n = z.shape[1]
    if n < 2:
        raise ValueError("CAM similarity needs at least two members")
    gram = z @ z.transpose(0, 2, 1)  # [B, N, N]
    iu = np.triu_indices(n, k=1)
    return gram[:, iu[0], iu[1]].mean(axis=1)


def mean_pairwise_cosine(maps: np.ndarray, border: int = BORDER) -> float:
    """Mean over images and member pairs of the cosine similarity of normalised CAMs."""
    return float(pairwise_cosine_per_image(maps, border).mean())


# --- the report section -------------------------------------------------------------------------


def compute(ctx: Context, config: None) -> dict[str, Any]:
    """The CAM similarity per set (``None`` when neither the graph nor a checkpoint gave CAMs)."""
    ev = ctx.evaluation
    cams = ev.id_set.cams
    if cams is None:
        return {"cams": None}
    return {
        "cams": {
            "id": mean_pairwise_cosine(cams),
            "ood": {
                s.name: mean_pairwise_cosine(s.cams) for s in ev.ood_sets if s.cams is not None
            },
            "source": ctx.cam_source,
            "images_per_set": len(cams),
            "map_size": list(cams.shape[2:]),
        }
    }


def markdown(m: dict[str, Any]) -> list[str]:
    cams = m["cams"]
    if cams is None:
        return [
            "No CAMs: the graph has no `cams` output and no checkpoint provided them, so "
            "the CAM similarity is not computed.",
            "",
        ]
    return [
        "## CAM similarity (mean pairwise cosine of normalised member CAMs; lower = more diverse)",
        "",
        f"{cams['images_per_set']} images per set, maps {cams['map_size'][0]}×"
        f"{cams['map_size'][1]} from the {cams['source']} (class: the ensemble's "
        "prediction), 1-pixel border cropped, standardised, L2-normalised.",
        "",
        "| data | cosine similarity |",
        "|---|---|",
        f"| ID | {num(cams['id'])} |",
        *[f"| {k} | {num(v)} |" for k, v in cams["ood"].items()],
        "",
    ]


def _grid_rows(
    evaluation: Evaluation, per_set: int, max_ood_rows: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, image [C, H, W], maps [N, h, w]): a few ID images, then a few of each OOD set."""
    rows = []
    for s in [evaluation.id_set, *evaluation.ood_sets]:
        if s.cams is None or s.cam_images is None:
            continue
        is_id = s is evaluation.id_set
        n_ood = max(1, len(evaluation.ood_sets))
        limit = per_set if is_id else max(1, min(per_set, max_ood_rows // n_ood))
        for i in range(min(limit, len(s.cams))):
            rows.append(("ID" if is_id else s.name, s.cam_images[i], s.cams[i]))
    return rows


def _draw_row(axes: Any, name: str, image: np.ndarray, maps: np.ndarray, first: bool) -> None:
    img = image.transpose(1, 2, 0)
    cmap = "gray" if img.shape[2] == 1 else None
    img = img[..., 0] if img.shape[2] == 1 else np.clip(img, 0, 1)
    h, w = img.shape[:2]
    cosine = float(pairwise_cosine_per_image(maps[None])[0])
    axes[0].imshow(img, cmap=cmap, vmin=0, vmax=1)
    axes[0].set_ylabel(f"{name}\ncos {cosine:.2f}", fontsize=8)
    for m, ax in enumerate(axes[1:]):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
        cam = maps[m]
        span = float(cam.max() - cam.min())
        cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
        # the CAM is stretched over the whole image (the upsampling GradCAM visualisations use)
        ax.imshow(
            cam,
            cmap="jet",
            alpha=0.45,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            interpolation="bilinear",
            vmin=0,
            vmax=1,
        )
        if first:
            ax.set_title(f"member {m}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def plot_cam_grid(
    evaluation: Evaluation, path: Path, per_set: int = 3, max_ood_rows: int = 4
) -> Path | None:
    """Rows: a few ID images, then a few from each OOD set; columns: input, one CAM per member."""
    rows = _grid_rows(evaluation, per_set, max_ood_rows)
    if not rows:
        return None
    members = rows[0][2].shape[0]
    fig, axes = pyplot().subplots(
        len(rows), members + 1, figsize=(1.6 * (members + 1), 1.7 * len(rows)), squeeze=False
    )
    for r, (name, image, maps) in enumerate(rows):
        _draw_row(axes[r], name, image, maps, first=r == 0)
    fig.suptitle("per-member class-activation maps (predicted class)", fontsize=9)
    return save(fig, path)


def plots(evaluation: Evaluation, out: Path) -> list[Path]:
    grid = plot_cam_grid(evaluation, out / "cams.png")
    return [] if grid is None else [grid]


SECTION = Section("cams", compute, markdown, plots)
