"""The built-in report sections, one registration line each, in report order.

The order is metrics.json's key order, report.md's section order and the console's: a new
analysis is one module with a ``SECTION`` (sdde_serve/evaluation/section.py) and one line here (or
a ``register`` call of its own, as tests/evaluation/test_toy_section.py does).
"""

from __future__ import annotations

from sdde_serve.evaluation import (
    cams,
    classification,
    conformal_eval,
    consistency,
    diversity,
    members,
    ood_table,
    shift,
)
from sdde_serve.evaluation.section import SECTIONS, Context, Section, register, unregister

register(classification.SECTION)
register(ood_table.SECTION)
register(conformal_eval.SECTION)
register(diversity.SECTION)
register(cams.SECTION)
register(consistency.SECTION)
register(shift.SECTION)  # --shift
register(members.SECTION)  # --members-sweep

__all__ = ["SECTIONS", "Context", "Section", "register", "unregister"]
