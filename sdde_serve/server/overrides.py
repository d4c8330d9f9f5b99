"""The per-request overrides of the OOD decision, ``ood_policy`` and ``alpha``: parsed here once
for ``/v1`` and ``/v2`` alike (same checks, same words, same status: :class:`BadParameter`, 422
as every other parameter outside its declared range; docs/server.md "Errors")."""

from __future__ import annotations

from typing import Any, cast

from sdde_serve.manifest import Manifest
from sdde_serve.scoring import OOD_POLICIES, NoCalibrationScores, OODPolicy
from sdde_serve.server.domain_errors import BadParameter


def parse_overrides(
    policy: Any, alpha: Any, default_policy: str, manifest: Manifest, model: str
) -> tuple[OODPolicy, float | None]:
    """(policy, alpha) for one request: ``policy`` (``None``: the server's ``default_policy``)
    and ``alpha`` (``None``: the model's), checked against the model served as ``model``."""
    policy = default_policy if policy is None else policy
    if policy not in OOD_POLICIES:
        raise BadParameter(f"ood_policy must be 'flag' or 'reject', got {policy!r}")
    if alpha is None:
        return cast(OODPolicy, policy), None
    # bool is an int to Python, not a number to a client; NaN fails the range check
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha < 1.0:
        raise BadParameter(f"alpha must be a number in [0, 1), got {alpha!r}")
    if manifest.ood.calibration_scores is None:
        raise NoCalibrationScores(model)
    return cast(OODPolicy, policy), float(alpha)


def number_or_text(text: str) -> float | str:
    """A form field's text as a number when it is one (else as it came, for the check above to
    name): forms carry text, JSON and query parameters arrive typed."""
    try:
        return float(text)
    except ValueError:
        return text
