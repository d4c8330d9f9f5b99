"""Temperature scaling (sdde_serve.calibration.fit_temperature) recovers a known temperature."""

from __future__ import annotations

import numpy as np
import pytest

from sdde_serve.calibration import ece, ensemble_probs, fit_temperature


def _overconfident(t_true: float, n: int = 8000, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.0, (n, classes))
    p = np.exp(true_logits - true_logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)  # labels ~ softmax(true_logits)
    return true_logits * t_true, labels  # the model is over-confident by the factor t_true


@pytest.mark.parametrize("t_true", [2.5, 0.6])
def test_recovers_known_temperature(t_true: float) -> None:
    logits, labels = _overconfident(t_true, seed=int(10 * t_true))
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(t_true, rel=0.05)


def test_identical_members_fit_the_same_temperature() -> None:
    logits, labels = _overconfident(2.0, n=2000, seed=1)
    t_single = fit_temperature(logits, labels)
    t_ensemble = fit_temperature(np.stack([logits] * 3, axis=1), labels)
    assert t_ensemble == pytest.approx(t_single, rel=1e-4)


def test_scaling_reduces_ece() -> None:
    logits, labels = _overconfident(3.0, n=10000, seed=2)
    t = fit_temperature(logits, labels)
    before = ece(ensemble_probs(logits[:, None], 1.0), labels)
    after = ece(ensemble_probs(logits[:, None], t), labels)
    assert after < 0.02 < before
