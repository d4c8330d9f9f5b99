"""Energy (Liu et al., NeurIPS 2020; OpenOOD's ``ebo``) of the member-averaged logits:
``T · logsumexp_c(mean_m z[b, m, c] / T)``, the negative free energy, with T the graph's own
temperature (so ``sdde calibrate`` moves it with the probabilities; at T = 1 it is OpenOOD's
default). Averaging logits first, as MAL does, makes it a soft maximum of MAL's logits:
``MAL <= energy <= MAL + T log L``."""

from __future__ import annotations

import numpy as np

from sdde_serve.scores.registry import ScoreData, ScoreSpec


def energy(d: ScoreData) -> np.ndarray:
    z = np.asarray(d.logits, np.float64).mean(axis=1) / d.temperature  # [B, L]
    top = z.max(axis=-1)
    return d.temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=-1)))


SPEC = ScoreSpec(
    "energy",
    "T * logsumexp of the member-averaged logits / T (negative free energy)",
    energy,
    graph="export.scores.energy:energy",
    member_subset=True,
)
