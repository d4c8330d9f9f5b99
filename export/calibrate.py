"""Calibration at export, on the run's held-out validation split (never the test split).

The paper tunes a temperature on the validation set before computing the calibration metrics;
we fit the *ensemble's* temperature as Ashukha et al. (2020, "Pitfalls of in-domain uncertainty
estimation and ensembling") prescribe: one T shared by all members, applied to every member's
logits before the probabilities are averaged, chosen to minimise the validation NLL of the
averaged probabilities (their "calibrated log-likelihood" is the test NLL at that T).

The fit runs on the exported graph's own outputs with the torch-free
:func:`sdde_serve.calibrate_cmd.calibrate_model` that ``sdde calibrate`` also uses: the OOD
threshold is then chosen on exactly the float32 scores the deployed graph computes, so the
boundary image is accepted by the graph itself (a float64 recomputation from PyTorch logits can
differ in the last bits and reject it).
"""

from __future__ import annotations

import numpy as np
import onnx

from sdde_serve.calibrate_cmd import calibrate_model
from sdde_serve.manifest import CalibrationInfo, OODSpec


def calibrate_on_validation(
    model: onnx.ModelProto,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    data: str,
    id_acceptance: float = 0.95,
    score: str = "mal",
) -> tuple[CalibrationInfo, OODSpec]:
    """Fit T and the OOD threshold on validation ``images`` (float32 [0, 1] NCHW) and labels.

    Sets ``model``'s ``temperature`` initializer to the fitted T.
    """
    return calibrate_model(
        model, images, labels, data=data, id_acceptance=id_acceptance, score=score
    )
